"""`cka`, `rsa`, `correlation`, `cosine` end to end (CLI and analyze) against the pure functions on the same arrays.

The reference path reads the shard files with plain h5py (`read_layer_h5`) and the labels with pandas,
then calls `neuronmap.analysis.similarity` directly; the analyses read through the run store.
"""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from analysistest_util import read_layer_h5, write_synthetic_run
from neuronmap.analysis import analyze, pair_matrix
from neuronmap.analysis import similarity as S
from neuronmap.analysis.registry import Params, register
from neuronmap.cli import main
from neuronmap.errors import ConfigError, UnknownLayerError

LAYERS = ("blocks.0", "blocks.1", "blocks.2")


def depth_layers(n=120, d=8, seed=0):
    """Layers that transform the samples step by step (CKA well inside (0, 1))."""
    rng = np.random.default_rng(seed)
    h, out = rng.standard_normal((n, d)), {}
    for name in LAYERS:
        h = np.tanh(h @ rng.standard_normal((d, d))) + 0.3 * rng.standard_normal((n, d))
        out[name] = h.astype(np.float32)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("similarity")
    labels = {"topic": ["a", "b", "c"] * 40}
    run = write_synthetic_run(root / "run", depth_layers(seed=0), labels=labels, samples_per_shard=50)
    other = write_synthetic_run(root / "other", depth_layers(seed=1), labels=labels, samples_per_shard=40)
    return run, other


def reference(run):
    return {name: read_layer_h5(run, name).astype(np.float64) for name in LAYERS}


def cli_json(capsys, *argv):
    code = main([str(a) for a in argv] + ["--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def unit_metric(result, unit, key):
    return result["units"][unit]["metrics"][key]


@pytest.mark.parametrize("method, debiased", [("linear", False), ("debiased", True)])
def test_cka_cli_equals_linear_cka_on_h5py_arrays(capsys, runs, method, debiased):
    run, _ = runs
    result = cli_json(capsys, "analyze", run, "cka", "--layers", "blocks.*", "--param", f"method={method}")
    x = reference(run)
    assert set(result["units"]) == {"blocks.0|blocks.1", "blocks.0|blocks.2", "blocks.1|blocks.2"}
    for unit in result["units"]:
        a, b = unit.split("|")
        expected = S.linear_cka(x[a], x[b], debiased=debiased)
        assert unit_metric(result, unit, "cka") == pytest.approx(expected, rel=1e-9)
    matrix = pair_matrix(analyze(run, "cka", params={"method": method}), "cka", diagonal=1.0)
    np.testing.assert_allclose(matrix.to_numpy(), S.cka_matrix(x, debiased=debiased), rtol=1e-9)
    assert list(matrix.index) == list(LAYERS) == list(matrix.columns)


def test_cka_minibatch_and_rbf_equal_their_pure_functions(runs):
    run, _ = runs
    x = reference(run)
    art = analyze(run, "cka", layers="blocks.0,blocks.2", params={"method": "minibatch", "minibatch_size": 32})
    expected = S.minibatch_cka(x["blocks.0"], x["blocks.2"], batch_size=32)  # minibatches 32, 32, 32, 24
    assert art.metrics("blocks.0|blocks.2")["cka"] == pytest.approx(expected, rel=1e-9)
    art = analyze(run, "cka", layers="blocks.0,blocks.2", params={"method": "rbf", "sigma_factor": 0.5})
    expected = S.rbf_cka(x["blocks.0"], x["blocks.2"], sigma_factor=0.5)
    assert art.metrics()["cka"] == pytest.approx(expected, rel=1e-9) and art.metrics()["n_used"] == 120


def test_rbf_cka_on_a_capped_sample_uses_the_same_rows_of_both_layers(runs):
    run, _ = runs
    with pytest.warns(UserWarning, match="seeded sample of 50 of 120 rows"):
        art = analyze(run, "cka", layers="blocks.0,blocks.1", params={"method": "rbf", "max_samples": 50, "seed": 3})
    x = reference(run)
    positions = np.sort(np.random.default_rng(3).choice(120, 50, replace=False))
    expected = S.rbf_cka(x["blocks.0"][positions], x["blocks.1"][positions])
    assert art.metrics()["cka"] == pytest.approx(expected, rel=1e-9)


def test_cka_between_two_runs_equals_cka_matrix_and_tracks_the_other_run(capsys, runs, tmp_path):
    run, other = runs
    result = cli_json(capsys, "analyze", run, "cka", "--layers", "blocks.0,blocks.2", "--param", f"other_run={other}")
    x, y = reference(run), reference(other)
    names = ["blocks.0", "blocks.2"]
    expected = S.cka_matrix({k: x[k] for k in names}, {k: y[k] for k in names})
    assert set(result["units"]) == {f"{a}|{b}" for a in names for b in names}  # ordered pairs, a == b included
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            assert unit_metric(result, f"{a}|{b}", "cka") == pytest.approx(expected[i, j], rel=1e-9)
    art = analyze(run, "cka", layers="blocks.0,blocks.2", params={"other_run": str(other)})
    assert art.reused
    np.testing.assert_allclose(pair_matrix(art, "cka", symmetric=False).to_numpy(), expected, rtol=1e-9)
    # one layer is enough against another run: CKA(this blocks.1, other blocks.1)
    one = analyze(run, "cka", layers="blocks.1", params={"other_run": str(other)})
    assert one.units == ["blocks.1|blocks.1"]
    assert one.metrics()["cka"] == pytest.approx(S.linear_cka(x["blocks.1"], y["blocks.1"]), rel=1e-9)
    # a re-extracted other run (same path, new shards) gets a new artifact, not the old numbers
    copy = write_synthetic_run(tmp_path / "copy", depth_layers(seed=1), samples_per_shard=60)
    before = analyze(run, "cka", layers="blocks.1", params={"other_run": str(copy)})
    write_synthetic_run(tmp_path / "copy2", depth_layers(seed=2), samples_per_shard=60)
    shutil.rmtree(copy)
    shutil.copytree(tmp_path / "copy2", copy)
    after = analyze(run, "cka", layers="blocks.1", params={"other_run": str(copy)})
    assert after.id != before.id and not after.reused
    assert after.metrics()["cka"] == pytest.approx(S.linear_cka(x["blocks.1"], depth_layers(seed=2)["blocks.1"]),
                                                   rel=1e-6)


def test_cka_between_runs_refuses_other_prompts_sample_counts_and_layers(runs, tmp_path):
    run, _ = runs
    moved = write_synthetic_run(tmp_path / "moved", depth_layers(seed=1), prompt_source_hash="other-prompts")
    with pytest.raises(ConfigError, match="other prompts.*'other-prompts'.*'s0'"):
        analyze(run, "cka", layers="blocks.0", params={"other_run": str(moved)})
    shorter = write_synthetic_run(tmp_path / "short", depth_layers(n=100, seed=1))
    with pytest.raises(ConfigError, match="n_samples=100 but run .* has 120"):
        analyze(run, "cka", layers="blocks.0", params={"other_run": str(shorter)})
    narrow = write_synthetic_run(tmp_path / "narrow", {"blocks.0": depth_layers(seed=1)["blocks.0"]})
    with pytest.raises(UnknownLayerError, match="'blocks.1' is not in other_run=.*it holds: blocks.0"):
        analyze(run, "cka", layers="blocks.0,blocks.1", params={"other_run": str(narrow)})
    with pytest.raises(ConfigError, match="other_run="):
        analyze(run, "cka", params={"other_run": str(tmp_path / "missing")})


@pytest.mark.parametrize("args, words", [
    (["cka", "--param", "method=fancy"], ["method='fancy'", "must be one of", "'linear'", "'minibatch'"]),
    (["cka", "--layers", "blocks.0"], ["select at least 2"]),
    (["rsa", "--param", "metric=manhattan"], ["metric='manhattan'", "correlation"]),
    (["correlation", "--param", "neurons=0,8"], ["neurons=[8]", "n_features - 1 = 7"]),
    (["mutual-info"], ["needs a label column", "--labels", "topic"]),
])
def test_bad_input_is_one_red_line(capsys, runs, args, words):
    run, _ = runs
    code = main(["analyze", str(run), *args])
    _, err = capsys.readouterr()
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)


@pytest.mark.parametrize("metric, method", [("correlation", "spearman"), ("euclidean", "kendall_tau_a"),
                                            ("cosine", "pearson")])
def test_rsa_cli_equals_rsa_on_h5py_arrays(capsys, runs, metric, method):
    run, _ = runs
    result = cli_json(capsys, "analyze", run, "rsa", "--layers", "blocks.0-2", "--param", f"metric={metric}",
                      "--param", f"method={method}")
    x = reference(run)
    for unit in result["units"]:
        a, b = unit.split("|")
        expected = S.rsa(x[a], x[b], metric=metric, method=method)
        assert unit_metric(result, unit, "rsa") == pytest.approx(expected, rel=1e-9)


def test_correlation_and_cosine_equal_the_pure_functions(capsys, runs):
    run, _ = runs
    x = reference(run)
    result = cli_json(capsys, "analyze", run, "correlation", "--layers", "blocks.1", "--param", "top_k=3")
    art = analyze(run, "correlation", layers="blocks.1", params={"top_k": 3})
    assert art.reused and art.id == result["id"]
    r = S.pearson_correlation(x["blocks.1"])
    np.testing.assert_allclose(art.array("correlation"), r, rtol=1e-9, atol=1e-12)
    upper = np.abs(r[np.triu_indices(8, 1)])
    assert result["units"]["blocks.1"]["metrics"]["max_abs_correlation"] == pytest.approx(upper.max(), rel=1e-9)
    assert result["units"]["blocks.1"]["metrics"]["mean_abs_correlation"] == pytest.approx(upper.mean(), rel=1e-9)
    top = art.table("top_pairs")
    assert len(top) == 3 and abs(top["r"].iloc[0]) == pytest.approx(upper.max(), rel=1e-9)
    with pytest.warns(UserWarning, match="first 4 of 8 neurons"):
        capped = analyze(run, "correlation", layers="blocks.1", params={"max_neurons": 4})
    np.testing.assert_allclose(capped.array("correlation"), S.pearson_correlation(x["blocks.1"][:, :4]), rtol=1e-9)
    chosen = analyze(run, "correlation", layers="blocks.1", params={"neurons": [6, 1, 3]})
    np.testing.assert_allclose(chosen.array("correlation"), S.pearson_correlation(x["blocks.1"][:, [6, 1, 3]]),
                               rtol=1e-9)

    result = cli_json(capsys, "analyze", run, "cosine", "--layers", "blocks.2", "--labels", "topic")
    art = analyze(run, "cosine", layers="blocks.2", labels="topic")
    assert art.reused
    s = S.cosine_similarity(x["blocks.2"])
    np.testing.assert_allclose(art.array("cosine"), s, rtol=1e-9, atol=1e-12)
    topic = pd.read_parquet(run / "prompts.parquet")["topic"].to_numpy()
    same = (topic[:, None] == topic[None, :]) & ~np.eye(120, dtype=bool)
    metrics = result["units"]["blocks.2"]["metrics"]
    assert metrics["within_label_mean"] == pytest.approx(s[same].mean(), rel=1e-9)
    assert metrics["between_label_mean"] == pytest.approx(s[topic[:, None] != topic[None, :]].mean(), rel=1e-9)
    with pytest.warns(UserWarning, match="seeded sample of 30 of 120 rows"):
        small = analyze(run, "cosine", layers="blocks.2", params={"max_samples": 30})
    rows = small.array("rows")
    np.testing.assert_allclose(small.array("cosine"), S.cosine_similarity(x["blocks.2"][rows]), rtol=1e-9, atol=1e-12)


def test_pair_modes_are_validated():
    with pytest.raises(ValueError, match="pairs='sideways' must be one of all, consecutive, ordered"):
        register("test-sideways", family="test", summary="x", params=Params, scope="layer_pair", pairs="sideways")
