"""Figures of the intervention family: tracing/patching heatmaps, ablation bars, head maps, circuit networks.

Data in, ``go.Figure`` out, like the rest of `neuronmap.viz`. `intervention_figure(artifact)` draws an
intervention artifact (anything with ``.result`` and ``.arrays``, e.g. ``load_artifact(folder)`` of what
``neuronmap trace|ablate|steer|heads|circuit|counterfactual|patch`` wrote); arrays are keyed
``model/<name>`` as in analysis artifacts.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..token_ids import readable_token
from ._common import PALETTE
from .heatmaps import matrix_heatmap

UNIT = "model"
MAX_BARS = 40


def _position_labels(tokens: Sequence[str], marked: tuple[int, int] | None = None) -> list[str]:
    """Unique category labels ``"3 'Paris'"`` (a ``*`` marks positions in `marked`)."""
    lo, hi = marked if marked is not None else (0, 0)
    return [f"{i}{'*' if lo <= i < hi else ''} {readable_token(tok)!r}" for i, tok in enumerate(tokens)]


def tracing_heatmap(effect: np.ndarray, layers: Sequence[str], tokens: Sequence[str],
                    subject: tuple[int, int] | None = None, title: str | None = None,
                    value_title: str = "indirect effect") -> go.Figure:
    """Tokens (rows, subject marked ``*``) x layers (columns) of a (n_layers, n_positions) matrix.

    A single column (every position restored at once) is drawn as one row ``all positions``.
    """
    effect = np.asarray(effect, dtype=np.float64)
    rows = _position_labels(tokens, subject) if effect.shape[1] == len(tokens) else ["all positions"]
    return matrix_heatmap(effect.T, list(layers), rows, title=title, colorscale="Purples" if np.nanmin(effect) >= 0
                          else "RdBu", zmid=None if np.nanmin(effect) >= 0 else 0.0, colorbar_title=value_title,
                          annotate=False, x_title="restored layer", y_title="position")


def ablation_bars(components: Sequence[str], effect: Sequence[float], metric: str = "metric",
                  title: str | None = None, max_bars: int = MAX_BARS) -> go.Figure:
    """Horizontal bars of the effect of each ablation, largest |effect| on top (at most `max_bars`)."""
    effect = np.asarray(effect, dtype=np.float64)
    order = np.argsort(-np.abs(np.nan_to_num(effect)), kind="stable")[:max_bars]
    names = [str(components[i]) for i in order][::-1]
    values = effect[order][::-1]
    fig = go.Figure(go.Bar(x=values, y=names, orientation="h",
                           marker_color=[PALETTE[3] if v > 0 else PALETTE[0] for v in values],
                           hovertemplate="%{y}: %{x:.4g}<extra></extra>"))
    fig.update_layout(title=title, template="plotly_white", margin=dict(l=180, r=20, t=50, b=50),
                      height=max(300, 22 * len(names) + 120))
    fig.update_xaxes(title_text=f"change of {metric} (ablated - clean)")
    fig.update_yaxes(type="category")
    return fig


def head_heatmaps(layers: Sequence[str], scores: Mapping[str, np.ndarray], title: str | None = None) -> go.Figure:
    """One layer x head heatmap per score (entropy, previous-token, induction, importance), side by side."""
    names = [k for k, v in scores.items() if v is not None]
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, horizontal_spacing=0.08)
    for col, name in enumerate(names, start=1):
        matrix = np.asarray(scores[name], dtype=np.float64)
        heads = [f"H{h}" for h in range(matrix.shape[1])]
        signed = name == "importance" and np.nanmin(matrix) < 0
        fig.add_trace(go.Heatmap(z=matrix, x=heads, y=list(layers), colorscale="RdBu" if signed else "Viridis",
                                 zmid=0.0 if signed else None, showscale=False,
                                 hovertemplate=f"%{{y}} %{{x}} {name}: %{{z:.3f}}<extra></extra>"), row=1, col=col)
        fig.update_yaxes(autorange="reversed", type="category", row=1, col=col)
        fig.update_xaxes(type="category", row=1, col=col)
    fig.update_layout(title=title, template="plotly_white", margin=dict(l=70, r=20, t=70, b=40),
                      height=max(300, 28 * len(layers) + 140))
    return fig


def circuit_graph(graph: Mapping[str, Any], title: str | None = None) -> go.Figure:
    """A layered network: x = layer (embed left, logits right), heads stacked by index, MLPs below them.

    Edge width follows |score| (relative to the strongest edge), colour its sign (red positive, blue
    negative); node size follows |node score|. `graph` is `CircuitResult.graph()` (nodes, edges).
    """
    nodes = list(graph.get("nodes", []))
    heads = max([n["head"] for n in nodes if n.get("head") is not None] + [0]) + 1
    place = {}
    for node in nodes:
        kind = node.get("kind")
        y = node["head"] if kind == "head" else heads + 0.5 if kind == "mlp" else (heads - 1) / 2
        place[node["id"]] = (node.get("layer") if node.get("layer") is not None else 0, y)
    fig = go.Figure()
    edges = list(graph.get("edges", []))
    strongest = max([abs(e["score"]) for e in edges] + [1e-12])
    for edge in edges:
        if edge["source"] not in place or edge["target"] not in place:
            continue
        (x0, y0), (x1, y1) = place[edge["source"]], place[edge["target"]]
        weight = abs(edge["score"]) / strongest
        colour = PALETTE[3] if edge["score"] > 0 else PALETTE[0]
        fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", showlegend=False, hoverinfo="text",
                                 text=f"{edge['source']} -> {edge['target']}: {edge['score']:.4g}",
                                 line=dict(width=0.5 + 6 * weight, color=colour), opacity=0.25 + 0.65 * weight))
    scores = np.asarray([abs(n.get("score") or 0.0) for n in nodes], dtype=np.float64)
    top = scores.max() if scores.size and scores.max() > 0 else 1.0
    fig.add_trace(go.Scatter(
        x=[place[n["id"]][0] for n in nodes], y=[place[n["id"]][1] for n in nodes], mode="markers+text",
        text=[n.get("label", n["id"]) for n in nodes], textposition="top center", showlegend=False,
        marker=dict(size=[8 + 22 * s / top for s in scores], color=[n.get("score") or 0.0 for n in nodes],
                    colorscale="RdBu", cmid=0.0, reversescale=True, line=dict(width=1, color="#333"),
                    colorbar=dict(title=dict(text="node score"))),
        customdata=[n["id"] for n in nodes],
        hovertemplate="%{customdata}<br>score %{marker.color:.4g}<extra></extra>"))
    fig.update_layout(title=title, template="plotly_white", margin=dict(l=40, r=20, t=50, b=40),
                      meta={"n_nodes": len(nodes), "n_edges": len(edges)})
    fig.update_xaxes(title_text="layer", dtick=1, zeroline=False)
    fig.update_yaxes(title_text="head (MLP below)", autorange="reversed", zeroline=False, showticklabels=False)
    return fig


def steering_table(generations: Sequence[Mapping[str, Any]], title: str | None = None) -> go.Figure:
    """A table: prompt, generation without steering, generation with steering (changed rows marked)."""
    prompts = [g["prompt"] for g in generations]
    fig = go.Figure(go.Table(
        header=dict(values=["prompt", "without steering", "with steering"], align="left"),
        cells=dict(values=[prompts, [g["baseline"] for g in generations],
                           [("* " if g.get("changed") else "") + g["steered"] for g in generations]], align="left")))
    fig.update_layout(title=title, margin=dict(l=20, r=20, t=50, b=20))
    return fig


def counterfactual_figure(layers: Sequence[str], relative: Sequence[float], top_changed: Sequence[Mapping[str, Any]],
                          title: str | None = None) -> go.Figure:
    """Left: relative change of the last token's state per layer; right: next-token probability changes."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("||h' - h|| / ||h|| at the last token",
                                                        "next-token probability change"))
    fig.add_trace(go.Scatter(x=list(layers), y=list(relative), mode="lines+markers", line=dict(color=PALETTE[0]),
                             showlegend=False), row=1, col=1)
    tokens = [str(t["token"]) for t in top_changed]
    deltas = [t["delta_prob"] for t in top_changed]
    fig.add_trace(go.Bar(x=deltas, y=[f"{i}: {t}" for i, t in enumerate(tokens)], orientation="h", showlegend=False,
                         marker_color=[PALETTE[2] if d > 0 else PALETTE[3] for d in deltas]), row=1, col=2)
    fig.update_xaxes(type="category", title_text="layer", row=1, col=1)
    fig.update_yaxes(autorange="reversed", type="category", row=1, col=2)
    fig.update_layout(title=title, template="plotly_white", margin=dict(l=60, r=20, t=70, b=60))
    return fig


def _array(artifact: Any, name: str) -> np.ndarray | None:
    return artifact.arrays.get(f"{UNIT}/{name}")


def intervention_figure(artifact: Any) -> go.Figure:
    """The figure of an intervention artifact (``result["analysis"]`` names the method)."""
    result = artifact.result
    method = result["analysis"]
    if method in ("trace", "patch"):
        name = "effect" if method == "trace" else "restored"
        matrix = _array(artifact, name)
        if method == "patch" and (matrix is None or np.isnan(matrix).all()):  # identical prompts: no span
            name, matrix = "logit_diff", _array(artifact, "logit_diff")
        subject = tuple(result["subject"]) if result.get("subject") else None
        what = (f"causal tracing: p({readable_token(result.get('answer_token'))!r}) restored" if method == "trace"
                else "activation patching: restored fraction of the logit difference")
        return tracing_heatmap(matrix, result["layers"], result["tokens"], subject, title=what,
                               value_title="indirect effect" if method == "trace" else name)
    if method == "ablate":
        return ablation_bars(result["components"], _array(artifact, "effect"), result.get("metric", "metric"),
                             title=f"{result.get('method')} ablation: effect on {result.get('metric')}")
    if method == "heads":
        scores = {name: _array(artifact, name) for name in ("entropy", "prev_token", "induction", "importance")}
        return head_heatmaps(result["layers"], scores, title="attention heads")
    if method == "circuit":
        return circuit_graph(result["graph"], title="circuit (attribution patching)")
    if method == "steer":
        return steering_table(result["generations"], title=f"steering at {result['layer']}, alpha={result['alpha']}")
    if method == "counterfactual":
        return counterfactual_figure(result["layers"], result["mean_relative"], result["top_changed"],
                                     title="counterfactual pairs")
    if method == "attribution":
        from .attribution import token_attribution_figure

        scores = {name: _array(artifact, name) for name in result["methods"]}
        return token_attribution_figure(result["tokens"], scores,
                                        title=f"attribution of {result.get('target_description', result['target'])}")
    if method in ("tcav", "maximize"):
        from .concepts import concept_figure

        return concept_figure(artifact)
    raise KeyError(f"no intervention figure for {method!r}; known: trace, patch, ablate, heads, circuit, steer, "
                   "counterfactual, attribution, tcav, maximize")
