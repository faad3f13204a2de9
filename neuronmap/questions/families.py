"""The registry of template families and the one verb that samples from them.

``generate_prompts("sentiment", 200, seed=0)`` returns a DataFrame ``[text, family, <labels>]`` that
``neuronmap.prompts.load_prompts`` (and so ``neuronmap extract``) takes as it is.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import pandas as pd

from neuronmap.errors import ConfigError
from neuronmap.questions.counterfactual import CounterfactualFamily
from neuronmap.questions.filters import LengthFilter
from neuronmap.questions.templates import (PlainFamily, build_agreement, build_factual, build_sentiment,
                                           build_syntax)

__all__ = ["FAMILIES", "FamilyInfo", "available", "generate_prompts", "get_family", "list_families"]

FAMILIES: dict[str, Any] = {
    f.name: f for f in (
        PlainFamily("factual", "factual recall: 'The capital of France is' (subject, relation, answer)",
                    build_factual, balance_by="relation"),
        PlainFamily("sentiment", "positive / negative / neutral opinions about everyday things",
                    build_sentiment, balance_by="sentiment"),
        PlainFamily("agreement", "subject-verb number agreement with a distractor noun, cut before the verb",
                    build_agreement, balance_by="number"),
        PlainFamily("syntax", "statements, questions and commands in active and passive voice over shared events",
                    build_syntax, balance_by="syntax"),
        CounterfactualFamily(),
    )
}


@dataclass(frozen=True)
class FamilyInfo:
    """What ``neuronmap generate --list`` shows: name, description, label columns, unit, space size."""

    name: str
    description: str
    labels: list[str]
    unit: str
    available: int


def get_family(name: str) -> Any:
    """The family called ``name``; ConfigError naming the families (and a close match) otherwise."""
    family = FAMILIES.get(str(name).lower())
    if family is None:
        close = difflib.get_close_matches(str(name).lower(), list(FAMILIES), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown template family {name!r}: {hint}use one of {', '.join(FAMILIES)} "
                          "(or the backends local, ollama); `neuronmap generate --list` describes them")
    return family


def list_families() -> list[FamilyInfo]:
    """Every family with its labels and the number of distinct prompts (pairs) it can produce."""
    return [FamilyInfo(f.name, f.description, list(f.labels), f.unit, f.available(LengthFilter()))
            for f in FAMILIES.values()]


def available(family: str, *, min_words: int | None = None, max_words: int | None = None,
              tokenizer: Any = None) -> int:
    """How many distinct prompts (pairs for ``counterfactual``) ``family`` has under the filters."""
    return get_family(family).available(LengthFilter(min_words, max_words), tokenizer)


def generate_prompts(family: str, count: int, seed: int = 0, *, min_words: int | None = None,
                     max_words: int | None = None, tokenizer: Any = None) -> pd.DataFrame:
    """Sample ``count`` distinct labelled prompts of a template family.

    Parameters
    ----------
    family : str
        ``factual``, ``sentiment``, ``agreement``, ``syntax`` or ``counterfactual``.
    count : int
        Prompts to return; for ``counterfactual`` the number of pairs (the frame has ``2 * count`` rows).
    seed : int
        Same seed, same rows in the same order; another seed, another sample.
    min_words, max_words : int, optional
        Keep only prompts with this many whitespace-separated words (inclusive).
    tokenizer : str or tokenizer, optional
        ``counterfactual`` only: pairs have equal token length under it (a model folder, registry
        name or a loaded Hugging Face tokenizer); without one, equal word count.

    Returns
    -------
    pandas.DataFrame of shape (count, 2 + n_labels)
        ``text``, ``family``, then the family's label columns. Texts are unique (case and whitespace
        insensitive). ``count`` larger than what the family can produce raises ConfigError giving the maximum.
    """
    return get_family(family).generate(count, seed, LengthFilter(min_words, max_words), tokenizer)
