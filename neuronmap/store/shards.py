"""Shard files: one HDF5 or Parquet file per (layer, shard index), readable without neuronmap.

HDF5 shard (`part-NNNNN.h5`):
    dataset `activations`  shape (rows, *feature_shape): contiguous when uncompressed (written with one
                           pwrite at the offset HDF5 allocated), chunked by rows with gzip/lzf
    dataset `sample_id`    int64 (rows,)
    dataset `token_index`  int32 (rows,), per-token layers only
    file attrs             layer, shape, dtype, rows, samples, neuronmap_schema_version
Parquet shard (`part-NNNNN.parquet`):
    columns `sample_id` int64, [`token_index` int32], `activation` fixed_size_list<float16|32|64>
    of prod(feature_shape) values per row, C order; schema metadata `neuronmap.shape` (JSON list),
    `neuronmap.layer`, `neuronmap.dtype`.

Writers here write to the path they are given, fsync it and return its sha256 and size; making
that write atomic (temp name, rename, manifest) is the RunWriter's job.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import math
import mmap
import os
import sys
from pathlib import Path
from typing import Any, Iterator

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
        names = ", ".join(c for c in allowed if c is not None)
        raise ConfigError(f"compression={compression!r} is not supported for {format}; use one of {names}, or none")
    return compression


def _hasher():
    """A fresh sha256 (the run format's shard digest, DESIGN.md)."""
    return hashlib.sha256()


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = _hasher()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def sync_and_hash(path: str | os.PathLike, block: int = 1 << 20) -> tuple[str, int]:
    """Flush a closed file to disk and return its (hex sha256, size): writeback first, then the hash.

    The disk starts on the file (`start_writeback`) before it is read back and hashed from the page
    cache, so the fsync at the end waits only for what the hash did not cover.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        start_writeback(fd)
        digest = _hasher()
        while chunk := os.read(fd, block):
            digest.update(chunk)
        os.fsync(fd)
        return digest.hexdigest(), os.fstat(fd).st_size
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
) -> tuple[str, int]:
    """Write one shard file at `path`, fsync it; return its (hex sha256, size in bytes).

    Arrays must already be validated and cast.
    """
    if format == "hdf5" and compression is None:
        return _write_hdf5_direct(path, layer, activations, sample_ids, token_index, attrs or {})
    if format == "hdf5":
        _write_hdf5(path, layer, activations, sample_ids, token_index, compression, attrs or {})
    else:
        _write_parquet(path, layer, activations, sample_ids, token_index, compression, attrs or {})
    return sync_and_hash(path)


def _h5_attrs(f: h5py.File, layer: str, activations: np.ndarray, attrs: dict) -> None:
    f.attrs["layer"] = layer
    f.attrs["shape"] = json.dumps(list(activations.shape[1:]))
    f.attrs["dtype"] = activations.dtype.name
    for key, value in attrs.items():
        f.attrs[key] = json.dumps(value) if isinstance(value, (list, tuple, dict)) else value


def _write_hdf5_direct(path, layer, activations, sample_ids, token_index, attrs) -> tuple[str, int]:
    """An uncompressed shard: HDF5 writes only the metadata, the activation bytes go in with pwrite.

    The `activations` dataset is contiguous with its space allocated at creation and never filled,
    so after HDF5 closes the file the dataset is a hole at a known offset (`get_offset`). One pwrite
    of the array's own bytes fills it: no HDF5 type-conversion or chunk copies, no HDF5 code in the
    way of a failed write (a full disk is a plain OSError from pwrite, and HDF5 never sees it), and
    the GIL released, so the layers of a shard are written in parallel. The digest is computed from
    the file's metadata bytes (read back: a few KB) and the array in memory (the bytes just written),
    so the activations are never read back. The file is an ordinary HDF5 file: plain h5py reads it.
    """
    data = np.ascontiguousarray(activations)
    ids = np.asarray(sample_ids, dtype=np.int64)
    tokens = None if token_index is None else np.asarray(token_index, dtype=np.int32)
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    # What HDF5 itself writes (metadata, sample ids, token positions) is reserved first, so a full disk
    # fails here, before HDF5 has the file open; the activations' blocks are reserved below,
    # just before the pwrite. (Reserving them here too cost an allocation that HDF5's truncating
    # open gave straight back: more work for the filesystem's journal on every file.)
    small = ids.nbytes + (0 if tokens is None else tokens.nbytes)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644))
    _reserve(path, small + (256 << 10))
    try:
        with h5py.File(path, "w") as f:  # truncates: the file is HDF5's metadata and the dataset's hole
            _h5_attrs(f, layer, data, attrs)
            dataset = f.create_dataset("activations", shape=data.shape, dtype=data.dtype, dcpl=dcpl,
                                       track_times=False)  # same arrays -> same bytes -> same digest
            f.create_dataset("sample_id", data=ids, track_times=False)
            if tokens is not None:
                f.create_dataset("token_index", data=tokens, track_times=False)
            offset = dataset.id.get_offset() if data.size else None
    except RuntimeError as error:  # HDF5 reports failed writes (errno = 28, ...) as RuntimeError
        raise OSError(f"HDF5 write failed: {_one_line(error)}") from error
    view = memoryview(data.reshape(-1)).cast("B")
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        digest = _hasher()
        if offset is None:  # no rows: HDF5 wrote everything
            digest.update(_pread_all(fd, 0, size))
        else:
            if offset + len(view) > size:
                raise OSError(f"HDF5 allocated {size} bytes for {path}, fewer than the activations need")
            _reserve_range(fd, offset, len(view))  # the hole's blocks, so the pwrite cannot run out of space
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:done + (64 << 20)], offset + done)
            start_writeback(fd)  # the disk works while the bytes are hashed; the fsync below waits less
            digest.update(_pread_all(fd, 0, offset))
            digest.update(view)
            digest.update(_pread_all(fd, offset + len(view), size - offset - len(view)))
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest.hexdigest(), size


@functools.cache
def _sync_file_range() -> Any:
    """libc's sync_file_range (Linux), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def start_writeback(fd: int) -> None:
    """Start writing a file's dirty pages to disk now, without waiting (Linux; elsewhere nothing).

    An fsync later then only waits for what is still in flight. The kernel otherwise starts
    writeback only at the fsync, so the time spent hashing between write and fsync is lost to the
    disk: with this the per-token store runs at the speed of a raw write + fsync (benchmarks/).
    Errors are ignored: the fsync that follows reports any real one.
    """
    function = _sync_file_range()
    if function is not None:
        function(fd, 0, 0, 2)  # SYNC_FILE_RANGE_WRITE: the whole file, asynchronously


def _pread_all(fd: int, offset: int, length: int) -> bytes:
    parts, done = [], 0
    while done < length:
        part = os.pread(fd, length - done, offset + done)
        if not part:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        parts.append(part)
        done += len(part)
    return b"".join(parts)


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
            _h5_attrs(f, layer, activations, attrs)
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
    fd = os.open(path, os.O_WRONLY)
    try:
        return _reserve_range(fd, 0, size)
    finally:
        os.close(fd)


def _reserve_range(fd: int, offset: int, size: int) -> bool:
    """Allocate bytes [offset, offset + size) of an open file (False where the filesystem cannot)."""
    if not hasattr(os, "posix_fallocate") or size <= 0:
        return False
    try:
        os.posix_fallocate(fd, offset, size)
        return True
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        return False  # EOPNOTSUPP, EINVAL, ...: write without a reservation


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
        )  # flushed at close; write_shard_file syncs and hashes it


class ShardReader:
    """Reads row ranges of one shard file. Use as a context manager; rows are local to the shard.

    Reads return ordinary writable arrays (copies). With ``copy=False`` a caller that only reads
    may get read-only views of the file instead (`mapped_layout`): an uncompressed HDF5 dataset is
    stored contiguously at a known offset, so its rows can be mapped (`mmap`, pages populated
    up front) rather than copied through HDF5. Each view holds its own mapping of just its rows (its
    base owns it): it stays valid after the reader is closed, and the mapping goes when the last
    array referring to it does, so memory held is what the caller keeps alive.
    """

    def __init__(self, path: str | os.PathLike, format: str, shape: tuple[int, ...], dtype: str):
        self.path = Path(path)
        self.format = format
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self._layouts: dict[str, tuple[int, np.dtype, tuple[int, ...]] | None] = {}
        self._fd: int | None = None
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
        if self._fd is not None:  # views mapped from it keep their own mappings
            os.close(self._fd)
            self._fd = None
        if self.format == "hdf5":
            self._h5.close()
        else:
            self._pq.close()

    def mapped_layout(self, field: str) -> tuple[int, np.dtype, tuple[int, ...]] | None:
        """(byte offset, dtype, row shape) of `field` when its rows can be mapped instead of read, else None.

        Mappable: an HDF5 dataset with contiguous layout (no chunks, hence no filters), no external
        storage, its space allocated, a plain numeric dtype in native byte order, and the file long
        enough to hold all of it (a truncated file read through a mapping would kill the process
        with SIGBUS; h5py raises an error instead). Parquet shards and compressed or chunked HDF5
        datasets are never mappable.
        """
        if field in self._layouts:
            return self._layouts[field]
        layout = None
        if self.format == "hdf5" and field in self._h5:
            dataset = self._h5[field]
            found = _contiguous_layout(dataset)
            if found is not None:
                nbytes = int(np.prod(dataset.shape, dtype=np.int64)) * found[1].itemsize
                if self.path.stat().st_size >= found[0] + nbytes:
                    layout = (*found, tuple(dataset.shape[1:]))
        self._layouts[field] = layout
        return layout

    def _mapped(self, lo: int, hi: int, layout: tuple[int, np.dtype, tuple[int, ...]]) -> np.ndarray:
        """Read-only view of local rows [lo, hi) of a mappable field, backed by a mapping of those rows."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        return _map_rows(self._fd, *layout, lo, hi)

    def has(self, field: str) -> bool:
        if self.format == "hdf5":
            return field in self._h5
        column = "activation" if field == "activations" else field
        return column in self._pq.schema_arrow.names

    def iter_chunks(self, field: str, start: int, stop: int, max_rows: int, copy: bool = True) -> Iterator[np.ndarray]:
        """Yield `field` for local rows [start, stop) in order, in pieces of at most `max_rows` rows
        (Parquet: at most one row group per piece, so each group is decoded once).

        copy=False: pieces may be read-only views mapped from the file (see the class docstring),
        one mapping per piece; where the shard is not mappable they are ordinary reads.
        """
        if not self.has(field):
            raise RunFormatError(f"shard {self.path} has no {field!r}")
        try:
            if self.format == "hdf5":
                layout = None if copy else self.mapped_layout(field)
                if layout is not None:
                    for lo in range(start, stop, max_rows):
                        yield self._mapped(lo, min(stop, lo + max_rows), layout)
                    return
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
                if copy and not values.flags.writeable:  # a view of Arrow's buffers: reads give own arrays
                    values = values.copy()
                for a in range(0, len(values), max_rows):
                    yield values[a : a + max_rows]
        except (OSError, pa.ArrowException) as error:
            raise RunFormatError(f"shard {self.path} cannot be read: {_one_line(error)}; run `neuronmap runs verify`") from None

    def read(self, field: str, start: int = 0, stop: int | None = None, copy: bool = True) -> np.ndarray:
        """`field` for local rows [start, stop) as one array (copy=False: maybe a read-only mapped view)."""
        stop = self.n_rows if stop is None else stop
        pieces = list(self.iter_chunks(field, start, stop, max(1, stop - start), copy=copy))
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


_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux: fault every page in at mmap time, not one by one
# Mappings start at a multiple of 2 MiB of the file: the kernel can then map the page cache's large
# folios with 2 MiB entries (FilePmdMapped), and the statistics kernel reads the rows ~10% faster
# than through 4 KiB pages (fewer TLB misses). Costs at most 2 MiB more mapped per view.
_MAP_ALIGN = max(2 << 20, mmap.ALLOCATIONGRANULARITY)


def _contiguous_layout(dataset: h5py.Dataset) -> tuple[int, np.dtype] | None:
    """(file offset, dtype) of a dataset stored as one contiguous run of native-order numbers, else None."""
    dtype = dataset.dtype
    if dataset.chunks is not None or dataset.is_virtual or dtype.kind not in "biuf" or not dtype.isnative:
        return None
    plist = dataset.id.get_create_plist()
    if (plist.get_layout() != h5py.h5d.CONTIGUOUS or plist.get_nfilters() != 0
            or plist.get_external_count() != 0):
        return None
    offset = dataset.id.get_offset()  # None while the space is not allocated
    return None if offset is None else (int(offset), dtype)


def _map_rows(fd: int, offset: int, dtype: np.dtype, row_shape: tuple[int, ...], lo: int, hi: int) -> np.ndarray:
    """Read-only (hi - lo, *row_shape) view of rows [lo, hi) of a contiguous array at byte `offset` of `fd`.

    Only those rows' pages are mapped (from the 2 MiB boundary below them, `_MAP_ALIGN`), so a view
    holds little more of the file than it shows. The returned array's base is the mmap object: the mapping
    lives exactly as long as some array refers to it (unmapped when the last one is collected).
    """
    per_row = int(np.prod(row_shape, dtype=np.int64))
    if hi <= lo or per_row == 0:
        return np.empty((max(hi - lo, 0), *row_shape), dtype=dtype)
    begin = offset + lo * per_row * dtype.itemsize
    length = (hi - lo) * per_row * dtype.itemsize
    aligned = begin - begin % _MAP_ALIGN
    if hasattr(mmap, "MAP_SHARED"):  # POSIX: flags and prot (access= cannot be combined with MAP_POPULATE)
        mapping = mmap.mmap(fd, begin + length - aligned, flags=mmap.MAP_SHARED | _MAP_POPULATE,
                            prot=mmap.PROT_READ, offset=aligned)
    else:
        mapping = mmap.mmap(fd, begin + length - aligned, access=mmap.ACCESS_READ, offset=aligned)
    return np.frombuffer(mapping, dtype=dtype, count=(hi - lo) * per_row,
                         offset=begin - aligned).reshape((hi - lo, *row_shape))


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
