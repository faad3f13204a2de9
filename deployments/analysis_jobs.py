"""Analyses started over HTTP: validated at once, computed in the background, followed by job id.

`validate_analysis(catalog, run_id, request)` does the cheap checks a client should hear about
immediately (run exists, analysis name, parameters, layers, label column: every mistake a 4xx with
the analysis runner's own message). `JobManager.submit` then runs `neuronmap.analysis.analyze` on a
worker thread; `get(job_id)` reports `queued | running | succeeded | failed` with progress counted
in the analysis' tasks (one per layer, layer pair or shard) by an engine that wraps the local one.

Job records outlive the process: each one is a JSON file in its run, ``<run>/analyses/.jobs/<id>.json``
(hidden, so artifact listings skip it), rewritten atomically (temp file, fsync, rename) when the job
starts, progresses (at most once a second), ends, and every `HEARTBEAT_S` while it is queued or
running. After a restart `get` finds the file by id. A record left `queued`/`running` by a process
that is gone (same host and its pid no longer runs the process that wrote it, or no heartbeat for
`STALE_AFTER_S`, which also covers another host) is reported, and rewritten, as `failed`:
"interrupted by a restart; submit it again". Job ids are 32 hex digits (`check_job_id`), so an id
from a URL is never a path. Records do not pile up: whenever a job ends, its run's finished records
beyond the newest `KEEP_FINISHED_PER_RUN`, or older than `KEEP_FINISHED_S`, are removed
(`JobStore.prune`; queued and running records never are). The artifacts the jobs wrote stay.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from neuronmap.errors import NeuronMapError

from .catalog import RunsCatalog, inside
from .schemas import ApiError

logger = logging.getLogger("neuronmap.serve.jobs")

MAX_JOBS_KEPT = 1000  # in memory
KEEP_FINISHED_PER_RUN = 200  # on disk: finished records beyond the newest 200 of a run are removed...
KEEP_FINISHED_S = 7 * 24 * 3600  # ...and so is any finished record older than a week (artifacts stay)
JOB_ID = re.compile(r"[0-9a-f]{32}")
JOBS_DIR = (".jobs",)  # under <run>/analyses/
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0
PROGRESS_WRITE_S = 1.0
INTERRUPTED = "interrupted by a restart; submit it again"
ACTIVE = ("queued", "running")


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def check_job_id(value: str) -> str:
    """`value` when it is a job id (32 lowercase hex digits, as `submit` makes them); ApiError 400 otherwise."""
    if not JOB_ID.fullmatch(value or ""):
        raise ApiError(400, "bad_id", f"job id {value[:80]!r} is not a job id (32 hex digits, as returned by "
                       "POST /v1/runs/{run}/analyses)")
    return value


def validate_analysis(catalog: RunsCatalog, run_id: str, request: dict[str, Any]) -> str:
    """The run folder when `request` can start; ApiError (404 run, 400 anything else) otherwise."""
    from neuronmap.analysis.registry import get_analysis
    from neuronmap.analysis.runner import preflight, select_layers

    run = catalog.open(run_id)
    catalog.check_shards(run_id, run)
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
        preflight(run, spec.name, request.get("layers"), request.get("params") or {}, labels)
    except NeuronMapError as error:
        raise ApiError(400, "bad_request", str(error)) from None
    return str(run.path)


def _process_identity() -> dict[str, Any]:
    """Who writes a record: host, pid and the pid's start time (a reused pid is another process)."""
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": psutil.Process().create_time()}


def _process_gone(owner: dict[str, Any]) -> bool:
    """True when `owner` was a process on this host that no longer runs."""
    import psutil

    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    try:
        return abs(psutil.Process(owner["pid"]).create_time() - float(owner.get("pid_started", 0))) > 1.0
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # no permission to look: cannot tell, rely on the heartbeat
        return False


@dataclass
class Job:
    id: str
    run: str
    analysis: str
    layers: Any = None
    params: dict[str, Any] = field(default_factory=dict)
    labels: str | None = None
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
    updated: str | None = None

    def info(self) -> dict[str, Any]:
        return with_progress(asdict(self))


def with_progress(record: dict[str, Any]) -> dict[str, Any]:
    """The public view of a job record: its fields (bookkeeping dropped) plus `progress` in [0, 1]: 1 once it
    succeeded; for a failed job, how far it got (a failed job at 1.0 read as finished work)."""
    info = {k: v for k, v in record.items() if k not in ("owner", "heartbeat")}
    total = info.get("tasks_total")
    progress = 1.0 if info.get("state") == "succeeded" else (info.get("tasks_done", 0) / total if total else 0.0)
    info["progress"] = round(min(progress, 1.0), 4)
    return info


class JobStore:
    """Job records as JSON files under each run (`<run>/analyses/.jobs/<id>.json`), found by id.

    `runs_dir` is where `find` looks (every run folder directly under it); without one, records are
    still written (next to the run a job was submitted for) but only jobs in memory can be found.
    """

    def __init__(self, runs_dir: str | os.PathLike | None = None):
        self.runs_dir = Path(runs_dir) if runs_dir is not None else None

    @staticmethod
    def path(run_path: str | os.PathLike, job_id: str) -> Path:
        return Path(run_path, "analyses", *JOBS_DIR, f"{check_job_id(job_id)}.json")

    def write(self, run_path: str | os.PathLike, record: dict[str, Any]) -> None:
        """Atomically replace the record (temp file in the same folder, fsync, rename); OSError logged."""
        path = self.path(run_path, record["id"])
        temp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(temp, "w", encoding="utf-8") as handle:
                json.dump(record, handle, sort_keys=True, default=str)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, path)
        except OSError as error:  # the job goes on; only its record after a restart is at risk
            logger.warning("cannot write job record %s: %s", path, error)
            temp.unlink(missing_ok=True)

    def prune(self, run_path: str | os.PathLike, keep: int = KEEP_FINISHED_PER_RUN,
              max_age_s: float = KEEP_FINISHED_S) -> int:
        """Remove finished records of a run beyond the newest `keep` or older than `max_age_s`; return how many.

        Age and order come from each file's modification time (the last rewrite, i.e. when the job
        ended). Records that are queued or running, and files that cannot be read, are left alone.
        """
        folder = Path(run_path, "analyses", *JOBS_DIR)
        finished: list[tuple[float, Path]] = []
        try:
            entries = [entry for entry in os.scandir(folder) if JOB_ID.fullmatch(entry.name.removesuffix(".json"))
                       and entry.name.endswith(".json")]
        except OSError:
            return 0
        for entry in entries:
            try:
                record = json.loads(Path(entry.path).read_text(encoding="utf-8"))
                mtime = entry.stat().st_mtime
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and record.get("state") not in ACTIVE:
                finished.append((mtime, Path(entry.path)))
        finished.sort(reverse=True)  # newest first
        cutoff = time.time() - max_age_s
        doomed = [path for rank, (mtime, path) in enumerate(finished) if rank >= keep or mtime < cutoff]
        for path in doomed:
            try:
                path.unlink()
            except OSError as error:
                logger.warning("cannot remove old job record %s: %s", path, error)
        return len(doomed)

    def find(self, job_id: str) -> tuple[Path, dict[str, Any]] | None:
        """(run folder, record) of `job_id` from disk, or None (also for a record outside the runs directory)."""
        if self.runs_dir is None or not JOB_ID.fullmatch(job_id or ""):
            return None
        root = self.runs_dir.resolve()
        try:
            runs = [Path(entry.path) for entry in os.scandir(root) if not entry.name.startswith(".")]
        except OSError:
            return None
        for run in runs:
            candidate = self.path(run, job_id)
            if not candidate.is_file() or inside(candidate, root) is None:
                continue
            try:
                record = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and record.get("id") == job_id:
                return run, record
        return None


class CountingEngine:
    """Another engine (the local one by default), counting finished tasks into a Job (its progress).

    `imap` hands results on as the wrapped engine yields them (the runner folds per-shard partials
    as they arrive, holding one at a time with the local engine); `on_progress` is called after
    every finished task.
    """

    name = "local"

    def __init__(self, job: Job, inner: Any = None, on_progress: Callable[[], None] | None = None):
        from neuronmap.analysis.runner import LocalEngine

        self.job = job
        self.inner = inner if inner is not None else LocalEngine()
        self.name = getattr(self.inner, "name", "local")
        self.on_progress = on_progress or (lambda: None)

    def _done(self) -> None:
        self.job.tasks_done += 1
        self.on_progress()

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        return list(self.imap(fn, items))

    def imap(self, fn: Callable[[Any], Any], items: list[Any]) -> Iterator[Any]:
        self.job.tasks_total = (self.job.tasks_total or 0) + len(items)
        inner_imap = getattr(self.inner, "imap", None)
        if inner_imap is None:  # an engine with map only: it returns every result at once
            results = self.inner.map(fn, items)
            for _ in items:
                self._done()
            return iter(results)
        return self._counted(inner_imap(fn, items))

    def _counted(self, results: Iterator[Any]) -> Iterator[Any]:
        try:
            for result in results:
                self._done()
                yield result
        finally:
            close = getattr(results, "close", None)
            if close is not None:  # closing early cancels what the wrapped engine holds in flight
                close()


class JobManager:
    """Background analyses (`workers` at a time), remembered by id: in memory (the last MAX_JOBS_KEPT)
    and on disk under each run (see the module docstring), so `get` still answers after a restart
    when `runs_dir` is given."""

    def __init__(self, workers: int = 1, runs_dir: str | os.PathLike | None = None):
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="neuronmap-analysis")
        self._jobs: dict[str, tuple[Job, str]] = {}
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._written: dict[str, float] = {}
        self.store = JobStore(runs_dir)
        self.owner = {**_process_identity(), "instance": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="neuronmap-job-heartbeat", daemon=True)
        self._heartbeat.start()

    def submit(self, run_path: str, run_id: str, request: dict[str, Any]) -> dict[str, Any]:
        job = Job(id=uuid.uuid4().hex, run=run_id, analysis=str(request["analysis"]), layers=request.get("layers"),
                  params=dict(request.get("params") or {}), labels=request.get("labels"))
        with self._lock:
            self._jobs[job.id] = (job, str(run_path))
            while len(self._jobs) > MAX_JOBS_KEPT:
                oldest = next(iter(self._jobs))
                if self._jobs[oldest][0].state in ACTIVE:
                    break
                del self._jobs[oldest]
        self._persist(job, str(run_path))
        self._pool.submit(self._execute, job, str(run_path), dict(request))
        return job.info()

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job's state, from memory, else from its record on disk (None when there is neither)."""
        if not JOB_ID.fullmatch(job_id or ""):
            return None
        with self._lock:
            entry = self._jobs.get(job_id)
        if entry is not None:
            return entry[0].info()
        found = self.store.find(job_id)
        if found is None:
            return None
        run_path, record = found
        if record.get("state") in ACTIVE and self._abandoned(record):
            record.update(state="failed", error=INTERRUPTED, finished=record.get("finished") or now_iso(),
                          updated=now_iso())
            self.store.write(run_path, record)
        return with_progress(record)

    def _abandoned(self, record: dict[str, Any]) -> bool:
        """A queued/running record that no live process will finish (see the module docstring)."""
        owner = record.get("owner") or {}
        if owner.get("instance") == self.owner["instance"]:
            return True  # ours but not in memory: this manager never forgets an active job, so it never will
        try:
            stale = time.time() - float(record.get("heartbeat") or 0) > STALE_AFTER_S
        except (TypeError, ValueError):
            stale = True
        return stale or _process_gone(owner)

    def _persist(self, job: Job, run_path: str, throttle: bool = False) -> None:
        with self._write_lock:
            now = time.monotonic()
            if throttle and now - self._written.get(job.id, 0.0) < PROGRESS_WRITE_S:
                return
            job.updated = now_iso()
            record = {**asdict(job), "owner": self.owner, "heartbeat": time.time()}
            self.store.write(run_path, record)
            self._written[job.id] = now
            if job.state not in ACTIVE:
                self._written.pop(job.id, None)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self._lock:
                active = [(job, path) for job, path in self._jobs.values() if job.state in ACTIVE]
            for job, path in active:
                self._persist(job, path)

    def _execute(self, job: Job, run_path: str, request: dict[str, Any]) -> None:
        from neuronmap.analysis import analyze

        job.state, job.started = "running", now_iso()
        self._persist(job, run_path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # they are recorded in the artifact and reported below
                engine = CountingEngine(job, on_progress=lambda: self._persist(job, run_path, throttle=True))
                artifact = analyze(run_path, request["analysis"], layers=request.get("layers"),
                                   params=request.get("params") or {}, labels=request.get("labels"),
                                   engine=engine, force=bool(request.get("force")))
            job.artifact_id, job.reused, job.warnings = artifact.id, artifact.reused, artifact.warnings
            job.state = "succeeded"
        except Exception as error:  # noqa: BLE001 - reported through the job, never lost
            job.error = " ".join(str(error).split()) if isinstance(error, NeuronMapError) else \
                f"{type(error).__name__}: {error}"
            job.state = "failed"
        finally:
            job.finished = now_iso()
            self._persist(job, run_path)
            self.store.prune(run_path)

    def shutdown(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
