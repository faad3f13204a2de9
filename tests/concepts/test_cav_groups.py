"""CAV hold-out by prompt on per-token rows: no prompt on both sides of the split."""

from __future__ import annotations

import numpy as np
import pytest

from neuronmap.concepts.cav import _holdout, fit_cav
from neuronmap.errors import ConfigError


def test_holdout_keeps_groups_whole_and_singletons_unchanged():
    groups = np.repeat(np.arange(40), np.random.default_rng(0).integers(1, 9, 40))
    train, test = _holdout(len(groups), 0.2, np.random.default_rng(3), groups)
    assert set(groups[train]).isdisjoint(groups[test]) and len(train) + len(test) == len(groups)
    assert 0.2 * len(groups) <= len(test) <= 0.2 * len(groups) + 8  # whole groups, just past the share
    plain = _holdout(50, 0.2, np.random.default_rng(3))
    single = _holdout(50, 0.2, np.random.default_rng(3), np.arange(100, 150))
    assert all(np.array_equal(a, b) for a, b in zip(plain, single))  # pooled runs: the same split as before
    with pytest.raises(ConfigError, match="one prompt"):
        _holdout(5, 0.2, np.random.default_rng(0), np.zeros(5))


def test_tokens_of_a_prompt_cannot_carry_the_accuracy():
    """Concept and random prompts differ only by a per-prompt offset (no concept direction at all): a
    row split tests on prompts it trained on and scores high; the grouped split is near chance."""
    rng = np.random.default_rng(0)

    def side(n_prompts: int, first: int):
        offsets = rng.normal(0, 3, (n_prompts, 128))
        lengths = rng.integers(15, 25, n_prompts)
        rows = np.concatenate([o + rng.normal(0, 0.3, (k, 128)) for o, k in zip(offsets, lengths)])
        return rows, np.repeat(np.arange(first, first + n_prompts), lengths)

    concept, concept_ids = side(30, 0)
    random, random_ids = side(30, 1000)
    leaky = fit_cav(concept, random, C=10.0, seed=1)
    grouped = fit_cav(concept, random, C=10.0, seed=1, concept_groups=concept_ids, random_groups=random_ids)
    assert leaky.accuracy > 0.9
    assert grouped.accuracy < 0.75
