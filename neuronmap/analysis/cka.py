"""Centered Kernel Alignment between two layers: linear (feature space or Gram), debiased, RBF, minibatch.

Inputs are arrays of shape (n_samples, n_features) or batch factories (see
:mod:`neuronmap.analysis._sources`); :mod:`neuronmap.analysis.cka_matrix` compares many layers at once.

-------------
Centered Kernel Alignment (Kornblith et al., 2019) compares two representations of the same n
samples, X (n, d_x) and Y (n, d_y), through their Gram matrices K = X X^T and L = Y Y^T:
``CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``. With the linear kernel and centred data this is
``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``, which costs O(n d^2) and never forms an n x n
matrix: that is what :func:`linear_cka` computes, from mergeable co-moments
(:class:`LinearCKAState`), so shards or Ray workers can each summarise their rows and the merged
result equals the single-pass one. The *debiased* variant replaces HSIC by its unbiased estimator
(Song et al., 2012), removing the upward bias of CKA at small n relative to d (Nguyen et al., 2021);
it is available in feature space too, from the same state. Minibatch CKA (Nguyen et al., 2021)
averages the unbiased HSIC over minibatches instead (:func:`minibatch_cka`), which is what one does
for kernels without a feature-space form or when only fixed-size batches can be held. RBF CKA
(:func:`rbf_cka`) and the Gram form of linear CKA (:func:`linear_cka_gram`) need n x n matrices and
are capped at ``max_samples`` rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
from scipy.spatial.distance import pdist, squareform

from ..errors import ConfigError
from ._sources import DEFAULT_BATCH_SIZE, Source, _aligned_batches, _as_matrix, _check_int, _materialise, _Moments, _warn


def _cka_from_summaries(sxx: tuple, syy: tuple, sxy: tuple, debiased: bool) -> float:
    """CKA from the summaries of the (X, X), (Y, Y) and (X, Y) moments of the same rows."""
    n = sxy[0]
    if sxx[5] or syy[5]:
        _warn("a representation is constant across samples (every row equal): CKA is undefined; returning 0")
        return 0.0
    if debiased:
        if n < 4:
            raise ConfigError(f"debiased CKA needs at least 4 samples (the unbiased HSIC divides by n - 3); got {n}")

        def hsic(s):  # n (n - 3) times the unbiased HSIC (Song et al. 2012), feature-space form
            return s[1] - n / (n - 2) * s[2] + s[3] * s[4] / ((n - 1) * (n - 2))

        xy, xx, yy = hsic(sxy), hsic(sxx), hsic(syy)
    else:
        xy, xx, yy = sxy[1], sxx[1], syy[1]
    if xx <= 0 or yy <= 0:
        _warn("the unbiased HSIC of a representation with itself is not positive (too few samples for "
              "the estimator); CKA is undefined, returning 0")
        return 0.0
    return float(xy / np.sqrt(xx * yy))


class LinearCKAState:
    """Streaming, mergeable linear CKA between two layers (biased and debiased).

    Keeps the centred co-moments of (X, X), (Y, Y) and (X, Y): O(d_x^2 + d_y^2 + d_x d_y) memory
    whatever the number of rows. States built on disjoint row sets (shards, Ray workers) merge into
    exactly the state of their union, in any order (up to float rounding).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X, Y = rng.normal(size=(100, 5)), rng.normal(size=(100, 3))
    >>> a = LinearCKAState().add(X[:40], Y[:40])      # e.g. one shard, on one worker
    >>> b = LinearCKAState().add(X[40:], Y[40:])      # the other shard
    >>> bool(np.isclose(a.merge(b).cka(), linear_cka(X, Y)))
    True
    """

    def __init__(self):
        self.xx, self.yy, self.xy = _Moments(), _Moments(), _Moments()

    @property
    def n_samples(self) -> int:
        return self.xy.n

    def add(self, X, Y) -> LinearCKAState:
        """Add aligned rows X of shape (b, d_x) and Y of shape (b, d_y); returns self."""
        X, Y = _as_matrix(X, "X"), _as_matrix(Y, "Y")
        if len(X) != len(Y):
            raise ConfigError(f"X has {len(X)} samples but Y has {len(Y)}: CKA compares the same samples in both")
        if len(X):
            for state, (a, b) in ((self.xx, (X, X)), (self.yy, (Y, Y)), (self.xy, (X, Y))):
                state.add(a, b)
        return self

    def merge(self, other: LinearCKAState) -> LinearCKAState:
        """Fold in a state built on other rows; returns self."""
        for mine, theirs in ((self.xx, other.xx), (self.yy, other.yy), (self.xy, other.xy)):
            mine.merge(theirs)
        return self

    def cka(self, debiased: bool = False) -> float:
        """Linear CKA of the rows added so far; `debiased` uses the unbiased HSIC estimator."""
        if self.n_samples < 2:
            raise ConfigError(f"CKA needs at least 2 samples; this state has {self.n_samples}")
        return _cka_from_summaries(self.xx.summary(), self.yy.summary(), self.xy.summary(), debiased)

    def state_dict(self) -> dict:
        """Plain dict of numpy arrays (picklable, savable with np.savez after flattening keys)."""
        return {"xx": self.xx.state_dict(), "yy": self.yy.state_dict(), "xy": self.xy.state_dict()}

    def load_state_dict(self, state: Mapping) -> LinearCKAState:
        for key in ("xx", "yy", "xy"):
            getattr(self, key).load_state_dict(state[key])
        return self


# -- shared self-moments ------------------------------------------------------------------------------
def self_moment_summary(X: Source, *, batch_size: int = DEFAULT_BATCH_SIZE) -> tuple:
    """Summary of the centred (X, X) co-moments: one layer's whole share of linear CKA with any partner.

    With :func:`cross_moment_summary` and :func:`cka_from_moment_summaries`, a layer x layer
    comparison reads and multiplies out each layer's own moments once, not once per pair.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features) or batch factory
    batch_size : int, default=4096

    Returns
    -------
    tuple
        (n, ||X_c^T X_c||_F^2, sum_i |x_ci|^4, sum_i |x_ci|^2 (twice), constant, constant): small.
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    moments = _Moments()
    for (x,) in _aligned_batches([X], ["X"], batch_size, "CKA"):
        moments.add(x, x)
    if moments.n < 2:
        raise ConfigError(f"CKA needs at least 2 samples; X has {moments.n}")
    return moments.summary()


def cross_moment_summary(X: Source, Y: Source, *, batch_size: int = DEFAULT_BATCH_SIZE) -> tuple:
    """Summary of the centred (X, Y) co-moments of the same samples (see :func:`self_moment_summary`)."""
    batch_size = _check_int("batch_size", batch_size, 1)
    moments = _Moments()
    for x, y in _aligned_batches([X, Y], ["X", "Y"], batch_size, "CKA"):
        moments.add(x, y)
    if moments.n < 2:
        raise ConfigError(f"CKA needs at least 2 samples; X and Y have {moments.n}")
    return moments.summary()


def cka_from_moment_summaries(sxx: tuple, syy: tuple, sxy: tuple, *, debiased: bool = False) -> float:
    """Linear CKA from the self summaries of X and Y and their cross summary (same rows in all three)."""
    if not sxx[0] == syy[0] == sxy[0]:
        raise ConfigError(f"the moment summaries cover different numbers of samples ({sxx[0]}, {syy[0]}, {sxy[0]}): "
                          "CKA compares the same samples in both")
    return _cka_from_summaries(sxx, syy, sxy, debiased)


# -- CKA on arrays / factories ---------------------------------------------------------------------
def linear_cka(X: Source, Y: Source, *, debiased: bool = False,
               batch_size: int = DEFAULT_BATCH_SIZE) -> float:
    """Linear CKA in the feature-space form, O(n d^2) time, O(d^2) memory, streaming.

    ``CKA = ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F)`` on column-centred X_c, Y_c. No
    n x n matrix is formed, so n may be any size; memory is d_x^2 + d_y^2 + d_x d_y floats, so for
    very wide layers (d >> n) prefer :func:`linear_cka_gram`.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features_x) or batch factory
    Y : ndarray of shape (n_samples, n_features_y) or batch factory
        The same samples, in the same order.
    debiased : bool, default=False
        Use the unbiased HSIC estimator (Song et al. 2012); needs n >= 4. Removes the upward bias
        of CKA when n is not much larger than d; the value can then be slightly negative.
    batch_size : int, default=4096
        Rows per step; a memory knob that does not change the result.

    Returns
    -------
    float
        In [0, 1] (debiased: at most 1, near 0 for unrelated layers). 1 means the layers are equal
        up to an orthogonal transform and isotropic scaling. A constant layer gives 0 with a warning.
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    state = LinearCKAState()
    for x, y in _aligned_batches([X, Y], ["X", "Y"], batch_size, "CKA"):
        state.add(x, y)
    return state.cka(debiased=debiased)


def hsic(K: np.ndarray, L: np.ndarray, *, debiased: bool = False) -> float:
    """Hilbert-Schmidt independence criterion of two Gram matrices of the same samples.

    Parameters
    ----------
    K, L : ndarray of shape (n_samples, n_samples)
        Symmetric Gram (kernel) matrices.
    debiased : bool, default=False
        False: the biased estimator ``tr(K H L H) / (n - 1)^2`` (H the centring matrix).
        True: the unbiased estimator of Song et al. (2012), with K~, L~ the Gram matrices with zeroed
        diagonals, ``[tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n (n-3))``.

    Returns
    -------
    float
    """
    a, b = _PreparedGram(K, debiased), _PreparedGram(L, debiased)
    n = a.n
    return a.dot(b) / ((n - 1) ** 2 if not debiased else n * (n - 3))


def cka_from_grams(K: np.ndarray, L: np.ndarray, *, debiased: bool = False) -> float:
    """CKA of two Gram matrices: ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``.

    Parameters
    ----------
    K, L : ndarray of shape (n_samples, n_samples)
    debiased : bool, default=False
        Use the unbiased HSIC estimator (needs n >= 4).

    Returns
    -------
    float
    """
    return _PreparedGram(K, debiased).cka(_PreparedGram(L, debiased))


class _PreparedGram:
    """A Gram matrix made ready for HSIC: centred (biased) or zero-diagonal with row sums (unbiased)."""

    def __init__(self, K: np.ndarray, debiased: bool):
        K = np.asarray(K, dtype=np.float64)
        if K.ndim != 2 or K.shape[0] != K.shape[1]:
            raise ConfigError(f"a Gram matrix must be square; got shape {K.shape}")
        self.n, self.debiased = len(K), debiased
        if debiased:
            if self.n < 4:
                raise ConfigError(f"the unbiased HSIC needs at least 4 samples (it divides by n - 3); got {self.n}")
            self.M = K.copy()
            np.fill_diagonal(self.M, 0.0)
            self.s = self.M.sum(axis=1)
            self.t = float(self.s.sum())
        else:
            if self.n < 2:
                raise ConfigError(f"HSIC needs at least 2 samples; got {self.n}")
            row = K.mean(axis=1)
            self.M = K - row[:, None] - K.mean(axis=0)[None, :] + row.mean()
        self.self_dot = self.dot(self)

    def dot(self, other: _PreparedGram) -> float:
        """n^2-scaled HSIC (biased: (n-1)^2 HSIC; unbiased: n (n-3) HSIC)."""
        if other.n != self.n:
            raise ConfigError(f"X has {self.n} samples but Y has {other.n}: CKA compares the same samples in both")
        value = float(np.vdot(self.M, other.M))
        if self.debiased:
            n = self.n
            value += self.t * other.t / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * float(self.s @ other.s)
        return value

    def cka(self, other: _PreparedGram) -> float:
        if self.self_dot <= 0 or other.self_dot <= 0:
            _warn("a Gram matrix has no variation across samples (or a non-positive unbiased HSIC): "
                  "CKA is undefined; returning 0")
            return 0.0
        return float(self.dot(other) / np.sqrt(self.self_dot * other.self_dot))


def linear_cka_gram(X: Source, Y: Source, *, debiased: bool = False, max_samples: int = 5000) -> float:
    """Linear CKA through n x n Gram matrices (reference form; O(n^2 d) time, O(n^2) memory).

    Equals :func:`linear_cka`; cheaper only when d is much larger than n.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features_x) or batch factory
    Y : ndarray of shape (n_samples, n_features_y) or batch factory
    debiased : bool, default=False
    max_samples : int, default=5000
        Refuse more rows than this (each Gram matrix takes 8 n^2 bytes).

    Returns
    -------
    float
    """
    a, b = _pair_arrays(X, Y, max_samples, "linear_cka_gram")
    a, b = a - a.mean(axis=0), b - b.mean(axis=0)
    return cka_from_grams(a @ a.T, b @ b.T, debiased=debiased)


def _pair_arrays(X, Y, max_samples, purpose):
    a = _materialise(X, "X", max_samples, purpose)
    b = _materialise(Y, "Y", max_samples, purpose)
    if len(a) != len(b):
        raise ConfigError(f"X has {len(a)} samples but Y has {len(b)}: CKA compares the same samples in both")
    return a, b


def rbf_gram(X: np.ndarray, *, sigma_factor: float = 1.0, sigma: float | None = None) -> np.ndarray:
    """Gaussian (RBF) Gram matrix ``exp(-|x_i - x_j|^2 / (2 sigma^2))``.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    sigma_factor : float, default=1.0
        sigma = sigma_factor * the median Euclidean distance between distinct samples (the median
        heuristic; Kornblith et al. use factors 0.2-0.8 for more local comparisons).
    sigma : float, optional
        An explicit bandwidth; overrides the median heuristic.

    Returns
    -------
    ndarray of shape (n_samples, n_samples)
    """
    X = _as_matrix(X, "X")
    if len(X) < 2:
        raise ConfigError(f"X has {len(X)} samples; an RBF Gram matrix needs at least 2")
    sq = pdist(X, "sqeuclidean")
    if sigma is None:
        if not sigma_factor > 0:
            raise ConfigError(f"sigma_factor={sigma_factor!r} must be > 0")
        median = float(np.median(np.sqrt(sq)))
        if median == 0:
            raise ConfigError("the median distance between samples is 0 (more than half of the pairs are "
                              "identical rows), so the median heuristic gives no bandwidth; pass sigma explicitly")
        sigma = sigma_factor * median
    elif not sigma > 0:
        raise ConfigError(f"sigma={sigma!r} must be > 0")
    K = squareform(np.exp(-sq / (2.0 * sigma * sigma)))
    np.fill_diagonal(K, 1.0)
    return K


def rbf_cka(X: Source, Y: Source, *, sigma_factor: float = 1.0, debiased: bool = False,
            max_samples: int = 5000) -> float:
    """CKA with Gaussian kernels, bandwidth from the median heuristic (see :func:`rbf_gram`).

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features_x) or batch factory
    Y : ndarray of shape (n_samples, n_features_y) or batch factory
    sigma_factor : float, default=1.0
        Bandwidth of each layer = sigma_factor * that layer's median pairwise distance.
    debiased : bool, default=False
        Use the unbiased HSIC estimator (needs n >= 4).
    max_samples : int, default=5000
        Refuse more rows (two n x n matrices are held); subsample first.

    Returns
    -------
    float
    """
    a, b = _pair_arrays(X, Y, max_samples, "rbf_cka")
    return cka_from_grams(rbf_gram(a, sigma_factor=sigma_factor), rbf_gram(b, sigma_factor=sigma_factor),
                          debiased=debiased)


class MinibatchCKAState:
    """Minibatch CKA (Nguyen et al. 2021): unbiased linear HSIC summed over minibatches.

    ``CKA = mean_b HSIC_1(X_b, Y_b) / sqrt(mean_b HSIC_1(X_b, X_b) mean_b HSIC_1(Y_b, Y_b))``. Each
    minibatch gives unbiased HSIC estimates, so the ratio converges to the population CKA as the
    number of minibatches grows, whatever the batch size (>= 4). Mergeable: states add.
    """

    def __init__(self):
        self.n_batches = 0
        self.n_samples = 0
        self.sums = np.zeros(3)  # xy, xx, yy

    def add(self, X, Y) -> MinibatchCKAState:
        """Add one minibatch of aligned rows (at least 4); returns self."""
        X, Y = _as_matrix(X, "X"), _as_matrix(Y, "Y")
        if len(X) != len(Y):
            raise ConfigError(f"X has {len(X)} samples but Y has {len(Y)}: CKA compares the same samples in both")
        if len(X) < 4:
            raise ConfigError(f"a minibatch of {len(X)} rows is too small: the unbiased HSIC needs at least 4")
        self.sums += _hsic1_linear(X, Y)
        self.n_batches += 1
        self.n_samples += len(X)
        return self

    def merge(self, other: MinibatchCKAState) -> MinibatchCKAState:
        self.sums = self.sums + other.sums
        self.n_batches += other.n_batches
        self.n_samples += other.n_samples
        return self

    def cka(self) -> float:
        if self.n_batches == 0:
            raise ConfigError("minibatch CKA has seen no minibatches of at least 4 rows")
        xy, xx, yy = self.sums
        if xx <= 0 or yy <= 0:
            _warn("the summed unbiased HSIC of a layer with itself is not positive (a constant layer, "
                  "or too little data); minibatch CKA is undefined, returning 0")
            return 0.0
        return float(xy / np.sqrt(xx * yy))

    def state_dict(self) -> dict:
        return {"n_batches": self.n_batches, "n_samples": self.n_samples, "sums": self.sums.copy()}

    def load_state_dict(self, state: Mapping) -> MinibatchCKAState:
        self.n_batches, self.n_samples = int(state["n_batches"]), int(state["n_samples"])
        self.sums = np.array(state["sums"], dtype=np.float64)
        return self


def _hsic1_linear(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Unbiased HSIC (xy, xx, yy) of one minibatch with linear kernels, by the cheaper form."""
    n, dx, dy = len(X), X.shape[1], Y.shape[1]
    if n * (dx + dy) < dx * dx + dy * dy + dx * dy:  # Gram form is cheaper
        a, b = _PreparedGram(X @ X.T, True), _PreparedGram(Y @ Y.T, True)
        return np.array([a.dot(b), a.self_dot, b.self_dot]) / (n * (n - 3))
    sums = [_Moments.of_batch(p, q).summary() for p, q in ((X, Y), (X, X), (Y, Y))]
    return np.array([s[1] - n / (n - 2) * s[2] + s[3] * s[4] / ((n - 1) * (n - 2)) for s in sums]) / (n * (n - 3))


def _minibatches(sources, names, batch_size, purpose) -> Iterator[list[np.ndarray]]:
    """Aligned minibatches; a final remainder of fewer than 4 rows is dropped with a warning."""
    for blocks in _aligned_batches(sources, names, batch_size, purpose):
        if len(blocks[0]) < 4:
            _warn(f"dropped the last {len(blocks[0])} rows: a minibatch needs at least 4 for the unbiased HSIC")
            continue
        yield blocks


def minibatch_cka(X: Source, Y: Source, *, batch_size: int = 256) -> float:
    """Minibatch CKA (Nguyen et al. 2021) over aligned minibatches of X and Y.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features_x) or batch factory
    Y : ndarray of shape (n_samples, n_features_y) or batch factory
    batch_size : int, default=256
        Rows per minibatch (>= 4). Unlike linear CKA, this changes the estimate's variance (not its
        expectation). A final remainder of fewer than 4 rows is dropped with a warning.

    Returns
    -------
    float
        An estimate of the population (debiased) linear CKA.
    """
    batch_size = _check_int("batch_size", batch_size, 4)
    state = MinibatchCKAState()
    for x, y in _minibatches([X, Y], ["X", "Y"], batch_size, "CKA"):
        state.add(x, y)
    return state.cka()
