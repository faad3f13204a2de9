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
SAMPLE_BLOCK_ROWS = 256
MAX_DEPTH = 3
SCAN_TTL_S = 2.0


class LRU:
    """A small thread-safe LRU cache: ``get(key, compute)``.

    Concurrent `get`s of the same missing key compute it once (the others wait for it), so a page
    visit that arrives while the prefetch thread computes the same layer does not do the work twice.
    """

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._pending: dict[Any, threading.Lock] = {}

    def get(self, key: Any, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            flight = self._pending.setdefault(key, threading.Lock())
        with flight:
            with self._lock:
                if key in self._items:
                    return self._items[key]
            try:
                value = compute()
                with self._lock:
                    self._items[key] = value
                    self._items.move_to_end(key)
                    while len(self._items) > self.size:
                        self._items.popitem(last=False)
            finally:
                with self._lock:
                    if self._pending.get(key) is flight:
                        del self._pending[key]
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
    interrupted: bool = False
    """A `running` run that has committed nothing for long: its extraction was killed (`runstate`)."""
    interruption: str | None = None
    """For an interrupted run: the sentence the pages show (how far it got, and that re-running resumes it)."""
    resume_command: str | None = None
    """For an interrupted run: the `neuronmap extract` command that resumes it."""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def state(self) -> str:
        """What the pages show: the manifest's status, or `interrupted` for a run nobody extracts any more."""
        return "interrupted" if self.interrupted else self.status


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
        self._samples = LRU(4)
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
        from . import runstate

        progress = runstate.progress(manifest) if manifest.status == "running" else None
        entry = RunEntry(run_id, folder, manifest.status, manifest.model, list(manifest.layers), manifest.n_samples,
                         manifest.format, manifest.pooling, manifest.created or "", manifest.updated or "",
                         manifest.error if manifest.status == "failed" else None, progress)
        if runstate.is_interrupted(folder, manifest):
            entry.interrupted = True
            entry.interruption = runstate.interrupted_message(folder, manifest, progress)
            entry.resume_command = runstate.resume_command(folder, manifest)
        return entry

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

    def newest(self, run_id: str, analysis: str, layer: str | None = None, current: bool = False,
               where: Callable[[Artifact], bool] | None = None) -> Artifact | None:
        """The newest artifact of `analysis` on this run (covering `layer` when given).

        With `current`, only artifacts computed on the run's present shards (`Repository.current`):
        pages that show an artifact's numbers as exact must not pick one made before the run gained
        rows. `where` narrows further (e.g. a cka artifact of the same run, not a cross-run one).
        """
        for artifact in self.artifacts(run_id):
            if artifact.analysis == analysis and (layer is None or layer in artifact.result["units"]) \
                    and (where is None or where(artifact)) and (not current or self.current(run_id, artifact)):
                return artifact
        return None

    def current(self, run_id: str, artifact: Artifact) -> bool | None:
        """Whether `artifact` covers the run's present shards (`neuronmap.analysis.runner.is_current`).

        None when that cannot be told (not a registered analysis of the run's shards). Cached per
        manifest version, so a run that gains shards is checked again.
        """
        from neuronmap.analysis.runner import is_current

        run = self.run(run_id)
        key = ("current", str(run.path), _mtime(run.path / "manifest.json"), artifact.id,
               _mtime(artifact.path / "result.json"))
        return self._derived.get(key, lambda: is_current(run, artifact))

    # -- layers ------------------------------------------------------------------------------------------
    def layer_sample(self, run_id: str, layer: str, max_rows: int = SAMPLE_ROWS, seed: int = 0) -> LayerSample:
        """A seeded sample of at most `max_rows` committed rows of `layer` (all of them when fewer).

        Above `max_rows` the sample is seeded blocks of at most `SAMPLE_BLOCK_ROWS` consecutive rows spread
        over the layer (`sample_positions`), so only those rows are read (a 100,000-row layer is not
        scanned to draw 20,000 points), with one open and one vectorised read per shard (`read_rows`).
        """
        run = self.run(run_id)
        if layer not in run.layers:
            raise RunFormatError(f"layer {layer!r} is not in run {run_id}; it holds: {', '.join(run.layers)}")
        key = (str(run.path), _mtime(run.path / "manifest.json"), layer, max_rows, seed)

        def compute() -> LayerSample:
            shards = [s for s in run.shards(layer) if s.n_rows > 0]
            n = sum(s.n_rows for s in shards)
            if n == 0:
                raise RunFormatError(f"layer {layer} of run {run_id} has no committed rows yet")
            positions = sample_positions(n, max_rows, seed)
            x, rows, ids = read_rows(run, layer, shards, positions)
            return LayerSample(x.reshape(len(x), -1).astype(np.float32, copy=False), rows, ids, n)

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


def sample_positions(n: int, max_rows: int, seed: int = 0) -> np.ndarray:
    """Sorted positions (0..n-1) of a seeded sample of `max_rows` of `n` rows, in blocks of consecutive rows.

    Blocks of ``clip(max_rows / 16, 64, SAMPLE_BLOCK_ROWS)`` rows: short enough to spread the sample over
    the whole layer (prompts are often grouped by topic), long enough to read in slices.
    """
    if n <= max_rows:
        return np.arange(n, dtype=np.int64)
    size = int(np.clip(-(-max_rows // 16), 64, SAMPLE_BLOCK_ROWS))
    blocks = -(-n // size)
    order = np.random.default_rng(seed).permutation(blocks)
    lengths = np.minimum(size, n - order * size)  # the last block of the layer may be short
    taken = int(np.searchsorted(np.cumsum(lengths), max_rows)) + 1
    lengths[taken - 1] -= int(lengths[:taken].sum()) - max_rows  # the last block drawn is cut to fit
    parts = sorted((int(b) * size, int(b) * size + int(length)) for b, length in zip(order[:taken], lengths[:taken]))
    return np.concatenate([np.arange(lo, hi, dtype=np.int64) for lo, hi in parts])


def read_token_index(run: Run, layer: str, rows: np.ndarray) -> np.ndarray:
    """`token_index` (a token's position in its prompt) of the given rows of a per-token layer, in their order.

    Each shard holding some of the rows is opened once and its `token_index` read over the rows' span
    (4 bytes a row): projections draw scattered rows, and one read per row would open a file per point.
    """
    from neuronmap.store.shards import ShardReader

    rows = np.asarray(rows, dtype=np.int64)
    out = np.full(len(rows), -1, dtype=np.int64)
    info = run.layer_info(layer)
    for shard in run.shards(layer):
        lo, hi = shard.rows
        inside = np.flatnonzero((rows >= lo) & (rows < hi))
        if len(inside) == 0:
            continue
        local = rows[inside] - lo
        first, last = int(local.min()), int(local.max()) + 1
        with ShardReader(run.path / shard.path, run.format, tuple(info.shape), info.dtype) as reader:
            out[inside] = reader.read("token_index", first, last)[local - first]
    if (out < 0).any():
        raise RunFormatError(f"rows {rows[out < 0][:3].tolist()} of layer {layer} are in no committed shard")
    return out


def read_rows(run: Run, layer: str, shards: list, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activations, layer rows and sample ids at sorted `positions` of the rows the `shards` hold.

    Positions count the committed rows of `shards` (in row order) without gaps; each shard is opened
    once: HDF5 reads each run of consecutive rows as one slice, Parquet decodes the covering row
    groups once and takes the rows.
    """
    from neuronmap.store.shards import ShardReader

    info = run.layer_info(layer)
    counts = np.array([s.n_rows for s in shards], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    which = np.searchsorted(starts, positions, side="right") - 1
    xs, rows, ids = [], [], []
    for index in np.unique(which):
        shard = shards[int(index)]
        local = positions[which == index] - starts[index]
        rows.append(shard.rows[0] + local)
        with ShardReader(run.path / shard.path, run.format, tuple(info.shape), info.dtype) as reader:
            if reader.n_rows != shard.n_rows:
                raise RunFormatError(f"shard {shard.path} has {reader.n_rows} rows, the manifest says "
                                     f"{shard.n_rows}; run `neuronmap runs verify`")
            if run.format == "hdf5":
                spans = np.split(local, np.flatnonzero(np.diff(local) != 1) + 1)
                xs.extend(reader.read("activations", int(g[0]), int(g[-1]) + 1) for g in spans)
                ids.extend(reader.read("sample_id", int(g[0]), int(g[-1]) + 1) for g in spans)
            else:
                lo, hi = int(local[0]), int(local[-1]) + 1
                xs.append(reader.read("activations", lo, hi)[local - lo])
                ids.append(reader.read("sample_id", lo, hi)[local - lo])
    return np.concatenate(xs), np.concatenate(rows).astype(np.int64), np.concatenate(ids).astype(np.int64)
