"""Dendrograms of hierarchical clusterings, from a scipy linkage matrix or stored dendrogram coordinates."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go

from ._common import PALETTE


def dendrogram_figure(icoord: np.ndarray, dcoord: np.ndarray, leaf_labels: Sequence[str] | None = None,
                      title: str | None = None) -> go.Figure:
    """Draw scipy's dendrogram coordinates (``dendrogram(Z, no_plot=True)["icoord"/"dcoord"]``).

    Parameters
    ----------
    icoord, dcoord : array-like of shape (n_links, 4)
        x and height of each link's four corners.
    leaf_labels : sequence of str, optional
        Label of each leaf, left to right (scipy's ``ivl``); leaves sit at x = 5, 15, 25, ...

    Returns
    -------
    go.Figure
        One line trace; its x (y) is every link's 4 icoord (dcoord) values followed by None.
    """
    icoord = np.asarray(icoord, dtype=np.float64).reshape(-1, 4)
    dcoord = np.asarray(dcoord, dtype=np.float64).reshape(-1, 4)
    if icoord.shape != dcoord.shape:
        raise ValueError(f"icoord {icoord.shape} and dcoord {dcoord.shape} must have the same shape")
    xs: list = []
    ys: list = []
    for xi, yi in zip(icoord, dcoord):
        xs.extend([*xi.tolist(), None])
        ys.extend([*yi.tolist(), None])
    fig = go.Figure(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color=PALETTE[0], width=1), hoverinfo="y",
                               name="links"))
    labels = list(leaf_labels or [])
    fig.update_layout(title=title or "dendrogram", template="plotly_white", showlegend=False,
                      margin=dict(l=50, r=20, t=50, b=80))
    fig.update_yaxes(title_text="merge distance")
    if labels:
        show = len(labels) <= 80
        fig.update_xaxes(tickmode="array", tickvals=[5 + 10 * i for i in range(len(labels))],
                         ticktext=[str(v) for v in labels], showticklabels=show, title_text="samples" if show else
                         f"{len(labels)} leaves")
    return fig


def dendrogram_from_linkage(linkage: np.ndarray, labels: Sequence[str] | None = None, truncate: int = 0,
                            title: str | None = None) -> go.Figure:
    """`dendrogram_figure` of a scipy linkage matrix (n - 1, 4); `truncate` > 0 shows the last p merges."""
    from scipy.cluster.hierarchy import dendrogram

    kwargs = {"truncate_mode": "lastp", "p": int(truncate)} if truncate else {}
    tree = dendrogram(np.asarray(linkage, dtype=np.float64), no_plot=True,
                      labels=None if labels is None else list(labels), **kwargs)
    return dendrogram_figure(tree["icoord"], tree["dcoord"], tree["ivl"], title=title)
