"""Top-k activating rows per neuron, streamed over a layer's batches (memory O(k x neurons + batch)).

`TopActivations` keeps, for each chosen neuron (column), the k largest values seen so far and the rows
they came from. Ties are broken by the lower row, so the result equals a stable ``np.argsort(-x,
axis=0)[:k]`` over the whole array whatever the batch boundaries. Batches arrive in row order; a value
equal to the current k-th best comes from a later row and cannot enter, so after the first batches most
batches are skipped after one comparison. States of disjoint row ranges merge (`merge`) into the state
of their union, so shards can be ranked in parallel.

Pure numpy, no I/O; the `top-activations` analysis (`neuronmap.analysis.builtin.concepts`) feeds it
from `open_run(...).iter_batches` and adds prompt text and token context.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import ConfigError


class TopActivations:
    """Streaming top-k values and rows of selected columns.

    Parameters
    ----------
    k : int
        Rows kept per column.
    columns : sequence of int, optional
        Column indices of the batches to rank (default: every column of the first batch).

    Attributes
    ----------
    values_ : ndarray of shape (n_columns, k)
        Largest values per column, descending (-inf where fewer than k rows were seen).
    rows_ : ndarray of shape (n_columns, k)
        Their rows (-1 where fewer than k rows were seen).
    """

    def __init__(self, k: int, columns: Sequence[int] | None = None) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"k={k!r} must be an integer >= 1")
        self.k = int(k)
        self.columns = None if columns is None else np.asarray(columns, dtype=np.int64)
        self.values_: np.ndarray | None = None
        self.rows_: np.ndarray | None = None
        self.n_seen = 0
        self.n_nan = 0

    def _init(self, n_columns: int) -> None:
        self.values_ = np.full((n_columns, self.k), -np.inf)
        self.rows_ = np.full((n_columns, self.k), -1, dtype=np.int64)

    def add(self, batch: np.ndarray, first_row: int) -> "TopActivations":
        """Rank the rows ``first_row .. first_row + len(batch) - 1`` of `batch` (rows, n_features)."""
        batch = np.asarray(batch)
        batch = batch.reshape(len(batch), -1)
        if self.columns is not None:
            if len(self.columns) and self.columns.max() >= batch.shape[1]:
                raise ConfigError(f"neuron {int(self.columns.max())} is out of range: the layer has {batch.shape[1]} "
                                  f"neurons (0..{batch.shape[1] - 1})")
            batch = batch[:, self.columns]
        values = batch.astype(np.float64, copy=False)
        if self.values_ is None:
            self._init(values.shape[1])
        nan = np.isnan(values)
        if nan.any():
            self.n_nan += int(nan.sum())
            values = np.where(nan, -np.inf, values)
        self.n_seen += len(values)
        if not len(values):
            return self
        kth = self.values_[:, -1]
        enters = values > kth[None, :]  # later rows lose ties, so only strictly larger values can enter
        if not enters.any():
            return self
        cols = np.flatnonzero(enters.any(axis=0))
        rows = np.flatnonzero(enters[:, cols].any(axis=1))
        cand_values = np.concatenate([self.values_[cols].T, values[np.ix_(rows, cols)]])
        cand_rows = np.concatenate([self.rows_[cols].T,
                                    np.broadcast_to((rows + first_row)[:, None], (len(rows), len(cols)))])
        self._keep(cols, cand_values, cand_rows)
        return self

    def _keep(self, cols: np.ndarray, cand_values: np.ndarray, cand_rows: np.ndarray) -> None:
        """Best k of (candidates, columns) arrays by (value desc, row asc), written into `cols`."""
        order_rows = np.where(cand_rows < 0, np.iinfo(np.int64).max, cand_rows)
        order = np.lexsort((order_rows, -cand_values), axis=0)[: self.k]
        self.values_[cols] = np.take_along_axis(cand_values, order, axis=0).T
        self.rows_[cols] = np.take_along_axis(cand_rows, order, axis=0).T

    def merge(self, other: "TopActivations") -> "TopActivations":
        """Fold in the state of other rows (any order): the result is that of all rows together."""
        if other.values_ is None:
            return self
        if self.values_ is None:
            self._init(other.values_.shape[0])
        if other.values_.shape != self.values_.shape:
            raise ValueError("cannot merge top-k states of different shapes")
        cols = np.arange(self.values_.shape[0])
        self._keep(cols, np.concatenate([self.values_.T, other.values_.T]),
                   np.concatenate([self.rows_.T, other.rows_.T]))
        self.n_seen += other.n_seen
        self.n_nan += other.n_nan
        return self

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(values, rows), each (n_columns, min(k, rows seen)), best first."""
        if self.values_ is None:
            raise ConfigError("no rows were ranked: the layer has no committed rows")
        keep = min(self.k, self.n_seen)
        return self.values_[:, :keep].copy(), self.rows_[:, :keep].copy()


def top_activations(batches, k: int, columns: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(values, rows) of the k largest values per column over an iterable of (rows, n_features) batches."""
    state = TopActivations(k, columns)
    row = 0
    for batch in batches:
        state.add(batch, row)
        row += len(batch)
    return state.result()


def parse_neurons(specs: Sequence[str | int] | str | int | None, layers: Sequence[str]) -> dict[str, list[int] | None]:
    """``["blocks.3:17", "blocks.3:5", 2]`` -> {layer: [units] | None (all)} over the selected `layers`.

    A bare index applies to every selected layer; ``LAYER:I`` to that layer only (it must be selected);
    no specs at all: every neuron of every layer.
    """
    from ..errors import UnknownLayerError

    if specs is None or (isinstance(specs, (list, tuple)) and not specs):
        return {layer: None for layer in layers}
    if isinstance(specs, (str, int)):
        specs = [specs]
    chosen: dict[str, list[int]] = {}
    for spec in specs:
        text = str(spec).strip()
        layer, sep, unit = text.rpartition(":")
        if not sep:
            layer, unit = "", text
        try:
            index = int(unit)
        except ValueError:
            raise ConfigError(f"neuron {text!r} must be LAYER:INDEX (e.g. blocks.3:17) or an index") from None
        if index < 0:
            raise ConfigError(f"neuron {text!r}: index {index} must be >= 0")
        targets = list(layers) if not layer else [layer]
        for name in targets:
            if name not in layers:
                raise UnknownLayerError(f"neuron {text!r} names layer {name!r}, which is not selected; selected layers: "
                                        f"{', '.join(layers)} (use --layers or a layer of the run)")
            chosen.setdefault(name, [])
            if index not in chosen[name]:
                chosen[name].append(index)
    return {layer: chosen[layer] for layer in layers if layer in chosen}
