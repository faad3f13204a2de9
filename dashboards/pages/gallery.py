"""Analysis gallery: a card per artifact across every run, filtered by model, analysis and layer."""

from __future__ import annotations

import dash_bootstrap_components as dbc
from dash import Input, Output, dcc, html

from ..artifacts import headline
from ..components import ANY, empty_state, format_value, header, href, labelled, options, picked

PATH = "/gallery"
TITLE = "Analysis gallery"
IN_NAV = True
MAX_CARDS = 200


def layout(ctx, query: dict) -> html.Div:
    pairs = ctx.repository.all_artifacts()
    models = sorted({entry.model for entry, _ in pairs})
    analyses = sorted({artifact.analysis for _, artifact in pairs})
    layers = sorted({layer for _, artifact in pairs for layer in artifact.result.get("layers", [])})
    controls = dbc.Row([
        dbc.Col(labelled("Model", dbc.Select(id="gallery-model", options=options(models, blank="any model"),
                                             value=query.get("model") or ANY), "gallery-model"), md=4),
        dbc.Col(labelled("Method", dbc.Select(id="gallery-analysis", options=options(analyses, blank="any analysis"),
                                              value=query.get("analysis") or ANY), "gallery-analysis"), md=4),
        dbc.Col(labelled("Layer", dbc.Select(id="gallery-layer", options=options(layers, blank="any layer"),
                                             value=query.get("layer") or ANY), "gallery-layer"), md=4),
    ], className="g-2")
    return html.Div([header("Analysis gallery", f"{len(pairs)} artifact(s) in {len(ctx.repository.runs())} run(s)"),
                     controls, dcc.Loading(html.Div(id="gallery-cards"), type="circle")])


def _card(entry, artifact) -> dbc.Col:
    numbers = headline(artifact)
    layers = artifact.result.get("layers", [])
    body = [
        html.H2(dcc.Link(artifact.analysis, href=href("/artifact", run=entry.id, id=artifact.id),
                         className="stretched-link text-decoration-none"), className="h5 card-title mb-1"),
        html.Div(f"{entry.id} · {entry.model}", className="small text-muted text-break"),
        html.Div(f"layers: {', '.join(layers[:4])}{' ...' if len(layers) > 4 else ''}", className="small"),
        html.Ul([html.Li([html.Span(f"{key}: "), html.Strong(format_value(value))]) for key, value in numbers.items()],
                className="small list-unstyled mb-1 mt-2"),
        html.Div(f"{artifact.id} · {str(artifact.result.get('created', ''))[:19].replace('T', ' ')}",
                 className="small text-muted"),
    ]
    if artifact.warnings:
        body.append(dbc.Badge(f"{len(artifact.warnings)} warning(s)", color="warning", text_color="dark"))
    return dbc.Col(dbc.Card(dbc.CardBody(body), className="h-100 artifact-card shadow-sm"), md=6, lg=4, xl=3,
                   className="mb-3")


def register(app, ctx) -> None:
    @app.callback(Output("gallery-cards", "children"), Input("gallery-model", "value"),
                  Input("gallery-analysis", "value"), Input("gallery-layer", "value"))
    def cards(model, analysis, layer):
        pairs = ctx.repository.all_artifacts()
        if not pairs:
            return empty_state("No analyses yet.", ["Run ", html.Code("neuronmap analyze RUN stats"),
                                                    " or use ", dcc.Link("Launch", href="/launch"), "."])
        model, analysis, layer = picked(model), picked(analysis), picked(layer)
        shown = [(e, a) for e, a in pairs if (not model or e.model == model) and (not analysis or a.analysis == analysis)
                 and (not layer or layer in a.result.get("layers", []))]
        if not shown:
            return empty_state("No artifact matches these filters.")
        extra = [html.P(f"showing the newest {MAX_CARDS} of {len(shown)}", className="small text-muted")] \
            if len(shown) > MAX_CARDS else []
        return html.Div([*extra, dbc.Row([_card(e, a) for e, a in shown[:MAX_CARDS]], id="gallery-grid")])
