"""Representational similarity analysis: RDMs of samples, compared by Spearman, Kendall's tau-a or Pearson.

Representational similarity analysis compares the sample-by-sample dissimilarity matrices (RDMs) of
two layers, as condensed vectors of length n (n - 1) / 2, by rank correlation (Spearman, or
Kendall's tau-a, which unlike tau-b does not reward ties -- the recommended choice when an RDM has
many tied entries, Nili et al. 2014).

Inputs are arrays of shape (n_samples, n_features) or batch factories (see
:mod:`neuronmap.analysis._sources`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy.spatial.distance import pdist
from scipy.stats import rankdata

from ..errors import ConfigError
from ._sources import Source, _check_choice, _check_int, _materialise, _warn

RDM_METRICS = ("correlation", "cosine", "euclidean")
RDM_COMPARISONS = ("spearman", "kendall_tau_a", "pearson")


def rdm(X: Source, *, metric: str = "correlation", max_samples: int = 5000) -> np.ndarray:
    """Representational dissimilarity matrix of the samples, as a condensed vector.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features) or batch factory
    metric : {"correlation", "cosine", "euclidean"}, default="correlation"
        Passed to ``scipy.spatial.distance.pdist``: 1 - Pearson r between samples, 1 - cosine
        similarity, or Euclidean distance.
    max_samples : int, default=5000
        Refuse more rows: the RDM has n (n - 1) / 2 entries (5000 rows: 12.5 M, 100 MB).

    Returns
    -------
    ndarray of shape (n_samples * (n_samples - 1) / 2,)
        Entry for the pair (i, j), i < j, in ``scipy.spatial.distance.squareform`` order. A pair
        involving a constant row (correlation) or a zero row (cosine) has no defined distance: it
        gets 1 (the distance of uncorrelated samples), with a warning.
    """
    metric = _check_choice("metric", metric, RDM_METRICS)
    max_samples = _check_int("max_samples", max_samples, 2)
    x = _materialise(X, "X", max_samples, "an RDM")
    if len(x) < 2:
        raise ConfigError(f"X has {len(x)} samples; an RDM needs at least 2")
    with np.errstate(invalid="ignore", divide="ignore"):
        d = pdist(x, metric)
    bad = ~np.isfinite(d)
    if bad.any():
        kind = "constant rows" if metric == "correlation" else "all-zero rows"
        _warn(f"{int(bad.sum())} sample pairs involve {kind}, whose {metric} distance is undefined; they get 1")
        d[bad] = 1.0
    return d


def kendall_tau_a(x, y) -> float:
    """Kendall's tau-a: (concordant - discordant pairs) / (m (m - 1) / 2).

    Unlike tau-b (``scipy.stats.kendalltau``'s default), ties count as neither concordant nor
    discordant *and* stay in the denominator, so a model whose RDM predicts many ties is not
    rewarded for them (Nili et al. 2014). O(m log m) time and O(m) memory: discordant pairs are
    counted as inversions by a vectorised bottom-up merge sort.

    Parameters
    ----------
    x, y : array-like of shape (m,)

    Returns
    -------
    float
        In [-1, 1].
    """
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    m = len(x)
    if len(y) != m:
        raise ConfigError(f"x has {m} values but y has {len(y)}: tau-a compares paired values")
    if m < 2:
        raise ConfigError(f"tau-a needs at least 2 paired values; got {m}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ConfigError("x or y contains NaN or infinite values")
    total = m * (m - 1) // 2
    x_rank = np.unique(x, return_inverse=True)[1].astype(np.int64).ravel()  # dense ranks: exact ties
    y_rank = np.unique(y, return_inverse=True)[1].astype(np.int64).ravel()
    key = np.sort(x_rank * (int(y_rank.max()) + 1) + y_rank)  # by x, ties by y: never inversions
    y_in_x_order = key % (int(y_rank.max()) + 1)
    discordant = _count_inversions(y_in_x_order)
    tied_x, tied_y = _tied_pairs(np.bincount(x_rank)), _tied_pairs(np.bincount(y_rank))
    tied_both = _tied_pairs(np.diff(np.flatnonzero(np.r_[True, key[1:] != key[:-1], True])))
    return (total - tied_x - tied_y + tied_both - 2 * discordant) / total


def _tied_pairs(group_sizes: np.ndarray) -> int:
    sizes = group_sizes.astype(np.int64)
    return int((sizes * (sizes - 1) // 2).sum())


def _count_inversions(a: np.ndarray) -> int:
    """Number of pairs i < j with a[i] > a[j], for non-negative integers a: a bottom-up merge sort.

    At width w, `a` is sorted within blocks of w. Sorting the packed keys (block, value, half) of
    blocks of 2w merges each pair of halves; a right-half element preceded by `left_before` of its
    block's left elements (equal values: left first) is inverted with the rest of them. The order
    among equal keys does not change the count, so a plain (unstable) sort of the keys suffices.
    """
    n = len(a)
    a = a.astype(np.int64)
    span = 2 * (int(a.max()) + 1) if n else 2
    idx = np.arange(n, dtype=np.int64)
    inversions, width = 0, 1
    while width < n:
        start = idx // (2 * width) * (2 * width)  # first index of each position's block
        key = np.sort(start * span + 2 * a + (idx // width) % 2)
        right = key & 1
        seen_right = np.cumsum(right) - right  # right elements before each one, globally
        left_before = (idx - start) - (seen_right - seen_right[start])
        left_size = np.minimum(width, n - start)
        inversions += int((left_size - left_before)[right == 1].sum())
        a = (key % span) >> 1
        width *= 2
    return inversions


def _standardised_ranks(v: np.ndarray) -> np.ndarray | None:
    r = rankdata(v)
    r = r - r.mean()
    norm = np.linalg.norm(r)
    return None if norm == 0 else r / norm


def compare_rdms(rdm_a, rdm_b, *, method: str = "spearman") -> float:
    """Rank (or linear) correlation between two condensed RDMs of the same samples.

    Parameters
    ----------
    rdm_a, rdm_b : ndarray of shape (n_pairs,)
        From :func:`rdm`, over the same samples in the same order.
    method : {"spearman", "kendall_tau_a", "pearson"}, default="spearman"
        Spearman's rho (ties get average ranks, as ``scipy.stats.spearmanr``), Kendall's tau-a
        (:func:`kendall_tau_a`; O(m log m)), or Pearson's r.

    Returns
    -------
    float
        In [-1, 1]; an RDM with all entries equal has no ranking, giving 0 with a warning.
    """
    method = _check_choice("method", method, RDM_COMPARISONS)
    a, b = np.asarray(rdm_a, dtype=np.float64).ravel(), np.asarray(rdm_b, dtype=np.float64).ravel()
    if len(a) != len(b):
        raise ConfigError(f"rdm_a has {len(a)} entries but rdm_b has {len(b)}: RSA compares RDMs of the same samples")
    if method == "kendall_tau_a":
        return kendall_tau_a(a, b)
    if method == "spearman":
        ra, rb = _standardised_ranks(a), _standardised_ranks(b)
    else:
        ra, rb = a - a.mean(), b - b.mean()
        ra = None if not ra.any() else ra / np.linalg.norm(ra)
        rb = None if not rb.any() else rb / np.linalg.norm(rb)
    if ra is None or rb is None:
        _warn("an RDM has all entries equal: its correlation with another RDM is undefined; returning 0")
        return 0.0
    return float(np.clip(ra @ rb, -1.0, 1.0))


def rsa(X: Source, Y: Source, *, metric: str = "correlation", method: str = "spearman",
        max_samples: int = 5000) -> float:
    """Representational similarity of two layers: ``compare_rdms(rdm(X), rdm(Y))``.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features_x) or batch factory
    Y : ndarray of shape (n_samples, n_features_y) or batch factory
    metric : {"correlation", "cosine", "euclidean"}, default="correlation"
    method : {"spearman", "kendall_tau_a", "pearson"}, default="spearman"
    max_samples : int, default=5000

    Returns
    -------
    float
    """
    _check_choice("method", method, RDM_COMPARISONS)
    a, b = rdm(X, metric=metric, max_samples=max_samples), rdm(Y, metric=metric, max_samples=max_samples)
    if len(a) != len(b):
        raise ConfigError(f"X has {_n_from_pairs(len(a))} samples but Y has {_n_from_pairs(len(b))}: "
                          f"RSA compares the same samples in both")
    return compare_rdms(a, b, method=method)


def _n_from_pairs(m: int) -> int:
    return int(round((1 + np.sqrt(1 + 8 * m)) / 2))


def rsa_matrix(layers_a: Mapping[str, Source], layers_b: Mapping[str, Source] | None = None, *,
               metric: str = "correlation", method: str = "spearman", max_samples: int = 5000) -> np.ndarray:
    """RSA between every layer of `layers_a` and every layer of `layers_b` (or of `layers_a`).

    Each layer's RDM (and, for Spearman, its ranks) is computed once and held: memory is
    8 n (n - 1) / 2 bytes per layer.

    Parameters
    ----------
    layers_a : mapping of str to (ndarray of shape (n_samples, n_features_l) or batch factory)
    layers_b : mapping of str to source, default=None
    metric, method, max_samples
        As in :func:`rsa`.

    Returns
    -------
    ndarray of shape (n_layers_a, n_layers_b)
    """
    method = _check_choice("method", method, RDM_COMPARISONS)
    if not isinstance(layers_a, Mapping) or not layers_a:
        raise ConfigError("layers_a must be a non-empty mapping of layer name to array or batch factory")
    symmetric = layers_b is None
    rdms_a = {k: rdm(v, metric=metric, max_samples=max_samples) for k, v in layers_a.items()}
    rdms_b = rdms_a if symmetric else {k: rdm(v, metric=metric, max_samples=max_samples) for k, v in layers_b.items()}
    sizes = {len(v) for v in (*rdms_a.values(), *rdms_b.values())}
    if len(sizes) > 1:
        a, b = sorted(sizes)[0], sorted(sizes)[-1]
        raise ConfigError(f"the layers hold different numbers of samples ({_n_from_pairs(a)} and "
                          f"{_n_from_pairs(b)}): RSA compares the same samples in every layer")
    names_a, names_b = list(rdms_a), list(rdms_b)
    out = np.zeros((len(names_a), len(names_b)))
    for i, a in enumerate(names_a):
        for j, b in enumerate(names_b):
            if symmetric and j < i:
                out[i, j] = out[j, i]
            else:
                out[i, j] = compare_rdms(rdms_a[a], rdms_b[b], method=method)
    return out
