"""verify_run, CSV export and HDF5 <-> Parquet conversion."""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pandas as pd
import pytest

import neuronmap.store.export as export_module
from neuronmap.errors import ConfigError, RunFormatError, UnknownLayerError
from neuronmap.store import convert_run, export_csv, load_manifest, open_run, verify_run
from neuronmap.store.manifest import write_manifest
from neuronmap.store.shards import sha256_file
from storetest_util import LAYERS, write_run


@pytest.mark.parametrize("fmt", ["hdf5", "parquet"])
def test_verify_accepts_a_good_run(tmp_path, fmt):
    write_run(tmp_path / "run", format=fmt, per_token=True)
    report = verify_run(tmp_path / "run")
    assert report.ok and report.problems == [] and report.status == "complete"
    assert report.n_shards == 3 * len(LAYERS)
    assert report.n_bytes == sum(s.bytes for s in load_manifest(tmp_path / "run").shards)


@pytest.mark.parametrize("fmt", ["hdf5", "parquet"])
def test_verify_detects_a_flipped_byte(tmp_path, fmt):
    write_run(tmp_path / "run", format=fmt)
    shard = load_manifest(tmp_path / "run").shards[4]
    path = tmp_path / "run" / shard.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    report = verify_run(tmp_path / "run")
    assert not report.ok
    assert any(shard.path in p and "sha256" in p for p in report.problems)



@pytest.mark.parametrize("fmt", ["hdf5", "parquet"])
def test_verify_hashes_whole_shards_larger_than_a_read_block(tmp_path, fmt):
    """A byte changed past the first MiB of a 1.5 MiB shard is found: the digest covers every block."""
    write_run(tmp_path / "run", format=fmt, layers={"blocks.0": [131072]})  # 3 rows x 512 KiB per shard
    shard = load_manifest(tmp_path / "run").shards[0]
    path = tmp_path / "run" / shard.path
    data = bytearray(path.read_bytes())
    assert len(data) > 3 * 2**19
    assert hashlib.sha256(data).hexdigest() == shard.sha256 == sha256_file(path) == sha256_file(path, block=4096)
    data[(1 << 20) + 12345] ^= 0x01
    path.write_bytes(bytes(data))
    problems = verify_run(tmp_path / "run").problems
    assert any(shard.path in p and "sha256" in p for p in problems), problems


def test_verify_detects_an_interior_gap(tmp_path):
    write_run(tmp_path / "run", complete=False)
    manifest = load_manifest(tmp_path / "run")
    middle = next(s for s in manifest.shards if s.layer == "blocks.0" and s.rows == (3, 6))
    (tmp_path / "run" / middle.path).unlink()
    manifest.shards = [s for s in manifest.shards if s is not middle]
    write_manifest(tmp_path / "run", manifest)
    problems = verify_run(tmp_path / "run").problems
    assert "layer blocks.0: rows [3, 6) are in no shard" in problems
    assert not any("blocks.1" in p or "module:" in p for p in problems)  # the other layers are whole

def test_verify_detects_missing_shard_gap_and_status(tmp_path):
    write_run(tmp_path / "run", complete=False, n_shards_to_write=2)
    shard = load_manifest(tmp_path / "run").shards[0]
    (tmp_path / "run" / shard.path).unlink()
    problems = verify_run(tmp_path / "run").problems
    assert f"shard {shard.path} is missing" in problems
    assert "run status is running, not complete" in problems
    assert "layer blocks.0: rows [6, 7) are in no shard" in problems


def test_verify_reports_unreadable_run_instead_of_raising(tmp_path):
    report = verify_run(tmp_path / "absent")
    assert not report.ok and "does not exist" in report.problems[0]


@pytest.mark.parametrize("listed", ["../other-run/activations/blocks.0/part-00000.h5", "/tmp/part-00000.h5",
                                    "activations/../../part-00000.h5"])
def test_a_shard_listed_outside_the_run_folder_makes_the_manifest_invalid(tmp_path, listed):
    """A run is one folder: `verify` said ok for a manifest whose shard path left it, and readers read that file."""
    import json

    write_run(tmp_path / "run", format="hdf5")
    doc = json.loads((tmp_path / "run" / "manifest.json").read_text())
    doc["shards"][0]["path"] = listed
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(RunFormatError, match="must be relative and inside the run folder"):
        open_run(tmp_path / "run")
    report = verify_run(tmp_path / "run")
    assert not report.ok and "inside the run folder" in report.problems[0]


def test_a_manifest_that_is_not_json_is_named_in_one_readable_line(tmp_path):
    write_run(tmp_path / "run", format="hdf5")
    (tmp_path / "run" / "manifest.json").write_text('{"status": "comp\x01lete"}')
    with pytest.raises(RunFormatError) as error:
        load_manifest(tmp_path / "run")
    assert "(Invalid control character at line 1)" in str(error.value), str(error.value)


@pytest.mark.parametrize("per_token,dtype", [(False, "float32"), (True, "float16")])
def test_csv_round_trip_is_exact(tmp_path, per_token, dtype):
    written = write_run(tmp_path / "run", per_token=per_token, dtype=dtype)
    out = export_csv(open_run(tmp_path / "run"), tmp_path / "acts.csv", layers=["blocks.0", "blocks.1.attn.pattern"],
                     batch_size=4)
    frame = pd.read_csv(out)
    ids = ["sample_id", "token_index"] if per_token else ["sample_id"]
    assert list(frame.columns[: len(ids)]) == ids
    assert list(frame.columns[len(ids) : len(ids) + 7]) == [f"blocks.0.{i}" for i in range(6)] + ["blocks.1.attn.pattern.0"]
    np.testing.assert_array_equal(frame["sample_id"].to_numpy(), written.sample_ids)
    if per_token:
        np.testing.assert_array_equal(frame["token_index"].to_numpy(), written.token_index)
    for name in ("blocks.0", "blocks.1.attn.pattern"):
        values = frame[[c for c in frame.columns if c.startswith(name + ".") and c[len(name) + 1 :].isdigit()]]
        got = values.to_numpy().astype(dtype).reshape(written.arrays[name].shape)
        np.testing.assert_array_equal(got, written.arrays[name])


def test_csv_warns_when_large(tmp_path, monkeypatch):
    write_run(tmp_path / "run")
    monkeypatch.setattr(export_module, "CSV_WARN_BYTES", 100)
    with pytest.warns(UserWarning, match=r"about \d+ MB"):
        export_csv(tmp_path / "run", tmp_path / "a.csv", layers="blocks.0")
    monkeypatch.setattr(export_module, "CSV_WARN_BYTES", 10**9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_csv(tmp_path / "run", tmp_path / "b.csv", layers="blocks.0")


def test_csv_refuses_incomplete_runs_and_unknown_layers(tmp_path):
    write_run(tmp_path / "run", complete=False, n_shards_to_write=1)
    with pytest.raises(RunFormatError, match="running"):
        export_csv(tmp_path / "run", tmp_path / "a.csv")
    assert not (tmp_path / "a.csv").exists()
    write_run(tmp_path / "done")
    with pytest.raises(UnknownLayerError, match="blocks.0"):
        export_csv(tmp_path / "done", tmp_path / "a.csv", layers=["blocks.7"])


@pytest.mark.parametrize("per_token", [False, True])
def test_convert_hdf5_parquet_hdf5_is_exact(tmp_path, per_token):
    written = write_run(tmp_path / "h5", format="hdf5", per_token=per_token, dtype="float16", compression="lzf")
    convert_run(tmp_path / "h5", tmp_path / "pq", format="parquet", compression="zstd")
    convert_run(open_run(tmp_path / "pq"), tmp_path / "h5b", format="hdf5")
    original, middle, back = (open_run(tmp_path / p, require_complete=True) for p in ("h5", "pq", "h5b"))
    assert middle.format == "parquet" and middle.manifest.compression == "zstd"
    assert back.format == "hdf5" and back.manifest.compression is None
    for run in (middle, back):
        assert verify_run(run.path).ok
        pd.testing.assert_frame_equal(run.prompts, written.prompts)
        for name in LAYERS:
            np.testing.assert_array_equal(run.array(name), written.arrays[name])
            np.testing.assert_array_equal(run.sample_ids(name), written.sample_ids)
            if per_token:
                np.testing.assert_array_equal(run.token_index(name), written.token_index)
            assert [s.rows for s in run.shards(name)] == [s.rows for s in original.shards(name)]
    assert {s.sha256 for s in middle.manifest.shards}.isdisjoint({s.sha256 for s in original.manifest.shards})
    with pytest.raises(ConfigError, match="is the source run; give a new folder"):
        convert_run(tmp_path / "h5", tmp_path / "h5", format="parquet")


def _flip_a_byte(run, layer):
    shard = open_run(run).shards(layer)[1]
    data = bytearray((run / shard.path).read_bytes())
    data[len(data) // 2] ^= 0x01
    (run / shard.path).write_bytes(bytes(data))
    return shard.path


@pytest.mark.parametrize("fmt", ["hdf5", "parquet"])
def test_export_and_conversion_refuse_a_damaged_shard_and_write_nothing(tmp_path, fmt):
    """Copying data out of a run checks each shard's sha256: damage is named, never passed on (a
    conversion would otherwise give the damaged values a fresh, valid checksum)."""
    write_run(tmp_path / "run", format=fmt)
    damaged = _flip_a_byte(tmp_path / "run", "blocks.0")
    with pytest.raises(RunFormatError, match=rf"{damaged}.*corrupt.*runs verify"):
        export_csv(tmp_path / "run", tmp_path / "a.csv", layers=["blocks.0"])
    assert not (tmp_path / "a.csv").exists()
    export_csv(tmp_path / "run", tmp_path / "other.csv", layers=["module:transformer.h/0"])  # intact layers export
    with pytest.raises(RunFormatError, match=rf"{damaged}.*corrupt"):
        convert_run(tmp_path / "run", tmp_path / "copy", format="parquet" if fmt == "hdf5" else "hdf5")
    assert not (tmp_path / "copy").exists()


def test_csv_export_replaces_a_file_only_when_asked(tmp_path):
    from neuronmap.errors import RunExistsError

    written = write_run(tmp_path / "run")
    target = tmp_path / "a.csv"
    target.write_text("my notes")
    with pytest.raises(RunExistsError, match="--overwrite"):
        export_csv(tmp_path / "run", target, layers=["blocks.0"])
    assert target.read_text() == "my notes"
    export_csv(tmp_path / "run", target, layers=["blocks.0"], overwrite=True)
    table = pd.read_csv(target)
    np.testing.assert_array_equal(table.filter(like="blocks.0").to_numpy(np.float32), written.arrays["blocks.0"])
    with pytest.raises(ConfigError, match="is a folder"):
        export_csv(tmp_path / "run", tmp_path, layers=["blocks.0"])
