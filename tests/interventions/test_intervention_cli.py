"""`neuronmap trace|ablate|steer|heads|circuit|counterfactual`: artifacts, figures, one-line errors."""

import json

import numpy as np
import pytest

from neuronmap.analysis.artifacts import load_artifact, list_artifacts


def run_cli(capsys, *argv):
    from neuronmap.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err):
    return [line for line in err.strip().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def gpt2_dir(tiny_model_dir):
    return tiny_model_dir("gpt2")


def test_every_command_writes_an_artifact_with_a_figure(capsys, tmp_path, gpt2_dir, induction_dir):
    from neuronmap.viz.interventions import intervention_figure

    common = ["--device", "cpu", "--no-progress"]
    commands = {
        "trace": ["trace", "-m", gpt2_dir, "-p", "the cat sat on the mat", "-s", "cat", "--samples", "2", *common],
        "ablate": ["ablate", "-m", gpt2_dir, "-p", "the cat sat", "-p", "a dog ran", "-l", "blocks.0.attn.heads.*",
                   "--method", "mean", *common],
        "steer": ["steer", "-m", gpt2_dir, "-p", "the cat", "-l", "blocks.1", "--positive", "good day", "--negative",
                  "bad day", "--max-new-tokens", "3", "--device", "cpu"],
        "heads": ["heads", "-m", induction_dir, "--seq-len", "8", "--sequences", "2", *common],
        "circuit": ["circuit", "-m", induction_dir, "--clean", "a b c d e f g h a b c d", "--corrupted",
                    "a b c p e f g h a b c d", "--answer", "e", "--wrong", "p", "--max-edges", "4", *common],
        "counterfactual": ["counterfactual", "-m", gpt2_dir, "-p", "a b c d e", "-c", "a b the d e", *common],
    }
    for method, argv in commands.items():
        out = tmp_path / method
        code, stdout, err = run_cli(capsys, *argv, "--out", out, "--json")
        assert code == 0, (method, err)
        result = json.loads((out / "result.json").read_text())
        assert json.loads(stdout) == result
        artifact = load_artifact(out)
        assert artifact.analysis == method and artifact.result["family"] == "interventions"
        assert artifact.units == ["model"] and artifact.metrics()
        assert (out / "figure.html").stat().st_size > 1000 and artifact.arrays
        assert len(intervention_figure(artifact).data) >= 1
    heads = load_artifact(tmp_path / "heads")
    assert heads.result["top_induction"] == "blocks.1.attn.heads.0"
    assert heads.array("prev_token").shape == (2, 2)
    graph = json.loads((tmp_path / "circuit" / "graph.json").read_text())
    assert len(graph["edges"]) == 4
    assert {"source": "blocks.0.attn.heads.1", "target": "blocks.1.attn.heads.0"} in [
        {k: e[k] for k in ("source", "target")} for e in graph["edges"]]
    trace = load_artifact(tmp_path / "trace")
    assert trace.array("effect").shape == (3, len(trace.result["tokens"]))
    np.testing.assert_allclose(trace.array("effect"), trace.array("probs") - trace.result["corrupted_prob"])


def test_run_option_stores_the_artifact_with_the_run(capsys, tmp_path, gpt2_dir):
    from neuronmap import extract

    run = extract(str(gpt2_dir), ["the cat sat", "a dog ran"], layers="blocks.0", out=tmp_path / "run", device="cpu")
    argv = ["counterfactual", "-m", gpt2_dir, "-p", "a b c d e", "-c", "a b the d e", "--run", run.path, "--device",
            "cpu", "--no-progress"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    found = [a for a in list_artifacts(run.path) if a.analysis == "counterfactual"]
    assert len(found) == 1 and found[0].result["run"]["path"] == str(run.path)
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "--overwrite" in err
    assert run_cli(capsys, *argv, "--overwrite")[0] == 0


@pytest.mark.parametrize("argv, words", [
    (["trace", "-p", "the cat sat", "-s", "cat", "-t", " cat dog bird"], ["not one token"]),
    (["trace", "-p", "the cat sat", "-s", "cat", "-t", "99999999"], ["not one token"]),
    (["circuit", "--clean", "a b c d e", "--corrupted", "a b c d e f", "--answer", " c", "--wrong", " d"],
     ["5 tokens", "6", "same token length"]),
    (["ablate", "-p", "the cat", "-l", "blocks.9.mlp"], ["unknown layer", "blocks.9.mlp"]),
    (["ablate", "-p", "the cat", "-l", "blocks.0.attn.heads.9"], ["head", "9"]),
    (["steer", "-p", "the cat", "-l", "blocks.5", "--positive", "a", "--negative", "b"], ["blocks.5"]),
    (["heads", "-l", "blocks.4"], ["blocks.4"]),
    (["counterfactual", "-p", "a", "-p", "b", "-c", "a"], ["one counterfactual per input"]),
    (["ablate", "-p", "the cat", "--answer", " cat dog", "--wrong", " a"], ["not one token"]),
])
def test_user_mistakes_exit_2_with_one_line(capsys, tmp_path, gpt2_dir, argv, words):
    code, _, err = run_cli(capsys, argv[0], "-m", gpt2_dir, *argv[1:], "--out", tmp_path / "x", "--device", "cpu")
    lines = one_line(err)
    assert code == 2 and len(lines) == 1 and all(w in err for w in words), err
    assert not (tmp_path / "x" / "result.json").exists()


def test_pairs_file_from_the_counterfactual_generator_layout(capsys, tmp_path, induction_dir):
    import pandas as pd

    pairs = tmp_path / "pairs.csv"
    pd.DataFrame({"pair_id": [0, 0], "role": ["clean", "corrupted"],
                  "text": ["a b c d e f g h a b c d", "a b c p e f g h a b c d"],
                  "answer_token_id": [4, 15], "wrong_answer_token_id": [15, 4]}).to_csv(pairs, index=False)
    code, _, err = run_cli(capsys, "circuit", "-m", induction_dir, "--pairs", pairs, "--out", tmp_path / "c",
                           "--device", "cpu", "--no-progress")
    assert code == 0, err
    result = load_artifact(tmp_path / "c").result
    assert result["clean_metric"] == pytest.approx(10.0, abs=1e-3)
    assert ("blocks.0.attn.heads.1", "blocks.1.attn.heads.0") in [(e["source"], e["target"])
                                                                   for e in result["top_edges"][:3]]
