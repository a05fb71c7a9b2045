"""What the Guard House costs per token, against ThreadPoolExecutor in the same run.

100 000 no-op calls submitted, then every result, on a coordinator with: the Guard House off
(``guard_house=False``: no gate, no health, no history); the default (health counters and the
execution history on, breakers passive); breakers on for every operation (``auto_block=True``:
each attempt also feeds its breaker's window); spike detection on (``quarantine=True``: each call
is featurized and predicted, each attempt teaches the cost model). Each figure is microseconds
per call; the session table shows its ratio to ThreadPoolExecutor's. The issue's promise: the
default and breakers-on rows stay within 15 % of the off row.

Run: ``pytest benches/bench_guard.py --benchmark-only``.
"""

from __future__ import annotations

import concurrent.futures as cf
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("tokengate.bench")
import tokengate

perf = time.perf_counter
BURST = 100_000


def noop() -> None:
    return None


VARIANTS: dict[str, dict[str, Any]] = {
    "guard house off": {"guard_house": False},
    "default (health + history)": {},
    "breakers on": {"auto_block": True},
    "quarantine on": {"quarantine": True},
}


@pytest.fixture(params=list(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def submit(system_name: str, variant: str, tmp_path) -> Iterator[Callable[[], Any]]:
    if system_name == "threadpool":
        ex = cf.ThreadPoolExecutor(max_workers=tokengate.topology.allowed_cpu_count() * 4)
        yield lambda: ex.submit(noop)
        ex.shutdown(wait=True)
        return
    fn = tokengate.task_token_guard(operation_type=f"noop {variant}")(noop)
    with tokengate.OperationsCoordinator(
        pool_capacity=1_000_000, quarantine_dir=tmp_path, **VARIANTS[variant]
    ):
        for t in [fn() for _ in range(2_000)]:
            t.wait()
        yield fn


@pytest.mark.timeout(900)
@pytest.mark.systems(["threadpool", "tokengate"])
@pytest.mark.benchmark(group="guard house: 100 000 no-op calls, then every result")
def test_guard_house_cost(benchmark, system_name, variant, submit, record):
    # ThreadPoolExecutor has no Guard House: it runs its plain no-op under every variant's
    # name, so each TokenGate row has its ratio to a baseline measured beside it.
    rng = range(BURST)
    samples: list[float] = []

    def burst() -> None:
        t0 = perf()
        handles = [submit() for _ in rng]
        for h in handles:
            h.result()
        samples.append((perf() - t0) / BURST * 1e6)

    benchmark.pedantic(burst, rounds=3)
    record(f"guard house no-op, {variant}", statistics.median(samples), "us/call", n=BURST)
