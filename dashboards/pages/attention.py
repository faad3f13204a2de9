"""Attention heads: pick a prompt, a layer and a head; see that head's query x key token heatmap.

Patterns come from the run when it stored ``blocks.*.attn.pattern`` per token (pooling none), else
they are computed live from the run's model (`dashboards.attention`). Page arguments: ``run``,
optional ``layer``, ``head`` and ``sample`` (a prompt's sample_id).
"""

from __future__ import annotations

import dash
import dash_bootstrap_components as dbc
import numpy as np
import pandas as pd
from dash import Input, Output, State, dcc, html

from neuronmap import viz
from neuronmap.errors import NeuronMapError

from .. import attention
from ..components import card, error_state, graph, header, href, labelled, options
from ..runstate import prompts_unreadable

PATH = "/attention"
TITLE = "Attention heads"
IN_NAV = False
PROMPT_OPTIONS = 50


def _prompt_options(prompts, search: str | None, keep: int | None) -> list[dict]:
    """At most `PROMPT_OPTIONS` prompts whose text holds every word of `search`, plus the chosen one."""
    frame = prompts
    for word in (search or "").lower().split():
        frame = frame[frame["text"].astype(str).str.lower().str.contains(word, regex=False)]
    frame = frame.head(PROMPT_OPTIONS)
    if keep is not None and keep not in set(frame["sample_id"].tolist()):
        frame = pd.concat([prompts[prompts["sample_id"] == keep].head(1), frame])
    return [{"label": f"#{int(s)}: {str(t)[:90]}", "value": int(s)} for s, t in zip(frame["sample_id"], frame["text"])]


def _heads(run, layer: str, live: bool) -> int:
    if not live:
        return int(run.layer_info(layer).shape[0])
    config = attention.live_model(run).model.config
    config = getattr(config, "get_text_config", lambda: config)()
    for name in ("num_attention_heads", "n_head", "num_heads"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return 1


def pick_sample(prompts: pd.DataFrame, asked: str | None) -> tuple[int, str | None]:
    """The sample_id to show for the page argument `asked`, and a note when it named no prompt of the run
    (then the first prompt is shown)."""
    first = int(prompts["sample_id"].iloc[0])
    if asked in (None, ""):
        return first, None
    try:
        sample = int(asked)
    except (TypeError, ValueError):
        return first, f"sample={asked!r} is not a sample_id: showing the first prompt (#{first})"
    if not (prompts["sample_id"] == sample).any():
        return first, f"no prompt with sample_id {sample} in this run: showing the first prompt (#{first})"
    return sample, None


def layout(ctx, query: dict) -> html.Div:
    repo = ctx.repository
    run_id = query.get("run", "")
    run = repo.run(run_id)
    title = header("Attention heads", [dcc.Link(run_id, href=href("/run", run=run_id)), f" · {run.manifest.model}"])
    try:
        prompts = repo.prompts(run_id)
    except NeuronMapError:
        reason = prompts_unreadable(run_id)
        return html.Div([title, error_state(reason[0].upper() + reason[1:] + ".",
                                            title="Attention needs the run's prompts")])
    if prompts.empty:
        return html.Div([title, error_state(f"run {run_id} has no prompts.",
                                            title="Attention needs the run's prompts")])
    layers = attention.stored_layers(run)
    live = not layers
    if live:
        try:
            layers = attention.live_layers(run)
        except NeuronMapError as error:
            return html.Div([title, error_state(str(error), title="Attention cannot be computed for this run")])
    source = ("patterns stored in the run (pooling none)" if not live else
              f"computed live from {run.manifest.model} for the chosen prompt (the run stores no per-token patterns)")
    layer = query.get("layer") if query.get("layer") in layers else layers[0]
    n_heads = _heads(run, layer, live)
    try:
        head = min(max(int(query.get("head", 0)), 0), n_heads - 1)
    except (TypeError, ValueError):
        head = 0
    sample, note = pick_sample(prompts, query.get("sample"))
    controls = dbc.Row([
        dbc.Col(labelled("Prompt", dcc.Dropdown(id="attention-prompt", value=sample, clearable=False,
                                                options=_prompt_options(prompts, None, sample),
                                                placeholder="type words of a prompt"), "attention-prompt"), md=6),
        dbc.Col(labelled("Layer", dbc.Select(id="attention-layer", options=options(layers), value=layer),
                         "attention-layer"), md=3),
        dbc.Col(labelled("Head", dbc.Select(id="attention-head", value=str(head),
                                            options=options(range(n_heads))), "attention-head"), md=3),
    ], className="g-2")
    return html.Div([
        title,
        dcc.Store(id="attention-key", data={"run": run_id, "live": live}),
        html.Div(source, className="small text-muted mb-2", id="attention-source"),
        dbc.Alert(note, color="warning", className="py-1 small", id="attention-note") if note else None,
        controls,
        card("Attention pattern", html.Div(id="attention-caption", className="small text-muted"),
             graph({}, id="attention-graph", height=620)),
    ])


def figure(repo, run_id: str, layer: str, sample: int, head: int):
    """(figure, caption, number of heads, head drawn) of one prompt's pattern in `layer`; head clamped."""
    run = repo.run(run_id)
    found = attention.patterns_for(run, layer, int(sample))
    n_heads = found.pattern.shape[0]
    head = min(max(int(head or 0), 0), n_heads - 1)
    q, k = found.pattern.shape[1:]
    fig = viz.attention_heatmap(found.pattern, found.tokens or None, head=head,
                                title=f"{layer} · head {head} · prompt #{int(sample)}")
    row_sums = found.pattern[head].sum(axis=1)
    caption = (f"{found.source}: {q} query x {k} key tokens, head {head} of {n_heads}; "
               f"rows sum to {float(np.min(row_sums)):.3f}..{float(np.max(row_sums)):.3f}"
               + (f". {found.note}" if found.note else ""))
    return fig, caption, n_heads, head


def register(app, ctx) -> None:
    repo = ctx.repository

    @app.callback(Output("attention-prompt", "options"), Input("attention-prompt", "search_value"),
                  State("attention-prompt", "value"), State("attention-key", "data"), prevent_initial_call=True)
    def search(text, value, key):
        return _prompt_options(repo.prompts(key["run"]), text, value)

    @app.callback(Output("attention-graph", "figure"), Output("attention-caption", "children"),
                  Output("attention-head", "options"), Output("attention-head", "value"),
                  Input("attention-prompt", "value"), Input("attention-layer", "value"),
                  Input("attention-head", "value"), State("attention-key", "data"))
    def draw(sample, layer, head, key):
        return draw_pattern(repo, key["run"], sample, layer, head)


def draw_pattern(repo, run_id: str, sample, layer: str, head) -> tuple:
    """(figure, caption, head options, head) for the callback; on a problem an empty figure and the reason,
    with the Head select left as it is (`dash.no_update`)."""
    if sample in (None, ""):
        return {}, "Pick a prompt.", dash.no_update, dash.no_update
    try:
        fig, caption, n_heads, head = figure(repo, run_id, layer, int(sample), int(head or 0))
    except (NeuronMapError, TypeError, ValueError) as error:
        return {}, error_state(str(error), title="This pattern cannot be shown"), dash.no_update, dash.no_update
    return fig, caption, options(range(n_heads)), str(head)
