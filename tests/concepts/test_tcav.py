"""TCAV against plain autograd and a planted concept; significance; hooks; one-line errors; the command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from concepttest_util import no_hooks, one_line_error, run_cli, write_run
from transformers import AutoModelForCausalLM

from neuronmap.concepts.examples import examples_from_prompts, examples_from_run
from neuronmap.concepts.tcav import TCAV, ConceptExamples, significance, tcav_score
from neuronmap.errors import ConfigError

D = 64


def _inputs(tokenizer, n=40, seed=1):
    rng = np.random.default_rng(seed)
    return [tokenizer.decode(rng.choice(np.arange(5, 1000), rng.integers(5, 10)).tolist()) for _ in range(n)]


def _reference_gradients(model_dir, tokenizer, inputs, token, hidden_index, pooling):
    """d logit(token) at the last position / d hidden_states[hidden_index], plain transformers + autograd,
    summed over all tokens (mean pooling) or taken at the last token (last pooling): (n_inputs, d)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for text in inputs:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        result = model(input_ids=ids, output_hidden_states=True)
        (grad,) = torch.autograd.grad(result.logits[0, -1, token], result.hidden_states[hidden_index])
        out.append((grad[0].sum(0) if pooling == "mean" else grad[0, -1]).double().numpy())
    return np.stack(out)


def test_gradients_equal_plain_autograd(tiny_model):
    loaded = tiny_model("gpt2", head=True)
    inputs = _inputs(loaded.tokenizer, n=6)
    token = loaded.tokenizer(" the", add_special_tokens=False)["input_ids"][0]
    for pooling, layer, index in (("mean", "blocks.1", 2), ("last", "embed", 0)):
        grads, values, _ = TCAV(loaded, batch_size=4).gradients(inputs, "token: the", layer, pooling)
        reference = _reference_gradients(loaded.source, loaded.tokenizer, inputs, token, index, pooling)
        np.testing.assert_allclose(grads[layer], reference, rtol=1e-4, atol=1e-5)
    assert values.shape == (6,)
    assert no_hooks(loaded.model)


@pytest.fixture(scope="module")
def planted(sharp_gpt2_dir, tmp_path_factory):
    """A stored run (pooling last, layer embed) of the sharpened GPT-2 with a concept planted along the
    direction the target depends on positively, found with plain autograd; four concepts of pure noise."""
    from neuronmap.models.loading import load_model

    loaded = load_model(sharp_gpt2_dir, head=True, device="cpu")
    inputs = _inputs(loaded.tokenizer)
    token = loaded.tokenizer(" the", add_special_tokens=False)["input_ids"][0]
    grads = _reference_gradients(sharp_gpt2_dir, loaded.tokenizer, inputs, token, 0, "last")
    unit = grads / np.linalg.norm(grads, axis=1, keepdims=True)
    u = unit.mean(0)
    u /= np.linalg.norm(u)
    rng = np.random.default_rng(0)
    labels = np.array(["planted"] * 100 + [f"noise{i}" for i in range(4) for _ in range(50)] + ["other"] * 300)
    x = rng.standard_normal((len(labels), D)).astype(np.float32)
    x[labels == "planted"] += (5 * u).astype(np.float32)
    run = write_run(tmp_path_factory.mktemp("tcav") / "run", {"embed": x}, labels={"concept": labels.tolist()},
                    model=loaded.name, config_hash=loaded.config_hash, tokenizer=str(sharp_gpt2_dir), pooling="last")
    return {"loaded": loaded, "inputs": inputs, "grads": grads, "u": u, "run": run}


def test_planted_concept_scores_high_and_is_significant(planted):
    grads, u = planted["grads"], planted["u"]
    # the honest answer, from plain autograd: the target rises along u for (nearly) every input, while
    # random directions give about half of them
    expected = tcav_score(grads, u)
    assert expected >= 0.9
    directions = np.random.default_rng(5).standard_normal((200, D))
    random_scores = (grads @ directions.T > 0).mean(axis=0)
    assert abs(random_scores.mean() - 0.5) < 0.1 and random_scores.std() < 0.2

    names = ["planted", "noise0", "noise1", "noise2", "noise3"]
    concepts = [examples_from_run(planted["run"], ["embed"], "concept", name, negative="other") for name in names]
    loaded = planted["loaded"]
    result = TCAV(loaded).attribute(planted["inputs"], concepts, target="token: the", layers="embed", pooling="last",
                                    random_runs=8)
    assert result.tcav.shape == (5, 1) and result.n_tests == 5
    assert result.tcav[0, 0] == pytest.approx(expected, abs=0.05)
    assert result.significant[0, 0] and result.p_bonferroni[0, 0] < 0.05
    assert result.p_bonferroni[0, 0] == pytest.approx(min(1.0, 5 * result.p_values[0, 0]))
    assert not result.significant[1:].any()
    assert (np.abs(result.tcav[1:, 0] - 0.5) < 0.2).all()
    assert result.accuracy[0].mean() > 0.95 and abs(result.accuracy[1:].mean() - 0.5) < 0.1
    # scores are the fraction of positive directional derivatives along each run's CAV
    np.testing.assert_allclose(result.derivatives[0, 0], grads @ _mean_cav(result, concepts[0]), rtol=1e-4, atol=1e-6)
    assert no_hooks(loaded.model)
    summary = result.summary()
    assert summary["best"]["concept"] == "planted" and summary["n_significant"] == 1


def _mean_cav(result, concept):
    """The concept's mean CAV direction, recomputed from the run's examples with the same seeded runs."""
    from neuronmap.concepts.cav import cav_runs

    runs = cav_runs(concept.concept["embed"], concept.random["embed"], n_runs=8, null_sets=8, seed=0)
    mean = runs.vectors.mean(0)
    return mean / np.linalg.norm(mean)


def test_significance_is_a_two_sided_t_test():
    from scipy import stats

    null = np.array([0.4, 0.5, 0.55, 0.45, 0.6])
    test = significance(0.9, null, n_tests=3)
    m = len(null)
    t = (0.9 - null.mean()) / (null.std(ddof=1) * np.sqrt(1 + 1 / m))
    assert test.t == pytest.approx(t)
    assert test.p_value == pytest.approx(2 * stats.t.sf(abs(t), m - 1))
    assert test.p_bonferroni == pytest.approx(min(1, 3 * test.p_value)) and test.significant
    assert significance(0.5, [0.5, 0.5]).p_value == 1.0
    assert significance(1.0, [0.5, 0.5]).p_value == 0.0
    with pytest.raises(ConfigError):
        significance(0.5, [0.5])


def test_hooks_are_removed_on_failure(tiny_model):
    loaded = tiny_model("gpt2", head=True)
    with pytest.raises(ConfigError, match="units"):
        TCAV(loaded).gradients(["a b c", "the cat"], "neuron:blocks.1.mlp:999", "blocks.0")
    assert no_hooks(loaded.model)
    with pytest.raises(ConfigError, match="one target"):
        TCAV(loaded).gradients(["a b c"], "next-token", "blocks.0")
    with pytest.raises(ConfigError, match="not one token|tokens"):
        TCAV(loaded).gradients(["a b c"], "token:' xqzjwv'", "blocks.0")
    examples = ConceptExamples("c", {"blocks.0": np.zeros((4, 3))}, {"blocks.0": np.zeros((8, 3))})
    with pytest.raises(ConfigError, match="features"):
        TCAV(loaded).attribute(["a b c", "the cat"], examples, target="token: the", random_runs=2)
    assert no_hooks(loaded.model)


def test_examples_from_prompts_equal_an_extracted_run(tiny_model, tmp_path):
    """Concept prompts extracted now live in the same space as the same prompts in a run."""
    import neuronmap

    loaded = tiny_model("gpt2", head=True)
    texts = ["the cat sat", "a dog ran to the house", "red"]
    run = neuronmap.extract(loaded.source, texts, layers="blocks.0,blocks.1", out=tmp_path / "r", pooling="mean",
                            device="cpu")
    rows = examples_from_prompts(loaded, texts, ["blocks.0", "blocks.1"], pooling="mean")
    for layer in ("blocks.0", "blocks.1"):
        np.testing.assert_allclose(rows[layer], run.array(layer), rtol=1e-5, atol=1e-6)


def test_examples_from_run_takes_a_layer_spec_string(tmp_path):
    """A spec string (glob, range, names) selects the run's layers as everywhere else, not its characters;
    the rows are the run's arrays masked by label (numpy), the same as with a list of names."""
    from neuronmap.errors import UnknownLayerError

    rng = np.random.default_rng(3)
    arrays = {name: rng.standard_normal((30, 4)).astype(np.float32) for name in ("embed", "blocks.0", "blocks.1")}
    labels = np.array(["pos", "neg", "mid"] * 10)
    run = write_run(tmp_path / "run", arrays, labels={"mood": labels.tolist()}, samples_per_shard=7)
    for spec, layers in (("blocks.*", ["blocks.0", "blocks.1"]), ("blocks.0-1", ["blocks.0", "blocks.1"]),
                         ("embed, blocks.1", ["embed", "blocks.1"]), ("blocks.1", ["blocks.1"]),
                         ("all", ["embed", "blocks.0", "blocks.1"])):
        found = examples_from_run(run, spec, "mood", "pos", max_rows=None)
        assert list(found.concept) == layers and list(found.random) == layers, spec
        listed = examples_from_run(run, layers, "mood", "pos", max_rows=None)
        for layer in layers:
            np.testing.assert_array_equal(found.concept[layer], arrays[layer][labels == "pos"])
            np.testing.assert_array_equal(found.random[layer], arrays[layer][labels != "pos"])
            np.testing.assert_array_equal(listed.concept[layer], found.concept[layer])
    with pytest.raises(UnknownLayerError) as info:
        examples_from_run(run, "blocks.7", "mood", "pos")
    assert "\n" not in str(info.value) and "'blocks.7'" in str(info.value)


@pytest.fixture(scope="module")
def gpt2_run(tiny_model_dir, tmp_path_factory):
    """A real extracted run of the tiny GPT-2 with a label column (topic) and a single-valued column."""
    import pandas as pd

    import neuronmap

    words = ["cat dog mouse", "the red house", "people live here", "a big tree", "it ran then"]
    texts = [f"{words[i % 5]} {i}" for i in range(40)]
    frame = pd.DataFrame({"text": texts, "topic": ["animal" if i % 5 == 0 else "other" for i in range(40)],
                          "one": ["x"] * 40})
    run = neuronmap.extract(tiny_model_dir("gpt2"), frame, layers="blocks.0,blocks.1",
                            out=tmp_path_factory.mktemp("g") / "run", pooling="mean", device="cpu")
    return run.path


def test_tcav_command_writes_artifact_with_figure(gpt2_run, tiny_model_dir, tmp_path, capsys):
    from neuronmap.analysis.artifacts import load_artifact
    from neuronmap.viz import figure_for_artifact

    inputs = tmp_path / "inputs.txt"
    inputs.write_text("the cat sat on\na dog ran to\npeople live in the\n")
    code, out, err = run_cli(capsys, "tcav", "-m", tiny_model_dir("gpt2"), "--run", gpt2_run, "--labels", "topic",
                             "--concept", "animal", "--target", "token: the", "--inputs", inputs, "--random-runs", "3",
                             "--device", "cpu", "--no-progress", "--json")
    assert code == 0, err
    result = json.loads(out)
    folder = next((gpt2_run / "analyses").glob("tcav-*"))
    artifact = load_artifact(folder)
    assert artifact.result == result and result["family"] == "interventions" and result["analysis"] == "tcav"
    assert result["layers"] == ["blocks.0", "blocks.1"] and result["concepts"] == ["animal"]
    assert (folder / "figure.html").stat().st_size > 1000
    assert artifact.array("tcav").shape == (1, 2) and artifact.array("random_scores").shape == (1, 2, 3, 3)
    figure = figure_for_artifact(artifact)
    assert [trace.name for trace in figure.data] == ["animal", "random CAVs"]
    # concept prompts extracted on the fly, random rows from the run
    concept_file = tmp_path / "animals.txt"
    concept_file.write_text("\n".join(f"cat dog mouse {i}" for i in range(12)) + "\n")
    code, out, err = run_cli(capsys, "tcav", "-m", tiny_model_dir("gpt2"), "--run", gpt2_run, "--concept-prompts",
                             concept_file, "--target", "token: the", "--input", "the cat", "--input", "a dog",
                             "--layers", "blocks.1", "--random-runs", "2", "--out", tmp_path / "onfly", "--device",
                             "cpu", "--no-progress")
    assert code == 0, err
    assert load_artifact(tmp_path / "onfly").result["concepts"] == ["animals"]


def test_tcav_command_errors_are_one_line(gpt2_run, tiny_model_dir, tmp_path, capsys):
    model = tiny_model_dir("gpt2")
    other = tiny_model_dir("llama")  # another config hash: another activation space
    base = ["--target", "token: the", "--input", "the cat", "--device", "cpu", "--no-progress", "--out", tmp_path / "o"]
    cases = [
        (["-m", model, "--run", gpt2_run, "--labels", "one", "--concept", "x"], "single value"),
        (["-m", model, "--run", gpt2_run, "--labels", "topic", "--concept", "plant"], "'plant' is not a value"),
        (["-m", model, "--run", gpt2_run, "--labels", "nope", "--concept", "x"], "nope"),
        (["-m", model, "--run", gpt2_run, "--labels", "topic", "--concept", "animal", "--layers", "blocks.7"],
         "blocks.7"),
        (["-m", model, "--run", gpt2_run, "--labels", "topic", "--concept", "animal", "--layers", "final"],
         "no layer final"),
        (["-m", other, "--run", gpt2_run, "--labels", "topic", "--concept", "animal"], "activation space"),
        (["-m", model, "--labels", "topic", "--concept", "animal"], "concept examples"),
        (["-m", model, "--run", gpt2_run, "--labels", "topic", "--concept", "animal", "--random-runs", "1"],
         "random_runs"),
    ]
    for argv, expected in cases:
        code, _, err = run_cli(capsys, "tcav", *argv, *base)
        assert code == 2, (argv, err)
        assert expected in one_line_error(err), err


@pytest.mark.parametrize("value", ["0", "1", "-4"])
def test_tcav_max_examples_below_two_is_one_line_and_writes_nothing(gpt2_run, tiny_model_dir, tmp_path, capsys, value):
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "tcav", "-m", tiny_model_dir("gpt2"), "--run", gpt2_run, "--labels", "topic",
                           "--concept", "animal", "--target", "token: the", "--input", "the cat", "--max-examples",
                           value, "--device", "cpu", "--no-progress", "--out", out)
    assert code == 2, err
    assert f"--max-examples {value} must be an integer >= 2" in one_line_error(err) and err.startswith("error:")
    assert not out.exists()


def test_tcav_attribute_checks_max_examples_before_any_forward(tiny_model):
    loaded = tiny_model("gpt2", head=True)
    rows = np.random.default_rng(0).standard_normal((10, D))
    concept = ConceptExamples("c", {"blocks.0": rows}, {"blocks.0": rows + 1})
    for bad in (0, -4, 1, True, 2.5):
        with pytest.raises(ConfigError, match=r"max_examples=.* must be an integer >= 2"):
            TCAV(loaded).attribute(["the cat"], concept, target="token: the", layers="blocks.0", max_examples=bad)
    assert no_hooks(loaded.model)
