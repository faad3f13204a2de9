"""`neuronmap analyze` end to end on a run extracted from a tiny model, and on synthetic runs."""

import json
from pathlib import Path

import numpy as np
import pytest

from analysistest_util import blobs, write_synthetic_run
from neuronmap.analysis.cli import parse_param
from neuronmap.cli import main
from neuronmap.errors import ConfigError
from neuronmap.store import open_run

TOPICS = ["animals", "finance", "weather"]


@pytest.fixture(scope="module")
def extracted(tiny_model_dir, tmp_path_factory):
    """A complete run of the tiny GPT-2 over 24 labelled prompts, 3 shards, layers blocks.0 and blocks.1."""
    import neuronmap

    root = tmp_path_factory.mktemp("analyze_cli")
    prompts = root / "prompts.csv"
    rows = [f"{i},{TOPICS[i % 3]}" for i in range(24)]
    texts = [f"The {w} number {i} is here" for i, w in enumerate(["cat", "bank", "rain"] * 8)]
    prompts.write_text("text,topic\n" + "\n".join(f"{t},{r.split(',')[1]}" for t, r in zip(texts, rows)) + "\n")
    return neuronmap.extract(str(tiny_model_dir("gpt2")), prompts, layers="blocks.0-1", out=root / "run",
                             samples_per_shard=8, device="cpu").path


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err, *words):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word.lower() in err.lower(), (word, err)


def test_stats_json_matches_numpy_on_the_extracted_run(capsys, extracted):
    code, out, err = run_cli(capsys, "analyze", extracted, "stats", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert set(result["units"]) == {"blocks.0", "blocks.1"} and result["reused"] is False
    assert result["units"]["blocks.1"]["metrics"]["n_rows"] == 24 and result["run"]["status"] == "complete"
    x = open_run(extracted).array("blocks.1").astype(np.float64)
    assert result["units"]["blocks.1"]["metrics"]["mean"] == pytest.approx(x.mean(axis=0).mean(), rel=1e-6)
    assert (extracted / "analyses" / result["id"] / "neurons.parquet").is_file()


def test_human_summary_then_reuse(capsys, extracted):
    args = ("analyze", extracted, "pca", "--layers", "blocks.1", "--param", "n_components=5")
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and "computed in" in out and "blocks.1" in out and "artifact:" in out
    artifact_dir = out.split("artifact:")[1].split(" (")[0].strip()
    assert (extracted / "analyses").as_posix() in artifact_dir and (extracted / "analyses" / artifact_dir).is_dir()
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and "reused" in out


def test_clustering_with_labels_and_list(capsys, extracted):
    code, out, err = run_cli(capsys, "analyze", extracted, "kmeans", "-l", "blocks.1", "--labels", "topic",
                             "-p", "k_max=4", "--json")
    assert code == 0, err
    metrics = json.loads(out)["units"]["blocks.1"]["metrics"]
    assert 2 <= metrics["n_clusters"] <= 4 and 0 < metrics["purity"] <= 1 and metrics["n_label_values"] == 3
    code, out, _ = run_cli(capsys, "analyze", "--list", "--json")
    listed = {entry["name"]: entry for entry in json.loads(out)}
    assert {"stats", "pca", "intrinsic-dim", "tsne", "kmeans", "dbscan", "hierarchical"} <= set(listed)
    assert {"name": "k_max", "type": "int", "default": 10} == {k: v for k, v in listed["kmeans"]["params"][2].items()
                                                               if k != "description"}
    code, out, _ = run_cli(capsys, "analyze", "--list")
    assert code == 0 and "intrinsic-dim" in out and "perplexity=30" in out


@pytest.mark.parametrize("case", ["analysis", "layer", "param_range", "param_form", "labels", "perplexity", "no_run",
                                  "no_args", "engine", "empty_layers", "empty_layer_name"])
def test_bad_input_is_one_line_and_exit_2(capsys, extracted, tmp_path, case):
    args, words = {
        "analysis": (["pcaa"], ["pcaa", "pca"]),
        "layer": (["stats", "-l", "blocks.7"], ["blocks.7", "blocks.{0-1}"]),
        "param_range": (["pca", "-p", "n_components=500"], ["n_components=500 must be between 1 and min(n_samples, n_features)=24"]),
        "param_form": (["pca", "-p", "n_components"], ["key=value"]),
        "labels": (["kmeans", "--labels", "colour"], ["colour", "topic"]),
        "perplexity": (["tsne", "-p", "perplexity=50"], ["perplexity=50", "n_samples=24"]),
        "no_run": (None, ["does not exist"]),
        "no_args": ([], ["needs run and analysis"]),
        "engine": (["stats", "--engine", "spark"], ["spark", "local"]),
        "empty_layers": (["stats", "-l", " "], ["--layers is empty", "leave it out"]),
        "empty_layer_name": (["stats", "-l", "blocks.0,,blocks.1"], ["blocks.0,,blocks.1", "empty name"]),
    }[case]
    if case == "no_run":
        argv = ["analyze", tmp_path / "missing", "stats"]
    elif case == "no_args":
        argv = ["analyze", "--force"]
    else:
        argv = ["analyze", extracted, *args]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    one_line_error(err, *words)


def test_synthetic_running_run_through_the_cli(capsys, tmp_path):
    x, y = blobs(n=120, n_features=8, centers=3)
    path = write_synthetic_run(tmp_path / "run", {"blocks.0": x}, labels={"topic": [str(v) for v in y]},
                               samples_per_shard=40, complete=False, n_shards=2)
    code, out, err = run_cli(capsys, "analyze", path, "hierarchical", "--labels", "topic")
    assert code == 0, err
    assert "running" in out and "80 of 120" in out and "committed part" in err
    code, out, _ = run_cli(capsys, "analyze", path, "dbscan", "--labels", "topic", "--json")
    result = json.loads(out)
    assert result["run"]["partial"] and result["units"]["blocks.0"]["rows"] == 80
    assert any("running" in w for w in result["warnings"])


def test_parse_param_values():
    assert parse_param("n_components=10") == ("n_components", 10)
    assert parse_param("eps=0.5") == ("eps", 0.5)
    assert parse_param("n_clusters=none") == ("n_clusters", None)
    assert parse_param("percentiles=1,50,99") == ("percentiles", [1, 50, 99])
    assert parse_param("percentiles=[5, 95]") == ("percentiles", [5, 95])
    assert parse_param("method=exact") == ("method", "exact")
    with pytest.raises(ConfigError, match="key=value"):
        parse_param("=3")


def test_printed_artifact_files_are_the_files_written(capsys, extracted):
    for analysis, has_arrays in (("cka", False), ("evolution", False), ("stats", True)):
        code, out, err = run_cli(capsys, "analyze", extracted, analysis)
        assert code == 0, err
        path, listed = out.split("artifact:")[1].strip().split(" (", 1)
        listed = listed.rstrip(")\n").replace("\n", "").split(", ")
        assert sorted(listed) == sorted(p.name for p in (extracted / "analyses" / Path(path).name).iterdir())
        assert listed[:2] == ["result.json", "params.json"] and ("arrays.npz" in listed) == has_arrays


def test_damaged_artifact_error_suggests_force(capsys, extracted):
    code, out, _ = run_cli(capsys, "analyze", extracted, "stats", "-l", "blocks.0", "--json")
    folder = extracted / "analyses" / json.loads(out)["id"]
    (folder / "result.json").write_text("{bad", encoding="utf-8")
    code, _, err = run_cli(capsys, "analyze", extracted, "stats", "-l", "blocks.0")
    assert code == 2
    one_line_error(err, "cannot read", "result.json", "damaged", "pass --force")
    code, _, err = run_cli(capsys, "analyze", extracted, "stats", "-l", "blocks.0", "--force")
    assert code == 0, err
    assert json.loads((folder / "result.json").read_text())["id"] == folder.name
