"""Layer evolution: how the representation of the same samples changes through depth.

Given layers in order (e.g. ``embed, blocks.0, ..., blocks.11``), three measures:

* **CKA with the previous layer** -- linear CKA (feature-space form, see
  :mod:`neuronmap.analysis.cka`) between layer l - 1 and layer l: how much of the geometry of
  the samples survives the block. Optionally debiased.
* **Norm growth** -- the mean L2 norm of the samples' vectors in each layer, and its ratio to the
  previous layer's (the residual stream's norm typically grows with depth).
* **Cosine drift** -- for every sample, the cosine between its vector in layer l - 1 and in layer
  l; reported as mean and standard deviation over samples. 1 - mean cosine is how far, in angle,
  a block moves a sample. Needs consecutive layers of one width.

Everything is computed from mergeable per-pair partial states (:class:`EvolutionPairState`), so the
layers may be batch factories (``lambda: run.iter_batches(layer)``) and Ray tasks may each handle a
layer pair or a shard and merge. :func:`layer_evolution` makes one pass per consecutive pair and
holds at most two layers' moments (O(d^2)) at a time.

Across many pairs that share layers (consecutive pairs: every inner layer is the "next" of one pair
and the "prev" of the following one), :func:`evolution_layer_summary` summarises a layer's own
moments and norms once, :func:`evolution_cross_summary` a pair's cross-moments and cosines, and
:func:`evolution_from_summaries` combines them: the same numbers as :func:`evolution_pair`, bit for
bit (same batches, same merges), with each layer's self-moments computed once instead of twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import ConfigError
from ._sources import DEFAULT_BATCH_SIZE, Source, _aligned_batches, _as_matrix, _check_int, _Moments, _warn
from .cka import _cka_from_summaries


class _Welford:
    """Count, mean and sum of squared deviations of a scalar, mergeable (Chan et al.)."""

    def __init__(self, n: int = 0, mean: float = 0.0, m2: float = 0.0):
        self.n, self.mean, self.m2 = n, mean, m2

    def add(self, values: np.ndarray) -> None:
        if len(values):
            mean = float(values.mean())
            self.merge(_Welford(len(values), mean, float(((values - mean) ** 2).sum())))

    def merge(self, other: _Welford) -> _Welford:
        n = self.n + other.n
        if other.n:
            delta = other.mean - self.mean
            self.mean += delta * other.n / n
            self.m2 += other.m2 + delta * delta * self.n * other.n / n
            self.n = n
        return self

    @property
    def std(self) -> float:
        """Population standard deviation (ddof=0), like ``np.std``."""
        return float(np.sqrt(max(self.m2, 0.0) / self.n)) if self.n else 0.0


def _row_cosines(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-row cosine; a pair with a zero vector gets 0 (counted for a warning)."""
    nx, ny = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
    zero = (nx == 0) | (ny == 0)
    dots = np.einsum("ij,ij->i", x, y)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(zero, 0.0, dots / np.where(zero, 1.0, nx * ny))
    return np.clip(cos, -1.0, 1.0), int(zero.sum())


class EvolutionPairState:
    """Mergeable partial results for one consecutive layer pair (prev, next).

    Holds the linear-CKA co-moments of (prev, prev), (next, next) and (prev, next), the Welford
    summaries of each layer's row norms, and of the per-sample cosine (when widths match).
    Build one per shard or Ray task with :meth:`add`, combine with :meth:`merge`, read with
    :meth:`result`.
    """

    def __init__(self, cosine: bool = True):
        self.cosine = cosine
        self.xx, self.yy, self.xy = _Moments(), _Moments(), _Moments()
        self.norm_prev, self.norm_next, self.cos = _Welford(), _Welford(), _Welford()
        self.zero_pairs = 0

    def add(self, prev, next_) -> EvolutionPairState:
        """Add aligned rows of the two layers, of shapes (b, d_prev) and (b, d_next); returns self."""
        x, y = _as_matrix(prev, "prev"), _as_matrix(next_, "next")
        if len(x) != len(y):
            raise ConfigError(f"prev has {len(x)} samples but next has {len(y)}: layer evolution compares "
                              f"the same samples in both")
        if self.cosine and x.shape[1] != y.shape[1]:
            raise _width_error("prev", x.shape[1], "next", y.shape[1])
        if len(x):
            self.xx.add(x, x)
            self.yy.add(y, y)
            self.xy.add(x, y)
            self.norm_prev.add(np.linalg.norm(x, axis=1))
            self.norm_next.add(np.linalg.norm(y, axis=1))
            if self.cosine:
                cos, zero = _row_cosines(x, y)
                self.cos.add(cos)
                self.zero_pairs += zero
        return self

    def merge(self, other: EvolutionPairState) -> EvolutionPairState:
        for mine, theirs in ((self.xx, other.xx), (self.yy, other.yy), (self.xy, other.xy),
                             (self.norm_prev, other.norm_prev), (self.norm_next, other.norm_next),
                             (self.cos, other.cos)):
            mine.merge(theirs)
        self.zero_pairs += other.zero_pairs
        return self

    def state_dict(self) -> dict:
        """Plain dict of numpy arrays and numbers (for Ray / np.savez after flattening)."""
        return {"cosine": self.cosine, "xx": self.xx.state_dict(), "yy": self.yy.state_dict(),
                "xy": self.xy.state_dict(), "zero_pairs": self.zero_pairs,
                **{key: [w.n, w.mean, w.m2] for key, w in (("norm_prev", self.norm_prev),
                                                         ("norm_next", self.norm_next), ("cos", self.cos))}}

    def load_state_dict(self, state) -> EvolutionPairState:
        """Restore a state_dict (``EvolutionPairState().load_state_dict(state)``); returns self."""
        self.cosine = bool(state["cosine"])
        for key in ("xx", "yy", "xy"):
            getattr(self, key).load_state_dict(state[key])
        for key in ("norm_prev", "norm_next", "cos"):
            n, mean, m2 = state[key]
            setattr(self, key, _Welford(int(n), float(mean), float(m2)))
        self.zero_pairs = int(state["zero_pairs"])
        return self

    def result(self, debiased: bool = False) -> dict:
        """Dict of floats: cka, mean_norm_prev, mean_norm_next, norm_growth, cosine_mean, cosine_std.

        The cosine entries are absent when the state was built with ``cosine=False``.
        """
        if self.xy.n < 2:
            raise ConfigError(f"layer evolution needs at least 2 samples; got {self.xy.n}")
        out = {"cka": _cka_from_summaries(self.xx.summary(), self.yy.summary(), self.xy.summary(), debiased),
               "mean_norm_prev": self.norm_prev.mean, "mean_norm_next": self.norm_next.mean,
               "norm_growth": _ratio(self.norm_next.mean, self.norm_prev.mean, "next", "prev")}
        if self.cosine:
            if self.zero_pairs:
                _warn(f"{self.zero_pairs} samples have a zero vector in one of the layers: their cosine is taken as 0")
            out.update(cosine_mean=self.cos.mean, cosine_std=self.cos.std)
        return out


def _ratio(num: float, den: float, num_name: str, den_name: str) -> float:
    if den == 0:
        _warn(f"every sample of {den_name} has norm 0: the norm growth to {num_name} is undefined; returning 0")
        return 0.0
    return num / den


def _width_error(a, da, b, db) -> ConfigError:
    return ConfigError(f"{a} has {da} features but {b} has {db}: the per-sample cosine between consecutive "
                       f"layers needs one width; pass cosine=False or choose layers of one width")


def evolution_pair(prev: Source, next_: Source, *, debiased: bool = False, cosine: bool = True,
                   batch_size: int = DEFAULT_BATCH_SIZE) -> dict:
    """Layer-evolution measures for one pair of layers (one Ray task's worth).

    Parameters
    ----------
    prev : ndarray of shape (n_samples, n_features_prev) or batch factory
    next_ : ndarray of shape (n_samples, n_features_next) or batch factory
        The same samples in the same order.
    debiased : bool, default=False
        Debiased linear CKA (unbiased HSIC).
    cosine : bool, default=True
        Compute the per-sample cosine (needs n_features_prev == n_features_next).
    batch_size : int, default=4096
        Rows per step; memory only.

    Returns
    -------
    dict
        See :meth:`EvolutionPairState.result`.
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    state = EvolutionPairState(cosine=cosine)
    for x, y in _aligned_batches([prev, next_], ["prev", "next_"], batch_size, "layer evolution"):
        state.add(x, y)
    return state.result(debiased=debiased)


def evolution_layer_summary(source: Source, *, batch_size: int = DEFAULT_BATCH_SIZE) -> dict:
    """One layer's share of every evolution pair it is in: its self-moment summary and row norms.

    Parameters
    ----------
    source : ndarray of shape (n_samples, n_features) or batch factory
    batch_size : int, default=4096

    Returns
    -------
    dict
        ``moments``: the (X, X) co-moment summary (`_Moments.summary`); ``norm``: [n, mean, m2]
        of the samples' L2 norms (Welford). Picklable, for a Ray task per layer.
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    own, norm = _Moments(), _Welford()
    for (x,) in _aligned_batches([source], ["layer"], batch_size, "layer evolution"):
        own.add(x, x)
        norm.add(np.linalg.norm(x, axis=1))
    return {"moments": own.summary(), "norm": [norm.n, norm.mean, norm.m2]}


def evolution_cross_summary(prev: Source, next_: Source, *, cosine: bool = True,
                            batch_size: int = DEFAULT_BATCH_SIZE) -> dict:
    """A pair's own share: the (prev, next) co-moment summary and the per-sample cosines.

    Returns
    -------
    dict
        ``moments``: the cross summary; ``cos``: [n, mean, m2] of the cosines (only with cosine=True);
        ``zero_pairs``: samples with a zero vector in either layer (their cosine is taken as 0).
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    cross, cos = _Moments(), _Welford()
    zero = 0
    for x, y in _aligned_batches([prev, next_], ["prev", "next_"], batch_size, "layer evolution"):
        if cosine and x.shape[1] != y.shape[1]:
            raise _width_error("prev", x.shape[1], "next", y.shape[1])
        cross.add(x, y)
        if cosine:
            c, z = _row_cosines(x, y)
            cos.add(c)
            zero += z
    out = {"moments": cross.summary(), "zero_pairs": zero}
    if cosine:
        out["cos"] = [cos.n, cos.mean, cos.m2]
    return out


def evolution_from_summaries(prev: dict, next_: dict, cross: dict, *, debiased: bool = False) -> dict:
    """:func:`evolution_pair`'s result from the two layers' and the pair's summaries (same rows in all three).

    Cosine entries are present when `cross` was computed with cosine=True.
    """
    n = cross["moments"][0]
    if n < 2:
        raise ConfigError(f"layer evolution needs at least 2 samples; got {n}")
    norm_prev, norm_next = _Welford(*prev["norm"]), _Welford(*next_["norm"])
    out = {"cka": _cka_from_summaries(prev["moments"], next_["moments"], cross["moments"], debiased),
           "mean_norm_prev": norm_prev.mean, "mean_norm_next": norm_next.mean,
           "norm_growth": _ratio(norm_next.mean, norm_prev.mean, "next", "prev")}
    if "cos" in cross:
        if cross["zero_pairs"]:
            _warn(f"{cross['zero_pairs']} samples have a zero vector in one of the layers: their cosine is taken as 0")
        cos = _Welford(*cross["cos"])
        out.update(cosine_mean=cos.mean, cosine_std=cos.std)
    return out


def layer_evolution(layers: Mapping[str, Source] | Sequence[tuple[str, Source]], *, debiased: bool = False,
                    cosine: bool = True, batch_size: int = DEFAULT_BATCH_SIZE) -> dict:
    """CKA with the previous layer, norm growth and per-sample cosine drift through depth.

    Parameters
    ----------
    layers : mapping of str to source, or sequence of (name, source) pairs
        At least two layers, in depth order; each source an ndarray of shape
        (n_samples, n_features_l) or a batch factory over the same samples in the same order.
    debiased : bool, default=False
        Debiased linear CKA (unbiased HSIC; needs n >= 4).
    cosine : bool, default=True
        Per-sample cosine between consecutive layers; needs every layer to have the same width.
    batch_size : int, default=4096
        Rows per step; memory only, the result does not depend on it.

    Returns
    -------
    dict
        ``layers`` : list of str, length L.
        ``mean_norm`` : ndarray of shape (L,), mean L2 norm of a sample's vector in each layer.
        ``norm_std`` : ndarray of shape (L,), its standard deviation over samples (ddof=0).
        ``norm_growth`` : ndarray of shape (L - 1,), ``mean_norm[l] / mean_norm[l - 1]``.
        ``cka_prev`` : ndarray of shape (L - 1,), linear CKA between layer l - 1 and layer l.
        ``cosine_mean``, ``cosine_std`` : ndarray of shape (L - 1,), mean and std (ddof=0) over
        samples of the cosine between a sample's vectors in layers l - 1 and l (only with cosine=True).
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    items = list(layers.items()) if isinstance(layers, Mapping) else list(layers)
    if len(items) < 2:
        raise ConfigError(f"layer evolution needs at least 2 layers in depth order; got {len(items)}")
    names = [name for name, _ in items]
    # layer 0's self-moments and norms; afterwards each pass adds one layer's and one pair's
    first, prev_norm = _Moments(), _Welford()
    for (x,) in _aligned_batches([items[0][1]], [f"layer {names[0]!r}"], batch_size, "layer evolution"):
        first.add(x, x)
        prev_norm.add(np.linalg.norm(x, axis=1))
    if first.n < 2:
        raise ConfigError(f"layer {names[0]!r} has {first.n} samples; layer evolution needs at least 2")
    norms = [prev_norm]
    cka, cos_mean, cos_std = [], [], []
    prev_summary = first.summary()
    for l in range(1, len(items)):
        labels = [f"layer {names[l - 1]!r}", f"layer {names[l]!r}"]
        own, cross, norm, cos = _Moments(), _Moments(), _Welford(), _Welford()
        zero = 0
        for x, y in _aligned_batches([items[l - 1][1], items[l][1]], labels, batch_size, "layer evolution"):
            if cosine and x.shape[1] != y.shape[1]:
                raise _width_error(labels[0], x.shape[1], labels[1], y.shape[1])
            own.add(y, y)
            cross.add(x, y)
            norm.add(np.linalg.norm(y, axis=1))
            if cosine:
                c, z = _row_cosines(x, y)
                cos.add(c)
                zero += z
        summary = own.summary()
        cka.append(_cka_from_summaries(prev_summary, summary, cross.summary(), debiased))
        if zero:
            _warn(f"{zero} samples have a zero vector in {labels[0]} or {labels[1]}: their cosine is taken as 0")
        cos_mean.append(cos.mean)
        cos_std.append(cos.std)
        norms.append(norm)
        prev_summary = summary
    mean_norm = np.array([w.mean for w in norms])
    out = {"layers": names, "mean_norm": mean_norm, "norm_std": np.array([w.std for w in norms]),
           "norm_growth": np.array([_ratio(mean_norm[l], mean_norm[l - 1], f"layer {names[l]!r}",
                                           f"layer {names[l - 1]!r}") for l in range(1, len(names))]),
           "cka_prev": np.array(cka)}
    if cosine:
        out.update(cosine_mean=np.array(cos_mean), cosine_std=np.array(cos_std))
    return out
