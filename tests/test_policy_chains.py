"""Chains (issue #7): ``token.then(fn, *args, **options)`` runs ``fn(result, *args)`` as a
new token once ``token`` completed, without a worker waiting for it; failure, kill and
timeout propagate down the chain (each later token ends with the cause). Several chains run
concurrently while the steps of each stay in order (the seed's PARALLEL CHAINS); chains
compose with priorities, timeouts and retries per step.
"""

from __future__ import annotations

import threading

import pytest

from _support import SAFETY, quiescent, wait_until
from tokengate import (
    InvalidDecoration,
    InvalidOption,
    TaskWeight,
    TokenKilled,
    TokenState,
    TokenTimeout,
    task_token_guard,
)

SHORT = 0.05


# --------------------------------------------------------------------------- results flow


def test_then_passes_the_result_and_extra_args(coord):
    first = coord.submit(lambda: 6)
    second = first.then(lambda x, a, b: (x, a, b), "a", "b")
    assert second.get(timeout=SAFETY) == (6, "a", "b")
    assert second.token_id != first.token_id
    assert second.state is TokenState.COMPLETED
    assert second.weight is TaskWeight.MEDIUM
    assert second.started_at >= first.finished_at


def test_a_chain_of_several_steps(coord):
    steps = []

    def step(x, k):
        steps.append(k)
        return x * 10 + k

    token = coord.submit(lambda: 1)
    for k in range(2, 7):
        token = token.then(step, k)
    assert token.get(timeout=SAFETY) == 123456
    assert steps == [2, 3, 4, 5, 6]
    quiescent(coord)


def test_then_on_an_already_finished_token_runs_at_once(coord):
    first = coord.submit(lambda: "x")
    assert first.get(timeout=SAFETY) == "x"
    assert first.then(lambda r: r + "y").get(timeout=SAFETY) == "xy"


def test_a_long_chain_on_one_worker_needs_no_waiting_worker(make_coord):
    """200 steps on a single worker: if any step's worker waited for the previous one, the
    chain could not advance."""
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=1)
    token = coord.submit(lambda: 0)
    for _ in range(200):
        token = token.then(lambda x: x + 1)
    assert token.get(timeout=SAFETY) == 200
    s = quiescent(coord)
    assert s["completed"] == 201
    assert s["per_core"][0]["spawned_workers"] == 1


def test_then_with_a_guarded_function_uses_its_options(make_coord):
    make_coord(grow_on_demand=False, cores=2, workers_per_core=1)
    calls = []

    @task_token_guard(operation_type="chain_step", tags={"weight": "heavy"}, retries=1)
    def step(x):
        calls.append(x)
        if len(calls) == 1:
            raise OSError("transient")
        return x + 100

    token = task_token_guard(operation_type="chain_head")(lambda: 1)().then(step)
    assert token.get(timeout=SAFETY) == 101
    assert token.operation_type == "chain_step"
    assert token.weight is TaskWeight.HEAVY
    assert token.attempts == 2
    assert calls == [1, 1]


def test_then_with_options_on_a_plain_callable_and_on_a_guarded_function(make_coord):
    make_coord(grow_on_demand=False, cores=3, workers_per_core=1)

    @task_token_guard(operation_type="chain_opt_step")
    def step(x):
        return x

    head = task_token_guard(operation_type="chain_opt_head")(lambda: 5)()
    a = head.then(lambda x: x, priority="high", weight="light")
    b = head.then(step, priority="low", timeout=SAFETY)
    assert a.get(timeout=SAFETY) == 5
    assert b.get(timeout=SAFETY) == 5
    assert a.priority == "high"
    assert a.weight is TaskWeight.LIGHT
    assert a.core_id == 3
    assert b.priority == "low"
    assert b.timeout == SAFETY
    assert b.operation_type == "chain_opt_step"
    assert step("direct").priority == "normal"  # the step function itself is unchanged


def test_then_refuses_a_non_callable_and_unknown_options(coord):
    head = coord.submit(lambda: 1)
    with pytest.raises(InvalidDecoration, match="callable"):
        head.then(42)
    # keyword arguments of then() are options, not arguments of the step
    with pytest.raises(InvalidOption, match="sep") as ei:
        head.then(lambda x, sep="-": x, sep="+")
    assert "priority" in str(ei.value)  # lists what is valid
    assert head.get(timeout=SAFETY) == 1


def test_several_chains_concurrently_keep_their_step_order(make_coord):
    """The seed's PARALLEL CHAINS: 30 chains of 6 steps on 2 cores x 2 workers."""
    coord = make_coord(grow_on_demand=False, cores=2, workers_per_core=2)
    lock = threading.Lock()
    log: list[tuple[int, int]] = []

    def step(acc, chain, k):
        with lock:
            log.append((chain, k))
        return [*acc, k]

    coord.pause()  # build every chain before anything runs
    tails = []
    for chain in range(30):
        token = coord.submit(step, [], chain, 0)
        for k in range(1, 6):
            token = token.then(step, chain, k)
        tails.append(token)
    coord.resume()
    assert [t.get(timeout=SAFETY) for t in tails] == [[0, 1, 2, 3, 4, 5]] * 30
    for chain in range(30):
        assert [k for c, k in log if c == chain] == [0, 1, 2, 3, 4, 5]
    # the chains ran side by side, not one after another
    assert log.index((29, 0)) < log.index((0, 5))
    s = quiescent(coord)
    assert s["completed"] == 180


# --------------------------------------------------------------------------- propagation


def test_failure_propagates_down_the_chain(coord):
    ran = []
    err = ValueError("root cause")

    def boom():
        raise err

    head = coord.submit(boom)
    mid = head.then(ran.append)
    tail = mid.then(ran.append)
    for t in (head, mid, tail):
        with pytest.raises(ValueError, match="root cause"):
            t.get(timeout=SAFETY)
        assert t.state is TokenState.FAILED
    assert mid.exception() is err
    assert tail.exception() is err
    assert ran == []
    s = quiescent(coord)
    assert s["failed"] == 3


def test_a_step_failed_by_propagation_did_not_start(coord):
    ran = []
    head = coord.submit(lambda: 1 / 0)
    child = head.then(ran.append)
    with pytest.raises(ZeroDivisionError):
        child.get(timeout=SAFETY)
    assert ran == []
    assert child.attempts == 0
    assert child.started_at is None
    assert child.core_id is None


def test_a_propagated_failure_is_not_retried_by_the_step(coord):
    calls = []
    exhausted = []

    @task_token_guard(operation_type="chain_noretry", retries=3, on_exhausted=exhausted.append)
    def step(x):
        calls.append(x)

    child = coord.submit(lambda: 1 / 0).then(step)
    with pytest.raises(ZeroDivisionError):
        child.get(timeout=SAFETY)
    assert coord.submit(lambda: 0).get(timeout=SAFETY) == 0
    assert calls == []
    assert exhausted == []
    assert coord.stats()["retried"] == 0


def test_a_failure_in_the_middle_stops_the_rest(coord):
    ran = []

    def middle(x):
        raise KeyError(f"middle got {x}")

    tail = coord.submit(lambda: 1).then(middle).then(ran.append).then(ran.append)
    with pytest.raises(KeyError, match="middle got 1"):
        tail.get(timeout=SAFETY)
    assert ran == []


def test_kill_of_a_queued_head_kills_the_chain_at_once(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=1)
    latch = make_latch()
    ran = []
    blocker = coord.submit(latch.enter)
    assert latch.wait_entered(1)
    head = coord.submit(ran.append, "head")
    mid = head.then(ran.append)
    tail = mid.then(ran.append)
    assert head.kill() is True
    for t in (mid, tail):
        assert t.state is TokenState.KILLED
        with pytest.raises(TokenKilled):
            t.get(timeout=0)
    latch.release()
    blocker.get(timeout=SAFETY)
    assert coord.submit(lambda: 0).get(timeout=SAFETY) == 0
    assert ran == []
    s = quiescent(coord)
    assert s["killed"] == 3


def test_kill_of_a_running_head_kills_the_chain_at_once(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    latch = make_latch()
    ran = []
    head = coord.submit(lambda: latch.enter() or "head")
    assert latch.wait_entered(1)
    tail = head.then(ran.append).then(ran.append)
    assert head.kill() is True
    assert head.state is TokenState.CANCELLING
    assert tail.state is TokenState.KILLED  # at once, while the head's task is still inside
    with pytest.raises(TokenKilled):
        tail.get(timeout=0)
    latch.release()
    assert wait_until(lambda: head.state is TokenState.KILLED)
    assert ran == []
    quiescent(coord)


def test_kill_of_a_pending_step_leaves_the_head_alone(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    latch = make_latch()
    ran = []
    head = coord.submit(lambda: latch.enter() or "head")
    assert latch.wait_entered(1)
    mid = head.then(ran.append)
    tail = mid.then(ran.append)
    assert mid.kill() is True
    assert mid.state is TokenState.KILLED
    assert tail.state is TokenState.KILLED
    latch.release()
    assert head.get(timeout=SAFETY) == "head"
    assert coord.submit(lambda: 0).get(timeout=SAFETY) == 0
    assert ran == []
    quiescent(coord)


def test_a_timeout_propagates_down_the_chain(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    latch = make_latch()
    ran = []
    head = task_token_guard(operation_type="chain_to_head", timeout=SHORT)(latch.enter)()
    mid = head.then(ran.append)
    tail = mid.then(ran.append)
    for t in (head, mid, tail):
        with pytest.raises(TokenTimeout):
            t.get(timeout=SAFETY)
        assert t.state is TokenState.TIMED_OUT
    assert not latch.released
    latch.release()
    assert wait_until(lambda: coord.stats()["discarded"] == 1)
    assert ran == []
    s = quiescent(coord)
    assert s["timed_out"] == 3


def test_a_propagated_timeout_says_which_token_timed_out(make_coord, make_latch):
    """The later steps have no timeout of their own: their error must not claim one."""
    make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    latch = make_latch()
    head = task_token_guard(operation_type="chain_to_msg", timeout=SHORT)(latch.enter)()
    child = head.then(lambda x: x)
    with pytest.raises(TokenTimeout) as ei:
        child.get(timeout=SAFETY)
    assert child.timeout is None
    msg = str(ei.value)
    assert "timeout of 0 s" not in msg, msg
    assert str(head.token_id) in msg or "chain_to_msg" in msg, msg
    latch.release()


def test_a_step_timeout_counts_from_the_step_not_from_the_head(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=3)
    latch = make_latch()
    head = coord.submit(lambda: latch.enter() or "h")
    assert latch.wait_entered(1)
    child = head.then(lambda x: x + "c", timeout=SHORT)
    # a witness token with the same timeout times out: more than SHORT passed since then()
    witness = task_token_guard(operation_type="chain_witness", timeout=SHORT)(latch.enter)()
    with pytest.raises(TokenTimeout):
        witness.get(timeout=SAFETY)
    assert child.state is TokenState.CREATED  # not submitted before its head completes
    latch.release()
    assert child.get(timeout=SAFETY) == "hc"
    assert child.state is TokenState.COMPLETED
    assert wait_until(lambda: coord.stats()["discarded"] == 1)


def test_a_step_with_its_own_timeout(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    latch = make_latch()
    ran = []
    step = task_token_guard(operation_type="chain_step_to", timeout=SHORT)(lambda x: latch.enter())
    mid = coord.submit(lambda: 1).then(step)
    tail = mid.then(ran.append)
    with pytest.raises(TokenTimeout):
        tail.get(timeout=SAFETY)
    assert mid.state is TokenState.TIMED_OUT
    latch.release()
    assert wait_until(lambda: coord.stats()["discarded"] == 1)
    assert ran == []


# --------------------------------------------------------------------------- priorities


def test_a_high_priority_step_runs_ahead_of_queued_tokens(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=1)
    latch = make_latch()
    order = []
    blocker = coord.submit(latch.enter)
    assert latch.wait_entered(1)
    head = coord.submit(order.append, "head")
    child = head.then(lambda _: order.append("child"), priority="high")
    others = [coord.submit(order.append, f"n{i}") for i in range(3)]
    latch.release()
    for t in (blocker, head, child, *others):
        t.get(timeout=SAFETY)
    assert order == ["head", "child", "n0", "n1", "n2"]


# --------------------------------------------------------------------------- drain / stop


def test_drain_waits_for_chain_steps_not_yet_submitted(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    latch = make_latch()
    head = coord.submit(lambda: latch.enter() or 1)
    assert latch.wait_entered(1)
    tail = head.then(lambda x: x + 1).then(lambda x: x * 10)
    reports = []
    drainer = threading.Thread(target=lambda: reports.append(coord.drain(timeout=SAFETY)))
    drainer.start()
    assert wait_until(lambda: not coord.admission_open)
    latch.release()
    drainer.join(SAFETY)
    assert not drainer.is_alive()
    assert tail.state is TokenState.COMPLETED
    assert tail.get(timeout=0) == 20
    assert reports[0]["timed_out"] is False
    assert reports[0]["completed"] == 3
    coord.resume()
    quiescent(coord)


def test_stop_without_wait_kills_pending_steps(make_coord, make_latch):
    """stop(wait=False) kills every token that has not started: a chain step whose head is
    still running when the stop begins must not run afterwards."""
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    latch = make_latch()
    ran = []
    head = coord.submit(lambda: latch.enter() or 1)
    assert latch.wait_entered(1)
    mid = head.then(ran.append)
    tail = mid.then(ran.append)
    stopper = threading.Thread(target=coord.stop, kwargs={"wait": False}, daemon=True)
    stopper.start()
    assert wait_until(lambda: not coord.admission_open)  # the stop is under way
    latch.release()  # the head may finish: it was running
    stopper.join(SAFETY)
    assert not stopper.is_alive()
    assert head.get(timeout=0) == 1
    for t in (mid, tail):
        assert t.wait(SAFETY)
        assert t.state is TokenState.KILLED
        with pytest.raises(TokenKilled):
            t.get(timeout=0)
    assert ran == []
    s = coord.stats()
    assert s["created"] == s["completed"] + s["failed"] + s["killed"] + s["timed_out"]


def test_a_head_finishing_after_stop_kills_its_pending_steps(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    latch = make_latch()
    head = coord.submit(lambda: latch.enter() or 1)
    assert latch.wait_entered(1)
    tail = head.then(lambda x: x).then(lambda x: x)
    assert coord.stop(wait=False, timeout=SHORT) is False  # the head still runs
    latch.release()
    assert head.wait(SAFETY)
    assert tail.wait(SAFETY)
    assert tail.state is TokenState.KILLED


def test_stop_with_wait_runs_the_whole_chain(make_coord):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=1)
    token = coord.submit(lambda: 0)
    for _ in range(20):
        token = token.then(lambda x: x + 1)
    assert coord.stop(wait=True, timeout=SAFETY) is True
    assert token.get(timeout=0) == 20
