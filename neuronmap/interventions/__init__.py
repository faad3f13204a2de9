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
"""

from .ablation import Ablation, AblationResult
from .circuits import AttributionPatching, CircuitResult
from .components import Component, resolve_components
from .counterfactual import Counterfactual, CounterfactualResult
from .heads import HeadResult, HeadStatistics, repeated_tokens
from .patching import ActivationPatching, PatchingResult, patch_output
from .steering import Steering, SteeringResult, contrast_direction, run_direction
from .tracing import CausalTracing, TracingResult

__all__ = [
    "Ablation", "AblationResult", "ActivationPatching", "AttributionPatching", "CausalTracing", "CircuitResult",
    "Component", "Counterfactual", "CounterfactualResult", "HeadResult", "HeadStatistics", "PatchingResult",
    "Steering", "SteeringResult", "TracingResult", "contrast_direction", "patch_output", "repeated_tokens",
    "resolve_components", "run_direction",
]
