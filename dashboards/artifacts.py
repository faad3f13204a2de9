"""Finding a run's artifacts by id or analysis name, and their metrics as small tables (report, app, CLI)."""

from __future__ import annotations

import io
import os
from typing import Any

import pandas as pd

from neuronmap.analysis.artifacts import (RESULT_NAME, Artifact, analyses_dir, list_artifacts, load_artifact,
                                          unreadable_artifacts)
from neuronmap.errors import ConfigError, RunFormatError


def created(artifact: Artifact) -> str:
    return str(artifact.result.get("created") or "")


def select_artifact(run_path: str | os.PathLike, key: str) -> tuple[Artifact, str | None]:
    """The artifact whose id is `key`, else the newest artifact of analysis `key`.

    Returns (artifact, note); the note says which one was picked when several match. ConfigError
    lists the run's artifacts when nothing matches.
    """
    if key and "/" not in key and not key.startswith(".") and (analyses_dir(run_path) / key / RESULT_NAME).is_file():
        return load_artifact(analyses_dir(run_path) / key), None  # a damaged one: RunFormatError saying so
    every = list_artifacts(run_path)
    named = sorted((a for a in every if a.analysis == key), key=created)
    damaged = [(path, reason) for path, reason in unreadable_artifacts(run_path) if path.name.rpartition("-")[0] == key]
    if not named and damaged:
        raise RunFormatError(damaged[-1][1])
    if not named:
        shown = ", ".join(f"{a.id}" for a in every) or "(none: run `neuronmap analyze RUN ANALYSIS` first)"
        raise ConfigError(f"run {run_path} has no artifact {key!r} (an artifact id or an analysis name); "
                          f"its artifacts: {shown}")
    notes = []
    if len(named) > 1:
        notes.append(f"{len(named)} {key} artifacts: drew the newest, {named[-1].id}; pass an id to choose "
                     f"({', '.join(a.id for a in named[:-1])})")
    if damaged:
        notes.append(f"skipped {len(damaged)} unreadable {key} artifact{'s' if len(damaged) > 1 else ''} "
                     f"({', '.join(path.name for path, _ in damaged)}): recompute with `neuronmap analyze ... --force`")
    return named[-1], "; ".join(notes) or None


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


def coordinates(artifact: Artifact) -> int:
    """Coordinates per row a `pca` (projection table, ``pc1..``) or `tsne` (embedding, ``tsne1..``) artifact
    stores; 0 for other analyses or when the table is absent. Read from the parquet schema only, so the
    Artifact page can offer a 3-D view only where there is a third coordinate to draw."""
    table, prefix = {"pca": ("projection", "pc"), "tsne": ("embedding", "tsne")}.get(artifact.analysis, (None, None))
    path = artifact.path / f"{table}.parquet"
    if table is None or not path.is_file():
        return 0
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    return sum(1 for name in names if name.startswith(prefix) and name[len(prefix):].isdigit())


def damaged_artifacts(run_path: str | os.PathLike, run_id: str) -> list[tuple[str, str]]:
    """(artifact id, reason) of every artifact folder of the run whose result.json cannot be read.

    `list_artifacts` leaves these out; pages list them with the reason instead, so a damaged result does
    not just vanish. The run's folder is written as its id (`run_id`) in the reasons.
    """
    folder = str(run_path)
    return [(path.name, reason.replace(folder, run_id)) for path, reason in unreadable_artifacts(run_path)]


def damaged_in(repository: Any, run_id: str) -> list[tuple[str, str]]:
    """`damaged_artifacts` of a run of `repository` (a `dashboards.data.Repository`), cached until its
    analyses folder changes."""
    path = repository.run_path(run_id)
    folder = path / "analyses"
    try:
        stamp = folder.stat().st_mtime_ns
    except OSError:
        return []
    return repository.derived(("damaged-artifacts", str(path), stamp), lambda: damaged_artifacts(path, run_id))
