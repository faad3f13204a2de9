"""Parsing of layer specs: comma-separated names, globs, ranges, ``all``.

Globs match dotted names segment by segment: ``*`` and ``?`` never cross a dot, ``**`` matches any
number of segments. So ``blocks.*`` is the residual stream of every block (not their attn/mlp/pattern
children), ``blocks.*.mlp`` every MLP, ``**.pattern`` every attention pattern. Ranges are inclusive:
``blocks.2-5`` and ``blocks.2-5.attn``. These helpers are pure string functions; the adapter
supplies the model's names and turns failures into ``UnknownLayerError``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from ..errors import ConfigError

_RANGE = re.compile(r"^(\d+)-(\d+)$")
_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


def split_spec(spec: str | Sequence[str]) -> list[str]:
    """``"a, b"`` or ``["a", "b,c"]`` -> ``["a", "b", "c"]`` (stripped).

    An empty name beside others (``"a,,b"``, ``"a,"``) is a typo, not a wish: ConfigError. A spec with no
    names at all gives ``[]``, which each caller words for itself.
    """
    parts = [spec] if isinstance(spec, str) else list(spec)
    items = [item.strip() for part in parts for item in str(part).split(",")]
    if any(items) and not all(items):
        raise ConfigError(f"layer spec {spec!r} has an empty name (two commas in a row, or one at an end); "
                          "remove the extra comma")
    return [item for item in items if item]


def expand_ranges(item: str) -> list[str] | None:
    """``blocks.2-4.attn`` -> ``[blocks.2.attn, blocks.3.attn, blocks.4.attn]``; None if a range is reversed."""
    expanded = [""]
    for segment in item.split("."):
        match = _RANGE.match(segment)
        if match:
            lo, hi = int(match.group(1)), int(match.group(2))
            if lo > hi:
                return None
            options = [str(i) for i in range(lo, hi + 1)]
        else:
            options = [segment]
        expanded = [f"{prefix}.{option}" if prefix else option for prefix in expanded for option in options]
    return expanded


def is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


@lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> re.Pattern:
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append(r"[^.]*")
        elif c == "?":
            out.append(r"[^.]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:end]
                body = "^" + body[1:] if body.startswith("!") else body
                out.append(f"[{body}]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def match(pattern: str, names: Sequence[str]) -> list[str]:
    """Names equal to ``pattern`` or matched by it as a glob, in the order of ``names``."""
    if not is_glob(pattern):
        return [pattern] if pattern in names else []
    regex = _glob_regex(pattern)
    return [name for name in names if regex.match(name)]


def abbreviate(names: Sequence[str]) -> list[str]:
    """Collapse block indices: ``blocks.0.attn .. blocks.3.attn`` -> ``blocks.{0-3}.attn`` (first-seen order)."""
    groups: dict[str, list[int]] = {}
    for name in names:
        found = _INDEX.search(name)
        key = _INDEX.sub("{i}", name, count=1) if found else name
        groups.setdefault(key, []).append(int(found.group()) if found else -1)
    out = []
    for key, indices in groups.items():
        if "{i}" not in key:
            out.append(key)
        else:
            lo, hi = min(indices), max(indices)
            out.append(key.replace("{i}", f"{{{lo}-{hi}}}" if hi > lo else str(lo)))
    return out
