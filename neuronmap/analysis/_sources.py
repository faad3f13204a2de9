"""Activation sources and co-moments shared by the similarity, CKA, RSA, evolution and information modules.

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

This module validates sources, re-chunks several of them into row-aligned blocks whatever their own
batch boundaries (`_aligned_batches`), materialises small ones under a row cap (`_materialise`), and
keeps the mergeable centred co-moments (`_Moments`) from which Pearson correlation, linear CKA,
layer evolution and the principal axes of the layer MI are computed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Union

import numpy as np

from ..errors import ConfigError

Source = Union[np.ndarray, Callable[[], Iterable[np.ndarray]]]

DEFAULT_BATCH_SIZE = 4096
_EPS = np.finfo(np.float64).eps


# -- input handling ----------------------------------------------------------------------------------
def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an integer >= {minimum}")
    return int(value)


def _check_choice(name: str, value, options: Sequence[str]) -> str:
    if value not in options:
        raise ConfigError(f"{name}={value!r} is not supported; use one of {', '.join(map(repr, options))}")
    return value


def _is_factory(source) -> bool:
    return callable(source) and not isinstance(source, np.ndarray)


def _as_matrix(a, name: str) -> np.ndarray:
    """`a` as a finite float64 array of shape (n_samples, n_features); trailing axes flattened."""
    a = np.asarray(a)
    if a.ndim < 2:
        raise ConfigError(
            f"{name} must have shape (n_samples, n_features); got shape {a.shape}. Reshape with "
            f"a.reshape(-1, 1) if it holds a single feature, or a.reshape(1, -1) for a single sample")
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise ConfigError(f"{name} has dtype {a.dtype}; activations must be numeric")
    a = a.reshape(a.shape[0], -1).astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        bad = int(a.size - np.isfinite(a).sum())
        raise ConfigError(f"{name} contains {bad} NaN or infinite values; drop or impute them before comparing")
    return a


def _n_rows(source) -> int | None:
    """Number of samples of an array source; None for a factory (known only after a pass)."""
    return None if _is_factory(source) else len(np.asarray(source))


def _check_source(source, name: str):
    """Validate an array source's shape once, up front; factories are checked batch by batch."""
    if _is_factory(source):
        return source
    a = np.asarray(source)
    if a.ndim < 2:
        _as_matrix(a, name)  # raises the shape message
    return a


def _raw_batches(source, name: str, batch_size: int) -> Iterator[np.ndarray]:
    if _is_factory(source):
        width = None
        for i, batch in enumerate(source()):
            batch = _as_matrix(batch, f"{name} (batch {i})")
            if width is not None and batch.shape[1] != width:
                raise ConfigError(f"{name} batch {i} has {batch.shape[1]} features but earlier batches have {width}")
            width = batch.shape[1]
            if len(batch):
                yield batch
    else:
        a = _check_source(source, name)
        for start in range(0, len(a), batch_size):
            yield _as_matrix(a[start:start + batch_size], name)


class _RowStream:
    """Re-chunks a source into blocks of exactly `k` rows (the last may be shorter)."""

    def __init__(self, source, name: str, batch_size: int):
        self.name = name
        self._it = _raw_batches(source, name, batch_size)
        self._buf: list[np.ndarray] = []
        self._have = 0
        self.taken = 0

    def take(self, k: int) -> np.ndarray | None:
        while self._have < k:
            batch = next(self._it, None)
            if batch is None:
                break
            self._buf.append(batch)
            self._have += len(batch)
        if self._have == 0:
            return None
        block = self._buf[0] if len(self._buf) == 1 else np.concatenate(self._buf)
        out, rest = block[:k], block[k:]
        self._buf, self._have = ([rest], len(rest)) if len(rest) else ([], 0)
        self.taken += len(out)
        return out

    def total(self) -> int:
        """Rows taken plus rows left (drains the stream: only for error messages)."""
        return self.taken + self._have + sum(len(b) for b in self._it)


def _aligned_batches(sources: Sequence, names: Sequence[str], batch_size: int,
                     purpose: str) -> Iterator[list[np.ndarray]]:
    """Yield lists of row-aligned blocks, one per source, of `batch_size` rows (the last shorter).

    Raises ConfigError naming both counts when the sources hold different numbers of samples.
    """
    known = [(_n_rows(s), n) for s, n in zip(sources, names)]
    known = [(k, n) for k, n in known if k is not None]
    for k, n in known[1:]:
        if k != known[0][0]:
            raise ConfigError(f"{known[0][1]} has {known[0][0]} samples but {n} has {k}: "
                              f"{purpose} compares the same samples in both")
    streams = [_RowStream(s, n, batch_size) for s, n in zip(sources, names)]
    while True:
        blocks = [s.take(batch_size) for s in streams]
        lengths = [0 if b is None else len(b) for b in blocks]
        if max(lengths) == 0:
            return
        if min(lengths) != max(lengths):
            totals = [s.total() for s in streams]
            i = int(np.argmin(lengths))
            j = int(np.argmax(lengths))
            raise ConfigError(f"{names[i]} has {totals[i]} samples but {names[j]} has {totals[j]}: "
                              f"{purpose} compares the same samples in both")
        yield blocks


def _materialise(source, name: str, max_samples: int | None = None, purpose: str = "") -> np.ndarray:
    """The whole source as one float64 (n_samples, n_features) array, at most `max_samples` rows."""
    if max_samples is not None:
        _check_int("max_samples", max_samples, 1)
    if not _is_factory(source):
        a = _check_source(source, name)
        if max_samples is not None and len(a) > max_samples:
            raise _too_many(name, len(a), max_samples, purpose)
        return _as_matrix(a, name)
    parts, n = [], 0
    for batch in _raw_batches(source, name, DEFAULT_BATCH_SIZE):
        n += len(batch)
        if max_samples is not None and n > max_samples:
            raise _too_many(name, f"more than {max_samples}", max_samples, purpose)
        parts.append(batch)
    if not parts:
        raise ConfigError(f"{name} yielded no rows")
    return np.concatenate(parts)


def _too_many(name, n, max_samples, purpose) -> ConfigError:
    stream = ", or use linear or minibatch CKA, which stream" if "CKA" in purpose or "cka" in purpose else ""
    return ConfigError(
        f"{name} has {n} samples but {purpose} builds n x n matrices and is capped at "
        f"max_samples={max_samples}; subsample the rows or raise max_samples if memory allows "
        f"(8 * n^2 bytes per matrix){stream}")


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


# -- mergeable co-moments ---------------------------------------------------------------------------
class _Moments:
    """Centred co-moments of a pair (X, Y) of aligned row blocks, exactly mergeable (Chan et al.).

    With u_i = x_i - mean_x, v_i = y_i - mean_y, k_i = |u_i|^2, l_i = |v_i|^2 over the rows seen:
    C = sum v u^T (d_y, d_x), vx/vy the per-feature sums of u^2/v^2, k1 = sum k, l1 = sum l,
    kl = sum k l, kv = sum k v, lu = sum l u. The last three give the unbiased HSIC in feature
    space. Merging shifts each part to the common mean with the exact polynomial identities below,
    which keeps every sum centred (stable even when means dwarf the spread). Feeding (X, X) gives
    the self-moments of one layer.
    """

    FIELDS = ("n", "mx", "my", "vx", "vy", "k1", "l1", "C", "kl", "kv", "lu", "ax", "ay")

    def __init__(self):
        self.n = 0

    @classmethod
    def of_batch(cls, X: np.ndarray, Y: np.ndarray) -> _Moments:
        m = cls()
        m.n = len(X)
        m.mx = X.mean(axis=0)
        u = X - m.mx
        same = Y is X
        m.my = m.mx if same else Y.mean(axis=0)
        v = u if same else Y - m.my
        k = np.einsum("ij,ij->i", u, u)
        l = k if same else np.einsum("ij,ij->i", v, v)
        m.vx = np.einsum("ij,ij->j", u, u)
        m.vy = m.vx.copy() if same else np.einsum("ij,ij->j", v, v)
        m.k1, m.l1 = float(k.sum()), float(l.sum())
        m.C = v.T @ u
        m.kl = float(k @ l)
        m.kv = v.T @ k
        m.lu = u.T @ l
        m.ax = np.abs(X).max(axis=0)
        m.ay = m.ax if same else np.abs(Y).max(axis=0)
        return m

    def add(self, X: np.ndarray, Y: np.ndarray) -> None:
        self.merge(_Moments.of_batch(X, Y))

    def _shifted(self, d: np.ndarray, e: np.ndarray) -> dict:
        """Sums about (mx - d, my - e) instead of (mx, my)."""
        n, D, E = self.n, float(d @ d), float(e @ e)
        Cd, Cte = self.C @ d, self.C.T @ e
        return dict(
            vx=self.vx + n * d * d, vy=self.vy + n * e * e,
            k1=self.k1 + n * D, l1=self.l1 + n * E,
            C=self.C + n * np.outer(e, d),
            kl=(self.kl + 2 * float(e @ self.kv) + E * self.k1 + 2 * float(d @ self.lu)
                + 4 * float(e @ Cd) + D * self.l1 + n * D * E),
            kv=self.kv + self.k1 * e + 2 * Cd + n * D * e,
            lu=self.lu + self.l1 * d + 2 * Cte + n * E * d)

    def merge(self, other: _Moments) -> _Moments:
        """Fold `other` (rows disjoint from this state's) into this state; returns self."""
        if other.n == 0:
            return self
        if self.n == 0:
            self.load_state_dict(other.state_dict())
            return self
        n = self.n + other.n
        mx = self.mx + (other.mx - self.mx) * (other.n / n)
        my = self.my + (other.my - self.my) * (other.n / n)
        a = self._shifted(self.mx - mx, self.my - my)
        b = other._shifted(other.mx - mx, other.my - my)
        for key in a:
            setattr(self, key, a[key] + b[key])
        self.n, self.mx, self.my = n, mx, my
        self.ax, self.ay = np.maximum(self.ax, other.ax), np.maximum(self.ay, other.ay)
        return self

    def constant_x(self) -> np.ndarray:
        return self.vx <= self.n * (64 * _EPS * self.ax) ** 2

    def constant_y(self) -> np.ndarray:
        return self.vy <= self.n * (64 * _EPS * self.ay) ** 2

    def state_dict(self) -> dict:
        if self.n == 0:
            return {"n": 0}
        return {k: (np.array(getattr(self, k), copy=True) if k != "n" else self.n) for k in self.FIELDS}

    def load_state_dict(self, state: Mapping) -> None:
        self.n = int(state["n"])
        if self.n:
            for k in self.FIELDS[1:]:
                value = np.array(state[k], dtype=np.float64, copy=True)
                setattr(self, k, float(value) if value.ndim == 0 else value)

    def summary(self) -> tuple:
        """(n, ||C||_F^2, kl, k1, l1, constant_x, constant_y): all CKA needs, without the d x d matrix."""
        return (self.n, float(np.vdot(self.C, self.C)), self.kl, self.k1, self.l1,
                bool(self.constant_x().all()), bool(self.constant_y().all()))
