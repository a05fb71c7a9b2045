"""Priorities and re-routing of queued tokens (issue #7).

* ``priority`` high | normal | low from the decorator, or per call through
  ``fn.options(priority=...)``; within a mailbox higher runs first, FIFO within a priority.
* ``coord.reprioritize(token_id, priority)`` / ``coord.reroute(token_id, weight)`` move a
  token that has not started (True) and change nothing on a started or finished one (False).

Orders are checked by what the tasks record, on 1 core x 1 worker held by a latch while the
mix is queued, so that nothing can run before the whole mix is in place.
"""

from __future__ import annotations

import threading

import pytest

from _support import SAFETY, quiescent, wait_until
from tokengate import (
    ConfigurationError,
    InvalidTag,
    TaskWeight,
    TokenState,
    task_token_guard,
)


def _recorder():
    order: list[object] = []
    lock = threading.Lock()

    def record(label):
        with lock:
            order.append(label)
        return label

    return order, record


@pytest.fixture
def one_worker(make_coord, make_latch):
    """1 core x 1 worker, its worker held by a latch task: (coord, latch, blocker)."""
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=1)
    latch = make_latch()
    blocker = coord.submit(latch.enter)
    assert latch.wait_entered(1)
    return coord, latch, blocker


# --------------------------------------------------------------------------- lanes


def test_decorator_priority_orders_a_mailbox_fifo_within_a_lane(one_worker):
    coord, latch, blocker = one_worker
    order, record = _recorder()
    fns = {
        p: task_token_guard(operation_type=f"prio_{p}", priority=p)(record)
        for p in ("high", "normal", "low")
    }
    mix = ["low", "normal", "high", "low", "high", "normal", "normal", "low", "high", "high"]
    tokens = [fns[p]((p, i)) for i, p in enumerate(mix)]
    assert [t.priority for t in tokens] == mix
    assert all(t.state in (TokenState.WAITING, TokenState.ADMITTED) for t in tokens)
    latch.release()
    for t in tokens:
        t.get(timeout=SAFETY)
    blocker.get(timeout=SAFETY)
    expected = [
        (p, i) for lane in ("high", "normal", "low") for i, p in enumerate(mix) if p == lane
    ]
    assert order == expected
    quiescent(coord)


def test_per_call_priority_through_options(one_worker):
    coord, latch, _ = one_worker
    order, record = _recorder()

    @task_token_guard(operation_type="prio_per_call")
    def work(label):
        return record(label)

    assert work.options(priority="high") is not work
    tokens = [
        work("n0"),
        work.options(priority="low")("l0"),
        work.options(priority="HIGH")("h0"),  # any case
        work("n1"),
        work.options(priority="High")("h1"),
        work.options(priority="low")("l1"),
    ]
    assert [t.priority for t in tokens] == ["normal", "low", "high", "normal", "high", "low"]
    latch.release()
    for t in tokens:
        t.get(timeout=SAFETY)
    assert order == ["h0", "h1", "n0", "n1", "l0", "l1"]
    # options() made a new function: the original keeps its own priority
    assert work("again").get(timeout=SAFETY) == "again"
    again = work("again2")
    assert again.priority == "normal"
    assert again.get(timeout=SAFETY) == "again2"
    quiescent(coord)


def test_options_priority_does_not_collide_with_the_functions_own_keyword(coord):
    @task_token_guard(operation_type="prio_kw")
    def fn(priority, timeout=None, weight="w"):
        return (priority, timeout, weight)

    token = fn.options(priority="high", timeout=SAFETY, weight="light")("mine", timeout=3)
    assert token.get(timeout=SAFETY) == ("mine", 3, "w")
    assert token.priority == "high"
    assert token.timeout == SAFETY
    assert token.weight is TaskWeight.LIGHT


def test_options_override_the_decorator_priority(one_worker):
    _, latch, _ = one_worker
    order, record = _recorder()
    low_fn = task_token_guard(operation_type="prio_low_fn", priority="low")(record)
    tokens = [low_fn("low-a"), low_fn.options(priority="high")("now-high"), low_fn("low-b")]
    latch.release()
    for t in tokens:
        t.get(timeout=SAFETY)
    assert order == ["now-high", "low-a", "low-b"]


def test_priorities_in_the_pool_while_paused(make_coord):
    """While paused, tokens wait in the pool; it too serves high before normal before low."""
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=1)
    order, record = _recorder()
    fns = {
        p: task_token_guard(operation_type=f"pool_{p}", priority=p)(record)
        for p in ("high", "normal", "low")
    }
    coord.pause()
    mix = ["normal", "low", "high", "normal", "low", "high"]
    tokens = [fns[p](f"{p}{i}") for i, p in enumerate(mix)]
    assert all(t.state is TokenState.WAITING for t in tokens)
    coord.resume()
    for t in tokens:
        t.get(timeout=SAFETY)
    assert order == ["high2", "high5", "normal0", "normal3", "low1", "low4"]


def test_submit_tokens_are_normal_priority(coord):
    token = coord.submit(lambda: 1)
    assert token.get(timeout=SAFETY) == 1
    assert token.priority == "normal"


# --------------------------------------------------------------------------- reprioritize


def test_reprioritize_moves_a_queued_token_to_the_back_of_its_new_lane(one_worker):
    coord, latch, blocker = one_worker
    order, record = _recorder()
    low = task_token_guard(operation_type="rp_low", priority="low")(record)
    normal = task_token_guard(operation_type="rp_normal")(record)
    lows = [low(f"L{i}") for i in range(5)]
    normals = [normal(f"N{i}") for i in range(3)]
    moved_before = coord.stats()["moved"]

    assert coord.reprioritize(lows[3].token_id, "high") is True
    assert lows[3].priority == "high"
    assert coord.reprioritize(normals[1], "low") is True  # a TaskToken is accepted too
    assert normals[1].priority == "low"
    assert coord.stats()["moved"] == moved_before + 2

    latch.release()
    for t in lows + normals:
        t.get(timeout=SAFETY)
    blocker.get(timeout=SAFETY)
    assert order == ["L3", "N0", "N2", "L0", "L1", "L2", "L4", "N1"]
    quiescent(coord)


def test_reprioritize_to_the_same_lane_goes_to_its_back(one_worker):
    coord, latch, _ = one_worker
    order, record = _recorder()
    fn = task_token_guard(operation_type="rp_same")(record)
    tokens = [fn(i) for i in range(4)]
    assert coord.reprioritize(tokens[0], "normal") is True
    latch.release()
    for t in tokens:
        t.get(timeout=SAFETY)
    assert order == [1, 2, 3, 0]


def test_reprioritize_a_token_in_the_pool(make_coord):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=1)
    order, record = _recorder()
    fn = task_token_guard(operation_type="rp_pool")(record)
    coord.pause()
    tokens = [fn(i) for i in range(4)]
    assert coord.reprioritize(tokens[2], "high") is True
    assert coord.reprioritize(tokens[0], "low") is True
    coord.resume()
    for t in tokens:
        t.get(timeout=SAFETY)
    assert order == [2, 1, 3, 0]


def test_reprioritize_a_started_or_finished_token_returns_false_and_changes_nothing(
    one_worker,
):
    coord, latch, blocker = one_worker
    done = coord.submit(lambda: "x")
    # `done` is queued behind the blocker: finish both, then try
    latch.release()
    assert done.get(timeout=SAFETY) == "x"
    blocker.get(timeout=SAFETY)
    moved = coord.stats()["moved"]
    assert coord.reprioritize(done, "high") is False
    assert done.priority == "normal"
    assert done.state is TokenState.COMPLETED

    inside = threading.Event()
    go = threading.Event()
    running = coord.submit(lambda: inside.set() or go.wait(SAFETY))
    assert inside.wait(SAFETY)
    assert coord.reprioritize(running, "low") is False
    assert coord.reprioritize(running.token_id, "high") is False
    assert running.priority == "normal"
    assert running.state is TokenState.EXECUTING
    go.set()
    assert running.get(timeout=SAFETY) is True
    assert coord.stats()["moved"] == moved


def test_reprioritize_an_unknown_id_returns_false(coord):
    assert coord.reprioritize(10**9, "high") is False


def test_reprioritize_a_killed_token_returns_false(one_worker):
    coord, _, _ = one_worker
    queued = coord.submit(lambda: 1)
    assert queued.kill() is True
    assert coord.reprioritize(queued, "high") is False
    assert queued.state is TokenState.KILLED


@pytest.mark.parametrize("bad", ["urgent", "", "HIGHEST", None, 0, 1.5])
def test_reprioritize_rejects_an_unknown_priority(one_worker, bad):
    coord, latch, _ = one_worker
    queued = coord.submit(lambda: 1)
    with pytest.raises(ConfigurationError, match="priority") as ei:
        coord.reprioritize(queued, bad)
    assert "high" in str(ei.value) and "low" in str(ei.value)
    assert queued.priority == "normal"
    latch.release()
    assert queued.get(timeout=SAFETY) == 1


@pytest.mark.parametrize("bad", [-1, "7", 2.0, True, None])
def test_reprioritize_rejects_a_bad_token_id(coord, bad):
    with pytest.raises(ConfigurationError, match="token_id"):
        coord.reprioritize(bad, "high")


# --------------------------------------------------------------------------- reroute


@pytest.fixture
def three_busy_cores(make_coord, make_latch):
    """cores=3 x 1 worker, each core's worker held by a latch task."""
    coord = make_coord(grow_on_demand=False, cores=3, workers_per_core=1)
    latch = make_latch()
    blockers = [
        task_token_guard(operation_type=f"block_{w}", tags={"weight": w})(latch.enter)()
        for w in ("heavy", "medium", "light")
    ]
    assert latch.wait_entered(3)
    assert sorted(b.core_id for b in blockers) == [1, 2, 3]
    return coord, latch, blockers


def test_reroute_heavy_to_light_moves_it_to_core_three(three_busy_cores):
    coord, latch, _ = three_busy_cores
    heavy = task_token_guard(operation_type="rr_heavy", tags={"weight": "heavy"})

    @heavy
    def work(i):
        return i

    tokens = [work(i) for i in range(6)]
    moved = coord.stats()["moved"]
    target = tokens[4]
    assert coord.reroute(target.token_id, "light") is True
    assert target.weight is TaskWeight.LIGHT
    assert coord.stats()["moved"] == moved + 1
    latch.release()
    assert [t.get(timeout=SAFETY) for t in tokens] == list(range(6))
    assert target.core_id == 3
    quiescent(coord)


def test_reroute_light_to_heavy_may_run_anywhere_and_medium_never_on_core_one(
    three_busy_cores,
):
    coord, latch, _ = three_busy_cores
    light = task_token_guard(operation_type="rr_light", tags={"weight": "light"})(lambda i: i)
    tokens = [light(i) for i in range(6)]
    assert coord.reroute(tokens[0], "medium") is True
    assert coord.reroute(tokens[1], "Heavy") is True  # any case
    assert tokens[0].weight is TaskWeight.MEDIUM
    assert tokens[1].weight is TaskWeight.HEAVY
    latch.release()
    assert [t.get(timeout=SAFETY) for t in tokens] == list(range(6))
    assert tokens[0].core_id in (2, 3)
    assert all(t.core_id == 3 for t in tokens[2:])
    routed = {c["core"]: c["routed"] for c in coord.stats()["per_core"]}
    # core 1 never took a light or medium token
    assert routed[1]["light"] == routed[1]["medium"] == 0


def test_reroute_in_the_pool_is_applied_at_routing(make_coord):
    coord = make_coord(grow_on_demand=False, cores=3, workers_per_core=1)
    heavy = task_token_guard(operation_type="rr_pool", tags={"weight": "heavy"})(lambda: 1)
    coord.pause()
    tokens = [heavy() for _ in range(5)]
    for t in tokens:
        assert coord.reroute(t, "light") is True
    coord.resume()
    for t in tokens:
        assert t.get(timeout=SAFETY) == 1
    assert [t.core_id for t in tokens] == [3] * 5
    assert all(t.weight is TaskWeight.LIGHT for t in tokens)


def test_reroute_keeps_priority_and_order_within_the_new_mailbox(three_busy_cores):
    coord, latch, _ = three_busy_cores
    order, record = _recorder()
    light = task_token_guard(operation_type="rr_ord_l", tags={"weight": "light"})(record)
    heavy_low = task_token_guard(
        operation_type="rr_ord_h", tags={"weight": "heavy"}, priority="low"
    )(record)
    heavy_high = task_token_guard(
        operation_type="rr_ord_hh", tags={"weight": "heavy"}, priority="high"
    )(record)
    lights = [light(f"l{i}") for i in range(3)]
    hl = heavy_low("heavy-low")
    hh = heavy_high("heavy-high")
    assert coord.reroute(hl, "light") is True
    assert coord.reroute(hh, "light") is True
    latch.release()
    for t in [*lights, hl, hh]:
        t.get(timeout=SAFETY)
    assert hl.core_id == hh.core_id == 3
    light_order = [x for x in order if x in ("l0", "l1", "l2", "heavy-low", "heavy-high")]
    assert light_order == ["heavy-high", "l0", "l1", "l2", "heavy-low"]


def test_reroute_a_started_or_finished_token_returns_false_and_changes_nothing(coord):
    inside = threading.Event()
    go = threading.Event()
    fn = task_token_guard(operation_type="rr_started", tags={"weight": "heavy"})(
        lambda: inside.set() or go.wait(SAFETY)
    )
    running = fn()
    assert inside.wait(SAFETY)
    core = running.core_id
    moved = coord.stats()["moved"]
    assert coord.reroute(running, "light") is False
    assert running.weight is TaskWeight.HEAVY
    assert running.core_id == core
    go.set()
    assert running.get(timeout=SAFETY) is True
    assert coord.reroute(running.token_id, "medium") is False
    assert running.weight is TaskWeight.HEAVY
    assert running.core_id == core
    assert coord.stats()["moved"] == moved


@pytest.mark.parametrize("bad", ["featherweight", "", None, 2])
def test_reroute_rejects_an_unknown_weight(one_worker, bad):
    coord, latch, _ = one_worker
    queued = coord.submit(lambda: 1)
    with pytest.raises(InvalidTag, match="weight") as ei:
        coord.reroute(queued, bad)
    assert isinstance(ei.value, ValueError)
    assert "light" in str(ei.value)
    assert queued.weight is TaskWeight.MEDIUM
    latch.release()
    assert queued.get(timeout=SAFETY) == 1


def test_reprioritize_and_reroute_move_a_token_held_by_a_limit(make_coord, make_latch):
    """A token held by a limiter has not started: it takes the new priority (and the new
    lane in the limiter's queue) and the new weight, and runs with them."""
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    latch = make_latch()
    fn = task_token_guard(operation_type="rp_held", max_concurrency=1)(latch.enter)
    first = fn()
    assert latch.wait_entered(1)
    held = fn()
    assert wait_until(lambda: coord.stats()["held"] == 1)
    moved = coord.stats()["moved"]
    assert coord.reprioritize(held, "high") is True
    assert held.priority == "high"
    assert coord.reroute(held, "heavy") is True
    assert held.weight is TaskWeight.HEAVY
    assert coord.stats()["moved"] == moved  # nothing left a queue: it was outside them
    latch.release()
    first.get(timeout=SAFETY)
    held.get(timeout=SAFETY)
