"""Template families: counts, labels, uniqueness, seeds, length filters, errors; the filter helpers."""

from __future__ import annotations

import re

import pytest

from neuronmap.errors import ConfigError
from neuronmap.prompts import load_prompts
from neuronmap.questions import available, clean_line, dedupe, generate_prompts, list_families, normalize_text
from neuronmap.questions._data import COUNTRIES

PLAIN = ["factual", "sentiment", "agreement", "syntax"]
LABELS = {
    "factual": ["subject", "relation", "answer", "subject_type", "form", "template_id"],
    "sentiment": ["sentiment", "thing", "word", "intensifier", "template_id"],
    "agreement": ["number", "subject", "distractor", "distractor_number", "attractor", "preposition",
                  "correct_verb", "wrong_verb", "template_id"],
    "syntax": ["syntax", "sentence_type", "voice", "verb", "agent", "patient", "event_id"],
}


@pytest.mark.parametrize("family", PLAIN)
def test_requested_count_with_labels_and_no_duplicates(family):
    df = generate_prompts(family, 120, seed=0)
    assert len(df) == 120
    assert list(df.columns) == ["text", "family", *LABELS[family]]
    assert (df["family"] == family).all()
    assert not df.isna().any().any()
    assert len({normalize_text(t) for t in df["text"]}) == 120
    loaded = load_prompts(df)  # usable as a prompt source as is
    assert loaded["text"].tolist() == df["text"].tolist()
    assert set(LABELS[family]) <= set(loaded.columns)


@pytest.mark.parametrize("family", [*PLAIN, "counterfactual"])
def test_same_seed_same_rows_other_seed_other_rows(family):
    a = generate_prompts(family, 40, seed=1)
    b = generate_prompts(family, 40, seed=1)
    c = generate_prompts(family, 40, seed=2)
    assert a.equals(b)
    assert set(a["text"]) != set(c["text"])


@pytest.mark.parametrize("family,label,classes", [
    ("sentiment", "sentiment", {"positive", "negative", "neutral"}),
    ("agreement", "number", {"singular", "plural"}),
    ("syntax", "syntax", {"active_statement", "passive_statement", "active_question", "passive_question", "command"}),
])
def test_main_label_is_balanced(family, label, classes):
    df = generate_prompts(family, 20 * len(classes), seed=5)
    counts = df[label].value_counts()
    assert set(counts.index) == classes
    assert counts.max() - counts.min() <= 1


def test_factual_labels_are_true_facts():
    df = generate_prompts("factual", available("factual"), seed=0)
    capitals = df[df["relation"] == "capital"]
    assert set(capitals["subject"]) == set(COUNTRIES)
    for row in capitals.itertuples():
        assert row.answer == COUNTRIES[row.subject][0]
        assert row.subject in row.text
    france = df[(df["subject"] == "France") & (df["relation"] == "capital") & (df["form"] == "completion")]
    assert "The capital of France is" in set(france["text"]) and set(france["answer"]) == {"Paris"}
    completions = df[df["form"] == "completion"]
    # the prompt never gives the answer away (beyond the subject's own name: "Thai" in "Thailand")
    assert not any(r.answer in r.text.replace(r.subject, "") for r in completions.itertuples() if len(r.answer) > 2)
    assert df.loc[df["form"] == "question", "text"].str.endswith("?").all()


def test_agreement_labels_follow_the_subject_not_the_distractor():
    df = generate_prompts("agreement", 200, seed=0)
    for row in df.itertuples():
        assert row.correct_verb == ("is" if row.number == "singular" else "are")
        assert row.wrong_verb != row.correct_verb
        assert row.attractor == (row.number != row.distractor_number)
        assert row.text.endswith(f"{row.preposition} the {row.distractor}")
        assert re.search(rf"\bthe {row.subject} {row.preposition}\b", row.text, re.IGNORECASE)
    assert df["attractor"].any() and not df["attractor"].all()


def test_syntax_forms_look_like_their_labels():
    df = generate_prompts("syntax", 300, seed=0)
    questions = df[df["sentence_type"] == "question"]
    assert questions["text"].str.endswith("?").all()
    assert not df.loc[df["sentence_type"] != "question", "text"].str.endswith("?").any()
    assert df.loc[df["voice"] == "passive", "text"].str.contains(r"\b[Ww]as\b .* by ").all()
    commands = df[df["sentence_type"] == "command"]
    assert (commands["agent"] == "you").all() and (commands["voice"] == "active").all()
    # one event gives several forms: the minimal sets share an event_id
    full = generate_prompts("syntax", available("syntax"), seed=0)
    assert full.groupby("event_id")["syntax"].nunique().max() == 4


def test_length_filter_and_exact_available_count():
    df = generate_prompts("sentiment", 50, seed=0, min_words=7, max_words=8)
    assert df["text"].str.split().str.len().between(7, 8).all()
    n = available("sentiment", min_words=7, max_words=8)
    assert 50 < n < available("sentiment")
    assert len(generate_prompts("sentiment", n, seed=0, min_words=7, max_words=8)) == n
    with pytest.raises(ConfigError) as info:
        generate_prompts("sentiment", n + 1, seed=0, min_words=7, max_words=8)
    message = str(info.value)
    assert f"only {n} distinct prompts with 7 to 8 words" in message
    assert f"--count {n} or less" in message and "widen --min-words/--max-words" in message


def test_count_beyond_the_template_space_names_the_maximum():
    n = available("factual")
    assert [f.available for f in list_families() if f.name == "factual"] == [n]
    with pytest.raises(ConfigError, match=rf"has only {n} distinct prompts \(asked for 100000\): pass --count {n}"):
        generate_prompts("factual", 100_000)


@pytest.mark.parametrize("kwargs,match", [
    ({"count": 0}, "count=0 is invalid"),
    ({"count": 5, "seed": -1}, "seed=-1 is invalid"),
    ({"count": 5, "min_words": 9, "max_words": 3}, "min_words=9 is larger than max_words=3"),
    ({"count": 5, "min_words": 0}, "min_words=0 is invalid"),
    ({"count": 5, "tokenizer": "gpt2"}, "tokenizer only applies to the counterfactual family"),
])
def test_bad_arguments_raise_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        generate_prompts("sentiment", **kwargs)


def test_unknown_family_suggests_the_close_one():
    with pytest.raises(ConfigError, match="unknown template family 'sentimnt': did you mean 'sentiment'"):
        generate_prompts("sentimnt", 5)


def test_filter_helpers():
    assert normalize_text("  The  Cat\tsat. ") == "the cat sat."
    assert dedupe(["A b", "a  B", "c", "C", "d"]) == ["A b", "c", "d"]
    assert clean_line('  2. "Why is the sky blue?"') == "Why is the sky blue?"
    assert clean_line("- What is rain?") == "What is rain?"
    assert clean_line("Q: How   do bees fly?") == "How do bees fly?"
    assert clean_line("Question 3: Who?") == "Who?"
    assert clean_line("1999 was a good year.") == "1999 was a good year."
    assert clean_line("   ") == ""
    assert clean_line("a\x01b\x7fc") == "abc"
