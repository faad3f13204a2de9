"""Analysis gallery: a card per artifact across every run, filtered by model, analysis and layer."""

from __future__ import annotations

import dash_bootstrap_components as dbc
from dash import Input, Output, dcc, html

from ..artifacts import damaged_in, headline
from ..components import ANY, empty_state, format_value, header, href, labelled, options, picked

PATH = "/gallery"
TITLE = "Analysis gallery"
IN_NAV = True
MAX_CARDS = 200


def _damaged(ctx) -> list[tuple]:
    """(run entry, artifact id, analysis name, reason) of every damaged artifact of the readable runs."""
    out = []
    for entry in ctx.repository.runs():
        if entry.ok:
            out.extend((entry, artifact_id, artifact_id.rpartition("-")[0], reason)
                       for artifact_id, reason in damaged_in(ctx.repository, entry.id))
    return out


def layout(ctx, query: dict) -> html.Div:
    pairs = ctx.repository.all_artifacts()
    damaged = _damaged(ctx)
    models = sorted({entry.model for entry, _ in pairs} | {entry.model for entry, *_ in damaged})
    analyses = sorted({artifact.analysis for _, artifact in pairs})
    layers = sorted({layer for _, artifact in pairs for layer in artifact.result.get("layers", [])})
    choices = {"model": models, "analysis": analyses, "layer": layers}
    # A filter from the address that matches nothing here is dropped (and said so), never applied unseen.
    chosen = {key: query.get(key) if query.get(key) in values else ANY for key, values in choices.items()}
    ignored = [f"{key} {query[key]!r}" for key in choices if query.get(key) and chosen[key] == ANY]
    controls = dbc.Row([
        dbc.Col(labelled("Model", dbc.Select(id="gallery-model", options=options(models, blank="any model"),
                                             value=chosen["model"]), "gallery-model"), md=4),
        dbc.Col(labelled("Method", dbc.Select(id="gallery-analysis", options=options(analyses, blank="any analysis"),
                                              value=chosen["analysis"]), "gallery-analysis"), md=4),
        dbc.Col(labelled("Layer", dbc.Select(id="gallery-layer", options=options(layers, blank="any layer"),
                                             value=chosen["layer"]), "gallery-layer"), md=4),
    ], className="g-2")
    note = dbc.Alert(f"No artifact has {' or '.join(ignored)}: showing all of them.", color="secondary",
                     className="py-1 small", id="gallery-ignored") if ignored else None
    subtitle = f"{len(pairs)} artifact(s) in {len(ctx.repository.runs())} run(s)" + (
        f", {len(damaged)} damaged" if damaged else "")
    return html.Div([header("Analysis gallery", subtitle), note, controls,
                     dcc.Loading(html.Div(id="gallery-cards"), type="circle")])


def _card(entry, artifact) -> dbc.Col:
    numbers = headline(artifact)
    layers = artifact.result.get("layers", [])
    body = [
        html.H2(dcc.Link(artifact.analysis, href=href("/artifact", run=entry.id, id=artifact.id),
                         className="stretched-link text-decoration-none"), className="h5 card-title mb-1"),
        html.Div(f"{entry.id} · {entry.model}", className="small text-muted text-break"),
        html.Div(f"layers: {', '.join(layers[:4])}{' ...' if len(layers) > 4 else ''}", className="small"),
        html.Div(f"labels: {artifact.result['labels']}", className="small card-labels")
        if artifact.result.get("labels") else None,
        html.Ul([html.Li([html.Span(f"{key}: "), html.Strong(format_value(value))]) for key, value in numbers.items()],
                className="small list-unstyled mb-1 mt-2"),
        html.Div(f"{artifact.id} · {str(artifact.result.get('created', ''))[:19].replace('T', ' ')}",
                 className="small text-muted"),
    ]
    if artifact.warnings:
        body.append(dbc.Badge(f"{len(artifact.warnings)} warning(s)", color="warning", text_color="dark"))
    return dbc.Col(dbc.Card(dbc.CardBody(body), className="h-100 artifact-card shadow-sm"), md=6, lg=4, xl=3,
                   className="mb-3")


def _damaged_card(entry, artifact_id: str, reason: str) -> dbc.Col:
    body = [html.H2(artifact_id.rpartition("-")[0] or artifact_id, className="h5 card-title mb-1"),
            html.Div(f"{entry.id} · {entry.model}", className="small text-muted text-break"),
            dbc.Badge("damaged", color="danger", className="my-1"),
            html.Div(reason, className="small text-danger text-break"),
            html.Div(artifact_id, className="small text-muted")]
    return dbc.Col(dbc.Card(dbc.CardBody(body), className="h-100 artifact-card damaged-artifact border-danger"),
                   md=6, lg=4, xl=3, className="mb-3")


def gallery_cards(ctx, model: str | None, analysis: str | None, layer: str | None) -> html.Div:
    """The cards matching the filters (None: any), damaged artifacts last with their reason."""
    pairs, damaged = ctx.repository.all_artifacts(), _damaged(ctx)
    if not pairs and not damaged:
        return empty_state("No analyses yet.", ["Run ", html.Code("neuronmap analyze RUN stats"),
                                                " or use ", dcc.Link("Launch", href="/launch"), "."])
    shown = [(e, a) for e, a in pairs if (not model or e.model == model) and (not analysis or a.analysis == analysis)
             and (not layer or layer in a.result.get("layers", []))]
    broken = [(e, i, reason) for e, i, name, reason in damaged
              if (not model or e.model == model) and (not analysis or name == analysis) and not layer]
    if not shown and not broken:
        return empty_state("No artifact matches these filters.")
    extra = [html.P(f"showing the newest {MAX_CARDS} of {len(shown)}", className="small text-muted")] \
        if len(shown) > MAX_CARDS else []
    cards = [_card(e, a) for e, a in shown[:MAX_CARDS]] + [_damaged_card(*item) for item in broken]
    return html.Div([*extra, dbc.Row(cards, id="gallery-grid")])


def register(app, ctx) -> None:
    @app.callback(Output("gallery-cards", "children"), Input("gallery-model", "value"),
                  Input("gallery-analysis", "value"), Input("gallery-layer", "value"))
    def cards(model, analysis, layer):
        return gallery_cards(ctx, picked(model), picked(analysis), picked(layer))
