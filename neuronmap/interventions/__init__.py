"""Model-level interventions: methods that need the live model (hooks that change activations), not a stored run.

Every method follows one shape (Captum's, see STYLE.md): ``Method(loaded).attribute(inputs, baselines=...,
target=..., layers=...)`` with the same argument names across the family (steering, which generates text,
has ``generate`` instead):

- `ActivationPatching` (patching.py): clean states restored into a corrupted run, layer x position;
- `CausalTracing` (tracing.py): noised subject, clean states restored one at a time (Meng et al. 2022);
- `Ablation` (ablation.py): zero / mean / resample ablation of heads, MLPs, neurons, effect on loss or logit diff;
- `Steering` (steering.py): ``alpha * direction`` added at a layer while generating;
- `Counterfactual` (counterfactual.py): per-layer state change and next-token change of prompt pairs;
- `HeadStatistics` (heads.py): entropy, previous-token and induction scores, ablation importance per head;
- `AttributionPatching` (circuits.py): node and edge attribution patching -> a circuit graph.

Components (components.py) extend the canonical layer names with heads (``blocks.3.attn.heads.5``) and
neurons (``blocks.3.mlp[12]``).

Names below are imported lazily: the `neuronmap` command registers these methods' subcommands
without importing torch, so `neuronmap --help`, `runs show` or `analyze` start ~1 s sooner.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Ablation": "ablation", "AblationResult": "ablation",
    "AttributionPatching": "circuits", "CircuitResult": "circuits",
    "Component": "components", "resolve_components": "components",
    "Counterfactual": "counterfactual", "CounterfactualResult": "counterfactual",
    "HeadResult": "heads", "HeadStatistics": "heads", "repeated_tokens": "heads",
    "ActivationPatching": "patching", "PatchingResult": "patching", "patch_output": "patching",
    "Steering": "steering", "SteeringResult": "steering", "contrast_direction": "steering", "run_direction": "steering",
    "CausalTracing": "tracing", "TracingResult": "tracing",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
