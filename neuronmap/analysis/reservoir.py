"""A mergeable uniform random sample of rows, for the percentiles of layers too large to hold.

Bottom-k sampling: every row gets an independent uniform random key and the sample is the `size`
rows with the smallest keys. That is a uniform sample without replacement of all rows seen; two
samples merge exactly (the smallest keys of the union), whatever the order or grouping of the
merges, so shard partials computed anywhere give the same sample; and a batch costs O(batch + size)
cheap operations, copying only the rows that enter. A caller that knows how many rows will come
(a shard task) can say so with `expect(n)`: their keys are drawn at once, and only the rows that
will be in the final sample are copied, each once. Percentiles are numpy's default ("linear").
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
from numba import njit

from ..errors import ConfigError


def _as_2d(batch: Any) -> np.ndarray:
    """(n_rows, n_features) view of a batch; rows are axis 0, the rest is flattened."""
    array = np.asarray(batch)
    if array.ndim == 1:
        return array.reshape(-1, 1)
    return array.reshape(array.shape[0], int(np.prod(array.shape[1:])))


@njit(nogil=True, cache=True)
def _move_rows(dst, slots, src, picks):  # pragma: no cover - compiled (covered via Reservoir)
    """dst[slots[k]] = src[picks[k]] for every k, row by row: one copy (numpy's fancy-indexed
    assignment gathers the rows into a temporary first, then scatters them)."""
    width = dst.shape[1]
    for k in range(len(slots)):
        target, source = slots[k], picks[k]
        for j in range(width):
            dst[target, j] = src[source, j]


def merged_bound(parts: Iterable[tuple[int, int]], size: int, chunk: int = 1 << 20) -> float:
    """The largest key of the sample merged from reservoirs `Reservoir(size, seed)` that each drew
    `n_rows` keys first (`parts`: (seed, n_rows) pairs): the size-th smallest of all those keys, or
    inf when they are no more than `size`. Pass it to each partial's `expect(n_rows, bound=...)`.

    Draws every key again (about 5 ns each), `chunk` at a time, keeping only the smallest `size` of
    each part: memory O(chunk + size * parts), whatever the parts' sizes.
    """
    smallest = []
    total = 0
    for seed, n_rows in parts:
        rng, left = np.random.default_rng(int(seed)), int(n_rows)
        total += left
        while left > 0:
            keys = rng.random(min(chunk, left))  # draws continue the same stream: the keys `expect` draws
            left -= len(keys)
            smallest.append(keys if len(keys) <= size else np.partition(keys, size - 1)[:size])
        if sum(len(k) for k in smallest) > 4 * size:
            pooled = np.concatenate(smallest)
            smallest = [np.partition(pooled, size - 1)[:size]]
    if total <= size:
        return np.inf
    pooled = np.concatenate(smallest)
    return float(np.partition(pooled, size - 1)[size - 1])


class Reservoir:
    """Mergeable uniform random sample of at most `size` rows (for percentiles of huge layers).

    Bottom-k sampling: every row seen gets an independent uniform random key, and the reservoir
    keeps the `size` rows with the smallest keys, which is a uniform sample without replacement of
    every row seen. `add(batch)` draws the batch's keys in one call and only rows whose key beats the
    current largest kept key are copied in (about size * batch / count rows per batch once full), so a
    batch costs O(batch + size) cheap operations instead of a copy of the whole sample. `merge(other)`
    keeps the smallest keys of the union, so merged reservoirs hold exactly the sample a single
    reservoir would have kept over the same keys, whatever the order or grouping of the merges.
    While no more than `size` rows were seen, the reservoir holds all of them.

    Parameters
    ----------
    size : int, default=8192
        Rows kept.
    seed : int, default=0
        Seed of the keys (results are reproducible for the same batches).

    Attributes
    ----------
    count : int
        Rows seen.
    rows : ndarray of shape (min(count, size), n_features) or None
        The sampled rows (in no particular order).
    """

    def __init__(self, size: int = 8192, seed: int = 0):
        if isinstance(size, bool) or int(size) < 1:
            raise ConfigError(f"size={size!r} must be an integer >= 1")
        self.size = int(size)
        self.seed = int(seed)
        self.rng = np.random.default_rng(seed)
        self.count = 0
        self._rows: np.ndarray | None = None  # capacity >= filled rows; grows until `size`
        self._keys = np.empty(0, dtype=np.float64)
        self._shared = False  # `_rows` is also held by a state dict: copy it before writing into it
        self._planned = np.empty(0, dtype=np.float64)  # keys drawn by `expect` for rows still to come
        self._threshold = np.inf  # rows keyed above it cannot be in the sample once the planned rows came
        self._final = 0  # rows the sample will hold once the planned rows came (its first allocation)

    @property
    def exact(self) -> bool:
        """True while the reservoir holds every row seen."""
        return self.count <= self.size and len(self._keys) == self.count

    @property
    def largest_key(self) -> float:
        """The largest key in the sample (-inf while empty): the bound a merged sample must respect."""
        return float(self._keys.max()) if len(self._keys) else -np.inf

    @property
    def rows(self) -> np.ndarray | None:
        self._check_settled()
        return None if self._rows is None else self._rows[: len(self._keys)]

    def expect(self, n_rows: int, bound: float = np.inf) -> "Reservoir":
        """Announce that the next `n_rows` rows added will come (in any batches) before the sample is read.

        Their keys are drawn now, in one call, from the same generator `add` draws from, so the keys,
        and the sample, are those `add` alone would give. With every key known, the largest key that
        can end in the sample is known too, and `add` copies only the rows keyed at or below it: each
        sampled row once (`size` rows for a shard that starts empty) instead of the first `size` rows
        and then every row that enters for a while (about size * (1 + ln(n_rows / size)) copies).
        Costs 8 bytes per announced row until they arrive. Reading the sample (`rows`, `state_dict`,
        `percentiles`, merging it elsewhere) before they all arrived raises ConfigError: it would not
        be uniform. Rows beyond the announced ones draw their keys as they come, as without `expect`.

        bound : float, default=inf
            For a partial that will be merged with others whose keys are all known in advance
            (`merged_bound`): the largest key of the merged sample. Rows keyed above it are not kept
            even while there is room, so the partial holds only its rows that end in the merged sample
            (about size * n_rows / total of them) instead of `size`: a shard's partial shrinks from
            25 MB to a few hundred KB at the default size. Such a partial is a uniform sample still,
            but it is complete only merged with the partials the bound was computed over.
        """
        if isinstance(n_rows, bool) or int(n_rows) < 0:
            raise ConfigError(f"n_rows={n_rows!r} must be an integer >= 0")
        if int(n_rows) == 0:
            return self
        self._planned = np.concatenate([self._planned, self.rng.random(int(n_rows))])
        keys = np.concatenate([self._keys, self._planned])
        threshold = np.inf
        if len(keys) > self.size:  # the size-th smallest key of the sample so far and every planned row
            threshold = float(np.partition(keys, self.size - 1)[self.size - 1])
        self._threshold = min(threshold, float(bound))
        self._final = min(self.size, int(np.count_nonzero(keys <= self._threshold)))
        return self

    def _check_settled(self) -> None:
        if len(self._planned):
            raise ConfigError(f"the reservoir still expects {len(self._planned)} rows announced with expect(); "
                              "its sample is not uniform until they are added")

    def add(self, batch: Any) -> "Reservoir":
        x = _as_2d(batch)
        if len(x) == 0:
            return self
        if len(self._planned):
            k = min(len(x), len(self._planned))
            keys, self._planned = self._planned[:k], self._planned[k:]
            picks = np.flatnonzero(keys <= self._threshold)  # the rows that will be in the sample
            self._offer(x, keys[picks], k, picks)
            if k == len(x):
                return self
            x = x[k:]
        return self._offer(x, self.rng.random(len(x)), len(x))

    def merge(self, other: "Reservoir") -> "Reservoir":
        if other.count == 0:
            return self
        if other.rows is None:  # a partial cut at a merged bound may have seen rows yet kept none
            self.count += other.count
            return self
        return self._offer(other.rows, other._keys, other.count)

    def _offer(self, rows: np.ndarray, keys: np.ndarray, seen: int, picks: np.ndarray | None = None) -> "Reservoir":
        """Keep the `size` smallest keys of the current sample and the offered rows, out of `seen` rows.

        The offered rows are `rows[picks]` (all of `rows` when `picks` is None), keyed `keys`; they
        are never gathered: each row is copied once, straight into its slot, when it enters.
        """
        if self._rows is not None and rows.shape[1] != self._rows.shape[1]:
            raise ConfigError(f"cannot add rows of {rows.shape[1]} features to a reservoir of {self._rows.shape[1]}")
        if self._rows is not None and np.result_type(self._rows.dtype, rows.dtype) != self._rows.dtype:
            self._rows, self._shared = self._rows.astype(np.result_type(self._rows.dtype, rows.dtype)), False
        self.count += int(seen)
        if picks is None:
            picks = np.arange(len(keys))
        filled = len(self._keys)
        room = self.size - filled
        if room > 0 and len(keys):  # not full: take the first `room` rows as they come (then compete for the rest)
            take = min(room, len(keys))
            self._grow(filled + take, rows)
            self._put(np.arange(filled, filled + take), rows, picks[:take])
            self._keys = np.concatenate([self._keys, keys[:take]])
            keys, picks = keys[take:], picks[take:]
        if len(keys) == 0:
            return self
        candidates = np.flatnonzero(keys < self._keys.max())  # indices: rows are copied once, on entry
        if len(candidates) == 0:
            return self
        if len(candidates) > self.size:  # only the smallest `size` candidates can enter
            candidates = candidates[np.argpartition(keys[candidates], self.size - 1)[: self.size]]
        pooled = np.concatenate([self._keys, keys[candidates]])
        kept = np.argpartition(pooled, self.size - 1)[: self.size]
        entering = candidates[kept[kept >= self.size] - self.size]
        leaving = np.ones(self.size, dtype=bool)
        leaving[kept[kept < self.size]] = False
        slots = np.flatnonzero(leaving)
        self._own()
        self._put(slots, rows, picks[entering])
        self._keys[slots] = keys[entering]
        return self

    def _put(self, slots: np.ndarray, rows: np.ndarray, picks: np.ndarray) -> None:
        """self._rows[slots] = rows[picks], one copy of each row."""
        if rows.dtype == self._rows.dtype and rows.dtype in (np.float32, np.float64) and rows.flags.c_contiguous:
            _move_rows(self._rows, slots, rows, picks)
        else:  # other dtypes, strided views, rows narrower than the sample's dtype
            self._rows[slots] = rows[picks]

    def _own(self) -> None:
        """Copy `_rows` before the first write into it while a state dict shares it."""
        if self._shared:
            self._rows = self._rows.copy()
            self._shared = False

    def _grow(self, needed: int, like: np.ndarray) -> None:
        """Make room for `needed` rows (at least twice as many, capped at `size`) of `like`'s width and dtype.

        Twice `needed`, not `needed`: a first batch of half the size or more allocates the whole
        sample at once instead of filling it in two allocations and a copy. After `expect` the first
        allocation holds the whole final sample (its row count is known), however few rows enter per batch.
        """
        dtype = like.dtype if self._rows is None else np.result_type(self._rows.dtype, like.dtype)
        if self._rows is not None and len(self._rows) >= needed and dtype == self._rows.dtype:
            self._own()
            return
        capacity = min(self.size, max(2 * max(needed, 0 if self._rows is None else len(self._rows)), self._final))
        grown = np.empty((capacity, like.shape[1]), dtype=dtype)
        if self._rows is not None:
            grown[: len(self._keys)] = self._rows[: len(self._keys)]
        self._rows, self._shared = grown, False

    def state_dict(self) -> dict[str, Any]:
        """Plain dict of the sample, its keys and the key generator's state (picklable).

        The sampled rows are handed over without a copy (25 MB per partial at the default size, a
        copy per shard on the local engine); this reservoir copies them before it next writes, so the
        dict never changes afterwards.
        """
        rows = None if self._rows is None else self.rows
        self._shared = rows is not None
        return {"size": self.size, "seed": self.seed, "count": self.count, "rows": rows,
                "keys": self._keys.copy(), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> "Reservoir":
        """Restore from `state_dict()`; the rows are shared with `state` until this reservoir writes."""
        self.size, self.seed, self.count = int(state["size"]), int(state["seed"]), int(state["count"])
        self._rows = None if state["rows"] is None else np.asarray(state["rows"])
        self._shared = self._rows is not None
        self._keys = np.array(state["keys"], dtype=np.float64, copy=True)
        self._planned, self._threshold, self._final = np.empty(0, dtype=np.float64), np.inf, 0
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = state["rng"]
        return self

    def percentiles(self, q: Iterable[float]) -> np.ndarray:
        """Percentiles (0-100) per feature: float64 array of shape (len(q), n_features)."""
        q = np.asarray(list(q), dtype=np.float64)
        if q.size == 0 or np.any((q < 0) | (q > 100)):
            raise ConfigError(f"percentiles={q.tolist()} must be a non-empty list of numbers in [0, 100]")
        if self.rows is None:
            raise ConfigError("no rows were added to the reservoir; the layer has no committed rows")
        # numpy's default ("linear") percentiles, from one contiguous sort per feature: several times
        # faster than np.percentile(axis=0), which partitions along the strided axis once per q. The
        # sort runs in the stored dtype (half the bytes of float64 for float32 rows); casting to
        # float64 is monotone, so the order statistics, and the float64 interpolation between them,
        # are the same as those of a float64 sort
        ordered = np.ascontiguousarray(self.rows.T)
        ordered.sort(axis=1)
        position = q / 100.0 * (ordered.shape[1] - 1)
        below = np.floor(position).astype(np.int64)
        above = np.minimum(below + 1, ordered.shape[1] - 1)
        low, high = ordered[:, below].astype(np.float64), ordered[:, above].astype(np.float64)
        return (low + (high - low) * (position - below)).T
