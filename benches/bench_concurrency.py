"""Concurrency: sleep fan-out, GIL-releasing CPU work, and the CONCURRENCY BURST.

Sleeping and hashing release the GIL, so these show whether a system keeps every worker busy:
the concurrency ratio is the sum of task durations over the wall clock. The ideal is the worker
count for sleeps (32 here) and the CPU count for hashing (one worker per CPU).
"""

from __future__ import annotations

import statistics

import pytest

bench = pytest.importorskip("tokengate.bench")

# weight-routed workloads: the decorated path only (coordinator.submit is always medium)
ROUTED = [s for s in bench.SYSTEMS if s != "tokengate/submit"]


def _median(results, key):
    return statistics.median(r[key] for r in results)


@pytest.mark.systems(ROUTED)
@pytest.mark.benchmark(group="sleep fan-out: 256 x sleep(10 ms) on 32 workers")
def test_sleep_fanout(benchmark, system_name, open_system, record):
    s = open_system(bench.fanout_layout(32))
    bench.sleep_fanout(s)  # warm-up: all 32 threads started
    results = []
    benchmark.pedantic(lambda: results.append(bench.sleep_fanout(s)), rounds=5)
    record(
        "sleep fan-out concurrency",
        _median(results, "concurrency_ratio"),
        "x",
        workers=s.workers,
        wall_s=_median(results, "wall_s"),
        ideal_wall_s=results[0]["ideal_wall_s"],
    )


@pytest.mark.systems(ROUTED)
@pytest.mark.benchmark(group="GIL-releasing CPU: 8 tasks per core, each sha256 over 4 MiB x4")
def test_cpu_hash(benchmark, system_name, open_system, record):
    s = open_system(bench.cpu_layout())
    serial = bench.serial_hash_seconds()
    bench.cpu_hash(s, per_core=2, serial_s=serial)  # warm-up
    results = []
    benchmark.pedantic(lambda: results.append(bench.cpu_hash(s, serial_s=serial)), rounds=5)
    record(
        "GIL-releasing CPU concurrency",
        _median(results, "concurrency_ratio"),
        "x",
        cores=bench.available_cores(),
        speedup=_median(results, "speedup"),
        serial_task_ms=serial * 1e3,
    )


@pytest.mark.systems(ROUTED)
@pytest.mark.benchmark(group="CONCURRENCY BURST: 8 medium tasks behind a barrier")
def test_burst(benchmark, system_name, open_system, record):
    s = open_system(bench.default_layout())
    bench.burst(s)  # warm-up
    results = []
    benchmark.pedantic(lambda: results.append(bench.burst(s)), rounds=5)
    record("burst wall", _median(results, "wall_s"), "s", ideal_s=results[0]["ideal_wall_s"])
    record("burst duration spread", _median(results, "duration_spread_ms"), "ms")
    record("burst completion spread", _median(results, "completion_spread_ms"), "ms")
    record("burst concurrency", _median(results, "concurrency_ratio"), "x")
