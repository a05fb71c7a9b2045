"""A mixed-workload demo that drives a real ``OperationsCoordinator`` for a bounded time.

The workload is a set of module-level functions decorated with ``task_token_guard`` covering every
weight (heavy / medium / light) and several storage tiers: string processing, list sorting, a prime
sieve, naive Fibonacci, hashing (``hashlib`` releases the GIL), JSON round trips, blob writes with
``os.fsync`` into a temporary directory, and sleeps that stand in for I/O waits.

``run_demo()`` submits a random mix of these (seeded, so runs are comparable), keeping a bounded
number of tokens in flight, and collects what happened to each token through
``TaskToken.add_done_callback``. About one call in 200 is asked to fail with an
:class:`InjectedFailure` (a ``ValueError``) so the failure path is exercised; the report tells
injected failures apart from unexpected ones.

The report also checks the core against its contract: every submitted token resolved, failures are
exactly the injected ones, no token ran on a core its weight may not use, and the coordinator's own
counters agree with what the callbacks saw. ``report["ok"]`` is ``False`` (and
``report["problems"]`` says why) when any of these does not hold, which makes
``tokengate demo --seconds 3`` a useful smoke test.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import random
import string
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TextIO

from tokengate import (
    AdmissionClosed,
    ConfigurationError,
    CoordinatorNotRunning,
    MethodBlocked,
    OperationsCoordinator,
    PoolFull,
    TaskToken,
    TokenState,
    task_token_guard,
)
from tokengate.topology import allowed_cores

__all__ = [
    "FAILURE_RATE",
    "InjectedFailure",
    "allowed_cores",
    "fibonacci",
    "format_report",
    "hash_blob",
    "json_roundtrip",
    "prime_sieve",
    "run_demo",
    "run_workload",
    "sleep_io",
    "sort_list",
    "string_ops",
    "write_blob",
]

logger = logging.getLogger("tokengate")

#: Share of demo calls asked to raise :class:`InjectedFailure`.
FAILURE_RATE: Final = 1 / 200

WEIGHTS: Final = ("heavy", "medium", "light")

_PAYLOAD_SIZE: Final = 1 << 20
# One random MiB shared by the hashing and blob-writing tasks (read-only, so thread-safe).
_PAYLOAD: Final = random.Random(0x70CE).randbytes(_PAYLOAD_SIZE)


class InjectedFailure(ValueError):
    """Raised on purpose by a demo task that was asked to fail."""


def _finish(operation: str, result: Any, fail: bool) -> Any:
    """Return ``result``, or raise :class:`InjectedFailure` after the work was done if asked."""
    if fail:
        raise InjectedFailure(f"{operation}: injected failure")
    return result


# --------------------------------------------------------------------------------------------
# The workload. Each task does a few milliseconds of real work and returns a small result.
# --------------------------------------------------------------------------------------------


@task_token_guard(operation_type="string_ops", tags={"weight": "light"})
def string_ops(seed: int, words: int = 1_500, fail: bool = False) -> int:
    """Build a text of random words, transform it and count things in it."""
    rng = random.Random(seed)
    letters = string.ascii_lowercase
    text = " ".join("".join(rng.choices(letters, k=rng.randint(3, 9))) for _ in range(words))
    shouted = text.upper().replace("A", "4").title()
    vowels = sum(shouted.count(v) for v in "EIOU")
    palindromes = sum(1 for w in text.split() if w == w[::-1])
    return _finish("string_ops", vowels + palindromes, fail)


@task_token_guard(operation_type="sleep_io", tags={"weight": "light", "storage_speed": "MODERATE"})
def sleep_io(milliseconds: float, fail: bool = False) -> float:
    """Wait like a network or disk call would (the GIL is released while sleeping)."""
    time.sleep(milliseconds / 1000.0)
    return _finish("sleep_io", milliseconds, fail)


@task_token_guard(operation_type="json_roundtrip", tags={"weight": "medium"})
def json_roundtrip(seed: int, records: int = 400, fail: bool = False) -> int:
    """Encode a list of records to JSON, decode it back and check it survived."""
    rng = random.Random(seed)
    data = [
        {
            "id": i,
            "name": f"item-{rng.randrange(1_000_000):06d}",
            "price": round(rng.uniform(0.5, 500.0), 2),
            "tags": rng.sample(["red", "green", "blue", "cyan", "magenta", "yellow"], k=3),
            "active": rng.random() < 0.5,
        }
        for i in range(records)
    ]
    encoded = json.dumps(data, sort_keys=True)
    decoded = json.loads(encoded)
    if decoded != data:  # pragma: no cover - would be a CPython bug
        raise RuntimeError("JSON round trip changed the data")
    return _finish("json_roundtrip", len(encoded), fail)


@task_token_guard(operation_type="sort_list", tags={"weight": "medium"})
def sort_list(seed: int, size: int = 20_000, fail: bool = False) -> int:
    """Sort random integers, then sort pairs by a key, and check the order."""
    rng = random.Random(seed)
    values = [rng.randrange(1 << 30) for _ in range(size)]
    ordered = sorted(values)
    pairs = sorted(zip(values, range(size), strict=True), key=lambda p: (p[0] % 1000, p[1]))
    if any(a > b for a, b in itertools.pairwise(ordered)):  # pragma: no cover
        raise RuntimeError("sorted() returned an unsorted list")
    return _finish("sort_list", ordered[size // 2] ^ pairs[0][1], fail)


def _fib(n: int) -> int:
    return n if n < 2 else _fib(n - 1) + _fib(n - 2)


@task_token_guard(operation_type="fibonacci", tags={"weight": "medium"})
def fibonacci(n: int, fail: bool = False) -> int:
    """Naive recursive Fibonacci: pure interpreter work that holds the GIL."""
    return _finish("fibonacci", _fib(n), fail)


@task_token_guard(operation_type="prime_sieve", tags={"weight": "heavy"})
def prime_sieve(limit: int, fail: bool = False) -> int:
    """Count the primes below ``limit`` with a sieve of Eratosthenes."""
    sieve = bytearray([1]) * limit
    sieve[:2] = b"\x00\x00"
    for p in range(2, math.isqrt(limit - 1) + 1):
        if sieve[p]:
            sieve[p * p :: p] = bytes(len(range(p * p, limit, p)))
    return _finish("prime_sieve", sum(sieve), fail)


@task_token_guard(operation_type="hash_blob", tags={"weight": "heavy", "storage_speed": "FAST"})
def hash_blob(rounds: int, size: int = _PAYLOAD_SIZE, fail: bool = False) -> str:
    """Hash ``size`` bytes ``rounds`` times with SHA-256 and BLAKE2b (GIL released by hashlib)."""
    view = memoryview(_PAYLOAD)[:size]
    sha = hashlib.sha256()
    blake = hashlib.blake2b(digest_size=32)
    for _ in range(rounds):
        sha.update(view)
        blake.update(view)
    return _finish("hash_blob", sha.hexdigest()[:16] + blake.hexdigest()[:16], fail)


@task_token_guard(operation_type="write_blob", tags={"weight": "heavy", "storage_speed": "SLOW"})
def write_blob(directory: str, name: str, size: int, fail: bool = False) -> int:
    """Write ``size`` bytes to a new file, ``fsync`` it, read it back and delete it."""
    path = os.path.join(directory, name)
    data = memoryview(_PAYLOAD)[:size]
    try:
        with open(path, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        with open(path, "rb") as fh:
            if fh.read() != data:  # pragma: no cover - would be a storage bug
                raise OSError(f"{path}: read back different bytes")
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return _finish("write_blob", size, fail)


# --------------------------------------------------------------------------------------------
# The mix: how often each task is picked and with which arguments.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Job:
    fn: Callable[..., TaskToken]
    share: int
    make_args: Callable[[random.Random, int, str], tuple[Any, ...]]


_MIX: Final[tuple[_Job, ...]] = (
    _Job(string_ops, 16, lambda rng, i, d: (rng.randrange(1 << 32), rng.randint(800, 2_000))),
    _Job(sleep_io, 16, lambda rng, i, d: (rng.uniform(2.0, 15.0),)),
    _Job(json_roundtrip, 14, lambda rng, i, d: (rng.randrange(1 << 32), rng.randint(200, 600))),
    _Job(sort_list, 12, lambda rng, i, d: (rng.randrange(1 << 32), rng.randint(4_000, 12_000))),
    _Job(fibonacci, 12, lambda rng, i, d: (rng.randint(17, 22),)),
    _Job(prime_sieve, 10, lambda rng, i, d: (rng.randint(100_000, 400_000),)),
    _Job(hash_blob, 10, lambda rng, i, d: (rng.randint(2, 8),)),
    _Job(write_blob, 10, lambda rng, i, d: (d, f"blob-{i}.bin", rng.randint(16, 256) * 1024)),
)


# --------------------------------------------------------------------------------------------
# Bookkeeping shared by the submitting thread and the done callbacks (worker threads).
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _OpStats:
    weight: str = ""
    count: int = 0
    failed: int = 0
    run_seconds: float = 0.0


@dataclass(slots=True)
class _Tracker:
    max_in_flight: int
    cond: threading.Condition = field(default_factory=threading.Condition)
    in_flight: int = 0
    submitted: int = 0
    rejected: int = 0
    injected: int = 0
    completed: int = 0
    failed: int = 0
    killed: int = 0
    injected_observed: int = 0
    unexpected: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    busy_seconds: float = 0.0
    ops: dict[str, _OpStats] = field(default_factory=dict)
    placements: Counter[tuple[str, int]] = field(default_factory=Counter)

    @property
    def resolved(self) -> int:
        return self.completed + self.failed + self.killed

    def acquire_slot(self, timeout: float) -> bool:
        """Reserve room for one more token in flight; ``False`` if none freed up in time."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.in_flight < self.max_in_flight, timeout):
                return False
            self.in_flight += 1
            return True

    def release_slot(self, rejected: bool = False) -> None:
        """Give back a slot whose submission did not produce a token."""
        with self.cond:
            self.in_flight -= 1
            self.rejected += rejected
            self.cond.notify_all()

    def submitted_one(self, injected: bool) -> None:
        with self.cond:
            self.submitted += 1
            self.injected += injected

    def on_done(self, token: TaskToken) -> None:
        """Done callback: record the final state and timings of ``token``. Never raises."""
        try:
            self._record(token)
        except Exception:  # keep the slot accounting right whatever happens
            logger.exception("demo: could not record token %r", token)
        finally:
            with self.cond:
                self.in_flight -= 1
                self.cond.notify_all()

    def _record(self, token: TaskToken) -> None:
        # Read everything from the token before taking the lock.
        state = token.state
        op = token.operation_type
        weight = token.weight.value
        core = token.core_id
        created, started, finished = token.created_at, token.started_at, token.finished_at
        error: BaseException | None = None
        if state == TokenState.FAILED:
            error = token.exception(timeout=0)
        latency = finished - created if finished is not None and created is not None else None
        run = finished - started if finished is not None and started is not None else None

        with self.cond:
            stats = self.ops.get(op)
            if stats is None:
                stats = self.ops[op] = _OpStats(weight=weight)
            stats.count += 1
            if state == TokenState.COMPLETED:
                self.completed += 1
            elif state == TokenState.FAILED:
                self.failed += 1
                stats.failed += 1
                if isinstance(error, InjectedFailure):
                    self.injected_observed += 1
                else:
                    self.unexpected[f"{op}: {type(error).__name__}: {error}"] += 1
            elif state == TokenState.KILLED:
                self.killed += 1
            else:
                self.unexpected[f"{op}: done callback saw state {state!r}"] += 1
            if latency is not None:
                self.latencies.append(latency)
            if run is not None:
                self.busy_seconds += run
                stats.run_seconds += run
            if core is not None:
                self.placements[weight, core] += 1

    def wait_idle(self, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.in_flight == 0, timeout)

    def progress_line(self) -> str:
        with self.cond:
            return (
                f"submitted {self.submitted:,} | resolved {self.resolved:,} | "
                f"failed {self.failed:,} | in flight {self.in_flight:,}"
            )


class _Progress:
    """A single-line progress indicator on a stream.

    On a terminal the line is redrawn about twice a second; otherwise (a log file, CI) a full line
    is written every few seconds so the output stays readable.
    """

    def __init__(self, stream: TextIO | None, seconds: float) -> None:
        self._stream = stream
        self._seconds = seconds
        self._tty = bool(stream is not None and stream.isatty())
        self._interval = 0.5 if self._tty else 5.0
        self._next = 0.0
        self._drawn = False

    def update(
        self, elapsed: float, phase: str, line: Callable[[], str], force: bool = False
    ) -> None:
        """Redraw if due (or ``force``); ``line()`` is only called when something is drawn."""
        if self._stream is None or (not force and elapsed < self._next):
            return
        self._next = elapsed + self._interval
        text = f"tokengate demo [{phase}] {elapsed:5.1f}/{self._seconds:g}s | {line()}"
        if self._tty:
            self._stream.write(f"\r\x1b[K{text}")
            self._drawn = True
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._stream is not None and self._drawn:
            self._stream.write("\n")
            self._stream.flush()


# --------------------------------------------------------------------------------------------
# Running the demo
# --------------------------------------------------------------------------------------------


def run_demo(
    seconds: float = 20.0,
    workers_per_core: int | None = None,
    progress: bool = True,
    *,
    cores: int | None = None,
    seed: int | None = None,
    max_in_flight: int | None = None,
    stream: TextIO | None = None,
    history_path: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Run the mixed workload for about ``seconds`` and return the report data.

    Starts an :class:`OperationsCoordinator` of its own, runs the workload on it (as
    :func:`run_workload` does) and stops it.

    Args:
        seconds: how long to keep submitting; in-flight tokens are then waited for.
        workers_per_core: workers per virtual core (default: the coordinator's default).
        progress: draw a progress indicator on ``stream`` (default ``sys.stderr``).
        cores: virtual cores (default: the CPUs this process may use).
        seed: seed of the random mix (default: random; the seed used is in the report).
        max_in_flight: bound on tokens submitted but not yet finished
            (default: 4 times the total number of workers, at least 16).
        stream: where the progress indicator goes.
        history_path: if given, the run's execution history is written there as JSON
            (``coordinator.dump_history``).

    Returns:
        A JSON-serialisable ``dict``; :func:`format_report` renders it.
    """
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds!r}")
    show = _Progress((stream or sys.stderr) if progress else None, seconds)

    coord_kwargs: dict[str, Any] = {}
    if workers_per_core is not None:
        coord_kwargs["workers_per_core"] = workers_per_core
    if cores is not None:
        coord_kwargs["cores"] = cores

    with OperationsCoordinator(**coord_kwargs) as coord:
        if logging.getLogger("tokengate.events").isEnabledFor(logging.DEBUG):
            coord.events.log_events()  # `tokengate -vv demo`: one line per lifecycle event
        return _run_workload(
            coord,
            seconds,
            stop=None,
            seed=seed,
            max_in_flight=max_in_flight,
            show=show,
            own_coordinator=True,
            history_path=history_path,
        )


def run_workload(
    coordinator: OperationsCoordinator,
    seconds: float | None = None,
    *,
    stop: threading.Event | None = None,
    seed: int | None = None,
    max_in_flight: int | None = None,
) -> dict[str, Any]:
    """Run the demo's mixed workload on a running ``coordinator`` until told to stop.

    Submits the same random mix as :func:`run_demo` (heavy, medium and light tokens, about one
    call in 200 failing on purpose) until ``seconds`` have passed or ``stop`` is set, whichever
    comes first, then waits for the tokens still in flight and returns a report of the same
    kind as :func:`run_demo` (:func:`format_report` renders it). With neither ``seconds`` nor
    ``stop`` it runs until ``KeyboardInterrupt`` (then ``report["interrupted"]`` is true).
    The coordinator is left running.

    It is meant to give a live coordinator something to do (``tokengate dashboard --demo``
    runs it on a background thread), so it carries on where :func:`run_demo` would fail:
    a call refused because an operator closed admission (``drain()``), blocked an operation
    or stopped the coordinator is not submitted and is counted in ``report["refused"]``
    (error class name -> count); while admission is closed it retries about ten times a second.
    Tokens an operator kills count in ``report["killed"]`` (and so in ``report["problems"]``,
    which checks the core's contract for an undisturbed run).

    The demo's tasks are ``@task_token_guard`` functions: their calls go to the coordinator
    started last among those that take decorated calls, which must be ``coordinator`` for the
    report's per-coordinator figures to match.

    Args:
        coordinator: a running :class:`OperationsCoordinator`.
        seconds: how long to keep submitting (default: no limit).
        stop: set it (from any thread) to stop submitting.
        seed: seed of the random mix (default: random; the seed used is in the report).
        max_in_flight: bound on tokens submitted but not yet finished
            (default: 4 times the total number of workers, at least 16).

    Raises:
        ConfigurationError: ``seconds`` or ``max_in_flight`` is not positive.
        CoordinatorNotRunning: ``coordinator`` is not running.
    """
    if seconds is not None and (
        isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0
    ):
        raise ConfigurationError(f"seconds must be a positive number or None, got {seconds!r}")
    if max_in_flight is not None and (
        isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1
    ):
        raise ConfigurationError(
            f"max_in_flight must be an integer >= 1 or None, got {max_in_flight!r}"
        )
    if not coordinator.running:
        raise CoordinatorNotRunning(
            f"run_workload needs a running coordinator; {coordinator.name!r} is not running"
        )
    return _run_workload(
        coordinator,
        seconds,
        stop=stop,
        seed=seed,
        max_in_flight=max_in_flight,
        show=_Progress(None, seconds or 0.0),
        own_coordinator=False,
        history_path=None,
    )


#: What a call of a live coordinator's workload may meet while an operator is at work.
_REFUSALS: Final = (AdmissionClosed, MethodBlocked, CoordinatorNotRunning)


def _run_workload(
    coord: OperationsCoordinator,
    seconds: float | None,
    *,
    stop: threading.Event | None,
    seed: int | None,
    max_in_flight: int | None,
    show: _Progress,
    own_coordinator: bool,
    history_path: str | os.PathLike[str] | None,
) -> dict[str, Any]:
    """The workload and its report, shared by :func:`run_demo` (``own_coordinator=True``:
    refusals propagate, a drain that times out stops the coordinator) and
    :func:`run_workload` (refusals are counted, the coordinator is left alone)."""
    if seed is None:
        seed = random.SystemRandom().randrange(1 << 32)
    rng = random.Random(seed)
    jobs = list(_MIX)
    shares = [job.share for job in _MIX]
    refused: Counter[str] = Counter()
    # Polls the stop event between submissions (a bounded wait for a slot, or a pause while
    # admission is closed) so that setting it ends the loop within about 0.1 s.
    idle = stop if stop is not None else threading.Event()

    interrupted = False
    timed_out = False
    with tempfile.TemporaryDirectory(prefix="tokengate-demo-") as blob_dir:
        n_cores = coord.cores
        cpu_map = list(coord.cpu_map)
        wpc = int(coord.stats()["workers_per_core"])
        bound = max_in_flight or max(16, 4 * n_cores * wpc)
        tracker = _Tracker(max_in_flight=bound)
        logger.info(
            "demo: %d cores (cpus %s) x %d workers, up to %d tokens in flight, seed %d, %s",
            n_cores,
            cpu_map,
            wpc,
            bound,
            seed,
            f"{seconds:.1f}s" if seconds is not None else "until stopped",
        )

        start = time.monotonic()
        cpu_start = time.process_time()
        deadline = start + seconds if seconds is not None else math.inf
        index = 0
        try:
            while (now := time.monotonic()) < deadline and not idle.is_set():
                show.update(now - start, "running", tracker.progress_line)
                if not tracker.acquire_slot(timeout=min(0.1, max(deadline - now, 0.0))):
                    continue
                job = rng.choices(jobs, weights=shares)[0]
                args = job.make_args(rng, index, blob_dir)
                fail = rng.random() < FAILURE_RATE
                index += 1
                try:
                    token = job.fn(*args, fail=fail)
                except PoolFull:
                    tracker.release_slot(rejected=True)
                    continue
                except _REFUSALS as exc:
                    tracker.release_slot()
                    if own_coordinator:
                        raise
                    refused[type(exc).__name__] += 1
                    if isinstance(exc, CoordinatorNotRunning):
                        logger.info("demo: the coordinator stopped; the workload ends")
                        break
                    if isinstance(exc, AdmissionClosed):
                        idle.wait(0.1)  # until an operator resumes (or stop is set)
                    continue
                except BaseException:
                    tracker.release_slot()
                    raise
                tracker.submitted_one(fail)
                token.add_done_callback(tracker.on_done)
        except KeyboardInterrupt:
            interrupted = True
            logger.warning("demo: interrupted; waiting for tokens in flight")

        # Let what is in flight finish, keeping the indicator alive.
        asked = seconds if seconds is not None else time.monotonic() - start
        grace = max(30.0, 2 * asked)
        drain_deadline = time.monotonic() + grace
        while not tracker.wait_idle(timeout=0.25):
            now = time.monotonic()
            show.update(now - start, "draining", tracker.progress_line)
            if now >= drain_deadline:
                timed_out = True
                break
        end = time.monotonic()
        cpu_seconds = time.process_time() - cpu_start
        show.update(end - start, "done", tracker.progress_line, force=True)
        show.close()

        if timed_out:
            logger.error(
                "demo: %d tokens still unresolved after %.0fs; %s",
                tracker.in_flight,
                grace,
                "stopping without waiting" if own_coordinator else "reporting them unresolved",
            )
            if own_coordinator:
                coord.stop(wait=False, timeout=5.0)
                tracker.wait_idle(timeout=5.0)
        stats = coord.stats()
        guard = coord.guard_house.report()
        if history_path is not None:
            coord.dump_history(history_path)

    report = _build_report(
        tracker=tracker,
        stats=stats,
        wall=end - start,
        cpu_seconds=cpu_seconds,
        seconds=seconds,
        seed=seed,
        cores=n_cores,
        workers_per_core=wpc,
        cpu_map=cpu_map,
        max_in_flight=bound,
        interrupted=interrupted,
    )
    if not own_coordinator:
        report["refused"] = dict(refused)
    report["guard_house"] = guard.as_dict()["operations"]
    report["guard_house_text"] = guard.render()
    return report


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 for an empty one)."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _build_report(
    *,
    tracker: _Tracker,
    stats: Mapping[str, Any],
    wall: float,
    cpu_seconds: float,
    seconds: float | None,
    seed: int,
    cores: int,
    workers_per_core: int,
    cpu_map: list[int],
    max_in_flight: int,
    interrupted: bool,
) -> dict[str, Any]:
    with tracker.cond:
        latencies = sorted(tracker.latencies)
        ms = [v * 1000.0 for v in latencies]
        weight_rank = {w: i for i, w in enumerate(WEIGHTS)}
        operations = {
            name: {
                "weight": op.weight,
                "count": op.count,
                "failed": op.failed,
                "mean_ms": op.run_seconds * 1000.0 / op.count if op.count else 0.0,
            }
            for name, op in sorted(
                tracker.ops.items(), key=lambda kv: (weight_rank.get(kv[1].weight, 9), kv[0])
            )
        }
        by_weight = {
            w: sum(op.count for op in tracker.ops.values() if op.weight == w) for w in WEIGHTS
        }
        violations = {
            f"{weight} on core {core}": n
            for (weight, core), n in sorted(tracker.placements.items())
            if core not in allowed_cores(weight, cores)
        }
        placement = {
            str(core): {w: tracker.placements.get((w, core), 0) for w in WEIGHTS}
            for core in range(1, cores + 1)
        }
        report: dict[str, Any] = {
            "title": "MIXED ORCHESTRATOR",
            "config": {
                "seconds": seconds,
                "cores": cores,
                "workers_per_core": workers_per_core,
                "cpu_map": cpu_map,
                "max_in_flight": max_in_flight,
                "failure_rate": FAILURE_RATE,
                "seed": seed,
            },
            "interrupted": interrupted,
            "submitted": tracker.submitted,
            "resolved": tracker.resolved,
            "completed": tracker.completed,
            "failed": tracker.failed,
            "killed": tracker.killed,
            "unresolved": tracker.submitted - tracker.resolved,
            "rejected": tracker.rejected,
            "injected_failures": tracker.injected,
            "observed_injected_failures": tracker.injected_observed,
            "unexpected_failures": dict(tracker.unexpected),
            "latency_ms": {
                "p50": _percentile(ms, 50),
                "p95": _percentile(ms, 95),
                "p99": _percentile(ms, 99),
                "max": ms[-1] if ms else 0.0,
                "mean": sum(ms) / len(ms) if ms else 0.0,
            },
            "wall_seconds": wall,
            "busy_seconds": tracker.busy_seconds,
            "concurrency_ratio": tracker.busy_seconds / wall if wall > 0 else 0.0,
            "cpu_seconds": cpu_seconds,
            "cpu_cores_busy": cpu_seconds / wall if wall > 0 else 0.0,
            "throughput_per_second": tracker.resolved / wall if wall > 0 else 0.0,
            "operations": operations,
            "weights": by_weight,
            "per_core": list(stats.get("per_core", [])),
            "placement": placement,
            "affinity_violations": violations,
            "coordinator": {k: v for k, v in stats.items() if k != "per_core"},
        }
    report["problems"] = _problems(report)
    report["ok"] = not report["problems"]
    return report


def _problems(report: Mapping[str, Any]) -> list[str]:
    """Everything in ``report`` that contradicts the contract of the core."""
    problems: list[str] = []
    if report["unresolved"]:
        problems.append(f"{report['unresolved']} submitted tokens never resolved")
    if report["killed"] and not report["interrupted"]:
        problems.append(f"{report['killed']} tokens were killed although nobody killed them")
    if report["observed_injected_failures"] != report["injected_failures"]:
        problems.append(
            f"{report['injected_failures']} failures were injected but "
            f"{report['observed_injected_failures']} surfaced as InjectedFailure"
        )
    for what, n in report["unexpected_failures"].items():
        problems.append(f"unexpected failure (x{n}): {what}")
    for what, n in report["affinity_violations"].items():
        problems.append(f"affinity violated (x{n}): {what}")
    if report["rejected"]:
        problems.append(f"{report['rejected']} submissions rejected with PoolFull")
    coord = report["coordinator"]
    for key in ("completed", "failed", "killed"):
        if key in coord and coord[key] != report[key]:
            problems.append(
                f"coordinator stats say {key}={coord[key]}, done callbacks saw {report[key]}"
            )
    if coord.get("illegal_transitions"):
        problems.append(f"{coord['illegal_transitions']} illegal token state transitions")
    return problems


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _bar(value: float, top: float, width: int, fill: str) -> str:
    n = 0 if top <= 0 else round(width * value / top)
    if value > 0:
        n = max(n, 1)
    return fill * n + " " * (width - n)


def format_report(report: Mapping[str, Any], *, unicode: bool = True) -> str:
    """Render the data returned by :func:`run_demo` as a text report.

    ``unicode=False`` draws only ASCII (for terminals that cannot show box characters).
    """
    if unicode:
        fill, rule, dot, times, le, arrow, total = "█", "═", "·", "×", "≤", "→", "Σ"  # noqa: RUF001
    else:
        fill, rule, dot, times, le, arrow, total = "#", "=", "|", "x", "<=", "->", "sum of"
    cfg = report["config"]
    lat = report["latency_ms"]
    width = 72
    cores = f"{cfg['cores']} core" + ("s" if cfg["cores"] != 1 else "")
    title = f" {report['title']} "
    lines = [
        rule * 3 + title + rule * (width - 3 - len(title)),
        f"  run          {report['wall_seconds']:.2f} s wall {dot} {_asked(cfg['seconds'])} "
        f"{dot} seed {cfg['seed']}" + ("  (interrupted)" if report["interrupted"] else ""),
        f"  coordinator  {cores} (cpus {_cpus(cfg['cpu_map'])}) {times} "
        f"{cfg['workers_per_core']} workers {dot} {le} {cfg['max_in_flight']} tokens in flight",
        f"  tokens       submitted {report['submitted']:,} {dot} resolved {report['resolved']:,} "
        f"(ok {report['completed']:,} {dot} failed {report['failed']:,} {dot} "
        f"killed {report['killed']:,})",
        f"  failures     {report['injected_failures']:,} injected, "
        f"{report['observed_injected_failures']:,} surfaced, "
        f"{sum(report['unexpected_failures'].values()):,} unexpected",
        f"  latency      p50 {lat['p50']:.1f} ms {dot} p95 {lat['p95']:.1f} ms {dot} "
        f"max {lat['max']:.1f} ms   (created {arrow} finished)",
        f"  throughput   {report['throughput_per_second']:,.0f} tokens/s",
        f"  concurrency  {report['concurrency_ratio']:.2f}   "
        f"({total} run time {report['busy_seconds']:.1f} s / wall {report['wall_seconds']:.1f} s)",
        f"  cpu          {report['cpu_cores_busy']:.2f} cores busy   "
        f"(process CPU time {report['cpu_seconds']:.1f} s / wall; run time also counts waits)",
        "",
        f"  {'by operation':<16}{'weight':<8}{'':<26}{'count':>8}{'mean ms':>10}{'failed':>8}",
    ]
    ops = report["operations"]
    top = max((o["count"] for o in ops.values()), default=0)
    for name, op in ops.items():
        lines.append(
            f"  {name:<16}{op['weight']:<8}{_bar(op['count'], top, 24, fill)}  "
            f"{op['count']:>8,}{op['mean_ms']:>10.2f}{op['failed']:>8,}"
        )

    lines += ["", f"  {'per core':<24}{'':<26}{'routed':>8}   heavy / medium / light"]
    rows = []
    for entry in report["per_core"]:
        routed = entry.get("routed", {})
        rows.append(
            (
                f"core {entry.get('core')} (cpu {entry.get('cpu')})",
                [int(routed.get(w, 0)) for w in WEIGHTS],
            )
        )
    if not rows:  # the coordinator gave no per-core stats: fall back to what tokens reported
        rows = [
            (f"core {core}", [counts[w] for w in WEIGHTS])
            for core, counts in report["placement"].items()
        ]
    top = max((sum(c) for _, c in rows), default=0)
    for label, counts in rows:
        lines.append(
            f"  {label:<24}{_bar(sum(counts), top, 24, fill)}  {sum(counts):>8,}   "
            + " / ".join(f"{c:,}" for c in counts)
        )

    guard = report.get("guard_house_text")
    if guard:
        lines += ["", *("  " + line for line in guard.splitlines())]
    lines.append("")
    if report["ok"]:
        lines.append("  verdict      OK: every token resolved as the contract says")
    else:
        lines.append("  verdict      PROBLEMS:")
        lines += [f"    - {p}" for p in report["problems"]]
    lines.append(rule * width)
    return "\n".join(lines)


def _asked(seconds: float | None) -> str:
    return "run until stopped" if seconds is None else f"asked {seconds:g} s"


def _cpus(cpu_map: list[int]) -> str:
    return ",".join(str(c) for c in cpu_map) if cpu_map else "?"
