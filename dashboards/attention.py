"""Attention patterns of one prompt for the head viewer: stored in the run, or computed live from its model.

Stored: a run extracted with ``--layers 'blocks.*.attn.pattern' --pooling none`` holds, per token row,
that query token's weights ``(heads, max_len)`` with the key axis zero-padded to the run's longest
prompt (`neuronmap.extraction.BatchPooler`). The rows of one prompt are one shard slice; stacked in
token order and cut to the prompt's length they give its ``(heads, q, k)`` pattern.

Live: any other run (pooled patterns, or none stored) gets its patterns from the run's model, loaded
once per process (`load_model`, offline: a local folder, a packaged model or the Hugging Face cache),
with one forward of the prompt, tokenised exactly as the extraction did (`tokenize_prompts` with the
run's ``max_length``). Token strings come from the run's tokenizer in both cases.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neuronmap.errors import ConfigError, RunFormatError
from neuronmap.store import Run

from .data import LRU

_models = LRU(1)
_tokenizers = LRU(4)
_live = LRU(16)
_forward_lock = threading.Lock()  # hooks and the eager-attention switch live on the shared model


@dataclass
class Patterns:
    """One prompt's attention: `pattern` (heads, q, k) of `layer`, the `tokens` on its axes, and a note."""

    layer: str
    pattern: np.ndarray
    tokens: list[str]
    source: str
    note: str = ""


def stored_layers(run: Run) -> list[str]:
    """The run's attention-pattern layers stored per token (the viewer reads these without a model)."""
    return [name for name in run.layers
            if run.layer_info(name).kind == "pattern" and run.layer_info(name).per_token]


def position_of(run: Run, sample_id: int) -> int:
    """Position in prompts.parquet of `sample_id` (RunFormatError when the run has no such prompt)."""
    ids = run.prompts["sample_id"].to_numpy()
    hits = np.flatnonzero(ids == int(sample_id))
    if not len(hits):
        raise RunFormatError(f"run {run.path.name} has no prompt with sample_id {sample_id}")
    return int(hits[0])


def stored_pattern(run: Run, layer: str, sample_id: int) -> np.ndarray:
    """The stored (heads, q, k) pattern of prompt `sample_id` in per-token pattern layer `layer`."""
    info = run.layer_info(layer)
    if info.kind != "pattern" or not info.per_token:
        raise ConfigError(f"layer {layer} is not an attention pattern stored per token (pooling none)")
    position = position_of(run, sample_id)
    shard = next((s for s in run.shards(layer) if s.samples[0] <= position < s.samples[1]), None)
    if shard is None:
        raise RunFormatError(f"prompt {sample_id} is in no committed shard of {layer} yet")
    ids = run.sample_ids(layer, rows=shard.rows)
    hits = np.flatnonzero(ids == int(sample_id))
    if not len(hits):
        raise RunFormatError(f"shard {shard.path} holds no row of prompt {sample_id}")
    span = (shard.rows[0] + int(hits[0]), shard.rows[0] + int(hits[-1]) + 1)
    rows = run.array(layer, rows=span)[np.argsort(run.token_index(layer, rows=span), kind="stable")]
    length = len(rows)
    return np.ascontiguousarray(rows[:, :, :length].transpose(1, 0, 2))


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 240 else text[:239] + "…"


def tokenizer_for(run: Run):
    """The run's tokenizer (cached per process); ConfigError with the reason when it cannot be loaded."""
    name = run.manifest.tokenizer or run.manifest.model

    def load():
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(name)
        except Exception as error:  # transformers raises OSError, ValueError, ... for a missing tokenizer
            raise ConfigError(f"tokenizer {name!r} cannot be loaded offline: {_reason(error)}") from None

    return _tokenizers.get(name, load)


def token_strings(run: Run, text: str, tokenizer: Any = None) -> list[str]:
    """The prompt's tokens as the extraction saw them (same truncation), as strings."""
    from neuronmap.extraction import tokenize_prompts

    tokenizer = tokenizer or tokenizer_for(run)
    ids = tokenize_prompts(tokenizer, [text], int(run.manifest.max_length or 512)).ids[0]
    return readable(tokenizer, ids)


def readable(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token id decoded on its own (" call", not the byte-level "Ġcall"), special tokens kept."""
    return [tokenizer.decode([int(i)]) for i in ids]


def model_source(run: Run) -> str:
    """Where the run's model is loaded from: the folder it was extracted from when it still exists."""
    source = (run.manifest.extra or {}).get("source")
    if source and (Path(str(source)) / "config.json").is_file():
        return str(source)
    return run.manifest.model


def live_model(run: Run):
    """The run's model, loaded once per process (one model kept); ConfigError when it cannot be loaded."""
    source = model_source(run)

    def load():
        from neuronmap import load_model

        try:
            return load_model(source)
        except Exception as error:  # offline hub id, deleted folder, broken checkpoint
            raise ConfigError(
                f"cannot load model {run.manifest.model!r} from {source!r} to compute attention live: "
                f"{_reason(error)}. The dashboard loads models offline (a local folder or the Hugging Face "
                "cache); or extract with --layers 'blocks.*.attn.pattern' --pooling none to store patterns"
            ) from None

    return _models.get(source, load)


def live_layers(run: Run) -> list[str]:
    """Attention-pattern layer names of the run's model (loads it)."""
    return [ref.name for ref in live_model(run).adapter.resolve("**.pattern")]


def live_patterns(run: Run, text: str) -> tuple[list[str], dict[str, np.ndarray]]:
    """(tokens, {layer: (heads, q, k)}) of one forward of `text` through the run's model, cached."""

    def compute():
        import torch

        from neuronmap.capture import Capture
        from neuronmap.extraction import pad_batch, tokenize_prompts

        loaded = live_model(run)
        ids = tokenize_prompts(loaded.tokenizer, [text], int(run.manifest.max_length or 512)).ids[0]
        adapter = loaded.adapter
        refs = adapter.resolve("**.pattern")
        input_ids, mask = pad_batch([ids], loaded.tokenizer.pad_token_id, torch.device(loaded.device))
        with _forward_lock, torch.inference_mode(), Capture(refs) as cap:
            cap.run(adapter.forward, input_ids, mask, refs)
        patterns = {ref.name: cap.outputs[ref.name][0].float().cpu().numpy() for ref in refs}
        return readable(loaded.tokenizer, ids), patterns

    return _live.get((str(run.path), model_source(run), text), compute)


def patterns_for(run: Run, layer: str, sample_id: int) -> Patterns:
    """Prompt `sample_id`'s attention in `layer`: stored when the run holds it per token, else live."""
    text = str(run.prompts["text"].iloc[position_of(run, sample_id)])
    if layer in stored_layers(run):
        pattern = stored_pattern(run, layer, sample_id)
        try:
            tokens, note = token_strings(run, text), ""
        except ConfigError as error:
            tokens, note = [], f"token strings unavailable ({error}); axes show positions"
        if tokens and len(tokens) != pattern.shape[1]:
            tokens, note = [], (f"the tokenizer gives {len(tokens)} tokens but the run stored {pattern.shape[1]}; "
                                "axes show positions")
        return Patterns(layer, pattern, tokens, "stored in the run", note)
    tokens, patterns = live_patterns(run, text)
    if layer not in patterns:
        raise ConfigError(f"layer {layer!r} is not an attention pattern of {run.manifest.model}; "
                          f"pick one of {', '.join(patterns)}")
    loaded = live_model(run)
    note = "" if loaded.config_hash == run.manifest.config_hash else (
        f"the model at {model_source(run)} differs from the one the run was extracted with (config hash)")
    return Patterns(layer, patterns[layer], tokens, f"computed live from {run.manifest.model}", note)
