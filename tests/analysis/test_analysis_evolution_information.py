"""`evolution`, `entropy`, `mutual-info`, `layer-mi` end to end against the pure functions on the same arrays.

The reference reads the shards with plain h5py and the labels from prompts.parquet with pandas.
"""

import json

import numpy as np
import pandas as pd
import pytest

from analysistest_util import read_layer_h5, write_synthetic_run
from neuronmap.analysis import analyze
from neuronmap.analysis import evolution as E
from neuronmap.analysis import information as I
from neuronmap.cli import main
from neuronmap.errors import ConfigError

LAYERS = ("embed", "blocks.0", "blocks.1", "blocks.2")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A residual-stream-like run: each layer adds to the previous one (norms grow, cosines stay high)."""
    rng = np.random.default_rng(0)
    n, d = 150, 6
    topic = rng.integers(0, 3, n)
    h = rng.standard_normal((n, d)) + topic[:, None] * np.array([1.5, 0, 0, 0, 0, -1.0])
    layers = {}
    for name in LAYERS:
        layers[name] = h.astype(np.float32)
        h = h + np.tanh(h @ rng.standard_normal((d, d))) * 0.8
    layers["blocks.2"][:, 3] = 0.25  # a constant neuron: entropy 0, MI 0
    labels = {"topic": [["red", "green", "blue"][t] for t in topic]}
    return write_synthetic_run(tmp_path_factory.mktemp("evolution") / "run", layers, labels=labels,
                               samples_per_shard=40)


def reference(run):
    return {name: read_layer_h5(run, name).astype(np.float64) for name in LAYERS}


def cli_json(capsys, *argv):
    code = main([str(a) for a in argv] + ["--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("debiased", [False, True])
def test_evolution_cli_equals_layer_evolution(capsys, run, debiased):
    result = cli_json(capsys, "analyze", run, "evolution", "--param", f"debiased={str(debiased).lower()}")
    x = reference(run)
    expected = E.layer_evolution(list(x.items()), debiased=debiased)
    assert list(result["units"]) == [f"{a}|{b}" for a, b in zip(LAYERS, LAYERS[1:])]  # run order, neighbours
    for i, doc in enumerate(result["units"].values()):
        m = doc["metrics"]
        assert m["cka_prev"] == pytest.approx(expected["cka_prev"][i], rel=1e-9)
        assert m["norm_growth"] == pytest.approx(expected["norm_growth"][i], rel=1e-9)
        assert m["mean_norm_next"] == pytest.approx(expected["mean_norm"][i + 1], rel=1e-9)
        assert m["cosine_mean"] == pytest.approx(expected["cosine_mean"][i], rel=1e-9)
        assert m["cosine_std"] == pytest.approx(expected["cosine_std"][i], rel=1e-9)
        assert m["cosine_drift"] == pytest.approx(1 - expected["cosine_mean"][i], rel=1e-9)
    again = analyze(run, "evolution", params={"debiased": debiased})
    assert again.reused and again.id == result["id"]
    table = again.table("evolution")
    assert list(table["prev"]) == list(LAYERS[:-1]) and list(table["next"]) == list(LAYERS[1:])


def test_evolution_without_cosine_between_widths(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((60, 5))
    path = write_synthetic_run(tmp_path / "run", {"a": x.astype(np.float32),
                                                  "b": (x @ rng.standard_normal((5, 3))).astype(np.float32)})
    with pytest.warns(UserWarning, match="differ in width: no per-sample cosine"):
        art = analyze(path, "evolution")
    assert "cosine_mean" not in art.metrics() and art.metrics()["cka_prev"] == pytest.approx(
        E.evolution_pair(read_layer_h5(path, "a"), read_layer_h5(path, "b"), cosine=False)["cka"], rel=1e-9)
    with pytest.raises(ConfigError, match="cosine=true needs layers of one width.*cosine=false"):
        analyze(path, "evolution", params={"cosine": True})


def test_entropy_cli_equals_entropy(capsys, run):
    result = cli_json(capsys, "analyze", run, "entropy", "--layers", "blocks.1,blocks.2", "--param", "bins=8",
                      "--param", "correction=miller-madow")
    x = reference(run)
    art = analyze(run, "entropy", layers="blocks.1,blocks.2", params={"bins": 8, "correction": "miller-madow"})
    assert art.reused
    for layer in ("blocks.1", "blocks.2"):
        h = I.entropy(x[layer], bins=8, correction="miller-madow")
        np.testing.assert_allclose(art.array("entropy", layer), h, rtol=1e-12)
        assert result["units"][layer]["metrics"]["mean_entropy"] == pytest.approx(h.mean(), rel=1e-12)
    assert result["units"]["blocks.2"]["metrics"]["n_zero_entropy"] == 1
    assert art.array("entropy", "blocks.2")[3] == 0


def test_mutual_info_cli_equals_mutual_information(capsys, run):
    result = cli_json(capsys, "analyze", run, "mutual-info", "--layers", "embed,blocks.2", "--labels", "topic",
                      "--param", "bins=6")
    x = reference(run)
    topic = pd.read_parquet(run / "prompts.parquet")["topic"].to_numpy()
    art = analyze(run, "mutual-info", layers="embed,blocks.2", labels="topic", params={"bins": 6})
    assert art.reused
    for layer in ("embed", "blocks.2"):
        mi = I.mutual_information(x[layer], topic, bins=6)
        np.testing.assert_allclose(art.array("mutual_information", layer), mi, rtol=1e-12, atol=1e-15)
        assert result["units"][layer]["metrics"]["max_mi"] == pytest.approx(mi.max(), rel=1e-12)
    metrics = result["units"]["embed"]["metrics"]
    assert metrics["n_classes"] == 3 and metrics["top_neurons"][0] in (0, 5)  # the planted label directions
    p = pd.Series(topic).value_counts(normalize=True).to_numpy()
    assert metrics["label_entropy"] == pytest.approx(-(p * np.log2(p)).sum(), rel=1e-12)
    assert list(art.array("classes", "embed")) == ["blue", "green", "red"]


def test_mutual_info_needs_labels(run):
    with pytest.raises(ConfigError, match="mutual-info needs a label column.*--labels COLUMN.*label columns: topic"):
        analyze(run, "mutual-info", layers="embed")


def test_layer_mi_cli_equals_layer_mutual_information(capsys, run):
    result = cli_json(capsys, "analyze", run, "layer-mi", "--layers", "embed,blocks.0,blocks.2",
                      "--param", "n_components=2", "--param", "bins=4")
    x = reference(run)
    art = analyze(run, "layer-mi", layers="embed,blocks.0,blocks.2", params={"n_components": 2, "bins": 4})
    assert art.reused and len(art.units) == 3
    for unit in art.units:
        a, b = unit.split("|")
        mi = I.layer_mutual_information(x[a], x[b], n_components=2, bins=4)
        np.testing.assert_allclose(art.array("mi", unit), mi, rtol=1e-12)
        assert result["units"][unit]["metrics"]["mi"] == pytest.approx(mi[0, 0], rel=1e-12)
        assert result["units"][unit]["metrics"]["mi_fraction"] == pytest.approx(mi[0, 0] / 2, rel=1e-12)
    with pytest.raises(ConfigError, match=r"n_components=7 must be between 1 and min\(n_samples, n_features\)=6"):
        analyze(run, "layer-mi", layers="embed,blocks.0", params={"n_components": 7})


@pytest.mark.parametrize("analysis, extra, bins", [("entropy", [], "1000000000"),
                                                   ("mutual-info", ["--labels", "topic"], "1e9"),
                                                   ("layer-mi", ["-l", "blocks.0,blocks.1"], "1e8")])
def test_bins_above_the_rows_are_one_line_and_write_nothing(capsys, run, analysis, extra, bins):
    layers = [] if "-l" in extra else ["-l", "blocks.2"]
    before = sorted(p.name for p in (run / "analyses").iterdir()) if (run / "analyses").exists() else []
    assert main(["analyze", str(run), analysis, *layers, *extra, "--param", f"bins={bins}"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert f"bins={int(float(bins))} is too many for the 150 rows of layer" in err
    assert f"e.g. bins={16 if analysis == 'layer-mi' else 32}" in err  # the analysis default
    after = sorted(p.name for p in (run / "analyses").iterdir()) if (run / "analyses").exists() else []
    assert after == before
