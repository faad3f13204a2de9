"""Reading runs: `open_run(path) -> Run`, arrays stitched across shards in row order.

Only shards listed in the manifest are read, so a run that is still being written (or was resumed)
is read consistently: what the manifest lists is whole on disk. `iter_batches` reads shard slices
(HDF5 row slices, Parquet row groups) and never holds the whole layer.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import pandas as pd

from ..errors import ConfigError, RunFormatError
from .manifest import PROMPTS_NAME, LayerInfo, Manifest, ShardRecord, load_manifest
from .shards import ShardReader


PROMPTS_FIX = "the prompt table is damaged: restore it, or extract the run again with --overwrite"


class Run:
    """A run on disk. Build it with `open_run(path)`.

    Attributes
    ----------
    path : Path
        The run folder.
    manifest : Manifest
        The parsed `manifest.json` (as it was when the run was opened).
    """

    def __init__(self, path: str | os.PathLike, manifest: Manifest):
        self.path = Path(path)
        self.manifest = manifest

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, status={self.manifest.status}, layers={len(self.layers)})"

    @property
    def layers(self) -> list[str]:
        """Layer names, in the order they were requested."""
        return list(self.manifest.layers)

    @property
    def status(self) -> str:
        return self.manifest.status

    @property
    def format(self) -> str:
        return self.manifest.format

    def layer_info(self, layer: str) -> LayerInfo:
        """Shape, dtype, kind and per_token of `layer` (UnknownLayerError lists the run's layers)."""
        return self.manifest.layer(layer)

    def shape(self, layer: str) -> tuple[int, ...]:
        """Feature shape of one row of `layer` (rows excluded)."""
        return tuple(self.layer_info(layer).shape)

    def dtype(self, layer: str) -> np.dtype:
        return np.dtype(self.layer_info(layer).dtype)

    def n_rows(self, layer: str) -> int:
        """Rows of `layer`: n_tokens for per-token layers, else n_samples."""
        expected = self.manifest.expected_rows(layer)
        return expected if expected is not None else sum(s.n_rows for s in self.manifest.shards_of(layer))

    def shards(self, layer: str) -> list[ShardRecord]:
        """Committed shards of `layer`, in row order."""
        return self.manifest.shards_of(layer)

    def check_intact(self, layers: list[str] | None = None) -> None:
        """Raise RunFormatError when a shard of `layers` (default: all) is missing, resized or fails its
        sha256: reads that copy data out of the run (export, conversion) call this first, at the cost
        of reading the shards once more (from the page cache, for the read that follows)."""
        from .verify import require_intact

        require_intact(self.path, [shard for layer in (layers or self.layers) for shard in self.shards(layer)])

    @functools.cached_property
    def prompts(self) -> pd.DataFrame:
        """prompts.parquet: `sample_id`, `text` and any label/metadata columns."""
        path = self.path / PROMPTS_NAME
        if not path.is_file():
            raise RunFormatError(f"run {self.path} has no {PROMPTS_NAME}; the run is incomplete or corrupt")
        try:
            return pd.read_parquet(path)
        except Exception as error:  # pyarrow raises several types for a corrupt file
            raise RunFormatError(f"cannot read {path}: {' '.join(str(error).split()).rstrip('.')}; {PROMPTS_FIX}") from None

    @functools.cached_property
    def prompt_columns(self) -> list[str]:
        """Column names of prompts.parquet, read from its schema alone.

        Checking a `--labels` name must not load the whole prompt table: on a run of a million
        prompts that read costs more than some analyses it guards.
        """
        import pyarrow.parquet as pq

        path = self.path / PROMPTS_NAME
        if not path.is_file():
            raise RunFormatError(f"run {self.path} has no {PROMPTS_NAME}; the run is incomplete or corrupt")
        try:
            return list(pq.read_schema(path).names)
        except Exception as error:  # pyarrow raises several types for a corrupt file
            raise RunFormatError(f"cannot read {path}: {' '.join(str(error).split()).rstrip('.')}; {PROMPTS_FIX}") from None

    def array(self, layer: str, rows: tuple[int, int] | slice | None = None) -> np.ndarray:
        """Activations of `layer` as one ndarray of shape (n_rows, *shape), stitched in row order."""
        start, end = self._rows(layer, rows)
        out = np.empty((end - start, *self.shape(layer)), dtype=self.dtype(layer))
        self._fill(out, layer, "activations", start, end)
        return out

    def iter_batches(self, layer: str, rows: tuple[int, int] | slice | None = None,
                     batch_size: int = 4096, copy: bool = True) -> Iterator[np.ndarray]:
        """Yield `layer` in row order as arrays of `batch_size` rows (the last may be shorter).

        Reads one shard slice at a time; memory stays O(batch_size), whatever the layer's size.

        copy=False is for callers that only read each batch (the `stats` analysis): a batch may
        then be a read-only view mapped from an uncompressed HDF5 shard instead of a copy read
        through HDF5 (`ShardReader`); it stays valid as long as it is referenced, and holds the
        mapping of its own rows only. Other shards (compressed, chunked, Parquet), batches that
        straddle two shards, and runs whose reads go through an override of `_iter_field` (remote
        runs) still give ordinary arrays.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be an integer >= 1")
        start, end = self._rows(layer, rows)
        pending: list[np.ndarray] = []
        have = 0
        if copy or type(self)._iter_field is not Run._iter_field:
            chunks = self._iter_field(layer, "activations", start, end, int(batch_size))
        else:
            chunks = self._iter_field(layer, "activations", start, end, int(batch_size), copy=False)
        for chunk in chunks:
            while len(chunk):
                take = min(batch_size - have, len(chunk))
                pending.append(chunk[:take])
                chunk, have = chunk[take:], have + take
                if have == batch_size:
                    yield pending[0] if len(pending) == 1 else np.concatenate(pending)
                    pending, have = [], 0
        if pending:
            yield pending[0] if len(pending) == 1 else np.concatenate(pending)

    def sample_ids(self, layer: str, rows: tuple[int, int] | slice | None = None) -> np.ndarray:
        """int64 sample_id of every row of `layer` (matches prompts.sample_id)."""
        start, end = self._rows(layer, rows)
        out = np.empty(end - start, dtype=np.int64)
        self._fill(out, layer, "sample_id", start, end)
        return out

    def token_index(self, layer: str, rows: tuple[int, int] | slice | None = None) -> np.ndarray:
        """int32 position of every row's token in its prompt (per-token layers only)."""
        if not self.layer_info(layer).per_token:
            raise ConfigError(f"layer {layer} is stored per sample (pooling={self.manifest.pooling}); it has no token_index")
        start, end = self._rows(layer, rows)
        out = np.empty(end - start, dtype=np.int32)
        self._fill(out, layer, "token_index", start, end)
        return out

    # -- internals ---------------------------------------------------------------------------------
    def _rows(self, layer: str, rows: tuple[int, int] | slice | None) -> tuple[int, int]:
        total = self.n_rows(layer)
        if rows is None:
            return 0, total
        if isinstance(rows, slice):
            if rows.step not in (None, 1):
                raise ConfigError(f"rows={rows!r}: only contiguous row ranges can be read")
            start, end, _ = rows.indices(total)
        else:
            try:
                start, end = (int(v) for v in rows)
            except (TypeError, ValueError):
                raise ConfigError(f"rows={rows!r} must be a (start, end) pair, a slice or None") from None
        if not 0 <= start <= end <= total:
            raise ConfigError(f"rows=[{start}, {end}) must lie within [0, {total}) of layer {layer}")
        return start, end

    def _fill(self, out: np.ndarray, layer: str, field: str, start: int, end: int) -> None:
        position = 0
        for chunk in self._iter_field(layer, field, start, end, max(1, end - start)):
            out[position : position + len(chunk)] = chunk
            position += len(chunk)

    def _iter_field(self, layer: str, field: str, start: int, end: int, max_rows: int,
                    copy: bool = True) -> Iterator[np.ndarray]:
        """Yield `field` for rows [start, end) in order; RunFormatError on rows no shard holds.

        copy=False: pieces may be read-only views mapped from the shard files (`ShardReader.iter_chunks`).
        """
        info = self.layer_info(layer)
        position = start
        for shard in self.manifest.shards_of(layer):
            lo, hi = shard.rows
            if hi <= position or lo >= end or lo == hi:
                continue
            if lo > position:
                break
            with ShardReader(self.path / shard.path, self.format, tuple(info.shape), info.dtype) as reader:
                if reader.n_rows != shard.n_rows:
                    raise RunFormatError(f"shard {shard.path} has {reader.n_rows} rows, the manifest says "
                                         f"{shard.n_rows}; run `neuronmap runs verify`")
                stop = min(end, hi)
                yield from reader.iter_chunks(field, position - lo, stop - lo, max_rows, copy=copy)
            position = stop
        if position < end:
            raise RunFormatError(f"rows [{position}, {end}) of layer {layer} are not in any committed shard "
                                 f"(run status: {self.manifest.status}); resume the extraction to fill them")


def open_run(path: str | os.PathLike | Run, require_complete: bool = False) -> Run:
    """Open the run at `path` (RunFormatError if it is missing, has no manifest or a corrupt one).

    With `require_complete=True` a running or failed run raises RunFormatError too.
    """
    if isinstance(path, Run):
        run = path
    else:
        from .remote import is_remote

        if is_remote(path):  # s3://bucket/prefix: files fetched on first read, sha256 checked
            from .remote import open_remote_run

            return open_remote_run(path, require_complete=require_complete)
        run = Run(path, load_manifest(path))
    if require_complete and run.manifest.status != "complete":
        detail = f": {run.manifest.error}" if run.manifest.error else ""
        raise RunFormatError(f"run {run.path} is {run.manifest.status}{detail}; re-run the same extract command to resume it")
    return run


def virtual_dataset(run: Run | str | os.PathLike, layer: str, out_path: str | os.PathLike) -> Path:
    """Write an HDF5 file whose datasets `activations`, `sample_id` (and `token_index`) are virtual
    views stitching `layer`'s HDF5 shards, so plain h5py sees one (n_rows, *shape) dataset.

    The file refers to the shards by absolute path: move the run and it must be rebuilt.
    """
    run = open_run(run)
    if run.format != "hdf5":
        raise ConfigError(f"virtual datasets need an hdf5 run; {run.path} is {run.format} (convert it with convert_run)")
    info = run.layer_info(layer)
    total = run.n_rows(layer)
    shards = run.shards(layer)
    covered = 0
    for shard in shards:
        if shard.rows[0] != covered:
            break
        covered = shard.rows[1]
    if covered != total:
        raise RunFormatError(f"layer {layer} has rows [{covered}, {total}) in no shard; a virtual dataset needs all rows")
    fields = [("activations", (total, *info.shape), info.dtype), ("sample_id", (total,), "int64")]
    if info.per_token:
        fields.append(("token_index", (total,), "int32"))
    out_path = Path(out_path)
    with h5py.File(out_path, "w") as f:
        f.attrs["layer"] = layer
        f.attrs["run"] = str(run.path.resolve())
        for name, shape, dtype in fields:
            layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
            for shard in shards:
                if shard.n_rows == 0:
                    continue
                source = h5py.VirtualSource(str((run.path / shard.path).resolve()), name,
                                            shape=(shard.n_rows, *shape[1:]))
                layout[shard.rows[0] : shard.rows[1]] = source
            f.create_virtual_dataset(name, layout)
    return out_path
