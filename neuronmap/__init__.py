"""NeuronMap: extract, store and analyse the activations of transformer models.

The three calls most users need:

>>> import neuronmap                                                       # doctest: +SKIP
>>> run = neuronmap.extract("gpt2", "prompts.txt", layers="blocks.*", out="runs/gpt2")  # doctest: +SKIP
>>> neuronmap.open_run("runs/gpt2").array("blocks.5").shape               # doctest: +SKIP
(300, 768)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "extract", "open_run", "load_model"]


def __getattr__(name: str) -> Any:
    # Lazy imports keep `import neuronmap` (and the CLI's --help) fast: torch loads only when used.
    if name == "extract":
        from .extraction import extract

        return extract
    if name == "open_run":
        from .store import open_run

        return open_run
    if name == "load_model":
        from .models import load_model

        return load_model
    raise AttributeError(f"module 'neuronmap' has no attribute {name!r}")
