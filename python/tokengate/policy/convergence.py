"""Convergence: every ``convergence_interval`` seconds the coordinator's control loop sets each
core's active worker count between ``floor`` and ``max_workers_per_core`` from what the core did
during the interval — fewer workers under light load, more under sustained pressure.

Growth that cannot wait for the next round is the Rust core's: its monitor thread gives a core
more workers within about a millisecond when every worker of the core has been executing its
token for a while and tokens for it queue (see docs/convergence.md). This module shrinks such
cores back once the load is gone, and grows a core step by step while its tokens keep waiting
long without that monitor seeing a reason (and undoes a step that did not shorten the wait).

:func:`decide` is pure (figures in, targets out) so it is tested without threads;
:class:`Convergence` is the coroutine on the control loop that feeds it from ``rt.stats()`` and
applies its targets with ``set_active_workers`` (which never drops or reorders queued tokens:
workers made inactive finish their own mailbox first).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigurationError, TokenGateError

__all__ = [
    "Convergence",
    "ConvergenceOptions",
    "CoreFigures",
    "Decision",
    "Trial",
    "check_interval",
    "decide",
    "figures_from_stats",
    "wait_percentile",
]

log = logging.getLogger("tokengate")


def check_interval(name: str, value: object) -> float | None:
    """``convergence_interval``: seconds > 0, or None / 0 to disable convergence."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ConfigurationError(
            f"{name} must be a number of seconds > 0, or None or 0 to disable it, got {value!r}"
        )
    if value < 0 or value == math.inf:
        raise ConfigurationError(
            f"{name} must be a finite number of seconds > 0, or None or 0 to disable it, "
            f"got {value}"
        )
    return None if value == 0 else float(value)


@dataclass(frozen=True)
class ConvergenceOptions:
    """Knobs of :func:`decide`.

    Attributes:
        floor: the fewest active workers a core is shrunk to (1: an idle core keeps one worker
            ready; on-demand growth brings more within about a millisecond).
        headroom: a core keeps ``ceil(average busy workers * headroom)`` workers.
        pressure_wait_s: a queue whose submit-to-start wait p95 reaches this is under
            pressure: the core grows by one worker per round (while that shortens the wait).
        hold_rounds: rounds a core holds off growing after a step that did not help.
    """

    floor: int = 1
    headroom: float = 1.5
    pressure_wait_s: float = 0.005
    hold_rounds: int = 6


@dataclass(frozen=True)
class CoreFigures:
    """What one core did during a convergence interval (and its state at its end)."""

    #: 1-based core number.
    core: int
    active: int
    max_workers: int
    #: Workers receiving work that execute a token right now.
    busy_now: int
    #: Tokens queued for the core now: its mailboxes plus the pool tokens of its weights.
    queued: int
    #: Average number of its workers executing tokens during the interval.
    avg_busy: float
    #: p95 of the submit-to-start waits of the tokens that started during the interval
    #: (None: none started).
    wait_p95_s: float | None
    #: On-demand growths during the interval.
    grown: int = 0


@dataclass(frozen=True)
class Trial:
    """What :func:`decide` remembers about a core between rounds: the wait p95 and the queue
    length before its last growth step (to undo a step that shortened neither) and how many
    more rounds it holds off growing after an undo."""

    wait_s: float | None = None
    queued: int = 0
    hold: int = 0


@dataclass(frozen=True)
class Decision:
    """The active worker count for one core, why, and its :class:`Trial` for the next round."""

    core: int
    target: int
    reason: str
    trial: Trial = Trial()


def decide(
    figures: Sequence[CoreFigures],
    options: ConvergenceOptions = ConvergenceOptions(),
    trials: Mapping[int, Trial] | None = None,
) -> list[Decision]:
    """Target active worker counts, one :class:`Decision` per core of ``figures``.

    - **Pressure**: tokens queue and either their wait p95 reached ``pressure_wait_s`` or
      none started during the interval while every worker was busy (a stall). The core gets
      one more worker per round — unless the previous round added one for this reason and
      neither did the wait drop by 10 % nor the queue get shorter: then that worker is taken
      back and the core holds for ``hold_rounds`` rounds (what keeps the queue is something
      more workers do not fix, such as the GIL or the CPU).
    - **Otherwise** the core keeps ``max(ceil(avg_busy * headroom), busy_now + 1 if tokens
      queue else busy_now, floor)`` workers if that is fewer than it has (never more here:
      growth is for pressure and for the on-demand monitor).

    Every target lies between ``options.floor`` and the core's ``max_workers``.
    """
    trials = trials or {}
    out = []
    for f in figures:
        floor = max(1, min(options.floor, f.max_workers))
        before = trials.get(f.core, Trial())
        hold = max(0, before.hold - 1)
        wait = f.wait_p95_s
        if wait is None and f.queued > 0 and f.busy_now >= f.active:
            wait = math.inf  # a stall: nothing started although tokens queue
        pressure = f.queued > 0 and wait is not None and wait >= options.pressure_wait_s
        trial = Trial(None, 0, hold)
        if pressure and wait is not None and before.wait_s is not None:
            if wait > 0.9 * before.wait_s and f.queued >= before.queued:
                target, reason = f.active - 1, "undo: the last step did not help"
                trial = Trial(None, 0, options.hold_rounds)
            else:
                target, reason = f.active + 1, "pressure"
                trial = Trial(wait, f.queued, hold)
        elif pressure and wait is not None and hold == 0 and f.active < f.max_workers:
            target, reason, trial = f.active + 1, "pressure", Trial(wait, f.queued, 0)
        elif pressure:
            target, reason = f.active, "steady"
        else:
            queued = 1 if f.queued > 0 else 0
            need = max(math.ceil(f.avg_busy * options.headroom - 1e-9), f.busy_now + queued)
            target, reason = min(f.active, need), "light load"
        target = max(floor, min(f.max_workers, target))
        out.append(Decision(f.core, target, reason if target != f.active else "steady", trial))
    return out


def wait_percentile(histogram: Sequence[int], q: float) -> float | None:
    """The ``q`` percentile (0-100) of a wait histogram of the core (bucket 0: under 1 µs,
    bucket ``i``: ``[2**(i-1), 2**i)`` µs), as the upper bound of its bucket in seconds; None
    if the histogram is empty."""
    total = sum(histogram)
    if total <= 0:
        return None
    rank = max(1, math.ceil(total * q / 100))
    seen = 0
    for i, n in enumerate(histogram):
        seen += n
        if seen >= rank:
            return (1 << i) / 1e6
    return (1 << (len(histogram) - 1)) / 1e6


def figures_from_stats(
    before: Mapping[str, Any], after: Mapping[str, Any], seconds: float
) -> list[CoreFigures]:
    """Per-core figures of the interval between two ``Runtime.stats()`` snapshots taken
    ``seconds`` apart."""
    seconds = max(seconds, 1e-9)
    out = []
    prev = {c["core"]: c for c in before["per_core"]}
    for c in after["per_core"]:
        p = prev.get(c["core"], c)
        hist = [a - b for a, b in zip(c["wait_histogram"], p["wait_histogram"], strict=True)]
        out.append(
            CoreFigures(
                core=c["core"],
                active=c["active_workers"],
                max_workers=after["max_workers_per_core"],
                busy_now=c["busy_workers"],
                queued=c["queue_depth"] + c["pool_backlog"],
                avg_busy=max(0.0, c["busy_seconds"] - p["busy_seconds"]) / seconds,
                wait_p95_s=wait_percentile(hist, 95),
                grown=c["grown_on_demand"] - p["grown_on_demand"],
            )
        )
    return out


@dataclass
class _Counts:
    rounds: int = 0
    grown: int = 0
    shrunk: int = 0
    last: dict[str, Any] | None = None
    per_core: dict[int, dict[str, int]] = field(default_factory=dict)


class Convergence:
    """The convergence coroutine of one runtime (run on the coordinator's control loop)."""

    def __init__(self, rt: Any, interval: float, options: ConvergenceOptions) -> None:
        self.rt = rt
        self.interval = interval
        self.options = options
        self._counts = _Counts()
        self._trials: dict[int, Trial] = {}

    @staticmethod
    def empty_summary(interval: float | None) -> dict[str, Any]:
        """``stats()["convergence"]`` before any round (or with convergence disabled)."""
        return {
            "interval_s": interval,
            "rounds": 0,
            "grown": 0,
            "shrunk": 0,
            "last": None,
            "per_core": {},
        }

    def summary(self) -> dict[str, Any]:
        """``stats()["convergence"]``: rounds run, adjustments up and down (in all and per
        core), and the last adjustment."""
        c = self._counts
        return {
            "interval_s": self.interval,
            "rounds": c.rounds,
            "grown": c.grown,
            "shrunk": c.shrunk,
            "last": None if c.last is None else dict(c.last),
            "per_core": {core: dict(v) for core, v in sorted(c.per_core.items())},
        }

    def step(self, before: Mapping[str, Any], after: Mapping[str, Any], seconds: float) -> None:
        """One round: decide from the interval between two snapshots and apply the targets."""
        rt = self.rt
        figures = figures_from_stats(before, after, seconds)
        decisions = decide(figures, self.options, self._trials)
        self._counts.rounds += 1
        for f, d in zip(figures, decisions, strict=True):
            if f.grown:
                log.debug(
                    "convergence: core %d grew on demand %d time(s) since the last round "
                    "(now %d active workers)",
                    f.core,
                    f.grown,
                    f.active,
                )
            self._trials[d.core] = d.trial
            if d.target == f.active:
                continue
            if rt.active_workers(d.core) != f.active:
                # Changed since the snapshot (grown on demand): decide again next round.
                self._trials[d.core] = Trial(None, 0, d.trial.hold)
                continue
            rt.set_active_workers(d.core, d.target)
            up = d.target > f.active
            counts = self._counts.per_core.setdefault(d.core, {"grown": 0, "shrunk": 0})
            if up:
                self._counts.grown += 1
                counts["grown"] += 1
            else:
                self._counts.shrunk += 1
                counts["shrunk"] += 1
            self._counts.last = {
                "core": d.core,
                "from": f.active,
                "to": d.target,
                "reason": d.reason,
                "at": time.monotonic(),
            }
            log.debug(
                "convergence: core %d active workers %d -> %d (%s; avg busy %.2f, "
                "busy now %d, queued %d, wait p95 %s)",
                d.core,
                f.active,
                d.target,
                d.reason,
                f.avg_busy,
                f.busy_now,
                f.queued,
                "-" if f.wait_p95_s is None else f"{f.wait_p95_s * 1e3:.2f} ms",
            )

    async def run(self) -> None:
        rt = self.rt
        before, t_before = rt.stats(), time.monotonic()
        while True:
            await asyncio.sleep(self.interval)
            if rt.shut_down or rt.closed:
                if rt.shut_down:
                    return
                before, t_before = rt.stats(), time.monotonic()
                continue  # draining: leave the workers as they are until admission reopens
            after, t_after = rt.stats(), time.monotonic()
            try:
                self.step(before, after, t_after - t_before)
            except TokenGateError:
                if rt.shut_down:
                    return
                log.debug("convergence round failed", exc_info=True)
            except Exception:  # a bug here must not end the control loop's other work
                log.exception("convergence round failed")
            before, t_before = after, t_after
