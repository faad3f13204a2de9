"""k-means inertia over every row (also streamed MiniBatchKMeans) and DBSCAN purity without noise rows, each
against numpy/sklearn on the raw arrays."""

import numpy as np
import pandas as pd
import pytest
from sklearn.cluster import DBSCAN
from sklearn.metrics import pairwise_distances

from analysistest_util import blobs, read_layer_h5, write_synthetic_run
from neuronmap.analysis import analyze
from neuronmap.analysis.clustering import AutoKMeans, cluster_purity


def numpy_inertia(x, centres, labels):
    """Sum over every row of its squared distance to its assigned centre (float64)."""
    x, centres = np.asarray(x, dtype=np.float64), np.asarray(centres, dtype=np.float64)
    return float(((x - centres[labels]) ** 2).sum())


def numpy_purity(predicted, truth):
    """Purity over the clustered rows: per cluster, the count of its most common label, over the clustered rows."""
    frame = pd.DataFrame({"cluster": predicted, "truth": truth})
    frame = frame[frame["cluster"] != -1]
    if frame.empty:
        return float("nan")
    return pd.crosstab(frame["cluster"], frame["truth"]).max(axis=1).sum() / len(frame)


@pytest.fixture(scope="module")
def planted():
    return blobs(n=300, n_features=10, centers=4, seed=2, std=2.0)


def test_streamed_minibatch_inertia_is_over_every_row(planted):
    x, _ = planted
    model = AutoKMeans(n_clusters=4, minibatch=True, batch_size=64)
    batches = np.array_split(x, 7)
    for batch in batches:
        model.partial_fit(batch)
    model.finish(x[::3])
    assert np.isnan(model.inertia_)  # a sample's inertia is not the data's
    labels = model.assign(iter(batches))
    distances = pairwise_distances(x.astype(np.float64), model.cluster_centers_.astype(np.float64), squared=True)
    np.testing.assert_array_equal(labels, distances.argmin(axis=1))
    assert model.inertia_ == pytest.approx(numpy_inertia(x, model.cluster_centers_, labels), rel=1e-9)
    assert model.inertia_ == pytest.approx(distances.min(axis=1).sum(), rel=1e-9)


@pytest.mark.parametrize("minibatch", [False, True])
def test_in_memory_fit_inertia_is_over_every_row(planted, minibatch):
    x, _ = planted
    model = AutoKMeans(k_min=2, k_max=5, minibatch=minibatch, batch_size=32).fit(x)
    assert model.inertia_ == pytest.approx(numpy_inertia(x, model.cluster_centers_, model.labels_), rel=1e-6)


@pytest.mark.parametrize("params", [dict(method="minibatch"), dict(method="auto", minibatch_threshold=100)])
def test_kmeans_analysis_minibatch_inertia_matches_the_stored_centres(tmp_path, planted, params):
    """The audit's repro: batches of 64 over 300 rows; the last batch (44 rows) must not be the inertia."""
    x, _ = planted
    path = write_synthetic_run(tmp_path / "run", {"blocks.0": x}, samples_per_shard=70)
    artifact = analyze(path, "kmeans", n_clusters=4, minibatch_size=64, **params)
    metrics = artifact.metrics("blocks.0")
    assert metrics["method"] == "minibatch"
    raw = read_layer_h5(path, "blocks.0")
    centres, labels = artifact.array("centers", "blocks.0"), artifact.array("labels", "blocks.0")
    assert len(labels) == 300
    assert metrics["inertia"] == pytest.approx(numpy_inertia(raw, centres, labels), rel=1e-9)
    last_batch = raw[256:]
    assert metrics["inertia"] > 2 * numpy_inertia(last_batch, centres, labels[256:])


def test_purity_leaves_noise_out_against_pandas(planted):
    x, y = planted
    labels = DBSCAN(eps=5.0, min_samples=8).fit_predict(x)
    assert 0 < np.mean(labels == -1) < 0.9 and len(set(labels) - {-1}) >= 2  # some noise, some clusters
    assert cluster_purity(labels, y) == pytest.approx(numpy_purity(labels, y), rel=1e-12)
    assert cluster_purity([-1, -1, 0, 0, 0, 1], list("aaabbc")) == pytest.approx(3 / 4)
    assert np.isnan(cluster_purity([-1, -1, -1], ["a", "b", "c"]))


def test_dbscan_analysis_all_noise_has_no_purity_and_says_so(tmp_path, planted):
    x, y = planted
    path = write_synthetic_run(tmp_path / "run", {"blocks.0": x}, labels={"topic": y.tolist()}, samples_per_shard=100)
    artifact = analyze(path, "dbscan", labels="topic", eps=0.01, min_samples=10)
    metrics = artifact.metrics("blocks.0")
    reference = DBSCAN(eps=0.01, min_samples=10).fit_predict(read_layer_h5(path, "blocks.0"))
    assert np.all(reference == -1) and metrics["noise_fraction"] == 1.0 and metrics["n_clusters"] == 0
    assert metrics["purity"] is None
    assert any("purity is undefined" in w for w in artifact.warnings)
    # with clusters and noise, the analysis' purity is the pandas one over the clustered rows
    artifact = analyze(path, "dbscan", labels="topic", eps=5.0, min_samples=8)
    labels = artifact.array("labels", "blocks.0")
    assert (labels == -1).any()
    assert artifact.metrics("blocks.0")["purity"] == pytest.approx(numpy_purity(labels, y), rel=1e-12)
