"""Ablation of heads, MLPs and neurons against independent computations (plain torch, weight surgery, numpy)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from handbuilt_induction import hooks_left

from neuronmap.errors import ConfigError, UnknownLayerError
from neuronmap.interventions import Ablation, resolve_components
from neuronmap.interventions.ablation import resample_partners

PROMPTS = ["the cat sat on the mat", "a dog ran to the park", "we like green tea"]
EQUAL = ["a b c d e", "a b the d e"]  # same token length under the tiny BPE


@pytest.fixture
def gpt2(tiny_model):
    return tiny_model("gpt2", head=True)


def lm_loss(logits, ids):
    """Mean next-token cross-entropy of one unpadded row (plain torch)."""
    return float(F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]))


def test_ablating_nothing_changes_nothing(gpt2):
    result = Ablation(gpt2).attribute(PROMPTS, layers=[], together=True)
    assert result.components == ["none"] and result.ablated[0] == result.clean and result.effect[0] == 0
    # the clean loss is the plain cross-entropy averaged over every predicted token
    losses, counts = [], []
    for text in PROMPTS:
        ids = gpt2.tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = gpt2.model(input_ids=ids).logits
        losses.append(lm_loss(logits, ids) * (ids.shape[1] - 1))
        counts.append(ids.shape[1] - 1)
    assert result.clean == pytest.approx(sum(losses) / sum(counts), abs=1e-5)
    # resampling from the very same prompts puts back what was there: nothing changes either
    same = Ablation(gpt2).attribute(EQUAL, method="resample", baselines=EQUAL,
                                    layers="blocks.*.attn.heads.*, blocks.*.mlp")
    np.testing.assert_allclose(same.ablated, same.clean, rtol=0, atol=1e-6)
    assert hooks_left(gpt2.model) == 0


def manual_attention(attn, x, zero_head=None):
    """GPT-2 attention in plain torch from its weights (Conv1D: x @ W + b), optionally with one head zeroed."""
    b, s, d = x.shape
    heads = attn.num_heads
    hd = d // heads
    q, k, v = (x @ attn.c_attn.weight + attn.c_attn.bias).split(d, dim=-1)
    q, k, v = (t.view(b, s, heads, hd).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    z = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d)
    if zero_head is not None:
        z[..., zero_head * hd:(zero_head + 1) * hd] = 0
    return z @ attn.c_proj.weight + attn.c_proj.bias


@pytest.mark.parametrize("block, head", [(1, 2), (0, 0)])
def test_zero_ablating_a_head_equals_a_plain_torch_attention(gpt2, block, head):
    text = PROMPTS[0]
    result = Ablation(gpt2).attribute(text, layers=f"blocks.{block}.attn.heads.{head}")
    pair = Ablation(gpt2).attribute(text, layers=f"blocks.{block}.attn.heads.{head}", target=(" the", " a"))
    model, tok = gpt2.model, gpt2.tokenizer
    ids = tok(text, return_tensors="pt")["input_ids"]
    layer = model.transformer.h[block]
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[block]  # input of the block
        x = layer.ln_1(hidden)
        full = manual_attention(layer.attn, x)
        assert torch.allclose(full, layer.attn(x)[0], atol=1e-5)  # the manual attention is GPT-2's
        ablated = manual_attention(layer.attn, x, zero_head=head)
        handle = layer.attn.register_forward_hook(lambda m, a, out: (ablated, *out[1:]))
        try:
            logits = model(input_ids=ids).logits
        finally:
            handle.remove()
    assert result.ablated[0] == pytest.approx(lm_loss(logits, ids), abs=1e-5)
    the, a = (tok(t, add_special_tokens=False)["input_ids"][0] for t in (" the", " a"))
    assert pair.ablated[0] == pytest.approx(float(logits[0, -1, the] - logits[0, -1, a]), abs=1e-5)
    assert result.effect[0] != 0
    assert hooks_left(model) == 0


@pytest.mark.parametrize("family, proj", [("llama", "self_attn.o_proj"), ("gpt_neox", "attention.dense"),
                                          ("bert", "attention.output.dense"), ("opt", "self_attn.out_proj")])
def test_zero_head_equals_zeroing_its_output_projection_columns(tiny_model, family, proj):
    """Weight surgery: head h's slice of the projection input times zero == columns of W_O set to zero."""
    loaded = tiny_model(family, head=True)
    target = (5, 7)
    result = Ablation(loaded).attribute(PROMPTS, target=target, layers="blocks.1.attn.heads.1, blocks.0.attn.heads.3")
    block = loaded.adapter.resolve("blocks.1")[0].module
    module = block.get_submodule(proj)
    heads = loaded.model.config.num_attention_heads
    hd = module.in_features // heads
    surgery = tiny_model(family, head=True)
    w = surgery.adapter.resolve("blocks.1")[0].module.get_submodule(proj).weight
    with torch.no_grad():
        w[:, hd:2 * hd] = 0
    expected = Ablation(surgery).attribute(PROMPTS, target=target, layers=[], together=True).clean
    assert result.ablated[0] == pytest.approx(expected, abs=1e-5)
    assert result.ablated[0] != pytest.approx(result.clean, abs=1e-7)


def test_mean_and_resample_match_manual_replacements(gpt2):
    """Mean over the batch's real tokens and row-wise resampling, checked with plain forward hooks."""
    model, tok = gpt2.model, gpt2.tokenizer
    mlp = model.transformer.h[0].mlp
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    captured = {}
    handle = mlp.register_forward_hook(lambda m, a, out: captured.setdefault("x", out.detach()))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    mask = batch["attention_mask"].bool()
    mean = captured["x"][mask].double().mean(0).float()
    neurons = [3, 10]
    result = Ablation(gpt2).attribute(PROMPTS, method="mean", layers="blocks.0.mlp, blocks.0.mlp[3,10]")
    assert result.components == ["blocks.0.mlp", "blocks.0.mlp[3,10]"]

    def loss_with(replace):
        total, count = 0.0, 0
        for text in PROMPTS:
            ids = tok(text, return_tensors="pt")["input_ids"]
            h = mlp.register_forward_hook(lambda m, a, out: replace(out.clone()))
            try:
                with torch.no_grad():
                    logits = model(input_ids=ids).logits
            finally:
                h.remove()
            total += lm_loss(logits, ids) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
        return total / count

    def whole(out):
        out[...] = mean
        return out

    def some(out):
        out[..., neurons] = mean[neurons]
        return out

    assert result.ablated[0] == pytest.approx(loss_with(whole), abs=1e-5)
    assert result.ablated[1] == pytest.approx(loss_with(some), abs=1e-5)

    # resample: input r gets the MLP output of baseline r
    resampled = Ablation(gpt2).attribute(EQUAL[:1], method="resample", baselines=EQUAL[1:], layers="blocks.0.mlp",
                                         target=(" c", " the"))
    ids_a, ids_b = (tok(t, return_tensors="pt")["input_ids"] for t in EQUAL)
    handle = mlp.register_forward_hook(lambda m, a, out: captured.__setitem__("b", out.detach()))
    with torch.no_grad():
        model(input_ids=ids_b)
    handle.remove()
    handle = mlp.register_forward_hook(lambda m, a, out: captured["b"])
    with torch.no_grad():
        logits = model(input_ids=ids_a).logits[0, -1]
    handle.remove()
    c, the = (tok(t, add_special_tokens=False)["input_ids"][0] for t in (" c", " the"))
    assert resampled.ablated[0] == pytest.approx(float(logits[c] - logits[the]), abs=1e-5)


def test_resample_partners_rule():
    """Input r takes the next input of its token length in prompt order, cycling; never itself."""
    names = [f"p{i}" for i in range(6)]
    assert resample_partners(names[:4], [5, 5, 5, 5]) == [1, 2, 3, 0]  # one length: input r + 1
    assert resample_partners(names[:2], [3, 3]) == [1, 0]
    assert resample_partners(names, [5, 8, 5, 8, 8, 5]) == [2, 3, 5, 4, 1, 0]
    with pytest.raises(ConfigError) as info:
        resample_partners(names[:3], [5, 8, 5])
    assert "\n" not in str(info.value) and "'p1'" in str(info.value) and "only one with 8 tokens" in str(info.value)
    with pytest.raises(ConfigError, match="only one with 4 tokens"):
        resample_partners(["a b c"], [4])


def test_resample_takes_the_next_prompt_of_the_same_length(gpt2):
    """Neighbouring prompts of different lengths: each takes the values of its same-length partner, checked
    against plain forward hooks on unpadded single-prompt forwards."""
    model, tok = gpt2.model, gpt2.tokenizer
    mixed = ["a b c d e", "we like green tea", "a b the d e", "we like red tea", "the cat sat on the mat"]
    lengths = [len(tok(t)["input_ids"]) for t in mixed]
    assert lengths == [5, 8, 5, 8, 8]
    partner = {0: 2, 2: 0, 1: 3, 3: 4, 4: 1}  # the documented rule, written out by hand
    result = Ablation(gpt2, batch_size=2).attribute(mixed, method="resample", layers="blocks.0.mlp, blocks.1.mlp")
    assert result.components == ["blocks.0.mlp", "blocks.1.mlp"]

    for i, block in enumerate((0, 1)):
        mlp = model.transformer.h[block].mlp
        total, count = 0.0, 0
        for r, text in enumerate(mixed):
            source = tok(mixed[partner[r]], return_tensors="pt")["input_ids"]
            captured = {}
            handle = mlp.register_forward_hook(lambda m, a, out: captured.setdefault("x", out.detach().clone()))
            with torch.no_grad():
                model(input_ids=source)
            handle.remove()
            ids = tok(text, return_tensors="pt")["input_ids"]
            handle = mlp.register_forward_hook(lambda m, a, out: captured["x"])
            try:
                with torch.no_grad():
                    logits = model(input_ids=ids).logits
            finally:
                handle.remove()
            total += lm_loss(logits, ids) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
        assert result.ablated[i] == pytest.approx(total / count, abs=1e-5)
    assert np.all(result.effect != 0)
    # all prompts of one length: the rule is input r + 1 (cycling), the same as giving the rotated prompts
    rotated = Ablation(gpt2).attribute(EQUAL, method="resample", baselines=EQUAL[1:] + EQUAL[:1],
                                       layers="blocks.0.mlp")
    default = Ablation(gpt2).attribute(EQUAL, method="resample", layers="blocks.0.mlp")
    assert default.ablated[0] == rotated.ablated[0] and default.effect[0] != 0
    assert hooks_left(model) == 0


def test_mean_from_a_stored_run(gpt2, tiny_model_dir, tmp_path):
    """Per-token run of the same prompts: its means are the batch means, so both ablations agree."""
    from neuronmap import extract

    run = extract(str(tiny_model_dir("gpt2")), PROMPTS, layers="blocks.1.mlp", out=tmp_path / "run", pooling="none",
                  device="cpu")
    from_run = Ablation(gpt2).attribute(PROMPTS, method="mean", layers="blocks.1.mlp, blocks.1.mlp[7]", run=run.path)
    from_batch = Ablation(gpt2).attribute(PROMPTS, method="mean", layers="blocks.1.mlp, blocks.1.mlp[7]")
    np.testing.assert_allclose(from_run.ablated, from_batch.ablated, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="per-head"):
        Ablation(gpt2).attribute(PROMPTS, method="mean", layers="blocks.1.attn.heads.0", run=run.path)
    with pytest.raises(ConfigError, match="no layer 'blocks.0.mlp'"):
        Ablation(gpt2).attribute(PROMPTS, method="mean", layers="blocks.0.mlp", run=run.path)


def test_component_specs(gpt2):
    names = [c.name for c in resolve_components(gpt2, "blocks.0-1.attn.heads.1-2, blocks.2.mlp[0-2], blocks.*.attn")]
    assert names == ["blocks.0.attn.heads.1", "blocks.0.attn.heads.2", "blocks.1.attn.heads.1", "blocks.1.attn.heads.2",
                     "blocks.2.mlp[0,1,2]", "blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    heads = resolve_components(gpt2, "blocks.2.attn.heads")
    assert [c.index for c in heads] == [(h, 16) for h in range(4)]
    assert heads[0].site.module is gpt2.model.transformer.h[2].attn.c_proj


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(layers="blocks.9.mlp"), UnknownLayerError, ["blocks.9.mlp"]),
    (dict(layers="blocks.0.attn.heads.7"), ConfigError, ["head", "7", "4"]),
    (dict(layers="blocks.0.mlp[999]"), ConfigError, ["999", "64 features"]),
    (dict(layers="blocks.0.attn.pattern"), ConfigError, ["pattern"]),
    (dict(method="shuffle"), ConfigError, ["zero, mean, resample"]),
    # PROMPTS tokenise to 8, 7 and 8 tokens: the 7-token prompt has no partner to resample from
    (dict(method="resample"), ConfigError, ["same token length", "'a dog ran to the park'", "only one with 7 tokens"]),
    (dict(method="resample", baselines=EQUAL), ConfigError, ["equal token length", "'a b c d e'"]),
    (dict(target=(" cat dog bird", " a")), ConfigError, ["not one token"]),
    (dict(target=(10 ** 9, 3)), ConfigError, ["vocabulary"]),
])
def test_bad_input_is_a_one_line_error(gpt2, kwargs, error, words):
    with pytest.raises(error) as info:
        Ablation(gpt2).attribute(PROMPTS, **{"layers": "blocks.0.attn.heads.0", **kwargs})
    assert "\n" not in str(info.value) and all(w in str(info.value) for w in words), str(info.value)
    assert hooks_left(gpt2.model) == 0


def test_loss_needs_a_next_token_model(tiny_model):
    bert = tiny_model("bert", head=True)
    with pytest.raises(ConfigError, match="not a next-token model"):
        Ablation(bert).attribute(PROMPTS, layers="blocks.0.mlp")
