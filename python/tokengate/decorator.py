"""``@task_token_guard``: every call of the decorated function becomes a ``TaskToken``."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, overload

from ._core import GuardedFunction
from ._types import STORAGE_SPEEDS, TaskWeight
from .errors import InvalidDecoration, InvalidTag
from .guard.breaker import CircuitBreaker, Quarantine
from .policy import options as _options

__all__ = ["GuardedFunction", "task_token_guard"]


def _parse_weight(value: object) -> TaskWeight:
    return _options.parse_weight(value, "tags['weight']")


def _parse_storage(value: object) -> tuple[str, int] | None:
    if value is None:
        return None
    if isinstance(value, str) and value.upper() in STORAGE_SPEEDS:
        name = value.upper()
        return name, STORAGE_SPEEDS[name]
    valid = ", ".join(repr(k) for k in STORAGE_SPEEDS)
    raise InvalidTag(f"tags['storage_speed'] must be one of {valid} (any case), got {value!r}")


_parse_priority = _options.parse_priority


def _validate_tags(tags: object) -> tuple[dict[str, Any], TaskWeight, tuple[str, int] | None]:
    if tags is None:
        tags = {}
    if not isinstance(tags, Mapping):
        raise InvalidTag(f"tags must be a dict (or None), got {type(tags).__name__}")
    for key in tags:
        if not isinstance(key, str):
            raise InvalidTag(f"tag names must be strings, got {key!r}")
    clean = dict(tags)
    weight = _parse_weight(clean.get("weight", "medium"))
    storage = _parse_storage(clean.get("storage_speed"))
    clean["weight"] = weight.value
    if storage is not None:
        clean["storage_speed"] = storage[0]
    return clean, weight, storage


def _name_of(fn: object) -> str:
    """The name a callable goes by: its ``__qualname__``, else its ``__name__`` (the first that
    is a non-blank str), else, when it has neither attribute, its type's name. A callable whose
    name attributes exist but none is a usable str is refused: name the operation instead."""
    odd = []
    for attr in ("__qualname__", "__name__"):
        name = getattr(fn, attr, None)
        if isinstance(name, str) and name.strip():
            return name
        if name is not None or attr in getattr(fn, "__dict__", {}):
            odd.append(f"{attr}={name!r}")
    if odd:
        raise InvalidDecoration(
            f"task_token_guard cannot name {type(fn).__name__!r} ({', '.join(odd)}: not a "
            "non-blank str): pass operation_type='...'"
        )
    return type(fn).__name__


def _coroutine_target(fn: object) -> object | None:
    """The coroutine (or async generator) function that calling ``fn`` would run instead of
    doing the work, if any: ``fn`` itself when it is an ``async def`` function or method, the
    function inside a ``functools.partial``, or an object's ``async def __call__``."""
    inner = fn
    while isinstance(inner, functools.partial):
        inner = inner.func
    if inspect.iscoroutinefunction(inner) or inspect.isasyncgenfunction(inner):
        return inner
    if inspect.isroutine(inner) or isinstance(inner, type):
        return None
    call = inspect.getattr_static(type(inner), "__call__", None)
    if inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call):
        return call
    return None


def _guard(
    fn: Callable[..., Any],
    operation_type: str | None,
    tags: dict[str, Any],
    weight: TaskWeight,
    storage: tuple[str, int] | None,
    priority: int,
    policy: dict[str, Any],
    guard_options: Mapping[str, Any] | None = None,
) -> GuardedFunction:
    if isinstance(fn, (staticmethod, classmethod)):
        raise InvalidDecoration(
            "apply @task_token_guard below @staticmethod/@classmethod, directly on the function"
        )
    target = _coroutine_target(fn)
    if target is not None:
        raise InvalidDecoration(
            f"task_token_guard cannot guard the coroutine function {_name_of(target)!r}: "
            "tokens run on worker threads, so decorate a plain `def` (await the token instead)"
        )
    if not callable(fn):
        raise InvalidDecoration(f"task_token_guard needs a function, got {type(fn).__name__}")
    name = operation_type or _name_of(fn)
    return _options.build(
        fn,
        name,
        weight,
        priority,
        None if storage is None else storage[0],
        tags,
        policy,
        fn,
        guard_options=guard_options,
    )


def _chain_target(fn: object, options: Mapping[str, Any] | None) -> GuardedFunction:
    """What ``token.then(fn, **options)`` runs: ``fn`` itself if it is a guarded function
    (with ``options`` applied), else ``fn`` guarded on the spot (weight medium unless
    ``options`` say otherwise)."""
    if isinstance(fn, GuardedFunction):
        return fn.options(**options) if options else fn
    if not callable(fn):
        raise InvalidDecoration(f"then() needs a callable, got {type(fn).__name__}")
    base = _guard(
        fn, None, {"weight": "medium"}, TaskWeight.MEDIUM, None, 1, _options.normalize({})
    )  # type: ignore[arg-type]
    return base.options(**options) if options else base


@overload
def task_token_guard(
    operation_type: Callable[..., Any],
    tags: None = None,
    *,
    priority: str = "normal",
    timeout: float | None = None,
    retries: int = 0,
    retry_backoff: float = 0.0,
    retry_backoff_max: float | None = None,
    retry_jitter: bool = True,
    retry_on: type[BaseException] | tuple[type[BaseException], ...] | None = None,
    retry_budget: float | None = None,
    on_exhausted: Callable[[Any], object] | None = None,
    max_concurrency: int | None = None,
    rate_limit: float | None = None,
    rate_burst: int | None = None,
    limit_by: str | None = None,
    circuit_breaker: bool | CircuitBreaker | None = None,
    quarantine: bool | Quarantine | None = None,
    predict: bool | None = None,
    copy_context: bool = True,
) -> GuardedFunction: ...


@overload
def task_token_guard(
    operation_type: str | None = None,
    tags: Mapping[str, Any] | None = None,
    *,
    priority: str = "normal",
    timeout: float | None = None,
    retries: int = 0,
    retry_backoff: float = 0.0,
    retry_backoff_max: float | None = None,
    retry_jitter: bool = True,
    retry_on: type[BaseException] | tuple[type[BaseException], ...] | None = None,
    retry_budget: float | None = None,
    on_exhausted: Callable[[Any], object] | None = None,
    max_concurrency: int | None = None,
    rate_limit: float | None = None,
    rate_burst: int | None = None,
    limit_by: str | None = None,
    circuit_breaker: bool | CircuitBreaker | None = None,
    quarantine: bool | Quarantine | None = None,
    predict: bool | None = None,
    copy_context: bool = True,
) -> Callable[[Callable[..., Any]], GuardedFunction]: ...


def task_token_guard(
    operation_type: str | Callable[..., Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    *,
    priority: str = "normal",
    **policy: Any,
) -> GuardedFunction | Callable[[Callable[..., Any]], GuardedFunction]:
    """Turn every call of the decorated function into a :class:`TaskToken`.

    ``operation_type`` names the operation (default: the function's ``__qualname__``).
    ``tags`` may hold ``weight`` (``light``/``medium``/``heavy``, default ``medium``) and
    ``storage_speed`` (``SLOW``/``MODERATE``/``FAST``/``INSANE``), both case-insensitive,
    plus any free-form keys (kept as metadata). Invalid values raise :class:`InvalidTag`
    here, at decoration time.

    ``priority`` (keyword-only: ``high``/``normal``/``low``, case-insensitive, default
    ``normal``) picks the queue lane of the tokens; an invalid value raises
    :class:`ConfigurationError`.

    Execution policy (keyword-only, see docs/policy.md): ``timeout`` (seconds per attempt),
    ``retries``, ``retry_backoff``, ``retry_backoff_max``, ``retry_jitter``, ``retry_on``,
    ``retry_budget``, ``on_exhausted``, ``max_concurrency``, ``rate_limit``, ``rate_burst``,
    ``limit_by``. Bad values raise :class:`ConfigurationError` (a ``ValueError``) and bad
    types :class:`InvalidOption` (a ``TypeError``) here. ``fn.options(...)`` sets any of
    them, and ``weight``, ``priority`` and ``tags``, for the calls made through it.

    Guard House (keyword-only, see docs/guard-house.md): ``circuit_breaker`` (True or a
    :class:`CircuitBreaker`: the operation's breaker trips by itself; False: only an
    operator's buttons), ``quarantine`` (True or a :class:`Quarantine`: calls predicted to
    cost far above the operation's baseline are quarantined instead of run), ``predict``
    (tokens get a ``predicted_duration`` without quarantine). Without them the operation
    gets the coordinator's settings (passive by default: observed, never blocked).

    ``copy_context`` (keyword-only, default True): each call runs in a copy of the caller's
    :mod:`contextvars` context, as :func:`asyncio.to_thread` does (request ids, the current
    OpenTelemetry span and any ``ContextVar`` reach the task; what the task sets stays in its
    copy). ``False`` runs it in the worker thread's own context instead (see
    docs/observability.md for what that saves).

    Usable as ``@task_token_guard`` or
    ``@task_token_guard(operation_type=..., tags=..., priority=...)``.
    """
    lane = _parse_priority(priority)
    clean_policy = _options.normalize(policy, also_valid=("priority",))
    guard = {k: policy[k] for k in _options.GUARD_OPTIONS if k in policy}
    if isinstance(operation_type, (staticmethod, classmethod)) or (
        callable(operation_type) and not isinstance(operation_type, str)
    ):
        # The bare form, @task_token_guard. (A classmethod object is not callable, but it
        # means the decorator was put above @classmethod; _guard says so.)
        clean, weight, storage = _validate_tags(tags)
        return _guard(operation_type, None, clean, weight, storage, lane, clean_policy, guard)
    if operation_type is not None and (
        not isinstance(operation_type, str) or not operation_type.strip()
    ):
        raise InvalidTag(
            f"operation_type must be a non-empty string or None, got {operation_type!r}"
        )
    clean, weight, storage = _validate_tags(tags)

    def decorate(fn: Callable[..., Any]) -> GuardedFunction:
        return _guard(fn, operation_type, clean, weight, storage, lane, clean_policy, guard)

    return decorate
