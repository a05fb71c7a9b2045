"""The exceptions TokenGate raises, all rooted in :class:`TokenGateError`.

Several also derive from the builtin a caller would naturally catch (``RuntimeError``,
``TimeoutError``, ``ValueError``, ``TypeError``), so existing ``except`` clauses keep working.
The native core raises these same classes.
"""

from __future__ import annotations

__all__ = [
    "AdmissionClosed",
    "ConfigurationError",
    "CoordinatorForked",
    "CoordinatorNotRunning",
    "InternalError",
    "InvalidDecoration",
    "InvalidTag",
    "PoolFull",
    "TokenDeadlock",
    "TokenGateError",
    "TokenKilled",
    "TokenTimeout",
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
    """The token was killed before it ran (``token.kill()`` or ``stop(wait=False)``)."""


class TokenTimeout(TokenGateError, TimeoutError):
    """A wait on a token (``get``, ``result``, ``exception``) ran out of time."""


class TokenDeadlock(TokenGateError, RuntimeError):
    """A task waited on a token that can never finish while it waits: its own token, a token
    it is running inline beneath itself, or one whose waiters (transitively) wait on it."""


class InvalidTag(TokenGateError, ValueError):
    """A ``task_token_guard`` tag has a value that is not valid; the message lists the
    valid ones."""


class InvalidDecoration(TokenGateError, TypeError):
    """``task_token_guard`` was applied to something it cannot guard (e.g. an ``async def``)."""


class ConfigurationError(TokenGateError, ValueError):
    """An ``OperationsCoordinator`` argument (or a runtime setting) is out of range."""


class InternalError(TokenGateError):
    """A fault inside the TokenGate core itself; the token that hit it failed with this."""
