"""`--engine ray --stages K`: a run written through pipeline stage actors equals the in-process run.

The reference is `neuronmap.extract` (local engine) with the same batch size and one torch thread
(stage actors with at most one whole CPU run one thread), so equality is exact on CPU float32: same
rows, values, sample ids and manifest apart from timings.
"""

import time

import pytest
from actorstest_util import PROMPTS, assert_same_run

import neuronmap
from actors.engine import run_ray_extraction
from neuronmap.errors import ConfigError
from neuronmap.store import open_run, verify_run

STAGE = dict(cpus_per_stage=0.5)  # two stage actors fit the shared 4-CPU test cluster beside others


@pytest.mark.parametrize("family,layers,pooling,format", [
    ("gpt2", "embed,blocks.*,final", "mean", "hdf5"),
    ("bert", "all", "none", "parquet"),
])
def test_two_stage_run_equals_local_run(family, layers, pooling, format, ray_cluster, tiny_model_dir, tmp_path,
                                        one_thread):
    model = str(tiny_model_dir(family))
    settings = dict(layers=layers, pooling=pooling, format=format, samples_per_shard=5, batch_size=3)
    local = neuronmap.extract(model, PROMPTS, out=tmp_path / "local", **settings)
    committed, stages = [], []
    run = run_ray_extraction(model=model, prompts=PROMPTS, out=tmp_path / "stages", stages=2,
                             on_shard=committed.append, on_stages=stages.extend, **STAGE, **settings)
    assert_same_run(run, local)
    assert verify_run(tmp_path / "stages").ok
    assert sorted(record["shard"] for record in committed) == [0, 1, 2]
    # the two actors split the model: blocks 0 | 1-2 (extra blocks go to the later stage)
    assert [info["blocks"] for info in stages] == [range(0, 1), range(1, 3)]
    assert all(info["node"] for info in stages) and all(info["cpu_s"] > 0 for info in stages)


def test_interrupted_stage_run_resumes_from_committed_shards(ray_cluster, gpt2_dir, tmp_path, one_thread):
    settings = dict(layers="blocks.0,blocks.2", samples_per_shard=3, batch_size=2)
    local = neuronmap.extract(gpt2_dir, PROMPTS, out=tmp_path / "local", **settings)
    out = tmp_path / "stages"

    def stop_after_first(record):
        raise KeyboardInterrupt  # as a Ctrl-C right after the first shard was committed

    with pytest.raises(KeyboardInterrupt):
        run_ray_extraction(model=gpt2_dir, prompts=PROMPTS, out=out, stages=2, on_shard=stop_after_first, **STAGE,
                           **settings)
    partial = open_run(out)
    assert partial.status == "running" and len(partial.manifest.shards) == 2  # shard 0 of both layers
    kept = {shard.path: (out / shard.path).stat().st_ino for shard in partial.manifest.shards}

    redone = []
    run = run_ray_extraction(model=gpt2_dir, prompts=PROMPTS, out=out, stages=2, on_shard=redone.append, **STAGE,
                             **settings)
    assert_same_run(run, local)
    assert sorted(record["shard"] for record in redone) == [1, 2, 3]  # shard 0 not extracted again
    assert {path: (out / path).stat().st_ino for path in kept} == kept  # nor rewritten


def test_more_stages_than_blocks_is_one_line_before_ray_starts(gpt2_dir, tmp_path):
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        run_ray_extraction(model=gpt2_dir, prompts=PROMPTS, out=tmp_path / "run", stages=4)
    message = str(caught.value)
    assert "stages=4 must be between 1 and the model's number of blocks (3)" in message and "\n" not in message
    assert time.monotonic() - started < 10 and not (tmp_path / "run").exists()


def test_gpus_per_stage_on_a_cluster_without_gpus_fails_fast(ray_cluster, gpt2_dir, tmp_path):
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"--gpus-per-stage 1 asks for GPUs but the Ray cluster has none"):
        run_ray_extraction(model=gpt2_dir, prompts=PROMPTS, out=tmp_path / "run", stages=2, gpus_per_stage=1)
    assert time.monotonic() - started < 10 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("options,words", [
    (dict(stages=2, workers=2), "--workers size the data-parallel worker pool"),
    (dict(stages=2, cpus_per_worker=1), "--cpus-per-worker size the data-parallel"),
    (dict(cpus_per_stage=1), "--cpus-per-stage only apply to pipeline stages; add --stages K"),
    (dict(stages=2, cpus_per_stage=0), "cpus_per_stage=0 must be > 0"),
    (dict(stages=0), "stages=0 must be an integer >= 1"),
    (dict(stages=2, device="cpu", gpus_per_stage=1), "--device cpu contradicts --gpus-per-stage 1"),
])
def test_stage_options_are_checked_before_anything_runs(options, words, gpt2_dir, tmp_path):
    with pytest.raises(ConfigError, match=words):
        run_ray_extraction(model=gpt2_dir, prompts=PROMPTS, out=tmp_path / "run", **options)
    assert not (tmp_path / "run").exists()
