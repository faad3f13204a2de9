"""Layer x layer CKA matrices, within one run or between two, scheduled to read each layer few times.

Linear CKA keeps only per-pair summaries (self-moments of every layer once, cross-moments grouped
under a memory budget); minibatch CKA makes one joint pass over every layer; RBF CKA caches the
prepared Gram matrices while they fit. Pairwise estimators are in :mod:`neuronmap.analysis.cka`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import ConfigError
from ._sources import (
    DEFAULT_BATCH_SIZE, Source, _aligned_batches, _check_choice, _check_int, _check_source, _materialise, _Moments,
    _warn,
)
from .cka import _cka_from_summaries, _minibatches, _PreparedGram, rbf_gram

CKA_METHODS = ("linear", "rbf", "minibatch")
# Largest memory the linear cka_matrix holds in cross-moment states at once; more column layers
# than fit are handled in further passes over the row layer.
_STATE_BUDGET_BYTES = 256 * 2**20
# Largest memory the Gram-based cka_matrix keeps in cached per-layer Gram matrices.
_GRAM_CACHE_BYTES = 512 * 2**20


def cka_matrix(layers_a: Mapping[str, Source], layers_b: Mapping[str, Source] | None = None, *,
               method: str = "linear", debiased: bool = False, batch_size: int | None = None,
               sigma_factor: float = 1.0, max_samples: int = 5000) -> np.ndarray:
    """CKA between every layer of `layers_a` and every layer of `layers_b` (or of `layers_a`).

    Within one run pass only `layers_a`; between two runs (two models on the same prompts) pass
    both. Every layer must hold the same samples in the same order.

    Parameters
    ----------
    layers_a : mapping of str to (ndarray of shape (n_samples, n_features_l) or batch factory)
        Rows of the result, in mapping order.
    layers_b : mapping of str to source, default=None
        Columns of the result; None means `layers_a` (the matrix is then symmetric, diagonal 1).
    method : {"linear", "rbf", "minibatch"}, default="linear"
        "linear": exact feature-space linear CKA, streaming; each pair's cross-moments are
        computed once (within a run, only the upper triangle). "rbf": Gaussian-kernel CKA on
        n x n Gram matrices (n <= max_samples). "minibatch": Nguyen et al.'s minibatch CKA, one
        joint pass over all layers (always unbiased HSIC; `debiased` is ignored).
    debiased : bool, default=False
        Unbiased HSIC for "linear" and "rbf".
    batch_size : int, optional
        Rows per step: 4096 for "linear" (memory only), 256 for "minibatch" (the minibatch size).
    sigma_factor : float, default=1.0
        RBF bandwidth factor (see :func:`rbf_gram`).
    max_samples : int, default=5000
        Cap on n for "rbf".

    Returns
    -------
    ndarray of shape (n_layers_a, n_layers_b)
    """
    method = _check_choice("method", method, CKA_METHODS)
    if not isinstance(layers_a, Mapping) or not layers_a:
        raise ConfigError("layers_a must be a non-empty mapping of layer name to array or batch factory")
    if layers_b is not None and (not isinstance(layers_b, Mapping) or not layers_b):
        raise ConfigError("layers_b must be a non-empty mapping of layer name to array or batch factory, or None")
    names_a = list(layers_a)
    names_b = names_a if layers_b is None else list(layers_b)
    src_a = {k: _check_source(v, f"layer {k!r}") for k, v in layers_a.items()}
    src_b = src_a if layers_b is None else {k: _check_source(v, f"layer {k!r}") for k, v in layers_b.items()}
    if method == "linear":
        batch_size = _check_int("batch_size", DEFAULT_BATCH_SIZE if batch_size is None else batch_size, 1)
        return _linear_cka_matrix(names_a, names_b, src_a, src_b, layers_b is None, debiased, batch_size)
    if method == "minibatch":
        batch_size = _check_int("batch_size", 256 if batch_size is None else batch_size, 4)
        return _minibatch_cka_matrix(names_a, names_b, src_a, src_b, layers_b is None, batch_size)
    return _gram_cka_matrix(names_a, names_b, src_a, src_b, layers_b is None, debiased, sigma_factor, max_samples)


def _linear_cka_matrix(names_a, names_b, src_a, src_b, symmetric, debiased, batch_size) -> np.ndarray:
    """Self-moments of every layer once (one pass each), then for each row layer one pass per group of
    partner layers whose cross-moments fit _STATE_BUDGET_BYTES. Only summaries are kept."""
    def label(side, name):
        return f"layer {name!r}" if symmetric else f"layer {name!r} of {side}"

    def self_pass(src, lab):
        m = _Moments()
        for (x,) in _aligned_batches([src], [lab], batch_size, "CKA"):
            m.add(x, x)
        if m.n < 2:
            raise ConfigError(f"{lab} has {m.n} samples; CKA needs at least 2")
        return m.summary(), len(m.mx)

    selfs_a = {a: self_pass(src_a[a], label("layers_a", a)) for a in names_a}
    selfs_b = selfs_a if symmetric else {b: self_pass(src_b[b], label("layers_b", b)) for b in names_b}
    counts = [(label("layers_a", k), v[0][0]) for k, v in selfs_a.items()]
    counts += [] if symmetric else [(label("layers_b", k), v[0][0]) for k, v in selfs_b.items()]
    for lab, count in counts[1:]:
        if count != counts[0][1]:
            raise ConfigError(f"{counts[0][0]} has {counts[0][1]} samples but {lab} has {count}: "
                              f"CKA compares the same samples in both")
    out = np.zeros((len(names_a), len(names_b)))
    for i, a in enumerate(names_a):
        if symmetric:
            constant = selfs_a[a][0][5]
            if constant:
                _warn(f"layer {a!r} is constant across samples: its CKA is undefined; returning 0")
            out[i, i] = 0.0 if constant else 1.0
        partners = list(enumerate(names_b))[i + 1:] if symmetric else list(enumerate(names_b))
        d_a = selfs_a[a][1]
        group: list = []
        groups = [group]
        for j, b in partners:
            if group and 8 * d_a * sum(selfs_b[c][1] for _, c in group + [(j, b)]) > _STATE_BUDGET_BYTES:
                group = []
                groups.append(group)
            group.append((j, b))
        for group in filter(None, groups):
            sources = [src_a[a]] + [src_b[b] for _, b in group]
            labels = [label("layers_a", a)] + [label("layers_b", b) for _, b in group]
            cross = [_Moments() for _ in group]
            for blocks in _aligned_batches(sources, labels, batch_size, "CKA"):
                for m, y in zip(cross, blocks[1:]):
                    m.add(blocks[0], y)
            for (j, b), m in zip(group, cross):
                out[i, j] = _cka_from_summaries(selfs_a[a][0], selfs_b[b][0], m.summary(), debiased)
                if symmetric:
                    out[j, i] = out[i, j]
    return out


def _minibatch_cka_matrix(names_a, names_b, src_a, src_b, symmetric, batch_size) -> np.ndarray:
    """One joint pass over every layer; per minibatch one zero-diagonal Gram matrix per layer."""
    sources = [src_a[a] for a in names_a] + ([] if symmetric else [src_b[b] for b in names_b])
    labels = [f"layer {a!r}" for a in names_a]
    labels += [] if symmetric else [f"layer {b!r} of layers_b" for b in names_b]
    cols = range(len(names_a)) if symmetric else range(len(names_a), len(sources))
    selfs = np.zeros(len(sources))
    cross = np.zeros((len(names_a), len(names_b)))
    n_batches = 0
    for blocks in _minibatches(sources, labels, batch_size, "CKA"):
        n = len(blocks[0])
        grams = [_PreparedGram(x @ x.T, True) for x in blocks]
        scale = 1.0 / (n * (n - 3))
        selfs += [g.self_dot * scale for g in grams]
        for i in range(len(names_a)):
            for jj, j in enumerate(cols):
                if symmetric and j <= i:
                    continue
                cross[i, jj] += grams[i].dot(grams[j]) * scale
        n_batches += 1
    if n_batches == 0:
        raise ConfigError("the layers have fewer than 4 samples; minibatch CKA needs minibatches of at least 4")
    out = np.zeros_like(cross)
    for i in range(len(names_a)):
        for jj, j in enumerate(cols):
            if symmetric and j < i:
                out[i, jj] = out[jj, i]
                continue
            if selfs[i] <= 0 or selfs[j] <= 0:
                _warn(f"{labels[i] if selfs[i] <= 0 else labels[j]} has a non-positive summed unbiased HSIC "
                      f"(constant, or too little data): its minibatch CKA is undefined; returning 0")
                continue
            out[i, jj] = 1.0 if symmetric and i == j else cross[i, jj] / np.sqrt(selfs[i] * selfs[j])
    return out


def _gram_cka_matrix(names_a, names_b, src_a, src_b, symmetric, debiased, sigma_factor, max_samples) -> np.ndarray:
    """RBF CKA for every pair; prepared Gram matrices are cached while they fit _GRAM_CACHE_BYTES."""
    cache: dict = {}

    def prepared(side, name):
        key = (side, name)
        if key in cache:
            return cache[key]
        src = (src_a if side == "a" else src_b)[name]
        lab = f"layer {name!r}" if symmetric else f"layer {name!r} of layers_{side}"
        x = _materialise(src, lab, max_samples, "RBF CKA")
        g = _PreparedGram(rbf_gram(x, sigma_factor=sigma_factor), debiased)
        if (len(cache) + 1) * 8 * g.n * g.n <= _GRAM_CACHE_BYTES:
            cache[key] = g
        return g

    side_b = "a" if symmetric else "b"
    out = np.zeros((len(names_a), len(names_b)))
    for i, a in enumerate(names_a):
        ga = prepared("a", a)
        for j, b in enumerate(names_b):
            if symmetric and j < i:
                out[i, j] = out[j, i]
                continue
            out[i, j] = ga.cka(ga if symmetric and i == j else prepared(side_b, b))
    return out
