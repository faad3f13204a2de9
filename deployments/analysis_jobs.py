"""Analyses started over HTTP: validated at once, computed in the background, followed by job id.

`validate_analysis(catalog, run_id, request)` does the cheap checks a client should hear about
immediately (run exists, analysis name, parameters, layers, label column: every mistake a 4xx with
the analysis runner's own message). `JobManager.submit` then runs `neuronmap.analysis.analyze` on a
worker thread; `get(job_id)` reports `queued | running | succeeded | failed` with progress counted
in the analysis' tasks (one per layer, layer pair or shard) by an engine that wraps the local one.
"""

from __future__ import annotations

import threading
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from neuronmap.errors import NeuronMapError

from .catalog import RunsCatalog
from .schemas import ApiError

MAX_JOBS_KEPT = 1000


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def validate_analysis(catalog: RunsCatalog, run_id: str, request: dict[str, Any]) -> str:
    """The run folder when `request` can start; ApiError (404 run, 400 anything else) otherwise."""
    from neuronmap.analysis.registry import get_analysis
    from neuronmap.analysis.runner import select_layers

    run = catalog.open(run_id)
    try:
        spec = get_analysis(request["analysis"])
        spec.parse_params(request.get("params") or {})
        select_layers(run, request.get("layers"))
        labels = request.get("labels")
        columns = [c for c in run.prompts.columns if c not in ("sample_id", "text")]
        if labels is None and spec.needs_labels:
            raise ApiError(400, "bad_request", f"analysis {spec.name} needs a label column (labels); run {run_id!r} "
                           f"has: {', '.join(columns) or '(none)'}")
        if labels is not None and labels not in columns:
            raise ApiError(400, "bad_request", f"label column {labels!r} is not in run {run_id!r}'s prompts; label "
                           f"columns: {', '.join(columns) or '(none)'}")
    except NeuronMapError as error:
        raise ApiError(400, "bad_request", str(error)) from None
    return str(run.path)


@dataclass
class Job:
    id: str
    run: str
    analysis: str
    state: str = "queued"
    tasks_done: int = 0
    tasks_total: int | None = None
    artifact_id: str | None = None
    reused: bool | None = None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    created: str = field(default_factory=now_iso)
    started: str | None = None
    finished: str | None = None

    def info(self) -> dict[str, Any]:
        done = self.state in ("succeeded", "failed")
        progress = 1.0 if done else (self.tasks_done / self.tasks_total if self.tasks_total else 0.0)
        return {**asdict(self), "progress": round(min(progress, 1.0), 4)}


class CountingEngine:
    """The local engine, counting finished tasks into a Job (its progress)."""

    name = "local"

    def __init__(self, job: Job):
        self.job = job

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        self.job.tasks_total = (self.job.tasks_total or 0) + len(items)
        out = []
        for item in items:
            out.append(fn(item))
            self.job.tasks_done += 1
        return out


class JobManager:
    """Background analyses (`workers` at a time), remembered by id (the last MAX_JOBS_KEPT)."""

    def __init__(self, workers: int = 1):
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="neuronmap-analysis")
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def submit(self, run_path: str, run_id: str, request: dict[str, Any]) -> dict[str, Any]:
        job = Job(id=uuid.uuid4().hex, run=run_id, analysis=str(request["analysis"]))
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > MAX_JOBS_KEPT:
                oldest = next(iter(self._jobs))
                if self._jobs[oldest].state in ("queued", "running"):
                    break
                del self._jobs[oldest]
        self._pool.submit(self._execute, job, run_path, dict(request))
        return job.info()

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            job = self._jobs.get(job_id)
        return None if job is None else job.info()

    def _execute(self, job: Job, run_path: str, request: dict[str, Any]) -> None:
        from neuronmap.analysis import analyze

        job.state, job.started = "running", now_iso()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # they are recorded in the artifact and reported below
                artifact = analyze(run_path, request["analysis"], layers=request.get("layers"),
                                   params=request.get("params") or {}, labels=request.get("labels"),
                                   engine=CountingEngine(job), force=bool(request.get("force")))
            job.artifact_id, job.reused, job.warnings = artifact.id, artifact.reused, artifact.warnings
            job.state = "succeeded"
        except Exception as error:  # noqa: BLE001 - reported through the job, never lost
            job.error = " ".join(str(error).split()) if isinstance(error, NeuronMapError) else \
                f"{type(error).__name__}: {error}"
            job.state = "failed"
        finally:
            job.finished = now_iso()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
