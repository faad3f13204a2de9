"""Launch: start a registered analysis on a run in the background and follow its progress."""

from __future__ import annotations

import dash_bootstrap_components as dbc
from dash import Input, Output, State, dcc, html

from neuronmap.errors import NeuronMapError

from ..components import ANY, card, empty_state, header, href, labelled, options, picked, status_badge
from ..runstate import prompts_unreadable

PATH = "/launch"
TITLE = "Launch"
IN_NAV = True


def _analyses():
    from neuronmap.analysis.registry import list_analyses

    return list_analyses()


def layout(ctx, query: dict) -> html.Div:
    from neuronmap.analysis.runner import available_engines

    runs = [e.id for e in ctx.repository.runs(fresh=True) if e.ok]
    if not runs:
        return html.Div([header("Launch an analysis"), empty_state("No readable runs: extract one first.")])
    run_id = query.get("run") if query.get("run") in runs else runs[0]
    specs = _analyses()
    chosen = query.get("analysis") if query.get("analysis") in {s.name for s in specs} else "stats"
    form = html.Div([
        labelled("Run", dbc.Select(id="launch-run", options=options(runs), value=run_id), "launch-run"),
        labelled("Analysis", dbc.Select(id="launch-analysis", value=chosen, options=[
            {"label": f"{s.name} ({s.family})", "value": s.name} for s in specs]), "launch-analysis"),
        html.Div(id="launch-help", className="small text-muted mb-2"),
        html.Fieldset([html.Legend("Layers", className="form-label small fw-semibold mb-1"),
                       dbc.Checklist(id="launch-layers", options=[], value=[], inline=True)], className="mb-2"),
        html.Div(id="launch-run-note", className="small text-danger mb-2", role="status"),
        labelled("Label column", dbc.Select(id="launch-labels", options=options([], blank="(none)"), value=ANY), "launch-labels",
                 "used by clustering purity, t-SNE colouring, mutual information"),
        labelled("Parameters", dbc.Textarea(id="launch-params", placeholder="one key=value per line, e.g. k_max=6",
                                            rows=3), "launch-params"),
        labelled("Engine", dbc.Select(id="launch-engine", options=options(available_engines()), value="local"),
                 "launch-engine", "local: a worker thread of this server; ray: Ray tasks (NEURONMAP_RAY_ADDRESS joins "
                 "a cluster)"),
        dbc.Button("Start analysis", id="launch-submit", color="primary", className="mt-2"),
        html.Div(id="launch-feedback", className="mt-2", role="status"),
    ])
    return html.Div([
        header("Launch an analysis", "It runs in the background; finished results appear in the gallery."),
        dbc.Row([dbc.Col(card("New analysis", form), lg=5),
                 dbc.Col(card("Analyses launched here", html.Div(id="launch-jobs")), lg=7)]),
        dcc.Interval(id="launch-poll", interval=1000),
    ])


def job_rows(ctx) -> html.Div:
    jobs = ctx.jobs.jobs()
    if not jobs:
        return empty_state("Nothing launched yet.")
    items = []
    for job in jobs:
        done = job.status == "done"
        tasks = "reused" if done and job.reused else f"{job.done}/{job.total or '?'} tasks"
        bar = dbc.Progress(value=round(100 * job.progress), label=tasks,
                           striped=job.status == "running", animated=job.status == "running",
                           color={"done": "success", "failed": "danger"}.get(job.status, "primary"),
                           className="mb-1", style={"height": "1.1rem"})
        link = dcc.Link("open result", href=href("/artifact", run=job.run_id, id=job.artifact_id),
                        className="job-result") if done and job.artifact_id else None
        items.append(html.Li([
            html.Div([html.Strong(f"{job.analysis}"), html.Span(f" on {job.run_id} · {', '.join(job.layers[:4])} · "),
                      status_badge(job.status), html.Span(f" {job.elapsed:.1f} s ", className="small text-muted"), link],
                     className="d-flex gap-1 align-items-center flex-wrap"),
            bar, html.Div(job.message, className="small text-break " + ("text-danger" if job.status == "failed" else
                                                                        "text-muted")),
        ], className="list-group-item job-item", id=f"job-{job.id}"))
    return html.Ul(items, className="list-group")


def parse_params_text(text: str | None) -> dict:
    from neuronmap.analysis.cli import parse_params

    return parse_params([line.strip() for line in (text or "").splitlines() if line.strip()])


def run_choices(ctx, run_id: str | None) -> tuple[list, list, list, str]:
    """(layer options, layers ticked, label column options, a note) for the run picked in the form.

    A run whose prompts cannot be read still offers its layers (analyses without labels work); the note
    says why it has no label columns. A run that cannot be opened offers nothing, and the note says why.
    """
    no_labels = options([], blank="(none)")
    try:
        run = ctx.repository.run(run_id)
    except NeuronMapError as error:
        return [], [], no_labels, f"run {run_id} cannot be opened: {' '.join(str(error).split())}"
    layer_options = [{"label": name, "value": name} for name in run.layers]
    try:
        labels, note = ctx.repository.label_columns(run_id), ""
    except NeuronMapError:
        labels, note = [], f"No label column to offer: {prompts_unreadable(run_id)}."
    return layer_options, run.layers[-1:], options(labels, blank="(none)"), note


def register(app, ctx) -> None:
    @app.callback(Output("launch-layers", "options"), Output("launch-layers", "value"), Output("launch-labels", "options"),
                  Output("launch-run-note", "children"), Input("launch-run", "value"))
    def choices(run_id):
        return run_choices(ctx, run_id)

    @app.callback(Output("launch-help", "children"), Input("launch-analysis", "value"))
    def help_text(name):
        from neuronmap.analysis.registry import get_analysis

        try:
            spec = get_analysis(name)
        except NeuronMapError as error:
            return str(error)
        params = ", ".join(f"{p['name']}={p['default']}" for p in spec.describe_params())
        scope = {"layer": "per layer", "layer_pair": "per layer pair", "run": "once per run"}[spec.scope]
        return [spec.summary, html.Br(), f"{scope}; parameters: {params or '(none)'}",
                html.Br() if spec.needs_labels else None, "needs a label column" if spec.needs_labels else None]

    @app.callback(Output("launch-feedback", "children"), Input("launch-submit", "n_clicks"),
                  State("launch-run", "value"), State("launch-analysis", "value"), State("launch-layers", "value"),
                  State("launch-labels", "value"), State("launch-params", "value"), State("launch-engine", "value"),
                  prevent_initial_call=True)
    def submit(_, run_id, analysis, layers, labels, params_text, engine):
        try:
            job = ctx.jobs.submit(run_id, analysis, layers or [], picked(labels), parse_params_text(params_text),
                                  engine or "local")
        except NeuronMapError as error:
            return dbc.Alert(str(error), color="danger", className="py-2 mb-0", id="launch-error")
        return dbc.Alert(f"started {job.analysis} on {job.run_id} ({job.id})", color="success", className="py-2 mb-0",
                         id="launch-ok")

    @app.callback(Output("launch-jobs", "children"), Input("launch-poll", "n_intervals"))
    def poll(_):
        return job_rows(ctx)
