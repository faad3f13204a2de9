"""Token attribution against known answers: completeness, efficiency, and plain-autograd references."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from neuronmap.attribution import TokenAttribution
from neuronmap.errors import ConfigError, NeuronMapError

TEXT = "The capital of France is Paris and the capital of Italy is"


@pytest.fixture
def gpt2(tiny_model):
    return tiny_model("gpt2", head=True)


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _reference(tiny_model_dir, family="gpt2", **kwargs):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family), **kwargs).eval()
    return model


@pytest.mark.parametrize("target", ["next-token", "logit-diff:' the',' of'", "neuron:blocks.1.mlp:5"])
def test_integrated_gradients_complete(gpt2, target):
    """Sum of IG attributions = f(input) - f(baseline) (Sundararajan et al. 2017, completeness)."""
    result = TokenAttribution(gpt2).attribute(TEXT, target=target, method="ig", n_steps=128)
    gap = result.target_value - result.baseline_value
    assert abs(result.scores.sum() - gap) < 1e-3 * max(1.0, abs(gap))
    assert abs(result.delta) < 1e-3 * max(1.0, abs(gap))
    assert result.scores.shape == (len(result.tokens),)
    assert _no_hooks(gpt2.model)


def test_layer_integrated_gradients_complete(gpt2):
    result = TokenAttribution(gpt2).attribute(TEXT, target="next-token", method="layer-ig", layer="blocks.0", n_steps=128)
    gap = result.target_value - result.baseline_value
    assert abs(result.scores.sum() - gap) < 2e-3 * max(1.0, abs(gap))


@pytest.mark.parametrize("family, layer, projection", [
    ("gpt2", "blocks.1.attn", "transformer.h.1.attn.c_proj"), ("gpt2", "blocks.1.mlp", "transformer.h.1.mlp.c_proj"),
    ("llama", "blocks.1.attn", "model.layers.1.self_attn.o_proj"), ("llama", "blocks.1.mlp", "model.layers.1.mlp.down_proj"),
])
def test_layer_ig_to_an_attention_or_mlp_output_equals_captum_on_its_output_projection(tiny_model, tiny_model_dir,
                                                                                        family, layer, projection):
    """Layer IG to a sublayer (it crashed on attention outputs): Captum's LayerIntegratedGradients on the output
    projection, whose output is that sublayer's output in eval mode, is the reference. The scores sum to the
    target's change when that output alone moves from its baseline value (the residual path stays at the
    prompt), so the reported delta is IG's integration error only."""
    from captum.attr import LayerIntegratedGradients
    from transformers import AutoTokenizer

    ours = TokenAttribution(tiny_model(family, head=True), baseline="zero").attribute(
        TEXT, target="next-token", method="layer-ig", layer=layer, n_steps=64)
    model = _reference(tiny_model_dir, family)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir(family))
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    assert tokenizer.convert_ids_to_tokens(ids[0].tolist()) == ours.tokens  # the same prompt tokens
    embeds = model.get_input_embeddings()(ids).detach()
    with torch.no_grad():
        token = int(model(inputs_embeds=embeds).logits[0, -1].argmax())
    module = model.get_submodule(projection)
    attr, delta = LayerIntegratedGradients(lambda x: model(inputs_embeds=x).logits[:, -1, token], module).attribute(
        embeds, baselines=torch.zeros_like(embeds), n_steps=64, return_convergence_delta=True)
    np.testing.assert_allclose(ours.scores, attr[0].sum(-1).detach().numpy(), rtol=1e-4, atol=1e-6)
    assert abs(ours.delta) < 1e-4 * max(1.0, float(np.abs(ours.scores).sum()))


@pytest.mark.parametrize("args, words", [
    (dict(method="layer-ig", layer="blocks.1.attn.pattern"), "blocks.1.attn.pattern holds attention weights, which "
                                                             "layer-ig cannot use: pick the attention output blocks.1.attn"),
    (dict(method="gradcam", layer="blocks.1.attn.pattern"), "which gradcam cannot use"),
    (dict(method="ig", target="neuron:blocks.1.attn.pattern:0"), "which a neuron: target cannot use"),
])
def test_attention_weights_are_refused_as_a_layer_to_attribute_to_in_one_line(gpt2, args, words):
    kwargs = {"target": "next-token", **args}
    with pytest.raises(ConfigError, match=words.replace(".", r"\.").replace("(", r"\(")):
        TokenAttribution(gpt2).attribute(TEXT, **kwargs)
    assert _no_hooks(gpt2.model)


def test_shapley_values_are_efficient(gpt2):
    """Shapley value sampling: every permutation's marginal gains add up to f(all) - f(none)."""
    result = TokenAttribution(gpt2).attribute(TEXT, target="next-token", method="shapley", n_samples=6)
    assert result.scores.sum() == pytest.approx(result.target_value - result.baseline_value, abs=1e-4)


def test_kernelshap_and_lime_roughly_efficient(gpt2):
    explainer = TokenAttribution(gpt2)
    for method in ("kernelshap", "lime"):
        result = explainer.attribute(TEXT, target="next-token", method=method, n_samples=400, seed=1)
        gap = result.target_value - result.baseline_value
        assert np.isfinite(result.scores).all()
        if method == "kernelshap":  # KernelSHAP's regression is weighted towards exact efficiency
            assert result.scores.sum() == pytest.approx(gap, abs=0.05 * max(1.0, abs(gap)))
    assert _no_hooks(gpt2.model)


def _manual_gradient(tiny_model_dir, gpt2, text):
    """d logit(predicted next token) / d token embeddings, with plain transformers and autograd."""
    model = _reference(tiny_model_dir)
    ids = torch.tensor([gpt2.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        predicted = int(model(input_ids=ids).logits[0, -1].argmax())
    embeds = model.transformer.wte(ids).detach().requires_grad_()
    model(inputs_embeds=embeds).logits[0, -1, predicted].backward()
    return embeds.detach(), embeds.grad


def test_saliency_and_grad_x_input_equal_plain_autograd(gpt2, tiny_model_dir):
    embeds, grad = _manual_gradient(tiny_model_dir, gpt2, TEXT)
    explainer = TokenAttribution(gpt2)
    saliency = explainer.attribute(TEXT, target="next-token", method="saliency")
    np.testing.assert_allclose(saliency.scores, grad.abs().sum(-1)[0].numpy(), rtol=1e-4, atol=1e-6)
    gxi = explainer.attribute(TEXT, target="next-token", method="grad-x-input")
    np.testing.assert_allclose(gxi.scores, (grad * embeds).sum(-1)[0].numpy(), rtol=1e-4, atol=1e-6)


def test_gradcam_equals_a_manual_map_from_hidden_states(gpt2, tiny_model_dir):
    model = _reference(tiny_model_dir)
    ids = torch.tensor([gpt2.tokenizer(TEXT)["input_ids"]])
    with torch.no_grad():
        predicted = int(model(input_ids=ids).logits[0, -1].argmax())
    out = model(input_ids=ids, output_hidden_states=True)
    hidden = out.hidden_states[2]  # output of block 1
    (grad,) = torch.autograd.grad(out.logits[0, -1, predicted], hidden)
    expected = torch.relu((grad.mean(dim=1, keepdim=True) * hidden).sum(-1))[0].detach().numpy()
    result = TokenAttribution(gpt2).attribute(TEXT, target="next-token", method="gradcam", layer="blocks.1")
    np.testing.assert_allclose(result.scores, expected, rtol=1e-4, atol=1e-6)


def test_rollout_equals_numpy_over_output_attentions(gpt2, tiny_model_dir):
    model = _reference(tiny_model_dir, attn_implementation="eager")
    ids = torch.tensor([gpt2.tokenizer(TEXT)["input_ids"]])
    with torch.no_grad():
        attentions = model(input_ids=ids, output_attentions=True).attentions
    n = ids.shape[1]
    rollout = np.eye(n)
    for layer in attentions:
        a = layer[0].mean(0).numpy()
        a = (a + np.eye(n)) / 2
        a = a / a.sum(-1, keepdims=True)
        rollout = a @ rollout
    result = TokenAttribution(gpt2).attribute(TEXT, method="rollout")
    np.testing.assert_allclose(result.scores, rollout[-1], rtol=1e-4, atol=1e-6)
    assert result.scores.sum() == pytest.approx(1.0, abs=1e-5)
    assert _no_hooks(gpt2.model)
    # a neuron of block 0 sees only block 0's attention (it multiplied through every block)
    a = attentions[0][0].mean(0).numpy()
    a = (a + np.eye(n)) / 2
    first = a / a.sum(-1, keepdims=True)
    neuron = TokenAttribution(gpt2).attribute(TEXT, target="neuron:blocks.0.mlp:3", method="rollout")
    np.testing.assert_allclose(neuron.scores, first[-1], rtol=1e-4, atol=1e-6)


def test_encoder_model_token_target(tiny_model):
    bert = tiny_model("bert", head=True)
    result = TokenAttribution(bert, position=2).attribute("paris is the capital of france", target="token:paris",
                                                          method="ig", n_steps=128)
    gap = result.target_value - result.baseline_value
    assert abs(result.scores.sum() - gap) < 1e-3 * max(1.0, abs(gap))
    assert result.scores[0] == 0 and result.scores[-1] == 0  # [CLS]/[SEP] are kept in the baseline


@pytest.mark.parametrize("kwargs, match", [
    (dict(target="token:Parisxyz"), "not one token of the vocabulary"),
    (dict(target="token:99999999"), "must be in"),
    (dict(target="neuron:blocks.99.mlp:1"), "blocks.99"),
    (dict(target="neuron:blocks.0.mlp:100000"), "units"),
    (dict(target="frobnicate"), "not known"),
    (dict(method="magic"), "not known"),
    (dict(method="gradcam", layer="blocks.*"), "exactly one"),
])
def test_bad_input_is_one_clear_error_and_leaves_no_hook(gpt2, kwargs, match):
    with pytest.raises(NeuronMapError, match=match):  # ConfigError, or UnknownLayerError listing the valid names
        TokenAttribution(gpt2).attribute(TEXT, **kwargs)
    assert _no_hooks(gpt2.model)


def test_position_outside_the_prompt(gpt2):
    with pytest.raises(ConfigError, match="outside the prompt"):
        TokenAttribution(gpt2, position=100).attribute("short prompt", method="saliency")


def test_cli_writes_an_artifact_with_every_method(tiny_model_dir, tmp_path):
    from neuronmap.analysis.artifacts import load_artifact
    from neuronmap.cli import main

    model = str(tiny_model_dir("gpt2"))
    code = main(["attribute", "-m", model, "-t", TEXT, "--method", "ig,shapley,rollout", "--steps", "32",
                 "--samples", "4", "-o", str(tmp_path / "a"), "--device", "cpu"])
    assert code == 0
    artifact = load_artifact(tmp_path / "a")
    assert artifact.result["analysis"] == "attribution"
    assert set(artifact.result["methods"]) == {"ig", "shapley", "rollout"}
    tokens = artifact.result["tokens"]
    for method in ("ig", "shapley", "rollout"):
        assert artifact.arrays[f"model/{method}"].shape == (len(tokens),)
    assert (tmp_path / "a" / "figure.html").stat().st_size > 0

    bad = subprocess.run([sys.executable, "-m", "neuronmap", "attribute", "-m", model, "-t", TEXT, "--target",
                          "token:Parisxyz", "-o", str(tmp_path / "b"), "--device", "cpu"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "not one token of the vocabulary" in bad.stderr
    assert "Traceback" not in bad.stderr + bad.stdout
    assert not (tmp_path / "b").exists()


def test_cli_refuses_a_layer_no_chosen_method_uses_before_loading_anything(tiny_model_dir, tmp_path, capsys):
    """`--method rollout --layer blocks.1` ran and ignored the layer (the Python API refused it)."""
    from neuronmap.cli import main

    code = main(["attribute", "-m", str(tiny_model_dir("gpt2")), "-t", TEXT, "--method", "rollout,ig", "--layer",
                 "blocks.1", "-o", str(tmp_path / "a"), "--device", "cpu"])
    assert code == 2 and "--layer applies to layer-ig, gradcam only" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_artifact_figure_shows_every_method_score(gpt2, tmp_path):
    """The gallery's figure of an attribution artifact carries the stored scores (row-scaled) per method."""
    from neuronmap.analysis.artifacts import load_artifact
    from neuronmap.interventions.artifacts import write_intervention
    from neuronmap.viz import figure_for_artifact
    from neuronmap.viz.attribution import token_attribution_figure

    explainer = TokenAttribution(gpt2)
    results = {m: explainer.attribute(TEXT, method=m, n_steps=16) for m in ("ig", "grad-x-input")}
    first = results["ig"]
    summary = {"tokens": first.tokens, "target": first.target, "target_description": first.target_description,
               "methods": {m: r.summary() for m, r in results.items()}, "layers": []}
    scores = {m: r.scores for m, r in results.items()}
    write_intervention(tmp_path / "a", "attribution", {"methods": list(results)}, summary, scores,
                       figure=token_attribution_figure(first.tokens, scores))
    figure = figure_for_artifact(load_artifact(tmp_path / "a"))
    heatmap = figure.data[0]
    assert list(heatmap.y) == ["ig", "grad-x-input"]
    np.testing.assert_allclose(np.asarray(heatmap.customdata, dtype=float), np.stack([scores["ig"], scores["grad-x-input"]]))
    for row, method in zip(np.asarray(heatmap.z, dtype=float), ("ig", "grad-x-input")):
        np.testing.assert_allclose(row, scores[method] / np.abs(scores[method]).max())


def test_cli_out_inside_a_regular_file_names_that_file(tiny_model_dir, tmp_path, capsys):
    from neuronmap.cli import main

    blocker = tmp_path / "afile"
    blocker.write_text("not a folder\n")
    for out in (blocker / "sub", blocker):
        code = main(["attribute", "-m", str(tiny_model_dir("gpt2")), "-t", TEXT, "--method", "saliency", "-o",
                     str(out), "--device", "cpu"])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"{blocker} is a file, not a folder" in err and "choose another output path" in err, err
    assert blocker.read_text() == "not a folder\n"


def test_summary_and_target_show_readable_tokens(gpt2):
    """Byte-level BPE pieces (`Ġthe`) are shown as text (` the`); the stored tokens stay the tokenizer's."""
    tokenizer = gpt2.tokenizer
    the = tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(tokenizer(" the")["input_ids"][0])])
    result = TokenAttribution(gpt2).attribute(TEXT, target=f"token:{the}", method="saliency")
    piece = tokenizer.convert_ids_to_tokens(tokenizer(" the")["input_ids"][0])
    assert piece.startswith("Ġ")  # the premise: a piece with the byte-level space marker
    assert result.target_description == f"logit of {piece.replace('Ġ', ' ')!r}"
    assert "Ġ" not in result.summary()["top_token"] and any("Ġ" in t for t in result.tokens)


def test_bare_tokens_keep_their_spaces_in_token_and_logit_diff_targets_alike(gpt2):
    """`token: the` kept the leading space but `logit-diff: the, a` dropped it (and the pair was two tokens)."""
    from neuronmap.attribution.targets import parse_target

    tokenizer = gpt2.tokenizer

    def one(text):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, (text, ids)
        return ids[0]

    assert parse_target(gpt2, "token: the").tokens == (one(" the"),)
    assert parse_target(gpt2, "logit-diff: the, of").tokens == (one(" the"), one(" of"))
    assert parse_target(gpt2, "logit-diff:' the',' of'").tokens == (one(" the"), one(" of"))
    assert parse_target(gpt2, f"logit-diff:{one(' the')},{one(' of')}").tokens == (one(" the"), one(" of"))
