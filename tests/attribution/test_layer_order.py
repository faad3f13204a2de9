"""Layer-wise attribution (layer-ig, gradcam) to a layer that runs before a neuron target.

A neuron target stops the forward pass at its layer and depends only on what ran before it, so the
attribution layer must come strictly earlier: the default is chosen that way, a later --layer is a
one-line ConfigError (exit 2), and the API and the CLI make the same choice.
"""

from __future__ import annotations

import numpy as np
import pytest

from neuronmap.attribution import TokenAttribution
from neuronmap.errors import ConfigError

TEXT = "The capital of France is"


@pytest.fixture
def gpt2(tiny_model):
    return tiny_model("gpt2", head=True)  # 3 blocks: the default layer of other targets is blocks.1


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _precedes(loaded, layer, target_layer):
    names = loaded.adapter.layer_names()
    return names.index(layer) < names.index(target_layer)


@pytest.mark.parametrize("target, expected", [
    ("neuron:blocks.1.mlp:17", "blocks.0"),   # the middle block (blocks.1) is not before the target
    ("neuron:blocks.0.mlp:3", "embed"),       # nothing but the embeddings runs before block 0's MLP
    ("neuron:blocks.0.attn:3", "embed"),
    ("neuron:blocks.2.mlp:17", "blocks.1"),   # the middle block precedes: kept
    ("neuron:final:5", "blocks.1"),
    ("next-token", "blocks.1"),
])
def test_default_layer_runs_before_the_target(gpt2, target, expected):
    explainer = TokenAttribution(gpt2)
    assert explainer.attribution_layer(target) == expected
    for method in ("layer-ig", "gradcam"):
        result = explainer.attribute(TEXT, target=target, method=method, n_steps=16)
        assert result.layer == result.params["layer"] == expected
        assert np.isfinite(result.scores).all() and result.scores.shape == (len(result.tokens),)
    if target.startswith("neuron:"):
        assert _precedes(gpt2, expected, target.split(":")[1])
    assert _no_hooks(gpt2.model)


@pytest.mark.parametrize("target, layer, where, earlier", [
    ("neuron:blocks.1.mlp:17", "blocks.1", "runs after", "blocks.0"),
    ("neuron:blocks.1.mlp:17", "blocks.1.mlp", "is the layer of", "blocks.0"),
    ("neuron:blocks.1.mlp:17", "blocks.2", "runs after", "blocks.0"),
    ("neuron:blocks.0.mlp:3", "blocks.1", "runs after", "embed"),
    ("neuron:blocks.0.mlp:3", "blocks.0", "runs after", "embed"),
    ("neuron:blocks.1.attn:3", "module:transformer.h.1", "runs after", "blocks.0"),  # placed by a forward pass
    ("neuron:module:transformer.h.0.mlp.c_fc:3", "blocks.0", "runs after", "embed"),
])
def test_layer_at_or_after_the_target_is_refused(gpt2, target, layer, where, earlier):
    explainer = TokenAttribution(gpt2)
    message = f"--layer {layer} {where} the target {target}"
    with pytest.raises(ConfigError, match=f"{message}.*such as {earlier} or leave --layer out") as info:
        explainer.attribution_layer(target, layer)
    assert "\n" not in str(info.value)
    for method in ("layer-ig", "gradcam"):
        with pytest.raises(ConfigError, match=message):
            explainer.attribute(TEXT, target=target, method=method, layer=layer, n_steps=8)
    assert _no_hooks(gpt2.model)


def test_earlier_layers_are_accepted(gpt2):
    explainer = TokenAttribution(gpt2)
    assert explainer.attribution_layer("neuron:blocks.1.mlp:17", "blocks.1.attn") == "blocks.1.attn"
    assert explainer.attribution_layer("neuron:blocks.1.mlp:17", "module:transformer.h.0") == "module:transformer.h.0"
    assert explainer.attribution_layer("neuron:module:transformer.h.1.mlp.c_fc:3") == "blocks.0"
    result = explainer.attribute(TEXT, target="neuron:blocks.2.mlp:1", method="gradcam", layer="module:transformer.h.0")
    assert result.layer == "module:transformer.h.0" and np.isfinite(result.scores).all()
    assert _no_hooks(gpt2.model)


def test_layer_ig_to_embed_equals_ig_and_is_complete(gpt2):
    """GPT-2's `embed` is token + position embeddings, so IG to it follows the same path as IG to the token
    embeddings (same baseline difference, same function after it): the scores must agree."""
    explainer = TokenAttribution(gpt2)
    for target in ("neuron:blocks.0.mlp:3", "next-token"):
        ig = explainer.attribute(TEXT, target=target, method="ig", n_steps=64)
        layer_ig = explainer.attribute(TEXT, target=target, method="layer-ig", layer="embed", n_steps=64)
        np.testing.assert_allclose(layer_ig.scores, ig.scores, rtol=1e-4, atol=1e-7)
        gap = layer_ig.target_value - layer_ig.baseline_value
        assert abs(layer_ig.scores.sum() - gap) < 1e-3 * max(1.0, abs(gap))
    assert _no_hooks(gpt2.model)


def test_nothing_before_an_embed_target(gpt2):
    explainer = TokenAttribution(gpt2)
    for method in ("layer-ig", "gradcam"):
        with pytest.raises(ConfigError, match="no layer runs before the target neuron:embed:3.*token-level method"):
            explainer.attribute(TEXT, target="neuron:embed:3", method=method)
    for method in ("saliency", "grad-x-input", "ig", "shapley", "rollout"):  # token-level methods need no layer
        result = explainer.attribute(TEXT, target="neuron:embed:3", method=method, n_steps=8, n_samples=2)
        assert np.isfinite(result.scores).all() and result.layer is None
    assert _no_hooks(gpt2.model)


@pytest.mark.parametrize("target, expected", [("neuron:blocks.1.mlp:17", "blocks.0"),
                                              ("neuron:blocks.0.mlp:3", "embed")])
def test_cli_default_layer_with_every_method(tiny_model_dir, tmp_path, target, expected):
    from neuronmap.analysis.artifacts import load_artifact
    from neuronmap.cli import main

    code = main(["attribute", "-m", str(tiny_model_dir("gpt2")), "-t", TEXT, "--target", target, "--method", "all",
                 "--steps", "8", "--samples", "2", "-o", str(tmp_path / "a"), "--device", "cpu"])
    assert code == 0
    result = load_artifact(tmp_path / "a").result
    methods = result["methods"]
    assert {m for m, s in methods.items() if s["layer"] is not None} == {"layer-ig", "gradcam"}
    assert methods["layer-ig"]["layer"] == methods["gradcam"]["layer"] == expected
    assert result["layers"] == [expected]  # the artifact says which layer it attributed to


@pytest.mark.parametrize("target, layer, earlier", [("neuron:blocks.1.mlp:17", "blocks.1", "blocks.0"),
                                                     ("neuron:blocks.0.mlp:3", "blocks.1", "embed")])
def test_cli_layer_after_the_target_is_one_line_exit_2(tiny_model_dir, tmp_path, capsys, target, layer, earlier):
    from neuronmap.cli import main

    code = main(["attribute", "-m", str(tiny_model_dir("gpt2")), "-t", TEXT, "--target", target, "--layer", layer,
                 "--method", "all", "-o", str(tmp_path / "a"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--layer {layer} runs after the target {target}" in err and f"such as {earlier}" in err, err
    assert "internal error" not in err
    assert not (tmp_path / "a").exists()


def test_an_encoder_decoder_model_is_refused_in_one_line(tiny_model):
    """Attribution runs the model as a function of one stack's input embeddings; T5 crashed inside it."""
    with pytest.raises(ConfigError, match="t5 .* attribution supports decoder-only and encoder models"):
        TokenAttribution(tiny_model("t5", head=True))
