"""Template families: every prompt a family can produce, with its labels, and seeded sampling from them.

A family's *space* is the full, deterministic list of rows its templates and word lists produce
(``build_<family>() -> list[dict]``, each dict ``{"text": ..., <label>: ...}``). Generation filters
the space by length, drops duplicates, and samples ``count`` rows with a seeded generator,
balanced across the family's main label (sentiment, number, syntax, relation) as far as the class
sizes allow. The space is small enough to enumerate (a few thousand rows), so "how many are
available" is an exact number, which the error for a too-large ``count`` reports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import pandas as pd

from neuronmap.errors import ConfigError
from neuronmap.questions import _data
from neuronmap.questions.filters import LengthFilter, balanced_order, check_count, normalize_text

__all__ = ["PlainFamily", "build_agreement", "build_factual", "build_sentiment", "build_syntax", "check_seed",
           "sample_rows"]


# --------------------------------------------------------------------------------------------
# spaces
# --------------------------------------------------------------------------------------------
@cache
def build_factual() -> tuple[dict[str, Any], ...]:
    """Factual recall: ``subject``, ``relation``, ``answer``, ``subject_type``, ``form``
    (completion: the answer is the next word | question), ``template_id``."""
    rows = []
    for relation, subject_type, subject, answer in _data.fact_table():
        for t, (form, template) in enumerate(_data.FACT_TEMPLATES[relation]):
            rows.append({"text": template.format(s=subject), "subject": subject, "relation": relation,
                         "answer": answer, "subject_type": subject_type, "form": form,
                         "template_id": f"{relation}.{t}"})
    return tuple(rows)


@cache
def build_sentiment() -> tuple[dict[str, Any], ...]:
    """Sentiment: ``sentiment`` (positive|negative|neutral), ``thing``, ``word``, ``intensifier``
    (none|really|quite|very), ``template_id``."""
    rows = []
    for t, template in enumerate(_data.SENTIMENT_TEMPLATES):
        for thing in _data.SENTIMENT_THINGS:
            for sentiment, words in _data.SENTIMENT_WORDS.items():
                intensifiers = [""] if sentiment == "neutral" else _data.SENTIMENT_INTENSIFIERS
                for word in words:
                    for intensifier in intensifiers:
                        rows.append({"text": template.format(thing=thing, word=intensifier + word),
                                     "sentiment": sentiment, "thing": thing, "word": word,
                                     "intensifier": intensifier.strip() or "none", "template_id": f"sentiment.{t}"})
    return tuple(rows)


@cache
def build_agreement() -> tuple[dict[str, Any], ...]:
    """Subject-verb number agreement across a prepositional phrase. The text stops right before the
    verb: ``"The keys near the cabinet"`` -> ``correct_verb="are"``, ``wrong_verb="is"``.

    Labels: ``number`` (of the subject: singular|plural), ``subject``, ``distractor`` (the noun in the
    phrase), ``distractor_number``, ``attractor`` (True when the distractor's number differs),
    ``preposition``, ``correct_verb``, ``wrong_verb``, ``template_id``.
    """
    rows = []
    numbers = ("singular", "plural")
    for t, frame in enumerate(_data.AGREEMENT_FRAMES):
        for subject_forms in _data.AGREEMENT_SUBJECTS:
            for number, subject in zip(numbers, subject_forms, strict=True):
                for distractor_forms in _data.AGREEMENT_DISTRACTORS:
                    for d_number, distractor in zip(numbers, distractor_forms, strict=True):
                        for prep in _data.AGREEMENT_PREPOSITIONS:
                            correct, wrong = _data.AGREEMENT_VERBS[number]
                            rows.append({"text": frame.format(subject=subject, prep=prep, distractor=distractor),
                                         "number": number, "subject": subject, "distractor": distractor,
                                         "distractor_number": d_number, "attractor": d_number != number,
                                         "preposition": prep, "correct_verb": correct, "wrong_verb": wrong,
                                         "template_id": f"agreement.{t}"})
    return tuple(rows)


@cache
def build_syntax() -> tuple[dict[str, Any], ...]:
    """Sentence types and voice over the same events, so each event gives a minimal set.

    Labels: ``syntax`` (active_statement | passive_statement | active_question | passive_question |
    command), ``sentence_type`` (statement|question|command), ``voice`` (active|passive), ``verb``,
    ``agent`` ("you" for commands), ``patient``, ``event_id`` (rows sharing it describe one event).
    """
    rows = []

    def add(text: str, syntax: str, sentence_type: str, voice: str, verb: str, agent: str, patient: str,
            event_id: str) -> None:
        rows.append({"text": text[0].upper() + text[1:], "syntax": syntax, "sentence_type": sentence_type,
                     "voice": voice, "verb": verb, "agent": agent, "patient": patient, "event_id": event_id})

    for base, past, participle, patients in _data.SYNTAX_VERBS:
        for patient in patients:
            for agent in _data.SYNTAX_AGENTS:
                event = f"{base}|{agent}|{patient}"
                add(f"{agent} {past} {patient}.", "active_statement", "statement", "active", base, agent, patient,
                    event)
                add(f"{patient} was {participle} by {agent}.", "passive_statement", "statement", "passive", base, agent,
                    patient, event)
                add(f"did {agent} {base} {patient}?", "active_question", "question", "active", base, agent, patient,
                    event)
                add(f"was {patient} {participle} by {agent}?", "passive_question", "question", "passive", base, agent,
                    patient, event)
            event = f"{base}|you|{patient}"
            add(f"{base} {patient}.", "command", "command", "active", base, "you", patient, event)
            add(f"please {base} {patient}.", "command", "command", "active", base, "you", patient, event)
    return tuple(rows)


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------
def check_seed(seed: Any) -> int:
    """``seed`` as a non-negative int, else ConfigError."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed={seed!r} is invalid: pass a non-negative integer")
    return int(seed)


def usable_rows(rows: tuple[dict[str, Any], ...], length: LengthFilter) -> list[dict[str, Any]]:
    """``rows`` inside the length filter, without duplicate texts (first kept)."""
    seen: set[str] = set()
    kept = []
    for row in rows:
        if not length(row["text"]):
            continue
        key = normalize_text(row["text"])
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept


def too_many(family: str, asked: int, available: int, length: LengthFilter, unit: str = "prompts") -> ConfigError:
    """The error for a count larger than the family's space."""
    widen = ", or widen --min-words/--max-words" if length.describe() else ""
    if available == 0:
        loosen = [fix for fix, bound in (("lower --min-words", length.min_words), ("raise --max-words",
                                                                                   length.max_words)) if bound]
        return ConfigError(f"template family {family!r} has no {unit}{length.describe()}: "
                           f"{' or '.join(loosen) or 'choose another family'}")
    return ConfigError(f"template family {family!r} has only {available} distinct {unit}{length.describe()} "
                       f"(asked for {asked}): pass --count {available} or less{widen}")


def sample_rows(family: str, rows: tuple[dict[str, Any], ...], count: int, seed: int, length: LengthFilter,
                balance_by: str | None) -> pd.DataFrame:
    """``count`` distinct rows of ``rows`` in random (seeded) order, balanced across ``balance_by``."""
    count = check_count(count)
    rng = np.random.default_rng(check_seed(seed))
    kept = usable_rows(rows, length)
    if count > len(kept):
        raise too_many(family, count, len(kept), length)
    if balance_by is None:
        order = rng.permutation(len(kept)).tolist()
    else:
        order = balanced_order([row[balance_by] for row in kept], rng)
    chosen = order[:count]
    chosen = [chosen[i] for i in rng.permutation(len(chosen))]  # no class pattern in the row order
    df = pd.DataFrame([kept[i] for i in chosen])
    df.insert(1, "family", family)
    return df


@dataclass(frozen=True)
class PlainFamily:
    """A family whose rows are independent prompts (every family but ``counterfactual``)."""

    name: str
    description: str
    build: Callable[[], tuple[dict[str, Any], ...]]
    balance_by: str | None
    unit: str = "prompts"

    @property
    def labels(self) -> list[str]:
        return [k for k in self.build()[0] if k != "text"]

    def available(self, length: LengthFilter, tokenizer: Any = None) -> int:
        return len(usable_rows(self.build(), length))

    def generate(self, count: int, seed: int, length: LengthFilter, tokenizer: Any = None) -> pd.DataFrame:
        if tokenizer is not None:
            raise ConfigError(f"a tokenizer only applies to the counterfactual family, not to {self.name!r}: "
                              "drop --tokenizer")
        return sample_rows(self.name, self.build(), count, seed, length, self.balance_by)
