"""How many dimensions a layer's activations really use.

- PCA: exact (`fit_pca`, scikit-learn's PCA on an in-memory array) or streaming (`streaming_pca`):
  `CovariancePCA`, the float64 covariance accumulated block by block with BLAS and eigendecomposed
  once (exact, memory O(n_features^2), for layers up to a few thousand features), else scikit-learn's
  IncrementalPCA fed batch by batch (approximate, memory O(batch_size x n_features)).
- Spectrum summaries (`spectrum_summary`): effective dimensionality at a variance threshold (the
  fewest components whose explained variance ratio sums to >= the threshold) and the participation
  ratio (sum lambda)^2 / sum lambda^2 of the eigenvalues. The participation ratio is a property of
  the *whole* spectrum: from the kept components only it shrinks with n_components (81 with all of
  them, 9.3 with 10, on a MiniLM layer). It equals trace(C)^2 / ||C||_F^2 of the covariance C, so it
  is computed exactly from the rows (`covariance_participation_ratio`) or the streamed scatter matrix
  (`CovariancePCA.participation_ratio_`) without any eigendecomposition; only IncrementalPCA (very
  wide layers) knows just its kept components, and the summary says so.
- Intrinsic dimension, estimators with the scikit-learn contract: `TwoNN` (Facco et al. 2017) and
  `LevinaBickelMLE` (Levina & Bickel 2004, averaged over points the MacKay & Ghahramani 2005 way).
- `tsne_embedding`: seeded 2-D t-SNE with the perplexity checked against the number of samples.

Inputs are arrays of shape (n_samples, n_features); nothing here reads files.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Iterable, Iterator, Sequence

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from ..errors import ConfigError


def check_n_components(n_components: int | None, n_samples: int, n_features: int) -> int:
    """`n_components` as an int (None: min(n_samples, n_features)); ConfigError when out of range."""
    limit = min(n_samples, n_features)
    if n_components is None:
        if limit < 1:
            raise ConfigError(f"PCA needs at least 1 sample and 1 feature, got n_samples={n_samples}, n_features={n_features}")
        return limit
    if isinstance(n_components, bool) or not 1 <= int(n_components) <= limit:
        raise ConfigError(f"n_components={n_components!r} must be between 1 and min(n_samples, n_features)={limit}")
    return int(n_components)


def fit_pca(x: np.ndarray, n_components: int | None = None, seed: int = 0):
    """Exact PCA (scikit-learn) of x, shape (n_samples, n_features); returns the fitted `PCA`.

    Fitted in float64 whatever x's dtype: on float32 input scikit-learn works in float32, and the
    eigenvalues came out with ~1e-6 relative error and ratios summing to more than 1.
    """
    from sklearn.decomposition import PCA

    x = np.asarray(x, dtype=np.float64)
    k = check_n_components(n_components, x.shape[0], x.shape[1])
    if x.shape[0] < 2:
        raise ConfigError(f"PCA needs at least 2 samples, got n_samples={x.shape[0]}")
    return PCA(n_components=k, random_state=seed).fit(x)


def _squared_frobenius_of_gram(xc: np.ndarray, block: int = 1024) -> float:
    """||xc^T xc||_F^2 (= ||xc xc^T||_F^2), from the smaller Gram matrix, one block of it at a time."""
    side = xc if xc.shape[1] <= xc.shape[0] else xc.T  # (rows, m) with m the smaller dimension
    total = 0.0
    for start in range(0, side.shape[1], block):
        part = side.T @ side[:, start:start + block]
        total += float(np.einsum("ij,ij->", part, part))
    return total


def covariance_participation_ratio(x: np.ndarray) -> float:
    """Participation ratio (sum lambda)^2 / sum lambda^2 over *all* eigenvalues of x's covariance.

    Computed as trace(C)^2 / ||C||_F^2 (the two sums are the trace and the squared Frobenius norm),
    in float64 from the centred rows: exact, with no eigendecomposition, O(n d min(n, d)). 0 when x
    has no variance.
    """
    xc = np.asarray(x, dtype=np.float64)
    xc = xc.reshape(len(xc), -1) - xc.reshape(len(xc), -1).mean(axis=0)
    trace = float(np.einsum("ij,ij->", xc, xc))
    squares = _squared_frobenius_of_gram(xc)
    return trace ** 2 / squares if squares > 0 else 0.0


def rebatch(batches: Iterable[np.ndarray], min_rows: int) -> Iterator[np.ndarray]:
    """Re-cut a stream of batches so that every yielded batch has >= `min_rows` rows.

    IncrementalPCA.partial_fit needs at least n_components rows per call; a short tail is merged
    into the batch before it.
    """
    held: np.ndarray | None = None
    pending: list[np.ndarray] = []
    have = 0
    for batch in batches:
        pending.append(batch)
        have += len(batch)
        if have >= min_rows:
            if held is not None:
                yield held
            held, pending, have = np.concatenate(pending) if len(pending) > 1 else pending[0], [], 0
    tail = np.concatenate(pending) if pending else None
    if held is None:
        if tail is not None:
            yield tail
        return
    if tail is None:
        yield held
    elif len(tail) >= min_rows:
        yield held
        yield tail
    else:
        yield np.concatenate([held, tail])


# Largest covariance matrix (8 d^2 bytes) `streaming_pca` accumulates: d <= 5792 features at 256 MiB.
# Wider layers stream through scikit-learn's IncrementalPCA instead.
COVARIANCE_PCA_MAX_BYTES = 256 * 2**20
# Rows per covariance update: large blocks keep the float64 matrix product at BLAS speed.
_COVARIANCE_BLOCK_ROWS = 4096


class CovariancePCA(TransformerMixin, BaseEstimator):
    """Exact PCA streamed over batches: the float64 scatter matrix X_c^T X_c, then one eigendecomposition.

    Each `partial_fit` centres its block on the block's own mean and adds the block's scatter matrix
    (one BLAS matrix product, the whole cost) with the pairwise update of Chan et al., so the result
    equals exact PCA of all rows (scikit-learn's `PCA`, to float rounding) in one pass, in
    O(n_features^2) memory, and partial fits on different rows `merge`. Unlike IncrementalPCA it is
    exact, and costs n d^2 for the data plus one d^3 eigendecomposition, instead of an SVD per batch.
    Suited to moderate d (the d x d matrix must fit; see COVARIANCE_PCA_MAX_BYTES).

    Parameters
    ----------
    n_components : int, optional
        Components kept; None keeps min(n_samples, n_features).

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        Principal axes, signs as scikit-learn's PCA (largest |entry| of each axis positive).
    explained_variance_ : ndarray of shape (n_components,)
        Eigenvalues of the covariance matrix (ddof=1), descending.
    explained_variance_ratio_ : ndarray of shape (n_components,)
    singular_values_ : ndarray of shape (n_components,)
    mean_ : ndarray of shape (n_features,)
    noise_variance_ : float
        Mean of the eigenvalues left out (0 when none are).
    participation_ratio_ : float
        Of the whole spectrum (every eigenvalue, not only the kept ones): trace(S)^2 / ||S||_F^2 of
        the scatter matrix S.
    n_samples_seen_ : int
    n_components_ : int

    The spectrum attributes are computed on first access after the last `partial_fit` or `merge`.
    """

    def __init__(self, n_components: int | None = None):
        self.n_components = n_components

    def fit(self, X, y=None):
        """Fit on one array X of shape (n_samples, n_features), block by block; returns self."""
        for name in ("n_samples_seen_", "mean_", "n_features_in_", "_scatter", "_spectrum"):
            self.__dict__.pop(name, None)
        X = validate_data(self, X, dtype=[np.float64, np.float32], ensure_min_samples=2)
        for start in range(0, len(X), _COVARIANCE_BLOCK_ROWS):
            self._add(X[start:start + _COVARIANCE_BLOCK_ROWS])
        self._solve()
        return self

    def partial_fit(self, X, y=None):
        """Add the rows of X, shape (n_rows, n_features); returns self."""
        first = not hasattr(self, "n_samples_seen_")
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=first)
        self._add(X)
        return self

    def _add(self, X: np.ndarray) -> None:
        block = X.astype(np.float64)  # a copy: centred in place
        mean = block.mean(axis=0)
        block -= mean
        self._merge(len(block), mean, block.T @ block)

    def merge(self, other: "CovariancePCA") -> "CovariancePCA":
        """Fold in a fit on other rows; returns self."""
        if getattr(other, "n_samples_seen_", 0):
            self._merge(other.n_samples_seen_, other.mean_, other._scatter.copy())
        return self

    def _merge(self, n: int, mean: np.ndarray, scatter: np.ndarray) -> None:
        seen = getattr(self, "n_samples_seen_", 0)
        if seen and scatter.shape != self._scatter.shape:
            raise ConfigError(f"X has {scatter.shape[0]} features but the PCA was fitted on {self._scatter.shape[0]}")
        if not seen:
            self.n_samples_seen_, self.mean_, self._scatter = int(n), mean, scatter
        else:
            total = seen + n
            delta = mean - self.mean_
            scatter += self._scatter
            scatter += np.outer(delta, delta * (seen * n / total))
            self._scatter = scatter
            self.mean_ = self.mean_ + delta * (n / total)
            self.n_samples_seen_ = int(total)
        self._spectrum = None

    def _solve(self) -> dict:
        if getattr(self, "n_samples_seen_", 0) < 2:
            raise ConfigError(f"PCA needs at least 2 samples, got n_samples={getattr(self, 'n_samples_seen_', 0)}")
        if self._spectrum is not None:
            return self._spectrum
        from scipy.linalg import eigh

        n, d = self.n_samples_seen_, self._scatter.shape[0]
        k = check_n_components(self.n_components, n, d)
        covariance = self._scatter / (n - 1)
        total = float(np.trace(covariance))
        values, vectors = eigh(covariance, subset_by_index=[d - k, d - 1], check_finite=False)
        values, vectors = np.clip(values[::-1], 0.0, None), vectors[:, ::-1].T
        pivots = np.argmax(np.abs(vectors), axis=1)
        vectors *= np.sign(vectors[np.arange(k), pivots])[:, None]
        rest = min(n, d) - k
        self._spectrum = {
            "components_": vectors, "explained_variance_": values,
            "explained_variance_ratio_": values / total if total > 0 else np.zeros_like(values),
            "singular_values_": np.sqrt(values * (n - 1)), "n_components_": k,
            "noise_variance_": max((total - float(values.sum())) / rest, 0.0) if rest > 0 else 0.0}
        return self._spectrum

    components_ = property(lambda self: self._solve()["components_"])
    explained_variance_ = property(lambda self: self._solve()["explained_variance_"])
    explained_variance_ratio_ = property(lambda self: self._solve()["explained_variance_ratio_"])
    singular_values_ = property(lambda self: self._solve()["singular_values_"])
    noise_variance_ = property(lambda self: self._solve()["noise_variance_"])
    n_components_ = property(lambda self: self._solve()["n_components_"])

    @property
    def participation_ratio_(self) -> float:
        check_is_fitted(self, "n_samples_seen_")
        squares = float(np.einsum("ij,ij->", self._scatter, self._scatter))
        return float(np.trace(self._scatter)) ** 2 / squares if squares > 0 else 0.0

    def transform(self, X) -> np.ndarray:
        """Principal coordinates of X, shape (n_samples, n_components)."""
        check_is_fitted(self, "n_samples_seen_")
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        return (X - self.mean_) @ self.components_.T


def covariance_pca_fits(n_features: int) -> bool:
    """Whether a d x d float64 covariance matrix of `n_features` fits COVARIANCE_PCA_MAX_BYTES."""
    return 8 * int(n_features) ** 2 <= COVARIANCE_PCA_MAX_BYTES


def streaming_pca(batches: Iterable[np.ndarray], n_components: int, solver: str = "auto"):
    """PCA fitted over a stream of (rows, n_features) batches, in one pass; returns the estimator.

    solver : {"auto", "covariance", "incremental"}
        "covariance": `CovariancePCA`, exact (equals scikit-learn's PCA), memory O(n_features^2);
        "incremental": scikit-learn's IncrementalPCA, approximate, memory O((batch rows +
        n_components) x n_features); "auto": covariance while the d x d matrix fits
        COVARIANCE_PCA_MAX_BYTES, else incremental.
    """
    if solver not in ("auto", "covariance", "incremental"):
        raise ConfigError(f"solver={solver!r} must be one of auto, covariance, incremental")
    stream = iter(batches)
    first = next(stream, None)
    if first is None:
        raise ConfigError("streaming PCA got no rows; the layer has no committed rows")
    width = int(np.prod(np.shape(first)[1:]))
    if solver == "covariance" or (solver == "auto" and covariance_pca_fits(width)):
        model = CovariancePCA(n_components=int(n_components))
        for batch in rebatch(itertools.chain([first], stream), _COVARIANCE_BLOCK_ROWS):
            model.partial_fit(batch)
        model._solve()  # n_components is checked here, against the rows seen
        return model
    from sklearn.decomposition import IncrementalPCA

    model = IncrementalPCA(n_components=int(n_components))
    seen = 0
    for batch in rebatch(itertools.chain([first], stream), int(n_components)):
        model.partial_fit(np.asarray(batch, dtype=np.float64))
        seen += len(batch)
    if seen == 0:
        raise ConfigError("incremental PCA got no rows; the layer has no committed rows")
    return model


def effective_dimensionality(explained_variance_ratio: Sequence[float], threshold: float) -> int | None:
    """Fewest components whose ratios sum to >= threshold; None if the given components do not reach it."""
    if not 0 < threshold <= 1:
        raise ConfigError(f"threshold={threshold!r} must be in (0, 1]")
    cumulative = np.cumsum(np.asarray(explained_variance_ratio, dtype=np.float64))
    reached = np.nonzero(cumulative >= threshold - 1e-12)[0]
    return int(reached[0]) + 1 if reached.size else None


def participation_ratio(eigenvalues: Sequence[float]) -> float:
    """(sum lambda)^2 / sum lambda^2: 1 for one direction, n for n equal ones; 0 for no variance."""
    values = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
    squares = float(np.sum(values ** 2))
    return float(np.sum(values) ** 2 / squares) if squares > 0 else 0.0


def spectrum_summary(explained_variance: np.ndarray, explained_variance_ratio: np.ndarray,
                     full_participation_ratio: float | None = None) -> dict:
    """Effective dimensionality at 95% and 99% and the participation ratio of a PCA spectrum.

    `full_participation_ratio`: the participation ratio of the whole spectrum when the caller knows it
    (`covariance_participation_ratio`, `CovariancePCA.participation_ratio_`); without it the ratio is
    computed from the given (kept) eigenvalues only, which underestimates it when components were
    left out. ``participation_ratio_basis`` says which ("full_spectrum" or "kept_components").
    """
    ratio = np.asarray(explained_variance_ratio, dtype=np.float64)
    full = full_participation_ratio is not None
    return {
        "n_components": int(ratio.size),
        "explained_variance_ratio_total": float(ratio.sum()),
        "effective_dim_95": effective_dimensionality(ratio, 0.95),
        "effective_dim_99": effective_dimensionality(ratio, 0.99),
        "participation_ratio": float(full_participation_ratio) if full else participation_ratio(explained_variance),
        "participation_ratio_basis": "full_spectrum" if full else "kept_components",
        "top_ratio": [float(v) for v in ratio[:5]],
    }


def unique_rows(x: np.ndarray) -> np.ndarray:
    """Drop duplicate rows (zero neighbour distances break distance-ratio estimators), warning if any."""
    unique = np.unique(x, axis=0)
    if len(unique) < len(x):
        warnings.warn(f"{len(x) - len(unique)} duplicate rows were dropped before estimating the intrinsic "
                      "dimension", UserWarning, stacklevel=3)
    return unique


def neighbour_distances(x: np.ndarray, k: int) -> np.ndarray:
    """Distances to the k nearest other points, shape (n_samples, k), ascending."""
    from sklearn.neighbors import NearestNeighbors

    distances, _ = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
    return distances[:, 1:]


class TwoNN(BaseEstimator):
    """Intrinsic dimension from the ratio of 2nd to 1st neighbour distances (Facco et al. 2017).

    mu_i = r2 / r1 follows a Pareto law with exponent d, so -log(1 - F(mu)) = d log(mu); d is the
    slope of the line through the origin fitted to the empirical F after discarding the largest
    `discard_fraction` of mu (the tail is noisy). Duplicate rows are dropped first.

    Parameters
    ----------
    discard_fraction : float, default=0.1
        Fraction of the largest ratios left out of the fit, in [0, 1).

    Attributes
    ----------
    dimension_ : float
    mu_ : ndarray of shape (n_unique_samples,)
        The sorted distance ratios.
    n_features_in_ : int
    """

    def __init__(self, discard_fraction: float = 0.1):
        self.discard_fraction = discard_fraction

    def fit(self, X, y=None):
        """Estimate from X, array of shape (n_samples, n_features) with n_samples >= 3."""
        if not 0 <= self.discard_fraction < 1:
            raise ConfigError(f"discard_fraction={self.discard_fraction!r} must be in [0, 1)")
        X = validate_data(self, X, dtype=np.float64, ensure_min_samples=3)
        X = unique_rows(X)
        if len(X) < 3:
            raise ConfigError(f"TwoNN needs at least 3 distinct samples, got {len(X)}")
        distances = neighbour_distances(X, 2)
        mu = np.sort(distances[:, 1] / distances[:, 0])
        n = len(mu)
        keep = max(1, int(np.floor(n * (1 - self.discard_fraction))))
        keep = min(keep, n - 1)
        empirical = np.arange(1, n + 1) / n
        x_fit = np.log(mu[:keep])
        y_fit = -np.log(1 - empirical[:keep])
        denominator = float(np.dot(x_fit, x_fit))
        self.dimension_ = float(np.dot(x_fit, y_fit) / denominator) if denominator > 0 else float("inf")
        self.mu_ = mu
        return self


class LevinaBickelMLE(BaseEstimator):
    """Maximum-likelihood intrinsic dimension (Levina & Bickel 2004), MacKay-Ghahramani averaged.

    For k neighbours, the inverse estimate at a point is (1 / (k - 1)) sum_{j<k} log(T_k / T_j) with
    T_j its distance to the j-th neighbour. MacKay & Ghahramani (2005) average these *inverses* over
    points (averaging the estimates themselves is biased upwards), then invert: m_k. The dimension is
    the mean of m_k over k in [k1, k2].

    Parameters
    ----------
    k1, k2 : int, default=10, 20
        Neighbourhood sizes averaged over (2 <= k1 <= k2 < n_samples).

    Attributes
    ----------
    dimension_ : float
    dimension_by_k_ : ndarray of shape (k2 - k1 + 1,)
    n_features_in_ : int
    """

    def __init__(self, k1: int = 10, k2: int = 20):
        self.k1 = k1
        self.k2 = k2

    def fit(self, X, y=None):
        """Estimate from X, array of shape (n_samples, n_features) with n_samples > k2."""
        if not 2 <= self.k1 <= self.k2:
            raise ConfigError(f"k1={self.k1!r} and k2={self.k2!r} must satisfy 2 <= k1 <= k2")
        X = validate_data(self, X, dtype=np.float64, ensure_min_samples=3)
        X = unique_rows(X)
        if self.k2 >= len(X):
            raise ConfigError(f"k2={self.k2} must be < n_samples={len(X)} (distinct samples); lower k2 or use more rows")
        distances = neighbour_distances(X, self.k2)
        logs = np.log(distances)
        by_k = []
        for k in range(self.k1, self.k2 + 1):
            inverse = np.mean(logs[:, k - 1 : k] - logs[:, : k - 1], axis=1)
            mean_inverse = float(np.mean(inverse))
            by_k.append(1.0 / mean_inverse if mean_inverse > 0 else float("inf"))
        self.dimension_by_k_ = np.asarray(by_k)
        self.dimension_ = float(np.mean(self.dimension_by_k_))
        return self


def intrinsic_dimension(x: np.ndarray, method: str = "both", k1: int = 10, k2: int = 20,
                        discard_fraction: float = 0.1) -> dict[str, float]:
    """TwoNN and/or MLE estimates for x, shape (n_samples, n_features): {"twonn": d, "mle": d}."""
    if method not in ("twonn", "mle", "both"):
        raise ConfigError(f"method={method!r} must be one of twonn, mle, both")
    out = {}
    if method in ("twonn", "both"):
        out["twonn"] = TwoNN(discard_fraction).fit(x).dimension_
    if method in ("mle", "both"):
        out["mle"] = LevinaBickelMLE(k1, k2).fit(x).dimension_
    return out


def tsne_embedding(x: np.ndarray, n_components: int = 2, perplexity: float = 30.0, seed: int = 0,
                   max_iter: int = 1000) -> np.ndarray:
    """Seeded t-SNE of x, shape (n_samples, n_features) -> (n_samples, n_components).

    scikit-learn needs perplexity < n_samples; a typical value is 5 to 50.
    """
    from sklearn.manifold import TSNE

    x = np.asarray(x, dtype=np.float32)
    n = x.shape[0]
    if n < 2:
        raise ConfigError(f"t-SNE needs at least 2 samples, got n_samples={n}")
    if not 0 < perplexity < n:
        raise ConfigError(f"perplexity={perplexity!r} must be between 0 and n_samples={n} (exclusive); "
                          f"use a perplexity below {n} or more rows")
    if n_components not in (1, 2, 3):
        raise ConfigError(f"n_components={n_components!r} must be 1, 2 or 3 for t-SNE")
    model = TSNE(n_components=n_components, perplexity=perplexity, random_state=seed, max_iter=max_iter,
                 init="pca", learning_rate="auto")
    return model.fit_transform(x)

