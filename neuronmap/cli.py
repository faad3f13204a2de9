"""The `neuronmap` command: a thin typer layer over the library.

Every subcommand parses its options, calls one library function and prints the result (a rich
table, or JSON with `--json`). User mistakes raise `NeuronMapError`; `main` prints them as one red
line and exits with code 2, as they do running out of memory (a request too large for the machine).
Anything else is an internal error: one line, exit code 1, and the traceback only with NEURONMAP_DEBUG=1.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import ConfigError, NeuronMapError

app = typer.Typer(help="Extract, store and analyse activations of transformer models.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
models_app = typer.Typer(help="Preconfigured models, their layers, tiny test models.", no_args_is_help=True)
runs_app = typer.Typer(help="Inspect, verify and export stored runs.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(runs_app, name="runs")
from .analysis.cli import register as register_analyze; register_analyze(app)  # noqa: E402,E702
from .questions.cli import register as register_generate; register_generate(app)  # noqa: E402,E702
from .interventions.cli import register as register_patch; register_patch(app)  # noqa: E402,E702
from .experiments.cli import register as register_run; register_run(app)  # noqa: E402,E702
from .attribution.cli import register as register_attribute; register_attribute(app)  # noqa: E402,E702
from .concepts.cli import register as register_concepts; register_concepts(app)  # noqa: E402,E702

console = Console()
err_console = Console(stderr=True)


def _show_version(value: bool) -> None:
    if value:
        from . import __version__

        console.print(f"neuronmap {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                          help="Print the version and exit.")) -> None:
    """Extract, store and analyse activations of transformer models."""


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _quiet_libraries() -> None:
    """Hide transformers' info/warning chatter that is not about the user's command."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers always importable in practice
        pass


# ---------------------------------------------------------------------------------------------
# extract
# ---------------------------------------------------------------------------------------------
@app.command()
def extract(
    model: str = typer.Option(..., "--model", "-m", help="Registry name, local folder or hub id."),
    prompts: Path = typer.Option(..., "--prompts", "-p", help="Prompt file: .txt, .jsonl, .csv or .parquet."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to create (or resume), or "
                             "s3://BUCKET/PREFIX (Parquet runs; endpoint from NEURONMAP_S3_ENDPOINT)."),
    layers: str = typer.Option("blocks.*", "--layers", "-l", help="Layer spec: names, globs, ranges, module:<path>."),
    pooling: str = typer.Option("mean", help="mean | last | first | max | none (per token)."),
    format: str = typer.Option("hdf5", "--format", "-f", help="hdf5 | parquet."),
    dtype: str = typer.Option("float32", help="Storage dtype: float32 | float16."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Prompts per forward pass."),
    max_length: int = typer.Option(512, help="Tokens per prompt; longer prompts are truncated (counted)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    model_dtype: str = typer.Option("auto", help="Compute dtype: auto | float32 | float16 | bfloat16."),
    compression: Optional[str] = typer.Option(None, help="HDF5: gzip | lzf; Parquet: zstd | snappy | gzip | lz4 | brotli."),
    text_column: Optional[str] = typer.Option(None, help="Column holding the prompt text (csv/jsonl/parquet)."),
    samples_per_shard: Optional[int] = typer.Option(None, help="Samples per shard (default: ~128 MB of activations per shard; 512 MB for --pooling none on a GPU)."),
    overwrite: bool = typer.Option(False, help="Replace an existing complete run at --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the run summary as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    engine: str = typer.Option("local", help="local (this process) | ray (Ray Data actor pool)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster: auto | HOST:PORT | ray://HOST:PORT "
                                          "(default: an embedded local cluster). --engine ray only."),
    workers: Optional[int] = typer.Option(None, help="Ray extraction workers (default: autoscale to what fits)."),
    cpus_per_worker: Optional[float] = typer.Option(None, help="CPUs reserved per Ray worker (default 1)."),
    gpus_per_worker: Optional[float] = typer.Option(None, help="GPUs reserved per Ray worker (default 0)."),
    stages: Optional[int] = typer.Option(None, help="Pipeline parallelism: cut the model into K block ranges, one "
                                         "Ray actor each (--engine ray; instead of a worker pool)."),
    cpus_per_stage: Optional[float] = typer.Option(None, help="CPUs reserved per pipeline stage (default 1)."),
    gpus_per_stage: Optional[float] = typer.Option(None, help="GPUs reserved per pipeline stage (default 0)."),
) -> None:
    """Extract activations for every prompt into a run directory (resumes an interrupted run)."""
    from .extraction import extract as run_extract

    _quiet_libraries()
    run = run_extract(model, prompts, layers=layers, out=out, pooling=pooling, format=format, dtype=dtype,
                      batch_size=batch_size, max_length=max_length, device=device, model_dtype=model_dtype,
                      compression=compression, overwrite=overwrite, text_column=text_column,
                      samples_per_shard=samples_per_shard, progress=not (quiet or as_json), engine=engine,
                      address=address, workers=workers, cpus_per_worker=cpus_per_worker,
                      gpus_per_worker=gpus_per_worker, stages=stages, cpus_per_stage=cpus_per_stage,
                      gpus_per_stage=gpus_per_stage)
    _show_run(run, as_json)


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
@models_app.command("list")
def models_list(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """List the preconfigured models of the registry."""
    from .models.registry import list_models

    entries = list_models()
    if as_json:
        _print_json([entry.model_dump() for entry in entries])
        return
    table = Table(title=f"{len(entries)} preconfigured models")
    for column in ("name", "hub id", "family", "kind", "params", "notes"):
        table.add_column(column)
    for entry in entries:
        table.add_row(entry.name, entry.hub_id, entry.family, entry.kind, str(entry.params or ""), entry.notes or "")
    console.print(table)


@models_app.command("layers")
def models_layers(
    model: str = typer.Argument(..., help="Registry name, local folder or hub id."),
    device: str = typer.Option("cpu", help="Device for the shape probe."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
    modules: bool = typer.Option(False, "--modules", help="List every raw module as module:<dotted.path> instead."),
) -> None:
    """List a model's canonical layer names with their shapes (or, with --modules, its raw module paths)."""
    from .models import load_model

    _quiet_libraries()
    loaded = load_model(model, device=device)
    if modules:  # what `module:<path>` accepts: model.named_modules() of the loaded model
        named = [(f"module:{name}", type(module).__name__) for name, module in loaded.model.named_modules() if name]
        if as_json:
            _print_json([{"name": name, "type": kind} for name, kind in named])
            return
        table = Table(title=f"{loaded.name}: {len(named)} modules ({loaded.family})")
        for column in ("layer spec", "type"):
            table.add_column(column)
        for name, kind in named:
            table.add_row(name, kind)
        console.print(table)
        return
    rows = loaded.adapter.describe(loaded.tokenizer)
    if as_json:
        _print_json([{"name": r.name, "kind": r.kind, "module": r.module_path, "shape": list(r.shape)} for r in rows])
        return
    table = Table(title=f"{loaded.name}: {len(rows)} layers ({loaded.family})")
    for column in ("layer", "kind", "module", "shape per token"):
        table.add_column(column)
    for row in rows:
        table.add_row(row.name, row.kind, row.module_path, str(tuple(row.shape)))
    console.print(table)
    console.print("Select with names, globs (blocks.*.mlp), ranges (blocks.0-3) or module:<dotted.path>.")


@models_app.command("make-tiny")
def models_make_tiny(
    family: str = typer.Argument(..., help="gpt2 | gpt_neox | llama | mistral | qwen2 | opt | bert | roberta | distilbert | t5"),
    out: Path = typer.Argument(..., help="Folder to write the model and tokenizer to."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
) -> None:
    """Write a small random-weight model with a working tokenizer (for tests and demos)."""
    from .models.tiny import make_tiny

    _quiet_libraries()
    path = make_tiny(family, out, seed=seed)
    console.print(f"tiny {family} model written to [bold]{path}[/] (load it with --model {path})")


# ---------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------
def _run_summary(run: Any) -> dict[str, Any]:
    manifest = run.manifest
    total_bytes = sum(shard.bytes or 0 for shard in manifest.shards)
    return {
        "path": str(getattr(run, "url", run.path)),  # a run on object storage shows its s3:// URL
        "status": manifest.status, "error": getattr(manifest, "error", None),
        "model": manifest.model, "format": manifest.format, "pooling": manifest.pooling, "dtype": manifest.dtype,
        "compression": manifest.compression,
        "n_samples": manifest.n_samples, "n_tokens": manifest.n_tokens, "n_truncated": manifest.n_truncated,
        "layers": {name: info.shape for name, info in manifest.layers.items()},
        "shards": len(manifest.shards), "bytes": total_bytes, "created": manifest.created,
        "prompt_columns": [c for c in run.prompt_columns if c not in ("sample_id", "text")],
        "rows": {name: run.n_rows(name) for name in run.layers},
        "rows_committed": {name: sum(shard.rows[1] - shard.rows[0] for shard in manifest.shards_of(name))
                           for name in run.layers},
        # for a running run: is a process writing it now (True), was its extraction killed (False), or
        # cannot it be told (None: a run on object storage, or written before the writing lock existed)
        "writer_alive": _writer_alive(run) if manifest.status == "running" else None,
    }


def _writer_alive(run: Any) -> bool | None:
    from .store.liveness import writer_alive

    return None if hasattr(run, "url") else writer_alive(run.path)


def _show_run(run: Any, as_json: bool) -> None:
    summary = _run_summary(run)
    if as_json:
        _print_json(summary)
        return
    status = summary["status"]
    colour = {"complete": "green", "running": "yellow", "failed": "red"}.get(status, "white")
    console.print(f"[bold]{summary['path']}[/]  [{colour}]{status}[/]")
    console.print(
        f"model {summary['model']} | {summary['n_samples']} samples, {summary['n_tokens']} tokens"
        f" ({summary['n_truncated']} truncated) | pooling {summary['pooling']} | {summary['format']}"
        f" {summary['dtype']} | {summary['shards']} shards, {summary['bytes'] / 1e6:.1f} MB"
    )
    if summary["prompt_columns"]:
        console.print(f"prompt label columns: {', '.join(summary['prompt_columns'])}")
    table = Table()
    table.add_column("layer")
    table.add_column("rows x shape")
    if status != "complete":
        table.add_column("committed")
    for name in run.layers:
        cells = [name, f"{summary['rows'][name]} x {tuple(summary['layers'][name])}"]
        if status != "complete":
            cells.append(f"{summary['rows_committed'][name]} rows")
        table.add_row(*cells)
    console.print(table)
    if status == "running" and summary["writer_alive"]:
        console.print("[yellow]this run is being extracted now (a process holds its writing lock)[/]")
    elif status == "running" and summary["writer_alive"] is False:
        console.print("[yellow]this run was interrupted (no process is writing it): re-run the same "
                      "`neuronmap extract` command to resume it[/]")
    elif status == "running":
        console.print("[yellow]this run is incomplete: re-run the same `neuronmap extract` command to resume it[/]")
    elif status == "failed":
        console.print(f"[red]this run failed: {summary['error']}; re-run the same command to resume it[/]")


@runs_app.command("show")
def runs_show(run: Path = typer.Argument(..., help="Run directory."),
              as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Show a run's status, model, layers, shapes and size."""
    from .store import open_run

    _show_run(open_run(run), as_json)


@runs_app.command("verify")
def runs_verify(run: Path = typer.Argument(..., help="Run directory."),
                as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Recheck every shard's sha256 and that the shards cover every row exactly once."""
    from .store import verify_run
    from .store.manifest import MANIFEST_NAME, load_manifest
    from .store.remote import is_remote, verify_remote_run

    if is_remote(run):  # every object downloaded and checked against its sha256, then the copy checked
        report = verify_remote_run(run)
    else:
        if not (run / MANIFEST_NAME).is_file():  # not a run at all: a usage mistake (exit 2), not a failed check
            load_manifest(run)
        report = verify_run(run)
    if as_json:
        _print_json({"ok": report.ok, "problems": report.problems})
    elif report.ok:
        console.print(f"[green]ok[/]: {report.path} verified")
    else:
        for problem in report.problems:  # one line each, also when stderr is not a terminal
            err_console.print(f"[red]{escape(problem)}[/]", highlight=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(3)


@runs_app.command("export")
def runs_export(
    run: Path = typer.Argument(..., help="Run directory."),
    to: str = typer.Option(..., "--to", help="csv | hdf5 | parquet."),
    out: Path = typer.Option(..., "--out", "-o", help="CSV file (csv) or new run directory (hdf5/parquet)."),
    layers: Optional[str] = typer.Option(None, help="Comma-separated layers for CSV (default: all)."),
    overwrite: bool = typer.Option(False, help="Replace an existing CSV file or complete run at --out."),
) -> None:
    """Export a run to CSV, or convert it between HDF5 and Parquet (shards checked against their sha256)."""
    from .errors import ConfigError
    from .store import convert_run, export_csv, open_run

    source = open_run(run)
    chosen = None
    if layers is not None:
        chosen = [name.strip() for name in layers.split(",")]
        if not all(chosen):
            raise ConfigError(f"--layers {layers!r} has an empty name; give comma-separated layer names such as "
                              f"{','.join(source.layers[:2])}")
    if to == "csv":
        path = export_csv(source, out, layers=chosen, overwrite=overwrite)
    elif to in ("hdf5", "parquet"):
        if chosen is not None:
            raise ConfigError("--layers applies to --to csv only: a conversion copies every layer")
        path = convert_run(source, out, format=to, overwrite=overwrite)
    else:
        raise ConfigError(f"--to {to!r} is not supported; use csv, hdf5 or parquet")
    console.print(f"exported {getattr(source, 'url', run)} to [bold]{path}[/]")


# ---------------------------------------------------------------------------------------------
# doctor and demo
# ---------------------------------------------------------------------------------------------
@app.command()
def doctor(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Versions, device, free disk, and whether a Ray cluster is reachable."""
    from .doctor import collect

    info = collect()
    if as_json:
        _print_json(info)
        return
    table = Table(title="neuronmap doctor")
    table.add_column("check")
    table.add_column("value")
    for key, value in info.items():
        table.add_row(key, str(value))
    console.print(table)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Folder for the demo models and runs."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N shipped prompts."),
) -> None:
    """Run the main job end to end offline: tiny GPT-2 and packaged MiniLM over the shipped prompts."""
    from .demo import run_demo

    _quiet_libraries()
    for run in run_demo(out, limit=limit, console=console):
        console.rule()
        _show_run(run, as_json=False)
    console.print(f"\nInspect a run with [bold]neuronmap runs show {out}/<run>[/]; read it in Python with "
                  "[bold]neuronmap.open_run(path).array(layer)[/].")


def _load_plugins() -> None:
    """Add commands that packages register under the `neuronmap.cli` entry point group.

    This is how the Ray commands (`submit`, `jobs`) from `actors` join the CLI while the core package
    never imports Ray or `actors` itself. A plugin that fails to import is skipped, not fatal.
    """
    from importlib.metadata import distributions

    # Every distribution is scanned (not `entry_points(group=...)`, which keeps the first distribution of
    # a name only): a stale neuronmap.egg-info in the working directory must not hide installed plugins.
    points: dict[str, object] = {}
    for distribution in distributions():
        for entry in distribution.entry_points:
            if entry.group == "neuronmap.cli":
                points.setdefault(entry.name, entry)
    for point in points.values():
        try:
            point.load()(app)
        except Exception as error:  # a broken optional plugin must not break the core commands
            if os.environ.get("NEURONMAP_DEBUG"):
                raise
            err_console.print(f"[yellow]warning:[/] CLI plugin {escape(repr(point.name))} not loaded: {escape(str(error))}")


_load_plugins()


def _click_exceptions(name: str) -> tuple[type[BaseException], ...]:
    """`name` from click and from the copy of click that newer typer releases vendor (`typer._click`),
    which raise their own classes: catching only click's let typer's usage errors through as internal."""
    import importlib

    classes = []
    for module in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        try:
            found = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(found, type) and found not in classes:
            classes.append(found)
    return tuple(classes)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A library warning as one yellow line on stderr, without Python's source-line echo."""
    text = " ".join(str(message).split())
    err_console.print(f"[yellow]warning:[/] {escape(text)}", highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    import warnings

    shown, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        return _main(argv)
    finally:
        warnings.showwarning = shown


def _out_of_memory(error: BaseException) -> bool:
    """MemoryError, or torch failing to allocate (CPU or CUDA), told apart without importing torch."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def _refuse_blank_out(argv: list[str]) -> None:
    """`-o ''` reaches a command as Path('.'), the working folder: say what was typed instead."""
    for i, token in enumerate(argv):
        if token.startswith("--out="):
            value: str | None = token.split("=", 1)[1]
        else:
            value = argv[i + 1] if token in ("-o", "--out") and i + 1 < len(argv) else None
        if value is not None and not value.strip():
            raise ConfigError(f"{token.split('=')[0]} is empty: give a path, e.g. --out runs/my-run")


def _command_path(argv: list[str]) -> str:
    """`neuronmap extract` (or `neuronmap runs show`) from the command line: the help to point at when
    click gives no context (an option missing its value)."""
    import typer.main

    path, command = ["neuronmap"], typer.main.get_command(app)
    for token in argv:
        sub = getattr(command, "commands", {}).get(token)
        if sub is None:
            break
        path.append(token)
        command = sub
    return " ".join(path)


def _main(argv: list[str] | None) -> int:
    try:
        _refuse_blank_out([str(token) for token in (sys.argv[1:] if argv is None else argv)])
        result = app(args=argv, standalone_mode=False)
    except NeuronMapError as error:
        err_console.print(f"[red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        return 2
    except _click_exceptions("Exit") as done:
        return done.exit_code
    except _click_exceptions("ClickException") as error:  # usage: unknown command, missing or bad option
        message = " ".join(error.format_message().split()).rstrip(".")
        ctx = getattr(error, "ctx", None)
        where = ctx.command_path if ctx is not None else _command_path(
            [str(token) for token in (sys.argv[1:] if argv is None else argv)])
        hint = f" (see `{where} --help`)"
        err_console.print(f"[red]error:[/] {escape(message)}{hint}", highlight=False, soft_wrap=True)
        return error.exit_code
    except (*_click_exceptions("Abort"), KeyboardInterrupt):
        err_console.print("[yellow]interrupted[/]: re-run the same command to resume")
        return 130
    except Exception as error:  # internal error: one line unless debugging
        if os.environ.get("NEURONMAP_DEBUG"):
            raise
        if _out_of_memory(error):  # a request too large for this machine: the user can ask for less
            detail = escape(" ".join(str(error).split())[:160])
            err_console.print(f"[red]error:[/] out of memory ({type(error).__name__}{': ' + detail if detail else ''}); "
                              "ask for less (a smaller --batch-size, k, bins, steps or sample count) or use a machine "
                              "with more memory", highlight=False, soft_wrap=True)
            return 2
        err_console.print(f"[red]internal error:[/] {type(error).__name__}: {escape(str(error))} "
                          "(set NEURONMAP_DEBUG=1 for the traceback)", highlight=False, soft_wrap=True)
        return 1
    # In non-standalone mode click returns the code of a `typer.Exit` instead of raising it.
    return result if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
