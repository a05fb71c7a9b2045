"""Retries (issue #7): ``retries=N`` more attempts of the same token; ``retry_on`` filters;
``tokengate.Retry(delay=...)`` from a task; backoff with full jitter capped by
``retry_backoff_max``; ``retry_budget``; ``on_exhausted``; timeouts retryable when
``retry_on`` includes ``TokenTimeout``. The waiter sees only the final outcome.

Orders are checked by what tasks record; the few duration checks are lower bounds (a delay
that must have passed), or a SAFETY bound that only a broken cap could reach.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest

import tokengate
from _support import SAFETY, quiescent, wait_until
from tokengate import (
    Retry,
    TokenCancelled,
    TokenKilled,
    TokenState,
    TokenTimeout,
    task_token_guard,
)

SHORT = 0.05
EPS = 0.005  # clock rounding between the worker's and the test's monotonic reads


class Flaky:
    """Fails the first ``fails`` calls with ``exc(i)``, then returns ``value``; records every
    attempt (its start time, the current token) under a lock."""

    def __init__(self, fails: int, exc=OSError, value="ok") -> None:
        self.fails = fails
        self.exc = exc
        self.value = value
        self.calls = 0
        self.starts: list[float] = []
        self.tokens: list[object] = []
        self.raised: list[BaseException] = []
        self._lock = threading.Lock()

    def __call__(self):
        with self._lock:
            self.calls += 1
            n = self.calls
            self.starts.append(time.monotonic())
            self.tokens.append(tokengate.current_token())
        if n <= self.fails:
            err = self.exc(f"attempt {n}")
            self.raised.append(err)
            raise err
        return self.value


# --------------------------------------------------------------------------- attempts and outcome


def test_retried_token_succeeds_and_its_waiter_sees_only_the_result(make_coord):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    flaky = Flaky(fails=2)
    gate = threading.Event()
    outcomes = []

    def gated():
        gate.wait(SAFETY)
        return flaky()

    fn = task_token_guard(operation_type="rt_ok", retries=3)(gated)
    token = fn()
    callbacks = []
    token.add_done_callback(lambda t: callbacks.append(t.state))
    ready = threading.Event()

    def waiter():
        ready.set()
        try:
            outcomes.append(token.get(timeout=SAFETY))
        except BaseException as exc:
            outcomes.append(exc)

    th = threading.Thread(target=waiter, daemon=True)
    th.start()
    assert ready.wait(SAFETY)
    gate.set()
    th.join(SAFETY)
    assert outcomes == ["ok"]
    assert token.get(timeout=0) == "ok"
    assert token.state is TokenState.COMPLETED
    assert token.attempts == 3
    assert token.errors == flaky.raised  # each failed attempt's own exception object
    assert all(a is b for a, b in zip(token.errors, flaky.raised, strict=True))
    assert [str(e) for e in token.errors] == ["attempt 1", "attempt 2"]
    # every attempt ran as the same token
    assert all(t is token for t in flaky.tokens)
    assert callbacks == [TokenState.COMPLETED]
    s = quiescent(coord)
    assert s["retried"] == 2
    assert s["failed"] == 0
    assert s["completed"] == 1
    assert s["created"] == 1  # a retry is not a new token


def test_exhausted_retries_fail_with_the_last_error_and_call_on_exhausted_once(make_coord):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    flaky = Flaky(fails=10, exc=ConnectionError)
    exhausted = []
    fn = task_token_guard(
        operation_type="rt_exhausted",
        retries=2,
        on_exhausted=lambda t: exhausted.append((t, t.attempts)),
    )(flaky)
    token = fn()
    with pytest.raises(ConnectionError, match="attempt 3") as ei:
        token.get(timeout=SAFETY)
    assert ei.value is flaky.raised[-1]
    assert token.state is TokenState.FAILED
    assert token.attempts == 3
    assert token.errors == flaky.raised
    assert token.exception() is flaky.raised[-1]
    assert wait_until(lambda: len(exhausted) == 1)
    assert exhausted[0][0] is token
    assert exhausted[0][1] == 3
    s = quiescent(coord)
    assert s["failed"] == 1
    assert s["retried"] == 2
    assert len(exhausted) == 1


def test_on_exhausted_is_not_called_on_success_nor_without_retries(make_coord):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    calls = []
    ok = task_token_guard(operation_type="rt_noex_ok", retries=2, on_exhausted=calls.append)(
        Flaky(fails=1)
    )
    assert ok().get(timeout=SAFETY) == "ok"
    no_retries = task_token_guard(operation_type="rt_noex_0", on_exhausted=calls.append)(
        Flaky(fails=5)
    )
    token = no_retries()
    with pytest.raises(OSError):
        token.get(timeout=SAFETY)
    assert token.attempts == 1
    # something after both, so that a late callback would have run by now
    assert coord.submit(lambda: 0).get(timeout=SAFETY) == 0
    assert calls == []


def test_an_on_exhausted_callback_that_raises_is_logged_and_changes_nothing(make_coord, caplog):
    """As built (83b97dc): reported on the "tokengate" logger, like a done callback's error."""
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=1)

    def bad_callback(token):
        raise RuntimeError("callback exploded")

    fn = task_token_guard(operation_type="rt_badcb", retries=1, on_exhausted=bad_callback)(
        Flaky(fails=5, exc=KeyError)
    )
    with caplog.at_level(logging.ERROR, logger="tokengate"):
        token = fn()
        with pytest.raises(KeyError):
            token.get(timeout=SAFETY)
        assert coord.submit(lambda: "still works").get(timeout=SAFETY) == "still works"
        assert wait_until(lambda: "callback exploded" in caplog.text)
    assert any(r.name == "tokengate" and r.levelno >= logging.ERROR for r in caplog.records)
    assert token.state is TokenState.FAILED
    assert isinstance(token.exception(), KeyError)
    quiescent(coord)


# --------------------------------------------------------------------------- retry_on


def test_retry_on_filters_a_non_matching_error_fails_at_once(make_coord):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    flaky = Flaky(fails=5, exc=ValueError)
    fn = task_token_guard(operation_type="rt_filter", retries=3, retry_on=ConnectionError)(flaky)
    token = fn()
    with pytest.raises(ValueError, match="attempt 1"):
        token.get(timeout=SAFETY)
    assert token.attempts == 1
    assert flaky.calls == 1
    assert len(token.errors) == 1
    assert coord.stats()["retried"] == 0


def test_retry_on_matches_subclasses_and_tuples(make_coord):
    make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    sub = task_token_guard(operation_type="rt_sub", retries=2, retry_on=ConnectionError)(
        Flaky(fails=2, exc=ConnectionResetError)
    )
    token = sub()
    assert token.get(timeout=SAFETY) == "ok"
    assert token.attempts == 3

    class Mine(Exception):
        pass

    tup = task_token_guard(operation_type="rt_tuple", retries=2, retry_on=(KeyError, Mine))(
        Flaky(fails=2, exc=Mine)
    )
    token = tup()
    assert token.get(timeout=SAFETY) == "ok"
    assert token.attempts == 3


def test_default_retry_on_retries_any_exception(make_coord):
    make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    for exc in (ValueError, KeyError, RuntimeError, ZeroDivisionError):
        token = task_token_guard(operation_type=f"rt_default_{exc.__name__}", retries=1)(
            Flaky(fails=1, exc=exc)
        )()
        assert token.get(timeout=SAFETY) == "ok"
        assert token.attempts == 2


def test_retries_per_call_through_options(make_coord):
    make_coord(grow_on_demand=False, cores=1, workers_per_core=2)

    @task_token_guard(operation_type="rt_options")
    def once(flaky):
        return flaky()

    plain = once(Flaky(fails=1))
    with pytest.raises(OSError):
        plain.get(timeout=SAFETY)
    assert plain.attempts == 1
    retried = once.options(retries=2)(Flaky(fails=1))
    assert retried.get(timeout=SAFETY) == "ok"
    assert retried.attempts == 2
    filtered = once.options(retries=2, retry_on=KeyError)(Flaky(fails=1, exc=OSError))
    with pytest.raises(OSError):
        filtered.get(timeout=SAFETY)
    assert filtered.attempts == 1


# --------------------------------------------------------------------------- Retry(delay=...)


def test_retry_raised_by_the_task_is_retried_whatever_retry_on_says(make_coord):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    calls = []

    @task_token_guard(operation_type="rt_Retry", retries=3, retry_on=KeyError)
    def fn():
        calls.append(1)
        if len(calls) < 3:
            raise Retry(delay=0, reason=f"not yet {len(calls)}")
        return len(calls)

    token = fn()
    assert token.get(timeout=SAFETY) == 3
    assert token.attempts == 3
    assert [type(e) for e in token.errors] == [Retry, Retry]
    assert str(token.errors[0]) == "not yet 1"
    assert coord.stats()["retried"] == 2


def test_retry_with_no_attempts_left_fails_with_the_retry(make_coord):
    make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    exhausted = []

    @task_token_guard(operation_type="rt_Retry_exh", retries=1, on_exhausted=exhausted.append)
    def fn():
        raise Retry(delay=0)

    token = fn()
    with pytest.raises(Retry):
        token.get(timeout=SAFETY)
    assert token.attempts == 2
    assert wait_until(lambda: exhausted == [token])

    zero = task_token_guard(operation_type="rt_Retry_zero")(lambda: (_ for _ in ()).throw(Retry()))
    token = zero()
    with pytest.raises(Retry):
        token.get(timeout=SAFETY)
    assert token.attempts == 1


def test_retry_delay_is_honoured_as_a_lower_bound(make_coord):
    make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    starts = []

    @task_token_guard(operation_type="rt_Retry_delay", retries=1)
    def fn():
        starts.append(time.monotonic())
        if len(starts) == 1:
            raise Retry(delay=0.1)
        return "second"

    token = fn()
    assert token.get(timeout=SAFETY) == "second"
    assert starts[1] - starts[0] >= 0.1 - EPS


@pytest.mark.parametrize(
    "delay,exc", [(-1, ValueError), ("1", TypeError), (float("nan"), TypeError), (True, TypeError)]
)
def test_retry_rejects_a_bad_delay(delay, exc):
    with pytest.raises(exc, match="delay"):
        Retry(delay=delay)


# --------------------------------------------------------------------------- backoff


def test_backoff_without_jitter_waits_at_least_the_exponential_delay(make_coord):
    make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    flaky = Flaky(fails=2)
    token = task_token_guard(
        operation_type="rt_backoff", retries=2, retry_backoff=0.04, retry_jitter=False
    )(flaky)()
    assert token.get(timeout=SAFETY) == "ok"
    gaps = [b - a for a, b in zip(flaky.starts, flaky.starts[1:], strict=False)]
    assert gaps[0] >= 0.04 - EPS
    assert gaps[1] >= 0.08 - EPS


def test_retry_backoff_max_caps_the_delay(make_coord):
    """12 retries from 0.01 s doubling would wait 0.01 * (2**12 - 1) = 41 s in all, past
    SAFETY; capped at 0.01 s they take about 0.12 s."""
    make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    flaky = Flaky(fails=12)
    token = task_token_guard(
        operation_type="rt_cap",
        retries=12,
        retry_backoff=0.01,
        retry_backoff_max=0.01,
        retry_jitter=False,
    )(flaky)()
    assert token.get(timeout=SAFETY) == "ok"
    assert token.attempts == 13
    gaps = [b - a for a, b in zip(flaky.starts, flaky.starts[1:], strict=False)]
    assert all(g >= 0.01 - EPS for g in gaps)


def test_backoff_from_the_decorator_applies_to_retries_given_per_call(make_coord):
    """Declare the retry policy once, enable retries per call."""
    make_coord(grow_on_demand=False, cores=1, workers_per_core=2)

    @task_token_guard(operation_type="rt_deco_backoff", retry_backoff=0.05, retry_jitter=False)
    def fetch(flaky):
        return flaky()

    flaky = Flaky(fails=1)
    token = fetch.options(retries=1)(flaky)
    assert token.get(timeout=SAFETY) == "ok"
    assert token.attempts == 2
    assert flaky.starts[1] - flaky.starts[0] >= 0.05 - EPS


def test_full_jitter_spreads_the_delays_below_the_backoff(make_coord):
    """With full jitter each delay is uniform in [0, backoff]: among 20 tokens at least one
    waited less than half the backoff (all waiting more has probability 2**-20)."""
    make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    flakies = [Flaky(fails=1) for _ in range(20)]
    tokens = [
        task_token_guard(operation_type="rt_jitter", retries=1, retry_backoff=0.2)(f)()
        for f in flakies
    ]
    for t in tokens:
        assert t.get(timeout=SAFETY) == "ok"
    gaps = sorted(f.starts[1] - f.starts[0] for f in flakies)
    assert gaps[0] < 0.1, gaps
    assert gaps[-1] - gaps[0] > 0.01, gaps  # not one fixed delay


# ------------------------------------------------------- a delayed retry frees its worker


def test_a_delayed_retry_occupies_no_worker_and_then_goes_ahead_of_the_queue(
    make_coord, make_latch
):
    """1 core x 1 worker. A fails and waits 0.1 s for its retry; meanwhile B runs (proving the
    worker is free) and holds the worker while C and D queue and A's retry becomes due. When
    B ends, A's retry runs before C and D."""
    coord = make_coord(cores=1, workers_per_core=1, grow_on_demand=False)
    latch = make_latch()
    order: list[str] = []

    @task_token_guard(operation_type="rt_a", retries=1, retry_backoff=0.1, retry_jitter=False)
    def a():
        attempt = tokengate.current_token().attempts
        order.append(f"a{attempt}")
        if attempt == 1:
            raise OSError("first attempt")
        return "a"

    @task_token_guard(operation_type="rt_b")
    def b():
        order.append("b")
        latch.enter()

    plain = task_token_guard(operation_type="rt_cd")(order.append)

    ta = a()
    assert wait_until(lambda: len(ta.errors) == 1)
    tb = b()
    assert latch.wait_entered(1)  # the only worker took B while A waits for its retry
    assert ta.attempts == 1
    assert ta.state is not TokenState.EXECUTING
    tc, td = plain("c"), plain("d")
    # A's retry becomes due while B holds the worker: it is then queued, no longer delayed
    assert wait_until(lambda: coord.stats()["held"] == 0)
    latch.release()
    for t in (ta, tb, tc, td):
        t.get(timeout=SAFETY)
    assert order == ["a1", "b", "a2", "c", "d"]
    assert ta.attempts == 2
    quiescent(coord)


def test_reprioritize_a_retry_waiting_for_its_delay(make_coord):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=1)
    token = task_token_guard(
        operation_type="rt_reprio", retries=1, retry_backoff=0.1, retry_jitter=False
    )(Flaky(fails=1))()
    assert wait_until(lambda: len(token.errors) == 1)
    assert coord.reprioritize(token, "low") is True
    assert token.priority == "low"
    assert token.get(timeout=SAFETY) == "ok"


def test_kill_during_the_retry_delay_ends_the_token_and_stops_retrying(make_coord):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=1)
    flaky = Flaky(fails=5)
    exhausted = []
    token = task_token_guard(
        operation_type="rt_kill_delay",
        retries=5,
        retry_backoff=0.2,
        retry_jitter=False,
        on_exhausted=exhausted.append,
    )(flaky)()
    assert wait_until(lambda: len(token.errors) == 1)
    assert token.kill() is True
    assert token.state is TokenState.KILLED
    with pytest.raises(TokenKilled):
        token.get(timeout=0)
    # the retry's due time (0.2 s) passes during this delayed probe; nothing may run again
    probe = task_token_guard(
        operation_type="rt_probe", retries=1, retry_backoff=0.3, retry_jitter=False
    )(Flaky(fails=1))()
    assert probe.get(timeout=SAFETY) == "ok"
    assert flaky.calls == 1
    assert token.attempts == 1
    assert exhausted == []
    quiescent(coord)


def test_a_token_killed_during_its_retry_delay_is_no_longer_counted_as_held(make_coord):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=1)
    token = task_token_guard(
        operation_type="rt_kill_delay_held", retries=1, retry_backoff=5.0, retry_jitter=False
    )(Flaky(fails=1))()
    assert wait_until(lambda: len(token.errors) == 1)
    assert wait_until(lambda: coord.stats()["held"] == 1)
    assert token.kill() is True
    s = coord.stats()
    assert s["waiting"] == 0
    assert s["held"] == 0


# --------------------------------------------------------------------------- retry budget


def test_retry_budget_stops_retrying(make_coord):
    """Delays 0.02, 0.04, 0.08, ... from submission: by the 4th retry 0.14 s passed, beyond a
    0.1 s budget, so at most 4 attempts start whatever the machine's speed."""
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    flaky = Flaky(fails=1000)
    exhausted = []
    token = task_token_guard(
        operation_type="rt_budget",
        retries=100,
        retry_backoff=0.02,
        retry_jitter=False,
        retry_budget=0.1,
        on_exhausted=exhausted.append,
    )(flaky)()
    with pytest.raises(OSError):
        token.get(timeout=SAFETY)
    assert token.state is TokenState.FAILED
    assert 1 <= token.attempts <= 4
    assert token.attempts == flaky.calls == len(token.errors)
    assert wait_until(lambda: exhausted == [token])
    quiescent(coord)


def test_a_retry_delay_past_the_budget_fails_now_rather_than_waiting(make_coord):
    make_coord(grow_on_demand=False, cores=1, workers_per_core=2)

    @task_token_guard(operation_type="rt_budget_now", retries=5, retry_budget=1.0)
    def fn():
        raise Retry(delay=60)

    token = fn()
    # had it waited 60 s for a retry that may not start, this would time out
    with pytest.raises(Retry):
        token.get(timeout=SAFETY)
    assert token.attempts == 1


# --------------------------------------------------------------------------- timeouts and retries


def test_a_timed_out_attempt_is_retried_when_retry_on_includes_token_timeout(
    make_coord, make_latch
):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    latch = make_latch()
    seen = []

    @task_token_guard(
        operation_type="rt_timeout", timeout=SHORT, retries=1, retry_on=(TokenTimeout,)
    )
    def fn():
        me = tokengate.current_token()
        if me.attempts == 1:
            latch.enter()  # the first attempt outlives its timeout
            try:
                tokengate.checkpoint()
            except TokenCancelled as exc:
                seen.append(exc)
                raise
            return "first"
        return "second"

    token = fn()
    assert token.get(timeout=SAFETY) == "second"
    assert token.state is TokenState.COMPLETED
    assert token.attempts == 2
    assert len(token.errors) == 1
    assert isinstance(token.errors[0], TokenTimeout)
    assert not latch.released  # the first attempt's thread was still inside
    latch.release()
    # the replaced attempt's checkpoint() raised, and its outcome was discarded
    assert wait_until(lambda: len(seen) == 1)
    assert wait_until(lambda: coord.stats()["discarded"] == 1)
    s = quiescent(coord)
    assert s["completed"] == 1
    assert s["timed_out"] == 0
    assert s["retried"] == 1


def test_each_attempt_gets_its_full_timeout(make_coord):
    """timeout=0.2: attempt 1 runs out its 0.2 s; attempt 2, started at about 0.2 s, runs for
    at least 0.1 s more (until a 0.1 s witness timed out). Had its deadline been counted from
    the token's submission it would have been overdue at once."""
    make_coord(grow_on_demand=False, cores=1, workers_per_core=3)

    def until_cancelled():
        def cancelled():
            try:
                tokengate.checkpoint()
            except TokenCancelled:
                return True
            return False

        assert wait_until(cancelled)
        tokengate.checkpoint()

    witness = task_token_guard(operation_type="rt_witness", timeout=0.1)(until_cancelled)

    @task_token_guard(operation_type="rt_full", timeout=0.2, retries=1, retry_on=TokenTimeout)
    def fn():
        if tokengate.current_token().attempts == 1:
            until_cancelled()
        w = witness()
        with pytest.raises(TokenTimeout):
            w.get(timeout=SAFETY)
        return "second"

    token = fn()
    assert token.get(timeout=SAFETY) == "second"
    assert token.attempts == 2
    assert [type(e) for e in token.errors] == [TokenTimeout]


def test_a_timeout_is_not_retried_by_default(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    latch = make_latch()
    token = task_token_guard(operation_type="rt_timeout_default", timeout=SHORT, retries=3)(
        latch.enter
    )()
    with pytest.raises(TokenTimeout):
        token.get(timeout=SAFETY)
    assert token.state is TokenState.TIMED_OUT
    assert token.attempts == 1
    latch.release()
    assert wait_until(lambda: coord.stats()["discarded"] == 1)
    assert coord.stats()["retried"] == 0


def test_a_token_that_timed_out_before_it_started_is_not_retried(make_coord, make_latch):
    coord = make_coord(cores=1, workers_per_core=1, grow_on_demand=False)
    latch = make_latch()
    ran = []
    blocker = coord.submit(latch.enter)
    assert latch.wait_entered(1)
    token = task_token_guard(
        operation_type="rt_timeout_queued", timeout=SHORT, retries=3, retry_on=TokenTimeout
    )(ran.append)(1)
    with pytest.raises(TokenTimeout):
        token.get(timeout=SAFETY)
    assert token.attempts == 0
    latch.release()
    blocker.get(timeout=SAFETY)
    assert coord.submit(lambda: 0).get(timeout=SAFETY) == 0
    assert ran == []
    assert token.state is TokenState.TIMED_OUT


# --------------------------------------------------------------------------- retries and permits


def test_waiting_for_a_permit_spends_no_attempt_and_retries_reacquire_it(make_coord, make_latch):
    """SLOW limit 1 with 3 workers: held tokens have 0 attempts; each retry takes the permit
    again (the peak never exceeds 1) and every token completes."""
    coord = make_coord(
        grow_on_demand=False, cores=1, workers_per_core=3, storage_limits={"SLOW": 1}
    )
    latch = make_latch()
    lock = threading.Lock()
    state = {"now": 0, "peak": 0}
    calls: dict[int, int] = {}

    @task_token_guard(
        operation_type="rt_permit", tags={"storage_speed": "SLOW"}, retries=2, retry_on=OSError
    )
    def write(i):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
            calls[i] = calls.get(i, 0) + 1
            n = calls[i]
        try:
            if i == 0 and n == 1:
                latch.enter()
            if n == 1:
                raise OSError(f"transient {i}")
            return i
        finally:
            with lock:
                state["now"] -= 1

    tokens = [write(i) for i in range(5)]
    assert latch.wait_entered(1)
    assert wait_until(lambda: coord.stats()["storage"]["SLOW"]["held"] == 4)
    assert [t.attempts for t in tokens[1:]] == [0, 0, 0, 0]
    latch.release()
    assert [t.get(timeout=SAFETY) for t in tokens] == list(range(5))
    assert [t.attempts for t in tokens] == [2] * 5
    assert state["peak"] == 1
    quiescent(coord)


def test_waiting_for_a_concurrency_limit_spends_no_attempt(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=3)
    latch = make_latch()

    @task_token_guard(operation_type="rt_limit", max_concurrency=1, retries=1)
    def fn(hold):
        if hold:
            latch.enter()
        return hold

    first = fn(True)
    assert latch.wait_entered(1)
    held = [fn(False) for _ in range(3)]
    assert wait_until(lambda: coord.stats()["held"] == 3)
    assert [t.attempts for t in held] == [0, 0, 0]
    latch.release()
    assert [t.get(timeout=SAFETY) for t in held] == [False] * 3
    assert first.get(timeout=SAFETY) is True
    assert [t.attempts for t in [first, *held]] == [1, 1, 1, 1]
    assert coord.stats()["retried"] == 0
