"""Shard files: one HDF5 or Parquet file per (layer, shard index), readable without neuronmap.

HDF5 shard (`part-NNNNN.h5`):
    dataset `activations`  shape (rows, *feature_shape), chunked by rows, optional gzip/lzf
    dataset `sample_id`    int64 (rows,)
    dataset `token_index`  int32 (rows,), per-token layers only
    file attrs             layer, shape, dtype, rows, samples, neuronmap_schema_version
Parquet shard (`part-NNNNN.parquet`):
    columns `sample_id` int64, [`token_index` int32], `activation` fixed_size_list<float16|32|64>
    of prod(feature_shape) values per row, C order; schema metadata `neuronmap.shape` (JSON list),
    `neuronmap.layer`, `neuronmap.dtype`.

Writers here write to the path they are given and fsync it; making that write atomic (temp name,
rename, manifest) is the RunWriter's job.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ConfigError, RunFormatError

HDF5_COMPRESSIONS = (None, "gzip", "lzf")
PARQUET_COMPRESSIONS = (None, "snappy", "gzip", "zstd", "lz4", "brotli")
CHUNK_BYTES = 1 << 20  # HDF5 chunk target: ~1 MiB of rows
ROW_GROUP_BYTES = 64 << 20  # Parquet row group target: bounds what one read holds in memory
FIELDS = ("activations", "sample_id", "token_index")


def check_compression(format: str, compression: str | None) -> str | None:
    """Normalise and validate a compression name for `format`; ConfigError naming the allowed ones."""
    if isinstance(compression, str) and compression.lower() in ("", "none"):
        compression = None
    allowed = HDF5_COMPRESSIONS if format == "hdf5" else PARQUET_COMPRESSIONS
    if compression not in allowed:
        names = ", ".join(str(c) for c in allowed)
        raise ConfigError(f"compression={compression!r} is not supported for {format}; use one of {names}")
    return compression


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a closed file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shard_file(
    path: str | os.PathLike,
    format: str,
    layer: str,
    activations: np.ndarray,
    sample_ids: np.ndarray,
    token_index: np.ndarray | None,
    compression: str | None = None,
    attrs: dict | None = None,
) -> None:
    """Write one shard file at `path` and fsync it. Arrays must already be validated and cast."""
    if format == "hdf5":
        _write_hdf5(path, layer, activations, sample_ids, token_index, compression, attrs or {})
    else:
        _write_parquet(path, layer, activations, sample_ids, token_index, compression, attrs or {})
    fsync_file(path)


def _write_hdf5(path, layer, activations, sample_ids, token_index, compression, attrs) -> None:
    """Write with HDF5's own I/O, but into space reserved up front.

    HDF5 handles a failed write badly (the error surfaces at close as RuntimeError and the library
    can crash at interpreter exit), so the file's space is reserved with posix_fallocate first: a
    full disk then fails cleanly as OSError(ENOSPC) before HDF5 opens the file. HDF5's "w" mode
    truncates, so the space is reserved again once HDF5 has the file, and the file is cut back to
    HDF5's end of allocation afterwards: the bytes equal those of an unreserved write.
    """
    rows, feature = activations.shape[0], activations.shape[1:]
    options: dict = {"track_times": False}  # same arrays -> same bytes -> same sha256
    n_chunks = 1
    if rows > 0:
        row_bytes = max(1, activations.dtype.itemsize * math.prod(feature))
        chunk_rows = max(1, min(rows, CHUNK_BYTES // row_bytes))
        n_chunks = -(-rows // chunk_rows)
        options["chunks"] = (chunk_rows, *feature)
        if compression is not None:
            options["compression"] = compression
            options["shuffle"] = True
            if compression == "gzip":
                options["compression_opts"] = 4
    ids = np.asarray(sample_ids, dtype=np.int64)
    tokens = None if token_index is None else np.asarray(token_index, dtype=np.int32)
    payload = activations.nbytes + ids.nbytes + (0 if tokens is None else tokens.nbytes)
    reserve = payload + payload // 100 + 64 * n_chunks + (256 << 10)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644))
    _reserve(path, reserve)  # a full disk fails here, before HDF5 has the file open
    try:
        with h5py.File(path, "w") as f:  # truncates, freeing the probe; reserve again under HDF5
            reserved = _reserve(path, reserve)
            f.attrs["layer"] = layer
            f.attrs["shape"] = json.dumps(list(feature))
            f.attrs["dtype"] = activations.dtype.name
            for key, value in attrs.items():
                f.attrs[key] = json.dumps(value) if isinstance(value, (list, tuple, dict)) else value
            dataset = f.create_dataset("activations", shape=activations.shape, dtype=activations.dtype, **options)
            if rows > 0:
                dataset[...] = activations
            f.create_dataset("sample_id", data=ids, track_times=False)
            if tokens is not None:
                f.create_dataset("token_index", data=tokens, track_times=False)
            f.flush()
            end = f.id.get_filesize()
    except RuntimeError as error:  # HDF5 reports failed writes (errno = 28, ...) as RuntimeError
        raise OSError(f"HDF5 write failed: {_one_line(error)}") from error
    if reserved and os.path.getsize(path) > end:
        os.truncate(path, end)
        with h5py.File(path, "r") as f:  # sanity: the cut file is whole
            if f["activations"].shape != activations.shape:
                raise OSError(f"HDF5 shard {path} is damaged after trimming reserved space")


def _reserve(path, size: int) -> bool:
    """Reserve `size` bytes for `path` (False where the filesystem cannot); ENOSPC raises OSError."""
    if not hasattr(os, "posix_fallocate"):
        return False
    fd = os.open(path, os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, size)
        return True
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        return False  # EOPNOTSUPP, EINVAL, ...: write without a reservation
    finally:
        os.close(fd)


def _write_parquet(path, layer, activations, sample_ids, token_index, compression, attrs) -> None:
    feature = activations.shape[1:]
    size = math.prod(feature)
    values = pa.array(np.ascontiguousarray(activations).reshape(-1))
    columns = {"sample_id": pa.array(np.asarray(sample_ids, dtype=np.int64))}
    if token_index is not None:
        columns["token_index"] = pa.array(np.asarray(token_index, dtype=np.int32))
    columns["activation"] = pa.FixedSizeListArray.from_arrays(values, size)
    metadata = {
        "neuronmap.layer": layer,
        "neuronmap.shape": json.dumps(list(feature)),
        "neuronmap.dtype": activations.dtype.name,
        **{f"neuronmap.{k}": json.dumps(v) for k, v in attrs.items()},
    }
    table = pa.table(columns).replace_schema_metadata(metadata)
    row_bytes = max(1, activations.dtype.itemsize * size)
    stats = [c for c in ("sample_id", "token_index") if c in columns]
    with open(path, "wb") as fh:
        pq.write_table(
            table, fh, row_group_size=max(1, ROW_GROUP_BYTES // row_bytes), compression=compression or "none",
            use_dictionary=False, write_statistics=stats,
        )
        fh.flush()
        os.fsync(fh.fileno())


class ShardReader:
    """Reads row ranges of one shard file. Use as a context manager; rows are local to the shard."""

    def __init__(self, path: str | os.PathLike, format: str, shape: tuple[int, ...], dtype: str):
        self.path = Path(path)
        self.format = format
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        try:
            if format == "hdf5":
                self._h5 = h5py.File(self.path, "r")
                self.n_rows = int(self._h5["activations"].shape[0])
            else:
                self._pq = pq.ParquetFile(self.path)
                meta = self._pq.metadata
                self.n_rows = int(meta.num_rows)
                sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
                self._group_starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        except (OSError, KeyError, pa.ArrowException) as error:
            raise RunFormatError(f"shard {self.path} cannot be read: {_one_line(error)}; run `neuronmap runs verify`") from None

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.format == "hdf5":
            self._h5.close()
        else:
            self._pq.close()

    def has(self, field: str) -> bool:
        if self.format == "hdf5":
            return field in self._h5
        column = "activation" if field == "activations" else field
        return column in self._pq.schema_arrow.names

    def iter_chunks(self, field: str, start: int, stop: int, max_rows: int) -> Iterator[np.ndarray]:
        """Yield `field` for local rows [start, stop) in order, in pieces of at most `max_rows` rows
        (Parquet: at most one row group per piece, so each group is decoded once)."""
        if not self.has(field):
            raise RunFormatError(f"shard {self.path} has no {field!r}")
        try:
            if self.format == "hdf5":
                dataset = self._h5[field]
                for lo in range(start, stop, max_rows):
                    yield dataset[lo : min(stop, lo + max_rows)]
                return
            column = "activation" if field == "activations" else field
            starts = self._group_starts
            first = int(np.searchsorted(starts, start, side="right")) - 1
            for group in range(max(first, 0), len(starts) - 1):
                g0, g1 = int(starts[group]), int(starts[group + 1])
                if g0 >= stop:
                    break
                lo, hi = max(start, g0), min(stop, g1)
                if lo >= hi:
                    continue
                table = self._pq.read_row_group(group, columns=[column])
                values = self._column_to_numpy(table.column(column).slice(lo - g0, hi - lo))
                for a in range(0, len(values), max_rows):
                    yield values[a : a + max_rows]
        except (OSError, pa.ArrowException) as error:
            raise RunFormatError(f"shard {self.path} cannot be read: {_one_line(error)}; run `neuronmap runs verify`") from None

    def read(self, field: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """`field` for local rows [start, stop) as one array."""
        stop = self.n_rows if stop is None else stop
        pieces = list(self.iter_chunks(field, start, stop, max(1, stop - start)))
        if pieces:
            return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
        return self._empty(field)

    def _empty(self, field: str) -> np.ndarray:
        if field == "activations":
            return np.empty((0, *self.shape), dtype=self.dtype)
        return np.empty((0,), dtype=np.int64 if field == "sample_id" else np.int32)

    def _column_to_numpy(self, column: pa.ChunkedArray) -> np.ndarray:
        array = column.combine_chunks()
        if pa.types.is_fixed_size_list(array.type):
            flat = array.flatten().to_numpy(zero_copy_only=False)
            return flat.reshape((len(array), *self.shape))
        return array.to_numpy(zero_copy_only=False)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
