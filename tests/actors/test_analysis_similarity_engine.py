"""`cka` and `evolution` with `--engine ray`: one Ray task per layer pair, the local engine's numbers."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from actors.analysis import RayEngine
from neuronmap.analysis import analyze
from neuronmap.cli import main
from neuronmap.store import Manifest, RunWriter

LAYERS = [f"blocks.{i}" for i in range(4)]


class CountingRayEngine(RayEngine):
    """The Ray engine, recording how many tasks each `map` call ships."""

    def __init__(self):
        super().__init__()
        self.task_counts = []

    def map(self, fn, items):
        self.task_counts.append(len(items))
        return super().map(fn, items)


def write_run(path, seed):
    rng = np.random.default_rng(seed)
    h, layers = rng.standard_normal((90, 6)), {}
    for name in LAYERS:
        h = h + np.tanh(h @ rng.standard_normal((6, 6)))
        layers[name] = h.astype(np.float32)
    manifest = Manifest.new(model="synthetic", layers={n: dict(shape=[6], dtype="float32") for n in layers},
                            pooling="mean", n_samples=90, prompt_source_hash="same-prompts")
    writer = RunWriter(path, manifest)
    writer.write_prompts(pd.DataFrame({"text": [f"p{i}" for i in range(90)]}))
    for index, start in enumerate(range(0, 90, 30)):
        for name, x in layers.items():
            writer.write_shard(name, index, rows=(start, start + 30), samples=(start, start + 30),
                               activations=x[start:start + 30], sample_ids=np.arange(start, start + 30))
    writer.complete()
    return path


@pytest.fixture()
def runs(tmp_path):
    return write_run(tmp_path / "run", 0), write_run(tmp_path / "other", 1)


def assert_same_units(local, remote):
    assert remote.result["engine"] == "ray" and remote.id == local.id
    assert list(remote.result["units"]) == list(local.result["units"])
    for unit, doc in local.result["units"].items():
        for key, value in doc["metrics"].items():
            other = remote.result["units"][unit]["metrics"][key]
            # BLAS reductions may differ with the worker's thread count: rounding-level tolerance
            assert other == (pytest.approx(value, rel=1e-9, abs=1e-12) if isinstance(value, float) else value), key


@pytest.mark.parametrize("name, params, n_units, n_tasks", [
    ("cka", {}, 6, 4 + 6),                     # 4 layers: one self-moment task per layer + 6 unordered pairs
    ("cka", {"method": "debiased"}, 6, 4 + 6),
    ("cka", {"method": "minibatch", "minibatch_size": 16}, 6, 6),     # no shared layer work: one task per pair
    ("cka", {"other_run": "OTHER"}, 16, 4 + 4 + 16),  # 4 layers of each run + 4 x 4 ordered pairs
    ("evolution", {}, 3, 4 + 3),                      # 4 layers once (self-moments, norms) + 3 consecutive pairs
])
def test_one_ray_task_per_layer_pair_and_the_local_numbers(ray_cluster, runs, name, params, n_units, n_tasks):
    run, other = runs
    params = {k: (str(other) if v == "OTHER" else v) for k, v in params.items()}
    engine = CountingRayEngine()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        local = analyze(run, name, layers="blocks.*", params=params)
        remote = analyze(run, name, layers="blocks.*", params=params, engine=engine, force=True)
    assert engine.task_counts == [n_tasks] and len(local.units) == n_units
    assert_same_units(local, remote)


def test_cli_cka_with_the_ray_engine(ray_cluster, runs, capsys):
    run, _ = runs
    code = main(["analyze", str(run), "cka", "--layers", "blocks.0-2", "--engine", "ray", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    local = analyze(run, "cka", layers="blocks.0-2", force=True)
    assert result["engine"] == "ray" and set(result["units"]) == {"blocks.0|blocks.1", "blocks.0|blocks.2",
                                                                  "blocks.1|blocks.2"}
    for unit, doc in result["units"].items():
        assert doc["metrics"]["cka"] == pytest.approx(local.metrics(unit)["cka"], rel=1e-9)
