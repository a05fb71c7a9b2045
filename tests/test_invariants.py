"""Counter invariants of ``stats()``.

``created == waiting + admitted + executing + completed + failed + killed`` must hold exactly at
quiescent points: while every worker is held by a latch and the coordinator is paused, after
``drain()``, and after ``stop()``. The counters are read without a global lock, so while tokens
move a snapshot may be off by the tokens in flight; at every snapshot taken under load the tests
check only what cannot be transiently wrong: no counter is negative, the monotonic counters
(``created``, ``completed``, ``failed``, ``killed``) never go down, and the finished ones never
exceed ``created``. After ``stop()`` every token ever created is final.
"""

from __future__ import annotations

import random
import threading

import pytest

from _support import SAFETY, wait_until
from tokengate import AdmissionClosed, TokenKilled, TokenState, task_token_guard

FINAL = {TokenState.COMPLETED, TokenState.FAILED, TokenState.KILLED}
GAUGES = ("waiting", "admitted", "executing")
MONOTONIC = ("created", "completed", "failed", "killed")


def accounted(s: dict) -> int:
    return sum(s[k] for k in (*GAUGES, "completed", "failed", "killed"))


def assert_exact(s: dict) -> None:
    assert s["created"] == accounted(s), s
    assert s["illegal_transitions"] == 0, s
    for k in (*GAUGES, *MONOTONIC):
        assert s[k] >= 0, (k, s)
    for core in s["per_core"]:
        assert core["queue_depth"] >= 0, core
        assert core["executing"] >= 0, core


def assert_sane(s: dict, prev: dict | None) -> None:
    """What must hold at any snapshot, even while tokens move."""
    for k in (*GAUGES, *MONOTONIC, "illegal_transitions"):
        assert isinstance(s[k], int) and s[k] >= 0, (k, s)
    for core in s["per_core"]:
        assert core["queue_depth"] >= 0 and core["executing"] >= 0, core
    assert s["completed"] + s["failed"] + s["killed"] <= s["created"], s
    assert s["illegal_transitions"] == 0, s
    if prev is not None:
        for k in MONOTONIC:
            assert s[k] >= prev[k], (k, prev[k], s[k])


class Boom(Exception):
    pass


def _fail(i: int) -> None:
    raise Boom(i)


def _echo(i: int) -> int:
    return i


def test_exact_while_paused_with_every_worker_held(make_coord, make_latch):
    """Quiescent point 1: all 4 workers held, tokens queued in mailboxes and in the pool."""
    coord = make_coord(cores=2, workers_per_core=2, mailbox_capacity=8, pool_capacity=1000)
    latch = make_latch()
    hold = task_token_guard(operation_type="hold", tags={"weight": "heavy"})(latch.enter)

    done = [coord.submit(_echo, i) for i in range(20)]
    failed = [coord.submit(_fail, i) for i in range(5)]
    assert [t.get(timeout=SAFETY) for t in done] == list(range(20))
    for t in failed:
        assert isinstance(t.exception(timeout=SAFETY), Boom)

    holders = [hold() for _ in range(4)]
    assert latch.wait_entered(4)
    queued = [coord.submit(_echo, i) for i in range(6)]  # admitted, behind the held workers
    assert wait_until(lambda: all(t.state is TokenState.ADMITTED for t in queued))
    coord.pause()
    pooled = [coord.submit(_echo, i) for i in range(7)]  # WAITING in the pool
    assert all(t.state is TokenState.WAITING for t in pooled)
    assert queued[0].kill() and pooled[0].kill() and pooled[1].kill()

    s = coord.stats()
    assert_exact(s)
    assert s["created"] == 20 + 5 + 4 + 6 + 7
    assert (s["completed"], s["failed"], s["killed"]) == (20, 5, 3)
    assert s["executing"] == 4
    assert sum(c["executing"] for c in s["per_core"]) == 4
    # killed tokens may stay counted in queue_depth until a worker pops them; the gauge does not
    assert s["admitted"] == 5
    assert s["waiting"] == 5

    latch.release()
    coord.resume()
    for t in holders:
        assert t.get(timeout=SAFETY) is None
    report = coord.drain(timeout=SAFETY)
    assert report["timed_out"] is False and report["remaining"] == 0, report
    s = coord.stats()
    assert_exact(s)
    assert s["waiting"] == s["admitted"] == s["executing"] == 0
    assert (s["completed"], s["failed"], s["killed"]) == (20 + 4 + 5 + 5, 5, 3)


def test_sane_under_load_and_exact_after_drain_and_stop(make_coord):
    """Snapshots taken continuously by a monitor thread while 4 threads submit a mix of
    succeeding, failing and killed tokens; exact equality after drain() and after stop()."""
    coord = make_coord(cores=2, workers_per_core=2, mailbox_capacity=16, pool_capacity=2000)
    per_thread = 3000
    n_threads = 4
    tokens: list = []
    tokens_lock = threading.Lock()
    finished = threading.Event()
    snapshots: list[dict] = []
    monitor_error: list[BaseException] = []

    def submitter(seed: int) -> None:
        rng = random.Random(seed)
        mine = []
        for i in range(per_thread):
            fn = _fail if rng.random() < 0.1 else _echo
            t = coord.submit(fn, i)
            if rng.random() < 0.05:
                t.kill()
            mine.append(t)
        with tokens_lock:
            tokens.extend(mine)

    def monitor() -> None:
        prev = None
        try:
            while not finished.is_set():
                s = coord.stats()
                assert_sane(s, prev)
                snapshots.append(s)
                prev = s
        except BaseException as exc:
            monitor_error.append(exc)

    mon = threading.Thread(target=monitor, name="stats-monitor")
    mon.start()
    threads = [threading.Thread(target=submitter, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SAFETY)
        assert not t.is_alive()

    report = coord.drain(timeout=SAFETY)
    finished.set()
    mon.join(SAFETY)
    assert not mon.is_alive()
    assert not monitor_error, monitor_error
    assert len(snapshots) >= 2  # the monitor really ran alongside the load
    assert report["timed_out"] is False and report["remaining"] == 0, report

    total = per_thread * n_threads
    after_drain = coord.stats()
    assert_exact(after_drain)
    assert_sane(after_drain, snapshots[-1])
    assert after_drain["created"] == total
    assert after_drain["waiting"] == after_drain["admitted"] == after_drain["executing"] == 0
    states = [t.state for t in tokens]
    assert all(st in FINAL for st in states)
    assert after_drain["completed"] == states.count(TokenState.COMPLETED)
    assert after_drain["failed"] == states.count(TokenState.FAILED)
    assert after_drain["killed"] == states.count(TokenState.KILLED)

    # admission stays closed after drain() until resume()
    with pytest.raises(AdmissionClosed):
        coord.submit(_echo, 0)
    coord.resume()
    late = [coord.submit(_echo, i) for i in range(50)]
    coord.stop()
    final = coord.stats()
    assert_exact(final)
    assert final["created"] == total + 50
    assert final["waiting"] == final["admitted"] == final["executing"] == 0
    assert [t.get(timeout=0) for t in late] == list(range(50))
    assert all(t.done() for t in tokens + late)


def test_exact_after_stop_without_wait_and_nothing_is_left_non_final(make_coord, make_latch):
    coord = make_coord(cores=2, workers_per_core=1, mailbox_capacity=4, pool_capacity=500)
    latch = make_latch()
    hold = task_token_guard(operation_type="hold", tags={"weight": "heavy"})(latch.enter)
    holders = [hold() for _ in range(2)]
    assert latch.wait_entered(2)
    queued = [coord.submit(_echo, i) for i in range(40)]  # mailboxes fill, the rest pools
    coord.pause()
    pooled = [coord.submit(_echo, i) for i in range(10)]

    stopper = threading.Thread(target=coord.stop, kwargs={"wait": False, "timeout": SAFETY})
    stopper.start()
    # everything that had not started is killed at once, even while the holders still run
    for t in queued + pooled:
        with pytest.raises(TokenKilled):
            t.get(timeout=SAFETY)
    assert all(t.state is TokenState.EXECUTING for t in holders)
    latch.release()
    stopper.join(SAFETY)
    assert not stopper.is_alive()

    s = coord.stats()
    assert_exact(s)
    assert s["created"] == 52
    assert s["killed"] == 50
    assert s["completed"] == 2
    assert s["waiting"] == s["admitted"] == s["executing"] == 0
    assert all(t.done() for t in holders + queued + pooled)
    assert all(t.state is TokenState.COMPLETED for t in holders)


def test_exact_after_stop_with_wait_finishes_everything(make_coord):
    coord = make_coord(cores=2, workers_per_core=2, pool_capacity=5000)
    coord.pause()
    tokens = [coord.submit(_fail if i % 7 == 0 else _echo, i) for i in range(3000)]
    s = coord.stats()
    assert_exact(s)  # paused, nothing moves: exact here too
    assert s["waiting"] == 3000
    coord.stop()  # stop() un-pauses and finishes the queue
    s = coord.stats()
    assert_exact(s)
    assert s["completed"] == sum(1 for i in range(3000) if i % 7)
    assert s["failed"] == sum(1 for i in range(3000) if i % 7 == 0)
    assert all(t.done() for t in tokens)
    assert all(t.state is TokenState.COMPLETED for i, t in enumerate(tokens) if i % 7)


def test_stop_without_wait_kills_every_token_that_had_not_started(make_coord):
    """``stop(wait=False)`` kills every token that has not started. With the coordinator paused
    and no worker busy, *no* queued token has started, so every one of them must end KILLED —
    none may slip onto a worker between un-pausing and killing. Twenty rounds make a race in
    that order show up reliably."""
    ran = []
    for round_ in range(20):
        coord = make_coord(cores=2, workers_per_core=2, pool_capacity=2000)
        coord.pause()
        tokens = [coord.submit(ran.append, (round_, i)) for i in range(500)]
        assert all(t.state is TokenState.WAITING for t in tokens)
        assert coord.stop(wait=False) is True
        assert all(t.done() for t in tokens)
        s = coord.stats()
        assert_exact(s)
        assert s["created"] == 500
    assert ran == [], f"{len(ran)} tokens ran although stop(wait=False) found them not started"
