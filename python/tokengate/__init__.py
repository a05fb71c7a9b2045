"""TokenGate: each call of a decorated function becomes a token that runs on pinned per-core
workers of a Rust core.

>>> from tokengate import task_token_guard, OperationsCoordinator
>>> @task_token_guard(operation_type="square", tags={"weight": "light"})
... def square(x):
...     return x * x
>>> with OperationsCoordinator() as coord:
...     square(7).get()
49
"""

from __future__ import annotations

import logging

from ._core import GuardedFunction, TaskToken, checkpoint, current_token
from ._core import __version__ as __version__
from ._types import STORAGE_SPEEDS, TaskWeight, TokenState
from .coordinator import OperationsCoordinator
from .decorator import task_token_guard
from .errors import (
    AdmissionClosed,
    BackendError,
    ConfigurationError,
    CoordinatorForked,
    CoordinatorNotRunning,
    HistoryFormatError,
    InternalError,
    InvalidDecoration,
    InvalidOption,
    InvalidTag,
    MethodBlocked,
    PoolFull,
    QuarantineError,
    Retry,
    TokenCancelled,
    TokenDeadlock,
    TokenGateError,
    TokenKilled,
    TokenQuarantined,
    TokenTimeout,
    UnpicklableArgument,
    WorkerLost,
)
from .executor import Executor
from .guard.breaker import CircuitBreaker, Quarantine
from .waiting import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    DoneAndNotDoneTokens,
    as_completed,
    gather,
    wait,
)

logging.getLogger("tokengate").addHandler(logging.NullHandler())

__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "STORAGE_SPEEDS",
    "AdmissionClosed",
    "BackendError",
    "CircuitBreaker",
    "ConfigurationError",
    "CoordinatorForked",
    "CoordinatorNotRunning",
    "DoneAndNotDoneTokens",
    "Executor",
    "GuardedFunction",
    "HistoryFormatError",
    "InternalError",
    "InvalidDecoration",
    "InvalidOption",
    "InvalidTag",
    "MethodBlocked",
    "OperationsCoordinator",
    "PoolFull",
    "Quarantine",
    "QuarantineError",
    "Retry",
    "TaskToken",
    "TaskWeight",
    "TokenCancelled",
    "TokenDeadlock",
    "TokenGateError",
    "TokenKilled",
    "TokenQuarantined",
    "TokenState",
    "TokenTimeout",
    "UnpicklableArgument",
    "WorkerLost",
    "__version__",
    "as_completed",
    "checkpoint",
    "current_token",
    "gather",
    "task_token_guard",
    "wait",
]
