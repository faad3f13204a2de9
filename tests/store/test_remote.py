"""Runs on object storage (`neuronmap.store.remote`) against moto's S3 server on 127.0.0.1
(`s3_endpoint` / `s3_bucket` fixtures in tests/conftest.py).

The reference is the same extraction written to a local folder: the run read back from the bucket
must have the same rows, values, prompts and manifest (apart from timings). The manifest invariant
(the bucket's manifest never lists a shard that is not whole in the bucket) is checked at every
manifest write by reading the listed objects back and hashing them.
"""

from __future__ import annotations

import hashlib
import socket
import time

import numpy as np
import pandas as pd
import pytest

import neuronmap
from neuronmap.errors import ConfigError, RunExistsError, RunFormatError, StorageError
from neuronmap.store import RunWriter, remote
from neuronmap.store.manifest import MANIFEST_NAME
from storetest_util import make_manifest

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.", "Hi", "Why is the sky blue during the day?",
    "Paris is the capital of France.", "Numbers like 12345 are tokenised into pieces.", "A",
    "What did the committee decide after three hours?", "Short one.", "Is it raining?",
]


@pytest.fixture(scope="session")
def gpt2_dir(tiny_model_dir):
    return str(tiny_model_dir("gpt2"))


def objects(client, bucket_name, prefix=""):
    """{key: bytes} of every object under `prefix`."""
    listing = client.list_objects_v2(Bucket=bucket_name, Prefix=prefix).get("Contents", [])
    return {item["Key"]: client.get_object(Bucket=bucket_name, Key=item["Key"])["Body"].read() for item in listing}


def check_listed_shards_are_whole(client, bucket_name, prefix):
    """The invariant, read from the bucket: every shard its manifest lists is there with the listed bytes."""
    import json

    manifest = json.loads(client.get_object(Bucket=bucket_name, Key=f"{prefix}/{MANIFEST_NAME}")["Body"].read())
    for shard in manifest["shards"]:
        body = client.get_object(Bucket=bucket_name, Key=f"{prefix}/{shard['path']}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == shard["sha256"] and len(body) == shard["bytes"], shard["path"]
    return manifest


@pytest.fixture()
def checked_puts(monkeypatch, s3_bucket):
    """Wrap every manifest upload: after it, the bucket must satisfy the invariant. Returns the manifests seen."""
    name, client = s3_bucket
    seen = []
    real_put = remote.RunMirror._put

    def put(self, manifest):
        real_put(self, manifest)
        seen.append(check_listed_shards_are_whole(client, name, self.location.prefix))

    monkeypatch.setattr(remote.RunMirror, "_put", put)
    return seen


def assert_same_data(run, reference):
    """Same layers, arrays, ids, prompts and manifest apart from timings."""
    assert run.manifest.status == "complete" and run.layers == reference.layers
    for layer in reference.layers:
        np.testing.assert_array_equal(run.array(layer), reference.array(layer), err_msg=layer)
        np.testing.assert_array_equal(run.sample_ids(layer), reference.sample_ids(layer))
        if reference.layer_info(layer).per_token:
            np.testing.assert_array_equal(run.token_index(layer), reference.token_index(layer))
    pd.testing.assert_frame_equal(run.prompts, reference.prompts)
    ours, theirs = run.manifest.model_dump(), reference.manifest.model_dump()
    for manifest in (ours, theirs):
        for key in ("created", "updated"):
            manifest.pop(key)
        manifest["shards"] = sorted(manifest["shards"], key=lambda shard: shard["path"])
    assert ours == theirs


@pytest.mark.parametrize("pooling,layers", [("mean", "embed,blocks.*"), ("none", "blocks.0,blocks.1.attn.pattern")])
def test_parquet_run_on_s3_equals_the_local_run(pooling, layers, s3_bucket, checked_puts, gpt2_dir, tmp_path):
    name, client = s3_bucket
    settings = dict(layers=layers, pooling=pooling, format="parquet", samples_per_shard=2, batch_size=3)
    local = neuronmap.extract(gpt2_dir, PROMPTS, out=tmp_path / "local", **settings)
    url = f"s3://{name}/runs/gpt2"
    run = remote.extract_to_remote(neuronmap.extract, url, model=gpt2_dir, prompts=PROMPTS, sync_interval=0.05,
                                   **settings)
    assert isinstance(run, remote.RemoteRun) and run.url == url
    assert_same_data(run, local)
    again = remote.open_remote_run(url, require_complete=True)  # a fresh reader, from the bucket
    assert_same_data(again, local)
    assert_same_data(neuronmap.open_run(url, require_complete=True), local)  # the public reader takes URLs
    with pytest.raises(ConfigError, match="object storage"):  # never a local folder named "s3:"
        RunWriter(url, make_manifest())

    stored = objects(client, name, "runs/gpt2/")
    expected = {f"runs/gpt2/{s.path}" for s in local.manifest.shards} | {"runs/gpt2/manifest.json",
                                                                          "runs/gpt2/prompts.parquet"}
    assert set(stored) == expected  # no lock, temp or staging files in the bucket
    for shard in local.manifest.shards:  # byte-identical shard files
        assert hashlib.sha256(stored[f"runs/gpt2/{shard.path}"]).hexdigest() == shard.sha256
    # how many intermediate manifests the mirror uploads depends on timing; the last one is the complete run
    assert checked_puts and checked_puts[-1]["status"] == "complete"
    assert not any((tmp_path / "staging").iterdir())  # staging removed once the bucket holds the run


def test_hdf5_on_s3_is_a_one_line_config_error(s3_bucket, gpt2_dir):
    name, client = s3_bucket
    with pytest.raises(ConfigError) as caught:
        remote.extract_to_remote(neuronmap.extract, f"s3://{name}/runs/h5", model=gpt2_dir, prompts=PROMPTS)
    message = str(caught.value)
    assert "HDF5 runs are local" in message and "--format parquet" in message and "\n" not in message
    assert objects(client, name) == {}


def test_mirror_keeps_the_manifest_honest_through_failed_and_replaced_uploads(s3_bucket, checked_puts, tmp_path,
                                                                             monkeypatch):
    name, client = s3_bucket
    location = remote.parse_url(f"s3://{name}/runs/m")
    mirror = remote.RunMirror(tmp_path / "run", location, remote.filesystem())
    writer = RunWriter(tmp_path / "run", make_manifest({"blocks.0": [6]}, n_samples=6), format="parquet")
    rows = np.arange(36, dtype=np.float32).reshape(6, 6)

    def commit(index, values):
        start, stop = 3 * index, 3 * index + 3
        writer.write_shard("blocks.0", index, rows=(start, stop), samples=(start, stop), activations=values,
                           sample_ids=np.arange(start, stop))

    commit(0, rows[:3])
    assert [s.path for s in mirror.sync().shards] == ["activations/blocks.0/part-00000.parquet"]

    commit(1, rows[3:])
    real_upload = remote._upload

    def broken_upload(fs, source, key):
        if key.endswith("part-00001.parquet"):
            raise OSError("connection reset by peer")
        return real_upload(fs, source, key)

    monkeypatch.setattr(remote, "_upload", broken_upload)
    with pytest.raises(StorageError, match="connection reset by peer"):
        mirror.sync()
    listed = check_listed_shards_are_whole(client, name, "runs/m")
    assert [s["path"] for s in listed["shards"]] == ["activations/blocks.0/part-00000.parquet"]
    monkeypatch.setattr(remote, "_upload", real_upload)

    commit(0, rows[:3] + 100)  # shard 0 rewritten with other values: unlisted before it is replaced
    synced = mirror.sync()
    assert len(synced.shards) == 2 and len(checked_puts) == 3  # shard 0 alone, then unlisted, then both
    assert [s["path"] for s in checked_puts[1]["shards"]] == []
    writer.complete()
    assert mirror.sync().status == "complete"
    run = remote.open_remote_run(location.url, require_complete=True)
    np.testing.assert_array_equal(run.array("blocks.0"), np.concatenate([rows[:3] + 100, rows[3:]]))


def partial_extract(out, model, prompts, layers, samples_per_shard, batch_size, **_):
    """Commit shard 0 of the run `neuronmap.extract` would write, then stop as a killed driver would."""
    from neuronmap.extraction import BatchPooler, STORAGE_DTYPES, commit_shard, extract_shard, new_manifest, plan_run
    from neuronmap.models import load_model
    from neuronmap.prompts import load_prompts, prompt_source_hash

    frame = load_prompts(prompts)
    loaded = load_model(model, device="cpu")
    run_plan, tokens, plan = plan_run(loaded, frame["text"].tolist(), layers, "mean", "float32", 512,
                                      samples_per_shard)
    writer = RunWriter(out, new_manifest(run_plan, prompts, prompt_source_hash(frame), "mean", "float32", "parquet", None, batch_size))
    writer.write_prompts(frame)
    samples = run_plan.shards()[0]
    pooler = BatchPooler("mean", STORAGE_DTYPES["float32"], run_plan.pattern_width)
    arrays = extract_shard(loaded, plan, tokens, samples, pooler, batch_size)
    commit_shard(writer, 0, samples, 0, arrays, frame["sample_id"].to_numpy()[samples.start:samples.stop],
                 tokens.lengths[samples.start:samples.stop], False)
    raise KeyboardInterrupt


def test_an_interrupted_run_resumes_from_the_bucket_on_another_machine(s3_bucket, checked_puts, gpt2_dir, tmp_path,
                                                                     monkeypatch):
    name, _client = s3_bucket
    url = f"s3://{name}/runs/resume"
    settings = dict(layers="blocks.0,blocks.2", samples_per_shard=3, batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        remote.extract_to_remote(partial_extract, url, model=gpt2_dir, prompts=PROMPTS, format="parquet", **settings)
    partial = remote.open_remote_run(url)
    assert partial.status == "running" and len(partial.manifest.shards) == 2  # shard 0 of both layers
    with pytest.raises(RunFormatError, match="is running; re-run the same extract command"):
        remote.open_remote_run(url, require_complete=True)

    monkeypatch.setenv("NEURONMAP_STAGING_DIR", str(tmp_path / "other-machine"))  # the staging copy is gone
    uploads = []
    real_upload = remote._upload
    monkeypatch.setattr(remote, "_upload", lambda fs, source, key: uploads.append(key) or real_upload(fs, source, key))
    run = remote.extract_to_remote(neuronmap.extract, url, model=gpt2_dir, prompts=PROMPTS, format="parquet",
                                   **settings)
    local = neuronmap.extract(gpt2_dir, PROMPTS, out=tmp_path / "local", format="parquet", **settings)
    assert_same_data(run, local)
    kept = {f"runs/resume/{s.path}" for s in partial.manifest.shards}
    assert kept and not kept & set(uploads)  # committed shards were downloaded, not extracted and uploaded again


def test_complete_runs_and_foreign_prefixes_are_never_replaced_silently(s3_bucket, gpt2_dir):
    name, client = s3_bucket
    one = dict(model=gpt2_dir, prompts=PROMPTS[:3], format="parquet")
    remote.extract_to_remote(neuronmap.extract, f"s3://{name}/runs/a", layers="blocks.0", **one)
    with pytest.raises(RunExistsError, match="a complete run already exists at s3://.*/runs/a; pass --overwrite"):
        remote.extract_to_remote(neuronmap.extract, f"s3://{name}/runs/a", layers="blocks.1", **one)
    run = remote.extract_to_remote(neuronmap.extract, f"s3://{name}/runs/a", layers="blocks.1", overwrite=True, **one)
    assert run.layers == ["blocks.1"]
    assert not [key for key in objects(client, name, "runs/a/") if "blocks.0" in key]  # the old shards are gone

    client.put_object(Bucket=name, Key="data/table.csv", Body=b"a,b\n1,2\n")
    with pytest.raises(RunExistsError, match="holds objects but no manifest.json"):
        remote.extract_to_remote(neuronmap.extract, f"s3://{name}/data", layers="blocks.0", overwrite=True, **one)
    assert objects(client, name, "data/") == {"data/table.csv": b"a,b\n1,2\n"}


def test_a_changed_object_is_refused_on_read(s3_bucket, gpt2_dir):
    name, client = s3_bucket
    run = remote.extract_to_remote(neuronmap.extract, f"s3://{name}/runs/c", model=gpt2_dir, prompts=PROMPTS[:3],
                                   layers="blocks.0", format="parquet")
    key = f"runs/c/{run.manifest.shards[0].path}"
    client.put_object(Bucket=name, Key=key, Body=b"not the shard")
    fresh = remote.open_remote_run(f"s3://{name}/runs/c")
    with pytest.raises(RunFormatError, match="does not match the sha256 in its manifest"):
        fresh.array("blocks.0")
    with pytest.raises(RunFormatError, match="has no manifest.json"):
        remote.open_remote_run(f"s3://{name}/nothing/here")



def test_analyze_verify_and_export_read_a_run_on_s3_as_a_local_one(s3_bucket, gpt2_dir, tmp_path, capsys,
                                                                    monkeypatch):
    """The commands that take a run accept its s3:// URL: the shards are fetched (sha256-checked) into the
    cache, so analyses equal those of the same run extracted to a local folder."""
    import json

    from neuronmap.analysis import analyze
    from neuronmap.cli import main

    name, client = s3_bucket
    url = f"s3://{name}/runs/a"
    options = dict(model=gpt2_dir, prompts=PROMPTS, layers="blocks.0,blocks.1", format="parquet")
    remote.extract_to_remote(neuronmap.extract, url, **options)
    local = neuronmap.extract(out=tmp_path / "local", **options)

    assert main(["analyze", url, "stats", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)["units"]
    theirs = analyze(local, "stats")
    assert set(ours) == set(theirs.units) == {"blocks.0", "blocks.1"}
    for layer in ours:
        for metric in ("mean", "std"):
            np.testing.assert_allclose(ours[layer]["metrics"][metric], theirs.metrics(layer)[metric], rtol=1e-6)

    assert main(["runs", "verify", url]) == 0
    assert f"{url} verified" in capsys.readouterr().out
    assert main(["runs", "export", url, "--to", "csv", "--out", tmp_path / "a.csv"]) == 0
    assert f"exported {url} to" in " ".join(capsys.readouterr().out.split())

    key = f"runs/a/{local.manifest.shards[0].path}"
    client.put_object(Bucket=name, Key=key, Body=b"not the shard")
    monkeypatch.setenv("NEURONMAP_CACHE_DIR", str(tmp_path / "fresh-cache"))  # has not seen the good bytes
    assert main(["runs", "verify", url]) == 3
    problems = capsys.readouterr().err
    assert "does not match the sha256" in problems and problems.count(local.manifest.shards[0].path) == 1

def test_unreachable_endpoint_is_one_line_within_seconds(monkeypatch, tmp_path, gpt2_dir):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("NEURONMAP_S3_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("NEURONMAP_STAGING_DIR", str(tmp_path / "staging"))
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        remote.extract_to_remote(neuronmap.extract, "s3://bucket/runs/x", model=gpt2_dir, prompts=PROMPTS,
                                 format="parquet")
    assert time.monotonic() - started < 30
    message = str(caught.value)
    assert "\n" not in message and f"127.0.0.1:{port}" in message and "NEURONMAP_S3_ENDPOINT" in message
    with pytest.raises(StorageError) as caught:  # reading: nothing to resume
        remote.open_remote_run("s3://bucket/runs/x")
    assert "re-run the same command" in str(caught.value) and "resume" not in str(caught.value)


@pytest.mark.parametrize("url", ["s3://", "s3://bucket", "s3://bucket/", "s3://bucket/a/../b", "s3:/"])
def test_urls_without_a_bucket_and_prefix_are_config_errors(url):
    with pytest.raises(ConfigError, match="use s3://BUCKET/PREFIX"):
        remote.parse_url(url)


def test_a_url_folded_by_pathlib_is_still_recognised():
    from pathlib import Path

    assert remote.is_remote("s3://b/p") and remote.is_remote(Path("s3://b/runs/p"))
    assert remote.is_remote(Path("s3://"))  # folded to "s3:": a URL without a bucket, not a local folder
    with pytest.raises(ConfigError, match="use s3://BUCKET/PREFIX"):
        remote.parse_url(Path("s3://"))
    assert remote.parse_url(Path("s3://b/runs/p")).url == "s3://b/runs/p"
    assert not remote.is_remote("runs/s3") and not remote.is_remote(Path("/tmp/x"))
