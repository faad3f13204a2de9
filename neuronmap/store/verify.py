"""verify_run: recheck a run on disk against its manifest.

Recomputes every shard's sha256 and checks that files exist with the recorded size, that each file
holds the rows, feature shape and dtype the manifest says, that each layer's shards cover its rows
exactly once, that prompts.parquet matches n_samples, and that the run is complete.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from ..errors import RunFormatError
from .manifest import (
    ACTIVATIONS_DIR, PROMPTS_NAME, TMP_MARKER, LayerInfo, Manifest, ShardRecord, coverage_problems, load_manifest,
)
from .shards import ShardReader, sha256_file


@dataclass
class VerifyReport:
    """Outcome of `verify_run`. `ok` is True only when `problems` is empty."""

    path: str
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    status: str | None = None
    n_shards: int = 0
    n_bytes: int = 0

    def to_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "problems": list(self.problems), "warnings": list(self.warnings),
                "status": self.status, "n_shards": self.n_shards, "n_bytes": self.n_bytes}


def verify_run(path: str | os.PathLike) -> VerifyReport:
    """Check the run at `path`; problems are returned in the report, never raised."""
    if not isinstance(path, (str, os.PathLike)):  # a Run
        path = path.path
    run = Path(path)
    report = VerifyReport(path=str(run))
    try:
        manifest = load_manifest(run)
    except RunFormatError as error:
        report.problems.append(str(error))
        report.ok = False
        return report
    report.status = manifest.status
    if manifest.status != "complete":
        detail = f" ({manifest.error})" if manifest.error else ""
        report.problems.append(f"run status is {manifest.status}{detail}, not complete")
    report.problems.extend(_prompt_problems(run, manifest))
    for shard in manifest.shards:
        report.n_shards += 1
        report.n_bytes += shard.bytes
        info = manifest.layers.get(shard.layer)
        report.problems.extend(_shard_problems(run, shard, info, manifest.format))
    report.problems.extend(coverage_problems(manifest))
    report.warnings.extend(_stray_files(run, manifest))
    report.ok = not report.problems
    return report


def _prompt_problems(run: Path, manifest: Manifest) -> list[str]:
    path = run / PROMPTS_NAME
    if not path.is_file():
        return [f"{PROMPTS_NAME} is missing"]
    try:
        file = pq.ParquetFile(path)
        names, rows = file.schema_arrow.names, file.metadata.num_rows
    except Exception as error:  # pyarrow raises several types for a corrupt file
        return [f"{PROMPTS_NAME} cannot be read: {' '.join(str(error).split())}"]
    problems = []
    if "sample_id" not in names:
        problems.append(f"{PROMPTS_NAME} has no sample_id column")
    if rows != manifest.n_samples:
        problems.append(f"{PROMPTS_NAME} has {rows} rows, the manifest says n_samples={manifest.n_samples}")
    return problems


def shard_problem(run: Path, shard: ShardRecord) -> str | None:
    """What is wrong with a shard's file (missing, resized, unreadable, sha256 not the manifest's), or None.

    Everything that copies data out of a run or builds on it (export, conversion, resume) asks this
    first, so a damaged shard is never passed on, or given a fresh checksum, as good data.
    """
    path = run / shard.path
    if not path.is_file():
        return f"shard {shard.path} is missing"
    size = path.stat().st_size
    if size != shard.bytes:
        return f"shard {shard.path} has {size} bytes, the manifest says {shard.bytes} (truncated or replaced)"
    try:
        digest = sha256_file(path)
    except OSError as error:
        return f"shard {shard.path} cannot be read: {error.strerror or error}"
    if digest != shard.sha256:
        return f"shard {shard.path} has sha256 {digest[:12]}..., the manifest says {shard.sha256[:12]}... (corrupt)"
    return None


def require_intact(run: Path, shards: list[ShardRecord]) -> None:
    """Raise RunFormatError naming the first damaged shard of `shards` (checked on a few threads)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for problem in pool.map(lambda shard: shard_problem(run, shard), shards):
            if problem is not None:
                raise RunFormatError(f"{problem} in run {run}: `neuronmap runs verify {run}` lists every damaged "
                                     "shard; restore them or re-extract the run")


def _shard_problems(run: Path, shard: ShardRecord, info: LayerInfo | None, format: str) -> list[str]:
    problem = shard_problem(run, shard)
    if problem is not None:
        return [problem]
    path = run / shard.path
    if info is None:
        return []
    try:
        with ShardReader(path, format, tuple(info.shape), info.dtype) as reader:
            problems = []
            if reader.n_rows != shard.n_rows:
                problems.append(f"shard {shard.path} holds {reader.n_rows} rows, the manifest says {shard.n_rows}")
            if info.per_token and not reader.has("token_index"):
                problems.append(f"shard {shard.path} of per-token layer {shard.layer} has no token_index")
            first = reader.read("activations", 0, min(1, reader.n_rows))
            if first.shape[1:] != tuple(info.shape) or first.dtype != info.dtype:
                problems.append(f"shard {shard.path} holds {first.dtype} rows of shape {first.shape[1:]}, the "
                                f"manifest says {info.dtype} {tuple(info.shape)}")
            return problems
    except (RunFormatError, ValueError) as error:
        return [str(error)]


def _stray_files(run: Path, manifest: Manifest) -> list[str]:
    listed = {shard.path for shard in manifest.shards}
    warnings = []
    root = run / ACTIVATIONS_DIR
    for folder, _dirs, files in os.walk(root):
        for name in files:
            rel = (Path(folder) / name).relative_to(run).as_posix()
            if rel not in listed:
                kind = "unfinished temp file" if TMP_MARKER in name else "file not listed in the manifest"
                warnings.append(f"{rel}: {kind} (ignored by readers)")
    return warnings
