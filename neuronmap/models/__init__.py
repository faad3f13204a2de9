"""Models: the registry of preconfigured models, loading, tiny test models and the layer adapter.

Names are imported lazily, so ``neuronmap.models.registry`` (used by ``neuronmap models list``) does
not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LayerRef": "adapter", "LayerShape": "adapter", "ModelAdapter": "adapter",
    "LoadedModel": "loading", "load_model": "loading",
    "ModelEntry": "registry", "get_entry": "registry", "list_models": "registry", "suggest": "registry",
    "make_tiny": "tiny", "TINY_FAMILIES": "tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"neuronmap.models.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'neuronmap.models' has no attribute {name!r}")
