"""`neuronmap patch`: activation patching of one clean / corrupted prompt pair from the command line.

A thin layer: load the model with its head, call ``ActivationPatching(loaded).attribute``, write
``result.json`` (the summary) and the layer x position matrices ``logit_diff.npy`` and ``restored.npy``
into ``--out``. ``register(app)`` adds the command to the `neuronmap` app (neuronmap/cli.py calls it).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import typer
from rich.console import Console

console = Console()


def register(app: typer.Typer) -> None:
    """Add the ``patch`` command to ``app``."""
    app.command("patch")(patch)


def _clean_json(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean_json(v) for v in value]
    return value


def patch(
    model: str = typer.Option(..., "--model", "-m",
                              help="Registry name, local folder or hub id (loaded with its LM head)."),
    clean: str = typer.Option(..., "--clean", help="Clean prompt (the one whose answer is --answer)."),
    corrupted: str = typer.Option(..., "--corrupted", help="Corrupted prompt, same token length as --clean."),
    answer: str = typer.Option(..., "--answer", help="Token the clean prompt predicts, e.g. ' Mary' (one token)."),
    wrong: str = typer.Option(..., "--wrong", help="Token the corrupted prompt favours (one token)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for result.json, logit_diff.npy, restored.npy."),
    layers: str = typer.Option("blocks.*", "--layers", "-l", help="Residual-stream layers: blocks.*, blocks.0-3, ..."),
    positions: str = typer.Option("each", "--positions", help="each: one column per position; all: all at once."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Patched forwards run together."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    overwrite: bool = typer.Option(False, help="Replace an existing result in --out."),
    as_json: bool = typer.Option(False, "--json", help="Print result.json instead of a summary."),
) -> None:
    """Activation patching: restore clean residual states into the corrupted run, layer by position."""
    import numpy as np

    from ..errors import ConfigError
    from ..models.loading import load_model
    from .patching import ActivationPatching

    out = Path(out)
    if (out / "result.json").exists() and not overwrite:
        raise ConfigError(f"{out} already holds a patching result; pass --overwrite or choose another --out")
    loaded = load_model(model, device=device, head=True)
    result = ActivationPatching(loaded, batch_size=batch_size).attribute(
        clean, baselines=corrupted, target=(answer, wrong), layers=layers, positions=positions)
    summary = {"method": "activation-patching", "model": loaded.name, "clean": clean, "corrupted": corrupted,
               "positions": positions, **result.summary(),
               "files": {"logit_diff": "logit_diff.npy", "restored": "restored.npy"}}
    summary = _clean_json(summary)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "logit_diff.npy", result.logit_diff)
    np.save(out / "restored.npy", result.restored)
    (out / "result.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return
    best = summary["max_effect"]
    console.print(f"clean logit diff {result.clean_diff:.4f}, corrupted {result.corrupted_diff:.4f}; "
                  f"{len(result.layers)} layers x {result.logit_diff.shape[1]} positions")
    console.print(f"largest effect: {best['layer']} position {best['position']} -> logit diff {best['logit_diff']:.4f}")
    console.print(f"written: {out}/result.json, logit_diff.npy, restored.npy", highlight=False)
