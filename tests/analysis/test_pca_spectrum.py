"""`pca`'s spectrum-wide summaries against numpy's float64 eigendecomposition of the full covariance.

The participation ratio (sum lambda)^2 / sum lambda^2 belongs to the whole spectrum: computed from the
kept components only it fell from 81.0 to 9.3 on a MiniLM layer with n_components=10. Exact PCA also ran
in float32 on float32 activations (eigenvalues off by ~1e-6 relative, ratios summing to more than 1).
"""

from __future__ import annotations

import numpy as np
import pytest
from analysistest_util import write_synthetic_run

from neuronmap.analysis import dimensionality as D
from neuronmap.analysis.runner import analyze

N, F = 500, 48


def _spread(n=N, d=F, seed=0):
    """float32 rows with a slowly decaying spectrum (many components matter) and an offset mean."""
    rng = np.random.default_rng(seed)
    scales = np.geomspace(2.0, 0.5, d)
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    return ((rng.standard_normal((n, d)) * scales) @ basis.T + 7.0).astype(np.float32)


def _numpy_spectrum(x):
    """Every eigenvalue of the float64 sample covariance (ddof=1), descending: the reference."""
    values = np.linalg.eigvalsh(np.cov(x.astype(np.float64), rowvar=False))
    return np.clip(values[::-1], 0.0, None)


def _pr(values):
    return values.sum() ** 2 / (values ** 2).sum()


@pytest.fixture(scope="module")
def layer(tmp_path_factory):
    x = _spread()
    run = write_synthetic_run(tmp_path_factory.mktemp("pca") / "run", {"blocks.0": x}, samples_per_shard=128)
    return run, x, _numpy_spectrum(x)


@pytest.mark.parametrize("params", [{"method": "exact"}, {"method": "exact", "n_components": 10},
                                    {"method": "incremental"}, {"method": "incremental", "n_components": 10}])
def test_participation_ratio_is_of_the_full_spectrum(layer, params):
    run, _, spectrum = layer
    metrics = analyze(run, "pca", params=params).metrics()
    expected = _pr(spectrum)
    assert _pr(spectrum[:10]) < 0.5 * expected  # the truncated value the bug reported is far off
    assert metrics["participation_ratio"] == pytest.approx(expected, rel=1e-9)
    assert metrics["participation_ratio_basis"] == "full_spectrum"


def test_exact_pca_is_float64_on_float32_rows(layer):
    run, _, spectrum = layer
    artifact = analyze(run, "pca", params={"method": "exact"})
    np.testing.assert_allclose(artifact.array("explained_variance"), spectrum, rtol=1e-10, atol=1e-12 * spectrum[0])
    ratios = artifact.array("explained_variance_ratio")
    np.testing.assert_allclose(ratios, spectrum / spectrum.sum(), rtol=1e-10, atol=1e-14)
    assert artifact.metrics()["explained_variance_ratio_total"] <= 1.0 + 1e-12
    assert artifact.metrics()["explained_variance_ratio_total"] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("shape", [(300, 40), (30, 200)])
def test_covariance_participation_ratio_equals_numpy(shape):
    """Both sides of the Gram shortcut (n > d and n < d, where rank < d) against the eigenvalues."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape) * np.geomspace(3.0, 0.1, shape[1]) + 2.0
    expected = _pr(_numpy_spectrum(x))
    assert D.covariance_participation_ratio(x) == pytest.approx(expected, rel=1e-10)
    model = D.CovariancePCA(n_components=3).fit(x)
    assert model.participation_ratio_ == pytest.approx(expected, rel=1e-10)
    assert D.covariance_participation_ratio(np.ones((5, 3))) == 0.0


def test_incremental_pca_says_it_used_the_kept_components(tmp_path, monkeypatch):
    """Layers too wide for the covariance matrix go through IncrementalPCA, which knows only its components."""
    run = write_synthetic_run(tmp_path / "run", {"blocks.0": _spread()}, samples_per_shard=128)
    monkeypatch.setattr(D, "COVARIANCE_PCA_MAX_BYTES", 0)
    with pytest.warns(UserWarning, match="participation_ratio is computed from the 10 kept components only"):
        artifact = analyze(run, "pca", params={"method": "incremental", "n_components": 10})
    metrics = artifact.metrics()
    assert metrics["solver"] == "incremental_pca" and metrics["participation_ratio_basis"] == "kept_components"
    assert metrics["participation_ratio"] == pytest.approx(_pr(artifact.array("explained_variance")), rel=1e-12)
    assert any("kept components only" in w for w in artifact.warnings)
