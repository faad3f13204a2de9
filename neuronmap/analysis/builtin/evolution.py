"""`evolution`: how the samples' representation changes from each layer to the next.

One unit per consecutive pair of the selected layers, in the run's layer order ("layer_pair" scope,
`pairs="consecutive"`: one Ray task per pair with `--engine ray`): linear CKA with the previous
layer, mean norms and their growth, and the per-sample cosine between the two layers (drift).
Every middle layer is in two pairs, so its own share (self-moments, row norms) is computed once by
a layer task and shared (`share_layer_work`); a pair task adds only the cross-moments and cosines.
"""

from __future__ import annotations

import warnings
from typing import Optional

import pandas as pd
from pydantic import Field

from ...errors import ConfigError
from ..evolution import (evolution_cross_summary, evolution_from_summaries, evolution_layer_summary,
                         evolution_pair)
from ..inputs import LayerInput, PairInput
from ..registry import AnalysisResult, Params, register
from ..runner import share_layer_work


class EvolutionParams(Params):
    debiased: bool = Field(False, description="debiased linear CKA (unbiased HSIC; needs 4 rows)")
    cosine: Optional[bool] = Field(None, description="per-sample cosine drift; None: when the two layers have one "
                                   "width (true requires it)")


def check_evolution(data: PairInput, params: EvolutionParams) -> None:
    least = 4 if params.debiased else 2
    if data.n_rows < least:
        raise ConfigError(f"layer evolution needs at least {least} rows; {data.first.layer} has n_rows={data.n_rows}")
    widths = (data.first.n_features, data.second.n_features)
    if params.cosine and widths[0] != widths[1]:
        raise ConfigError(f"cosine=true needs layers of one width, but {data.first.layer} has {widths[0]} features and "
                          f"{data.second.layer} {widths[1]}; pass --param cosine=false or leave it unset")


def _use_cosine(data: PairInput, params: EvolutionParams, warn: bool) -> bool:
    prev, next_ = data.first, data.second
    if params.cosine is not None:
        return params.cosine
    if prev.n_features != next_.n_features and warn:
        warnings.warn(f"{prev.layer} ({prev.n_features} features) and {next_.layer} ({next_.n_features}) differ "
                      "in width: no per-sample cosine drift", UserWarning, stacklevel=3)
    return prev.n_features == next_.n_features


def _evolution_result(data: PairInput, found: dict, cosine: bool) -> AnalysisResult:
    metrics = {"prev": data.first.layer, "next": data.second.layer, "cka_prev": found["cka"],
               "mean_norm_prev": found["mean_norm_prev"], "mean_norm_next": found["mean_norm_next"],
               "norm_growth": found["norm_growth"]}
    if cosine:
        metrics.update(cosine_mean=found["cosine_mean"], cosine_std=found["cosine_std"],
                       cosine_drift=1.0 - found["cosine_mean"])
    row = {key: [value] for key, value in metrics.items()}
    return AnalysisResult(metrics=metrics, tables={"evolution": pd.DataFrame(row)})


def evolution_layer_state(data: LayerInput, params: EvolutionParams) -> dict:
    """A layer's share of both pairs it is in: self-moments and row norms (one task per layer)."""
    return evolution_layer_summary(data.iter_batches)


def evolution_pair_state(data: PairInput, params: EvolutionParams) -> dict:
    """A pair's own share: cross-moments and per-sample cosines."""
    return evolution_cross_summary(data.first.iter_batches, data.second.iter_batches,
                                   cosine=_use_cosine(data, params, warn=False))


def evolution_pair_reduce(data: PairInput, states: list, params: EvolutionParams) -> AnalysisResult:
    prev, next_, cross = states
    cosine = _use_cosine(data, params, warn=True)
    return _evolution_result(data, evolution_from_summaries(prev, next_, cross, debiased=params.debiased), cosine)


@register("evolution", family="evolution", params=EvolutionParams, scope="layer_pair", pairs="consecutive",
          check=check_evolution,
          summary="through depth, per consecutive layer pair: CKA with the previous layer, norm growth, per-sample "
                  "cosine drift",
          headline=("cka_prev", "mean_norm_next", "norm_growth", "cosine_mean", "cosine_drift"))
@share_layer_work(layer_map=evolution_layer_state, pair_map=evolution_pair_state, pair_reduce=evolution_pair_reduce)
def evolution(data: PairInput, params: EvolutionParams) -> AnalysisResult:
    """One pair on its own (the runner shares layer work instead; this is the same numbers per pair)."""
    cosine = _use_cosine(data, params, warn=True)
    found = evolution_pair(data.first.iter_batches, data.second.iter_batches, debiased=params.debiased, cosine=cosine)
    return _evolution_result(data, found, cosine)
