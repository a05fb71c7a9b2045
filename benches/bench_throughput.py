"""Per-task overhead: no-op throughput, round trip, and the cost of a decorated call.

These are GIL-bound: a no-op task is all bookkeeping, so the figures measure how much Python
each system runs per task (TokenGate moves that bookkeeping into Rust) and how quickly a result
crosses threads.
"""

from __future__ import annotations

import statistics
import time

import pytest

bench = pytest.importorskip("tokengate.bench")

perf = time.perf_counter
N = 100_000


@pytest.mark.timeout(900)
@pytest.mark.benchmark(group="no-op throughput: 100 000 submitted, then all awaited")
def test_noop_throughput(benchmark, system_name, open_system, record):
    s = open_system(bench.default_layout())
    bench.noop_throughput(s, 500 if s.slow else 10_000)  # warm-up: threads started, code paths hot
    results = []
    benchmark.pedantic(lambda: results.append(bench.noop_throughput(s, N)), rounds=3)
    us = statistics.median(r["us_per_task"] for r in results)
    record("no-op throughput", us, "us/task", n=results[0]["n"])


@pytest.mark.benchmark(group="round trip: submit one no-op, wait for it")
def test_round_trip(benchmark, system_name, open_system, record):
    s = open_system(bench.default_layout())
    rt = s.round_trip
    noop = bench.noop
    for _ in range(10 if s.slow else 200):
        rt(noop)
    samples: list[float] = []

    def one() -> None:
        t0 = perf()
        rt(noop)
        samples.append(perf() - t0)

    benchmark.pedantic(one, rounds=200 if s.slow else 3_000)
    us = [x * 1e6 for x in samples]
    record("round trip median", statistics.median(us), "us", p95_us=bench.percentile(us, 95))


@pytest.mark.benchmark(group="decorator call: call until the handle returns (per 100 calls)")
def test_decorator_call(benchmark, system_name, open_system, record):
    s = open_system(bench.default_layout())
    if not s.has_handles:
        pytest.skip(f"{system_name} returns no handle without a running event loop")
    batch = 100
    make = s.call_factory(bench.noop)
    get = s.getter()
    rng = range(batch)
    pending: list = []
    per_call: list[float] = []

    def calls() -> None:
        t0 = perf()
        handles = [make() for _ in rng]
        per_call.append((perf() - t0) / batch * 1e6)
        pending.extend(handles)

    def drain() -> None:  # untimed: wait for the previous batch so the pool never fills
        for h in pending:
            get(h)
        pending.clear()

    rounds = 30 if s.slow else 1_000
    benchmark.pedantic(calls, setup=drain, rounds=rounds, warmup_rounds=min(20, rounds))
    drain()
    record(
        "decorator call median",
        statistics.median(per_call),
        "us",
        p95_us=bench.percentile(per_call, 95),
        what="decorated call" if system_name == "tokengate" else "submit()",
    )
