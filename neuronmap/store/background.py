"""Commit shards on one background thread while the caller computes the next shard.

Extraction alternates compute (the forward passes of a shard) and storage (write, fsync, hash,
rename, manifest). Both release the GIL for their heavy parts, so running the commit of shard N
beside the forward of shard N+1 hides the smaller of the two. At most one commit is in flight:
`submit` first waits for the previous one, so memory holds at most two shards and an error
(a full disk, say) surfaces at the next `submit` or at `drain`, raised as it was raised.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable


class BackgroundCommits:
    """One-deep commit queue: `submit(fn, *args)` runs `fn` on a helper thread.

    Use as a context manager; leaving it waits for the commit in flight (also when the block
    raised, so a shard is either fully committed or cleaned up before the caller marks the run).
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="neuronmap-commit")
        self._pending: Future | None = None

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Wait for the previous commit (re-raising its error), then start `fn(*args, **kwargs)`."""
        self.drain()
        self._pending = self._pool.submit(fn, *args, **kwargs)

    def drain(self) -> None:
        """Wait for the commit in flight; re-raise its exception."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> "BackgroundCommits":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        try:
            if exc is None:
                self.drain()
            else:  # the block failed: finish the commit in flight, keep the block's error
                with contextlib.suppress(BaseException):
                    self.drain()
        finally:
            self._pool.shutdown(wait=True)
        return False
