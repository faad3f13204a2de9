"""Streaming statistics against numpy/scipy on the concatenated data, including merged partials."""

import pickle
import warnings

import numpy as np
import pytest
from scipy import stats as scipy_stats

from analysistest_util import write_synthetic_run
from neuronmap.analysis import analyze
from neuronmap.analysis.reservoir import merged_bound
from neuronmap.analysis.statistics import Reservoir, RunningStats, neuron_rankings, neuron_statistics
from neuronmap.errors import ConfigError


def data(seed=0, n=1200, d=6):
    rng = np.random.default_rng(seed)
    x = np.column_stack([
        rng.standard_normal(n) * 3 + 1000,           # large offset: catastrophic cancellation if done naively
        rng.gamma(2.0, 2.0, n),                      # skewed
        rng.standard_t(3, n),                        # heavy tails
        np.maximum(rng.standard_normal(n), 0),       # ReLU: exact zeros
        rng.standard_normal(n) * 1e-7,               # below eps
        rng.uniform(-1, 1, n),
    ][:d])
    return x


def random_split(x, rng, parts):
    cuts = np.sort(rng.integers(0, len(x) + 1, parts - 1))
    return np.split(x, cuts)  # some pieces may be empty or a single row


def assert_matches_reference(stats: RunningStats, x: np.ndarray, eps=1e-6):
    np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.std(), x.std(axis=0), rtol=1e-9)
    np.testing.assert_allclose(stats.var(ddof=1), x.var(axis=0, ddof=1), rtol=1e-9)
    np.testing.assert_array_equal(stats.minimum, x.min(axis=0))
    np.testing.assert_array_equal(stats.maximum, x.max(axis=0))
    np.testing.assert_allclose(stats.skewness(), scipy_stats.skew(x, axis=0), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(stats.kurtosis(), scipy_stats.kurtosis(x, axis=0), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(stats.mean_abs(), np.abs(x).mean(axis=0), rtol=1e-12)
    np.testing.assert_array_equal(stats.sparsity(), (np.abs(x) < eps).mean(axis=0))
    np.testing.assert_array_equal(stats.zero_fraction(), (x == 0).mean(axis=0))
    statistic, pvalue = stats.normality()
    reference = scipy_stats.normaltest(x, axis=0)
    np.testing.assert_allclose(statistic, reference.statistic, rtol=1e-6)
    np.testing.assert_allclose(pvalue, reference.pvalue, rtol=1e-6, atol=1e-300)


def test_single_pass_matches_numpy_and_scipy():
    x = data()
    assert_matches_reference(RunningStats().add(x), x)


@pytest.mark.parametrize("seed", range(5))
def test_merged_random_splits_match_single_pass(seed):
    rng = np.random.default_rng(seed)
    x = data(seed)
    parts = random_split(x, rng, parts=int(rng.integers(2, 12)))
    # each part folded batch by batch, then the partials merged in a random tree order
    partials = []
    for part in parts:
        partial = RunningStats()
        for batch in random_split(part, rng, parts=3):
            partial.add(batch)
        partials.append(partial)
    while len(partials) > 1:
        i = int(rng.integers(0, len(partials) - 1))
        partials[i].merge(partials.pop(i + 1))
    assert partials[0].count == len(x)
    assert_matches_reference(partials[0], x)


def test_state_dict_crosses_processes_and_merges():
    x = data(3)
    left, right = RunningStats().add(x[:500]), RunningStats().add(x[500:])
    shipped = pickle.loads(pickle.dumps(right.state_dict()))
    merged = RunningStats().load_state_dict(left.state_dict()).merge(RunningStats().load_state_dict(shipped))
    assert_matches_reference(merged, x)


def test_constant_neurons_give_no_nan_and_a_warning():
    x = np.column_stack([np.full(50, 3.25), np.zeros(50), np.arange(50.0)])
    with pytest.warns(UserWarning, match="2 of 3 neurons are constant"):
        summary = RunningStats().add(x[:20]).merge(RunningStats().add(x[20:])).summary()
    for name, value in summary.items():
        assert np.isfinite(value).all(), name
    assert summary["skewness"][0] == 0 and summary["kurtosis"][1] == 0 and summary["std"][0] == 0
    assert summary["normality_pvalue"][0] == 1.0 and summary["zero_fraction"][1] == 1.0


def test_reservoir_is_exact_while_small_and_uniform_when_merged():
    x = data(4)
    reservoir = Reservoir(size=len(x))
    for part in np.array_split(x, 7):
        reservoir.merge(Reservoir(size=len(x)).add(part))
    q = [0, 1, 25, 50, 99, 100]
    assert reservoir.exact
    np.testing.assert_allclose(reservoir.percentiles(q), np.percentile(x, q, axis=0), rtol=1e-12)

    # a 400-row sample of 1,000 zeros + 3,000 ones holds about 75% ones
    zeros, ones = Reservoir(400, seed=1).add(np.zeros((1000, 1))), Reservoir(400, seed=2).add(np.ones((3000, 1)))
    merged = zeros.merge(ones)
    assert merged.count == 4000 and len(merged.rows) == 400 and not merged.exact
    assert abs(merged.rows.mean() - 0.75) < 0.08


def test_reservoir_percentiles_of_a_large_stream_are_close_in_rank():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((60_000, 3))
    reservoir = Reservoir(size=4096, seed=0)
    for batch in np.array_split(x, 15):
        reservoir.add(batch)
    q = np.array([5, 25, 50, 75, 95])
    estimates = reservoir.percentiles(q)
    ranks = (x[None, :, :] <= estimates[:, None, :]).mean(axis=1)  # where each estimate really falls
    assert np.abs(ranks - q[:, None] / 100).max() < 0.03


def test_rankings_and_in_memory_helper():
    x = data(6)
    out = neuron_statistics(x, percentiles=[50])
    ranks = neuron_rankings(out, top_k=3)
    np.testing.assert_array_equal(ranks["most_active"], np.argsort(-np.abs(x).mean(axis=0))[:3])
    np.testing.assert_array_equal(ranks["most_variable"], np.argsort(-x.std(axis=0))[:3])
    assert ranks["sparsest"][0] == 4  # the 1e-7-scale neuron
    np.testing.assert_allclose(out["percentiles"][0], np.median(x, axis=0))


@pytest.mark.parametrize("kind", ["float32", "float16", "int", "bool", "strided", "3d"])
def test_every_input_dtype_and_layout_matches_numpy(kind):
    """The compiled kernel reads float32/float64 rows in place and converts the rest chunk by chunk."""
    rng = np.random.default_rng(9)
    x = {"float32": lambda: (data(9, n=1001) * 1.5).astype(np.float32),
         "float16": lambda: rng.standard_normal((517, 5)).astype(np.float16),
         "int": lambda: rng.integers(-3, 4, (801, 6)),
         "bool": lambda: rng.random((403, 4)) > 0.6,
         "strided": lambda: rng.standard_normal((650, 21))[::2, ::3],
         "3d": lambda: rng.standard_normal((300, 2, 3)).astype(np.float32)}[kind]()
    stats = RunningStats()
    for part in np.array_split(x, 3):
        stats.add(part)
    flat = x.reshape(len(x), -1).astype(np.float64)
    assert_matches_reference(stats, flat)
    assert stats.minimum.dtype == stats.maximum.dtype == np.float64


def test_nan_and_infinity_give_numpy_extremes_and_leave_other_neurons_alone():
    x = data(10, n=200)
    x[17, 2], x[40, 4] = np.nan, np.inf
    stats = RunningStats().add(x[:100]).merge(RunningStats().add(x[100:]))
    np.testing.assert_array_equal(stats.minimum, x.min(axis=0))  # NaN where a NaN is, like numpy
    np.testing.assert_array_equal(stats.maximum, x.max(axis=0))
    assert np.isnan(stats.mean[2]) and np.isnan(stats.m2[2])
    finite = [0, 1, 3, 5]
    np.testing.assert_allclose(stats.mean[finite], x[:, finite].mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.std()[finite], x[:, finite].std(axis=0), rtol=1e-9)


def test_reservoir_state_dict_shares_rows_but_never_changes_afterwards():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((5000, 3)).astype(np.float32)
    source = Reservoir(256, seed=1).add(x[:1000])
    state = source.state_dict()
    frozen = state["rows"].copy()
    source.add(x[1000:3000])  # rows enter: the reservoir copies before writing, the dict keeps its rows
    np.testing.assert_array_equal(state["rows"], frozen)
    loaded = Reservoir(256).load_state_dict(state)
    loaded.add(x[3000:])  # and a reservoir loaded from the dict copies before writing into it
    np.testing.assert_array_equal(state["rows"], frozen)
    # the continued reservoirs still hold exactly the rows of their smallest keys (bottom-k)
    reference = Reservoir(256, seed=1).add(x[:1000]).add(x[1000:3000])
    np.testing.assert_array_equal(source.rows, reference.rows)
    reference = Reservoir(256, seed=1).add(x[:1000]).add(x[3000:])  # the loaded one went on from the dict
    np.testing.assert_array_equal(loaded.rows, reference.rows)
    assert loaded.count == 3000 and loaded.state_dict()["rng"] == reference.state_dict()["rng"]


@pytest.mark.parametrize("start", [0, 40, 256])
def test_reservoir_expect_keeps_the_same_sample_and_generator_state(start):
    """Keys drawn up front for announced rows are the keys `add` draws batch by batch: same bottom-k sample."""
    rng = np.random.default_rng(13)
    x = rng.standard_normal((5000, 4)).astype(np.float32)
    plain, planned = Reservoir(256, seed=3), Reservoir(256, seed=3)
    plain.add(x[:start])
    planned.add(x[:start])  # the sample may be empty, partly filled or full when rows are announced
    planned.expect(4000)
    for part in random_split(x[start : start + 4000], rng, 9):
        plain.add(part)
        planned.add(part)
    for reservoir in (plain, planned):  # rows past the announced ones draw their keys as they come
        reservoir.add(x[start + 4000 :])
    order_plain, order_planned = np.argsort(plain._keys), np.argsort(planned._keys)
    np.testing.assert_array_equal(planned._keys[order_planned], plain._keys[order_plain])
    np.testing.assert_array_equal(planned.rows[order_planned], plain.rows[order_plain])
    assert planned.count == plain.count == 5000
    assert planned.state_dict()["rng"] == plain.state_dict()["rng"]
    np.testing.assert_array_equal(planned.percentiles([5, 50, 95]), plain.percentiles([5, 50, 95]))
    # the sample is the rows of the 256 smallest keys among all 5000 draws of the generator
    keys = np.random.default_rng(3).random(5000)
    np.testing.assert_array_equal(np.sort(planned._keys), np.sort(keys)[:256])


@pytest.mark.parametrize("size", [1, 300, 5000])
def test_partials_cut_at_the_merged_bound_merge_into_the_uncut_sample(size):
    """Shard partials that keep only keys <= merged_bound merge into the very sample uncut partials give."""
    rng = np.random.default_rng(21)
    shards = [rng.standard_normal((n, 3)).astype(np.float32) for n in (700, 1, 1200, 333, 0, 900)]
    parts = [(100 + i, len(x)) for i, x in enumerate(shards)]
    bound = merged_bound(parts, size, chunk=256)  # chunks: the key stream continues across draws
    all_keys = np.concatenate([np.random.default_rng(seed).random(n) for seed, n in parts])
    assert bound == (np.inf if len(all_keys) <= size else np.sort(all_keys)[size - 1])
    cut, uncut = Reservoir(size), Reservoir(size)
    held = 0
    for (seed, n), x in zip(parts, shards):
        partial = Reservoir(size, seed=seed).expect(n, bound=bound)
        for piece in random_split(x, rng, 3):
            partial.add(piece)
        held += 0 if partial.rows is None else len(partial.rows)
        assert partial.count == n and partial.largest_key <= bound
        cut.merge(partial)
        uncut.merge(Reservoir(size, seed=seed).expect(n).add(x))
    assert held == min(size, len(all_keys))  # together the partials hold exactly the merged sample
    assert cut.count == uncut.count == len(all_keys)
    np.testing.assert_array_equal(np.sort(cut._keys), np.sort(uncut._keys))
    np.testing.assert_array_equal(cut.percentiles([1, 50, 99]), uncut.percentiles([1, 50, 99]))


def test_stats_refuses_partials_cut_for_other_shards(tmp_path, monkeypatch):
    from neuronmap.analysis.builtin import statistics as builtin_statistics

    x = np.random.default_rng(22).standard_normal((2000, 3)).astype(np.float32)
    run = write_synthetic_run(tmp_path / "run", {"blocks.0": x}, samples_per_shard=400)
    monkeypatch.setattr(builtin_statistics, "_merged_bound", lambda parts, size: 0.01)  # far too low
    with pytest.raises(RuntimeError, match="not the sample of its rows"):
        analyze(run, "stats", params={"reservoir_size": 500})


def test_reservoir_expect_refuses_a_sample_read_before_the_announced_rows_came():
    x = np.random.default_rng(14).standard_normal((100, 2))
    reservoir = Reservoir(10, seed=0).expect(100).add(x[:60])
    with pytest.raises(ConfigError, match="expects 40 rows"):
        reservoir.state_dict()
    with pytest.raises(ConfigError, match="expects 40 rows"):
        Reservoir(10).merge(reservoir)
    reservoir.add(x[60:])
    np.testing.assert_array_equal(np.sort(reservoir._keys), np.sort(np.random.default_rng(0).random(100))[:10])
    small = Reservoir(500, seed=0).expect(100).add(x)  # fewer rows than the size: all of them, exact
    assert small.exact and len(small.rows) == 100
    np.testing.assert_array_equal(small.rows, x)
    with pytest.raises(ConfigError, match="n_rows=-1"):
        Reservoir(10).expect(-1)


def test_stats_of_mapped_hdf5_shards_equal_those_of_parquet_copies(tmp_path):
    """`stats` reads uncompressed HDF5 shards as mapped views and Parquet shards as copies: same result."""
    x = (data(15, n=2000) * 3).astype(np.float32)
    params = {"reservoir_size": 150, "percentiles": [1, 50, 99]}
    results = {}
    for fmt in ("hdf5", "parquet"):
        run = write_synthetic_run(tmp_path / fmt, {"blocks.0": x}, samples_per_shard=450, format=fmt)
        results[fmt] = analyze(run, "stats", params=params)
    for name in ("mean", "std", "kurtosis", "min", "max", "sparsity", "percentiles"):
        np.testing.assert_array_equal(results["hdf5"].array(name), results["parquet"].array(name), err_msg=name)
    np.testing.assert_allclose(results["hdf5"].array("mean"), x.astype(np.float64).mean(axis=0), rtol=1e-9)
    assert results["hdf5"].metrics("blocks.0")["percentiles_exact"] is False


def test_percentiles_of_float32_rows_equal_numpy_in_float64():
    x = (np.random.default_rng(12).standard_normal((999, 7)) * 100).astype(np.float32)
    reservoir = Reservoir(size=2000).add(x)
    q = [0, 0.5, 12.5, 50, 87.3, 100]
    np.testing.assert_allclose(reservoir.percentiles(q), np.percentile(x.astype(np.float64), q, axis=0), rtol=1e-13)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="eps=-1"):
        RunningStats(eps=-1)
    with pytest.raises(ConfigError, match=r"\[0, 100\]"):
        Reservoir(10).add(np.ones((3, 1))).percentiles([150])
    with pytest.raises(ConfigError, match="at least 8 rows"):
        RunningStats().add(np.ones((3, 2))).normality()
    with pytest.raises(ConfigError, match="no rows"):
        RunningStats().mean_abs()
    with pytest.raises(ConfigError, match="cannot merge 3 features into 2"):
        RunningStats().add(np.ones((2, 2))).merge(RunningStats().add(np.ones((2, 3))))


def test_stats_analysis_on_a_run_equals_numpy_over_all_shards(tmp_path):
    x = data(7, n=530).astype(np.float32)
    x[:, 5] = 0.5  # a constant neuron
    run = write_synthetic_run(tmp_path / "run", {"blocks.0": x, "blocks.1": x[:, :3] * 2}, samples_per_shard=97)
    with pytest.warns(UserWarning, match="constant"):
        artifact = analyze(run, "stats", layers="blocks.0", params={"percentiles": [10, 50, 90]})
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(artifact.array("mean"), x64.mean(axis=0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(artifact.array("std"), x64.std(axis=0), rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(artifact.array("kurtosis")[:5], scipy_stats.kurtosis(x64[:, :5], axis=0), rtol=1e-6)
    np.testing.assert_allclose(artifact.array("percentiles"), np.percentile(x64, [10, 50, 90], axis=0), rtol=1e-9)
    metrics = artifact.metrics("blocks.0")
    assert metrics["n_rows"] == 530 and metrics["n_constant"] == 1 and metrics["percentiles_exact"] is True
    neurons = artifact.table("neurons")
    assert list(neurons.columns[:3]) == ["layer", "neuron", "mean"] and {"p10", "p50", "p90"} <= set(neurons.columns)
    assert not neurons.isna().any().any()
    assert artifact.table("rankings").query("ranking == 'most_active'")["neuron"].iloc[0] == 0
    assert any("constant" in w for w in artifact.warnings)


def test_stats_on_a_running_run_uses_the_committed_shards_and_says_so(tmp_path):
    x = data(8, n=300)
    run = write_synthetic_run(tmp_path / "run", {"blocks.0": x}, samples_per_shard=100, complete=False, n_shards=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        artifact = analyze(run, "stats")
    assert any("running" in str(w.message) and "200 of 300" in str(w.message) for w in caught)
    assert artifact.run_status == "running" and artifact.result["run"]["partial"] is True
    assert artifact.result["units"]["blocks.0"]["rows"] == 200
    np.testing.assert_allclose(artifact.array("mean"), x[:200].mean(axis=0), rtol=1e-12)
