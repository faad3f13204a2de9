"""`neuronmap attribute`: which input tokens drive a target, by one or several methods.

Loads the model with its head, runs `TokenAttribution.attribute` for each method and writes one
artifact (result.json, arrays.npz with one score vector per method, figure.html) into ``--out`` or
into a run's ``analyses/`` (``--run``), where the dashboard's gallery finds it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def register(app: typer.Typer) -> None:
    """Add the ``attribute`` command to ``app``."""
    app.command("attribute")(attribute)


def attribute(
    model: str = typer.Option(..., "--model", "-m", help="Registry name, local folder or hub id (loaded with its head)."),
    text: str = typer.Option(..., "--text", "-t", help="The prompt to explain."),
    target: str = typer.Option("next-token", "--target",
                               help="next-token | token:' Paris' | logit-diff:' Mary',' John' | class:K | "
                                    "neuron:LAYER:I"),
    method: str = typer.Option("ig", "--method",
                               help="Comma-separated, or 'all': saliency, grad-x-input, ig, layer-ig, gradcam, "
                                    "shapley, kernelshap, lime, rollout."),
    layer: Optional[str] = typer.Option(None, "--layer",
                                        help="Layer of layer-ig and gradcam; for a neuron: target it must run before "
                                             "the target (default: middle block, or the last block before the "
                                             "neuron)."),
    position: int = typer.Option(-1, "--position", help="Token position the target reads (-1: last)."),
    baseline: str = typer.Option("pad", "--baseline", help="pad (special tokens kept) | zero."),
    steps: int = typer.Option(64, "--steps", help="Integration steps of ig and layer-ig."),
    samples: int = typer.Option(64, "--samples", help="Permutations (shapley) or samples (kernelshap, lime)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampling methods."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the artifact."),
    run: Optional[Path] = typer.Option(None, "--run", help="Store the artifact in this run's analyses/ instead."),
    overwrite: bool = typer.Option(False, help="Replace an existing result."),
    as_json: bool = typer.Option(False, "--json", help="Print result.json instead of a table."),
) -> None:
    """Attribute a target (a next-token logit, a logit difference, a neuron) to the prompt's tokens."""
    from ..errors import ConfigError
    from ..interventions.artifacts import artifact_folder, write_intervention
    from ..models.loading import load_model
    from .methods import LAYER_METHODS, METHODS, TokenAttribution

    methods = list(METHODS) if method.strip() == "all" else [m.strip() for m in method.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise ConfigError(f"--method {method!r}: unknown {', '.join(unknown) or 'nothing given'}; "
                          f"use a comma-separated list of {', '.join(METHODS)} or all")
    if layer is not None and not any(name in LAYER_METHODS for name in methods):
        raise ConfigError(f"--layer applies to {', '.join(LAYER_METHODS)} only; --method {method} uses none: add one "
                          "of them or leave --layer out")
    params = {"model": model, "text": text, "target": target, "methods": methods, "layer": layer,
              "position": position, "baseline": baseline, "steps": steps, "samples": samples, "seed": seed}
    folder = artifact_folder(out, run, "attribution", params, overwrite)
    started = time.time()
    from ..cli import _quiet_libraries

    _quiet_libraries()
    loaded = load_model(model, device=device, head=True)
    explainer = TokenAttribution(loaded, baseline=baseline, position=position)
    if any(name in LAYER_METHODS for name in methods):  # refuse a --layer after a neuron target before any work
        explainer.attribution_layer(target, layer)
    results = {}
    with console.status("attributing") as status:
        for name in methods:
            status.update(f"attributing with {name}")
            results[name] = explainer.attribute(text, target=target, method=name,
                                                layer=layer if name in LAYER_METHODS else None,
                                                n_steps=steps, n_samples=samples, seed=seed)
    first = next(iter(results.values()))
    from ..viz.attribution import token_attribution_figure

    figure = token_attribution_figure(first.tokens, {n: r.scores for n, r in results.items()},
                                      title=f"{loaded.name}: {first.target_description} at position "
                                            f"{first.params['position']}")
    methods_summary = {n: r.summary() for n, r in results.items()}
    used = list(dict.fromkeys(m["layer"] for m in methods_summary.values() if m.get("layer")))  # layer-ig, gradcam
    summary = {"model": loaded.name, "text": text, "target": target, "target_description": first.target_description,
               "target_value": first.target_value, "tokens": first.tokens, "layers": used,
               "methods": methods_summary}
    if "ig" in results:
        summary["ig_delta"] = results["ig"].delta
    artifact = write_intervention(folder, "attribution", params, summary, {n: r.scores for n, r in results.items()},
                                  figure=figure, metrics=["target_value", "ig_delta"], run=run, started=started)
    if as_json:
        sys.stdout.write(json.dumps(artifact.result, indent=2, default=str) + "\n")
        return
    table = Table(title=f"{first.target_description} = {first.target_value:.4f}")
    table.add_column("token")
    for name in results:
        table.add_column(name, justify="right")
    for i, token in enumerate(first.tokens):
        table.add_row(f"{i} {token!r}", *[f"{results[n].scores[i]:.4g}" for n in results])
    console.print(table)
    if "ig" in results:
        console.print(f"integrated gradients: completeness gap {results['ig'].delta:.2e} "
                      f"(sum of scores minus target(input) - target(baseline))")
    if "layer-ig" in results:
        layer_ig = results["layer-ig"]
        console.print(f"layer integrated gradients ({layer_ig.layer}): completeness gap {layer_ig.delta:.2e} (sum of "
                      "scores minus the target's change when that layer's output alone goes from its baseline "
                      "value to its value on the prompt)")
    console.print(f"written: {folder}", highlight=False)
