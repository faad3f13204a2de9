"""`kmeans`, `dbscan`, `hierarchical`: clusters of samples, their scores, purity against labels.

Purity and the scores leave DBSCAN noise out (purity is null when every row is noise). The k-means
inertia is over every row with the final centres, also when MiniBatchKMeans was streamed batch by batch.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, Optional

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from ...errors import ConfigError
from ..clustering import (AutoKMeans, KneeDBSCAN, best_cut_by_silhouette, cluster_purity,
                          cluster_scores, hierarchical_clustering)
from ..inputs import LayerInput
from ..registry import AnalysisResult, Params, register

SCORES = ("silhouette", "calinski_harabasz", "davies_bouldin")


class KRange(Params):
    n_clusters: Optional[int] = Field(None, ge=1, description="fixed k; None: best silhouette over [k_min, k_max]")
    k_min: int = Field(2, ge=2, description="smallest k tried")
    k_max: int = Field(10, ge=2, description="largest k tried (capped at n_rows - 1)")

    @model_validator(mode="after")
    def _ordered(self) -> "KRange":
        if self.k_min > self.k_max:
            raise ValueError(f"k_min={self.k_min} must be <= k_max={self.k_max}")
        return self


def _check_k(params: KRange, n: int) -> None:
    AutoKMeans(params.n_clusters, params.k_min, params.k_max).candidate_ks(n)


def _label_metrics(predicted: np.ndarray, truth: np.ndarray | None) -> dict[str, Any]:
    if truth is None:
        return {}
    from sklearn.metrics import adjusted_rand_score

    return {"purity": cluster_purity(predicted, truth), "adjusted_rand": float(adjusted_rand_score(truth, predicted)),
            "n_label_values": int(len(np.unique(truth)))}


def _sizes(labels: np.ndarray) -> dict[str, int]:
    values, counts = np.unique(labels, return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(values, counts)}


# -- k-means -----------------------------------------------------------------------------------
class KMeansParams(KRange):
    method: Literal["auto", "full", "minibatch"] = Field("auto", description="auto: minibatch above minibatch_threshold rows")
    minibatch_threshold: int = Field(50000, ge=1, description="rows above which auto streams MiniBatchKMeans")
    minibatch_size: int = Field(1024, ge=1, description="MiniBatchKMeans batch size (rows per update)")
    silhouette_samples: int = Field(5000, ge=2, description="rows the silhouette (and, streaming, all scores) use")
    seed: int = Field(0, description="seed of k-means and of the samples")


def check_kmeans(data: LayerInput, params: KMeansParams) -> None:
    _check_k(params, data.n_rows)


@register("kmeans", family="clustering", params=KMeansParams, scope="layer", uses_labels=True, check=check_kmeans,
          summary="k-means with k chosen by silhouette (MiniBatchKMeans streamed over shards for large runs); "
                  "scores, purity vs --labels",
          headline=("method", "n_clusters", "silhouette", "calinski_harabasz", "davies_bouldin", "purity"),
          version="2")  # 2: minibatch inertia over every row, not the last batch
def kmeans(data: LayerInput, params: KMeansParams) -> AnalysisResult:
    method = params.method
    if method == "auto":
        method = "minibatch" if data.n_rows > params.minibatch_threshold else "full"
    model = AutoKMeans(params.n_clusters, params.k_min, params.k_max, minibatch=method == "minibatch",
                       batch_size=params.minibatch_size, silhouette_samples=params.silhouette_samples,
                       random_state=params.seed)
    positions = np.arange(data.n_rows)
    if method == "full":
        x = data.array()
        model.fit(x)
        labels = model.labels_
        scores = cluster_scores(x, labels, params.silhouette_samples, params.seed)
    else:
        model.candidate_ks(data.n_rows)
        for batch in data.iter_batches(params.minibatch_size):
            model.partial_fit(batch)
        sample, sample_positions = data.sample(params.silhouette_samples, params.seed)
        model.finish(sample)
        labels = model.assign(data.iter_batches())  # also the inertia over every row, not the last batch's
        scores = cluster_scores(sample, labels[sample_positions], None, params.seed)
    truth = data.labels()
    metrics = {"method": method, "n_clusters": int(model.n_clusters_), "n_rows": data.n_rows, **scores,
               "inertia": model.inertia_, "cluster_sizes": _sizes(labels), **_label_metrics(labels, truth)}
    k_search = pd.DataFrame({"k": model.k_values_, "silhouette": model.silhouette_by_k_})
    return AnalysisResult(
        metrics=metrics,
        arrays={"labels": labels, "centers": model.cluster_centers_, "k_values": model.k_values_,
                "silhouette_by_k": model.silhouette_by_k_, "rows": data.layer_rows(positions)},
        tables={"assignments": data.point_table(positions, {"cluster": labels}), "k_search": k_search})


# -- DBSCAN ------------------------------------------------------------------------------------
class DBSCANParams(Params):
    eps: Optional[float] = Field(None, gt=0, description="neighbourhood radius; None: the k-distance knee")
    min_samples: int = Field(5, ge=2, description="points (itself included) that make a core point")
    max_samples: int = Field(10000, ge=2, description="rows clustered (a seeded sample above that)")
    silhouette_samples: int = Field(5000, ge=2, description="rows the silhouette uses")
    seed: int = Field(0, description="seed of the samples")


def check_dbscan(data: LayerInput, params: DBSCANParams) -> None:
    n = min(data.n_rows, params.max_samples)
    if params.min_samples > n:
        raise ConfigError(f"min_samples={params.min_samples} must be between 2 and n_samples={n}")


@register("dbscan", family="clustering", params=DBSCANParams, scope="layer", uses_labels=True, check=check_dbscan,
          summary="DBSCAN with eps from the k-distance knee; noise fraction, scores, purity vs --labels",
          headline=("eps", "n_clusters", "noise_fraction", "silhouette", "purity"),
          version="2")  # 2: purity over clustered rows (noise rows no longer count as pure)
def dbscan(data: LayerInput, params: DBSCANParams) -> AnalysisResult:
    x, positions = data.capped_sample(params.max_samples, params.seed, "DBSCAN")
    model = KneeDBSCAN(params.eps, params.min_samples).fit(x)
    labels = model.labels_
    truth = data.labels(positions)
    if model.n_clusters_ == 0:
        undefined = "; purity is undefined (null)" if truth is not None else ""
        warnings.warn(f"DBSCAN of {data.layer} found no cluster (every row is noise) with eps={model.eps_:.4g}"
                      f"{undefined}; pass a larger --param eps or a smaller min_samples", UserWarning, stacklevel=2)
    metrics = {"eps": model.eps_, "eps_from_knee": params.eps is None, "min_samples": params.min_samples,
               "n_clusters": model.n_clusters_, "noise_fraction": model.noise_fraction_, "n_used": int(len(positions)),
               **cluster_scores(x, labels, params.silhouette_samples, params.seed), "cluster_sizes": _sizes(labels),
               **_label_metrics(labels, truth)}
    arrays = {"labels": labels, "rows": data.layer_rows(positions)}
    if model.k_distances_.size:
        arrays["k_distances"] = model.k_distances_
    return AnalysisResult(metrics=metrics, arrays=arrays,
                          tables={"assignments": data.point_table(positions, {"cluster": labels})})


# -- hierarchical ------------------------------------------------------------------------------
class HierarchicalParams(KRange):
    linkage: Literal["ward", "single", "complete", "average", "centroid", "median", "weighted"] = Field(
        "ward", description="scipy linkage method")
    max_samples: int = Field(2000, ge=2, description="rows clustered (a seeded sample above that)")
    truncate: int = Field(0, ge=0, description="dendrogram data for the last p merges only (0: full)")
    silhouette_samples: int = Field(5000, ge=2, description="rows the silhouette uses")
    seed: int = Field(0, description="seed of the samples")


def check_hierarchical(data: LayerInput, params: HierarchicalParams) -> None:
    _check_k(params, min(data.n_rows, params.max_samples))


@register("hierarchical", family="clustering", params=HierarchicalParams, scope="layer", uses_labels=True,
          check=check_hierarchical,
          summary="agglomerative clustering: scipy linkage matrix, dendrogram data, flat cut by silhouette",
          headline=("n_clusters", "silhouette", "cophenetic_correlation", "purity"))
def hierarchical(data: LayerInput, params: HierarchicalParams) -> AnalysisResult:
    from scipy.cluster.hierarchy import cophenet
    from scipy.spatial.distance import pdist

    x, positions = data.capped_sample(params.max_samples, params.seed, "hierarchical clustering")
    tree = hierarchical_clustering(x, params.linkage, params.n_clusters, params.truncate)
    if params.n_clusters is None:
        k, labels, by_k = best_cut_by_silhouette(x, tree["linkage"], params.k_min, params.k_max,
                                                 params.silhouette_samples, params.seed)
        ks = np.arange(params.k_min, params.k_min + len(by_k))
    else:
        k, labels, by_k, ks = params.n_clusters, tree["labels"], np.empty(0), np.empty(0, dtype=np.int64)
    truth = data.labels(positions)
    cophenetic = float(cophenet(tree["linkage"], pdist(x.astype(np.float64)))[0]) if len(x) > 2 else None
    metrics = {"linkage": params.linkage, "n_clusters": int(k), "n_used": int(len(positions)),
               **cluster_scores(x, labels, params.silhouette_samples, params.seed), "cophenetic_correlation": cophenetic,
               "cluster_sizes": _sizes(labels), **_label_metrics(labels, truth)}
    dendrogram = tree["dendrogram"]
    arrays = {"linkage": tree["linkage"], "labels": labels, "rows": data.layer_rows(positions),
              "dendrogram_icoord": dendrogram["icoord"], "dendrogram_dcoord": dendrogram["dcoord"],
              "dendrogram_leaves": dendrogram["leaves"], "dendrogram_ivl": np.asarray(dendrogram["ivl"], dtype=str),
              "k_values": ks, "silhouette_by_k": by_k}
    return AnalysisResult(metrics=metrics, arrays=arrays,
                          tables={"assignments": data.point_table(positions, {"cluster": labels})})
