"""Typed, picklable errors of Ray workers.

A worker that fails raises `WorkerError` (or `WorkerUserError` when the cause is a user mistake such
as a model that does not load). The original exception travels along as `.cause`, typed, so callers
test `isinstance(err.cause, UnknownModelError)` instead of matching strings; `.worker` says where it
happened (`host:pid`). Ray wraps exceptions on the way back (RayTaskError, actor death errors);
`find_worker_error` digs the worker's own error out of whatever arrives.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
from typing import Any, Iterator

from neuronmap.errors import NeuronMapError


def worker_label() -> str:
    """`host:pid` of this process, what a WorkerError names as the worker."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


class WorkerError(RuntimeError):
    """A Ray worker failed. `.cause` is the worker's exception (typed), `.worker` its `host:pid`."""

    def __init__(self, message: str, cause: BaseException | None = None, worker: str | None = None):
        super().__init__(message)
        self.cause = cause
        self.worker = worker

    def __reduce__(self):
        return (type(self), (self.args[0], self.cause, self.worker))

    @staticmethod
    def wrap(error: BaseException, worker: str | None = None, doing: str = "failed") -> "WorkerError":
        """The WorkerError to raise for `error` caught in a worker: user mistakes -> WorkerUserError."""
        if isinstance(error, WorkerError):
            return error
        worker = worker or worker_label()
        cause = error if _picklable(error) else RuntimeError(f"{type(error).__name__}: {_one_line(error)}")
        user = isinstance(error, NeuronMapError)
        detail = _one_line(error) if user else f"{type(error).__name__}: {_one_line(error)}"
        cls = WorkerUserError if user else WorkerError
        return cls(f"worker {worker} {doing}: {detail}", cause, worker)


class WorkerUserError(WorkerError, NeuronMapError):
    """A worker failed because of the user's input (model, layers, run folder): the CLI exits with 2."""


def _picklable(error: BaseException) -> bool:
    try:
        pickle.loads(pickle.dumps(error))
        return True
    except Exception:
        return False


def find_worker_error(error: BaseException | None) -> WorkerError | None:
    """The WorkerError inside `error`: itself, or the one a Ray wrapper or the cause chain holds."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        error = todo.pop(0)
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if type(error) in (WorkerError, WorkerUserError):
            return error
        # Ray re-raises a dynamic subclass (RayTaskError(WorkerError)) whose str() holds the remote
        # traceback and whose `.cause` is the worker's own exception; an actor that died in
        # __init__ comes as ActorDiedError with that RayTaskError among its args.
        nested = [getattr(error, "cause", None), error.__cause__, error.__context__]
        nested += [arg for arg in getattr(error, "args", ()) if isinstance(arg, BaseException)]
        todo.extend(e for e in nested if isinstance(e, BaseException))
    return None


@contextlib.contextmanager
def failure_recorded(writer: Any) -> Iterator[None]:
    """Around a distributed run's writing: an error marks the run failed (it stays resumable) and is
    re-raised as the worker's own typed error when one caused it, so the CLI prints one clear line."""
    try:
        yield
    except KeyboardInterrupt:
        raise
    except Exception as error:
        worker_error = find_worker_error(error)
        with contextlib.suppress(Exception):
            writer.fail(str(worker_error or f"{type(error).__name__}: {error}"))
        if worker_error is not None:
            raise worker_error from None
        raise
