"""Cached read access to the runs of a folder: the only module of the app that touches the disk.

Every lookup goes through `paths` (ids refused unless they name something inside the runs folder).
Results are cached under a key that includes the file's modification time, so a run that gains shards
or analyses is re-read, and a 100,000-sample run is read once, not on every page view: layer pages
work on a seeded sample of at most `SAMPLE_ROWS` rows in blocks (`layer_sample`), or on the run's artifacts.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from neuronmap.analysis.artifacts import Artifact, list_artifacts, load_artifact
from neuronmap.errors import NeuronMapError, RunFormatError
from neuronmap.store import Run, load_manifest, open_run

from . import paths

SAMPLE_ROWS = 20_000
SAMPLE_BLOCKS = 16
MAX_DEPTH = 3
SCAN_TTL_S = 2.0


class LRU:
    """A small thread-safe LRU cache: ``get(key, compute)``."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = compute()
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return -1


@dataclass
class RunEntry:
    """One row of the Runs page (a run folder, or a folder whose manifest could not be read)."""

    id: str
    path: Path
    status: str
    model: str = ""
    layers: list[str] = field(default_factory=list)
    n_samples: int | None = None
    format: str = ""
    pooling: str = ""
    created: str = ""
    updated: str = ""
    error: str | None = None
    progress: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class LayerSample:
    """A seeded sample of a layer's rows: `x` (n, n_features) float32 and where each row came from."""

    x: np.ndarray
    rows: np.ndarray
    sample_ids: np.ndarray
    n_rows: int


class Repository:
    """The runs under `runs_dir`, with cached manifests, prompts, artifacts and layer samples."""

    def __init__(self, runs_dir: str | os.PathLike, max_depth: int = MAX_DEPTH):
        self.runs_dir = Path(runs_dir).resolve()
        self.max_depth = max_depth
        self._scan: tuple[float, list[RunEntry]] | None = None
        self._lock = threading.Lock()
        self._runs = LRU(64)
        self._prompts = LRU(8)
        self._artifacts = LRU(64)
        self._samples = LRU(6)
        self._derived = LRU(32)

    # -- runs ---------------------------------------------------------------------------------------
    def _run_dirs(self) -> list[Path]:
        found: list[Path] = []

        def walk(folder: Path, depth: int) -> None:
            try:
                children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                return
            for child in children:
                if not paths.inside(self.runs_dir, child.resolve()):  # a symlink leaving the folder is skipped
                    continue
                if (child / "manifest.json").is_file():
                    found.append(child)
                elif depth < self.max_depth:
                    walk(child, depth + 1)

        walk(self.runs_dir, 1)
        return found

    def _entry(self, folder: Path) -> RunEntry:
        run_id = folder.relative_to(self.runs_dir).as_posix()
        try:
            manifest = load_manifest(folder)
        except NeuronMapError as error:
            return RunEntry(run_id, folder, "corrupt", error=str(error))
        progress = None
        if manifest.status == "running":
            expected = sum(manifest.expected_rows(name) or 0 for name in manifest.layers)
            done = sum(shard.rows[1] - shard.rows[0] for shard in manifest.shards)
            progress = done / expected if expected else None
        return RunEntry(run_id, folder, manifest.status, manifest.model, list(manifest.layers), manifest.n_samples,
                        manifest.format, manifest.pooling, manifest.created or "", manifest.updated or "",
                        manifest.error if manifest.status == "failed" else None, progress)

    def runs(self, fresh: bool = False) -> list[RunEntry]:
        """Every run folder (holding a manifest.json) up to `max_depth` levels down, re-scanned every 2 s."""
        with self._lock:
            if not fresh and self._scan and time.monotonic() - self._scan[0] < SCAN_TTL_S:
                return self._scan[1]
        if not self.runs_dir.is_dir():
            entries: list[RunEntry] = []
        else:
            entries = [self._entry(folder) for folder in self._run_dirs()]
        with self._lock:
            self._scan = (time.monotonic(), entries)
        return entries

    def run_path(self, run_id: str) -> Path:
        return paths.run_path(self.runs_dir, run_id)

    def run(self, run_id: str) -> Run:
        """The run `run_id` (RefusedPath for ids outside the folder, RunFormatError for a corrupt manifest)."""
        path = self.run_path(run_id)
        key = (str(path), _mtime(path / "manifest.json"))
        return self._runs.get(key, lambda: open_run(path))

    def prompts(self, run_id: str) -> pd.DataFrame:
        run = self.run(run_id)
        key = (str(run.path), _mtime(run.path / "prompts.parquet"))
        return self._prompts.get(key, lambda: run.prompts)

    def label_columns(self, run_id: str) -> list[str]:
        return [c for c in self.prompts(run_id).columns if c not in ("sample_id", "text")]

    # -- artifacts -------------------------------------------------------------------------------------
    def artifacts(self, run_id: str) -> list[Artifact]:
        """Every artifact of a run, newest first."""
        path = self.run_path(run_id)
        folder = path / "analyses"
        key = (str(path), _mtime(folder))
        return self._artifacts.get(key, lambda: sorted(list_artifacts(path), key=lambda a: str(a.result.get("created")),
                                                       reverse=True))

    def artifact(self, run_id: str, artifact_id: str) -> Artifact:
        path = paths.artifact_path(self.runs_dir, run_id, artifact_id)
        key = (str(path), _mtime(path / "result.json"))
        return self._artifacts.get(key, lambda: load_artifact(path))

    def all_artifacts(self) -> list[tuple[RunEntry, Artifact]]:
        out = []
        for entry in self.runs():
            if entry.ok:
                try:
                    out.extend((entry, artifact) for artifact in self.artifacts(entry.id))
                except NeuronMapError:
                    continue
        return sorted(out, key=lambda pair: str(pair[1].result.get("created")), reverse=True)

    def newest(self, run_id: str, analysis: str, layer: str | None = None) -> Artifact | None:
        """The newest artifact of `analysis` on this run (covering `layer` when given)."""
        for artifact in self.artifacts(run_id):
            if artifact.analysis == analysis and (layer is None or layer in artifact.result["units"]):
                return artifact
        return None

    # -- layers ------------------------------------------------------------------------------------------
    def layer_sample(self, run_id: str, layer: str, max_rows: int = SAMPLE_ROWS, seed: int = 0) -> LayerSample:
        """A seeded sample of at most `max_rows` committed rows of `layer` (all of them when fewer).

        Above `max_rows` the sample is `SAMPLE_BLOCKS` randomly placed (seeded) blocks of consecutive rows, so
        only those rows are read: a 100,000-row layer is not scanned to draw 20,000 points.
        """
        from neuronmap.analysis.inputs import LayerInput, merge_ranges

        run = self.run(run_id)
        if layer not in run.layers:
            raise RunFormatError(f"layer {layer!r} is not in run {run_id}; it holds: {', '.join(run.layers)}")
        key = (str(run.path), _mtime(run.path / "manifest.json"), layer, max_rows, seed)

        def compute() -> LayerSample:
            ranges = merge_ranges([tuple(shard.rows) for shard in run.shards(layer)])
            data = LayerInput(run.path, run.manifest, layer, ranges, None, 8192)
            n = data.n_rows
            if n == 0:
                raise RunFormatError(f"layer {layer} of run {run_id} has no committed rows yet")
            if n <= max_rows:
                return LayerSample(data.array().astype(np.float32, copy=False), data.layer_rows(), data.sample_ids(), n)
            size = max(64, -(-max_rows // SAMPLE_BLOCKS))
            blocks = -(-n // size)
            chosen = np.sort(np.random.default_rng(seed).choice(blocks, min(blocks, -(-max_rows // size)), replace=False))
            positions = np.concatenate([np.arange(b * size, min(n, (b + 1) * size)) for b in chosen])
            rows = data.layer_rows(positions[:max_rows])
            breaks = np.flatnonzero(np.diff(rows) != 1) + 1
            parts, ids = [], []
            for group in np.split(rows, breaks):
                span = (int(group[0]), int(group[-1]) + 1)
                parts.append(run.array(layer, rows=span).reshape(len(group), -1))
                ids.append(run.sample_ids(layer, rows=span))
            x = np.concatenate(parts).astype(np.float32, copy=False)
            return LayerSample(x, rows, np.concatenate(ids), n)

        return self._samples.get(key, compute)

    def derived(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """Cache a value computed from a run (the key must hold what it depends on)."""
        return self._derived.get(key, compute)

    def row(self, run_id: str, layer: str, row: int) -> tuple[np.ndarray, int]:
        """One row of a layer (flattened) and its sample id."""
        run = self.run(run_id)
        total = run.n_rows(layer)
        if not 0 <= int(row) < total:
            raise RunFormatError(f"row {row} is outside layer {layer} (0..{total - 1})")
        values = run.array(layer, rows=(int(row), int(row) + 1)).reshape(-1)
        sample = int(run.sample_ids(layer, rows=(int(row), int(row) + 1))[0])
        return values, sample

    def invalidate(self) -> None:
        """Forget the scan (after a job wrote an artifact); mtime keys handle the rest."""
        with self._lock:
            self._scan = None
