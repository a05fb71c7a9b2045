"""Hypothesis stateful test: random sequences of submit, kill, pause, resume, drain, release
and a final stop() against a small coordinator, with the model's invariants checked after every
step.

The model knows, for each accepted token, what its task does (return a value, raise, or block on
an Event the test controls) and whether the test killed it. Tasks never sleep: a blocking task
waits on its Event, which the ``release`` rule (or the teardown) sets.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    rule,
)

from _support import SAFETY
from tokengate import (
    AdmissionClosed,
    OperationsCoordinator,
    PoolFull,
    TokenKilled,
    TokenState,
    TokenTimeout,
)

FINAL = {TokenState.COMPLETED, TokenState.FAILED, TokenState.KILLED}
STARTED = {TokenState.EXECUTING, TokenState.COMPLETED, TokenState.FAILED}
POOL_CAPACITY = 6
SHORT = 0.02  # drain() timeout when blocked tasks make a timeout certain


class Boom(Exception):
    pass


def _returns(value: int) -> int:
    return value


def _raises(exc: Boom) -> None:
    raise exc


def _blocks(event: threading.Event, value: int) -> int:
    if not event.wait(SAFETY):
        raise RuntimeError("blocked task was never released (test bug)")
    return value


@dataclass
class Tracked:
    token: object
    kind: str  # "return" | "raise" | "block"
    value: object  # the return value, or the exception instance
    event: threading.Event | None = None
    killed_by_test: bool = False


class CoordinatorMachine(RuleBasedStateMachine):
    tokens = Bundle("tokens")

    def __init__(self) -> None:
        super().__init__()
        self.coord = OperationsCoordinator(
            cores=2,
            workers_per_core=2,
            mailbox_capacity=2,
            pool_capacity=POOL_CAPACITY,
            overflow="reject",
        )
        self.coord.start()
        self.tracked: list[Tracked] = []
        self.events: list[threading.Event] = [threading.Event()]
        self.accepted = 0
        self.paused = False
        self.admission_open = True
        self.prev_stats: dict | None = None
        self.counter = 0

    # -- helpers -----------------------------------------------------------------------

    @property
    def event(self) -> threading.Event:
        return self.events[-1]

    def blocked(self) -> list[Tracked]:
        """Tracked tokens whose task waits on an Event not set yet (and not killed)."""
        return [
            t
            for t in self.tracked
            if t.kind == "block" and not t.event.is_set() and t.token.state is not TokenState.KILLED
        ]

    # -- rules ---------------------------------------------------------------------------

    @rule(target=tokens, kind=st.sampled_from(["return", "raise", "block"]))
    def submit(self, kind):
        self.counter += 1
        event = None
        if kind == "return":
            value: object = self.counter
            args = (_returns, value)
        elif kind == "raise":
            value = Boom(self.counter)
            args = (_raises, value)
        else:
            event = self.event
            value = self.counter
            args = (_blocks, event, value)
        in_flight_before = sum(1 for t in self.tracked if not t.token.done())
        try:
            token = self.coord.submit(*args)
        except AdmissionClosed:
            assert not self.admission_open
            return None
        except PoolFull:
            assert self.admission_open
            # the pool holds only tokens that are not final; while paused none can leave it
            if self.paused:
                assert in_flight_before >= POOL_CAPACITY
            return None
        assert self.admission_open, "a submission was accepted while admission was closed"
        self.accepted += 1
        if self.paused:
            assert token.state is TokenState.WAITING
        tracked = Tracked(token, kind, value, event)
        self.tracked.append(tracked)
        return tracked

    @rule(tracked=tokens)
    def kill(self, tracked):
        if tracked is None:
            return
        was = tracked.token.state
        # cancel_queued(): kill only if it has not started (kill() of a running token, which
        # makes it CANCELLING, is covered by tests/test_policy_cancel.py)
        if tracked.token.cancel_queued():
            assert was not in STARTED, was
            assert tracked.token.state is TokenState.KILLED
            assert tracked.token.done()
            tracked.killed_by_test = True
        else:
            # refused: it had started (or finished), or it was killed already
            assert tracked.killed_by_test or tracked.token.state in STARTED, tracked.token.state

    @rule()
    def pause(self):
        self.coord.pause()
        self.paused = True
        assert self.coord.paused

    @rule()
    def resume(self):
        self.coord.resume()
        self.paused = False
        self.admission_open = True
        assert not self.coord.paused and self.coord.admission_open

    @rule()
    def release(self):
        self.event.set()
        self.events.append(threading.Event())

    @rule()
    def drain(self):
        blocked = self.blocked()
        if blocked:
            # tasks held by an unset Event cannot finish: the drain must time out
            report = self.coord.drain(timeout=SHORT)
            assert report["timed_out"] is True, report
            assert report["remaining"] >= len(blocked), report
        else:
            report = self.coord.drain(timeout=SAFETY)
            assert report["timed_out"] is False, report
            assert report["remaining"] == 0, report
            assert all(t.token.done() for t in self.tracked)
            s = self.coord.stats()
            assert s["waiting"] == s["admitted"] == s["executing"] == 0, s
            assert s["created"] == s["completed"] + s["failed"] + s["killed"], s
        self.paused = False  # drain() un-pauses
        self.admission_open = False
        assert not self.coord.admission_open and not self.coord.paused

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def tokens_are_consistent(self):
        for t in self.tracked:
            token = t.token
            state = token.state
            if t.killed_by_test:
                assert state is TokenState.KILLED
            if state is TokenState.KILLED:
                assert t.killed_by_test, "a token nobody killed is KILLED"
            if not token.done():
                assert state not in FINAL, state
                continue
            assert state in FINAL, state
            if state is TokenState.KILLED:
                with pytest.raises(TokenKilled):
                    token.get(timeout=0)
            elif state is TokenState.FAILED:
                assert t.kind == "raise"
                assert token.exception(timeout=0) is t.value
                with pytest.raises(Boom) as ei:
                    token.get(timeout=0)
                assert ei.value is t.value
            else:
                assert t.kind in ("return", "block")
                assert token.get(timeout=0) == t.value
                assert token.exception(timeout=0) is None
        for t in self.blocked():
            # a task held by an unset Event cannot be final
            assert not t.token.done()
            with pytest.raises(TokenTimeout):
                t.token.get(timeout=0)

    @invariant()
    def stats_are_sane(self):
        s = self.coord.stats()
        for k in ("created", "waiting", "admitted", "executing", "completed", "failed", "killed"):
            assert s[k] >= 0, (k, s)
        assert s["illegal_transitions"] == 0, s
        assert s["created"] == self.accepted, (s["created"], self.accepted)
        assert s["killed"] == sum(t.killed_by_test for t in self.tracked), s
        assert s["completed"] + s["failed"] + s["killed"] <= s["created"], s
        if self.prev_stats is not None:
            for k in ("created", "completed", "failed", "killed"):
                assert s[k] >= self.prev_stats[k], (k, self.prev_stats, s)
        self.prev_stats = s
        assert self.coord.paused == self.paused
        assert self.coord.admission_open == self.admission_open

    # -- the final stop() ----------------------------------------------------------------

    def teardown(self):
        for event in self.events:
            event.set()
        try:
            if self.coord.running:
                assert self.coord.stop(timeout=SAFETY) is True
            assert not self.coord.running
            for t in self.tracked:
                assert t.token.done(), t.token.state
                if t.killed_by_test:
                    assert t.token.state is TokenState.KILLED
                elif t.kind == "raise":
                    assert t.token.state is TokenState.FAILED
                else:
                    assert t.token.state is TokenState.COMPLETED
                    assert t.token.get(timeout=0) == t.value
            s = self.coord.stats()
            assert s["created"] == self.accepted
            assert s["waiting"] == s["admitted"] == s["executing"] == 0, s
            assert s["created"] == s["completed"] + s["failed"] + s["killed"], s
            assert s["illegal_transitions"] == 0
        finally:
            if self.coord.running:
                self.coord.stop(wait=False, timeout=SAFETY)


CoordinatorMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCoordinatorMachine = pytest.mark.timeout(120)(CoordinatorMachine.TestCase)
