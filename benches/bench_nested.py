"""Nested waits: tasks that submit children to their own system and wait for them.

ThreadPoolExecutor has no answer to a task that waits on work queued behind it: once every
thread waits, it deadlocks, so here it gets one thread per waiting task (its context records
how many). TokenGate runs with its usual layout: a waiting task runs a child that has not
started inline, and a worker waiting on a child that runs elsewhere hands its place to a
compensating worker (the ``get(timeout)`` variant always takes that second path).
"""

from __future__ import annotations

import statistics

import pytest

bench = pytest.importorskip("tokengate.bench")

THREAD_SYSTEMS = ("threadpool", "tokengate", "tokengate/submit")


def _skip_unless_threaded(system_name: str) -> None:
    if system_name not in THREAD_SYSTEMS:
        pytest.skip(f"{system_name}: a task cannot submit through a handle")


@pytest.mark.benchmark(group="nested round trip: a task submits one child and waits for it")
def test_nested_round_trip(benchmark, system_name, open_system, record):
    _skip_unless_threaded(system_name)
    s = open_system(bench.default_layout())
    results = []
    benchmark.pedantic(lambda: results.append(bench.nested_round_trip(s, 500, 50)), rounds=3)
    record(
        "nested round trip median",
        statistics.median(r["median_us"] for r in results),
        "us",
        p95_us=statistics.median(r["p95_us"] for r in results),
    )


@pytest.mark.parametrize("timeout", [None, 60.0], ids=["no-timeout", "get-timeout"])
@pytest.mark.benchmark(group="nested fan-out trees: 8 roots x (1 + 3 + 9 + 27) tokens")
def test_nested_tree(benchmark, system_name, open_system, record, timeout):
    _skip_unless_threaded(system_name)
    layout = bench.default_layout()
    if system_name == bench.BASELINE:
        layout = (1, bench.tree_internal_nodes() + layout[1])
    s = open_system(layout)
    results = []
    benchmark.pedantic(lambda: results.append(bench.nested_tree(s, timeout=timeout)), rounds=5)
    label = "" if timeout is None else ", get(timeout)"
    record(
        f"nested fan-out tree wall{label}",
        statistics.median(r["wall_s"] for r in results),
        "s",
        tokens=int(results[0]["tokens"]),
        threads=s.workers,
    )
