"""`NeuronMapAPI`: what every HTTP route does, as plain methods (no Ray, no HTTP parsing).

The routes in `http.py` parse a request and call one method here. The model replicas and the job
runner are reached through two small interfaces, so the same class runs inside the Serve ingress
(backends wrap `DeploymentHandle`s, see `app.py`) and in-process in tests (`LocalExtractor`,
`LocalJobs`, which call `ExtractionService` and `JobManager` directly).
"""

from __future__ import annotations

import asyncio
from typing import Any, Mapping, Protocol

from neuronmap import __version__

from . import encoding
from .analysis_jobs import JobManager, check_job_id, validate_analysis
from .catalog import RunsCatalog
from .metrics import ServeMetrics
from .schemas import ApiError, ExtractOutcome
from .settings import ServeSettings


class Extractor(Protocol):
    """Answers one /v1/extract request of one model (a model replica, or a local service)."""

    async def __call__(self, texts: list[str], layers: Any, pooling: str, dtype: str) -> ExtractOutcome: ...


class Jobs(Protocol):
    async def submit(self, run_path: str, run_id: str, request: dict[str, Any]) -> dict[str, Any]: ...

    async def get(self, job_id: str) -> dict[str, Any] | None: ...


class LocalExtractor:
    """An Extractor calling an ExtractionService in a worker thread (tests, tools)."""

    def __init__(self, service: Any):
        self.service = service

    async def __call__(self, texts: list[str], layers: Any, pooling: str, dtype: str) -> ExtractOutcome:
        return await asyncio.to_thread(self.service.extract, texts, layers, pooling, dtype)


class LocalJobs:
    """Jobs run by a JobManager in this process."""

    def __init__(self, manager: JobManager):
        self.manager = manager

    async def submit(self, run_path: str, run_id: str, request: dict[str, Any]) -> dict[str, Any]:
        return self.manager.submit(run_path, run_id, request)

    async def get(self, job_id: str) -> dict[str, Any] | None:
        return self.manager.get(job_id)


class NeuronMapAPI:
    """The request handling of the HTTP API.

    Parameters
    ----------
    settings : ServeSettings
    extractors : mapping model name -> Extractor
    jobs : Jobs
    metrics : ServeMetrics, optional
    """

    def __init__(self, settings: ServeSettings, extractors: Mapping[str, Extractor], jobs: Jobs,
                 metrics: ServeMetrics | None = None):
        self.settings = settings
        self.extractors = dict(extractors)
        self.jobs = jobs
        self.metrics = metrics or ServeMetrics()
        self.catalog = RunsCatalog(settings.runs_dir)

    # -- extraction --------------------------------------------------------------------------------
    async def extract(self, model: str, texts: list[str], layers: Any, pooling: str, dtype: str,
                      accept: str | None) -> tuple[bytes, dict[str, str]]:
        """(body, headers) of the activations of `texts`, in the format the Accept header asks for."""
        media = encoding.negotiate(accept)
        if model not in self.extractors:
            served = ", ".join(self.extractors) or "(none: start the server with --model)"
            raise ApiError(400, "unknown_model", f"model {model[:100]!r} is not served here; served models: {served}")
        outcome = await self.extractors[model](texts, layers, pooling, dtype)
        outcome.raise_for_error()
        self.metrics.observe_extract(model, len(texts), outcome.batch_requests, outcome.batch_texts,
                                     outcome.first_in_batch)
        return encoding.encode(media, model, pooling, dtype, outcome)

    # -- runs and analyses -------------------------------------------------------------------------
    def list_runs(self) -> list[dict]:
        return self.catalog.list_runs()

    def run(self, run_id: str) -> dict:
        return self.catalog.describe(run_id)

    def layer_stats(self, run_id: str, layer: str) -> dict:
        return self.catalog.layer_stats(run_id, layer)

    def list_analyses(self, run_id: str) -> list[dict]:
        return self.catalog.list_analyses(run_id)

    def analysis(self, run_id: str, artifact_id: str, figure: bool = True) -> dict:
        return self.catalog.analysis(run_id, artifact_id, figure)

    async def start_analysis(self, run_id: str, request: dict[str, Any]) -> dict:
        run_path = await asyncio.to_thread(validate_analysis, self.catalog, run_id, request)
        return await self.jobs.submit(run_path, run_id, request)

    async def job(self, job_id: str) -> dict:
        check_job_id(job_id)
        info = await self.jobs.get(job_id)
        if info is None:
            raise ApiError(404, "not_found", f"no job {job_id!r} in any run of the runs directory (its run may have "
                           "been deleted); POST /v1/runs/{run}/analyses starts one")
        return info

    # -- service -----------------------------------------------------------------------------------
    def health(self) -> dict:
        return {"status": "ok", "version": __version__, "models": list(self.extractors),
                "runs_dir": str(self.settings.runs_dir), "auth": self.settings.auth_enabled}

    def metrics_text(self) -> tuple[bytes, str]:
        return self.metrics.render()
