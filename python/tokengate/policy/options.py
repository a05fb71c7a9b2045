"""Per-token options: what ``task_token_guard(...)`` and ``fn.options(...)`` accept, checked
at decoration (or ``options()``) time with an error that names the option, the value and what
is valid, and normalised into the keywords of the core's ``GuardedFunction``."""

from __future__ import annotations

import functools
import gc
import math
from collections.abc import Callable, Mapping
from typing import Any

from .._core import GuardedFunction
from .._types import PRIORITIES, STORAGE_SPEEDS, WEIGHT_INDEX, TaskWeight
from ..errors import ConfigurationError, InvalidOption, InvalidTag, TokenTimeout

__all__ = ["POLICY_OPTIONS", "normalize", "with_options"]

#: The policy keywords of ``task_token_guard`` and ``options()``, with their defaults.
POLICY_OPTIONS: dict[str, Any] = {
    "timeout": None,
    "retries": 0,
    "retry_backoff": 0.0,
    "retry_backoff_max": None,
    "retry_jitter": True,
    "retry_on": None,
    "retry_budget": None,
    "on_exhausted": None,
    "max_concurrency": None,
    "rate_limit": None,
    "rate_burst": None,
    "limit_by": None,
    "copy_context": True,
}

#: The Guard House keywords of ``task_token_guard`` (see docs/guard-house.md).
GUARD_OPTIONS: dict[str, Any] = {"circuit_breaker": None, "quarantine": None, "predict": None}

#: What ``options()`` accepts besides the policy keywords.
CALL_OPTIONS = ("priority", "weight", "tags")

_WEIGHTS = {w.value: w for w in TaskWeight}
_INDEX_WEIGHT = {i: w for w, i in WEIGHT_INDEX.items()}
_SPEED_INDEX = {name: i for i, name in enumerate(STORAGE_SPEEDS)}
_INDEX_SPEED = {i: name for name, i in _SPEED_INDEX.items()}


def _number(name: str, value: object, unit: str = "seconds") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise InvalidOption(f"{name} must be a number of {unit}, got {value!r}")
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _seconds(name: str, value: object, *, allow_zero: bool) -> float | None:
    """A duration option: None (no limit), or seconds > 0 (>= 0 with ``allow_zero``);
    an infinite value means no limit."""
    if value is None:
        return None
    s = _number(name, value)
    if s < 0 or (s == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigurationError(
            f"{name} must be a number of seconds {bound} or None, got {value!r}"
        )
    return None if s == math.inf else s


def _count(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidOption(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ConfigurationError(f"{name} must be >= {low}, got {value}")
    if value > 2**31:
        raise ConfigurationError(f"{name} must be <= {2**31}, got {value}")
    return value


def parse_priority(value: object) -> int:
    """The lane index of a priority name (high, normal, low; any case)."""
    if isinstance(value, str) and value.lower() in PRIORITIES:
        return PRIORITIES[value.lower()]
    raise ConfigurationError(
        f"priority must be one of 'high', 'normal', 'low' (any case), got {value!r}"
    )


def parse_weight(value: object, what: str = "weight") -> TaskWeight:
    if isinstance(value, TaskWeight):
        return value
    if isinstance(value, str) and value.lower() in _WEIGHTS:
        return _WEIGHTS[value.lower()]
    raise InvalidTag(f"{what} must be one of 'light', 'medium', 'heavy' (any case), got {value!r}")


def _retry_on(value: object) -> tuple[type[BaseException], ...] | None:
    if value is None:
        return None
    items = value if isinstance(value, tuple) else (value,)
    if not items:
        raise ConfigurationError("retry_on must name at least one exception class, got ()")
    for item in items:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise InvalidOption(
                "retry_on must be an exception class or a tuple of them (e.g. "
                f"(ConnectionError, TokenTimeout)), got {item!r}"
            )
    return tuple(items)


def normalize(options: Mapping[str, Any], also_valid: tuple[str, ...] = ()) -> dict[str, Any]:
    """Checks the policy keywords in ``options`` and returns them as the core takes them
    (unknown names raise :class:`InvalidOption` listing the valid ones: the policy keywords
    and ``also_valid``, the caller's own)."""
    unknown = sorted(set(options) - set(POLICY_OPTIONS) - set(GUARD_OPTIONS))
    if unknown:
        raise InvalidOption(
            f"unknown option(s) {', '.join(map(repr, unknown))}; valid: "
            f"{', '.join(sorted((*also_valid, *POLICY_OPTIONS, *GUARD_OPTIONS)))}"
        )
    o = {**POLICY_OPTIONS, **GUARD_OPTIONS, **options}
    out: dict[str, Any] = {}
    from ..guard.breaker import guard_settings

    out["guard"] = guard_settings(o["circuit_breaker"], o["quarantine"], o["predict"])
    out["timeout"] = _seconds("timeout", o["timeout"], allow_zero=False)
    out["retries"] = _count("retries", o["retries"], 0)
    backoff = _seconds("retry_backoff", o["retry_backoff"], allow_zero=True)
    out["retry_backoff"] = 0.0 if backoff is None else backoff
    cap = _seconds("retry_backoff_max", o["retry_backoff_max"], allow_zero=True)
    if cap is not None and cap < out["retry_backoff"]:
        raise ConfigurationError(
            f"retry_backoff_max must be >= retry_backoff ({out['retry_backoff']}), got {cap}"
        )
    out["retry_backoff_max"] = cap
    if not isinstance(o["retry_jitter"], bool):
        raise InvalidOption(f"retry_jitter must be True or False, got {o['retry_jitter']!r}")
    out["retry_jitter"] = o["retry_jitter"]
    if not isinstance(o["copy_context"], bool):
        raise InvalidOption(f"copy_context must be True or False, got {o['copy_context']!r}")
    out["copy_context"] = o["copy_context"]
    retry_on = _retry_on(o["retry_on"])
    out["retry_on"] = retry_on
    out["retry_timeouts"] = retry_on is not None and any(
        issubclass(TokenTimeout, c) and c is not BaseException and c is not Exception
        for c in retry_on
    )
    out["retry_budget"] = _seconds("retry_budget", o["retry_budget"], allow_zero=False)
    if o["on_exhausted"] is not None and not callable(o["on_exhausted"]):
        raise InvalidOption(f"on_exhausted must be callable or None, got {o['on_exhausted']!r}")
    out["on_exhausted"] = o["on_exhausted"]
    mc = o["max_concurrency"]
    out["max_concurrency"] = None if mc is None else _count("max_concurrency", mc, 1)
    rate = o["rate_limit"]
    if rate is not None:
        r = _number("rate_limit", rate, "tokens per second")
        if not (0 < r < math.inf):
            raise ConfigurationError(
                f"rate_limit must be a number of tokens per second > 0, got {rate!r}"
            )
        rate = r
    out["rate_limit"] = rate
    burst = o["rate_burst"]
    if burst is not None:
        if rate is None:
            raise ConfigurationError("rate_burst needs rate_limit (tokens per second)")
        burst = _count("rate_burst", burst, 1)
    out["rate_burst"] = burst
    by = o["limit_by"]
    if by is not None:
        if not isinstance(by, str) or not by:
            raise InvalidOption(f"limit_by must be the name of a tag (a str), got {by!r}")
        if mc is None and rate is None:
            raise ConfigurationError("limit_by needs max_concurrency or rate_limit")
    out["limit_by"] = by
    return out


def with_options(fn: GuardedFunction, options: Mapping[str, Any] | None) -> GuardedFunction:
    """``fn.options(**options)``: a guarded function like ``fn`` whose calls use ``options``
    (``priority``, ``weight``, ``tags`` (merged into the function's), and the policy keywords
    of :func:`task_token_guard`)."""
    from ..decorator import _validate_tags

    options = dict(options or {})
    # What it is made from, for pickling: the decorated function and every option on top.
    root = getattr(fn, "_tg_base", None) or fn
    chained = {**getattr(fn, "_tg_options", {}), **options}
    s: dict[str, Any] = fn._settings()
    policy = {k: s[k] for k in POLICY_OPTIONS if k in s}
    policy.update(getattr(fn, "_tg_guard_options", {}))
    spike_check = s["spike_check"]
    for key in ("circuit_breaker", "predict"):
        if key in options:
            raise InvalidOption(
                f"options({key}=...) is not a per-call option: it belongs to the operation; set "
                f"it with task_token_guard({key}=...) or coordinator.guard_house.configure()"
            )
    if "quarantine" in options:
        # Per call, quarantine=False only skips the spike check (a released quarantined call);
        # the operation's own settings belong to the decorator and guard_house.configure().
        if options.pop("quarantine") is not False:
            raise InvalidOption(
                "options(quarantine=...) only accepts False (these calls skip the spike "
                "check); set an operation's quarantine with task_token_guard(quarantine=...) "
                "or coordinator.guard_house.configure()"
            )
        spike_check = False
    weight = _INDEX_WEIGHT[s["weight"]]
    speed = None if s["storage_speed"] is None else _INDEX_SPEED[s["storage_speed"]]
    tags = dict(s["tags"] or {})
    priority = s["priority"]
    if "tags" in options:
        extra = options.pop("tags")
        if extra is not None and not isinstance(extra, Mapping):
            raise InvalidTag(f"tags must be a dict (or None), got {type(extra).__name__}")
        merged = {**tags, **(extra or {})}
        tags, weight, storage = _validate_tags(merged)
        speed = None if storage is None else storage[0]
    if "weight" in options:
        weight = parse_weight(options.pop("weight"))
        tags["weight"] = weight.value
    if "priority" in options:
        priority = parse_priority(options.pop("priority"))
    policy.update(options)  # (retry_timeouts is not among them: derived from retry_on again)
    clean = normalize(policy, also_valid=CALL_OPTIONS)
    made = build(
        s["func"],
        s["operation_type"],
        weight,
        priority,
        speed,
        tags,
        clean,
        wraps=fn,
        guard_options={k: policy[k] for k in GUARD_OPTIONS if k in policy},
        spike_check=spike_check,
        complexity=s["complexity"],
    )
    made._tg_base = root  # type: ignore[attr-defined]
    made._tg_options = chained  # type: ignore[attr-defined]
    return made


def build(
    func: Callable[..., Any],
    name: str,
    weight: TaskWeight,
    priority: int,
    speed: str | None,
    tags: dict[str, Any],
    policy: Mapping[str, Any],
    wraps: object,
    guard_options: Mapping[str, Any] | None = None,
    spike_check: bool = True,
    complexity: float | None = None,
) -> GuardedFunction:
    """The core's guarded function for validated settings.

    It is made with the cyclic garbage collector paused: PyO3 (0.30) tracks a
    ``#[pyclass(dict)]`` object for the collector before its Rust fields are written and
    allocates its ``__dict__`` in between, so a collection at that moment would traverse
    fields that do not exist yet (a crash). Nothing else runs meanwhile (the GIL is held).

    ``guard_options`` are the Guard House keywords as given (kept for ``options()``); the
    code inspector scores ``func`` here, once per function.
    """
    if complexity is None:
        from ..guard.inspector import score_of

        complexity = score_of(func)
    enabled = gc.isenabled()
    gc.disable()
    try:
        guarded = GuardedFunction(
            func,
            name,
            WEIGHT_INDEX[weight],
            priority,
            None if speed is None else _SPEED_INDEX[speed],
            tags,
            **policy,
            complexity=complexity,
            spike_check=spike_check,
        )
    finally:
        if enabled:
            gc.enable()
    functools.update_wrapper(guarded, wraps)  # type: ignore[arg-type]
    guarded._tg_guard_options = dict(guard_options or {})  # type: ignore[attr-defined]
    for copied in ("_tg_base", "_tg_options"):  # (only options() sets them, for pickling)
        guarded.__dict__.pop(copied, None)
    return guarded
