"""What runs on a Dask worker for one attempt of a token (imported there by reference: the
workers need ``tokengate`` installed, as they need the task's own code)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["RemoteCall", "run"]


class RemoteCall:
    """``func(*args, **kwargs)`` as one opaque object, so that Dask does not look inside the
    arguments for tasks or futures (a tuple whose first item is callable would otherwise be
    taken for a task). A storage tier's lease is taken by the dispatch slot before the task
    is sent, so nothing here waits."""

    __slots__ = ("args", "func", "kwargs")

    def __init__(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any] | None
    ) -> None:
        self.func = func
        self.args = args
        self.kwargs = kwargs

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteCall, (self.func, self.args, self.kwargs))

    def __call__(self) -> Any:
        if self.kwargs:
            return self.func(*self.args, **self.kwargs)
        return self.func(*self.args)


def run(call: RemoteCall) -> Any:
    """The function every TokenGate task on a Dask worker runs."""
    return call()
