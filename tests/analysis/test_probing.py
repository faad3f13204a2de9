"""`probe`: planted features, control tasks, an independent sklearn reference and the CLI."""

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import KFold, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from analysistest_util import write_synthetic_run
from neuronmap.analysis.probing import accuracy_by_layer, control_labels, probe
from neuronmap.cli import main
from neuronmap.errors import ConfigError


def planted(n=400, d=16, seed=0):
    """x Gaussian, y = sign of one fixed direction: a linear feature a probe should find."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    w = rng.standard_normal(d)
    return x, np.where(x @ w > 0, "pos", "neg")


def test_planted_feature_is_found_and_control_stays_near_chance():
    x, y = planted()
    result = probe(x, y, seed=0)
    assert result.task == "classification" and result.n_classes == 2
    assert result.accuracy_mean > 0.95
    assert abs(result.control_mean - 0.5) < 0.1
    assert result.selectivity == pytest.approx(result.accuracy_mean - result.control_mean)


def test_equals_a_direct_sklearn_cross_val_score():
    x, y = planted(n=200, d=8, seed=3)
    result = probe(x, y, n_splits=4, C=0.5, seed=7)
    reference = cross_val_score(make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=1000)), x, y,
                                cv=StratifiedKFold(4, shuffle=True, random_state=7))
    np.testing.assert_allclose(result.scores, reference)
    control = control_labels(y, seed=7)
    reference_control = cross_val_score(make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=1000)),
                                        x, control, cv=StratifiedKFold(4, shuffle=True, random_state=7))
    np.testing.assert_allclose(result.control_scores, reference_control)


def test_continuous_labels_use_ridge_r2():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((150, 6))
    y = x @ rng.standard_normal(6) + 0.01 * rng.standard_normal(150)
    result = probe(x, y, alpha=2.0, seed=1)
    assert result.task == "regression" and result.n_classes is None and result.accuracy_mean > 0.99
    reference = cross_val_score(make_pipeline(StandardScaler(), Ridge(alpha=2.0)), x, y,
                                cv=KFold(5, shuffle=True, random_state=1))
    np.testing.assert_allclose(result.scores, reference)
    assert result.control_mean < 0.2


def test_control_labels_keep_the_distribution_and_are_per_type():
    y = np.array(["a"] * 30 + ["b"] * 10)
    control = control_labels(y, seed=0)
    assert sorted(control.tolist()) == sorted(y.tolist()) and not np.array_equal(control, y)
    np.testing.assert_array_equal(control, control_labels(y, seed=0))
    types = np.repeat(np.arange(8), 5)  # 8 types, 5 rows each, label constant within a type
    y_typed = np.repeat(np.array(list("aaaaaabb")), 5)
    control = control_labels(y_typed, types, seed=2)
    assert all(len(set(control[types == t])) == 1 for t in range(8))
    assert (control == "b").sum() == (y_typed == "b").sum()


@pytest.mark.parametrize("labels, words", [
    (["same"] * 40, ["single class", "same"]),
    (["a"] * 38 + ["b"] * 2, ["smallest class", "n_splits=5"]),
])
def test_bad_labels_raise_config_error(labels, words):
    x = np.random.default_rng(0).standard_normal((40, 4))
    with pytest.raises(ConfigError) as info:
        probe(x, np.array(labels))
    assert all(w in str(info.value) for w in words) and "\n" not in str(info.value)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_probe_on_a_synthetic_run(capsys, tmp_path):
    x, y = planted(n=200, d=8, seed=5)
    noise = np.random.default_rng(9).standard_normal(x.shape).astype(np.float32)
    path = write_synthetic_run(tmp_path / "run", {"blocks.0": noise, "blocks.1": x},
                               labels={"feature": y.tolist(), "constant": ["c"] * 200}, samples_per_shard=64)
    code, out, err = run_cli(capsys, "analyze", path, "probe", "--labels", "feature", "--json")
    assert code == 0, err
    units = json.loads(out)["units"]
    assert units["blocks.1"]["metrics"]["accuracy_mean"] > 0.95
    assert abs(units["blocks.0"]["metrics"]["accuracy_mean"] - 0.5) < 0.15
    assert abs(units["blocks.1"]["metrics"]["control_accuracy"] - 0.5) < 0.15
    curve = accuracy_by_layer({layer: unit["metrics"] for layer, unit in units.items()})
    assert curve["layer"].tolist() == ["blocks.0", "blocks.1"] and curve["selectivity"].iloc[1] > 0.3
    direct = probe(x, y, seed=0)
    assert units["blocks.1"]["metrics"]["accuracy_mean"] == pytest.approx(direct.accuracy_mean)

    code, _, err = run_cli(capsys, "analyze", path, "probe", "--labels", "constant")
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "single class" in err, err


def test_accuracy_by_layer_reads_the_probe_artifact(tmp_path):
    """The README's `accuracy_by_layer(analyze(run, "probe", labels=...))`: one row per layer in run order,
    each equal to a direct sklearn cross-validation of that layer (and of its control labels)."""
    from neuronmap.analysis import analyze, load_artifact

    x, y = planted(n=200, d=8, seed=5)
    noise = np.random.default_rng(9).standard_normal(x.shape).astype(np.float32)
    layers = {"blocks.0": noise, "blocks.1": x}
    path = write_synthetic_run(tmp_path / "run", layers, labels={"feature": y.tolist()}, samples_per_shard=64)
    artifact = analyze(path, "probe", labels="feature")
    curve = accuracy_by_layer(artifact)
    assert list(curve.columns) == ["layer", "accuracy_mean", "accuracy_std", "control_accuracy", "selectivity"]
    assert curve["layer"].tolist() == ["blocks.0", "blocks.1"]
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    estimator = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
    control = control_labels(y, seed=0)
    for row, (layer, data) in zip(curve.itertuples(), layers.items()):
        scores = cross_val_score(estimator, data, y, cv=folds)
        control_scores = cross_val_score(estimator, data, control, cv=folds)
        assert row.layer == layer
        assert row.accuracy_mean == pytest.approx(scores.mean()) and row.accuracy_std == pytest.approx(scores.std())
        assert row.control_accuracy == pytest.approx(control_scores.mean())
        assert row.selectivity == pytest.approx(scores.mean() - control_scores.mean())
    assert curve["selectivity"].iloc[1] > 0.3
    # the same curve from the loaded artifact, its result.json dict (what --json prints), its units, or
    # per-layer metrics (what it accepted before)
    for source in (load_artifact(artifact.path), artifact.result, artifact.result["units"],
                   {layer: artifact.metrics(layer) for layer in artifact.units}):
        assert curve.equals(accuracy_by_layer(source))
    with pytest.raises(ConfigError) as info:
        accuracy_by_layer(artifact.units)  # a list of layer names, not the metrics
    assert "\n" not in str(info.value) and "pass the artifact itself" in str(info.value)
    stats = analyze(path, "stats")
    with pytest.raises(ConfigError, match="'probe' analysis, not 'stats'"):
        accuracy_by_layer(stats)
