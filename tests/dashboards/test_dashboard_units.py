"""The dashboard's pieces without a browser: id -> path refusal, the data cache, job validation, prompt filters."""

from __future__ import annotations

import time

import pandas as pd
import pytest
from dashtest_util import RUN_ID

pytest.importorskip("dash", reason="the dashboard extra is not installed (pip install -e '.[dashboard]')")

from dashboards import paths  # noqa: E402
from dashboards.data import Repository  # noqa: E402
from dashboards.jobs import JobManager  # noqa: E402
from dashboards.pages.run import filter_prompts  # noqa: E402
from neuronmap.errors import ConfigError, NeuronMapError  # noqa: E402


@pytest.mark.parametrize("run_id", ["", "../x", "a/../../b", "/etc", "~root", "C:/x", "a\\b", "a//b", ".hidden",
                                    "./tiny-gpt2", "tiny-gpt2/..", "x\x00y"])
def test_run_ids_that_could_leave_the_runs_folder_are_refused(runs_dir, run_id):
    with pytest.raises(paths.RefusedPath):
        paths.run_path(runs_dir[0], run_id)


@pytest.mark.parametrize("artifact_id", ["../manifest.json", "..", ".tmp-x", "a/b", "/etc/passwd", "", "x" * 300])
def test_artifact_ids_outside_the_analyses_folder_are_refused(runs_dir, artifact_id):
    with pytest.raises(paths.RefusedPath):
        paths.artifact_path(runs_dir[0], RUN_ID, artifact_id)


def test_a_symlink_out_of_the_runs_folder_is_refused(runs_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "manifest.json").write_text("{}")
    link = runs_dir[0] / "escape"
    link.symlink_to(outside, target_is_directory=True)
    try:
        with pytest.raises(paths.RefusedPath, match="outside the runs directory"):
            paths.run_path(runs_dir[0], "escape")
    finally:
        link.unlink()


def test_valid_ids_resolve(runs_dir):
    root, ids = runs_dir
    assert paths.run_path(root, RUN_ID) == (root / RUN_ID).resolve()
    assert paths.artifact_path(root, RUN_ID, ids["pca"]).name == ids["pca"]
    assert paths.run_id_of(root, root / RUN_ID) == RUN_ID


def test_repository_lists_runs_with_corrupt_ones_and_caches_layer_samples(runs_dir):
    repo = Repository(runs_dir[0])
    entries = {e.id: e for e in repo.runs()}
    assert entries[RUN_ID].status == "complete" and entries[RUN_ID].n_samples == 40
    assert entries["broken"].status == "corrupt" and "not valid JSON" in entries["broken"].error
    first = repo.layer_sample(RUN_ID, "blocks.0", max_rows=10)
    assert first.x.shape == (10, 64) and repo.layer_sample(RUN_ID, "blocks.0", max_rows=10) is first
    run = repo.run(RUN_ID)
    assert (first.x == run.array("blocks.0")[first.rows]).all()
    assert {a.analysis for a in repo.artifacts(RUN_ID)} >= {"stats", "pca", "kmeans"}
    with pytest.raises(NeuronMapError):
        repo.run("broken")


def test_jobs_are_validated_before_they_start_and_then_run(runs_dir):
    repo = Repository(runs_dir[0])
    jobs = JobManager(repo, workers=1)
    try:
        with pytest.raises(ConfigError, match="unknown analysis"):
            jobs.submit(RUN_ID, "os.system", ["blocks.0"])
        with pytest.raises(ConfigError, match="k_max"):
            jobs.submit(RUN_ID, "kmeans", ["blocks.0"], params={"k_max": 0})
        with pytest.raises(ConfigError, match="blocks.9"):
            jobs.submit(RUN_ID, "stats", ["blocks.9"])
        with pytest.raises(ConfigError, match="label column"):
            jobs.submit(RUN_ID, "stats", ["blocks.0"], labels="nope")
        with pytest.raises(paths.RefusedPath):
            jobs.submit("../..", "stats", ["blocks.0"])
        job = jobs.submit(RUN_ID, "intrinsic-dim", ["blocks.1"], params={"k1": 4, "k2": 8})
        deadline = time.time() + 60
        while job.status in ("queued", "running") and time.time() < deadline:
            time.sleep(0.1)
        assert job.status == "done", job.message
        assert job.progress == 1.0 and job.total == job.done == 1
        assert repo.artifact(RUN_ID, job.artifact_id).analysis == "intrinsic-dim"
    finally:
        jobs.shutdown()


def test_prompt_filter_by_words_and_label():
    prompts = pd.DataFrame({"sample_id": [0, 1, 2], "text": ["The cat sat", "A dog ran", "the CAT ran"],
                            "topic": ["animals", "animals", "pets"]})
    assert filter_prompts(prompts, "cat", None, None)["sample_id"].tolist() == [0, 2]
    assert filter_prompts(prompts, "cat ran", None, None)["sample_id"].tolist() == [2]
    assert filter_prompts(prompts, "", "topic", "animals")["sample_id"].tolist() == [0, 1]


def test_dashboard_command_binds_loopback_by_default(runs_dir, monkeypatch, tmp_path, capsys):
    import dashboards.app
    from neuronmap.cli import main

    calls = []

    class FakeApp:
        def run(self, **kwargs):
            calls.append(kwargs)

    monkeypatch.setattr(dashboards.app, "create_app", lambda runs, workers: FakeApp())
    monkeypatch.setattr("dashboards.cli.check_listen", lambda host, port, example: None)  # 8050 may be taken here
    assert main(["dashboard", "--runs-dir", str(runs_dir[0])]) == 0
    assert calls == [{"host": "127.0.0.1", "port": 8050, "debug": False}]
    assert main(["dashboard", "--runs-dir", str(runs_dir[0]), "--host", "0.0.0.0", "--port", "9000"]) == 0
    assert calls[-1]["host"] == "0.0.0.0" and "no login" in capsys.readouterr().err
    assert main(["dashboard", "--runs-dir", str(tmp_path / "missing")]) == 2


def test_progress_engine_streams_results_and_counts_them():
    """Dashboard jobs hand results over one at a time (bounded memory for stats) and count progress."""
    from types import SimpleNamespace

    from dashboards.jobs import ProgressEngine
    from neuronmap.analysis.runner import LocalEngine

    job = SimpleNamespace(total=0, done=0)
    engine = ProgressEngine(job, LocalEngine())
    seen = []
    for value in engine.imap(lambda x: x * x, [1, 2, 3]):
        seen.append((value, job.done))
    assert seen == [(1, 1), (4, 2), (9, 3)] and job.total == 3
