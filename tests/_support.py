"""Helpers shared by the tests (imported as ``from _support import ...``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

#: Upper bound for waits expected to finish "soon"; only reached when something is broken.
SAFETY = 20.0


class Latch:
    """Holds tasks inside a worker until released.

    A task calls :meth:`enter`; the test calls :meth:`wait_entered` to know that *n* tasks are
    executing (and therefore occupying their workers), then :meth:`release`.
    """

    def __init__(self, safety: float = SAFETY) -> None:
        self._release = threading.Event()
        self._cond = threading.Condition()
        self._entered = 0
        self._safety = safety

    @property
    def entered(self) -> int:
        with self._cond:
            return self._entered

    def enter(self) -> None:
        with self._cond:
            self._entered += 1
            self._cond.notify_all()
        if not self._release.wait(self._safety):
            raise RuntimeError("latch was never released (test bug or deadlock)")

    def wait_entered(self, n: int = 1, timeout: float = SAFETY) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._entered >= n, timeout)

    def release(self) -> None:
        self._release.set()

    @property
    def released(self) -> bool:
        return self._release.is_set()


def wait_until(predicate: Callable[[], bool], timeout: float = SAFETY) -> bool:
    """Poll *predicate* until it is true or *timeout* elapses; returns its last value."""
    deadline = time.monotonic() + timeout
    idle = threading.Event()
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return bool(predicate())
        idle.wait(0.001)
