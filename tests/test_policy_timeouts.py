"""Timeouts and cooperative cancellation (issue #7).

* ``timeout=`` seconds per token (decorator or ``fn.options``), counted from submission: when
  it passes the token ends TIMED_OUT and its waiters get ``TokenTimeout`` at once, whatever the
  task is doing (a running task keeps running; its late result is discarded).
* ``tokengate.current_token()`` is the token whose task runs on this thread (None outside);
  ``tokengate.checkpoint()`` raises ``TokenCancelled`` once it was killed or timed out.
* ``kill()`` of a running token: CANCELLING, waiters get ``TokenKilled`` at once, the late
  result is discarded, KILLED once the task returns.

A blocked task is held by a latch that the test releases only after it observed the outcome,
so "at once" is proven by the order of events, never by a measured duration.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

import tokengate
from _support import SAFETY, quiescent, wait_until
from tokengate import (
    TokenCancelled,
    TokenKilled,
    TokenState,
    TokenTimeout,
    task_token_guard,
)

SHORT = 0.05  # a token timeout that passes while the task is held by a latch


def _parked_waiters(tokens, n_each=1):
    """Threads already blocked in ``get()`` on each token; returns (threads, outcomes)."""
    outcomes: dict[tuple[int, int], object] = {}
    pairs = [(t, k) for t in tokens for k in range(n_each)]
    ready = threading.Barrier(len(pairs) + 1)

    def waiter(token, k):
        ready.wait(SAFETY)
        try:
            outcomes[token.token_id, k] = token.get(timeout=SAFETY)
        except BaseException as exc:
            outcomes[token.token_id, k] = exc

    threads = [threading.Thread(target=waiter, args=p, daemon=True) for p in pairs]
    for t in threads:
        t.start()
    ready.wait(SAFETY)
    return threads, outcomes


# ---------------------------------------------------------------- timed out while running


def test_running_token_times_out_at_once_while_its_task_is_still_blocked(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    latch = make_latch()
    callbacks = []

    @task_token_guard(operation_type="to_running", timeout=SHORT)
    def blocked():
        latch.enter()
        return "late"

    token = blocked()
    assert token.timeout == SHORT
    token.add_done_callback(lambda t: callbacks.append(t.state))
    assert latch.wait_entered(1)
    threads, outcomes = _parked_waiters([token], n_each=3)
    with pytest.raises(TokenTimeout) as ei:
        token.get(timeout=SAFETY)
    assert isinstance(ei.value, TimeoutError)
    msg = str(ei.value)
    assert "timed out" in msg and "0.05" in msg and "to_running" in msg
    # the task is still inside: the latch was never released
    assert not latch.released
    assert token.state is TokenState.TIMED_OUT
    assert token.state.is_final
    assert token.done()
    assert token.wait(timeout=0) is True
    for t in threads:
        t.join(SAFETY)
        assert not t.is_alive()
    assert all(isinstance(o, TokenTimeout) for o in outcomes.values()), outcomes
    # done callbacks of a timed-out token run on the callback thread, right after its waiters
    assert wait_until(lambda: callbacks == [TokenState.TIMED_OUT])
    assert token.kill() is False
    assert coord.stats()["timed_out"] == 1

    latch.release()
    assert wait_until(lambda: coord.stats()["discarded"] == 1)
    # the late result changed nothing
    assert token.state is TokenState.TIMED_OUT
    with pytest.raises(TokenTimeout):
        token.get(timeout=0)
    with pytest.raises(TokenTimeout):
        token.exception(timeout=0)
    assert wait_until(lambda: callbacks == [TokenState.TIMED_OUT])
    s = quiescent(coord)
    assert s["timed_out"] == 1
    assert s["completed"] == 0


def test_a_late_exception_is_discarded_too(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    latch = make_latch()

    @task_token_guard(operation_type="to_late_exc", timeout=SHORT)
    def blocked():
        latch.enter()
        raise OSError("late failure")

    token = blocked()
    assert latch.wait_entered(1)
    with pytest.raises(TokenTimeout):
        token.get(timeout=SAFETY)
    latch.release()
    assert wait_until(lambda: coord.stats()["discarded"] == 1)
    assert token.state is TokenState.TIMED_OUT
    s = quiescent(coord)
    assert s["failed"] == 0


def test_a_token_that_finishes_in_time_is_not_touched_by_its_timer(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    latch = make_latch()
    quick = task_token_guard(operation_type="to_quick", timeout=SHORT)(lambda: "ok")
    first = quick()
    assert first.get(timeout=SAFETY) == "ok"
    # a second token with the same timeout times out: the timer ran past the first deadline
    slow = task_token_guard(operation_type="to_slow", timeout=SHORT * 2)(latch.enter)()
    with pytest.raises(TokenTimeout):
        slow.get(timeout=SAFETY)
    assert first.state is TokenState.COMPLETED
    assert first.get(timeout=0) == "ok"
    latch.release()
    assert wait_until(lambda: coord.stats()["discarded"] == 1)
    s = quiescent(coord)
    assert s["timed_out"] == 1
    assert s["completed"] == 1


def test_timeout_per_call_through_options(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    latch = make_latch()

    @task_token_guard(operation_type="to_per_call")
    def work(hold):
        if hold:
            latch.enter()
        return "done"

    untimed = work(False)
    assert untimed.timeout is None
    assert untimed.get(timeout=SAFETY) == "done"
    timed = work.options(timeout=SHORT)(True)
    assert timed.timeout == SHORT
    with pytest.raises(TokenTimeout):
        timed.get(timeout=SAFETY)
    assert timed.state is TokenState.TIMED_OUT
    latch.release()
    assert wait_until(lambda: coord.stats()["discarded"] == 1)
    quiescent(coord)


def test_options_can_remove_or_change_the_decorators_timeout(make_coord):
    make_coord(grow_on_demand=False, cores=1, workers_per_core=1)
    fn = task_token_guard(operation_type="to_remove", timeout=SHORT)(lambda: 1)
    assert fn().timeout == SHORT
    assert fn.options(timeout=None)().timeout is None
    assert fn.options(timeout=float("inf"))().timeout is None
    assert fn.options(timeout=3)().timeout == 3.0
    assert fn().timeout == SHORT  # the original is unchanged


def test_infinite_timeout_means_none(coord):
    fn = task_token_guard(operation_type="to_inf", timeout=float("inf"))(lambda: 1)
    token = fn()
    assert token.timeout is None
    assert token.get(timeout=SAFETY) == 1


# ---------------------------------------------------------------- timed out before it ran


def test_a_queued_token_times_out_and_never_runs(make_coord, make_latch):
    """Queue time counts: a token stuck behind a busy worker times out without starting."""
    coord = make_coord(cores=1, workers_per_core=1, grow_on_demand=False)
    latch = make_latch()
    ran = []
    blocker = coord.submit(latch.enter)
    assert latch.wait_entered(1)
    fn = task_token_guard(operation_type="to_queued", timeout=SHORT)(ran.append)
    queued = fn("ran")
    callbacks = []
    queued.add_done_callback(lambda t: callbacks.append(t.state))
    with pytest.raises(TokenTimeout, match="timed out"):
        queued.get(timeout=SAFETY)
    assert queued.state is TokenState.TIMED_OUT
    assert queued.started_at is None
    assert queued.attempts == 0
    # done callbacks of a timed-out token run on the callback thread, right after its waiters
    assert wait_until(lambda: callbacks == [TokenState.TIMED_OUT])
    latch.release()
    blocker.get(timeout=SAFETY)
    # something queued after it runs: the timed-out token was removed, not skipped later
    after = coord.submit(lambda: "after")
    assert after.get(timeout=SAFETY) == "after"
    assert ran == []
    s = quiescent(coord)
    assert s["timed_out"] == 1
    assert s["discarded"] == 0


def test_a_paused_token_times_out(make_coord):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=1)
    ran = []
    coord.pause()
    token = task_token_guard(operation_type="to_paused", timeout=SHORT)(ran.append)(1)
    with pytest.raises(TokenTimeout):
        token.get(timeout=SAFETY)
    assert token.state is TokenState.TIMED_OUT
    coord.resume()
    assert coord.submit(lambda: 2).get(timeout=SAFETY) == 2
    assert ran == []
    quiescent(coord)


def test_a_token_held_by_a_limit_times_out_and_leaves_the_held_count(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=3)
    latch = make_latch()
    ran = []

    @task_token_guard(operation_type="to_held", max_concurrency=1)
    def limited(i):
        ran.append(i)
        if i == 0:
            latch.enter()

    first = limited(0)
    assert latch.wait_entered(1)
    held = limited.options(timeout=SHORT)(1)
    with pytest.raises(TokenTimeout):
        held.get(timeout=SAFETY)
    assert held.state is TokenState.TIMED_OUT
    latch.release()
    first.get(timeout=SAFETY)
    assert coord.submit(lambda: 0).get(timeout=SAFETY) == 0
    assert ran == [0]
    quiescent(coord)


def test_a_held_token_that_timed_out_is_no_longer_counted_as_held(make_coord, make_latch):
    coord = make_coord(
        grow_on_demand=False, cores=1, workers_per_core=3, storage_limits={"SLOW": 1}
    )
    latch = make_latch()
    slow = task_token_guard(operation_type="to_held_count", tags={"storage_speed": "SLOW"})
    blocker = slow(latch.enter)()
    assert latch.wait_entered(1)
    held = slow(lambda: None).options(timeout=SHORT)()
    with pytest.raises(TokenTimeout):
        held.get(timeout=SAFETY)
    s = coord.stats()
    assert s["waiting"] == 0
    assert s["held"] == 0, s["held"]
    assert s["storage"]["SLOW"]["held"] == 0
    latch.release()
    blocker.get(timeout=SAFETY)


# ---------------------------------------------------------------- current_token / checkpoint


def test_current_token_inside_and_outside_a_task(coord):
    seen = []

    @task_token_guard(operation_type="ct_inside")
    def inside():
        seen.append(tokengate.current_token())
        child = coord.submit(lambda: tokengate.current_token())
        seen.append(child.get(timeout=SAFETY))
        seen.append(tokengate.current_token())  # still ours after the nested wait
        return child

    assert tokengate.current_token() is None
    token = inside()
    child = token.get(timeout=SAFETY)
    assert seen[0] is token
    assert seen[1] is child
    assert seen[1] is not token
    assert seen[2] is token
    assert tokengate.current_token() is None


def test_current_token_is_none_in_a_plain_thread_and_after_a_task(coord):
    box = []
    th = threading.Thread(target=lambda: box.append(tokengate.current_token()))
    th.start()
    th.join(SAFETY)
    assert box == [None]
    # a worker thread between tasks: a done callback runs on the worker after the task ended
    token = coord.submit(lambda: 1)
    token.get(timeout=SAFETY)
    assert tokengate.current_token() is None


def test_checkpoint_is_a_no_op_outside_tasks_and_in_a_live_task(coord):
    assert tokengate.checkpoint() is None

    @task_token_guard(operation_type="cp_noop")
    def fine():
        tokengate.checkpoint()
        tokengate.checkpoint()
        return "fine"

    assert fine().get(timeout=SAFETY) == "fine"


def test_checkpoint_raises_token_cancelled_after_the_timeout(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    latch = make_latch()
    seen: list[object] = []
    finished = threading.Event()

    @task_token_guard(operation_type="cp_timeout", timeout=SHORT)
    def cooperative():
        latch.enter()
        for _ in range(2):  # raises every time, until the task returns
            try:
                tokengate.checkpoint()
                seen.append("passed")
            except TokenCancelled as exc:
                seen.append(exc)
        finished.set()
        tokengate.checkpoint()  # let it propagate: not retried, not a failure
        return "unreachable"

    token = cooperative()
    assert latch.wait_entered(1)
    with pytest.raises(TokenTimeout):
        token.get(timeout=SAFETY)
    latch.release()
    assert finished.wait(SAFETY)
    assert len(seen) == 2
    assert all(isinstance(e, TokenCancelled) for e in seen), seen
    assert "timed out" in str(seen[0])
    assert wait_until(lambda: coord.stats()["discarded"] == 1)
    assert token.state is TokenState.TIMED_OUT
    s = quiescent(coord)
    assert s["failed"] == 0


def test_checkpoint_raises_token_cancelled_after_kill(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    latch = make_latch()
    seen: list[object] = []

    @task_token_guard(operation_type="cp_kill")
    def cooperative():
        latch.enter()
        try:
            tokengate.checkpoint()
        except TokenCancelled as exc:
            seen.append(exc)
            raise
        return "unreachable"

    token = cooperative()
    assert latch.wait_entered(1)
    assert token.kill() is True
    latch.release()
    assert token.wait(SAFETY)
    assert wait_until(lambda: token.state is TokenState.KILLED)
    assert len(seen) == 1 and "killed" in str(seen[0])
    assert isinstance(seen[0], tokengate.TokenGateError)
    quiescent(coord)


def test_token_cancelled_is_not_a_builtin_cancellation():
    """TokenCancelled is a TokenGateError (an Exception), not asyncio.CancelledError."""
    assert issubclass(TokenCancelled, Exception)
    assert not issubclass(TokenCancelled, asyncio.CancelledError)


# ---------------------------------------------------------------- kill of a running token


def test_kill_of_a_running_token_releases_waiters_at_once_and_discards_the_result(
    make_coord, make_latch
):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    latch = make_latch()
    callbacks = []

    @task_token_guard(operation_type="kill_running")
    def blocked():
        latch.enter()
        return "late"

    token = blocked()
    token.add_done_callback(lambda t: callbacks.append(t.state))
    assert latch.wait_entered(1)
    threads, outcomes = _parked_waiters([token], n_each=3)
    assert token.kill() is True
    assert token.state is TokenState.CANCELLING
    assert token.state.is_settled and not token.state.is_final
    assert token.done()
    with pytest.raises(TokenKilled, match="killed while it ran"):
        token.get(timeout=SAFETY)
    for t in threads:
        t.join(SAFETY)
        assert not t.is_alive()
    assert all(isinstance(o, TokenKilled) for o in outcomes.values()), outcomes
    assert not latch.released  # all of this happened while the task was still inside
    assert token.kill() is False  # settled already

    latch.release()
    assert wait_until(lambda: token.state is TokenState.KILLED)
    with pytest.raises(TokenKilled):
        token.get(timeout=0)
    assert callbacks in ([TokenState.CANCELLING], [TokenState.KILLED]), callbacks
    s = quiescent(coord)
    assert s["killed"] == 1
    assert s["discarded"] == 1
    assert s["completed"] == 0


def test_kill_of_a_queued_token_is_final_at_once(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=1)
    latch = make_latch()
    ran = []
    blocker = coord.submit(latch.enter)
    assert latch.wait_entered(1)
    queued = coord.submit(ran.append, 1)
    assert queued.kill() is True
    assert queued.state is TokenState.KILLED
    with pytest.raises(TokenKilled, match="before it ran"):
        queued.get(timeout=0)
    latch.release()
    blocker.get(timeout=SAFETY)
    assert ran == []
    s = quiescent(coord)
    assert s["discarded"] == 0


def test_cancel_queued_does_not_touch_a_running_token(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=1)
    latch = make_latch()
    running = coord.submit(lambda: latch.enter() or "ran")
    assert latch.wait_entered(1)
    queued = coord.submit(lambda: "never")
    assert running.cancel_queued() is False
    assert running.state is TokenState.EXECUTING
    assert queued.cancel_queued() is True
    assert queued.state is TokenState.KILLED
    latch.release()
    assert running.get(timeout=SAFETY) == "ran"
    quiescent(coord)


def test_await_a_timed_out_token_raises_token_timeout(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    latch = make_latch()
    token = task_token_guard(operation_type="to_await", timeout=SHORT)(latch.enter)()

    async def main():
        return await token

    with pytest.raises(TokenTimeout):
        asyncio.run(main())
    latch.release()
    assert wait_until(lambda: coord.stats()["discarded"] == 1)


# ---------------------------------------------------------------- drain


def test_drain_returns_once_every_token_is_settled_even_if_a_task_still_runs(
    make_coord, make_latch
):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=3)
    latch = make_latch()
    timed = task_token_guard(operation_type="drain_to", timeout=SHORT)(latch.enter)()
    killed = coord.submit(latch.enter)
    assert latch.wait_entered(2)
    assert killed.kill() is True
    quick = coord.submit(lambda: "q")
    report = coord.drain(timeout=SAFETY)
    assert report["timed_out"] is False
    assert report["remaining"] == 0
    assert timed.state is TokenState.TIMED_OUT
    assert killed.state is TokenState.CANCELLING
    assert quick.get(timeout=0) == "q"
    assert not latch.released  # both tasks are still inside
    latch.release()
    assert wait_until(lambda: killed.state is TokenState.KILLED)
    assert wait_until(lambda: coord.stats()["discarded"] == 2)
    coord.resume()
    quiescent(coord)


def test_drain_waits_for_a_token_to_time_out(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    latch = make_latch()
    token = task_token_guard(operation_type="drain_wait_to", timeout=SHORT * 2)(latch.enter)()
    assert latch.wait_entered(1)
    report = coord.drain(timeout=SAFETY)
    assert report["timed_out"] is False
    assert token.state is TokenState.TIMED_OUT
    latch.release()
    coord.resume()
    assert wait_until(lambda: coord.stats()["discarded"] == 1)


def test_stop_waits_for_a_timed_out_task_and_counts_stay_consistent(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    latch = make_latch()
    token = task_token_guard(operation_type="stop_to", timeout=SHORT)(latch.enter)()
    with pytest.raises(TokenTimeout):
        token.get(timeout=SAFETY)
    stopper = threading.Thread(target=coord.stop, kwargs={"timeout": SAFETY}, daemon=True)
    stopper.start()
    latch.release()
    stopper.join(SAFETY)
    assert not stopper.is_alive()
    s = coord.stats()
    assert s["timed_out"] == 1
    assert s["created"] == s["completed"] + s["failed"] + s["killed"] + s["timed_out"]
    assert s["executing"] == 0


def test_drain_summary_accounts_for_timed_out_tokens(make_coord, make_latch):
    """Every token settled during drain() shows up in its summary: completed, failed, killed
    and (whatever the key is called) the timed-out ones."""
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    latch = make_latch()
    timed = task_token_guard(operation_type="drain_count", timeout=SHORT)(latch.enter)()
    done = coord.submit(lambda: 1)
    report = coord.drain(timeout=SAFETY)
    assert timed.state is TokenState.TIMED_OUT
    assert done.state is TokenState.COMPLETED
    counts = {
        k: v
        for k, v in report.items()
        if isinstance(v, int) and not isinstance(v, bool) and k != "remaining"
    }
    assert sum(counts.values()) == 2, report
    latch.release()
    coord.resume()
