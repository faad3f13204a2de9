"""Similarity between samples, neurons and whole layers: cosine, Pearson, CKA and RSA.

This module holds cosine similarity between samples and Pearson correlation between neurons (within a
layer or across two), and re-exports the layer comparisons so that one import reaches them all:
CKA from :mod:`neuronmap.analysis.cka` (pairwise) and :mod:`neuronmap.analysis.cka_matrix` (layer x
layer), RSA from :mod:`neuronmap.analysis.rsa`.

Inputs
------
Every function here takes activations in one of two forms:

* an array of shape (n_samples, n_features); trailing axes beyond the second are flattened into
  features, so a (n_samples, heads, seq, seq) attention pattern is compared as one vector per sample;
* a *batch factory*: a zero-argument callable that returns a fresh iterable of such arrays in row
  order, e.g. ``lambda: run.iter_batches("blocks.3")``. It is called once per pass over the data, so
  memory stays O(batch) whatever the run's size. Two factories compared with each other must yield
  the same samples in the same order; their batch boundaries may differ (rows are re-chunked).

All arithmetic is float64 whatever the stored dtype.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from ._sources import DEFAULT_BATCH_SIZE, Source, _aligned_batches, _check_int, _materialise, _Moments, _warn
from .cka import (  # noqa: F401  (re-exported)
    LinearCKAState, MinibatchCKAState, _hsic1_linear, cka_from_grams, hsic, linear_cka, linear_cka_gram,
    minibatch_cka, rbf_cka, rbf_gram,
)
from .cka_matrix import CKA_METHODS, cka_matrix  # noqa: F401  (re-exported)
from .rsa import RDM_COMPARISONS, RDM_METRICS, compare_rdms, kendall_tau_a, rdm, rsa, rsa_matrix  # noqa: F401

__all__ = [
    "CKA_METHODS", "DEFAULT_BATCH_SIZE", "RDM_COMPARISONS", "RDM_METRICS", "LinearCKAState", "MinibatchCKAState",
    "Source", "cka_from_grams", "cka_matrix", "compare_rdms", "cosine_similarity", "cross_layer_correlation", "hsic",
    "kendall_tau_a", "linear_cka", "linear_cka_gram", "minibatch_cka", "pearson_correlation", "rbf_cka", "rbf_gram",
    "rdm", "rsa", "rsa_matrix",
]


def cosine_similarity(X: Source, Y: Source | None = None, *, max_samples: int = 10_000) -> np.ndarray:
    """Cosine similarity between samples (rows).

    Parameters
    ----------
    X : ndarray of shape (n_samples_x, n_features) or batch factory
    Y : ndarray of shape (n_samples_y, n_features) or batch factory, default=None
        None compares X with itself.
    max_samples : int, default=10000
        Refuse inputs with more rows: the result is a dense n_x x n_y matrix.

    Returns
    -------
    ndarray of shape (n_samples_x, n_samples_y)
        Values in [-1, 1]. A zero row has no direction: its similarities are 0 (with a warning),
        as in ``sklearn.metrics.pairwise.cosine_similarity``.
    """
    a = _materialise(X, "X", max_samples, "cosine_similarity")
    b = a if Y is None else _materialise(Y, "Y", max_samples, "cosine_similarity")
    if a.shape[1] != b.shape[1]:
        raise ConfigError(f"X has {a.shape[1]} features but Y has {b.shape[1]}: cosine similarity "
                          f"between samples needs vectors of one width")
    a_unit, zero_a = _unit_rows(a)
    b_unit, zero_b = (a_unit, zero_a) if Y is None else _unit_rows(b)
    if zero_a or zero_b:
        n_zero = zero_a + (0 if Y is None else zero_b)
        _warn(f"{n_zero} all-zero rows have no direction; their cosine similarities are 0")
    return np.clip(a_unit @ b_unit.T, -1.0, 1.0)


def _unit_rows(a: np.ndarray) -> tuple[np.ndarray, int]:
    norms = np.linalg.norm(a, axis=1)
    zero = norms == 0
    return a / np.where(zero, 1.0, norms)[:, None], int(zero.sum())


def pearson_correlation(X: Source, Y: Source | None = None, *,
                        batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """Pearson correlation between neurons (columns), within one layer or across two.

    One streaming pass with mergeable co-moments (no n x d copy), so it runs on batch factories.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features_x) or batch factory
    Y : ndarray of shape (n_samples, n_features_y) or batch factory, default=None
        The same samples in the same order; None correlates X's neurons with each other.
    batch_size : int, default=4096
        Rows per step; a memory knob that does not change the result.

    Returns
    -------
    ndarray of shape (n_features_x, n_features_y)
        ``r[i, j]`` correlates neuron i of X with neuron j of Y (of X when Y is None). A constant
        neuron has no correlation: its row/column is 0, its diagonal entry included, with a
        warning -- never NaN.
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    same = Y is None
    state = _Moments()
    sources, names = ([X], ["X"]) if same else ([X, Y], ["X", "Y"])
    for blocks in _aligned_batches(sources, names, batch_size, "Pearson correlation"):
        state.add(blocks[0], blocks[0] if same else blocks[1])
    if state.n < 2:
        raise ConfigError(f"X has {state.n} samples; Pearson correlation needs at least 2")
    const_x = state.constant_x()
    const_y = state.constant_y()
    n_const = int(const_x.sum()) + (0 if same else int(const_y.sum()))
    if n_const:
        _warn(f"{n_const} constant neurons have no correlation; their entries are 0")
    sx = np.sqrt(np.where(const_x, 1.0, state.vx))
    sy = np.sqrt(np.where(const_y, 1.0, state.vy))
    r = state.C.T / np.outer(sx, sy)
    r[const_x, :] = 0.0
    r[:, const_y] = 0.0
    return np.clip(r, -1.0, 1.0)


def cross_layer_correlation(X: Source, Y: Source, *, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """Pearson correlation of every neuron of layer X with every neuron of layer Y.

    The same as ``pearson_correlation(X, Y)``; Y is required. ``np.abs(r).max(axis=1)`` gives each
    X neuron's best-matching Y neuron.

    Returns
    -------
    ndarray of shape (n_features_x, n_features_y)
    """
    if Y is None:
        raise ConfigError("cross_layer_correlation needs two layers; pass Y, or use pearson_correlation(X)")
    return pearson_correlation(X, Y, batch_size=batch_size)
