"""`stats`: per-neuron statistics, percentiles, normality and rankings, merged shard by shard."""

from __future__ import annotations

import functools
from typing import Any, Iterable

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from ..inputs import LayerInput
from ..registry import AnalysisResult, Params, register
from ..reservoir import merged_bound
from ..statistics import Reservoir, RunningStats, neuron_rankings

PER_NEURON = ("mean", "std", "min", "max", "skewness", "kurtosis", "mean_abs", "sparsity", "zero_fraction",
              "normality_statistic", "normality_pvalue")


class StatsParams(Params):
    eps: float = Field(1e-6, ge=0, description="|x| < eps counts as sparse")
    percentiles: list[float] = Field([1, 5, 25, 50, 75, 95, 99], min_length=1, description="percentiles to report, each in [0, 100]")
    reservoir_size: int = Field(8192, ge=1, description="rows sampled for percentiles (exact while the layer has no more rows)")
    top_k: int = Field(10, ge=1, description="neurons listed per ranking")
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level of the normality test")
    seed: int = Field(0, description="seed of the percentile reservoir")

    @field_validator("percentiles")
    @classmethod
    def _in_range(cls, values: list[float]) -> list[float]:
        bad = [v for v in values if not 0 <= v <= 100]
        if bad:
            raise ValueError(f"percentiles must lie in [0, 100]; got {bad}")
        return values


# Shard rows whose reservoir keys are drawn up front (8 bytes each); larger inputs draw them per batch.
_EXPECT_MAX_ROWS = 1 << 24


def stats_shard(data: LayerInput, params: StatsParams) -> dict[str, Any]:
    """Partial result of one shard: RunningStats and Reservoir state dicts.

    The shard's row count is known, so the reservoir draws every row's key up front (`expect`) and
    copies only the rows that end in the sample, each once: the same keys, hence the same sample, as
    drawing them batch by batch. The other shards' keys are known too (each shard's reservoir is
    seeded by its first row), so the merged sample's largest key is known before any data is read
    (`merged_bound`) and the partial keeps only the rows that end in the merged sample: ~200 rows per
    shard of an 8 GB run instead of 8,192 (25 MB of fresh memory per shard, which cost more than a
    third of the whole pass).
    """
    stats = RunningStats(params.eps)
    reservoir = Reservoir(params.reservoir_size, seed=_reservoir_seed(params, data.ranges[0][0]))
    bound = np.inf
    if data.n_rows <= _EXPECT_MAX_ROWS:
        if data.partition is not None:
            bound = _merged_bound(tuple((_reservoir_seed(params, first), rows) for first, rows in data.partition),
                                  params.reservoir_size)
        reservoir.expect(data.n_rows, bound=bound)
    for batch in _read_only_batches(data):
        stats.add(batch)
        reservoir.add(batch)
    return {"stats": stats.state_dict(), "reservoir": reservoir.state_dict(), "bound": bound}


def _reservoir_seed(params: StatsParams, first_row: int) -> int:
    return params.seed + int(first_row)


@functools.lru_cache(maxsize=32)
def _merged_bound(parts: tuple[tuple[int, int], ...], size: int) -> float:
    """`merged_bound`, once per layer and process (every shard task of the layer asks for it)."""
    return merged_bound(parts, size)


def _read_only_batches(data: LayerInput):
    """`data.iter_batches()`, but batches of uncompressed HDF5 shards are read-only views mapped
    from the file (`Run.iter_batches(copy=False)`) rather than copies read through HDF5.

    Both consumers only read a batch (the statistics kernel reads each value once; the reservoir
    copies the rows it keeps), so the copy h5py makes would be pure cost: the kernel reads the
    mapped page-cache pages directly. Each batch maps only its own rows and is unmapped once dropped.
    """
    for start, end in data.ranges:
        for batch in data.run.iter_batches(data.layer, rows=(start, end), batch_size=data.batch_size, copy=False):
            yield batch.reshape(len(batch), -1).astype(data.dtype, copy=False)


def stats_reduce(data: LayerInput, states: Iterable[dict[str, Any]], params: StatsParams) -> AnalysisResult:
    """Fold shard partials into the per-neuron statistics as they arrive, in row order.

    `states` is consumed once, one partial at a time (the runner hands a generator fed by the
    engine), so memory holds the running result and one partial, whatever the number of shards.
    """
    stats = RunningStats(params.eps)
    reservoir = Reservoir(params.reservoir_size, seed=params.seed)
    bound = np.inf
    for state in states:
        stats.merge(RunningStats(params.eps).load_state_dict(state["stats"]))
        reservoir.merge(Reservoir(params.reservoir_size).load_state_dict(state["reservoir"]))
        bound = min(bound, state.get("bound", np.inf))
        del state  # drop this partial before the next one is computed or fetched
    held, wanted = (0 if reservoir.rows is None else len(reservoir.rows)), min(reservoir.count, reservoir.size)
    if held < wanted or reservoir.largest_key > bound:  # partials cut by a bound computed for other shards
        raise RuntimeError(f"the merged percentile sample of {data.layer} is not the sample of its rows "
                           f"({held} of {wanted} rows, largest key {reservoir.largest_key} above {bound})")
    summary = stats.summary()
    q = np.asarray(params.percentiles, dtype=np.float64)
    percentiles = reservoir.percentiles(q)
    rankings = neuron_rankings(summary, params.top_k)
    constant = stats.constant()

    arrays = {key: summary[key] for key in PER_NEURON if key in summary}
    arrays.update(percentiles=percentiles, percentile_q=q, constant=constant)
    arrays.update({f"rank_{name}": order for name, order in rankings.items()})

    neurons = pd.DataFrame({"neuron": np.arange(stats.n_features), **{k: v for k, v in arrays.items() if k in PER_NEURON}})
    for index, value in enumerate(q):
        neurons[f"p{value:g}"] = percentiles[index]
    ranking_rows = []
    for name, key in (("most_active", "mean_abs"), ("most_variable", "std"), ("sparsest", "sparsity")):
        for rank, neuron in enumerate(rankings[name], start=1):
            ranking_rows.append({"ranking": name, "rank": rank, "neuron": int(neuron), "value": float(summary[key][neuron])})

    metrics: dict[str, Any] = {
        "n_rows": stats.count, "n_features": stats.n_features,
        "mean": float(summary["mean"].mean()), "std": float(summary["std"].mean()),
        "min": float(summary["min"].min()), "max": float(summary["max"].max()),
        "mean_abs": float(summary["mean_abs"].mean()), "sparsity": float(summary["sparsity"].mean()),
        "zero_fraction": float(summary["zero_fraction"].mean()),
        "skewness_median": float(np.median(summary["skewness"])), "kurtosis_median": float(np.median(summary["kurtosis"])),
        "n_constant": int(constant.sum()), "percentiles_exact": reservoir.exact,
        "most_active": rankings["most_active"][:5].tolist(), "most_variable": rankings["most_variable"][:5].tolist(),
        "sparsest": rankings["sparsest"][:5].tolist(),
    }
    if "normality_pvalue" in summary:
        metrics["non_normal_fraction"] = float(np.mean(summary["normality_pvalue"] < params.alpha))
    return AnalysisResult(metrics=metrics, arrays=arrays,
                          tables={"neurons": neurons, "rankings": pd.DataFrame(ranking_rows)})


@register("stats", family="statistics", params=StatsParams, scope="layer",
          summary="per-neuron mean, std, min, max, skewness, kurtosis, sparsity, percentiles, normality, rankings",
          shard_map=stats_shard, shard_reduce=stats_reduce,
          headline=("n_rows", "mean", "std", "sparsity", "kurtosis_median", "n_constant", "non_normal_fraction"))
def stats(data: LayerInput, params: StatsParams) -> AnalysisResult:
    """Single-call form (same maths as the shard map/reduce the runner uses)."""
    return stats_reduce(data, (stats_shard(part, params) for part in data.shard_inputs()), params)
