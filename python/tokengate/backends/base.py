"""The seam between governance and execution.

An :class:`~tokengate.OperationsCoordinator` governs every token the same way whatever runs it:
admission, the gate (drain, pause, blocked operations), the pool, priorities, timeouts,
retries, storage-tier permits, the Guard House, history, events and metrics all happen in the
core on this machine. What a backend decides is only how one *attempt* of a token is executed
once a worker thread took it:

* :class:`LocalBackend` (the default) calls the function on that worker thread, pinned to its
  core. It installs nothing: a coordinator without a backend pays nothing for the seam.
* :class:`~tokengate.backends.dask.DaskBackend` sends the attempt to a Dask cluster; the worker
  thread becomes a dispatch slot that waits (GIL released) for the cluster's answer.

A feature built on the core (a new policy, a new metric) therefore works on every backend
without a special case. The hooks a backend provides are described on :class:`Backend`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .._core import Runtime, TaskToken
    from ..coordinator import OperationsCoordinator

__all__ = ["AttemptHook", "Backend", "LocalBackend", "SubmitCheck", "WorkerLayout"]

#: ``hook(token, func, args, kwargs, previous)``: runs one attempt, returns its result or
#: raises its exception (``kwargs`` None when there are none; ``previous`` the chain step
#: whose completion submitted ``token``, or None).
AttemptHook = Callable[..., Any]
#: ``check(operation, func, args, kwargs)``: raises to refuse a call before it becomes a token.
SubmitCheck = Callable[[str, Callable[..., Any], tuple[Any, ...], "dict[str, Any] | None"], None]


class WorkerLayout:
    """The local worker threads a backend asks for in place of the coordinator's own.

    Attributes:
        cores: virtual cores to route over.
        workers: worker threads per core at start.
        max_workers: the most :meth:`OperationsCoordinator.set_active_workers` may ask for.
    """

    __slots__ = ("cores", "max_workers", "workers")

    def __init__(self, cores: int, workers: int, max_workers: int) -> None:
        self.cores = cores
        self.workers = workers
        self.max_workers = max_workers

    def __repr__(self) -> str:
        return (
            f"WorkerLayout(cores={self.cores}, workers={self.workers}, "
            f"max_workers={self.max_workers})"
        )


class Backend:
    """What executes the attempts of a coordinator's tokens.

    A coordinator calls, in this order: :meth:`open` once at ``start()`` (before its runtime
    exists), :meth:`layout` for its worker threads, :meth:`attach` with the started runtime,
    then :meth:`attempt_hook` / :meth:`submit_check` (installed in the core), :meth:`control`
    (a coroutine run on its control loop, if any), and :meth:`close` at the end of
    ``stop()``. A backend that runs attempts elsewhere keeps the running tokens it knows by
    id (:meth:`running`) so ``coordinator.kill(id)`` can reach them.

    A backend serves one coordinator at a time.
    """

    #: Short name shown in ``coordinator.stats()["backend"]`` and the dashboard.
    name: str = "backend"
    #: Whether attempts run on this machine's worker threads (the pinned, governed local
    #: pool). A remote backend's worker threads only dispatch: the coordinator then runs
    #: neither convergence nor on-demand growth, and does not pin them.
    local: bool = True

    def open(self, coordinator: OperationsCoordinator) -> None:
        """Connect, before the coordinator's runtime starts. Raise
        :class:`~tokengate.ConfigurationError` (or a ``BackendError``) to refuse the start."""

    def layout(self) -> WorkerLayout | None:
        """The worker threads to start in place of the coordinator's (None: its own)."""
        return None

    def attach(self, runtime: Runtime) -> None:
        """The runtime that now runs (called once per start, after :meth:`open`)."""

    def attempt_hook(self) -> AttemptHook | None:
        """What runs each attempt in place of the bare call (None: the call itself)."""
        return None

    def submit_check(self) -> SubmitCheck | None:
        """What checks each call on the submitting thread before it becomes a token."""
        return None

    def control(self) -> Any:
        """A coroutine for the coordinator's control loop (None: nothing to run)."""
        return None

    def running(self, token_id: int) -> TaskToken | None:
        """The token ``token_id`` if this backend is executing it now (None otherwise)."""
        return None

    def kill_unsent(self) -> int:
        """Kill the attempts this backend took but has not started anywhere yet (what
        ``stop(wait=False)`` kills besides the queued tokens); how many it killed."""
        return 0

    def set_storage_limit(self, tier: str, limit: int) -> None:
        """The limit of storage tier ``tier`` changed (the core enforces it locally)."""

    def describe(self) -> dict[str, Any]:
        """What the backend is and what it runs on, for stats and the dashboard."""
        return {"name": self.name}

    def close(self, timeout: float | None = None) -> None:
        """Release what :meth:`open` took (at the end of ``stop()``). Tokens still executing
        must end: a backend kills them rather than leave a waiter without an answer."""


class LocalBackend(Backend):
    """Attempts run on the coordinator's own worker threads, pinned to its cores (the
    default, and what ``backend=None`` means)."""

    name = "local"

    def __repr__(self) -> str:
        return "LocalBackend()"
