"""Concepts and activation maximisation: CAVs, TCAV scores, top activating inputs, soft prompts.

Stored-run halves are analyses (`neuronmap analyze RUN cav|top-activations`, registered in
`neuronmap.analysis.builtin.concepts`); live-model halves are commands (`neuronmap tcav|maximize`).

>>> from neuronmap.concepts import TCAV, examples_from_run                   # doctest: +SKIP
>>> examples = examples_from_run("runs/gpt2", ["blocks.6"], labels="topic", concept="sports")  # doctest: +SKIP
>>> result = TCAV(loaded).attribute(prompts, examples, target="token: ball")  # doctest: +SKIP
>>> result.tcav, result.p_values, result.significant                         # doctest: +SKIP

The names below are imported lazily: `cav` and `topk` need numpy and scikit-learn only, so the
analysis registry can use them without importing torch.
"""

from __future__ import annotations

from typing import Any

_NAMES = {
    "CAV": "cav", "CAVRuns": "cav", "cav_runs": "cav", "cosine_matrix": "cav", "fit_cav": "cav",
    "split_by_label": "cav", "TopActivations": "topk", "top_activations": "topk", "parse_neurons": "topk",
    "TCAV": "tcav", "TCAVResult": "tcav", "ConceptExamples": "tcav", "significance": "tcav", "tcav_score": "tcav",
    "examples_from_run": "examples", "examples_from_prompts": "examples",
    "ActivationMaximisation": "maximisation", "MaximisationResult": "maximisation",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
