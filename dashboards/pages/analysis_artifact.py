"""Artifact: one analysis result with its figure, parameters, metrics, warnings and downloads (JSON, CSV, PNG)."""

from __future__ import annotations

import json

import dash_bootstrap_components as dbc
from dash import Input, Output, State, dcc, html

from neuronmap import viz
from neuronmap.analysis.artifacts import to_jsonable
from neuronmap.errors import NeuronMapError

from ..artifacts import coordinates, metrics_frame, tables_csv
from ..components import card, frame_table, graph, header, href, labelled, options
from ..export import figure_bytes

PATH = "/artifact"
TITLE = "Artifact"
IN_NAV = False


def layout(ctx, query: dict) -> html.Div:
    run_id, artifact_id = query.get("run", ""), query.get("id", "")
    artifact = ctx.repository.artifact(run_id, artifact_id)
    result = artifact.result
    units = viz.figure_units(artifact)
    controls = []
    if units != [None]:
        controls.append(dbc.Col(labelled("Layer", dbc.Select(id="artifact-unit", options=options(units), value=units[0]),
                                         "artifact-unit"), md=6))
    else:
        controls.append(dcc.Store(id="artifact-unit", data=None))
    if artifact.analysis in ("pca", "tsne"):
        have = coordinates(artifact)
        why = None
        if have < 3:  # a 3-D choice would silently redraw the 2-D figure
            option = "project" if artifact.analysis == "pca" else "n_components"
            why = (f"3-D needs a third coordinate: this artifact stores {have}; re-run {artifact.analysis} "
                   f"with --param {option}=3")
        controls.append(dbc.Col(labelled("Dimensions", dbc.RadioItems(
            id="artifact-dims", value=2, inline=True, options=[{"label": "2-D", "value": 2},
                                                               {"label": "3-D", "value": 3, "disabled": have < 3}]),
            "artifact-dims", why), md=6))
    else:
        controls.append(dcc.Store(id="artifact-dims", data=2))
    downloads = html.Div([
        dbc.Button("JSON", id="download-json-button", color="secondary", outline=True, size="sm"),
        dbc.Button("CSV", id="download-csv-button", color="secondary", outline=True, size="sm"),
        dbc.Button("PNG", id="download-png-button", color="secondary", outline=True, size="sm"),
        dcc.Download(id="download-json"), dcc.Download(id="download-csv"),
        dcc.Loading(dcc.Download(id="download-png"), type="dot"),
        html.Div(id="download-error", className="small text-danger"),
    ], className="d-flex gap-2 align-items-center flex-wrap", role="group", **{"aria-label": "Downloads"})
    warnings = [dbc.Alert(w, color="warning", className="py-1 small mb-1") for w in artifact.warnings]
    if _stale(ctx.repository, run_id, artifact):
        warnings.insert(0, dbc.Alert("Computed on an earlier state of the run: the run has gained or changed shards "
                                     "since, so these numbers describe only the rows it held then; re-run the "
                                     "analysis for the run as it is now.", color="warning", className="py-1 small mb-1",
                                     id="artifact-stale"))
    subtitle = [dcc.Link(run_id, href=href("/run", run=run_id)),
                f" · {result.get('family', '')} · layers {', '.join(result.get('layers', []))}"
                f"{' · labels ' + result['labels'] if result.get('labels') else ''} · {result.get('created', '')[:19]}"
                f" · {result.get('elapsed_s', '?')} s"]
    return html.Div([
        header(f"{artifact.analysis} · {artifact_id}", subtitle, downloads),
        dcc.Store(id="artifact-key", data={"run": run_id, "id": artifact_id}),
        *warnings,
        card("Figure", dbc.Row(controls, className="g-2"), graph({}, id="artifact-graph", height=560)),
        dbc.Row([
            dbc.Col(card("Metrics", frame_table(metrics_frame(artifact), id="artifact-metrics", page_size=12)), lg=8),
            dbc.Col(card("Parameters", html.Pre(json.dumps(result.get("params", {}), indent=2, default=str),
                                                className="small mb-0", id="artifact-params")), lg=4),
        ]),
    ])


def _stale(repo, run_id: str, artifact) -> bool:
    """True when the artifact was computed on other shards than the run holds now (`Repository.current`)."""
    try:
        return repo.current(run_id, artifact) is False
    except NeuronMapError:
        return False


def register(app, ctx) -> None:
    repo = ctx.repository

    def load(key):
        return repo.artifact(key["run"], key["id"])

    def figure(key, unit, dims):
        artifact = load(key)
        prompts = None
        try:
            prompts = repo.prompts(key["run"])
        except NeuronMapError:
            pass
        return viz.figure_for_artifact(artifact, unit or None, prompts=prompts, dims=int(dims or 2))

    @app.callback(Output("artifact-graph", "figure"), Input("artifact-unit", "value"), Input("artifact-dims", "value"),
                  State("artifact-key", "data"))
    def draw(unit, dims, key):
        try:
            return figure(key, unit, dims)
        except (KeyError, ValueError) as error:
            fig = viz.metric_bars([], {}, title=f"no figure: {str(error).strip(chr(39))}")
            return fig

    @app.callback(Output("download-json", "data"), Input("download-json-button", "n_clicks"),
                  State("artifact-key", "data"), prevent_initial_call=True)
    def download_json(_, key):
        artifact = load(key)
        text = json.dumps(to_jsonable(artifact.result), indent=2)
        return {"content": text, "filename": f"{artifact.id}.json", "type": "application/json"}

    @app.callback(Output("download-csv", "data"), Input("download-csv-button", "n_clicks"),
                  State("artifact-key", "data"), prevent_initial_call=True)
    def download_csv(_, key):
        artifact = load(key)
        return {"content": tables_csv(artifact), "filename": f"{artifact.id}.csv", "type": "text/csv"}

    @app.callback(Output("download-png", "data"), Output("download-error", "children"),
                  Input("download-png-button", "n_clicks"), State("artifact-unit", "value"),
                  State("artifact-dims", "value"), State("artifact-key", "data"), prevent_initial_call=True)
    def download_png(_, unit, dims, key):
        import base64

        try:
            data = figure_bytes(figure(key, unit, dims), "png")
        except NeuronMapError as error:
            return None, str(error)
        name = f"{key['id']}{'-' + unit if unit else ''}.png"
        return {"content": base64.b64encode(data).decode(), "filename": name, "base64": True, "type": "image/png"}, ""
