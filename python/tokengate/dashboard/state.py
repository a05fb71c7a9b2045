"""The dashboard's snapshot of a coordinator (the ``state`` event and ``/api/state``).

Most of it is read from the coordinator when a snapshot is built (``stats()``, the Guard
House report, the queued tokens, the quarantine store at most every 2 s). Recent executions
and the per-second series come from a batch subscriber of the coordinator's final lifecycle
events; it does a bounded amount of work per batch (the batch's counts from the core, at most
:data:`RECENT` events read for the recent list and :data:`SAMPLE_PER_BATCH` for durations), so
the dashboard never slows the delivery thread or the coordinator down.

Every buffer is bounded: 50 recent executions, 300 one-second points, at most
:data:`SAMPLES_PER_SECOND` durations a second, 10 s of attempt counts per operation, and at
most :data:`MAX_OPERATIONS` Guard House rows.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from .audit import AuditLog

if TYPE_CHECKING:
    from ..coordinator import OperationsCoordinator
    from ..observe.events import EventBatch, Subscription

__all__ = ["FINAL_KINDS", "StateBuilder"]

log = logging.getLogger("tokengate.dashboard")

#: The final events the recent list and the series are made from.
FINAL_KINDS: Final = ("completed", "failed", "killed", "timed_out", "quarantined")
RECENT: Final = 50
QUEUED: Final = 50
SERIES_SECONDS: Final = 300
SAMPLE_PER_BATCH: Final = 256
SAMPLES_PER_SECOND: Final = 1024
RATE_WINDOW: Final = 10.0
MAX_OPERATIONS: Final = 200
QUARANTINE_LIST: Final = 50
QUARANTINE_REFRESH: Final = 2.0
AUDIT_ROWS: Final = 50
_TEXT: Final = 500


def _num(v: object) -> float | int | None:
    """A JSON number or None (NaN and infinities become None)."""
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    return None


def _ms(seconds: object) -> float | None:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return None
    if not math.isfinite(seconds):
        return None
    return round(seconds * 1000.0, 3)


def _text(v: object, limit: int = _TEXT) -> str | None:
    if v is None:
        return None
    try:
        s = v if isinstance(v, str) else str(v)
    except Exception:
        s = f"<{type(v).__name__}>"
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _error_text(exc: object) -> str | None:
    if exc is None:
        return None
    if isinstance(exc, dict):
        return _text(f"{exc.get('type')}: {exc.get('message')}")
    try:
        message = str(exc)
    except Exception:
        message = "<unprintable>"
    return _text(f"{type(exc).__name__}: {message}" if message else type(exc).__name__)


def _percentile(sorted_values: list[float], q: float) -> float:
    i = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[i]


class _Second:
    __slots__ = ("completed", "durations", "failed", "p50", "p95", "seen")

    def __init__(self) -> None:
        self.completed = 0
        self.failed = 0
        self.durations: list[float] | None = []
        self.seen = 0  # durations offered (for reservoir sampling)
        self.p50: float | None = None
        self.p95: float | None = None

    def close(self) -> None:
        """Turns the durations into p50/p95 and lets go of them."""
        if self.durations is None:
            return
        values = sorted(self.durations)
        self.durations = None
        if values:
            self.p50 = round(_percentile(values, 0.50), 3)
            self.p95 = round(_percentile(values, 0.95), 3)


class StateBuilder:
    """Builds snapshots of ``coordinator`` (thread-safe).

    Args:
        coordinator: the coordinator shown.
        audit: the audit log (its newest records go into the snapshot).
        clock: wall clock (``time.time``), for the series and the snapshot's ``time``.
    """

    def __init__(
        self,
        coordinator: OperationsCoordinator,
        audit: AuditLog,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._coord = coordinator
        self._audit = audit
        self._clock = clock
        self._events_lock = threading.Lock()  # taken by the event thread: held briefly
        self._build_lock = threading.Lock()
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT)
        self._seconds: collections.OrderedDict[int, _Second] = collections.OrderedDict()
        self._random = random.Random()
        self._subscription: Subscription | None = None
        self._quarantine: dict[str, Any] = {"count": 0, "records": []}
        self._quarantine_read_at: float | None = None
        self._quarantine_stale = True
        self._quarantine_mtime: int | None = None
        self._attempts: dict[str, collections.deque[tuple[float, int]]] = {}
        self._panel_errors: set[str] = set()
        self._physical = _physical_cores()
        self._first_second = int(clock())
        self._logical = os.cpu_count()

    # -- events -------------------------------------------------------------------------

    def start(self) -> None:
        """Subscribes to the coordinator's final events (idempotent)."""
        with self._events_lock:
            if self._subscription is not None:
                return
        sub = self._coord.events.subscribe(self._on_batch, kinds=FINAL_KINDS, batch=True)
        with self._events_lock:
            if self._subscription is None:
                self._subscription = sub
                return
        sub.unsubscribe()

    def close(self) -> None:
        """Unsubscribes (idempotent)."""
        with self._events_lock:
            sub, self._subscription = self._subscription, None
        if sub is not None:
            sub.unsubscribe()

    def _on_batch(self, batch: EventBatch) -> None:
        """On the feed's delivery thread: bounded work per batch."""
        n = len(batch)
        if not n:
            return
        counts = batch.counts()
        now = self._clock()
        second = int(now)
        recent = [self._row(e) for e in batch[max(0, n - RECENT) :]]
        # durations of a bounded sample of the batch (evenly spread over it)
        step = max(1, n // SAMPLE_PER_BATCH)
        durations: list[float] = []
        for i in range(0, n, step):
            e = batch[i]
            if e.kind in ("completed", "failed", "timed_out"):
                ms = _ms(e.duration)
                if ms is not None:
                    durations.append(ms)
        with self._events_lock:
            self._recent.extend(recent)
            bucket = self._bucket(second)
            bucket.completed += counts.get("completed", 0)
            bucket.failed += counts.get("failed", 0) + counts.get("timed_out", 0)
            if bucket.durations is not None:
                for d in durations:
                    bucket.seen += 1
                    if len(bucket.durations) < SAMPLES_PER_SECOND:
                        bucket.durations.append(d)
                    else:  # reservoir sampling: every duration equally likely to be kept
                        j = self._random.randrange(bucket.seen)
                        if j < SAMPLES_PER_SECOND:
                            bucket.durations[j] = d
            if counts.get("quarantined"):
                self._quarantine_stale = True

    def _bucket(self, second: int) -> _Second:
        bucket = self._seconds.get(second)
        if bucket is None:
            bucket = self._seconds[second] = _Second()
            while len(self._seconds) > SERIES_SECONDS + 2:
                self._seconds.popitem(last=False)
        return bucket

    @staticmethod
    def _row(e: Any) -> dict[str, Any]:
        kind = e.kind
        return {
            "token_id": e.token_id,
            "operation": _text(e.operation),
            "time": _num(e.time),
            "core": e.core,
            "worker": e.worker,
            "outcome": kind,
            "success": kind == "completed",
            "duration_ms": _ms(e.duration),
            "error": _error_text(e.error) if kind != "completed" else None,
        }

    def invalidate_quarantine(self) -> None:
        """The next snapshot re-reads the quarantine store."""
        with self._events_lock:
            self._quarantine_stale = True

    # -- snapshots ----------------------------------------------------------------------

    def build(self) -> dict[str, Any]:
        """A new snapshot (the shape is in the dashboard spec; ``version`` is set by the
        publisher, 0 here)."""
        with self._build_lock:
            now = self._clock()
            snap: dict[str, Any] = {
                "version": 0,
                "time": round(now, 3),
                "coordinator": self._coord.name,
            }
            stats = self._panel("stats", self._coord.stats, None)
            snap["system"] = self._system(stats)
            snap["pool"] = self._pool(stats)
            snap["queued"] = self._panel("queued", self._queued, [])
            snap["guard"] = self._panel("guard", lambda: self._guard(stats, now), [])
            with self._events_lock:
                snap["recent"] = list(reversed(self._recent))
                snap["series"] = self._series(int(now))
            snap["quarantine"] = self._panel("quarantine", lambda: self._quarantined(now), None)
            if snap["quarantine"] is None:
                snap["quarantine"] = {"count": 0, "records": []}
            snap["audit"] = self._audit.recent(AUDIT_ROWS)
            return snap

    def _panel(self, name: str, fn: Callable[[], Any], default: Any) -> Any:
        """Runs one panel's reader; a failure is logged (once per panel until it works again)
        and the panel shows ``default``."""
        try:
            value = fn()
        except Exception as exc:
            if name not in self._panel_errors:
                self._panel_errors.add(name)
                if type(exc).__name__ in ("CoordinatorNotRunning",):
                    log.debug("dashboard panel %s: %s", name, exc)
                else:
                    log.exception("dashboard panel %s could not be read", name)
            return default
        self._panel_errors.discard(name)
        return value

    def _system(self, stats: dict[str, Any] | None) -> dict[str, Any]:
        coord = self._coord
        running = coord.running
        started = coord.started_at if running else None
        s = stats or {}
        per_core: list[dict[str, Any]] = []
        for c in s.get("per_core") or []:
            routed = c.get("routed") or {}
            per_core.append(
                {
                    "core": _num(c.get("core")),
                    "cpu": _num(c.get("cpu")),
                    "active_workers": _num(c.get("active_workers")),
                    "busy_workers": _num(c.get("busy_workers")),
                    "queue_depth": _num(c.get("queue_depth")),
                    "executing": _num(c.get("executing")),
                    "routed": {w: _num(routed.get(w)) or 0 for w in ("heavy", "medium", "light")},
                }
            )
        try:
            pinned: bool | None = coord.pinned if running else None
        except Exception:
            pinned = None
        throughput = _num(s.get("throughput_per_s"))
        return {
            "running": bool(running),
            "paused": bool(coord.paused),
            "admission_open": bool(coord.admission_open),
            "uptime_s": None if started is None else max(0, int(self._clock() - started)),
            "workers": sum(int(c["active_workers"] or 0) for c in per_core),
            "physical_cores": self._physical,
            "logical_cpus": self._logical,
            "cores": _num(s.get("cores")),
            "pinned": pinned,
            "mode": _text(s.get("mode")),
            "throughput_per_s": None if throughput is None else round(float(throughput), 1),
            "per_core": per_core,
            "backend": _backend(s.get("backend")),
        }

    @staticmethod
    def _pool(stats: dict[str, Any] | None) -> dict[str, Any]:
        s = stats or {}
        keys = ("created", "waiting", "admitted", "executing", "completed", "failed")
        return {k: _num(s.get(k)) for k in (*keys, "killed", "timed_out")}

    def _queued(self) -> list[dict[str, Any]]:
        if not self._coord.running:
            return []
        out = []
        for t in self._coord.queued(limit=QUEUED):
            weight = t.weight
            out.append(
                {
                    "token_id": t.token_id,
                    "operation": _text(t.operation_type),
                    "state": t.state.name,
                    "priority": _text(t.priority),
                    "weight": _text(getattr(weight, "value", weight)),
                }
            )
        return out

    def _guard(self, stats: dict[str, Any] | None, now: float) -> list[dict[str, Any]]:
        report = self._coord.guard_house.report()
        limits = (stats or {}).get("limits") or {}
        names = sorted(set(report.operations) | set(limits))[:MAX_OPERATIONS]
        rows = []
        for name in names:
            h = report.operations.get(name)
            rows.append(
                {
                    "operation": _text(name),
                    "rate_per_s": self._rate(name, now, h.attempts if h else 0),
                    "attempts": h.attempts if h else 0,
                    "success_rate": _num(h.success_rate) if h else None,
                    "p50_ms": _ms(h.p50_duration) if h else None,
                    "p95_ms": _ms(h.p95_duration) if h else None,
                    "health": h.health if h else "UNRATED",
                    "breaker_state": h.breaker_state if h else "closed",
                    "limit": _limit(limits.get(name)),
                    "blocked": h.blocked if h else 0,
                    "last_error": _error_text(h.last_error) if h else None,
                }
            )
        for gone in set(self._attempts) - set(names):
            del self._attempts[gone]
        return rows

    def _rate(self, name: str, now: float, attempts: int) -> float | None:
        """Attempts a second over the last 10 s (from the counts this builder saw)."""
        hist = self._attempts.get(name)
        if hist is None:
            hist = self._attempts[name] = collections.deque(maxlen=64)
        hist.append((now, attempts))
        while len(hist) > 2 and now - hist[1][0] >= RATE_WINDOW:
            hist.popleft()
        t0, a0 = hist[0]
        if now - t0 <= 0:
            return None
        return round(max(0, attempts - a0) / (now - t0), 2)

    def _series(self, now_second: int) -> dict[str, Any]:
        """The last 300 complete seconds (events lock held)."""
        first = max(now_second - SERIES_SECONDS, self._first_second)
        t: list[int] = []
        completed: list[int] = []
        failed: list[int] = []
        p50: list[float | None] = []
        p95: list[float | None] = []
        for sec in range(first, now_second):
            bucket = self._seconds.get(sec)
            t.append(sec)
            if bucket is None:
                completed.append(0)
                failed.append(0)
                p50.append(None)
                p95.append(None)
                continue
            bucket.close()
            completed.append(bucket.completed)
            failed.append(bucket.failed)
            p50.append(bucket.p50)
            p95.append(bucket.p95)
        return {
            "interval_s": 1,
            "t": t,
            "completed": completed,
            "failed": failed,
            "p50_ms": p50,
            "p95_ms": p95,
        }

    def _quarantined(self, now: float) -> dict[str, Any]:
        with self._events_lock:
            stale = self._quarantine_stale
            self._quarantine_stale = False
        read_at = self._quarantine_read_at
        if not stale and read_at is not None and 0 <= now - read_at < QUARANTINE_REFRESH:
            return self._quarantine
        self._quarantine_read_at = now
        try:
            store = self._coord.guard_house.quarantine
            try:
                # Every add, claim, release and discard renames or creates a file in it.
                mtime: int | None = os.stat(store.directory).st_mtime_ns
            except FileNotFoundError:
                mtime = None
            # Trusted only when the last read came a second after the change (coarse file
            # system clocks can give a change just after a read the same mtime).
            if (
                not stale
                and mtime is not None
                and mtime == self._quarantine_mtime
                and read_at is not None
                and read_at - mtime / 1e9 > 1.0
            ):
                return self._quarantine
            # A directory listing and the newest few files: never every record.
            count = len(store)
            newest = store.newest(QUARANTINE_LIST) if count else []
        except Exception:
            with self._events_lock:
                self._quarantine_stale = True  # try again next time
            raise
        self._quarantine_mtime = mtime
        self._quarantine = {
            "count": count,
            "records": [
                {
                    "record_id": r.record_id,
                    "token_id": r.token_id,
                    "operation": _text(r.operation_type),
                    "quarantined_at": _num(r.quarantined_at),
                    "reason": _text(r.reason),
                    "argument_summary": _text(r.argument_summary),
                    "replayable": bool(r.replayable),
                }
                for r in newest
            ],
        }
        return self._quarantine


def _limit(limit: object) -> dict[str, Any] | None:
    if not isinstance(limit, dict):
        return None
    return {
        "max_concurrency": _num(limit.get("max_concurrency")),
        "rate_limit": _num(limit.get("rate")),
        "rate_burst": _num(limit.get("burst")),
        "limit_by": _text(limit.get("limit_by")),
    }


def _backend(b: object) -> dict[str, Any]:
    """What executes the attempts (``stats()["backend"]``): its name and, for a remote one,
    where it runs and how much of it is in use."""
    d = b if isinstance(b, dict) else {}
    return {
        "name": _text(d.get("name")) or "local",
        "scheduler": _text(d.get("scheduler")),
        "workers": _num(d.get("workers")),
        "threads": _num(d.get("threads")),
        "running": _num(d.get("running")),
        "in_flight": _num(d.get("in_flight")),
    }


def _physical_cores() -> int | None:
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:  # pragma: no cover - psutil is a dependency; be safe anyway
        return None
    return int(n) if n else None
