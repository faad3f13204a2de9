"""Jobs and system: running extractions (progress from their manifests), launched analyses, CPU/RAM/disk/GPU."""

from __future__ import annotations

import dash_bootstrap_components as dbc
from dash import Input, Output, dcc, html

from .. import system
from ..components import card, empty_state, header, href, status_badge
from .launch import job_rows

PATH = "/jobs"
TITLE = "Jobs & system"
IN_NAV = True


def layout(ctx, query: dict) -> html.Div:
    return html.Div([
        header("Jobs and system", "refreshed every 2 seconds"),
        dbc.Row([
            dbc.Col([card("Extractions in progress", html.Div(id="jobs-extractions")),
                     card("Analyses launched from the dashboard", html.Div(id="jobs-analyses"))], lg=7),
            dbc.Col(card("System", html.Div(id="jobs-system")), lg=5),
        ]),
        dcc.Interval(id="jobs-poll", interval=2000),
    ])


def _meter(label: str, percent: float | None, detail: str) -> html.Div:
    value = 0 if percent is None else percent
    colour = "danger" if value > 90 else "warning" if value > 70 else "success"
    return html.Div([html.Div([html.Span(label, className="fw-semibold"), html.Span(detail, className="small text-muted")],
                              className="d-flex justify-content-between"),
                     dbc.Progress(value=value, color=colour, label=f"{value:.0f}%", className="mb-2",
                                  style={"height": "1.1rem"})])


def _interrupted(entries) -> html.Div | None:
    if not entries:
        return None
    items = [html.Li([html.Div([dcc.Link(entry.id, href=href("/run", run=entry.id)), html.Span(f" {entry.model} "),
                                status_badge(entry.state)]),
                      html.Div(entry.interruption + ":", className="small"),
                      html.Code(entry.resume_command, className="d-block small text-break")],
                     className="list-group-item")
             for entry in entries]
    return html.Div([html.H3("Interrupted extractions", className="h6 mt-3"),
                     html.Ul(items, className="list-group", id="jobs-interrupted")])


def extractions(ctx) -> html.Div:
    """Extractions in progress with their progress; interrupted ones (manifest still `running`, nothing
    committed for long) apart, with the command that resumes them."""
    entries = ctx.repository.runs()
    running = [e for e in entries if e.status == "running" and not e.interrupted]
    stopped = _interrupted([e for e in entries if e.interrupted])
    if not running:
        return html.Div([empty_state("No extraction is running.",
                                     "Runs whose manifest says `running` show here with progress."), stopped])
    rows = []
    for entry in running:
        progress = entry.progress or 0.0
        rows.append(html.Li([
            html.Div([dcc.Link(entry.id, href=href("/run", run=entry.id)), html.Span(f" {entry.model} "),
                      status_badge(entry.status),
                      html.Span(f" updated {entry.updated[:19].replace('T', ' ')}", className="small text-muted")]),
            dbc.Progress(value=round(100 * progress), label=f"{progress:.0%} of rows committed", striped=True,
                         style={"height": "1.1rem"})], className="list-group-item"))
    return html.Div([html.Ul(rows, className="list-group", id="jobs-running"), stopped])


def system_panel(ctx) -> html.Div:
    info = system.snapshot(ctx.repository.runs_dir)
    parts = [
        _meter("CPU", info["cpu_percent"], f"{info['cpu_count']} cores"),
        _meter("Memory", info["memory_percent"], f"{info['memory_used_gb']:.1f} / {info['memory_total_gb']:.1f} GB"),
        _meter("Disk (runs folder)", info["disk_percent"],
               "unknown" if info["disk_total_gb"] is None else f"{info['disk_used_gb']:.0f} / {info['disk_total_gb']:.0f} GB"),
    ]
    if info["gpus"]:
        for index, gpu in enumerate(info["gpus"]):
            parts.append(_meter(f"GPU {index}: {gpu['name']}", gpu["utilization"],
                                f"{gpu['memory_used_mb'] / 1024:.1f} / {gpu['memory_total_mb'] / 1024:.1f} GB"))
    else:
        parts.append(html.Div("No NVIDIA GPU found (NVML / nvidia-smi).", className="small text-muted"))
    return html.Div(parts, id="system-meters")


def register(app, ctx) -> None:
    @app.callback(Output("jobs-extractions", "children"), Output("jobs-analyses", "children"),
                  Output("jobs-system", "children"), Input("jobs-poll", "n_intervals"))
    def refresh(_):
        return extractions(ctx), job_rows(ctx), system_panel(ctx)
