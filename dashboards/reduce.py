"""The numbers the dashboard derives from a layer's sample: statistics, a PCA preview, a CKA matrix.

Pure functions on arrays (no I/O), sized so that a page of a 100,000-sample run answers in well under
a second on a laptop CPU:

- `sample_stats`: one vectorised pass (`RunningStats`, float64 accumulation over cache-sized chunks).
- `sample_pca`: up to `EXACT_PCA_FEATURES` features the exact PCA of the sample from its d x d
  covariance (one BLAS product and one `eigh`; a full SVD of a 20,000 x 256 matrix also forms the
  20,000 x 256 left factor and costs ten times more); wider layers get a randomized PCA fitted on at
  most `PCA_FIT_ROWS` rows (scikit-learn, seeded), which then projects every row.
- `linear_cka_matrix`: linear CKA of every layer pair, with each layer's centred representation and
  its norm computed once (not once per pair). A layer narrower than the sample keeps its centred
  n x d matrix, a wider one its centred n x n Gram matrix, whichever is smaller; a pair then costs one
  product (``||X_c^T Y_c||_F^2``, ``<K_c, L_c>_F`` or ``tr(X_c^T L_c X_c)``). The library's
  `neuronmap.analysis.cka_matrix` streams feature-space moments per pair, exact for any number of
  rows; here the rows are a sample held in memory, and for layers wider than it (d = 4,096 against
  2,000 rows) one Gram matrix per layer is much cheaper than a d x d cross-moment per pair.

The products run on one BLAS thread (`one_blas_thread`): they take a few tens of milliseconds each
that way, while a multi-threaded BLAS on a machine whose cores are busy (an extraction running beside
the dashboard, a shared server) spins and waits and was measured ten times slower. The limit is
process-wide while it lasts (threadpoolctl), so an analysis job running at the same moment briefly
shares it.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pandas as pd

EXACT_PCA_FEATURES = 512
PCA_FIT_ROWS = 5_000


def preload() -> None:
    """Import what the reductions need, at app start rather than in a user's first page visit."""
    import threadpoolctl  # noqa: F401

    import neuronmap.analysis.statistics  # noqa: F401


@contextmanager
def one_blas_thread():
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def sample_stats(x: np.ndarray) -> pd.DataFrame:
    """Per-neuron statistics of `x` (n_samples, n_features): one row per neuron, `layerview.STAT_COLUMNS`."""
    from neuronmap.analysis.statistics import RunningStats

    stats = RunningStats().add(x)
    return pd.DataFrame({"neuron": np.arange(x.shape[1]), "mean": stats.mean, "std": stats.std(),
                         "min": stats.minimum, "max": stats.maximum, "mean_abs": stats.mean_abs(),
                         "sparsity": stats.sparsity(), "skewness": stats.skewness(), "kurtosis": stats.kurtosis()})


@one_blas_thread()
def sample_pca(x: np.ndarray, k: int = 3, seed: int = 0) -> tuple[np.ndarray, list[float] | None]:
    """Principal coordinates (n_samples, min(k, n, d)) of `x` and each component's share of the variance.

    Signs are fixed so that each component's largest loading is positive (as scikit-learn does).
    Exact for at most `EXACT_PCA_FEATURES` features; wider: randomized, fitted on at most `PCA_FIT_ROWS`
    seeded rows (ratios then relative to those rows' total variance).
    """
    n, d = x.shape
    k = min(k, n, d)
    if k < 1:
        return np.empty((n, 0)), None
    if d <= EXACT_PCA_FEATURES:
        centred = x.astype(np.float64) - x.mean(axis=0, dtype=np.float64)
        covariance = centred.T @ centred
        values, vectors = np.linalg.eigh(covariance)
        values, vectors = values[::-1][:k], vectors[:, ::-1][:, :k]
        total = float(np.trace(covariance))
        ratio = (np.clip(values, 0, None) / total).tolist() if total > 0 else None
    else:
        from sklearn.decomposition import PCA

        fit_rows = np.sort(np.random.default_rng(seed).choice(n, min(n, PCA_FIT_ROWS), replace=False))
        pca = PCA(n_components=k, svd_solver="randomized", random_state=seed).fit(x[fit_rows])
        vectors = pca.components_.T.astype(np.float64)
        centred = None
        ratio = pca.explained_variance_ratio_.tolist()
    signs = np.sign(vectors[np.argmax(np.abs(vectors), axis=0), np.arange(vectors.shape[1])])
    vectors = vectors * np.where(signs == 0, 1.0, signs)
    if centred is None:
        mean = x.mean(axis=0, dtype=np.float64)
        coords = np.concatenate([(x[i:i + 4096] - mean) @ vectors for i in range(0, n, 4096)])
    else:
        coords = centred @ vectors
    return coords, ratio


class _Centred:
    """One layer's centred representation for CKA: its n x d matrix or n x n Gram matrix, and its norm."""

    def __init__(self, x: np.ndarray):
        x = np.asarray(x, dtype=np.float64)
        x = x.reshape(len(x), -1)
        x = x - x.mean(axis=0)
        n, d = x.shape
        if d <= n:
            self.x, self.gram = x, None
            self.norm = float(np.linalg.norm(x.T @ x))
        else:
            self.x, self.gram = None, x @ x.T
            self.norm = float(np.linalg.norm(self.gram))

    def hsic(self, other: "_Centred") -> float:
        """<K_c, L_c>_F (up to the 1/(n-1)^2 that CKA's normalisation cancels)."""
        if self.x is not None and other.x is not None:
            return float(np.linalg.norm(self.x.T @ other.x) ** 2)
        if self.gram is not None and other.gram is not None:
            return float(np.vdot(self.gram, other.gram))
        factor, gram = (self.x, other.gram) if self.x is not None else (other.x, self.gram)
        return float(np.vdot(gram @ factor, factor))


@one_blas_thread()
def linear_cka_matrix(xs: list[np.ndarray], ys: list[np.ndarray] | None = None) -> np.ndarray:
    """Linear CKA between every `xs[i]` and `ys[j]` (the same samples in the same order), (len(xs), len(ys)).

    Without `ys` the matrix is of `xs` with itself: symmetric, computed once per pair, diagonal 1.
    A constant layer (zero variance) gives NaN in its row/column.
    """
    left = [_Centred(x) for x in xs]
    same = ys is None
    right = left if same else [_Centred(y) for y in ys]
    out = np.full((len(left), len(right)), np.nan)
    for i, a in enumerate(left):
        for j, b in enumerate(right):
            if same and j < i:
                out[i, j] = out[j, i]
                continue
            if a.norm > 0 and b.norm > 0:
                out[i, j] = 1.0 if same and i == j else a.hsic(b) / (a.norm * b.norm)
    return out
