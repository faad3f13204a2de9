"""The registry of preconfigured models (``registry.yaml``).

A registry name is a short, stable handle (``gpt2``, ``pythia-70m``) for a hub id plus what a user
wants to know before downloading: family, kind, size. ``local_package`` names an installed Python
package that ships the weights, so that model works offline.
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict

REGISTRY_PATH = Path(__file__).with_name("registry.yaml")


class ModelEntry(BaseModel):
    """One preconfigured model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    hub_id: str
    family: str  # config.model_type
    kind: Literal["decoder", "encoder", "encoder-decoder"]
    params: str  # e.g. "124M"
    notes: str = ""
    local_package: str | None = None


@lru_cache(maxsize=1)
def _entries() -> tuple[ModelEntry, ...]:
    data = yaml.safe_load(REGISTRY_PATH.read_text(encoding="utf-8"))
    return tuple(ModelEntry(**item) for item in data["models"])


def list_models() -> list[ModelEntry]:
    """Every registry entry, in registry order."""
    return list(_entries())


def get_entry(name: str) -> ModelEntry | None:
    """The entry whose name or hub id equals ``name`` (case-insensitive), else None."""
    key = name.strip().lower()
    for entry in _entries():
        if key in (entry.name.lower(), entry.hub_id.lower()):
            return entry
    return None


def suggest(name: str, limit: int = 3) -> list[str]:
    """Registry names close to ``name`` (typos, partial names, hub ids), best first."""
    key = name.strip().lower()
    if not key:
        return []
    scored = []
    for entry in _entries():
        keys = (entry.name.lower(), entry.hub_id.lower(), entry.hub_id.rpartition("/")[2].lower())
        score = max(difflib.SequenceMatcher(None, key, k).ratio() for k in keys)
        if len(key) >= 2 and entry.name.lower().startswith(key):
            score += 1.5
        elif len(key) >= 3 and key in entry.name.lower():
            score += 1.0
        elif len(key) >= 3 and key in entry.hub_id.lower():
            score += 0.5
        if score >= 0.6:
            scored.append((score, entry.name))
    scored.sort(key=lambda pair: -pair[0])
    return [n for _, n in scored[:limit]]
