"""Pipeline-parallel model shards: stages load only their weights and reproduce the unsharded model exactly.

Two references: the local engine (`neuronmap.extract`, hooks on the whole model) and the model's own
`output_hidden_states`. Equality is exact (`assert_array_equal`) on CPU float32. CPU kernels pick
their reduction order by the intra-op thread count, so references run with the stages' one thread.

In-process tests chain `StageWorker`s without Ray (every supported family, K = 2 and 3); the Ray tests
run real stage actors on the session's local cluster (GPT-2, Llama, BERT; K = 2 and 3).
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from actors.errors import WorkerError
from actors.pipeline import PipelineExtractor, PipelineOptions, run_pipeline_extraction, split_blocks
from actors.stage_loading import load_stage_model
from actors.stage_runners import SUPPORTED_FAMILIES
from actors.stage_worker import StageWorker
from neuronmap.errors import ConfigError
from neuronmap.extraction import (BatchPooler, extract_shard, length_sorted_batches, pad_batch, plan_extraction,
                                  tokenize_prompts)
from neuronmap.models.loading import load_model

SMALL = dict(num_cpus_per_stage=0.5)  # stage actors fit the shared test cluster next to other tests

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world",
    "Pipelines keep every stage busy at once.",
    "A",
    "Transformers cut into contiguous block ranges still add up to the same numbers, bit for bit.",
    "Short prompt here",
    "Micro-batches flow from stage to stage as object references.",
    "Paris is the capital of France.",
    "one two three four five six seven eight nine ten eleven twelve",
    "Why?",
    "Activations are captured where the layer lives.",
    "Large models do not fit one device, so they are split.",
    "The end.",
    "Numbers: 1 2 3 4 5 6 7 8 9",
]


@pytest.fixture
def one_thread():
    """References computed with the stages' thread count (1): same kernels, same reduction order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def reference_run(model_dir, tmp_path, layers, pooling, batch_size, samples_per_shard):
    """Arrays of the local engine, through the public API: {layer: ndarray} in row order."""
    from neuronmap import extract

    run = extract(str(model_dir), TEXTS, layers=layers, out=tmp_path / f"ref-{pooling}", pooling=pooling,
                  batch_size=batch_size, samples_per_shard=samples_per_shard, max_length=64, device="cpu")
    return {name: run.array(name) for name in run.layers}


def concat_shards(shards):
    shards = list(shards)
    return {name: np.concatenate([arrays[name] for _, arrays in shards]) for name in shards[0][1]}


def hidden_states_reference(loaded, tokens, shards, batch_size):
    """Per-token rows of `output_hidden_states`, batched exactly as the extraction batches them."""
    out: dict[int, list] = {}
    for samples in shards:
        rows: dict[int, dict[int, np.ndarray]] = {}
        for local in length_sorted_batches(tokens.lengths[samples.start:samples.stop], batch_size):
            index = local + samples.start
            ids, mask = pad_batch([tokens.ids[i] for i in index], loaded.tokenizer.pad_token_id, torch.device("cpu"))
            extra = {"use_cache": False} if "use_cache" in inspect.signature(loaded.model.forward).parameters else {}
            with torch.inference_mode():
                states = loaded.model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                                      **extra).hidden_states
            for level, state in enumerate(states):
                for row, sample in enumerate(index):
                    rows.setdefault(level, {})[int(sample)] = state[row, : tokens.lengths[sample]].numpy()
        for level, by_sample in rows.items():
            out.setdefault(level, []).extend(by_sample[s] for s in samples)
    return {level: np.concatenate(parts) for level, parts in out.items()}


# ------------------------------------------------------------------------------------ in-process
def chain_in_process(extractor, tokens, shards, batch_size, pattern_width):
    """What the Ray driver does, with StageWorkers in this process: {layer: rows in sample order}."""
    workers = [StageWorker(spec) for spec in extractor.layout()]
    assert all(worker.failed is None for worker in workers), [w.failed for w in workers]
    per_token = extractor.pooling == "none"
    out: dict[str, list] = {}
    for samples in shards:
        parts: dict[str, dict[int, np.ndarray]] = {}
        for local in length_sorted_batches(tokens.lengths[samples.start:samples.stop], batch_size):
            index = local + samples.start
            ids, mask = pad_batch([tokens.ids[i] for i in index], extractor.tokenizer.pad_token_id, torch.device("cpu"))
            payload, captured = {"input_ids": ids, "attention_mask": mask, "pattern_width": pattern_width}, {}
            for worker in workers:
                payload, layer_arrays = worker.forward(payload)
                captured.update(layer_arrays)
            for name, array in captured.items():
                sizes = tokens.lengths[index] if per_token else np.ones(len(index), dtype=int)
                for sample, chunk in zip(index, np.split(array, np.cumsum(sizes)[:-1])):
                    parts.setdefault(name, {})[int(sample)] = chunk
        for name, by_sample in parts.items():
            out.setdefault(name, []).extend(by_sample[s] for s in samples)
    return {name: np.concatenate(chunks) for name, chunks in out.items()}


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_stages_in_process_equal_unsharded_model(family, stages, tiny_model_dir, one_thread):
    model_dir = tiny_model_dir(family)
    loaded = load_model(model_dir, device="cpu")
    tokens = tokenize_prompts(loaded.tokenizer, TEXTS, 64)
    shards, batch = [range(0, 6), range(6, len(TEXTS))], 4
    extractor = PipelineExtractor(model_dir, "all", pooling="none", options=PipelineOptions(stages=stages))
    got = chain_in_process(extractor, tokens, shards, batch, int(tokens.lengths.max()))

    plan = plan_extraction(loaded, "all", "none", torch.float32, tokens, 6)
    pooler = BatchPooler("none", torch.float32, int(tokens.lengths.max()))
    want = concat_shards((s, extract_shard(loaded, plan, tokens, s, pooler, batch)) for s in shards)
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)

    states = hidden_states_reference(loaded, tokens, shards, batch)
    n = extractor.ranges[-1].stop
    np.testing.assert_array_equal(got["embed"], states[0])
    for block in range(n - 1):
        np.testing.assert_array_equal(got[f"blocks.{block}"], states[block + 1], err_msg=f"blocks.{block}")
    np.testing.assert_array_equal(got["final"], states[n])


def test_qwen2_sliding_window_layers_get_their_own_mask(tiny_model_dir, tmp_path, one_thread):
    """Qwen2 with mixed layer types: each stage gives each block the mask of its layer type."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("qwen2"))
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, use_sliding_window=True, sliding_window=4,
                         max_window_layers=1, pad_token_id=tokenizer.pad_token_id)
    assert config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).eval().save_pretrained(tmp_path / "qwen2-sliding")
    tokenizer.save_pretrained(tmp_path / "qwen2-sliding")
    loaded = load_model(tmp_path / "qwen2-sliding", device="cpu")
    tokens = tokenize_prompts(loaded.tokenizer, TEXTS, 64)
    shards = [range(0, len(TEXTS))]
    extractor = PipelineExtractor(tmp_path / "qwen2-sliding", "embed,blocks.*", pooling="none",
                                  options=PipelineOptions(stages=2))
    got = chain_in_process(extractor, tokens, shards, 4, int(tokens.lengths.max()))
    states = hidden_states_reference(loaded, tokens, shards, 4)
    np.testing.assert_array_equal(got["embed"], states[0])
    for block in range(2):
        np.testing.assert_array_equal(got[f"blocks.{block}"], states[block + 1], err_msg=f"blocks.{block}")


def test_each_stage_reads_only_its_own_tensors(tiny_model_dir, monkeypatch):
    import safetensors

    model_dir = tiny_model_dir("gpt2")
    real_open = safetensors.safe_open
    read: list[str] = []

    class Spy:
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.inner.get_tensor(key)

    full = load_model(model_dir, device="cpu").model
    monkeypatch.setattr(safetensors, "safe_open", Spy)
    total = sum(p.numel() for p in full.parameters())
    expected = [
        {k for k in full.state_dict() if k.startswith(("wte.", "wpe.", "h.0."))},
        {k for k in full.state_dict() if k.startswith(("h.1.", "h.2.", "ln_f."))},
    ]
    for stage, (blocks, owned) in enumerate(zip(split_blocks(3, 2), expected)):
        read.clear()
        model, report = load_stage_model(model_dir, blocks, first=stage == 0, last=stage == 1)
        assert set(model.state_dict()) == owned
        assert sorted(read) == sorted(f"transformer.{k}" for k in owned)  # each owned tensor once, nothing else
        assert sorted(report.loaded_keys) == sorted(read)
        assert report.n_params == sum(full.state_dict()[k].numel() for k in owned) < total
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(tensor, full.state_dict()[name], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "bert"])
def test_non_persistent_buffers_are_recomputed(family, tiny_model_dir):
    model_dir = tiny_model_dir(family)
    full = dict(load_model(model_dir, device="cpu").model.named_buffers())
    model, _ = load_stage_model(model_dir, range(0, 1), first=True, last=False)
    buffers = dict(model.named_buffers())
    assert buffers, "the first stage owns the rotary / position buffers"
    for name, buffer in buffers.items():
        assert torch.equal(buffer, full[name]), name


def test_split_blocks_is_contiguous_and_balanced():
    assert split_blocks(12, 2) == [range(0, 6), range(6, 12)]
    assert split_blocks(7, 3) == [range(0, 2), range(2, 4), range(4, 7)]
    assert split_blocks(3, 3) == [range(0, 1), range(1, 2), range(2, 3)]


# ------------------------------------------------------------------------------------- bad input
def test_bad_inputs_are_one_line_config_errors(tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    gpt2 = tiny_model_dir("gpt2")
    broken = tmp_path / "broken"
    shutil.copytree(gpt2, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["transformer.h.2.mlp.c_fc.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    no_weights = tmp_path / "no-weights"
    shutil.copytree(gpt2, no_weights)
    (no_weights / "model.safetensors").unlink()
    cases = [
        (dict(model=gpt2, options=PipelineOptions(stages=4)),
         r"stages=4 must be between 1 and the model's number of blocks \(3\); use --stages 3 or fewer"),
        (dict(model=gpt2, options=PipelineOptions(stages=0)), "stages=0 must be between 1"),
        (dict(model=tiny_model_dir("t5")),
         "do not support model family 't5': supported are gpt2, llama, mistral, qwen2, bert, roberta, distilbert"),
        (dict(model=tiny_model_dir("bert"), layers="module:pooler.dense"), "outside what pipeline stages run"),
        (dict(model=gpt2, pooling="sum"), "pooling='sum' is not supported"),
        (dict(model=gpt2, options=PipelineOptions(micro_batch_size=0)), "micro_batch_size=0 must be >= 1"),
        (dict(model=broken), r"lacks 1 weights the pipeline stages need \(h\.2\.mlp\.c_fc\.weight\)"),
        (dict(model=no_weights), "no safetensors checkpoint"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message) as caught:
            PipelineExtractor(**kwargs).layout()
        assert "\n" not in str(caught.value)
    with pytest.raises(RuntimeError, match="stages are not running"):
        next(PipelineExtractor(gpt2).stream([(0, [[1, 2]])], pattern_width=2))


def test_stages_past_the_last_requested_layer_are_not_started(tiny_model_dir):
    extractor = PipelineExtractor(tiny_model_dir("llama"), "blocks.0.mlp,blocks.1", options=PipelineOptions(stages=3))
    specs = extractor.layout()
    assert [(s.blocks, s.layers, s.stop) for s in specs] == [(range(0, 1), ("blocks.0.mlp",), False),
                                                            (range(1, 2), ("blocks.1",), True)]


def test_gpus_on_a_cluster_without_gpus_fail_fast(ray_cluster, tiny_model_dir):
    options = PipelineOptions(stages=2, num_gpus_per_stage=1)
    with pytest.raises(ConfigError, match=r"2 pipeline stages with 1 CPUs and 1 GPUs each do not fit"):
        PipelineExtractor(tiny_model_dir("gpt2"), options=options).start()


# ------------------------------------------------------------------------------------ Ray actors
@pytest.fixture(scope="module")
def wide_gpt2(tmp_path_factory, tiny_model_dir):
    """A GPT-2 wide enough (d=256, 4 blocks) that a stage's forward outlasts Ray's per-call overhead."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("wide-gpt2")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("gpt2"))
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=256, n_layer=4, n_head=4)
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def busy_since(pipe, since):
    import ray

    return [[i for i in ray.get(actor.busy_intervals.remote()) if i[0] > since] for actor in pipe.actors]


@pytest.fixture(scope="class")
def gpt2_pipe(ray_cluster, wide_gpt2):
    """Two GPT-2 stage actors shared by the tests of TestGpt2Pipeline (and stopped after them)."""
    with PipelineExtractor(wide_gpt2, "all", pooling="none", options=PipelineOptions(stages=2, **SMALL)) as pipe:
        yield pipe


class TestGpt2Pipeline:
    """GPT-2 (d=256, 4 blocks) on two stage actors: exactness, weights per stage, pipelining, errors."""

    def test_gpt2_two_stages_equal_local_engine_and_hidden_states(self, gpt2_pipe, wide_gpt2, tmp_path, one_thread):
        loaded = load_model(wide_gpt2, device="cpu")
        tokens = tokenize_prompts(loaded.tokenizer, TEXTS, 64)
        plan = gpt2_pipe.plan(tokens, samples_per_shard=6)
        shards = [range(0, 6), range(6, 12), range(12, 14)]
        got = concat_shards(gpt2_pipe.iter_shards(plan, tokens, shards, batch_size=4))

        want = reference_run(wide_gpt2, tmp_path, "all", "none", batch_size=4, samples_per_shard=6)
        assert list(got) == list(want) and {n: a.shape[1:] for n, a in got.items()} == plan.shapes
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        states = hidden_states_reference(loaded, tokens, shards, batch_size=4)
        np.testing.assert_array_equal(got["embed"], states[0])
        for block in range(3):
            np.testing.assert_array_equal(got[f"blocks.{block}"], states[block + 1])
        np.testing.assert_array_equal(got["final"], states[4])

        # every stage holds only its part: keys, parameter share
        info = gpt2_pipe.info()
        full = loaded.model.state_dict()
        assert [i["blocks"] for i in info] == [range(0, 2), range(2, 4)]
        assert all(k.startswith(("wte.", "wpe.", "h.0.", "h.1.")) for k in info[0]["state_keys"])
        assert all(k.startswith(("h.2.", "h.3.", "ln_f.")) for k in info[1]["state_keys"])
        assert set(info[0]["state_keys"]) | set(info[1]["state_keys"]) == set(full)
        total = sum(v.numel() for v in full.values())
        assert sum(i["n_params"] for i in info) == total and max(i["n_params"] for i in info) < 0.7 * total

    def test_micro_batches_overlap_across_stages(self, gpt2_pipe):
        import time

        tokenizer = gpt2_pipe.tokenizer
        batches = [(m, [tokenizer(t)["input_ids"] for t in TEXTS[:4]] * 2) for m in range(12)]
        began = time.time()
        pipelined = list(gpt2_pipe.stream(batches, pattern_width=64))
        first, second = busy_since(gpt2_pipe, began)
        assert [key for key, _ in pipelined] == list(range(12)) and len(first) == len(second) == 12
        # stage 0 ran micro-batch m+1 while stage 1 ran micro-batch m: both stages busy at the same time
        overlaps = sum(1 for a0, a1, _ in first for b0, b1, _ in second if a0 < b1 and b0 < a1)
        assert overlaps >= 3, (first, second)

        # one micro-batch in flight: never both busy, same arrays
        saved = gpt2_pipe.options
        gpt2_pipe.options = PipelineOptions(stages=2, max_in_flight=1, **SMALL)
        try:
            began = time.time()
            one_by_one = list(gpt2_pipe.stream(batches, pattern_width=64))
            first, second = busy_since(gpt2_pipe, began)
        finally:
            gpt2_pipe.options = saved
        assert not any(a0 < b1 and b0 < a1 for a0, a1, _ in first for b0, b1, _ in second)
        for (_, a), (_, b) in zip(pipelined, one_by_one):
            for name in a:
                np.testing.assert_array_equal(a[name], b[name])

    def test_stage_failure_comes_back_typed(self, gpt2_pipe):
        out_of_vocab = gpt2_pipe.tokenizer.vocab_size + 1000
        with pytest.raises(WorkerError, match="failed in pipeline stage 0: IndexError") as caught:
            list(gpt2_pipe.stream([(0, [[1, 2, out_of_vocab]])], pattern_width=3))
        assert isinstance(caught.value.cause, IndexError)
        _, arrays = next(gpt2_pipe.stream([(0, [[1, 2, 3]])], pattern_width=3))  # the stages still work
        assert arrays["final"].shape == (3, 256)


def test_llama_two_stages_with_patterns_equal_local_engine(ray_cluster, tiny_model_dir, tmp_path, one_thread):
    model_dir = tiny_model_dir("llama")
    layers = "all,blocks.*.attn.pattern"
    want = reference_run(model_dir, tmp_path, layers, "mean", batch_size=4, samples_per_shard=5)
    got = concat_shards(run_pipeline_extraction(model_dir, TEXTS, layers=layers, pooling="mean", batch_size=4,
                                                samples_per_shard=5, max_length=64,
                                                options=PipelineOptions(stages=2, **SMALL)))
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_bert_three_stages_equal_local_engine(ray_cluster, tiny_model_dir, tmp_path, one_thread):
    model_dir = tiny_model_dir("bert")
    want = reference_run(model_dir, tmp_path, "all", "mean", batch_size=3, samples_per_shard=7)
    with PipelineExtractor(model_dir, "all", pooling="mean", options=PipelineOptions(stages=3, **SMALL)) as pipe:
        assert [i["blocks"] for i in pipe.stage_info] == [range(0, 1), range(1, 2), range(2, 3)]
        tokens = tokenize_prompts(pipe.tokenizer, TEXTS, 64)
        plan = pipe.plan(tokens, samples_per_shard=7)
        got = concat_shards(pipe.iter_shards(plan, tokens, [range(0, 7), range(7, 14)], batch_size=3))
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
