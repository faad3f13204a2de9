"""CAVs of layers with near-dead neurons (std ~1e-32) against the numpy mean difference of the raw rows.

Before dead features were left out, ``w / scale`` turned the ~1e-32 spread of such a neuron into a weight
of ~1e30 and the unit CAV pointed entirely along it (cosine 0 with the concept's mean difference).
"""

from __future__ import annotations

import numpy as np
import pytest
from concepttest_util import write_run

from neuronmap.analysis.runner import analyze
from neuronmap.concepts.cav import cav_runs, dead_features, fit_cav

D, DEAD = 40, (3, 17, 31)


def _planted(seed: int = 0, n: int = 400):
    """(rows float32, labels, true unit direction): concept rows shifted by 1.5 along u; columns DEAD
    replaced by ~1e-32 noise (a neuron that is all but switched off)."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(D)
    u[list(DEAD)] = 0.0
    u /= np.linalg.norm(u)
    y = np.arange(n) % 2 == 1
    x = rng.standard_normal((n, D))
    x[y] += 1.5 * u
    x[:, list(DEAD)] = 1e-32 * rng.standard_normal((n, len(DEAD)))
    return x.astype(np.float32), y, u


def _cosine(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_dead_columns_get_zero_weight_and_cav_follows_mean_difference():
    x, y, u = _planted()
    live = np.setdiff1d(np.arange(D), DEAD)
    x64 = x.astype(np.float64)
    mean_diff = x64[y].mean(0) - x64[~y].mean(0)  # independent reference: plain numpy on the raw rows
    cav = fit_cav(x[y], x[~y], seed=0)
    assert _cosine(cav.vector, mean_diff) > 0.9
    assert cav.n_dead == len(DEAD)
    assert np.all(cav.vector[list(DEAD)] == 0.0)
    assert np.linalg.norm(cav.vector) == pytest.approx(1.0)
    assert abs(cav.raw_norm) < 1e3  # not the ~1e30 of a weight divided by a ~1e-32 spread
    assert _cosine(cav.vector, u) > 0.85
    # the same CAV as on the layer without the dead columns
    without = fit_cav(x[y][:, live], x[~y][:, live], seed=0)
    assert without.n_dead == 0
    np.testing.assert_allclose(cav.vector[live], without.vector, atol=1e-9)
    assert cav.accuracy == without.accuracy
    assert cav.intercept == pytest.approx(without.intercept)


def test_dead_feature_rule():
    """std <= 1e-6 x the largest std is dead; a small but real spread (1e-3 relative) and the largest are kept."""
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((200, 5))
    rows[:, 1] *= 1e-3
    rows[:, 2] *= 1e-8
    rows[:, 3] = 7.0
    rows[:, 4] *= 1e-32
    std = rows.std(0)
    assert dead_features(rows).tolist() == (std <= 1e-6 * std.max()).tolist() == [False, False, True, True, True]
    assert not dead_features(np.ones((10, 3))).any()  # all constant: nothing to compare against


def test_identical_examples_are_refused_not_a_zero_cav():
    """With pooling `first` on a model that starts every prompt with BOS, every example is the same row: the fit
    gave a zero CAV and TCAV scores of 0 without a word."""
    from neuronmap.errors import ConfigError

    rows = np.tile(np.arange(6.0), (40, 1))
    with pytest.raises(ConfigError, match="every training example has the same activations here"):
        fit_cav(rows[:20], rows[20:])


def test_cav_runs_and_random_cavs_ignore_dead_columns():
    """The TCAV null distribution (random-vs-random CAVs) must not lock onto the dead neurons either."""
    x, y, _ = _planted(seed=2)
    runs = cav_runs(x[y], x[~y], n_runs=3, null_sets=2, max_examples=60)
    assert np.all(runs.vectors[:, list(DEAD)] == 0.0)
    assert np.all(runs.null_vectors[..., list(DEAD)] == 0.0)


def test_cav_analysis_on_layer_with_dead_neurons(tmp_path):
    """End to end (`analyze ... cav`): the stored CAV agrees with the numpy mean difference of the stored rows."""
    x, y, _ = _planted(seed=3)
    labels = np.where(y, "math", "other").tolist()
    run = write_run(tmp_path / "run", {"blocks.0": x}, labels={"topic": labels}, samples_per_shard=64)
    artifact = analyze(run, "cav", layers="blocks.0", labels="topic", params={"concept": "math"})
    vector = artifact.array("cavs", "blocks.0")[0]
    x64 = x.astype(np.float64)
    assert _cosine(vector, x64[y].mean(0) - x64[~y].mean(0)) > 0.9
    assert np.all(vector[list(DEAD)] == 0.0)
