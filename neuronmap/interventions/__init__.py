"""Model-level interventions: methods that need the live model (hooks that change activations), not a stored run.

Every method follows one shape (Captum's, see STYLE.md): ``Method(loaded).attribute(inputs, baselines=...,
target=..., layers=...)`` with the same argument names across the family.
"""

from .patching import ActivationPatching, PatchingResult, patch_output

__all__ = ["ActivationPatching", "PatchingResult", "patch_output"]
