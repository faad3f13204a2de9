"""Figures of the concept family: CAV accuracy and similarity, TCAV scores, top activations, soft prompts.

Data in, ``go.Figure`` out. The ``*_artifact`` functions draw a stored artifact (anything with
``.result``, ``.arrays`` and ``.table(name)``): `cav` and `top-activations` analyses through
`neuronmap.viz.artifacts.BUILDERS`, `tcav` and `maximize` (live-model artifacts) through
`neuronmap.viz.interventions.intervention_figure`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..token_ids import readable_token
from ._common import PALETTE

MAX_NEURONS = 6
GREY = "#9e9e9e"


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ------------------------------------------------------------------------------------------------- CAVs
def cav_figure(layers: Sequence[str], concepts: Sequence[str], accuracy: np.ndarray, random_accuracy: np.ndarray,
               cosine: np.ndarray | None = None, title: str | None = None) -> go.Figure:
    """Left: held-out CAV accuracy per layer, one line per concept, chance (random CAVs) dashed.
    Right (two or more concepts): cosine between each pair of concepts' CAVs, pair x layer heatmap.

    accuracy, random_accuracy : (n_layers, n_concepts); cosine : (n_layers, n_concepts, n_concepts)
    """
    accuracy = np.asarray(accuracy, dtype=np.float64).reshape(len(layers), len(concepts))
    random_accuracy = np.asarray(random_accuracy, dtype=np.float64).reshape(len(layers), len(concepts))
    pairs = [(i, j) for i in range(len(concepts)) for j in range(i + 1, len(concepts))]
    two = cosine is not None and bool(pairs)
    fig = make_subplots(rows=1, cols=2 if two else 1, column_widths=[0.55, 0.45] if two else None,
                        subplot_titles=("held-out CAV accuracy", "cosine between CAVs") if two else None,
                        horizontal_spacing=0.14)
    for c, concept in enumerate(concepts):
        colour = PALETTE[c % len(PALETTE)]
        fig.add_trace(go.Scatter(x=list(layers), y=accuracy[:, c], mode="lines+markers", name=str(concept),
                                 line=dict(color=colour), hovertemplate="%{x}: accuracy %{y:.3f}<extra>"
                                 f"{concept}</extra>"), row=1, col=1)
        if np.isfinite(random_accuracy[:, c]).any():
            fig.add_trace(go.Scatter(x=list(layers), y=random_accuracy[:, c], mode="lines", name=f"{concept}: random",
                                     line=dict(color=colour, dash="dot"), opacity=0.6,
                                     hovertemplate="%{x}: random-vs-random %{y:.3f}<extra></extra>"), row=1, col=1)
    fig.update_yaxes(title_text="accuracy", range=[0, 1.02], row=1, col=1)
    fig.update_xaxes(type="category", title_text="layer", row=1, col=1)
    if two:
        cosine = np.asarray(cosine, dtype=np.float64)
        z = np.array([[cosine[l, i, j] for l in range(len(layers))] for i, j in pairs])
        names = [f"{concepts[i]} · {concepts[j]}" for i, j in pairs]
        fig.add_trace(go.Heatmap(z=z, x=list(layers), y=names, zmin=-1, zmax=1, zmid=0, colorscale="RdBu",
                                 reversescale=True, colorbar=dict(title=dict(text="cosine"), x=1.02),
                                 hovertemplate="%{y} at %{x}: %{z:.3f}<extra></extra>"), row=1, col=2)
        fig.update_xaxes(type="category", title_text="layer", row=1, col=2)
        fig.update_yaxes(type="category", autorange="reversed", row=1, col=2)
    fig.update_layout(title=title or "concept activation vectors", template="plotly_white",
                      margin=dict(l=60, r=40, t=70, b=60), legend=dict(orientation="h", y=-0.25))
    return fig


def cav_artifact_figure(artifact: Any, *_args: Any) -> go.Figure:
    """The figure of a `cav` analysis artifact (every layer in one figure)."""
    layers = list(artifact.result["units"])
    arrays = artifact.arrays
    concepts = [str(c) for c in arrays[f"{layers[0]}/concepts"].tolist()]
    accuracy = np.stack([arrays[f"{l}/accuracy"] for l in layers])
    chance = np.stack([arrays[f"{l}/random_accuracy"] for l in layers])
    cosine = np.stack([arrays[f"{l}/cosine"] for l in layers])
    labels = artifact.result.get("labels")
    return cav_figure(layers, concepts, accuracy, chance, cosine,
                      title=f"concept activation vectors of {labels}" if labels else None)


# ------------------------------------------------------------------------------------------------- TCAV
def tcav_figure(layers: Sequence[str], concepts: Sequence[str], tcav: np.ndarray, tcav_std: np.ndarray,
                random_mean: np.ndarray, random_std: np.ndarray, significant: np.ndarray, p_values: np.ndarray,
                title: str | None = None) -> go.Figure:
    """TCAV score per layer: a bar per concept (error bar: spread over its CAV runs), a grey bar for the
    random CAVs (error bar: spread of single random-vs-random CAVs); ``*`` marks a significant score,
    non-significant bars are faded. Arrays are (n_concepts, n_layers)."""
    shape = (len(concepts), len(layers))
    tcav, tcav_std = np.reshape(tcav, shape), np.reshape(tcav_std, shape)
    random_mean, random_std = np.reshape(random_mean, shape), np.reshape(random_std, shape)
    significant, p_values = np.reshape(significant, shape).astype(bool), np.reshape(p_values, shape)
    fig = go.Figure()
    for c, concept in enumerate(concepts):
        colour = PALETTE[c % len(PALETTE)]
        fig.add_trace(go.Bar(
            x=list(layers), y=tcav[c], name=str(concept), marker_color=colour,
            marker_opacity=[1.0 if s else 0.35 for s in significant[c]],
            error_y=dict(type="data", array=tcav_std[c], visible=True),
            text=["*" if s else "" for s in significant[c]], textposition="outside",
            customdata=np.stack([p_values[c], tcav_std[c]], axis=-1),
            hovertemplate=f"{concept}" + " at %{x}<br>TCAV %{y:.3f} ± %{customdata[1]:.3f}<br>p %{customdata[0]:.3g}"
                                         "<extra></extra>"))
    fig.add_trace(go.Bar(x=list(layers), y=random_mean.mean(axis=0), name="random CAVs", marker_color=GREY,
                         error_y=dict(type="data", array=random_std.mean(axis=0), visible=True),
                         hovertemplate="random CAVs at %{x}: %{y:.3f}<extra></extra>"))
    fig.add_hline(y=0.5, line_dash="dot", line_color=GREY)
    fig.update_layout(title=title or "TCAV scores (* significant)", template="plotly_white", barmode="group",
                      margin=dict(l=60, r=20, t=60, b=60), meta={"n_significant": int(significant.sum())})
    fig.update_yaxes(title_text="TCAV score (fraction of inputs)", range=[0, 1.12])
    fig.update_xaxes(type="category", title_text="layer")
    return fig


# ---------------------------------------------------------------------------------------- top activations
def top_activations_figure(table: pd.DataFrame, max_neurons: int = MAX_NEURONS, title: str | None = None) -> go.Figure:
    """Horizontal bars of each neuron's top-k values, labelled by prompt (or token in context).

    `table` has the `top-activations` columns (layer, neuron, rank, value, sample_id, text, and
    token/context for per-token layers). At most `max_neurons` neurons are drawn: those with the
    largest top value.
    """
    groups = list(table.groupby(["layer", "neuron"], sort=False))
    groups.sort(key=lambda item: -float(item[1]["value"].max()))
    shown = groups[:max_neurons]
    fig = make_subplots(rows=len(shown) or 1, cols=1, vertical_spacing=0.08 if len(shown) > 1 else 0.1,
                        subplot_titles=[f"{layer}:{neuron}" for (layer, neuron), _ in shown] or None)
    for row, ((layer, neuron), group) in enumerate(shown, start=1):
        group = group.sort_values("rank")
        if "context" in group.columns:
            labels = [f"{r}. {readable_token(t)!r} (#{s})" for r, t, s in zip(group["rank"], group["token"], group["sample_id"])]
            hover = [_short(c, 200) for c in group["context"]]
        else:
            labels = [f"{r}. #{s} {_short(t, 40)}" for r, s, t in zip(group["rank"], group["sample_id"], group["text"])]
            hover = [_short(t, 200) for t in group["text"]]
        fig.add_trace(go.Bar(x=group["value"], y=labels, orientation="h", marker_color=PALETTE[(row - 1) % len(PALETTE)],
                             customdata=hover, showlegend=False,
                             hovertemplate="%{customdata}<br>activation %{x:.4g}<extra></extra>"), row=row, col=1)
        fig.update_yaxes(autorange="reversed", type="category", row=row, col=1)
    fig.update_xaxes(title_text="activation", row=len(shown) or 1, col=1)
    n_rows = sum(len(group) for _, group in shown)
    title = title or "top activating inputs"
    if len(shown) < len(groups):  # say what is left out: the neurons drawn are the strongest over every layer
        title += f" (the {len(shown)} of {len(groups)} neurons with the largest top value, all layers)"
    fig.update_layout(title=title, template="plotly_white",
                      height=max(320, 22 * n_rows + 60 * len(shown) + 100), margin=dict(l=260, r=20, t=70, b=50),
                      meta={"n_neurons": len(groups), "n_shown": len(shown)})
    return fig


def top_activations_artifact_figure(artifact: Any, *_args: Any) -> go.Figure:
    """The figure of a `top-activations` artifact."""
    return top_activations_figure(artifact.table("top"), title="top activating inputs per neuron")


# -------------------------------------------------------------------------------------------- maximisation
def maximisation_figure(history: Sequence[float], nearest: Sequence[Sequence[Mapping[str, Any]]],
                        hard_activation: float | None = None, random_best: float | None = None,
                        random_mean: float | None = None, title: str | None = None) -> go.Figure:
    """Left: the neuron's activation over the optimisation steps, with the projected hard prompt and the
    best / mean random prompt as horizontal lines. Right: nearest tokens (cosine) of each soft position."""
    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45], specs=[[{"type": "xy"}, {"type": "table"}]],
                        subplot_titles=("activation while optimising", "nearest tokens per position"))
    steps = np.arange(len(history))
    fig.add_trace(go.Scatter(x=steps, y=list(history), mode="lines", name="soft prompt", line=dict(color=PALETTE[0]),
                             hovertemplate="step %{x}: %{y:.4g}<extra></extra>"), row=1, col=1)
    for value, name, colour, dash in ((hard_activation, "nearest-token prompt", PALETTE[3], "dash"),
                                      (random_best, "best random prompt", GREY, "dot"),
                                      (random_mean, "mean random prompt", GREY, "dashdot")):
        if value is not None:
            fig.add_trace(go.Scatter(x=[0, max(len(history) - 1, 1)], y=[value, value], mode="lines", name=name,
                                     line=dict(color=colour, dash=dash),
                                     hovertemplate=f"{name}: {value:.4g}<extra></extra>"), row=1, col=1)
    positions = list(range(len(nearest)))
    cells = [[", ".join(f"{readable_token(t['token'])!r} {t['cosine']:.2f}" for t in row) for row in nearest]]
    fig.add_trace(go.Table(header=dict(values=["position", "tokens (cosine)"], align="left"),
                           cells=dict(values=[positions, *cells], align="left"), columnwidth=[0.2, 1.0]), row=1, col=2)
    fig.update_xaxes(title_text="step", row=1, col=1)
    fig.update_yaxes(title_text="activation", row=1, col=1)
    fig.update_layout(title=title or "activation maximisation", template="plotly_white",
                      margin=dict(l=60, r=20, t=70, b=60), legend=dict(orientation="h", y=-0.2))
    return fig


# ----------------------------------------------------------------------------------- live-model artifacts
def concept_figure(artifact: Any) -> go.Figure:
    """The figure of a `tcav` or `maximize` artifact (written by `neuronmap tcav|maximize`)."""
    result = artifact.result
    arrays = artifact.arrays
    method = result["analysis"]
    if method == "tcav":
        get = lambda name: arrays[f"model/{name}"]  # noqa: E731
        return tcav_figure(result["layers"], result["concepts"], get("tcav"), get("tcav_std"), get("random_mean"),
                           get("random_std"), get("significant"), get("p_values"),
                           title=f"TCAV of {readable_token(result.get('target_description', result.get('target')))} "
                                 f"({result.get('n_inputs')} inputs; * significant after Bonferroni)")
    if method == "maximize":
        return maximisation_figure(arrays["model/history"], result["nearest"], result.get("hard_activation"),
                                   result.get("random_best"), result.get("random_mean"),
                                   title=f"soft prompt maximising {result['neuron']}")
    raise KeyError(f"no concept figure for {method!r}; known: tcav, maximize")
