"""Experiments: one YAML file from prompts to a report (`neuronmap run EXPERIMENT.yaml`).

``load_experiment(path, profile=None)`` reads and validates the file (errors name the line and key);
``run_experiment(experiment, engine=None, resume=True, dry_run=False)`` runs generate -> extract ->
analyses -> report, skipping every step whose output is already complete.

Names are imported lazily, so importing this package does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Experiment": "config", "ExperimentConfig": "config", "load_experiment": "config", "PROFILE_ENV": "config",
    "ExperimentResult": "pipeline", "StepResult": "pipeline", "run_experiment": "pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"neuronmap.experiments.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'neuronmap.experiments' has no attribute {name!r}")
