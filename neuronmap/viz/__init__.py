"""Plotly figure builders: data in, `go.Figure` out. No file I/O, no Dash.

Needs the ``dashboard`` extra (``pip install -e '.[dashboard]'``: plotly, and kaleido for PNG/SVG).

- `embedding_scatter`, `pca_scatter`, `tsne_scatter`: 2-D / 3-D, coloured by label or cluster, prompt
  text on hover, decimated to `MAX_POINTS` (seeded, label-balanced: `decimate`).
- `activation_heatmap` (samples x top-k neurons), `correlation_matrix`, `cka_heatmap` (layer x layer,
  within a run or between two), `attention_heatmap` (query x key tokens of one head), `matrix_heatmap`.
- `layer_distributions` (violin / histogram / box per layer), `layer_lines`, `layer_evolution`,
  `explained_variance`, `neuron_ranking`, `metric_bars`.
- `dendrogram_figure` (stored scipy coordinates), `dendrogram_from_linkage`.
- `figure_for_artifact(artifact, unit=None, prompts=None)`: the figure of each registered analysis;
  `figure_units(artifact)` says which units get a figure of their own.
"""

from ._common import MAX_POINTS, decimate, hover_text
from .artifacts import figure_for_artifact, figure_units, generic_figure, pair_frame
from .charts import (explained_variance, layer_distributions, layer_evolution, layer_lines, metric_bars,
                     neuron_ranking)
from .dendrogram import dendrogram_figure, dendrogram_from_linkage
from .heatmaps import (activation_heatmap, attention_heatmap, cka_heatmap, correlation_matrix, matrix_heatmap,
                       top_neurons)
from .scatter import embedding_scatter, pca_scatter, tsne_scatter

__all__ = [
    "MAX_POINTS", "activation_heatmap", "attention_heatmap", "cka_heatmap", "correlation_matrix", "decimate",
    "dendrogram_figure", "dendrogram_from_linkage", "embedding_scatter", "explained_variance", "figure_for_artifact",
    "figure_units", "generic_figure", "hover_text", "layer_distributions", "layer_evolution", "layer_lines",
    "matrix_heatmap", "metric_bars", "neuron_ranking", "pair_frame", "pca_scatter", "top_neurons", "tsne_scatter",
]
