"""Temporary siblings of a file or folder being written (`.NAME.tmp-PID`), and the clean-up of those a
killed process left.

Why: writes go to a temporary sibling renamed into place, so a crash never leaves a half-written
result; but a `kill -9` leaves the temporary itself (a 2 MB partial report each time), which nothing
would ever remove. The next writer of the same name removes those whose process is gone.
"""

from __future__ import annotations

import os
import shutil
from glob import escape as glob_escape
from pathlib import Path


def temp_path(out: Path) -> Path:
    """This process's temporary sibling of `out`."""
    return out.with_name(f".{out.name}.tmp-{os.getpid()}")


def remove_abandoned(out: Path) -> None:
    """Delete the temporary siblings of `out` whose writing process no longer runs on this machine."""
    try:
        found = list(out.parent.glob(f".{glob_escape(out.name)}.tmp-*"))
    except OSError:
        return
    for path in found:
        pid = path.name.rpartition(".tmp-")[2]
        if not pid.isdigit() or int(pid) == os.getpid() or alive(int(pid)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                path.unlink()
            except OSError:
                pass


def alive(pid: int) -> bool:
    """Whether process `pid` exists here (owned by anyone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
