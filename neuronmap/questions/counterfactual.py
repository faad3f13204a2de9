"""Clean/corrupted prompt pairs for activation patching.

A pair is two prompts from the same template that differ in one slot, so that the model's next
token should differ:

- ``factual``: another subject of the same relation with a different answer
  ("The capital of France is" -> Paris vs "The capital of Italy is" -> Rome);
- ``agreement``: the subject's number flipped ("The key near the tables" -> is vs
  "The keys near the tables" -> are).

Patching needs position-aligned inputs, so both prompts of a pair have the same number of tokens
under the given tokenizer (or, without one, the same number of words), and their answers start with
different tokens. Every prompt appears in at most one pair. Each pair gives two consecutive rows,
``role`` clean then corrupted, sharing ``pair_id``; ``answer`` is the right next word for the row's
own prompt and ``wrong_answer`` the other row's. With a tokenizer, ``n_tokens``, ``answer_token_id``
and ``wrong_answer_token_id`` (the first token of " " + answer right after the prompt) are added.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd

from neuronmap.questions._data import AGREEMENT_SUBJECTS
from neuronmap.questions.filters import LengthFilter, balanced_order, check_count, word_count
from neuronmap.questions.templates import build_agreement, build_factual, check_seed, too_many, usable_rows

__all__ = ["CounterfactualFamily", "load_tokenizer"]

_Row = dict[str, Any]
_LEMMAS = {form: singular for singular, plural in AGREEMENT_SUBJECTS for form in (singular, plural)}


def load_tokenizer(tokenizer: Any) -> Any:
    """A Hugging Face tokenizer: passed through, or loaded from a model folder / registry name / hub id."""
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from neuronmap.models.loading import _load_tokenizer, resolve_source

    name, source, _entry, offline = resolve_source(tokenizer)
    return _load_tokenizer(name, source, bool(offline))


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text without special tokens.

    Goes straight to the Rust tokenizer of a fast Hugging Face tokenizer when it has no padding or
    truncation set: transformers' per-encoding Python conversion costs ~4x the tokenisation itself.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.padding is None and backend.truncation is None:
        return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _answer_tokens(tokenizer: Any, prompts: list[str], answers: list[str],
                   heads: list[list[int]] | None = None) -> list[int]:
    """Per prompt, the id of the first token the model must produce after it to say " " + answer.

    ``heads`` are the prompts' ids from `_encode`, when the caller has them already.
    """
    if heads is None:
        heads = _encode(tokenizer, prompts)
    fulls = _encode(tokenizer, [p + " " + a for p, a in zip(prompts, answers, strict=True)])
    out = []
    for head, full, answer in zip(heads, fulls, answers, strict=True):
        if len(full) > len(head) and full[:len(head)] == head:
            out.append(int(full[len(head)]))
        else:  # the answer merged with the prompt's last token: fall back to the answer alone
            out.append(int(_encode(tokenizer, [" " + answer])[0][0]))
    return out


class _Space:
    """Candidate rows (with their lengths and first answer tokens) grouped into pairable sets.

    Two rows can pair when they share a group (same template and slot, same length) and their
    answers start with different tokens. Every prompt is used by at most one pair, so the
    generated texts are unique: within a group the pairs form a matching of a complete multipartite
    graph (parts = rows sharing a first answer token), whose maximum size is
    ``min(n // 2, n - largest part)``; `match` reaches it for every seed.
    """

    def __init__(self, length: LengthFilter, tokenizer: Any):
        self.tokenizer = tokenizer
        factual = [r for r in usable_rows(build_factual(), length) if r["form"] == "completion"]
        agreement = usable_rows(build_agreement(), length)
        self.rows: list[_Row] = [
            *({"kind": "factual", "text": r["text"], "answer": r["answer"], "subject": r["subject"],
               "relation": r["relation"], "template_id": r["template_id"], "slot": None} for r in factual),
            *({"kind": "agreement", "text": r["text"], "answer": r["correct_verb"], "subject": r["subject"],
               "relation": "number", "template_id": r["template_id"],
               "slot": (r["preposition"], r["distractor"], _lemma(r["subject"]))} for r in agreement),
        ]
        texts = [r["text"] for r in self.rows]
        if tokenizer is None:
            self.size = [word_count(t) for t in texts]
            self.first: list[Any] = [r["answer"] for r in self.rows]
        else:
            specials = tokenizer.num_special_tokens_to_add(pair=False)
            heads = _encode(tokenizer, texts)
            self.size = [len(ids) + specials for ids in heads]
            self.first = _answer_tokens(tokenizer, texts, [r["answer"] for r in self.rows], heads)
        # factual: the subject varies within a template; agreement: only the subject's number varies
        groups: dict[tuple, dict[Any, list[int]]] = {}
        for i, row in enumerate(self.rows):
            key = (row["kind"], row["template_id"], row["slot"], self.size[i])
            groups.setdefault(key, {}).setdefault(self.first[i], []).append(i)
        self.groups = [list(parts.values()) for parts in groups.values()]
        self.available = sum(min(sum(map(len, parts)) // 2, sum(map(len, parts)) - max(map(len, parts)))
                             for parts in self.groups)

    def match(self, rng: np.random.Generator) -> list[tuple[int, int]]:
        """A maximum set of disjoint (clean, corrupted) pairs, drawn at random.

        Repeatedly pairs a row of the largest remaining part with a row of the second largest (ties
        broken at random), which reaches the maximum matching; rows within parts and the clean/
        corrupted roles are shuffled.
        """
        pairs = []
        for parts in self.groups:
            pools = [[part[j] for j in rng.permutation(len(part))] for part in parts]
            while True:
                live = [pool for pool in pools if pool]
                if len(live) < 2:
                    break
                tiebreak = rng.random(len(live))
                first, second = sorted(range(len(live)), key=lambda k: (-len(live[k]), tiebreak[k]))[:2]
                a, b = live[first].pop(), live[second].pop()
                pairs.append((a, b) if rng.random() < 0.5 else (b, a))
        return pairs


_SPACES: dict[tuple, tuple[Any, _Space]] = {}


def _space(length: LengthFilter, tokenizer: Any) -> _Space:
    """`_Space` for this filter and tokenizer, reused across calls (tokenising ~9k prompts takes a second)."""
    key = (length.min_words, length.max_words, id(tokenizer))
    hit = _SPACES.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    space = _Space(length, tokenizer)
    if len(_SPACES) >= 4:
        _SPACES.pop(next(iter(_SPACES)))
    _SPACES[key] = (tokenizer, space)  # the tokenizer is kept alive so its id cannot be reused
    return space


def _lemma(noun: str) -> str:
    return _LEMMAS.get(noun, noun)


class CounterfactualFamily:
    """The ``counterfactual`` template family; ``count`` counts pairs (two rows each)."""

    name = "counterfactual"
    description = ("clean/corrupted pairs for activation patching (subject swap, subject number flip), "
                   "equal token length per --tokenizer")
    unit = "pairs"
    labels = ["pair_id", "role", "kind", "answer", "wrong_answer", "subject", "relation", "template_id",
              "n_tokens | n_words", "answer_token_id", "wrong_answer_token_id"]

    def available(self, length: LengthFilter, tokenizer: Any = None) -> int:
        return _space(length, load_tokenizer(tokenizer)).available

    def generate(self, count: int, seed: int, length: LengthFilter, tokenizer: Any = None) -> pd.DataFrame:
        count = check_count(count)
        rng = np.random.default_rng(check_seed(seed))
        tokenizer = load_tokenizer(tokenizer)
        space = _space(length, tokenizer)
        if count > space.available:
            by = "token length under the tokenizer" if tokenizer is not None else "word count"
            raise too_many(self.name, count, space.available, length, unit=f"pairs of equal {by}")
        pairs = space.match(rng)
        order = balanced_order([space.rows[a]["kind"] for a, _ in pairs], rng)[:count]
        order = [order[i] for i in rng.permutation(len(order))]
        records = []
        for pair_id, k in enumerate(order):
            clean, corrupted = pairs[k]
            for role, own, other in (("clean", clean, corrupted), ("corrupted", corrupted, clean)):
                records.append(self._record(space, pair_id, role, own, other))
        if tokenizer is not None:  # the other answer's first token in this row's own context, batched
            wrong = _answer_tokens(tokenizer, [r["text"] for r in records], [r["wrong_answer"] for r in records])
            for record, token in zip(records, wrong, strict=True):
                record["wrong_answer_token_id"] = token
        df = pd.DataFrame(records)
        df.insert(1, "family", self.name)
        return df

    @staticmethod
    def _record(space: _Space, pair_id: int, role: str, own: int, other: int) -> _Row:
        row, other_row = space.rows[own], space.rows[other]
        record: _Row = {"text": row["text"], "pair_id": pair_id, "role": role, "kind": row["kind"],
                        "answer": row["answer"], "wrong_answer": other_row["answer"], "subject": row["subject"],
                        "relation": row["relation"], "template_id": row["template_id"]}
        if space.tokenizer is None:
            record["n_words"] = space.size[own]
        else:
            record["n_tokens"] = space.size[own]
            record["answer_token_id"] = space.first[own]
        return record
