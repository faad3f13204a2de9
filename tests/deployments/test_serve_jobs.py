"""Analysis jobs outlive the process that ran them: records on disk, found by id after a restart.

- in-process: a second `JobManager` (a restarted replica) answers for the first one's jobs; a job whose
  process was killed while it was queued or running is reported failed, never running forever; a
  record from another host is trusted while its heartbeat is fresh; ids are checked before any path;
- over HTTP: an app is deleted and deployed again on the session's Serve, and `GET /v1/jobs/{id}`
  still answers with the artifact the job wrote;
- `CountingEngine.imap` passes results on as the wrapped engine yields them, counting progress.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from deployments.analysis_jobs import (INTERRUPTED, STALE_AFTER_S, CountingEngine, Job, JobManager, JobStore,
                                       check_job_id)
from deployments.schemas import ApiError

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parents[2]


def wait_done(manager: JobManager, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = manager.get(job_id)
        if info["state"] in ("succeeded", "failed") or time.monotonic() > deadline:
            return info
        time.sleep(0.05)


def record_path(run: Path, job_id: str) -> Path:
    return run / "analyses" / ".jobs" / f"{job_id}.json"


def test_a_new_manager_answers_for_jobs_of_the_previous_one(serve_runs):
    from neuronmap.analysis import load_artifact

    run = serve_runs.runs / "demo"
    first = JobManager(runs_dir=serve_runs.runs)
    started = first.submit(str(run), "demo", {"analysis": "stats", "layers": "blocks.0", "params": {}})
    done = wait_done(first, started["id"])
    first.shutdown()
    assert done["state"] == "succeeded", done

    on_disk = json.loads(record_path(run, started["id"]).read_text())
    assert on_disk["state"] == "succeeded" and on_disk["artifact_id"] == done["artifact_id"]
    assert not [p for p in record_path(run, started["id"]).parent.iterdir() if ".tmp-" in p.name]

    second = JobManager(runs_dir=serve_runs.runs)  # a restarted replica: nothing in memory
    try:
        again = second.get(started["id"])
        assert again == done
        assert again["layers"] == "blocks.0" and again["params"] == {} and again["progress"] == 1.0
        assert load_artifact(run / "analyses" / again["artifact_id"]).analysis == "stats"
        assert second.get("f" * 32) is None
    finally:
        second.shutdown()


KILLED_SCRIPT = """
import os, signal, sys
from deployments.analysis_jobs import JobManager
manager = JobManager(runs_dir=sys.argv[1])
job = manager.submit(os.path.join(sys.argv[1], "demo"), "demo", {"analysis": "stats", "layers": "blocks.*"})
print(job["id"], flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # dies like a replica whose node went away: no clean-up runs
"""


def test_a_job_whose_process_was_killed_is_failed_not_running_forever(serve_runs):
    killed = subprocess.run([sys.executable, "-c", KILLED_SCRIPT, str(serve_runs.runs)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    job_id = killed.stdout.split()[0]
    path = record_path(serve_runs.runs / "demo", job_id)
    assert json.loads(path.read_text())["state"] in ("queued", "running")  # what the dead process left

    manager = JobManager(runs_dir=serve_runs.runs)
    try:
        info = manager.get(job_id)
    finally:
        manager.shutdown()
    assert info["state"] == "failed" and info["error"] == INTERRUPTED and info["finished"]
    assert info["progress"] < 1.0  # it did not finish
    assert json.loads(path.read_text())["state"] == "failed"  # rewritten: every later reader agrees


def test_a_record_from_another_host_is_trusted_until_its_heartbeat_is_stale(serve_runs):
    run = serve_runs.runs / "demo"
    manager = JobManager(runs_dir=serve_runs.runs)
    try:
        job_id = manager.submit(str(run), "demo", {"analysis": "stats", "layers": "blocks.1"})["id"]
        wait_done(manager, job_id)
    finally:
        manager.shutdown()
    path = record_path(run, job_id)
    record = json.loads(path.read_text())
    record.update(state="running", tasks_done=1, tasks_total=3, finished=None,
                  owner={"host": "another-node", "pid": 1, "pid_started": 0.0, "instance": "x"})

    reader = JobManager(runs_dir=serve_runs.runs)
    try:
        path.write_text(json.dumps({**record, "heartbeat": time.time()}))
        fresh = reader.get(job_id)
        assert fresh["state"] == "running" and fresh["progress"] == pytest.approx(1 / 3, abs=1e-4)
        path.write_text(json.dumps({**record, "heartbeat": time.time() - 2 * STALE_AFTER_S}))
        stale = reader.get(job_id)
        assert stale["state"] == "failed" and stale["error"] == INTERRUPTED
    finally:
        reader.shutdown()


@pytest.mark.parametrize("bad", ["../../etc/passwd", "demo", "F" * 32, "0" * 31, "0" * 33, "", "0" * 31 + "/"])
def test_job_ids_are_checked_before_any_path(serve_runs, bad):
    with pytest.raises(ApiError) as caught:
        check_job_id(bad)
    assert caught.value.status == 400
    assert JobStore(serve_runs.runs).find(bad) is None
    manager = JobManager(runs_dir=serve_runs.runs)
    try:
        assert manager.get(bad) is None
    finally:
        manager.shutdown()


def test_counting_engine_imap_counts_results_as_they_arrive():
    from neuronmap.analysis.runner import LocalEngine

    calls = []

    def square(x: int) -> int:
        calls.append(x)
        return x * x

    job = Job(id="0" * 32, run="demo", analysis="stats")
    results = CountingEngine(job, inner=LocalEngine(workers=1)).imap(square, [1, 2, 3])
    assert job.tasks_total == 3 and job.tasks_done == 0 and calls == []  # nothing computed before it is asked for
    assert next(results) == 1 and job.tasks_done == 1 and calls == [1]
    assert list(results) == [4, 9] and job.tasks_done == 3

    class MapOnly:  # an engine without imap: every result at once, still counted
        name = "map-only"

        def map(self, fn, items):
            return [fn(item) for item in items]

    job = Job(id="1" * 32, run="demo", analysis="stats")
    engine = CountingEngine(job, inner=MapOnly())
    assert engine.name == "map-only" and list(engine.imap(square, [4])) == [16] and job.tasks_done == 1
    assert CountingEngine(job, inner=LocalEngine()).map(square, [5, 6]) == [25, 36] and job.tasks_done == 3


def test_stats_job_reducing_partials_as_they_arrive_matches_numpy(serve_runs):
    """The per-shard partials folded one at a time give the layer's moments as numpy computes them."""
    import numpy as np

    import neuronmap
    from neuronmap.analysis import load_artifact

    run = serve_runs.runs / "demo"
    manager = JobManager(runs_dir=serve_runs.runs)
    try:
        info = wait_done(manager, manager.submit(str(run), "demo", {"analysis": "stats", "layers": "blocks.2",
                                                                    "force": True})["id"])
    finally:
        manager.shutdown()
    assert info["state"] == "succeeded" and info["tasks_done"] == info["tasks_total"] == 3  # one per shard
    artifact = load_artifact(run / "analyses" / info["artifact_id"])
    x = neuronmap.open_run(run).array("blocks.2").astype(np.float64)
    np.testing.assert_allclose(artifact.arrays["blocks.2/mean"], x.mean(axis=0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(artifact.arrays["blocks.2/std"], x.std(axis=0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(artifact.arrays["blocks.2/max"], x.max(axis=0))


def test_jobs_are_answered_after_the_app_restarts(serve_base, serve_runs):
    from deployments import options
    from deployments.app import build_app

    settings = {"runs_dir": str(serve_runs.runs)}
    url = f"{serve_base}/restart"
    options.run(build_app(settings), name="restart", route_prefix="/restart", timeout_s=180)
    try:
        started = httpx.post(f"{url}/v1/runs/demo/analyses", json={"analysis": "stats", "layers": "blocks.1-2"},
                             timeout=60)
        assert started.status_code == 202, started.text
        job_id = started.json()["id"]
        deadline = time.monotonic() + 60
        while (job := httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json())["state"] in ("queued", "running"):
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
        assert job["state"] == "succeeded", job

        options.delete("restart")  # every replica of the app is gone, and with it the jobs in memory
        options.run(build_app(settings), name="restart", route_prefix="/restart", timeout_s=180)
        after = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30)
        assert after.status_code == 200 and after.json() == job
        assert httpx.get(f"{url}/v1/jobs/{'e' * 32}", timeout=30).status_code == 404
        malformed = httpx.get(f"{url}/v1/jobs/..demo", timeout=30)
        assert malformed.status_code == 400 and malformed.json()["error"] == "bad_id"
    finally:
        options.delete("restart")
    assert os.path.isfile(record_path(serve_runs.runs / "demo", job_id))


def test_finished_records_are_pruned_by_count_and_age_but_active_ones_never(tmp_path):
    store, run = JobStore(tmp_path), tmp_path / "run"
    now = time.time()
    ids = [f"{i:032x}" for i in range(8)]
    states = ["succeeded", "failed", "succeeded", "succeeded", "running", "queued", "succeeded", "failed"]
    ages_s = [10, 20, 30, 40, 10 * 86400, 10 * 86400, 50, 8 * 86400]  # 4 and 5 are old but active
    for job_id, state, age in zip(ids, states, ages_s):
        store.write(run, {"id": job_id, "state": state})
        os.utime(record_path(run, job_id), (now - age, now - age))
    (record_path(run, ids[0]).parent / "notes.txt").write_text("not a record")

    assert store.prune(run, keep=3, max_age_s=7 * 86400) == 3
    left = sorted(p.stem for p in record_path(run, ids[0]).parent.glob("*.json"))
    # finished, newest first: 0 (10 s), 1, 2, 3, 6, 7 (8 days): keep 3 -> 0, 1, 2; 7 is too old anyway
    assert left == sorted([ids[0], ids[1], ids[2], ids[4], ids[5]])
    assert (record_path(run, ids[0]).parent / "notes.txt").exists()
    assert store.prune(run, keep=3, max_age_s=7 * 86400) == 0  # idempotent
    assert store.prune(tmp_path / "no-such-run") == 0
