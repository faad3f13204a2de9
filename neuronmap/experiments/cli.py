"""`neuronmap run EXPERIMENT.yaml`: run a whole experiment (generate -> extract -> analyses -> report).

Thin: loads the file (`load_experiment`), runs it (`run_experiment`) and prints one status line per
step, then where the report is and how to open the dashboard on the results. A mistake in the file
is one red line naming the line and key (exit 2); a failed step exits 1 (2 when every failure was a
user mistake), after the other steps ran.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

console = Console()


def register(app: typer.Typer) -> None:
    """Add `neuronmap run` to the main command."""
    app.command("run", no_args_is_help=True)(run_command)


def run_command(
    experiment: Path = typer.Argument(..., help="Experiment YAML (see examples/demo.yaml)."),
    engine: Optional[str] = typer.Option(None, "--engine", help="local | ray: overrides the file's `engine:`."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Profile of the file's `profiles:` to apply "
                                          "(default: $NEURONMAP_PROFILE)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Reuse finished steps and resume interrupted "
                                "ones (default), or redo every step."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print what would run; write nothing."),
) -> None:
    """Run an experiment described in one YAML file; re-running it skips what is done and resumes the rest."""
    from neuronmap.cli import _quiet_libraries

    from .config import load_experiment
    from .pipeline import run_experiment

    _quiet_libraries()
    loaded = load_experiment(experiment, profile=profile)
    profile_note = f", profile {loaded.profile}" if loaded.profile else ""
    console.print(f"[bold]experiment {escape(loaded.config.name)}[/] ({escape(str(experiment))}{escape(profile_note)})"
                  f" -> {escape(str(loaded.out_dir))}{' [cyan](dry run)[/]' if dry_run else ''}", highlight=False)
    result = run_experiment(loaded, engine=engine, resume=resume, dry_run=dry_run, console=console)
    counts = {status: sum(step.status == status for step in result.steps)
              for status in ("done", "resumed", "skipped", "failed", "planned")}
    shown = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
    console.rule()
    if dry_run:
        console.print(f"dry run: {shown or 'nothing to do'}; run without --dry-run to do it", highlight=False)
        return
    console.print(f"steps: {shown}", highlight=False)
    if result.resolved is not None:
        console.print(f"configuration as run: [bold]{escape(str(result.resolved))}[/]", highlight=False)
    if result.report is not None:
        console.print(f"report: [bold]{escape(str(result.report))}[/] (open it in a browser; works offline)",
                      highlight=False)
    console.print(f"dashboard: [bold]neuronmap dashboard --runs-dir {escape(shlex.quote(str(result.out_dir)))}[/]",
                  highlight=False)
    if result.failed:
        code = 2 if all(step.user_error for step in result.failed) else 1
        console.print(f"[red]{len(result.failed)} step(s) failed[/]: fix the cause and re-run the same command; "
                      "finished steps are kept and skipped", highlight=False)
        raise typer.Exit(code)
