"""`pca`, `intrinsic-dim`, `tsne`: how many dimensions a layer uses, and a 2-D picture of it."""

from __future__ import annotations

import warnings
from typing import Literal, Optional

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from ...errors import ConfigError
from ..dimensionality import (CovariancePCA, check_n_components, covariance_participation_ratio, fit_pca,
                              intrinsic_dimension, participation_ratio, spectrum_summary, streaming_pca, tsne_embedding)
from ..inputs import LayerInput
from ..registry import AnalysisResult, Params, register


# -- pca ---------------------------------------------------------------------------------------
class PCAParams(Params):
    n_components: Optional[int] = Field(None, ge=1, description="components; None: min(n_rows, n_features) (exact), "
                                        "min(n_rows, n_features, 256) (incremental)")
    method: Literal["auto", "exact", "incremental"] = Field(
        "auto", description="auto: exact up to exact_max_rows rows; incremental: one streamed pass over the shards "
        "(the float64 covariance matrix, eigendecomposed: exact, while it fits; IncrementalPCA for wider layers)")
    exact_max_rows: int = Field(20000, ge=2, description="above this many rows, auto streams over the shards")
    keep_components: int = Field(20, ge=0, description="component vectors stored in the artifact")
    project: int = Field(2, ge=0, le=10, description="principal coordinates stored per row (0: none)")
    seed: int = Field(0, description="seed of the randomized solvers")


def _pca_method(data: LayerInput, params: PCAParams) -> str:
    if params.method != "auto":
        return params.method
    return "exact" if data.n_rows <= params.exact_max_rows else "incremental"


def _pca_components(data: LayerInput, params: PCAParams) -> int:
    if params.n_components is None and _pca_method(data, params) == "incremental":
        return min(data.n_rows, data.n_features, 256)  # every eigenvalue is computed anyway; 256 are stored
    return check_n_components(params.n_components, data.n_rows, data.n_features)


def check_pca(data: LayerInput, params: PCAParams) -> None:
    if data.n_rows < 2:
        raise ConfigError(f"PCA needs at least 2 rows; layer {data.layer} has n_rows={data.n_rows}")
    _pca_components(data, params)


@register("pca", family="dimensionality", params=PCAParams, scope="layer", uses_labels=True, check=check_pca,
          summary="PCA (in memory, or streamed over the shards: covariance eigendecomposition, IncrementalPCA for "
                  "very wide layers): explained variance, effective dim 95/99%, participation ratio",
          headline=("method", "n_components", "effective_dim_95", "effective_dim_99", "participation_ratio"),
          version="3")
def pca(data: LayerInput, params: PCAParams) -> AnalysisResult:
    """The participation ratio is of the whole spectrum (every eigenvalue) whenever it is known -- exact
    PCA and the streamed covariance -- whatever n_components keeps; IncrementalPCA knows only its kept
    components, and then ``participation_ratio_basis`` is "kept_components" and a warning says so."""
    method = _pca_method(data, params)
    k = _pca_components(data, params)
    full_pr = None
    if method == "exact":
        x = data.array()
        model = fit_pca(x, k, params.seed)  # float64
        complete = model.n_components_ == min(data.n_rows, data.n_features)
        full_pr = participation_ratio(model.explained_variance_) if complete else covariance_participation_ratio(x)
        projection = model.transform(x)[:, : params.project] if params.project else None
    else:
        model = streaming_pca(data.iter_batches(), k)
        projection = None
        if params.project:
            projection = np.concatenate([model.transform(batch)[:, : params.project] for batch in data.iter_batches()])
    solver = "covariance" if isinstance(model, CovariancePCA) else "svd" if method == "exact" else "incremental_pca"
    if isinstance(model, CovariancePCA):
        full_pr = model.participation_ratio_
    metrics = {"method": method, "solver": solver, "n_rows": data.n_rows, "n_features": data.n_features,
               "total_variance": float(np.sum(model.explained_variance_) / max(np.sum(model.explained_variance_ratio_), 1e-300)),
               **spectrum_summary(model.explained_variance_, model.explained_variance_ratio_, full_pr)}
    if full_pr is None and k < min(data.n_rows, data.n_features):
        warnings.warn(f"participation_ratio is computed from the {k} kept components only (IncrementalPCA does not "
                      "know the rest of the spectrum): it underestimates the whole spectrum's and grows with "
                      "n_components", UserWarning, stacklevel=2)
    unknown = [f"effective_dim_{t}" for t in ("95", "99") if metrics[f"effective_dim_{t}"] is None]
    if unknown:
        warnings.warn(f"the {k} components explain {metrics['explained_variance_ratio_total']:.1%} of the variance: "
                      f"{' and '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} unknown; raise n_components "
                      f"(at most {min(data.n_rows, data.n_features)})", UserWarning, stacklevel=2)
    ratio = model.explained_variance_ratio_
    arrays = {"explained_variance": model.explained_variance_, "explained_variance_ratio": ratio,
              "singular_values": model.singular_values_, "mean": model.mean_,
              "components": model.components_[: params.keep_components]}
    tables = {"spectrum": pd.DataFrame({"component": np.arange(1, len(ratio) + 1),
                                        "explained_variance": model.explained_variance_,
                                        "explained_variance_ratio": ratio, "cumulative": np.cumsum(ratio)})}
    if projection is not None:
        arrays["projection"] = projection
        positions = np.arange(data.n_rows)
        tables["projection"] = data.point_table(positions, {f"pc{i + 1}": projection[:, i]
                                                            for i in range(projection.shape[1])})
    return AnalysisResult(metrics=metrics, arrays=arrays, tables=tables)


# -- intrinsic dimension -----------------------------------------------------------------------
class IntrinsicDimParams(Params):
    method: Literal["both", "twonn", "mle"] = Field("both", description="TwoNN (Facco 2017), MLE (Levina-Bickel 2004)")
    max_samples: int = Field(5000, ge=3, description="rows used (a seeded sample above that)")
    k1: int = Field(10, ge=2, description="MLE: smallest neighbourhood")
    k2: int = Field(20, ge=2, description="MLE: largest neighbourhood")
    discard_fraction: float = Field(0.1, ge=0, lt=1, description="TwoNN: largest ratios left out of the fit")
    seed: int = Field(0, description="seed of the row sample")

    @model_validator(mode="after")
    def _ordered(self) -> "IntrinsicDimParams":
        if self.k1 > self.k2:
            raise ValueError(f"k1={self.k1} must be <= k2={self.k2}")
        return self


def check_intrinsic(data: LayerInput, params: IntrinsicDimParams) -> None:
    n = min(data.n_rows, params.max_samples)
    if params.method in ("both", "mle") and params.k2 >= n:
        raise ConfigError(f"k2={params.k2} must be < n_samples={n} for the MLE estimate; lower k2 or analyse more rows")
    if n < 3:
        raise ConfigError(f"intrinsic dimension needs at least 3 rows, got n_samples={n}")


@register("intrinsic-dim", family="dimensionality", params=IntrinsicDimParams, scope="layer", check=check_intrinsic,
          summary="intrinsic dimension by TwoNN and MLE (MacKay-Ghahramani averaged), on a seeded sample",
          headline=("twonn", "mle", "n_used"))
def intrinsic_dim(data: LayerInput, params: IntrinsicDimParams) -> AnalysisResult:
    x, positions = data.capped_sample(params.max_samples, params.seed, "intrinsic-dim")
    estimates = intrinsic_dimension(x.astype(np.float64), params.method, params.k1, params.k2, params.discard_fraction)
    return AnalysisResult(metrics={**estimates, "n_used": int(len(positions)), "n_features": data.n_features},
                          arrays={"rows": data.layer_rows(positions)})


# -- t-SNE -------------------------------------------------------------------------------------
class TSNEParams(Params):
    perplexity: float = Field(30.0, gt=0, description="must be below the number of rows used")
    max_samples: int = Field(2000, ge=2, description="rows embedded (a seeded sample above that)")
    n_components: int = Field(2, ge=1, le=3, description="embedding dimensions")
    max_iter: int = Field(1000, ge=250, description="optimisation iterations")
    seed: int = Field(0, description="seed of the sample and of t-SNE")


def check_tsne(data: LayerInput, params: TSNEParams) -> None:
    n = min(data.n_rows, params.max_samples)
    if params.perplexity >= n:
        raise ConfigError(f"perplexity={params.perplexity:g} must be less than n_samples={n}; "
                          f"pass --param perplexity={max(1, (n - 1) // 3)} or analyse more rows")


@register("tsne", family="dimensionality", params=TSNEParams, scope="layer", uses_labels=True, check=check_tsne,
          summary="seeded t-SNE embedding of a capped row sample (coordinates per sample_id, with labels)",
          headline=("n_used", "perplexity"))
def tsne(data: LayerInput, params: TSNEParams) -> AnalysisResult:
    x, positions = data.capped_sample(params.max_samples, params.seed, "t-SNE")
    embedding = tsne_embedding(x, params.n_components, params.perplexity, params.seed, params.max_iter)
    columns = {f"tsne{i + 1}": embedding[:, i] for i in range(embedding.shape[1])}
    return AnalysisResult(metrics={"n_used": int(len(positions)), "perplexity": params.perplexity},
                          arrays={"embedding": embedding, "rows": data.layer_rows(positions)},
                          tables={"embedding": data.point_table(positions, columns)})
