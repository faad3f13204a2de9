"""The Ray engine of `neuronmap analyze --engine ray`: one Ray task per layer, layer pair or shard.

The runner (`neuronmap.analysis.runner`) decides the tasks and gives them to `RayEngine.map`; each
task is `run_task(Task)`, the very function the local engine calls, and reads its shards directly
from the run folder (the task carries the run's path and manifest snapshot, not the data). So the
numbers equal the local engine's: mergeable analyses (`stats`) fold the per-shard partials in the
same row order on the driver.

Registered under the entry-point group `neuronmap.analysis_engines` as `ray` (pyproject.toml), so
the core library never imports Ray. Connects the way `actors.cluster.ray_session` does: a process
already connected keeps its connection; otherwise `RAY_ADDRESS`/`--address`-style addresses join a
cluster, and no address starts an embedded one for the duration of the call.
"""

from __future__ import annotations

import os
from typing import Any, Callable

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
        if not items:
            return []
        with ray_session(self.address, num_cpus=ANALYSIS_TASK_CPUS):
            import ray
            from ray.exceptions import RayTaskError

            task = ray.remote(num_cpus=ANALYSIS_TASK_CPUS, max_retries=ANALYSIS_TASK_RETRIES)(_remote_call)
            fn_ref = ray.put(fn)
            refs = [task.remote(fn_ref, item) for item in items]
            try:
                with options.quiet_logs():
                    return ray.get(refs)
            except RayTaskError as error:
                cause = getattr(error, "cause", None)
                for ref in refs:
                    ray.cancel(ref)
                if isinstance(cause, (NeuronMapError, WorkerError)):
                    raise cause from None
                raise
