"""Information measures of activations: entropy per neuron, mutual information with labels and between layers.

Estimators (all in bits)
------------------------
Activations are continuous; every measure here is the *plug-in* (maximum-likelihood) estimate on a
discretisation, which is what is well defined and reproducible:

* :func:`entropy` -- each neuron's values are put into ``bins`` equal-width bins spanning that
  neuron's [min, max] over all samples (exactly ``np.histogram(x, bins)``); H = -sum p log2 p over
  the bin frequencies. It is the entropy of the *binned* variable: it grows with ``bins`` and is not
  the differential entropy. A constant neuron has entropy 0.
* :func:`mutual_information` -- the same binning of each neuron against a discrete label column:
  I(B; Y) = sum p(b, y) log2(p(b, y) / (p(b) p(y))), which is what
  ``sklearn.metrics.mutual_info_score(labels, binned) / ln 2`` computes.
* :func:`layer_mutual_information` -- between two layers of the same samples: each layer is
  projected onto its top principal components, each projection is cut into ``bins`` equal-frequency
  (quantile) bins, and the plug-in MI is computed for every pair of components. Quantile bins make
  both marginals (nearly) uniform, so each value lies in [0, log2(bins)] and is comparable across
  layers of different scale; it is invariant to monotone rescaling of either projection.

The plug-in MI is biased upwards by about (B - 1)(C - 1) / (2 n ln 2) bits for B occupied bins and C
classes (Panzeri & Treves 1996); ``correction="miller-madow"`` subtracts the first-order bias of
every entropy term (Miller 1955). Keep n much larger than bins * classes: :func:`mutual_information`
warns when n < 10 x bins x classes (`MI_ROWS_PER_CELL`), where the bias is a sizeable share of a
typical value (300 rows, 32 bins, 10 classes: ~0.67 bits of bias, and permuted labels score 0.61
bits against 0.66 for the real ones).

All functions take arrays of shape (n_samples, n_features) or batch factories (see
:mod:`neuronmap.analysis._sources`); with a factory, :func:`entropy` and
:func:`mutual_information` make two passes (ranges, then counts) and the counts are held in a
mergeable :class:`BinnedCounts` for Ray fan-out over shards.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import ConfigError
from ._sources import (
    DEFAULT_BATCH_SIZE, Source, _aligned_batches, _as_matrix, _check_choice, _check_int, _Moments, _warn,
)

CORRECTIONS = ("none", "miller-madow")
_LN2 = np.log(2.0)
MI_ROWS_PER_CELL = 10  # mutual_information warns below this many rows per (bin, class) cell


def mi_bias_bits(bins: int, n_classes: int, n_samples: int) -> float:
    """First-order (Miller-Madow) bias of the plug-in MI, (bins - 1)(classes - 1) / (2 n ln 2) bits,
    for an uninformative neuron that fills all `bins` bins."""
    return (bins - 1) * (n_classes - 1) / (2.0 * n_samples * _LN2)


def warn_small_sample(n_samples: int, bins: int, n_classes: int, correction: str) -> bool:
    """Warn (RuntimeWarning, which lands in an analysis artifact's warnings) when n_samples <
    `MI_ROWS_PER_CELL` x bins x n_classes; returns whether it warned.

    Why: with few rows per (bin, class) cell the plug-in MI is mostly estimator bias -- every
    neuron looks informative, also against shuffled labels -- and nothing in the values says so.
    """
    if n_classes < 2 or n_samples >= MI_ROWS_PER_CELL * bins * n_classes:
        return False
    bias = mi_bias_bits(bins, n_classes, n_samples)
    fix = ("correction='miller-madow' is on but removes only the first-order bias, unreliable at this ratio; "
           if correction == "miller-madow" else "or use correction='miller-madow'; ")
    _warn(f"mutual information from {n_samples} rows in {bins} bins x {n_classes} classes (fewer than "
          f"{MI_ROWS_PER_CELL} x bins x classes = {MI_ROWS_PER_CELL * bins * n_classes} rows): the plug-in estimate "
          f"is biased upwards by about {bias:.3g} bits ((bins-1)(classes-1)/(2 n ln 2), Miller-Madow first order), "
          f"so uninformative neurons score about that much; use fewer bins (e.g. bins="
          f"{max(2, n_samples // (MI_ROWS_PER_CELL * n_classes))}), more rows, {fix}compare against shuffled labels")
    return True


def value_ranges(X: Source, *, batch_size: int = DEFAULT_BATCH_SIZE) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-neuron min and max over all rows, and the row count: the first pass of binned estimates.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features) or batch factory

    Returns
    -------
    lo, hi : ndarray of shape (n_features,)
    n_samples : int
    """
    return _ranges(X, "X", _check_int("batch_size", batch_size, 1))


def _ranges(source, name: str, batch_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    lo = hi = None
    n = 0
    for (x,) in _aligned_batches([source], [name], batch_size, ""):
        lo = x.min(axis=0) if lo is None else np.minimum(lo, x.min(axis=0))
        hi = x.max(axis=0) if hi is None else np.maximum(hi, x.max(axis=0))
        n += len(x)
    if n == 0:
        raise ConfigError(f"{name} has no samples")
    return lo, hi, n


class BinnedCounts:
    """Per-neuron histogram counts on fixed equal-width bins, optionally joint with a label.

    Bin j of a neuron with range [first, last] is [edge_j, edge_{j+1}) with
    ``edges = np.linspace(first, last, bins + 1)``, the last bin closed -- ``np.histogram``'s rule,
    reproduced exactly (including its edge corrections). A constant neuron (first == last) gets the
    range [first - 0.5, first + 0.5], as ``np.histogram`` does. Values outside the range are counted
    in the end bins. States with the same ranges merge by adding counts.

    Parameters
    ----------
    first, last : ndarray of shape (n_features,)
        Per-neuron range, usually the min and max over all samples (:func:`value_ranges`). Every
        shard's state must use the same ranges to be mergeable.
    bins : int, default=32
        Number of bins (>= 2).
    n_classes : int, optional
        Also count jointly with integer label codes in [0, n_classes).

    Attributes
    ----------
    counts_ : ndarray of shape (n_features, bins) or (n_features, bins, n_classes)
    n_samples_ : int
    """

    def __init__(self, first=(), last=(), bins: int = 32, n_classes: int | None = None):
        self.bins = _check_int("bins", bins, 2)
        first, last = np.asarray(first, dtype=np.float64), np.asarray(last, dtype=np.float64)
        constant = first == last
        self.first = np.where(constant, first - 0.5, first)
        self.last = np.where(constant, last + 0.5, last)
        self.edges = np.linspace(self.first, self.last, self.bins + 1, axis=1)  # (d, bins + 1)
        self.n_classes = n_classes
        shape = (len(first), self.bins) if n_classes is None else (len(first), self.bins, n_classes)
        self.counts_ = np.zeros(shape, dtype=np.int64)
        self.n_samples_ = 0

    def bin_indices(self, X: np.ndarray) -> np.ndarray:
        """Bin of every value, int64 array of shape (n_rows, n_features), like ``np.histogram``."""
        edges_t = self.edges.T  # (bins + 1, d)
        x = np.clip(X, self.first, self.last)
        idx = ((x - self.first) * (self.bins / (self.last - self.first))).astype(np.int64)
        idx[idx == self.bins] -= 1
        idx[x < np.take_along_axis(edges_t, idx, axis=0)] -= 1
        increment = (x >= np.take_along_axis(edges_t, idx + 1, axis=0)) & (idx != self.bins - 1)
        idx[increment] += 1
        return idx

    def add(self, X, codes=None) -> BinnedCounts:
        """Count rows X of shape (b, n_features), with label codes of shape (b,) when joint; returns self."""
        X = _as_matrix(X, "X")
        if X.shape[1] != len(self.first):
            raise ConfigError(f"X has {X.shape[1]} features but the bins were set up for {len(self.first)}")
        idx = self.bin_indices(X)
        d = X.shape[1]
        flat = idx + (np.arange(d, dtype=np.int64) * self.bins)[None, :]
        if self.n_classes is None:
            self.counts_ += np.bincount(flat.ravel(), minlength=d * self.bins).reshape(d, self.bins)
        else:
            codes = np.asarray(codes, dtype=np.int64)
            if codes.shape != (len(X),):
                raise ConfigError(f"X has {len(X)} rows but {codes.size} label codes were given")
            flat = flat * self.n_classes + codes[:, None]
            size = d * self.bins * self.n_classes
            self.counts_ += np.bincount(flat.ravel(), minlength=size).reshape(self.counts_.shape)
        self.n_samples_ += len(X)
        return self

    def merge(self, other: BinnedCounts) -> BinnedCounts:
        if other.counts_.shape != self.counts_.shape or not (np.array_equal(other.first, self.first)
                                                             and np.array_equal(other.last, self.last)):
            raise ConfigError("BinnedCounts can only merge states built with the same ranges, bins and classes")
        self.counts_ += other.counts_
        self.n_samples_ += other.n_samples_
        return self

    def state_dict(self) -> dict:
        return {"first": self.first.copy(), "last": self.last.copy(), "bins": self.bins,
                "n_classes": -1 if self.n_classes is None else self.n_classes,
                "counts": self.counts_.copy(), "n_samples": self.n_samples_}

    def load_state_dict(self, state) -> BinnedCounts:
        """Restore a state_dict (``BinnedCounts().load_state_dict(state)``); returns self."""
        n_classes = int(state["n_classes"])
        self.__init__(state["first"], state["last"], int(state["bins"]), None if n_classes < 0 else n_classes)
        self.counts_ = np.array(state["counts"], dtype=np.int64)
        self.n_samples_ = int(state["n_samples"])
        return self

    def entropy(self, correction: str = "none") -> np.ndarray:
        """Entropy of each neuron's binned distribution in bits, shape (n_features,)."""
        counts = self.counts_ if self.n_classes is None else self.counts_.sum(axis=2)
        return _entropy_bits(counts, self.n_samples_, correction)

    def mutual_information(self, correction: str = "none") -> np.ndarray:
        """MI in bits between each binned neuron and the label, shape (n_features,)."""
        if self.n_classes is None:
            raise ConfigError("these counts were built without labels; pass n_classes and label codes")
        return _mi_bits(self.counts_, self.n_samples_, correction)


def check_bins(bins: int, n_rows: int, where: str = "", default: int = 32) -> int:
    """`bins` when it is an integer >= 2 and at most max(n_rows, `default`).

    Why the bound: with more bins than rows most bins stay empty and the plug-in estimate measures
    the sample size, not the data, while the counts (bins x features) outgrow the data itself; an
    absurd value ran out of memory. The analysis default always passes, also on a run of a few rows.
    """
    bins = _check_int("bins", bins, 2)
    if bins > max(n_rows, default):
        raise ConfigError(f"bins={bins} is too many for the {n_rows} rows{' of ' + where if where else ''}: use at "
                          f"most {max(n_rows, default)} (one bin per row, or the default {default} on fewer rows; keep "
                          f"rows >> bins), e.g. bins={max(2, min(default, n_rows))}")
    return bins


def _plogp_sum(counts: np.ndarray, n: int, axes) -> np.ndarray:
    """sum over `axes` of (c / n) log2(c / n), 0 log 0 = 0."""
    c = counts.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(c > 0, c / n * np.log2(np.where(c > 0, c, 1.0) / n), 0.0)
    return terms.sum(axis=axes)


def _entropy_bits(counts: np.ndarray, n: int, correction: str) -> np.ndarray:
    """Plug-in entropy of each row of `counts` (shape (d, bins)), bits, optional Miller-Madow."""
    correction = _check_choice("correction", correction, CORRECTIONS)
    h = -_plogp_sum(counts, n, 1)
    if correction == "miller-madow":
        h = h + ((counts > 0).sum(axis=1) - 1) / (2.0 * n * _LN2)
    return np.maximum(h, 0.0)


def _mi_bits(joint: np.ndarray, n: int, correction: str) -> np.ndarray:
    """Plug-in MI of each (bins, classes) table in `joint` (shape (d, bins, classes)), bits."""
    correction = _check_choice("correction", correction, CORRECTIONS)
    h_b = -_plogp_sum(joint.sum(axis=2), n, 1)
    h_c = -_plogp_sum(joint.sum(axis=1), n, 1)
    h_bc = -_plogp_sum(joint, n, (1, 2))
    mi = h_b + h_c - h_bc
    if correction == "miller-madow":
        m_b = (joint.sum(axis=2) > 0).sum(axis=1)
        m_c = (joint.sum(axis=1) > 0).sum(axis=1)
        m_bc = (joint > 0).sum(axis=(1, 2))
        # unclipped: the corrected estimate of a zero MI is rightly negative about half the time
        return mi + ((m_b - 1) + (m_c - 1) - (m_bc - 1)) / (2.0 * n * _LN2)
    return np.maximum(mi, 0.0)  # the plug-in value is >= 0; this only removes rounding


def entropy(X: Source, *, bins: int = 32, correction: str = "none",
            batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """Entropy (bits) of each neuron's activation distribution, binned into equal-width bins.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features) or batch factory
    bins : int, default=32
        Equal-width bins spanning each neuron's own [min, max] (``np.histogram(x, bins)``).
    correction : {"none", "miller-madow"}, default="none"
        "miller-madow" adds (occupied bins - 1) / (2 n ln 2) bits, the first-order bias of the
        plug-in estimator.
    batch_size : int, default=4096
        Rows per step; memory only.

    Returns
    -------
    ndarray of shape (n_features,)
        In [0, log2(bins)]; 0 for a constant neuron.
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    _check_choice("correction", correction, CORRECTIONS)
    lo, hi, n = _ranges(X, "X", batch_size)
    state = BinnedCounts(lo, hi, check_bins(bins, n))
    for (x,) in _aligned_batches([X], ["X"], batch_size, ""):
        state.add(x)
    return state.entropy(correction)


def encode_labels(labels, n_samples: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes and sorted class values of a label column.

    Parameters
    ----------
    labels : array-like of shape (n_samples,)
        Any hashable values (str, int, bool, ...); a pandas Series works.
    n_samples : int, optional
        Expected length.

    Returns
    -------
    codes : ndarray of shape (n_samples,), int64 in [0, n_classes)
    classes : ndarray of shape (n_classes,)
    """
    values = pd.Series(np.asarray(labels, dtype=object) if not isinstance(labels, pd.Series) else labels)
    if values.ndim != 1 or (hasattr(labels, "ndim") and np.ndim(labels) != 1):
        raise ConfigError(f"labels must be one column of shape (n_samples,); got shape {np.shape(labels)}")
    if n_samples is not None and len(values) != n_samples:
        raise ConfigError(f"X has {n_samples} samples but labels has {len(values)}: "
                          f"mutual information pairs each sample with its label")
    missing = int(values.isna().sum())
    if missing:
        raise ConfigError(f"labels has {missing} missing values; drop those samples or fill the labels first")
    codes, classes = pd.factorize(values, sort=True)
    return codes.astype(np.int64), np.asarray(classes)


def mutual_information(X: Source, labels, *, bins: int = 32, correction: str = "none",
                       batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """Mutual information (bits) between each binned neuron and a discrete label column.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features) or batch factory
    labels : array-like of shape (n_samples,)
        One label per sample, in X's row order (e.g. a column of the run's prompts table).
    bins : int, default=32
        Equal-width bins per neuron, as in :func:`entropy`.
    correction : {"none", "miller-madow"}, default="none"
        Subtract the first-order (Miller-Madow) bias of each entropy term; the corrected value may
        be slightly negative for an uninformative neuron.
    batch_size : int, default=4096

    Returns
    -------
    ndarray of shape (n_features,)
        Plug-in values lie in [0, min(log2(bins), log2(n_classes))] and equal
        ``sklearn.metrics.mutual_info_score(labels, binned_neuron) / ln 2``.

    Warns (RuntimeWarning) when n_samples < 10 x bins x n_classes (`warn_small_sample`): the values
    are then mostly the plug-in bias, about (bins - 1)(n_classes - 1) / (2 n ln 2) bits.
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    _check_choice("correction", correction, CORRECTIONS)
    lo, hi, n = _ranges(X, "X", batch_size)
    codes, classes = encode_labels(labels, n)
    if len(classes) < 2:
        _warn(f"labels has a single class ({classes[0]!r}): it carries no information; every MI is 0")
    state = BinnedCounts(lo, hi, check_bins(bins, n), n_classes=len(classes))
    warn_small_sample(n, bins, len(classes), correction)
    start = 0
    for (x,) in _aligned_batches([X], ["X"], batch_size, ""):
        state.add(x, codes[start:start + len(x)])
        start += len(x)
    return state.mutual_information(correction)


def quantile_bins(values: np.ndarray, bins: int) -> np.ndarray:
    """Equal-frequency bin index in [0, bins) of each value, shape (n,).

    Edges are ``np.quantile(values, linspace(0, 1, bins + 1))``; value v goes to the number of inner
    edges <= v. Ties stay together, so heavily tied data may fill fewer than `bins` bins.
    """
    edges = np.quantile(values, np.linspace(0.0, 1.0, bins + 1))
    return np.searchsorted(edges[1:-1], values, side="right").astype(np.int64)


def _top_components(m: _Moments, k: int, name: str) -> np.ndarray:
    """Top-k principal axes (d, k) from the centred second moments; sign: largest loading positive."""
    d = len(m.mx)
    if not 1 <= k <= min(m.n, d):
        raise ConfigError(f"n_components={k} must be between 1 and min(n_samples, n_features)="
                          f"{min(m.n, d)} for {name}")
    if m.constant_x().all():
        _warn(f"{name} is constant across samples: its projections carry no information; MI is 0")
    values, vectors = np.linalg.eigh(m.C)
    top = vectors[:, np.argsort(values)[::-1][:k]]
    signs = np.sign(top[np.abs(top).argmax(axis=0), np.arange(k)])
    return top * np.where(signs == 0, 1.0, signs)


def _binned_mi_pair(a: np.ndarray, b: np.ndarray, bins: int, correction: str) -> float:
    """Plug-in MI of two bin-index columns from the occupied cells only: memory O(n), not O(bins^2)."""
    n = len(a)
    joint = np.unique(a * bins + b, return_counts=True)[1]
    count_a, count_b = np.bincount(a), np.bincount(b)
    count_a, count_b = count_a[count_a > 0], count_b[count_b > 0]
    h = [-_plogp_sum(c, n, 0) for c in (count_a, count_b, joint)]
    mi = float(h[0] + h[1] - h[2])
    if _check_choice("correction", correction, CORRECTIONS) == "miller-madow":
        return mi + ((len(count_a) - 1) + (len(count_b) - 1) - (len(joint) - 1)) / (2.0 * n * _LN2)
    return max(mi, 0.0)


def layer_mutual_information(X: Source, Y: Source, *, n_components: int = 1, bins: int = 16,
                             correction: str = "none", batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """Mutual information (bits) between the top principal components of two layers.

    Estimator: each layer's centred activations are projected on its top `n_components`
    principal axes (eigenvectors of the covariance, computed in one streaming pass); each
    projection is cut into `bins` equal-frequency bins (:func:`quantile_bins`); entry (i, j) is the
    plug-in MI between component i of X and component j of Y. Two passes over factories; memory
    O(d^2 + n * n_components).

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features_x) or batch factory
    Y : ndarray of shape (n_samples, n_features_y) or batch factory
        The same samples in the same order.
    n_components : int, default=1
        Principal components per layer, at most min(n_samples, n_features).
    bins : int, default=16
        Equal-frequency bins per projection; keep n_samples >> bins^2.
    correction : {"none", "miller-madow"}, default="none"
    batch_size : int, default=4096

    Returns
    -------
    ndarray of shape (n_components, n_components)
        In [0, log2(bins)]: log2(bins) when the projections determine each other monotonically,
        about (bins - 1)^2 / (2 n ln 2) for independent layers (the plug-in bias).
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    bins = _check_int("bins", bins, 2)
    _check_choice("correction", correction, CORRECTIONS)
    k = _check_int("n_components", n_components, 1)
    mx, my = _Moments(), _Moments()
    for x, y in _aligned_batches([X, Y], ["X", "Y"], batch_size, "mutual information between layers"):
        mx.add(x, x)
        my.add(y, y)
    if mx.n < 2:
        raise ConfigError(f"X has {mx.n} samples; mutual information between layers needs at least 2")
    check_bins(bins, mx.n, default=16)
    wx, wy = _top_components(mx, k, "X"), _top_components(my, k, "Y")
    px, py = [], []
    for x, y in _aligned_batches([X, Y], ["X", "Y"], batch_size, "mutual information between layers"):
        px.append((x - mx.mx) @ wx)
        py.append((y - my.mx) @ wy)
    bx = [quantile_bins(c, bins) for c in np.concatenate(px).T]
    by = [quantile_bins(c, bins) for c in np.concatenate(py).T]
    return np.array([[_binned_mi_pair(a, b, bins, correction) for b in by] for a in bx])
