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
