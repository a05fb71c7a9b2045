"""Settings of the Guard House's interventions: :class:`CircuitBreaker` and
:class:`Quarantine`, validated when they are made (decoration time), and turned into what the
core enforces.

The breaker itself runs in the core (``rust/breaker.rs``): the gate every call passes is one
atomic load while it is closed, and a half-open breaker's probes are counted atomically, so
two racing submitters can never both pass a single-probe breaker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigurationError, InvalidOption

__all__ = ["CircuitBreaker", "Quarantine", "guard_settings"]

_NS = 1e9


def _rate(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v <= 1):
        raise ConfigurationError(f"{name} must be a fraction in (0, 1] (e.g. 0.5), got {v!r}")
    return float(v)


def _secs(name: str, v: object, *, allow_none: bool = False) -> float | None:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < math.inf):
        what = "a number of seconds > 0" + (" or None" if allow_none else "")
        raise ConfigurationError(f"{name} must be {what}, got {v!r}")
    return float(v)


def _int(name: str, v: object, low: int, *, allow_none: bool = False) -> int | None:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not (low <= v <= 2**31):
        what = f"an int >= {low}" + (" or None" if allow_none else "")
        raise ConfigurationError(f"{name} must be {what}, got {v!r}")
    return v


def _classes(name: str, v: object) -> tuple[type[BaseException], ...] | None:
    if v is None:
        return None
    items = v if isinstance(v, tuple) else (v,)
    if not items or not all(isinstance(c, type) and issubclass(c, BaseException) for c in items):
        raise InvalidOption(
            f"{name} must be an exception class or a non-empty tuple of them, got {v!r}"
        )
    return tuple(items)


@dataclass(frozen=True)
class CircuitBreaker:
    """When an operation's circuit breaker opens, and how it recovers.

    It trips (opens) when, over the last ``window`` calls (default 100; or instead the calls
    of the last ``window_seconds``),
    once at least ``min_calls`` were seen, the share of failures reaches ``failure_rate``, or
    the share of calls slower than ``slow_call`` reaches ``slow_call_rate``; or on
    ``consecutive_failures`` failures in a row (whatever ``min_calls`` says). Open, every call
    raises :class:`~tokengate.MethodBlocked` at once, before anything is queued. After
    ``open_duration`` seconds (multiplied by ``open_backoff`` each time a probe fails, up to
    ``open_max``, with +-20 % jitter when ``jitter`` is set) it becomes half-open and lets
    exactly ``half_open_probes`` calls through; once they all succeed it closes, and a failed
    one opens it again. Results of calls that started before a state change never count
    against the new state.

    A failure is an attempt that raised one of ``failure_on`` (default: any ``Exception``) and
    none of ``ignore``, or that timed out; kills, cancellations and quarantined calls never
    count.
    """

    failure_rate: float = 0.5
    window: int | None = None
    window_seconds: float | None = None
    min_calls: int = 20
    slow_call: float | None = None
    slow_call_rate: float = 1.0
    consecutive_failures: int | None = None
    open_duration: float = 30.0
    open_backoff: float = 1.0
    open_max: float = 600.0
    jitter: bool = False
    half_open_probes: int = 1
    failure_on: tuple[type[BaseException], ...] | None = None
    ignore: tuple[type[BaseException], ...] | None = field(default=None)

    def __post_init__(self) -> None:
        _rate("failure_rate", self.failure_rate)
        _rate("slow_call_rate", self.slow_call_rate)
        _int("window", self.window, 1, allow_none=True)
        _secs("window_seconds", self.window_seconds, allow_none=True)
        if self.window is not None and self.window_seconds is not None:
            raise ConfigurationError(
                "give window (the last N calls) or window_seconds (the calls of the last S "
                f"seconds), not both; got window={self.window}, "
                f"window_seconds={self.window_seconds}"
            )
        _int("min_calls", self.min_calls, 1)
        if self.window_seconds is None and self.min_calls > self.calls_window:
            raise ConfigurationError(
                f"min_calls ({self.min_calls}) must be <= window ({self.calls_window}): the "
                "window never holds that many calls, so the rates would never be judged"
            )
        _secs("slow_call", self.slow_call, allow_none=True)
        _int("consecutive_failures", self.consecutive_failures, 1, allow_none=True)
        _secs("open_duration", self.open_duration)
        if isinstance(self.open_max, (int, float)) and self.open_duration > self.open_max:
            raise ConfigurationError(
                f"open_duration ({self.open_duration}) must be <= open_max ({self.open_max}); "
                "raise open_max too"
            )
        b = self.open_backoff
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not (1 <= b < math.inf):
            raise ConfigurationError(f"open_backoff must be a number >= 1 (1: constant), got {b!r}")
        if _secs("open_max", self.open_max) < self.open_duration:  # type: ignore[operator]
            raise ConfigurationError(
                f"open_max must be >= open_duration ({self.open_duration}), got {self.open_max}"
            )
        if not isinstance(self.jitter, bool):
            raise ConfigurationError(f"jitter must be True or False, got {self.jitter!r}")
        _int("half_open_probes", self.half_open_probes, 1)
        object.__setattr__(self, "failure_on", _classes("failure_on", self.failure_on))
        object.__setattr__(self, "ignore", _classes("ignore", self.ignore))
        both = set(self.failure_on or ()) & set(self.ignore or ())
        if both:
            names = ", ".join(sorted(c.__qualname__ for c in both))
            raise ConfigurationError(f"{names} cannot be both in failure_on and in ignore")

    @property
    def calls_window(self) -> int:
        """The count window (``window``, default 100; unused with ``window_seconds``)."""
        return 100 if self.window is None else self.window

    def to_core(self, auto: bool = True) -> dict[str, Any]:
        """The settings as the core takes them (durations in ns)."""
        d: dict[str, Any] = {
            "auto": auto,
            "failure_rate": self.failure_rate,
            "slow_call_rate": self.slow_call_rate,
            "slow_call_ns": None if self.slow_call is None else int(self.slow_call * _NS),
            "min_calls": self.min_calls,
            "consecutive_failures": self.consecutive_failures,
            "open_ns": int(self.open_duration * _NS),
            "open_backoff": float(self.open_backoff),
            "open_max_ns": int(self.open_max * _NS),
            "jitter": self.jitter,
            "half_open_probes": self.half_open_probes,
        }
        if self.window_seconds is not None:
            d["window_ns"] = int(self.window_seconds * _NS)
        else:
            d["window_calls"] = self.calls_window
        return d


@dataclass(frozen=True)
class Quarantine:
    """Spike detection: a call whose arguments predict a cost at least ``threshold`` times the
    operation's baseline does not run once the operation's cost model has seen
    ``min_samples`` attempts; its token ends QUARANTINED and its record goes to the
    quarantine store (see docs/guard-house.md)."""

    threshold: float = 3.0
    min_samples: int = 20

    def __post_init__(self) -> None:
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (1 < t < math.inf):
            raise ConfigurationError(f"quarantine threshold must be a number > 1, got {t!r}")
        _int("min_samples", self.min_samples, 1)

    def to_core(self, enabled: bool = True) -> dict[str, Any]:
        return {
            "enabled": enabled,
            "threshold": float(self.threshold),
            "min_samples": self.min_samples,
        }


def guard_settings(
    circuit_breaker: object = None,
    quarantine: object = None,
    predict: object = None,
) -> dict[str, Any] | None:
    """The ``guard=`` dict of the core from the ``circuit_breaker``, ``quarantine`` and
    ``predict`` keywords (None when none is given). ``circuit_breaker``: True (the defaults),
    a :class:`CircuitBreaker`, or False (passive: only the operator's buttons);
    ``quarantine``: True, a :class:`Quarantine`, or False; ``predict``: whether calls get a
    ``predicted_duration`` without quarantine."""
    out: dict[str, Any] = {}
    if circuit_breaker is not None:
        if isinstance(circuit_breaker, bool):
            out["breaker"] = CircuitBreaker().to_core(auto=circuit_breaker)
        elif isinstance(circuit_breaker, CircuitBreaker):
            out["breaker"] = circuit_breaker.to_core()
            out["failure_on"] = circuit_breaker.failure_on
            out["ignore"] = circuit_breaker.ignore
        else:
            raise InvalidOption(
                f"circuit_breaker must be True, False or a CircuitBreaker(...), got "
                f"{circuit_breaker!r}"
            )
    if quarantine is not None:
        if isinstance(quarantine, bool):
            out["quarantine"] = Quarantine().to_core(enabled=quarantine)
        elif isinstance(quarantine, Quarantine):
            out["quarantine"] = quarantine.to_core()
        else:
            raise InvalidOption(
                f"quarantine must be True, False or a Quarantine(...), got {quarantine!r}"
            )
    if predict is not None:
        if not isinstance(predict, bool):
            raise InvalidOption(f"predict must be True or False, got {predict!r}")
        out["predict"] = predict
    return out or None
