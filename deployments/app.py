"""The Ray Serve application: thin deployments around the plain classes of this package.

- `ModelServer` (one deployment per served model, `model-<name>`): loads the model once per replica
  (`neuronmap.load_model`) into an `ExtractionService`; `extract_many(calls)` validates, tokenises and
  extracts a batch of requests on one worker thread.
- `AnalysisJobs` (one replica): a `JobManager` running analyses on threads, followed by job id (records
  kept under each run, so a job is still answered for after a restart).
- `NeuronMapIngress` (FastAPI ingress): builds a `NeuronMapAPI` over handles to the two above and
  serves `http.create_app(api)`. Dynamic batching happens here (`HandleExtractor`, `@serve.batch`):
  concurrent /v1/extract requests to one model become one `extract_many` call, one handle call per
  batch instead of one per request (see benchmarks/BENCHMARKS.md, "Serve", for why).

`build_app(args)` is the application builder: `serve_config.yaml` names it as
`import_path: deployments.app:build_app` with the `ServeSettings` fields as `args`, and
`neuronmap serve` calls it with the settings from its options. All Serve options come from
`options.py`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve

from . import options
from .schemas import ExtractCall, ExtractOutcome
from .settings import ServeSettings


@serve.deployment
class ModelServer:
    """One model's replica: `extract_many(calls)` -> one ExtractOutcome per call (errors inside, never raised)."""

    def __init__(self, model: str, settings: dict[str, Any]):
        from .extractor import ExtractionService

        self.settings = ServeSettings.parse(settings)
        self.service = ExtractionService.load(model, device=self.settings.device,
                                              model_dtype=self.settings.model_dtype, limits=self.settings.limits,
                                              forward_batch_size=self.settings.forward_batch_size)

    async def extract_many(self, calls: list[ExtractCall]) -> list[ExtractOutcome]:
        """A batch of requests (merged by the ingress): validated, tokenised and extracted on one thread."""
        return await asyncio.to_thread(self.service.answer, calls)


@serve.deployment
class AnalysisJobs:
    """The job runner (exactly one replica: running jobs live on its threads; their records under each run)."""

    def __init__(self, settings: dict[str, Any]):
        from .analysis_jobs import JobManager

        parsed = ServeSettings.parse(settings)
        self.manager = JobManager(workers=parsed.job_workers, runs_dir=parsed.runs_dir)

    def submit(self, run_path: str, run_id: str, request: dict[str, Any]) -> dict[str, Any]:
        return self.manager.submit(run_path, run_id, request)

    def get(self, job_id: str) -> dict[str, Any] | None:
        return self.manager.get(job_id)


class HandleExtractor:
    """`api.Extractor` over a ModelServer handle: concurrent requests ride in one handle call.

    With batching on, `serve.batch` gathers the requests this ingress replica receives within
    `batch_wait_timeout_s` (up to `max_batch_size`) and sends them as one `extract_many` call, so the
    model replica pays its per-call costs (Serve's request handling, a thread hop, tokeniser and model
    locks) once per batch rather than once per request. Up to `concurrent_batches` batches are in
    flight at once, so transfers overlap the model's work. With batching off each request is a call.
    """

    def __init__(self, handle: Any, batching: Any = None, concurrent_batches: int = 1):
        self.handle = handle
        self._batched = None
        if batching is not None and batching.enabled:
            async def send_batch(calls: list[ExtractCall]) -> list[ExtractOutcome]:
                return await self._send(calls)

            self._batched = serve.batch(max_batch_size=batching.max_batch_size,
                                        batch_wait_timeout_s=batching.batch_wait_timeout_s,
                                        max_concurrent_batches=concurrent_batches)(send_batch)

    async def __call__(self, texts: list[str], layers: Any, pooling: str, dtype: str) -> ExtractOutcome:
        call = ExtractCall(texts, layers, pooling, dtype)
        if self._batched is not None:
            return await self._batched(call)
        return (await self._send([call]))[0]

    async def _send(self, calls: list[ExtractCall]) -> list[ExtractOutcome]:
        try:
            return await self.handle.extract_many.remote(list(calls))
        except Exception as error:  # noqa: BLE001 - a replica that died or cannot be reached: retryable
            failure = ExtractOutcome.failure(503, "unavailable", "the model replica did not answer "
                                             f"({type(error).__name__}); retry shortly")
            return [failure] * len(calls)


class HandleJobs:
    """`api.Jobs` over the AnalysisJobs handle."""

    def __init__(self, handle: Any):
        self.handle = handle

    async def submit(self, run_path: str, run_id: str, request: dict[str, Any]) -> dict[str, Any]:
        return await self._call("submit", run_path, run_id, request)

    async def get(self, job_id: str) -> dict[str, Any] | None:
        return await self._call("get", job_id)

    async def _call(self, method: str, *args: Any) -> Any:
        from .schemas import ApiError

        try:
            return await getattr(self.handle, method).remote(*args)
        except Exception as error:  # noqa: BLE001 - the job runner died or cannot be reached: retryable
            raise ApiError(503, "unavailable", f"the analysis job runner did not answer ({type(error).__name__}); "
                           "retry shortly") from None


@serve.deployment
@serve.ingress()
class NeuronMapIngress:
    """The HTTP entry: FastAPI routes over a NeuronMapAPI (built per replica)."""

    def __init__(self, settings: dict[str, Any], models: dict[str, Any], jobs: Any):
        from .api import NeuronMapAPI

        self.settings = ServeSettings.parse(settings)
        configure_audit_log(self.settings.audit_log)
        if self.settings.rate_limit_per_minute and self.settings.ingress_replicas > 1:
            logging.getLogger("neuronmap.serve").warning(
                "rate limits are kept per ingress replica: with %d replicas a key may reach %d x %g requests a "
                "minute", self.settings.ingress_replicas, self.settings.ingress_replicas,
                self.settings.rate_limit_per_minute)
        concurrent = options.concurrent_batches(self.settings)
        extractors = {name: HandleExtractor(handle, self.settings.batching, concurrent)
                      for name, handle in models.items()}
        self.api = NeuronMapAPI(self.settings, extractors, HandleJobs(jobs))

    def __serve_build_asgi_app__(self) -> Any:
        from .http import create_app

        return create_app(self.api)


def configure_audit_log(path: str | None) -> None:
    """Audit lines at INFO to stderr (the replica's log) and, when given, appended to `path`."""
    from .guard import AUDIT_LOGGER

    audit = logging.getLogger(AUDIT_LOGGER)
    audit.setLevel(logging.INFO)
    audit.propagate = False
    form = logging.Formatter("%(asctime)s %(name)s %(message)s")
    if not any(getattr(h, "_neuronmap", False) for h in audit.handlers):
        handlers: list[logging.Handler] = [logging.StreamHandler()]
        if path:
            handlers.append(logging.FileHandler(path, encoding="utf-8"))
        for handler in handlers:
            handler.setFormatter(form)
            handler._neuronmap = True  # type: ignore[attr-defined]
            audit.addHandler(handler)


def deployment_names(settings: ServeSettings) -> dict[str, str]:
    """Deployment name of each part: {"ingress": ..., "jobs": ..., <served model name>: "model-<name>"}."""
    names = {"ingress": options.INGRESS_NAME, "jobs": options.JOBS_NAME}
    taken = set(names.values())
    for model in settings.served_models():
        names[model] = options.model_deployment_name(model, taken)
        taken.add(names[model])
    return names


def build_app(args: dict[str, Any] | ServeSettings | None = None) -> Any:
    """The NeuronMap Serve application for `args` (ServeSettings fields); keys resolved here."""
    settings = ServeSettings.parse(args).resolved()
    plain = settings.model_dump(mode="json")
    names = deployment_names(settings)
    models = {name: ModelServer.options(**options.model_options(settings, names[name])).bind(source, plain)
              for name, source in settings.served_models().items()}
    jobs = AnalysisJobs.options(**options.jobs_options(settings)).bind(plain)
    return NeuronMapIngress.options(**options.ingress_options(settings)).bind(plain, models, jobs)
