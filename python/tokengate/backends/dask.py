"""``DaskBackend``: run the attempts of a coordinator's tokens on a Dask distributed cluster
under the same governance (docs/scale-out.md).

Everything that decides *whether*, *when* and *how often* a token runs stays in the local core:
admission, the gate (drain, pause, blocked operations), the pool and its priorities, timeouts,
retries, storage-tier permits, the Guard House, history, events and metrics. The local worker
threads become dispatch slots: a slot takes a token as a worker would, sends its attempt to the
cluster and waits for the answer with the GIL released. How many attempts are on the cluster at
once is the number of slots (``in_flight``, by default twice the cluster's threads), so queued
work stays in the local pool where it can be killed, reprioritized, paused or drained.

What maps onto Dask:

* weight → worker resources: with ``resources="auto"`` a token of weight ``heavy`` asks for
  ``{"heavy": 1}`` when some worker declares a ``heavy`` resource (``dask worker
  --resources "heavy=1"``) and runs on any worker when none does; likewise ``medium`` and
  ``light``. A mapping gives each weight its own requirement.
* storage tiers → a ``distributed.Semaphore`` per tier and limit, so the bound holds across
  every coordinator sharing the cluster (the local permit still bounds this coordinator).
* priority → Dask's ``priority=`` (high 10, normal 0, low -10; a retry one above its lane).
* kill / timeout → the attempt's Dask future is cancelled.
* a worker that dies → the attempt fails with :class:`~tokengate.WorkerLost` (caused by
  Dask's ``KilledWorker``), which the token's retry policy retries like any other error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import io
import logging
import uuid
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .._types import STORAGE_SPEEDS
from ..errors import BackendError, ConfigurationError, UnpicklableArgument, WorkerLost
from .base import AttemptHook, Backend, SubmitCheck, WorkerLayout

try:
    import cloudpickle
    import distributed
    from distributed.scheduler import KilledWorker
except ImportError as _exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "the Dask backend needs dask[distributed], which is not installed: "
        "pip install 'tokengate[dask]'"
    ) from _exc

from . import _remote

if TYPE_CHECKING:
    from .._core import Runtime, TaskToken
    from ..coordinator import OperationsCoordinator

__all__ = ["DEFAULT_RESOURCES", "DaskBackend"]

log = logging.getLogger("tokengate")

#: The weights and the worker resource each asks for under ``resources="auto"`` (only while
#: some worker of the cluster declares that resource).
DEFAULT_RESOURCES: dict[str, dict[str, float]] = {
    "heavy": {"heavy": 1},
    "medium": {"medium": 1},
    "light": {"light": 1},
}
_WEIGHTS = ("heavy", "medium", "light")
_PRIORITY = {"high": 10, "normal": 0, "low": -10}
#: The most dispatch slots (the core's limit of workers per core).
_MAX_IN_FLIGHT = 1024
#: How often a waiting slot looks whether its attempt was abandoned (a timed-out attempt
#: retried while it still ran) or the backend is closing.
_SLICE = 0.5
#: How often the control loop reads the cluster's workers, threads and resources.
_WATCH_EVERY = 2.0
#: Argument types that always pickle: not probed.
_SIMPLE = frozenset({int, float, str, bytes, bool, type(None), complex})


class _Discard(io.RawIOBase):
    """A file that keeps nothing (pickling only to see whether it works)."""

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return len(b)


def _probe(value: object) -> None:
    """Pickle ``value`` as Dask would (cloudpickle, protocol 5), keeping nothing: large
    buffers (numpy, bytearray views) are left out of band, so they are not copied."""
    cloudpickle.CloudPickler(_Discard(), protocol=5, buffer_callback=_keep_out_of_band).dump(value)


def _keep_out_of_band(buffer: Any) -> bool:
    return False


def _positional_name(func: Callable[..., Any], index: int) -> str:
    """What positional argument ``index`` of ``func`` is called, for an error message."""
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return f"positional argument {index}"
    positional = [
        p
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if index < len(positional):
        return f"argument {positional[index].name!r} (position {index})"
    star = next((p for p in params if p.kind is inspect.Parameter.VAR_POSITIONAL), None)
    if star is not None:
        return f"argument *{star.name}[{index - len(positional)}] (position {index})"
    return f"positional argument {index}"


def _probe_argument(
    value: object, operation: str, func: Callable[..., Any], where: int | str
) -> None:
    """Raise :class:`UnpicklableArgument` naming the argument (position ``where`` of
    ``func``, or keyword ``where``) if ``value`` cannot be pickled."""
    try:
        _probe(value)
    except Exception as exc:
        label = _positional_name(func, where) if isinstance(where, int) else f"argument {where!r}"
        raise UnpicklableArgument(
            f"{label} of {operation!r} cannot be pickled to send it to the Dask cluster "
            f"({_reason(exc)}); pass what a worker can rebuild it from instead (a path, a key, "
            "settings)"
        ) from exc


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _check_resources(value: object) -> dict[str, dict[str, float] | None] | None:
    """``"auto"`` (None here) or a mapping weight -> resource requirement (or None)."""
    if value == "auto":
        return None
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            "resources must be 'auto' or a mapping of weight ('heavy', 'medium', 'light') to "
            f"a resource requirement such as {{'heavy': {{'gpu': 1}}}}, got {value!r}"
        )
    out: dict[str, dict[str, float] | None] = {}
    for weight, need in value.items():
        if weight not in _WEIGHTS:
            raise ConfigurationError(
                f"resources: {weight!r} is not a weight; valid: 'heavy', 'medium', 'light'"
            )
        if need is None:
            out[weight] = None
            continue
        if not isinstance(need, Mapping) or not need:
            raise ConfigurationError(
                f"resources[{weight!r}] must be a non-empty mapping of resource name to "
                f"amount, or None for no requirement, got {need!r}"
            )
        clean: dict[str, float] = {}
        for name, amount in need.items():
            if not isinstance(name, str) or not name:
                raise ConfigurationError(
                    f"resources[{weight!r}]: resource names are non-empty str, got {name!r}"
                )
            if (
                isinstance(amount, bool)
                or not isinstance(amount, (int, float))
                or not amount > 0
                or amount != amount
            ):
                raise ConfigurationError(
                    f"resources[{weight!r}][{name!r}] must be a number > 0, got {amount!r}"
                )
            clean[name] = amount
        out[weight] = clean
    return out


class DaskBackend(Backend):
    """Run a coordinator's tokens on a Dask distributed cluster.

    ``OperationsCoordinator(backend=DaskBackend("tcp://scheduler:8786"))``. Needs
    ``pip install 'tokengate[dask]'`` here and ``tokengate`` (with the tasks' code) on the
    workers.

    Args:
        address_or_client: the scheduler's address (``"tcp://host:8786"``), a
            ``distributed.Client`` (used as is and left open at stop), or a cluster object
            such as ``LocalCluster`` (a client of its own is made, and closed at stop).
        in_flight: how many attempts may be on the cluster at once (1 to 1024): the
            coordinator's dispatch slots. Default: twice the cluster's threads when the
            coordinator starts (at least 2), following the cluster as workers come and go.
        resources: ``"auto"`` (see :data:`DEFAULT_RESOURCES`) or a mapping of weight to the
            worker resources its tokens need, e.g. ``{"heavy": {"gpu": 1}, "light": None}``
            (None or a weight not named: any worker). An explicit requirement that no worker
            declares leaves the token waiting on the cluster until one joins (give the
            operation a ``timeout``).
        namespace: prefix of the storage-tier semaphores on the scheduler; coordinators with
            the same namespace (and tier limits) share one bound.
        connect_timeout: seconds to wait for the scheduler at start.

    Raises:
        ConfigurationError: a bad argument (at construction).
    """

    name = "dask"
    local = False

    def __init__(
        self,
        address_or_client: Any,
        *,
        in_flight: int | None = None,
        resources: str | Mapping[str, Mapping[str, float] | None] = "auto",
        namespace: str = "tokengate",
        connect_timeout: float = 30.0,
    ) -> None:
        if isinstance(address_or_client, str):
            if not address_or_client.strip():
                raise ConfigurationError("address_or_client must not be an empty address")
        elif not isinstance(address_or_client, distributed.Client) and not hasattr(
            address_or_client, "scheduler_address"
        ):
            raise ConfigurationError(
                "address_or_client must be a scheduler address ('tcp://host:8786'), a "
                "distributed.Client or a cluster (e.g. LocalCluster), got "
                f"{type(address_or_client).__name__}"
            )
        self._target = address_or_client
        if in_flight is not None and (
            isinstance(in_flight, bool)
            or not isinstance(in_flight, int)
            or not 1 <= in_flight <= _MAX_IN_FLIGHT
        ):
            raise ConfigurationError(
                f"in_flight must be an int from 1 to {_MAX_IN_FLIGHT} or None, got {in_flight!r}"
            )
        self._fixed_in_flight = in_flight
        self._mapping = _check_resources(resources)
        if not isinstance(namespace, str) or not namespace.strip():
            raise ConfigurationError(f"namespace must be a non-empty str, got {namespace!r}")
        self._namespace = namespace
        if (
            isinstance(connect_timeout, bool)
            or not isinstance(connect_timeout, (int, float))
            or not connect_timeout > 0
        ):
            raise ConfigurationError(
                f"connect_timeout must be a number of seconds > 0, got {connect_timeout!r}"
            )
        self._connect_timeout = float(connect_timeout)
        self._client: distributed.Client | None = None
        self._owned = False
        self._rt: Runtime | None = None
        self._in_flight = in_flight or 2
        self._declared: frozenset[str] = frozenset()
        self._workers = 0
        self._threads = 0
        self._allowed_failures: int | None = None
        self._limits: dict[str, int] = dict(STORAGE_SPEEDS)
        self._inflight: dict[int, TaskToken] = {}
        self._closing = False
        self._prefix = uuid.uuid4().hex[:8]
        self._funcs_ok: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
        self._watch_failed = False

    # -- lifecycle -------------------------------------------------------------------

    def open(self, coordinator: OperationsCoordinator) -> None:
        if self._client is not None:
            raise ConfigurationError(
                "this DaskBackend already serves a running coordinator; make one per coordinator"
            )
        target = self._target
        if isinstance(target, distributed.Client):
            if target.status not in ("running", "newly-created"):
                raise BackendError(f"the distributed.Client given is {target.status}, not running")
            client, owned = target, False
        else:
            try:
                client = distributed.Client(
                    target, timeout=self._connect_timeout, set_as_default=False
                )
            except (OSError, TimeoutError) as exc:
                where = target if isinstance(target, str) else type(target).__name__
                raise BackendError(
                    f"could not connect to the Dask scheduler at {where}: {_reason(exc)}"
                ) from exc
            owned = True
        self._client, self._owned = client, owned
        self._closing = False
        self._limits = dict(STORAGE_SPEEDS)
        limits = coordinator._storage_limits
        if limits is not None:
            for tier, limit in zip(STORAGE_SPEEDS, limits, strict=True):
                self._limits[tier] = limit
        try:
            self._refresh()
        except Exception as exc:
            self.close()
            raise BackendError(
                f"could not read the Dask cluster's workers: {_reason(exc)}"
            ) from exc
        if self._fixed_in_flight is None:
            self._in_flight = self._target_in_flight()
        else:
            self._in_flight = self._fixed_in_flight
        try:
            self._allowed_failures = int(
                # A lambda pickles by value: the scheduler needs no tokengate installed.
                client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures)
            )
        except Exception:  # a scheduler that refuses run_on_scheduler: not needed to run
            self._allowed_failures = None
        if self._allowed_failures:
            log.info(
                "dask: the scheduler re-runs a task whose worker died up to %d more times "
                "before tokengate sees the loss (distributed.scheduler.allowed-failures); "
                "set it to 0 to leave worker deaths to each operation's retry policy",
                self._allowed_failures,
            )
        log.info(
            "dask: connected to %s (%d workers, %d threads, resources %s); %d attempts in "
            "flight at most",
            client.scheduler.address,
            self._workers,
            self._threads,
            sorted(self._declared) or "none",
            self._in_flight,
        )

    def layout(self) -> WorkerLayout:
        return WorkerLayout(cores=1, workers=self._in_flight, max_workers=_MAX_IN_FLIGHT)

    def attach(self, runtime: Runtime) -> None:
        self._rt = runtime

    def attempt_hook(self) -> AttemptHook:
        return self._attempt

    def submit_check(self) -> SubmitCheck:
        return self._check

    def control(self) -> Any:
        return self._watch()

    def running(self, token_id: int) -> TaskToken | None:
        return self._inflight.get(token_id)

    def set_storage_limit(self, tier: str, limit: int) -> None:
        self._limits[tier] = limit

    def close(self, timeout: float | None = None) -> None:
        self._closing = True
        for token in list(self._inflight.values()):
            # Their waiters get TokenKilled now; each slot cancels its future and returns.
            token.kill()
        client, self._client, self._rt = self._client, None, None
        if client is not None and self._owned:
            try:
                client.close(timeout=10 if timeout is None else max(timeout, 1.0))
            except Exception:
                log.debug("dask: closing the client failed", exc_info=True)

    @property
    def client(self) -> distributed.Client | None:
        """The client in use while the coordinator runs (None otherwise)."""
        return self._client

    @property
    def in_flight(self) -> int:
        """How many attempts may be on the cluster at once now."""
        return self._in_flight

    def describe(self) -> dict[str, Any]:
        client = self._client
        return {
            "name": self.name,
            "scheduler": None if client is None else client.scheduler.address,
            "workers": self._workers,
            "threads": self._threads,
            "resources": sorted(self._declared),
            "in_flight": self._in_flight,
            "running": len(self._inflight),
            "allowed_failures": self._allowed_failures,
        }

    def __repr__(self) -> str:
        client = self._client
        where = (
            client.scheduler.address
            if client is not None
            else (self._target if isinstance(self._target, str) else type(self._target).__name__)
        )
        return f"DaskBackend({where!r}, in_flight={self._in_flight})"

    # -- the cluster ----------------------------------------------------------------

    def _refresh(self) -> None:
        """Read the cluster's workers, threads and declared resources (blocking)."""
        client = self._client
        if client is None:
            return
        try:
            info = client.scheduler_info(n_workers=-1)  # every worker (newer Dask: 5 by default)
        except TypeError:  # a Dask without n_workers lists every worker anyway
            info = client.scheduler_info()
        workers = info.get("workers", {}).values()
        declared: set[str] = set()
        threads = 0
        for w in workers:
            threads += int(w.get("nthreads", 0))
            declared.update(name for name, amount in (w.get("resources") or {}).items() if amount)
        self._workers = len(info.get("workers", {}))
        self._threads = threads
        self._declared = frozenset(declared)

    def _target_in_flight(self) -> int:
        return max(2, min(_MAX_IN_FLIGHT, 2 * self._threads))

    async def _watch(self) -> None:
        """Follow the cluster: its resources for ``"auto"``, its threads for ``in_flight``."""
        while not self._closing:
            await asyncio.sleep(_WATCH_EVERY)
            if self._closing:
                return
            try:
                await asyncio.to_thread(self._refresh)
            except Exception:
                if not self._watch_failed:
                    log.warning("dask: reading the cluster's workers failed", exc_info=True)
                self._watch_failed = True
                continue
            self._watch_failed = False
            rt = self._rt
            if self._fixed_in_flight is None and rt is not None and not self._closing:
                target = self._target_in_flight()
                if target != self._in_flight:
                    try:
                        rt.set_active_workers(1, target)
                    except Exception:
                        log.debug("dask: resizing the dispatch slots failed", exc_info=True)
                        continue
                    log.info(
                        "dask: the cluster has %d threads now; %d attempts in flight at most",
                        self._threads,
                        target,
                    )
                    self._in_flight = target

    def _resources_for(self, weight: str) -> dict[str, float] | None:
        if self._mapping is not None:
            return self._mapping.get(weight)
        if weight in self._declared:
            return DEFAULT_RESOURCES[weight]
        return None

    def _lease(self, tier: str | None) -> tuple[str, int] | None:
        if tier is None:
            return None
        limit = self._limits[tier]
        return (f"{self._namespace}-storage-{tier}-{limit}", limit)

    # -- per call --------------------------------------------------------------------

    def _check(
        self,
        operation: str,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
    ) -> None:
        """Refuse a call whose function or arguments cannot be pickled for the cluster."""
        for index, value in enumerate(args):
            if type(value) not in _SIMPLE:
                _probe_argument(value, operation, func, index)
        if kwargs:
            for name, value in kwargs.items():
                if type(value) not in _SIMPLE:
                    _probe_argument(value, operation, func, name)
        try:
            if self._funcs_ok.get(func):
                return
        except TypeError:  # not weakly referenceable: probed every time
            pass
        try:
            _probe(func)
        except Exception as exc:
            raise UnpicklableArgument(
                f"the function of {operation!r} cannot be pickled to send it to the Dask "
                f"cluster ({_reason(exc)}); define it at module level"
            ) from exc
        try:
            self._funcs_ok[func] = True
        except TypeError:
            pass

    def _attempt(
        self,
        token: TaskToken,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        previous: TaskToken | None = None,
    ) -> Any:
        """One attempt of ``token`` on the cluster; runs on a dispatch slot (a worker
        thread of the coordinator) and returns or raises what the task did."""
        client = self._client
        if client is None or self._closing:
            raise BackendError("the Dask backend is closed: the coordinator is stopping")
        attempt = token.attempts
        token_id = token.token_id
        operation = token.operation_type
        lane = _PRIORITY.get(token.priority, 0)
        self._inflight[token_id] = token  # before the submit: kill(id) finds it at once
        try:
            if token.state.is_settled:  # killed or timed out as its attempt began
                return None
            try:
                future = client.submit(
                    _remote.run,
                    _remote.RemoteCall(func, args, kwargs, self._lease(token.storage_speed)),
                    key=f"{operation}-{self._prefix}-{token_id}-{attempt}",
                    pure=False,
                    priority=lane + 1 if attempt > 1 else lane,
                    resources=self._resources_for(token.weight.value),
                )
            except Exception as exc:
                if _is_pickling_error(exc):
                    # A chain step's arguments (its parent's result) are first pickled here.
                    self._check(operation, func, args, kwargs)
                    raise UnpicklableArgument(
                        f"the call of {operation!r} cannot be pickled to send it to the Dask "
                        f"cluster ({_reason(exc)})"
                    ) from exc
                raise BackendError(
                    f"token {token_id} ({operation}): Dask refused the task: {_reason(exc)}"
                ) from exc
            while True:
                try:
                    # One wait on the client's loop, which also fetches the result: a
                    # kill or a timeout is seen within one slice (the token's waiters are
                    # released by the core at once; only the slot waits for the slice).
                    return self._outcome(token, attempt, future)
                except _Pending:
                    pass
                if token.state.is_settled or token.attempts != attempt or self._closing:
                    # Killed, timed out (perhaps retried), or the backend closes: the result
                    # would be discarded, so the task is called off (a task a Dask worker
                    # already runs finishes there; its result is dropped).
                    _cancel(future)
                    return None
        finally:
            if self._inflight.get(token_id) is token:
                del self._inflight[token_id]

    def _outcome(self, token: TaskToken, attempt: int, future: distributed.Future) -> Any:
        """What the task returned (or raise what it raised); :class:`_Pending` if it did not
        finish within one slice."""
        try:
            try:
                return future.result(timeout=_SLICE)
            except TimeoutError:
                if not future.done():
                    raise _Pending from None
                # Finished meanwhile, or the task raised a TimeoutError itself: ask again.
            return future.result()
        except KilledWorker as exc:
            worker = getattr(getattr(exc, "last_worker", None), "address", None)
            raise WorkerLost(
                f"token {token.token_id} ({token.operation_type}), attempt {attempt}: the Dask "
                f"worker running it died{f' ({worker})' if worker else ''} and Dask gave up on "
                "the task"
            ) from exc
        except (concurrent.futures.CancelledError, asyncio.CancelledError) as exc:
            raise BackendError(
                f"token {token.token_id} ({token.operation_type}), attempt {attempt}: the Dask "
                f"cluster dropped the task ({_reason(exc)})"
            ) from exc


class _Pending(Exception):
    """The attempt's task has not finished yet."""


def _cancel(future: distributed.Future) -> None:
    try:
        future.cancel()
    except Exception:  # the client may be closing meanwhile: nothing left to call off
        log.debug("dask: cancelling %s failed", future.key, exc_info=True)


def _is_pickling_error(exc: BaseException) -> bool:
    import pickle

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, pickle.PicklingError) or "pickle" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False
