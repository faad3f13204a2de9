"""`neuronmap analyze --engine ray`: Ray tasks per shard / per layer give the local engine's numbers."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from neuronmap.analysis import analyze
from neuronmap.cli import main
from neuronmap.errors import ConfigError
from neuronmap.store import Manifest, RunWriter


@pytest.fixture()
def run(tmp_path):
    rng = np.random.default_rng(0)
    layers = {"blocks.0": rng.standard_normal((90, 6)).astype(np.float32),
              "blocks.1": (rng.gamma(2.0, 1.0, (90, 6)) * 3).astype(np.float32),
              "blocks.2": np.ones((90, 6), dtype=np.float32)}
    manifest = Manifest.new(model="synthetic", layers={n: dict(shape=[6], dtype="float32") for n in layers},
                            pooling="mean", n_samples=90)
    writer = RunWriter(tmp_path / "run", manifest)
    writer.write_prompts(pd.DataFrame({"text": [f"p{i}" for i in range(90)], "topic": ["a", "b", "c"] * 30}))
    for index, start in enumerate(range(0, 90, 30)):
        for name, x in layers.items():
            writer.write_shard(name, index, rows=(start, start + 30), samples=(start, start + 30),
                               activations=x[start:start + 30], sample_ids=np.arange(start, start + 30))
    writer.complete()
    return tmp_path / "run"


@pytest.mark.parametrize("name, params, exact", [
    ("stats", {}, True),  # per-shard partials merged in row order on the driver: bit for bit
    ("pca", {"n_components": 4}, False),
    ("kmeans", {"k_max": 4}, False),  # BLAS/OpenMP reductions depend on the thread count: float tolerance
])
def test_ray_engine_equals_local(ray_cluster, run, name, params, exact):
    labels = "topic" if name == "kmeans" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        local = analyze(run, name, layers="blocks.0,blocks.1", params=params, labels=labels)
        remote = analyze(run, name, layers="blocks.0,blocks.1", params=params, labels=labels, engine="ray", force=True)
    assert remote.result["engine"] == "ray" and remote.id == local.id
    if exact:
        assert remote.result["units"] == local.result["units"]
    for unit, doc in local.result["units"].items():
        for key, value in doc["metrics"].items():
            other = remote.result["units"][unit]["metrics"][key]
            assert other == (pytest.approx(value, rel=1e-5, abs=1e-6) if isinstance(value, float) else value), key
    for key, value in local.arrays.items():
        if exact:
            np.testing.assert_array_equal(remote.arrays[key], value, err_msg=f"{name} {key}")
        else:
            np.testing.assert_allclose(remote.arrays[key], value, rtol=1e-5, atol=1e-5, err_msg=f"{name} {key}")


def test_user_mistakes_in_a_ray_task_arrive_typed(ray_cluster, run):
    with pytest.raises(ConfigError, match="at least 3 distinct samples"):  # blocks.2 is one repeated row
        analyze(run, "intrinsic-dim", layers="blocks.2", engine="ray")


def test_cli_with_the_ray_engine(ray_cluster, run, capsys):
    code = main(["analyze", str(run), "stats", "--layers", "blocks.*", "--engine", "ray", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["engine"] == "ray" and set(result["units"]) == {"blocks.0", "blocks.1", "blocks.2"}
    assert result["units"]["blocks.2"]["metrics"]["n_constant"] == 6


def test_imap_keeps_a_bounded_window_and_yields_in_order(ray_cluster):
    import math

    from actors.analysis import RayEngine
    from neuronmap.analysis.statistics import Reservoir

    engine = RayEngine()  # task functions must be importable by the workers: standard library and neuronmap
    assert list(engine.imap(math.factorial, range(8), window=2)) == [math.factorial(i) for i in range(8)]
    assert engine.map(math.factorial, list(range(5))) == [1, 1, 2, 6, 24]
    results = engine.imap(Reservoir, [3, 2, 7, 0, 5, 6], window=2)
    assert [next(results).size for _ in range(3)] == [3, 2, 7]
    with pytest.raises(ConfigError, match="size=0 must be an integer >= 1"):  # user mistakes arrive typed, in order
        next(results)


def test_ray_stats_over_many_shards_fold_as_they_arrive_and_equal_local(ray_cluster, tmp_path):
    x = np.random.default_rng(3).standard_normal((1200, 5)).astype(np.float32)
    manifest = Manifest.new(model="synthetic", layers={"blocks.0": dict(shape=[5], dtype="float32")},
                            pooling="mean", n_samples=1200)
    writer = RunWriter(tmp_path / "many", manifest)
    writer.write_prompts(pd.DataFrame({"text": [f"p{i}" for i in range(1200)]}))
    for index, start in enumerate(range(0, 1200, 50)):  # 24 shards, more than the 4-CPU cluster's window
        writer.write_shard("blocks.0", index, rows=(start, start + 50), samples=(start, start + 50),
                           activations=x[start:start + 50], sample_ids=np.arange(start, start + 50))
    writer.complete()
    params = {"reservoir_size": 300}
    local = analyze(tmp_path / "many", "stats", params=params)
    remote = analyze(tmp_path / "many", "stats", params=params, engine="ray", force=True)
    assert remote.result["units"] == local.result["units"]
    for key, value in local.arrays.items():
        np.testing.assert_array_equal(remote.arrays[key], value, err_msg=key)
