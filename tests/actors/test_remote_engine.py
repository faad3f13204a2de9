"""`--engine ray --out s3://...`: Ray runs (worker pool and pipeline stages) written to object storage.

The Ray engines write the staging folder (workers in other processes commit into it) while the
mirror copies committed shards to moto's S3 server; the run read back from the bucket equals the
in-process engine's local run.
"""

import pytest
from actorstest_util import PROMPTS, assert_same_run

import neuronmap
from actors.engine import run_ray_extraction
from neuronmap.store import remote


@pytest.mark.parametrize("engine_options", [dict(workers=1), dict(stages=2, cpus_per_stage=0.5)])
def test_ray_run_to_s3_equals_local_run(engine_options, s3_bucket, ray_cluster, gpt2_dir, tmp_path, one_thread):
    name, client = s3_bucket
    settings = dict(layers="embed,blocks.*", format="parquet", samples_per_shard=4, batch_size=3)
    local = neuronmap.extract(gpt2_dir, PROMPTS, out=tmp_path / "local", **settings)
    url = f"s3://{name}/ray/run"
    run = remote.extract_to_remote(run_ray_extraction, url, model=gpt2_dir, prompts=PROMPTS, sync_interval=0.1,
                                   **engine_options, **settings)
    assert run.url == url
    assert_same_run(run, local)
    keys = {item["Key"] for item in client.list_objects_v2(Bucket=name, Prefix="ray/run/")["Contents"]}
    assert keys == {f"ray/run/{s.path}" for s in local.manifest.shards} | {"ray/run/manifest.json",
                                                                            "ray/run/prompts.parquet"}
