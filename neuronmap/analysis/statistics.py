"""Per-neuron summary statistics in one streaming pass, with mergeable partial results.

`RunningStats` keeps, per feature, the count, mean and the 2nd/3rd/4th central moment sums
(Chan et al. / Pébay pairwise formulas), min, max, mean |x| and the counts of near-zero and exact-zero
values. `add(batch)` folds in a batch, `merge(other)` folds in another partial, so statistics computed
shard by shard (on Ray workers, say) and merged equal the single-pass answer to float rounding.
`state_dict()` / `load_state_dict()` carry a partial across processes (the baukit `runningstats` habit).

`Reservoir` (in :mod:`neuronmap.analysis.reservoir`, re-exported here) keeps a uniform random sample
of rows, also mergeable; percentiles are read from it.
While the layer has no more rows than the reservoir holds, the reservoir *is* the data and the
percentiles are exact; above that they are those of a uniform sample of `size` rows: the rank error of
a percentile is about sqrt(p (1 - p) / size), 0.55 percentage points at the median for size=8192.
The sample is bottom-k (the rows with the smallest random keys), so merging is exact and
order-free, and a batch only copies the few rows that enter the sample.

The normality test is D'Agostino-Pearson's K² (what `scipy.stats.normaltest` computes) evaluated from
the streamed moments, so it covers every row, not a sample. With many rows it rejects normality for
nearly any real activation; read the statistic as "how far from Gaussian", the p-value as a formality.

All outputs are float64 arrays of shape (n_features,). Constant features (zero variance) get skewness
0 and kurtosis 0 (not NaN) and a warning.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable

import numpy as np
from scipy import special

from ..errors import ConfigError
from ._stats_kernel import fold_batch
from .reservoir import Reservoir, _as_2d

__all__ = ["Reservoir", "RunningStats", "neuron_rankings", "neuron_statistics"]

_MOMENTS = ("mean", "m2", "m3", "m4", "minimum", "maximum", "abs_sum", "n_small", "n_zero")


# Rows of a batch whose float64 mean is the shift of its power sums (about 1 MiB of float64). Near
# the data's own mean the shifted sums lose no precision to cancellation (the shift is off by about
# std / sqrt(rows)); the batch is then folded in with the exact pairwise update (`_stats_kernel._fold`).
_SHIFT_ELEMENTS = 1 << 17


def _combine(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The `_MOMENTS` of the union of two disjoint partials (Chan et al. 1979, Pébay 2008)."""
    na, nb = float(a["count"]), float(b["count"])
    n = na + nb
    delta = b["mean"] - a["mean"]
    d_n = delta / n
    m2a, m2b, m3a, m3b = a["m2"], b["m2"], a["m3"], b["m3"]
    m2 = m2a + m2b + delta * d_n * na * nb
    m3 = m3a + m3b + delta * d_n * d_n * na * nb * (na - nb) + 3.0 * d_n * (na * m2b - nb * m2a)
    m4 = (a["m4"] + b["m4"] + delta * d_n ** 3 * na * nb * (na * na - na * nb + nb * nb)
          + 6.0 * d_n * d_n * (na * na * m2b + nb * nb * m2a) + 4.0 * d_n * (na * m3b - nb * m3a))
    return {"mean": a["mean"] + d_n * nb, "m2": m2, "m3": m3, "m4": m4,
            "minimum": np.minimum(a["minimum"], b["minimum"]), "maximum": np.maximum(a["maximum"], b["maximum"]),
            "abs_sum": a["abs_sum"] + b["abs_sum"], "n_small": a["n_small"] + b["n_small"],
            "n_zero": a["n_zero"] + b["n_zero"]}


class RunningStats:
    """Mergeable per-feature moments, extremes and sparsity counts.

    Parameters
    ----------
    eps : float, default=1e-6
        A value counts as "near zero" (sparsity) when ``|x| < eps``.

    Attributes
    ----------
    count : int
        Rows seen.
    n_features : int or None
        Features per row (set by the first batch).
    """

    def __init__(self, eps: float = 1e-6):
        if not np.isfinite(eps) or eps < 0:
            raise ConfigError(f"eps={eps!r} must be a finite number >= 0")
        self.eps = float(eps)
        self.count = 0
        self.n_features: int | None = None
        for name in _MOMENTS:
            setattr(self, name, None)

    # -- accumulation ----------------------------------------------------------------------------
    def add(self, batch: Any) -> "RunningStats":
        """Fold in a batch of shape (n_rows, n_features) (or (n_rows, *shape), flattened).

        One compiled call (`_stats_kernel.fold_batch`): a pass in which each value is read once and
        feeds every sum, where numpy needed about a dozen passes (a float32 batch is not copied),
        then the batch's central moments join the running ones with the pairwise update of `merge`.
        """
        x = _as_2d(batch)
        if x.shape[0] == 0:
            return self
        if self.n_features is not None and x.shape[1] != self.n_features:
            raise ConfigError(f"cannot add a batch of {x.shape[1]} features to statistics of {self.n_features}")
        if self.count == 0:
            d = self.n_features = x.shape[1]
            for name in ("mean", "m2", "m3", "m4", "abs_sum"):
                setattr(self, name, np.zeros(d))
            self.minimum, self.maximum = np.full(d, np.inf), np.full(d, -np.inf)
            self.n_small, self.n_zero = np.zeros(d, dtype=np.int64), np.zeros(d, dtype=np.int64)
        self.count = fold_batch(x, self.eps, self.count, self, _SHIFT_ELEMENTS)
        return self

    def _merge_arrays(self, part: dict[str, Any]) -> None:
        """Fold in a partial given as a dict of `count`, `n_features` and the `_MOMENTS` arrays."""
        if self.count == 0:
            self.count, self.n_features = int(part["count"]), int(part["n_features"])
            for name in _MOMENTS:
                setattr(self, name, part[name])
            return
        merged = _combine(self.__dict__, part)
        for name in _MOMENTS:
            setattr(self, name, merged[name])
        self.count += int(part["count"])

    def merge(self, other: "RunningStats") -> "RunningStats":
        """Fold in another partial (pairwise update of Chan et al. 1979, Pébay 2008); returns self."""
        if other.count == 0:
            return self
        if other.eps != self.eps:
            raise ConfigError(f"cannot merge statistics with eps={other.eps} into eps={self.eps}")
        if self.count == 0:
            self.load_state_dict(other.state_dict())
            return self
        if other.n_features != self.n_features:
            raise ConfigError(f"cannot merge {other.n_features} features into {self.n_features}")
        self._merge_arrays(other.__dict__)
        return self

    def state_dict(self) -> dict[str, Any]:
        """Plain dict of numpy arrays and numbers (picklable, `np.savez`-able)."""
        state: dict[str, Any] = {"eps": self.eps, "count": self.count, "n_features": self.n_features}
        for name in _MOMENTS:
            value = getattr(self, name)
            state[name] = None if value is None else np.array(value, copy=True)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> "RunningStats":
        self.eps = float(state["eps"])
        self.count = int(state["count"])
        self.n_features = None if state["n_features"] is None else int(state["n_features"])
        for name in _MOMENTS:
            value = state.get(name)
            setattr(self, name, None if value is None else np.array(value, copy=True))
        return self

    # -- results ---------------------------------------------------------------------------------
    def _need_data(self) -> None:
        if self.count == 0:
            raise ConfigError("no rows were added to the statistics; the layer has no committed rows")

    def constant(self) -> np.ndarray:
        """bool (n_features,): features whose values are all equal (variance at rounding level).

        Relative to each feature's own magnitude, so a feature living at 1e-30 is not constant unless
        its values are equal.
        """
        self._need_data()
        scale = np.maximum(np.abs(self.minimum), np.abs(self.maximum))
        return (self.minimum == self.maximum) | (self.m2 <= (1e-13 * scale) ** 2 * self.count)

    def var(self, ddof: int = 0) -> np.ndarray:
        self._need_data()
        if self.count - ddof <= 0:
            raise ConfigError(f"ddof={ddof} must be < the number of rows ({self.count})")
        return np.maximum(self.m2, 0.0) / (self.count - ddof)

    def std(self, ddof: int = 0) -> np.ndarray:
        return np.sqrt(self.var(ddof))

    def skewness(self) -> np.ndarray:
        """Biased sample skewness g1 = sqrt(n) m3 / m2^1.5 (scipy.stats.skew default); 0 where constant."""
        constant = self.constant()
        with np.errstate(divide="ignore", invalid="ignore"):
            value = np.sqrt(self.count) * self.m3 / self.m2 ** 1.5
        return np.where(constant, 0.0, value)

    def kurtosis(self, fisher: bool = True) -> np.ndarray:
        """Biased excess kurtosis n m4 / m2^2 - 3 (scipy.stats.kurtosis default); 0 where constant."""
        constant = self.constant()
        with np.errstate(divide="ignore", invalid="ignore"):
            value = self.count * self.m4 / self.m2 ** 2
        value = np.where(constant, 3.0, value)
        return value - 3.0 if fisher else value

    def mean_abs(self) -> np.ndarray:
        self._need_data()
        return self.abs_sum / self.count

    def sparsity(self) -> np.ndarray:
        """Fraction of values with |x| < eps."""
        self._need_data()
        return self.n_small / self.count

    def zero_fraction(self) -> np.ndarray:
        """Fraction of values exactly 0."""
        self._need_data()
        return self.n_zero / self.count

    def normality(self) -> tuple[np.ndarray, np.ndarray]:
        """D'Agostino-Pearson K² statistic and p-value per feature, from the moments.

        Equals `scipy.stats.normaltest(x, axis=0)` on the concatenated rows (needs >= 8 rows).
        Constant features get statistic 0 and p-value 1.
        """
        self._need_data()
        n = float(self.count)
        if n < 8:
            raise ConfigError(f"the normality test needs at least 8 rows, got n_rows={self.count}")
        z_skew = _skew_z(self.skewness(), n)
        z_kurt = _kurtosis_z(self.kurtosis(fisher=False), n)
        statistic = z_skew ** 2 + z_kurt ** 2
        pvalue = special.chdtrc(2, statistic)
        constant = self.constant()
        return np.where(constant, 0.0, statistic), np.where(constant, 1.0, pvalue)

    def summary(self) -> dict[str, np.ndarray]:
        """Every per-feature statistic as float64 arrays of shape (n_features,); warns on constant features."""
        constant = self.constant()
        if constant.any():
            warnings.warn(f"{int(constant.sum())} of {self.n_features} neurons are constant (zero variance): "
                          "their skewness and kurtosis are reported as 0", UserWarning, stacklevel=2)
        out = {"mean": self.mean.copy(), "std": self.std(), "min": self.minimum.copy(), "max": self.maximum.copy(),
               "skewness": self.skewness(), "kurtosis": self.kurtosis(), "mean_abs": self.mean_abs(),
               "sparsity": self.sparsity(), "zero_fraction": self.zero_fraction()}
        if self.count >= 8:
            out["normality_statistic"], out["normality_pvalue"] = self.normality()
        return out


def _skew_z(b2: np.ndarray, n: float) -> np.ndarray:
    """scipy.stats.skewtest's z from the biased skewness (D'Agostino 1970)."""
    y = b2 * np.sqrt(((n + 1) * (n + 3)) / (6.0 * (n - 2)))
    beta2 = 3.0 * (n * n + 27 * n - 70) * (n + 1) * (n + 3) / ((n - 2.0) * (n + 5) * (n + 7) * (n + 9))
    w2 = -1 + np.sqrt(2 * (beta2 - 1))
    delta = 1 / np.sqrt(0.5 * np.log(w2))
    alpha = np.sqrt(2.0 / (w2 - 1))
    y = np.where(y == 0, 1.0, y)
    return delta * np.log(y / alpha + np.sqrt((y / alpha) ** 2 + 1))


def _kurtosis_z(b2: np.ndarray, n: float) -> np.ndarray:
    """scipy.stats.kurtosistest's z from the (Pearson) kurtosis (Anscombe & Glynn 1983)."""
    expected = 3.0 * (n - 1) / (n + 1)
    varb2 = 24.0 * n * (n - 2) * (n - 3) / ((n + 1) * (n + 1.0) * (n + 3) * (n + 5))
    x = (b2 - expected) / np.sqrt(varb2)
    sqrtbeta1 = 6.0 * (n * n - 5 * n + 2) / ((n + 7) * (n + 9)) * np.sqrt(6.0 * (n + 3) * (n + 5) / (n * (n - 2) * (n - 3)))
    a = 6.0 + 8.0 / sqrtbeta1 * (2.0 / sqrtbeta1 + np.sqrt(1 + 4.0 / sqrtbeta1 ** 2))
    term1 = 1 - 2 / (9.0 * a)
    denom = 1 + x * np.sqrt(2 / (a - 4.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        term2 = np.sign(denom) * np.where(denom == 0.0, np.nan, ((1 - 2.0 / a) / np.abs(denom)) ** (1 / 3))
    return (term1 - term2) / np.sqrt(2 / (9.0 * a))


def neuron_rankings(summary: dict[str, np.ndarray], top_k: int = 10) -> dict[str, np.ndarray]:
    """Indices of the top-k neurons: most active (mean |x|), most variable (std), sparsest (sparsity).

    Ties keep the lower index first (stable sort). Returns int64 arrays of shape (min(top_k, n),).
    """
    if isinstance(top_k, bool) or int(top_k) < 1:
        raise ConfigError(f"top_k={top_k!r} must be an integer >= 1")
    out = {}
    for ranking, key in (("most_active", "mean_abs"), ("most_variable", "std"), ("sparsest", "sparsity")):
        values = np.asarray(summary[key])
        out[ranking] = np.argsort(-values, kind="stable")[: int(top_k)].astype(np.int64)
    return out


def neuron_statistics(x: Any, eps: float = 1e-6, percentiles: Iterable[float] = (1, 5, 25, 50, 75, 95, 99),
                      reservoir_size: int = 8192, seed: int = 0) -> dict[str, np.ndarray]:
    """Every per-neuron statistic of an in-memory array.

    Parameters
    ----------
    x : array-like of shape (n_samples, n_features)
    eps : float
        Sparsity threshold (|x| < eps).
    percentiles : sequence of float in [0, 100]

    Returns
    -------
    dict of name -> ndarray of shape (n_features,), plus ``percentiles`` of shape (len(q), n_features).
    """
    stats = RunningStats(eps).add(x)
    reservoir = Reservoir(reservoir_size, seed).add(x)
    out = stats.summary()
    out["percentiles"] = reservoir.percentiles(percentiles)
    return out
