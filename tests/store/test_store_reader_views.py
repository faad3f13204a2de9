"""Read-only mapped views of uncompressed HDF5 shards (`copy=False`), against plain h5py and the copying reads."""

from __future__ import annotations

import gc
import mmap
import sys

import h5py
import numpy as np
import pytest

from neuronmap.store import open_run
from neuronmap.store.shards import ShardReader, write_shard_file
from storetest_util import LAYERS, write_run


def _mapped_bytes(path) -> int:
    """Bytes of `path` this process has mapped now (Linux /proc/self/maps)."""
    total = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith(str(path)):
                lo, hi = line.split()[0].split("-")
                total += int(hi, 16) - int(lo, 16)
    return total


def _base_is_mapping(array: np.ndarray) -> bool:
    base = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if isinstance(base, memoryview):  # np.frombuffer keeps a memoryview of the buffer
        base = base.obj
    return isinstance(base, mmap.mmap)


@pytest.mark.parametrize("per_token,dtype", [(False, "float32"), (True, "float16"), (False, "float64")])
def test_views_equal_plain_h5py_and_are_read_only(tmp_path, per_token, dtype):
    written = write_run(tmp_path / "run", per_token=per_token, dtype=dtype)
    run = open_run(tmp_path / "run")
    for layer, shape in LAYERS.items():
        for shard in run.shards(layer):
            with h5py.File(run.path / shard.path, "r") as f:
                expected = f["activations"][...]
                ids = f["sample_id"][...]
            with ShardReader(run.path / shard.path, "hdf5", tuple(shape), dtype) as reader:
                assert reader.mapped_layout("activations") is not None
                view = reader.read("activations", copy=False)
                middle = reader.read("activations", 1, reader.n_rows - 1, copy=False)
                copied = reader.read("activations")
                mapped_ids = reader.read("sample_id", copy=False)
            # the views outlive the reader: each holds its own mapping
            assert view.dtype == expected.dtype == np.dtype(dtype) and view.shape == expected.shape
            np.testing.assert_array_equal(view, expected)
            np.testing.assert_array_equal(middle, expected[1:-1])
            np.testing.assert_array_equal(mapped_ids, ids)
            assert not view.flags.writeable and _base_is_mapping(view)
            with pytest.raises(ValueError):
                view[0] = 0
            with pytest.raises(ValueError):
                view.setflags(write=True)
            assert copied.flags.writeable and not _base_is_mapping(copied)
            np.testing.assert_array_equal(copied, expected)
        np.testing.assert_array_equal(np.concatenate(list(run.iter_batches(layer, copy=False))), written.arrays[layer])


@pytest.mark.parametrize("rows,batch_size", [(None, 2), (None, 3), ((1, 6), 2), ((2, 7), 4), ((0, 7), 100)])
def test_iter_batches_views_equal_copies_and_public_reads_stay_writable(tmp_path, rows, batch_size):
    written = write_run(tmp_path / "run")  # 7 rows in shards [0, 3), [3, 6), [6, 7)
    run = open_run(tmp_path / "run")
    layer = "blocks.0"
    lo, hi = (0, 7) if rows is None else rows
    views = list(run.iter_batches(layer, rows=rows, batch_size=batch_size, copy=False))
    copies = list(run.iter_batches(layer, rows=rows, batch_size=batch_size))
    assert [len(v) for v in views] == [len(c) for c in copies]
    for view, copy in zip(views, copies):
        np.testing.assert_array_equal(view, copy)
        assert copy.flags.writeable and not _base_is_mapping(copy)
        # inside one shard a batch is a mapped view; one straddling two shards is stitched (a new array)
        assert _base_is_mapping(view) != view.flags.writeable
    assert any(_base_is_mapping(v) for v in views) == (batch_size < hi - lo)  # one batch of all rows: stitched
    np.testing.assert_array_equal(np.concatenate(views), written.arrays[layer][lo:hi])
    whole = run.array(layer)
    assert whole.flags.writeable and not _base_is_mapping(whole)


@pytest.mark.parametrize("fmt,compression", [("hdf5", "gzip"), ("hdf5", "lzf"), ("parquet", None)])
def test_compressed_chunked_and_parquet_shards_fall_back_to_ordinary_reads(tmp_path, fmt, compression):
    written = write_run(tmp_path / "run", format=fmt, compression=compression)
    run = open_run(tmp_path / "run")
    for layer, shape in LAYERS.items():
        for shard in run.shards(layer):
            with ShardReader(run.path / shard.path, fmt, tuple(shape), "float32") as reader:
                assert reader.mapped_layout("activations") is None
                got = reader.read("activations", copy=False)
                assert not _base_is_mapping(got)
                np.testing.assert_array_equal(got, reader.read("activations"))
                # copy=False: Parquet pieces may be pyarrow's read-only buffers; ordinary reads own theirs
                assert got.flags.writeable == (fmt == "hdf5")
                assert reader.read("activations").flags.writeable
        assert run.array(layer).flags.writeable
        assert all(batch.flags.writeable for batch in run.iter_batches(layer, batch_size=2))
        batches = list(run.iter_batches(layer, batch_size=2, copy=False))
        assert not any(_base_is_mapping(b) for b in batches)
        np.testing.assert_array_equal(np.concatenate(batches), written.arrays[layer])


def test_plain_h5py_files_map_only_when_contiguous_native_and_allocated(tmp_path):
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    cases = {
        "contiguous": dict(data=x),
        "chunked": dict(data=x, chunks=(5, 4)),
        "big_endian": dict(data=x.astype(">f4")),
        "unallocated": dict(shape=x.shape, dtype=np.float32),  # late allocation, never written
    }
    for name, kwargs in cases.items():
        path = tmp_path / f"{name}.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("activations", **kwargs)
        with ShardReader(path, "hdf5", (4,), "float32") as reader:
            layout = reader.mapped_layout("activations")
            assert (layout is not None) == (name == "contiguous"), name
            got = reader.read("activations", 2, 7, copy=False)
            with h5py.File(path, "r") as f:
                np.testing.assert_array_equal(got, f["activations"][2:7])
            assert _base_is_mapping(got) == (name == "contiguous")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_a_view_maps_only_its_rows_and_unmaps_when_dropped(tmp_path):
    width, n_rows = 1024, 4096  # 16 MiB of float32 in one shard, written like every uncompressed shard
    path = (tmp_path / "part-00000.h5").resolve()
    x = np.random.default_rng(0).standard_normal((n_rows, width)).astype(np.float32)
    write_shard_file(path, "hdf5", "wide", x, np.arange(n_rows, dtype=np.int64), None)
    row_bytes = width * 4
    with ShardReader(path, "hdf5", (width,), "float32") as reader:
        rows = 256
        view = reader.read("activations", 1, 1 + rows, copy=False)
        np.testing.assert_array_equal(view, x[1 : 1 + rows])
        mapped = _mapped_bytes(path)
        assert rows * row_bytes <= mapped <= rows * row_bytes + (2 << 20) + mmap.PAGESIZE
        part = view[10:20]  # a slice keeps the mapping alive too
        del view
        gc.collect()
        assert _mapped_bytes(path) == mapped
        assert float(part.sum()) == pytest.approx(float(reader.read("activations", 11, 21).sum()))
        del part
        gc.collect()
        assert _mapped_bytes(path) == 0
