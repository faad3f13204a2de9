"""Clustering of samples (rows) by their activations, and how good the clusters are.

- `AutoKMeans`: k-means with k chosen by the silhouette score over a k range (or a fixed k);
  `minibatch=True` uses MiniBatchKMeans, and `partial_fit` lets a runner stream batches through all
  candidate k at once (one pass over the data per epoch).
- `KneeDBSCAN`: DBSCAN whose eps, when not given, is the knee of the sorted k-distance curve.
- `hierarchical_clustering`: scipy linkage matrix, dendrogram coordinates and a flat cut.
- `cluster_scores` (silhouette, Calinski-Harabasz, Davies-Bouldin) and `cluster_purity` (both leave
  DBSCAN noise rows out).

The knee (a kneedle-style rule, Satopää et al. 2011, without smoothing): sort each point's distance
to its (min_samples - 1)-th neighbour, scale both axes of that curve to [0, 1] and take the point
farthest below the straight line joining its ends; eps is the distance there. It is where the
curve turns from the dense bulk to the sparse tail.

Inputs are arrays of shape (n_samples, n_features); labels are int arrays of shape (n_samples,).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted, validate_data

from ..errors import ConfigError


def check_n_clusters(k: int, n_samples: int, name: str = "n_clusters") -> int:
    if isinstance(k, bool) or not 1 <= int(k) <= n_samples:
        raise ConfigError(f"{name}={k!r} must be between 1 and n_samples={n_samples}; lower it or analyse more rows")
    return int(k)


def cluster_scores(x: np.ndarray, labels: np.ndarray, sample_size: int | None = None, seed: int = 0) -> dict[str, float | None]:
    """Silhouette (on at most `sample_size` rows), Calinski-Harabasz and Davies-Bouldin scores.

    Rows labelled -1 (DBSCAN noise) are left out. Scores are None when there are fewer than 2
    clusters or as many clusters as rows (the scores are undefined there).
    """
    from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score

    labels = np.asarray(labels)
    keep = labels != -1
    x, labels = np.asarray(x)[keep], labels[keep]
    n_clusters = len(np.unique(labels))
    if not 2 <= n_clusters < len(labels):
        return {"silhouette": None, "calinski_harabasz": None, "davies_bouldin": None}
    size = None if sample_size is None or sample_size >= len(labels) else int(sample_size)
    silhouette = silhouette_score(x, labels, sample_size=size, random_state=seed)
    return {"silhouette": float(silhouette), "calinski_harabasz": float(calinski_harabasz_score(x, labels)),
            "davies_bouldin": float(davies_bouldin_score(x, labels))}


def cluster_purity(predicted: Any, truth: Any) -> float:
    """Purity: each cluster votes for its most frequent true label; fraction of clustered rows that agree.

    Noise rows (predicted -1) are left out, as `cluster_scores` leaves them out: counting each as a
    cluster of one that agrees with itself made a clustering that is all noise perfectly pure. NaN when
    every row is noise (purity is undefined; read it with the noise fraction).
    """
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    if predicted.shape != truth.shape or predicted.ndim != 1:
        raise ConfigError(f"predicted {predicted.shape} and true labels {truth.shape} must be 1-D of the same length")
    if predicted.size == 0:
        raise ConfigError("cluster purity needs at least one row")
    _, truth_codes = np.unique(truth, return_inverse=True)
    clustered = predicted != -1
    if not clustered.any():
        return float("nan")
    agree = 0
    for cluster in np.unique(predicted[clustered]):
        agree += int(np.bincount(truth_codes[predicted == cluster]).max())
    return agree / int(clustered.sum())


def squared_distance_to_centres(x: np.ndarray, centres: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Squared Euclidean distance of every row of x to its nearest centre, shape (n_samples,), in float64.

    Summed, it is the k-means inertia of x under `centres` (the nearest-centre assignment, which is what
    `predict` gives). Computed in chunks of `chunk` rows so memory stays (chunk, n_centres).
    """
    centres = np.asarray(centres, dtype=np.float64)
    x = np.asarray(x)
    x = x.reshape(len(x), -1)
    out = np.empty(len(x), dtype=np.float64)
    centre_norms = np.einsum("ij,ij->i", centres, centres)
    for start in range(0, len(x), chunk):
        block = x[start:start + chunk].astype(np.float64)
        d2 = np.einsum("ij,ij->i", block, block)[:, None] - 2.0 * block @ centres.T + centre_norms[None, :]
        out[start:start + chunk] = np.maximum(d2.min(axis=1), 0.0)
    return out


class AutoKMeans(ClusterMixin, BaseEstimator):
    """k-means with k picked by the silhouette score.

    Parameters
    ----------
    n_clusters : int or None, default=None
        Fixed k; None searches k in [k_min, k_max] (capped at n_samples - 1) for the best silhouette.
    k_min, k_max : int, default=2, 10
    minibatch : bool, default=False
        Use MiniBatchKMeans (for many rows).
    batch_size : int, default=1024
        MiniBatchKMeans batch size.
    silhouette_samples : int, default=5000
        Rows the silhouette is computed on (a seeded sample above that).
    random_state : int, default=0

    Attributes
    ----------
    n_clusters_ : int
    labels_ : ndarray of shape (n_samples,)
    cluster_centers_ : ndarray of shape (n_clusters_, n_features)
    inertia_ : float
        Sum of squared distances of the rows to their nearest final centre, over every row fitted (after
        `fit`) or streamed through `assign` (after `partial_fit` + `finish`; NaN until then). Never
        MiniBatchKMeans' own `inertia_`, which after `partial_fit` covers the last batch only.
    k_values_ : ndarray of int, candidate k
    silhouette_by_k_ : ndarray of float, silhouette of each candidate
    """

    def __init__(self, n_clusters: int | None = None, k_min: int = 2, k_max: int = 10, minibatch: bool = False,
                 batch_size: int = 1024, silhouette_samples: int = 5000, random_state: int = 0):
        self.n_clusters = n_clusters
        self.k_min = k_min
        self.k_max = k_max
        self.minibatch = minibatch
        self.batch_size = batch_size
        self.silhouette_samples = silhouette_samples
        self.random_state = random_state

    def candidate_ks(self, n_samples: int) -> list[int]:
        """The k values tried for `n_samples` rows (ConfigError when none is possible)."""
        if self.n_clusters is not None:
            return [check_n_clusters(self.n_clusters, n_samples)]
        if not 2 <= self.k_min <= self.k_max:
            raise ConfigError(f"k_min={self.k_min!r} and k_max={self.k_max!r} must satisfy 2 <= k_min <= k_max")
        top = min(self.k_max, n_samples - 1)
        if self.k_min > top:
            raise ConfigError(f"k_min={self.k_min} must be <= n_samples - 1={n_samples - 1} to choose k by "
                              "silhouette; set n_clusters or analyse more rows")
        return list(range(self.k_min, top + 1))

    def _model(self, k: int):
        from sklearn.cluster import KMeans, MiniBatchKMeans

        if self.minibatch:
            return MiniBatchKMeans(n_clusters=k, batch_size=self.batch_size, random_state=self.random_state, n_init=3)
        return KMeans(n_clusters=k, random_state=self.random_state, n_init=4)

    def fit(self, X, y=None):
        """Fit every candidate k on X, shape (n_samples, n_features); keep the best."""
        X = validate_data(self, X, dtype=[np.float64, np.float32])
        ks = self.candidate_ks(X.shape[0])
        models = {k: self._model(k).fit(X) for k in ks}
        return self._choose(models, X, {k: m.labels_ for k, m in models.items()})

    @available_if(lambda self: self.minibatch)
    def partial_fit(self, X, y=None):
        """MiniBatchKMeans.partial_fit of every candidate k on one batch (only with minibatch=True).

        Streaming: feed every batch, then call `finish(sample)` to pick k by silhouette on a sample.
        """
        first = not hasattr(self, "models_")
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=first)
        if first:
            ks = [check_n_clusters(self.n_clusters, 10 ** 12)] if self.n_clusters is not None else \
                self.candidate_ks(10 ** 12)
            self.models_ = {k: self._model(k) for k in ks}
        for k, model in self.models_.items():
            if hasattr(model, "cluster_centers_") or len(X) >= k:
                model.partial_fit(X)
        return self

    def finish(self, X_sample: np.ndarray) -> "AutoKMeans":
        """After `partial_fit`: choose k by the silhouette on `X_sample` (rows held in memory).

        `labels_` are then the sample's; `inertia_` is NaN until `assign` streams every row.
        """
        check_is_fitted(self, "models_")
        models = {k: m for k, m in self.models_.items() if hasattr(m, "cluster_centers_") and k < len(X_sample)}
        if not models:
            raise ConfigError(f"no candidate k could be fitted on {len(X_sample)} sampled rows; lower k_min/n_clusters")
        self._choose(models, X_sample, {k: m.predict(X_sample) for k, m in models.items()})
        self.inertia_ = float("nan")  # the sample's would understate it: `assign` sums over every row
        return self

    def assign(self, batches) -> np.ndarray:
        """Labels of every row streamed as `batches` (iterable of arrays); sets `inertia_` to their total.

        One pass; after `finish` this is what makes `inertia_` the inertia of all the data with the final
        centres. Returns the labels, shape (n_rows,).
        """
        check_is_fitted(self, "model_")
        labels, inertia = [], 0.0
        for batch in batches:
            labels.append(self.predict(batch))
            inertia += float(squared_distance_to_centres(batch, self.cluster_centers_).sum())
        self.inertia_ = inertia
        return np.concatenate(labels) if labels else np.empty(0, dtype=np.int32)

    def _choose(self, models: dict, X: np.ndarray, labels: dict) -> "AutoKMeans":
        ks = sorted(models)
        scores = []
        for k in ks:
            scores.append(cluster_scores(X, labels[k], self.silhouette_samples, self.random_state)["silhouette"]
                          if len(ks) > 1 else None)
        best = ks[int(np.nanargmax([np.nan if s is None else s for s in scores]))] if len(ks) > 1 else ks[0]
        chosen = models[best]
        self.k_values_ = np.asarray(ks)
        self.silhouette_by_k_ = np.asarray([np.nan if s is None else s for s in scores], dtype=np.float64)
        self.n_clusters_ = best
        self.cluster_centers_ = chosen.cluster_centers_
        self.labels_ = labels[best]
        self.inertia_ = float(squared_distance_to_centres(X, chosen.cluster_centers_).sum())
        self.model_ = chosen
        return self

    def predict(self, X):
        check_is_fitted(self, "model_")
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        return self.model_.predict(X)


def knee_index(values: np.ndarray) -> int:
    """Index of the knee of an ascending curve: the point farthest below the chord (scaled to [0, 1])."""
    y = np.sort(np.asarray(values, dtype=np.float64))
    if len(y) < 3 or y[-1] == y[0]:
        return len(y) // 2
    x_scaled = np.linspace(0.0, 1.0, len(y))
    y_scaled = (y - y[0]) / (y[-1] - y[0])
    return int(np.argmax(x_scaled - y_scaled))


def k_distances(x: np.ndarray, k: int) -> np.ndarray:
    """Sorted distance of every row to its k-th nearest other row, shape (n_samples,)."""
    from .dimensionality import neighbour_distances

    return np.sort(neighbour_distances(x, k)[:, k - 1])


class KneeDBSCAN(ClusterMixin, BaseEstimator):
    """DBSCAN with eps from the knee of the k-distance curve when eps is None.

    Parameters
    ----------
    eps : float or None, default=None
    min_samples : int, default=5
        As in DBSCAN (the point itself included); the k-distance uses k = min_samples - 1.

    Attributes
    ----------
    eps_ : float
    labels_ : ndarray of shape (n_samples,), -1 for noise
    n_clusters_ : int
    noise_fraction_ : float
    k_distances_ : ndarray of shape (n_samples,), sorted (empty when eps was given)
    """

    def __init__(self, eps: float | None = None, min_samples: int = 5):
        self.eps = eps
        self.min_samples = min_samples

    def fit(self, X, y=None):
        from sklearn.cluster import DBSCAN

        X = validate_data(self, X, dtype=[np.float64, np.float32])
        n = X.shape[0]
        if isinstance(self.min_samples, bool) or not 2 <= int(self.min_samples) <= n:
            raise ConfigError(f"min_samples={self.min_samples!r} must be between 2 and n_samples={n}")
        if self.eps is not None and not self.eps > 0:
            raise ConfigError(f"eps={self.eps!r} must be > 0 (or None for the k-distance knee)")
        self.k_distances_ = np.empty(0)
        eps = self.eps
        if eps is None:
            self.k_distances_ = k_distances(X, int(self.min_samples) - 1)
            eps = float(self.k_distances_[knee_index(self.k_distances_)])
            if eps <= 0:
                positive = self.k_distances_[self.k_distances_ > 0]
                eps = float(positive[0]) if positive.size else 1.0
                warnings.warn(f"the k-distance knee is 0 (duplicate rows); eps={eps:.4g} used instead",
                              UserWarning, stacklevel=2)
        self.eps_ = float(eps)
        self.labels_ = DBSCAN(eps=self.eps_, min_samples=int(self.min_samples)).fit_predict(X)
        self.n_clusters_ = int(len(set(self.labels_.tolist()) - {-1}))
        self.noise_fraction_ = float(np.mean(self.labels_ == -1))
        return self


def hierarchical_clustering(x: np.ndarray, method: str = "ward", n_clusters: int | None = None,
                            truncate: int = 0) -> dict[str, Any]:
    """Agglomerative clustering of x, shape (n_samples, n_features), with scipy.

    Returns ``linkage`` (ndarray (n_samples - 1, 4), scipy's format), ``labels`` (flat cut into
    n_clusters, 0-based; None when n_clusters is None) and ``dendrogram`` (scipy's icoord, dcoord,
    leaves, ivl; the last `truncate` merges only when truncate > 0).
    """
    from scipy.cluster import hierarchy

    methods = ("ward", "single", "complete", "average", "centroid", "median", "weighted")
    if method not in methods:
        raise ConfigError(f"method={method!r} must be one of {', '.join(methods)}")
    x = np.asarray(x, dtype=np.float64)
    if len(x) < 2:
        raise ConfigError(f"hierarchical clustering needs at least 2 samples, got n_samples={len(x)}")
    linkage = hierarchy.linkage(x, method=method)
    labels = None
    if n_clusters is not None:
        check_n_clusters(n_clusters, len(x))
        labels = hierarchy.fcluster(linkage, t=n_clusters, criterion="maxclust") - 1
    kwargs = {"truncate_mode": "lastp", "p": int(truncate)} if truncate else {}
    tree = hierarchy.dendrogram(linkage, no_plot=True, **kwargs)
    dendrogram = {"icoord": np.asarray(tree["icoord"]), "dcoord": np.asarray(tree["dcoord"]),
                  "leaves": np.asarray(tree["leaves"], dtype=np.int64), "ivl": [str(v) for v in tree["ivl"]]}
    return {"linkage": linkage, "labels": labels, "dendrogram": dendrogram}


def best_cut_by_silhouette(x: np.ndarray, linkage: np.ndarray, k_min: int, k_max: int,
                           sample_size: int | None = 5000, seed: int = 0) -> tuple[int, np.ndarray, np.ndarray]:
    """Flat cut of a linkage with the best silhouette over k in [k_min, min(k_max, n - 1)].

    Returns (k, labels, silhouette of each candidate k).
    """
    from scipy.cluster import hierarchy

    top = min(k_max, len(x) - 1)
    if not 2 <= k_min <= top:
        raise ConfigError(f"k_min={k_min} must be between 2 and min(k_max, n_samples - 1)={top}")
    ks = list(range(k_min, top + 1))
    cuts = {k: hierarchy.fcluster(linkage, t=k, criterion="maxclust") - 1 for k in ks}
    scores = np.asarray([np.nan if (s := cluster_scores(x, cuts[k], sample_size, seed)["silhouette"]) is None else s
                         for k in ks])
    best = ks[int(np.nanargmax(scores))] if np.isfinite(scores).any() else ks[0]
    return best, cuts[best], scores
