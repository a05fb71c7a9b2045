"""tokengate.wait / as_completed over N tokens vs concurrent.futures over N futures, same run.

Run: ``PYTHONPATH=python python benches/bench_waiting.py [--n 10000] [--rounds 7] [--json]``
(a script, not a pytest-benchmark suite: it has no test functions, so ``pytest benches/``
collects nothing from it).

Scenarios, each timed for both systems in the same process (median of ``--rounds``):

* **finished**: N tokens / futures already final; ``wait`` with each ``return_when`` and a full
  ``as_completed`` pass. Measures the per-item bookkeeping.
* **unfinished, timeout=0**: N tokens queued behind one held task on a single worker
  (TokenGate ``cores=1, workers_per_core=1``; ``ThreadPoolExecutor(max_workers=1)``). Measures
  registering on and leaving N unfinished items (``FIRST_COMPLETED``, ``as_completed``) or the
  snapshot (``ALL_COMPLETED``).
* **end to end**: submit N no-op calls, then ``wait(ALL_COMPLETED)`` / a full ``as_completed``;
  the same worker count (2) on both sides. This mostly measures the executors themselves.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import tokengate
from tokengate import OperationsCoordinator


def _median_s(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _noop() -> None:
    return None


def _drain_as_completed(it: Any) -> None:
    for _ in it:
        pass


def _timeout_as_completed(it: Any) -> None:
    try:
        next(it)
    except TimeoutError:
        pass


def run(n: int, rounds: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def row(scenario: str, cf_s: float, tg_s: float) -> None:
        rows.append(
            {
                "scenario": scenario,
                "n": n,
                "concurrent_futures_ms": cf_s * 1e3,
                "tokengate_ms": tg_s * 1e3,
                "ratio": tg_s / cf_s if cf_s else float("nan"),
            }
        )

    # -- finished -------------------------------------------------------------------------
    with OperationsCoordinator(cores=2, workers_per_core=2) as coord:
        toks = [coord.submit(_noop) for _ in range(n)]
        tokengate.wait(toks)
        with cf.ThreadPoolExecutor(max_workers=2) as pool:
            futs = [pool.submit(_noop) for _ in range(n)]
            cf.wait(futs)
            for name, rw in [
                ("finished: wait ALL_COMPLETED", cf.ALL_COMPLETED),
                ("finished: wait FIRST_COMPLETED", cf.FIRST_COMPLETED),
                ("finished: wait FIRST_EXCEPTION", cf.FIRST_EXCEPTION),
            ]:
                row(
                    name,
                    _median_s(lambda rw=rw: cf.wait(futs, return_when=rw), rounds),
                    _median_s(lambda rw=rw: tokengate.wait(toks, return_when=rw), rounds),
                )
            row(
                "finished: as_completed, full pass",
                _median_s(lambda: _drain_as_completed(cf.as_completed(futs)), rounds),
                _median_s(lambda: _drain_as_completed(tokengate.as_completed(toks)), rounds),
            )

    # -- unfinished, timeout=0 ------------------------------------------------------------
    with OperationsCoordinator(cores=1, workers_per_core=1) as coord:
        gate_t = threading.Event()
        held_t = coord.submit(gate_t.wait)
        toks = [held_t, *(coord.submit(_noop) for _ in range(n - 1))]
        gate_f = threading.Event()
        pool = cf.ThreadPoolExecutor(max_workers=1)
        futs = [pool.submit(gate_f.wait), *(pool.submit(_noop) for _ in range(n - 1))]
        try:
            for name, rw in [
                ("unfinished, timeout=0: wait ALL_COMPLETED", cf.ALL_COMPLETED),
                ("unfinished, timeout=0: wait FIRST_COMPLETED", cf.FIRST_COMPLETED),
                ("unfinished, timeout=0: wait FIRST_EXCEPTION", cf.FIRST_EXCEPTION),
            ]:
                row(
                    name,
                    _median_s(lambda rw=rw: cf.wait(futs, timeout=0, return_when=rw), rounds),
                    _median_s(
                        lambda rw=rw: tokengate.wait(toks, timeout=0, return_when=rw), rounds
                    ),
                )
            row(
                "unfinished, timeout=0: as_completed, first next()",
                _median_s(lambda: _timeout_as_completed(cf.as_completed(futs, timeout=0)), rounds),
                _median_s(
                    lambda: _timeout_as_completed(tokengate.as_completed(toks, timeout=0)), rounds
                ),
            )
        finally:
            gate_t.set()
            gate_f.set()
            pool.shutdown(wait=True)

    # -- end to end -----------------------------------------------------------------------
    with (
        OperationsCoordinator(cores=2, workers_per_core=2) as coord,
        cf.ThreadPoolExecutor(max_workers=2) as pool,
    ):
        row(
            "end to end: submit N no-ops + wait ALL_COMPLETED",
            _median_s(lambda: cf.wait([pool.submit(_noop) for _ in range(n)]), rounds),
            _median_s(lambda: tokengate.wait([coord.submit(_noop) for _ in range(n)]), rounds),
        )
        row(
            "end to end: submit N no-ops + as_completed",
            _median_s(
                lambda: _drain_as_completed(
                    cf.as_completed([pool.submit(_noop) for _ in range(n)])
                ),
                rounds,
            ),
            _median_s(
                lambda: _drain_as_completed(
                    tokengate.as_completed([coord.submit(_noop) for _ in range(n)])
                ),
                rounds,
            ),
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)
    rows = run(args.n, args.rounds)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"| scenario (N = {args.n}) | concurrent.futures | tokengate | ratio |")
    print("|---|--:|--:|--:|")
    for r in rows:
        print(
            f"| {r['scenario']} | {r['concurrent_futures_ms']:.2f} ms "
            f"| {r['tokengate_ms']:.2f} ms | {r['ratio']:.2f}x |"
        )


if __name__ == "__main__":
    main()
