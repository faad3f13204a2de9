"""The in-process analysis engine, and warning capture that stays right when tasks run on threads.

`LocalEngine()` runs every task in this process. `map` is one task after another. `imap` (what the
runner uses for per-shard partials, i.e. `stats`) runs up to `workers` tasks at once on threads,
yielding results in order, with at most `workers` running or finished ahead of the caller; with one
worker it is lazy (a task runs only when its result is asked for). A per-shard `stats` task spends
almost all of its time in code that releases the GIL (the compiled statistics kernel over mapped
page-cache pages, the reservoir's row copies), so threads scale with cores: on the 2-CPU
development machine two workers fold an 8 GB run ~1.4x faster than one (`benchmarks/BENCHMARKS.md`,
"Analysis at scale"). Hence the default: one worker per core this process may run on, at most 4
(past that the pass is bound by memory bandwidth, and each worker holds a shard partial). The
numbers do not depend on it: partials are merged in shard order whatever finishes first.
`LocalEngine(workers=1)` is the serial, lazy form.

`capture_warnings()` records the warnings raised by the calling thread only. `warnings.catch_warnings`
swaps process-wide state: two threads inside it at once restore each other's state in the wrong
order and record each other's warnings (the Serve job manager runs analyses on threads, and so does
`imap` with several workers). Here the first capture to start installs one hook that hands each
warning to the record of the thread that raised it, and the last to finish puts the previous state
back.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from ..errors import ConfigError


MAX_DEFAULT_WORKERS = 4


def default_workers() -> int:
    """One worker per core this process may run on (its CPU affinity), at most MAX_DEFAULT_WORKERS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_WORKERS, cores))


class LocalEngine:
    """Everything in this process: `map` one task after the other, `imap` on up to `workers` threads.

    Parameters
    ----------
    workers : int or None, default=None
        Tasks `imap` runs at once (threads). None: `default_workers()` (one per usable core, at most
        4). 1: lazily, one task when its result is asked for.
    """

    name = "local"

    def __init__(self, workers: int | None = None):
        if workers is None:
            workers = default_workers()
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"workers={workers!r} must be an integer >= 1")
        self.workers = workers

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        return [fn(item) for item in items]

    def imap(self, fn: Callable[[Any], Any], items: list[Any]) -> Iterator[Any]:
        """Results in order; with workers > 1, up to `workers` tasks run ahead on threads."""
        workers = getattr(self, "workers", 1)  # subclasses may skip __init__
        if workers <= 1 or len(items) <= 1:
            return (fn(item) for item in items)
        return _threaded_imap(fn, items, workers)


def _threaded_imap(fn: Callable[[Any], Any], items: list[Any], workers: int) -> Iterator[Any]:
    """Run up to `workers` calls at once, yielding in order; closing it cancels what has not started."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="neuronmap-local")
    pending: deque = deque()
    queue = iter(items)
    try:
        for item in queue:
            pending.append(pool.submit(fn, item))
            if len(pending) == workers:
                break
        while pending:
            result = pending.popleft().result()
            for item in queue:  # top up before handing the result on: the threads keep working meanwhile
                pending.append(pool.submit(fn, item))
                break
            yield result
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True)


class _ThreadWarnings:
    """Process-wide hook routing each warning to the record of the thread that raised it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._context: warnings.catch_warnings | None = None
        self._fallback: Callable[..., Any] | None = None
        self._local = threading.local()

    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:
        record = getattr(self._local, "record", None)
        if record is not None:
            record.append(warnings.WarningMessage(message, category, filename, lineno, file, line))
        elif self._fallback is not None:  # a thread outside any capture: shown as before
            self._fallback(message, category, filename, lineno, file, line)

    @contextmanager
    def capture(self) -> Iterator[list[warnings.WarningMessage]]:
        record: list[warnings.WarningMessage] = []
        outer = getattr(self._local, "record", None)
        self._local.record = record
        with self._lock:
            if self._active == 0:
                self._context = warnings.catch_warnings()
                self._context.__enter__()
                warnings.simplefilter("always")
                self._fallback = warnings.showwarning
                warnings.showwarning = self._show
            self._active += 1
        try:
            yield record
        finally:
            with self._lock:
                self._active -= 1
                if self._active == 0:
                    self._context.__exit__(None, None, None)
                    self._context = self._fallback = None
            self._local.record = outer


_THREAD_WARNINGS = _ThreadWarnings()


def capture_warnings():
    """Context manager yielding a list that receives every warning this thread raises inside it
    (all of them: the "always" filter), whatever other threads do meanwhile."""
    return _THREAD_WARNINGS.capture()
