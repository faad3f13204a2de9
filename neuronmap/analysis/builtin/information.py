"""`entropy`, `mutual-info`, `layer-mi`: information in binned activations, about labels and between layers.

All values are plug-in estimates in bits on a discretisation (see `neuronmap.analysis.information`):
equal-width bins per neuron for `entropy` and `mutual-info`, equal-frequency bins of the top principal
components for `layer-mi` (one Ray task per layer pair with `--engine ray`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

from ...errors import ConfigError
from ..information import check_bins, encode_labels, entropy, layer_mutual_information, mutual_information
from ..inputs import LayerInput, PairInput
from ..registry import AnalysisResult, Params, register

Correction = Literal["none", "miller-madow"]
CORRECTION_HELP = "miller-madow: subtract the first-order bias of the plug-in estimate"


def _extremes(values: np.ndarray, k: int) -> tuple[list[int], list[int]]:
    order = np.argsort(values, kind="stable")
    return order[::-1][:k].tolist(), order[:k].tolist()


# -- entropy -----------------------------------------------------------------------------------
class EntropyParams(Params):
    bins: int = Field(32, ge=2, description="equal-width bins over each neuron's own [min, max]; at most the rows")
    correction: Correction = Field("none", description=CORRECTION_HELP)
    top_k: int = Field(5, ge=1, description="neurons listed as highest / lowest entropy")


def check_layer_bins(data: LayerInput, params: EntropyParams | MutualInfoParams) -> None:
    check_bins(params.bins, data.n_rows, f"layer {data.layer}")


@register("entropy", family="information", params=EntropyParams, scope="layer", check=check_layer_bins,
          summary="entropy (bits) of each neuron's binned activation distribution (two streamed passes)",
          headline=("n_rows", "mean_entropy", "min_entropy", "max_entropy", "n_zero_entropy"))
def entropy_analysis(data: LayerInput, params: EntropyParams) -> AnalysisResult:
    h = entropy(data.iter_batches, bins=params.bins, correction=params.correction)
    highest, lowest = _extremes(h, params.top_k)
    metrics = {"n_rows": data.n_rows, "bins": params.bins, "max_possible": float(np.log2(params.bins)),
               "mean_entropy": float(h.mean()), "median_entropy": float(np.median(h)), "min_entropy": float(h.min()),
               "max_entropy": float(h.max()), "n_zero_entropy": int((h == 0).sum()),
               "highest": highest, "lowest": lowest}
    return AnalysisResult(metrics=metrics, arrays={"entropy": h},
                          tables={"neurons": pd.DataFrame({"neuron": np.arange(len(h)), "entropy": h})})


# -- mutual information with labels --------------------------------------------------------------
class MutualInfoParams(Params):
    bins: int = Field(32, ge=2, description="equal-width bins over each neuron's own [min, max]; at most the rows")
    correction: Correction = Field("none", description=CORRECTION_HELP)
    top_k: int = Field(10, ge=1, description="most informative neurons listed")


@register("mutual-info", family="information", params=MutualInfoParams, scope="layer", needs_labels=True,
          check=check_layer_bins,
          summary="mutual information (bits) between each binned neuron and the --labels column",
          headline=("n_classes", "label_entropy", "mean_mi", "max_mi", "top_neurons"),
          version="2")  # 2: warns when rows < 10 x bins x classes (the values are then mostly bias)
def mutual_info(data: LayerInput, params: MutualInfoParams) -> AnalysisResult:
    labels = data.labels()
    _, classes = encode_labels(labels, data.n_rows)
    mi = mutual_information(data.iter_batches, labels, bins=params.bins, correction=params.correction)
    counts = pd.Series(labels).value_counts().to_numpy(dtype=np.float64)
    p = counts / counts.sum()
    top, _ = _extremes(mi, params.top_k)
    metrics = {"n_rows": data.n_rows, "n_classes": int(len(classes)), "label_entropy": float(-(p * np.log2(p)).sum()),
               "bins": params.bins, "mean_mi": float(mi.mean()), "max_mi": float(mi.max()), "top_neurons": top}
    return AnalysisResult(metrics=metrics,
                          arrays={"mutual_information": mi, "classes": np.asarray(classes).astype(str)},
                          tables={"neurons": pd.DataFrame({"neuron": np.arange(len(mi)), "mutual_information": mi})})


# -- mutual information between layers -----------------------------------------------------------
class LayerMIParams(Params):
    n_components: int = Field(1, ge=1, description="top principal components of each layer compared")
    bins: int = Field(16, ge=2, description="equal-frequency bins per component, at most the rows; keep "
                                            "n_rows >> bins^2")
    correction: Correction = Field("none", description=CORRECTION_HELP)


def check_layer_mi(data: PairInput, params: LayerMIParams) -> None:
    for item in (data.first, data.second):
        limit = min(item.n_rows, item.n_features)
        if params.n_components > limit:
            raise ConfigError(f"n_components={params.n_components} must be between 1 and min(n_samples, n_features)="
                              f"{limit} for layer {item.layer}")
    if data.n_rows < 2:
        raise ConfigError(f"mutual information between layers needs at least 2 rows; got n_rows={data.n_rows}")
    check_bins(params.bins, data.n_rows, f"layers {data.first.layer} and {data.second.layer}", default=16)


@register("layer-mi", family="information", params=LayerMIParams, scope="layer_pair", check=check_layer_mi,
          summary="mutual information (bits) between the top principal components of two layers, quantile-binned",
          headline=("mi", "mi_fraction", "mi_max"))
def layer_mi(data: PairInput, params: LayerMIParams) -> AnalysisResult:
    mi = layer_mutual_information(data.first.iter_batches, data.second.iter_batches, n_components=params.n_components,
                                  bins=params.bins, correction=params.correction)
    metrics = {"first": data.first.layer, "second": data.second.layer, "mi": float(mi[0, 0]),
               "mi_fraction": float(mi[0, 0] / np.log2(params.bins)), "mi_max": float(mi.max()),
               "n_components": params.n_components, "bins": params.bins, "n_rows": data.n_rows}
    return AnalysisResult(metrics=metrics, arrays={"mi": mi})
