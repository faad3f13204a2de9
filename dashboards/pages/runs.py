"""Runs: every run under the runs folder, with search and filters by status and model."""

from __future__ import annotations

import dash_bootstrap_components as dbc
from dash import Input, Output, dcc, html

from ..components import ANY, empty_state, header, href, labelled, options, picked, status_badge

PATH = "/"
TITLE = "Runs"
IN_NAV = True


def layout(ctx, query: dict) -> html.Div:
    entries = ctx.repository.runs(fresh=True)
    models = sorted({e.model for e in entries if e.model})
    statuses = sorted({e.state for e in entries})
    controls = dbc.Row([
        dbc.Col(labelled("Search runs", dbc.Input(id="runs-search", type="search", placeholder="run id or model",
                                                  debounce=True), "runs-search"), md=6),
        dbc.Col(labelled("Status", dbc.Select(id="runs-status", options=options(statuses, blank="any status"),
                                              value=ANY), "runs-status"), md=3),
        dbc.Col(labelled("Model", dbc.Select(id="runs-model", options=options(models, blank="any model"), value=ANY),
                         "runs-model"), md=3),
    ], className="g-2")
    return html.Div([header("Runs", f"{len(entries)} run(s) under {ctx.repository.runs_dir}"), controls,
                     dcc.Loading(html.Div(id="runs-table"), type="circle")])


def _row(entry) -> html.Tr:
    link = dcc.Link(entry.id, href=href("/run", run=entry.id), className="run-link") if entry.ok or \
        entry.status == "failed" else html.Span(entry.id)
    status = [status_badge(entry.state)]
    if entry.progress is not None:
        status.append(html.Span(f" {entry.progress:.0%}", className="small text-muted"))
    if entry.interrupted:
        status.append(html.Div([entry.interruption, ":",
                                html.Code(entry.resume_command, className="d-block text-break")],
                               className="small text-warning-emphasis run-interrupted"))
    if entry.error:
        status.append(html.Div(entry.error, className="small text-danger text-break"))
    layers = f"{len(entry.layers)}: {', '.join(entry.layers[:3])}{', ...' if len(entry.layers) > 3 else ''}"
    return html.Tr([html.Td(link), html.Td(entry.model), html.Td(layers if entry.layers else "–"),
                    html.Td(f"{entry.n_samples:,}" if entry.n_samples is not None else "–"), html.Td(entry.format or "–"),
                    html.Td(status), html.Td((entry.created or "")[:19].replace("T", " "))])


def register(app, ctx) -> None:
    @app.callback(Output("runs-table", "children"), Input("runs-search", "value"), Input("runs-status", "value"),
                  Input("runs-model", "value"))
    def table(search, status, model):
        entries = ctx.repository.runs()
        if not entries:
            return empty_state(f"No runs under {ctx.repository.runs_dir}.",
                               ["Create one with ", html.Code("neuronmap extract -m MODEL -p prompts.csv -o "
                                                              f"{ctx.repository.runs_dir}/NAME"),
                                " or point --runs-dir at the folder holding your runs."])
        needle, status, model = (search or "").strip().lower(), picked(status), picked(model)
        shown = [e for e in entries if (not needle or needle in e.id.lower() or needle in e.model.lower())
                 and (not status or e.state == status) and (not model or e.model == model)]
        if not shown:
            return empty_state("No run matches these filters.")
        head = html.Thead(html.Tr([html.Th(c, scope="col") for c in
                                   ("Run", "Model", "Layers", "Samples", "Format", "Status", "Created")]))
        return dbc.Table([head, html.Tbody([_row(e) for e in shown])], hover=True, responsive=True, size="sm",
                         id="runs-list")
