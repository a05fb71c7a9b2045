"""Per-workload comparisons through the ``concurrency_compare`` fixture of the pytest plugin.

Each test runs one workload under ThreadPoolExecutor, ``asyncio.to_thread`` and TokenGate in
the same test (the plugin's fixture, as a user would write it: docs/benchmarks.md, "Comparing
your own function"). The benchmark row is TokenGate's; ``benchmark.extra_info`` holds every
system's median round time, µs per call and TokenGate's ratio to each peer (saved with
``--benchmark-json``; ``-s`` prints one line per workload).

Run: ``pytest benches/bench_compare.py --benchmark-only -s``.
"""

from __future__ import annotations

from functools import partial

import pytest

bench = pytest.importorskip("tokengate.bench")

# The plugin is registered by the installed entry point; this makes a source checkout work too
# (loading it both ways is harmless).
pytest_plugins = ["tokengate.testing.plugin"]

#: id -> (task, calls per round, weight)
WORKLOADS = {
    "no-op x 2000": (bench.noop, 2_000, "medium"),
    "sha256 over 64 KiB x 256 (GIL released)": (partial(bench.timed_hash, 64 * 1024), 256, "heavy"),
    "sleep(5 ms) x 64": (partial(bench.timed_sleep, 0.005), 64, "heavy"),
    "pure-Python loop x 200 (GIL held)": (partial(bench.timed_python, 2_000), 200, "medium"),
}


@pytest.mark.benchmark(group="concurrency_compare (TokenGate's rounds; peers in extra_info)")
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_compare(concurrency_compare, benchmark, workload):
    fn, calls, weight = WORKLOADS[workload]
    result = concurrency_compare(fn, calls=calls, weight=weight)
    print(f"\n{workload}: {result}")
    info = benchmark.extra_info
    assert info["calls_per_round"] == calls
    assert info["ratio_vs_threadpool"] == result.ratios["threadpool"] > 0
