"""What an analysis function receives: a picklable view of the rows of one layer, a pair, or a run.

Each input holds the run's path and the manifest snapshot the runner saw, the row ranges to analyse
(the committed rows: all of them for a complete run) and the label column's name. Data is read lazily
and in the worker that runs the analysis, so an input crosses a process (a Ray task) as a few hundred
bytes. Rows are addressed by *position*: 0..n_rows-1 over the concatenated ranges.

Arrays are 2-D (n_rows, n_features): a layer whose rows have several dimensions (attention patterns,
(heads, seq)) is flattened in C order. float16 layers are read as float32.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from ..errors import ConfigError
from ..store import Manifest, Run

Ranges = tuple[tuple[int, int], ...]


def merge_ranges(ranges: Sequence[tuple[int, int]]) -> Ranges:
    """Sorted, non-overlapping, adjacent ones joined; empty ranges dropped."""
    out: list[list[int]] = []
    for start, end in sorted((int(a), int(b)) for a, b in ranges if b > a):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return tuple((a, b) for a, b in out)


def intersect_ranges(first: Ranges, second: Ranges) -> Ranges:
    out = []
    for a0, a1 in first:
        for b0, b1 in second:
            lo, hi = max(a0, b0), min(a1, b1)
            if hi > lo:
                out.append((lo, hi))
    return merge_ranges(out)


@dataclass
class LayerInput:
    """Rows `ranges` of `layer` in the run at `run_path` (as its `manifest` listed them).

    Attributes
    ----------
    layer : str
    ranges : tuple of (start, end)
        Layer rows analysed, sorted and disjoint.
    labels_column : str or None
        prompts.parquet column giving each row's label (per-token rows take their sample's label).
    batch_size : int
        Rows per batch of `iter_batches`.
    """

    run_path: Path
    manifest: Manifest
    layer: str
    ranges: Ranges
    labels_column: str | None = None
    batch_size: int = 4096
    partition: tuple[tuple[int, int], ...] | None = field(default=None, repr=False)
    _run: Run | None = field(default=None, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_run"] = None  # the run caches prompts; reopen in the worker
        return state

    @property
    def run(self) -> Run:
        if self._run is None:
            self._run = Run(self.run_path, self.manifest)
        return self._run

    @property
    def n_rows(self) -> int:
        return sum(end - start for start, end in self.ranges)

    @property
    def n_rows_total(self) -> int:
        return self.run.n_rows(self.layer)

    @property
    def n_features(self) -> int:
        return int(np.prod(self.manifest.layer(self.layer).shape))

    @property
    def dtype(self) -> np.dtype:
        stored = np.dtype(self.manifest.layer(self.layer).dtype)
        return np.dtype(np.float32) if stored == np.float16 else stored

    def shard_inputs(self) -> list["LayerInput"]:
        """One input per committed shard (its part of `ranges`), in row order.

        Each carries `partition`: (first row, rows) of every part, so a shard task can know the whole
        it will be merged into (the `stats` reservoir keeps only rows the merged sample will hold).
        """
        parts = []
        for shard in self.run.shards(self.layer):
            part = intersect_ranges(self.ranges, ((shard.rows[0], shard.rows[1]),))
            if part:
                parts.append(part)
        partition = tuple((part[0][0], sum(end - start for start, end in part)) for part in parts)
        return [LayerInput(self.run_path, self.manifest, self.layer, part, self.labels_column, self.batch_size,
                           partition) for part in parts]

    def iter_batches(self, batch_size: int | None = None) -> Iterator[np.ndarray]:
        """Yield (rows, n_features) arrays over `ranges` in row order; memory O(batch_size)."""
        size = int(batch_size or self.batch_size)
        for start, end in self.ranges:
            for batch in self.run.iter_batches(self.layer, rows=(start, end), batch_size=size):
                yield batch.reshape(len(batch), -1).astype(self.dtype, copy=False)

    def array(self, max_rows: int | None = None) -> np.ndarray:
        """All rows as one (n_rows, n_features) array; ConfigError above `max_rows` (a memory guard)."""
        if max_rows is not None and self.n_rows > max_rows:
            raise ConfigError(f"layer {self.layer} has {self.n_rows} rows, more than max_rows={max_rows} this "
                              "analysis loads into memory; sample it or raise the limit")
        parts = [self.run.array(self.layer, rows=r).reshape(r[1] - r[0], -1) for r in self.ranges]
        if not parts:
            return np.empty((0, self.n_features), dtype=self.dtype)
        return np.concatenate(parts).astype(self.dtype, copy=False)

    def sample_positions(self, max_rows: int | None, seed: int = 0) -> np.ndarray:
        """Sorted positions of a seeded uniform sample of at most `max_rows` rows (all rows if fewer)."""
        n = self.n_rows
        if max_rows is None or n <= max_rows:
            return np.arange(n, dtype=np.int64)
        return np.sort(np.random.default_rng(seed).choice(n, int(max_rows), replace=False)).astype(np.int64)

    def take(self, positions: np.ndarray) -> np.ndarray:
        """Rows at sorted `positions`, (len(positions), n_features); reads batch by batch."""
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) == self.n_rows:
            return self.array()
        out = np.empty((len(positions), self.n_features), dtype=self.dtype)
        offset = filled = 0
        for batch in self.iter_batches():
            stop = offset + len(batch)
            lo, hi = np.searchsorted(positions, [offset, stop])
            out[filled : filled + hi - lo] = batch[positions[lo:hi] - offset]
            filled += hi - lo
            offset = stop
            if filled == len(positions):
                break
        return out

    def sample(self, max_rows: int | None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(rows, positions): a seeded sample of at most `max_rows` rows and where they are."""
        positions = self.sample_positions(max_rows, seed)
        return self.take(positions), positions

    def capped_sample(self, max_rows: int, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
        """`sample(max_rows, seed)`, warning that `what` used a sample when the layer has more rows."""
        x, positions = self.sample(max_rows, seed)
        if len(positions) < self.n_rows:
            warnings.warn(f"{what} of {self.layer} used a seeded sample of {len(positions)} of {self.n_rows} rows "
                          f"(max_samples={max_rows})", UserWarning, stacklevel=2)
        return x, positions

    def point_table(self, positions: np.ndarray, columns: dict[str, np.ndarray]) -> pd.DataFrame:
        """Per-row table: sample_id, row (in the layer), `columns`, and label when a label column is set."""
        frame = pd.DataFrame({"sample_id": self.sample_ids(positions), "row": self.layer_rows(positions), **columns})
        labels = self.labels(positions)
        if labels is not None:
            frame["label"] = labels
        return frame

    def layer_rows(self, positions: np.ndarray | None = None) -> np.ndarray:
        """Layer row index of each position (all positions when None)."""
        rows = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in self.ranges]) if self.ranges \
            else np.empty(0, dtype=np.int64)
        return rows if positions is None else rows[np.asarray(positions, dtype=np.int64)]

    def sample_ids(self, positions: np.ndarray | None = None) -> np.ndarray:
        """sample_id of each position (matches prompts.parquet's sample_id)."""
        ids = np.concatenate([self.run.sample_ids(self.layer, rows=r) for r in self.ranges]) if self.ranges \
            else np.empty(0, dtype=np.int64)
        return ids if positions is None else ids[np.asarray(positions, dtype=np.int64)]

    def labels(self, positions: np.ndarray | None = None) -> np.ndarray | None:
        """Label of each position from `labels_column` (None when no column was asked for)."""
        if self.labels_column is None:
            return None
        prompts = self.run.prompts
        lookup = dict(zip(prompts["sample_id"].to_numpy().tolist(), prompts[self.labels_column].to_numpy()))
        ids = self.sample_ids(positions)
        values = np.asarray([lookup[int(i)] for i in ids])
        return values.astype(str) if values.dtype == object else values


@dataclass
class PairInput:
    """Two layers over the same rows (`first.ranges == second.ranges`): the unit of "layer_pair" analyses."""

    first: LayerInput
    second: LayerInput

    @property
    def layers(self) -> tuple[str, str]:
        return self.first.layer, self.second.layer

    @property
    def n_rows(self) -> int:
        return self.first.n_rows

    def iter_batches(self, batch_size: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield aligned (rows_first, rows_second) batches."""
        return zip(self.first.iter_batches(batch_size), self.second.iter_batches(batch_size))


@dataclass
class RunInput:
    """Several layers of one run: the unit of "run" analyses. `layers[name]` is that layer's input."""

    run_path: Path
    manifest: Manifest
    layers: dict[str, LayerInput]
    labels_column: str | None = None

    @property
    def run(self) -> Run:
        return Run(self.run_path, self.manifest)


def labels_for(data: Any, positions: np.ndarray | None = None) -> np.ndarray | None:
    """Labels of a LayerInput, PairInput (first layer's rows) or RunInput (first layer's rows)."""
    if isinstance(data, PairInput):
        data = data.first
    elif isinstance(data, RunInput):
        data = next(iter(data.layers.values()))
    return data.labels(positions)
