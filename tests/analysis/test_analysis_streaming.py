"""The runner folds per-shard partials as they arrive (memory flat in the number of shards), and
layer-pair CKA computes each layer's self-moments once for all its pairs."""

import tracemalloc
import warnings

import numpy as np
import pytest

from analysistest_util import write_synthetic_run
from neuronmap.analysis import analyze
from neuronmap.analysis.builtin import statistics as builtin_statistics
from neuronmap.analysis.builtin.similarity import cka_layer_moments, cka_pair_moments
from neuronmap.analysis.runner import LocalEngine


class MapOnly:
    """An engine without `imap`: the runner must then take every result at once (the fallback)."""

    name = "map-only"

    def map(self, fn, items):
        return [fn(item) for item in items]


class Recording(LocalEngine):
    """The local engine, recording the function of every task it runs."""

    name = "recording"

    def __init__(self):
        self.functions = []

    def map(self, fn, items):
        self.functions += [item.fn for item in items]
        return super().map(fn, items)


def traced_peak(fn) -> tuple[object, int]:
    tracemalloc.start()
    try:
        value = fn()
        return value, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_stats_memory_does_not_grow_with_the_number_of_shards(tmp_path, monkeypatch):
    x = np.random.default_rng(0).standard_normal((24_000, 64)).astype(np.float32)
    few = write_synthetic_run(tmp_path / "few", {"blocks.0": x}, samples_per_shard=8_000)   # 3 shards
    many = write_synthetic_run(tmp_path / "many", {"blocks.0": x}, samples_per_shard=800)   # 30 shards
    params = {"reservoir_size": 800}  # a whole sample: 800 x 64 float32 = 200 KiB
    partial = 800 * 64 * 4

    def run(path, engine):
        return lambda: analyze(path, "stats", params=params, engine=engine, force=True)

    run(few, LocalEngine(workers=1))()  # warm-up: lazy imports and caches are not what is measured
    few_artifact, few_peak = traced_peak(run(few, LocalEngine(workers=1)))
    many_artifact, many_peak = traced_peak(run(many, LocalEngine(workers=1)))
    held_artifact, held_peak = traced_peak(run(many, MapOnly()))
    # folded as they arrive: 30 shards cost about what 3 do; and each partial keeps only the rows
    # that end in the merged sample (~27 of 800 here), so even holding all 30 costs little
    assert many_peak - few_peak < 4 * partial, (few_peak, many_peak)
    assert held_peak - many_peak < 4 * partial, (many_peak, held_peak)
    # without the merged bound every partial carries a whole sample: all held at once, ~30 more
    monkeypatch.setattr(builtin_statistics, "_merged_bound", lambda parts, size: np.inf)
    uncut_artifact, uncut_peak = traced_peak(run(many, MapOnly()))
    assert uncut_peak - many_peak > 20 * partial, (many_peak, uncut_peak)
    np.testing.assert_array_equal(uncut_artifact.array("percentiles"), many_artifact.array("percentiles"))
    for key in ("mean", "std", "kurtosis", "percentiles"):
        np.testing.assert_array_equal(many_artifact.array(key), held_artifact.array(key), err_msg=key)
    np.testing.assert_allclose(many_artifact.array("mean"), few_artifact.array("mean"), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(many_artifact.array("std"), x.astype(np.float64).std(axis=0), rtol=1e-9)


def test_stats_percentile_sample_does_not_depend_on_how_shards_are_grouped(tmp_path):
    x = np.random.default_rng(1).standard_normal((3_000, 4)).astype(np.float32)
    run = write_synthetic_run(tmp_path / "run", {"blocks.0": x}, samples_per_shard=250)
    params = {"reservoir_size": 500, "percentiles": [5, 50, 95]}
    streamed = analyze(run, "stats", params=params)
    held = analyze(run, "stats", params=params, engine=MapOnly(), force=True)
    np.testing.assert_array_equal(streamed.array("percentiles"), held.array("percentiles"))
    assert streamed.metrics()["percentiles_exact"] is False
    ranks = (x[None, :, :] <= streamed.array("percentiles")[:, None, :]).mean(axis=1)
    assert np.abs(ranks - np.array([0.05, 0.5, 0.95])[:, None]).max() < 0.06


def numpy_linear_cka(x, y):
    """Kornblith et al.'s feature-space formula, straight from the definition."""
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def numpy_debiased_cka(x, y):
    """Unbiased HSIC (Song et al. 2012) on zero-diagonal Gram matrices, written out in numpy."""
    def hsic(k, l):
        n = len(k)
        k, l = k.copy(), l.copy()
        np.fill_diagonal(k, 0)
        np.fill_diagonal(l, 0)
        ones = np.ones(n)
        return (np.trace(k @ l) + (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * ones @ k @ l @ ones) / (n * (n - 3))

    k, l = x @ x.T, y @ y.T
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


@pytest.mark.parametrize("method, reference", [("linear", numpy_linear_cka), ("debiased", numpy_debiased_cka)])
def test_cka_pairs_share_each_layers_self_moments(tmp_path, method, reference):
    rng = np.random.default_rng(2)
    h, layers = rng.standard_normal((150, 7)), {}
    for i in range(4):
        h = np.tanh(h @ rng.standard_normal((7, 7))) + 0.3 * h
        layers[f"blocks.{i}"] = (h * (i + 1)).astype(np.float32)
    run = write_synthetic_run(tmp_path / "run", layers, samples_per_shard=40)
    engine = Recording()
    artifact = analyze(run, "cka", params={"method": method}, engine=engine)
    assert engine.functions.count(cka_layer_moments) == 4 and engine.functions.count(cka_pair_moments) == 6
    assert len(engine.functions) == 10  # 4 layers + 6 pairs, not 3 moment passes per pair
    for unit in artifact.units:
        first, second = unit.split("|")
        x, y = (layers[name].astype(np.float64) for name in (first, second))
        assert artifact.metrics(unit)["cka"] == pytest.approx(reference(x, y), rel=1e-9)
        assert artifact.metrics(unit)["n_used"] == 150


def test_shared_cka_warns_once_per_constant_layer_and_gives_zero(tmp_path):
    rng = np.random.default_rng(3)
    layers = {"blocks.0": rng.standard_normal((60, 3)).astype(np.float32),
              "blocks.1": np.full((60, 3), 2.0, dtype=np.float32),
              "blocks.2": rng.standard_normal((60, 3)).astype(np.float32)}
    run = write_synthetic_run(tmp_path / "run", layers, samples_per_shard=25)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        artifact = analyze(run, "cka")
    assert artifact.metrics("blocks.0|blocks.1")["cka"] == 0.0 and artifact.metrics("blocks.1|blocks.2")["cka"] == 0.0
    assert artifact.metrics("blocks.0|blocks.2")["cka"] == pytest.approx(
        numpy_linear_cka(layers["blocks.0"].astype(np.float64), layers["blocks.2"].astype(np.float64)), rel=1e-9)
    assert any("constant" in text for text in artifact.warnings)
