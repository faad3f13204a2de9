"""PCA against numpy's eigendecomposition and scikit-learn, intrinsic dimension of planted subspaces."""

import numpy as np
import pytest
from sklearn.decomposition import PCA

from analysistest_util import embedded_subspace, write_synthetic_run
from neuronmap.analysis import analyze
from neuronmap.analysis import dimensionality
from neuronmap.analysis.dimensionality import (CovariancePCA, LevinaBickelMLE, TwoNN, effective_dimensionality,
                                               fit_pca, intrinsic_dimension, participation_ratio, rebatch,
                                               spectrum_summary, streaming_pca, tsne_embedding)
from neuronmap.errors import ConfigError


def low_rank(n=800, d=24, rank=4, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    scales = np.array([5.0, 3.0, 2.0, 1.0])[:rank]
    return (rng.standard_normal((n, rank)) * scales) @ np.linalg.qr(rng.standard_normal((d, rank)))[0].T \
        + noise * rng.standard_normal((n, d)) + 3.0


def assert_same_up_to_sign(a, b, atol):
    signs = np.sign(np.sum(a * b, axis=1, keepdims=True))
    np.testing.assert_allclose(a * signs, b, atol=atol)


def test_exact_pca_matches_the_covariance_eigendecomposition():
    x = low_rank()
    model = fit_pca(x)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(x, rowvar=False))
    order = np.argsort(eigenvalues)[::-1]
    np.testing.assert_allclose(model.explained_variance_, eigenvalues[order], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(model.explained_variance_ratio_, eigenvalues[order] / eigenvalues.sum(), rtol=1e-8, atol=1e-12)
    assert_same_up_to_sign(model.components_[:4], eigenvectors[:, order[:4]].T, atol=1e-8)


def test_streaming_pca_is_close_to_exact():
    x = low_rank(n=3000, seed=1)
    exact = PCA(n_components=6).fit(x)
    streamed = streaming_pca((x[i:i + 250] for i in range(0, len(x), 250)), n_components=6)
    np.testing.assert_allclose(streamed.explained_variance_ratio_[:4], exact.explained_variance_ratio_[:4], rtol=1e-3)
    np.testing.assert_allclose(streamed.mean_, x.mean(axis=0), rtol=1e-10)
    assert_same_up_to_sign(streamed.components_[:4], exact.components_[:4], atol=1e-2)


def full_rank(n=2500, d=24, seed=3):
    """Distinct eigenvalues all the way down (so every component is defined up to sign), offset mean."""
    rng = np.random.default_rng(seed)
    scales = np.geomspace(10.0, 0.05, d)
    return (rng.standard_normal((n, d)) * scales) @ np.linalg.qr(rng.standard_normal((d, d)))[0].T + 50.0


@pytest.mark.parametrize("k", [None, 7])
def test_covariance_pca_streamed_equals_sklearn_pca(k):
    x = full_rank()
    reference = PCA(n_components=k, svd_solver="full").fit(x)
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.integers(0, len(x), 9))
    streamed = streaming_pca(np.split(x, cuts), n_components=k or x.shape[1])  # uneven batches, some empty
    assert isinstance(streamed, CovariancePCA) and streamed.n_samples_seen_ == len(x)
    np.testing.assert_allclose(streamed.mean_, reference.mean_, rtol=1e-12)
    np.testing.assert_allclose(streamed.explained_variance_, reference.explained_variance_, rtol=1e-9)
    np.testing.assert_allclose(streamed.explained_variance_ratio_, reference.explained_variance_ratio_, rtol=1e-9)
    np.testing.assert_allclose(streamed.singular_values_, reference.singular_values_, rtol=1e-9)
    np.testing.assert_allclose(streamed.noise_variance_, reference.noise_variance_, rtol=1e-9, atol=1e-12)
    assert_same_up_to_sign(streamed.components_, reference.components_, atol=1e-8)
    projected, expected = streamed.transform(x[:50]), reference.transform(x[:50])
    signs = np.sign(np.sum(projected * expected, axis=0))
    np.testing.assert_allclose(projected * signs, expected, atol=1e-7)


def test_covariance_pca_partial_fits_merge_into_the_single_fit():
    x = full_rank(seed=4)
    whole = CovariancePCA(n_components=5).fit(x)
    left, right = CovariancePCA(n_components=5), CovariancePCA(n_components=5)
    for part in np.array_split(x[:900], 4):
        left.partial_fit(part)
    right.partial_fit(x[900:])
    merged = left.merge(right)
    assert merged.n_samples_seen_ == len(x)
    np.testing.assert_allclose(merged.explained_variance_, whole.explained_variance_, rtol=1e-10)
    assert_same_up_to_sign(merged.components_, whole.components_, atol=1e-9)
    with pytest.raises(ValueError, match="features"):
        CovariancePCA().fit(x).partial_fit(x[:, :3])


def test_streaming_pca_falls_back_to_incremental_pca_for_wide_layers(monkeypatch):
    from sklearn.decomposition import IncrementalPCA

    x = low_rank(n=3000, seed=1)
    assert dimensionality.covariance_pca_fits(5792) and not dimensionality.covariance_pca_fits(5793)
    monkeypatch.setattr(dimensionality, "COVARIANCE_PCA_MAX_BYTES", 8 * 23 ** 2)  # 24 features no longer fit
    model = streaming_pca((x[i:i + 250] for i in range(0, len(x), 250)), n_components=6)
    assert isinstance(model, IncrementalPCA)
    forced = streaming_pca([x], n_components=6, solver="covariance")
    assert isinstance(forced, CovariancePCA)
    with pytest.raises(ConfigError, match="solver='svd' must be one of"):
        streaming_pca([x], n_components=6, solver="svd")


def test_rebatch_gives_every_batch_enough_rows():
    batches = [np.zeros((n, 2)) for n in (3, 1, 7, 2, 1)]
    out = list(rebatch(batches, min_rows=5))
    assert [len(b) for b in out] == [11, 3] or all(len(b) >= 5 for b in out)
    assert sum(len(b) for b in out) == 14 and all(len(b) >= 5 for b in out)
    assert [len(b) for b in rebatch([np.zeros((2, 1))], 5)] == [2]  # fewer rows than asked: one batch


def test_spectrum_summaries_closed_form():
    assert participation_ratio([4.0, 1.0, 1.0]) == pytest.approx(36 / 18)
    assert participation_ratio([1.0] * 7) == pytest.approx(7.0)
    assert participation_ratio([0.0, 0.0]) == 0.0
    ratios = [0.5, 0.3, 0.15, 0.04, 0.01]
    assert effective_dimensionality(ratios, 0.95) == 3
    assert effective_dimensionality(ratios, 0.99) == 4
    assert effective_dimensionality([0.5, 0.2], 0.95) is None
    summary = spectrum_summary(np.array([5.0, 3.0, 1.5, 0.4, 0.1]), np.array(ratios))
    assert summary["effective_dim_95"] == 3 and summary["participation_ratio"] == pytest.approx(100 / 36.42)


def test_n_components_error_is_sklearn_style():
    with pytest.raises(ConfigError) as error:
        fit_pca(np.zeros((100, 64)), n_components=500)
    assert str(error.value) == "n_components=500 must be between 1 and min(n_samples, n_features)=64"


@pytest.mark.parametrize("dim", [2, 5])
def test_intrinsic_dimension_of_an_embedded_subspace(dim):
    x = embedded_subspace(2000, dim, ambient=100, seed=dim)
    estimates = intrinsic_dimension(x)
    assert abs(estimates["twonn"] - dim) <= 0.2 * dim, estimates
    assert abs(estimates["mle"] - dim) <= 0.2 * dim, estimates


def test_intrinsic_dimension_estimators_follow_the_sklearn_contract():
    x = embedded_subspace(300, 3, ambient=10)
    twonn = TwoNN(discard_fraction=0.2)
    assert twonn.get_params() == {"discard_fraction": 0.2}
    assert twonn.fit(x) is twonn and twonn.n_features_in_ == 10 and twonn.dimension_ > 0
    mle = LevinaBickelMLE(k1=5, k2=8).fit(x)
    assert mle.dimension_by_k_.shape == (4,)
    with pytest.warns(UserWarning, match="duplicate rows"):
        TwoNN().fit(np.vstack([x, x[:10]]))
    with pytest.raises(ConfigError, match="k2=400 must be < n_samples=300"):
        LevinaBickelMLE(k1=10, k2=400).fit(x)


def test_tsne_is_seeded_and_checks_perplexity():
    x = embedded_subspace(60, 3, ambient=8)
    first = tsne_embedding(x, perplexity=10, seed=3, max_iter=250)
    again = tsne_embedding(x, perplexity=10, seed=3, max_iter=250)
    assert first.shape == (60, 2)
    np.testing.assert_allclose(first, again)
    with pytest.raises(ConfigError, match=r"perplexity=60 must be between 0 and n_samples=60"):
        tsne_embedding(x, perplexity=60)


def test_pca_analysis_exact_and_incremental_agree_on_a_run(tmp_path):
    x = low_rank(n=600, seed=2).astype(np.float32)
    run = write_synthetic_run(tmp_path / "run", {"blocks.0": x}, samples_per_shard=128)
    exact = analyze(run, "pca", params={"method": "exact"})
    streamed = analyze(run, "pca", params={"method": "incremental", "n_components": 8}, batch_size=100)
    reference = PCA().fit(x.astype(np.float64))
    # float32 activations: the ratios agree to float32 precision (the noise components are ~1e-4)
    np.testing.assert_allclose(exact.array("explained_variance_ratio"), reference.explained_variance_ratio_, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(streamed.array("explained_variance_ratio")[:4], reference.explained_variance_ratio_[:4], rtol=1e-3)
    metrics = exact.metrics()
    assert metrics["method"] == "exact" and metrics["effective_dim_95"] <= 4 and 1 < metrics["participation_ratio"] < 4
    assert streamed.metrics()["method"] == "incremental" and streamed.metrics()["solver"] == "covariance"
    # the streamed covariance eigendecomposition is exact PCA of the stored (float32) values
    np.testing.assert_allclose(streamed.array("explained_variance"), reference.explained_variance_[:8], rtol=1e-8)
    assert_same_up_to_sign(streamed.array("components")[:8], reference.components_[:8], atol=1e-6)
    projection = exact.table("projection")
    assert list(projection.columns) == ["layer", "sample_id", "row", "pc1", "pc2"] and len(projection) == 600
    assert exact.array("components").shape == (20, 24)


def test_intrinsic_dim_and_tsne_analyses_on_a_run(tmp_path):
    x = embedded_subspace(400, 2, ambient=30).astype(np.float32)
    run = write_synthetic_run(tmp_path / "run", {"blocks.0": x}, labels={"half": [i < 200 for i in range(400)]})
    with pytest.warns(UserWarning, match="sample of 300 of 400"):
        artifact = analyze(run, "intrinsic-dim", params={"max_samples": 300})
    assert abs(artifact.metrics()["twonn"] - 2) < 0.4 and artifact.metrics()["n_used"] == 300
    assert any("sample of 300 of 400" in w for w in artifact.warnings)
    with pytest.warns(UserWarning, match="sample of 80 of 400"):
        embedded = analyze(run, "tsne", labels="half", params={"perplexity": 5, "max_samples": 80, "max_iter": 250})
    table = embedded.table("embedding")
    assert len(table) == 80 and {"tsne1", "tsne2", "label", "sample_id"} <= set(table.columns)
    with pytest.raises(ConfigError, match="perplexity=100 must be less than n_samples=80"):
        analyze(run, "tsne", params={"perplexity": 100, "max_samples": 80})
