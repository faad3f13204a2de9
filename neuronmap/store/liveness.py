"""Whether a process is writing a run now: a shared flock on `<run>/.writing` held while it writes.

Why: a killed `neuronmap extract` leaves its manifest at status `running` for good, and the manifest
alone cannot tell such a run from one being extracted right now (the next commit may be minutes
away on a slow model). Every `RunWriter` holds a shared lock on `.writing` from before it marks the
run running until it completes or fails it; the kernel drops the lock when the process dies, however
it dies. A reader asks for the lock exclusively without waiting: granted means nobody is writing.
Shared, because the Ray engine's workers write into one run beside its driver. It works wherever
flock does across the processes involved (local disks; NFSv4 maps it to byte-range locks).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # Windows: no liveness information
    fcntl = None  # type: ignore[assignment]

WRITING_NAME = ".writing"


def hold_writing(path: str | os.PathLike) -> IO | None:
    """Take the shared writing lock of the run folder `path` (which exists); keep the returned file open
    while writing and close it (`release_writing`) when done. None where locks are unavailable."""
    if fcntl is None:
        return None
    try:
        handle = open(Path(path) / WRITING_NAME, "a+b")
    except OSError:
        return None  # a read-only or odd filesystem: writing may still work; liveness stays unknown
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
    except OSError:
        handle.close()
        return None
    return handle


def release_writing(handle: IO | None) -> None:
    if handle is not None:
        with contextlib.suppress(OSError):
            handle.close()  # closing the file drops the lock


def writer_alive(path: str | os.PathLike) -> bool | None:
    """True when a process holds the run's writing lock, False when none does, None when this cannot be
    told (no `.writing` file: a run written before this existed, or locks unavailable)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(Path(path) / WRITING_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
