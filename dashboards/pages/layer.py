"""Layer explorer: statistics, distributions, top neurons and a PCA / t-SNE scatter; click a point for its prompt."""

from __future__ import annotations

import dash_bootstrap_components as dbc
import numpy as np
from dash import Input, Output, State, dcc, html

from neuronmap import viz
from neuronmap.errors import NeuronMapError

from .. import layerview, runstate
from ..components import ANY, card, empty_state, error_state, frame_table, graph, header, href, labelled, options, picked

PATH = "/layer"
TITLE = "Layer explorer"
IN_NAV = False


def layout(ctx, query: dict) -> html.Div:
    repo = ctx.repository
    run_id = query.get("run", "")
    run = repo.run(run_id)
    layer = query.get("layer") or run.layers[0]
    if layer not in run.layers:
        return error_state(f"layer {layer!r} is not in run {run_id}; it holds: {', '.join(run.layers)}")
    info = run.layer_info(layer)
    stats, source = layerview.neuron_stats(repo, run_id, layer)
    try:
        colour_choices = [*repo.label_columns(run_id)]
        prompts_note = None
    except NeuronMapError:  # a damaged prompts.parquet: the activations can still be explored
        colour_choices = []
        prompts_note = dbc.Alert(runstate.prompts_unreadable(run_id), color="warning", className="py-1 small",
                                 id="layer-prompts-unreadable")
    if layerview.clusters(repo, run_id, layer) is not None:
        colour_choices.append("cluster")
    methods = [{"label": "PCA", "value": "pca"}]
    if repo.newest(run_id, "tsne", layer, current=True) is not None:
        methods.append({"label": "t-SNE", "value": "tsne"})
    top = stats.sort_values("mean_abs", ascending=False, kind="stable").head(20) if "mean_abs" in stats else stats.head(20)
    pills = dbc.Nav([dbc.NavItem(dbc.NavLink(name, href=href("/layer", run=run_id, layer=name), active=name == layer))
                     for name in run.layers], pills=True, className="flex-wrap mb-3", id="layer-nav")
    scatter_controls = dbc.Row([
        dbc.Col(labelled("Projection", dbc.RadioItems(id="scatter-method", options=methods, value="pca", inline=True),
                         "scatter-method"), md=4),
        dbc.Col(labelled("Colour by", dbc.Select(id="scatter-colour", options=options(colour_choices, blank="none"),
                                                 value=colour_choices[0] if colour_choices else ANY),
                         "scatter-colour"), md=4),
        dbc.Col(labelled("Dimensions", dbc.RadioItems(id="scatter-dims", options=[{"label": "2-D", "value": 2},
                                                                                  {"label": "3-D", "value": 3}],
                                                      value=2, inline=True), "scatter-dims"), md=4),
    ], className="g-2")
    distribution_controls = dbc.Row([
        dbc.Col(labelled("Values", dbc.Select(id="dist-what", value="values", options=[
            {"label": "activation values (sample)", "value": "values"}, {"label": "per-neuron mean", "value": "mean"},
            {"label": "per-neuron std", "value": "std"}]), "dist-what"), md=6),
        dbc.Col(labelled("Chart", dbc.RadioItems(id="dist-kind", value="histogram", inline=True, options=[
            {"label": "histogram", "value": "histogram"}, {"label": "violin", "value": "violin"}]), "dist-kind"), md=6),
    ], className="g-2")
    heads = [dbc.Button("View attention heads", href=href("/attention", run=run_id, layer=layer), size="sm",
                        color="secondary", outline=True)] if info.kind == "pattern" and info.per_token else []
    notes = [pattern_note(run_id, layer, info)] if info.kind == "pattern" else []
    if prompts_note is not None:
        notes.append(prompts_note)
    return html.Div([
        header(f"{layer}", [dcc.Link(run_id, href=href("/run", run=run_id)),
                            f" · {info.kind} · shape {' x '.join(map(str, info.shape))} · {run.n_rows(layer):,} rows"],
               *heads),
        pills,
        *notes,
        dcc.Store(id="layer-key", data={"run": run_id, "layer": layer}),
        dbc.Row([
            dbc.Col(card("Projection", scatter_controls, html.Div(id="scatter-source", className="small text-muted"),
                         graph({}, id="layer-scatter", height=520)), lg=8),
            dbc.Col(card("Selected point", html.Div(empty_state("Click a point of the scatter to see its prompt and "
                                                                "its most active neurons."), id="point-details")),
                    lg=4),
        ]),
        dbc.Row([
            dbc.Col(card("Top neurons", html.Div(source, className="small text-muted"),
                         graph(viz.neuron_ranking(top["neuron"].tolist(), top.get("mean_abs", top.iloc[:, 1]).tolist(),
                                                  title="mean |activation|", value_title="mean |x|"),
                               id="top-neurons", height=460)), lg=4),
            dbc.Col(card("Distributions", distribution_controls, graph({}, id="layer-distribution", height=400)), lg=8),
        ]),
        card("Activations of the top neurons", graph({}, id="layer-heatmap", height=460)),
        card("Statistics per neuron", html.Div(source, className="small text-muted mb-1"),
             frame_table(stats, id="stats-table", page_size=10)),
    ])


def pattern_note(run_id: str, layer: str, info) -> dbc.Alert:
    """What the "neurons" of an attention-pattern layer are: one attention weight per (head, key position).

    The key axis is zero-padded to the run's longest prompt (and keys after a causal query are 0), so
    the statistics below count those zeros; the Attention page cuts each prompt's pattern to its tokens.
    """
    heads, keys = (info.shape[0], info.shape[-1]) if len(info.shape) >= 2 else (None, None)
    shape = f" ({heads} heads x {keys} key positions)" if heads else ""
    return dbc.Alert([
        f"This layer holds attention weights, not neuron activations: each \"neuron\" is one (head, key position) "
        f"pair{shape}, neuron = head x {keys or 'keys'} + key. The key axis is zero-padded to the longest prompt, "
        "so the statistics, distributions and projection below include those padding zeros. ",
        dcc.Link("See the Attention page", href=href("/attention", run=run_id, layer=layer)),
        " for each prompt's heads cut to its tokens.",
    ], color="info", className="small py-2", id="pattern-note")


def _failed(error: Exception) -> dict:
    """An empty figure whose title says why (a run deleted or rewritten while its page is open)."""
    return viz.metric_bars([], {}, title=f"cannot be shown: {error}")


def register(app, ctx) -> None:
    repo = ctx.repository

    @app.callback(Output("layer-scatter", "figure"), Output("scatter-source", "children"),
                  Input("scatter-method", "value"), Input("scatter-colour", "value"), Input("scatter-dims", "value"),
                  State("layer-key", "data"))
    def scatter(method, colour_by, dims, key):
        try:
            return draw_scatter(repo, key["run"], key["layer"], method or "pca", int(dims or 2), picked(colour_by))
        except NeuronMapError as error:
            return {}, error_state(str(error), title="This layer cannot be shown")

    @app.callback(Output("point-details", "children"), Input("layer-scatter", "clickData"), State("layer-key", "data"),
                  prevent_initial_call=True)
    def details(click, key):
        if not click or not click.get("points"):
            return empty_state("Click a point of the scatter.")
        point = click["points"][0]
        row = point.get("customdata")
        if isinstance(row, list):
            row = row[0]
        try:
            values, sample_id = repo.row(key["run"], key["layer"], int(row))
            token = layerview.token_labels(repo, key["run"], key["layer"], np.array([int(row)]), np.array([sample_id]))
            prompts = repo.prompts(key["run"])
        except (NeuronMapError, TypeError, ValueError) as error:
            return error_state(str(error), title="This point cannot be shown")
        match = prompts[prompts["sample_id"] == sample_id]
        labels = {} if match.empty else {k: v for k, v in match.iloc[0].items() if k not in ("text", "sample_id")}
        text = "" if match.empty else str(match.iloc[0]["text"])
        top = np.argsort(-np.abs(values), kind="stable")[:10]
        return html.Div([
            html.P([html.Strong(f"sample {sample_id}"),
                    html.Strong(f" · {token[0]}", id="point-token") if token is not None else None,
                    html.Span(f" · row {int(row)}", className="text-muted")], className="mb-1"),
            html.Blockquote(text, className="prompt-text border-start ps-2", id="point-prompt"),
            html.Div([dbc.Badge(f"{k}: {v}", color="light", text_color="dark", className="me-1") for k, v in labels.items()],
                     className="mb-2"),
            dcc.Graph(figure=viz.neuron_ranking(top.tolist(), values[top].tolist(), title="its top neurons (|x|)",
                                                value_title="activation"), config={"displaylogo": False},
                      style={"height": "320px"}),
        ])

    @app.callback(Output("layer-distribution", "figure"), Input("dist-what", "value"), Input("dist-kind", "value"),
                  State("layer-key", "data"))
    def distribution(what, kind, key):
        try:
            return draw_distribution(repo, key["run"], key["layer"], what, kind)
        except NeuronMapError as error:
            return _failed(error)

    @app.callback(Output("layer-heatmap", "figure"), Input("layer-key", "data"))
    def heatmap(key):
        try:
            found = layerview.summary(repo, key["run"], key["layer"])
            unit = "token rows" if repo.run(key["run"]).layer_info(key["layer"]).per_token else "samples"
        except NeuronMapError as error:
            return _failed(error)
        return viz.activation_heatmap(found.heat_x, neurons=found.top,
                                      row_labels=[f"#{int(s)}" for s in found.heat_ids], max_rows=layerview.HEAT_ROWS,
                                      title=f"{len(found.heat_x)} {unit} x top {len(found.top)} neurons by mean |x|")


def draw_scatter(repo, run_id: str, layer: str, method: str, dims: int, colour_by):
    """(figure, caption) of the layer's projection; an empty figure and the reason when there is none."""
    proj = layerview.projection(repo, run_id, layer, method, dims)
    if proj is None:
        return {}, "no projection: this layer has fewer than 2 features, or no current t-SNE artifact"
    have = proj.coords.shape[1]
    if have < dims:
        if method == "tsne":
            return {}, (f"No {dims}-D view: the t-SNE {proj.source} has {have} dimensions; run tsne with "
                        f"--param n_components={dims} for one.")
        return {}, (f"No {dims}-D view: {len(proj.rows):,} rows give only {have} principal coordinates "
                    f"(PCA {proj.source}).")
    values, title = layerview.colour(repo, run_id, layer, colour_by, proj)
    tokens = layerview.token_labels(repo, run_id, layer, proj.rows, proj.sample_ids)
    hover = layerview.texts(repo, run_id, proj.sample_ids, tokens)
    kwargs = dict(color=values, color_title=title, hover=hover, ids=proj.rows, title=f"{method.upper()} · {layer}")
    if method == "tsne":
        fig = viz.tsne_scatter(proj.coords[:, :dims], **kwargs)
    else:
        fig = viz.pca_scatter(proj.coords, proj.explained, dims=dims, **kwargs)
    return fig, f"{proj.method.upper()} {proj.source}; {fig.layout.meta['n_shown']:,} points drawn"


def draw_distribution(repo, run_id: str, layer: str, what: str, kind: str):
    if what in ("mean", "std"):
        stats, _ = layerview.neuron_stats(repo, run_id, layer)
        values = stats[what].to_numpy()
        title = f"per-neuron {what} · {layer}"
    else:
        found = layerview.summary(repo, run_id, layer)
        values = found.values
        title = f"activation values · {layer} (sample of {found.n_sample:,} rows)"
    return viz.layer_distributions({layer: values}, kind=kind or "histogram", title=title,
                                   value_title="activation" if what == "values" else what)
