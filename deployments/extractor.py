"""Extraction for the server: texts in, pooled activations out, through `neuronmap.extraction`.

`ExtractionService` holds one loaded model. `prepare(...)` validates a request against the model
(layer spec through the adapter, limits) and tokenises it; `run(jobs)` extracts a whole batch of
prepared requests in one go. The maths is `neuronmap.extraction`'s: the same tokenisation
(`tokenize_prompts`), the same length-sorted batches and the same capture + pooling hook
(`extract_shard` with a `BatchPooler`), so the numbers equal `neuronmap.extract` on the same texts.

Requests that ask for the same layers, pooling and dtype are merged into one "shard" of texts; each
request then gets its own rows back. Attention patterns are padded to the batch's longest text and
cut back to the request's own longest text (what `neuronmap.extract` on that request alone stores).

The model is used by one thread at a time (`_model_lock`): capture hooks are registered on the
model's modules, so two forwards at once would see each other's activations. The tokenizer has its
own lock (Hugging Face fast tokenizers are not safe to call from two threads).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from neuronmap.errors import ConfigError, NeuronMapError, UnknownLayerError
from neuronmap.extraction import (STORAGE_DTYPES, BatchPooler, ExtractionPlan, TokenizedPrompts, extract_shard,
                                  plan_extraction, tokenize_prompts)
from neuronmap.models.layerspec import split_spec
from neuronmap.pooling import check_pooling

from .schemas import ExtractCall, ExtractOutcome
from .settings import Limits

# A layer range may name at most this many indices (`blocks.0-99999999` is refused before expansion).
MAX_RANGE_ITEMS = 4096
# Default texts per forward pass of a merged batch. On CPU a wide batch of mixed lengths mostly buys
# padding (the tiny GPT-2 on 1 thread: 0.4 ms/text at 8, 1.8 ms/text at 32 for 32 shipped prompts).
CPU_FORWARD_BATCH = 8
GPU_FORWARD_BATCH = 32


@dataclass
class ExtractJob:
    """One validated, tokenised request (picklable; no tensors)."""

    key: tuple[str, str, str]  # (canonical layer names joined, pooling, dtype)
    layers: list[str]
    pooling: str
    dtype: str
    ids: list[list[int]]
    lengths: np.ndarray  # (n_texts,)
    n_truncated: int


def check_layer_spec(spec: str | Sequence[str], limit: int = MAX_RANGE_ITEMS) -> list[str]:
    """The spec's items; ConfigError when a range (or a product of ranges) would name over `limit` layers."""
    items = split_spec(spec)
    if not items:
        raise UnknownLayerError(f"empty layer spec {spec!r}: name layers such as blocks.* or blocks.0-3")
    for item in items:
        if item.startswith("module:"):
            continue
        count = 1
        for segment in item.split("."):
            low, sep, high = segment.partition("-")
            if sep and low.isdigit() and high.isdigit():
                count *= max(0, int(high) - int(low) + 1)
            if count > limit:
                raise ConfigError(f"layer spec {item!r} names more than {limit} layers; ask for a smaller range")
    return items


class ExtractionService:
    """One model, loaded once; `prepare` + `run` answer /v1/extract requests (see module docstring).

    Parameters
    ----------
    loaded : neuronmap LoadedModel
    limits : Limits
        Per-request bounds (layers, tokens per text, values per response).
    forward_batch_size : int, optional
        Texts per forward pass inside a merged batch (length-sorted, like `neuronmap.extract`). By
        default 8 on CPU, where a wide batch mostly pays for padding, and 32 on a GPU.
    """

    def __init__(self, loaded: Any, limits: Limits | None = None, forward_batch_size: int | None = None):
        self.loaded = loaded
        self.limits = limits or Limits()
        on_cpu = str(getattr(loaded, "device", "cpu")).startswith("cpu")
        self.forward_batch_size = forward_batch_size or (CPU_FORWARD_BATCH if on_cpu else GPU_FORWARD_BATCH)
        config = loaded.model.config
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.max_length = int(min(self.limits.max_tokens, positions)) if positions else self.limits.max_tokens
        self._plans: dict[tuple[str, str, str], ExtractionPlan] = {}
        self._model_lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()

    @classmethod
    def load(cls, model: str, device: str = "auto", model_dtype: str = "auto", limits: Limits | None = None,
             forward_batch_size: int | None = None) -> "ExtractionService":
        from neuronmap.models import load_model

        return cls(load_model(model, device=device, dtype=model_dtype), limits, forward_batch_size)

    @property
    def name(self) -> str:
        return str(self.loaded.name)

    # -- validation --------------------------------------------------------------------------------
    def prepare(self, texts: Sequence[str], layers: str | Sequence[str], pooling: str = "mean",
                dtype: str = "float32") -> ExtractJob:
        """Validate and tokenise one request; NeuronMapError (a 400) on anything the model cannot do."""
        check_pooling(pooling)
        if dtype not in STORAGE_DTYPES:
            raise ConfigError(f"dtype={dtype!r} is not supported; use one of {', '.join(STORAGE_DTYPES)}")
        if not texts:
            raise ConfigError("texts is empty; send at least one text")
        check_layer_spec(layers)
        try:
            refs = self.loaded.adapter.resolve(layers)
        except NeuronMapError:
            raise
        except Exception as error:  # a malformed glob ('[z-a]') or module path from the client
            raise UnknownLayerError(f"invalid layer spec {layers!r}: {error}") from None
        if len(refs) > self.limits.max_layers:
            raise ConfigError(f"layer spec {layers!r} selects {len(refs)} layers; at most {self.limits.max_layers} "
                              "per request: ask for fewer")
        with self._tokenizer_lock:
            tokens = tokenize_prompts(self.loaded.tokenizer, list(texts), self.max_length)
        names = [ref.name for ref in refs]
        job = ExtractJob(("\n".join(names), pooling, dtype), names, pooling, dtype, tokens.ids, tokens.lengths,
                         tokens.n_truncated)
        plan = self._plan(job.key, tokens)
        rows = int(tokens.lengths.sum()) if pooling == "none" else len(texts)
        values = rows * sum(int(np.prod(shape)) for shape in plan.shapes.values())
        if values > self.limits.max_output_values:
            raise ConfigError(f"the response would hold {values:,} values (limit {self.limits.max_output_values:,}); "
                              "ask for fewer texts or layers, or a pooling other than none")
        return job

    def _plan(self, key: tuple[str, str, str], tokens: TokenizedPrompts) -> ExtractionPlan:
        """Layer refs and stored shapes for `key`, measured once by a probe forward (cached).

        Plans with attention patterns are measured per call: their width follows the texts.
        """
        offsets = np.zeros(len(tokens.lengths) + 1, dtype=np.int64)
        np.cumsum(tokens.lengths, out=offsets[1:])
        cached = self._plans.get(key)
        if cached is not None:
            return ExtractionPlan(cached.refs, cached.shapes, cached.kinds, len(tokens.lengths), offsets)
        layers, pooling, dtype = key
        with self._model_lock:
            plan = plan_extraction(self.loaded, layers.split("\n"), pooling, STORAGE_DTYPES[dtype], tokens,
                                   samples_per_shard=max(1, len(tokens.lengths)))
        if "pattern" not in plan.kinds.values():
            self._plans[key] = plan
        return plan

    # -- extraction --------------------------------------------------------------------------------
    def run(self, jobs: Sequence[ExtractJob]) -> list[ExtractOutcome]:
        """Extract every job; jobs asking the same layers/pooling/dtype share forward passes.

        Returns one ExtractOutcome per job, in order (an unexpected failure of a group answers its
        jobs with a 500 outcome rather than failing the other groups of the batch).
        """
        outcomes: list[ExtractOutcome | None] = [None] * len(jobs)
        groups: dict[tuple[str, str, str], list[int]] = {}
        for position, job in enumerate(jobs):
            groups.setdefault(job.key, []).append(position)
        texts = sum(len(job.lengths) for job in jobs)
        for key, members in groups.items():
            try:
                parts = self._run_group(key, [jobs[i] for i in members])
            except NeuronMapError as error:
                parts = [ExtractOutcome.failure(400, "bad_request", str(error)) for _ in members]
            except Exception as error:  # noqa: BLE001 - reported to the client as a 500 JSON error
                message = f"{type(error).__name__}: {error}"
                parts = [ExtractOutcome.failure(500, "internal_error", message) for _ in members]
            for position, outcome in zip(members, parts):
                outcomes[position] = outcome
        for position, outcome in enumerate(outcomes):
            outcome.batch_requests, outcome.batch_texts = len(jobs), texts
            outcome.first_in_batch = position == 0
        return outcomes  # type: ignore[return-value]

    def _run_group(self, key: tuple[str, str, str], jobs: list[ExtractJob]) -> list[ExtractOutcome]:
        ids = [seq for job in jobs for seq in job.ids]
        lengths = np.concatenate([job.lengths for job in jobs])
        tokens = TokenizedPrompts(ids, lengths, sum(job.n_truncated for job in jobs), self.max_length)
        per_token = key[1] == "none"
        plan = self._plan(key, tokens)
        pooler = BatchPooler(key[1], STORAGE_DTYPES[key[2]], pattern_width=int(lengths.max()))
        with self._model_lock:
            arrays = extract_shard(self.loaded, plan, tokens, range(0, len(ids)), pooler, self.forward_batch_size)
        outcomes, text = [], 0
        for job in jobs:
            n = len(job.lengths)
            rows = (int(plan.row_offsets[text]), int(plan.row_offsets[text + n])) if per_token else (text, text + n)
            width = int(job.lengths.max())
            mine = {}
            for name, array in arrays.items():
                part = array[rows[0]:rows[1]]
                if plan.kinds[name] == "pattern":
                    part = part[..., :width]
                mine[name] = np.ascontiguousarray(part)
            outcomes.append(ExtractOutcome(arrays=mine, lengths=job.lengths.copy(), n_truncated=job.n_truncated))
            text += n
        return outcomes

    def answer(self, calls: Sequence[ExtractCall]) -> list[ExtractOutcome]:
        """prepare + run for a batch of requests, on the caller's thread, in one go.

        A model replica gets a whole batch in one call (the ingress merges concurrent requests), so
        validation and tokenisation of every request share that one thread hop rather than paying one
        each. A request the model cannot serve gets its 400 outcome; the others are extracted together.
        """
        outcomes: list[ExtractOutcome | None] = [None] * len(calls)
        jobs, positions = [], []
        for position, call in enumerate(calls):
            try:
                jobs.append(self.prepare(call.texts, call.layers, call.pooling, call.dtype))
                positions.append(position)
            except NeuronMapError as error:
                outcomes[position] = ExtractOutcome.failure(400, "bad_request", " ".join(str(error).split()))
        for position, outcome in zip(positions, self.run(jobs) if jobs else []):
            outcomes[position] = outcome
        return outcomes  # type: ignore[return-value]

    def extract(self, texts: Sequence[str], layers: str | Sequence[str] = "blocks.*", pooling: str = "mean",
                dtype: str = "float32") -> ExtractOutcome:
        """prepare + run for a single request (errors come back as a failed outcome, never raised)."""
        return self.answer([ExtractCall(list(texts), layers, pooling, dtype)])[0]
