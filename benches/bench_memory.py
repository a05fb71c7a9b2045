"""Memory per queued token: RSS growth per task queued behind parked workers.

Each measurement runs in a fresh interpreter (a subprocess) so memory freed by earlier
benchmarks cannot hide the growth. 200 000 queued by default, 1 000 000 with --tg-full.
"""

from __future__ import annotations

import pytest

bench = pytest.importorskip("tokengate.bench")


@pytest.mark.timeout(900)
@pytest.mark.systems(["threadpool", "tokengate"])
@pytest.mark.benchmark(group="memory: tasks queued behind blocked workers (subprocess time)")
def test_memory_per_queued_token(benchmark, system_name, tg_full, record):
    n = 1_000_000 if tg_full else 200_000
    results = []
    benchmark.pedantic(lambda: results.append(bench.memory_per_token(system_name, n)), rounds=1)
    r = results[0]
    record(
        "memory per queued token",
        r["bytes_per_token"],
        "bytes",
        n=n,
        mode=r["mode"],
        submit_us_per_task=r["submit_s"] / n * 1e6,
    )
