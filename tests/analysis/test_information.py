"""Information measures against numpy histograms, scipy.stats.entropy and sklearn's mutual_info_score."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import entropy as scipy_entropy
from scipy.stats import ortho_group
from sklearn.decomposition import PCA
from sklearn.metrics import mutual_info_score

from neuronmap.analysis import information as I
from neuronmap.errors import ConfigError


def _data(n=600, seed=0):
    rng = np.random.default_rng(seed)
    X = np.column_stack([
        rng.normal(size=n),                         # Gaussian
        rng.standard_t(df=2, size=n),               # heavy tails
        np.round(rng.normal(size=n) * 2) / 2,       # values on a grid: many exactly on bin edges
        np.full(n, 0.25),                           # constant neuron
        rng.integers(0, 3, size=n).astype(float),   # three values, two of them edges
    ])
    return X


def _factory(a, step):
    return lambda: (a[i:i + step] for i in range(0, len(a), step))


def ref_bins(x, bins):
    """np.histogram's bins for one neuron, by searchsorted on np.histogram_bin_edges."""
    edges = np.histogram_bin_edges(x, bins)
    return np.digitize(x, edges[1:-1])


@pytest.mark.parametrize("bins", [2, 8, 32])
def test_entropy_equals_scipy_on_numpy_histogram(bins):
    X = _data()
    got = I.entropy(X, bins=bins)
    ref = [scipy_entropy(np.histogram(X[:, j], bins)[0], base=2) for j in range(X.shape[1])]
    assert np.allclose(got, ref, rtol=1e-12, atol=1e-15)
    assert got[3] == 0.0  # constant neuron
    assert np.allclose(I.entropy(_factory(X, 77), bins=bins, batch_size=50), got, rtol=1e-12)


def test_bin_counts_equal_numpy_histogram_exactly():
    X = _data(seed=1)
    state = I.BinnedCounts(X.min(0), X.max(0), 10).add(X)
    for j in range(X.shape[1]):
        assert (state.counts_[j] == np.histogram(X[:, j], 10)[0]).all()
        assert (state.bin_indices(X)[:, j] == ref_bins(X[:, j], 10)).all()


def test_miller_madow_correction():
    X = _data()
    plain, corrected = I.entropy(X, bins=8), I.entropy(X, bins=8, correction="miller-madow")
    occupied = [(np.histogram(X[:, j], 8)[0] > 0).sum() for j in range(X.shape[1])]
    assert np.allclose(corrected - plain, (np.array(occupied) - 1) / (2 * len(X) * np.log(2)))


@pytest.mark.parametrize("bins", [4, 16])
def test_mutual_information_equals_sklearn(bins):
    X = _data(seed=2)
    rng = np.random.default_rng(2)
    labels = np.where(X[:, 0] + 0.5 * rng.normal(size=len(X)) > 0, "pos", "neg")
    labels[::7] = "other"
    got = I.mutual_information(X, labels, bins=bins)
    ref = [mutual_info_score(labels, ref_bins(X[:, j], bins)) / np.log(2) for j in range(X.shape[1])]
    assert np.allclose(got, ref, rtol=1e-10, atol=1e-14)
    assert got[0] > 0.3 and got[3] == 0.0
    streamed = I.mutual_information(_factory(X, 61), pd.Series(labels), bins=bins, batch_size=100)
    assert np.allclose(streamed, got, rtol=1e-12)


def test_binned_counts_merge():
    X = _data(seed=3)
    codes, classes = I.encode_labels(X[:, 4].astype(int))
    lo, hi = X.min(0), X.max(0)
    parts = [I.BinnedCounts(lo, hi, 12, len(classes)).add(X[i:i + 100], codes[i:i + 100]) for i in range(0, 600, 100)]
    parts = [I.BinnedCounts().load_state_dict(p.state_dict()) for p in parts]  # as across Ray
    assert np.allclose(I.value_ranges(_factory(X, 33))[0], lo)
    merged = parts[0]
    for p in parts[1:]:
        merged.merge(p)
    assert np.allclose(merged.mutual_information(), I.mutual_information(X, codes, bins=12))
    assert np.allclose(merged.entropy(), I.entropy(X, bins=12))
    assert merged.mutual_information()[4] == pytest.approx(scipy_entropy(np.bincount(codes), base=2))


def test_labels_bad_input():
    X = _data(n=50)
    with pytest.raises(ConfigError, match="X has 50 samples but labels has 49"):
        I.mutual_information(X, np.zeros(49))
    labels = np.array(["a", "b"] * 25, dtype=object)
    labels[3] = None
    with pytest.raises(ConfigError, match="labels has 1 missing values"):
        I.mutual_information(X, labels)
    with pytest.warns(RuntimeWarning, match="single class"):
        assert (I.mutual_information(X, np.ones(50)) == 0).all()
    with pytest.raises(ConfigError, match="bins=1 must be an integer >= 2"):
        I.entropy(X, bins=1)
    with pytest.raises(ConfigError, match="correction='jackknife' is not supported"):
        I.entropy(X, correction="jackknife")


def _ref_layer_mi(X, Y, k, bins):
    """sklearn PCA projections (sign: largest loading positive, as documented), quantile bins, sklearn MI."""
    def project(A):
        pca = PCA(n_components=k).fit(A)
        signs = np.sign(pca.components_[np.arange(k), np.abs(pca.components_).argmax(axis=1)])
        return pca.transform(A) * signs

    def qbins(v):
        return np.searchsorted(np.quantile(v, np.linspace(0, 1, bins + 1))[1:-1], v, side="right")
    return np.array([[mutual_info_score(qbins(a), qbins(b)) / np.log(2) for b in project(Y).T]
                     for a in project(X).T])


def test_layer_mutual_information_matches_pca_reference():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(800, 10)) * np.linspace(3, 0.5, 10)
    Y = np.tanh(X @ rng.normal(size=(10, 6))) + 0.3 * rng.normal(size=(800, 6))
    got = I.layer_mutual_information(X, _factory(Y, 99), n_components=3, bins=8, batch_size=128)
    assert got.shape == (3, 3)
    assert np.allclose(got, _ref_layer_mi(X, Y, 3, 8), rtol=1e-10, atol=1e-12)


def test_layer_mutual_information_limits():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(2000, 6)) * np.array([4, 2, 1, 1, 1, 1])
    rotated = 2.5 * X @ ortho_group.rvs(6, random_state=0) + 7.0  # same top component, other basis
    assert I.layer_mutual_information(X, rotated, bins=16)[0, 0] == pytest.approx(4.0)  # log2(16)
    independent = I.layer_mutual_information(X, rng.normal(size=(2000, 6)), bins=16)[0, 0]
    bias = 15 * 15 / (2 * 2000 * np.log(2))  # expected plug-in bias for independent variables
    assert independent < 2 * bias
    corrected = I.layer_mutual_information(X, rng.normal(size=(2000, 6)), n_components=3, bins=16,
                                           correction="miller-madow")
    assert np.abs(corrected).max() < 0.5 * bias and (corrected < 0).any()  # unbiased: scatters around 0
    with pytest.raises(ConfigError, match=r"n_components=7 must be between 1 and min\(n_samples, n_features\)=6"):
        I.layer_mutual_information(X, rotated, n_components=7)


def test_bins_are_at_most_the_rows():
    rng = np.random.default_rng(6)
    X, labels = rng.normal(size=(50, 3)), np.array(["a", "b"] * 25)
    for call in (lambda b: I.entropy(X, bins=b), lambda b: I.mutual_information(X, labels, bins=b),
                 lambda b: I.layer_mutual_information(X, X, bins=b)):
        with pytest.raises(ConfigError, match="bins=1000000000 is too many for the 50 rows: use at most 50 .one bin per row"):
            call(1_000_000_000)  # was a MemoryError allocating the counts
        assert np.isfinite(call(50)).all()  # one bin per row is the largest allowed
    few = X[:10]  # a run of a few rows keeps working with the default bins (32; 16 for layer-mi)
    assert np.isfinite(I.entropy(few)).all() and np.isfinite(I.layer_mutual_information(few, few)).all()
    with pytest.raises(ConfigError, match="bins=33 is too many for the 10 rows: use at most 32 "):
        I.entropy(few, bins=33)


@pytest.mark.parametrize("correction", ["none", "miller-madow"])
def test_sparse_pair_mutual_information_equals_the_dense_table(correction):
    rng = np.random.default_rng(7)
    a = rng.integers(0, 12, 300)
    b = (a + rng.integers(0, 3, 300)) % 12
    joint = np.bincount(a * 12 + b, minlength=144).reshape(1, 12, 12)
    assert I._binned_mi_pair(a, b, 12, correction) == pytest.approx(float(I._mi_bits(joint, 300, correction)[0]),
                                                                     rel=1e-12, abs=1e-12)
