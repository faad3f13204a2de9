"""Each pooling mode against a numpy computation on the unpooled tensor."""

import numpy as np
import pytest
import torch

from neuronmap.errors import ConfigError
from neuronmap.pooling import POOLING_MODES, pool


@pytest.fixture()
def batch():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(4, 7, 5)).astype(np.float32)
    lengths = np.array([7, 3, 1, 5])
    mask = (np.arange(7)[None, :] < lengths[:, None]).astype(np.int64)
    return hidden, mask, lengths


def numpy_pool(hidden, lengths, mode):
    rows = [hidden[i, :n] for i, n in enumerate(lengths)]
    if mode == "mean":
        return np.stack([r.mean(0) for r in rows])
    if mode == "max":
        return np.stack([r.max(0) for r in rows])
    if mode == "first":
        return np.stack([r[0] for r in rows])
    if mode == "last":
        return np.stack([r[-1] for r in rows])
    if mode == "none":
        return np.concatenate(rows)
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_pooling_matches_numpy(batch, mode):
    hidden, mask, lengths = batch
    got = pool(torch.from_numpy(hidden), torch.from_numpy(mask), mode).numpy()
    np.testing.assert_allclose(got, numpy_pool(hidden, lengths, mode), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["mean", "max", "last", "none"])
def test_pooling_multidim_features(mode):
    rng = np.random.default_rng(1)
    hidden = rng.random(size=(3, 6, 2, 6)).astype(np.float32)  # e.g. (batch, q, heads, k)
    lengths = np.array([6, 2, 4])
    mask = (np.arange(6)[None, :] < lengths[:, None]).astype(np.int64)
    got = pool(torch.from_numpy(hidden), torch.from_numpy(mask), mode).numpy()
    np.testing.assert_allclose(got, numpy_pool(hidden, lengths, mode), rtol=1e-6, atol=1e-6)


def test_padding_values_never_leak(batch):
    hidden, mask, lengths = batch
    poisoned = hidden.copy()
    poisoned[mask == 0] = 1e6
    for mode in ("mean", "max", "last", "none"):
        got = pool(torch.from_numpy(poisoned), torch.from_numpy(mask), mode).numpy()
        assert np.abs(got).max() < 1e5, mode


def test_unknown_mode_is_a_config_error(batch):
    hidden, mask, _ = batch
    with pytest.raises(ConfigError, match="use one of mean, last, first, max, none"):
        pool(torch.from_numpy(hidden), torch.from_numpy(mask), "median")
