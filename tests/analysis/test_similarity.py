"""Similarity family against independent references: closed forms, brute force, numpy/scipy/sklearn."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
from scipy.spatial.distance import pdist
from scipy.stats import kendalltau, ortho_group, spearmanr
from sklearn.metrics.pairwise import cosine_similarity as sk_cosine

from neuronmap.analysis import cka_matrix as CM
from neuronmap.analysis import similarity as S
from neuronmap.errors import ConfigError


def _pair(n=300, dx=12, dy=7, noise=1.0, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, dx)) + offset
    Y = X @ rng.normal(size=(dx, dy)) + noise * rng.normal(size=(n, dy)) - offset
    return X, Y


def _factory(a, sizes):
    """Batch factory yielding `a` in chunks of the given sizes (cycled)."""
    def make():
        start, i = 0, 0
        while start < len(a):
            step = sizes[i % len(sizes)]
            yield a[start:start + step]
            start, i = start + step, i + 1
    return make


# -- independent references written here -------------------------------------------------------
def ref_linear_cka(X, Y):
    """Kornblith et al. eq. (feature space), straight from the definition."""
    X, Y = X - X.mean(0), Y - Y.mean(0)
    return np.linalg.norm(Y.T @ X) ** 2 / (np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y))


def ref_hsic_biased(K, L):
    n = len(K)
    H = np.eye(n) - np.ones((n, n)) / n
    return np.trace(K @ H @ L @ H) / (n - 1) ** 2


def ref_hsic_unbiased_bruteforce(K, L):
    """The U-statistic over distinct index tuples, summed explicitly (O(n^4)).

    HSIC = E[k_ij l_ij] + E[k_ij] E[l_qr] - 2 E[k_ij l_iq], each expectation over distinct indices.
    """
    n = len(K)
    t1 = np.mean([K[i, j] * L[i, j] for i, j in itertools.permutations(range(n), 2)])
    t2 = np.mean([K[i, j] * L[q, r] for i, j, q, r in itertools.permutations(range(n), 4)])
    t3 = np.mean([K[i, j] * L[i, q] for i, j, q in itertools.permutations(range(n), 3)])
    return t1 + t2 - 2 * t3


def ref_tau_a(x, y):
    """Count concordant and discordant pairs over all i < j (O(m^2) memory and time)."""
    x, y = np.asarray(x), np.asarray(y)
    s = np.sign(x[:, None] - x[None, :]) * np.sign(y[:, None] - y[None, :])
    upper = np.triu(np.ones_like(s, dtype=bool), k=1)
    concordant, discordant = int((s[upper] > 0).sum()), int((s[upper] < 0).sum())
    return (concordant - discordant) / (len(x) * (len(x) - 1) / 2)


# -- CKA ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [
    S.linear_cka, lambda X, Y: S.linear_cka(X, Y, debiased=True), S.linear_cka_gram,
    lambda X, Y: S.linear_cka_gram(X, Y, debiased=True), S.rbf_cka,
    lambda X, Y: S.rbf_cka(X, Y, debiased=True), S.minibatch_cka,
])
def test_cka_of_a_layer_with_itself_is_one(fn):
    X, _ = _pair(n=200)
    assert fn(X, X) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("fn", [
    S.linear_cka, lambda X, Y: S.linear_cka(X, Y, debiased=True), S.rbf_cka,
    lambda X, Y: S.rbf_cka(X, Y, debiased=True), lambda X, Y: S.minibatch_cka(X, Y, batch_size=50),
])
def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling(fn):
    X, Y = _pair(n=200, dx=10, dy=6)
    Q = ortho_group.rvs(10, random_state=1)
    base = fn(X, Y)
    assert 0.1 < base < 0.99
    assert fn(3.7 * X @ Q, Y) == pytest.approx(base, rel=1e-10)
    assert fn(X, 0.01 * Y @ ortho_group.rvs(6, random_state=2)) == pytest.approx(base, rel=1e-10)


def test_linear_cka_is_not_invariant_to_anisotropic_scaling():
    X, Y = _pair()
    assert abs(S.linear_cka(X * np.arange(1, 13), Y) - S.linear_cka(X, Y)) > 1e-3


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("shape", [(60, 5, 9), (20, 50, 40)])  # n > d and d > n
def test_linear_cka_feature_form_equals_gram_form(debiased, shape):
    n, dx, dy = shape
    X, Y = _pair(n=n, dx=dx, dy=dy, seed=3)
    got = S.linear_cka(X, Y, debiased=debiased)
    assert got == pytest.approx(S.linear_cka_gram(X, Y, debiased=debiased), rel=1e-10)
    if not debiased:
        assert got == pytest.approx(ref_linear_cka(X, Y), rel=1e-12)


def test_hsic_matches_definitions():
    X, Y = _pair(n=9, dx=4, dy=3, seed=5)
    K, L = X @ X.T, np.tanh(Y) @ np.tanh(Y).T
    assert S.hsic(K, L) == pytest.approx(ref_hsic_biased(K, L), rel=1e-12)
    assert S.hsic(K, L, debiased=True) == pytest.approx(ref_hsic_unbiased_bruteforce(K, L), rel=1e-9)


def test_debiased_cka_equals_bruteforce_u_statistic():
    X, Y = _pair(n=9, dx=4, dy=3, seed=6, offset=2.0)  # uncentred data: the U-statistic is shift invariant
    K, L = X @ X.T, Y @ Y.T
    ref = ref_hsic_unbiased_bruteforce(K, L) / np.sqrt(
        ref_hsic_unbiased_bruteforce(K, K) * ref_hsic_unbiased_bruteforce(L, L))
    assert S.linear_cka(X, Y, debiased=True) == pytest.approx(ref, rel=1e-9)
    assert S.cka_from_grams(K, L, debiased=True) == pytest.approx(ref, rel=1e-9)


def test_debiased_cka_removes_the_small_sample_bias():
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(400, 200)), rng.normal(size=(400, 200))  # independent, d comparable to n
    assert S.linear_cka(X, Y) > 0.3  # biased CKA is large for unrelated wide layers
    assert abs(S.linear_cka(X, Y, debiased=True)) < 0.02  # its sd over seeds is 0.0025


@pytest.mark.parametrize("debiased", [False, True])
def test_streaming_linear_cka_equals_full_batch(debiased):
    X, Y = _pair(n=500, offset=50.0, seed=7)  # large means: centred merging must stay exact
    full = S.linear_cka(X, Y, debiased=debiased, batch_size=10_000)
    streamed = S.linear_cka(_factory(X, [37, 5, 120]), _factory(Y, [64]), debiased=debiased)
    assert streamed == pytest.approx(full, rel=1e-10)
    assert full == pytest.approx(S.linear_cka_gram(X, Y, debiased=debiased), rel=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_merged_partial_states_equal_full_batch(seed):
    X, Y = _pair(n=400, seed=seed, offset=10.0)
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, 400), size=6, replace=False))
    parts = [S.LinearCKAState().add(x, y) for x, y in zip(np.split(X, cuts), np.split(Y, cuts))]
    order = rng.permutation(len(parts))
    # merge in a random tree shape: pairwise, then fold; states survive a state_dict round trip
    merged = [S.LinearCKAState().load_state_dict(parts[i].state_dict()) for i in order]
    while len(merged) > 1:
        merged = [merged[i].merge(merged[i + 1]) if i + 1 < len(merged) else merged[i]
                  for i in range(0, len(merged), 2)]
    state = merged[0]
    assert state.n_samples == 400
    for debiased in (False, True):
        assert state.cka(debiased) == pytest.approx(S.linear_cka(X, Y, debiased=debiased), rel=1e-10)
        assert state.cka(debiased) == pytest.approx(S.linear_cka_gram(X, Y, debiased=debiased), rel=1e-9)


def test_minibatch_cka_converges_to_population_and_full_debiased_value():
    # X ~ N(0, I), Y = X A + s E: population linear CKA = ||A||_F^2 / (||I||_F ||A'A + s^2 I||_F)
    rng = np.random.default_rng(0)
    dx, dy, s, b = 8, 6, 2.0, 64
    A = rng.normal(size=(dx, dy))
    pop = np.linalg.norm(A) ** 2 / (np.sqrt(dx) * np.linalg.norm(A.T @ A + s * s * np.eye(dy)))
    X = rng.normal(size=(2000 * b, dx))
    Y = X @ A + s * rng.normal(size=(len(X), dy))
    errors = {}
    for m in (10, 2000):
        got = S.minibatch_cka(X[:m * b], Y[:m * b], batch_size=b)
        errors[m] = abs(got - pop)
    full = S.linear_cka(X, Y, debiased=True)
    assert abs(full - pop) < 0.005
    assert errors[2000] < 0.005 and errors[2000] < errors[10]
    assert S.minibatch_cka(X, Y, batch_size=b) == pytest.approx(full, abs=0.005)
    # averaging *biased* per-batch CKA instead converges to the wrong value
    biased = np.mean([S.linear_cka(X[i:i + 8], Y[i:i + 8]) for i in range(0, 2000, 8)])
    assert biased - pop > 0.05


def test_minibatch_state_merges_and_both_hsic_forms_agree():
    X, Y = _pair(n=256, dx=30, dy=20, seed=4)
    one = S.MinibatchCKAState()
    for i in range(0, 256, 32):
        one.add(X[i:i + 32], Y[i:i + 32])
    a, b = S.MinibatchCKAState(), S.MinibatchCKAState()
    for i in range(0, 256, 32):
        (a if i < 100 else b).add(X[i:i + 32], Y[i:i + 32])
    assert a.merge(b).cka() == pytest.approx(one.cka(), rel=1e-12)
    streamed = S.minibatch_cka(_factory(X, [10, 3]), _factory(Y, [256]), batch_size=32)
    assert one.cka() == pytest.approx(streamed, rel=1e-12)
    # 32 rows x 50 features: the Gram form; 256 rows: the feature form -- same numbers
    assert np.allclose(S._hsic1_linear(X[:32], Y[:32]) * 32 * 29,
                       [S.hsic(X[:32] @ X[:32].T, Y[:32] @ Y[:32].T, debiased=True) * 32 * 29,
                        S.hsic(X[:32] @ X[:32].T, X[:32] @ X[:32].T, debiased=True) * 32 * 29,
                        S.hsic(Y[:32] @ Y[:32].T, Y[:32] @ Y[:32].T, debiased=True) * 32 * 29])
    big = S._hsic1_linear(X, Y)
    ref = [S.hsic(X @ X.T, Y @ Y.T, debiased=True), S.hsic(X @ X.T, X @ X.T, debiased=True),
           S.hsic(Y @ Y.T, Y @ Y.T, debiased=True)]
    assert np.allclose(big, ref, rtol=1e-9)


def test_rbf_cka_uses_median_heuristic():
    X, Y = _pair(n=80, seed=8)
    sq = np.sum((X[:, None] - X[None]) ** 2, axis=-1)
    sigma = 0.5 * np.median(np.sqrt(sq[np.triu_indices(80, 1)]))
    assert np.allclose(S.rbf_gram(X, sigma_factor=0.5), np.exp(-sq / (2 * sigma ** 2)))
    Ky, Kx = S.rbf_gram(Y, sigma_factor=0.5), np.exp(-sq / (2 * sigma ** 2))
    ref = ref_hsic_biased(Kx, Ky) / np.sqrt(ref_hsic_biased(Kx, Kx) * ref_hsic_biased(Ky, Ky))
    assert S.rbf_cka(X, Y, sigma_factor=0.5) == pytest.approx(ref, rel=1e-10)


# -- CKA matrices ------------------------------------------------------------------------------
def _layers(n=120, seed=0):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(n, 6))
    out = {}
    for i, d in enumerate((6, 9, 4)):
        h = np.tanh(h @ rng.normal(size=(h.shape[1], d))) + 0.3 * rng.normal(size=(n, d))
        out[f"blocks.{i}"] = h
    return out


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_matrix_within_and_between_runs_matches_pairwise(debiased, monkeypatch):
    a, b = _layers(seed=0), _layers(seed=1)
    within = S.cka_matrix({k: _factory(v, [50]) for k, v in a.items()}, debiased=debiased)
    ref = np.array([[S.linear_cka(x, y, debiased=debiased) for y in a.values()] for x in a.values()])
    assert np.allclose(within, ref, rtol=1e-10) and np.allclose(within, within.T)
    between = S.cka_matrix(a, {"other." + k: v for k, v in list(b.items())[:2]}, debiased=debiased)
    ref = np.array([[S.linear_cka(x, y, debiased=debiased) for y in list(b.values())[:2]] for x in a.values()])
    assert between.shape == (3, 2) and np.allclose(between, ref, rtol=1e-10)
    monkeypatch.setattr(CM, "_STATE_BUDGET_BYTES", 1)  # one partner per pass: same numbers
    assert np.allclose(S.cka_matrix(a, b, debiased=debiased), S.cka_matrix(a, b, debiased=debiased, batch_size=7))


def test_cka_matrix_minibatch_and_rbf_match_pairwise():
    a, b = _layers(seed=2), _layers(seed=3)
    got = S.cka_matrix(a, b, method="minibatch", batch_size=30)
    ref = [[S.minibatch_cka(x, y, batch_size=30) for y in b.values()] for x in a.values()]
    assert np.allclose(got, ref, rtol=1e-10)
    got = S.cka_matrix(a, method="minibatch", batch_size=30)
    ref = [[S.minibatch_cka(x, y, batch_size=30) for y in a.values()] for x in a.values()]
    assert np.allclose(got, ref, rtol=1e-10)
    got = S.cka_matrix(a, b, method="rbf", debiased=True)
    ref = [[S.rbf_cka(x, y, debiased=True) for y in b.values()] for x in a.values()]
    assert np.allclose(got, ref, rtol=1e-10)


# -- cosine, Pearson ---------------------------------------------------------------------------
def test_cosine_similarity_matches_sklearn():
    X, Y = _pair(n=40, dx=5, dy=5)
    X[3] = 0.0
    with pytest.warns(RuntimeWarning, match="all-zero rows"):
        got = S.cosine_similarity(X, Y)
    assert np.allclose(got, sk_cosine(X, Y))
    assert np.allclose(S.cosine_similarity(_factory(Y, [7])), sk_cosine(Y))


def test_pearson_matches_corrcoef_and_constant_neurons_give_zero():
    X, Y = _pair(n=200, offset=1e3, seed=9)
    got = S.pearson_correlation(_factory(X, [33]), batch_size=50)
    assert np.allclose(got, np.corrcoef(X, rowvar=False), atol=1e-12)
    cross = S.cross_layer_correlation(X, Y)
    assert np.allclose(cross, np.corrcoef(X, Y, rowvar=False)[:12, 12:], atol=1e-12)
    X[:, 2] = 0.1  # a constant neuron: np.corrcoef gives NaN, we give 0 and warn
    with pytest.warns(RuntimeWarning, match="1 constant neurons"):
        got = S.pearson_correlation(X)
    assert not np.isnan(got).any() and (got[2] == 0).all() and (got[:, 2] == 0).all()
    keep = [i for i in range(12) if i != 2]
    assert np.allclose(got[np.ix_(keep, keep)], np.corrcoef(X[:, keep], rowvar=False), atol=1e-12)


# -- RSA ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", S.RDM_METRICS)
def test_rsa_spearman_equals_scipy_on_rdm_vectors(metric):
    X, Y = _pair(n=60, seed=10)
    ra, rb = S.rdm(X, metric=metric), S.rdm(_factory(Y, [11]), metric=metric)
    assert np.allclose(ra, pdist(X, metric)) and np.allclose(rb, pdist(Y, metric))
    assert S.rsa(X, Y, metric=metric) == pytest.approx(spearmanr(ra, rb).statistic, rel=1e-12)
    assert S.compare_rdms(ra, rb, method="pearson") == pytest.approx(np.corrcoef(ra, rb)[0, 1], rel=1e-12)


def test_rsa_spearman_with_ties_equals_scipy():
    rng = np.random.default_rng(11)
    a, b = rng.integers(0, 5, size=300).astype(float), rng.integers(0, 4, size=300).astype(float)
    assert S.compare_rdms(a, b) == pytest.approx(spearmanr(a, b).statistic, rel=1e-12)


@pytest.mark.parametrize("levels", [None, 3, 7])  # continuous, heavy ties, some ties
def test_kendall_tau_a_equals_bruteforce(levels):
    rng = np.random.default_rng(levels or 0)
    x, y = rng.normal(size=1001), rng.normal(size=1001)
    y = y + 0.5 * x
    if levels:
        x, y = np.round(x * levels / 3), np.round(y * levels / 3)
    got = S.kendall_tau_a(x, y)
    assert got == pytest.approx(ref_tau_a(x, y), abs=1e-14)
    if levels is None:  # no ties: tau-a = tau-b
        assert got == pytest.approx(kendalltau(x, y).statistic, rel=1e-12)
    else:
        assert abs(got) < abs(kendalltau(x, y).statistic)


def test_rsa_kendall_and_matrix():
    layers = {k: v[:40] for k, v in _layers().items()}
    got = S.rsa_matrix(layers, method="kendall_tau_a", metric="euclidean")
    names = list(layers)
    for i, j in itertools.product(range(3), repeat=2):
        ref = ref_tau_a(pdist(layers[names[i]]), pdist(layers[names[j]]))
        assert got[i, j] == pytest.approx(ref, abs=1e-12)


def test_rdm_constant_rows_get_distance_one():
    X = np.array([[1.0, 1, 1], [1, 2, 3], [3, 1, 2], [0, 1, 5]])
    with pytest.warns(RuntimeWarning, match="constant rows"):
        d = S.rdm(X)
    assert np.isfinite(d).all() and np.allclose(d[:3], 1.0)


# -- bad input ---------------------------------------------------------------------------------
def test_sample_count_mismatch_is_a_config_error():
    X, Y = _pair(n=10)
    with pytest.raises(ConfigError, match="X has 10 samples but Y has 12: CKA compares the same samples in both"):
        S.linear_cka(X, np.vstack([Y, Y[:2]]))
    with pytest.raises(ConfigError, match="X has 10 samples but Y has 12"):
        S.linear_cka(_factory(X, [3]), _factory(np.vstack([Y, Y[:2]]), [5]))
    with pytest.raises(ConfigError, match="has 10 samples but layer 'b' has 9"):
        S.cka_matrix({"a": X, "b": Y[:9]})
    with pytest.raises(ConfigError, match="RSA compares the same samples"):
        S.rsa(X, Y[:9])


@pytest.mark.parametrize("call, message", [
    (lambda X: S.linear_cka(X[:, 0], X), r"must have shape \(n_samples, n_features\); got shape \(10,\)"),
    (lambda X: S.linear_cka(np.where(X > 1, np.nan, X), X), "NaN or infinite"),
    (lambda X: S.linear_cka(X[:3], X[:3], debiased=True), "at least 4 samples"),
    (lambda X: S.rbf_cka(X, X, max_samples=5), "capped at max_samples=5"),
    (lambda X: S.cka_matrix({"a": X}, method="cosine"), "method='cosine' is not supported; use one of 'linear'"),
    (lambda X: S.linear_cka(X, X, batch_size=0), "batch_size=0 must be an integer >= 1"),
    (lambda X: S.rdm(X, metric="manhattan"), "metric='manhattan' is not supported"),
    (lambda X: S.minibatch_cka(X[:3], X[:3]), "no minibatches of at least 4 rows"),
    (lambda X: S.rbf_gram(np.zeros((5, 2))), "pass sigma explicitly"),
])
def test_bad_input_messages(call, message):
    X, _ = _pair(n=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError, match=message):
            call(X)


def test_constant_layer_gives_zero_cka_with_warning():
    X, _ = _pair(n=50)
    C = np.full((50, 4), 0.1)
    with pytest.warns(RuntimeWarning, match="constant"):
        assert S.linear_cka(X, C) == 0.0
    with pytest.warns(RuntimeWarning, match="constant"):
        m = S.cka_matrix({"x": X, "c": C})
    assert not np.isnan(m).any() and m[1, 1] == 0 and m[0, 1] == 0
