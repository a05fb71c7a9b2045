"""What runs on a Dask worker for one attempt of a token (imported there by reference: the
workers need ``tokengate`` installed, as they need the task's own code)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["ByName", "RemoteCall", "run"]

#: Functions resolved by name in this worker process: (module, qualname) -> function.
_resolved: dict[tuple[str, str], Callable[..., Any]] = {}


class ByName:
    """A ``@task_token_guard`` function of an importable module, sent by its name: the worker
    imports the module and calls the plain function under the decorator. (Pickling the plain
    function itself would send its code and every global it uses, by value: the module's
    name resolves to the decorator's object, not to it.)"""

    __slots__ = ("module", "qualname")

    def __init__(self, module: str, qualname: str) -> None:
        self.module = module
        self.qualname = qualname

    def __reduce__(self) -> tuple[Any, ...]:
        return (ByName, (self.module, self.qualname))

    def resolve(self) -> Callable[..., Any]:
        key = (self.module, self.qualname)
        func = _resolved.get(key)
        if func is None:
            obj: Any = importlib.import_module(self.module)
            for part in self.qualname.split("."):
                obj = getattr(obj, part)
            func = _resolved[key] = getattr(obj, "__wrapped__", obj)
        return func


class RemoteCall:
    """``func(*args, **kwargs)`` as one opaque object, so that Dask does not look inside the
    arguments for tasks or futures (a tuple whose first item is callable would otherwise be
    taken for a task). A storage tier's lease is taken by the dispatch slot before the task
    is sent, so nothing here waits."""

    __slots__ = ("args", "func", "kwargs")

    def __init__(
        self,
        func: Callable[..., Any] | ByName,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
    ) -> None:
        self.func = func
        self.args = args
        self.kwargs = kwargs

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteCall, (self.func, self.args, self.kwargs))

    def __call__(self) -> Any:
        func = self.func.resolve() if isinstance(self.func, ByName) else self.func
        try:
            if self.kwargs:
                return func(*self.args, **self.kwargs)
            return func(*self.args)
        except Exception as exc:
            from ..errors import CoordinatorNotRunning

            if type(exc) is CoordinatorNotRunning:  # a decorated call inside the task
                raise CoordinatorNotRunning(
                    "a @task_token_guard function was called inside a task running on a Dask "
                    "worker, where no coordinator runs: call its plain function "
                    "(fn.__wrapped__) there, or chain the step with token.then() instead"
                ) from exc
            raise


def run(call: RemoteCall) -> Any:
    """The function every TokenGate task on a Dask worker runs."""
    return call()
