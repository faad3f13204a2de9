"""Causal tracing on a tiny random GPT-2: known answers, the noise recipe, hook hygiene."""

import numpy as np
import pytest
import torch
from handbuilt_induction import hooks_left

from neuronmap.errors import ConfigError, UnknownLayerError
from neuronmap.interventions import CausalTracing

PROMPT = "the cat sat on the mat and"


@pytest.fixture
def gpt2(tiny_model):
    return tiny_model("gpt2", head=True)


def test_zero_noise_has_zero_effect(gpt2):
    result = CausalTracing(gpt2, batch_size=16).attribute(PROMPT, subject="cat", noise=0.0, samples=2)
    assert result.noise_std == 0
    assert result.corrupted_prob == pytest.approx(result.clean_prob, abs=1e-7)
    np.testing.assert_allclose(result.effect, 0.0, atol=1e-7)
    np.testing.assert_allclose(result.probs, result.clean_prob, atol=1e-7)
    assert hooks_left(gpt2.model) == 0


def test_restoring_every_state_at_a_layer_restores_the_clean_probability(gpt2):
    tracing = CausalTracing(gpt2)
    result = tracing.attribute(PROMPT, subject="cat", positions="all", samples=3)
    assert result.probs.shape == (gpt2.adapter.n_blocks, 1)
    assert abs(result.corrupted_prob - result.clean_prob) > 1e-5  # the noise does something
    np.testing.assert_allclose(result.probs[:, 0], result.clean_prob, rtol=0, atol=1e-6)
    each = tracing.attribute(PROMPT, subject="cat", samples=3)
    # the last block's state at the last position is all the logits read
    assert each.probs[-1, -1] == pytest.approx(each.clean_prob, abs=1e-6)
    # positions before the subject never saw the noise: restoring them changes nothing
    np.testing.assert_allclose(each.probs[:, :each.subject[0]], each.corrupted_prob, atol=1e-7)
    subject = gpt2.tokenizer.convert_tokens_to_string(each.tokens[each.subject[0]:each.subject[1]])
    assert subject.strip() == "cat"


def test_corrupted_probability_follows_the_documented_noise(gpt2):
    """p(answer) under noise = mean over samples of a plain forward with inputs_embeds = wte(ids) + noise."""
    samples, seed = 4, 7
    result = CausalTracing(gpt2).attribute(PROMPT, subject="sat on", target=" the", samples=samples, seed=seed,
                                           noise=3.0, layers="blocks.0")
    model, tok = gpt2.model, gpt2.tokenizer
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    start, end = result.subject
    assert tok.convert_tokens_to_string(result.tokens[start:end]).strip() == "sat on"
    wte = model.transformer.wte
    std = float(wte.weight.detach().float().std())
    noise = torch.randn((samples, end - start, wte.weight.shape[1]), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        embeds = wte(ids).repeat(samples, 1, 1)
        embeds[:, start:end] += 3.0 * std * noise
        probs = torch.softmax(model(inputs_embeds=embeds).logits[:, -1], -1)
    answer = tok(" the", add_special_tokens=False)["input_ids"][0]
    assert result.answer == answer
    assert result.corrupted_prob == pytest.approx(float(probs[:, answer].mean()), abs=1e-6)
    assert result.noise_std == pytest.approx(3.0 * std)


def test_mlp_and_attention_variants_and_windows(gpt2):
    tracing = CausalTracing(gpt2)
    mlp = tracing.attribute(PROMPT, subject="cat", layers="blocks.*.mlp", samples=2)
    attn = tracing.attribute(PROMPT, subject="cat", layers="blocks.*.attn", samples=2, window=3)
    assert mlp.layers == [f"blocks.{i}.mlp" for i in range(3)] and attn.layers[0] == "blocks.0.attn"
    assert mlp.probs.shape == attn.probs.shape == (3, len(mlp.tokens))
    # a window as wide as the model restores the same set of layers for every row
    wide = tracing.attribute(PROMPT, subject="cat", layers="blocks.*.mlp", samples=2, window=3)
    np.testing.assert_allclose(wide.probs, np.repeat(wide.probs[:1], 3, axis=0), rtol=1e-5)
    assert not np.allclose(mlp.probs, mlp.corrupted_prob)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(subject="dog"), ConfigError, ["dog", "does not occur"]),
    (dict(subject="cat", target=" cat dog bird"), ConfigError, ["not one token"]),
    (dict(subject="cat", layers="blocks.7"), UnknownLayerError, ["blocks.7"]),
    (dict(subject="cat", noise=-1.0), ConfigError, ["noise"]),
    (dict(subject=(3, 99)), ConfigError, ["token range"]),
    (dict(subject="cat", layers="blocks.0.attn.pattern"), ConfigError, ["pattern"]),
])
def test_bad_input_is_a_one_line_error(gpt2, kwargs, error, words):
    with pytest.raises(error) as info:
        CausalTracing(gpt2).attribute(PROMPT, samples=1, **kwargs)
    assert "\n" not in str(info.value) and all(w in str(info.value) for w in words), str(info.value)
    assert hooks_left(gpt2.model) == 0


@pytest.mark.parametrize("fail_at", [1, 3])
def test_no_hook_left_after_a_failing_forward(gpt2, monkeypatch, fail_at):
    """Fails in the clean run (1) or while noise and restore hooks are registered (3)."""
    calls, forward = [], gpt2.model.lm_head.forward

    def boom(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("head failed")
        return forward(*args, **kwargs)

    monkeypatch.setattr(gpt2.model.lm_head, "forward", boom)
    with pytest.raises(RuntimeError, match="head failed"):
        CausalTracing(gpt2, batch_size=1).attribute(PROMPT, subject="cat", samples=1)
    assert hooks_left(gpt2.model) == 0
