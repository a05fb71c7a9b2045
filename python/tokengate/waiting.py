"""Waiting on many tokens at once: :func:`wait`, :func:`as_completed` and :func:`gather`.

These mirror :func:`concurrent.futures.wait` and :func:`concurrent.futures.as_completed` but take
:class:`~tokengate.TaskToken` objects directly: no ``concurrent.futures.Future`` is created per
token. The ``return_when`` constants *are* ``concurrent.futures``' own, so code passing
``concurrent.futures.FIRST_COMPLETED`` works unchanged.

How a wait works (see docs/waiting.md):

* ``ALL_COMPLETED`` waits on each unfinished token in turn with the token's own native wait
  (the GIL released, no callback registered), against one overall deadline. Inside a task this
  is an ordinary TokenGate wait: a queued token is run inline (no timeout) or the worker is
  compensated (with a timeout).
* ``FIRST_COMPLETED``, ``FIRST_EXCEPTION`` and :func:`as_completed` register one cheap done
  callback per unfinished token; it records the token in a per-call waiter and notifies a
  ``threading.Condition`` only when the waiter's condition is met. Callbacks cannot be removed
  from a token, so on return the waiter is *detached*: a callback that fires later finds no
  waiter and does nothing, and what stays on a still-running token is one reference to a small
  object shared by the whole call. Inside a task the waiting thread does not sleep on the
  condition (the core would not know the worker is blocked) but in short native timed waits on
  a pending token, which the core compensates.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION
from typing import Any, NamedTuple

from . import _core
from ._core import TaskToken
from ._types import TokenState
from .errors import TokenDeadlock, TokenKilled, TokenTimeout

__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "DoneAndNotDoneTokens",
    "as_completed",
    "gather",
    "wait",
]

_RETURN_WHEN = (ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION)
#: Inside a task, the longest native wait on one pending token before the waiter looks again.
_TASK_SLICE = 0.005
_FAILED = TokenState.FAILED


class DoneAndNotDoneTokens(NamedTuple):
    """What :func:`wait` returns, like ``concurrent.futures.DoneAndNotDoneFutures``."""

    done: set[TaskToken]
    """Tokens in a final state (COMPLETED, FAILED or KILLED) when the wait returned."""
    not_done: set[TaskToken]
    """The other tokens."""


def _tokens(tokens: Iterable[TaskToken], fn: str) -> dict[TaskToken, None]:
    """The tokens, de-duplicated in first-seen order; ``TypeError`` naming a non-token."""
    if isinstance(tokens, TaskToken):
        raise TypeError(
            f"{fn}() takes an iterable of TaskTokens, got a single TaskToken: pass [token]"
        )
    try:
        items = iter(tokens)
    except TypeError:
        raise TypeError(
            f"{fn}() takes an iterable of TaskTokens, got {type(tokens).__name__}"
        ) from None
    out: dict[TaskToken, None] = {}
    for i, tok in enumerate(items):
        if type(tok) is not TaskToken:
            raise TypeError(
                f"{fn}() takes TaskTokens, got {tok!r} ({type(tok).__name__}) at position {i}"
            )
        out[tok] = None
    return out


def _deadline(timeout: float | None) -> float | None:
    """The monotonic deadline of ``timeout`` seconds from now; None for no limit.

    Like ``concurrent.futures``, a negative timeout means "do not wait"; ``math.inf`` means no
    limit, as everywhere in TokenGate.
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number of seconds or None, got {timeout!r}")
    if math.isnan(timeout):
        raise ValueError(f"timeout must be a number of seconds or None, got {timeout!r}")
    if timeout == math.inf:
        return None
    return time.monotonic() + max(float(timeout), 0.0)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


def _on_worker_thread() -> bool:
    """Whether the calling thread is a worker of a coordinator (i.e. inside a task)."""
    return _core._on_worker_thread()


def _unfinished(count: int, total: int) -> str:
    return f"{count} (of {total}) tokens unfinished"


class _Waiter:
    """The per-call state the done callbacks of one :func:`wait`/:func:`as_completed` fill."""

    __slots__ = ("_cond", "attached", "every", "finished", "first_exception", "remaining")

    def __init__(self, remaining: int, *, every: bool, first_exception: bool) -> None:
        self._cond = threading.Condition(threading.Lock())
        #: Tokens made final since registration, in finishing order, not yet taken.
        self.finished: list[TaskToken] = []
        #: Registered tokens not final yet: the wait is over when it reaches 0.
        self.remaining = remaining
        #: Wake on every token (as_completed, FIRST_COMPLETED) ...
        self.every = every
        #: ... or on a FAILED one (FIRST_EXCEPTION), else only when ``remaining`` hits 0.
        self.first_exception = first_exception
        self.attached = True

    def notify(self, token: TaskToken) -> None:
        # Runs on the thread that makes ``token`` final (a worker): cheap, never blocks for long.
        with self._cond:
            if not self.attached:
                return
            self.finished.append(token)
            self.remaining -= 1
            if (
                self.every
                or self.remaining <= 0
                or (self.first_exception and token.state == _FAILED)
            ):
                self._cond.notify()

    def _ready(self) -> bool:
        if not self.finished:
            return self.remaining <= 0
        if self.every or self.remaining <= 0:
            return True
        return self.first_exception and any(t.state == _FAILED for t in self.finished)

    def take(
        self, deadline: float | None, in_task: bool, pending: dict[TaskToken, None]
    ) -> list[TaskToken]:
        """Wait until the condition is met or ``deadline`` passes; return what finished since
        the last call (possibly nothing, on timeout) and forget it."""
        if in_task:
            self._wait_in_task(deadline, pending)
        else:
            with self._cond:
                if not self._ready():
                    self._cond.wait_for(self._ready, _left(deadline))
        with self._cond:
            out, self.finished = self.finished, []
        return out

    def _wait_in_task(self, deadline: float | None, pending: dict[TaskToken, None]) -> None:
        # A worker blocked on a Condition looks busy to the core: it is not compensated and a
        # token queued behind it might never run. Park in native timed waits instead (which the
        # core compensates), on the first pending token this task may wait on.
        refused: dict[TaskToken, TokenDeadlock] = {}
        while True:
            with self._cond:
                if self._ready():
                    return
            left = _left(deadline)
            if left is not None and left <= 0.0:
                return
            target = next((t for t in pending if t not in refused and not t.done()), None)
            if target is None:
                # Everything pending is final (its callback is about to report it) or is a
                # token this task can never see finish.
                with self._cond:
                    if self._cond.wait_for(self._ready, _TASK_SLICE):
                        return
                stuck = [refused[t] for t in pending if t in refused and not t.done()]
                if stuck and all(t.done() or t in refused for t in pending):
                    raise stuck[0]
                continue
            try:
                target.wait(_TASK_SLICE if left is None else min(_TASK_SLICE, left))
            except TokenDeadlock as exc:
                refused[target] = exc

    def detach(self) -> None:
        """Stop listening: later callbacks do nothing, and nothing taken is kept."""
        with self._cond:
            self.attached = False
            self.finished = []


class _Notify:
    """The done callback registered on each token of one call: a tiny forwarder to the waiter,
    cut when the call returns so a token that finishes later keeps nothing of it alive."""

    __slots__ = ("waiter",)

    def __init__(self, waiter: _Waiter) -> None:
        self.waiter: _Waiter | None = waiter

    def __call__(self, token: TaskToken) -> None:
        waiter = self.waiter
        if waiter is not None:
            waiter.notify(token)


def _register(notify: _Notify, pending: dict[TaskToken, None]) -> None:
    # Never under the waiter's lock: a token that became final meanwhile runs the callback
    # right here, in this thread.
    for tok in pending:
        tok.add_done_callback(notify)


def _release(waiter: _Waiter, notify: _Notify) -> None:
    notify.waiter = None
    waiter.detach()


def wait(
    tokens: Iterable[TaskToken],
    timeout: float | None = None,
    return_when: str = ALL_COMPLETED,
) -> DoneAndNotDoneTokens:
    """Wait for the tokens to finish, like :func:`concurrent.futures.wait`.

    Args:
        tokens: an iterable of :class:`~tokengate.TaskToken` (duplicates count once).
        timeout: the most seconds to wait; ``None`` (or ``math.inf``) for no limit. On timeout
            the function returns (it does not raise): ``not_done`` says what is left.
        return_when: ``ALL_COMPLETED`` (default), ``FIRST_COMPLETED`` (return when any token is
            final), or ``FIRST_EXCEPTION`` (return when a token FAILED, else like
            ``ALL_COMPLETED``). A KILLED token counts as done, not as an exception, as a
            cancelled future does in ``concurrent.futures``.

    Returns:
        ``DoneAndNotDoneTokens(done, not_done)``, a named tuple of two sets of tokens.

    Raises:
        TypeError: ``tokens`` is not an iterable of tokens (the message names the culprit), or
            ``timeout`` is not a number.
        ValueError: ``return_when`` is not one of the three constants.
        TokenDeadlock: inside a task, when waiting for every token would wait on the task's
            own token (or one that waits on it).
    """
    if return_when not in _RETURN_WHEN:
        raise ValueError(f"Invalid return condition: {return_when!r}")
    fs = _tokens(tokens, "wait")
    deadline = _deadline(timeout)
    done: set[TaskToken] = set()
    pending: dict[TaskToken, None] = {}
    for tok in fs:
        if tok.done():
            done.add(tok)
        else:
            pending[tok] = None
    if not pending:
        return DoneAndNotDoneTokens(done, set())
    if return_when == FIRST_COMPLETED and done:
        return DoneAndNotDoneTokens(done, set(pending))
    if return_when == FIRST_EXCEPTION and any(t.state == _FAILED for t in done):
        return DoneAndNotDoneTokens(done, set(pending))

    if return_when == ALL_COMPLETED:
        # One native wait per unfinished token, against one deadline: no callbacks at all.
        for tok in pending:
            left = _left(deadline)
            if left is None:
                tok.wait()
            elif not tok.wait(left):
                break
    else:
        waiter = _Waiter(
            len(pending),
            every=return_when == FIRST_COMPLETED,
            first_exception=return_when == FIRST_EXCEPTION,
        )
        notify = _Notify(waiter)
        try:
            _register(notify, pending)
            waiter.take(deadline, _on_worker_thread(), pending)
        finally:
            _release(waiter, notify)
    # Report the state at return (what the callbacks saw plus anything final since).
    for tok in pending:
        if tok.done():
            done.add(tok)
    return DoneAndNotDoneTokens(done, {t for t in pending if t not in done})


def as_completed(tokens: Iterable[TaskToken], timeout: float | None = None) -> Iterator[TaskToken]:
    """Yield each token once as it finishes, like :func:`concurrent.futures.as_completed`.

    Tokens already final come first (in the order given), then the others in the order they
    finish (COMPLETED, FAILED or KILLED). Duplicates are yielded once. The iterator keeps no
    reference to a token it has yielded.

    Args:
        tokens: an iterable of :class:`~tokengate.TaskToken`; checked when ``as_completed`` is
            called, not when iteration starts.
        timeout: the most seconds, counted from this call, until every token has been yielded;
            ``None`` (or ``math.inf``) for no limit.

    Raises:
        TypeError: ``tokens`` is not an iterable of tokens, or ``timeout`` is not a number.
        TokenTimeout: (a ``TimeoutError``) from ``next()`` when ``timeout`` passes with tokens
            unfinished: ``"{n} (of {total}) tokens unfinished"``.
    """
    fs = _tokens(tokens, "as_completed")
    deadline = _deadline(timeout)
    return _as_completed(fs, deadline)


def _split(fs: Iterable[TaskToken]) -> tuple[list[TaskToken], dict[TaskToken, None]]:
    """(tokens final now, in order; the others), each token in exactly one of them."""
    finished: list[TaskToken] = []
    pending: dict[TaskToken, None] = {}
    for tok in fs:
        if tok.done():
            finished.append(tok)
        else:
            pending[tok] = None
    return finished, pending


def _forget(pending: dict[TaskToken, None], finished: list[TaskToken]) -> None:
    for tok in finished:
        del pending[tok]


def _as_completed(fs: dict[TaskToken, None], deadline: float | None) -> Iterator[TaskToken]:
    # The generator's frame never holds a yielded token: tokens are popped from ``finished``
    # straight into ``yield`` and no loop variable outlives its helper.
    total = len(fs)
    finished, pending = _split(fs)
    del fs
    finished.reverse()
    if not pending:
        while finished:
            yield finished.pop()
        return
    # Register before yielding anything: a token finishing while the caller handles an
    # earlier one is not missed.
    waiter = _Waiter(len(pending), every=True, first_exception=False)
    notify = _Notify(waiter)
    try:
        _register(notify, pending)
        while finished:
            yield finished.pop()
        in_task = _on_worker_thread()
        while pending:
            left = _left(deadline)
            if left is not None and left <= 0.0:
                raise TokenTimeout(_unfinished(len(pending), total))
            finished = waiter.take(deadline, in_task, pending)
            _forget(pending, finished)
            finished.reverse()
            while finished:
                yield finished.pop()
    finally:
        _release(waiter, notify)


def gather(
    *tokens: TaskToken, timeout: float | None = None, return_exceptions: bool = False
) -> list[Any]:
    """Wait for the tokens and return their results in argument order (sync ``asyncio.gather``).

    Args:
        *tokens: the tokens; a token may appear more than once (its result then does too).
        timeout: the most seconds to wait for all of them; ``None`` (or ``math.inf``) for no
            limit.
        return_exceptions: if False (default) the first token in argument order that failed
            re-raises its exception (a killed one raises ``TokenKilled``), as soon as it and
            the tokens before it are final. If True, a failed token's exception (or the
            ``TokenKilled`` of a killed one) takes its place in the list.

    Raises:
        TypeError: an argument is not a token (the message names it).
        TokenTimeout: (a ``TimeoutError``) ``timeout`` passed first:
            ``"{n} (of {total}) tokens unfinished"``.
    """
    for i, tok in enumerate(tokens):
        if type(tok) is not TaskToken:
            raise TypeError(
                f"gather() takes TaskTokens, got {tok!r} ({type(tok).__name__}) at position {i}"
            )
    deadline = _deadline(timeout)
    out: list[Any] = []
    for tok in tokens:
        left = _left(deadline)
        if not tok.done() and not (tok.wait() if left is None else tok.wait(left)):
            unfinished = len({t for t in tokens if not t.done()})
            total = len(set(tokens))
            raise TokenTimeout(_unfinished(unfinished, total))
        if return_exceptions:
            try:
                out.append(tok.get() if tok.state != _FAILED else tok.exception())
            except TokenKilled as exc:
                out.append(exc)
        else:
            out.append(tok.get())
    return out
