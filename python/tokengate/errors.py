"""The exceptions TokenGate raises, all rooted in :class:`TokenGateError`.

Several also derive from the builtin a caller would naturally catch (``RuntimeError``,
``TimeoutError``, ``ValueError``, ``TypeError``), so existing ``except`` clauses keep working.
The native core raises these same classes.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AdmissionClosed",
    "BackendError",
    "ConfigurationError",
    "CoordinatorForked",
    "CoordinatorNotRunning",
    "HistoryFormatError",
    "InternalError",
    "InvalidDecoration",
    "InvalidOption",
    "InvalidTag",
    "MethodBlocked",
    "PoolFull",
    "QuarantineError",
    "Retry",
    "TokenCancelled",
    "TokenDeadlock",
    "TokenGateError",
    "TokenKilled",
    "TokenQuarantined",
    "TokenTimeout",
    "UnpicklableArgument",
    "WorkerLost",
]


class TokenGateError(Exception):
    """Base class of every error TokenGate raises."""


class CoordinatorNotRunning(TokenGateError, RuntimeError):
    """A guarded function was called while no ``OperationsCoordinator`` is running."""


class CoordinatorForked(TokenGateError, RuntimeError):
    """The coordinator was started before ``os.fork()``: its workers live in the parent.
    Start a new ``OperationsCoordinator`` in the child."""


class AdmissionClosed(TokenGateError):
    """Admission is closed by ``drain()`` or ``stop()``; ``resume()`` reopens it."""


class PoolFull(TokenGateError):
    """The token pool is at ``pool_capacity`` (``overflow='reject'``, or ``submit_timeout``
    passed with ``overflow='block'``)."""


class TokenKilled(TokenGateError):
    """The token was killed (``token.kill()``, ``stop(wait=False)``): before it ran, or while
    it ran (then its result is discarded)."""


class TokenTimeout(TokenGateError, TimeoutError):
    """A wait on a token (``get(timeout=...)``) ran out of time, or the token's own
    ``timeout`` passed (it ended TIMED_OUT)."""


class MethodBlocked(TokenGateError):
    """The operation's circuit breaker is open (it tripped, or an operator blocked it):
    the call was refused before anything was queued. The message names the operation, why
    it is open and when it lets a probe call through; ``operation`` and ``retry_in`` (seconds,
    or None when only an operator can reopen it) carry the same as attributes."""

    operation: str | None = None
    retry_in: float | None = None


class TokenQuarantined(TokenGateError):
    """The call was predicted to cost far more than its operation's baseline and was
    quarantined instead of run: the token ended QUARANTINED and its record is in the
    quarantine store, from where an operator may release (replay) or discard it."""


class QuarantineError(TokenGateError, LookupError):
    """A quarantine store action could not be done: no such record, a record that cannot be
    replayed, or a bulk action without a selection."""


class HistoryFormatError(TokenGateError, ValueError):
    """A file given as an execution-history dump is not one (wrong format, version or
    record fields); the message names the file and what is wrong."""


class TokenCancelled(TokenGateError):
    """Raised inside a task by :func:`tokengate.checkpoint` once its token was killed or
    timed out: the task should stop (its result would be discarded anyway). Never retried."""


class Retry(TokenGateError):
    """Raise it from a task to ask for another attempt after ``delay`` seconds (None: the
    policy's backoff), whatever ``retry_on`` says, while the token has retries left. Once
    they are used up the token fails with this exception."""

    def __init__(self, delay: float | None = None, reason: str | None = None) -> None:
        if delay is not None:
            if isinstance(delay, bool) or not isinstance(delay, (int, float)) or delay != delay:
                raise TypeError(
                    f"Retry(delay=...) needs a number of seconds or None, got {delay!r}"
                )
            if delay < 0:
                raise ValueError(f"Retry(delay=...) must be >= 0, got {delay}")
        self.delay: float | None = None if delay is None else float(delay)
        self.reason = reason
        super().__init__(reason or f"retry requested (delay={delay!r})")

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled with its own arguments (a task on a Dask worker raises it across processes).
        return (type(self), (self.delay, self.reason))


class TokenDeadlock(TokenGateError, RuntimeError):
    """A task waited on a token that can never finish while it waits: its own token, a token
    it is running inline beneath itself, or one whose waiters (transitively) wait on it."""


class InvalidTag(TokenGateError, ValueError):
    """A ``task_token_guard`` tag has a value that is not valid; the message lists the
    valid ones."""


class InvalidDecoration(TokenGateError, TypeError):
    """``task_token_guard`` was applied to something it cannot guard (e.g. an ``async def``)."""


class InvalidOption(TokenGateError, TypeError):
    """A per-token option (of ``task_token_guard`` or ``fn.options``) has the wrong type,
    e.g. a ``retry_on`` entry that is not an exception class; the message says what is
    valid. Out-of-range values raise :class:`ConfigurationError`."""


class ConfigurationError(TokenGateError, ValueError):
    """An ``OperationsCoordinator`` argument (or a runtime setting) is out of range."""


class InternalError(TokenGateError):
    """A fault inside the TokenGate core itself; the token that hit it failed with this."""


class BackendError(TokenGateError):
    """The backend executing the tokens (e.g. a Dask cluster) could not run an attempt: it
    could not be reached, refused the task, or dropped it."""


class WorkerLost(BackendError):
    """The remote worker running the attempt died (its cause is the backend's own error, e.g.
    Dask's ``KilledWorker``). A retry policy retries it like any other error."""


class UnpicklableArgument(TokenGateError, TypeError):
    """A call's function or argument cannot be pickled to send it to a remote backend; the
    message names the argument. Raised by the call itself, before a token exists."""
