"""Functions the Dask backend tests run on the cluster's worker processes (imported there by
name, so they live in a module of their own, away from the test fixtures)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from tokengate import Retry


def add(a, b):
    return a + b


def whoami(x):
    return x, os.getpid()


def fail(x):
    raise ValueError(f"task failed on {x}")


def busy(tag, seconds):
    """Simulated work: holds its Dask thread for ``seconds``; returns where and when it ran."""
    start = time.monotonic()
    time.sleep(seconds)
    return tag, os.getpid(), start, time.monotonic()


def wait_for(event_name, marker=None, timeout=60.0):
    """Blocks its Dask thread until the test sets the ``distributed.Event`` ``event_name``
    (``marker`` is created first, so the test knows the task started)."""
    from distributed import Event

    if marker is not None:
        Path(marker).touch()
    if not Event(event_name).wait(timeout):
        raise TimeoutError(f"event {event_name} was not set within {timeout} s")
    return os.getpid()


def touch(path):
    Path(path).touch()
    return str(path)


def die_once(marker):
    """Kills its own worker process the first time (``marker`` remembers), returns after."""
    p = Path(marker)
    if not p.exists():
        p.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return "survived", os.getpid()


def retry_once(marker):
    p = Path(marker)
    if not p.exists():
        p.touch()
        raise Retry(delay=0.01, reason="asked for one more attempt")
    return "second attempt"


def connection_error_once(marker):
    p = Path(marker)
    if not p.exists():
        p.touch()
        raise ConnectionError("flaky upstream")
    return "recovered"


def pid_in_range(n):
    return [os.getpid() for _ in range(n)]


# Decorated here, at module level: the cluster gets them by name and runs its own import of
# this module (its globals, such as this lock and counter, are not sent along).
from tokengate import task_token_guard  # noqa: E402

_LOCK = threading.Lock()
_CALLS = {"n": 0}


@task_token_guard(operation_type="counted")
def counted():
    with _LOCK:
        _CALLS["n"] += 1
        return _CALLS["n"], os.getpid()


@task_token_guard(operation_type="nested")
def nested():
    return counted().get()  # a decorated call on a worker: no coordinator there
