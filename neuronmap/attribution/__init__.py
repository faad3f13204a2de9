"""Attribution of a model's output to its input tokens (saliency, integrated gradients, Shapley, ...).

>>> from neuronmap.attribution import TokenAttribution                       # doctest: +SKIP
>>> result = TokenAttribution(loaded).attribute("The capital of France is", target="token: Paris",
...                                             method="ig")                # doctest: +SKIP
>>> result.tokens, result.scores, result.delta                              # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

# imported on first use, so that registering the `attribute` command does not import torch
_EXPORTS = {"METHODS": "methods", "AttributionResult": "methods", "TokenAttribution": "methods",
            "attention_rollout": "methods", "Target": "targets", "parse_target": "targets"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
