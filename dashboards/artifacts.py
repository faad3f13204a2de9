"""Finding a run's artifacts by id or analysis name, and their metrics as small tables (report, app, CLI)."""

from __future__ import annotations

import io
import os
from typing import Any

import pandas as pd

from neuronmap.analysis.artifacts import Artifact, find_artifact, list_artifacts
from neuronmap.errors import ConfigError


def created(artifact: Artifact) -> str:
    return str(artifact.result.get("created") or "")


def select_artifact(run_path: str | os.PathLike, key: str) -> tuple[Artifact, str | None]:
    """The artifact whose id is `key`, else the newest artifact of analysis `key`.

    Returns (artifact, note); the note says which one was picked when several match. ConfigError
    lists the run's artifacts when nothing matches.
    """
    found = find_artifact(run_path, key) if key and "/" not in key and not key.startswith(".") else None
    if found is not None:
        return found, None
    every = list_artifacts(run_path)
    named = sorted((a for a in every if a.analysis == key), key=created)
    if not named:
        shown = ", ".join(f"{a.id}" for a in every) or "(none: run `neuronmap analyze RUN ANALYSIS` first)"
        raise ConfigError(f"run {run_path} has no artifact {key!r} (an artifact id or an analysis name); "
                          f"its artifacts: {shown}")
    note = None
    if len(named) > 1:
        note = (f"{len(named)} {key} artifacts: drew the newest, {named[-1].id}; pass an id to choose "
                f"({', '.join(a.id for a in named[:-1])})")
    return named[-1], note


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics that fit a table cell: numbers, strings, booleans, short lists (dicts and long lists left out)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float, str, bool)) or value is None:
            out[key] = value
        elif isinstance(value, list) and len(value) <= 8 and all(isinstance(v, (int, float, str)) for v in value):
            out[key] = ", ".join(str(v) for v in value)
    return out


def metrics_frame(artifact: Artifact) -> pd.DataFrame:
    """One row per unit (layer, pair or run), one column per scalar metric."""
    rows = []
    for unit, doc in artifact.result["units"].items():
        rows.append({"unit": unit, "rows": doc.get("rows"), **scalar_metrics(doc.get("metrics", {}))})
    return pd.DataFrame(rows)


def headline(artifact: Artifact, limit: int = 4) -> dict[str, Any]:
    """A few numbers for a card: the registered headline metrics of the first unit (else its first scalars)."""
    try:
        from neuronmap.analysis.registry import get_analysis

        keys = list(get_analysis(artifact.analysis).headline)
    except ConfigError:  # an analysis whose plugin is not installed any more
        keys = []
    first = artifact.result["units"][next(iter(artifact.result["units"]))]["metrics"] if artifact.units else {}
    values = scalar_metrics(first)
    keys = [k for k in keys if k in values] or [k for k, v in values.items() if not isinstance(v, str)]
    return {key: values[key] for key in keys[:limit]}


def tables_csv(artifact: Artifact) -> str:
    """Every table of the artifact as CSV (a `table` column in front), or the metrics when it has none."""
    frames = []
    for name in artifact.tables:
        frame = artifact.table(name)
        frame.insert(0, "table", name)
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True) if frames else metrics_frame(artifact)
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    return buffer.getvalue()
