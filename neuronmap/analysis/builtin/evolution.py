"""`evolution`: how the samples' representation changes from each layer to the next.

One unit per consecutive pair of the selected layers, in the run's layer order ("layer_pair" scope,
`pairs="consecutive"`: one Ray task per pair with `--engine ray`): linear CKA with the previous
layer, mean norms and their growth, and the per-sample cosine between the two layers (drift).
"""

from __future__ import annotations

import warnings
from typing import Optional

import pandas as pd
from pydantic import Field

from ...errors import ConfigError
from ..evolution import evolution_pair
from ..inputs import PairInput
from ..registry import AnalysisResult, Params, register


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


@register("evolution", family="evolution", params=EvolutionParams, scope="layer_pair", pairs="consecutive",
          check=check_evolution,
          summary="through depth, per consecutive layer pair: CKA with the previous layer, norm growth, per-sample "
                  "cosine drift",
          headline=("cka_prev", "mean_norm_next", "norm_growth", "cosine_mean", "cosine_drift"))
def evolution(data: PairInput, params: EvolutionParams) -> AnalysisResult:
    prev, next_ = data.first, data.second
    cosine = params.cosine
    if cosine is None:
        cosine = prev.n_features == next_.n_features
        if not cosine:
            warnings.warn(f"{prev.layer} ({prev.n_features} features) and {next_.layer} ({next_.n_features}) differ "
                          "in width: no per-sample cosine drift", UserWarning, stacklevel=2)
    found = evolution_pair(prev.iter_batches, next_.iter_batches, debiased=params.debiased, cosine=cosine)
    metrics = {"prev": prev.layer, "next": next_.layer, "cka_prev": found["cka"],
               "mean_norm_prev": found["mean_norm_prev"], "mean_norm_next": found["mean_norm_next"],
               "norm_growth": found["norm_growth"]}
    if cosine:
        metrics.update(cosine_mean=found["cosine_mean"], cosine_std=found["cosine_std"],
                       cosine_drift=1.0 - found["cosine_mean"])
    row = {key: [value] for key, value in metrics.items()}
    return AnalysisResult(metrics=metrics, tables={"evolution": pd.DataFrame(row)})
