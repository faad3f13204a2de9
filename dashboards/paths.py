"""Ids from requests -> paths under the runs directory, refusing anything that could leave it.

A run id is the run folder's path relative to the runs directory, with ``/`` separators
(``demo/minilm-questions``). An artifact id is one folder name of ``RUN/analyses/``. Absolute paths,
``..`` or ``.`` segments, backslashes, NUL bytes, hidden names and symlinks that resolve outside the
runs directory are refused with `RefusedPath` (never silently "fixed").
"""

from __future__ import annotations

import re
from pathlib import Path

from neuronmap.errors import ConfigError

ARTIFACT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
SEGMENT = re.compile(r"^[^/\\\x00]{1,255}$")


class RefusedPath(ConfigError):
    """A run or artifact id that does not name something inside the runs directory."""


def inside(root: Path, path: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def run_path(runs_dir: str | Path, run_id: str) -> Path:
    """The folder of `run_id` under `runs_dir` (it must exist and hold a manifest.json)."""
    if not isinstance(run_id, str) or not run_id:
        raise RefusedPath("refused: no run id given; pick a run from the Runs page")
    if run_id.startswith(("/", "~")) or re.match(r"^[A-Za-z]:", run_id) or "\\" in run_id or "\x00" in run_id:
        raise RefusedPath(f"refused: run id {run_id!r} is not a path relative to the runs directory")
    parts = run_id.split("/")
    if any(part in ("", ".", "..") or part.startswith(".") or not SEGMENT.match(part) for part in parts):
        raise RefusedPath(f"refused: run id {run_id!r} has an empty, hidden, '.' or '..' segment")
    root = Path(runs_dir).resolve()
    path = (root / Path(*parts)).resolve()
    if not inside(root, path) or path == root:
        raise RefusedPath(f"refused: run id {run_id!r} points outside the runs directory")
    if not (path / "manifest.json").is_file():
        raise RefusedPath(f"run {run_id!r} does not exist (no manifest.json): it may have been deleted")
    return path


def artifact_path(runs_dir: str | Path, run_id: str, artifact_id: str) -> Path:
    """The folder of artifact `artifact_id` of run `run_id` (it must exist)."""
    run = run_path(runs_dir, run_id)
    if not isinstance(artifact_id, str) or not ARTIFACT_ID.match(artifact_id) or ".." in artifact_id:
        raise RefusedPath(f"refused: artifact id {artifact_id!r} is not an artifact name such as pca-1a2b3c4d5e6f")
    root = (run / "analyses").resolve()
    path = (root / artifact_id).resolve()
    if not inside(root, path) or not inside(Path(runs_dir).resolve(), path):
        raise RefusedPath(f"refused: artifact id {artifact_id!r} points outside run {run_id!r}")
    if not (path / "result.json").is_file():
        raise RefusedPath(f"artifact {artifact_id!r} of run {run_id!r} does not exist")
    return path


def run_id_of(runs_dir: str | Path, path: str | Path) -> str:
    """The id of the run folder `path` (must be inside `runs_dir`)."""
    return Path(path).resolve().relative_to(Path(runs_dir).resolve()).as_posix()
