"""TokenState: every state observed, timestamps, and the stats() invariant."""

from __future__ import annotations

import itertools
import time
from enum import IntEnum

import pytest

from _support import SAFETY, wait_until
from tokengate import TokenKilled, TokenState, task_token_guard

# time.monotonic() vs. the core's clock: both read CLOCK_MONOTONIC, allow float rounding only.
EPS = 1e-3

FINAL = {
    TokenState.COMPLETED,
    TokenState.FAILED,
    TokenState.KILLED,
    TokenState.TIMED_OUT,
    TokenState.QUARANTINED,
}


def test_token_state_enum_matches_contract():
    assert issubclass(TokenState, IntEnum)
    assert [s.name for s in TokenState] == [
        "CREATED",
        "WAITING",
        "ADMITTED",
        "EXECUTING",
        "COMPLETED",
        "FAILED",
        "KILLED",
        "TIMED_OUT",
        "CANCELLING",
        "QUARANTINED",
    ]
    assert {s for s in TokenState if s.is_final} == FINAL
    assert {s for s in TokenState if s.is_settled} == FINAL | {TokenState.CANCELLING}
    # declared in lifecycle order
    values = [int(s) for s in TokenState]
    assert values == sorted(values)
    assert len(set(values)) == len(values)


def test_waiting_while_paused(coord):
    coord.pause()
    assert coord.paused
    t0 = time.monotonic()
    token = coord.submit(lambda: "x")
    t1 = time.monotonic()
    assert token.state is TokenState.WAITING
    assert not token.done()
    assert token.core_id is None
    assert token.worker_id is None
    assert token.created_at is not None
    assert t0 - EPS <= token.created_at <= t1 + EPS
    assert token.admitted_at is None
    assert token.started_at is None
    assert token.finished_at is None
    assert token.wait(timeout=0.02) is False
    coord.resume()
    assert not coord.paused
    assert token.get(timeout=SAFETY) == "x"
    assert token.state is TokenState.COMPLETED


def test_admitted_while_worker_busy(make_coord, make_latch):
    coord = make_coord(cores=1, workers_per_core=1)
    latch = make_latch()
    blocker = coord.submit(latch.enter)
    assert latch.wait_entered(1)

    queued = coord.submit(lambda: "later")
    # The only worker is busy: once routed, the token sits ADMITTED in its mailbox.
    assert wait_until(lambda: queued.core_id is not None, timeout=5)
    assert queued.state is TokenState.ADMITTED
    assert queued.core_id == 1
    assert queued.admitted_at is not None
    assert queued.started_at is None
    assert queued.finished_at is None
    assert coord.stats()["admitted"] >= 1

    latch.release()
    assert blocker.get() is None
    assert queued.get() == "later"
    assert queued.admitted_at <= queued.started_at


def test_executing_while_held(make_coord, make_latch):
    coord = make_coord(cores=1, workers_per_core=1)
    latch = make_latch()
    token = coord.submit(lambda: latch.enter() or "released")
    assert latch.wait_entered(1)
    assert token.state is TokenState.EXECUTING
    assert not token.done()
    assert token.core_id == 1
    assert token.worker_id == 0
    assert token.admitted_at is not None
    assert token.started_at is not None
    assert token.finished_at is None
    stats = coord.stats()
    assert stats["executing"] == 1
    assert stats["per_core"][0]["executing"] == 1
    latch.release()
    assert token.get() == "released"


def test_completed_timestamps_ordered(coord):
    t0 = time.monotonic()
    token = coord.submit(lambda: 1)
    assert token.get() == 1
    t1 = time.monotonic()
    assert token.state is TokenState.COMPLETED
    ts = [token.created_at, token.admitted_at, token.started_at, token.finished_at]
    assert all(isinstance(t, float) for t in ts), ts
    assert ts == sorted(ts)
    assert t0 - EPS <= ts[0]
    assert ts[-1] <= t1 + EPS


def test_failed_state_and_timestamps(coord):
    def boom():
        raise ValueError("nope")

    token = coord.submit(boom)
    with pytest.raises(ValueError, match="nope"):
        token.get()
    assert token.state is TokenState.FAILED
    ts = [token.created_at, token.admitted_at, token.started_at, token.finished_at]
    assert None not in ts
    assert ts == sorted(ts)


def test_killed_state(coord):
    coord.pause()
    token = coord.submit(lambda: 1)
    assert token.kill() is True
    assert token.state is TokenState.KILLED
    assert token.started_at is None
    with pytest.raises(TokenKilled):
        token.get()
    coord.resume()


def test_timestamps_monotonic_across_sequential_tokens(make_coord):
    coord = make_coord(cores=1, workers_per_core=1)
    tokens = []
    for i in range(20):
        tok = coord.submit(lambda i=i: i)
        assert tok.get() == i
        tokens.append(tok)
    for prev, nxt in itertools.pairwise(tokens):
        assert prev.created_at <= nxt.created_at
        # sequential: the next one was created after the previous one finished
        assert prev.finished_at <= nxt.created_at + EPS
        assert prev.started_at <= nxt.started_at


def test_observed_states_never_go_backwards(make_coord, make_latch):
    coord = make_coord(cores=1, workers_per_core=1)
    latch = make_latch()
    coord.pause()
    token = coord.submit(lambda: latch.enter() or "v")
    observed = [token.state]
    coord.resume()
    observed.append(token.state)
    assert latch.wait_entered(1)
    observed.append(token.state)
    latch.release()
    token.wait(SAFETY)
    observed.append(token.state)
    assert observed[0] is TokenState.WAITING
    assert observed[2] is TokenState.EXECUTING
    assert observed[-1] is TokenState.COMPLETED
    assert observed == sorted(observed)


def test_stats_invariant_at_quiescence(make_coord, make_latch):
    coord = make_coord(cores=2, workers_per_core=2, pool_capacity=500, mailbox_capacity=16)

    def fail():
        raise RuntimeError("f")

    ok = [coord.submit(lambda i=i: i) for i in range(30)]
    bad = [coord.submit(fail) for _ in range(7)]
    assert [t.get() for t in ok] == list(range(30))
    for t in bad:
        assert isinstance(t.exception(), RuntimeError)

    coord.pause()
    waiting = [coord.submit(lambda: None) for _ in range(5)]
    for t in waiting[:2]:
        assert t.kill()

    def invariant(s):
        return s["created"] == (
            s["waiting"]
            + s["admitted"]
            + s["executing"]
            + s["completed"]
            + s["failed"]
            + s["killed"]
        )

    assert wait_until(lambda: coord.stats()["executing"] == 0, timeout=5)
    s = coord.stats()
    assert s["created"] == 42
    assert s["completed"] == 30
    assert s["failed"] == 7
    assert s["killed"] == 2
    assert s["waiting"] == 3
    assert s["admitted"] == 0
    assert s["executing"] == 0
    assert invariant(s), s
    assert s["illegal_transitions"] == 0

    coord.resume()
    for t in waiting[2:]:
        assert t.get() is None
    assert wait_until(lambda: coord.stats()["executing"] == 0, timeout=5)
    s = coord.stats()
    assert s["completed"] == 33
    assert s["waiting"] == 0
    assert invariant(s), s
    assert s["illegal_transitions"] == 0


def test_stats_reports_configuration(make_coord):
    coord = make_coord(cores=3, workers_per_core=2, pool_capacity=77, mailbox_capacity=9)
    s = coord.stats()
    assert s["cores"] == 3
    assert s["workers_per_core"] == 2
    assert s["pool_capacity"] == 77
    assert s["mailbox_capacity"] == 9
    assert [c["core"] for c in s["per_core"]] == [1, 2, 3]
    for core in s["per_core"]:
        assert core["active_workers"] == 2
        assert core["queue_depth"] == 0
        assert core["executing"] == 0
        assert core["routed"] == {"heavy": 0, "medium": 0, "light": 0}
        assert core["cpu"] in coord.cpu_map
    assert [c["cpu"] for c in s["per_core"]] == coord.cpu_map


def test_queue_depth_counts_admitted_tokens(make_coord, make_latch):
    coord = make_coord(cores=1, workers_per_core=1, mailbox_capacity=50)
    latch = make_latch()
    blocker = task_token_guard(tags={"weight": "heavy"})(latch.enter)()
    assert latch.wait_entered(1)
    queued = [coord.submit(lambda i=i: i) for i in range(10)]
    assert wait_until(lambda: all(t.core_id is not None for t in queued), timeout=5)
    s = coord.stats()
    assert s["per_core"][0]["queue_depth"] == 10
    assert s["admitted"] == 10
    assert s["executing"] == 1
    latch.release()
    blocker.get()
    assert [t.get() for t in queued] == list(range(10))
    assert all(t.state in FINAL for t in queued)
    assert wait_until(lambda: coord.stats()["per_core"][0]["queue_depth"] == 0, timeout=5)
