"""The `neuronmap` command: exit codes, one-line errors, and no damage on bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from neuronmap.cli import main
from neuronmap.store import open_run


@pytest.fixture(scope="module")
def gpt2_dir(tiny_model_dir):
    return str(tiny_model_dir("gpt2"))


@pytest.fixture()
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("Hello world\nThe cat sat on the mat.\nWhy?\n", encoding="utf-8")
    return path


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


def test_extract_then_show_verify_export(capsys, gpt2_dir, prompts, tmp_path):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(capsys, "extract", "-m", gpt2_dir, "-p", prompts, "-l", "blocks.0-1", "-o", out, "--json")
    assert code == 0
    summary = json.loads(stdout)
    assert summary["status"] == "complete" and summary["n_samples"] == 3 and summary["compression"] is None
    assert set(summary["layers"]) == {"blocks.0", "blocks.1"}

    code, stdout, _ = run_cli(capsys, "runs", "show", out, "--json")
    assert code == 0 and json.loads(stdout)["shards"] == 2
    code, stdout, _ = run_cli(capsys, "runs", "verify", out)
    assert code == 0 and "ok" in stdout

    code, _, _ = run_cli(capsys, "runs", "export", out, "--to", "parquet", "--out", tmp_path / "pq")
    assert code == 0
    np.testing.assert_array_equal(open_run(tmp_path / "pq").array("blocks.1"), open_run(out).array("blocks.1"))
    code, _, _ = run_cli(capsys, "runs", "export", out, "--to", "csv", "--out", tmp_path / "x.csv", "--layers", "blocks.1")
    assert code == 0
    import pandas as pd

    table = pd.read_csv(tmp_path / "x.csv")
    np.testing.assert_allclose(table.filter(like="blocks.1").to_numpy(), open_run(out).array("blocks.1"), rtol=1e-6)



def test_show_counts_the_rows_an_unfinished_run_has_committed(capsys, gpt2_dir, prompts, tmp_path):
    from neuronmap.store.manifest import load_manifest, write_manifest

    out = tmp_path / "run"
    assert run_cli(capsys, "extract", "-m", gpt2_dir, "-p", prompts, "-l", "blocks.0", "-o", out,
                   "--samples-per-shard", "2", "-q")[0] == 0
    manifest = load_manifest(out)  # as if killed before the last shard: 2 of 3 rows committed
    manifest.shards = [shard for shard in manifest.shards if shard.rows[0] == 0]
    manifest.status = "running"
    write_manifest(out, manifest)
    code, stdout, _ = run_cli(capsys, "runs", "show", out, "--json")
    summary = json.loads(stdout)
    assert code == 0 and summary["rows"] == {"blocks.0": 3} and summary["rows_committed"] == {"blocks.0": 2}
    code, stdout, _ = run_cli(capsys, "runs", "show", out)
    assert code == 0 and "2 rows" in stdout and "interrupted" in stdout

def test_verify_reports_corruption_with_exit_3(capsys, gpt2_dir, prompts, tmp_path):
    out = tmp_path / "run"
    assert run_cli(capsys, "extract", "-m", gpt2_dir, "-p", prompts, "-l", "blocks.0", "-o", out, "-q")[0] == 0
    shard = next((out / "activations").rglob("part-*"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "runs", "verify", out)
    assert code == 3 and "sha256" in err.lower()
    assert_one_line_error(err, "corrupt")  # one problem, one line, however narrow the terminal


def test_verify_of_something_that_is_not_a_run_is_a_usage_error(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    for path, words in [(tmp_path / "nothing", ["does not exist"]), (tmp_path / "file", ["is a file"]),
                        (tmp_path, ["manifest.json", "not a neuronmap run"])]:
        code, _, err = run_cli(capsys, "runs", "verify", path)
        assert code == 2, err
        assert_one_line_error(err, "error:", *words)


@pytest.mark.parametrize(
    "case",
    ["unknown_model", "unknown_layer", "empty_prompts", "latin1_prompts", "missing_column", "exists", "unwritable",
     "bad_pooling", "blank_out", "empty_layer_name", "ragged_csv"],
)
def test_bad_input_is_one_line_exit_2_and_no_damage(case, capsys, gpt2_dir, prompts, tmp_path):
    out = tmp_path / "run"
    args = ["extract", "-m", gpt2_dir, "-p", prompts, "-l", "blocks.0", "-o", out, "-q"]
    words = []
    if case == "unknown_model":
        args[2], words = "gtp2", ["unknown model", "gpt2"]
    elif case == "unknown_layer":
        args[6], words = "blocks.99", ["blocks.99", "blocks.0"]
    elif case == "empty_prompts":
        empty = tmp_path / "empty.txt"
        empty.write_text("\n\n")
        args[4], words = empty, ["empty"]
    elif case == "latin1_prompts":
        bad = tmp_path / "latin1.txt"
        bad.write_bytes("café au lait\n".encode("latin-1"))
        args[4], words = bad, ["utf-8", "iconv"]
    elif case == "missing_column":
        csv = tmp_path / "p.csv"
        csv.write_text("body,label\nhello,1\n")
        args[4], words = csv, ["text column", "--text-column", "body"]
    elif case == "exists":
        assert main([str(a) for a in args]) == 0
        capsys.readouterr()
        words = ["--overwrite"]
    elif case == "unwritable":
        blocker = tmp_path / "file"
        blocker.write_text("not a folder")
        args[8], words = blocker / "run", [str(blocker), "is a file, not a folder"]
    elif case == "bad_pooling":
        args += ["--pooling", "median"]
        words = ["median", "mean"]
    elif case == "blank_out":  # would otherwise reach the command as ".", the working folder
        args[8], words = " ", ["-o is empty", "--out runs/"]
    elif case == "empty_layer_name":
        args[6], words = "blocks.0,,blocks.1", ["empty name", "comma"]
    elif case == "ragged_csv":  # pandas would make "hello" an index and store "1" as the prompt
        csv = tmp_path / "p.csv"
        csv.write_text("text,label\nhello,1,2\n")
        args[4], words = csv, ["more fields than the header", "quote"]
    before = open_run(out).manifest if case == "exists" else None
    code, _, err = run_cli(capsys, *args)
    assert code == 2, err
    assert_one_line_error(err, *words)
    if case == "exists":
        assert open_run(out).manifest == before
    elif case != "unwritable":
        assert not (out / "activations").exists() or not any((out / "activations").rglob("part-*"))


@pytest.mark.parametrize("argv, words", [
    (["extrct"], ["no such command", "extract"]),
    (["extract"], ["missing option", "--model"]),
    (["extract", "-m", "gpt2", "-p", "p.txt", "-o", "r", "--batch-size", "abc"], ["--batch-size", "integer"]),
    (["runs", "show"], ["missing argument"]),
    (["--bogus"], ["no such option", "--bogus"]),
    # an option missing its value: click gives no context, the help is found from the command line
    (["extract", "-m", "gpt2", "-p", "p.txt", "-o"], ["'-o' requires an argument", "`neuronmap extract --help`"]),
    (["runs", "export", "r", "--to"], ["'--to' requires an argument", "`neuronmap runs export --help`"]),
])
def test_usage_mistakes_exit_2_with_the_parser_message_not_an_internal_error(argv, words, capsys):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    assert "internal error" not in err
    assert_one_line_error(err, "error:", *words, "--help`")  # the parser's message and where to read more


def test_version(capsys):
    from neuronmap import __version__

    code, stdout, _ = run_cli(capsys, "--version")
    assert code == 0 and stdout.strip() == f"neuronmap {__version__}"


def test_a_library_warning_is_one_line_and_the_run_completes(capsys, gpt2_dir, tmp_path):
    """A label column of numbers and words is stored as text, with one warning line (no source echo)."""
    import warnings

    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps({"text": f"prompt {i}", "label": i if i % 2 else f"w{i}"}) + "\n"
                            for i in range(6)))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        code, _, err = run_cli(capsys, "extract", "-m", gpt2_dir, "-p", path, "-l", "blocks.0", "-o",
                               tmp_path / "run", "-q")
    assert code == 0, err
    assert [line for line in err.splitlines() if line.strip()] == [
        "warning: label column 'label' mixes values of types int, str; it is stored as text (give it one type to "
        "keep numbers as numbers)"]
    assert open_run(tmp_path / "run").prompts["label"].tolist() == ["w0", "1", "w2", "3", "w4", "5"]


@pytest.mark.parametrize("allocate", ["numpy", "torch"])
def test_running_out_of_memory_is_one_line_exit_2(allocate, capsys, monkeypatch):
    """A request too large for the machine (here a real 32 TiB allocation inside a command) is told as
    such, with what to lower, not as an internal error."""
    import neuronmap.doctor

    def huge(*args, **kwargs):
        if allocate == "numpy":
            return np.empty(2**45, dtype=np.uint8)
        import torch

        return torch.empty(2**45, dtype=torch.uint8)

    monkeypatch.setattr(neuronmap.doctor, "collect", huge)
    code, _, err = run_cli(capsys, "doctor")
    assert code == 2, err
    assert_one_line_error(err, "error: out of memory", "ask for less")
    assert "internal error" not in err


def test_error_text_in_square_brackets_is_printed_as_written(capsys, monkeypatch):
    """Messages go through rich: brackets in them (`[answer]`, `h[0]`) must not be taken as markup."""
    import neuronmap.doctor
    from neuronmap.errors import ConfigError

    def mistake(*args, **kwargs):
        raise ConfigError("logit[answer] - logit[wrong] needs --answer; see [bold]the docs[/]")

    monkeypatch.setattr(neuronmap.doctor, "collect", mistake)
    code, _, err = run_cli(capsys, "doctor")
    assert code == 2
    assert err.strip() == "error: logit[answer] - logit[wrong] needs --answer; see [bold]the docs[/]"


def test_models_commands(capsys, gpt2_dir, tmp_path):
    code, stdout, _ = run_cli(capsys, "models", "list", "--json")
    names = {entry["name"] for entry in json.loads(stdout)}
    assert code == 0 and {"gpt2", "all-minilm-l6-v2", "t5-small", "mistral-7b"} <= names and len(names) >= 19
    code, stdout, _ = run_cli(capsys, "models", "layers", gpt2_dir, "--json")
    layers = {row["name"]: row["shape"] for row in json.loads(stdout)}
    assert code == 0 and layers["blocks.0"] == [64] and "blocks.0.attn.pattern" in layers
    code, stdout, _ = run_cli(capsys, "models", "layers", gpt2_dir, "--modules", "--json")
    listed = {row["name"]: row["type"] for row in json.loads(stdout)}
    from transformers import AutoModel

    expected = {f"module:{name}": type(module).__name__ for name, module in
                AutoModel.from_pretrained(gpt2_dir).named_modules() if name}
    assert code == 0 and listed == expected and listed["module:h.0.mlp.c_fc"] == "Conv1D"
    (tmp_path / "p.txt").write_text("Hello world\n")
    code, _, _ = run_cli(capsys, "extract", "-m", gpt2_dir, "-p", tmp_path / "p.txt", "-l", "module:h.0.mlp.c_fc",
                         "-o", tmp_path / "raw", "-q")  # a listed path extracts
    assert code == 0
    code, _, _ = run_cli(capsys, "models", "make-tiny", "opt", tmp_path / "opt")
    assert code == 0 and (tmp_path / "opt" / "config.json").exists()
    code, _, err = run_cli(capsys, "models", "make-tiny", "gpt5", tmp_path / "x")
    assert code == 2 and "gpt2" in err


def test_doctor_json(capsys):
    code, stdout, _ = run_cli(capsys, "doctor", "--json")
    info = json.loads(stdout)
    assert code == 0 and info["torch version"].startswith("2.") and "disk free" in info
    assert info["hugging face hub"].startswith("unreachable (HF_HUB_OFFLINE is set)")  # the tests run offline


def test_console_script_exit_code_and_help(tmp_path):
    exe = Path(sys.executable).with_name("neuronmap")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([str(exe), "extract", "--help"], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "--pooling" in done.stdout
    done = subprocess.run([str(exe), "runs", "show", str(tmp_path / "nothing")], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1


def test_the_command_starts_without_torch_or_the_analysis_families():
    """Registering every subcommand imports neither torch nor scikit-learn: `neuronmap --help` and
    `runs show` stay quick. The commands import what they use when they run."""
    code = "import sys, neuronmap.cli; print(sorted(m for m in ('torch', 'sklearn', 'ray') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
