"""The `html` reporter of `neuronmap run`: one standalone page for a whole experiment.

Registered in the `neuronmap.reporters` entry point group (pyproject.toml), so the core calls it
without importing plotly. The page opens with the experiment (configuration as run, seed, package
versions, runs, the pipeline's steps) and then holds every run exactly as `neuronmap report` shows
it (`report.run_sections`: manifest, layers, each analysis' figures and key metrics), with plotly.js
inlined once.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

import pandas as pd
import plotly  # noqa: F401  (without the dashboard extra the entry point fails to load: the step says so)
import yaml

from .export import write_bytes
from .report import _table, page, run_sections


def _summary(experiment: dict[str, Any]) -> str:
    overview = pd.DataFrame([{
        "experiment": experiment.get("experiment"), "file": experiment.get("source"),
        "profile": experiment.get("profile") or "–", "seed": experiment.get("seed"),
        "engine": experiment.get("engine"), "folder": experiment.get("out_dir")}])
    versions = pd.DataFrame([experiment.get("versions", {})])
    runs = pd.DataFrame([{"run": run["name"], "model": run["model"], "path": run["path"], "state": run.get("state")}
                         for run in experiment.get("runs", [])])
    steps = pd.DataFrame([{"step": s["step"], "target": s["target"], "status": s["status"], "detail": s["detail"],
                           "seconds": round(float(s.get("seconds") or 0), 2)} for s in experiment.get("steps", [])])
    toc = "".join(f'<li><a href="#run-{html.escape(run["name"])}">{html.escape(run["name"])}</a> '
                  f"<small>{html.escape(run['model'])}</small></li>" for run in experiment.get("runs", []))
    config = html.escape(yaml.safe_dump(experiment.get("config", {}), sort_keys=False, allow_unicode=True))
    return (f"<section><h2>Experiment</h2>{_table(overview)}<h3>Versions</h3>{_table(versions)}"
            f"<h3>Runs</h3>{_table(runs) if len(runs) else '<p>no runs</p>'}<nav><ul>{toc}</ul></nav>"
            f"<h3>Pipeline steps</h3>{_table(steps) if len(steps) else '<p>none</p>'}"
            f"<details><summary>Configuration as run</summary><pre>{config}</pre></details></section>")


def _run(run: dict[str, Any]) -> str:
    name = run["name"]
    try:
        return run_sections(run["path"], heading=f"Run {name} · {run['model']}", anchor=f"run-{name}",
                            artifact_ids=run.get("artifacts"))
    except Exception as error:  # a run that never started (or is unreadable) still gets its line
        return (f'<section id="run-{html.escape(name)}"><h2>Run {html.escape(name)}</h2><p class="error">'
                f"{html.escape(type(error).__name__)}: {html.escape(str(error))}</p></section>")


def build_experiment_report(experiment: dict[str, Any]) -> str:
    """The page as one HTML string; `experiment` is the summary `neuronmap run` hands to reporters."""
    body = _summary(experiment) + "".join(_run(run) for run in experiment.get("runs", []))
    return page(f"NeuronMap experiment · {experiment.get('experiment', '')}", str(experiment.get("out_dir", "")), body)


def write_experiment_report(experiment: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write the experiment's page to `out` atomically; returns the path (the reporter entry point)."""
    return write_bytes(Path(out), build_experiment_report(experiment).encode("utf-8"))
