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

from ._core import GuardedFunction, TaskToken
from ._core import __version__ as __version__
from ._types import STORAGE_SPEEDS, TaskWeight, TokenState
from .coordinator import OperationsCoordinator
from .decorator import task_token_guard
from .errors import (
    AdmissionClosed,
    ConfigurationError,
    CoordinatorForked,
    CoordinatorNotRunning,
    InternalError,
    InvalidDecoration,
    InvalidTag,
    PoolFull,
    TokenDeadlock,
    TokenGateError,
    TokenKilled,
    TokenTimeout,
)

logging.getLogger("tokengate").addHandler(logging.NullHandler())

__all__ = [
    "STORAGE_SPEEDS",
    "AdmissionClosed",
    "ConfigurationError",
    "CoordinatorForked",
    "CoordinatorNotRunning",
    "GuardedFunction",
    "InternalError",
    "InvalidDecoration",
    "InvalidTag",
    "OperationsCoordinator",
    "PoolFull",
    "TaskToken",
    "TaskWeight",
    "TokenDeadlock",
    "TokenGateError",
    "TokenKilled",
    "TokenState",
    "TokenTimeout",
    "__version__",
    "task_token_guard",
]
