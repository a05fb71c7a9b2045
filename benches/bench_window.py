"""Sustained load: the CONCURRENCY WINDOW (mixed releases) and SERIES SATURATION."""

from __future__ import annotations

import pytest

bench = pytest.importorskip("tokengate.bench")

ROUTED = [s for s in bench.SYSTEMS if s != "tokengate/submit"]


@pytest.fixture
def window_seconds(pytestconfig, tg_full):
    given = pytestconfig.getoption("--tg-window-seconds")
    return given if given is not None else (40.0 if tg_full else 10.0)


@pytest.mark.timeout(600)
@pytest.mark.systems(ROUTED)
@pytest.mark.benchmark(group="CONCURRENCY WINDOW: mixed releases every 20 ms")
def test_window(benchmark, system_name, open_system, record, window_seconds):
    s = open_system(bench.default_layout())
    bench.window(s, 0.5)  # warm-up
    results = []
    benchmark.pedantic(lambda: results.append(bench.window(s, window_seconds)), rounds=1)
    r = results[0]
    label = f"window {window_seconds:g}s"
    record(f"{label} tasks", float(r["tasks"]), "tasks")
    record(f"{label} latency p50", r["p50_ms"], "ms")
    record(f"{label} latency p95", r["p95_ms"], "ms")
    record(f"{label} latency max", r["max_ms"], "ms")
    record(f"{label} wait p50", r["wait_p50_ms"], "ms")
    record(f"{label} wait p95", r["wait_p95_ms"], "ms")
    record(f"{label} wait max", r["wait_max_ms"], "ms")
    record(f"{label} concurrency", r["concurrency_ratio"], "x")


@pytest.mark.tg_full
@pytest.mark.timeout(600)
@pytest.mark.systems(ROUTED)
@pytest.mark.benchmark(group="SERIES SATURATION: 20 x 1 s heavy tasks at once")
def test_series_saturation(benchmark, system_name, open_system, record):
    s = open_system(bench.default_layout())
    results = []
    benchmark.pedantic(lambda: results.append(bench.series_saturation(s, 20, 1.0)), rounds=1)
    r = results[0]
    record("saturation earliest", r["earliest_s"], "s")
    record("saturation latest", r["latest_s"], "s", ideal_s=r["ideal_latest_s"])
    record("saturation spread", r["spread_s"], "s")
