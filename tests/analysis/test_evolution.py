"""Layer evolution against direct numpy computations on the concatenated data."""

from __future__ import annotations

import numpy as np
import pytest

from neuronmap.analysis import evolution as E
from neuronmap.errors import ConfigError


def _stack(n=240, d=16, depth=5, seed=0):
    """A toy residual stream: h_{l+1} = h_l + tanh(h_l W_l), so norms grow and directions drift."""
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(n, d)) + 3.0
    layers = {"embed": h}
    for l in range(depth - 1):
        h = h + np.tanh(h @ rng.normal(scale=0.5, size=(d, d)))
        layers[f"blocks.{l}"] = h
    return layers


def _factory(a, step):
    return lambda: (a[i:i + step] for i in range(0, len(a), step))


def ref_linear_cka(X, Y):
    X, Y = X - X.mean(0), Y - Y.mean(0)
    return np.linalg.norm(Y.T @ X) ** 2 / (np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y))


def ref_debiased_cka(X, Y):
    """Song et al.'s unbiased HSIC on n x n Gram matrices, written out here."""
    def hsic(K, L):
        n = len(K)
        K, L = K - np.diag(np.diag(K)), L - np.diag(np.diag(L))
        return (np.trace(K @ L) + K.sum() * L.sum() / ((n - 1) * (n - 2))
                - 2 / (n - 2) * K.sum(0) @ L.sum(0)) / (n * (n - 3))
    K, L = X @ X.T, Y @ Y.T
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


def test_layer_evolution_matches_direct_computation():
    layers = _stack()
    arrays = list(layers.values())
    got = E.layer_evolution(layers)
    norms = [np.linalg.norm(a, axis=1) for a in arrays]
    cos = [np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
           for a, b in zip(arrays, arrays[1:])]
    assert got["layers"] == list(layers)
    assert np.allclose(got["mean_norm"], [n.mean() for n in norms], rtol=1e-12)
    assert np.allclose(got["norm_std"], [n.std() for n in norms], rtol=1e-10)
    assert np.allclose(got["norm_growth"], [b.mean() / a.mean() for a, b in zip(norms, norms[1:])], rtol=1e-12)
    assert np.allclose(got["cka_prev"], [ref_linear_cka(a, b) for a, b in zip(arrays, arrays[1:])], rtol=1e-10)
    assert np.allclose(got["cosine_mean"], [c.mean() for c in cos], rtol=1e-12)
    assert np.allclose(got["cosine_std"], [c.std() for c in cos], rtol=1e-8)
    assert (got["norm_growth"] > 1).all()  # the toy residual stream grows
    debiased = E.layer_evolution(list(layers.items()), debiased=True)["cka_prev"]
    assert np.allclose(debiased, [ref_debiased_cka(a, b) for a, b in zip(arrays, arrays[1:])], rtol=1e-9)


def test_streaming_evolution_equals_in_memory():
    layers = _stack(seed=1)
    full = E.layer_evolution(layers)
    streamed = E.layer_evolution({k: _factory(v, 17 + i) for i, (k, v) in enumerate(layers.items())}, batch_size=50)
    for key in ("mean_norm", "norm_std", "norm_growth", "cka_prev", "cosine_mean", "cosine_std"):
        assert np.allclose(streamed[key], full[key], rtol=1e-10), key


def test_pair_states_merge_into_the_single_pass_result():
    layers = _stack(seed=2)
    a, b = layers["blocks.1"], layers["blocks.2"]
    parts = [E.EvolutionPairState().add(a[i:j], b[i:j]) for i, j in ((0, 30), (30, 31), (31, 200), (200, 240))]
    parts = [E.EvolutionPairState().load_state_dict(p.state_dict()) for p in parts]  # as across Ray
    merged = parts[3].merge(parts[1]).merge(parts[0]).merge(parts[2])
    ref = E.layer_evolution({"p": a, "q": b}, debiased=True)
    got = merged.result(debiased=True)
    assert got["cka"] == pytest.approx(ref["cka_prev"][0], rel=1e-10)
    assert got["norm_growth"] == pytest.approx(ref["norm_growth"][0], rel=1e-12)
    assert got["cosine_mean"] == pytest.approx(ref["cosine_mean"][0], rel=1e-12)
    assert got["cosine_std"] == pytest.approx(ref["cosine_std"][0], rel=1e-9)
    assert E.evolution_pair(a, _factory(b, 7), debiased=True) == pytest.approx(got, rel=1e-10)


@pytest.mark.parametrize("debiased", [False, True])
def test_shared_layer_summaries_equal_the_per_pair_result(debiased):
    """Each layer summarised once, reused as the "next" of one pair and the "prev" of the next one:
    bit for bit what evolution_pair computes per pair (both layers' moments again), and the numpy values."""
    layers = _stack(seed=4)
    names = list(layers)
    sources = {name: _factory(a, 23) for name, a in layers.items()}
    own = {name: E.evolution_layer_summary(sources[name], batch_size=40) for name in names}
    for prev, next_ in zip(names, names[1:]):
        cross = E.evolution_cross_summary(sources[prev], sources[next_], batch_size=40)
        shared = E.evolution_from_summaries(own[prev], own[next_], cross, debiased=debiased)
        per_pair = E.evolution_pair(sources[prev], sources[next_], debiased=debiased, batch_size=40)
        assert shared == per_pair, (prev, next_)
        a, b = layers[prev], layers[next_]
        reference = ref_debiased_cka(a, b) if debiased else ref_linear_cka(a, b)
        assert shared["cka"] == pytest.approx(reference, rel=1e-9)
        cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert shared["cosine_mean"] == pytest.approx(cos.mean(), rel=1e-12)
        growth = np.linalg.norm(b, axis=1).mean() / np.linalg.norm(a, axis=1).mean()
        assert shared["norm_growth"] == pytest.approx(growth, rel=1e-12)
    no_cosine = E.evolution_cross_summary(layers[names[0]], layers[names[1]][:, :5], cosine=False)
    got = E.evolution_from_summaries(own[names[0]], E.evolution_layer_summary(layers[names[1]][:, :5]), no_cosine)
    assert "cosine_mean" not in got
    assert got["cka"] == pytest.approx(ref_linear_cka(layers[names[0]], layers[names[1]][:, :5]), rel=1e-9)


def test_width_change_needs_cosine_off():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 8))
    layers = {"a": x, "b": np.tanh(x @ rng.normal(size=(8, 12)))}
    with pytest.raises(ConfigError, match="layer 'a' has 8 features but layer 'b' has 12.*pass cosine=False"):
        E.layer_evolution(layers)
    got = E.layer_evolution(layers, cosine=False)
    assert "cosine_mean" not in got and got["cka_prev"][0] == pytest.approx(ref_linear_cka(*layers.values()))


def test_bad_input():
    layers = _stack(n=30)
    with pytest.raises(ConfigError, match="at least 2 layers"):
        E.layer_evolution({"embed": layers["embed"]})
    with pytest.raises(ConfigError, match="layer 'embed' has 30 samples but layer 'blocks.0' has 29"):
        E.layer_evolution({"embed": layers["embed"], "blocks.0": layers["blocks.0"][:29]})
    zero = {"a": np.zeros((30, 16)), "b": layers["embed"]}
    with pytest.warns(RuntimeWarning):
        got = E.layer_evolution(zero)
    assert all(np.isfinite(v).all() for k, v in got.items() if k != "layers")
    assert got["norm_growth"][0] == 0 and got["cka_prev"][0] == 0 and got["cosine_mean"][0] == 0
