"""Counterfactual pairs: structure, equal lengths (words, or tokens of a tiny GPT-2 tokenizer), answer tokens."""

from __future__ import annotations

import pytest

from neuronmap.errors import ConfigError
from neuronmap.questions import available, generate_prompts


@pytest.fixture(scope="module")
def gpt2_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir("gpt2"))


def check_pairs(df, count):
    assert len(df) == 2 * count
    assert df["pair_id"].tolist() == [i // 2 for i in range(2 * count)]
    assert df["role"].tolist() == ["clean", "corrupted"] * count
    assert df["text"].is_unique
    for _, pair in df.groupby("pair_id"):
        clean, corrupted = pair.iloc[0], pair.iloc[1]
        assert clean["kind"] == corrupted["kind"] and clean["template_id"] == corrupted["template_id"]
        assert clean["answer"] != corrupted["answer"]
        assert clean["wrong_answer"] == corrupted["answer"] and corrupted["wrong_answer"] == clean["answer"]
        assert clean["subject"] != corrupted["subject"]
        # only the subject slot differs
        masked = [row["text"].replace(row["subject"], "#", 1) for row in (clean, corrupted)]
        assert masked[0] == masked[1]


def test_pairs_without_tokenizer_have_equal_word_counts():
    df = generate_prompts("counterfactual", 60, seed=0)
    check_pairs(df, 60)
    for _, pair in df.groupby("pair_id"):
        assert pair["text"].str.split().str.len().nunique() == 1
        assert (pair["n_words"] == len(pair["text"].iloc[0].split())).all()
    assert set(df["kind"]) == {"factual", "agreement"}
    assert abs((df["kind"] == "factual").sum() - (df["kind"] == "agreement").sum()) <= 2  # balanced kinds


def test_pairs_have_equal_token_length_under_the_tokenizer(gpt2_tokenizer):
    df = generate_prompts("counterfactual", 80, seed=3, tokenizer=gpt2_tokenizer)
    check_pairs(df, 80)
    for _, pair in df.groupby("pair_id"):
        lengths = [len(gpt2_tokenizer(t)["input_ids"]) for t in pair["text"]]
        assert lengths[0] == lengths[1] == pair["n_tokens"].iloc[0] == pair["n_tokens"].iloc[1]
        clean, corrupted = pair.iloc[0], pair.iloc[1]
        assert clean["answer_token_id"] != clean["wrong_answer_token_id"]
        for row in (clean, corrupted):
            head = gpt2_tokenizer(row["text"])["input_ids"]
            full = gpt2_tokenizer(row["text"] + " " + row["answer"])["input_ids"]
            assert full[:len(head)] == head and full[len(head)] == row["answer_token_id"]
    factual = df[df["kind"] == "factual"]
    assert not factual.empty and set(factual["relation"]) <= {"capital", "language", "continent", "landmark_city",
                                                               "chemical_symbol", "author", "company_country"}


def test_tokenizer_by_folder_matches_tokenizer_object(tiny_model_dir, gpt2_tokenizer):
    by_path = generate_prompts("counterfactual", 10, seed=1, tokenizer=str(tiny_model_dir("gpt2")))
    by_object = generate_prompts("counterfactual", 10, seed=1, tokenizer=gpt2_tokenizer)
    assert by_path.equals(by_object)


def test_the_maximum_is_reachable_and_one_more_is_a_clear_error(gpt2_tokenizer):
    n = available("counterfactual", tokenizer=gpt2_tokenizer)
    assert 0 < n < available("counterfactual")  # token lengths are stricter than word counts here
    for seed in (0, 1):  # every seed reaches the maximum matching
        df = generate_prompts("counterfactual", n, seed=seed, tokenizer=gpt2_tokenizer)
        assert len(df) == 2 * n and df["text"].is_unique
    with pytest.raises(ConfigError, match=rf"only {n} distinct pairs of equal token length .*--count {n} or less"):
        generate_prompts("counterfactual", n + 1, tokenizer=gpt2_tokenizer)
