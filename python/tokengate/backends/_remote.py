"""What runs on a Dask worker for one attempt of a token (imported there by reference: the
workers need ``tokengate`` installed, as they need the task's own code)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

__all__ = ["RemoteCall"]

#: One ``distributed.Semaphore`` per (name, limit) in each worker process: an instance keeps a
#: periodic lease refresh running, so one per task would pile them up.
_semaphores: dict[tuple[str, int], Any] = {}
_semaphores_lock = threading.Lock()


def _semaphore(name: str, limit: int) -> Any:
    with _semaphores_lock:
        sem = _semaphores.get((name, limit))
        if sem is None:
            from distributed import Semaphore

            sem = _semaphores[(name, limit)] = Semaphore(max_leases=limit, name=name)
        return sem


class RemoteCall:
    """``func(*args, **kwargs)``, under a cluster-wide storage-tier lease when ``lease`` is
    ``(semaphore name, limit)``.

    One opaque object, so that Dask does not look inside the arguments for tasks or futures
    (a tuple whose first item is callable would otherwise be taken for a task).
    """

    __slots__ = ("args", "func", "kwargs", "lease")

    def __init__(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        lease: tuple[str, int] | None,
    ) -> None:
        self.func = func
        self.args = args
        self.kwargs = kwargs
        self.lease = lease

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteCall, (self.func, self.args, self.kwargs, self.lease))

    def __call__(self) -> Any:
        if self.lease is None:
            return self._run()
        with _semaphore(*self.lease):
            return self._run()

    def _run(self) -> Any:
        if self.kwargs:
            return self.func(*self.args, **self.kwargs)
        return self.func(*self.args)


def run(call: RemoteCall) -> Any:
    """The function every TokenGate task on a Dask worker runs."""
    return call()
