"""The local engine's threaded `imap` (per-shard partials on several threads) and per-thread warnings."""

import os
import threading
import time
import warnings

import numpy as np
import pytest

from analysistest_util import write_synthetic_run
from neuronmap.analysis import analyze
from neuronmap.analysis._local_engine import MAX_DEFAULT_WORKERS
from neuronmap.analysis.runner import LocalEngine, Task, get_engine, run_task
from neuronmap.errors import ConfigError


def test_threaded_imap_yields_in_order_with_a_bounded_window():
    running, most = [0], [0]
    lock = threading.Lock()

    def slow_square(x):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02 * (x % 3))  # later tasks may finish first
        with lock:
            running[0] -= 1
        return x * x

    assert list(LocalEngine(workers=3).imap(slow_square, list(range(12)))) == [x * x for x in range(12)]
    assert 2 <= most[0] <= 3


def test_closing_the_threaded_imap_stops_what_has_not_started():
    started = []

    def record(x):
        started.append(x)
        time.sleep(0.01)
        return x

    results = LocalEngine(workers=2).imap(record, list(range(50)))
    assert next(results) == 0
    results.close()
    assert len(started) <= 4  # the window (2) and the top-up, not the 50 tasks


def test_a_failing_task_raises_in_the_caller():
    def fail_on_three(x):
        if x == 3:
            raise ConfigError("bad shard 3")
        return x

    with pytest.raises(ConfigError, match="bad shard 3"):
        list(LocalEngine(workers=2).imap(fail_on_three, list(range(8))))


def test_single_worker_stays_lazy_and_bad_workers_are_refused():
    calls = []
    results = LocalEngine(workers=1).imap(calls.append, [1, 2, 3])
    assert calls == []
    next(results)
    assert calls == [1]
    with pytest.raises(ConfigError, match="workers=0"):
        LocalEngine(workers=0)


def test_default_workers_follow_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert get_engine("local").workers == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert LocalEngine().workers == MAX_DEFAULT_WORKERS
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5}, raising=False)
    assert LocalEngine().workers == 1


def _warn_n_times(item):
    name, n, barrier = item
    barrier.wait()
    for i in range(n):
        warnings.warn(f"{name} {i}", UserWarning)
        time.sleep(0.001)
    return name


def test_tasks_on_threads_record_only_their_own_warnings():
    barrier = threading.Barrier(3)
    tasks = [Task(lambda item, params: _warn_n_times(item), (name, n, barrier), None)
             for name, n in (("a", 5), ("b", 9), ("c", 2))]
    outcomes = list(LocalEngine(workers=3).imap(run_task, tasks))
    for (name, caught), n in zip(outcomes, (5, 9, 2)):
        assert caught == [f"{name} {i}" for i in range(n)]
    with warnings.catch_warnings(record=True) as after:  # the process-wide state is back as it was
        warnings.simplefilter("always")
        warnings.warn("outside", UserWarning)
    assert [str(w.message) for w in after] == ["outside"]


def test_stats_on_two_threads_equal_one_thread_bit_for_bit(tmp_path):
    x = np.random.default_rng(0).standard_normal((3000, 12)).astype(np.float32) * 3 + 1
    run = write_synthetic_run(tmp_path / "run", {"blocks.0": x, "blocks.1": np.tanh(x)}, samples_per_shard=250)
    params = {"reservoir_size": 300}
    serial = analyze(run, "stats", params=params, engine=LocalEngine(workers=1))
    threaded = analyze(run, "stats", params=params, engine=LocalEngine(workers=3), force=True)
    for layer in ("blocks.0", "blocks.1"):
        for key in ("mean", "std", "skewness", "kurtosis", "min", "max", "percentiles", "sparsity"):
            np.testing.assert_array_equal(threaded.array(key, layer), serial.array(key, layer), err_msg=key)
    np.testing.assert_allclose(threaded.array("std", "blocks.0"), x.astype(np.float64).std(axis=0), rtol=1e-9)
