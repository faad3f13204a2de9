"""`cka`, `rsa`, `correlation`, `cosine`: how layers, neurons and samples resemble each other.

`cka` and `rsa` compare layers two at a time ("layer_pair" scope: one Ray task per pair with `--engine
ray`; linear and debiased `cka` add one task per layer for its self-moments, shared by its pairs);
`pair_matrix(artifact, "cka")` puts the pairs back into a layer x layer table. With
`--param other_run=PATH`, `cka` compares layer a of this run with layer b of another run of the same
prompts (every ordered pair of the selected layers, a == b included); the other run must hold the
same samples (same n_samples and prompt_source_hash) and the selected layers.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Literal, Optional

import numpy as np
import pandas as pd
from pydantic import Field, computed_field, field_validator

from ...errors import ConfigError, UnknownLayerError
from ...store import open_run
from ..cka import (cka_from_moment_summaries, cross_moment_summary, linear_cka, minibatch_cka, rbf_cka,
                   self_moment_summary)
from ..inputs import LayerInput, PairInput, intersect_ranges, merge_ranges
from ..registry import AnalysisResult, Params, register
from ..runner import share_layer_work
from ..rsa import rsa
from ..similarity import cosine_similarity, pearson_correlation


def _sampled_pair(data: PairInput, max_rows: int, seed: int, what: str) -> tuple[np.ndarray, np.ndarray, int]:
    """The same seeded rows of both layers (the positions depend only on the row count and the seed)."""
    positions = data.first.sample_positions(max_rows, seed)
    if len(positions) < data.n_rows:
        warnings.warn(f"{what} of {data.first.layer} and {data.second.layer} used a seeded sample of "
                      f"{len(positions)} of {data.n_rows} rows (max_samples={max_rows})", UserWarning, stacklevel=3)
    return data.first.take(positions), data.second.take(positions), len(positions)


# -- CKA ---------------------------------------------------------------------------------------
class CKAParams(Params):
    method: Literal["linear", "debiased", "minibatch", "rbf"] = Field(
        "linear", description="linear: exact feature-space CKA streamed over the shards; debiased: the same with the "
        "unbiased HSIC; minibatch: Nguyen et al. 2021, unbiased HSIC averaged over minibatches; rbf: Gaussian kernel "
        "on a seeded sample of max_samples rows")
    minibatch_size: int = Field(256, ge=4, description="minibatch: rows per minibatch")
    max_samples: int = Field(5000, ge=4, description="rbf: rows used (a seeded sample above that; two n x n matrices)")
    sigma_factor: float = Field(1.0, gt=0, description="rbf: bandwidth = sigma_factor * median pairwise distance")
    seed: int = Field(0, description="rbf: seed of the row sample")
    other_run: Optional[str] = Field(None, description="a run of another model on the same prompts: compare layer a "
                                     "of this run with layer b of that one, for every selected a, b")

    @field_validator("other_run")
    @classmethod
    def _a_run(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            open_run(value)  # RunFormatError (a ValueError) names what is wrong
        return value

    @computed_field(description="digest of the other run's committed shards, so the artifact id changes with them")
    @property
    def other_run_shards(self) -> Optional[str]:
        if self.other_run is None:
            return None
        shards = sorted(f"{s.layer}:{s.rows[0]}-{s.rows[1]}:{s.sha256}" for s in open_run(self.other_run).manifest.shards)
        return hashlib.sha256("\n".join(shards).encode()).hexdigest()[:16]


def _cka_pairs(params: CKAParams) -> str:
    return "all" if params.other_run is None else "ordered"


def _other_input(data: PairInput, other_path: str) -> PairInput:
    """Layer a of this run and layer b of `other_path` over the rows both have committed.

    ConfigError when the runs do not hold the same samples (n_samples, prompt_source_hash, and for
    per-token layers the tokenizer and n_tokens); UnknownLayerError when the other run lacks layer b.
    """
    mine, other = data.first.run, open_run(other_path)
    a, b = data.first.layer, data.second.layer
    theirs = other.manifest
    if theirs.n_samples != mine.manifest.n_samples:
        raise ConfigError(f"other_run={other_path} has n_samples={theirs.n_samples} but run {mine.path} has "
                          f"{mine.manifest.n_samples}: CKA between two runs compares the same prompts; extract both "
                          "models from the same prompt file")
    if theirs.prompt_source_hash != mine.manifest.prompt_source_hash:
        raise ConfigError(f"other_run={other_path} was extracted from other prompts (prompt_source_hash "
                          f"{theirs.prompt_source_hash!r}, this run {mine.manifest.prompt_source_hash!r}): CKA between "
                          "two runs compares the same prompts; extract both models from the same prompt file")
    if b not in theirs.layers:
        raise UnknownLayerError(f"layer {b!r} is not in other_run={other_path}; it holds: {', '.join(other.layers)}; "
                                "select layers both runs have with --layers")
    per_token = (mine.layer_info(a).per_token, other.layer_info(b).per_token)
    if per_token[0] != per_token[1]:
        raise ConfigError(f"layer {a} is stored {'per token' if per_token[0] else 'per sample'} but {b} of "
                          f"other_run={other_path} {'per token' if per_token[1] else 'per sample'}; compare layers "
                          "pooled alike")
    if per_token[0] and (theirs.tokenizer, theirs.n_tokens) != (mine.manifest.tokenizer, mine.manifest.n_tokens):
        raise ConfigError(f"per-token rows of other_run={other_path} (tokenizer {theirs.tokenizer!r}, "
                          f"{theirs.n_tokens} tokens) do not align with this run's ({mine.manifest.tokenizer!r}, "
                          f"{mine.manifest.n_tokens}); compare mean- or last-pooled runs")
    committed = merge_ranges([tuple(shard.rows) for shard in other.shards(b)])
    shared = intersect_ranges(data.first.ranges, committed)
    if not shared:
        raise ConfigError(f"layer {b} of other_run={other_path} has no committed rows in common with {a}; wait "
                          "for its extraction to write shards")
    first = LayerInput(data.first.run_path, data.first.manifest, a, shared, None, data.first.batch_size)
    second = LayerInput(other.path, theirs, b, shared, None, data.first.batch_size)
    return PairInput(first, second)


def _cka_input(data: PairInput, params: CKAParams) -> PairInput:
    return data if params.other_run is None else _other_input(data, params.other_run)


def check_cka(data: PairInput, params: CKAParams) -> None:
    data = _cka_input(data, params)
    least = 2 if params.method == "linear" else 4
    if data.n_rows < least:
        raise ConfigError(f"{params.method} CKA needs at least {least} rows; {data.first.layer} has "
                          f"n_rows={data.n_rows}")


def _check_aligned(data: PairInput, params: CKAParams) -> None:
    first, second = data.first, data.second
    if params.other_run is not None and not np.array_equal(first.sample_ids(), second.sample_ids()):
        raise ConfigError(f"rows of {first.layer} and of {second.layer} in other_run={params.other_run} hold "
                          "different sample ids: the runs are not aligned sample by sample")


def _cka_result(data: PairInput, params: CKAParams, value: float, n_used: int) -> AnalysisResult:
    first, second = data.first, data.second
    metrics = {"cka": value, "method": params.method, "n_used": n_used, "first": first.layer, "second": second.layer}
    if params.other_run is not None:
        metrics["other_run"] = params.other_run
    return AnalysisResult(metrics=metrics,
                          tables={"cka": pd.DataFrame({"first": [first.layer], "second": [second.layer], "cka": [value]})})


# linear and debiased CKA share each layer's self-moments between all its pairs (the runner's
# `share_layer_work`): a layer's task summarises (X, X) once, a pair's task only (X, Y).
def cka_layer_moments(data: LayerInput, params: CKAParams) -> tuple:
    """Self-moment summary of one layer, shared by every pair it is in."""
    return self_moment_summary(data.iter_batches)


def cka_pair_moments(data: PairInput, params: CKAParams) -> tuple:
    """Cross-moment summary of one (resolved) pair."""
    _check_aligned(data, params)
    return cross_moment_summary(data.first.iter_batches, data.second.iter_batches)


def cka_pair_reduce(data: PairInput, states: list, params: CKAParams) -> AnalysisResult:
    sxx, syy, sxy = states
    value = cka_from_moment_summaries(sxx, syy, sxy, debiased=params.method == "debiased")
    return _cka_result(data, params, value, data.n_rows)


@register("cka", family="similarity", params=CKAParams, scope="layer_pair", pairs=_cka_pairs, check=check_cka,
          summary="CKA between layers (linear, debiased, minibatch, rbf), within a run or against --param "
                  "other_run=PATH; pair_matrix() gives the layer x layer matrix",
          headline=("cka", "method", "n_used"))
@share_layer_work(layer_map=cka_layer_moments, pair_map=cka_pair_moments, pair_reduce=cka_pair_reduce,
                  resolve=lambda data, params: _cka_input(data, params),
                  enabled=lambda params: params.method in ("linear", "debiased"))
def cka(data: PairInput, params: CKAParams) -> AnalysisResult:
    """One pair on its own (what runs for minibatch and rbf; linear and debiased share layer work)."""
    data = _cka_input(data, params)
    _check_aligned(data, params)
    first, second = data.first, data.second
    n_used = data.n_rows
    if params.method in ("linear", "debiased"):
        value = linear_cka(first.iter_batches, second.iter_batches, debiased=params.method == "debiased")
    elif params.method == "minibatch":
        value = minibatch_cka(first.iter_batches, second.iter_batches, batch_size=params.minibatch_size)
    else:
        x, y, n_used = _sampled_pair(data, params.max_samples, params.seed, "RBF CKA")
        value = rbf_cka(x, y, sigma_factor=params.sigma_factor, max_samples=params.max_samples)
    return _cka_result(data, params, value, n_used)


# -- RSA ---------------------------------------------------------------------------------------
class RSAParams(Params):
    metric: Literal["correlation", "cosine", "euclidean"] = Field(
        "correlation", description="dissimilarity between samples (scipy pdist): 1 - Pearson r, 1 - cosine, Euclidean")
    method: Literal["spearman", "kendall_tau_a", "pearson"] = Field(
        "spearman", description="how two RDMs are compared; kendall_tau_a does not reward ties")
    max_samples: int = Field(2000, ge=3, description="rows used (a seeded sample above that); an RDM has n(n-1)/2 entries")
    seed: int = Field(0, description="seed of the row sample")


def check_rsa(data: PairInput, params: RSAParams) -> None:
    if min(data.n_rows, params.max_samples) < 3:
        raise ConfigError(f"RSA needs at least 3 rows (3 sample pairs); {data.first.layer} has n_rows={data.n_rows}")


@register("rsa", family="similarity", params=RSAParams, scope="layer_pair", check=check_rsa,
          summary="representational similarity: RDMs of a seeded sample compared by Spearman, Kendall's tau-a or "
                  "Pearson, per layer pair",
          headline=("rsa", "metric", "method", "n_used"))
def rsa_analysis(data: PairInput, params: RSAParams) -> AnalysisResult:
    x, y, n_used = _sampled_pair(data, params.max_samples, params.seed, "RSA")
    value = rsa(x, y, metric=params.metric, method=params.method, max_samples=params.max_samples)
    return AnalysisResult(
        metrics={"rsa": value, "metric": params.metric, "method": params.method, "n_used": n_used,
                 "first": data.first.layer, "second": data.second.layer},
        tables={"rsa": pd.DataFrame({"first": [data.first.layer], "second": [data.second.layer], "rsa": [value]})})


# -- neuron correlation -------------------------------------------------------------------------
class CorrelationParams(Params):
    max_neurons: int = Field(512, ge=2, description="neurons correlated when `neurons` is not given: the first "
                             "max_neurons (the result is max_neurons^2 floats)")
    neurons: Optional[list[int]] = Field(None, min_length=2, description="explicit neuron indices, e.g. 0,5,17")
    top_k: int = Field(20, ge=1, description="most correlated neuron pairs listed")


def _neuron_index(data: LayerInput, params: CorrelationParams) -> np.ndarray:
    d = data.n_features
    if params.neurons is not None:
        index = np.asarray(params.neurons, dtype=np.int64)
        bad = [int(i) for i in index if not 0 <= i < d]
        if bad:
            raise ConfigError(f"neurons={bad} must be between 0 and n_features - 1 = {d - 1} for layer {data.layer}")
        if len(np.unique(index)) != len(index):
            raise ConfigError(f"neurons={params.neurons} lists a neuron twice; give each once")
        return index
    if d < 2:
        raise ConfigError(f"layer {data.layer} has n_features={d}; a correlation matrix needs at least 2 neurons")
    return np.arange(min(d, params.max_neurons), dtype=np.int64)


def check_correlation(data: LayerInput, params: CorrelationParams) -> None:
    _neuron_index(data, params)
    if data.n_rows < 2:
        raise ConfigError(f"Pearson correlation needs at least 2 rows; layer {data.layer} has n_rows={data.n_rows}")


@register("correlation", family="similarity", params=CorrelationParams, scope="layer", check=check_correlation,
          summary="Pearson correlation matrix between the neurons of a layer (streamed; capped at max_neurons), "
                  "most correlated pairs",
          headline=("n_neurons", "mean_abs_correlation", "max_abs_correlation", "n_constant"))
def correlation(data: LayerInput, params: CorrelationParams) -> AnalysisResult:
    index = _neuron_index(data, params)
    if params.neurons is None and len(index) < data.n_features:
        warnings.warn(f"correlation of {data.layer} used the first {len(index)} of {data.n_features} neurons "
                      f"(max_neurons={params.max_neurons}); raise max_neurons or pass --param neurons=...",
                      UserWarning, stacklevel=2)
    contiguous = params.neurons is None

    def batches():
        for batch in data.iter_batches():
            yield batch[:, : len(index)] if contiguous else batch[:, index]

    r = pearson_correlation(batches)
    k = len(index)
    upper = np.triu_indices(k, 1)
    values = r[upper]
    constant = ~r.any(axis=1)
    order = np.argsort(-np.abs(values), kind="stable")[: params.top_k]
    top = pd.DataFrame({"neuron_a": index[upper[0][order]], "neuron_b": index[upper[1][order]], "r": values[order]})
    metrics = {"n_neurons": k, "n_rows": data.n_rows, "mean_abs_correlation": float(np.abs(values).mean()),
               "max_abs_correlation": float(np.abs(values).max()), "n_constant": int(constant.sum()),
               "top_pair": [int(top["neuron_a"].iloc[0]), int(top["neuron_b"].iloc[0])]}
    return AnalysisResult(metrics=metrics, arrays={"correlation": r, "neurons": index}, tables={"top_pairs": top})


# -- sample cosine ------------------------------------------------------------------------------
class CosineParams(Params):
    max_samples: int = Field(1000, ge=2, description="rows compared (a seeded sample above that); the result is n^2 floats")
    seed: int = Field(0, description="seed of the row sample")


def check_cosine(data: LayerInput, params: CosineParams) -> None:
    if min(data.n_rows, params.max_samples) < 2:
        raise ConfigError(f"cosine similarity between samples needs at least 2 rows; layer {data.layer} has "
                          f"n_rows={data.n_rows}")


@register("cosine", family="similarity", params=CosineParams, scope="layer", uses_labels=True, check=check_cosine,
          summary="cosine similarity between samples (seeded sample of max_samples rows); mean within and between "
                  "--labels",
          headline=("n_used", "mean", "std", "within_label_mean", "between_label_mean"))
def cosine(data: LayerInput, params: CosineParams) -> AnalysisResult:
    x, positions = data.capped_sample(params.max_samples, params.seed, "cosine similarity")
    s = cosine_similarity(x, max_samples=params.max_samples)
    off = ~np.eye(len(s), dtype=bool)
    values = s[off]
    metrics = {"n_used": int(len(positions)), "mean": float(values.mean()), "std": float(values.std()),
               "min": float(values.min()), "max": float(values.max())}
    labels = data.labels(positions)
    if labels is not None:
        same = (labels[:, None] == labels[None, :]) & off
        different = labels[:, None] != labels[None, :]
        metrics["within_label_mean"] = float(s[same].mean()) if same.any() else None
        metrics["between_label_mean"] = float(s[different].mean()) if different.any() else None
    return AnalysisResult(metrics=metrics, arrays={"cosine": s, "rows": data.layer_rows(positions),
                                                   "sample_ids": data.sample_ids(positions)})
