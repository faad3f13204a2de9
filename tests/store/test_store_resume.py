"""Creating, resuming, refusing and completing runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from neuronmap.errors import ConfigError, RunExistsError, RunFormatError, StorageError
from neuronmap.store import RunWriter, load_manifest, open_run
from storetest_util import LAYERS, listing, make_manifest, write_run


def test_reopening_a_running_run_keeps_committed_shards(tmp_path):
    written = write_run(tmp_path / "run", complete=False, n_shards_to_write=2)
    created = load_manifest(tmp_path / "run").created
    stray = tmp_path / "run" / "activations" / "blocks.0" / "part-00002.h5.tmp-999-abcd"
    stray.write_bytes(b"half a shard")
    writer = RunWriter(tmp_path / "run", make_manifest())
    assert writer.resumed
    assert all(writer.committed(name, i) for name in LAYERS for i in (0, 1))
    assert not any(writer.committed(name, 2) for name in LAYERS)
    assert not stray.exists()  # crash leftovers are cleaned on reopen
    assert load_manifest(tmp_path / "run").created == created
    rows = written.shard_rows[2]
    for name in LAYERS:
        writer.write_shard(name, 2, rows=rows, samples=rows, activations=written.arrays[name][rows[0] : rows[1]],
                           sample_ids=written.sample_ids[rows[0] : rows[1]])
    writer.complete()
    run = open_run(tmp_path / "run", require_complete=True)
    for name in LAYERS:
        np.testing.assert_array_equal(run.array(name), written.arrays[name])


def test_failed_run_resumes_and_truncated_shard_is_not_committed(tmp_path):
    write_run(tmp_path / "run", complete=False, n_shards_to_write=2)
    RunWriter(tmp_path / "run", make_manifest()).fail("CUDA out of memory\nat batch 3")
    manifest = load_manifest(tmp_path / "run")
    assert manifest.status == "failed" and manifest.error == "CUDA out of memory at batch 3"
    shard = tmp_path / "run" / [s.path for s in manifest.shards if s.layer == "blocks.0"][1]
    shard.write_bytes(shard.read_bytes()[:-10])
    writer = RunWriter(tmp_path / "run", make_manifest())
    assert load_manifest(tmp_path / "run").status == "running"
    assert writer.committed("blocks.0", 0) and not writer.committed("blocks.0", 1)


def test_a_shard_changed_in_place_is_dropped_on_resume_and_extracted_again(tmp_path, caplog):
    """Same size, different bytes (a flipped bit): only the sha256 tells, and resume checks it."""
    written = write_run(tmp_path / "run", complete=False, n_shards_to_write=2)
    manifest = load_manifest(tmp_path / "run")
    damaged = [s for s in manifest.shards if s.layer == "blocks.1.attn.pattern" and s.index == 0][0]
    data = bytearray((tmp_path / "run" / damaged.path).read_bytes())
    data[-1] ^= 0x01
    (tmp_path / "run" / damaged.path).write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        writer = RunWriter(tmp_path / "run", make_manifest())
    assert not writer.committed("blocks.1.attn.pattern", 0)
    assert writer.committed("blocks.0", 0) and writer.committed("blocks.1.attn.pattern", 1)
    assert "corrupt" in caplog.text and "extracted again" in caplog.text
    for name in LAYERS:
        for index in range(len(written.shard_rows)):
            if not writer.committed(name, index):
                rows = written.shard_rows[index]
                writer.write_shard(name, index, rows=rows, samples=rows,
                                   activations=written.arrays[name][rows[0] : rows[1]],
                                   sample_ids=written.sample_ids[rows[0] : rows[1]])
    writer.complete()
    from neuronmap.store import verify_run

    assert verify_run(tmp_path / "run").ok
    np.testing.assert_array_equal(open_run(tmp_path / "run").array("blocks.1.attn.pattern"), written.arrays["blocks.1.attn.pattern"])


def test_unfinished_run_of_other_config_is_refused(tmp_path):
    write_run(tmp_path / "run", complete=False, n_shards_to_write=1)
    other = make_manifest(layers={"blocks.0": [6]})
    with pytest.raises(ConfigError, match="differs in: layers.*--overwrite"):
        RunWriter(tmp_path / "run", other)
    with pytest.raises(ConfigError, match="config_hash"):
        RunWriter(tmp_path / "run", make_manifest().model_copy(update={"config_hash": "zzz"}))
    RunWriter(tmp_path / "run", other, overwrite=True)
    assert load_manifest(tmp_path / "run").shards == []
    assert list(load_manifest(tmp_path / "run").layers) == ["blocks.0"]


def test_complete_run_needs_overwrite(tmp_path):
    write_run(tmp_path / "run")
    with pytest.raises(RunExistsError, match="--overwrite"):
        RunWriter(tmp_path / "run", make_manifest())
    writer = RunWriter(tmp_path / "run", make_manifest(), format="parquet", overwrite=True)
    assert listing(tmp_path / "run") == ["manifest.json"]
    assert writer.manifest.format == "parquet" and writer.manifest.status == "running"



def test_overwrite_that_fails_half_way_leaves_no_manifest_claiming_the_run(tmp_path, monkeypatch):
    import shutil

    import neuronmap.store.writer as writer_module

    write_run(tmp_path / "run")
    delete = shutil.rmtree

    def fails_after_the_shards(path, *args, **kwargs):  # e.g. one read-only file further down
        delete(Path(path) / "activations")
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(writer_module.shutil, "rmtree", fails_after_the_shards)
    with pytest.raises(StorageError, match="manifest is gone") as info:
        RunWriter(tmp_path / "run", make_manifest(), overwrite=True)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run" / "manifest.json").exists()  # nothing claims the shards that are gone
    monkeypatch.undo()
    with pytest.raises(RunExistsError, match="not a NeuronMap run"):
        RunWriter(tmp_path / "run", make_manifest())

def test_folder_that_is_not_a_run_is_never_deleted(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(RunExistsError, match="not a NeuronMap run"):
            RunWriter(tmp_path / "mine", make_manifest(), overwrite=overwrite)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    RunWriter(tmp_path / "empty", make_manifest())
    assert (tmp_path / "empty" / "manifest.json").is_file()


def test_complete_refuses_gaps_and_missing_files(tmp_path):
    written = write_run(tmp_path / "run", complete=False, n_shards_to_write=3)
    writer = RunWriter(tmp_path / "run", make_manifest())
    path = tmp_path / "run" / "manifest.json"
    data = json.loads(path.read_text())
    data["shards"] = [s for s in data["shards"] if not (s["layer"] == "blocks.0" and s["rows"] == [3, 6])]
    path.write_text(json.dumps(data))
    with pytest.raises(RunFormatError, match=r"layer blocks.0: rows \[3, 6\) are in no shard"):
        writer.complete()
    assert load_manifest(tmp_path / "run").status == "running"
    rows = written.shard_rows[1]
    writer.write_shard("blocks.0", 1, rows=rows, samples=rows, activations=written.arrays["blocks.0"][3:6],
                       sample_ids=written.sample_ids[3:6])
    (tmp_path / "run" / load_manifest(tmp_path / "run").shards[0].path).unlink()
    with pytest.raises(RunFormatError, match="missing"):
        writer.complete()


def test_per_token_complete_checks_n_tokens(tmp_path):
    written = write_run(tmp_path / "run", per_token=True, complete=False)
    writer = RunWriter(tmp_path / "run", make_manifest(per_token=True, n_tokens=len(written.sample_ids)))
    with pytest.raises(RunFormatError, match="rows up to"):
        writer.complete(n_tokens=len(written.sample_ids) - 1)
    manifest = writer.complete(n_truncated=2)
    assert manifest.status == "complete" and manifest.n_truncated == 2
    with pytest.raises(ConfigError, match="manages"):
        writer.update(status="complete")


def test_context_manager_marks_failure(tmp_path):
    with pytest.raises(KeyError):
        with RunWriter(tmp_path / "run", make_manifest()):
            raise KeyError("boom")
    manifest = load_manifest(tmp_path / "run")
    assert manifest.status == "failed" and "KeyError" in manifest.error


def test_attach_lets_a_second_writer_add_shards(tmp_path):
    written = write_run(tmp_path / "run", complete=False, n_shards_to_write=1)
    driver = RunWriter(tmp_path / "run", make_manifest())
    worker = RunWriter.attach(tmp_path / "run")
    for index in (1, 2):
        rows = written.shard_rows[index]
        for name in LAYERS:
            worker.write_shard(name, index, rows=rows, samples=rows,
                               activations=written.arrays[name][rows[0] : rows[1]],
                               sample_ids=written.sample_ids[rows[0] : rows[1]])
    driver.complete()  # sees the worker's shards
    run = open_run(tmp_path / "run", require_complete=True)
    np.testing.assert_array_equal(run.array("blocks.0"), written.arrays["blocks.0"])
    with pytest.raises(RunFormatError, match="complete"):
        RunWriter.attach(tmp_path / "run")
