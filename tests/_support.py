"""Helpers shared by the tests (imported as ``from _support import ...``)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable

from pytest import fail as _fail

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


def run_child(tmp_path, source: str, *args: str, timeout: float = 60.0):
    """Run ``source`` as a script in a fresh interpreter; fail (not hang) past ``timeout``."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(source))
    proc = subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        _fail(f"child hung (killed after {timeout} s)\nstdout:\n{out}\nstderr:\n{err}")
    return proc.returncode, out, err


def child_json(out: str) -> dict:
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, out
    return json.loads(lines[0][len("RESULT ") :])


class Peak:
    """Counts concurrent executions (entry/exit under a lock) and keeps the peak."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.now = 0
        self.peak = 0
        self.entered = 0

    def __enter__(self) -> Peak:
        with self._lock:
            self.now += 1
            self.entered += 1
            self.peak = max(self.peak, self.now)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.now -= 1


def quiescent(coord) -> dict:
    """Asserts the coordinator is at rest: every accepted token in exactly one final count and
    nothing waiting, admitted, executing or held. Returns its stats()."""
    s = coord.stats()
    assert s["created"] == s["completed"] + s["failed"] + s["killed"] + s["timed_out"], s
    busy = {k: s[k] for k in ("waiting", "admitted", "executing", "held")}
    assert busy == dict.fromkeys(busy, 0), busy
    return s
