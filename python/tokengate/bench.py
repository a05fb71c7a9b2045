"""Benchmark workloads: TokenGate against ThreadPoolExecutor, asyncio.to_thread and Dask.

The workloads are plain functions shared by the pytest-benchmark suites in ``benches/`` and by
``tokengate bench`` (:func:`run_quick` and :func:`format_table`). Each workload function runs *one
round* on an already started :class:`System` and returns a dict of figures; the caller decides how
many rounds to run and how to summarise them.

Every peer gets the same number of worker threads as the TokenGate coordinator it is compared
with (``cores * workers_per_core``). Task bodies time themselves with ``time.perf_counter`` so the
concurrency ratio (sum of task durations / wall clock) is computed the same way for every system.

Run it directly with ``python -m tokengate.bench [--full] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache, partial
from typing import Any

__all__ = [
    "SYSTEMS",
    "TARGETS",
    "System",
    "available_cores",
    "available_systems",
    "burst",
    "cpu_hash",
    "cpu_layout",
    "dask_available",
    "decorator_call_cost",
    "default_layout",
    "evaluate_rows",
    "fanout_layout",
    "format_table",
    "machine_info",
    "make_system",
    "memory_per_token",
    "noop_throughput",
    "open_system",
    "round_trip",
    "run_quick",
    "series_saturation",
    "sleep_fanout",
    "window",
]

perf = time.perf_counter

#: System names, ThreadPoolExecutor first so ratios can be computed as soon as TokenGate runs,
#: Dask last (its event-loop threads may outlive the cluster and compete for the GIL).
#: ``tokengate`` calls a decorated function (the main API); ``tokengate/submit`` calls
#: ``OperationsCoordinator.submit``.
SYSTEMS: tuple[str, ...] = (
    "threadpool",
    "asyncio.to_thread",
    "tokengate",
    "tokengate/submit",
    "dask",
)
BASELINE = "threadpool"
TOKENGATE_SYSTEMS = ("tokengate", "tokengate/submit")
#: Rows of ``tokengate bench`` that show what the Guard House and observability cost next to
#: the default ``tokengate`` rows (health, history and metrics on, breakers passive, the
#: submitter's context copied, no event subscriber).
VARIANTS: dict[str, dict[str, Any]] = {
    "tokengate/guard-off": {"guard_house": False},
    "tokengate/breakers": {"auto_block": True},
    # Observability (docs/observability.md): the default copies the submitter's contextvars
    # context and records metrics; these turn the context copy off, add a scraper and one event
    # subscriber (every kind in batches, the final outcomes in batches, or a call per token for
    # its final outcome), or trace every attempt.
    "tokengate/no-context": {"op_options": {"copy_context": False}},
    "tokengate/metrics+events": {"observe": ("metrics", "events")},
    "tokengate/metrics+outcomes": {"observe": ("metrics", "outcomes")},
    "tokengate/metrics+outcomes/each": {"observe": ("metrics", "outcomes/each")},
    "tokengate/traced": {"observe": ("tracing",)},
    # The dashboard (docs/dashboard.md) served, with one logged-in client taking every update.
    "tokengate/dashboard": {"observe": ("dashboard",)},
    # The Dask backend (docs/scale-out.md) on the same in-process cluster as the "dask" row:
    # what TokenGate's governance adds to a Dask round trip.
    "tokengate/dask": {"remote": "dask"},
}

#: The event kinds the "outcomes" subscriber of the bench takes (one event per token).
OUTCOME_KINDS = ("completed", "failed", "killed", "timed_out", "quarantined", "refused")
#: How often the bench's metrics scraper reads the coordinator (a busy Prometheus scrapes
#: every 5 to 15 s; this is far more often).
SCRAPE_EVERY = 0.2


# --------------------------------------------------------------------------------------------
# Machine and layouts
# --------------------------------------------------------------------------------------------


def available_cores() -> int:
    """CPUs this process may run on (``sched_getaffinity``), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_layout() -> tuple[int, int]:
    """The coordinator's defaults: one virtual core per CPU, 4 workers per core."""
    return available_cores(), 4


def fanout_layout(workers: int = 32) -> tuple[int, int]:
    """``workers`` threads in total, spread over the CPUs (or one per virtual core)."""
    cpus = available_cores()
    if workers % cpus == 0:
        return cpus, workers // cpus
    return workers, 1


def cpu_layout() -> tuple[int, int]:
    """One worker per CPU: more threads than CPUs only time-slice CPU work."""
    return available_cores(), 1


def machine_info() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        from importlib.metadata import version

        tg_version = version("tokengate")
    except Exception:
        tg_version = "unknown"
    return {
        "nproc": available_cores(),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "gil_enabled": getattr(sys, "_is_gil_enabled", lambda: True)(),
        "platform": platform.platform(),
        "tokengate": tg_version,
    }


def dask_available() -> bool:
    try:
        import distributed  # noqa: F401
    except Exception:
        return False
    return True


def available_systems() -> list[str]:
    return [s for s in SYSTEMS if s != "dask" or dask_available()]


# --------------------------------------------------------------------------------------------
# Task bodies (module level, so every system runs the very same functions)
# --------------------------------------------------------------------------------------------


def noop() -> None:
    return None


@lru_cache(maxsize=8)
def buffer(size: int) -> bytes:
    """A cached buffer of ``size`` bytes; tasks take the size, not the bytes (cheap to ship)."""
    return os.urandom(size)


def timed_sleep(seconds: float) -> tuple[float, float]:
    t0 = perf()
    time.sleep(seconds)
    return t0, perf()


def timed_hash(size: int, passes: int = 1) -> tuple[float, float]:
    """sha256 over a ``size``-byte buffer ``passes`` times (hashlib releases the GIL > 2 KiB)."""
    data = buffer(size)
    sha = hashlib.sha256
    t0 = perf()
    for _ in range(passes):
        sha(data).digest()
    return t0, perf()


def timed_sleep_hash(seconds: float, size: int) -> tuple[float, float]:
    """A "medium" task: wait on I/O for ``seconds``, then hash ``size`` bytes."""
    data = buffer(size)
    t0 = perf()
    time.sleep(seconds)
    hashlib.sha256(data).digest()
    return t0, perf()


def timed_python(n: int) -> tuple[float, float]:
    """Pure-Python work that holds the GIL throughout."""
    t0 = perf()
    total = 0
    for i in range(n):
        total += i * i
    return t0, perf()


def _blocker(started: threading.Semaphore, release: threading.Event) -> None:
    started.release()
    release.wait()


# --------------------------------------------------------------------------------------------
# Systems
# --------------------------------------------------------------------------------------------

Handle = Any
Batch = Sequence[tuple[Callable[..., Any], tuple[Any, ...], str]]


class System:
    """A task runner under test, sized ``cores * workers_per_core`` worker threads."""

    name = "?"
    #: per-task overhead in the millisecond range: workloads cap their task and round counts
    slow = False

    def __init__(self, cores: int, workers_per_core: int) -> None:
        self.cores = cores
        self.workers_per_core = workers_per_core
        self.workers = cores * workers_per_core

    # lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> System:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{self.name} {self.cores}x{self.workers_per_core} workers>"

    # primitives (thread-based systems) -------------------------------------------------------
    def submit(self, fn: Callable[..., Any], *args: Any, weight: str = "medium") -> Handle:
        raise NotImplementedError

    def getter(self) -> Callable[[Handle], Any]:
        """A function handle -> result (waits)."""
        raise NotImplementedError

    def call_factory(self, fn: Callable[[], Any], weight: str = "medium") -> Callable[[], Handle]:
        """A zero-argument callable that starts ``fn`` and returns its handle at once."""
        raise NotImplementedError

    @property
    def has_handles(self) -> bool:
        return True

    # composite operations (overridden by asyncio.to_thread) ---------------------------------
    def events_dropped(self) -> int:
        """Lifecycle events lost so far (TokenGate with a subscriber; 0 for the others)."""
        return 0

    def run_many(self, fn: Callable[[], Any], n: int, weight: str = "medium") -> list[Any]:
        make = self.call_factory(fn, weight)
        handles = [make() for _ in range(n)]
        get = self.getter()
        return [get(h) for h in handles]

    def run_batch(
        self, fn: Callable[..., Any], arglist: Sequence[tuple[Any, ...]], weight: str = "medium"
    ) -> list[Any]:
        submit = self.submit
        handles = [submit(fn, *a, weight=weight) for a in arglist]
        get = self.getter()
        return [get(h) for h in handles]

    def round_trip(self, fn: Callable[[], Any], weight: str = "medium") -> Any:
        return self.getter()(self.call_factory(fn, weight)())

    def burst(
        self, fn: Callable[..., Any], arglist: Sequence[tuple[Any, ...]], weight: str = "medium"
    ) -> tuple[float, list[tuple[float, Any]], float]:
        """One caller thread per task, all released by one ``threading.Barrier``.

        Returns (release time, [(submit time, result)], time the last caller got its result).
        """
        n = len(arglist)
        barrier = threading.Barrier(n + 1)
        out: list[tuple[float, Any]] = [(0.0, None)] * n
        get = self.getter()

        def caller(i: int) -> None:
            barrier.wait()
            st = perf()
            out[i] = (st, get(self.submit(fn, *arglist[i], weight=weight)))

        threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        barrier.wait()
        t_release = perf()
        for t in threads:
            t.join()
        return t_release, out, perf()

    def window(
        self, schedule: Sequence[Batch], interval: float
    ) -> tuple[float, list[tuple[float, Any]]]:
        """Release ``schedule[k]`` at ``t0 + k * interval``; returns t0, [(submit time, result)]."""
        pending: list[tuple[float, Handle]] = []
        submit = self.submit
        t0 = perf()
        for k, batch in enumerate(schedule):
            delay = t0 + k * interval - perf()
            if delay > 0:
                time.sleep(delay)
            for fn, args, weight in batch:
                pending.append((perf(), submit(fn, *args, weight=weight)))
        get = self.getter()
        return t0, [(st, get(h)) for st, h in pending]

    # memory: park every worker, then queue n no-ops -------------------------------------------
    def block_workers(self, timeout: float = 10.0) -> tuple[threading.Event, bool]:
        release = threading.Event()
        started = threading.Semaphore(0)
        for _ in range(self.workers):
            self.submit(_blocker, started, release, weight="heavy")
        deadline = time.monotonic() + timeout
        ok = all(
            started.acquire(timeout=max(0.0, deadline - time.monotonic()))
            for _ in range(self.workers)
        )
        return release, ok


class ThreadPoolSystem(System):
    name = "threadpool"

    def start(self) -> None:
        self.executor = ThreadPoolExecutor(self.workers, thread_name_prefix="bench-tpe")

    def stop(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    def submit(self, fn: Callable[..., Any], *args: Any, weight: str = "medium") -> Handle:
        return self.executor.submit(fn, *args)

    def getter(self) -> Callable[[Handle], Any]:
        from concurrent.futures import Future

        return Future.result

    def call_factory(self, fn: Callable[[], Any], weight: str = "medium") -> Callable[[], Handle]:
        return partial(self.executor.submit, fn)


class TokenGateSystem(System):
    """TokenGate through decorated functions (``via="decorator"``) or ``coordinator.submit``.

    ``op_options`` go to the decorator of every task function (e.g. ``copy_context=False``);
    ``observe`` names what watches the coordinator while it runs: ``"metrics"`` (a thread
    scraping its Prometheus text every ``SCRAPE_EVERY`` seconds), ``"events"`` (one subscriber
    taking every event kind in batches), ``"outcomes"`` (one taking the final outcomes in
    batches), ``"outcomes/each"`` (one called with each final outcome), ``"tracing"`` (an
    OpenTelemetry SDK tracer provider, spans recorded and exported nowhere)."""

    def __init__(
        self,
        cores: int,
        workers_per_core: int,
        via: str = "decorator",
        op_options: dict[str, Any] | None = None,
        observe: tuple[str, ...] = (),
        remote: str | None = None,
        **coord_kwargs: Any,
    ) -> None:
        super().__init__(cores, workers_per_core)
        if remote not in (None, "dask"):
            raise ValueError(f"remote must be None or 'dask', not {remote!r}")
        self.remote = remote
        self._cluster: Any = None
        self._client: Any = None
        if via not in ("decorator", "submit"):
            raise ValueError(f"via must be 'decorator' or 'submit', not {via!r}")
        unknown = set(observe) - {
            "metrics",
            "events",
            "outcomes",
            "outcomes/each",
            "tracing",
            "dashboard",
        }
        if unknown:
            raise ValueError(f"unknown observer(s) {sorted(unknown)}")
        self.via = via
        self.name = "tokengate" if via == "decorator" else "tokengate/submit"
        self.coord_kwargs = coord_kwargs
        self.op_options = tuple(sorted((op_options or {}).items()))
        self.observe = observe
        # a span per token: tens of microseconds; a Dask round trip: milliseconds
        self.slow = "tracing" in observe or remote is not None
        self.coord: Any = None
        self._scraping: threading.Event | None = None
        self._scraper: threading.Thread | None = None
        self._dashboard: Any = None

    def start(self) -> None:
        from tokengate import OperationsCoordinator

        kwargs = dict(self.coord_kwargs)
        if "tracing" in self.observe:
            from opentelemetry.sdk.trace import TracerProvider

            kwargs["tracing"] = TracerProvider()
        if self.remote == "dask":
            from tokengate.backends import DaskBackend

            # As the "dask" system: in-process, one worker with as many threads.
            self._cluster, self._client = _in_process_cluster(self.workers)
            kwargs["backend"] = DaskBackend(self._client)
        self.coord = OperationsCoordinator(
            cores=self.cores, workers_per_core=self.workers_per_core, **kwargs
        )
        self.coord.start()
        if "events" in self.observe:
            self.coord.events.subscribe(_count_batch, batch=True)
        if "outcomes" in self.observe:
            self.coord.events.subscribe(_count_batch, kinds=OUTCOME_KINDS, batch=True)
        if "outcomes/each" in self.observe:
            self.coord.events.subscribe(_count_event, kinds=OUTCOME_KINDS)
        if "metrics" in self.observe:
            from tokengate.observe.metrics import generate_latest

            stop = self._scraping = threading.Event()
            coord = self.coord

            def scrape() -> None:
                while not stop.wait(SCRAPE_EVERY):
                    generate_latest(coord)

            self._scraper = threading.Thread(target=scrape, name="bench-scraper", daemon=True)
            self._scraper.start()
        if "dashboard" in self.observe:
            self._dashboard = _DashboardWatcher(self.coord)

    def stop(self) -> None:
        if self._dashboard is not None:
            self._dashboard.close()
            self._dashboard = None
        if self._scraping is not None and self._scraper is not None:
            self._scraping.set()
            self._scraper.join()
            self._scraping = self._scraper = None
        if self.coord is not None:
            self.coord.stop()
            self.coord = None
        if self._client is not None:
            self._client.close()
            self._cluster.close()
            self._client = self._cluster = None

    def submit(self, fn: Callable[..., Any], *args: Any, weight: str = "medium") -> Handle:
        if self.via == "submit" and weight == "medium":
            return self.coord.submit(fn, *args)
        return guarded(fn, weight, self.op_options)(*args)

    def run_many(self, fn: Callable[[], Any], n: int, weight: str = "medium") -> list[Any]:
        out = super().run_many(fn, n, weight)
        if self.coord is not None and self.coord.events.stats()["subscribers"]:
            # Delivery is part of the cost: the burst ends when its events were delivered.
            self.coord.events.flush(60)
        return out

    def events_dropped(self) -> int:
        """Lifecycle events the core dropped so far (0 without a subscriber)."""
        return 0 if self.coord is None else int(self.coord.events.stats()["dropped"])

    def getter(self) -> Callable[[Handle], Any]:
        from tokengate import TaskToken

        return TaskToken.get

    def call_factory(self, fn: Callable[[], Any], weight: str = "medium") -> Callable[[], Handle]:
        if self.via == "submit" and weight == "medium":
            return partial(self.coord.submit, fn)
        return guarded(fn, weight, self.op_options)


class _DashboardWatcher:
    """The dashboard of a coordinator, served on loopback, with one logged-in Socket.IO client
    (a viewer) that takes and acknowledges every state update, as a browser does."""

    def __init__(self, coord: Any) -> None:
        import re
        import tempfile

        import requests
        import socketio

        from tokengate.dashboard import hash_password

        self._dir = tempfile.TemporaryDirectory(prefix="tokengate-bench-")
        password = "bench-password"
        self.server = coord.serve_dashboard(
            users={"bench": ("viewer", hash_password(password))},
            audit_log=os.path.join(self._dir.name, "audit.jsonl"),
        )
        url = self.server.url
        http = requests.Session()
        page = http.get(f"{url}/login", timeout=10).text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
        if csrf is None:
            raise RuntimeError("the dashboard's login form has no CSRF token")
        http.post(
            f"{url}/login",
            data={"username": "bench", "password": password, "csrf_token": csrf.group(1)},
            timeout=10,
        ).raise_for_status()
        meta = re.search(r'name="csrf-token" content="([^"]+)"', http.get(url, timeout=10).text)
        if meta is None:
            raise RuntimeError("the dashboard page has no CSRF token: the login failed")
        self.states = 0
        self.client = socketio.Client(reconnection=False)

        def on_state(_snapshot: Any) -> None:
            self.states += 1  # returning acknowledges it: the server may send the next one

        self.client.on("state", on_state)
        cookies = "; ".join(f"{k}={v}" for k, v in http.cookies.items())
        self.client.connect(
            url,
            headers={"Cookie": cookies},  # websocket-client sends the Origin itself
            auth={"csrf": meta.group(1)},
            transports=["websocket"],
            wait_timeout=10,
        )

    def close(self) -> None:
        self.client.disconnect()
        self.server.close()
        self._dir.cleanup()


def _have(module: str) -> bool:
    """Whether ``module`` can be imported here."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


_EVENT_COUNTS: dict[str, int] = {}


def _count_event(event: Any) -> None:
    """The bench's per-event subscriber: counts the event's kind."""
    _EVENT_COUNTS[event.kind] = _EVENT_COUNTS.get(event.kind, 0) + 1


def _count_batch(batch: Any) -> None:
    """The bench's batch subscriber: counts the batch's events by kind (as a dashboard's
    counters would), without making an object per event."""
    for kind, n in batch.counts().items():
        _EVENT_COUNTS[kind] = _EVENT_COUNTS.get(kind, 0) + n


@lru_cache(maxsize=64)
def guarded(
    fn: Callable[..., Any], weight: str, options: tuple[tuple[str, Any], ...] = ()
) -> Callable[..., Any]:
    """``fn`` decorated with ``task_token_guard`` at ``weight`` (cached: decorate once), with
    the decorator ``options`` given as sorted (name, value) pairs."""
    from tokengate import task_token_guard

    name = getattr(fn, "__name__", "task")
    return task_token_guard(
        operation_type=f"bench.{name}.{weight}", tags={"weight": weight}, **dict(options)
    )(fn)


class ToThreadSystem(System):
    """``asyncio.to_thread`` on a loop whose default executor has the same worker count.

    The loop runs in the calling thread (``run_until_complete``), as an asyncio program would.
    """

    name = "asyncio.to_thread"

    @property
    def has_handles(self) -> bool:
        return False

    def start(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.executor = ThreadPoolExecutor(self.workers, thread_name_prefix="bench-to-thread")
        self.loop.set_default_executor(self.executor)

    def stop(self) -> None:
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()

    def submit(self, fn: Callable[..., Any], *args: Any, weight: str = "medium") -> Handle:
        raise TypeError("asyncio.to_thread has no handle outside a running loop")

    def run_many(self, fn: Callable[[], Any], n: int, weight: str = "medium") -> list[Any]:
        async def main() -> list[Any]:
            return await asyncio.gather(*[asyncio.to_thread(fn) for _ in range(n)])

        return self.loop.run_until_complete(main())

    def run_batch(
        self, fn: Callable[..., Any], arglist: Sequence[tuple[Any, ...]], weight: str = "medium"
    ) -> list[Any]:
        async def main() -> list[Any]:
            return await asyncio.gather(*[asyncio.to_thread(fn, *a) for a in arglist])

        return self.loop.run_until_complete(main())

    def round_trip(self, fn: Callable[[], Any], weight: str = "medium") -> Any:
        return self.loop.run_until_complete(asyncio.to_thread(fn))

    def burst(
        self, fn: Callable[..., Any], arglist: Sequence[tuple[Any, ...]], weight: str = "medium"
    ) -> tuple[float, list[tuple[float, Any]], float]:
        n = len(arglist)

        async def main() -> tuple[float, list[tuple[float, Any]], float]:
            barrier = asyncio.Barrier(n + 1)
            out: list[tuple[float, Any]] = [(0.0, None)] * n

            async def caller(i: int) -> None:
                await barrier.wait()
                st = perf()
                out[i] = (st, await asyncio.to_thread(fn, *arglist[i]))

            tasks = [asyncio.ensure_future(caller(i)) for i in range(n)]
            await barrier.wait()
            t_release = perf()
            await asyncio.gather(*tasks)
            return t_release, out, perf()

        return self.loop.run_until_complete(main())

    def window(
        self, schedule: Sequence[Batch], interval: float
    ) -> tuple[float, list[tuple[float, Any]]]:
        async def main() -> tuple[float, list[tuple[float, Any]]]:
            pending: list[tuple[float, asyncio.Future[Any]]] = []
            t0 = perf()
            for k, batch in enumerate(schedule):
                delay = t0 + k * interval - perf()
                if delay > 0:
                    await asyncio.sleep(delay)
                for fn, args, _weight in batch:
                    pending.append((perf(), asyncio.ensure_future(asyncio.to_thread(fn, *args))))
            return t0, [(st, await f) for st, f in pending]

        return self.loop.run_until_complete(main())

    def block_workers(self, timeout: float = 10.0) -> tuple[threading.Event, bool]:
        raise TypeError("asyncio.to_thread: memory is measured on ThreadPoolExecutor itself")


def _in_process_cluster(threads: int) -> tuple[Any, Any]:
    """A Dask ``LocalCluster`` in this process (one worker, ``threads`` threads, its HTTP
    servers on loopback) and a client of it."""
    import logging

    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)
    cluster = LocalCluster(
        processes=False,
        n_workers=1,
        threads_per_worker=threads,
        dashboard_address="127.0.0.1:0",
        worker_dashboard_address="127.0.0.1:0",
    )
    return cluster, Client(cluster, set_as_default=False)


class DaskSystem(System):
    """Dask distributed in-process: ``LocalCluster(processes=False)``, one worker, N threads."""

    name = "dask"
    slow = True

    def start(self) -> None:
        self.cluster, self.client = _in_process_cluster(self.workers)

    def stop(self) -> None:
        self.client.close()
        self.cluster.close()

    def submit(self, fn: Callable[..., Any], *args: Any, weight: str = "medium") -> Handle:
        return self.client.submit(fn, *args, pure=False)

    def getter(self) -> Callable[[Handle], Any]:
        return lambda fut: fut.result()

    def call_factory(self, fn: Callable[[], Any], weight: str = "medium") -> Callable[[], Handle]:
        return partial(self.client.submit, fn, pure=False)

    def run_many(self, fn: Callable[[], Any], n: int, weight: str = "medium") -> list[Any]:
        futs = [self.client.submit(fn, pure=False) for _ in range(n)]
        return self.client.gather(futs)

    def run_batch(
        self, fn: Callable[..., Any], arglist: Sequence[tuple[Any, ...]], weight: str = "medium"
    ) -> list[Any]:
        futs = [self.client.submit(fn, *a, pure=False) for a in arglist]
        return self.client.gather(futs)


def make_system(name: str, cores: int, workers_per_core: int, **tg_kwargs: Any) -> System:
    """A (not yet started) system; ``tg_kwargs`` go to ``OperationsCoordinator`` only."""
    if name == "threadpool":
        return ThreadPoolSystem(cores, workers_per_core)
    if name == "asyncio.to_thread":
        return ToThreadSystem(cores, workers_per_core)
    if name == "dask":
        return DaskSystem(cores, workers_per_core)
    if name == "tokengate":
        return TokenGateSystem(cores, workers_per_core, via="decorator", **tg_kwargs)
    if name == "tokengate/submit":
        return TokenGateSystem(cores, workers_per_core, via="submit", **tg_kwargs)
    raise ValueError(f"unknown system {name!r}; known: {', '.join(SYSTEMS)}")


@contextmanager
def open_system(
    name: str, layout: tuple[int, int] | None = None, **tg_kwargs: Any
) -> Iterator[System]:
    cores, wpc = layout or default_layout()
    system = make_system(name, cores, wpc, **tg_kwargs)
    system.start()
    try:
        yield system
    finally:
        system.stop()


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in [0, 100]."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * (len(s) - 1))))
    return s[k]


def concurrency(spans: Sequence[tuple[float, float]], wall: float) -> float:
    """Sum of task durations / wall clock: how many tasks ran at once on average."""
    return sum(end - start for start, end in spans) / wall if wall > 0 else float("nan")


# --------------------------------------------------------------------------------------------
# Workloads (one round each)
# --------------------------------------------------------------------------------------------


def noop_throughput(system: System, n: int = 100_000) -> dict[str, float]:
    """Submit ``n`` no-op tasks, then wait for all: microseconds per task."""
    if system.slow:
        n = min(n, 2_000)
    t0 = perf()
    system.run_many(noop, n)
    seconds = perf() - t0
    return {
        "us_per_task": seconds / n * 1e6,
        "tasks_per_s": n / seconds,
        "n": n,
        "seconds": seconds,
    }


def round_trip(system: System, iterations: int = 2_000, warmup: int = 100) -> dict[str, float]:
    """Submit one no-op and wait for it, ``iterations`` times: median and p95 microseconds."""
    if system.slow:
        iterations, warmup = min(iterations, 200), min(warmup, 10)
    rt = system.round_trip
    for _ in range(warmup):
        rt(noop)
    samples = []
    for _ in range(iterations):
        t0 = perf()
        rt(noop)
        samples.append((perf() - t0) * 1e6)
    return {
        "median_us": statistics.median(samples),
        "p95_us": percentile(samples, 95),
        "mean_us": statistics.fmean(samples),
    }


def _nested_parent(system: System) -> Any:
    """A task that submits a no-op child to its own system and waits for it."""
    return system.submit(noop).result()


def nested_round_trip(
    system: System, iterations: int = 2_000, warmup: int = 100
) -> dict[str, float]:
    """Submit a task that submits one no-op child and waits for it (a nested wait), and wait
    for the task: median and p95 microseconds per parent. Thread-based systems only."""
    parent = partial(system.submit, _nested_parent, system)
    for _ in range(warmup):
        parent().result()
    samples = []
    for _ in range(iterations):
        t0 = perf()
        parent().result()
        samples.append((perf() - t0) * 1e6)
    return {"median_us": statistics.median(samples), "p95_us": percentile(samples, 95)}


#: nested fan-out trees: ROOTS concurrent requests, each node with TREE_FANOUT children,
#: TREE_DEPTH levels below the root
TREE_ROOTS, TREE_DEPTH, TREE_FANOUT = 8, 3, 3


def _tree_node(system: System, depth: int, fanout: int, timeout: float | None) -> int:
    if depth == 0:
        return 1
    kids = [
        system.submit(_tree_node, system, depth - 1, fanout, timeout, weight="heavy")
        for _ in range(fanout)
    ]
    return sum(k.result(timeout) for k in kids)


def tree_internal_nodes(
    roots: int = TREE_ROOTS, depth: int = TREE_DEPTH, fanout: int = TREE_FANOUT
) -> int:
    """Tasks of a tree workload that wait on children: a pool needs more threads than this
    to be sure never to deadlock (ThreadPoolExecutor is sized so)."""
    return roots * sum(fanout**d for d in range(depth))


def nested_tree(
    system: System,
    roots: int = TREE_ROOTS,
    depth: int = TREE_DEPTH,
    fanout: int = TREE_FANOUT,
    timeout: float | None = None,
) -> dict[str, float]:
    """``roots`` concurrent fan-out trees; every internal node submits its children and
    waits for them (``result(timeout)``). Wall time and microseconds per token."""
    t0 = perf()
    tops = [
        system.submit(_tree_node, system, depth, fanout, timeout, weight="heavy")
        for _ in range(roots)
    ]
    total = sum(t.result(120) for t in tops)
    wall = perf() - t0
    if total != roots * fanout**depth:
        raise RuntimeError(f"tree workload returned {total}, expected {roots * fanout**depth}")
    tokens = roots * sum(fanout**d for d in range(depth + 1))
    return {"wall_s": wall, "tokens": tokens, "us_per_token": wall / tokens * 1e6}


def decorator_call_cost(
    system: System, batches: int = 300, batch: int = 100, weight: str = "medium"
) -> dict[str, float]:
    """Cost of the call that returns a handle (a decorated call for TokenGate; ``submit``
    for the peers), not awaited. Timed per batch of ``batch`` calls (so the clock's own cost
    does not dominate); the batch's tokens are awaited between batches, untimed, so the pool
    never fills. Returns the median and p95 of the per-call batch means, in microseconds.
    """
    if system.slow:
        batches = min(batches, 30)
    make = system.call_factory(noop, weight)
    get = system.getter()
    rng = range(batch)
    for h in [make() for _ in rng]:
        get(h)
    per_call = []
    for _ in range(batches):
        t0 = perf()
        handles = [make() for _ in rng]
        per_call.append((perf() - t0) / batch * 1e6)
        for h in handles:
            get(h)
    # the same loop around a plain Python call: the floor of this measurement
    t0 = perf()
    for _ in range(batches):
        for _ in rng:
            noop()
    plain = (perf() - t0) / (batches * batch) * 1e6
    return {
        "median_us": statistics.median(per_call),
        "p95_us": percentile(per_call, 95),
        "plain_call_us": plain,
    }


def sleep_fanout(system: System, tasks: int = 256, seconds: float = 0.01) -> dict[str, float]:
    """``tasks`` x ``time.sleep(seconds)`` submitted at once (weight heavy: any core).

    Concurrency ratio = sum of task durations / wall; the ideal is the worker count.
    """
    t0 = perf()
    spans = system.run_batch(timed_sleep, [(seconds,)] * tasks, weight="heavy")
    wall = perf() - t0
    return {
        "concurrency_ratio": concurrency(spans, wall),
        "wall_s": wall,
        "ideal_wall_s": -(-tasks // system.workers) * seconds,
        "workers": system.workers,
    }


#: GIL-releasing CPU work: sha256 over a 4 MiB buffer, 4 passes per task (~10 ms at 1.6 GB/s)
HASH_SIZE = 4 << 20
HASH_PASSES = 4


def serial_hash_seconds(size: int = HASH_SIZE, passes: int = HASH_PASSES, repeat: int = 5) -> float:
    """Median time of one hash task run directly on this thread (the no-contention baseline)."""
    times = []
    for _ in range(repeat):
        a, b = timed_hash(size, passes)
        times.append(b - a)
    return statistics.median(times)


def cpu_hash(
    system: System,
    per_core: int = 8,
    size: int = HASH_SIZE,
    passes: int = HASH_PASSES,
    serial_s: float | None = None,
) -> dict[str, float]:
    """GIL-releasing CPU work: ``per_core * cores`` tasks, each sha256 over a ``size`` buffer
    ``passes`` times.

    Concurrency ratio = sum of task durations / wall (target: >= 0.9 x cores with one worker
    per core). Speedup = tasks x serial task time / wall, which does not flatter a system
    whose tasks slow each other down.
    """
    buffer(size)
    if serial_s is None:
        serial_s = serial_hash_seconds(size, passes)
    n = per_core * available_cores()
    t0 = perf()
    spans = system.run_batch(timed_hash, [(size, passes)] * n, weight="heavy")
    wall = perf() - t0
    return {
        "concurrency_ratio": concurrency(spans, wall),
        "speedup": n * serial_s / wall,
        "wall_s": wall,
        "serial_task_ms": serial_s * 1e3,
        "tasks": n,
        "cores": available_cores(),
    }


def burst(
    system: System, tasks: int = 8, sleep_s: float = 0.1, size: int = 1 << 20
) -> dict[str, float]:
    """CONCURRENCY BURST: ``tasks`` medium tasks (sleep, then hash ``size`` bytes), each
    submitted by its own caller thread, all released together by a ``threading.Barrier``.

    Wall clock from release to the last result; duration spread (slowest - fastest task run
    time); completion spread (last - first completion after release); concurrency ratio.
    """
    buffer(size)
    t_release, out, t_done = system.burst(timed_sleep_hash, [(sleep_s, size)] * tasks, "medium")
    spans = [r for _, r in out]
    durations = [b - a for a, b in spans]
    ends = [b for _, b in spans]
    wall = t_done - t_release
    return {
        "wall_s": wall,
        "duration_spread_ms": (max(durations) - min(durations)) * 1e3,
        "completion_spread_ms": (max(ends) - min(ends)) * 1e3,
        "concurrency_ratio": concurrency(spans, wall),
        "ideal_wall_s": -(-tasks // system.workers) * sleep_s,
    }


def window_schedule(seconds: float, interval: float = 0.02, seed: int = 7) -> list[Batch]:
    """The mixed releases of the CONCURRENCY WINDOW, the same for every system.

    Every ``interval``: four sleeps of 5-40 ms (light, medium, heavy, random weight), one
    sha256 over 1 MiB (GIL released) and one ~0.4 ms pure-Python loop (GIL held).
    """
    rng = random.Random(seed)
    weights = ("light", "medium", "heavy")
    schedule: list[Batch] = []
    for _ in range(max(1, round(seconds / interval))):
        batch: list[tuple[Callable[..., Any], tuple[Any, ...], str]] = []
        for w in (*weights, rng.choice(weights)):
            batch.append((timed_sleep, (rng.choice((0.005, 0.01, 0.02, 0.04)),), w))
        batch.append((timed_hash, (1 << 20, 1), rng.choice(("medium", "heavy"))))
        batch.append((timed_python, (10_000,), "light"))
        rng.shuffle(batch)
        schedule.append(batch)
    return schedule


def window(
    system: System, seconds: float = 10.0, interval: float = 0.02, seed: int = 7
) -> dict[str, float]:
    """Sustained CONCURRENCY WINDOW: mixed releases for ``seconds``.

    Latency = task end - submit (dominated by the 5-40 ms sleeps); wait = task start - submit
    (the scheduling delay alone); sustained concurrency = sum of task durations / (last task
    end - first release).
    """
    buffer(1 << 20)
    schedule = window_schedule(seconds, interval, seed)
    t0, res = system.window(schedule, interval)
    latencies = [(span[1] - st) * 1e3 for st, span in res]
    waits = [(span[0] - st) * 1e3 for st, span in res]
    spans = [span for _, span in res]
    wall = max(b for _, b in spans) - t0
    return {
        "tasks": len(res),
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "max_ms": max(latencies),
        "wait_p50_ms": percentile(waits, 50),
        "wait_p95_ms": percentile(waits, 95),
        "wait_max_ms": max(waits),
        "concurrency_ratio": concurrency(spans, wall),
        "wall_s": wall,
        "seconds": seconds,
    }


def series_saturation(system: System, tasks: int = 20, seconds: float = 1.0) -> dict[str, float]:
    """SERIES SATURATION: ``tasks`` heavy ``time.sleep(seconds)`` tasks submitted at once.

    Earliest and latest resolution (task end - start of submission) and their spread; with
    W workers the ideal latest is ceil(tasks / W) x seconds.
    """
    t0 = perf()
    spans = system.run_batch(timed_sleep, [(seconds,)] * tasks, weight="heavy")
    ends = [b - t0 for _, b in spans]
    return {
        "earliest_s": min(ends),
        "latest_s": max(ends),
        "spread_s": max(ends) - min(ends),
        "ideal_latest_s": -(-tasks // system.workers) * seconds,
    }


# --------------------------------------------------------------------------------------------
# Memory per queued token (each measurement in a fresh interpreter)
# --------------------------------------------------------------------------------------------


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _memory_child(
    name: str, n: int, cores: int, workers_per_core: int
) -> tuple[dict[str, Any], threading.Event]:
    """Runs in a subprocess: park every worker, queue ``n`` no-ops, measure the RSS delta.

    Returns the figures and the event that releases the parked workers; the caller reports
    the figures and leaves with ``os._exit`` (running a million queued no-ops to exit is
    pointless)."""
    kwargs: dict[str, Any] = {}
    if name in TOKENGATE_SYSTEMS:
        kwargs["pool_capacity"] = n + 10 * cores * workers_per_core + 1_000
        # The tokens must stay queued behind the parked workers (as a ThreadPoolExecutor's
        # stay behind its max_workers): no workers on demand here.
        kwargs["grow_on_demand"] = False
    system = make_system(name, cores, workers_per_core, **kwargs)
    system.start()
    mode = "blocked workers"
    release, ok = system.block_workers()
    if not ok and name in TOKENGATE_SYSTEMS:
        # Not every worker picked up a blocker (routing): hold new tokens at the gate instead.
        system.coord.pause()  # type: ignore[attr-defined]
        mode = "paused gate (workers could not all be blocked)"
    elif not ok:
        mode = "some workers not blocked"
    make = system.call_factory(noop)
    handles: list[Any] = [None] * n
    make_warm = [make() for _ in range(10)]
    gc.collect()
    time.sleep(0.05)
    before = _rss()
    t0 = perf()
    for i in range(n):
        handles[i] = make()
    submit_s = perf() - t0
    gc.collect()
    after = _rss()
    ran = None
    if name in TOKENGATE_SYSTEMS:
        try:
            ran = system.coord.stats().get("completed")  # type: ignore[attr-defined]
        except Exception:
            ran = None
    result = {
        "system": name,
        "n": n,
        "bytes_per_token": (after - before) / n,
        "rss_before": before,
        "rss_after": after,
        "submit_s": submit_s,
        "mode": mode,
        "completed_meanwhile": ran,
        "workers": system.workers,
    }
    del make_warm
    return result, release


def memory_per_token(
    name: str, n: int = 200_000, layout: tuple[int, int] | None = None, timeout: float = 600
) -> dict[str, Any]:
    """RSS growth per queued (not started) task, measured in a fresh interpreter.

    Every worker is parked on an event first, then ``n`` no-ops are queued and their handles
    kept; bytes per task = RSS delta / n. TokenGate runs with ``pool_capacity`` raised above n.
    """
    cores, wpc = layout or default_layout()
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
    code = (
        "import json, os, sys, tokengate.bench as b\n"
        "r, release = b._memory_child(sys.argv[1], *map(int, sys.argv[2:5]))\n"
        "print(json.dumps(r), flush=True)\n"
        "release.set()\n"
        "os._exit(0)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, name, str(n), str(cores), str(wpc)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(
            f"memory child for {name} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
        )
    return json.loads(lines[-1])


# --------------------------------------------------------------------------------------------
# Targets, rows and the quick run
# --------------------------------------------------------------------------------------------

#: workload -> (target text, check(figure, threadpool figure, context) -> bool)
TARGETS: dict[str, tuple[str, Callable[[float, float | None, dict[str, Any]], bool | None]]] = {
    "no-op throughput": (
        "<= 0.1x threadpool",
        lambda f, b, c: None if b is None else f <= 0.1 * b,
    ),
    "round trip median": (
        "<= 0.5x threadpool",
        lambda f, b, c: None if b is None else f <= 0.5 * b,
    ),
    "decorator call median": ("< 1 us", lambda f, b, c: f < 1.0),  # decorated calls only
    "sleep fan-out concurrency": (
        ">= 0.95x workers",
        lambda f, b, c: f >= 0.95 * c.get("workers", 32),
    ),
    "GIL-releasing CPU concurrency": (
        ">= 0.9x cores",
        lambda f, b, c: f >= 0.9 * c.get("cores", available_cores()),
    ),
    "memory per queued token": (
        "<= 0.25x threadpool",
        lambda f, b, c: None if b is None else f <= 0.25 * b,
    ),
    # tokengate.Executor against ThreadPoolExecutor (benches/bench_executor.py)
    "executor round trip": (
        "<= 1.0x threadpool",
        lambda f, b, c: None if b is None else f <= b,
    ),
    "executor burst": (
        "<= 1.0x threadpool",
        lambda f, b, c: None if b is None else f <= b,
    ),
}


#: Cost targets of variant rows against the default ``tokengate`` row of the same workload in
#: the same run (issue #9: a scraper plus one event subscriber cost under 10 % of no-op
#: throughput; set on a batch subscriber of the final outcomes, one event per token, what a
#: dashboard's recent executions take; every kind, four events per token, is measured beside it).
VARIANT_TARGETS: dict[tuple[str, str], float] = {
    ("no-op throughput", "tokengate/metrics+outcomes"): 1.10,
}


def row(workload: str, system: str, figure: float, unit: str, **context: Any) -> dict[str, Any]:
    return {
        "workload": workload,
        "system": system,
        "figure": figure,
        "unit": unit,
        "ratio_vs_tpe": None,
        "context": context,
    }


def evaluate_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill ``ratio_vs_tpe`` (figure / threadpool's figure for the same workload) and, for
    TokenGate rows of a workload with a target, ``target`` and ``meets_target``."""
    base = {r["workload"]: r["figure"] for r in rows if r["system"] == BASELINE}
    default = {r["workload"]: r["figure"] for r in rows if r["system"] == "tokengate"}
    for r in rows:
        bound = VARIANT_TARGETS.get((r["workload"], r["system"]))
        d = default.get(r["workload"])
        if bound is not None and d and r["figure"] is not None:
            # Events dropped would make delivery look cheaper than it is: a miss.
            kept = not r.get("context", {}).get("events_dropped")
            r["target"] = f"<= {bound:.2f}x tokengate, no event dropped"
            r["meets_target"] = kept and r["figure"] <= bound * d
        b = base.get(r["workload"])
        if b is not None and b != 0 and r["figure"] is not None:
            r["ratio_vs_tpe"] = r["figure"] / b
        target = TARGETS.get(r["workload"])
        if r["workload"] == "decorator call median" and r["system"] != "tokengate":
            target = None  # the target is for decorated calls, not coordinator.submit
        if target and r["system"] in TOKENGATE_SYSTEMS:
            text, check = target
            r["target"] = text
            r["meets_target"] = check(r["figure"], b, r.get("context", {}))
    return rows


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != x:
            return "nan"
        ax = abs(x)
        if ax >= 1000:
            return f"{x:,.0f}"
        if ax >= 100:
            return f"{x:.1f}"
        if ax >= 1:
            return f"{x:.2f}"
        return f"{x:.3f}"
    return str(x)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table: workload, system, figure, unit, ratio vs ThreadPoolExecutor, target."""
    header = ("workload", "system", "figure", "unit", "vs threadpool", "target")
    body = []
    for r in rows:
        target = ""
        if r.get("target"):
            verdict = {True: "met", False: "MISSED", None: "?"}[r.get("meets_target")]
            target = f"{r['target']}: {verdict}"
        ratio = r.get("ratio_vs_tpe")
        body.append(
            (
                r["workload"],
                r["system"],
                _fmt(r["figure"]),
                r["unit"],
                "-" if ratio is None else f"{ratio:.3f}x",
                target,
            )
        )
    widths = [
        max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)
    ]
    right = {2, 4}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)
        ).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    prev = None
    for cells in body:
        if prev is not None and cells[0] != prev:
            out.append("")
        out.append(line(cells))
        prev = cells[0]
    return "\n".join(out)


def _median_rounds(
    fn: Callable[[], dict[str, float]], rounds: int, warmup: int = 1
) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    results = [fn() for _ in range(rounds)]
    return {k: statistics.median(r[k] for r in results) for k in results[0]}


def run_quick(
    json_path: str | os.PathLike[str] | None = None,
    *,
    full: bool = False,
    window_seconds: float | None = None,
    systems: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every workload on TokenGate and the peers and return the table rows.

    Quick (default, well under a minute on 2 cores): the CONCURRENCY WINDOW runs 3 s, SERIES
    SATURATION uses 0.25 s tasks, memory queues 200 000 tasks. ``full=True``: 10 s window
    (``window_seconds`` overrides, e.g. 40), 1 s saturation tasks, 1 000 000 queued, more
    rounds. Rows: ``{workload, system, figure, unit, ratio_vs_tpe, target?, meets_target?,
    context}``; ``json_path`` also gets ``{"machine": ..., "rows": ...}``.
    """
    say = progress or (lambda _msg: None)
    names = [s for s in (systems or available_systems()) if s != "dask" or dask_available()]
    if BASELINE not in names:
        names.insert(0, BASELINE)
    rounds = 5 if full else 3
    win_s = window_seconds if window_seconds is not None else (10.0 if full else 3.0)
    sat_s = 1.0 if full else 0.25
    mem_n = 1_000_000 if full else 200_000
    rows: list[dict[str, Any]] = []
    cores = available_cores()
    serial_s = serial_hash_seconds()

    for name in names:
        say(f"{name}: no-op throughput, round trip, decorator call")
        with open_system(name, default_layout()) as s:
            noop_throughput(
                s, 500 if s.slow else 10_000
            )  # warm up: threads started, code paths hot
            # asyncio.to_thread costs ~100 us a task: 100 000 would take 10 s a round
            n = 100_000 if full or name != "asyncio.to_thread" else 20_000
            r = _median_rounds(partial(noop_throughput, s, n), 3 if full else 1, 0)
            rows.append(row("no-op throughput", name, r["us_per_task"], "us/task", n=r["n"]))
            r = round_trip(s, 5_000 if full else 2_000)
            rows.append(row("round trip median", name, r["median_us"], "us", p95_us=r["p95_us"]))
            if s.has_handles:
                r = decorator_call_cost(s)
                rows.append(
                    row(
                        "decorator call median",
                        name,
                        r["median_us"],
                        "us",
                        p95_us=r["p95_us"],
                        plain_call_us=r["plain_call_us"],
                    )
                )
        if name == "tokengate":
            # What the Guard House and observability cost: the "tokengate" rows above are the
            # defaults (health, history and metrics recorded, context copied, no subscriber).
            for variant, kw in VARIANTS.items():
                if "tracing" in kw.get("observe", ()) and not _have("opentelemetry.sdk"):
                    say(f"{variant}: skipped (pip install opentelemetry-sdk)")
                    continue
                if "dashboard" in kw.get("observe", ()) and not (
                    _have("flask_socketio") and _have("websocket")
                ):
                    say(f"{variant}: skipped (pip install 'tokengate[dashboard]' websocket-client)")
                    continue
                if kw.get("remote") == "dask" and not dask_available():
                    say(f"{variant}: skipped (pip install 'tokengate[dask]')")
                    continue
                say(f"{variant}: no-op throughput, round trip")
                with open_system(name, default_layout(), **kw) as s:
                    noop_throughput(s, 10_000)
                    dropped = s.events_dropped()
                    r = _median_rounds(partial(noop_throughput, s, n), 3, 0)
                    dropped = s.events_dropped() - dropped
                    rows.append(
                        row(
                            "no-op throughput",
                            variant,
                            r["us_per_task"],
                            "us/task",
                            n=int(r["n"]),
                            events_dropped=dropped,
                        )
                    )
                    r = round_trip(s, 5_000 if full else 2_000)
                    rows.append(
                        row("round trip median", variant, r["median_us"], "us", p95_us=r["p95_us"])
                    )
        if name not in ("asyncio.to_thread", "dask"):  # tasks submit through a handle
            say(f"{name}: nested waits")
            with open_system(name, default_layout()) as s:
                r = nested_round_trip(s, 2_000 if full else 500)
                rows.append(
                    row("nested round trip median", name, r["median_us"], "us", p95_us=r["p95_us"])
                )
            # ThreadPoolExecutor deadlocks once every thread waits: it gets one per waiting task
            layout = (
                (1, tree_internal_nodes() + default_layout()[1])
                if name == BASELINE
                else default_layout()
            )
            with open_system(name, layout) as s:
                for label, timeout in (("", None), (", get(timeout)", 60.0)):
                    r = _median_rounds(partial(nested_tree, s, timeout=timeout), rounds)
                    rows.append(
                        row(
                            f"nested fan-out tree wall{label}",
                            name,
                            r["wall_s"],
                            "s",
                            tokens=int(r["tokens"]),
                            threads=s.workers,
                        )
                    )
        if name == "tokengate/submit":
            continue  # the remaining workloads route by weight: decorated functions only
        say(f"{name}: sleep fan-out")
        with open_system(name, fanout_layout(32)) as s:
            r = _median_rounds(partial(sleep_fanout, s), rounds)
            rows.append(
                row(
                    "sleep fan-out concurrency",
                    name,
                    r["concurrency_ratio"],
                    "x",
                    workers=s.workers,
                    wall_s=r["wall_s"],
                )
            )
        say(f"{name}: GIL-releasing CPU")
        with open_system(name, cpu_layout()) as s:
            r = _median_rounds(partial(cpu_hash, s, serial_s=serial_s), rounds)
            rows.append(
                row(
                    "GIL-releasing CPU concurrency",
                    name,
                    r["concurrency_ratio"],
                    "x",
                    cores=cores,
                    speedup=r["speedup"],
                    wall_s=r["wall_s"],
                )
            )
        say(f"{name}: concurrency burst, window, series saturation")
        with open_system(name, default_layout()) as s:
            r = _median_rounds(partial(burst, s), rounds)
            rows.append(row("burst wall", name, r["wall_s"], "s", ideal_s=r["ideal_wall_s"]))
            rows.append(row("burst duration spread", name, r["duration_spread_ms"], "ms"))
            rows.append(row("burst completion spread", name, r["completion_spread_ms"], "ms"))
            rows.append(row("burst concurrency", name, r["concurrency_ratio"], "x"))
            r = window(s, win_s)
            label = f"window {win_s:g}s"
            rows.append(row(f"{label} tasks", name, float(r["tasks"]), "tasks"))
            rows.append(row(f"{label} latency p50", name, r["p50_ms"], "ms"))
            rows.append(row(f"{label} latency p95", name, r["p95_ms"], "ms"))
            rows.append(row(f"{label} latency max", name, r["max_ms"], "ms"))
            rows.append(row(f"{label} wait p50", name, r["wait_p50_ms"], "ms"))
            rows.append(row(f"{label} wait p95", name, r["wait_p95_ms"], "ms"))
            rows.append(row(f"{label} wait max", name, r["wait_max_ms"], "ms"))
            rows.append(row(f"{label} concurrency", name, r["concurrency_ratio"], "x"))
            r = series_saturation(s, 20, sat_s)
            label = f"saturation 20x{sat_s:g}s"
            rows.append(row(f"{label} earliest", name, r["earliest_s"], "s"))
            rows.append(
                row(f"{label} latest", name, r["latest_s"], "s", ideal_s=r["ideal_latest_s"])
            )
            rows.append(row(f"{label} spread", name, r["spread_s"], "s"))

    for name in names:
        if name in ("asyncio.to_thread", "dask", "tokengate/submit"):
            continue  # to_thread queues on a ThreadPoolExecutor; Dask's queue is its scheduler's
        say(f"{name}: memory per queued token (n={mem_n:,})")
        m = memory_per_token(name, mem_n)
        rows.append(
            row("memory per queued token", name, m["bytes_per_token"], "bytes", mode=m["mode"])
        )

    order = {w: i for i, w in enumerate(dict.fromkeys(r["workload"] for r in rows))}
    shown = [*SYSTEMS[: SYSTEMS.index("tokengate") + 1], *VARIANTS]
    shown += [s for s in SYSTEMS if s not in shown]
    sysorder = {s: i for i, s in enumerate(shown)}
    rows.sort(key=lambda r: (order[r["workload"]], sysorder.get(r["system"], 99)))
    evaluate_rows(rows)
    if json_path is not None:
        with open(json_path, "w", encoding="utf-8") as fh:
            json.dump({"machine": machine_info(), "full": full, "rows": rows}, fh, indent=2)
    return rows


BENCH_DESCRIPTION = (
    "Run every benchmark workload on TokenGate and its peers (same worker counts) and print one "
    "table with each figure's ratio to ThreadPoolExecutor's. Quick by default (under a minute "
    "on 2 cores)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tokengate bench`` / ``python -m tokengate.bench``."""
    p.add_argument("--full", action="store_true", help="full sizes (several minutes)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--window-seconds", type=float, help="CONCURRENCY WINDOW length")
    p.add_argument(
        "--systems", help=f"comma-separated subset of {','.join(SYSTEMS)} (threadpool always runs)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tokengate.bench``: the same as ``tokengate bench``."""
    from .cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
