"""`neuronmap analyze`: run a registered analysis over a stored run, or list the analyses.

Wired into the main command by `register(app)`. Thin: parses options, calls
`neuronmap.analysis.runner.analyze`, prints the key metrics and where the artifact is. Mistakes raise
`NeuronMapError`, which the main command prints as one red line (exit code 2).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import ConfigError

console = Console()
err_console = Console(stderr=True)


def parse_param(item: str) -> tuple[str, Any]:
    """``key=value`` -> (key, value): JSON values (10, 0.5, true, null, [1, 2]), comma lists, else text."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--param {item!r} must be key=value, e.g. --param n_components=10")
    raw = raw.strip()
    if raw.lower() in ("none", "null"):
        return key, None
    if "," in raw and not raw.startswith("["):
        return key, [_scalar(part.strip()) for part in raw.split(",") if part.strip()]
    return key, _scalar(raw)


def _scalar(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def parse_params(items: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items:
        key, value = parse_param(item)
        if key in params:
            raise ConfigError(f"--param {key} is given twice ({params[key]!r} and {value!r}); keep one")
        params[key] = value
    return params


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        shown = ", ".join(_format(v) for v in value[:5])
        return f"[{shown}{', ...' if len(value) > 5 else ''}]"
    if isinstance(value, dict):
        return f"{len(value)} entries"
    return str(value)


def _headline(spec_headline: tuple[str, ...], metrics: dict[str, Any]) -> list[str]:
    if spec_headline:
        return [key for key in spec_headline if key in metrics]
    return [key for key, value in metrics.items() if isinstance(value, (int, float, str, bool))][:8]


def show_list(as_json: bool) -> None:
    from .registry import list_analyses

    specs = list_analyses()
    if as_json:
        rows = [{"name": s.name, "family": s.family, "scope": s.scope, "summary": s.summary,
                 "needs_labels": s.needs_labels, "uses_labels": s.uses_labels, "params": s.describe_params()}
                for s in specs]
        sys.stdout.write(json.dumps(rows, indent=2, default=str) + "\n")
        return
    console.print(f"[bold]{len(specs)} analyses[/]: neuronmap analyze RUN NAME [--layers SPEC] [--param key=value ...] "
                  "[--labels COLUMN]", highlight=False)
    family = None
    for spec in specs:
        if spec.family != family:
            family = spec.family
            console.rule(f"[bold]{family}[/]")
        labels = ", needs --labels" if spec.needs_labels else (", uses --labels" if spec.uses_labels else "")
        console.print(f"[bold cyan]{spec.name}[/] [dim]({spec.scope}{labels})[/]  {escape(spec.summary)}", highlight=False)
        table = Table(show_header=False, box=None, padding=(0, 1, 0, 4))
        table.add_column("param", no_wrap=True)
        table.add_column("description", overflow="fold")
        for p in spec.describe_params():
            default = "None" if p["default"] is None else _format(p["default"])
            table.add_row(escape(f"{p['name']}={default}"), escape(p["description"]))
        console.print(table)


def show_artifact(artifact: Any, spec: Any, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps({**artifact.result, "path": str(artifact.path), "reused": artifact.reused,
                                     "warnings": artifact.warnings}, indent=2, default=str) + "\n")
        return
    result = artifact.result
    how = "reused" if artifact.reused else f"computed in {result.get('elapsed_s', 0):.2f} s ({result.get('engine')})"
    status = result["run"]["status"]
    colour = {"complete": "green", "running": "yellow", "failed": "red"}.get(status, "white")
    console.print(f"[bold]{spec.name}[/] on {result['run']['path']} [{colour}]{status}[/]: "
                  f"{len(result['units'])} {'unit' if len(result['units']) == 1 else 'units'}, {how}", highlight=False, soft_wrap=True)
    units = result["units"]
    keys: list[str] = []
    for doc in units.values():
        keys += [k for k in _headline(spec.headline, doc["metrics"]) if k not in keys]
    table = Table()
    table.add_column({"layer": "layer", "layer_pair": "layers", "run": ""}[spec.scope] or "unit")
    table.add_column("rows")
    for key in keys:
        table.add_column(key)
    for name, doc in units.items():
        rows = f"{doc['rows']}" if doc["rows"] == doc["rows_total"] else f"{doc['rows']} of {doc['rows_total']}"
        table.add_row(name, rows, *(_format(doc["metrics"].get(key)) for key in keys))
    console.print(table)
    for message in artifact.warnings:
        err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)
    console.print(f"artifact: [bold]{artifact.path}[/] ({', '.join(artifact_files(artifact.path))})", highlight=False,
                  soft_wrap=True)


def artifact_files(path: Path) -> list[str]:
    """The files an artifact folder holds, as written: result.json, params.json, arrays.npz (only when the
    analysis stored arrays), then its tables."""
    from .artifacts import ARRAYS_NAME, PARAMS_NAME, RESULT_NAME

    present = sorted(p.name for p in Path(path).iterdir() if p.is_file())
    first = [name for name in (RESULT_NAME, PARAMS_NAME, ARRAYS_NAME) if name in present]
    return first + [name for name in present if name not in first]


def analyze_command(
    run: Optional[Path] = typer.Argument(None, help="Run directory (written by `neuronmap extract`)."),
    analysis: Optional[str] = typer.Argument(None, help="Analysis name; see `neuronmap analyze --list`."),
    layers: Optional[str] = typer.Option(None, "--layers", "-l", help="Layers of the run: names, globs, ranges (default: all)."),
    param: List[str] = typer.Option([], "--param", "-p", help="Analysis parameter key=value (repeat for more)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="prompts column with a label per sample."),
    engine: str = typer.Option("local", "--engine", help="local | ray (one Ray task per layer, pair or shard)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    force: bool = typer.Option(False, "--force", help="Recompute even if the same artifact exists."),
    list_analyses: bool = typer.Option(False, "--list", help="List the analyses with their parameters and exit."),
    batch_size: int = typer.Option(4096, "--batch-size", help="Rows per streamed batch."),
) -> None:
    """Analyse a run (statistics, PCA, intrinsic dimension, t-SNE, clustering, ...); results go to RUN/analyses/<id>/."""
    if list_analyses:
        show_list(as_json)
        return
    if run is None or analysis is None:
        raise ConfigError("analyze needs RUN and ANALYSIS, e.g. `neuronmap analyze runs/gpt2 stats --layers 'blocks.*'`; "
                          "`neuronmap analyze --list` shows the analyses")
    if layers is not None and not layers.strip():
        raise ConfigError("--layers is empty: leave it out to analyse every layer, or name some, e.g. 'blocks.*'")
    from .registry import get_analysis
    from .runner import analyze

    spec = get_analysis(analysis)
    params = parse_params(param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # recorded in the artifact and printed below
        artifact = analyze(run, spec.name, layers=layers, params=params, labels=labels, engine=engine, force=force,
                           batch_size=batch_size)
    show_artifact(artifact, spec, as_json)


def register(app: typer.Typer) -> None:
    """Add `neuronmap analyze` to the main command."""
    app.command("analyze", no_args_is_help=True)(analyze_command)
