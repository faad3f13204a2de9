"""`neuronmap report`: one standalone HTML page with every analysis of a run.

plotly.js is inlined once in the page head, so the file opens offline and can be mailed around. Each
artifact gets its figure(s) (`neuronmap.viz.figure_for_artifact`, one per layer for per-layer
analyses, at most `MAX_FIGURES_PER_ARTIFACT`), its key metrics per unit, its parameters and warnings.
"""

from __future__ import annotations

import html
import json
import os
import warnings
from pathlib import Path

import pandas as pd

from neuronmap.analysis.artifacts import Artifact, list_artifacts, unreadable_artifacts
from neuronmap.store import open_run

from .artifacts import created, metrics_frame
from .export import write_bytes

MAX_FIGURES_PER_ARTIFACT = 6
STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#212529;background:#f8f9fa}
header{background:#212529;color:#fff;padding:1rem 2rem}header h1{margin:0;font-size:1.5rem}
main{padding:1rem 2rem;max-width:1200px}section{background:#fff;border:1px solid #dee2e6;border-radius:.5rem;
padding:1rem 1.5rem;margin:1rem 0}table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
td,th{border:1px solid #dee2e6;padding:.25rem .5rem;text-align:left}th{background:#f1f3f5}
code,pre{background:#f1f3f5;border-radius:.25rem;padding:.1rem .3rem}pre{padding:.5rem;overflow:auto}
.warn{color:#8a6d3b;background:#fcf8e3;border:1px solid #faebcc;padding:.5rem;border-radius:.25rem}
.error{color:#a94442;background:#f2dede;border:1px solid #ebccd1;padding:.5rem;border-radius:.25rem}
nav ul{columns:2}small{color:#6c757d}
"""


def _format(value) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_format(v))}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figures(artifact: Artifact, prompts: pd.DataFrame | None) -> str:
    from neuronmap.viz import figure_for_artifact, figure_units

    units = figure_units(artifact)
    parts = []
    for unit in units[:MAX_FIGURES_PER_ARTIFACT]:
        try:
            fig = figure_for_artifact(artifact, unit, prompts=prompts)
            parts.append(fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False},
                                     default_height=480))
        except Exception as error:  # one bad artifact must not sink the whole report
            parts.append(f'<p class="error">no figure for {html.escape(str(unit or artifact.id))}: '
                         f"{html.escape(type(error).__name__)}: {html.escape(str(error))}</p>")
    if len(units) > MAX_FIGURES_PER_ARTIFACT:
        parts.append(f"<p><small>{len(units) - MAX_FIGURES_PER_ARTIFACT} more layers not drawn: "
                     f"<code>neuronmap visualize RUN {html.escape(artifact.id)} --unit LAYER</code></small></p>")
    return "\n".join(parts)


def _section(artifact: Artifact, prompts: pd.DataFrame | None) -> str:
    result = artifact.result
    layers = ", ".join(result.get("layers", []))
    labels = f" · labels <code>{html.escape(result['labels'])}</code>" if result.get("labels") else ""
    notes = "".join(f'<p class="warn">{html.escape(w)}</p>' for w in artifact.warnings)
    params = html.escape(json.dumps(result.get("params", {}), indent=2, default=str))
    return (f'<section id="{html.escape(artifact.id)}"><h2>{html.escape(artifact.analysis)} '
            f"<small>{html.escape(artifact.id)}</small></h2>"
            f"<p><small>{html.escape(result.get('family', ''))} · layers {html.escape(layers)}{labels} · "
            f"created {html.escape(created(artifact))} · {result.get('elapsed_s', '?')} s · engine "
            f"{html.escape(str(result.get('engine', '')))}</small></p>{notes}"
            f"{_figures(artifact, prompts)}<h3>Metrics</h3>{_table(metrics_frame(artifact))}"
            f"<details><summary>Parameters</summary><pre>{params}</pre></details></section>")


def run_sections(run_path: str | os.PathLike, heading: str = "Run", anchor: str | None = None,
                 artifact_ids: list[str] | None = None) -> str:
    """A run's overview section (manifest, layers, table of contents) followed by one section per artifact.

    The body of `build_report`, and of the experiment report once per run (`heading`, `anchor` tell
    the runs apart there; `artifact_ids` keeps the experiment's own artifacts, default all).
    """
    run = open_run(run_path)
    manifest = run.manifest
    artifacts = sorted(list_artifacts(run.path), key=lambda a: (a.analysis, created(a)))
    damaged = unreadable_artifacts(run.path)
    for path, reason in damaged:  # left out of the page, but never silently
        warnings.warn(f"skipped unreadable artifact {path.name}: {reason}", UserWarning, stacklevel=2)
    others = 0
    if artifact_ids is not None:
        kept = [a for a in artifacts if a.id in set(artifact_ids)]
        others, artifacts = len(artifacts) - len(kept), kept
    try:
        prompts = run.prompts
    except Exception:  # a run without readable prompts still gets its figures, without hover text
        prompts = None
    layers = pd.DataFrame([{"layer": name, "shape": "x".join(map(str, info.shape)), "dtype": info.dtype,
                            "kind": info.kind, "per token": info.per_token} for name, info in manifest.layers.items()])
    overview = pd.DataFrame([{"model": manifest.model, "status": manifest.status, "samples": manifest.n_samples,
                              "format": manifest.format, "pooling": manifest.pooling, "dtype": manifest.dtype,
                              "created": manifest.created}])
    toc = "".join(f'<li><a href="#{html.escape(a.id)}">{html.escape(a.analysis)}</a> '
                  f"<small>{html.escape(a.id)}</small></li>" for a in artifacts)
    body = "".join(_section(a, prompts) for a in artifacts) or (
        '<section><p>This run has no analyses yet: run <code>neuronmap analyze RUN stats</code> (and pca, cka, ...) '
        "then build the report again.</p></section>")
    where = f' id="{html.escape(anchor)}"' if anchor else ""
    more = (f"<p><small>{others} other artifact{'s' if others != 1 else ''} of this run not shown: "
            "<code>neuronmap report RUN</code> shows every one</small></p>") if others else ""
    more += "".join(f'<p class="warn">skipped unreadable artifact <code>{html.escape(path.name)}</code>: '
                    f"{html.escape(reason)}</p>" for path, reason in damaged)
    return (f"<section{where}><h2>{html.escape(heading)}</h2>{_table(overview)}<h3>Layers</h3>{_table(layers)}"
            f"<h3>Analyses ({len(artifacts)})</h3><nav><ul>{toc}</ul></nav>{more}</section>{body}")


def page(title: str, subtitle: str, body: str) -> str:
    """A standalone HTML page: the report style, plotly.js inlined once, `body` inside <main>."""
    import plotly.offline

    title = html.escape(title)
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>{STYLE}</style>"
            f"<script type=\"text/javascript\">{plotly.offline.get_plotlyjs()}</script></head><body>"
            f"<header><h1>{title}</h1><small>{html.escape(subtitle)}</small></header><main>{body}</main></body></html>")


def build_report(run_path: str | os.PathLike) -> str:
    """The report page of the run at `run_path` as one HTML string."""
    run = open_run(run_path)
    return page(f"NeuronMap report · {run.path.name}", str(run.path), run_sections(run))


def write_report(run_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write `build_report(run_path)` to `out` atomically."""
    return write_bytes(Path(out), build_report(run_path).encode("utf-8"))
