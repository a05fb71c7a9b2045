"""Per-future overhead of ``tokengate.Executor`` against ``ThreadPoolExecutor`` in the same run.

Both executors get the same ``max_workers`` (the standard library's default) and run no-op
calls, so the figures are pure bookkeeping: a ``concurrent.futures.Future`` per call, the
hand-over to a worker, the result crossing back. Target: TokenGate at least as fast as
ThreadPoolExecutor (ratio <= 1.0). The token API (``coord.submit``, decorated calls,
bench_throughput.py) skips the Future and stays the fastest path.

Run: ``pytest benches/bench_executor.py --benchmark-only`` (the session table at the end shows
each figure's ratio to ThreadPoolExecutor's).
"""

from __future__ import annotations

import concurrent.futures as cf
import statistics
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("tokengate.bench")
import tokengate

perf = time.perf_counter
ROUND_TRIPS = 2_000
BURST = 100_000


def noop() -> None:
    return None


@pytest.fixture
def executor(system_name: str) -> Iterator[cf.Executor]:
    ex: cf.Executor
    if system_name == "threadpool":
        ex = cf.ThreadPoolExecutor()
    else:
        ex = tokengate.Executor()
    # Warm-up: threads started, code paths hot.
    for f in [ex.submit(noop) for _ in range(2_000)]:
        f.result()
    yield ex
    ex.shutdown(wait=True)


@pytest.mark.systems(["threadpool", "tokengate"])
@pytest.mark.benchmark(group="executor round trip: submit(noop).result(), one at a time")
def test_executor_round_trip(benchmark, system_name, executor, record):
    submit = executor.submit
    samples: list[float] = []

    def batch() -> None:
        t0 = perf()
        for _ in range(ROUND_TRIPS):
            submit(noop).result()
        samples.append((perf() - t0) / ROUND_TRIPS * 1e6)

    benchmark.pedantic(batch, rounds=5)
    # the target (<= 1.0x threadpool) is bench.TARGETS["executor round trip"]
    record("executor round trip", statistics.median(samples), "us/future", n=ROUND_TRIPS)


@pytest.mark.timeout(900)
@pytest.mark.systems(["threadpool", "tokengate"])
@pytest.mark.benchmark(group="executor burst: 100 000 submit(noop), then every result()")
def test_executor_burst(benchmark, system_name, executor, record):
    submit = executor.submit
    rng = range(BURST)
    samples: list[float] = []

    def burst() -> None:
        t0 = perf()
        futures = [submit(noop) for _ in rng]
        for f in futures:
            f.result()
        samples.append((perf() - t0) / BURST * 1e6)

    benchmark.pedantic(burst, rounds=3)
    record("executor burst", statistics.median(samples), "us/future", n=BURST)
