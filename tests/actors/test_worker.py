"""The worker side in-process, without Ray: the tokenise stage and ExtractionWorker on shard rows.

This is the STYLE rule "try the worker on a batch in-process first": it pins that a worker computes
exactly what the local engine computes (same shard boundaries, batches and bytes), so the Ray tests
only have to show the distribution around it.
"""

import pickle

import numpy as np
import pytest
from actorstest_util import PROMPTS

import neuronmap
from actors.engine import _shard_table
from actors.errors import WorkerError, WorkerUserError
from actors.worker import ExtractionWorker, WorkerSpec, tokenize_shards
from neuronmap.errors import UnknownModelError
from neuronmap.extraction import new_manifest, plan_run
from neuronmap.models import load_model
from neuronmap.prompts import load_prompts, prompt_source_hash
from neuronmap.store import RunWriter, open_run


def spec_for(plan, run, pooling, dtype="float32", batch_size=3):
    return WorkerSpec(run=str(run), source=plan.source, device="cpu", model_dtype="auto", config_hash=plan.config_hash,
                      shapes=dict(plan.shapes), kinds=dict(plan.kinds), pooling=pooling, dtype=dtype,
                      batch_size=batch_size, max_length=plan.max_length, pattern_width=plan.pattern_width)


@pytest.mark.parametrize("pooling,layers", [("mean", "blocks.*"), ("none", "embed,blocks.1,blocks.0.attn.pattern")])
def test_worker_commits_the_same_shards_as_the_local_engine(pooling, layers, gpt2_dir, tmp_path, one_thread):
    local = neuronmap.extract(gpt2_dir, PROMPTS, layers=layers, out=tmp_path / "local", pooling=pooling,
                              samples_per_shard=5, batch_size=3)
    frame = load_prompts(PROMPTS)
    plan, _, _ = plan_run(load_model(gpt2_dir, device="cpu"), frame["text"].tolist(), layers, pooling, "float32",
                          512, 5)
    writer = RunWriter(tmp_path / "worker", new_manifest(plan, PROMPTS, prompt_source_hash(frame), pooling, "float32",
                                                         "hdf5", None, 3))
    writer.write_prompts(frame)
    worker = ExtractionWorker(spec_for(plan, tmp_path / "worker", pooling))
    per_token = pooling == "none"
    texts = frame["text"].tolist()
    for index, samples in reversed(list(enumerate(plan.shards()))):  # order does not matter
        table = _shard_table(index, samples, plan.first_row(samples.start, per_token), plan.lengths,
                             texts[samples.start : samples.stop])
        records = worker(tokenize_shards(table, plan.source, plan.max_length)).to_pylist()
        assert [r["shard"] for r in records] == [index] and len(records[0]["paths"]) == len(plan.layers)
    writer.complete()
    run = open_run(tmp_path / "worker")
    for layer in local.layers:
        np.testing.assert_array_equal(run.array(layer), local.array(layer))
    by_path = {s.path: s.sha256 for s in local.manifest.shards}
    assert {s.path: s.sha256 for s in run.manifest.shards} == by_path  # byte-identical shard files


def test_a_retried_shard_is_skipped_not_duplicated(gpt2_dir, tmp_path, one_thread):
    frame = load_prompts(PROMPTS)
    plan, _, _ = plan_run(load_model(gpt2_dir, device="cpu"), frame["text"].tolist(), "blocks.0", "mean", "float32",
                          512, 6)
    writer = RunWriter(tmp_path / "r", new_manifest(plan, PROMPTS, prompt_source_hash(frame), "mean", "float32", "hdf5",
                                                    None, 3))
    worker = ExtractionWorker(spec_for(plan, tmp_path / "r", "mean"))
    first_shard = plan.shards()[0]
    table = tokenize_shards(_shard_table(0, first_shard, 0, plan.lengths, frame["text"].tolist()[:first_shard.stop]),
                            plan.source, plan.max_length)
    first, again = worker(table).to_pylist()[0], worker(table).to_pylist()[0]
    assert len(first["paths"]) == 1 and again["paths"] == [] and again["samples"] == first["samples"]
    assert len(writer.update().shards) == 1


def test_unloadable_model_raises_a_typed_picklable_worker_error(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    spec = WorkerSpec(run=str(tmp_path / "run"), source=str(broken), device="cpu", model_dtype="auto",
                      config_hash="x", shapes={"blocks.0": (64,)}, kinds={"blocks.0": "hidden"}, pooling="mean",
                      dtype="float32", batch_size=2, max_length=16, pattern_width=4)
    with pytest.raises(WorkerUserError) as caught:
        ExtractionWorker(spec)
    error = pickle.loads(pickle.dumps(caught.value))
    assert type(error) is WorkerUserError and isinstance(error, WorkerError)
    assert isinstance(error.cause, UnknownModelError) and str(broken) in str(error.cause)
    assert error.worker and "\n" not in str(error)


def test_tokenise_stage_reads_a_shards_texts_from_the_prompt_table(gpt2_dir, tmp_path):
    frame = load_prompts(PROMPTS)
    plan, _, _ = plan_run(load_model(gpt2_dir, device="cpu"), frame["text"].tolist(), "blocks.0", "mean", "float32",
                          512, 4)
    frame.to_parquet(tmp_path / "prompts.parquet", index=False, row_group_size=3)
    texts = frame["text"].tolist()
    for index, samples in enumerate(plan.shards()):
        with_texts = tokenize_shards(_shard_table(index, samples, samples.start, plan.lengths,
                                                  texts[samples.start : samples.stop]), plan.source, plan.max_length)
        from_table = tokenize_shards(_shard_table(index, samples, samples.start, plan.lengths), plan.source,
                                     plan.max_length, prompts=str(tmp_path / "prompts.parquet"))
        assert from_table.equals(with_texts)
    with pytest.raises(WorkerUserError, match="not visible on this node"):
        tokenize_shards(_shard_table(0, plan.shards()[0], 0, plan.lengths), plan.source, plan.max_length,
                        prompts=str(tmp_path / "missing.parquet"))
