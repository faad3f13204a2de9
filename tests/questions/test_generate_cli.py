"""`neuronmap generate` end to end: files that `neuronmap extract` reads, --list, one-line errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from ollama_fake import FakeOllama, free_port

from neuronmap.cli import main
from neuronmap.prompts import load_prompts
from neuronmap.store import open_run


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err, *words):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word.lower() in err.lower(), (word, err)


def test_template_csv_feeds_extract(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "sentiment.csv"
    code, stdout, _ = run_cli(capsys, "generate", "sentiment", "--count", 12, "--seed", 1, "--out", out)
    assert code == 0, stdout
    assert "wrote 12 prompts" in stdout and "neuronmap extract" in stdout
    prompts = load_prompts(out)
    assert len(prompts) == 12 and prompts["text"].is_unique
    assert {"sentiment", "thing", "template_id"} <= set(prompts.columns)

    run_dir = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "extract", "-m", tiny_model_dir("gpt2"), "-p", out, "-l", "blocks.0",
                                "-o", run_dir, "--json")
    assert code == 0, err
    run = open_run(run_dir)
    assert run.array("blocks.0").shape[0] == 12
    assert run.prompts["sentiment"].tolist() == prompts["sentiment"].tolist()


def test_counterfactual_jsonl_with_tokenizer(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "pairs.jsonl"
    code, stdout, err = run_cli(capsys, "generate", "counterfactual", "-n", 5, "--tokenizer", tiny_model_dir("gpt2"),
                                "-o", out, "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["rows"] == 10 and "n_tokens" in summary["columns"]
    df = load_prompts(out)
    assert df["role"].tolist() == ["clean", "corrupted"] * 5
    assert (df.groupby("pair_id")["n_tokens"].nunique() == 1).all()


def test_list_families(capsys):
    code, stdout, _ = run_cli(capsys, "generate", "--list")
    assert code == 0
    for name in ("factual", "sentiment", "agreement", "syntax", "counterfactual", "ollama"):
        assert name in stdout
    code, stdout, _ = run_cli(capsys, "generate", "--list", "--json")
    assert [f["name"] for f in json.loads(stdout)] == ["factual", "sentiment", "agreement", "syntax", "counterfactual"]


def test_local_backend_parquet(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "local.parquet"
    code, _, err = run_cli(capsys, "generate", "local", "--model", tiny_model_dir("gpt2"), "-n", 5,
                           "--max-new-tokens", 6, "--device", "cpu", "-o", out)
    assert code == 0, err
    df = pd.read_parquet(out)
    assert len(df) == 5 and df["text"].is_unique and (df["family"] == "local").all()


def test_ollama_backend_with_seed_prompts(capsys, tmp_path):
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("Write three questions about rivers.\nWrite three questions about birds.\n", encoding="utf-8")
    out = tmp_path / "ollama.csv"
    with FakeOllama() as server:
        code, _, err = run_cli(capsys, "generate", "--backend", "ollama", "--ollama-url", server.url,
                               "--ollama-model", "llama3.2", "-p", seeds, "-n", 5, "--no-stream", "-o", out)
        prompts_sent = [r.body["prompt"] for r in server.generate_requests()]
    assert code == 0, err
    assert prompts_sent[:2] == ["Write three questions about rivers.", "Write three questions about birds."]
    assert all(r.body["stream"] is False for r in server.generate_requests())
    df = load_prompts(out)
    assert len(df) == 5 and set(df["model"]) == {"llama3.2"}


def test_ollama_without_server_is_one_red_line(capsys, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    code, _, err = run_cli(capsys, "generate", "ollama", "--ollama-model", "llama3.2", "--ollama-url", url,
                           "--retries", 0, "-o", tmp_path / "x.csv")
    assert code == 2
    assert_one_line_error(err, f"no Ollama server answers at {url}", "ollama serve")
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("argv,words", [
    (["factual", "-n", 100000], ["has only", "--count"]),
    (["sentimnt", "-n", 3], ["did you mean 'sentiment'"]),
    (["sentiment", "-n", 3, "--model", "gpt2"], ["--model is for --backend local"]),
    (["counterfactual", "-n", 3, "--model", "gpt2"], ["--tokenizer"]),
    (["local", "-n", 3], ["needs --model"]),
    (["ollama", "-n", 3], ["needs --ollama-model"]),
    (["sentiment", "--backend", "local"], ["template family name"]),
    ([], ["pass a template family"]),
])
def test_mistakes_are_one_line_exit_2(capsys, tmp_path, argv, words):
    code, _, err = run_cli(capsys, "generate", *argv, "-o", tmp_path / "x.csv")
    assert code == 2
    assert_one_line_error(err, *words)
    assert not (tmp_path / "x.csv").exists()


def test_existing_output_needs_overwrite(capsys, tmp_path):
    out = tmp_path / "x.csv"
    assert run_cli(capsys, "generate", "syntax", "-n", 4, "-o", out)[0] == 0
    code, _, err = run_cli(capsys, "generate", "syntax", "-n", 4, "--seed", 2, "-o", out)
    assert code == 2
    assert_one_line_error(err, "already exists", "--overwrite")
    assert run_cli(capsys, "generate", "syntax", "-n", 4, "--seed", 2, "-o", out, "--overwrite")[0] == 0
    code, _, err = run_cli(capsys, "generate", "syntax", "-n", 4, "-o", tmp_path / "x.txt")
    assert code == 2
    assert_one_line_error(err, ".csv, .jsonl, .parquet")


def test_readme_generate_commands_run(capsys, tmp_path, tiny_model_dir, monkeypatch):
    """The `neuronmap generate` lines of the README's "Generate prompts" block work as written."""
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Generate prompts", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [line.split("  #")[0] for line in block.splitlines() if line.startswith("neuronmap generate")]
    commands = [shlex.split(line) for line in lines]
    assert len(commands) >= 4
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny-gpt2").symlink_to(tiny_model_dir("gpt2"))
    for argv in commands:
        code, _, err = run_cli(capsys, *argv[1:])
        assert code == 0, (argv, err)
        out = Path(argv[argv.index("--out" if "--out" in argv else "-o") + 1]) if "--list" not in argv else None
        if out is not None:
            assert len(load_prompts(out)) > 0


def test_local_max_new_tokens_must_be_positive_and_fit_the_model(capsys, tmp_path, tiny_model_dir):
    model = tiny_model_dir("gpt2")  # 256 positions
    out = tmp_path / "local.csv"
    for value, words in ((0, ["max_new_tokens=0", "positive integer"]),
                         (-3, ["max_new_tokens=-3", "positive integer"]),
                         (100000, ["plus --max-new-tokens 100000", "the model has 256", "use --max-new-tokens <="])):
        code, _, err = run_cli(capsys, "generate", "local", "--model", model, "-n", 2, "--max-new-tokens", value,
                               "--device", "cpu", "-o", out)
        assert code == 2, err
        assert_one_line_error(err, *words)
        assert "internal error" not in err and not out.exists()


def test_output_inside_a_regular_file_names_that_file(capsys, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder\n")
    code, _, err = run_cli(capsys, "generate", "sentiment", "-n", 3, "-o", blocker / "x.csv")
    assert code == 2
    assert_one_line_error(err, f"{blocker} is a file, not a folder", "choose another output path")
    assert blocker.read_text() == "not a folder\n"


def test_a_length_filter_no_prompt_passes_advises_the_filter(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", "sentiment", "-n", 10, "--min-words", 100, "-o", tmp_path / "x.csv")
    assert code == 2
    assert_one_line_error(err, "no prompts with at least 100 words", "lower --min-words")
    assert "--count 0" not in err and not (tmp_path / "x.csv").exists()
