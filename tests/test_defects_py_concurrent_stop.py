"""Concurrent ``stop()`` calls share the stop in progress: a second caller waits for it (up to
its own timeout) and returns its result, a second ``stop(wait=False)`` escalates it, and a
second call from inside a task returns without waiting (waiting would deadlock)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

from _support import SAFETY, wait_until
from tokengate import OperationsCoordinator, TokenState


class _Call:
    """Runs ``fn`` in a thread and records what it returned, and what the given probe said
    right after it returned."""

    def __init__(self, fn, probe=lambda: None) -> None:
        self.result: object = None
        self.seen_after: object = None
        self.finished = threading.Event()
        self._fn, self._probe = fn, probe
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self._fn()
            self.seen_after = self._probe()
        finally:
            self.finished.set()

    def join(self) -> None:
        self.thread.join(SAFETY)
        assert not self.thread.is_alive()


def _busy_coordinator(make_coord, make_latch, queued=10):
    """One worker held in a task, ``queued`` tokens behind it."""
    # a held worker makes the rest queue (no growth on demand)
    coord = make_coord(cores=1, workers_per_core=1, grow_on_demand=False)
    latch = make_latch()
    running = coord.submit(latch.enter)
    assert latch.wait_entered(1)
    tokens = [coord.submit(abs, -i) for i in range(queued)]
    return coord, latch, running, tokens


def _all_killed(tokens) -> bool:
    return all(t.state is TokenState.KILLED for t in tokens)


def _release_when(latch, condition) -> None:
    """Release ``latch`` once ``condition`` holds (or, when something is broken, after the
    safety timeout, so that the test then fails on its assertions instead of hanging)."""
    wait_until(condition)
    latch.release()


def _stop_in_thread(coord, **kwargs) -> _Call:
    call = _Call(lambda: coord.stop(**kwargs))
    assert wait_until(lambda: not coord.running)  # that stop() has begun
    return call


def test_second_stop_waits_for_the_first_and_returns_its_result(make_coord, make_latch):
    coord, latch, running, tokens = _busy_coordinator(make_coord, make_latch)
    first = _stop_in_thread(coord)
    # bounded by its own timeout: nothing has stopped yet, so it must not say True
    assert coord.stop(timeout=0.05) is False
    assert not any(t.done() for t in tokens)
    second = _Call(coord.stop, probe=lambda: [t.state for t in tokens])
    latch.release()
    second.join()
    first.join()
    assert second.result is True
    assert second.seen_after == [TokenState.COMPLETED] * len(tokens)
    assert first.result is True
    assert running.state is TokenState.COMPLETED


def test_second_stop_wait_false_kills_the_queue_at_once(make_coord, make_latch):
    coord, latch, running, tokens = _busy_coordinator(make_coord, make_latch)
    first = _stop_in_thread(coord)  # wait=True: would run all ten
    releaser = _Call(lambda: _release_when(latch, lambda: _all_killed(tokens)))
    assert coord.stop(wait=False) is True  # first's result, once the running task finished
    releaser.join()
    first.join()
    assert first.result is True
    assert [t.state for t in tokens] == [TokenState.KILLED] * len(tokens)
    assert running.state is TokenState.COMPLETED


def test_second_stop_wait_false_with_timeout_bounds_the_first(make_coord, make_latch):
    coord, latch, running, tokens = _busy_coordinator(make_coord, make_latch)
    first = _stop_in_thread(coord)  # no timeout of its own: would wait for the held task
    started = time.monotonic()
    assert coord.stop(wait=False, timeout=0.2) is False  # a worker is still busy
    first.join()
    took = time.monotonic() - started
    assert first.result is False
    assert 0.15 <= took < 5
    assert [t.state for t in tokens] == [TokenState.KILLED] * len(tokens)
    assert running.state is TokenState.EXECUTING
    latch.release()
    assert running.get(timeout=SAFETY) is None


def test_second_stop_from_inside_a_task_does_not_wait(make_coord):
    coord = make_coord(cores=1, workers_per_core=2, grow_on_demand=False)
    stopping = threading.Event()
    first_done = threading.Event()
    inner: dict[str, object] = {}

    def task() -> str:
        assert stopping.wait(SAFETY)
        inner["result"] = coord.stop()  # the first stop() waits for this very task
        inner["first_done_meanwhile"] = first_done.is_set()
        return "task finished"

    token = coord.submit(task)
    queued = [coord.submit(abs, -i) for i in range(5)]
    first = _Call(lambda: (coord.stop(), first_done.set())[0])
    assert wait_until(lambda: not coord.running)
    stopping.set()
    first.join()
    assert token.get(timeout=0) == "task finished"
    assert inner == {"result": False, "first_done_meanwhile": False}
    assert first.result is True
    assert [t.state for t in queued] == [TokenState.COMPLETED] * 5


def test_second_stop_wait_false_from_inside_a_task_escalates_without_waiting(
    make_coord, make_latch
):
    coord = make_coord(cores=1, workers_per_core=2, grow_on_demand=False)
    gate = make_latch()
    stopping = threading.Event()

    def task() -> bool:
        assert stopping.wait(SAFETY)
        return coord.stop(wait=False)

    token = coord.submit(task)
    # keep the other worker busy so the queue stays queued until the escalation
    blocker = coord.submit(gate.enter)
    assert gate.wait_entered(1)
    queued = [coord.submit(abs, -i) for i in range(5)]
    first = _Call(coord.stop)
    assert wait_until(lambda: not coord.running)
    stopping.set()
    assert token.get(timeout=SAFETY) is False  # returned without waiting for the first stop
    assert [t.state for t in queued] == [TokenState.KILLED] * 5
    gate.release()
    first.join()
    assert first.result is True
    assert blocker.state is TokenState.COMPLETED


def test_with_exit_during_another_threads_stop_waits_for_it(make_latch):
    latch = make_latch()
    main = threading.get_ident()

    def in_exit() -> bool:
        frame = sys._current_frames().get(main)
        while frame is not None:
            if frame.f_code.co_name == "__exit__":
                return True
            frame = frame.f_back
        return False

    with OperationsCoordinator(cores=1, workers_per_core=1, grow_on_demand=False) as coord:
        coord.submit(latch.enter)
        assert latch.wait_entered(1)
        tokens = [coord.submit(abs, -i) for i in range(10)]
        other = _stop_in_thread(coord)
        releaser = _Call(lambda: _release_when(latch, in_exit))
    states_at_exit = [t.state for t in tokens]
    releaser.join()
    other.join()
    assert states_at_exit == [TokenState.COMPLETED] * 10
    assert other.result is True
    assert not coord.running


def test_stop_after_a_finished_stop_does_nothing(make_coord):
    coord = make_coord(cores=1, workers_per_core=1, grow_on_demand=False)
    token = coord.submit(abs, -3)
    assert coord.stop() is True
    assert coord.stop() is True
    assert coord.stop(wait=False, timeout=0) is True
    assert token.get(timeout=0) == 3


_EXIT_DURING_A_DAEMON_STOP = """
import threading
from tokengate import OperationsCoordinator

release, entered = threading.Event(), threading.Event()

def held():
    entered.set()
    release.wait(30)

coord = OperationsCoordinator(cores=1, workers_per_core=1, grow_on_demand=False).start()
coord.submit(held)
entered.wait(30)
for i in range(5):
    coord.submit(int).add_done_callback(lambda t: print("QUEUED", t.state.name, flush=True))
stopper = threading.Thread(target=coord.stop, daemon=True)  # wait=True: would wait 30 s
stopper.start()
idle = threading.Event()
while coord.running:
    idle.wait(0.001)
print("EXITING", flush=True)
"""


def test_interpreter_exit_escalates_a_stop_in_progress():
    """The atexit hook stops running coordinators with wait=False; one whose stop() is still
    in progress (here in a daemon thread) gets that stop escalated: its queue is killed and
    the process exits after the grace period instead of after the held task."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_EXIT_DURING_A_DAEMON_STOP)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "EXITING", proc.stdout
    assert lines[1:] == ["QUEUED KILLED"] * 5, proc.stdout
    assert took < 20, took
