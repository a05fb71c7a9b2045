"""Finding tokens that a test left in flight, and describing them."""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from typing import Any

from .._core import TaskToken
from .._core import monotonic as monotonic
from .._types import TokenState

__all__ = ["describe_tokens", "monotonic", "settle", "unresolved_tokens"]

#: How many tokens a message lists before it says "and N more".
_LIST_AT_MOST = 20
#: After the grace period, how long stop(wait=False) may wait for tokens still executing.
_STOP_AT_MOST = 1.0


def unresolved_tokens(since: float | None = None) -> list[TaskToken]:
    """Every live :class:`~tokengate.TaskToken` of this process that is not in a final state
    (COMPLETED, FAILED, KILLED), oldest first.

    ``since`` (seconds on the clock of ``TaskToken.created_at``: :func:`monotonic`) keeps
    only tokens created at or after it. Tokens are found with :func:`gc.get_objects` (a
    token is kept alive by its coordinator while it is queued or running, even if the caller
    dropped it), so this scans the whole heap: meant for test teardown, not a hot path.
    """
    found = [
        obj
        for obj in gc.get_objects()
        if type(obj) is TaskToken and not obj.done() and (since is None or obj.created_at >= since)
    ]
    found.sort(key=lambda t: (t.created_at, t.token_id))
    return found


def describe_tokens(tokens: Sequence[TaskToken], limit: int = _LIST_AT_MOST) -> str:
    """One line per token: ``#id 'operation_type' STATE on core C (worker W)``."""
    lines = []
    for tok in tokens[:limit]:
        where = ""
        if tok.core_id is not None:
            where = f" on core {tok.core_id}"
            if tok.worker_id is not None and tok.state == TokenState.EXECUTING:
                where += f" (worker {tok.worker_id})"
        lines.append(f"  #{tok.token_id} {tok.operation_type!r} {tok.state.name}{where}")
    if len(tokens) > limit:
        lines.append(f"  ... and {len(tokens) - limit} more")
    return "\n".join(lines)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _in_flight(coord: Any) -> int:
    s = coord.stats()
    return int(s["created"] - s["completed"] - s["failed"] - s["killed"])


def _wait_for_tokens(coord: Any, since: float, deadline: float) -> None:
    """Wait (admission stays open, nothing is killed) until ``coord`` has no token in flight
    or ``deadline`` passes. Tokens created meanwhile (children of running ones) are found by
    scanning again once the ones found before are final."""
    while _in_flight(coord):
        pending = unresolved_tokens(since)
        if not pending:
            return  # counted but not found (not tracked by gc): nothing to wait on
        for tok in pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            tok.wait(left)


def settle(coord: Any, since: float, timeout: float, label: str = "the test") -> str | None:
    """Stop ``coord`` (an :class:`~tokengate.OperationsCoordinator`) after a test.

    Tokens still in flight get ``timeout`` seconds to finish, as they are (admission stays
    open, a paused coordinator stays paused); the coordinator is then stopped. Returns None
    if nothing was left unresolved, else a message naming the tokens (count, ids, operation
    types, states) still in flight when ``timeout`` passed; those were killed if they had
    not started, and the ones still executing are reported as left behind on their workers.
    A coordinator the test already stopped is not checked (its ``stop()`` finished or killed
    every token).
    """
    if not coord.running:
        coord.stop()  # joins a stop() the test may have left in progress
        return None
    if timeout > 0 and _in_flight(coord):
        _wait_for_tokens(coord, since, time.monotonic() + timeout)
    remaining = _in_flight(coord)
    if remaining == 0:
        # Nothing is in flight: this returns at once (the bound is for a token that a thread
        # the test left running submits right now).
        if coord.stop(timeout=max(timeout, _STOP_AT_MOST)):
            return None
        remaining = max(_in_flight(coord), 1)
    tokens = unresolved_tokens(since)
    listing = describe_tokens(tokens)
    joined = coord.stop(wait=False, timeout=min(max(timeout, 0.1), _STOP_AT_MOST))
    running = [t for t in tokens if not t.done()]
    killed = [t for t in tokens if t.state == TokenState.KILLED]
    counted = _plural(remaining, "token")
    if len(tokens) != remaining:
        counted += f" ({len(tokens)} found and listed)"
    parts = [
        f"tokengate_coordinator: {counted} still unresolved {timeout:g} s after {label} "
        f"ended:\n{listing}"
    ]
    fate = []
    if killed:
        verb = "was" if len(killed) == 1 else "were"
        fate.append(f"{_plural(len(killed), 'token')} not yet started {verb} killed at teardown")
    if running or not joined:
        still = len(running) if running else "some"
        fate.append(
            f"{still} still executing when the coordinator stopped (their worker threads "
            "are left behind: a thread cannot be killed)"
        )
    if fate:
        parts.append("; ".join(fate) + ".")
    parts.append(
        "Wait for every token the test starts (token.get(), token.wait(), "
        "coordinator.drain()) or kill it before the test returns; override the "
        "tokengate_teardown_timeout fixture to give tokens longer to finish."
    )
    return "\n".join(parts)
