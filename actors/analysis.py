"""The Ray engine of `neuronmap analyze --engine ray`: one Ray task per layer, layer pair or shard.

The runner (`neuronmap.analysis.runner`) decides the tasks and gives them to `RayEngine.map`; each
task is `run_task(Task)`, the very function the local engine calls, and reads its shards directly
from the run folder (the task carries the run's path and manifest snapshot, not the data). So the
numbers equal the local engine's: mergeable analyses (`stats`) fold the per-shard partials in the
same row order on the driver.

`RayEngine.imap` (what the runner uses for per-shard partials) keeps a bounded window of tasks in
flight and hands results back in order as they finish, so the driver holds the running merge and
one partial at a time, and the object store about a window of partials, whatever the number of
shards; `map` is `imap` collected into a list.

Registered under the entry-point group `neuronmap.analysis_engines` as `ray` (pyproject.toml), so
the core library never imports Ray. Connects the way `actors.cluster.ray_session` does: a process
already connected keeps its connection; otherwise `RAY_ADDRESS`/`--address`-style addresses join a
cluster, and no address starts an embedded one for the duration of the call.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any, Callable, Iterator

from neuronmap.errors import NeuronMapError

from . import options
from .cluster import ray_session
from .errors import WorkerError

options.setup_environment()

# CPUs one analysis task reserves. Analyses are numpy/scikit-learn code; one CPU per task lets Ray
# run as many tasks at once as the cluster has CPUs.
ANALYSIS_TASK_CPUS = 1.0
# A task whose worker process dies (OOM killer) is retried this many times.
ANALYSIS_TASK_RETRIES = 2
# Tasks kept in flight per CPU of the cluster by `imap`: enough to keep every CPU busy while the
# driver merges, few enough that finished-but-unmerged results stay a small, fixed amount.
ANALYSIS_TASKS_IN_FLIGHT_PER_CPU = 2


def _remote_call(fn: Callable[[Any], Any], item: Any) -> Any:
    """Body of every analysis task: call, and send user mistakes back typed and picklable."""
    try:
        return fn(item)
    except NeuronMapError:
        raise
    except Exception as error:  # internal failure: keep the type and the place it happened
        raise WorkerError.wrap(error, doing="failed in an analysis task") from None


class RayEngine:
    """Runs the runner's tasks as Ray tasks and returns their results in order.

    Parameters
    ----------
    address : str, optional
        Ray cluster (`auto`, `HOST:PORT`, `ray://HOST:PORT`); default `NEURONMAP_RAY_ADDRESS`, else the
        connection this process already has, else an embedded local cluster.
    """

    name = "ray"

    def __init__(self, address: str | None = None):
        self.address = address or os.environ.get("NEURONMAP_RAY_ADDRESS") or None

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        return list(self.imap(fn, items))

    def imap(self, fn: Callable[[Any], Any], items: list[Any], window: int | None = None) -> Iterator[Any]:
        """`fn` over `items` as Ray tasks, results yielded in order as they finish.

        At most `window` tasks are in flight (default: ANALYSIS_TASKS_IN_FLIGHT_PER_CPU per cluster
        CPU); a new one is submitted each time a result is taken. Closing the iterator early, or a
        failing task, cancels the tasks still in flight. User mistakes raised in a task arrive as
        themselves (ConfigError, ...), internal failures as WorkerError.
        """
        items = list(items)
        if not items:
            return
        with ray_session(self.address, num_cpus=ANALYSIS_TASK_CPUS):
            import ray

            task = ray.remote(num_cpus=ANALYSIS_TASK_CPUS, max_retries=ANALYSIS_TASK_RETRIES)(_remote_call)
            fn_ref = ray.put(fn)
            if window is None:
                cpus = float(ray.cluster_resources().get("CPU", 1.0))
                window = int(cpus / ANALYSIS_TASK_CPUS) * ANALYSIS_TASKS_IN_FLIGHT_PER_CPU
            window = max(1, int(window))
            upcoming = iter(items)
            in_flight: deque = deque(task.remote(fn_ref, item) for _, item in zip(range(window), upcoming))
            try:
                while in_flight:
                    value = self._get(in_flight[0])
                    in_flight.popleft()
                    following = next(upcoming, _END)
                    if following is not _END:
                        in_flight.append(task.remote(fn_ref, following))
                    yield value
            finally:
                for ref in in_flight:
                    ray.cancel(ref)

    @staticmethod
    def _get(ref: Any) -> Any:
        """The task's result; its user mistake or WorkerError raised as itself."""
        import ray
        from ray.exceptions import RayTaskError

        try:
            with options.quiet_logs():
                return ray.get(ref)
        except RayTaskError as error:
            cause = getattr(error, "cause", None)
            if isinstance(cause, (NeuronMapError, WorkerError)):
                raise cause from None
            raise


_END = object()
