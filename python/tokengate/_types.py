"""Enumerations and constants shared by the decorator, the core and the dashboard."""

from __future__ import annotations

import enum
from types import MappingProxyType
from typing import Final

__all__ = ["STORAGE_SPEEDS", "TaskWeight", "TokenState"]


class TokenState(enum.IntEnum):
    """Where a token is in its life. COMPLETED, FAILED, KILLED, TIMED_OUT and QUARANTINED are
    final; CANCELLING (killed while it runs) is settled: its waiters are released, the task
    still runs until it returns, and the token then becomes KILLED. QUARANTINED: the Guard
    House's spike detection stopped the call before it was queued (it never ran)."""

    CREATED = 0
    WAITING = 1
    ADMITTED = 2
    EXECUTING = 3
    COMPLETED = 4
    FAILED = 5
    KILLED = 6
    TIMED_OUT = 7
    CANCELLING = 8
    QUARANTINED = 9

    @property
    def is_final(self) -> bool:
        """True for COMPLETED, FAILED, KILLED, TIMED_OUT and QUARANTINED."""
        return self >= TokenState.COMPLETED and self is not TokenState.CANCELLING

    @property
    def is_settled(self) -> bool:
        """True once the outcome is decided: a final state, or CANCELLING."""
        return self >= TokenState.COMPLETED

    def __str__(self) -> str:
        return self.name


class TaskWeight(enum.StrEnum):
    """Routing weight: heavy may run on every core (preferring core 1), medium never on
    core 1, light never on cores 1-2."""

    HEAVY = "heavy"
    MEDIUM = "medium"
    LIGHT = "light"


#: The core's index of each weight.
WEIGHT_INDEX: Final = MappingProxyType(
    {TaskWeight.HEAVY: 0, TaskWeight.MEDIUM: 1, TaskWeight.LIGHT: 2}
)

#: Concurrency permits per storage tier (used by the storage throttle).
STORAGE_SPEEDS: Final = MappingProxyType({"SLOW": 10, "MODERATE": 25, "FAST": 50, "INSANE": 70})

#: Priority lanes of the pool and mailboxes (FIFO within a lane).
PRIORITIES: Final = MappingProxyType({"high": 0, "normal": 1, "low": 2})
