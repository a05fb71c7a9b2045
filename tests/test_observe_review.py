"""Regression tests for the defects the review of issue #9 (observability) found, one each."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import weakref
from collections import defaultdict

import pytest

from _support import SAFETY
from tokengate import (
    ConfigurationError,
    MethodBlocked,
    OperationsCoordinator,
    TokenState,
    current_token,
    task_token_guard,
)

FINAL = {"completed", "failed", "killed", "timed_out", "quarantined", "refused"}


class Rec:
    """Every event of a coordinator, per token."""

    def __init__(self, coord: OperationsCoordinator) -> None:
        self.lock = threading.Lock()
        self.events: list = []
        coord.events.subscribe(self.add)

    def add(self, e) -> None:
        with self.lock:
            self.events.append(e)

    def by_token(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = defaultdict(list)
        with self.lock:
            for e in self.events:
                out[e.token_id].append(e.kind)
        return dict(out)


def _tokens_total(coord: OperationsCoordinator, op: str) -> dict[str, int]:
    for o in coord._last_runtime().metrics()["operations"]:
        if o["operation"] == op:
            return dict(o["tokens"])
    raise AssertionError(f"no operation {op!r}")


@pytest.mark.parametrize("retries", [0, 2])
def test_inline_a_token_killed_while_it_runs_ends_once_and_runs_no_more(retries):
    @task_token_guard(operation_type=f"selfkill{retries}", retries=retries)
    def selfkill():
        current_token().kill()
        raise ValueError("after the kill")

    with OperationsCoordinator(mode="inline") as coord:
        rec = Rec(coord)
        t = selfkill()
        assert t.state is TokenState.KILLED
        assert coord.events.flush(SAFETY)
        assert rec.by_token()[t.token_id] == ["created", "started", "killed"]
        counts = _tokens_total(coord, f"selfkill{retries}")
        assert counts["killed"] == 1 and counts["retried"] == 0


def test_a_token_still_running_when_stop_gives_up_gets_its_final_event():
    release = threading.Event()
    entered = threading.Event()

    @task_token_guard(operation_type="long")
    def long():
        entered.set()
        release.wait(SAFETY)
        return 1

    coord = OperationsCoordinator(cores=1, workers_per_core=1, grow_on_demand=False)
    got = threading.Condition()
    kinds: list[str] = []

    def on_event(e) -> None:
        with got:
            kinds.append(e.kind)
            got.notify_all()

    coord.events.subscribe(on_event)
    coord.start()
    t = long()
    assert entered.wait(SAFETY)
    assert coord.stop(timeout=0.05) is False  # the task still runs
    release.set()
    assert t.wait(SAFETY)
    with got:
        assert got.wait_for(lambda: "completed" in kinds, SAFETY), kinds
    assert kinds == ["created", "admitted", "started", "completed"]


def test_a_start_while_the_previous_stop_waits_gets_its_events():
    release = threading.Event()
    entered = threading.Event()

    @task_token_guard(operation_type="slowstop")
    def slow():
        entered.set()
        release.wait(SAFETY)

    @task_token_guard(operation_type="quick")
    def quick(i):
        return i

    coord = OperationsCoordinator(cores=1, workers_per_core=2)
    done: list[int] = []
    coord.events.subscribe(lambda e: done.append(e.token_id), kinds={"completed"})
    coord.start()
    first = slow()
    assert entered.wait(SAFETY)
    stopper = threading.Thread(target=coord.stop)  # waits for the running token
    stopper.start()
    while coord._rt is not None:  # the stop has begun (admission closed)
        threading.Event().wait(0.001)
    coord.start()  # allowed: the old runtime is no longer the current one
    release.set()
    stopper.join(SAFETY)
    tokens = [quick(i) for i in range(5)]
    for t in tokens:
        t.get(timeout=SAFETY)
    assert coord.events.flush(SAFETY)
    assert coord.events._rt is coord._rt  # the old stop did not detach the new run
    assert {t.token_id for t in tokens} <= set(done)
    assert first.token_id in done
    coord.stop()


def test_a_batch_subscriber_never_gets_kinds_it_did_not_ask_for(make_coord):
    coord = make_coord(cores=1, workers_per_core=1)
    gate = threading.Event()
    entered = threading.Event()
    got: list[str] = []

    def blocker(e) -> None:
        entered.set()
        gate.wait(SAFETY)

    def on_batch(batch) -> None:
        got.extend(e.kind for e in batch)

    coord.events.subscribe(on_batch, kinds={"completed"}, batch=True)
    wide = coord.events.subscribe(blocker, kinds={"failed"})

    @task_token_guard(operation_type="mixed")
    def mixed(i):
        if i % 2:
            raise ValueError(i)
        return i

    first = mixed(1)
    first.wait(SAFETY)
    assert entered.wait(SAFETY)  # the delivery thread is stuck in the "failed" subscriber
    tokens = [mixed(i) for i in range(10)]
    for t in tokens:
        t.wait(SAFETY)
    wide.unsubscribe()  # the recorded batch still holds "failed" events
    gate.set()
    assert coord.events.flush(SAFETY)
    assert got and set(got) == {"completed"}


def test_kept_events_do_not_keep_the_tasks_closure_alive(make_coord):
    coord = make_coord(cores=1, workers_per_core=1)

    class Sentinel:
        pass

    def run() -> weakref.ref:
        seen: list = []
        s = Sentinel()
        seen.append(s)
        sub = coord.events.subscribe(seen.append, kinds={"completed", "failed"})
        coord.submit(lambda: len(seen)).wait(SAFETY)  # the task's closure refers to `seen`
        coord.submit(lambda: seen[10**6]).wait(SAFETY)  # an error whose traceback does too
        assert coord.events.flush(SAFETY)
        sub.unsubscribe()
        assert len(seen) == 3
        return weakref.ref(s)

    ref = run()
    gc.collect()
    assert ref() is None


def test_an_events_error_is_visible_to_the_garbage_collector(make_coord):
    coord = make_coord(cores=1, workers_per_core=1)
    got: list = []
    coord.events.subscribe(got.append, kinds={"failed"})

    def boom():
        raise KeyError("boom")

    coord.submit(boom).wait(SAFETY)
    assert coord.events.flush(SAFETY)
    (event,) = got
    assert gc.is_tracked(event)
    assert event.error in gc.get_referents(event)  # a cycle through it can be collected


def test_a_chain_step_refused_by_its_breaker_counts_as_failed_not_blocked(make_coord):
    coord = make_coord(cores=1, workers_per_core=1)

    @task_token_guard(operation_type="stepa")
    def stepa():
        return 1

    @task_token_guard(operation_type="stepb")
    def stepb(x):
        return x

    stepb(0).get(timeout=SAFETY)  # the operation exists
    coord.guard_house.block("stepb")
    with pytest.raises(MethodBlocked):
        stepb(1)
    step = stepa().then(stepb)
    assert step.wait(SAFETY) and step.state is TokenState.FAILED
    counts = _tokens_total(coord, "stepb")
    assert counts["blocked"] == 1  # the direct call only
    assert counts["failed"] == 1  # the step


def test_inline_retries_do_not_count_earlier_attempts_as_queue_wait():
    n = {"calls": 0}

    @task_token_guard(operation_type="flaky_inline", retries=2, retry_backoff=0.05)
    def flaky():
        n["calls"] += 1
        raise ValueError("no")

    with OperationsCoordinator(mode="inline") as coord:
        starts: list = []
        coord.events.subscribe(starts.append, kinds={"started"})
        flaky().wait()
        assert coord.events.flush(SAFETY)
    assert [e.attempt for e in starts] == [1, 2, 3]
    assert all(e.queue_wait == 0.0 for e in starts[1:])


def test_a_coroutine_function_subscriber_is_refused(make_coord):
    coord = make_coord(cores=1, workers_per_core=1)

    async def on_event(e):
        return None

    with pytest.raises(ConfigurationError, match="coroutine function"):
        coord.events.subscribe(on_event)
    assert asyncio.iscoroutinefunction(on_event)


def test_dropped_events_are_logged(make_coord, caplog):
    coord = make_coord(cores=1, workers_per_core=1, event_capacity=8)
    gate = threading.Event()
    entered = threading.Event()

    def stuck(e) -> None:
        entered.set()
        gate.wait(SAFETY)

    coord.events.subscribe(stuck)
    caplog.set_level(logging.WARNING, logger="tokengate.events")
    tokens = [coord.submit(lambda: None) for _ in range(50)]
    for t in tokens:
        t.wait(SAFETY)
    assert entered.wait(SAFETY)
    gate.set()
    assert coord.events.flush(SAFETY)
    assert coord.events.stats()["dropped"] > 0
    assert any("dropped" in r.getMessage() for r in caplog.records)


def test_default_names_skip_the_names_in_use():
    named = OperationsCoordinator(name="coordinator-900")
    others = [OperationsCoordinator() for _ in range(3)]
    names = [named.name, *(c.name for c in others)]
    assert len(set(names)) == len(names)
