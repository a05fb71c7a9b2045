"""Nested waits: tasks that submit child tokens and get() them must not deadlock the workers."""

from __future__ import annotations

import threading

import pytest

from _support import SAFETY
from tokengate import TokenState, task_token_guard


@task_token_guard(operation_type="leaf", tags={"weight": "heavy"})
def leaf(x):
    return x * 10


@task_token_guard(operation_type="middle", tags={"weight": "heavy"})
def middle(x):
    return leaf(x).get(timeout=SAFETY) + 1


@pytest.mark.timeout(60)
def test_three_levels_with_every_worker_busy(make_coord):
    """cores=1, workers_per_core=2: both workers run a top-level task at the same time, each of
    which waits on a child that itself waits on a grandchild."""
    make_coord(cores=1, workers_per_core=2)
    both_busy = threading.Barrier(2)
    levels = []
    lock = threading.Lock()

    @task_token_guard(operation_type="top", tags={"weight": "heavy"})
    def top(x):
        # both workers are now occupied by a top-level task
        both_busy.wait(SAFETY)
        child = middle(x)
        value = child.get(timeout=SAFETY)
        with lock:
            levels.append((x, child.state))
        return value + 1

    tokens = [top(1), top(2)]
    assert [t.get(timeout=SAFETY) for t in tokens] == [12, 22]
    assert sorted(x for x, _ in levels) == [1, 2]
    assert all(state is TokenState.COMPLETED for _, state in levels)
    assert all(t.state is TokenState.COMPLETED for t in tokens)


@pytest.mark.timeout(60)
def test_single_worker_nested_chain(make_coord):
    make_coord(cores=1, workers_per_core=1)

    @task_token_guard(operation_type="depth")
    def depth(n):
        if n == 0:
            return 0
        return depth(n - 1).get(timeout=SAFETY) + 1

    assert depth(3).get(timeout=SAFETY) == 3


@pytest.mark.timeout(60)
def test_fan_out_children_waited_by_busy_parents(make_coord):
    make_coord(cores=1, workers_per_core=2)
    all_parents = threading.Barrier(2)

    @task_token_guard(operation_type="parent", tags={"weight": "heavy"})
    def parent(base):
        all_parents.wait(SAFETY)
        children = [leaf(base + i) for i in range(5)]
        return sum(c.get(timeout=SAFETY) for c in children)

    a, b = parent(0), parent(100)
    assert a.get(timeout=SAFETY) == sum((0 + i) * 10 for i in range(5))
    assert b.get(timeout=SAFETY) == sum((100 + i) * 10 for i in range(5))


@pytest.mark.timeout(60)
def test_nested_child_failure_propagates_through_levels(make_coord):
    make_coord(cores=1, workers_per_core=1)

    class Deep(Exception):
        pass

    @task_token_guard(operation_type="deep_fail")
    def deep_fail():
        raise Deep("bottom")

    @task_token_guard(operation_type="mid_fail")
    def mid_fail():
        return deep_fail().get(timeout=SAFETY)

    @task_token_guard(operation_type="top_fail")
    def top_fail():
        return mid_fail().get(timeout=SAFETY)

    token = top_fail()
    with pytest.raises(Deep, match="bottom"):
        token.get(timeout=SAFETY)
    assert token.state is TokenState.FAILED
    # the worker is fine afterwards
    assert leaf(4).get(timeout=SAFETY) == 40
