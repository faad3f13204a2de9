"""Clustering recovers planted Gaussian blobs; knee, purity and k checks on hand-made cases."""

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from analysistest_util import blobs, write_synthetic_run
from neuronmap.analysis import analyze
from neuronmap.analysis.clustering import (AutoKMeans, KneeDBSCAN, best_cut_by_silhouette, cluster_purity,
                                           cluster_scores, hierarchical_clustering, knee_index)
from neuronmap.errors import ConfigError


@pytest.fixture(scope="module")
def planted():
    return blobs(n=400, n_features=12, centers=4, seed=1)


def test_auto_kmeans_finds_k_and_the_blobs(planted):
    x, y = planted
    model = AutoKMeans(k_min=2, k_max=7).fit(x)
    assert model.n_clusters_ == 4 and adjusted_rand_score(y, model.labels_) > 0.9
    assert list(model.k_values_) == [2, 3, 4, 5, 6, 7] and np.nanargmax(model.silhouette_by_k_) == 2
    np.testing.assert_array_equal(model.predict(x), model.labels_)


def test_minibatch_kmeans_streamed_over_batches_finds_the_blobs(planted):
    x, y = planted
    model = AutoKMeans(k_min=2, k_max=6, minibatch=True, batch_size=64)
    for batch in np.array_split(x, 8):
        model.partial_fit(batch)
    model.finish(x[::2])
    assert model.n_clusters_ == 4 and adjusted_rand_score(y, model.predict(x)) > 0.9


def test_knee_dbscan_finds_the_blobs(planted):
    x, y = planted
    model = KneeDBSCAN(min_samples=5).fit(x)
    kept = model.labels_ != -1
    assert model.n_clusters_ == 4 and model.noise_fraction_ < 0.1
    assert adjusted_rand_score(y[kept], model.labels_[kept]) > 0.9
    assert model.eps_ == pytest.approx(model.k_distances_[knee_index(model.k_distances_)])


def test_hierarchical_finds_the_blobs_and_returns_dendrogram_data(planted):
    x, y = planted
    tree = hierarchical_clustering(x, "ward", n_clusters=4)
    assert adjusted_rand_score(y, tree["labels"]) > 0.9
    assert tree["linkage"].shape == (399, 4) and tree["dendrogram"]["icoord"].shape == (399, 4)
    assert sorted(tree["dendrogram"]["leaves"].tolist()) == list(range(400))
    k, labels, scores = best_cut_by_silhouette(x, tree["linkage"], 2, 8)
    assert k == 4 and len(scores) == 7


def test_knee_of_a_hand_made_curve():
    curve = np.concatenate([np.linspace(0, 1, 90), np.linspace(2, 20, 10)])
    assert knee_index(curve) == 89  # the last point of the flat bulk


def test_purity_and_scores_by_hand():
    assert cluster_purity([0, 0, 1, 1, 1, 2], ["a", "a", "b", "b", "a", "c"]) == pytest.approx(5 / 6)
    assert cluster_purity([-1, 0, 0], ["a", "b", "b"]) == 1.0
    x = np.array([[0.0], [0.1], [10.0], [10.1]])
    scores = cluster_scores(x, np.array([0, 0, 1, 1]))
    # silhouette by hand: a = 0.1, b = ~10 for every point
    expected = np.mean([1 - 0.1 / 10.05, 1 - 0.1 / 9.95, 1 - 0.1 / 9.95, 1 - 0.1 / 10.05])
    assert scores["silhouette"] == pytest.approx(expected, rel=1e-9)
    assert cluster_scores(x, np.array([0, 0, 0, 0]))["silhouette"] is None


def test_k_larger_than_n_is_a_clear_error():
    x = np.random.default_rng(0).standard_normal((5, 3))
    with pytest.raises(ConfigError, match="n_clusters=10 must be between 1 and n_samples=5"):
        AutoKMeans(n_clusters=10).fit(x)
    with pytest.raises(ConfigError, match="k_min=6 must be <= n_samples - 1=4"):
        AutoKMeans(k_min=6, k_max=8).fit(x)
    with pytest.raises(ConfigError, match="min_samples=9 must be between 2 and n_samples=5"):
        KneeDBSCAN(min_samples=9).fit(x)


def test_clustering_analyses_on_a_run_with_labels(tmp_path, planted):
    x, y = planted
    run = write_synthetic_run(tmp_path / "run", {"blocks.0": x}, labels={"topic": [f"t{v}" for v in y]},
                              samples_per_shard=128)
    km = analyze(run, "kmeans", labels="topic", params={"k_max": 6})
    assert km.metrics()["n_clusters"] == 4 and km.metrics()["purity"] > 0.95 and km.metrics()["adjusted_rand"] > 0.9
    assignments = km.table("assignments")
    assert list(assignments.columns) == ["layer", "sample_id", "row", "cluster", "label"] and len(assignments) == 400
    streamed = analyze(run, "kmeans", labels="topic", params={"k_max": 6, "method": "minibatch", "minibatch_size": 100})
    assert streamed.metrics()["method"] == "minibatch" and streamed.metrics()["adjusted_rand"] > 0.9
    db = analyze(run, "dbscan", labels="topic")
    assert db.metrics()["n_clusters"] == 4 and db.metrics()["eps_from_knee"] and db.array("k_distances").shape == (400,)
    tree = analyze(run, "hierarchical", labels="topic", params={"k_max": 6})
    assert tree.metrics()["n_clusters"] == 4 and tree.metrics()["adjusted_rand"] > 0.9
    assert tree.array("linkage").shape == (399, 4) and tree.array("dendrogram_ivl").dtype.kind == "U"
    with pytest.raises(ConfigError, match="n_clusters=500 must be between 1 and n_samples=400"):
        analyze(run, "kmeans", params={"n_clusters": 500})
