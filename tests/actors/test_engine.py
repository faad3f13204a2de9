"""`--engine ray` end to end on a local Ray cluster: the run equals the in-process run.

Equality is exact (assert_array_equal, CPU float32): workers run the same planning, shard
boundaries, length-sorted batches and pooling as the local engine, and commit shards themselves.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from actorstest_util import PROMPTS, assert_same_run

import neuronmap
from actors.engine import run_ray_extraction
from actors.errors import WorkerUserError
from neuronmap.errors import ConfigError, UnknownLayerError, UnknownModelError
from neuronmap.store import open_run, verify_run


@pytest.mark.parametrize("format,pooling,layers,workers", [
    ("hdf5", "mean", "embed,blocks.*,final", 1),
    ("parquet", "none", "blocks.0,blocks.1.mlp,blocks.0.attn.pattern", None),  # None: autoscaling pool
])
def test_ray_run_equals_local_run(format, pooling, layers, workers, ray_cluster, gpt2_dir, tmp_path, one_thread):
    options = dict(layers=layers, pooling=pooling, format=format, samples_per_shard=4, batch_size=3)
    local = neuronmap.extract(gpt2_dir, PROMPTS, out=tmp_path / "local", **options)
    run = neuronmap.extract(gpt2_dir, PROMPTS, out=tmp_path / "ray", engine="ray", workers=workers, **options)
    assert_same_run(run, local)
    assert verify_run(tmp_path / "ray").ok


def test_a_pool_of_two_workers_produces_the_same_run(ray_cluster, gpt2_dir, tmp_path, one_thread, monkeypatch):
    """Which worker gets which shard is up to the pool (least busy first); the run must not care.

    Shards from two different worker processes are shown to merge into one correct run, without
    timing luck, by the SIGKILL test below (the killed and the restarted process).
    """
    from actors import options

    prompts = PROMPTS * 2
    settings = dict(layers="blocks.*", samples_per_shard=3, batch_size=1)
    local = neuronmap.extract(gpt2_dir, prompts, out=tmp_path / "local", **settings)
    pools = []
    real_map_workers = options.map_workers
    monkeypatch.setattr(options, "map_workers", lambda *a, **kw: pools.append(a[3]) or real_map_workers(*a, **kw))
    pids = set()
    run = run_ray_extraction(model=gpt2_dir, prompts=prompts, out=tmp_path / "ray", workers=2,
                             on_shard=lambda record: pids.add(record["pid"]), **settings)
    assert_same_run(run, local)
    assert pools == [2] and 1 <= len(pids) <= 2


def test_sigkilled_worker_restarts_and_the_run_has_every_row_once(ray_cluster, gpt2_dir, tmp_path, one_thread):
    prompts = PROMPTS * 3
    local = neuronmap.extract(gpt2_dir, prompts, layers="blocks.0,blocks.2", out=tmp_path / "local",
                              samples_per_shard=1)
    killed, seen = [], []

    def kill_first_worker(record):
        seen.append(record["pid"])
        if not killed:
            os.kill(record["pid"], signal.SIGKILL)
            killed.append(record["pid"])

    run = run_ray_extraction(model=gpt2_dir, prompts=prompts, layers="blocks.0,blocks.2", out=tmp_path / "ray",
                             samples_per_shard=1, workers=1, on_shard=kill_first_worker)
    assert_same_run(run, local)  # complete: no missing, no duplicated rows
    assert any(pid != killed[0] for pid in seen), "the worker did not come back after SIGKILL"
    report = verify_run(tmp_path / "ray")
    assert report.ok and not report.warnings  # no temp file of the killed worker left behind


def test_unloadable_model_fails_fast_with_the_workers_typed_error(ray_cluster, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    started = time.monotonic()
    with pytest.raises(WorkerUserError) as caught:
        neuronmap.extract(str(broken), PROMPTS, out=tmp_path / "run", engine="ray")
    assert time.monotonic() - started < 60
    assert isinstance(caught.value.cause, UnknownModelError) and caught.value.worker
    assert "\n" not in str(caught.value)


def test_unknown_layer_is_the_local_engines_error(ray_cluster, gpt2_dir, tmp_path):
    """A layer the model lacks is wrong on every node: the Ray engine raises what the local engine
    raises (same type, same message), not a worker error, and leaves no run behind."""
    with pytest.raises(UnknownLayerError) as local:
        neuronmap.extract(gpt2_dir, PROMPTS, layers="blocks.99", out=tmp_path / "local")
    with pytest.raises(UnknownLayerError) as remote:
        neuronmap.extract(gpt2_dir, PROMPTS, layers="blocks.99", out=tmp_path / "ray", engine="ray", workers=1)
    assert type(remote.value) is type(local.value) and str(remote.value) == str(local.value)
    assert not (tmp_path / "ray").exists()


def test_more_workers_than_shards_starts_one_per_shard_without_ray_warnings(ray_cluster, gpt2_dir, tmp_path):
    """Two workers asked for, one shard to compute: one worker starts, and Ray Data has no actor pool
    minimum it cannot meet to warn about; the run equals the local one."""
    import warnings

    local = neuronmap.extract(gpt2_dir, PROMPTS, layers="blocks.0", out=tmp_path / "local")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = neuronmap.extract(gpt2_dir, PROMPTS, layers="blocks.0", out=tmp_path / "ray", engine="ray", workers=2,
                                cpus_per_worker=0.5)
    assert len(run.manifest.shards) == 1
    assert not [w for w in caught if "concurrent actors" in str(w.message)], [str(w.message) for w in caught]
    assert_same_run(run, local)


def test_worker_that_cannot_start_fails_the_pipeline_on_the_first_death(ray_cluster, gpt2_dir, tmp_path):
    """A worker whose model differs from the planned one raises in __init__: no endless actor restarts."""
    from actors.engine import _pipeline
    from actors.errors import find_worker_error
    from neuronmap.extraction import plan_run
    from neuronmap.models import load_model
    from neuronmap.prompts import load_prompts

    frame = load_prompts(PROMPTS)
    plan, _, _ = plan_run(load_model(gpt2_dir, device="cpu"), frame["text"].tolist(), "blocks.0", "mean", "float32",
                          512, 4)
    plan.config_hash = "0" * 64  # the planner saw another model than the workers load
    frame.to_parquet(tmp_path / "prompts.parquet", index=False)
    started = time.monotonic()
    with pytest.raises(Exception) as caught:
        list(_pipeline(tmp_path / "run", plan, tmp_path / "prompts.parquet", plan.shards(), [0, 1, 2], False, "cpu",
                       "auto", "mean", "float32", 2, 1, 1, 1.0, 0.0))
    assert time.monotonic() - started < 60
    found = find_worker_error(caught.value)
    assert isinstance(found, WorkerUserError) and isinstance(found.cause, ConfigError), repr(caught.value)
    assert "differs from the planned one" in str(found.cause)


def test_local_engine_rejects_cluster_options_and_unknown_engines(gpt2_dir, tmp_path):
    with pytest.raises(ConfigError, match="engine='ray'"):
        neuronmap.extract(gpt2_dir, PROMPTS, out=tmp_path / "r", workers=2)
    with pytest.raises(ConfigError, match="local, ray"):
        neuronmap.extract(gpt2_dir, PROMPTS, out=tmp_path / "r", engine="spark")
    assert not (tmp_path / "r").exists()


def test_killed_driver_leaves_a_resumable_run_and_the_rerun_completes_it(ray_cluster, gpt2_dir, tmp_path, capsys,
                                                                         one_thread):
    """SIGKILL the CLI (embedded Ray, in a subprocess) mid-run, then re-run the same command."""
    from neuronmap.cli import main

    prompts = PROMPTS * 2
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    options = ["-l", "blocks.0,blocks.2", "--samples-per-shard", "2", "--batch-size", "2"]
    local = neuronmap.extract(gpt2_dir, tmp_path / "p.txt", layers="blocks.0,blocks.2", out=tmp_path / "local",
                              samples_per_shard=2, batch_size=2)
    out = tmp_path / "ray"
    command = [sys.executable, "-m", "neuronmap.cli", "extract", "-m", gpt2_dir, "-p", str(tmp_path / "p.txt"),
               "-o", str(out), *options, "--engine", "ray", "--workers", "1", "-q"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while _committed(out) < 4:  # two shards of two layers
            assert driver.poll() is None, "the driver ended before it could be killed"
            assert time.monotonic() < deadline, "no shard committed within 120 s"
            time.sleep(0.02)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the embedded cluster's processes, if any survive
            os.killpg(driver.pid, signal.SIGKILL)
    partial = open_run(out)
    assert partial.manifest.status == "running" and 4 <= len(partial.manifest.shards) < len(prompts)
    kept = {s.path: (out / s.path).stat().st_ino for s in partial.manifest.shards}
    # The embedded cluster's worker processes outlive the driver by a moment, still holding the run's
    # writing lock; once they are gone, the run shows as interrupted.
    from neuronmap.store.liveness import writer_alive

    deadline = time.monotonic() + 60
    while writer_alive(out) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert writer_alive(out) is False
    assert main(["runs", "show", str(out)]) == 0
    assert "interrupted (no process is writing it): re-run the same `neuronmap extract` command to resume" in \
        " ".join(capsys.readouterr().out.split())

    # The same command again (here in-process, joining the session's cluster by address) resumes.
    assert main([*command[3:], "--address", ray_cluster, "--json"]) == 0
    run = open_run(out)
    assert_same_run(run, local)
    assert all((out / path).stat().st_ino == inode for path, inode in kept.items())  # committed shards kept
    assert verify_run(out).ok


def _committed(run):
    try:
        return len(json.loads((run / "manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0
