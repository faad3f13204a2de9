"""Registry, artifacts and runner: ids, reuse, atomic writes, scopes, labels, engines, bad input."""

import json
import re
import time

import numpy as np
import pandas as pd
import pytest
from pydantic import Field

from analysistest_util import write_per_token_run, write_synthetic_run
from neuronmap.analysis import AnalysisResult, Params, analyze, get_analysis, list_analyses, list_artifacts, register
from neuronmap.analysis.artifacts import load_artifact, unreadable_artifacts
from neuronmap.analysis.registry import unregister
from neuronmap.errors import ConfigError, NeuronMapError, RunFormatError, StorageError, UnknownLayerError
from neuronmap.store import RunWriter, open_run

CALLS = {"count": 0}


class CountParams(Params):
    scale: float = Field(1.0, gt=0, description="multiplier")


def _count(data, params):
    CALLS["count"] += 1
    x = data.array()
    labels = data.labels()
    metrics = {"n": data.n_rows, "total": float(x.sum() * params.scale), "nan": float("nan")}
    if labels is not None:
        metrics["labels"] = sorted(set(labels.tolist()))
    return AnalysisResult(metrics=metrics, arrays={"row_sums": x.sum(axis=1)},
                          tables={"rows": pd.DataFrame({"sample_id": data.sample_ids(), "sum": x.sum(axis=1)})})


def _pair(data, params):
    a = np.concatenate(list(data.first.iter_batches()))
    b = np.concatenate(list(data.second.iter_batches()))
    return AnalysisResult(metrics={"layers": list(data.layers), "diff": float(np.abs(a - b).sum())})


def _whole(data, params):
    return AnalysisResult(metrics={"layers": list(data.layers), "rows": [d.n_rows for d in data.layers.values()]},
                          tables={"t": pd.DataFrame({"layer": list(data.layers)})})


@pytest.fixture(autouse=True)
def test_analyses():
    register("test-count", family="test", summary="counts calls", params=CountParams, uses_labels=True)(_count)
    register("test-labels", family="test", summary="needs labels", params=CountParams, needs_labels=True)(_count)
    register("test-pair", family="test", summary="pairs", params=Params, scope="layer_pair")(_pair)
    register("test-next", family="test", summary="pairs", params=Params, scope="layer_pair", pairs="consecutive")(_pair)
    register("test-run", family="test", summary="run", params=Params, scope="run")(_whole)
    yield
    for name in ("test-count", "test-labels", "test-pair", "test-next", "test-run"):
        unregister(name)


@pytest.fixture()
def run(tmp_path):
    rng = np.random.default_rng(0)
    layers = {f"blocks.{i}": rng.standard_normal((50, 3)).astype(np.float32) for i in range(3)}
    layers["module:transformer.h/0"] = rng.standard_normal((50, 2, 3, 4)).astype(np.float32)
    return write_synthetic_run(tmp_path / "run", layers, labels={"topic": ["a", "b"] * 25, "score": list(range(50))},
                               samples_per_shard=20)


def test_builtin_registry_lists_the_three_families():
    names = {spec.name: spec for spec in list_analyses()}
    assert {"stats", "pca", "intrinsic-dim", "tsne", "kmeans", "dbscan", "hierarchical"} <= set(names)
    assert {names[n].family for n in ("stats", "pca", "kmeans")} == {"statistics", "dimensionality", "clustering"}
    defaults = {p["name"]: p["default"] for p in names["pca"].describe_params()}
    assert defaults["method"] == "auto" and defaults["n_components"] is None
    with pytest.raises(ConfigError, match=r"unknown analysis 'pcaa'; did you mean pca[,?].*available: .*kmeans"):
        get_analysis("pcaa")
    with pytest.raises(ValueError, match="already registered"):
        register("stats", family="x", summary="x", params=Params)(_count)


def test_builtin_index_names_the_module_of_every_builtin_analysis():
    from neuronmap.analysis.builtin import MODULES

    builtin = {spec.name: spec.func.__module__ for spec in list_analyses()
               if spec.func.__module__.startswith("neuronmap.analysis.builtin.")}
    assert builtin == {name: f"neuronmap.analysis.builtin.{module}" for name, module in MODULES.items()}


def test_getting_one_analysis_imports_only_its_module():
    import subprocess
    import sys

    code = ("import sys; from neuronmap.analysis import get_analysis; "
            "print(get_analysis('Stats').name, 'sklearn' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["stats", "False"]


@pytest.mark.parametrize("params, message", [
    ({"n_components": 0}, "n_components=0 must be >= 1 (analysis pca"),
    ({"n_components": "many"}, "n_components='many' must be an integer"),
    ({"method": "magic"}, "method='magic' must be one of 'auto', 'exact' or 'incremental'"),
    ({"components": 3}, "unknown parameter 'components' for analysis pca; valid parameters: n_components, method"),
])
def test_parameter_errors_are_sklearn_style(params, message):
    with pytest.raises(ConfigError) as error:
        get_analysis("pca").parse_params(params)
    assert message in str(error.value)


def test_cross_field_constraints(run):
    with pytest.raises(ConfigError, match="k_min=5 must be <= k_max=3"):
        analyze(run, "kmeans", params={"k_min": 5, "k_max": 3})


def test_artifact_is_written_atomically_and_reused(run):
    CALLS["count"] = 0
    first = analyze(run, "test-count", layers="blocks.*")
    assert re.fullmatch(r"test-count-[0-9a-f]{12}", first.id) and not first.reused
    assert CALLS["count"] == 3 and first.units == ["blocks.0", "blocks.1", "blocks.2"]
    files = sorted(p.name for p in first.path.iterdir())
    assert files == ["arrays.npz", "params.json", "result.json", "rows.parquet"]
    assert not [p for p in first.path.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    stamp = (first.path / "result.json").stat().st_mtime_ns

    time.sleep(0.01)
    again = analyze(run, "test-count", layers="blocks.0-2", params={"scale": 1.0})
    assert again.reused and again.id == first.id and CALLS["count"] == 3
    assert (first.path / "result.json").stat().st_mtime_ns == stamp

    forced = analyze(run, "test-count", layers="blocks.*", force=True)
    assert forced.id == first.id and not forced.reused and CALLS["count"] == 6
    other = analyze(run, "test-count", layers="blocks.*", params={"scale": 2.0})
    assert other.id != first.id
    assert other.metrics("blocks.1")["total"] == pytest.approx(2 * first.metrics("blocks.1")["total"])

    result = json.loads((first.path / "result.json").read_text())  # strict JSON: NaN stored as null
    assert result["units"]["blocks.0"]["metrics"]["nan"] is None and result["run"]["status"] == "complete"
    params = json.loads((first.path / "params.json").read_text())
    assert params["layers"] == ["blocks.0", "blocks.1", "blocks.2"] and len(params["shards"]) == 9
    table = first.table("rows")
    assert list(table.columns) == ["layer", "sample_id", "sum"] and len(table) == 150
    assert {a.id for a in list_artifacts(run)} == {first.id, other.id}
    assert load_artifact(first.path).metrics("blocks.2") == first.metrics("blocks.2")


def test_failed_write_leaves_nothing_behind(run, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(StorageError, match="No space left on device"):
        analyze(run, "test-count", layers="blocks.0")
    assert not any((run / "analyses").iterdir())


def test_odd_layer_names_and_multi_dimensional_rows(run):
    artifact = analyze(run, "stats", layers="module:transformer.h/0")
    assert artifact.metrics("module:transformer.h/0")["n_features"] == 24
    assert artifact.array("mean", "module:transformer.h/0").shape == (24,)
    x = open_run(run).array("module:transformer.h/0").reshape(50, -1).astype(np.float64)
    np.testing.assert_allclose(artifact.array("std"), x.std(axis=0), rtol=1e-6)


def test_layer_pair_and_run_scopes(run):
    pairs = analyze(run, "test-pair", layers="blocks.*")
    assert pairs.units == ["blocks.0|blocks.1", "blocks.0|blocks.2", "blocks.1|blocks.2"]
    assert pairs.metrics("blocks.0|blocks.2")["layers"] == ["blocks.0", "blocks.2"]
    assert analyze(run, "test-next", layers="blocks.*").units == ["blocks.0|blocks.1", "blocks.1|blocks.2"]
    with pytest.raises(ConfigError, match="select at least 2"):
        analyze(run, "test-pair", layers="blocks.0")
    whole = analyze(run, "test-run", layers="blocks.0,blocks.2")
    assert whole.units == ["run"] and whole.metrics()["layers"] == ["blocks.0", "blocks.2"]
    assert list(whole.table("t").columns) == ["layer"]  # run scope: no unit column added


def test_labels_needed_missing_or_unknown(run):
    with pytest.raises(ConfigError, match=r"needs a label column: pass --labels COLUMN .*columns: topic, score"):
        analyze(run, "test-labels", layers="blocks.0")
    with pytest.raises(ConfigError, match=r"label column 'colour' is not in .* label columns: topic, score"):
        analyze(run, "test-count", layers="blocks.0", labels="colour")
    artifact = analyze(run, "test-labels", layers="blocks.0", labels="topic")
    assert artifact.metrics()["labels"] == ["a", "b"]
    with pytest.warns(UserWarning, match="does not use labels; --labels topic is ignored"):
        analyze(run, "stats", layers="blocks.0", labels="topic")


def test_per_token_rows_take_their_sample_label(tmp_path):
    path, x = write_per_token_run(tmp_path / "tokens", [2, 3, 1], labels={"kind": ["q", "s", "q"]})
    artifact = analyze(path, "test-count", labels="kind")
    assert artifact.metrics()["n"] == 6 and artifact.metrics()["labels"] == ["q", "s"]
    from neuronmap.analysis.inputs import LayerInput

    run = open_run(path)
    data = LayerInput(run.path, run.manifest, "blocks.0", ((0, 6),), "kind")
    assert data.labels().tolist() == ["q", "q", "s", "s", "s", "q"]


def test_unknown_layer_and_engine(run):
    with pytest.raises(UnknownLayerError, match=r"layer 'blocks.9' is not in run .*blocks.\{0-2\}"):
        analyze(run, "stats", layers="blocks.9")
    with pytest.raises(ConfigError, match="engine 'spark' is not available; installed engines: local"):
        analyze(run, "stats", layers="blocks.0", engine="spark")


def test_an_empty_layer_list_is_a_clear_error_not_an_empty_min(run):
    with pytest.raises(ConfigError, match=r"layers=\[\] selects no layer"):
        analyze(run, "pca", layers=[])


def test_preflight_refuses_what_analyze_refuses_before_computing_and_writes_nothing(run, tmp_path):
    """`preflight` (what Serve and the dashboard check before queueing a job) gives `analyze`'s own error for
    each mistake, and accepts a request `analyze` then computes."""
    from neuronmap.analysis.runner import preflight

    mistakes = [("test-pair", dict(layers="blocks.0")), ("pca", dict(params={"n_components": 51})),
                ("test-labels", dict(layers="blocks.0")), ("stats", dict(layers="blocks.9")),
                ("test-count", dict(layers=[]))]
    for analysis, kwargs in mistakes:
        with pytest.raises(NeuronMapError) as before:
            preflight(run, analysis, **kwargs)
        with pytest.raises(NeuronMapError) as during:
            analyze(run, analysis, **kwargs)
        assert str(before.value) == str(during.value)
    assert not (run / "analyses").exists() or not any((run / "analyses").iterdir())
    preflight(run, "pca", layers="blocks.0-1", params={"n_components": 3})
    assert analyze(run, "pca", layers="blocks.0-1", params={"n_components": 3}).units == ["blocks.0", "blocks.1"]
    empty = write_synthetic_run(tmp_path / "empty", {"blocks.0": np.zeros((10, 2), np.float32)}, complete=False,
                                n_shards=0)
    with pytest.raises(ConfigError, match="no committed rows yet"):
        preflight(empty, "stats")


def test_a_custom_engine_gets_one_task_per_shard_for_mergeable_analyses(run):
    class Recording:
        name = "recording"

        def __init__(self):
            self.tasks = 0

        def map(self, fn, items):
            self.tasks += len(items)
            return [fn(item) for item in items]

    engine = Recording()
    artifact = analyze(run, "stats", layers="blocks.0,blocks.1", engine=engine)
    assert engine.tasks == 6 and artifact.result["engine"] == "recording"  # 2 layers x 3 shards
    local = analyze(run, "stats", layers="blocks.0,blocks.1", force=True)
    np.testing.assert_array_equal(local.array("kurtosis", "blocks.1"), artifact.array("kurtosis", "blocks.1"))
    engine.tasks = 0
    analyze(run, "test-count", layers="blocks.*", engine=engine)
    assert engine.tasks == 3  # one task per layer


def test_running_run_is_analysed_on_its_committed_part_and_the_id_follows_new_shards(tmp_path):
    x = np.random.default_rng(1).standard_normal((60, 3)).astype(np.float32)
    path = write_synthetic_run(tmp_path / "run", {"blocks.0": x}, samples_per_shard=20, complete=False, n_shards=1)
    with pytest.warns(UserWarning, match=r"is running: analysed its committed part \(20 of 60 rows\)"):
        first = analyze(path, "test-count")
    assert first.result["units"]["blocks.0"]["rows"] == 20 and first.result["run"]["partial"]
    writer = RunWriter.attach(path)
    writer.write_shard("blocks.0", 1, rows=(20, 40), samples=(20, 40), activations=x[20:40],
                       sample_ids=np.arange(20, 40))
    with pytest.warns(UserWarning, match="40 of 60 rows"):
        second = analyze(path, "test-count")
    assert second.id != first.id and not second.reused and second.metrics()["n"] == 40


def test_a_layer_without_committed_rows_is_a_clear_error(tmp_path):
    x = np.zeros((10, 2), dtype=np.float32)
    path = write_synthetic_run(tmp_path / "run", {"blocks.0": x}, complete=False, n_shards=0)
    with pytest.raises(ConfigError, match="no committed rows yet"):
        analyze(path, "stats")


def test_stale_temp_folders_of_crashed_writers_are_removed(run):
    import os

    root = run / "analyses"
    (root / ".tmp-old-1-abcd").mkdir(parents=True)
    (root / ".tmp-fresh-1-abcd").mkdir()
    day_ago = time.time() - 2 * 24 * 3600
    os.utime(root / ".tmp-old-1-abcd", (day_ago, day_ago))
    analyze(run, "test-count", layers="blocks.0")
    assert not (root / ".tmp-old-1-abcd").exists() and (root / ".tmp-fresh-1-abcd").exists()
    assert [a.analysis for a in list_artifacts(run)] == ["test-count"]


def test_a_range_reaching_past_the_runs_layers_is_an_error_as_when_extracting(run):
    with pytest.raises(UnknownLayerError, match=r"layer 'blocks.0-7' is not in run .* \(no blocks.\{3-7\}\); it holds: "
                                                r".*blocks.\{0-2\}"):
        analyze(run, "stats", layers="blocks.0-7")  # was: quietly blocks.0-2
    with pytest.raises(UnknownLayerError, match=r"bad layer range 'blocks.2-0': write ranges low-high"):
        analyze(run, "stats", layers="blocks.2-0")
    assert not (run / "analyses").exists() or not any((run / "analyses").iterdir())
    assert analyze(run, "stats", layers="blocks.0-2").units == ["blocks.0", "blocks.1", "blocks.2"]


def test_damaged_result_json_names_the_fix(run):
    first = analyze(run, "test-count", layers="blocks.0")
    (first.path / "result.json").write_text("{bad", encoding="utf-8")
    assert list_artifacts(run) == []  # skipped by listings ...
    with pytest.raises(RunFormatError, match=r"cannot read .*result.json \(.*\): the existing artifact is damaged; "
                                             r"pass --force to recompute and replace it"):
        analyze(run, "test-count", layers="blocks.0")  # ... and asking for it again says how to repair it
    with pytest.raises(RunFormatError, match=r"the artifact is damaged; recompute it .*--force.* or delete "):
        load_artifact(first.path)
    (first.path / "result.json").write_text("[]", encoding="utf-8")
    with pytest.raises(RunFormatError, match="not an artifact's result"):
        load_artifact(first.path)
    assert [path.name for path, _ in unreadable_artifacts(run)] == [first.id]
    repaired = analyze(run, "test-count", layers="blocks.0", force=True)
    assert repaired.id == first.id and load_artifact(first.path).metrics("blocks.0") == repaired.metrics("blocks.0")
    assert unreadable_artifacts(run) == []
    assert not [p for p in first.path.parent.iterdir() if p.name.startswith(".")]


def test_too_few_rows_is_said_in_the_artifact(tmp_path):
    """Linear CKA of 2 rows is 1 for any two layers (independent random ones here): the artifact says
    the numbers mean little; 40 rows of the same layers carry no such note."""
    rng = np.random.default_rng(0)
    write_synthetic_run(tmp_path / "two", {"a": rng.normal(size=(2, 5)), "b": rng.normal(size=(2, 7))})
    write_synthetic_run(tmp_path / "many", {"a": rng.normal(size=(40, 5)), "b": rng.normal(size=(40, 7))})
    with pytest.warns(UserWarning, match="only 2 rows"):
        few = analyze(tmp_path / "two", "cka")
    assert few.result["units"]["a|b"]["metrics"]["cka"] == pytest.approx(1.0)
    assert any("only 2 rows: too few samples" in w for w in few.warnings)
    assert not any("too few samples" in w for w in analyze(tmp_path / "many", "cka").warnings)
