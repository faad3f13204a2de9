"""Heatmaps: activations (samples x top neurons), neuron correlations, layer x layer CKA, attention patterns."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go

from ._common import check_2d, decimate

SCORES = ("mean_abs", "variance", "max_abs")


def top_neurons(x: np.ndarray, k: int, score: str = "mean_abs") -> np.ndarray:
    """Indices of the `k` neurons of `x` (n_samples, n_neurons) with the highest `score`, best first.

    score : "mean_abs" (mean |x|), "variance" or "max_abs"; ties keep the lower index first.
    """
    x = check_2d(x, "x").astype(np.float64, copy=False)
    if score not in SCORES:
        raise ValueError(f"score={score!r} must be one of {', '.join(SCORES)}")
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    values = {"mean_abs": lambda: np.abs(x).mean(axis=0), "variance": lambda: x.var(axis=0),
              "max_abs": lambda: np.abs(x).max(axis=0)}[score]()
    return np.argsort(-values, kind="stable")[: min(k, x.shape[1])]


def matrix_heatmap(matrix: np.ndarray, x_labels: Sequence | None = None, y_labels: Sequence | None = None,
                   title: str | None = None, colorscale: str = "Viridis", zmin: float | None = None,
                   zmax: float | None = None, zmid: float | None = None, colorbar_title: str | None = None,
                   annotate: bool | None = None, x_title: str | None = None, y_title: str | None = None) -> go.Figure:
    """A heatmap of `matrix` (rows, columns); ``fig.data[0].z`` is the matrix, row 0 drawn at the top.

    Labels become category names (made unique by the caller); `annotate` writes each value in its
    cell (default: when the matrix has at most 15 x 15 cells).
    """
    matrix = check_2d(matrix, "matrix")
    rows, cols = matrix.shape
    x_labels = [str(v) for v in (x_labels if x_labels is not None else range(cols))]
    y_labels = [str(v) for v in (y_labels if y_labels is not None else range(rows))]
    if len(x_labels) != cols or len(y_labels) != rows:
        raise ValueError(f"labels ({len(y_labels)} rows, {len(x_labels)} columns) do not match the matrix {matrix.shape}")
    annotate = rows <= 15 and cols <= 15 if annotate is None else annotate
    heat = go.Heatmap(z=matrix, x=x_labels, y=y_labels, colorscale=colorscale, zmin=zmin, zmax=zmax, zmid=zmid,
                      colorbar=dict(title=dict(text=colorbar_title)) if colorbar_title else None,
                      texttemplate="%{z:.2f}" if annotate else None, hoverongaps=False,
                      hovertemplate="%{y} / %{x}: %{z:.4g}<extra></extra>")
    fig = go.Figure(heat)
    fig.update_layout(title=title, template="plotly_white", margin=dict(l=60, r=20, t=50, b=60))
    fig.update_yaxes(autorange="reversed", title_text=y_title, type="category")
    fig.update_xaxes(title_text=x_title, type="category")
    return fig


def activation_heatmap(x: np.ndarray, top_k: int = 32, neurons: Sequence[int] | None = None, score: str = "mean_abs",
                       row_labels: Sequence | None = None, max_rows: int = 500, seed: int = 0,
                       title: str | None = None) -> go.Figure:
    """Samples x neurons heatmap of the `top_k` neurons by `score` (or the given `neurons`, in that order).

    Parameters
    ----------
    x : ndarray of shape (n_samples, n_neurons)
    row_labels : sequence of shape (n_samples,), optional
        Names of the rows (sample ids or short texts); default the row index.
    max_rows : int
        More rows than this are decimated to a seeded sample (kept in row order).

    Returns
    -------
    go.Figure
        ``fig.data[0].z == x[rows][:, neurons]``; x labels ``n<index>``; ``fig.layout.meta`` has
        ``neurons`` and ``rows`` (the positions drawn).
    """
    x = check_2d(x, "x")
    chosen = np.asarray(neurons, dtype=np.int64) if neurons is not None else top_neurons(x, top_k, score)
    if chosen.size and (chosen.min() < 0 or chosen.max() >= x.shape[1]):
        raise ValueError(f"neurons must lie in [0, {x.shape[1] - 1}]")
    rows = decimate(len(x), max_rows, None, seed)
    labels = [str(v) for v in (np.asarray(row_labels, dtype=object)[rows] if row_labels is not None else rows)]
    if len(set(labels)) < len(labels):  # category axes merge equal names
        labels = [f"{label} #{i}" for i, label in enumerate(labels)]
    z = x[rows][:, chosen]
    fig = matrix_heatmap(z, [f"n{i}" for i in chosen], labels,
                         title=title or f"activations: {len(rows)} samples x top {len(chosen)} neurons",
                         colorscale="RdBu", zmid=0.0, colorbar_title="activation", annotate=False,
                         x_title="neuron", y_title="sample")
    fig.update_layout(meta={"neurons": chosen.tolist(), "rows": rows.tolist()})
    return fig


def correlation_matrix(r: np.ndarray, neurons: Sequence[int] | None = None, title: str | None = None) -> go.Figure:
    """Neuron x neuron Pearson correlation heatmap on a fixed [-1, 1] diverging scale."""
    r = check_2d(r, "r")
    names = [f"n{int(i)}" for i in (neurons if neurons is not None else range(len(r)))]
    return matrix_heatmap(r, names, names, title=title or "neuron correlation", colorscale="RdBu", zmin=-1.0,
                          zmax=1.0, zmid=0.0, colorbar_title="r", x_title="neuron", y_title="neuron")


def cka_heatmap(matrix: np.ndarray, rows: Sequence[str], columns: Sequence[str] | None = None,
                title: str | None = None, metric: str = "CKA", zmin: float | None = 0.0,
                zmax: float | None = 1.0) -> go.Figure:
    """Layer x layer similarity (CKA, RSA, ...) heatmap; NaN cells stay blank.

    `rows` are this run's layers; `columns` another run's layers when comparing two runs (default
    the same layers).
    """
    matrix = check_2d(np.asarray(matrix, dtype=np.float64), "matrix")
    columns = list(rows if columns is None else columns)
    return matrix_heatmap(matrix, columns, list(rows), title=title or f"layer x layer {metric}", colorscale="Viridis",
                          zmin=zmin, zmax=zmax, colorbar_title=metric, x_title="layer", y_title="layer")


def attention_heatmap(pattern: np.ndarray, tokens: Sequence[str] | None = None, head: int = 0,
                      title: str | None = None) -> go.Figure:
    """Query tokens x key tokens attention weights of one head.

    Parameters
    ----------
    pattern : ndarray of shape (heads, q, k) or (q, k)
    tokens : sequence of str, optional
        Token strings (length max(q, k)); axis labels are ``"<position>:<token>"`` so repeated tokens
        stay distinct.
    head : int
        Which head of a 3-D pattern.

    Returns
    -------
    go.Figure
        ``fig.data[0].z == pattern[head]`` (rows: queries, top to bottom; columns: keys).
    """
    pattern = np.asarray(pattern)
    if pattern.ndim == 3:
        if not 0 <= head < pattern.shape[0]:
            raise ValueError(f"head={head} must be between 0 and {pattern.shape[0] - 1}")
        matrix = pattern[head]
    elif pattern.ndim == 2:
        matrix = pattern
    else:
        raise ValueError(f"pattern must have shape (heads, q, k) or (q, k), got {pattern.shape}")
    q, k = matrix.shape
    tokens = list(tokens) if tokens is not None else []

    def names(count: int) -> list[str]:
        return [f"{i}:{tokens[i]}" if i < len(tokens) else str(i) for i in range(count)]

    return matrix_heatmap(matrix, names(k), names(q), title=title or f"attention, head {head}", colorscale="Blues",
                          zmin=0.0, zmax=float(max(1e-12, np.nanmax(matrix))) if matrix.size else 1.0,
                          colorbar_title="weight", x_title="key token", y_title="query token")
