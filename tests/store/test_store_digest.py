"""Uncompressed HDF5 shards: HDF5 writes the metadata, one pwrite the activations, sha256 computed on the way."""

from __future__ import annotations

import hashlib
import json
import os

import h5py
import numpy as np
import pytest

import neuronmap.store.shards as shards
from neuronmap.store import load_manifest
from neuronmap.store.shards import write_shard_file
from storetest_util import write_run


@pytest.mark.parametrize("shape,dtype", [((5, 8), "float32"), ((4, 2, 3, 3), "float16"), ((0, 8), "float32"),
                                         ((6, 8), "float64")])
def test_uncompressed_hdf5_shard_is_plain_contiguous_hdf5_with_the_file_sha256(tmp_path, shape, dtype):
    rng = np.random.default_rng(1)
    data = rng.standard_normal(shape).astype(dtype)
    ids = np.arange(100, 100 + shape[0], dtype=np.int64)
    tokens = np.arange(shape[0], dtype=np.int32)
    path = tmp_path / "part-00000.h5"
    digest, size = write_shard_file(path, "hdf5", "blocks.0", data, ids, tokens, None, attrs={"rows": [0, shape[0]]})

    raw = path.read_bytes()
    assert size == len(raw)
    assert digest == hashlib.sha256(raw).hexdigest()  # computed while writing, equals the whole file's
    with h5py.File(path, "r") as f:
        assert f["activations"].chunks is None  # contiguous: one pwrite filled it
        np.testing.assert_array_equal(f["activations"][...], data)
        np.testing.assert_array_equal(f["sample_id"][...], ids)
        np.testing.assert_array_equal(f["token_index"][...], tokens)
        assert f.attrs["layer"] == "blocks.0" and json.loads(f.attrs["rows"]) == [0, shape[0]]


def test_same_arrays_give_the_same_uncompressed_bytes(tmp_path):
    first, second = write_run(tmp_path / "a"), write_run(tmp_path / "b")
    assert [s.sha256 for s in load_manifest(first.path).shards] == [s.sha256 for s in load_manifest(second.path).shards]


@pytest.mark.parametrize("fmt,compression", [("hdf5", None), ("hdf5", "gzip"), ("parquet", None)])
def test_writeback_is_started_before_the_fsync(tmp_path, monkeypatch, fmt, compression):
    """Every shard path sets the disk going before it hashes (Linux), then fsyncs once; bytes unchanged."""
    calls = []
    original_fsync = os.fsync
    monkeypatch.setattr(shards, "start_writeback", lambda fd: calls.append(("writeback", fd)))
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(("fsync", fd)) or original_fsync(fd))
    data = np.arange(64, dtype=np.float32).reshape(8, 8)
    path = tmp_path / ("a.h5" if fmt == "hdf5" else "a.parquet")
    digest, size = write_shard_file(path, fmt, "blocks.0", data, np.arange(8), None, compression)
    assert [name for name, _ in calls] == ["writeback", "fsync"] and calls[0][1] == calls[1][1]
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() and size == path.stat().st_size
    with shards.ShardReader(path, fmt, (8,), "float32") as reader:
        np.testing.assert_array_equal(reader.read("activations"), data)


@pytest.mark.skipif(not os.sys.platform.startswith("linux"), reason="sync_file_range is Linux only")
def test_start_writeback_is_real_on_linux(tmp_path):
    assert shards._sync_file_range() is not None
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, b"x" * 8192)
        shards.start_writeback(fd)  # no error, nothing changed
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"x" * 8192
