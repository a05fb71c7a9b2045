"""The control actions of the dashboard: who may do what, parameter checks, and the calls on
the coordinator.

:meth:`Controls.run` never raises for a client's mistake: it returns an :class:`Outcome`
(``ok``, ``refused`` for a role that may not, ``invalid`` for bad parameters, ``failed`` when
the coordinator could not do it). Parameters are checked (types, ranges, lengths) before the
coordinator is called; every value comes from JSON sent by a browser.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ..errors import (
    ConfigurationError,
    CoordinatorNotRunning,
    InvalidOption,
    InvalidTag,
    TokenGateError,
)
from .auth import ROLES, role_at_least

if TYPE_CHECKING:
    from ..coordinator import OperationsCoordinator

__all__ = ["ACTIONS", "Controls", "Outcome", "actions_for", "launchables_of"]

log = logging.getLogger("tokengate.dashboard")

#: Each action and the weakest role that may take it.
ACTIONS: Final[dict[str, str]] = {
    "drain": "operator",
    "resume": "operator",
    "pause": "operator",
    "kill": "operator",
    "reprioritize": "operator",
    "reroute": "operator",
    "block": "operator",
    "unblock": "operator",
    "force_open": "operator",
    "quarantine_preview": "operator",
    "quarantine_release": "operator",
    "quarantine_discard": "operator",
    "set_limit": "admin",
    "launch": "admin",
}

MAX_STR: Final = 200
MAX_IDS: Final = 1000
MAX_ARGS: Final = 64
#: Records listed in a quarantine action's result (``selected_count`` says how many matched).
MAX_SELECTED: Final = 500
_MAX_INT: Final = 2**63 - 1
#: How long the drain waiter waits at a time before it looks whether the drain still runs.
_DRAIN_SLICE: Final = 0.5


def actions_for(role: str) -> list[str]:
    """The actions ``role`` may take, in :data:`ACTIONS` order."""
    if role not in ROLES:
        return []
    return [name for name, needed in ACTIONS.items() if role_at_least(role, needed)]


@dataclass(frozen=True)
class Outcome:
    """What a control did: ``outcome`` (ok, refused, invalid, failed), a message for the
    operator, a JSON-ready ``result``, and the ``target`` the audit record names."""

    outcome: str
    message: str
    result: Any = None
    target: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    def ack(self) -> dict[str, Any]:
        """The ``control`` event's acknowledgement."""
        return {
            "ok": self.ok,
            "outcome": self.outcome,
            "message": self.message,
            "result": self.result,
        }


class _Invalid(Exception):
    pass


# -- parameter checks ---------------------------------------------------------------------


def _token_id(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _MAX_INT:
        raise _Invalid(f"{name} must be a token id (an int >= 0), got {_show(v)}")
    return v


def _text(name: str, v: object) -> str:
    if not isinstance(v, str) or not v:
        raise _Invalid(f"{name} must be a non-empty string, got {_show(v)}")
    if len(v) > MAX_STR:
        raise _Invalid(f"{name} must be at most {MAX_STR} characters, got {len(v)}")
    return v


def _opt_text(name: str, v: object) -> str | None:
    return None if v is None else _text(name, v)


def _choice(name: str, choices: tuple[str, ...]) -> Callable[[str, object], str]:
    def check(_: str, v: object) -> str:
        if not isinstance(v, str) or v.lower() not in choices:
            raise _Invalid(f"{name} must be one of {', '.join(choices)}, got {_show(v)}")
        return v.lower()

    return check


def _opt_count(name: str, v: object) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1_000_000_000:
        raise _Invalid(f"{name} must be an int >= 1 or null, got {_show(v)}")
    return v


def _opt_number(name: str, v: object) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _Invalid(f"{name} must be a number or null, got {_show(v)}")
    return float(v)


def _opt_rate(name: str, v: object) -> float | None:
    value = _opt_number(name, v)
    if value is not None and value <= 0:
        raise _Invalid(f"{name} must be > 0 or null, got {_show(v)}")
    return value


def _opt_time(name: str, v: object) -> float | None:
    value = _opt_number(name, v)
    if value is not None and value < 0:
        raise _Invalid(f"{name} must be a UNIX time (>= 0) or null, got {_show(v)}")
    return value


def _flag(name: str, v: object) -> bool:
    if not isinstance(v, bool):
        raise _Invalid(f"{name} must be true or false, got {_show(v)}")
    return v


def _record_ids(name: str, v: object) -> list[str] | None:
    if v is None:
        return None
    if not isinstance(v, list):
        raise _Invalid(f"{name} must be a list of record ids or null, got {_show(v)}")
    if len(v) > MAX_IDS:
        raise _Invalid(f"{name} may name at most {MAX_IDS} records, got {len(v)}")
    return [_text(f"{name}[{i}]", x) for i, x in enumerate(v)]


def _args(name: str, v: object) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise _Invalid(f"{name} must be a list, got {_show(v)}")
    if len(v) > MAX_ARGS:
        raise _Invalid(f"{name} may hold at most {MAX_ARGS} values, got {len(v)}")
    return v


def _kwargs(name: str, v: object) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _Invalid(f"{name} must be an object, got {_show(v)}")
    if len(v) > MAX_ARGS:
        raise _Invalid(f"{name} may hold at most {MAX_ARGS} values, got {len(v)}")
    for key in v:
        if not isinstance(key, str) or not key.isidentifier():
            raise _Invalid(f"{name} keys must be argument names, got {_show(key)}")
    return v


def _show(v: object) -> str:
    """A short description of a bad value (the client sent it; keep it short)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)[:40]
    if isinstance(v, str):
        r = repr(v)
        return r if len(r) <= 60 else r[:57] + "..."
    return (
        type(v).__name__
        if not isinstance(v, (list, dict))
        else ("a list" if isinstance(v, list) else "an object")
    )


_Check = Callable[[str, object], Any]

# action -> {param: (check, required, default)}
_PARAMS: Final[dict[str, dict[str, tuple[_Check, bool, Any]]]] = {
    "drain": {},
    "resume": {},
    "pause": {},
    "kill": {"token_id": (_token_id, True, None)},
    "reprioritize": {
        "token_id": (_token_id, True, None),
        "priority": (_choice("priority", ("high", "normal", "low")), True, None),
    },
    "reroute": {
        "token_id": (_token_id, True, None),
        "weight": (_choice("weight", ("light", "medium", "heavy")), True, None),
    },
    "block": {"operation": (_text, True, None)},
    "unblock": {"operation": (_text, True, None)},
    "force_open": {"operation": (_text, True, None)},
    "quarantine_release": {
        "record_ids": (_record_ids, False, None),
        "operation": (_opt_text, False, None),
        "since": (_opt_time, False, None),
        "until": (_opt_time, False, None),
        "dry_run": (_flag, False, False),
    },
    "set_limit": {
        "operation": (_text, True, None),
        "max_concurrency": (_opt_count, False, None),
        "rate_limit": (_opt_rate, False, None),
        "rate_burst": (_opt_count, False, None),
    },
    "launch": {
        "name": (_text, True, None),
        "args": (_args, False, None),
        "kwargs": (_kwargs, False, None),
    },
}
_PARAMS["quarantine_discard"] = _PARAMS["quarantine_release"]
_PARAMS["quarantine_preview"] = {
    k: v for k, v in _PARAMS["quarantine_release"].items() if k != "dry_run"
}


def _check_params(action: str, params: Mapping[str, Any]) -> dict[str, Any]:
    spec = _PARAMS[action]
    unknown = [k for k in params if k not in spec]
    if unknown:
        valid = ", ".join(spec) or "none"
        bad = _show(str(unknown[0]))
        raise _Invalid(f"unexpected parameter {bad} for {action}; valid: {valid}")
    out: dict[str, Any] = {}
    for name, (check, required, default) in spec.items():
        if name not in params:
            if required:
                raise _Invalid(f"{action} needs the parameter {name}")
            out[name] = check(name, default) if default is not None else None
            continue
        out[name] = check(name, params[name])
    return out


def launchables_of(coordinator: OperationsCoordinator) -> list[dict[str, str]]:
    """The coordinator's launchable functions as ``{"name", "signature", "doc"}`` (the first
    line of the docstring), sorted by name."""
    out = []
    for name, fn in sorted(coordinator.launchables().items()):
        target = getattr(fn, "__wrapped__", fn)
        signature = _signature(target)
        doc = inspect.getdoc(target) or ""
        out.append({"name": name, "signature": signature, "doc": doc.strip().split("\n")[0]})
    return out


def _signature(fn: Callable[..., Any]) -> str:
    """How to call ``fn``, e.g. ``(n: int, label: str = 'x')`` (string annotations evaluated
    when they can be; no return annotation)."""
    try:
        try:
            sig = inspect.signature(fn, eval_str=True)
        except Exception:  # an annotation that does not evaluate: keep it as written
            sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return "(...)"
    return str(sig.replace(return_annotation=inspect.Signature.empty))


def _record_summary(record: Any) -> dict[str, Any]:
    return {
        "record_id": record.record_id,
        "token_id": record.token_id,
        "operation": record.operation_type,
        "quarantined_at": record.quarantined_at,
        "reason": record.reason,
        "argument_summary": record.argument_summary,
        "replayable": record.replayable,
    }


class Controls:
    """Runs control actions on ``coordinator`` (see :data:`ACTIONS`).

    Args:
        coordinator: the coordinator to steer.
        on_quarantine_change: called after a quarantine action touched the store (so the
            snapshot re-reads it).
    """

    def __init__(
        self,
        coordinator: OperationsCoordinator,
        on_quarantine_change: Callable[[], None] | None = None,
    ) -> None:
        self._coord = coordinator
        self._on_quarantine_change = on_quarantine_change
        self._lock = threading.Lock()
        self._drain_thread: threading.Thread | None = None
        self._stop_waiting = threading.Event()
        self._closed = False

    def run(self, action: object, role: str, params: Mapping[str, Any]) -> Outcome:
        """Takes ``action`` for a user of ``role`` with ``params`` (JSON values)."""
        if not isinstance(action, str) or action not in ACTIONS:
            return Outcome(
                "invalid",
                f"unknown action {_show(action)}; valid: {', '.join(ACTIONS)}",
            )
        needed = ACTIONS[action]
        if role not in ROLES or not role_at_least(role, needed):
            return Outcome(
                "refused",
                f"{action} needs the {needed} role; you are {role}",
                target=_target(action, params) if isinstance(params, Mapping) else None,
            )
        try:
            clean = _check_params(action, params)
        except _Invalid as exc:
            return Outcome("invalid", str(exc), target=_target(action, params))
        target = _target(action, clean)
        try:
            outcome = getattr(self, f"_do_{action}")(**clean)
        except _Invalid as exc:
            return Outcome("invalid", str(exc), target=target)
        except (ConfigurationError, InvalidOption, InvalidTag) as exc:  # the coordinator said no
            return Outcome("invalid", str(exc), target=target)
        except CoordinatorNotRunning as exc:
            return Outcome("failed", f"the coordinator is not running: {exc}", target=target)
        except TokenGateError as exc:
            return Outcome("failed", f"{type(exc).__name__}: {exc}", target=target)
        except Exception as exc:
            log.exception("dashboard action %s failed", action)
            return Outcome("failed", f"internal error ({type(exc).__name__})", target=target)
        if outcome.target is None and target is not None:
            outcome = Outcome(outcome.outcome, outcome.message, outcome.result, target)
        return outcome

    def close(self, timeout: float = 1.0) -> None:
        """Stops the drain waiter (it returns within one of its slices)."""
        with self._lock:
            self._closed = True
            thread, self._drain_thread = self._drain_thread, None
        self._stop_waiting.set()
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():  # pragma: no cover - wait_idle slices are short
                log.warning("the dashboard's drain waiter did not stop within %s s", timeout)

    # -- the actions --------------------------------------------------------------------

    def _do_drain(self) -> Outcome:
        # Closes admission now (and un-pauses) without waiting; one waiter thread logs when
        # the tokens in flight are done, so the operator gets an answer at once.
        first = self._coord.drain(timeout=0)
        n = int(first["remaining"])
        if n:
            with self._lock:
                if not self._closed and (
                    self._drain_thread is None or not self._drain_thread.is_alive()
                ):
                    self._drain_thread = threading.Thread(
                        target=self._wait_drained, name="tokengate-dashboard-drain", daemon=True
                    )
                    self._drain_thread.start()
        return Outcome(
            "ok",
            f"draining: admission closed, {n} in flight",
            {"in_flight": n},
        )

    def _wait_drained(self) -> None:
        """Waits, in slices, until the drain is over: the tokens are done (logged), or
        admission reopened (a resume ended the drain), or the dashboard closes."""
        started = time.monotonic()
        while not self._stop_waiting.is_set():
            try:
                if self._coord.wait_idle(_DRAIN_SLICE):
                    log.info("dashboard drain finished in %.1f s", time.monotonic() - started)
                    return
                if self._coord.admission_open:
                    return  # resumed: no longer a drain
            except TokenGateError as exc:
                log.info("dashboard drain ended early: %s", exc)
                return

    def _do_pause(self) -> Outcome:
        self._coord.pause()
        return Outcome("ok", "paused: new tokens wait in the pool")

    def _do_resume(self) -> Outcome:
        self._coord.resume()
        return Outcome("ok", "resumed: admission open")

    def _do_kill(self, token_id: int) -> Outcome:
        if not self._coord.kill(token_id):
            return Outcome("failed", f"token {token_id} is not queued here")
        return Outcome("ok", f"token {token_id} killed")

    def _do_reprioritize(self, token_id: int, priority: str) -> Outcome:
        if not self._coord.reprioritize(token_id, priority):
            return Outcome("failed", f"token {token_id} is not queued here")
        return Outcome("ok", f"token {token_id} moved to the {priority} lane")

    def _do_reroute(self, token_id: int, weight: str) -> Outcome:
        if not self._coord.reroute(token_id, weight):
            return Outcome("failed", f"token {token_id} is not queued here")
        return Outcome("ok", f"token {token_id} routed as {weight}")

    def _do_block(self, operation: str) -> Outcome:
        state = self._coord.guard_house.block(operation)
        return Outcome("ok", f"{operation} blocked (breaker {state})", {"breaker_state": state})

    def _do_unblock(self, operation: str) -> Outcome:
        state = self._coord.guard_house.unblock(operation)
        return Outcome("ok", f"{operation} unblocked (breaker {state})", {"breaker_state": state})

    def _do_force_open(self, operation: str) -> Outcome:
        state = self._coord.guard_house.force_open(operation)
        return Outcome("ok", f"{operation} breaker forced open ({state})", {"breaker_state": state})

    def _quarantine(
        self,
        verb: str,
        record_ids: list[str] | None,
        operation: str | None,
        since: float | None,
        until: float | None,
        dry_run: bool,
    ) -> Outcome:
        if record_ids is None and operation is None and since is None and until is None:
            raise _Invalid("give record ids or a filter (operation, since, until)")
        if since is not None and until is not None and since >= until:
            raise _Invalid("since must be before until")
        gh = self._coord.guard_house
        fn = gh.release if verb == "release" else gh.discard
        res = fn(record_ids, operation=operation, since=since, until=until, dry_run=dry_run)
        if not dry_run and self._on_quarantine_change is not None:
            self._on_quarantine_change()
        selected = [_record_summary(r) for r in res.selected[:MAX_SELECTED]]
        result = {
            "selected": selected,
            "selected_count": len(res.selected),
            "done": list(res.done),
            "failed": dict(res.failed),
            "dry_run": dry_run,
        }
        done, failed = len(res.done), len(res.failed)
        past = {"release": "released", "discard": "discarded"}[verb]
        if dry_run:
            message = f"dry run: would {verb} {done}, {failed} could not be"
        else:
            message = f"{past} {done}, {failed} failed"
        if res.failed:
            first = list(res.failed.items())[:3]
            message += ": " + "; ".join(f"{rid}: {why}" for rid, why in first)
            if len(res.failed) > len(first):
                message += f"; and {len(res.failed) - len(first)} more"
        if len(res.selected) > MAX_SELECTED:
            message += f" ({len(res.selected)} matched; the first {MAX_SELECTED} are listed)"
        if not res.selected:
            message = f"{'dry run: ' if dry_run else ''}no quarantined record matches"
        outcome = "failed" if (failed and not done and not dry_run) else "ok"
        return Outcome(outcome, message, result)

    def _do_quarantine_preview(self, **kw: Any) -> Outcome:
        """What a release or discard of this selection would touch (nothing changes)."""
        outcome = self._quarantine("discard", dry_run=True, **kw)
        n = outcome.result["selected_count"] if isinstance(outcome.result, dict) else 0
        shown = min(n, MAX_SELECTED)
        message = f"preview: {n} record{'s' if n != 1 else ''} match"
        if n > shown:
            message += f"; the oldest {shown} are listed, and an action on them touches those"
        return Outcome(outcome.outcome, message, outcome.result)

    def _do_quarantine_release(self, **kw: Any) -> Outcome:
        return self._quarantine("release", **kw)

    def _do_quarantine_discard(self, **kw: Any) -> Outcome:
        return self._quarantine("discard", **kw)

    def _do_set_limit(
        self,
        operation: str,
        max_concurrency: int | None,
        rate_limit: float | None,
        rate_burst: int | None,
    ) -> Outcome:
        if rate_burst is not None and rate_limit is None:
            raise _Invalid("rate_burst needs rate_limit")
        self._coord.set_limit(
            operation,
            max_concurrency=max_concurrency,
            rate_limit=rate_limit,
            rate_burst=rate_burst,
        )
        limit = {
            "max_concurrency": max_concurrency,
            "rate_limit": rate_limit,
            "rate_burst": rate_burst,
        }
        if max_concurrency is None and rate_limit is None:
            return Outcome("ok", f"{operation} runs unlimited", limit)
        parts = []
        if max_concurrency is not None:
            parts.append(f"at most {max_concurrency} at once")
        if rate_limit is not None:
            parts.append(f"{rate_limit:g}/s" + (f" (burst {rate_burst})" if rate_burst else ""))
        return Outcome("ok", f"{operation} limited to {', '.join(parts)}", limit)

    def _do_launch(
        self, name: str, args: list[Any] | None, kwargs: dict[str, Any] | None
    ) -> Outcome:
        args, kwargs = args or [], kwargs or {}
        token = self._coord.launch(name, args=tuple(args), kwargs=kwargs)
        call = ", ".join([_json(a) for a in args] + [f"{k}={_json(v)}" for k, v in kwargs.items()])
        if len(call) > 400:
            call = call[:399] + "…"
        return Outcome(
            "ok",
            f"launched {name}({call}) as token {token.token_id}",
            {"token_id": token.token_id},
        )


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=repr)


def _target(action: str, params: Mapping[str, Any]) -> str | None:
    """What the audit record names as the action's target."""
    for key in ("token_id", "operation", "name"):
        value = params.get(key)
        if value is not None and not isinstance(value, (dict, list)):
            return str(value)[:MAX_STR]
    ids = params.get("record_ids")
    if isinstance(ids, list) and ids:
        return ", ".join(str(i) for i in ids[:10])[:MAX_STR] + (" ..." if len(ids) > 10 else "")
    return None
