"""Coordinator lifecycle: start/stop, with/async with, drain/resume, pause, control loop, Ctrl-C."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from _support import SAFETY, wait_until
from tokengate import (
    AdmissionClosed,
    CoordinatorNotRunning,
    OperationsCoordinator,
    TokenGateError,
    TokenKilled,
    TokenState,
    task_token_guard,
)

# --------------------------------------------------------------------------- start / stop


def test_start_and_stop_flags():
    coord = OperationsCoordinator(cores=1, workers_per_core=1)
    try:
        assert coord.running is False
        with pytest.raises(CoordinatorNotRunning):
            coord.submit(lambda: 1)
        coord.start()
        assert coord.running is True
        assert coord.admission_open is True
        assert coord.paused is False
        assert coord.submit(lambda: 1).get() == 1
    finally:
        coord.stop()
    assert coord.running is False
    with pytest.raises(CoordinatorNotRunning):
        coord.submit(lambda: 1)


def test_default_cores_is_the_cpus_this_process_may_use():
    coord = OperationsCoordinator(workers_per_core=1)
    coord.start()
    try:
        expected = len(os.sched_getaffinity(0))
        assert coord.cores == expected
        assert len(coord.cpu_map) == expected
        assert set(coord.cpu_map) <= os.sched_getaffinity(0)
    finally:
        if coord.running:
            coord.stop()


def test_with_statement_starts_and_stops():
    with OperationsCoordinator(cores=2, workers_per_core=1) as coord:
        assert isinstance(coord, OperationsCoordinator)
        assert coord.running
        token = task_token_guard()(lambda x: x + 1)(1)
        assert token.get() == 2
    assert not coord.running


def test_with_statement_exit_finishes_queued_work():
    ran = []
    with OperationsCoordinator(cores=1, workers_per_core=1) as coord:
        tokens = [coord.submit(ran.append, i) for i in range(200)]
    assert not coord.running
    assert all(t.state is TokenState.COMPLETED for t in tokens)
    assert sorted(ran) == list(range(200))


def test_with_statement_stops_on_exception_and_propagates_it():
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with OperationsCoordinator(cores=1, workers_per_core=1) as coord:
            assert coord.running
            raise Boom
    assert not coord.running
    with pytest.raises(CoordinatorNotRunning):
        task_token_guard()(lambda: 1)()


def test_async_with_starts_and_stops():
    async def main():
        async with OperationsCoordinator(cores=2, workers_per_core=1) as coord:
            assert coord.running
            token = coord.submit(lambda: "async-with")
            result = await token
        return coord, result

    coord, result = asyncio.run(main())
    assert result == "async-with"
    assert not coord.running


def test_pin_workers_false_runs_tokens():
    with OperationsCoordinator(cores=2, workers_per_core=1, pin_workers=False) as coord:
        tokens = [coord.submit(lambda i=i: i * 2) for i in range(20)]
        assert [t.get() for t in tokens] == [i * 2 for i in range(20)]


def test_stop_wait_true_completes_queued_and_running(make_coord, make_latch):
    coord = make_coord(cores=1, workers_per_core=1)
    latch = make_latch()
    ran = []
    running = coord.submit(lambda: latch.enter() or "first")
    assert latch.wait_entered(1)
    queued = [coord.submit(ran.append, i) for i in range(50)]

    stopper = threading.Thread(target=coord.stop, kwargs={"wait": True})
    stopper.start()
    # stop(wait=True) cannot return while a token is still held
    stopper.join(0.2)
    assert stopper.is_alive()
    latch.release()
    stopper.join(SAFETY)
    assert not stopper.is_alive()
    assert not coord.running
    assert running.get() == "first"
    assert all(t.state is TokenState.COMPLETED for t in queued)
    assert sorted(ran) == list(range(50))


def test_stop_wait_false_kills_queued_and_running_finish(make_coord, make_latch):
    # a held worker makes the rest queue (no growth on demand)
    coord = make_coord(cores=1, workers_per_core=1, grow_on_demand=False)
    latch = make_latch()
    ran = []
    running = coord.submit(lambda: latch.enter() or "finished")
    assert latch.wait_entered(1)
    queued = [coord.submit(ran.append, i) for i in range(10)]

    outcomes = [None] * len(queued)
    ready = threading.Barrier(len(queued) + 1)

    def waiter(k):
        ready.wait(SAFETY)
        try:
            outcomes[k] = queued[k].get()
        except BaseException as exc:
            outcomes[k] = exc

    waiters = [threading.Thread(target=waiter, args=(k,), daemon=True) for k in range(10)]
    for t in waiters:
        t.start()
    ready.wait(SAFETY)

    stopper = threading.Thread(target=coord.stop, kwargs={"wait": False})
    stopper.start()
    # queued tokens are killed without waiting for the running one
    for t in queued:
        assert t.wait(SAFETY)
        assert t.state is TokenState.KILLED
    for t in waiters:
        t.join(SAFETY)
        assert not t.is_alive()
    assert all(isinstance(o, TokenKilled) for o in outcomes), outcomes
    assert running.state is TokenState.EXECUTING
    latch.release()
    stopper.join(SAFETY)
    assert not stopper.is_alive()
    assert running.get() == "finished"
    assert running.state is TokenState.COMPLETED
    assert ran == []
    assert not coord.running


# --------------------------------------------------------------------------- drain / resume


def test_drain_closes_admission_waits_and_summarises(make_coord, make_latch):
    coord = make_coord(cores=2, workers_per_core=2)
    latch = make_latch()

    def ok(i):
        latch.enter()
        return i

    def bad():
        latch.enter()
        raise ValueError("bad")

    oks = [coord.submit(ok, i) for i in range(6)]
    bads = [coord.submit(bad) for _ in range(3)]
    assert latch.wait_entered(1)

    box = {}
    drainer = threading.Thread(target=lambda: box.setdefault("summary", coord.drain()))
    drainer.start()
    assert wait_until(lambda: not coord.admission_open)

    with pytest.raises(AdmissionClosed) as ei:
        coord.submit(lambda: 1)
    assert isinstance(ei.value, TokenGateError)
    with pytest.raises(AdmissionClosed):
        task_token_guard()(lambda: 1)()
    # drain is still waiting for the held tokens
    assert drainer.is_alive()

    latch.release()
    drainer.join(SAFETY)
    assert not drainer.is_alive()
    summary = box["summary"]
    assert set(summary) >= {"completed", "failed", "killed", "remaining", "seconds", "timed_out"}
    assert summary["completed"] == 6
    assert summary["failed"] == 3
    assert summary["killed"] == 0
    assert summary["remaining"] == 0
    assert summary["timed_out"] is False
    assert summary["seconds"] >= 0
    assert [t.get() for t in oks] == list(range(6))
    assert all(t.state is TokenState.FAILED for t in bads)
    # still closed until resume()
    assert coord.admission_open is False
    with pytest.raises(AdmissionClosed):
        coord.submit(lambda: 1)
    coord.resume()
    assert coord.admission_open is True
    assert coord.submit(lambda: "reopened").get() == "reopened"


def test_drain_timeout_reports_remaining(make_coord, make_latch):
    # a held worker makes the rest queue (no growth on demand)
    coord = make_coord(cores=1, workers_per_core=1, grow_on_demand=False)
    latch = make_latch()
    held = coord.submit(latch.enter)
    queued = [coord.submit(lambda: None) for _ in range(3)]
    assert latch.wait_entered(1)
    summary = coord.drain(timeout=0.05)
    assert summary["timed_out"] is True
    assert summary["remaining"] == 4
    assert summary["seconds"] >= 0.04
    with pytest.raises(AdmissionClosed):
        coord.submit(lambda: 1)
    latch.release()
    summary = coord.drain(timeout=SAFETY)
    assert summary["timed_out"] is False
    assert summary["remaining"] == 0
    assert held.get() is None
    assert all(t.state is TokenState.COMPLETED for t in queued)
    coord.resume()
    assert coord.submit(lambda: 7).get() == 7


def test_drain_on_idle_coordinator_returns_at_once(make_coord):
    coord = make_coord(cores=1, workers_per_core=1)
    summary = coord.drain(timeout=SAFETY)
    assert summary["remaining"] == 0
    assert summary["timed_out"] is False
    assert not coord.admission_open
    coord.resume()
    assert coord.admission_open


# --------------------------------------------------------------------------- pause / resume


def test_pause_holds_new_tokens_and_resume_runs_them(make_coord, make_latch):
    coord = make_coord(cores=1, workers_per_core=1)
    latch = make_latch()
    running = coord.submit(lambda: latch.enter() or "admitted-before-pause")
    assert latch.wait_entered(1)
    coord.pause()
    assert coord.paused
    assert coord.admission_open  # pausing is not closing
    ran = []
    waiting = [coord.submit(ran.append, i) for i in range(5)]
    assert all(t.state is TokenState.WAITING for t in waiting)
    # the already admitted token still runs while paused
    latch.release()
    assert running.get() == "admitted-before-pause"
    assert all(t.state is TokenState.WAITING for t in waiting)
    assert ran == []
    assert coord.stats()["waiting"] == 5
    coord.resume()
    assert not coord.paused
    for t in waiting:
        assert t.get() is None
    assert sorted(ran) == list(range(5))


# --------------------------------------------------------------------------- control loop


def test_run_control_schedules_on_the_control_loop(make_coord):
    coord = make_coord(cores=1, workers_per_core=1)

    async def which_loop():
        await asyncio.sleep(0)
        return asyncio.get_running_loop(), threading.get_ident()

    fut = coord.run_control(which_loop())
    assert isinstance(fut, concurrent.futures.Future)
    loop, ident = fut.result(SAFETY)
    assert loop is coord.loop
    assert ident != threading.get_ident()

    async def fails():
        raise KeyError("ctl")

    bad = coord.run_control(fails())
    assert isinstance(bad.exception(SAFETY), KeyError)


# --------------------------------------------------------------------------- Ctrl-C

_CTRL_C_CHILD = textwrap.dedent(
    """
    import linecache
    import sys
    import threading

    from tokengate import OperationsCoordinator, task_token_guard

    forever = threading.Event()

    @task_token_guard(operation_type="held_forever")
    def held():
        forever.wait()

    def announce_when_blocked(main_ident):
        # READY only once the main thread sits on the token.get() line (inside the native wait).
        idle = threading.Event()
        while True:
            frame = sys._current_frames().get(main_ident)
            if frame is not None:
                line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
                if line == "token.get()":
                    print("READY", flush=True)
                    return
            idle.wait(0.005)

    coord = OperationsCoordinator(cores=1, workers_per_core=1)
    coord.start()
    token = held()
    main_ident = threading.get_ident()
    threading.Thread(target=announce_when_blocked, args=(main_ident,), daemon=True).start()
    token.get()
    print("UNREACHABLE", flush=True)
    """
)


@pytest.mark.timeout(60)
def test_ctrl_c_interrupts_a_blocked_get(tmp_path):
    script = tmp_path / "ctrl_c_child.py"
    script.write_text(_CTRL_C_CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        if line.strip() != "READY":
            proc.kill()
            pytest.fail(f"child did not get ready: {line!r}\n{proc.communicate()[1]}")
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"child did not exit after SIGINT; stderr:\n{err}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert "UNREACHABLE" not in out
    assert "Traceback (most recent call last)" in err, err
    assert "KeyboardInterrupt" in err, err
    assert "token.get()" in err, err


# --------------------------------------------------------------------------- active workers


def test_set_active_workers_limits_concurrency(make_coord, make_latch):
    # growth on demand would add workers while the held ones wait: a hard limit needs it off
    coord = make_coord(cores=1, workers_per_core=4, grow_on_demand=False)
    assert coord.active_workers(1) == 4
    coord.set_active_workers(1, 1)
    assert coord.active_workers(1) == 1
    assert coord.stats()["per_core"][0]["active_workers"] == 1

    lock = threading.Lock()
    current = [0]
    peak = [0]

    def track(i):
        with lock:
            current[0] += 1
            peak[0] = max(peak[0], current[0])
        with lock:
            current[0] -= 1
        return i

    latch = make_latch()
    first = coord.submit(latch.enter)
    assert latch.wait_entered(1)
    rest = [coord.submit(track, i) for i in range(20)]
    # A control loop re-applies its setting periodically; that must not change anything.
    coord.set_active_workers(1, 1)
    # One active worker, and it is held: nothing else may start (bounded negative check).
    started_early = wait_until(
        lambda: any(t.state is not TokenState.ADMITTED for t in rest), timeout=0.3
    )
    assert not started_early, [(t.token_id, t.state.name, t.worker_id) for t in rest]
    latch.release()
    assert first.get(timeout=SAFETY) is None
    assert [t.get(timeout=SAFETY) for t in rest] == list(range(20))
    assert peak[0] == 1
    tokens = sorted([first, *rest], key=lambda t: t.started_at)
    for a, b in itertools.pairwise(tokens):
        assert b.started_at >= a.finished_at, "two tokens overlapped with one active worker"
    assert len({t.worker_id for t in tokens}) == 1


def test_set_active_workers_raises_concurrency(make_coord):
    coord = make_coord(cores=1, workers_per_core=4)
    coord.set_active_workers(1, 1)
    coord.set_active_workers(1, 4)
    assert coord.active_workers(1) == 4
    # four tokens meeting at a barrier can only finish if four workers run them at once
    barrier = threading.Barrier(4)
    tokens = [coord.submit(barrier.wait, SAFETY) for _ in range(4)]
    assert sorted(t.get(timeout=SAFETY + 5) for t in tokens) == [0, 1, 2, 3]
    assert len({t.worker_id for t in tokens}) == 4


def test_set_active_workers_is_per_core(make_coord):
    coord = make_coord(cores=3, workers_per_core=3)
    coord.set_active_workers(2, 1)
    assert [coord.active_workers(c) for c in (1, 2, 3)] == [3, 1, 3]
    assert [c["active_workers"] for c in coord.stats()["per_core"]] == [3, 1, 3]
