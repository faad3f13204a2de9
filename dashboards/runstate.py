"""Whether a run whose manifest says `running` is still being extracted, and the command that resumes it.

A killed `neuronmap extract` leaves status `running` behind for good. Every process writing a run holds
a shared lock on its `.writing` file (`neuronmap.store.liveness`), which the kernel drops when the
process dies: the dashboard asks for that lock. Runs written before the lock existed, or on a
filesystem without flock, fall back to time: no shard committed for `STALL_AFTER_S` seconds, or for
`PACE_FACTOR` times the run's own mean time between commits when that is longer (a big model on a
CPU), means the extraction stopped.
"""

from __future__ import annotations

import shlex
import time
from datetime import datetime
from pathlib import Path

from neuronmap.store import Manifest
from neuronmap.store.liveness import writer_alive
from neuronmap.store.manifest import MANIFEST_NAME

STALL_AFTER_S = 600.0
PACE_FACTOR = 10.0


def progress(manifest: Manifest) -> float | None:
    """Fraction of every layer's rows committed (None when the run does not say how many it expects)."""
    expected = sum(manifest.expected_rows(name) or 0 for name in manifest.layers)
    done = sum(shard.rows[1] - shard.rows[0] for shard in manifest.shards)
    return done / expected if expected else None


def _epoch(stamp: str | None) -> float | None:
    try:
        return datetime.fromisoformat(str(stamp)).timestamp()
    except (TypeError, ValueError):
        return None


def last_activity(path: Path, manifest: Manifest) -> float | None:
    """When the run last committed something (epoch seconds): the later of the manifest's `updated` and its
    file's modification time (each alone can be off: another machine's clock, a copied folder)."""
    try:
        mtime: float | None = (Path(path) / MANIFEST_NAME).stat().st_mtime
    except OSError:
        mtime = None
    times = [t for t in (_epoch(manifest.updated), mtime) if t is not None]
    return max(times) if times else None


def stall_limit(manifest: Manifest) -> float:
    """Seconds without a commit after which the extraction counts as stopped (see the module docstring)."""
    try:  # one commit writes shard N of every layer
        commits = len({shard.index for shard in manifest.shards})
    except (ValueError, IndexError):  # a shard file not named part-NNNNN
        commits = -(-len(manifest.shards) // max(1, len(manifest.layers)))
    created, updated = _epoch(manifest.created), _epoch(manifest.updated)
    if commits and created is not None and updated is not None and updated > created:
        return max(STALL_AFTER_S, PACE_FACTOR * (updated - created) / commits)
    return STALL_AFTER_S


def idle_seconds(path: Path, manifest: Manifest, now: float | None = None) -> float | None:
    """Seconds since the run last committed a shard (None when that cannot be told)."""
    last = last_activity(path, manifest)
    return None if last is None else max(0.0, (time.time() if now is None else now) - last)


def is_interrupted(path: Path, manifest: Manifest, now: float | None = None) -> bool:
    """True for a `running` run that no process is writing (its writing lock is free), or, where the lock
    cannot tell, that committed nothing for longer than `stall_limit`: re-running the same command resumes it."""
    if manifest.status != "running":
        return False
    alive = writer_alive(path)
    if alive is not None:
        return not alive
    idle = idle_seconds(path, manifest, now)
    return idle is not None and idle > stall_limit(manifest)


def resume_command(path: Path, manifest: Manifest) -> str:
    """The `neuronmap extract` command that resumes the run (the options a resume must repeat, from the
    manifest). The prompt file is named as it was given, relative to where the first command ran."""
    extra = manifest.extra or {}
    args = ["neuronmap", "extract", "-m", manifest.model, "-p", manifest.prompt_source or "PROMPTS",
            "-o", str(path), "--layers", ",".join(manifest.layers), "--pooling", manifest.pooling or "mean",
            "--format", manifest.format, "--dtype", manifest.dtype]
    if manifest.max_length:
        args += ["--max-length", str(manifest.max_length)]
    if manifest.compression:
        args += ["--compression", manifest.compression]
    if extra.get("samples_per_shard"):
        args += ["--samples-per-shard", str(extra["samples_per_shard"])]
    if extra.get("batch_size"):
        args += ["--batch-size", str(extra["batch_size"])]
    return " ".join(shlex.quote(str(arg)) for arg in args)


def duration(seconds: float) -> str:
    """`42 s`, `17 min`, `3.5 h`, `2.0 days`: how long ago, for a sentence."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def interrupted_message(path: Path, manifest: Manifest, progress: float | None = None,
                        now: float | None = None) -> str:
    """One sentence for a page: the extraction stopped, how far it got, and that re-running resumes it."""
    idle = idle_seconds(path, manifest, now)
    done = f" after {progress:.0%} of its rows" if progress is not None else ""
    since = f" (nothing committed for {duration(idle)})" if idle is not None else ""
    return (f"This extraction was interrupted{done}{since}. Re-run the same `neuronmap extract` command to resume "
            "it; committed shards are kept")


def prompts_unreadable(run_id: str) -> str:
    """One line for a run whose prompts.parquet cannot be read (damaged or missing) and what to do."""
    return (f"the prompts of run {run_id} cannot be read (prompts.parquet is damaged or missing): restore "
            "prompts.parquet, or extract the run again with --overwrite")
