"""TaskToken: get/result/exception/wait/done, timeouts, kill, done callbacks, ids."""

from __future__ import annotations

import logging
import threading
import time
import traceback

import pytest

from _support import SAFETY, wait_until
from tokengate import (
    TaskToken,
    TokenGateError,
    TokenKilled,
    TokenState,
    TokenTimeout,
    task_token_guard,
)


class CustomError(Exception):
    pass


def _raise_custom(msg):
    raise CustomError(msg)


# --------------------------------------------------------------------------- results


def test_get_returns_the_result(coord):
    @task_token_guard()
    def square(x):
        return x * x

    token = square(12)
    assert token.get() == 144
    # get() is repeatable and result() is the same thing
    assert token.get() == 144
    assert token.result() == 144
    assert token.exception() is None
    assert token.done()
    assert token.state is TokenState.COMPLETED


def test_get_returns_the_same_object(coord):
    payload = {"a": [1, 2, 3]}
    token = coord.submit(lambda: payload)
    assert token.get() is payload


def test_submit_passes_args_and_kwargs_and_uses_qualname(coord):
    def combine(a, b, *, sep):
        return f"{a}{sep}{b}"

    token = coord.submit(combine, "x", "y", sep="-")
    assert token.get() == "x-y"
    assert token.operation_type == combine.__qualname__
    assert token.weight.value == "medium"


def test_get_reraises_the_tasks_own_exception_with_task_frame(coord):
    raised = []

    def failing_task_body(msg):
        err = CustomError(msg)
        raised.append(err)
        raise err

    token = coord.submit(failing_task_body, "boom")
    with pytest.raises(CustomError, match="boom") as ei:
        token.get()
    assert ei.value is raised[0]
    frames = [frame.name for frame in traceback.extract_tb(ei.value.__traceback__)]
    assert "failing_task_body" in frames
    assert token.state is TokenState.FAILED
    assert token.done()


def test_result_and_exception_on_failure(coord):
    token = coord.submit(_raise_custom, "bad")
    with pytest.raises(CustomError):
        token.result()
    exc = token.exception()
    assert isinstance(exc, CustomError)
    assert str(exc) == "bad"
    # exception() does not raise, and asking twice returns the same object
    assert token.exception() is exc


def test_none_result(coord):
    token = coord.submit(lambda: None)
    assert token.get() is None
    assert token.state is TokenState.COMPLETED


# --------------------------------------------------------------------------- timeouts


def test_get_timeout_raises_token_timeout_which_is_timeout_error(make_coord, make_latch):
    make_coord(cores=1, workers_per_core=1)
    latch = make_latch()
    token = task_token_guard()(lambda: latch.enter() or "done")()
    assert latch.wait_entered(1)
    with pytest.raises(TokenTimeout) as ei:
        token.get(timeout=0.05)
    assert isinstance(ei.value, TimeoutError)
    assert isinstance(ei.value, TokenGateError)
    with pytest.raises(TimeoutError):
        token.result(timeout=0.01)
    with pytest.raises(TokenTimeout):
        token.exception(timeout=0.01)
    # a timeout does not affect the token
    assert token.state is TokenState.EXECUTING
    assert not token.done()
    assert token.wait(timeout=0.01) is False
    latch.release()
    assert token.get(timeout=SAFETY) == "done"
    assert token.wait(timeout=0) is True
    assert token.wait() is True


def test_zero_timeout_on_unfinished_token(make_coord, make_latch):
    make_coord(cores=1, workers_per_core=1)
    latch = make_latch()
    token = task_token_guard()(latch.enter)()
    assert latch.wait_entered(1)
    with pytest.raises(TokenTimeout):
        token.get(timeout=0)
    latch.release()
    assert token.get() is None


def test_get_timeout_waits_at_least_the_timeout(make_coord, make_latch):
    make_coord(cores=1, workers_per_core=1)
    latch = make_latch()
    token = task_token_guard()(latch.enter)()
    assert latch.wait_entered(1)
    t0 = time.monotonic()
    with pytest.raises(TokenTimeout):
        token.get(timeout=0.1)
    assert time.monotonic() - t0 >= 0.09
    latch.release()
    token.get()


# --------------------------------------------------------------------------- kill


def test_kill_before_start_is_immediate_and_waiter_gets_token_killed(coord):
    ran = []
    coord.pause()
    token = coord.submit(ran.append, 1)
    assert token.state is TokenState.WAITING

    outcome = {}
    waiting = threading.Event()

    def waiter():
        waiting.set()
        try:
            outcome["result"] = token.get()
        except BaseException as exc:
            outcome["exc"] = exc

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    assert waiting.wait(SAFETY)

    assert token.kill() is True
    # KILLED at once: no need to wait
    assert token.state is TokenState.KILLED
    assert token.done()
    thread.join(SAFETY)
    assert not thread.is_alive()
    assert isinstance(outcome.get("exc"), TokenKilled), outcome
    assert not isinstance(outcome["exc"], TimeoutError)
    assert isinstance(outcome["exc"], TokenGateError)

    with pytest.raises(TokenKilled):
        token.get()
    with pytest.raises(TokenKilled):
        token.exception()
    assert token.wait(timeout=0) is True
    # killing again reports False: already final
    assert token.kill() is False

    coord.resume()
    # the killed token never runs, later tokens do
    assert coord.submit(ran.append, 2).get() is None
    assert ran == [2]
    assert token.started_at is None
    assert token.finished_at is not None


def test_kill_during_execution_cancels_and_discards_the_late_result(make_coord, make_latch):
    coord = make_coord(cores=1, workers_per_core=1)
    latch = make_latch()
    token = task_token_guard()(lambda: latch.enter() or 42)()
    assert latch.wait_entered(1)
    assert token.kill() is True
    assert token.state is TokenState.CANCELLING
    assert token.done()
    with pytest.raises(TokenKilled, match="was killed while it ran"):
        token.get()  # released at once, while the task still runs
    assert token.kill() is False  # once
    latch.release()
    # The outcome was decided at kill(): the worker moves it to KILLED when the task returns.
    assert wait_until(lambda: token.state is TokenState.KILLED)
    with pytest.raises(TokenKilled):
        token.result()
    s = coord.stats()
    assert (s["killed"], s["completed"], s["discarded"]) == (1, 0, 1)


def test_cancel_queued_leaves_a_running_token_alone(make_coord, make_latch):
    coord = make_coord(cores=1, workers_per_core=1)
    latch = make_latch()
    token = task_token_guard()(lambda: latch.enter() or 42)()
    assert latch.wait_entered(1)
    assert token.cancel_queued() is False
    assert token.state is TokenState.EXECUTING
    latch.release()
    assert token.get() == 42
    assert coord.stats()["completed"] == 1


def test_kill_after_completion_returns_false(coord):
    token = coord.submit(lambda: "v")
    assert token.get() == "v"
    assert token.kill() is False
    assert token.state is TokenState.COMPLETED
    assert token.get() == "v"


def test_kill_of_queued_token_behind_busy_worker(make_coord, make_latch):
    make_coord(cores=1, workers_per_core=1)
    latch = make_latch()
    ran = []
    blocker = task_token_guard()(latch.enter)()
    assert latch.wait_entered(1)
    queued = [task_token_guard()(ran.append)(i) for i in range(5)]
    victim = queued[2]
    assert victim.kill() is True
    assert victim.state is TokenState.KILLED
    latch.release()
    blocker.get()
    for i, token in enumerate(queued):
        if token is victim:
            with pytest.raises(TokenKilled):
                token.get()
        else:
            assert token.get() is None, i
    assert sorted(ran) == [0, 1, 3, 4]


# --------------------------------------------------------------------------- done callbacks


def test_done_callback_registered_before_completion(make_coord, make_latch):
    make_coord(cores=1, workers_per_core=1)
    latch = make_latch()
    token = task_token_guard()(lambda: latch.enter() or "r")()
    assert latch.wait_entered(1)
    seen = []
    fired = threading.Event()

    def callback(tok):
        seen.append((tok, tok.state, tok.done()))
        fired.set()

    token.add_done_callback(callback)
    assert seen == []
    latch.release()
    assert token.get() == "r"
    assert fired.wait(SAFETY)
    assert len(seen) == 1
    tok, state, done = seen[0]
    assert tok is token
    assert state is TokenState.COMPLETED
    assert done is True


def test_done_callback_registered_after_completion_runs_at_once(coord):
    token = coord.submit(lambda: 5)
    assert token.get() == 5
    seen = []
    token.add_done_callback(seen.append)
    assert seen == [token]


def test_done_callback_fires_once_per_registration_on_failure_and_kill(coord):
    failed = coord.submit(_raise_custom, "x")
    fired = threading.Event()
    seen = []

    def record(tok):
        seen.append(tok.state)
        fired.set()

    failed.add_done_callback(record)
    with pytest.raises(CustomError):
        failed.get()
    assert fired.wait(SAFETY)

    coord.pause()
    killed = coord.submit(lambda: None)
    killed_seen = []
    killed_fired = threading.Event()

    def record_killed(tok):
        killed_seen.append(tok.state)
        killed_fired.set()

    killed.add_done_callback(record_killed)
    assert killed.kill()
    coord.resume()
    assert killed_fired.wait(SAFETY)
    assert killed_seen == [TokenState.KILLED]
    assert seen == [TokenState.FAILED]


def test_raising_callback_does_not_break_anything(make_coord, make_latch, caplog):
    make_coord(cores=1, workers_per_core=1)
    latch = make_latch()
    token = task_token_guard()(lambda: latch.enter() or "value")()
    assert latch.wait_entered(1)
    second = threading.Event()
    calls = []

    def bad(tok):
        calls.append("bad")
        raise RuntimeError("callback failure")

    def good(tok):
        calls.append("good")
        second.set()

    caplog.set_level(logging.ERROR)
    token.add_done_callback(bad)
    token.add_done_callback(good)
    latch.release()
    assert token.get() == "value"
    assert second.wait(SAFETY)
    assert calls == ["bad", "good"]
    assert token.state is TokenState.COMPLETED

    # a raising callback added after completion does not propagate either
    token.add_done_callback(bad)
    assert calls == ["bad", "good", "bad"]

    # "exceptions in it are logged": both failures reached the logging system
    logged = [
        r
        for r in caplog.records
        if r.levelno >= logging.ERROR
        and r.exc_info
        and isinstance(r.exc_info[1], RuntimeError)
        and str(r.exc_info[1]) == "callback failure"
    ]
    assert len(logged) == 2, caplog.records

    # and the worker is still alive
    follow = task_token_guard()(lambda: "next")()
    assert follow.get(timeout=SAFETY) == "next"
    assert follow.worker_id == token.worker_id


def test_many_callbacks_all_called_in_order(coord):
    token = coord.submit(lambda: 1)
    token.get()
    order = []
    for i in range(10):
        token.add_done_callback(lambda tok, i=i: order.append(i))
    assert order == list(range(10))


# --------------------------------------------------------------------------- identity


def test_token_ids_start_at_one_and_increase(make_coord):
    coord = make_coord(cores=2, workers_per_core=2)
    tokens = [coord.submit(lambda i=i: i) for i in range(50)]
    ids = [t.token_id for t in tokens]
    assert ids[0] == 1
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert [t.get() for t in tokens] == list(range(50))
    for t in tokens:
        assert isinstance(t, TaskToken)
        assert 1 <= t.core_id <= coord.cores
        assert 0 <= t.worker_id < 2


def test_token_ids_are_per_coordinator(make_coord):
    first = make_coord(cores=1, workers_per_core=1)
    a = first.submit(lambda: 1)
    b = first.submit(lambda: 2)
    assert (a.token_id, b.token_id) == (1, 2)
    a.get(), b.get()
    first.stop()
    second = make_coord(cores=1, workers_per_core=1)
    c = second.submit(lambda: 3)
    assert c.token_id == 1
    assert c.get() == 3


def test_token_ids_unique_under_concurrent_submission(make_coord):
    coord = make_coord(cores=2, workers_per_core=2)
    n_threads, per_thread = 4, 250
    barrier = threading.Barrier(n_threads)
    results: list[list] = [[] for _ in range(n_threads)]

    def submitter(k):
        barrier.wait(SAFETY)
        results[k] = [coord.submit(lambda k=k, i=i: (k, i)) for i in range(per_thread)]

    threads = [threading.Thread(target=submitter, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SAFETY)
    tokens = [tok for chunk in results for tok in chunk]
    assert len(tokens) == n_threads * per_thread
    ids = sorted(t.token_id for t in tokens)
    assert ids == list(range(1, n_threads * per_thread + 1))
    for k, chunk in enumerate(results):
        # ids from one thread increase in submission order
        chunk_ids = [t.token_id for t in chunk]
        assert chunk_ids == sorted(chunk_ids)
        assert [t.get() for t in chunk] == [(k, i) for i in range(per_thread)]


# --------------------------------------------------------------------------- volume


@pytest.mark.timeout(60)
def test_twenty_thousand_tokens_each_complete_exactly_once(make_coord):
    coord = make_coord(cores=2, workers_per_core=2)
    n = 20_000
    seen = []  # list.append is atomic; duplicates would show up in the Counter below

    @task_token_guard(operation_type="volume", tags={"weight": "heavy"})
    def record(i):
        seen.append(i)
        return i * 2

    tokens = [record(i) for i in range(n)]
    results = [t.get(timeout=SAFETY) for t in tokens]
    assert results == [2 * i for i in range(n)]
    assert len(seen) == n
    assert sorted(seen) == list(range(n))
    ids = [t.token_id for t in tokens]
    assert ids == list(range(1, n + 1))
    assert all(t.state is TokenState.COMPLETED for t in tokens)
    s = coord.stats()
    assert s["created"] == n
    assert s["completed"] == n
    assert s["illegal_transitions"] == 0
    assert sum(c["routed"]["heavy"] for c in s["per_core"]) == n
