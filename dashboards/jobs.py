"""Analyses launched from the dashboard: validated at once, run in a background worker pool.

A job names a registered analysis (never anything executable: the name is looked up in the
registry), a run id (resolved under the runs folder), layers of that run, an optional label column and
parameters that the analysis' own pydantic model validates. Jobs run on a thread pool of `workers`
threads; each calls `neuronmap.analysis.analyze` with an engine wrapper that counts finished tasks
(the progress bar). With engine "ray" the tasks fan out to Ray (`neuronmap.analysis_engines`), and
the progress advances when Ray returns them.

`submit` refuses at once what the analysis would refuse before reading any activation: a missing label
column, too few layers, and whatever the analysis' own pre-flight `check` finds on the chosen layers'
shapes (n_components above the width, a t-SNE perplexity above the rows, ...). Its messages speak of the
form's fields and the run's id, not of command-line flags and folders.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from neuronmap.errors import ConfigError, NeuronMapError

from .runstate import prompts_unreadable


@dataclass
class Job:
    """One launched analysis and where it stands."""

    id: str
    run_id: str
    analysis: str
    layers: list[str]
    labels: str | None
    params: dict[str, Any]
    engine: str
    status: str = "queued"  # queued | running | done | failed
    reused: bool = False
    done: int = 0
    total: int = 0
    message: str = ""
    artifact_id: str | None = None
    warnings: list[str] = field(default_factory=list)
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None

    @property
    def progress(self) -> float:
        if self.status == "done":
            return 1.0
        return self.done / self.total if self.total else 0.0

    @property
    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.time()) - self.started


class ProgressEngine:
    """An analysis engine that runs another engine's tasks and counts them for a job's progress."""

    def __init__(self, job: Job, inner: Any):
        self.job, self.inner = job, inner
        self.name = getattr(inner, "name", "local")

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        self.job.total += len(items)
        if self.name != "local":  # a cluster runs them all at once
            results = self.inner.map(fn, items)
            self.job.done += len(items)
            return results
        results = []
        for item in items:
            results.append(fn(item))
            self.job.done += 1
        return results

    def imap(self, fn: Callable[[Any], Any], items: list[Any]) -> Iterator[Any]:
        """Results one by one as the inner engine yields them (partials reduced as they arrive)."""
        from neuronmap.analysis.runner import _imap

        self.job.total += len(items)
        for result in _imap(self.inner, fn, items):
            self.job.done += 1
            yield result


class JobManager:
    """Validate and run analyses in the background; `jobs()` lists them, newest first."""

    def __init__(self, repository, workers: int = 2):
        self.repository = repository
        self._pool = ThreadPoolExecutor(max_workers=max(1, int(workers)), thread_name_prefix="neuronmap-job")
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def submit(self, run_id: str, analysis: str, layers: list[str] | None, labels: str | None = None,
               params: dict[str, Any] | None = None, engine: str = "local") -> Job:
        """Check everything a user chose, then queue the job (ConfigError / RefusedPath on a mistake)."""
        from neuronmap.analysis.registry import get_analysis
        from neuronmap.analysis.runner import available_engines

        run = self.repository.run(run_id)
        spec = get_analysis(analysis)
        model = spec.parse_params(params or {})
        layers = list(layers or [])
        unknown = [layer for layer in layers if layer not in run.layers]
        if unknown:
            raise ConfigError(f"layers {', '.join(unknown)} are not in run {run_id}; it holds: {', '.join(run.layers)}")
        if not layers:
            raise ConfigError("select at least one layer")
        if labels or spec.needs_labels:
            columns = self._label_columns(run_id)
            shown = ", ".join(columns) or "none: its prompts have no label columns"
            if labels and labels not in columns:
                raise ConfigError(f"label column {labels!r} is not in run {run_id}; label columns: {shown}")
            if not labels:
                raise ConfigError(f"{spec.name} needs a label column: choose one under Label column (run {run_id} "
                                  f"has: {shown})")
        if spec.scope == "layer_pair" and len(layers) < 2 and spec.pair_mode(model) != "ordered":
            raise ConfigError(f"{spec.name} compares layers: select at least 2 layers (selected: {', '.join(layers)})")
        if engine not in available_engines():
            raise ConfigError(f"engine {engine!r} is not available; installed engines: {', '.join(available_engines())}")
        self._preflight(run, run_id, spec, model, layers, labels)
        job = Job(f"job-{next(self._ids)}", run_id, spec.name, layers, labels or None, dict(params or {}), engine)
        with self._lock:
            self._jobs[job.id] = job
        self._pool.submit(self._run, job)
        return job

    def _label_columns(self, run_id: str) -> list[str]:
        try:
            return self.repository.label_columns(run_id)
        except NeuronMapError:  # a damaged prompts.parquet
            raise ConfigError(f"no label column can be used: {prompts_unreadable(run_id)}") from None

    @staticmethod
    def _preflight(run, run_id: str, spec, model, layers: list[str], labels: str | None) -> None:
        """What `analyze` checks before reading activations (`runner.preflight`), worded for the form.
        Any other failure is left for the job to report."""
        from neuronmap.analysis.runner import preflight

        try:
            preflight(run, spec.name, layers, model, labels)
        except NeuronMapError as error:
            raise ConfigError(dashboard_wording(str(error), run.path, run_id)) from None

    def _run(self, job: Job) -> None:
        from neuronmap.analysis.runner import analyze, get_engine

        job.status, job.started = "running", time.time()
        try:
            path = self.repository.run_path(job.run_id)
            engine = ProgressEngine(job, get_engine(job.engine))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                artifact = analyze(path, job.analysis, layers=job.layers, params=job.params, labels=job.labels,
                                   engine=engine)
            job.warnings = list(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)))
            job.artifact_id = artifact.id
            job.reused = bool(artifact.reused)
            job.message = "reused an identical artifact" if artifact.reused else f"wrote {artifact.id}"
            job.status = "done"
        except NeuronMapError as error:
            job.status, job.message = "failed", str(error)
        except Exception as error:  # an internal error: shown, never raised into the server
            job.status, job.message = "failed", f"internal error: {type(error).__name__}: {error}"
        finally:
            job.finished = time.time()
            self.repository.invalidate()

    def jobs(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda job: job.submitted, reverse=True)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


_CLI_HINTS = (
    (re.compile(r"pass --labels COLUMN(?: \(labels=\.\.\.\))?"), "choose one under Label column"),
    (re.compile(r"use --layers with a glob such as '[^']*'"), "select more layers"),
    (re.compile(r"\bpass --param (?=\w+=)"), "set --param "),
    (re.compile(r"--param (\w+=\S+?)([;,)]?(?:\s|$))"), r"\1 under Parameters\2"),
    (re.compile(r"--param (\w+)"), r"\1 (under Parameters)"),
    (re.compile(r"--labels column"), "label column"),
    (re.compile(r"(?:pass |with )?--labels\b"), "the Label column"),
    (re.compile(r"(?:with )?--layers\b"), "under Layers"),
)


def dashboard_wording(message: str, run_path, run_id: str) -> str:
    """An analysis' message for the Launch form: the run's folder written as its id, command-line hints
    (``pass --param perplexity=6``, ``--labels COLUMN``) as the form's fields."""
    message = message.replace(str(run_path), run_id)
    for pattern, replacement in _CLI_HINTS:
        message = pattern.sub(replacement, message)
    return message
