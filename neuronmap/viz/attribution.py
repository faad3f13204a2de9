"""Figure of token attributions: one row per method, one column per input token (data in, figure out)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from ..token_ids import readable_token


def token_attribution_figure(tokens: Sequence[str], scores: Mapping[str, np.ndarray], title: str = "") -> go.Figure:
    """Heatmap methods x tokens of attribution scores, each row scaled by its largest magnitude.

    Methods live on different scales (saliency is a gradient norm, IG sums to a logit difference), so
    colours compare tokens within a row; the hover shows the raw score.
    """
    methods = list(scores)
    raw = np.array([np.asarray(scores[m], dtype=float) for m in methods]).reshape(len(methods), len(tokens))
    scale = np.abs(raw).max(axis=1, keepdims=True)
    shown = np.divide(raw, scale, out=np.zeros_like(raw), where=scale > 0)
    labels = [f"{i} {readable_token(t)!r}" for i, t in enumerate(tokens)]
    figure = go.Figure(go.Heatmap(
        z=shown, x=labels, y=methods, customdata=raw, zmin=-1, zmax=1, colorscale="RdBu", reversescale=True,
        colorbar={"title": "score / row max"},
        hovertemplate="%{y}<br>token %{x}<br>score %{customdata:.4g}<extra></extra>"))
    figure.update_layout(title=title or "token attribution", xaxis={"title": "input token", "tickangle": -45},
                         yaxis={"title": "method", "autorange": "reversed"}, height=220 + 40 * len(methods),
                         margin={"l": 100, "r": 20, "t": 60, "b": 120})
    return figure
