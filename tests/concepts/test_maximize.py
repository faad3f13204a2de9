"""Soft-prompt activation maximisation against plain forwards, random baselines, hooks and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from concepttest_util import no_hooks, one_line_error, run_cli
from transformers import AutoModelForCausalLM

from neuronmap.concepts.maximisation import ActivationMaximisation
from neuronmap.errors import ConfigError, UnknownLayerError


def _plain_mlp_neuron(model_dir, block: int, unit: int, inputs_embeds=None, input_ids=None) -> float:
    """blocks.{block}.mlp[unit] at the last position with a plain forward hook on GPT-2's MLP module."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    seen = {}
    handle = model.transformer.h[block].mlp.register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    try:
        with torch.no_grad():
            model(inputs_embeds=inputs_embeds, input_ids=input_ids)
    finally:
        handle.remove()
    return float(seen["out"][0, -1, unit])


@pytest.fixture(scope="module")
def optimised(tiny_model_dir):
    from neuronmap.models.loading import load_model

    loaded = load_model(tiny_model_dir("gpt2"), device="cpu")
    result = ActivationMaximisation(loaded).maximize("blocks.1.mlp:5", length=6, steps=40, seed=0, n_random=64)
    return loaded, result


def test_soft_prompt_beats_random_prompts(optimised):
    loaded, result = optimised
    assert result.activation > result.random_activations.max()
    assert result.activation > result.start_activation
    assert result.activation == pytest.approx(max(result.history))
    assert len(result.history) == 41 and result.random_activations.shape == (64,)
    assert no_hooks(loaded.model)
    assert all(p.grad is None for p in loaded.model.parameters())  # only the soft prompt was differentiated


def test_reported_values_equal_plain_forwards(optimised, tiny_model_dir):
    loaded, result = optimised
    embeds = torch.tensor(result.embeddings)[None]
    plain = _plain_mlp_neuron(tiny_model_dir("gpt2"), 1, 5, inputs_embeds=embeds)
    assert result.activation == pytest.approx(plain, rel=1e-5, abs=1e-6)
    hard = _plain_mlp_neuron(tiny_model_dir("gpt2"), 1, 5, input_ids=torch.tensor([result.hard_ids]))
    assert result.hard_activation == pytest.approx(hard, rel=1e-5, abs=1e-6)


def test_nearest_tokens_and_norm_projection(optimised):
    loaded, result = optimised
    table = loaded.model.get_input_embeddings().weight.detach().double().numpy()
    soft = result.embeddings.astype(np.float64)
    cosine = (soft / np.linalg.norm(soft, axis=1, keepdims=True)) @ (table / np.linalg.norm(table, axis=1,
                                                                                          keepdims=True)).T
    np.testing.assert_array_equal(result.nearest_ids[:, 0], cosine.argmax(axis=1))
    np.testing.assert_allclose(result.nearest_cosine, np.take_along_axis(cosine, result.nearest_ids, 1), atol=1e-5)
    norms = np.linalg.norm(table, axis=1)
    lengths = np.linalg.norm(soft, axis=1)
    assert (lengths >= norms.min() - 1e-5).all() and (lengths <= norms.max() + 1e-5).all()
    assert result.hard_ids == result.nearest_ids[:, 0].tolist()


def test_seeded_and_mean_position(tiny_model_dir):
    from neuronmap.models.loading import load_model

    loaded = load_model(tiny_model_dir("gpt2"), device="cpu")
    method = ActivationMaximisation(loaded)
    first = method.maximize("blocks.0:3", length=3, steps=5, seed=2, n_random=4, position="mean")
    again = method.maximize("blocks.0:3", length=3, steps=5, seed=2, n_random=4, position="mean")
    np.testing.assert_array_equal(first.embeddings, again.embeddings)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt2")).eval()
    with torch.no_grad():
        states = model(inputs_embeds=torch.tensor(first.embeddings)[None], output_hidden_states=True).hidden_states
    assert first.activation == pytest.approx(float(states[1][0, :, 3].mean()), rel=1e-5, abs=1e-6)


def test_errors_and_hooks_on_failure(tiny_model_dir):
    from neuronmap.models.loading import load_model

    loaded = load_model(tiny_model_dir("gpt2"), device="cpu")
    method = ActivationMaximisation(loaded)
    with pytest.raises(ConfigError, match="out of range"):
        method.maximize("blocks.1.mlp:999", steps=2)
    assert no_hooks(loaded.model)
    with pytest.raises(UnknownLayerError):
        method.maximize("blocks.9.mlp:1", steps=2)
    with pytest.raises(ConfigError, match="LAYER:INDEX"):
        method.maximize("blocks.1.mlp", steps=2)
    with pytest.raises(ConfigError, match="position"):
        method.maximize("blocks.1:1", length=4, position=4)


def test_maximize_command(tiny_model_dir, tmp_path, capsys):
    from neuronmap.analysis.artifacts import load_artifact
    from neuronmap.viz.interventions import intervention_figure

    code, out, err = run_cli(capsys, "maximize", "-m", tiny_model_dir("gpt2"), "--neuron", "blocks.1.mlp:5", "--length",
                             "4", "--steps", "10", "--random", "8", "--out", tmp_path / "m", "--device", "cpu",
                             "--no-progress", "--json")
    assert code == 0, err
    result = json.loads(out)
    artifact = load_artifact(tmp_path / "m")
    assert artifact.result == result and result["analysis"] == "maximize" and result["neuron"] == "blocks.1.mlp:5"
    assert artifact.array("embeddings").shape == (4, 64) and len(result["nearest"]) == 4
    assert (tmp_path / "m" / "figure.html").stat().st_size > 1000
    figure = intervention_figure(artifact)
    assert {trace.type for trace in figure.data} == {"scatter", "table"}
    for argv, expected in ((["--neuron", "blocks.9.mlp:1"], "blocks.9"), (["--neuron", "blocks.1.mlp:999"], "999"),
                           (["--neuron", "blocks.1.mlp:1", "--position", "x"], "--position")):
        code, _, err = run_cli(capsys, "maximize", "-m", tiny_model_dir("gpt2"), *argv, "--steps", "1", "--out",
                               tmp_path / "e", "--device", "cpu", "--no-progress")
        assert code == 2, (argv, err)
        assert expected in one_line_error(err)


def test_length_is_bounded_by_the_models_positions(tiny_model_dir, tmp_path, capsys):
    from neuronmap.concepts.maximisation import position_limit
    from neuronmap.models.loading import load_model

    loaded = load_model(tiny_model_dir("gpt2"), device="cpu")
    assert position_limit(loaded.model) == loaded.model.config.n_positions == 256
    method = ActivationMaximisation(loaded)
    with pytest.raises(ConfigError, match="length=257 is more than the 256 positions the model has: use --length 256"):
        method.maximize("blocks.1.mlp:1", length=257, steps=1)
    assert no_hooks(loaded.model)
    full = method.maximize("blocks.1.mlp:1", length=256, steps=0, n_random=0, n_nearest=1)
    assert full.embeddings.shape == (256, 64)  # the limit itself works
    for length in ("300", "100000"):
        code, _, err = run_cli(capsys, "maximize", "-m", tiny_model_dir("gpt2"), "--neuron", "blocks.1.mlp:1",
                               "--length", length, "--steps", "5", "--out", tmp_path / "m", "--device", "cpu",
                               "--no-progress")
        assert code == 2, err
        assert f"length={length} is more than the 256 positions" in one_line_error(err)
        assert err.startswith("error:")  # refused before the progress bar: no blank line above it
        assert not (tmp_path / "m").exists()


def test_random_baseline_is_bounded_streamed_and_holds_no_layer_output(tiny_model_dir, tmp_path, capsys):
    from neuronmap.concepts.maximisation import MAX_RANDOM
    from neuronmap.models.loading import load_model

    loaded = load_model(tiny_model_dir("gpt2"), device="cpu")
    with pytest.raises(ConfigError, match=f"n_random={MAX_RANDOM + 1} must be <= {MAX_RANDOM}"):
        ActivationMaximisation(loaded).maximize("blocks.1.mlp:1", steps=1, n_random=MAX_RANDOM + 1)
    code, _, err = run_cli(capsys, "maximize", "-m", tiny_model_dir("gpt2"), "--neuron", "blocks.1.mlp:1", "--random",
                           "100000000", "--steps", "5", "--out", tmp_path / "m", "--device", "cpu", "--no-progress")
    assert code == 2 and "n_random=100000000 must be <= 10000" in one_line_error(err) and err.startswith("error:")
    assert not (tmp_path / "m").exists()
    # Drawn batch by batch, the baseline is the same whatever the batch size (and as one draw of all prompts).
    small = ActivationMaximisation(loaded, batch_size=3).maximize("blocks.1.mlp:1", length=4, steps=2, n_random=10)
    large = ActivationMaximisation(loaded, batch_size=32).maximize("blocks.1.mlp:1", length=4, steps=2, n_random=10)
    np.testing.assert_allclose(small.random_activations, large.random_activations, rtol=1e-5, atol=1e-6)
    # Each batch's values own their memory: a view would keep the layer's (batch, tokens, units) output alive.
    ref = loaded.adapter.resolve("blocks.1.mlp")[0]
    values = ActivationMaximisation(loaded).activation_of_ids(torch.randint(5, 100, (32, 8)), ref, 1, -1)
    assert values.shape == (32,) and values.untyped_storage().nbytes() == 32 * values.element_size()
