"""What execution policy and the Guard House cost per token, against ThreadPoolExecutor in
the same run.

100 000 no-op calls submitted, then every result, for: ThreadPoolExecutor; a decorated function
without options (the fast path, unchanged by policy); the same with a timeout; with retries
(none needed); with a storage tier (a permit per call); with a per-operation concurrency limit.
Then the Guard House (issue #8), with the option-less function: off (``guard_house=False``: no
gate, no health, no history); breakers on for every operation (``auto_block=True``); spike
detection on (``quarantine=True``: each call featurized and predicted, each attempt teaches the
cost model). "no options" is the Guard House's default (health and history on, breakers
passive). Then observability (issue #9): no context copy (``copy_context=False``); a metrics
scraper plus one subscriber taking every event kind in batches; a scraper plus one subscriber
called with each token's final outcome. Each figure is microseconds per call; the session table
shows its ratio to ThreadPoolExecutor's. The option-less row is the promise: policy costs
nothing to a token that uses none of it; the Guard House rows stay within 15 % of the off row;
metrics + events (batches) within 10 % of "no options".

Run: ``pytest benches/bench_policy.py --benchmark-only``.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import statistics
import threading
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
    "no options": {},
    "timeout": {"timeout": 60.0},
    "retries": {"retries": 3},
    "storage tier": {"tags": {"storage_speed": "INSANE"}},
    "concurrency limit": {"max_concurrency": 1000},
    # Guard House variants: options of the coordinator, not of the function
    "guard house off": {"coordinator": {"guard_house": False}},
    "breakers on": {"coordinator": {"auto_block": True}},
    "quarantine on": {"coordinator": {"quarantine": True}},
    # Observability (issue #9): "no options" copies the caller's context and records metrics
    "no context copy": {"copy_context": False},
    "metrics + events": {"observe": ("metrics", "events")},
    "metrics + outcomes": {"observe": ("metrics", "outcomes")},
}


@pytest.fixture(params=list(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def submit(system_name: str, variant: str, tmp_path: Any) -> Iterator[Callable[[], Any]]:
    if system_name == "threadpool":
        ex = cf.ThreadPoolExecutor(max_workers=tokengate.topology.allowed_cpu_count() * 4)
        yield lambda: ex.submit(noop)
        ex.shutdown(wait=True)
        return
    opts = dict(VARIANTS[variant])
    tags = opts.pop("tags", {})
    coord_opts = opts.pop("coordinator", {})
    observe = opts.pop("observe", ())
    fn = tokengate.task_token_guard(operation_type=f"noop {variant}", tags=tags, **opts)(noop)
    with tokengate.OperationsCoordinator(
        pool_capacity=1_000_000, quarantine_dir=tmp_path, **coord_opts
    ) as coord:
        with _observed(coord, observe):
            for t in [fn() for _ in range(2_000)]:
                t.wait()
            yield fn


@contextlib.contextmanager
def _observed(coord: Any, observe: tuple[str, ...]) -> Iterator[None]:
    """What watches ``coord`` in an observability variant: a metrics scraper (every 0.2 s) and
    one event subscriber (every kind in batches, or a call per token for its final outcome)."""
    from tokengate.bench import OUTCOME_KINDS, SCRAPE_EVERY

    subs = []
    if "events" in observe:
        subs.append(coord.events.subscribe(lambda batch: batch.counts(), batch=True))
    if "outcomes" in observe:
        subs.append(coord.events.subscribe(lambda event: None, kinds=OUTCOME_KINDS))
    stop = threading.Event()
    scraper = None
    if "metrics" in observe:
        from tokengate.observe.metrics import generate_latest

        def scrape() -> None:
            while not stop.wait(SCRAPE_EVERY):
                generate_latest(coord)

        scraper = threading.Thread(target=scrape, daemon=True)
        scraper.start()
    try:
        yield
    finally:
        stop.set()
        if scraper is not None:
            scraper.join()
        for s in subs:
            s.unsubscribe()


@pytest.mark.timeout(900)
@pytest.mark.systems(["threadpool", "tokengate"])
@pytest.mark.benchmark(group="policy: 100 000 no-op calls, then every result")
def test_policy_cost(benchmark, system_name, variant, submit, record):
    # ThreadPoolExecutor has none of these options (nor a Guard House): it runs its plain
    # no-op under every variant's name, so each TokenGate row has its ratio to a baseline
    # measured beside it.
    rng = range(BURST)
    samples: list[float] = []

    def burst() -> None:
        t0 = perf()
        handles = [submit() for _ in rng]
        for h in handles:
            h.result()
        samples.append((perf() - t0) / BURST * 1e6)

    benchmark.pedantic(burst, rounds=3)
    record(f"policy no-op, {variant}", statistics.median(samples), "us/call", n=BURST)
