"""Shared test data of the actors tests (imported as `from actorstest_util import ...`)."""

import numpy as np

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hi",
    "Why is the sky blue during the day but red at sunset?",
    "Paris is the capital of France.",
    "Numbers like 12345 and 678 are tokenised into pieces.",
    "A",
    "What did the committee decide after three long hours of debate about the budget?",
    "Short one.",
    "Transformers map token sequences to sequences of hidden states, layer after layer.",
    "Is it raining?",
    "She sold sea shells by the sea shore, or so the story goes.",
    "Ok",
]


def assert_same_run(run, reference):
    """Same rows, values, ids and manifest (apart from timings): shards listed in the same order too,
    however the workers' commits interleaved."""
    assert run.manifest.status == "complete"
    assert run.layers == reference.layers
    for layer in reference.layers:
        np.testing.assert_array_equal(run.array(layer), reference.array(layer), err_msg=layer)
        np.testing.assert_array_equal(run.sample_ids(layer), reference.sample_ids(layer))
        if reference.manifest.layers[layer].per_token:
            np.testing.assert_array_equal(run.token_index(layer), reference.token_index(layer))
    ours, theirs = run.manifest.model_dump(), reference.manifest.model_dump()
    for manifest in (ours, theirs):
        for key in ("created", "updated"):
            manifest.pop(key)
    assert ours == theirs
