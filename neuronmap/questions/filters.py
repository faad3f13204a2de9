"""De-duplication, length filtering, line cleaning and balanced sampling shared by every generator.

Two texts are duplicates when they are equal after Unicode NFKC normalisation, case folding and
whitespace collapsing ("The cat  sat." == "the cat sat."). Length is counted in whitespace-separated
words. Everything here is pure and deterministic for a given ``numpy.random.Generator``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from neuronmap.errors import ConfigError

__all__ = ["LengthFilter", "UniqueTexts", "balanced_order", "clean_line", "dedupe", "normalize_text",
           "check_count", "word_count"]

_SPACES = re.compile(r"\s+")
# "1. ", "2) ", "- ", "* ", "• ", "Q: ", "Question 3: " at the start of a generated line
_LINE_PREFIX = re.compile(r"^\s*(?:(?:\d{1,3}[.)]|[-*•])\s+|(?:q|question)\s*\d*\s*[:.)-]\s*)", re.IGNORECASE)
_QUOTES = "\"'“”‘’`"
_CONTROL = dict.fromkeys(c for c in range(0x20) if chr(c) not in "\t\n\r") | {0x7F: None}


def normalize_text(text: str) -> str:
    """The de-duplication key of ``text``: NFKC, case-folded, whitespace collapsed and stripped."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def word_count(text: str) -> int:
    """Number of whitespace-separated words."""
    return len(text.split())


def dedupe(texts: Iterable[str]) -> list[str]:
    """``texts`` without duplicates (by `normalize_text`), first occurrence kept, order kept."""
    seen: set[str] = set()
    out = []
    for text in texts:
        key = normalize_text(text)
        if key not in seen:
            seen.add(key)
            out.append(text)
    return out


def clean_line(line: str) -> str:
    """One generated line made into a prompt: no list numbering/bullet/"Q:" prefix, no wrapping quotes,
    no control characters.

    ``'  2. "Why is the sky blue?"'`` -> ``'Why is the sky blue?'``. Returns "" for lines with no text.
    """
    text = _LINE_PREFIX.sub("", line.translate(_CONTROL).strip(), count=1).strip()
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    return _SPACES.sub(" ", text)


class LengthFilter:
    """Keeps texts whose word count lies in ``[min_words, max_words]`` (either bound may be None).

    Raises ConfigError for a bound that is not a positive integer or for min_words > max_words.
    """

    def __init__(self, min_words: int | None = None, max_words: int | None = None):
        for name, value in (("min_words", min_words), ("max_words", max_words)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name}={value!r} is invalid: pass a positive integer (a number of words), or None")
        if min_words is not None and max_words is not None and min_words > max_words:
            raise ConfigError(f"min_words={min_words} is larger than max_words={max_words}: "
                              "swap them or widen the range")
        self.min_words = min_words
        self.max_words = max_words

    def __call__(self, text: str) -> bool:
        n = word_count(text)
        return (self.min_words is None or n >= self.min_words) and (self.max_words is None or n <= self.max_words)

    def describe(self) -> str:
        """"" when unfiltered, else e.g. " with 3 to 8 words" (for error messages)."""
        if self.min_words is None and self.max_words is None:
            return ""
        if self.max_words is None:
            return f" with at least {self.min_words} words"
        if self.min_words is None:
            return f" with at most {self.max_words} words"
        return f" with {self.min_words} to {self.max_words} words"


class UniqueTexts:
    """Collects ``(text, labels)`` rows, rejecting blanks, duplicates and texts outside the length filter."""

    def __init__(self, length: LengthFilter | None = None):
        self.length = length or LengthFilter()
        self._seen: set[str] = set()
        self.rows: list[dict[str, Any]] = []

    def add(self, text: str, **labels: Any) -> bool:
        """Add one row; True when it was kept."""
        text = text.strip()
        if not text or not self.length(text):
            return False
        key = normalize_text(text)
        if key in self._seen:
            return False
        self._seen.add(key)
        self.rows.append({"text": text, **labels})
        return True

    def __len__(self) -> int:
        return len(self.rows)

    def frame(self) -> pd.DataFrame:
        """The rows as a DataFrame, ``text`` first."""
        return pd.DataFrame(self.rows)


def balanced_order(groups: Sequence[Hashable], rng: np.random.Generator) -> list[int]:
    """Every index of ``groups``, shuffled within each group, then dealt round-robin across groups.

    Taking the first ``k`` indices gives a sample as balanced across groups as the group sizes allow
    (a group that runs out simply stops contributing). Groups are visited in sorted order so the
    result depends only on ``groups`` and the generator state.
    """
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    ordered = sorted(members.items(), key=lambda kv: str(kv[0]))
    shuffled = [[idx[j] for j in rng.permutation(len(idx))] for _, idx in ordered]
    order: list[int] = []
    depth = max((len(s) for s in shuffled), default=0)
    for k in range(depth):
        order.extend(s[k] for s in shuffled if k < len(s))
    return order


def check_count(count: Any, what: str = "count") -> int:
    """``count`` as a positive int, else ConfigError."""
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ConfigError(f"{what}={count!r} is invalid: pass a positive integer")
    return int(count)
