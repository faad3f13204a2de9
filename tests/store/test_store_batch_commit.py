"""`RunWriter.write_shards` (all layers of a shard in one commit) and `BackgroundCommits`."""

from __future__ import annotations

import errno
import os
import threading

import numpy as np
import pytest

import neuronmap.store.manifest as manifest_module
import neuronmap.store.writer as writer_module
from neuronmap.errors import StorageError
from neuronmap.store import RunWriter, load_manifest, open_run
from neuronmap.store.background import BackgroundCommits
from neuronmap.store.shards import sha256_file
from storetest_util import LAYERS, listing, make_manifest, plan, write_run


@pytest.mark.parametrize("fmt", ["hdf5", "parquet"])
@pytest.mark.parametrize("per_token", [False, True])
def test_write_shards_equals_one_layer_at_a_time(tmp_path, fmt, per_token):
    """Same files (byte for byte), same manifest records as `write_shard` per layer; one manifest rewrite per shard."""
    reference = write_run(tmp_path / "ref", format=fmt, per_token=per_token)
    lengths, n_rows, shards = plan(per_token)
    manifest = make_manifest(LAYERS, "float32", per_token, 7, n_rows if per_token else None)
    writer = RunWriter(tmp_path / "batch", manifest, format=fmt)
    writer.write_prompts(reference.prompts)
    saves = []
    original_save = writer._save
    writer._save = lambda m: (saves.append(1), original_save(m))
    for index, (rows, samples) in enumerate(shards):
        sl = slice(*rows)
        writer.write_shards(index, rows=rows, samples=samples,
                            arrays={name: reference.arrays[name][sl] for name in LAYERS},
                            sample_ids=reference.sample_ids[sl],
                            token_index=None if reference.token_index is None else reference.token_index[sl])
    assert len(saves) == len(shards)  # one manifest rewrite per shard, not per layer
    writer.complete()

    ref, got = open_run(tmp_path / "ref"), open_run(tmp_path / "batch")
    assert sorted((s.path, s.rows, s.samples, s.sha256, s.bytes) for s in got.manifest.shards) == \
        sorted((s.path, s.rows, s.samples, s.sha256, s.bytes) for s in ref.manifest.shards)
    for shard in got.manifest.shards:  # the recorded hash is the file's
        assert sha256_file(tmp_path / "batch" / shard.path) == shard.sha256
    for name in LAYERS:
        np.testing.assert_array_equal(got.array(name), reference.arrays[name])


@pytest.mark.parametrize("fmt", ["hdf5", "parquet"])
def test_one_failing_layer_commits_no_layer_of_the_shard(tmp_path, monkeypatch, fmt):
    written = write_run(tmp_path / "run", format=fmt, complete=False, n_shards_to_write=1)
    before_manifest = (tmp_path / "run" / "manifest.json").read_bytes()
    before_files = listing(tmp_path / "run")
    writer = RunWriter(tmp_path / "run", make_manifest(), format=fmt)
    original = writer_module.write_shard_file

    def full_disk_on_second_layer(path, format, layer, *args, **kwargs):
        if layer == "blocks.1.attn.pattern":
            with open(path, "ab") as fh:
                fh.write(b"partial bytes")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(path, format, layer, *args, **kwargs)

    monkeypatch.setattr(writer_module, "write_shard_file", full_disk_on_second_layer)
    rows = written.shard_rows[1]
    sl = slice(*rows)
    with pytest.raises(StorageError, match="disk full while writing .*re-run the same command") as info:
        writer.write_shards(1, rows=rows, samples=rows, arrays={name: written.arrays[name][sl] for name in LAYERS},
                            sample_ids=written.sample_ids[sl])
    assert "blocks.1.attn.pattern/part-00001" in str(info.value)  # the file that failed, not the first layer's
    assert (tmp_path / "run" / "manifest.json").read_bytes() == before_manifest
    assert listing(tmp_path / "run") == before_files  # no temp file, no renamed file of the healthy layers
    assert len(load_manifest(tmp_path / "run").shards) == len(LAYERS)


def test_failing_manifest_rewrite_unlists_and_removes_every_renamed_file(tmp_path, monkeypatch):
    written = write_run(tmp_path / "run", complete=False, n_shards_to_write=1)
    before_files = listing(tmp_path / "run")
    writer = RunWriter(tmp_path / "run", make_manifest())

    def broken(run, manifest):
        raise StorageError(f"disk full while writing {run}/manifest.json: free space and re-run the same command")

    monkeypatch.setattr(writer_module, "write_manifest", broken)
    rows = written.shard_rows[1]
    sl = slice(*rows)
    with pytest.raises(StorageError):
        writer.write_shards(1, rows=rows, samples=rows, arrays={name: written.arrays[name][sl] for name in LAYERS},
                            sample_ids=written.sample_ids[sl])
    monkeypatch.setattr(writer_module, "write_manifest", manifest_module.write_manifest)
    assert listing(tmp_path / "run") == before_files
    assert len(load_manifest(tmp_path / "run").shards) == len(LAYERS)



@pytest.mark.parametrize("batch", [True, False])
def test_failing_rename_lists_no_shard_and_leaves_no_file(tmp_path, monkeypatch, batch):
    """The manifest lists a shard only after its file has its final name: a rename that fails lists nothing
    (`write_shards`: the second of a shard's files fails, so the first must be removed again)."""
    written = write_run(tmp_path / "run", complete=False, n_shards_to_write=1)
    before_files = listing(tmp_path / "run")
    before_manifest = (tmp_path / "run" / "manifest.json").read_bytes()
    writer = RunWriter(tmp_path / "run", make_manifest())
    rename = os.replace
    shard_renames = []

    def second_shard_rename_fails(src, dst):
        if "activations" in str(dst):
            shard_renames.append(dst)
            if len(shard_renames) == (2 if batch else 1):  # in a batch one file is already renamed: it goes
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return rename(src, dst)

    monkeypatch.setattr(os, "replace", second_shard_rename_fails)
    rows = written.shard_rows[1]
    sl = slice(*rows)
    with pytest.raises(StorageError, match="disk full"):
        if batch:
            writer.write_shards(1, rows=rows, samples=rows, sample_ids=written.sample_ids[sl],
                                arrays={name: written.arrays[name][sl] for name in LAYERS})
        else:
            writer.write_shard("blocks.0", 1, rows=rows, samples=rows, activations=written.arrays["blocks.0"][sl],
                               sample_ids=written.sample_ids[sl])
    monkeypatch.setattr(os, "replace", rename)
    assert len(shard_renames) == (2 if batch else 1)
    assert (tmp_path / "run" / "manifest.json").read_bytes() == before_manifest
    assert listing(tmp_path / "run") == before_files


_KILLED_WRITER = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
import pyarrow.parquet as pq
from storetest_util import make_manifest, write_run
from neuronmap.store import RunWriter

run, fmt, marker = sys.argv[2:5]
written = write_run(run, format=fmt, complete=False, n_shards_to_write=1)
writer = RunWriter(run, make_manifest(), format=fmt)

def hang():
    open(marker, "w").close()
    time.sleep(300)

if fmt == "hdf5":  # uncompressed HDF5: metadata by HDF5, then one pwrite of the activations
    pwrite = os.pwrite
    def half_then_hang(fd, data, offset):
        pwrite(fd, memoryview(data)[: len(data) // 2], offset)
        hang()
    os.pwrite = half_then_hang
else:
    write_table = pq.write_table
    def some_then_hang(table, where, *args, **kwargs):
        write_table(table.slice(0, 1), where, *args, **kwargs)
        hang()
    pq.write_table = some_then_hang
rows = written.shard_rows[1]
writer.write_shards(1, rows=rows, samples=rows, arrays={n: a[rows[0]:rows[1]] for n, a in written.arrays.items()},
                    sample_ids=written.sample_ids[rows[0]:rows[1]])
"""


@pytest.mark.parametrize("fmt", ["hdf5", "parquet"])
def test_a_writer_killed_mid_shard_leaves_only_whole_listed_shards(tmp_path, fmt):
    """SIGKILL while shard bytes are half on disk: nothing under a shard's final name but whole listed
    files, a valid manifest, and a reopened writer that finishes the run to the very same arrays."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from neuronmap.store import verify_run
    from neuronmap.store.manifest import TMP_MARKER

    run, marker = tmp_path / "run", tmp_path / "hanging"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(Path(__file__).parent), str(run), fmt,
                              str(marker)])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"the writer never reached its shard bytes (exit code {child.poll()})"
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=60)

    manifest = load_manifest(run)
    listed = sorted(shard.path for shard in manifest.shards)
    assert len(listed) == len(LAYERS) and all("part-00000" in path for path in listed)
    on_disk = [path for path in listing(run) if path.startswith("activations/")]
    assert any(TMP_MARKER in path for path in on_disk)  # the half-written bytes were really there...
    assert sorted(path for path in on_disk if TMP_MARKER not in path) == listed  # ...under temp names only

    reference = write_run(tmp_path / "reference", format=fmt)  # same seed: the arrays the child was writing
    writer = RunWriter(run, make_manifest(), format=fmt)  # resume: committed shards kept, temp files removed
    assert not any(TMP_MARKER in path for path in listing(run))
    for index, rows in enumerate(reference.shard_rows):
        sl = slice(*rows)
        if not writer.committed("blocks.0", index):
            writer.write_shards(index, rows=rows, samples=rows, sample_ids=reference.sample_ids[sl],
                                arrays={name: array[sl] for name, array in reference.arrays.items()})
    writer.complete()
    assert verify_run(run).ok
    resumed = open_run(run)
    for name, array in reference.arrays.items():
        np.testing.assert_array_equal(resumed.array(name), array)

def test_background_commits_overlap_and_reraise():
    started, release = threading.Event(), threading.Event()
    order = []

    def slow(tag):
        started.set()
        release.wait(5)
        order.append(tag)

    with BackgroundCommits() as commits:
        commits.submit(slow, "first")
        assert started.wait(5)
        order.append("caller kept computing")  # the caller is not blocked by the commit in flight
        release.set()
        commits.submit(order.append, "second")  # waits for "first" before starting
    assert order == ["caller kept computing", "first", "second"]

    def boom():
        raise StorageError("disk full while writing x: free space and re-run the same command")

    with pytest.raises(StorageError, match="disk full"):
        with BackgroundCommits() as commits:
            commits.submit(boom)
            commits.submit(order.append, "never")  # the earlier error surfaces here
    assert "never" not in order

    with pytest.raises(ValueError, match="caller failed"):  # the block's own error wins; the commit still finishes
        with BackgroundCommits() as commits:
            commits.submit(order.append, "finished anyway")
            raise ValueError("caller failed")
    assert order[-1] == "finished anyway"


def test_annotate_run_merges_extra_of_a_complete_run(tmp_path):
    from neuronmap.errors import ConfigError
    from neuronmap.store import annotate_run

    write_run(tmp_path / "run")
    before = load_manifest(tmp_path / "run")
    annotate_run(tmp_path / "run", experiment={"name": "demo", "seed": 3})
    after = load_manifest(tmp_path / "run")
    assert after.status == "complete"
    assert after.extra["experiment"] == {"name": "demo", "seed": 3}
    assert after.model_dump(exclude={"extra", "updated"}) == before.model_dump(exclude={"extra", "updated"})
    stamp = (tmp_path / "run" / "manifest.json").stat().st_mtime_ns
    annotate_run(tmp_path / "run", experiment={"name": "demo", "seed": 3})  # unchanged: nothing rewritten
    assert (tmp_path / "run" / "manifest.json").stat().st_mtime_ns == stamp
    assert open_run(tmp_path / "run").manifest.extra["experiment"]["seed"] == 3
    with pytest.raises(ConfigError, match="cannot store"):
        annotate_run(tmp_path / "run", bad=object())



def _write_batched(path) -> None:
    """A run written with `write_shards` (the shared I/O pool), checked against write_run's arrays."""
    reference = write_run(path.with_name(path.name + "-ref"))
    _lengths, _n_rows, shards = plan(False)
    writer = RunWriter(path, make_manifest())
    writer.write_prompts(reference.prompts)
    for index, (rows, samples) in enumerate(shards):
        sl = slice(*rows)
        writer.write_shards(index, rows=rows, samples=samples,
                            arrays={name: reference.arrays[name][sl] for name in LAYERS},
                            sample_ids=reference.sample_ids[sl])
    writer.complete()
    for name in LAYERS:
        np.testing.assert_array_equal(open_run(path).array(name), reference.arrays[name])


def test_a_forked_child_writes_shards_on_its_own_io_threads(tmp_path):
    """The shard I/O pool is per process: a child forked after the parent wrote shards must not queue work
    for the parent's threads, which do not exist in the child (it hung before the pool was reset at fork)."""
    import multiprocessing

    _write_batched(tmp_path / "parent")  # starts the parent's pool
    child = multiprocessing.get_context("fork").Process(target=_write_batched, args=(tmp_path / "child",))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail("the forked child hung writing shards")
    assert child.exitcode == 0


def test_complete_lists_shards_in_sample_then_layer_order_whatever_the_commit_order(tmp_path):
    """Ray workers commit shards out of order; the completed manifest lists them as a sequential
    extraction does (shard by shard, layers in manifest order), so equal runs have equal manifests."""
    reference = write_run(tmp_path / "ref", format="hdf5")
    lengths, n_rows, shards = plan(False)
    writer = RunWriter(tmp_path / "shuffled", make_manifest(LAYERS, "float32", False, 7, None), format="hdf5")
    writer.write_prompts(reference.prompts)
    order = list(range(len(shards)))[::-1]
    for index in order:
        rows, samples = shards[index]
        for name in reversed(LAYERS):
            sl = slice(*rows)
            writer.write_shard(name, index, rows=rows, samples=samples, activations=reference.arrays[name][sl],
                               sample_ids=reference.sample_ids[sl])
    assert len(shards) > 1 and load_manifest(tmp_path / "shuffled").shards[0].samples[0] > 0  # really out of order
    listed = [(s.samples[0], s.layer) for s in writer.complete().shards]
    assert listed == [(samples[0], name) for rows, samples in shards for name in LAYERS]
    assert [(s.samples[0], s.layer) for s in load_manifest(tmp_path / "shuffled").shards] == listed
