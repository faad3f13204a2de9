"""Distributions per layer, lines across layers, bars of neuron rankings and metrics."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from ._common import MAX_POINTS, PALETTE, decimate

DISTRIBUTION_KINDS = ("violin", "histogram", "box")


def layer_distributions(values: Mapping[str, np.ndarray], kind: str = "violin", title: str | None = None,
                        value_title: str = "value", bins: int = 50, max_points: int = MAX_POINTS,
                        seed: int = 0) -> go.Figure:
    """One violin, box or histogram per layer of the 1-D `values[layer]`.

    Parameters
    ----------
    values : mapping of layer name -> array-like
        Any shape; flattened. More than `max_points` values are decimated to a seeded sample.
    kind : "violin" | "histogram" | "box"
    bins : int
        Histogram bins (plotly bins in the browser; the trace holds the raw values).

    Returns
    -------
    go.Figure
        Trace ``i`` is layer ``i`` (in mapping order); its ``x`` (histogram) or ``y`` (violin, box)
        holds that layer's values (the decimated sample when above `max_points`).
    """
    if kind not in DISTRIBUTION_KINDS:
        raise ValueError(f"kind={kind!r} must be one of {', '.join(DISTRIBUTION_KINDS)}")
    fig = go.Figure()
    for index, (layer, data) in enumerate(values.items()):
        flat = np.asarray(data, dtype=np.float64).ravel()
        flat = flat[decimate(len(flat), max_points, None, seed)]
        colour = PALETTE[index % len(PALETTE)]
        if kind == "histogram":
            fig.add_trace(go.Histogram(x=flat, name=str(layer), nbinsx=bins, opacity=0.6, marker_color=colour))
        elif kind == "violin":
            fig.add_trace(go.Violin(y=flat, name=str(layer), box_visible=True, meanline_visible=True, points=False,
                                    line_color=colour))
        else:
            fig.add_trace(go.Box(y=flat, name=str(layer), marker_color=colour, boxpoints=False))
    if kind == "histogram":
        fig.update_layout(barmode="overlay")
        fig.update_xaxes(title_text=value_title)
        fig.update_yaxes(title_text="count")
    else:
        fig.update_yaxes(title_text=value_title)
        fig.update_xaxes(title_text="layer")
    fig.update_layout(title=title, template="plotly_white", showlegend=kind == "histogram",
                      margin=dict(l=50, r=20, t=50, b=50))
    return fig


def layer_lines(x: Sequence, series: Mapping[str, Sequence[float]], title: str | None = None,
                x_title: str = "layer", y_title: str = "value") -> go.Figure:
    """Lines over `x` (layers, layer transitions or component numbers), one per entry of `series`.

    ``fig.data[i].y`` is ``series[name_i]`` (None/NaN shown as gaps); ``fig.data[i].x`` is `x`.
    """
    x = [str(v) if not isinstance(v, (int, float, np.integer, np.floating)) else v for v in x]
    fig = go.Figure()
    for index, (name, values) in enumerate(series.items()):
        values = [np.nan if v is None else float(v) for v in values]
        if len(values) != len(x):
            raise ValueError(f"series {name!r} has {len(values)} values but x has {len(x)}")
        fig.add_trace(go.Scatter(x=x, y=values, mode="lines+markers", name=str(name),
                                 line=dict(color=PALETTE[index % len(PALETTE)])))
    fig.update_layout(title=title, template="plotly_white", margin=dict(l=50, r=20, t=50, b=50),
                      hovermode="x unified")
    fig.update_xaxes(title_text=x_title)
    fig.update_yaxes(title_text=y_title)
    return fig


def layer_evolution(transitions: Sequence[tuple[str, str]], metrics: Mapping[str, Sequence[float]],
                    title: str | None = None) -> go.Figure:
    """`layer_lines` over consecutive layer pairs, labelled ``"a → b"`` (CKA with the previous layer, drift, ...)."""
    labels = [f"{a} → {b}" for a, b in transitions]
    return layer_lines(labels, metrics, title=title or "layer evolution", x_title="layer transition",
                       y_title="value")


def explained_variance(ratios: Mapping[str, Sequence[float]], cumulative: bool = True,
                       title: str | None = None) -> go.Figure:
    """Explained variance ratio (cumulative by default) against the component number, one line per layer."""
    fig = go.Figure()
    for index, (layer, ratio) in enumerate(ratios.items()):
        ratio = np.asarray(ratio, dtype=np.float64)
        # a NaN ratio (a component the fit could not resolve) adds nothing rather than blanking the rest
        y = np.cumsum(np.nan_to_num(ratio, nan=0.0)) if cumulative else ratio
        fig.add_trace(go.Scatter(x=np.arange(1, len(ratio) + 1), y=y, mode="lines", name=str(layer),
                                 line=dict(color=PALETTE[index % len(PALETTE)])))
    fig.update_layout(title=title or ("cumulative explained variance" if cumulative else "explained variance"),
                      template="plotly_white", margin=dict(l=50, r=20, t=50, b=50))
    fig.update_xaxes(title_text="component")
    fig.update_yaxes(title_text="fraction of variance", range=[0, 1.02] if cumulative else None)
    return fig


def neuron_ranking(neurons: Sequence[int], values: Sequence[float], title: str | None = None,
                   value_title: str = "value") -> go.Figure:
    """Horizontal bars of ranked neurons, the first one at the top.

    ``fig.data[0].x`` is `values`, ``fig.data[0].y`` the labels ``n<neuron>`` in the given order.
    """
    neurons = [int(n) for n in neurons]
    values = [float(v) for v in values]
    if len(neurons) != len(values):
        raise ValueError(f"{len(neurons)} neurons but {len(values)} values")
    fig = go.Figure(go.Bar(x=values, y=[f"n{n}" for n in neurons], orientation="h", marker_color=PALETTE[0],
                           hovertemplate="%{y}: %{x:.4g}<extra></extra>"))
    fig.update_layout(title=title or "neuron ranking", template="plotly_white", margin=dict(l=60, r=20, t=50, b=50))
    fig.update_yaxes(autorange="reversed", type="category", title_text="neuron")
    fig.update_xaxes(title_text=value_title)
    return fig


def metric_bars(units: Sequence[str], metrics: Mapping[str, Sequence[float]], title: str | None = None) -> go.Figure:
    """Grouped bars: one group per unit (layer), one bar per metric. ``fig.data[i].y`` is metric i's values."""
    fig = go.Figure()
    for index, (name, values) in enumerate(metrics.items()):
        values = [np.nan if v is None else float(v) for v in values]
        if len(values) != len(units):
            raise ValueError(f"metric {name!r} has {len(values)} values but there are {len(units)} units")
        fig.add_trace(go.Bar(x=[str(u) for u in units], y=values, name=str(name),
                             marker_color=PALETTE[index % len(PALETTE)]))
    fig.update_layout(title=title, template="plotly_white", barmode="group", margin=dict(l=50, r=20, t=50, b=60))
    return fig
