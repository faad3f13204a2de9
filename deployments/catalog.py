"""The runs directory as the HTTP API sees it: runs, layer statistics, analysis artifacts.

Ids from the URL never reach the filesystem unchecked: a run or artifact id is one path segment of
letters, digits, ``.``, ``_``, ``-`` that does not start with a dot (so no ``..``, no ``/``, no
absolute path; malformed ids are a 400), and the resolved folder (symlinks followed) must lie inside
the runs directory (inside the run's ``analyses/`` for an artifact), or it is a 404 as if it did not
exist. Shard paths of a manifest are checked the same way before a layer is read.
"""

from __future__ import annotations

import re
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from neuronmap.errors import NeuronMapError
from neuronmap.store import Run, open_run
from neuronmap.store.manifest import MANIFEST_NAME

from .schemas import ApiError

ID_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")
FIGURE_NAME = "figure.json"
NEURON_STATS = ("mean", "std", "min", "max", "sparsity")


def check_id(value: str, what: str) -> str:
    """`value` when it is a plain name (see module docstring); ApiError 400 otherwise."""
    if not ID_PATTERN.fullmatch(value or "") or ".." in value:
        raise ApiError(400, "bad_id", f"{what} id {value[:80]!r} is not a valid name: use letters, digits, '.', '_' "
                       "and '-', not starting with '.'")
    return value


def inside(path: Path, root: Path) -> Path | None:
    """`path` resolved (symlinks followed) when it lies strictly inside `root` (resolved), else None."""
    try:
        real = path.resolve()
    except (OSError, RuntimeError):
        return None
    return real if real != root and real.is_relative_to(root) else None


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


class RunsCatalog:
    """Read-only views of the runs under `runs_dir` (each sub-folder with a manifest.json is a run)."""

    def __init__(self, runs_dir: str | Path):
        self.runs_dir = Path(runs_dir)
        self._stats_cache: dict[tuple[str, str, str], dict] = {}
        self._lock = threading.Lock()

    @property
    def root(self) -> Path:
        return self.runs_dir.resolve()

    # -- resolution --------------------------------------------------------------------------------
    def run_path(self, run_id: str) -> Path:
        """The run folder of `run_id` (400 malformed, 404 missing or outside the runs directory)."""
        check_id(run_id, "run")
        real = inside(self.runs_dir / run_id, self.root)
        if real is None or not (real / MANIFEST_NAME).is_file():
            raise ApiError(404, "not_found", f"no run {run_id!r} in the runs directory; GET /v1/runs lists them")
        return real

    def open(self, run_id: str) -> Run:
        path = self.run_path(run_id)
        try:
            return open_run(path)
        except NeuronMapError as error:
            raise ApiError(409, "run_unreadable", f"run {run_id!r} cannot be read: {error}") from None

    def artifact_path(self, run_id: str, artifact_id: str) -> Path:
        run = self.run_path(run_id)
        check_id(artifact_id, "analysis")
        real = inside(run / "analyses" / artifact_id, run / "analyses")
        if real is None or not (real / "result.json").is_file():
            raise ApiError(404, "not_found", f"run {run_id!r} has no analysis {artifact_id!r}; "
                           f"GET /v1/runs/{run_id}/analyses lists them")
        return real

    # -- runs --------------------------------------------------------------------------------------
    def list_runs(self) -> list[dict]:
        if not self.runs_dir.is_dir():
            return []
        out = []
        for child in sorted(self.runs_dir.iterdir()):
            if not ID_PATTERN.fullmatch(child.name) or ".." in child.name:
                continue
            try:
                out.append(self.summary(self.open(child.name), child.name))
            except ApiError:
                continue  # not a run, outside the directory, or unreadable: not listed
        return out

    @staticmethod
    def summary(run: Run, run_id: str) -> dict:
        m = run.manifest
        return {"id": run_id, "status": m.status, "model": m.model, "n_samples": m.n_samples, "pooling": m.pooling,
                "format": m.format, "layers": run.layers, "created": m.created, "updated": m.updated}

    def describe(self, run_id: str) -> dict:
        run = self.open(run_id)
        m = run.manifest
        try:
            columns = [str(c) for c in run.prompts.columns]
        except NeuronMapError:
            columns = []
        return {**self.summary(run, run_id), "dtype": m.dtype, "tokenizer": m.tokenizer, "config_hash": m.config_hash,
                "n_tokens": m.n_tokens, "n_truncated": m.n_truncated, "error": m.error,
                "layer_info": {name: {"shape": list(info.shape), "dtype": info.dtype, "kind": info.kind,
                                      "per_token": info.per_token, "rows": run.n_rows(name)}
                               for name, info in m.layers.items()},
                "n_shards": len(m.shards), "bytes": int(sum(s.bytes or 0 for s in m.shards)),
                "prompt_columns": columns, "analyses": [a["id"] for a in self.list_analyses(run_id)]}

    @staticmethod
    def check_shards(run_id: str, run: Any, layer: str | None = None) -> None:
        """ApiError 409 when a shard of the run (of `layer`) resolves outside the run's folder (a symbolic
        link, say): the server reads only the folders it was given."""
        for shard in run.shards(layer) if layer is not None else run.manifest.shards:
            if inside(run.path / shard.path, run.path) is None:
                raise ApiError(409, "run_unreadable", f"run {run_id!r} lists a shard outside its folder "
                               f"({shard.path}); re-extract the run or copy the shard into it")

    def layer_stats(self, run_id: str, layer: str) -> dict:
        """Per-neuron mean/std/min/max/sparsity of a layer's committed rows, streamed (cached per manifest)."""
        from neuronmap.analysis.statistics import RunningStats

        run = self.open(run_id)
        if layer not in run.manifest.layers:
            shown = ", ".join(run.layers[:20]) + (" ..." if len(run.layers) > 20 else "")
            raise ApiError(404, "not_found", f"run {run_id!r} has no layer {layer[:80]!r}; its layers: {shown}")
        shards = run.shards(layer)
        self.check_shards(run_id, run, layer)
        key = (run_id, layer, ";".join(f"{s.path}:{s.sha256}" for s in shards))
        with self._lock:
            if key in self._stats_cache:
                return self._stats_cache[key]
        stats = RunningStats()
        rows = 0
        try:
            for start, end in _committed(shards):
                for batch in run.iter_batches(layer, rows=(start, end)):
                    stats.add(batch)
                    rows += len(batch)
        except NeuronMapError as error:
            raise ApiError(409, "run_unreadable",
                           f"layer {layer!r} of run {run_id!r} cannot be read: {error}") from None
        if rows == 0:
            raise ApiError(409, "no_rows", f"layer {layer!r} of run {run_id!r} has no committed rows yet")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = stats.summary()
        per_neuron = {name: [_finite(v) for v in summary[name]] for name in NEURON_STATS}
        overall = {"mean": _finite(np.mean(summary["mean"])), "std": _finite(np.sqrt(np.mean(stats.var()))),
                   "min": _finite(np.min(summary["min"])), "max": _finite(np.max(summary["max"])),
                   "sparsity": _finite(np.mean(summary["sparsity"])),
                   "zero_fraction": _finite(np.mean(summary["zero_fraction"]))}
        result = {"run": run_id, "layer": layer, "n_rows": rows, "n_features": int(stats.n_features or 0),
                  "summary": overall, "per_neuron": per_neuron,
                  "warnings": [" ".join(str(w.message).split()) for w in caught]}
        with self._lock:
            self._stats_cache[key] = result
        return result

    # -- analyses ----------------------------------------------------------------------------------
    def list_analyses(self, run_id: str) -> list[dict]:
        from neuronmap.analysis.artifacts import list_artifacts

        run = self.run_path(run_id)
        out = []
        for artifact in list_artifacts(run):
            if inside(artifact.path, run / "analyses") is None:
                continue
            result = artifact.result
            out.append({"id": artifact.id, "analysis": artifact.analysis, "family": result.get("family"),
                        "scope": result.get("scope"), "layers": list(result.get("layers", [])),
                        "units": artifact.units, "run_status": result.get("run", {}).get("status"),
                        "created": result.get("created")})
        return out

    def analysis(self, run_id: str, artifact_id: str, figure: bool = True) -> dict:
        from neuronmap.analysis.artifacts import load_artifact

        path = self.artifact_path(run_id, artifact_id)
        try:
            artifact = load_artifact(path)
        except NeuronMapError as error:
            raise ApiError(409, "artifact_unreadable", str(error)) from None
        try:
            arrays = sorted(artifact.arrays)
        except Exception:  # noqa: BLE001 - a damaged arrays.npz should not hide the result
            arrays = []
        return {"id": artifact.id, "run": run_id, "result": artifact.result, "arrays": arrays,
                "tables": artifact.tables, "figure": figure_json(artifact) if figure else None}


def _committed(shards: list) -> list[tuple[int, int]]:
    """Contiguous row ranges held by committed shards (a running run may have gaps)."""
    ranges: list[tuple[int, int]] = []
    for shard in sorted(shards, key=lambda s: s.rows[0]):
        start, end = shard.rows
        if ranges and start <= ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], end))
        elif end > start:
            ranges.append((start, end))
    return ranges


def figure_json(artifact: Any) -> dict | None:
    """Plotly figure JSON for an artifact: its stored figure.json, else a chart of its headline metric.

    Layer-pair analyses become a layer x layer heatmap, the others a bar per unit. None when the
    artifact has no scalar metric to draw.
    """
    import json

    stored = artifact.path / FIGURE_NAME
    if stored.is_file():
        try:
            return json.loads(stored.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
    result = artifact.result
    metric = _headline(result)
    if metric is None:
        return None
    title = {"text": f"{result.get('analysis')}: {metric}"}
    if result.get("scope") == "layer_pair":
        from neuronmap.analysis.artifacts import pair_matrix

        try:
            frame = pair_matrix(artifact, metric)
        except KeyError:
            return None
        z = [[_finite(v) for v in row] for row in frame.to_numpy()]
        return {"data": [{"type": "heatmap", "x": list(frame.columns), "y": list(frame.index), "z": z,
                          "colorbar": {"title": {"text": metric}}}],
                "layout": {"title": title, "yaxis": {"autorange": "reversed"}}}
    units = [u for u, doc in result["units"].items() if _is_number(doc["metrics"].get(metric))]
    values = [_finite(result["units"][u]["metrics"][metric]) for u in units]
    return {"data": [{"type": "bar", "x": units, "y": values, "name": metric}],
            "layout": {"title": title, "xaxis": {"title": {"text": "layer"}}, "yaxis": {"title": {"text": metric}}}}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _headline(result: dict) -> str | None:
    """The analysis' first registered headline metric that is a number, else the first numeric metric."""
    units = list(result.get("units", {}).values())
    if not units:
        return None
    candidates: list[str] = []
    try:
        from neuronmap.analysis.registry import get_analysis

        candidates = list(get_analysis(result["analysis"]).headline)
    except (NeuronMapError, KeyError):
        pass
    candidates += list(units[0].get("metrics", {}))
    candidates.sort(key=lambda name: name.startswith("n_"))  # counts (n_rows, n_used) draw last
    for name in candidates:
        if any(_is_number(unit.get("metrics", {}).get(name)) for unit in units):
            return name
    return None
