"""2-D and 3-D scatter plots of per-sample embeddings (PCA projections, t-SNE), coloured by label or cluster."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go

from ._common import MAX_POINTS, PALETTE, as_category_strings, category_order, check_2d, decimate, hover_text

WEBGL_ABOVE = 5_000
"""2-D scatters with more points than this use WebGL (Scattergl); fewer stay SVG (work without a GPU)."""
CONTINUOUS_ABOVE = 30
"""A numeric colour column with more distinct values than this gets a colour scale instead of a legend."""


def _is_continuous(values: np.ndarray) -> bool:
    values = np.asarray(values)
    return values.dtype.kind in "fiu" and values.dtype.kind != "b" and len(np.unique(values)) > CONTINUOUS_ABOVE


def embedding_scatter(coords: np.ndarray, color: Sequence | np.ndarray | None = None,
                      hover: Sequence[str] | None = None, ids: Sequence | np.ndarray | None = None,
                      color_title: str = "label", axis_titles: Sequence[str] | None = None, title: str | None = None,
                      max_points: int = MAX_POINTS, seed: int = 0) -> go.Figure:
    """Scatter of `coords` (n, 2) or (n, 3), one trace per colour category.

    Parameters
    ----------
    coords : ndarray of shape (n_points, 2) or (n_points, 3)
    color : array-like of shape (n_points,), optional
        Labels or cluster ids. Categorical values give one trace (legend entry) each; numeric values
        with more than `CONTINUOUS_ABOVE` distinct values give one trace with a colour scale.
    hover : sequence of str, optional
        Prompt text per point, shown on hover (escaped, wrapped, cut to 240 characters).
    ids : array-like of shape (n_points,), optional
        Stored as each point's ``customdata`` (the dashboard reads the clicked sample from it).
    max_points : int
        At most this many points are drawn: a seeded sample stratified by `color` (`decimate`).

    Returns
    -------
    go.Figure
        Trace ``i`` holds the points of category ``i`` (in `category_order`) in input order; with
        ``ids`` its ``customdata`` is their ids. ``fig.layout.meta`` records ``n_points`` and ``n_shown``.
    """
    coords = check_2d(coords, "coords")
    n, dims = coords.shape
    if dims not in (2, 3):
        raise ValueError(f"coords must have 2 or 3 columns, got {dims}")
    for name, values in (("color", color), ("hover", hover), ("ids", ids)):
        if values is not None and len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries but coords has {n} rows")
    continuous = color is not None and _is_continuous(np.asarray(color))
    finite = np.isfinite(np.asarray(coords, dtype=np.float64)).all(axis=1)
    if finite.all():
        keep = decimate(n, max_points, None if color is None or continuous else color, seed)
    else:  # a point without coordinates cannot be drawn: leave it out of the sample and say so
        rows = np.flatnonzero(finite)
        labels = None if color is None or continuous else np.asarray(color, dtype=object)[rows]
        keep = rows[decimate(len(rows), max_points, labels, seed)]
    shown = coords[keep]
    texts = hover_text(np.asarray(hover, dtype=object)[keep]) if hover is not None else None
    custom = np.asarray(ids)[keep] if ids is not None else None
    titles = list(axis_titles or [f"dim {i + 1}" for i in range(dims)])

    def trace(mask: np.ndarray | slice, name: str | None, marker: dict) -> go.BaseTraceType:
        common = dict(mode="markers", name=name, marker=marker, showlegend=name is not None,
                      hovertext=None if texts is None else [texts[i] for i in np.arange(len(keep))[mask]],
                      # a plain list, not a typed array: Dash's clickData reads customdata[i] from the spec
                      customdata=None if custom is None else custom[mask].tolist(),
                      hoverinfo="text+name" if texts is not None else "x+y+name")
        points = shown[mask]
        if dims == 3:
            return go.Scatter3d(x=points[:, 0], y=points[:, 1], z=points[:, 2], **common)
        kind = go.Scattergl if len(keep) > WEBGL_ABOVE else go.Scatter
        return kind(x=points[:, 0], y=points[:, 1], **common)

    size = 3 if dims == 3 else (4 if len(keep) > 2000 else 7)
    fig = go.Figure()
    if color is None:
        fig.add_trace(trace(slice(None), None, dict(size=size, color=PALETTE[0])))
    elif continuous:
        values = np.asarray(color, dtype=np.float64)[keep]
        fig.add_trace(trace(slice(None), None, dict(size=size, color=values, colorscale="Viridis", showscale=True,
                                                    colorbar=dict(title=dict(text=color_title)))))
    else:
        labels = as_category_strings(color)[keep]
        for index, value in enumerate(category_order(labels)):
            fig.add_trace(trace(labels == value, value, dict(size=size, color=PALETTE[index % len(PALETTE)])))
    fig.update_layout(title=title, legend_title_text=color_title if color is not None and not continuous else None,
                      meta={"n_points": int(n), "n_shown": int(len(keep))}, margin=dict(l=40, r=20, t=50, b=40),
                      template="plotly_white", clickmode="event")
    if dims == 3:
        fig.update_layout(scene=dict(xaxis_title=titles[0], yaxis_title=titles[1], zaxis_title=titles[2]))
    else:
        fig.update_xaxes(title_text=titles[0])
        fig.update_yaxes(title_text=titles[1])
    if len(keep) < n:
        missing = int((~finite).sum())
        why = f"; {missing:,} without finite coordinates" if missing else ""
        fig.add_annotation(text=f"showing {len(keep):,} of {n:,} points (seeded sample{why})", showarrow=False,
                           xref="paper", yref="paper", x=1, y=1.06, xanchor="right", font=dict(size=11))
    return fig


def pca_scatter(projection: np.ndarray, explained_ratio: Sequence[float] | None = None, **kwargs) -> go.Figure:
    """`embedding_scatter` of principal coordinates; axes read "PC1 (23.4%)" when ratios are given.

    `projection` is (n, k) with k >= 2; the first 3 columns are drawn when ``dims=3``, else the first 2.
    """
    dims = kwargs.pop("dims", 2)
    projection = check_2d(projection, "projection")
    if projection.shape[1] < dims:
        raise ValueError(f"a {dims}-D PCA scatter needs {dims} principal coordinates; the projection has "
                         f"{projection.shape[1]} (re-run pca with --param project={dims})")
    ratio = list(explained_ratio or [])
    titles = [f"PC{i + 1}" + (f" ({ratio[i]:.1%})" if i < len(ratio) else "") for i in range(dims)]
    kwargs.setdefault("title", "PCA projection")
    return embedding_scatter(projection[:, :dims], axis_titles=titles, **kwargs)


def tsne_scatter(embedding: np.ndarray, **kwargs) -> go.Figure:
    """`embedding_scatter` of a t-SNE embedding (n, 2) or (n, 3)."""
    embedding = check_2d(embedding, "embedding")
    kwargs.setdefault("title", "t-SNE embedding")
    return embedding_scatter(embedding, axis_titles=[f"t-SNE {i + 1}" for i in range(embedding.shape[1])], **kwargs)
