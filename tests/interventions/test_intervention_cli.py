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


def test_more_user_mistakes_exit_2_with_one_line(capsys, tmp_path, gpt2_dir):
    """Audit findings: each is one `error:` line naming the fix, exit 2, and no artifact left behind."""
    import pandas as pd

    no_ids = tmp_path / "pairs.csv"  # `generate counterfactual` without --tokenizer: no answer token ids
    pd.DataFrame({"pair_id": [0, 0], "role": ["clean", "corrupted"], "text": ["a b c d e", "a b the d e"]}) \
        .to_csv(no_ids, index=False)
    patch = ["patch", "--clean", "a b c d e", "--corrupted", "a b the d e"]
    cases = [
        (["steer", "-p", "the cat", "-l", "blocks.1", "--positive", "a", "--negative", "b", "--max-new-tokens",
          "300"], ["needs 304 positions", "has 256", "--max-new-tokens <= 252"]),
        (["steer", "-p", "the cat", "-l", "blocks.1", "--positive", "a", "--negative", "b", "--max-new-tokens",
          "100000000"], ["has 256", "--max-new-tokens <= 252"]),
        (["counterfactual", "--pairs", tmp_path / "nosuch.csv"], ["pairs file", "nosuch.csv", "not found"]),
        (["circuit", "--pairs", tmp_path / "nosuch.csv"], ["pairs file", "nosuch.csv", "not found"]),
        (["circuit", "--pairs", no_ids], ["--answer and --wrong", "generate counterfactual --tokenizer MODEL"]),
        (["circuit", "--clean", "a b c d e", "--corrupted", "a b the d e", "--answer", " c", "--wrong", " the",
          "--max-edges", "-1"], ["--max-edges -1", ">= 1"]),
        (["heads", "--importance", "nosuch"], ["'nosuch'", "zero, mean, none, auto"]),
        ([*patch, "--answer", " c", "--wrong", " c"], ["same token", "give two different tokens"]),
        (["patch", "--clean", "a b c d e", "--corrupted", "a b c d e", "--answer", " c", "--wrong", " the"],
         ["same prompt", "corrupt the prompt"]),
        (["trace", "-p", " ".join(["word"] * 300), "--subject", "word"],
         ["tokens but the model has 256 positions", "shorten it"]),
        ([*patch[:1], "--clean", " ".join(["a"] * 300), "--corrupted", " ".join(["b"] * 300), "--answer", " c",
          "--wrong", " the"], ["tokens but the model has 256 positions"]),
        (["attribute", "--text", " ".join(["word"] * 300), "--target", "next-token"],
         ["tokens but the model has 256 positions"]),
    ]
    for argv, words in cases:
        out = tmp_path / "x"
        code, _, err = run_cli(capsys, argv[0], "-m", gpt2_dir, *argv[1:], "--out", out, "--device", "cpu")
        assert code == 2 and len(one_line(err)) == 1 and all(w in err for w in words), (argv, err)
        assert "internal error" not in err and not out.exists(), argv
    assert "None" not in run_cli(capsys, "heads", "-m", gpt2_dir, "--importance", "nosuch", "-o", tmp_path / "h")[2]


def test_out_inside_a_regular_file_names_that_file(capsys, tmp_path, gpt2_dir):
    (tmp_path / "bad").mkdir()
    blocker = tmp_path / "bad" / "afile"
    blocker.write_text("not a folder\n")
    argv = ["patch", "-m", gpt2_dir, "--clean", "a b c d e", "--corrupted", "a b the d e", "--answer", " c",
            "--wrong", " the", "--device", "cpu"]
    for out in (blocker / "sub", blocker):
        code, _, err = run_cli(capsys, *argv, "--out", out)
        assert code == 2 and len(one_line(err)) == 1, err
        assert f"{blocker} is a file, not a folder" in err and "choose another output path" in err, err
    assert blocker.read_text() == "not a folder\n"


def test_run_must_come_from_the_same_model_and_excludes_out(capsys, tmp_path, gpt2_dir, tiny_model_dir):
    import pandas as pd

    from neuronmap import extract

    frame = pd.DataFrame({"text": ["good day", "a great film", "bad day", "an awful play"],
                          "mood": ["pos", "pos", "neg", "neg"]})
    llama_dir = tiny_model_dir("llama")  # same width (64) as the tiny GPT-2
    gpt2_run = extract(str(gpt2_dir), frame, layers="blocks.1", out=tmp_path / "g", device="cpu")
    llama_run = extract(str(llama_dir), frame, layers="blocks.1", out=tmp_path / "l", device="cpu")
    patch = ["patch", "-m", gpt2_dir, "--clean", "a b c d e", "--corrupted", "a b the d e", "--answer", " c",
             "--wrong", " the", "--device", "cpu"]

    code, _, err = run_cli(capsys, *patch, "--run", llama_run.path)
    assert code == 2 and len(one_line(err)) == 1, err
    assert f"run {llama_run.path} was extracted from" in err and "a run of this model" in err, err
    assert not (llama_run.path / "analyses").exists()

    code, _, err = run_cli(capsys, *patch, "--run", gpt2_run.path, "--out", tmp_path / "p13")
    assert code == 2 and len(one_line(err)) == 1 and "not both" in err, err
    assert not (tmp_path / "p13").exists() and not (gpt2_run.path / "analyses").exists()
    assert run_cli(capsys, *patch, "--run", gpt2_run.path)[0] == 0

    code, _, err = run_cli(capsys, "steer", "-m", llama_dir, "-p", "the cat", "-l", "blocks.1", "--from-run",
                           gpt2_run.path, "--labels", "mood", "--positive-label", "pos", "--negative-label", "neg",
                           "--max-new-tokens", "2", "--device", "cpu", "--out", tmp_path / "s")
    assert code == 2 and len(one_line(err)) == 1, err
    assert f"run {gpt2_run.path} was extracted from" in err and "same model" in err, err
    assert not (tmp_path / "s").exists()
