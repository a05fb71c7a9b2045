"""Regression tests for the defects an adversarial review of the execution-policy core found:
each would hang a waiter, crash, break a limit or miscount before its fix."""

from __future__ import annotations

import threading

import pytest

import tokengate
from _support import SAFETY, wait_until
from tokengate import OperationsCoordinator, PoolFull, TokenState, TokenTimeout, task_token_guard


@pytest.mark.parametrize("how", ["fail", "kill"])
def test_a_long_chain_ended_by_its_head_does_not_recurse(make_coord, how):
    """Ending a 10 000-step chain from its head (a failure on the worker, a kill on the caller)
    ends every step without one stack frame per step (it used to segfault)."""
    coord = make_coord(cores=1, workers_per_core=1)
    coord.pause()
    head = coord.submit(lambda: 1 / 0) if how == "fail" else coord.submit(int)
    tail = head
    for _ in range(10_000):
        tail = tail.then(int)
    if how == "kill":
        assert head.kill()
    coord.resume()
    assert tail.wait(SAFETY)
    assert tail.state is (TokenState.FAILED if how == "fail" else TokenState.KILLED)
    assert tail.attempts == 0


def test_a_retry_due_after_stop_is_killed_not_left_waiting():
    """A task that outlives stop(timeout=...) and then fails with a retry to come: the retry
    can never run (the timers and workers are gone), so the token ends KILLED, and its waiter
    sees it."""
    entered, release = threading.Event(), threading.Event()

    @task_token_guard(retries=1, retry_backoff=0.2, retry_jitter=False, timeout=30)
    def slow_then_fail():
        entered.set()
        release.wait(SAFETY)
        raise OSError("transient")

    coord = OperationsCoordinator(cores=1, workers_per_core=1, grow_on_demand=False).start()
    try:
        tok = slow_then_fail()
        assert entered.wait(SAFETY)
        assert coord.stop(timeout=0.05) is False  # the task still runs
        release.set()
        assert tok.wait(SAFETY)
        assert tok.state is TokenState.KILLED
    finally:
        release.set()
        coord.stop()


def test_an_abandoned_attempt_leaves_the_new_attempts_permit_alone(make_coord):
    """With TokenTimeout retried, attempt 1 is abandoned at its deadline and attempt 2 takes
    the only permit; when attempt 1's thread returns it must not give that permit back."""
    first_release, second_started, second_release = (threading.Event() for _ in range(3))
    coord = make_coord(cores=1, workers_per_core=4, grow_on_demand=False)

    @task_token_guard(
        operation_type="review_lim",
        max_concurrency=1,
        timeout=0.2,
        retries=1,
        retry_on=(TokenTimeout,),
    )
    def job(name):
        if name == "A":
            if tokengate.current_token().attempts == 1:
                first_release.wait(SAFETY)  # ignores checkpoint(): abandoned at its deadline
            else:
                second_started.set()
                second_release.wait(SAFETY)
        return name

    a = job("A")
    assert second_started.wait(SAFETY)
    first_release.set()
    assert wait_until(lambda: coord.stats()["discarded"] == 1)  # attempt 1 has returned
    assert coord.stats()["limits"]["review_lim"]["running"] == 1
    b = job("B")
    assert wait_until(lambda: coord.stats()["limits"]["review_lim"]["held"] == 1)
    assert b.state is TokenState.WAITING  # held: attempt 2 of A holds the permit
    assert a.kill() is True  # attempt 2 is the live one: CANCELLING...
    assert a.state is TokenState.CANCELLING  # ...and attempt 1's return did not end it
    second_release.set()
    assert b.get(timeout=SAFETY) == "B"


def test_settled_held_tokens_leave_the_pool_bound_at_once(make_coord):
    """Tokens held by a limit count against pool_capacity; killed, they stop counting at once
    (not when the limiter reaches them)."""
    coord = make_coord(
        cores=1, workers_per_core=2, pool_capacity=10, overflow="reject", grow_on_demand=False
    )
    gate = threading.Event()
    one = task_token_guard(operation_type="review_one", max_concurrency=1)(
        lambda i: gate.wait(SAFETY) if i == 0 else i
    )
    holder = one(0)
    assert wait_until(lambda: holder.state is TokenState.EXECUTING)
    held = [one(i) for i in range(1, 11)]
    with pytest.raises(PoolFull):
        coord.submit(int)
    for t in held:
        assert t.kill()
    coord.pause()
    assert coord.submit(int).state is TokenState.WAITING  # room again
    coord.resume()
    gate.set()
    assert holder.get(timeout=SAFETY) is True


def test_a_running_retryable_call_leaves_the_memory_budget(make_coord):
    """The budget is for queued work: a task with retries that runs does not keep its
    arguments counted (a large call it makes would otherwise wait for room only it frees)."""
    coord = make_coord(cores=1, workers_per_core=2, memory_budget=1_500_000, submit_timeout=2)

    @task_token_guard
    def leaf(blob):
        return len(blob)

    @task_token_guard(retries=1)
    def parent(blob):
        return leaf(b"y" * 1_000_000).get()

    assert parent(b"x" * 1_000_000).get(timeout=SAFETY) == 1_000_000
    assert coord.stats()["queued_bytes"] == 0


def test_each_passthrough_attempt_has_its_own_timeout(make_coord):
    """As in threads mode: an attempt's timeout counts from its own start, after its delay."""
    make_coord(mode="inline")

    @task_token_guard(timeout=0.3, retries=1, retry_backoff=0.4, retry_jitter=False)
    def flaky():
        if tokengate.current_token().attempts == 1:
            raise OSError("first attempt fails at once")
        return "ok"

    tok = flaky()
    assert (tok.state, tok.attempts, tok.result()) == (TokenState.COMPLETED, 2, "ok")


def test_current_token_is_the_innermost_passthrough_call_on_a_worker(make_coord):
    threads = make_coord(cores=1, workers_per_core=1)
    make_coord(mode="inline")  # started last: decorated calls go to it

    @task_token_guard(operation_type="review_inner")
    def inner():
        return tokengate.current_token().operation_type

    def outer():
        assert tokengate.current_token().operation_type != "review_inner"
        return inner().get()

    assert threads.submit(outer).get(timeout=SAFETY) == "review_inner"
