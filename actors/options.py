"""Every Ray, Ray Data and Ray Core option the extraction engine uses, in one module.

Ray's options API moves between releases (in 2.60 `map_batches` takes `compute=ActorPoolStrategy(...)`
and `concurrency=` is deprecated; `DataContext` fields come and go; `ray.init` grows keywords). The rest
of `actors` never spells a Ray option itself: it calls the functions here, so a Ray upgrade is one
file to read. Pinned to the release below (pyproject.toml pins the same).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from typing import Any, Iterator

RAY_VERSION = "2.60.0"

# A worker process that dies (SIGKILL, OOM killer, segfault) is restarted this many times, and the
# shard it was working on is retried on the restarted worker. Bounded, so a shard that kills its
# worker every time fails the run instead of looping forever.
WORKER_MAX_RESTARTS = 4
WORKER_MAX_TASK_RETRIES = 4
# The planning task (loads the model once to measure layer shapes) is retried if its process dies.
PLAN_MAX_RETRIES = 2
# Tokenising is light; a small CPU share keeps those tasks schedulable next to a pool of workers that
# reserve whole CPUs (a pool that takes every CPU starves the upstream tasks and the run hangs).
TOKENIZE_CPUS = 0.25
WORKERS_PER_TOKENIZE_TASK = 4
MIN_TOKENIZE_TASKS = 2
# Shards handed to one worker before it finishes one. A shard is seconds to minutes of forward passes
# and its input is a few KB of token ids, so prefetching buys nothing; a longer queue lets the worker
# next to the tokenised data (Ray Data prefers it) hoard shards while workers on other nodes idle.
SHARDS_IN_FLIGHT_PER_WORKER = 1
# Seconds to wait for a TCP connect to a cluster address before calling it unreachable.
CONNECT_TIMEOUT_S = 3.0
# Ray loggers whose INFO/WARNING chatter is not about the user's command.
QUIET_LOGGERS = ("ray", "ray.data", "ray._private.authentication.authentication_token_setup")


def setup_environment() -> None:
    """Environment Ray and its worker processes read; call before `import ray`."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def embedded_environment() -> None:
    """Before starting an embedded cluster (and before `import ray` where possible): bind 127.0.0.1.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray take the loopback address as the node address, so
    the embedded cluster listens on 127.0.0.1 only (without it, it binds every interface). Never set
    it when joining a cluster: a driver on a cluster node must report the node's real address. Ray
    reads it at import time in this process and at start-up in the processes it starts.
    """
    setup_environment()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def debug() -> bool:
    """NEURONMAP_DEBUG=1 shows Ray's own logs and the workers' output."""
    return bool(os.environ.get("NEURONMAP_DEBUG"))


def find_local_cluster() -> str | None:
    """`HOST:PORT` of the cluster `ray.init(address="auto")` would join (latest `ray start`), or None."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        return canonicalize_bootstrap_address("auto")
    except Exception:  # Ray raises ConnectionError/ValueError when it finds none
        return None


def embedded_init_kwargs(num_cpus: float) -> dict[str, Any]:
    """`ray.init` keywords of an embedded single-machine cluster that only this process uses."""
    return dict(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(num_cpus)), include_dashboard=False,
                log_to_driver=debug(), logging_level=logging.INFO if debug() else logging.WARNING,
                _node_ip_address="127.0.0.1")


def join_init_kwargs(address: str) -> dict[str, Any]:
    """`ray.init` keywords that join an existing cluster (`auto`, `HOST:PORT` or `ray://HOST:PORT`)."""
    return dict(address=address, log_to_driver=debug(), logging_level=logging.INFO if debug() else logging.WARNING)


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """Silence Ray's INFO/WARNING loggers for the duration (unless NEURONMAP_DEBUG is set)."""
    if debug():
        yield
        return
    import ray.data  # noqa: F401  (importing it configures its loggers; set them after that)

    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def data_context() -> Iterator[Any]:
    """The process's Ray Data context, set up for one extraction and restored afterwards.

    Ray Data's own progress bars are off (the CLI shows one bar fed by committed shards); actors that
    die while starting fail the run on the first death (a model that cannot load is not retried);
    errors raised by workers come back as themselves, not wrapped in `UserCodeException`.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    wanted = dict(enable_progress_bars=debug(), print_on_execution_start=debug(),
                  max_consecutive_actor_init_deaths=0, raise_original_map_exception=True)
    saved = {name: getattr(ctx, name) for name in wanted}
    for name, value in wanted.items():
        setattr(ctx, name, value)
    try:
        yield ctx
    finally:
        for name, value in saved.items():
            setattr(ctx, name, value)


def plan_task_options(cpus: float, gpus: float) -> dict[str, Any]:
    """`.options(...)` of the planning task: the same resources as one worker (same device)."""
    return dict(num_cpus=cpus, num_gpus=gpus, max_retries=PLAN_MAX_RETRIES)


def map_tokenize(ds: Any, fn: Any, max_workers: int, n_shards: int | None = None, **fn_kwargs: Any) -> Any:
    """Tokenise stage: stateless Ray tasks, one shard (one row) per batch, pyarrow batches.

    The task pool is capped (one task per `WORKERS_PER_TOKENIZE_TASK` workers, at least
    `MIN_TOKENIZE_TASKS`, so one slow task start does not starve the workers): with fractional CPUs
    Ray would otherwise start a process per task at once, each importing transformers and torch, and
    a small machine spends its first minute starting processes. Tokenising is far cheaper than a
    forward pass, so a few tasks keep every worker fed.
    """
    import ray.data

    size = max(MIN_TOKENIZE_TASKS, math.ceil(max_workers / WORKERS_PER_TOKENIZE_TASK))
    if n_shards is not None:  # more tasks than shards only makes Ray Data warn that some cannot start
        size = max(1, min(size, n_shards))
    return ds.map_batches(fn, batch_size=1, batch_format="pyarrow", fn_kwargs=fn_kwargs, num_cpus=TOKENIZE_CPUS,
                          compute=ray.data.TaskPoolStrategy(size=size))


def map_workers(ds: Any, worker_cls: type, constructor_kwargs: dict[str, Any], workers: int | None,
                max_workers: int, cpus: float, gpus: float, n_shards: int | None = None) -> Any:
    """Extraction stage: an actor pool of `worker_cls`, one shard per call.

    `workers` fixes the pool size; None autoscales from 1 to `max_workers`. Workers restart after a
    crash (`WORKER_MAX_RESTARTS`) and the shard in flight is retried (`WORKER_MAX_TASK_RETRIES`).
    Each worker holds `SHARDS_IN_FLIGHT_PER_WORKER` shard at a time, so shards spread over every
    worker (and node) of the pool instead of queueing at the one nearest the data.
    """
    import ray.data

    in_flight = SHARDS_IN_FLIGHT_PER_WORKER
    if n_shards is not None:  # a worker with no shard to take only loads the model and makes Ray Data warn
        workers = None if workers is None else max(1, min(workers, n_shards))
        max_workers = max(1, min(max_workers, n_shards))
    if workers is None:
        compute = ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, max_workers),
                                             max_tasks_in_flight_per_actor=in_flight)
    else:
        compute = ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=in_flight)
    # Ray 2.60 deprecates passing actor options as **ray_remote_args (removal announced for 2.64) but
    # names no replacement for max_restarts/max_task_retries; its own default is -1 (unbounded), which
    # would retry a shard that kills its worker forever. Keep the bound, silence the notice here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return ds.map_batches(
            worker_cls, batch_size=1, batch_format="pyarrow", compute=compute,
            fn_constructor_kwargs=constructor_kwargs, num_cpus=cpus, num_gpus=gpus or None,
            max_restarts=WORKER_MAX_RESTARTS, max_task_retries=WORKER_MAX_TASK_RETRIES,
        )
