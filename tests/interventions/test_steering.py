"""Steering and counterfactual pairs on a tiny random GPT-2, against plain-torch references."""

import numpy as np
import pytest
import torch
from handbuilt_induction import hooks_left

from neuronmap.errors import ConfigError
from neuronmap.interventions import Counterfactual, Steering, contrast_direction, run_direction

PROMPTS = ["the cat sat", "we like tea"]


@pytest.fixture
def gpt2(tiny_model):
    return tiny_model("gpt2", head=True)


def test_alpha_zero_generates_the_same_text_and_a_large_alpha_does_not(gpt2):
    direction = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    steering = Steering(gpt2)
    same = steering.generate(PROMPTS, direction, layers="blocks.1", alpha=0.0, max_new_tokens=8)
    assert same.baseline_ids == same.steered_ids and same.baseline == same.steered and not any(same.changed)
    assert all(len(ids) == 8 for ids in same.baseline_ids)
    assert all(abs(v) < 1e-6 for _, v in same.promoted + same.demoted)
    moved = steering.generate(PROMPTS, direction, layers="blocks.1", alpha=50.0, max_new_tokens=8)
    assert moved.baseline_ids == same.baseline_ids and all(moved.changed)
    assert hooks_left(gpt2.model) == 0


def test_steered_logits_equal_a_manual_addition_before_the_final_norm(gpt2):
    """At the last block, the addition reaches the logits only through ln_f and the unembedding."""
    direction = np.random.default_rng(1).standard_normal(64).astype(np.float32)
    result = Steering(gpt2).generate("the cat sat", direction, layers="blocks.2", alpha=3.0, max_new_tokens=1,
                                     top_k=5)
    model, tok = gpt2.model, gpt2.tokenizer
    ids = tok("the cat sat", return_tensors="pt")["input_ids"]
    kept = {}
    handle = model.transformer.h[2].register_forward_hook(lambda m, a, out: kept.setdefault("h", out[0] if isinstance(
        out, tuple) else out))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    handle.remove()
    pre = kept["h"][0, -1]
    with torch.no_grad():
        assert torch.allclose(model.lm_head(model.transformer.ln_f(pre)), logits, atol=1e-5)
        steered = model.lm_head(model.transformer.ln_f(pre + 3.0 * torch.as_tensor(direction)))
    change = (steered - logits).double()
    top = torch.topk(change, 5).indices.tolist()
    assert [t for t, _ in result.promoted] == tok.convert_ids_to_tokens(top)
    np.testing.assert_allclose([v for _, v in result.promoted], change[top].numpy(), atol=1e-4)


def test_contrast_direction_is_the_difference_of_mean_states(gpt2):
    positive, negative = ["good day", "a great film"], ["bad day"]
    direction = contrast_direction(gpt2, positive, negative, "blocks.1")
    last = contrast_direction(gpt2, positive, negative, "blocks.1", pooling="last")
    tok, model = gpt2.tokenizer, gpt2.model

    def states(text):
        with torch.no_grad():
            return model(**tok(text, return_tensors="pt"), output_hidden_states=True).hidden_states[2][0].numpy()

    mean = lambda texts, f: np.mean([f(states(t)) for t in texts], axis=0)  # noqa: E731
    expected = mean(positive, lambda s: s.mean(0)) - mean(negative, lambda s: s.mean(0))
    np.testing.assert_allclose(direction, expected, atol=1e-5)
    np.testing.assert_allclose(last, mean(positive, lambda s: s[-1]) - mean(negative, lambda s: s[-1]), atol=1e-5)


def test_direction_from_a_stored_run_label_column(tiny_model_dir, tmp_path):
    import pandas as pd

    from neuronmap import extract

    frame = pd.DataFrame({"text": ["good day", "a great film", "bad day", "an awful play", "fine"],
                          "mood": ["pos", "pos", "neg", "neg", "other"]})
    run = extract(str(tiny_model_dir("gpt2")), frame, layers="blocks.1", out=tmp_path / "run", pooling="mean",
                  device="cpu")
    direction = run_direction(run.path, "blocks.1", "mood", "pos", "neg")
    x = run.array("blocks.1")
    np.testing.assert_allclose(direction, x[:2].mean(0) - x[2:4].mean(0), atol=1e-6)
    with pytest.raises(ConfigError, match="'sad' has no row"):
        run_direction(run.path, "blocks.1", "mood", "pos", "sad")
    with pytest.raises(ConfigError, match="no label column 'topic'"):
        run_direction(run.path, "blocks.1", "topic", "pos", "neg")


def test_bad_directions_are_one_line_errors(gpt2, tmp_path):
    with pytest.raises(ConfigError, match="has shape \\(5,\\) but blocks.1 has 64"):
        Steering(gpt2).generate("the cat", np.ones(5), layers="blocks.1")
    with pytest.raises(ConfigError, match="does not exist"):
        Steering(gpt2).generate("the cat", tmp_path / "missing.npy", layers="blocks.1")
    with pytest.raises(ConfigError, match="one layer"):
        Steering(gpt2).generate("the cat", np.ones(64), layers="blocks.*")
    (tmp_path / "direction.txt").write_text("0.1 0.2 0.3\n")  # numpy's message spoke of pickled data
    with pytest.raises(ConfigError, match=r"is not a \.npy file \(written by numpy\.save\)"):
        Steering(gpt2).generate("the cat", tmp_path / "direction.txt", layers="blocks.1")
    np.save(tmp_path / "ok.npy", np.ones(64))
    assert Steering(gpt2).generate("the cat", tmp_path / "ok.npy", layers="blocks.1", max_new_tokens=2).steered
    assert hooks_left(gpt2.model) == 0


def test_identical_pairs_change_nothing(gpt2):
    result = Counterfactual(gpt2).attribute(PROMPTS, baselines=PROMPTS, layers="blocks.*")
    assert result.norms.shape == (2, 3) and np.all(result.norms == 0) and np.all(result.kl == 0)
    np.testing.assert_allclose(result.cosine, 1.0, atol=1e-6)
    assert all(row["delta_prob"] == 0 for row in result.top_changed)
    assert result.position_norms is None  # the two pairs have different lengths


def test_counterfactual_changes_match_hidden_states(gpt2):
    a, b = "a b c d e", "a b the d e"
    result = Counterfactual(gpt2).attribute(a, baselines=b, layers="blocks.*", top_k=3)
    tok, model = gpt2.tokenizer, gpt2.model
    with torch.no_grad():
        ha = model.transformer(**tok(a, return_tensors="pt"), output_hidden_states=True).hidden_states
        hb = model.transformer(**tok(b, return_tensors="pt"), output_hidden_states=True).hidden_states
        la, lb = (model(**tok(t, return_tensors="pt")).logits[0, -1].double() for t in (a, b))
    for i in range(2):  # blocks.i = hidden_states[i + 1] (the last one is after ln_f in GPT-2)
        diff = (hb[i + 1][0] - ha[i + 1][0]).double()
        assert result.norms[0, i] == pytest.approx(float(diff[-1].norm()), rel=1e-5)
        np.testing.assert_allclose(result.position_norms[i], diff.norm(dim=-1).numpy(), rtol=1e-5)
        assert result.position_norms[i, 0] == 0  # before the changed token nothing differs
    p, q = torch.softmax(la, -1), torch.softmax(lb, -1)
    assert result.kl[0] == pytest.approx(float((p * (p.log() - q.log())).sum()), rel=1e-6)
    top = torch.topk((q - p).abs(), 3).indices.tolist()
    assert [row["id"] for row in result.top_changed] == top
    with pytest.raises(ConfigError, match="one counterfactual per input"):
        Counterfactual(gpt2).attribute(PROMPTS, baselines=PROMPTS[:1])


def test_generation_past_the_models_positions_is_refused(gpt2):
    n = len(gpt2.tokenizer("the cat")["input_ids"])
    with pytest.raises(ConfigError, match=f"needs {n + 300} positions but the model has 256: use --max-new-tokens "
                                          f"<= {256 - n}"):
        Steering(gpt2).generate("the cat", np.ones(64), layers="blocks.1", max_new_tokens=300)
    result = Steering(gpt2).generate("the cat", np.ones(64), layers="blocks.1", max_new_tokens=256 - n)
    assert len(result.baseline_ids[0]) <= 256 - n and hooks_left(gpt2.model) == 0


def test_direction_from_another_models_run_is_refused(tiny_model_dir, tiny_model, tmp_path):
    from neuronmap import extract

    run = extract(str(tiny_model_dir("gpt2")), ["good day", "bad day"], layers="blocks.1", out=tmp_path / "run",
                  device="cpu")
    llama = tiny_model("llama", head=True)  # same width, another activation space
    with pytest.raises(ConfigError, match="was extracted from .* not from .*same model"):
        run_direction(run.path, "blocks.1", "sample_id", "0", "1", loaded=llama)


def test_a_contrast_direction_on_an_encoder_decoder_model_is_refused_in_one_line(tiny_model):
    """Its forward reads one stack's logits: on T5 it was an internal error deep in transformers."""
    t5 = tiny_model("t5", head=True)
    with pytest.raises(ConfigError, match="supports decoder-only and encoder models") as info:
        contrast_direction(t5, ["I love it"], ["I hate it"], "encoder.blocks.1")
    assert "\n" not in str(info.value)
