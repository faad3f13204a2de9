"""`figure_for_artifact`: the figure of each registered analysis, from its stored result.

The artifact is anything with ``.result`` (result.json's dict), ``.arrays`` (``{"<unit>/<name>":
ndarray}``) and ``.table(name)`` (a DataFrame): a `neuronmap.analysis.Artifact` (which loads its own
files lazily) or an in-memory stand-in. This module opens no file itself.

Per-unit analyses (one figure per layer: pca, tsne, kmeans, ...) take `unit` (default: the first);
whole-artifact analyses (stats, cka, evolution, ...) draw every unit in one figure. Analyses without a
dedicated figure (plugins) get grouped bars of their numeric metrics.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ._common import MAX_POINTS, PALETTE
from .charts import explained_variance, layer_distributions, layer_evolution, metric_bars, neuron_ranking
from .concepts import cav_artifact_figure, top_activations_artifact_figure
from .dendrogram import dendrogram_figure
from .heatmaps import cka_heatmap, correlation_matrix, matrix_heatmap
from .scatter import pca_scatter, tsne_scatter

PER_UNIT = ("pca", "tsne", "kmeans", "dbscan", "hierarchical", "correlation", "cosine", "mutual-info")
PAIR_METRICS = {"cka": ("cka", 1.0), "rsa": ("rsa", 1.0), "layer-mi": ("mi", None)}


def figure_units(artifact: Any) -> list[str | None]:
    """The units to draw one figure each for: every unit of a per-unit analysis, else ``[None]``."""
    return list(artifact.result["units"]) if artifact.result["analysis"] in PER_UNIT else [None]


def _unit(artifact: Any, unit: str | None) -> str:
    units = list(artifact.result["units"])
    if unit is None:
        return units[0]
    if unit not in units:
        raise KeyError(f"artifact {artifact.result['id']} has no unit {unit!r}; units: {', '.join(units)}")
    return unit


def _array(artifact: Any, unit: str, name: str) -> np.ndarray | None:
    return artifact.arrays.get(f"{unit}/{name}")


def _metrics(artifact: Any, unit: str) -> dict:
    return artifact.result["units"][unit]["metrics"]


def _table(artifact: Any, name: str, unit: str | None = None) -> pd.DataFrame | None:
    try:
        frame = artifact.table(name)
    except KeyError:
        return None
    if unit is not None and "layer" in frame.columns:
        frame = frame[frame["layer"] == unit]
    return frame.reset_index(drop=True)


def _points(artifact: Any, table: str, unit: str, columns: list[str], prompts: pd.DataFrame | None,
            color: Mapping | None, color_title: str | None) -> dict[str, Any] | None:
    """Coordinates, colour, hover text and ids of a per-row table (projection, embedding)."""
    frame = _table(artifact, table, unit)
    if frame is None or not all(c in frame.columns for c in columns):
        return None
    ids = frame["sample_id"].to_numpy()
    out: dict[str, Any] = {"coords": frame[columns].to_numpy(dtype=np.float64), "ids": ids}
    if color is not None:
        out["color"] = np.asarray([color.get(int(i)) for i in ids], dtype=object)
        out["color_title"] = color_title or "colour"
    elif "label" in frame.columns:
        out["color"] = frame["label"].to_numpy()
        out["color_title"] = artifact.result.get("labels") or "label"
    if prompts is not None and "text" in prompts.columns:
        texts = dict(zip(prompts["sample_id"].to_numpy().tolist(), prompts["text"].tolist()))
        out["hover"] = [f"#{int(i)}: {texts.get(int(i), '')}" for i in ids]
    return out


def _pca(artifact, unit, prompts, color, color_title, dims, max_points, seed) -> go.Figure:
    columns = [f"pc{i + 1}" for i in range(dims)]
    points = _points(artifact, "projection", unit, columns, prompts, color, color_title)
    ratio = _array(artifact, unit, "explained_variance_ratio")
    if points is None:  # no projection stored (project=0): the spectrum instead
        return explained_variance({unit: ratio if ratio is not None else []}, title=f"PCA · {unit}")
    coords = points.pop("coords")
    return pca_scatter(coords, None if ratio is None else ratio.tolist(), dims=dims, max_points=max_points, seed=seed,
                       title=f"PCA · {unit}", **points)


def _tsne(artifact, unit, prompts, color, color_title, dims, max_points, seed) -> go.Figure:
    frame = _table(artifact, "embedding", unit)
    available = sum(1 for c in (frame.columns if frame is not None else []) if str(c).startswith("tsne"))
    if frame is not None and available < dims:  # as for PCA: a 3-D view is not quietly drawn in 2-D
        raise ValueError(f"a {dims}-D t-SNE scatter needs {dims} dimensions; the embedding has {available} "
                         f"(re-run tsne with --param n_components={dims})")
    columns = [f"tsne{i + 1}" for i in range(max(dims, 2))]
    points = _points(artifact, "embedding", unit, columns, prompts, color, color_title)
    if points is None:
        raise KeyError(f"artifact {artifact.result['id']} has no t-SNE embedding for {unit}")
    coords = points.pop("coords")
    return tsne_scatter(coords, max_points=max_points, seed=seed, title=f"t-SNE · {unit}", **points)


def _cluster_sizes(metrics: dict) -> tuple[list[str], list[int]]:
    sizes = metrics.get("cluster_sizes") or {}
    names = sorted(sizes, key=lambda v: int(v))
    return [("noise" if name == "-1" else f"cluster {name}") for name in names], [int(sizes[n]) for n in names]


def _clusters(artifact, unit, left_title: str, left_x: np.ndarray | None, left_y: np.ndarray | None,
              left_x_title: str, left_y_title: str) -> go.Figure:
    metrics = _metrics(artifact, unit)
    names, counts = _cluster_sizes(metrics)
    fig = make_subplots(rows=1, cols=2, subplot_titles=(left_title, "cluster sizes"))
    if left_x is not None and left_y is not None and len(left_y):
        fig.add_trace(go.Scatter(x=left_x, y=left_y, mode="lines+markers", name=left_title,
                                 line=dict(color=PALETTE[0])), row=1, col=1)
    fig.add_trace(go.Bar(x=names, y=counts, name="size", marker_color=PALETTE[1]), row=1, col=2)
    fig.update_xaxes(title_text=left_x_title, row=1, col=1)
    fig.update_yaxes(title_text=left_y_title, row=1, col=1)
    fig.update_yaxes(title_text="rows", row=1, col=2)
    fig.update_layout(title=f"{artifact.result['analysis']} · {unit}: {metrics.get('n_clusters')} clusters",
                      template="plotly_white", showlegend=False, margin=dict(l=50, r=20, t=70, b=50))
    return fig


def _kmeans(artifact, unit, *_args) -> go.Figure:
    return _clusters(artifact, unit, "silhouette by k", _array(artifact, unit, "k_values"),
                     _array(artifact, unit, "silhouette_by_k"), "k", "silhouette")


def _dbscan(artifact, unit, *_args) -> go.Figure:
    distances = _array(artifact, unit, "k_distances")
    x = None if distances is None else np.arange(1, len(distances) + 1)
    return _clusters(artifact, unit, "sorted k-distances", x, distances, "point", "distance to k-th neighbour")


def _hierarchical(artifact, unit, *_args) -> go.Figure:
    icoord, dcoord = _array(artifact, unit, "dendrogram_icoord"), _array(artifact, unit, "dendrogram_dcoord")
    if icoord is None or dcoord is None:
        raise KeyError(f"artifact {artifact.result['id']} has no dendrogram for {unit}")
    ivl = _array(artifact, unit, "dendrogram_ivl")
    metrics = _metrics(artifact, unit)
    return dendrogram_figure(icoord, dcoord, None if ivl is None else ivl.tolist(),
                             title=f"dendrogram · {unit} ({metrics.get('linkage', '')} linkage)")


def _correlation(artifact, unit, *_args) -> go.Figure:
    return correlation_matrix(_array(artifact, unit, "correlation"), _array(artifact, unit, "neurons"),
                              title=f"neuron correlation · {unit}")


def _cosine(artifact, unit, *_args) -> go.Figure:
    s = _array(artifact, unit, "cosine")
    ids = _array(artifact, unit, "sample_ids")
    ids = [int(i) for i in (ids if ids is not None else range(len(s)))]
    # On a per-token run a sample id repeats for each of its token rows; plotly merges equal category
    # labels, so a 562-row matrix was drawn as 40 rows. Repeated ids get their occurrence: `#12·0`, `#12·1`.
    repeated = len(set(ids)) < len(ids)
    seen: dict[int, int] = {}
    names = []
    for i in ids:
        names.append(f"#{i}·{seen.get(i, 0)}" if repeated else f"#{i}")
        seen[i] = seen.get(i, 0) + 1
    what = "token rows" if repeated else "samples"
    return matrix_heatmap(s, names, names, title=f"cosine similarity between {what} · {unit}", colorscale="RdBu",
                          zmin=-1.0, zmax=1.0, zmid=0.0, colorbar_title="cosine", annotate=False,
                          x_title=what.removesuffix("s"), y_title=what.removesuffix("s"))


def _mutual_info(artifact, unit, *_args) -> go.Figure:
    mi = _array(artifact, unit, "mutual_information")
    top = np.argsort(-mi, kind="stable")[: min(20, len(mi))]
    labels = artifact.result.get("labels") or "labels"
    return neuron_ranking(top, mi[top], title=f"mutual information with {labels} · {unit} (top {len(top)} of "
                                              f"{len(mi)} neurons)", value_title="bits")


def _stats(artifact, *_args) -> go.Figure:
    units = list(artifact.result["units"])
    fig = make_subplots(rows=1, cols=2, subplot_titles=("per-neuron mean", "per-neuron std"))
    for index, unit in enumerate(units):
        colour = PALETTE[index % len(PALETTE)]
        for col, name in ((1, "mean"), (2, "std")):
            values = _array(artifact, unit, name)
            if values is not None:
                fig.add_trace(go.Violin(y=values, name=unit, line_color=colour, box_visible=True, points=False,
                                        showlegend=False), row=1, col=col)
    fig.update_layout(title="neuron statistics per layer", template="plotly_white",
                      margin=dict(l=50, r=20, t=70, b=50))
    return fig


def pair_frame(artifact: Any, metric: str, diagonal: float | None) -> pd.DataFrame:
    """A layer-pair artifact's `metric` as a rows x columns DataFrame (another run's layers as columns
    when the artifact compares two runs)."""
    from ..analysis.artifacts import pair_matrix

    other = (artifact.result.get("params") or {}).get("other_run")
    return pair_matrix(artifact, metric, symmetric=other is None, diagonal=None if other else diagonal)


def _pairs(artifact, *_args) -> go.Figure:
    name = artifact.result["analysis"]
    metric, diagonal = PAIR_METRICS[name]
    frame = pair_frame(artifact, metric, diagonal)
    other = (artifact.result.get("params") or {}).get("other_run")
    title = f"layer x layer {name}" + (f" (columns: {other})" if other else "")
    bounded = name != "layer-mi"
    return cka_heatmap(frame.to_numpy(), list(frame.index), list(frame.columns), title=title, metric=metric,
                       zmin=0.0 if bounded else None, zmax=1.0 if bounded else None)


def _evolution(artifact, *_args) -> go.Figure:
    units = list(artifact.result["units"])
    metrics = [_metrics(artifact, u) for u in units]
    transitions = [(m.get("prev", u.split("|")[0]), m.get("next", u.split("|")[-1])) for u, m in zip(units, metrics)]
    series = {key: [m.get(key) for m in metrics] for key in ("cka_prev", "cosine_mean", "norm_growth")
              if any(m.get(key) is not None for m in metrics)}
    return layer_evolution(transitions, series, title="layer evolution")


def _entropy(artifact, *_args) -> go.Figure:
    values = {u: _array(artifact, u, "entropy") for u in artifact.result["units"]}
    return layer_distributions({u: v for u, v in values.items() if v is not None}, kind="violin",
                               title="per-neuron entropy (bits)", value_title="bits")


def _intrinsic(artifact, *_args) -> go.Figure:
    units = list(artifact.result["units"])
    metrics = {key: [_metrics(artifact, u).get(key) for u in units] for key in ("twonn", "mle")
               if any(_metrics(artifact, u).get(key) is not None for u in units)}
    return metric_bars(units, metrics, title="intrinsic dimension")


def _probe(artifact, *_args) -> go.Figure:
    """Probe score and control-task score per layer (the accuracy-by-layer view), with the folds' std."""
    units = list(artifact.result["units"])
    metrics = [_metrics(artifact, u) for u in units]
    score = next((m.get("score") for m in metrics if m.get("score")), "accuracy")
    fig = metric_bars(units, {f"probe {score}": [m.get("accuracy_mean") for m in metrics],
                              f"control task {score}": [m.get("control_accuracy") for m in metrics]},
                      title=f"linear probe of {artifact.result.get('labels') or 'labels'} per layer "
                            "(control task: a random label per prompt, Hewitt & Liang 2019)")
    for trace, key in zip(fig.data, ("accuracy_std", "control_std")):
        trace.error_y = dict(type="data", array=[m.get(key) or 0.0 for m in metrics], visible=True)
    fig.update_yaxes(title_text=f"{score}, mean over folds")
    fig.update_xaxes(type="category", title_text="layer")
    return fig


def generic_figure(artifact: Any) -> go.Figure:
    """Grouped bars of every numeric scalar metric, one group per unit (analyses without a dedicated figure)."""
    units = list(artifact.result["units"])
    keys: list[str] = []
    for unit in units:
        for key, value in _metrics(artifact, unit).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in keys:
                keys.append(key)
    metrics = {key: [_metrics(artifact, u).get(key) if isinstance(_metrics(artifact, u).get(key), (int, float))
                     else None for u in units] for key in keys[:8]}
    return metric_bars(units, metrics, title=f"{artifact.result['analysis']}: metrics per unit")


BUILDERS: dict[str, Callable[..., go.Figure]] = {
    "pca": _pca, "tsne": _tsne, "kmeans": _kmeans, "dbscan": _dbscan, "hierarchical": _hierarchical,
    "correlation": _correlation, "cosine": _cosine, "mutual-info": _mutual_info, "stats": _stats,
    "cka": _pairs, "rsa": _pairs, "layer-mi": _pairs, "evolution": _evolution, "entropy": _entropy,
    "intrinsic-dim": _intrinsic,
    "cav": cav_artifact_figure, "top-activations": top_activations_artifact_figure, "probe": _probe,
}


def figure_for_artifact(artifact: Any, unit: str | None = None, prompts: pd.DataFrame | None = None,
                        color: Mapping | None = None, color_title: str | None = None, dims: int = 2,
                        max_points: int = MAX_POINTS, seed: int = 0) -> go.Figure:
    """The figure of an analysis artifact.

    Parameters
    ----------
    artifact : Artifact or stand-in (``.result``, ``.arrays``, ``.table(name)``)
    unit : str, optional
        Layer of a per-unit analysis (`figure_units`); default its first unit. Ignored otherwise.
    prompts : DataFrame, optional
        The run's prompts (``sample_id``, ``text``): scatter points then show their prompt on hover.
    color : mapping sample_id -> value, optional
        Colours scatter points (e.g. a label column or k-means clusters) instead of the artifact's
        own label column.
    dims : 2 or 3
        Scatter dimensions for pca / tsne (3 needs 3 stored coordinates).
    max_points : int
        Scatter decimation cap (seeded, label-balanced).
    """
    if dims not in (2, 3):
        raise ValueError(f"dims={dims!r} must be 2 or 3")
    name = artifact.result["analysis"]
    if artifact.result.get("family") == "interventions":  # the live-model methods draw their own figures
        from .interventions import intervention_figure

        return intervention_figure(artifact)
    builder = BUILDERS.get(name)
    if builder is None:
        return generic_figure(artifact)
    chosen = _unit(artifact, unit) if name in PER_UNIT else None
    return builder(artifact, chosen, prompts, color, color_title, dims, max_points, seed)
