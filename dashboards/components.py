"""Small building blocks every page uses: links, tables, graphs, empty and error states."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable
from urllib.parse import urlencode

import dash_bootstrap_components as dbc
import pandas as pd
from dash import dash_table, dcc, html

STATUS_COLOURS = {"complete": "success", "running": "warning", "failed": "danger", "corrupt": "danger",
                  "done": "success", "queued": "secondary"}
GRAPH_CONFIG = {"displaylogo": False, "responsive": True}


@dataclass
class Context:
    """What every page's layout and callbacks get: the data repository, the job manager and the prefetcher."""

    repository: Any
    jobs: Any
    prefetch: Any = None


def href(path: str, **query: Any) -> str:
    """``/run?run=demo%2Fminilm`` (values URL-encoded; None left out)."""
    query = {k: v for k, v in query.items() if v is not None}
    return f"{path}?{urlencode(query)}" if query else path


def status_badge(status: str) -> dbc.Badge:
    return dbc.Badge(status, color=STATUS_COLOURS.get(status, "secondary"), className="status-badge")


def header(title: str, subtitle: Any = None, *actions: Any) -> html.Div:
    return html.Div([
        html.Div([html.H1(title, className="h3 mb-1"),
                  html.Div(subtitle, className="text-muted small") if subtitle is not None else None]),
        html.Div(list(actions), className="d-flex gap-2 flex-wrap"),
    ], className="d-flex justify-content-between align-items-start flex-wrap gap-2 mb-3")


def error_state(message: str, title: str = "This page cannot be shown") -> dbc.Alert:
    """A red alert: what is wrong and what to do (`role="alert"` for screen readers)."""
    return dbc.Alert([html.H2(title, className="h5"), html.P(message, className="mb-1"),
                      dcc.Link("Back to the runs", href="/")], color="danger", className="error-state")


def empty_state(message: str, hint: Any = None) -> dbc.Alert:
    return dbc.Alert([html.P(message, className="mb-1"), html.Div(hint, className="small") if hint else None],
                     color="secondary", className="empty-state")


def kv_table(items: dict[str, Any]) -> dbc.Table:
    rows = [html.Tr([html.Th(key, scope="row", className="text-nowrap"), html.Td(format_value(value))])
            for key, value in items.items()]
    return dbc.Table(html.Tbody(rows), bordered=False, size="sm", className="kv-table")


def format_value(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def frame_table(frame: pd.DataFrame, id: str | None = None, page_size: int = 10, **kwargs: Any) -> dash_table.DataTable:
    """A sortable DataTable of `frame` (floats shown with 4 significant digits)."""
    columns = []
    for column in frame.columns:
        spec = {"name": str(column), "id": str(column)}
        if pd.api.types.is_float_dtype(frame[column]):
            spec.update(type="numeric", format=dash_table.Format.Format(precision=4,
                                                                        scheme=dash_table.Format.Scheme.decimal_or_exponent))
        columns.append(spec)
    options = dict(columns=columns, data=frame.to_dict("records"), page_size=page_size, sort_action="native",
                   style_table={"overflowX": "auto"}, style_cell={"fontSize": "0.85rem", "padding": "4px 8px",
                                                                  "textAlign": "left", "maxWidth": "480px",
                                                                  "whiteSpace": "normal"},
                   style_header={"fontWeight": "600", "backgroundColor": "#f1f3f5"})
    options.update(kwargs)
    if id is not None:
        options["id"] = id
    return dash_table.DataTable(**options)


def graph(figure: Any, id: str | None = None, height: int | None = None) -> dcc.Loading:
    """A dcc.Graph inside a loading spinner."""
    options = {"figure": figure, "config": GRAPH_CONFIG}
    if height:
        options["style"] = {"height": f"{height}px"}
    if id is not None:
        options["id"] = id
    return dcc.Loading(dcc.Graph(**options), type="circle")


def card(title: str, *children: Any, className: str = "mb-3") -> dbc.Card:
    return dbc.Card([dbc.CardHeader(html.H2(title, className="h6 mb-0")), dbc.CardBody(list(children))],
                    className=className)


def labelled(label: str, control: Any, control_id: str, help_text: str | None = None) -> html.Div:
    """A form control with its <label for=...> (and optional help text)."""
    return html.Div([dbc.Label(label, html_for=control_id, className="form-label small fw-semibold mb-1"), control,
                     dbc.FormText(help_text) if help_text else None], className="mb-2")


ANY = "*"
"""The value of a select's "no choice" entry (an empty value would render as a blank select)."""


def picked(value: Any) -> Any:
    """A select's value, None for the "no choice" entry."""
    return None if value in (None, "", ANY) else value


def options(values: Iterable[Any], blank: str | None = None) -> list[dict]:
    out = [{"label": blank, "value": ANY}] if blank is not None else []
    return out + [{"label": str(v), "value": str(v)} for v in values]
