"""`neuronmap visualize`, `neuronmap report` and `neuronmap dashboard`, registered as a CLI plugin.

The core package never imports plotly or Dash; these commands join the `neuronmap` command through
the `neuronmap.cli` entry point group (pyproject.toml) and import their libraries when they run.
Mistakes raise NeuronMapError: one red line, exit code 2.
"""

from __future__ import annotations

import ipaddress
import logging
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from neuronmap.errors import ConfigError
from neuronmap.listen import check_listen

console = Console()
err_console = Console(stderr=True)
EXTRA_HINT = "install the dashboard extra: pip install -e '.[dashboard]'"


def _need(module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise ConfigError(f"this command needs {module}: {EXTRA_HINT}") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _refuse_existing(out: Path, overwrite: bool) -> None:
    """A file already at --out is the user's until they say otherwise (as `runs export` and `generate`)."""
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {out} already exists; pass --overwrite to replace it, or choose another file")


def register(app: typer.Typer) -> None:
    """Add `visualize`, `report` and `dashboard` to the `neuronmap` app."""

    @app.command()
    def visualize(
        run: Path = typer.Argument(..., help="Run directory."),
        analysis: str = typer.Argument(..., help="Artifact id (pca-1a2b...) or analysis name (newest artifact of it)."),
        out: Path = typer.Option(..., "--out", "-o", help="Output file: .html (offline), .png or .svg."),
        unit: Optional[str] = typer.Option(None, "--unit", "--layer", help="Layer (or unit) of a per-layer analysis; "
                                           "default its first."),
        dims: int = typer.Option(2, help="Scatter dimensions for pca / tsne: 2 or 3."),
        color_by: Optional[str] = typer.Option(None, help="Colour scatter points by this prompts column."),
        width: int = typer.Option(1000, help="Image width in pixels (png/svg), 1 to 16384."),
        height: int = typer.Option(700, help="Image height in pixels (png/svg), 1 to 16384."),
        max_points: int = typer.Option(20_000, help="Scatter points drawn at most (seeded, label-balanced sample)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace the --out file if it exists."),
    ) -> None:
        """Draw one analysis artifact of a run to an HTML, PNG or SVG file."""
        _need("plotly")
        _refuse_existing(out, overwrite)
        from neuronmap.store import open_run
        from neuronmap.viz import figure_for_artifact

        from .artifacts import select_artifact
        from .export import check_image_size, figure_format, write_figure

        figure_format(out)
        check_image_size(width, height)  # before any work: kaleido turns a too-large image into garbage
        opened = open_run(run)
        artifact, note = select_artifact(opened.path, analysis)
        prompts = opened.prompts
        color = None
        if color_by is not None:
            if color_by not in prompts.columns:
                raise ConfigError(f"--color-by {color_by!r} is not a prompts column; columns: "
                                  f"{', '.join(c for c in prompts.columns if c != 'sample_id')}")
            color = dict(zip(prompts["sample_id"].tolist(), prompts[color_by].tolist()))
        try:
            fig = figure_for_artifact(artifact, unit, prompts=prompts, color=color, color_title=color_by, dims=dims,
                                      max_points=max_points)
        except (KeyError, ValueError) as error:
            raise ConfigError(str(error).strip("'\"")) from None
        if note:
            err_console.print(f"[yellow]note:[/] {escape(note)}")
        written = write_figure(fig, out, width=width, height=height)
        console.print(f"wrote {escape(str(written))} ({artifact.analysis} {artifact.id}"
                      f"{' · ' + escape(unit) if unit else ''})", highlight=False)

    @app.command()
    def report(
        run: Path = typer.Argument(..., help="Run directory."),
        out: Path = typer.Option(..., "--out", "-o", help="HTML file to write (one page, works offline)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace the --out file if it exists."),
    ) -> None:
        """Write one standalone HTML page with every analysis of a run: figures, key metrics, parameters."""
        _need("plotly")
        _refuse_existing(out, overwrite)
        from .report import write_report

        if out.suffix.lower() not in (".html", ".htm"):
            raise ConfigError(f"--out {out} must end in .html")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.filterwarnings("default", message="skipped unreadable artifact")  # one line each, shown
            written = write_report(run, out)
        size = written.stat().st_size / 1e6
        console.print(f"wrote {escape(str(written))} ({size:.1f} MB, plotly.js inlined)", highlight=False)

    @app.command()
    def dashboard(
        runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Folder holding runs (searched 3 levels deep)."),
        host: str = typer.Option("127.0.0.1", help="Address to bind; 127.0.0.1 keeps it on this machine."),
        port: int = typer.Option(8050, help="Port to listen on."),
        workers: int = typer.Option(2, min=1, help="Analyses launched from the UI that run at once."),
        debug: bool = typer.Option(False, help="Dash debug mode (reloader, error overlay); never on a shared host."),
    ) -> None:
        """Open the dashboard over every run in a folder (runs, layers, analyses, launch, jobs)."""
        _need("dash")
        _need("dash_bootstrap_components")
        from .app import create_app

        if not runs_dir.is_dir():
            raise ConfigError(f"--runs-dir {runs_dir} is not a folder; create it or point at the folder holding "
                              "your runs (e.g. runs/)")
        check_listen(host, port, example=8050)  # Flask would fail after start-up with a traceback, or take 0 as 8050
        if not _is_loopback(host):
            err_console.print(f"[yellow]warning:[/] binding {escape(host)}: the dashboard has no login; anyone who "
                              "can reach this address sees every run and can start analyses")
        app = create_app(runs_dir, workers=workers)
        console.print(f"NeuronMap dashboard over {escape(str(runs_dir.resolve()))}: http://{host}:{port}/ "
                      "(Ctrl-C stops it)", highlight=False)
        if not debug:  # werkzeug's banner (a red "development server" warning) and a line per request
            logging.getLogger("werkzeug").setLevel(logging.WARNING)
        app.run(host=host, port=port, debug=debug)
