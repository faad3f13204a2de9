"""Atomic commits: a full disk mid-write leaves no shard, no temp file and an unchanged manifest."""

from __future__ import annotations

import errno
import os

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

import neuronmap.store.writer as writer_module
from neuronmap.errors import ConfigError, StorageError
from neuronmap.store import RunWriter, load_manifest, open_run
from storetest_util import listing, make_manifest, write_run


def _disk_full():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _next_shard(written, layer="blocks.0"):
    """Arguments of shard 1 of `layer` (not yet written when n_shards_to_write=1)."""
    rows = written.shard_rows[1]
    return dict(rows=rows, samples=rows, activations=written.arrays[layer][rows[0] : rows[1]],
                sample_ids=written.sample_ids[rows[0] : rows[1]])


def _half_then_fail_pwrite(monkeypatch):
    """The uncompressed HDF5 path: HDF5 writes the metadata, one pwrite the activations."""
    original = os.pwrite

    def write_half_then_fail(fd, data, offset):
        original(fd, memoryview(data)[: len(data) // 2], offset)  # some bytes really reach the file
        raise _disk_full()

    monkeypatch.setattr(os, "pwrite", write_half_then_fail)


def _half_then_fail_hdf5(monkeypatch):
    """The compressed HDF5 path: HDF5 writes everything."""
    original = h5py.Dataset.__setitem__

    def write_half_then_fail(self, key, value):
        if self.name == "/activations":
            original(self, np.s_[: len(value) // 2], np.asarray(value)[: len(value) // 2])
            raise _disk_full()
        return original(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", write_half_then_fail)


def _half_then_fail_parquet(monkeypatch):
    original = pq.write_table

    def write_some_then_fail(table, where, *args, **kwargs):
        original(table.slice(0, 1), where, *args, **kwargs)  # some bytes really reach the file
        raise _disk_full()

    monkeypatch.setattr(pq, "write_table", write_some_then_fail)


@pytest.mark.parametrize("fmt,compression,fail", [("hdf5", None, _half_then_fail_pwrite),
                                                  ("hdf5", "gzip", _half_then_fail_hdf5),
                                                  ("parquet", None, _half_then_fail_parquet)])
def test_disk_full_mid_write_leaves_nothing_behind(tmp_path, monkeypatch, fmt, compression, fail):
    written = write_run(tmp_path / "run", format=fmt, compression=compression, complete=False, n_shards_to_write=1)
    before_manifest = (tmp_path / "run" / "manifest.json").read_bytes()
    before_files = listing(tmp_path / "run")
    writer = RunWriter(tmp_path / "run", make_manifest(), format=fmt, compression=compression)
    fail(monkeypatch)

    with pytest.raises(StorageError, match="disk full while writing .*part-00001.* re-run the same command") as info:
        writer.write_shard("blocks.0", 1, **_next_shard(written))
    assert "\n" not in str(info.value)
    assert listing(tmp_path / "run") == before_files  # no shard, no temp file
    assert load_manifest(tmp_path / "run").status == "running"  # still valid
    assert (tmp_path / "run" / "manifest.json").read_bytes() == before_manifest
    assert not writer.committed("blocks.0", 1)

    monkeypatch.undo()  # space freed: the same call now commits
    writer.write_shard("blocks.0", 1, **_next_shard(written))
    assert writer.committed("blocks.0", 1)
    np.testing.assert_array_equal(open_run(tmp_path / "run").array("blocks.0", rows=(0, 6)),
                                  written.arrays["blocks.0"][:6])


def test_manifest_write_failure_unlists_and_removes_the_renamed_shard(tmp_path, monkeypatch):
    written = write_run(tmp_path / "run", complete=False, n_shards_to_write=1)
    before_files = listing(tmp_path / "run")
    before_manifest = (tmp_path / "run" / "manifest.json").read_bytes()
    writer = RunWriter(tmp_path / "run", make_manifest())

    def no_space(run, manifest):
        raise StorageError(f"disk full while writing {run}/manifest.json: free space and re-run")

    monkeypatch.setattr(writer_module, "write_manifest", no_space)
    with pytest.raises(StorageError, match="disk full"):
        writer.write_shard("blocks.0", 1, **_next_shard(written))
    assert listing(tmp_path / "run") == before_files
    assert (tmp_path / "run" / "manifest.json").read_bytes() == before_manifest


def test_rewriting_a_committed_shard_replaces_its_record(tmp_path):
    written = write_run(tmp_path / "run", complete=False, n_shards_to_write=2)
    writer = RunWriter(tmp_path / "run", make_manifest())
    args = _next_shard(written)
    args["activations"] = args["activations"] + 1
    writer.write_shard("blocks.0", 1, **args)
    records = [s for s in load_manifest(tmp_path / "run").shards if s.path.endswith("blocks.0/part-00001.h5")]
    assert len(records) == 1
    np.testing.assert_array_equal(open_run(tmp_path / "run").array("blocks.0", rows=(3, 6)), args["activations"])


def test_unwritable_output_is_one_line_storage_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(StorageError) as info:
        RunWriter(blocker / "run", make_manifest())
    assert "\n" not in str(info.value) and "run" in str(info.value)



def test_an_output_folder_that_cannot_be_made_says_choose_another(tmp_path):
    """/proc/run and the like: nothing was started, so nothing to resume."""
    from neuronmap.store.manifest import storage_error

    message = str(storage_error(FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT)), tmp_path / "x" / "run"))
    assert "choose another output folder (--out)" in message and "resume" not in message

@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_folder_is_storage_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(StorageError, match="no permission"):
            RunWriter(locked / "run", make_manifest())
    finally:
        locked.chmod(0o700)


def test_write_shard_validates_before_touching_disk(tmp_path):
    written = write_run(tmp_path / "run", complete=False, n_shards_to_write=1)
    writer = RunWriter(tmp_path / "run", make_manifest())
    before = listing(tmp_path / "run")
    good = _next_shard(written)
    with pytest.raises(ConfigError, match="shape"):
        writer.write_shard("blocks.0", 1, **{**good, "activations": good["activations"][:, :2]})
    with pytest.raises(ConfigError, match="overlap"):
        writer.write_shard("blocks.0", 5, **{**good, "rows": (2, 5), "samples": (2, 5)})
    with pytest.raises(ConfigError, match="token_index"):
        writer.write_shard("blocks.0", 1, **good, token_index=np.zeros(3, dtype=np.int32))
    with pytest.raises(ConfigError, match="sample_ids"):
        writer.write_shard("blocks.0", 1, **{**good, "sample_ids": good["sample_ids"][:1]})
    assert listing(tmp_path / "run") == before
    assert len(load_manifest(tmp_path / "run").shards) == len(written.arrays)  # shard 0 of each layer only


def test_hdf5_space_is_reserved_before_hdf5_writes(tmp_path, monkeypatch):
    written = write_run(tmp_path / "run", complete=False, n_shards_to_write=1)
    before_files = listing(tmp_path / "run")
    writer = RunWriter(tmp_path / "run", make_manifest())

    def no_room(fd, offset, length):
        raise _disk_full()

    monkeypatch.setattr(os, "posix_fallocate", no_room, raising=False)
    with pytest.raises(StorageError, match="disk full"):
        writer.write_shard("blocks.0", 1, **_next_shard(written))
    assert listing(tmp_path / "run") == before_files


def test_same_arrays_give_the_same_shard_bytes(tmp_path):
    for fmt in ("hdf5", "parquet"):
        first = write_run(tmp_path / f"a-{fmt}", format=fmt, compression="gzip")
        write_run(tmp_path / f"b-{fmt}", format=fmt, compression="gzip")
        shas = [[s.sha256 for s in load_manifest(tmp_path / f"{p}-{fmt}").shards] for p in "ab"]
        assert shas[0] == shas[1]
        sizes = [s.bytes for s in load_manifest(first.path).shards]
        assert all(size < 50_000 for size in sizes)  # the 256 KiB space reservation was trimmed


def test_adopted_prompt_table_is_renamed_in_and_a_wrong_one_is_refused(tmp_path):
    import pyarrow as pa

    writer = RunWriter(tmp_path / "run", make_manifest(n_samples=3))
    good = tmp_path / "staged.parquet"
    pq.write_table(pa.table({"sample_id": [0, 1, 2], "text": ["a", "b", "c"], "y": [1, 0, 1]}), good)
    for table, problem in [({"sample_id": [0, 1], "text": ["a", "b"]}, "has 2 rows but the run has n_samples=3"),
                           ({"sample_id": [0, 2, 1], "text": ["a", "b", "c"]}, "must number its rows 0..n-1"),
                           ({"id": [0, 1, 2], "text": ["a", "b", "c"]}, "needs 'sample_id' and 'text'")]:
        bad = tmp_path / "bad.parquet"
        pq.write_table(pa.table(table), bad)
        with pytest.raises(ConfigError, match=problem):
            writer.adopt_prompts(bad)
        assert not (tmp_path / "run" / "prompts.parquet").exists() and bad.exists()
    writer.adopt_prompts(good)
    assert not good.exists()
    assert pq.read_table(tmp_path / "run" / "prompts.parquet").column("y").to_pylist() == [1, 0, 1]
