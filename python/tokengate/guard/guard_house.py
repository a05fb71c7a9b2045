"""The Guard House of a coordinator: health per operation, circuit breakers, spike detection
with quarantine and replay, and the execution history.

The figures are kept by the core as tokens run (relaxed atomics per core, no Python call per
token); this module reads them when asked and holds the policy: health classes, the report,
the operator's buttons, and the quarantine store. It observes and never intervenes unless
told to: breakers trip by themselves only with ``auto_block=True`` (or
``circuit_breaker=...``), and calls are quarantined only with ``quarantine=...``.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from ..errors import ConfigurationError, CoordinatorNotRunning, InvalidOption
from .breaker import guard_settings

if TYPE_CHECKING:
    from .._core import Runtime, TaskToken
    from .history import ExecutionRecord
    from .quarantine import ActionResult, QuarantineRecord, QuarantineStore

__all__ = [
    "HEALTH_CLASSES",
    "GuardHouse",
    "GuardReport",
    "OperationHealth",
    "health_class",
    "replay_call",
]

log = logging.getLogger("tokengate.guard")

#: Health classes, best first, with the success rate each needs (strictly more than).
HEALTH_CLASSES: Final = (("EXCELLENT", 0.95), ("GOOD", 0.80), ("POOR", 0.50), ("CRITICAL", -1.0))

#: The class of an operation that has not finished an attempt yet.
UNRATED: Final = "UNRATED"

_BUTTONS = ("block", "unblock", "force_open", "disable")


def health_class(success_rate: float | None) -> str:
    """EXCELLENT above 95 % success, GOOD above 80 %, POOR above 50 %, else CRITICAL;
    UNRATED without attempts (``success_rate`` None)."""
    if success_rate is None:
        return UNRATED
    for name, floor in HEALTH_CLASSES:
        if success_rate > floor:
            return name
    return "CRITICAL"


@dataclass(frozen=True)
class OperationHealth:
    """What the Guard House knows about one operation (durations in seconds).

    ``success_rate`` is completed / (completed + failed + timed out) over every attempt that
    ran (kills excluded); ``p50``/``p95`` come from a log-linear histogram (within about 12 %).
    ``breaker``, ``model`` and ``quarantine`` are the core's figures as dicts.
    """

    operation: str
    health: str
    attempts: int
    completed: int
    failed: int
    timed_out: int
    killed: int
    blocked: int
    quarantined: int
    success_rate: float | None
    failure_rate: float | None
    mean_duration: float | None
    p50_duration: float | None
    p95_duration: float | None
    max_duration: float | None
    mean_queue_wait: float | None
    slow_call_rate: float | None
    slow_call_threshold: float | None
    last_error: dict[str, Any] | None
    complexity_score: float | None
    breaker: dict[str, Any] = field(repr=False)
    model: dict[str, Any] = field(repr=False)
    quarantine: dict[str, Any] = field(repr=False)

    @property
    def breaker_state(self) -> str:
        """closed, open, half_open, forced_open or disabled."""
        return str(self.breaker["state"])

    @classmethod
    def from_core(cls, d: Mapping[str, Any]) -> OperationHealth:
        return cls(health=health_class(d["success_rate"]), **d)

    def as_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {
            "breaker_state": self.breaker_state
        }


def _ms(s: float | None) -> str:
    """A duration for the text report: "-", "850 us", "12.5 ms", "1.25 s"."""
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1.0:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


@dataclass(frozen=True)
class GuardReport:
    """Health of every operation the coordinator has seen, as data (``operations``,
    ``as_dict()``) and as the seed's text (``render()``, also ``str(report)``)."""

    operations: dict[str, OperationHealth]
    generated_at: float

    def by_class(self) -> dict[str, list[OperationHealth]]:
        """Operations per health class (best first), each list by name."""
        out: dict[str, list[OperationHealth]] = {n: [] for n, _ in HEALTH_CLASSES}
        out[UNRATED] = []
        for op in sorted(self.operations.values(), key=lambda o: o.operation):
            out[op.health].append(op)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "generated_at": self.generated_at,
            "operations": {k: v.as_dict() for k, v in self.operations.items()},
        }

    def render(self) -> str:
        """The report as text: one section per health class (EXCELLENT PERFORMERS, ...)."""
        lines = ["=== GUARD HOUSE REPORT ==="]
        titles = {
            "EXCELLENT": "EXCELLENT PERFORMERS",
            "GOOD": "GOOD PERFORMERS",
            "POOR": "POOR PERFORMERS",
            "CRITICAL": "CRITICAL OPERATIONS",
            UNRATED: "NOT RATED YET",
        }
        for cls, ops in self.by_class().items():
            if not ops:
                continue
            lines.append(f"{titles[cls]} ({len(ops)}):")
            for o in ops:
                rate = "-" if o.success_rate is None else f"{o.success_rate:.1%}"
                line = (
                    f"  {o.operation}: {rate} success over {o.attempts} attempts, "
                    f"p50 {_ms(o.p50_duration)}, p95 {_ms(o.p95_duration)}, "
                    f"breaker {o.breaker_state}"
                )
                if o.blocked or o.quarantined:
                    line += f", {o.blocked} blocked, {o.quarantined} quarantined"
                if o.last_error is not None and cls != "EXCELLENT":
                    line += f"; last error {o.last_error['type']}: {o.last_error['message']}"
                lines.append(line)
        if len(lines) == 1:
            lines.append("(no operations seen yet)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


def replay_call(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    runtime: Runtime | None = None,
) -> Any:
    """Submits a released quarantined call as a new token: through the breaker, limits and
    every other rule of its operation, only without the spike check (which stopped it). With
    ``runtime`` it goes to that coordinator's runtime, else to the one taking decorated
    calls."""
    from .._core import GuardedFunction

    options = getattr(fn, "options", None)
    target = options(quarantine=False) if callable(options) else fn
    if runtime is not None:
        if isinstance(target, GuardedFunction):
            return runtime.call_guarded(target, tuple(args), dict(kwargs))
        if options is None:  # a plain callable: a token of its own on that runtime
            return runtime.submit(fn, tuple(args), dict(kwargs))
    return target(*args, **kwargs)


class GuardHouse:
    """``coordinator.guard_house``: reads and steers the Guard House of a coordinator."""

    def __init__(
        self,
        runtime: Callable[[], Runtime],
        quarantine_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._runtime = runtime
        self._quarantine_dir = quarantine_dir
        self._store: QuarantineStore | None = None
        self._lock = threading.Lock()
        # What operators set, carried over to the next run of the coordinator: per operation,
        # its configure() settings and a standing block()/disable().
        self._carried: dict[str, dict[str, Any]] = {}
        #: Called with an audit dict for every operator action (buttons, quarantine release
        #: and discard); exceptions are logged. The dashboard's audit log subscribes here.
        self.on_action: list[Callable[[dict[str, Any]], None]] = []

    # -- health -------------------------------------------------------------------------

    def operations(self) -> list[str]:
        """Names of the operations seen so far."""
        return list(self._runtime().guard_operations())

    def health(self, operation: str) -> OperationHealth:
        """One operation's health (:class:`ConfigurationError` if it was never seen)."""
        d = self._runtime().guard_report(_name(operation))
        if d is None:
            raise ConfigurationError(
                f"operation {operation!r} has not been seen by this coordinator; seen: "
                f"{', '.join(map(repr, self.operations())) or 'none'}"
            )
        return OperationHealth.from_core(d)

    def report(self) -> GuardReport:
        """Health of every operation seen so far."""
        rt = self._runtime()
        ops = {}
        for name in rt.guard_operations():
            d = rt.guard_report(name)
            if d is not None:
                ops[name] = OperationHealth.from_core(d)
        return GuardReport(ops, time.time())

    # -- breakers -----------------------------------------------------------------------

    def configure(
        self,
        operation: str,
        *,
        circuit_breaker: object = None,
        quarantine: object = None,
        predict: object = None,
    ) -> OperationHealth:
        """Changes what the Guard House does for ``operation`` from now on (the keywords of
        ``task_token_guard``); returns its health."""
        settings = guard_settings(circuit_breaker, quarantine, predict)
        if settings is None:
            raise InvalidOption("configure() needs circuit_breaker=, quarantine= or predict=")
        self._runtime().guard_configure(_name(operation), settings)
        with self._lock:
            self._carried.setdefault(operation, {}).setdefault("settings", {}).update(settings)
        self._audit("configure", operation, "ok", settings=_plain(settings))
        return self.health(operation)

    def _button(self, action: str, operation: str) -> str:
        try:
            state = self._runtime().breaker_action(_name(operation), action)
        except Exception as e:
            self._audit(action, operation, f"refused: {e}")
            raise
        with self._lock:
            carried = self._carried.setdefault(operation, {})
            if action in ("block", "disable"):
                carried["button"] = action
            else:  # unblock, or force_open: it recovers by itself from now on
                carried.pop("button", None)
        self._audit(action, operation, state)
        return str(state)

    def block(self, operation: str) -> str:
        """Blocks ``operation`` until :meth:`unblock` (its calls raise ``MethodBlocked``);
        returns the new breaker state ("forced_open")."""
        return self._button("block", operation)

    def unblock(self, operation: str) -> str:
        """Closes ``operation``'s breaker from any state (its window starts afresh)."""
        return self._button("unblock", operation)

    def force_open(self, operation: str) -> str:
        """Opens the breaker as if it tripped: it recovers by itself through half-open probes."""
        return self._button("force_open", operation)

    def disable(self, operation: str) -> str:
        """Turns ``operation``'s breaker off: every call is admitted and nothing trips it
        until :meth:`unblock`."""
        return self._button("disable", operation)

    def breaker_state(self, operation: str) -> str:
        return self.health(operation).breaker_state

    # -- history ------------------------------------------------------------------------

    def history(self, limit: int | None = None) -> list[ExecutionRecord]:
        """The execution history (oldest first; at most ``limit`` newest records)."""
        from .history import ExecutionRecord

        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 0
        ):
            raise ConfigurationError(f"limit must be an int >= 0 or None, got {limit!r}")
        return [ExecutionRecord.from_dict(d) for d in self._runtime().history(limit)]

    def dump_history(self, path: str | os.PathLike[str]) -> int:
        """Writes the execution history to ``path`` as JSON (see
        :func:`tokengate.guard.history.load`); returns how many records it wrote."""
        from .history import dump

        capacity, kept, written = self._runtime().history_info()
        info = {"capacity": capacity, "kept": kept, "written": written}
        return dump(self.history(), path, coordinator_info=info)

    # -- quarantine ---------------------------------------------------------------------

    @property
    def quarantine(self) -> QuarantineStore:
        """The quarantine store (``quarantine_dir``, default under the user's data dir)."""
        with self._lock:
            if self._store is None:
                from .quarantine import QuarantineStore

                self._store = QuarantineStore(self._quarantine_dir)
                self._store.on_action.append(self._forward)
            return self._store

    def quarantined(self, **filters: Any) -> list[QuarantineRecord]:
        """Records in the quarantine store (filters: operation, since, until, limit)."""
        return self.quarantine.list(**filters)

    def release(
        self,
        record_ids: str | Iterable[str] | None = None,
        *,
        operation: str | None = None,
        since: float | None = None,
        until: float | None = None,
        dry_run: bool = False,
    ) -> ActionResult:
        """Replays quarantined calls as new tokens (through the breaker and limits like any
        call, only not the spike check) and removes their records; ``dry_run=True`` shows
        what it would touch. Selection: record ids, or operation / since / until (UNIX
        times)."""
        ids = _record_ids(record_ids, dry_run)
        rt = None if dry_run else self._runtime()
        if rt is not None and rt.shut_down:
            raise CoordinatorNotRunning(
                "release() replays the calls on this coordinator, which is not running: "
                "start it first (dry_run=True shows what would be released)"
            )

        def replay(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            return replay_call(fn, args, kwargs, rt)

        return self.quarantine.release(
            ids, operation=operation, since=since, until=until, dry_run=dry_run, replay=replay
        )

    def discard(
        self,
        record_ids: str | Iterable[str] | None = None,
        *,
        operation: str | None = None,
        since: float | None = None,
        until: float | None = None,
        dry_run: bool = False,
    ) -> ActionResult:
        """Removes quarantined records without running them (same selection as release)."""
        ids = _record_ids(record_ids, dry_run)
        return self.quarantine.discard(
            ids, operation=operation, since=since, until=until, dry_run=dry_run
        )

    def _on_quarantine(
        self,
        token: TaskToken,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        predicted: float,
        baseline: float,
        deviation: float,
        threshold: float,
    ) -> str:
        """Called by the core, in the submitting thread, for a call it quarantines; returns the
        record id (if it raises, the token still ends QUARANTINED and its error says the
        record could not be stored)."""
        reason = (
            f"predicted {predicted:.3g} s, {deviation:.1f}x the baseline of {baseline:.3g} s "
            f"(threshold {threshold:g}x)"
        )
        record = self.quarantine.add(
            token.token_id,
            str(token.operation_type),
            fn,
            args,
            kwargs,
            predicted=predicted,
            baseline=baseline,
            deviation=deviation,
            threshold=threshold,
            reason=reason,
        )
        log.warning(
            "quarantined token %d (%s): %s; record %s",
            token.token_id,
            token.operation_type,
            reason,
            record.record_id,
        )
        return record.record_id

    def _restore(self, rt: Runtime) -> None:
        """Applies what operators set during earlier runs (``configure()`` settings, a standing
        ``block()`` or ``disable()``) to a new run's runtime; health figures start afresh."""
        with self._lock:
            carried = {op: dict(c) for op, c in self._carried.items()}
        for op, c in carried.items():
            if c.get("settings"):
                rt.guard_configure(op, c["settings"])
            if c.get("button"):
                rt.breaker_action(op, c["button"])

    # -- audit --------------------------------------------------------------------------

    def _audit(self, action: str, operation: str, outcome: str, **extra: Any) -> None:
        self._forward(
            {"time": time.time(), "action": action, "target": operation, "outcome": outcome} | extra
        )

    def _forward(self, event: dict[str, Any]) -> None:
        if "target" not in event:  # a quarantine action: name what it touched and how it went
            event = dict(event)
            event["target"] = ", ".join(event.get("records") or []) or "(nothing selected)"
            failed = event.get("failed") or {}
            done = event.get("done") or []
            prefix = "dry run: would do " if event.get("dry_run") else ""
            event["outcome"] = f"{prefix}{len(done)} done, {len(failed)} failed"
        log.info(
            "guard house action: %s %s: %s",
            event.get("action"),
            _short(event.get("target")),
            event.get("outcome"),
        )
        for hook in list(self.on_action):
            try:
                hook(copy.deepcopy(event))  # each hook its own copy: one cannot change another's
            except Exception:
                log.exception("guard house action hook %r raised", hook)


def _short(text: object, limit: int = 200) -> str:
    s = str(text)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _record_ids(record_ids: object, dry_run: object) -> list[str] | None:
    if not isinstance(dry_run, bool):
        raise InvalidOption(f"dry_run must be True or False, got {dry_run!r}")
    if record_ids is None:
        return None
    if isinstance(record_ids, str):
        return [record_ids]
    if isinstance(record_ids, (bytes, Mapping)) or not isinstance(record_ids, Iterable):
        raise InvalidOption(
            f"record_ids must be a record id (str) or an iterable of them, got {record_ids!r}"
        )
    ids = list(record_ids)
    bad = [r for r in ids if not isinstance(r, str)]
    if bad:
        raise InvalidOption(f"record ids are str, got {bad[0]!r}")
    return ids


def _name(operation: object) -> str:
    if not isinstance(operation, str) or not operation:
        raise InvalidOption(f"operation must be an operation name (a str), got {operation!r}")
    return operation


def _plain(d: Mapping[str, Any]) -> dict[str, Any]:
    def conv(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, tuple):
            return [getattr(c, "__qualname__", repr(c)) for c in v]
        return v

    return conv(d)  # type: ignore[no-any-return]
