"""Request and response bodies of the HTTP API (pydantic), and the errors it answers with.

Every error body is `ErrorBody` (`{"error": code, "message": one line, "detail": ...}`), whatever
the status. `extract_request_model(limits)` builds the /v1/extract body with the server's limits
written into the schema, so /openapi.json tells clients (and schemathesis) what is accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, NamedTuple, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, create_model

from .settings import Limits

Pooling = Literal["mean", "last", "first", "max", "none"]
JobState = Literal["queued", "running", "succeeded", "failed"]
ID_MAX = 200


class ApiError(Exception):
    """A request the server refuses: HTTP `status`, a short `code` and a one-line `message`."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class ErrorBody(BaseModel):
    error: str = Field(description="short machine-readable code, e.g. not_found, validation_error")
    message: str = Field(description="one line: the value, what is allowed, the fix")
    detail: Optional[Any] = None


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


def extract_request_model(limits: Limits, models: list[str]) -> type[BaseModel]:
    """The /v1/extract body with `limits` (and the served model names, when any) in its schema."""
    # A text of only whitespace is refused, as a blank line of a prompt file is: it carries no prompt.
    text = Field(min_length=1, max_length=limits.max_chars, pattern=r"\S")
    model_type: Any = Literal[tuple(models)] if models else str  # type: ignore[valid-type]
    layer_item = Annotated[str, Field(min_length=1, max_length=ID_MAX)]
    return create_model(
        "ExtractRequest",
        __base__=_Body,
        model=(model_type, Field(description="a model this server serves (see /healthz)")),
        texts=(list[Annotated[str, text]], Field(min_length=1, max_length=limits.max_texts,
                                                 description=f"1 to {limits.max_texts} texts")),
        layers=(Union[layer_item, list[layer_item]], Field(
            "blocks.*", description="layer spec: names, globs (blocks.*.mlp), ranges (blocks.0-3), module:<path>")),
        pooling=(Pooling, Field("mean", description="mean | last | first | max | none (one row per token)")),
        dtype=(Literal["float32", "float16"], "float32"),
    )


class LayerArray(BaseModel):
    shape: list[int] = Field(description="(rows, *feature shape); rows = texts, or tokens with pooling none")
    dtype: str
    data: list[Any] = Field(description="nested lists of numbers in that shape")


class ExtractResponse(BaseModel):
    model: str
    pooling: str
    dtype: str
    n_texts: int
    n_tokens: list[int] = Field(description="tokens of each text after truncation")
    n_truncated: int
    text_index: Optional[list[int]] = Field(None, description="pooling none: the text of each row")
    token_index: Optional[list[int]] = Field(None, description="pooling none: the token position of each row")
    layers: dict[str, LayerArray]


class LayerInfoOut(BaseModel):
    shape: list[int]
    dtype: str
    kind: str
    per_token: bool
    rows: int


class RunSummary(BaseModel):
    id: str
    status: str
    model: str
    n_samples: int
    pooling: str
    format: str
    layers: list[str]
    created: Optional[str] = None
    updated: Optional[str] = None


class RunDetail(RunSummary):
    dtype: str
    tokenizer: Optional[str] = None
    config_hash: Optional[str] = None
    n_tokens: Optional[int] = None
    n_truncated: Optional[int] = None
    error: Optional[str] = None
    layer_info: dict[str, LayerInfoOut]
    n_shards: int
    bytes: int
    prompt_columns: list[str]
    analyses: list[str]


class LayerStats(BaseModel):
    run: str
    layer: str
    n_rows: int
    n_features: int
    summary: dict[str, Optional[float]] = Field(description="layer-wide: mean, std, min, max, sparsity, ...")
    per_neuron: dict[str, list[Optional[float]]] = Field(description="per feature: mean, std, min, max, sparsity")
    warnings: list[str] = Field(default_factory=list)


class AnalysisSummary(BaseModel):
    id: str
    analysis: str
    family: Optional[str] = None
    scope: Optional[str] = None
    layers: list[str]
    units: list[str]
    run_status: Optional[str] = None
    created: Optional[str] = None


class AnalysisDetail(BaseModel):
    id: str
    run: str
    result: dict[str, Any] = Field(description="result.json as stored")
    figure: Optional[dict[str, Any]] = Field(None, description="plotly figure JSON ({data, layout})")
    arrays: list[str]
    tables: list[str]


class AnalysisRequest(_Body):
    analysis: str = Field(min_length=1, max_length=ID_MAX,
                          description="a registered analysis (neuronmap analyze --list)")
    layers: Optional[Union[str, list[str]]] = Field(None,
                                                    description="the run's layer names, globs, ranges; all by default")
    params: dict[str, Any] = Field(default_factory=dict)
    labels: Optional[str] = Field(None, max_length=ID_MAX, description="label column of the run's prompts")
    force: bool = False


class JobInfo(BaseModel):
    id: str = Field(description="32 hex digits")
    run: str
    analysis: str
    layers: Optional[Union[str, list[str]]] = None
    params: dict[str, Any] = Field(default_factory=dict)
    labels: Optional[str] = None
    state: JobState = Field(description="a job that was queued or running when the server stopped is failed, "
                            "with error 'interrupted by a restart; submit it again'")
    progress: float = Field(ge=0, le=1)
    tasks_done: int
    tasks_total: Optional[int] = None
    artifact_id: Optional[str] = None
    reused: Optional[bool] = None
    error: Optional[str] = None
    warnings: list[str] = Field(default_factory=list)
    created: str
    started: Optional[str] = None
    finished: Optional[str] = None
    updated: Optional[str] = None


class Health(BaseModel):
    status: Literal["ok"]
    version: str
    models: list[str]
    runs_dir: str
    auth: bool


class ExtractCall(NamedTuple):
    """One /v1/extract request as the ingress hands it to a model replica (plain, cheap to pickle)."""

    texts: list[str]
    layers: Any
    pooling: str
    dtype: str


@dataclass
class ExtractOutcome:
    """What a model replica answers for one request: arrays, or the error to send back.

    arrays : layer -> ndarray of shape (rows, *feature), rows = texts (pooled) or tokens (pooling none)
    lengths : ndarray of shape (n_texts,), tokens of each text after truncation
    batch_requests, batch_texts : size of the model batch this request rode in; `first_in_batch`
        is True for exactly one request per batch (so batch sizes are counted once).
    """

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    lengths: Optional[np.ndarray] = None
    n_truncated: int = 0
    batch_requests: int = 1
    batch_texts: int = 0
    first_in_batch: bool = True
    error_status: Optional[int] = None
    error_code: Optional[str] = None
    error_message: Optional[str] = None

    @classmethod
    def failure(cls, status: int, code: str, message: str) -> "ExtractOutcome":
        return cls(error_status=status, error_code=code, error_message=message)

    def raise_for_error(self) -> None:
        if self.error_status is not None:
            raise ApiError(self.error_status, self.error_code or "error", self.error_message or "")
