"""The FastAPI application: routes that parse a request and call one `NeuronMapAPI` method.

`create_app(api)` builds it (the Serve ingress calls it once per replica, tests can call it too).
Every error is JSON (`ErrorBody`): validation errors 422, refused input 400, unknown ids 404,
unacceptable Accept 406, size 413, rate 429, auth 401; only a bug in the server is a 500.
"""

import logging
from typing import Any

from fastapi import Body, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from neuronmap import __version__
from neuronmap.errors import NeuronMapError

from . import encoding
from .api import NeuronMapAPI
from .guard import AUDIT_LOGGER, ApiKeys, Guard, RateLimiter
from .schemas import (AnalysisDetail, AnalysisRequest, AnalysisSummary, ApiError, ErrorBody, ExtractResponse, Health,
                      JobInfo, LayerStats, RunDetail, RunSummary, extract_request_model)

logger = logging.getLogger("neuronmap.serve")

_ERROR = {"model": ErrorBody}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {**_ERROR, "description": "refused input (unknown model or layer, limits)"},
    401: {**_ERROR, "description": "missing or unknown API key"},
    404: {**_ERROR, "description": "no such run, layer, analysis or job"},
    409: {**_ERROR, "description": "the run or artifact on disk cannot be read"},
    413: {**_ERROR, "description": "request body too large"},
    422: {**_ERROR, "description": "request does not match the schema"},
    429: {**_ERROR, "description": "rate limit reached", "headers": _RETRY_AFTER},
    500: {**_ERROR, "description": "server bug"},
    503: {**_ERROR, "description": "a model replica or the job runner is unavailable: retry"},
}
RUN_ID = Path(..., min_length=1, max_length=200, description="a run folder's name under the runs directory")
BINARY = {"schema": {"type": "string", "format": "binary"}}


def _error(status: int, code: str, message: str, detail: Any = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "message": message, "detail": detail}, status_code=status, headers=headers)


BODY_UNREADABLE = ("the request body could not be read: send a JSON object encoded as UTF-8, with "
                   "Content-Type: application/json")


def _validation_message(errors: list[dict]) -> tuple[str, list[dict]]:
    detail = [{"loc": [str(p) for p in e.get("loc", ())], "msg": _plain_msg(e), "type": str(e.get("type", ""))}
              for e in errors[:20]]
    broken = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if broken is not None:  # FastAPI's loc is (body, character offset): say so, and what to send
        at = next((p for p in broken.get("loc", ())[1:] if isinstance(p, int)), None)
        where = f" at character {at}" if at is not None else ""
        reason = (broken.get("ctx") or {}).get("error") or broken.get("msg", "")
        return f"the request body is not valid JSON{where} ({reason}); send a JSON object encoded as UTF-8", detail
    parts = [f"{'.'.join(d['loc'][1:] or d['loc'])}: {d['msg']}" for d in detail[:3]]
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    return "invalid request: " + "; ".join(parts) + more, detail


def _plain_msg(error: dict) -> str:
    """pydantic's message, except for the blank-text pattern, whose regex says nothing to a client."""
    if error.get("type") == "string_pattern_mismatch" and (error.get("ctx") or {}).get("pattern") == r"\S":
        return "text is empty or only whitespace; send at least one visible character"
    return str(error.get("msg", ""))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return _error(error.status, error.code, error.message, headers=error.headers or None)

    @app.exception_handler(NeuronMapError)
    async def user_error(_: Request, error: NeuronMapError) -> JSONResponse:
        return _error(400, "bad_request", " ".join(str(error).split()))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        message, detail = _validation_message(list(error.errors()))
        return _error(422, "validation_error", message, detail)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        message = str(error.detail)
        if error.status_code == 400 and message == "There was an error parsing the body":  # FastAPI's words
            code, message = "bad_request", BODY_UNREADABLE
        return _error(error.status_code, code, message, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def bug(_: Request, error: Exception) -> JSONResponse:
        logger.exception("internal error")
        return _error(500, "internal_error", f"{type(error).__name__}: {error}")


def create_app(api: NeuronMapAPI) -> FastAPI:
    """The HTTP API over `api`, behind the `Guard` middleware configured from `api.settings`."""
    settings = api.settings
    app = FastAPI(title="NeuronMap", version=__version__, responses=COMMON_RESPONSES,
                  description="Activations of transformer models and analyses of stored runs, over HTTP.")
    install_error_handlers(app)
    ExtractRequest = extract_request_model(settings.limits, list(api.extractors))

    @app.post("/v1/extract", response_class=Response, tags=["extract"], responses={
        200: {"model": ExtractResponse, "description": "activations per layer (JSON, Arrow IPC, .npy or .npz)",
              "content": {encoding.ARROW: BINARY, encoding.NPY: BINARY, encoding.NPZ: BINARY}},
        406: {**_ERROR, "description": "the Accept header asks for no format offered"}})
    async def extract(request: Request, body: ExtractRequest = Body(...)) -> Response:  # type: ignore[valid-type]
        """Activations of `layers` for every text, pooled like `neuronmap extract --pooling`.

        `Accept: application/vnd.apache.arrow.stream` (Arrow IPC), `application/x-npy` (one layer) or
        `application/x-npz` for binary answers; JSON otherwise.
        """
        content, headers = await api.extract(body.model, body.texts, body.layers, body.pooling, body.dtype,
                                             request.headers.get("accept"))
        return Response(content=content, headers=headers, media_type=headers["Content-Type"])

    @app.get("/v1/runs", response_model=list[RunSummary], tags=["runs"])
    def list_runs() -> list[dict]:
        """Runs under the runs directory (folders with a manifest.json)."""
        return api.list_runs()

    @app.get("/v1/runs/{run_id}", response_model=RunDetail, tags=["runs"])
    def get_run(run_id: str = RUN_ID) -> dict:
        """One run: status, model, layers and shapes, shards, prompt columns, analyses."""
        return api.run(run_id)

    @app.get("/v1/runs/{run_id}/layers/{layer}/stats", response_model=LayerStats, tags=["runs"])
    def layer_stats(run_id: str = RUN_ID, layer: str = Path(..., min_length=1, max_length=200)) -> dict:
        """Per-neuron mean, std, min, max and sparsity of a stored layer (streamed over its shards)."""
        return api.layer_stats(run_id, layer)

    @app.get("/v1/runs/{run_id}/analyses", response_model=list[AnalysisSummary], tags=["analyses"])
    def list_analyses(run_id: str = RUN_ID) -> list[dict]:
        """Analysis artifacts stored in the run."""
        return api.list_analyses(run_id)

    @app.post("/v1/runs/{run_id}/analyses", response_model=JobInfo, status_code=202, tags=["analyses"])
    async def start_analysis(body: AnalysisRequest, run_id: str = RUN_ID) -> dict:
        """Start an analysis (as `neuronmap analyze`); returns a job to follow at /v1/jobs/{job_id}."""
        return await api.start_analysis(run_id, body.model_dump())

    @app.get("/v1/analyses/{run_id}/{artifact_id}", response_model=AnalysisDetail, tags=["analyses"])
    def get_analysis(run_id: str = RUN_ID, artifact_id: str = Path(..., min_length=1, max_length=200),
                     figure: bool = Query(True, description="include a plotly figure JSON")) -> dict:
        """An analysis result (result.json), its array and table names, and its figure as plotly JSON."""
        return api.analysis(run_id, artifact_id, figure)

    @app.get("/v1/jobs/{job_id}", response_model=JobInfo, tags=["analyses"])
    async def get_job(job_id: str = Path(..., min_length=1, max_length=200)) -> dict:
        """State (queued, running, succeeded, failed) and progress of an analysis job."""
        return await api.job(job_id)

    @app.get("/healthz", response_model=Health, tags=["service"])
    def healthz() -> dict:
        """Liveness, the models served and whether API keys are required."""
        return api.health()

    @app.get("/metrics", response_class=Response, tags=["service"],
             responses={200: {"description": "Prometheus text format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}})
    def metrics() -> Response:
        """Prometheus metrics: requests, latency histograms, model batch sizes."""
        content, media_type = api.metrics_text()
        return Response(content=content, media_type=media_type)

    if settings.auth_enabled:
        _document_auth(app)
    audit = logging.getLogger(AUDIT_LOGGER)
    app.add_middleware(Guard, routes=app.routes, keys=ApiKeys(settings.api_key_hashes),
                       limiter=RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst),
                       max_body_bytes=settings.limits.max_body_bytes, metrics=api.metrics, audit=audit)
    return app


def _document_auth(app: FastAPI) -> None:
    """Declare the bearer/X-API-Key schemes in /openapi.json when keys are required."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
            schema["security"] = [{"bearer": []}, {"apiKey": []}]
            for path in ("/healthz", "/openapi.json"):
                for operation in schema.get("paths", {}).get(path, {}).values():
                    operation["security"] = []
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
