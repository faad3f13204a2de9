"""Prompt and question generation: labelled template families, a local transformers generator and
an Ollama client.

``generate_prompts(family, count, seed)`` samples one of the template families (``list_families()``);
``generate_local(model, count, seed)`` samples a local causal LM; ``generate_ollama(model, count,
seed, url=...)`` asks an Ollama server. Each returns a pandas DataFrame with a ``text`` column and
label columns that ``neuronmap.prompts.load_prompts`` (and ``neuronmap extract``) accepts as is;
``save_prompts(df, path)`` writes it as CSV, JSONL or Parquet. The CLI is ``neuronmap generate``.

Names are imported lazily, so importing this package does not import torch or transformers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FAMILIES": "families", "FamilyInfo": "families", "available": "families", "generate_prompts": "families",
    "list_families": "families",
    "generate_local": "local", "default_local_prompts": "local",
    "DEFAULT_URL": "ollama", "OllamaClient": "ollama", "OllamaError": "ollama", "OllamaModelNotFoundError": "ollama",
    "OllamaTimeoutError": "ollama", "OllamaUnavailableError": "ollama", "generate_ollama": "ollama",
    "default_ollama_prompts": "ollama",
    "save_prompts": "output", "OUTPUT_EXTENSIONS": "output",
    "clean_line": "filters", "dedupe": "filters", "normalize_text": "filters", "word_count": "filters",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"neuronmap.questions.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'neuronmap.questions' has no attribute {name!r}")
