"""Analyses of stored runs: one module per family of pure functions, a registry, artifacts, a runner.

>>> from neuronmap.analysis import analyze, list_analyses                  # doctest: +SKIP
>>> artifact = analyze("runs/gpt2", "pca", layers="blocks.*", params={"n_components": 10})  # doctest: +SKIP
>>> artifact.metrics("blocks.5")["effective_dim_95"]                       # doctest: +SKIP

Families (pure functions on numpy arrays, plus streaming variants): `statistics`, `dimensionality`,
`clustering`, `similarity` (cosine, Pearson; CKA in `cka` and `cka_matrix`, RSA in `rsa`), `evolution`,
`information`. The registry (`registry.py`) names what `neuronmap analyze` can run; registered
adapters live in `builtin/`; `artifacts.py` stores results under ``RUN/analyses/<id>/``; `runner.py`
ties them together, in-process or on Ray. Names below are imported lazily, so importing a family
module does not pay for the others.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "analyze": "runner", "get_engine": "runner", "LocalEngine": "runner", "select_layers": "runner",
    "register": "registry", "get_analysis": "registry", "list_analyses": "registry", "AnalysisResult": "registry",
    "AnalysisSpec": "registry", "Params": "registry",
    "Artifact": "artifacts", "load_artifact": "artifacts", "list_artifacts": "artifacts", "pair_matrix": "artifacts",
    "LayerInput": "inputs", "PairInput": "inputs", "RunInput": "inputs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
