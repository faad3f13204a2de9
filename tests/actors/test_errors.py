"""Worker errors are typed, picklable, one line, and found again inside Ray's wrappers."""

import pickle

import pytest
import ray.exceptions

from actors.errors import WorkerError, WorkerUserError, find_worker_error
from neuronmap.errors import ConfigError, NeuronMapError, UnknownModelError


def test_user_mistakes_become_worker_user_errors_carrying_the_cause():
    error = WorkerError.wrap(UnknownModelError("unknown model 'gtp2'"), "node-1:42", doing="could not start")
    assert type(error) is WorkerUserError and isinstance(error, NeuronMapError)  # the CLI exits 2
    assert str(error) == "worker node-1:42 could not start: unknown model 'gtp2'"
    assert isinstance(error.cause, UnknownModelError) and error.worker == "node-1:42"


def test_internal_failures_stay_worker_errors_with_the_type_in_the_message():
    error = WorkerError.wrap(ZeroDivisionError("division by zero"), "n:1")
    assert type(error) is WorkerError and not isinstance(error, NeuronMapError)
    assert "ZeroDivisionError: division by zero" in str(error) and isinstance(error.cause, ZeroDivisionError)


@pytest.mark.parametrize("cls", [WorkerError, WorkerUserError])
def test_pickle_round_trip_keeps_type_cause_and_worker(cls):
    error = cls("worker n:1 failed: boom", ConfigError("boom"), "n:1")
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is cls and str(back) == str(error) and back.worker == "n:1"
    assert type(back.cause) is ConfigError and str(back.cause) == "boom"


def test_an_unpicklable_cause_is_replaced_by_a_picklable_summary():
    class Local(Exception):  # defined in a function: not picklable
        pass

    error = WorkerError.wrap(Local("bad\nthing"), "n:1")
    back = pickle.loads(pickle.dumps(error))
    assert isinstance(back.cause, RuntimeError) and "Local: bad thing" in str(back.cause)


def test_found_inside_ray_task_errors_and_exception_chains():
    original = WorkerError.wrap(UnknownModelError("no model"), "n:7")
    wrapped = ray.exceptions.RayTaskError("ExtractionWorker.__init__", "Traceback ...\n  many lines", original)
    as_cause = wrapped.as_instanceof_cause()  # what ray.get raises: a RayTaskError(WorkerUserError)
    try:
        raise RuntimeError("executor failed") from as_cause
    except RuntimeError as outer:
        found = find_worker_error(outer)
    assert type(found) is WorkerUserError and str(found) == str(original)
    assert isinstance(found.cause, UnknownModelError)
    assert find_worker_error(RuntimeError("unrelated")) is None
