"""Per-run disk cache of what the dashboard derives from a layer's sample (statistics, PCA, CKA).

Why: reading and reducing a 20,000-row sample of a 100,000-sample run takes a second or more; the
results are small (about 1 MB per layer), so they are kept under ``<run>/.cache/dashboard/`` and a
restarted dashboard answers at once. The folder is hidden, so the run scanner, `verify_run` and the
analyses listing never see it.

Keys cover everything the value depends on: a cache format version, what is cached and its parameters,
the manifest's status and ``updated`` time and the ``(layer, rows, sha256)`` of every shard read. A run
that gains, loses or rewrites a shard therefore misses the cache; the stale file of the same entry is
removed when the new one is written. Files are written to a temporary name and renamed, so a reader
never sees half a file. A run folder that cannot be written (read-only mount) only loses the disk cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np

from neuronmap.store import Run

CACHE_DIR = Path(".cache") / "dashboard"
VERSION = 1
log = logging.getLogger(__name__)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def run_digest(run: Run, layers: Iterable[str]) -> str:
    """A digest of the state of `layers` in `run`: manifest status and updated time, and their shards."""
    layers = list(layers)
    shards = [(s.layer, list(s.rows), s.sha256) for layer in layers for s in run.shards(layer)]
    state = [VERSION, run.manifest.status, run.manifest.updated, layers, shards]
    return _sha(json.dumps(state, sort_keys=True, default=str))


def _names(entry: str, key: object) -> tuple[str, str]:
    """(file name prefix of the entry, full file name of this key)."""
    prefix = f"{entry.split('/')[0]}-{_sha(entry)[:12]}-"
    return prefix, f"{prefix}{_sha(json.dumps(key, sort_keys=True, default=str))[:24]}.npz"


def load(run_path: Path, entry: str, key: object) -> dict[str, np.ndarray] | None:
    """The arrays stored for `entry` under `key`, or None (missing, stale or unreadable)."""
    _, name = _names(entry, key)
    path = Path(run_path) / CACHE_DIR / name
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        log.debug("ignoring unreadable cache file %s: %s", path, error)
        return None


def save(run_path: Path, entry: str, key: object, arrays: dict[str, np.ndarray]) -> Path | None:
    """Store `arrays` for `entry` under `key` atomically and drop older versions of the entry."""
    prefix, name = _names(entry, key)
    folder = Path(run_path) / CACHE_DIR
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{name}-", dir=folder)
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, folder / name)
        tmp = None
        for old in folder.glob(f"{prefix}*.npz"):
            if old.name != name:
                old.unlink(missing_ok=True)
        return folder / name
    except OSError as error:  # read-only or full disk: the in-memory cache still works
        log.debug("dashboard cache not written under %s: %s", folder, error)
        return None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def clear(run_path: Path) -> None:
    """Remove the run's dashboard cache (benchmarks start cold with it)."""
    folder = Path(run_path) / CACHE_DIR
    for path in folder.glob("*"):
        path.unlink(missing_ok=True)


def cached(run_path: Path, entry: str, key: object, compute) -> dict[str, np.ndarray]:
    """`load` or else `compute()` and `save` (compute returns a dict of arrays)."""
    found = load(run_path, entry, key)
    if found is not None:
        return found
    arrays = compute()
    save(run_path, entry, key, arrays)
    return arrays
