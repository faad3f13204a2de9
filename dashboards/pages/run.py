"""Run: its manifest, layers with shapes, analyses, and a prompt browser with labels (paged on the server)."""

from __future__ import annotations

import json

import dash_bootstrap_components as dbc
import pandas as pd
from dash import Input, Output, State, dash_table, dcc, html

from .. import runstate
from ..artifacts import damaged_in
from ..components import ANY, card, empty_state, error_state, header, href, kv_table, labelled, options, picked, status_badge

PATH = "/run"
TITLE = "Run"
IN_NAV = False
PAGE_SIZE = 15


def _layers_table(run, run_id: str) -> dbc.Table:
    rows = []
    for name, info in run.manifest.layers.items():
        committed = sum(s.rows[1] - s.rows[0] for s in run.shards(name))
        expected = run.manifest.expected_rows(name)
        rows.append(html.Tr([
            html.Td(dcc.Link(name, href=href("/layer", run=run_id, layer=name), className="layer-link")),
            html.Td(info.kind), html.Td(" x ".join(map(str, info.shape))), html.Td(info.dtype),
            html.Td("yes" if info.per_token else "no"), html.Td(len(run.shards(name))),
            html.Td(f"{committed:,} / {expected:,}" if expected is not None else f"{committed:,}")]))
    head = html.Thead(html.Tr([html.Th(c, scope="col") for c in
                               ("Layer", "Kind", "Shape", "Dtype", "Per token", "Shards", "Rows")]))
    return dbc.Table([head, html.Tbody(rows)], size="sm", hover=True, responsive=True, id="layers-table")


def _artifacts_list(ctx, run_id: str):
    artifacts = ctx.repository.artifacts(run_id)
    damaged = damaged_in(ctx.repository, run_id)
    if not artifacts and not damaged:
        return empty_state("No analyses yet.", dcc.Link("Launch one", href=href("/launch", run=run_id)))
    items = [html.Li([dcc.Link(a.analysis, href=href("/artifact", run=run_id, id=a.id)),
                      html.Span(f" {a.id} · {', '.join(a.result.get('layers', [])[:4])}", className="small text-muted"),
                      _stale_badge(ctx, run_id, a)])
             for a in artifacts]
    items += [html.Li([html.Span(artifact_id), " ", status_badge("damaged"),
                       html.Div(reason, className="small text-danger text-break")], className="damaged-artifact")
              for artifact_id, reason in damaged]
    return html.Ul(items, className="mb-0")


def _stale_badge(ctx, run_id: str, artifact):
    """A badge on an artifact computed on an earlier state of the run (before it gained or changed shards)."""
    if ctx.repository.current(run_id, artifact) is not False:
        return None
    return dbc.Badge("earlier state of the run", color="warning", text_color="dark", className="ms-1 stale-artifact",
                     title="computed before the run gained or changed shards: re-run the analysis for current numbers")


def layout(ctx, query: dict) -> html.Div:
    run_id = query.get("run", "")
    run = ctx.repository.run(run_id)
    m = run.manifest
    summary = {"model": m.model, "status": m.status, "samples": m.n_samples, "tokens": m.n_tokens,
               "layers": len(m.layers), "format": f"{m.format} ({m.compression or 'no compression'})",
               "pooling": m.pooling, "dtype": m.dtype, "tokenizer": m.tokenizer, "max length": m.max_length,
               "truncated prompts": m.n_truncated, "prompt source": m.prompt_source, "created": m.created,
               "updated": m.updated, "neuronmap": m.neuronmap_version}
    raw = m.model_dump(mode="json")
    raw["shards"] = f"{len(m.shards)} shards (see manifest.json)"
    alerts = []
    if m.status == "failed":
        alerts.append(dbc.Alert(f"This run failed: {m.error}. Re-run the same extract command to resume it.",
                                color="danger"))
    elif m.status == "running" and runstate.is_interrupted(run.path, m):
        alerts.append(dbc.Alert([html.Div(runstate.interrupted_message(run.path, m, runstate.progress(m)) + ":"),
                                 html.Code(runstate.resume_command(run.path, m), className="d-block mt-1 text-break"),
                                 html.Div("Meanwhile pages show its committed shards.", className="small mt-1")],
                                color="warning", id="run-interrupted"))
    elif m.status == "running":
        alerts.append(dbc.Alert("This run is still being extracted: pages show its committed shards.",
                                color="warning"))
    try:
        columns = ctx.repository.label_columns(run_id)
        prompts_error = None
    except Exception:  # unreadable prompts.parquet: the rest of the page still works
        reason = runstate.prompts_unreadable(run_id)
        columns, prompts_error = [], reason[0].upper() + reason[1:]
    browser = error_state(prompts_error, title="Prompts cannot be read") if prompts_error else html.Div([
        dbc.Row([
            dbc.Col(labelled("Search prompts", dbc.Input(id="prompt-search", type="search", debounce=True,
                                                         placeholder="words in the text"), "prompt-search"), md=6),
            dbc.Col(labelled("Label column", dbc.Select(id="prompt-label-column", value=ANY,
                                                        options=options(columns, blank="(no filter)")),
                             "prompt-label-column"), md=3),
            dbc.Col(labelled("Label value", dbc.Input(id="prompt-label-value", debounce=True,
                                                      placeholder="value (any case)"),
                             "prompt-label-value"), md=3),
        ], className="g-2"),
        html.Div(id="prompt-count", className="small text-muted mb-1"),
        dash_table.DataTable(id="prompt-table", page_current=0, page_size=PAGE_SIZE, page_action="custom",
                             columns=[{"name": c, "id": c} for c in ["sample_id", "text", *columns]],
                             style_table={"overflowX": "auto"},
                             style_cell={"fontSize": "0.85rem", "textAlign": "left", "whiteSpace": "normal",
                                         "maxWidth": "560px", "padding": "4px 8px"},
                             style_header={"fontWeight": "600", "backgroundColor": "#f1f3f5"}),
    ])
    if ctx.prefetch is not None:
        ctx.prefetch.schedule(run_id)
    actions = [dbc.Button("Attention heads", href=href("/attention", run=run_id), color="secondary", outline=True,
                          size="sm", id="run-attention-link"),
               dbc.Button("Compare layers", href=href("/compare", run=run_id), color="secondary", outline=True,
                          size="sm"),
               dbc.Button("Launch analysis", href=href("/launch", run=run_id), color="primary", size="sm")]
    return html.Div([
        header(run_id, [status_badge(m.status), f" {m.model} · {m.n_samples:,} samples · {len(m.layers)} layers"],
               *actions),
        *alerts,
        dcc.Store(id="run-id", data=run_id),
        dbc.Row([
            dbc.Col(card("Manifest", kv_table(summary),
                         html.Details([html.Summary("manifest.json"),
                                       html.Pre(json.dumps(raw, indent=2), className="small manifest-json")])), lg=5),
            dbc.Col([card("Layers", _layers_table(run, run_id)), card("Analyses", _artifacts_list(ctx, run_id))], lg=7),
        ]),
        card("Prompts", browser),
    ])


TRUE_WORDS, FALSE_WORDS = {"true", "yes", "1"}, {"false", "no", "0"}


def label_matches(values: pd.Series, value: str) -> pd.Series:
    """Which `values` equal the typed `value`: booleans from true/false/yes/no/1/0, numbers by value
    (``1`` finds 1.0), text ignoring case and surrounding spaces."""
    typed = str(value).strip().lower()
    if pd.api.types.is_bool_dtype(values):
        if typed in TRUE_WORDS | FALSE_WORDS:
            return values == (typed in TRUE_WORDS)
    elif pd.api.types.is_numeric_dtype(values):
        try:
            return values == float(typed)
        except ValueError:
            pass
    return values.astype(str).str.strip().str.lower() == typed


def filter_prompts(prompts: pd.DataFrame, search: str | None, column: str | None, value: str | None) -> pd.DataFrame:
    """Rows whose text contains every word of `search` and whose `column` equals `value` (both ignoring case)."""
    mask = pd.Series(True, index=prompts.index)
    for word in (search or "").lower().split():
        mask &= prompts["text"].astype(str).str.lower().str.contains(word, regex=False)
    if column and column in prompts.columns and value not in (None, ""):
        mask &= label_matches(prompts[column], value)
    return prompts[mask]


def register(app, ctx) -> None:
    @app.callback(Output("prompt-table", "data"), Output("prompt-table", "page_count"), Output("prompt-count", "children"),
                  Input("prompt-table", "page_current"), Input("prompt-search", "value"),
                  Input("prompt-label-column", "value"), Input("prompt-label-value", "value"), State("run-id", "data"))
    def prompt_page(page, search, column, value, run_id):
        prompts = ctx.repository.prompts(run_id)
        found = filter_prompts(prompts, search, picked(column), value)
        page = int(page or 0)
        part = found.iloc[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]
        records = [{k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in row.items()}
                   for row in part.to_dict("records")]
        pages = max(1, -(-len(found) // PAGE_SIZE))
        return records, pages, f"{len(found):,} of {len(prompts):,} prompts"
