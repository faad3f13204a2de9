"""Local generation with a tiny random-weight GPT-2 (the real generate path, offline)."""

from __future__ import annotations

import pytest
import torch

from neuronmap.errors import ConfigError
from neuronmap.questions import generate_local, normalize_text


@pytest.fixture(scope="module")
def gpt2_lm(tiny_model):
    return tiny_model("gpt2", head=True)


def test_produces_n_distinct_texts_reproducibly(gpt2_lm):
    rng_before = torch.get_rng_state()
    df = generate_local(gpt2_lm, 8, seed=0, max_new_tokens=6, batch_size=8)
    assert torch.equal(torch.get_rng_state(), rng_before), "the caller's RNG state is untouched"
    assert len(df) == 8
    assert len({normalize_text(t) for t in df["text"]}) == 8
    assert all(t.strip() == t and t and "\n" not in t for t in df["text"])
    assert set(df.columns) == {"text", "family", "model", "source_prompt", "topic"}
    assert df["source_prompt"].str.endswith("Q:").all()
    assert df.equals(generate_local(gpt2_lm, 8, seed=0, max_new_tokens=6, batch_size=8))
    assert set(df["text"]) != set(generate_local(gpt2_lm, 8, seed=1, max_new_tokens=6, batch_size=8)["text"])


def test_own_prompts_length_filter_and_model_by_folder(tiny_model_dir):
    prompts = ["The weather today is", "My favourite food is"]
    df = generate_local(str(tiny_model_dir("gpt2")), 6, seed=2, prompts=prompts, max_new_tokens=12, min_words=2,
                        max_words=40, include_prompt=True, device="cpu")
    assert len(df) == 6 and "topic" not in df.columns
    assert all(any(t.startswith(p) for p in prompts) for t in df["text"])
    assert df["text"].str.split().str.len().between(2, 40).all()


def test_gives_up_with_a_clear_error(gpt2_lm):
    with pytest.raises(ConfigError, match=r"gave only 0 distinct texts with at least 500 words in 2 batches"):
        generate_local(gpt2_lm, 3, min_words=500, max_new_tokens=4, batch_size=2, max_batches=2)


def test_rejects_a_model_that_cannot_generate(tiny_model):
    with pytest.raises(ConfigError, match="cannot generate text"):
        generate_local(tiny_model("bert", head=True), 2)
