"""Activation patching on a tiny random GPT-2: known answers and hook hygiene."""

import numpy as np
import pytest
import torch

from neuronmap.errors import ConfigError
from neuronmap.interventions import ActivationPatching, patch_output

CLEAN, CORRUPTED = "a b c d e", "a b the d e"


@pytest.fixture
def gpt2(tiny_model):
    return tiny_model("gpt2", head=True)


def hooks_left(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_prompts_have_equal_lengths(gpt2):
    tok = gpt2.tokenizer
    assert len(tok(CLEAN)["input_ids"]) == len(tok(CORRUPTED)["input_ids"])


def test_identical_prompts_change_nothing(gpt2):
    result = ActivationPatching(gpt2).attribute(CLEAN, baselines=CLEAN, target=(" c", " the"))
    n_blocks = gpt2.adapter.n_blocks
    assert result.logit_diff.shape == (n_blocks, len(result.tokens))
    assert result.clean_diff == result.corrupted_diff
    np.testing.assert_allclose(result.logit_diff, result.clean_diff, rtol=0, atol=1e-5)
    assert np.isnan(result.restored).all() and hooks_left(gpt2.model) == 0


def test_patching_every_position_restores_the_clean_output(gpt2):
    patching = ActivationPatching(gpt2)
    result = patching.attribute(CLEAN, baselines=CORRUPTED, target=(" c", " the"), positions="all")
    assert result.clean_diff != result.corrupted_diff
    assert result.logit_diff.shape == (gpt2.adapter.n_blocks, 1)
    assert result.logit_diff[-1, 0] == result.clean_diff  # exactly
    np.testing.assert_allclose(result.logit_diff[:, 0], result.clean_diff, rtol=0, atol=1e-5)
    np.testing.assert_allclose(result.restored, 1.0, atol=1e-4)


def test_per_position_matches_a_manual_patch(gpt2):
    """Cell (layer, position) equals a hand-made forward with the clean state put back at that position."""
    result = ActivationPatching(gpt2, batch_size=2).attribute(CLEAN, CORRUPTED, target=(" c", " the"),
                                                              layers="blocks.0-1")
    tok, model = gpt2.tokenizer, gpt2.model
    clean_ids = tok(CLEAN, return_tensors="pt")["input_ids"]
    corrupted_ids = tok(CORRUPTED, return_tensors="pt")["input_ids"]
    answer, wrong = (tok(t, add_special_tokens=False)["input_ids"][0] for t in (" c", " the"))
    with torch.no_grad():
        hidden = model(input_ids=clean_ids, output_hidden_states=True).hidden_states  # hidden_states[i+1] = blocks.i
        ref = gpt2.adapter.resolve("blocks.1")[0]
        for position in range(clean_ids.shape[1]):
            with patch_output(ref, hidden[2][0, [position]], torch.tensor([position])):
                logits = model(input_ids=corrupted_ids).logits[0, -1]
            assert result.logit_diff[1, position] == pytest.approx(float(logits[answer] - logits[wrong]), abs=1e-5)
    # positions before the corruption carry nothing; the corrupted position at block 0 restores most
    assert np.allclose(result.logit_diff[:, :2], result.corrupted_diff, atol=1e-5)


def test_no_hook_left_after_a_failing_forward(gpt2, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("head failed")

    monkeypatch.setattr(gpt2.model.lm_head, "forward", boom)
    with pytest.raises(RuntimeError, match="head failed"):
        ActivationPatching(gpt2).attribute(CLEAN, CORRUPTED, target=(" c", " the"))
    assert hooks_left(gpt2.model) == 0
    ref = gpt2.adapter.resolve("blocks.0")[0]
    with pytest.raises(RuntimeError, match="head failed"):
        with patch_output(ref, torch.zeros(1, gpt2.model.config.n_embd), torch.tensor([0])):
            gpt2.model(input_ids=torch.tensor([[1, 2, 3]]))
    assert hooks_left(gpt2.model) == 0


@pytest.mark.parametrize("kwargs, words", [
    (dict(inputs=CLEAN, baselines="a b c d e f g", target=(" c", " the")), ["5 tokens", "7", "same token length"]),
    (dict(inputs=CLEAN, baselines=CORRUPTED, target=(" cat dog bird", " the")), ["answer", "not one token"]),
    (dict(inputs=CLEAN, baselines=CORRUPTED, target=(10**9, " the")), ["answer", "vocabulary"]),
    (dict(inputs=CLEAN, baselines=CORRUPTED, target=(" c", " the"), layers="blocks.0.mlp"),
     ["blocks.0.mlp", "blocks.N"]),
])
def test_bad_input_is_a_one_line_config_error(gpt2, kwargs, words):
    with pytest.raises(ConfigError) as info:
        ActivationPatching(gpt2).attribute(**kwargs)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert hooks_left(gpt2.model) == 0


def run_cli(capsys, *argv):
    from neuronmap.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_patch_writes_result_and_matrix(capsys, tmp_path, tiny_model_dir, gpt2):
    import json

    model = tiny_model_dir("gpt2")
    out = tmp_path / "patch"
    code, stdout, err = run_cli(capsys, "patch", "--model", model, "--clean", CLEAN, "--corrupted", CORRUPTED,
                                "--answer", " c", "--wrong", " the", "--out", out, "--device", "cpu", "--json")
    assert code == 0, err
    result = json.loads((out / "result.json").read_text())
    assert json.loads(stdout) == result and result["layers"] == [f"blocks.{i}" for i in range(gpt2.adapter.n_blocks)]
    matrix = np.load(out / "logit_diff.npy")
    assert matrix.shape == (gpt2.adapter.n_blocks, len(result["tokens"])) == tuple(result["shape"])
    direct = ActivationPatching(gpt2).attribute(CLEAN, CORRUPTED, target=(" c", " the"))
    np.testing.assert_allclose(matrix, direct.logit_diff, atol=1e-5)
    assert result["clean_logit_diff"] == pytest.approx(direct.clean_diff, abs=1e-6)

    code, _, err = run_cli(capsys, "patch", "--model", model, "--clean", CLEAN, "--corrupted", "a b c d e f g",
                           "--answer", " c", "--wrong", " the", "--out", tmp_path / "bad", "--device", "cpu")
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "5 tokens" in err and "7" in err, err
    code, _, err = run_cli(capsys, "patch", "--model", model, "--clean", CLEAN, "--corrupted", CORRUPTED,
                           "--answer", " c", "--wrong", " the", "--out", out, "--device", "cpu")
    assert code == 2 and "--overwrite" in err


def test_the_same_answer_and_wrong_token_is_refused(gpt2):
    """logit[a] - logit[a] is 0 everywhere: the restored fraction would be all NaN."""
    for target in ((" c", " c"), (" c", gpt2.tokenizer(" c", add_special_tokens=False)["input_ids"][0])):
        with pytest.raises(ConfigError, match="same token ' c'.*give two different tokens"):
            ActivationPatching(gpt2).attribute(CLEAN, CORRUPTED, target=target)
    assert hooks_left(gpt2.model) == 0
