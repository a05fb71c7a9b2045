"""Passthrough mode (issue #7): ``OperationsCoordinator(mode="inline")`` or
``TOKENGATE_INLINE=1`` runs decorated calls synchronously in the caller and returns an
already-finished token; retries run in the caller, ``current_token()`` works inside, and
limits/tiers do not apply.
"""

from __future__ import annotations

import threading
import time

import pytest

import tokengate
from _support import SAFETY, child_json, quiescent, run_child, wait_until
from tokengate import (
    AdmissionClosed,
    ConfigurationError,
    OperationsCoordinator,
    Retry,
    TokenCancelled,
    TokenState,
    TokenTimeout,
    task_token_guard,
)


@pytest.fixture
def inline(make_coord):
    return make_coord(mode="inline", cores=1, workers_per_core=1)


def test_a_call_returns_a_finished_token_run_on_the_calling_thread(inline):
    seen = {}

    @task_token_guard(operation_type="inl_basic")
    def work(x, *, y):
        seen["thread"] = threading.get_ident()
        seen["token"] = tokengate.current_token()
        seen["worker"] = tokengate._core._on_worker_thread()
        return x + y

    token = work(2, y=3)
    # finished before the call returned: no wait needed
    assert token.state is TokenState.COMPLETED
    assert token.done()
    assert token.get(timeout=0) == 5
    assert seen["thread"] == threading.get_ident()
    assert seen["token"] is token
    assert seen["worker"] is False
    assert tokengate.current_token() is None
    assert token.attempts == 1
    assert token.kill() is False
    assert inline.stats()["mode"] == "inline"
    quiescent(inline)


def test_submit_and_a_plain_thread_are_inline_too(inline):
    token = inline.submit(threading.get_ident)
    assert token.state is TokenState.COMPLETED
    assert token.get(timeout=0) == threading.get_ident()

    box = []
    fn = task_token_guard(operation_type="inl_thread")(threading.get_ident)
    th = threading.Thread(target=lambda: box.append((threading.get_ident(), fn().get(0))))
    th.start()
    th.join(SAFETY)
    assert box[0][0] == box[0][1]


def test_an_exception_is_stored_in_the_token_not_raised_by_the_call(inline):
    err = KeyError("inline failure")

    def boom():
        raise err

    token = task_token_guard(operation_type="inl_fail")(boom)()  # does not raise
    assert token.state is TokenState.FAILED
    assert token.exception(timeout=0) is err
    with pytest.raises(KeyError, match="inline failure"):
        token.get(timeout=0)
    s = quiescent(inline)
    assert s["failed"] == 1


def test_retries_run_in_the_caller(inline):
    calls = []
    exhausted = []

    def flaky():
        calls.append(threading.get_ident())
        if len(calls) < 3:
            raise OSError(f"attempt {len(calls)}")
        return "ok"

    token = task_token_guard(operation_type="inl_retry", retries=3)(flaky)()
    assert token.state is TokenState.COMPLETED
    assert token.get(timeout=0) == "ok"
    assert token.attempts == 3
    assert [str(e) for e in token.errors] == ["attempt 1", "attempt 2"]
    assert set(calls) == {threading.get_ident()}
    assert inline.stats()["retried"] == 2

    always = task_token_guard(
        operation_type="inl_exhaust", retries=1, on_exhausted=exhausted.append
    )(lambda: 1 / 0)
    token = always()
    assert token.state is TokenState.FAILED
    assert token.attempts == 2
    assert exhausted == [token]
    quiescent(inline)


def test_a_retry_delay_is_slept_in_the_caller(inline):
    starts = []

    def fn():
        starts.append(time.monotonic())
        if len(starts) == 1:
            raise Retry(delay=0.05)
        return "second"

    before = time.monotonic()
    token = task_token_guard(operation_type="inl_delay", retries=1)(fn)()
    after = time.monotonic()
    assert token.get(timeout=0) == "second"
    assert starts[1] - starts[0] >= 0.05 - 0.005
    assert after - before >= 0.05 - 0.005  # the caller itself waited


def test_current_token_inside_nested_inline_calls(inline):
    @task_token_guard(operation_type="inl_inner")
    def inner():
        return tokengate.current_token()

    @task_token_guard(operation_type="inl_outer")
    def outer():
        me = tokengate.current_token()
        child = inner()
        assert child.state is TokenState.COMPLETED
        return me, child.get(0), child, tokengate.current_token()

    token = outer()
    me, inner_seen, child, me_again = token.get(timeout=0)
    assert me is token
    assert inner_seen is child
    assert child is not token
    assert me_again is token
    assert tokengate.current_token() is None


def test_a_call_longer_than_its_timeout_ends_timed_out(inline):
    """The task polls checkpoint() until it sees the call overdue (no thread can stop it)."""
    started = time.monotonic()
    cancelled = []

    def slow():
        def overdue():
            try:
                tokengate.checkpoint()
            except TokenCancelled as exc:
                cancelled.append(exc)
                return True
            return False

        assert wait_until(overdue)
        return "late"

    token = task_token_guard(operation_type="inl_timeout", timeout=0.05)(slow)()
    assert token.state is TokenState.TIMED_OUT
    assert time.monotonic() - started >= 0.05 - 0.005
    with pytest.raises(TokenTimeout):
        token.get(timeout=0)
    assert len(cancelled) == 1
    s = quiescent(inline)
    assert s["timed_out"] == 1
    assert s["discarded"] == 1


def test_then_runs_at_once(inline):
    first = inline.submit(lambda: 2)
    second = first.then(lambda x: x * 21)
    assert second.state is TokenState.COMPLETED
    assert second.get(timeout=0) == 42


def test_limits_and_tiers_do_not_apply(make_coord):
    coord = make_coord(mode="inline", cores=1, workers_per_core=1, storage_limits={"SLOW": 1})

    @task_token_guard(
        operation_type="inl_limits",
        tags={"storage_speed": "SLOW"},
        max_concurrency=1,
        rate_limit=1.0,
        rate_burst=1,
    )
    def work(i):
        return i

    # at 1/s with a burst of 1, a limited run would need 9 s for these
    tokens = [work(i) for i in range(10)]
    assert [t.state for t in tokens] == [TokenState.COMPLETED] * 10
    s = quiescent(coord)
    assert s["held"] == 0
    assert s["completed"] == 10


def test_a_closed_gate_refuses_inline_calls(inline):
    inline.drain()
    fn = task_token_guard(operation_type="inl_closed")(lambda: 1)
    with pytest.raises(AdmissionClosed):
        fn()
    inline.resume()
    assert fn().get(timeout=0) == 1


def test_inline_mode_starts_no_worker_threads(tmp_path):
    """Passthrough runs "without threads": starting an inline coordinator must not spawn its
    workers (counted by the OS, in a fresh interpreter)."""
    rc, out, err = run_child(
        tmp_path,
        """
        import json, os
        from tokengate import OperationsCoordinator, task_token_guard

        def threads():
            return len(os.listdir("/proc/self/task"))

        before = threads()
        coord = OperationsCoordinator(mode="inline", cores=2, workers_per_core=4).start()
        after = threads()
        spawned = sum(c["spawned_workers"] for c in coord.stats()["per_core"])
        coord.stop()
        print("RESULT " + json.dumps({"new_threads": after - before, "spawned": spawned}))
        """,
    )
    assert rc == 0, err
    res = child_json(out)
    assert res["spawned"] == 0, res
    assert res["new_threads"] <= 2, res  # the control loop (and a timer) at most


# ----------------------------------------------------------------- the environment variable


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_tokengate_inline_env_makes_inline_the_default(make_coord, monkeypatch, value):
    monkeypatch.setenv("TOKENGATE_INLINE", value)
    coord = make_coord(cores=1, workers_per_core=1)
    assert coord.stats()["mode"] == "inline"
    token = task_token_guard(operation_type="inl_env")(threading.get_ident)()
    assert token.state is TokenState.COMPLETED
    assert token.get(timeout=0) == threading.get_ident()


@pytest.mark.parametrize("value", ["", "0"])
def test_tokengate_inline_env_off(make_coord, monkeypatch, value):
    monkeypatch.setenv("TOKENGATE_INLINE", value)
    coord = make_coord(cores=1, workers_per_core=1)
    assert coord.stats()["mode"] == "threads"
    token = task_token_guard(operation_type="inl_env_off")(threading.get_ident)()
    assert token.get(timeout=SAFETY) != threading.get_ident()


@pytest.mark.parametrize("value", ["false", "no", "off", "False"])
def test_tokengate_inline_env_false_words_do_not_enable_it(make_coord, monkeypatch, value):
    monkeypatch.setenv("TOKENGATE_INLINE", value)
    try:
        coord = make_coord(cores=1, workers_per_core=1)
    except ConfigurationError:
        return  # refusing an unclear value is fine too
    assert coord.stats()["mode"] == "threads"


def test_an_explicit_mode_overrides_the_environment(make_coord, monkeypatch):
    monkeypatch.setenv("TOKENGATE_INLINE", "1")
    coord = make_coord(cores=1, workers_per_core=1, mode="threads")
    assert coord.stats()["mode"] == "threads"
    monkeypatch.setenv("TOKENGATE_INLINE", "0")
    coord2 = make_coord(cores=1, workers_per_core=1, mode="inline")
    assert coord2.stats()["mode"] == "inline"


def test_the_environment_in_a_fresh_process(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENGATE_INLINE", "1")
    rc, out, err = run_child(
        tmp_path,
        """
        import json, threading
        import tokengate
        from tokengate import OperationsCoordinator, task_token_guard

        @task_token_guard(operation_type="child_inline", retries=1)
        def work():
            me = tokengate.current_token()
            if me.attempts == 1:
                raise OSError("once")
            return threading.get_ident()

        with OperationsCoordinator() as coord:
            token = work()
            res = {
                "state": token.state.name,
                "same_thread": token.get(0) == threading.get_ident(),
                "attempts": token.attempts,
                "mode": coord.stats()["mode"],
            }
        print("RESULT " + json.dumps(res))
        """,
    )
    assert rc == 0, err
    assert child_json(out) == {
        "state": "COMPLETED",
        "same_thread": True,
        "attempts": 2,
        "mode": "inline",
    }


@pytest.mark.parametrize("mode", ["sync", "INLINE", "", 1])
def test_an_unknown_mode_is_refused(mode):
    with pytest.raises(ConfigurationError, match="mode"):
        OperationsCoordinator(mode=mode)
