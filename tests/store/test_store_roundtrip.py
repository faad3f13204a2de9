"""Write runs in both formats and read them back, with plain h5py/pyarrow and with open_run."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from neuronmap.errors import ConfigError, RunFormatError, UnknownLayerError
from neuronmap.store import layer_dirname, layer_from_dirname, load_manifest, open_run, virtual_dataset
from storetest_util import LAYERS, write_run

CASES = [
    pytest.param(fmt, per_token, dtype, id=f"{fmt}-{'token' if per_token else 'sample'}-{dtype}")
    for fmt in ("hdf5", "parquet") for per_token in (False, True) for dtype in ("float32", "float16")
]


def _plain_read(path, fmt, shape):
    """Read one shard without neuronmap: (activations, sample_id, token_index or None)."""
    if fmt == "hdf5":
        with h5py.File(path, "r") as f:
            tokens = f["token_index"][...] if "token_index" in f else None
            assert f["activations"].chunks is None  # uncompressed: contiguous, filled with one pwrite
            return f["activations"][...], f["sample_id"][...], tokens
    table = pq.read_table(path)
    assert json.loads(table.schema.metadata[b"neuronmap.shape"]) == list(shape)
    column = table.column("activation").combine_chunks()
    acts = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), *shape)
    tokens = table.column("token_index").to_numpy() if "token_index" in table.column_names else None
    return acts, table.column("sample_id").to_numpy(), tokens


@pytest.mark.parametrize("fmt,per_token,dtype", CASES)
def test_plain_libraries_read_what_was_written(tmp_path, fmt, per_token, dtype):
    written = write_run(tmp_path / "run", format=fmt, per_token=per_token, dtype=dtype)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["schema_version"] == 1
    assert set(manifest["layers"]) == set(LAYERS)
    for name, shape in LAYERS.items():
        shards = sorted((s for s in manifest["shards"] if s["layer"] == name), key=lambda s: s["rows"][0])
        assert [tuple(s["rows"]) for s in shards] == written.shard_rows
        pieces = [_plain_read(tmp_path / "run" / s["path"], fmt, shape) for s in shards]
        acts = np.concatenate([p[0] for p in pieces])
        assert acts.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(acts, written.arrays[name])
        np.testing.assert_array_equal(np.concatenate([p[1] for p in pieces]), written.sample_ids)
        if per_token:
            tokens = np.concatenate([p[2] for p in pieces])
            assert tokens.dtype == np.int32
            np.testing.assert_array_equal(tokens, written.token_index)
        else:
            assert all(p[2] is None for p in pieces)
    prompts = pq.read_table(tmp_path / "run" / "prompts.parquet").to_pandas()
    assert prompts["sample_id"].dtype == np.int64
    pd.testing.assert_frame_equal(prompts, written.prompts)


@pytest.mark.parametrize("fmt,per_token,dtype", CASES)
def test_open_run_returns_written_arrays(tmp_path, fmt, per_token, dtype):
    written = write_run(tmp_path / "run", format=fmt, per_token=per_token, dtype=dtype,
                        compression="gzip")
    run = open_run(tmp_path / "run", require_complete=True)
    assert run.layers == list(LAYERS)
    pd.testing.assert_frame_equal(run.prompts, written.prompts)
    for name, shape in LAYERS.items():
        expected = written.arrays[name]
        assert run.shape(name) == tuple(shape) and run.n_rows(name) == len(expected)
        np.testing.assert_array_equal(run.array(name), expected)
        np.testing.assert_array_equal(run.array(name, rows=(2, 6)), expected[2:6])
        np.testing.assert_array_equal(run.array(name, rows=slice(3, None)), expected[3:])
        batches = list(run.iter_batches(name, batch_size=4))
        assert [len(b) for b in batches[:-1]] == [4] * (len(batches) - 1)
        np.testing.assert_array_equal(np.concatenate(batches), expected)
        np.testing.assert_array_equal(np.concatenate(list(run.iter_batches(name, rows=(1, 6), batch_size=2))),
                                      expected[1:6])
        np.testing.assert_array_equal(run.sample_ids(name), written.sample_ids)
        if per_token:
            np.testing.assert_array_equal(run.token_index(name), written.token_index)
        else:
            with pytest.raises(ConfigError):
                run.token_index(name)


def test_parquet_row_groups_are_read_piecewise(tmp_path, monkeypatch):
    import neuronmap.store.shards as shards

    monkeypatch.setattr(shards, "ROW_GROUP_BYTES", 40)  # two rows of 6 float32 per row group
    written = write_run(tmp_path / "run", format="parquet", per_token=True)
    path = tmp_path / "run" / load_manifest(tmp_path / "run").shards[0].path
    assert pq.ParquetFile(path).metadata.num_row_groups > 1
    run = open_run(tmp_path / "run")
    for batch_size in (1, 3, 5, 1000):
        got = np.concatenate(list(run.iter_batches("blocks.0", rows=(1, 11), batch_size=batch_size)))
        np.testing.assert_array_equal(got, written.arrays["blocks.0"][1:11])


def test_layer_names_map_to_reversible_safe_folders(tmp_path):
    for name in ("blocks.3.mlp", "module:transformer.h.0", "module:a/b", "100%:x y"):
        folder = layer_dirname(name)
        assert "/" not in folder and ":" not in folder
        assert layer_from_dirname(folder) == name
    write_run(tmp_path / "run")
    folders = sorted(p.name for p in (tmp_path / "run" / "activations").iterdir())
    assert folders == sorted(layer_dirname(n) for n in LAYERS)
    assert "module%3Atransformer.h%2F0" in folders


def test_virtual_dataset_stitches_hdf5_shards(tmp_path):
    written = write_run(tmp_path / "run", per_token=True)
    out = virtual_dataset(open_run(tmp_path / "run"), "blocks.1.attn.pattern", tmp_path / "v.h5")
    with h5py.File(out, "r") as f:
        np.testing.assert_array_equal(f["activations"][...], written.arrays["blocks.1.attn.pattern"])
        np.testing.assert_array_equal(f["token_index"][...], written.token_index)


def test_open_run_errors_are_one_line(tmp_path):
    with pytest.raises(RunFormatError, match="does not exist"):
        open_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunFormatError, match="no manifest.json"):
        open_run(tmp_path / "empty")
    write_run(tmp_path / "run")
    (tmp_path / "run" / "manifest.json").write_text("{not json")
    with pytest.raises(RunFormatError, match="not valid JSON") as info:
        open_run(tmp_path / "run")
    assert "\n" not in str(info.value)
    (tmp_path / "run" / "manifest.json").write_text(json.dumps({"schema_version": 1, "status": "odd"}))
    with pytest.raises(RunFormatError, match="not a valid run manifest.*--overwrite") as info:
        open_run(tmp_path / "run")
    assert "\n" not in str(info.value)
    write_run(tmp_path / "run2")
    (tmp_path / "run2" / "prompts.parquet").write_bytes(b"garbage")
    for read in (lambda run: run.prompts, lambda run: run.prompt_columns):
        with pytest.raises(RunFormatError, match="prompts.parquet: .*damaged.*--overwrite") as info:
            read(open_run(tmp_path / "run2"))
        assert "\n" not in str(info.value)


def test_unknown_layer_lists_the_runs_layers(tmp_path):
    write_run(tmp_path / "run")
    run = open_run(tmp_path / "run")
    with pytest.raises(UnknownLayerError, match="blocks.0, blocks.1.attn.pattern"):
        run.array("blocks.9")
    with pytest.raises(ConfigError, match="within"):
        run.array("blocks.0", rows=(0, 99))


def test_partial_run_reads_committed_rows_and_names_the_gap(tmp_path):
    written = write_run(tmp_path / "run", complete=False, n_shards_to_write=1)
    run = open_run(tmp_path / "run")
    assert run.status == "running"
    np.testing.assert_array_equal(run.array("blocks.0", rows=(0, 3)), written.arrays["blocks.0"][:3])
    with pytest.raises(RunFormatError, match=r"rows \[3, 7\)"):
        run.array("blocks.0")
    with pytest.raises(RunFormatError, match="running"):
        open_run(tmp_path / "run", require_complete=True)


def test_prompt_columns_come_from_the_schema_alone(tmp_path, monkeypatch):
    written = write_run(tmp_path / "run")
    run = open_run(tmp_path / "run")
    monkeypatch.setattr(pd, "read_parquet", lambda *a, **k: pytest.fail("prompt_columns read the whole table"))
    assert run.prompt_columns == list(written.prompts.columns)
    (tmp_path / "run" / "prompts.parquet").write_bytes(b"not parquet")
    with pytest.raises(RunFormatError, match="cannot read") as info:
        open_run(tmp_path / "run").prompt_columns
    assert "\n" not in str(info.value)
