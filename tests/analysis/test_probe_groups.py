"""`probe` on per-token runs: folds keep a prompt's tokens together (checked against sklearn's group splitters on
the raw arrays); pooled runs keep exactly the row folds they had."""

import warnings

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from analysistest_util import read_layer_h5, write_per_token_run, write_synthetic_run
from neuronmap.analysis import analyze
from neuronmap.analysis.probing import control_labels, probe
from neuronmap.errors import ConfigError


def logistic():
    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))


def prompt_tokens(n_prompts=60, tokens=8, d=48, n_classes=3, seed=0):
    """Tokens whose only shared structure is their prompt: a strong per-prompt offset, labels random per
    prompt. A layer like this says nothing about the label; only memorising prompts can score above chance."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_prompts), tokens)
    offsets = 3.0 * rng.standard_normal((n_prompts, d))
    x = (offsets[groups] + 0.3 * rng.standard_normal((len(groups), d))).astype(np.float32)
    prompt_labels = np.array([f"c{i % n_classes}" for i in rng.permutation(n_prompts)])
    return x, prompt_labels[groups], groups


def test_grouped_folds_equal_sklearn_stratified_group_kfold_and_stop_the_prompt_leak():
    x, y, groups = prompt_tokens()
    result = probe(x, y, n_splits=5, seed=3, types=groups, groups=groups)
    folds = StratifiedGroupKFold(5, shuffle=True, random_state=3)
    reference = cross_val_score(logistic(), x, y, cv=folds, groups=groups)
    control = control_labels(y, groups, seed=3)
    reference_control = cross_val_score(logistic(), x, control, cv=folds, groups=groups)
    np.testing.assert_allclose(result.scores, reference)
    np.testing.assert_allclose(result.control_scores, reference_control)
    assert result.n_groups == 60
    # the leak the grouping removes: split by rows, memorised prompts look like a decodable label
    leaky = cross_val_score(logistic(), x, y, cv=StratifiedKFold(5, shuffle=True, random_state=3))
    assert leaky.mean() > 0.9 and result.accuracy_mean < 0.6


def test_continuous_labels_use_group_kfold():
    x, _, groups = prompt_tokens(seed=1)
    rng = np.random.default_rng(1)
    y = (rng.standard_normal(60))[groups] + x[:, 0] * 0.1
    result = probe(x, y, task="regression", n_splits=4, seed=2, groups=groups)
    try:
        folds = GroupKFold(4, shuffle=True, random_state=2)
    except TypeError:  # sklearn < 1.6
        folds = GroupKFold(4)
    reference = cross_val_score(make_pipeline(StandardScaler(), Ridge(alpha=1.0)), x, y, cv=folds, groups=groups)
    np.testing.assert_allclose(result.scores, reference)
    assert result.task == "regression" and result.n_groups == 60


def test_a_class_in_too_few_prompts_falls_back_to_group_kfold_with_a_warning():
    x, _, groups = prompt_tokens(n_prompts=30, seed=2)
    y = np.where(groups < 3, "rare", "common")  # "rare" spans 3 prompts, n_splits=5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = probe(x, y, n_splits=5, seed=0, groups=groups)
    assert any("spans only 3 prompts" in str(w.message) for w in caught)
    for train, test in GroupKFold(5, shuffle=True, random_state=0).split(x, y, groups):
        assert not set(groups[train]) & set(groups[test])
    reference = cross_val_score(logistic(), x, y, cv=GroupKFold(5, shuffle=True, random_state=0), groups=groups)
    np.testing.assert_allclose(result.scores, reference)


def test_fewer_prompts_than_folds_is_a_one_line_config_error():
    x, y, groups = prompt_tokens(n_prompts=4, tokens=10, n_classes=2)
    with pytest.raises(ConfigError) as info:
        probe(x, y, n_splits=5, groups=groups)
    assert "4 prompts, fewer than n_splits=5" in str(info.value) and "\n" not in str(info.value)


def test_one_row_per_group_keeps_the_row_folds_exactly():
    x, y, _ = prompt_tokens(n_prompts=200, tokens=1, seed=4)
    plain = probe(x, y, seed=5)
    grouped = probe(x, y, seed=5, groups=np.arange(200) + 1000, types=np.arange(200))
    np.testing.assert_array_equal(grouped.scores, plain.scores)
    np.testing.assert_array_equal(grouped.control_scores, plain.control_scores)
    assert grouped.n_groups is None and plain.n_groups is None


def test_per_token_run_probe_is_grouped_by_prompt(tmp_path):
    """analyze(per-token run, "probe") against sklearn's StratifiedGroupKFold on the layer read with plain h5py."""
    rng = np.random.default_rng(7)
    lengths = rng.integers(3, 9, size=50).tolist()
    topics = [f"t{i % 3}" for i in range(50)]
    path, _ = write_per_token_run(tmp_path / "tok", lengths, n_features=6, seed=7, labels={"topic": topics})
    artifact = analyze(path, "probe", labels="topic", n_splits=4, seed=1)
    metrics = artifact.metrics("blocks.0")
    x = read_layer_h5(path, "blocks.0")
    sample_ids = np.repeat(np.arange(50), lengths)
    y = np.asarray(topics)[sample_ids]
    folds = StratifiedGroupKFold(4, shuffle=True, random_state=1)
    scores = cross_val_score(logistic(), x, y, cv=folds, groups=sample_ids)
    first = np.unique(sample_ids, return_index=True)[1]
    control = y[first][np.random.default_rng(1).permutation(50)][sample_ids]  # Hewitt & Liang, one label per prompt
    control_scores = cross_val_score(logistic(), x, control, cv=folds, groups=sample_ids)
    np.testing.assert_allclose(artifact.array("scores", "blocks.0"), scores)
    np.testing.assert_allclose(artifact.array("control_scores", "blocks.0"), control_scores)
    assert metrics["selectivity"] == pytest.approx(scores.mean() - control_scores.mean())
    assert metrics["folds"] == "grouped_by_prompt" and metrics["n_groups"] == 50 and metrics["n_rows"] == sum(lengths)


def test_pooled_run_probe_keeps_the_row_folds(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((150, 8)).astype(np.float32)
    y = np.where(x[:, 0] + 0.5 * rng.standard_normal(150) > 0, "pos", "neg")
    path = write_synthetic_run(tmp_path / "pooled", {"blocks.0": x}, labels={"feature": y.tolist()},
                               samples_per_shard=40)
    metrics = analyze(path, "probe", labels="feature").metrics("blocks.0")
    assert metrics["folds"] == "rows" and metrics["n_groups"] is None
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    scores = cross_val_score(logistic(), x, y, cv=folds)
    control_scores = cross_val_score(logistic(), x, control_labels(y, seed=0), cv=folds)
    assert metrics["accuracy_mean"] == pytest.approx(scores.mean(), abs=1e-12)
    assert metrics["control_accuracy"] == pytest.approx(control_scores.mean(), abs=1e-12)
