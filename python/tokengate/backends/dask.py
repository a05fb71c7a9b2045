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
* storage tiers → one ``distributed.Semaphore`` per tier, whose lease the dispatch slot takes
  before it sends the task, so the bound holds across every coordinator sharing the cluster
  (the local permit still bounds this coordinator) and a token killed while it waits for a
  lease never runs.
* priority → Dask's ``priority=`` (high 10, normal 0, low -10; a retry one above its lane).
* kill / timeout → the attempt's Dask future is cancelled.
* a worker that dies → the attempt fails with :class:`~tokengate.WorkerLost` (caused by
  Dask's ``KilledWorker``), which the token's retry policy retries like any other error; an
  attempt no worker can run (no workers, or none with its resources) for
  ``no_worker_timeout`` seconds fails with :class:`~tokengate.BackendError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import io
import logging
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .._core import GuardedFunction
from ..errors import BackendError, ConfigurationError, UnpicklableArgument, WorkerLost
from .base import AttemptHook, Backend, SubmitCheck, WorkerLayout

try:
    import cloudpickle
    import distributed
    from distributed.comm import parse_address, parse_host_port
    from distributed.comm.registry import backends as _comm_backends
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
#: The longest close() waits for the dispatch slots to give their leases back.
_CLOSE_GRACE = 2.0
#: How often the control loop reads the cluster's workers, threads and resources.
_WATCH_EVERY = 2.0
#: Dask's errors for a task no worker can run (with ``distributed.scheduler.no-workers-timeout``).
_NO_WORKER_ERRORS: tuple[type[BaseException], ...] = tuple(
    e
    for e in (
        getattr(distributed.scheduler, "NoWorkerError", None),
        getattr(distributed.scheduler, "NoValidWorkerError", None),
    )
    if isinstance(e, type)
)
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
    ``func``, or keyword ``where``) if ``value`` cannot be pickled or cannot run remotely."""
    if isinstance(value, GuardedFunction):
        label = _positional_name(func, where) if isinstance(where, int) else f"argument {where!r}"
        raise UnpicklableArgument(
            f"{label} of {operation!r} is a @task_token_guard function: a Dask worker has no "
            "coordinator to call it on; pass the plain function (fn.__wrapped__) instead"
        )
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


def _by_name(func: Callable[..., Any]) -> _remote.ByName | None:
    """A reference to ``func`` when it is the plain function of a ``@task_token_guard``
    function of an importable module (its module's name resolves to the decorator's object):
    sent by name, the worker calls its own import of it."""
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        return None
    if module == "__main__" or "<locals>" in qualname or module not in sys.modules:
        return None
    obj: Any = sys.modules[module]
    try:
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        return None
    if isinstance(obj, GuardedFunction) and obj.__wrapped__ is func:
        return _remote.ByName(module, qualname)
    return None


def _check_address(address: str) -> str:
    """A scheduler address Dask can connect to (``tcp://host:port`` and the like)."""
    text = address.strip()
    if not text:
        raise ConfigurationError("address_or_client must not be an empty address")
    try:
        scheme, location = parse_address(text)
    except ValueError as exc:
        raise ConfigurationError(
            f"address_or_client {address!r} is not a scheduler address such as "
            f"'tcp://127.0.0.1:8786': {exc}"
        ) from exc
    if scheme not in _comm_backends:
        raise ConfigurationError(
            f"address_or_client {address!r}: unknown protocol {scheme!r}; valid: "
            f"{', '.join(sorted(_comm_backends))}"
        )
    if scheme in ("tcp", "tls"):
        try:
            _host, port = parse_host_port(location)
        except ValueError as exc:
            raise ConfigurationError(f"address_or_client {address!r}: {exc}") from exc
        if not isinstance(port, int) or not 1 <= port <= 65535:
            raise ConfigurationError(
                f"address_or_client {address!r} needs a port from 1 to 65535"
                + ("" if port is None else f", got {port}")
            )
    return text


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
    workers. One backend serves one running coordinator at a time (it may be started again
    after that one stops).

    Args:
        address_or_client: the scheduler's address (``"tcp://host:8786"``), a
            ``distributed.Client`` (used as is and left open at stop), or a cluster object
            such as ``LocalCluster`` (a client of its own is made, and closed at stop).
        in_flight: how many attempts may be on the cluster at once (1 to 1024): the
            coordinator's dispatch slots. Default: twice the cluster's threads when the
            coordinator starts (at least 2), following the cluster as workers come and go
            (until ``set_active_workers`` sets it by hand).
        resources: ``"auto"`` (see :data:`DEFAULT_RESOURCES`) or a mapping of weight to the
            worker resources its tokens need, e.g. ``{"heavy": {"gpu": 1}, "light": None}``
            (None or a weight not named: any worker).
        namespace: prefix of the storage-tier semaphores on the scheduler
            (``{namespace}-storage-{TIER}``): coordinators with the same namespace share one
            bound per tier.
        connect_timeout: seconds to wait for the scheduler at start.
        no_worker_timeout: seconds an attempt may wait on the cluster while no worker could
            run it (the cluster has no workers, or none declares the resources it needs);
            then it fails with :class:`~tokengate.BackendError`. None: wait as long as it
            takes (an adaptive cluster that scales from zero).

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
        no_worker_timeout: float | None = 60.0,
    ) -> None:
        if isinstance(address_or_client, str):
            address_or_client = _check_address(address_or_client)
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
        self._connect_timeout = _seconds("connect_timeout", connect_timeout)
        self._no_worker_timeout = (
            None if no_worker_timeout is None else _seconds("no_worker_timeout", no_worker_timeout)
        )
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified as attempts leave
        self._opening = False
        self._client: distributed.Client | None = None
        self._address: str | None = None
        self._owned = False
        self._rt: Runtime | None = None
        self._in_flight = in_flight or 2
        self._following = in_flight is None
        self._declared: frozenset[str] = frozenset()
        self._workers = 0
        self._threads = 0
        self._allowed_failures: int | None = None
        self._limits: dict[str, int] = {}
        self._semaphores: dict[str, Any] = {}
        #: token id -> the attempt of that token on its way to, or on, the cluster
        self._inflight: dict[int, _Attempt] = {}
        self._closing = False
        self._prefix = ""
        #: function -> how it travels: by name (a ByName), or itself (probed once)
        self._sent_as: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        self._watch_failed = False

    # -- lifecycle -------------------------------------------------------------------

    def open(self, coordinator: OperationsCoordinator) -> None:
        with self._lock:
            if self._client is not None or self._opening:
                raise ConfigurationError(
                    "this DaskBackend already serves a running coordinator; make one per "
                    "coordinator"
                )
            self._opening = True
        try:
            self._open(coordinator)
        finally:
            with self._lock:
                self._opening = False

    def _open(self, coordinator: OperationsCoordinator) -> None:
        target = self._target
        if isinstance(target, distributed.Client):
            if target.status not in ("running", "newly-created"):
                raise BackendError(f"the distributed.Client given is {target.status}, not running")
            client, owned = target, False
        else:
            where = target if isinstance(target, str) else type(target).__name__
            try:
                client = distributed.Client(
                    target, timeout=self._connect_timeout, set_as_default=False
                )
            except Exception as exc:
                raise BackendError(
                    f"could not connect to the Dask scheduler at {where}: {_reason(exc)}"
                ) from exc
            owned = True
        self._client, self._owned = client, owned
        self._address = client.scheduler.address
        self._closing = False
        self._prefix = uuid.uuid4().hex[:8]  # keys never repeat across runs
        self._limits = coordinator.storage_limits
        self._semaphores = {}
        self._following = self._fixed_in_flight is None
        try:
            self._refresh()
        except Exception as exc:
            self.close()
            raise BackendError(
                f"could not read the Dask cluster's workers: {_reason(exc)}"
            ) from exc
        self._in_flight = (
            self._target_in_flight() if self._fixed_in_flight is None else self._fixed_in_flight
        )
        try:
            # A lambda pickles by value: the scheduler needs nothing of this module for it.
            self._allowed_failures = int(
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
            self._address,
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
        entry = self._inflight.get(token_id)
        return None if entry is None else entry.token

    def set_storage_limit(self, tier: str, limit: int) -> None:
        with self._lock:  # not between a first use's reading of the limit and its register
            self._limits[tier] = limit
            client = self._client
            if client is None:
                return
            name = self._semaphore_name(tier)
            try:
                # Also when this run has not used the tier yet: the scheduler may hold it.
                moved = _retarget(client, name, limit, only_if_idle=False)
            except Exception:
                log.warning(
                    "dask: the cluster-wide bound of storage tier %s stays as it was: the "
                    "scheduler refused the change",
                    tier,
                    exc_info=True,
                )
                return
        if moved:
            log.info("dask: storage tier %s is bounded at %d across the cluster", tier, limit)

    def kill_unsent(self) -> int:
        """Kill the attempts that have not been sent yet (waiting for a storage lease):
        ``stop(wait=False)`` kills what has not started."""
        with self._lock:
            unsent = [a.token for a in self._inflight.values() if a.future is None]
        return sum(bool(token.kill()) for token in unsent)

    def close(self, timeout: float | None = None) -> None:
        with self._lock:
            self._closing = True
            running = [a.token for a in self._inflight.values()]
        # Their waiters get TokenKilled now; each slot calls its task off and returns.
        killed = sum(bool(token.kill()) for token in running)
        if killed:
            log.warning("dask: %d attempts still on the cluster at stop were killed", killed)
        with self._lock:
            # The slots leave within a slice: they release their leases while the client
            # still runs (a lease not released is held until the scheduler times it out).
            self._idle.wait_for(lambda: not self._inflight, timeout=_CLOSE_GRACE)
            client, self._client, self._rt = self._client, None, None
            semaphores, self._semaphores = self._semaphores, {}
        if client is None:
            return
        for sem in semaphores.values():
            _stop_refresh(client, sem)
        if self._owned:
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
        rt = self._rt
        if rt is not None:
            try:
                return rt.active_workers(1)
            except Exception:  # stopped meanwhile
                pass
        return self._in_flight

    def describe(self) -> dict[str, Any]:
        client = self._client
        return {
            "name": self.name,
            "scheduler": self._address if client is not None else None,
            "client": None if client is None else client.status,
            "workers": self._workers,
            "threads": self._threads,
            "resources": sorted(self._declared),
            "in_flight": self.in_flight,
            "running": sum(a.future is not None for a in list(self._inflight.values())),
            "allowed_failures": self._allowed_failures,
        }

    def __repr__(self) -> str:
        target = self._target
        where = (
            self._address
            if self._client is not None
            else (target if isinstance(target, str) else type(target).__name__)
        )
        return f"DaskBackend({where!r}, in_flight={self.in_flight})"

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
            if not self._following or rt is None or self._closing:
                continue
            try:
                now = rt.active_workers(1)
                if now != self._in_flight:
                    # Set by hand (set_active_workers): that count stands from now on.
                    self._following = False
                    log.info("dask: in_flight set to %d by hand; no longer following", now)
                    continue
                target = self._target_in_flight()
                if target != now:
                    rt.set_active_workers(1, target)
                    self._in_flight = target
                    log.info(
                        "dask: the cluster has %d threads now; %d attempts in flight at most",
                        self._threads,
                        target,
                    )
            except Exception:
                log.debug("dask: resizing the dispatch slots failed", exc_info=True)

    def _resources_for(self, weight: str) -> dict[str, float] | None:
        if self._mapping is not None:
            return self._mapping.get(weight)
        if weight in self._declared:
            return DEFAULT_RESOURCES[weight]
        return None

    def _unrunnable(self, need: Mapping[str, float] | None) -> str | None:
        """Why no worker of the cluster could run a task needing ``need`` (None: one can)."""
        if self._workers == 0:
            return "the cluster has no workers"
        missing = sorted(name for name in (need or ()) if name not in self._declared)
        if missing:
            return f"no worker declares resource {', '.join(map(repr, missing))}"
        return None

    def _semaphore_name(self, tier: str) -> str:
        return f"{self._namespace}-storage-{tier}"

    def _semaphore(self, client: distributed.Client, tier: str) -> Any:
        """The cluster-wide semaphore of storage tier ``tier``, registered on first use."""
        with self._lock:
            sem = self._semaphores.get(tier)
            if sem is not None:
                return sem
            if self._client is not client:
                raise BackendError("the Dask backend is closed: the coordinator is stopping")
            limit = self._limits[tier]
            sem = distributed.Semaphore(
                max_leases=limit,
                name=self._semaphore_name(tier),
                scheduler_rpc=client.scheduler,
                loop=client.loop,
            )
            try:
                try:
                    sem.register()
                except ValueError as exc:  # Dask: "Inconsistent max leases: ..."
                    # Left at another limit by an earlier run, or used by another coordinator
                    # now: a bound no one holds or waits for is taken over.
                    if not _retarget(client, sem.name, limit, only_if_idle=True):
                        raise ConfigurationError(
                            f"storage tier {tier} is bounded at another limit on this cluster, "
                            f"and in use (namespace {self._namespace!r}: {exc}); this "
                            f"coordinator has {limit}: give coordinators that share a "
                            "namespace the same storage_limits, or DaskBackend(namespace=...) "
                            "of their own"
                        ) from exc
                    log.info(
                        "dask: storage tier %s was bounded at another limit on the cluster, "
                        "unused: now %d",
                        tier,
                        limit,
                    )
                    sem.register()
            except BaseException as exc:
                _stop_refresh(client, sem)  # it started a periodic refresh already
                if isinstance(exc, (ConfigurationError, KeyboardInterrupt)):
                    raise
                raise BackendError(
                    f"could not register storage tier {tier}'s semaphore on the Dask "
                    f"scheduler: {_reason(exc)}"
                ) from exc
            self._semaphores[tier] = sem
            return sem

    # -- per call --------------------------------------------------------------------

    def _check(
        self,
        operation: str,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
    ) -> None:
        """Refuse a call whose function or arguments cannot be pickled for the cluster."""
        if isinstance(func, GuardedFunction):  # coordinator.submit(decorated_fn)
            raise UnpicklableArgument(
                f"{operation!r} is a @task_token_guard function submitted through submit(): "
                "a Dask worker has no coordinator to call it on; call it directly (fn(...)), "
                "or submit its plain function (fn.__wrapped__)"
            )
        for index, value in enumerate(args):
            if type(value) not in _SIMPLE:
                _probe_argument(value, operation, func, index)
        if kwargs:
            for name, value in kwargs.items():
                if type(value) not in _SIMPLE:
                    _probe_argument(value, operation, func, name)
        self._sendable(operation, func)

    def _sendable(self, operation: str, func: Callable[..., Any]) -> Any:
        """What is sent for ``func``: a reference by name, or the function itself once it
        was seen to pickle (then sent by value, with the globals it uses)."""
        try:
            sent = self._sent_as.get(func)
        except TypeError:  # not weakly referenceable: looked at every time
            sent = None
        if sent is not None:
            return sent
        sent = _by_name(func)
        if sent is None:
            try:
                _probe(func)
            except Exception as exc:
                raise UnpicklableArgument(
                    f"the function of {operation!r} cannot be pickled to send it to the Dask "
                    f"cluster ({_reason(exc)}); define it at module level, and keep locks, "
                    "sockets and context variables out of the globals it uses"
                ) from exc
            sent = func
        try:
            self._sent_as[func] = sent
        except TypeError:
            pass
        return sent

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
        entry = _Attempt(token, token.attempts)
        with self._lock:
            client = self._client
            if client is None or self._closing:
                raise BackendError("the Dask backend is closed: the coordinator is stopping")
            self._inflight[token.token_id] = entry  # before the submit: kill(id) finds it
        lease = None
        try:
            tier = token.storage_speed
            if tier is not None:
                lease = self._take_lease(client, entry, self._semaphore(client, tier))
                if lease is None:
                    return None
            elif self._abandoned(entry):  # killed or timed out as it began
                return None
            return self._run(client, entry, func, args, kwargs, lease is not None)
        finally:
            if lease is not None:
                _release(client, lease, tier)
            with self._lock:
                if self._inflight.get(token.token_id) is entry:
                    del self._inflight[token.token_id]
                self._idle.notify_all()

    def _abandoned(self, entry: _Attempt) -> bool:
        """Whether the attempt's result would be discarded now (killed, timed out, a newer
        attempt started) or the backend closes."""
        token = entry.token
        return token.state.is_settled or token.attempts != entry.attempt or self._closing

    def _take_lease(self, client: distributed.Client, entry: _Attempt, sem: Any) -> Any:
        """The storage tier's cluster-wide lease, taken here before the task is sent (so a
        token killed while it waits never runs); None if the attempt was abandoned first."""
        try:
            while not sem.acquire(timeout=_SLICE):
                if self._abandoned(entry):
                    return None
                _check_client(client, entry)
        except BackendError:
            raise
        except Exception as exc:  # the scheduler went away meanwhile
            _check_client(client, entry)
            raise BackendError(
                f"{entry}: could not take a lease of its storage tier on the Dask scheduler: "
                f"{_reason(exc)}"
            ) from exc
        if self._abandoned(entry):
            _release(client, sem, entry.token.storage_speed)
            return None
        return sem

    def _run(
        self,
        client: distributed.Client,
        entry: _Attempt,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        leased: bool,
    ) -> Any:
        """Send the attempt and wait for its outcome, following the cluster meanwhile."""
        token = entry.token
        need = self._resources_for(token.weight.value)
        future = entry.future = self._submit(client, entry, 0, func, args, kwargs, need)
        sent = 0
        stuck_since: float | None = None
        while True:
            try:
                # One wait on the client's loop, which also fetches the result: a kill or a
                # timeout is seen within one slice (the token's waiters are released by the
                # core at once; only the slot waits for the slice).
                return self._outcome(entry, future)
            except _Pending:
                pass
            if self._abandoned(entry):
                # The result would be discarded. A task that has not started is called off;
                # one that may run already keeps its lease (and this slot) until it ends, as
                # a local task keeps its permits, so the tier's bound holds.
                if leased and not self._closing and _may_run(client, future):
                    self._wait_out(client, entry, future)
                _cancel(future)
                return None
            _check_client(client, entry)
            if need is not None and self._mapping is None and not need.keys() <= self._declared:
                # "auto", and no worker declares the resource any more: run it anywhere.
                _cancel(future)
                need, sent = None, sent + 1
                future = entry.future = self._submit(client, entry, sent, func, args, kwargs, need)
                continue
            why = self._unrunnable(need)
            if why is None:
                stuck_since = None
            elif stuck_since is None:
                stuck_since = time.monotonic()
            elif (
                self._no_worker_timeout is not None
                and time.monotonic() - stuck_since >= self._no_worker_timeout
            ):
                _cancel(future)
                raise BackendError(
                    f"{entry}: no worker of the Dask cluster could run it for "
                    f"{self._no_worker_timeout:g} s ({why})"
                )

    def _wait_out(
        self, client: distributed.Client, entry: _Attempt, future: distributed.Future
    ) -> None:
        """Wait until an abandoned attempt's task ends (its outcome is dropped)."""
        while not future.done() and not self._closing and client.status == "running":
            try:
                future.result(timeout=_SLICE)
            except BaseException:
                pass

    def _submit(
        self,
        client: distributed.Client,
        entry: _Attempt,
        sent: int,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        need: dict[str, float] | None,
    ) -> distributed.Future:
        token, attempt = entry.token, entry.attempt
        operation = token.operation_type
        lane = _PRIORITY.get(token.priority, 0)
        key = f"{operation}-{self._prefix}-{token.token_id}-{attempt}"
        try:
            return client.submit(
                _remote.run,
                _remote.RemoteCall(self._sendable(operation, func), args, kwargs),
                key=key if sent == 0 else f"{key}-{sent}",
                pure=False,
                priority=lane + 1 if attempt > 1 else lane,
                resources=need,
            )
        except Exception as exc:
            if _is_pickling_error(exc):
                # A chain step's arguments (its parent's result) are first pickled here.
                self._check(operation, func, args, kwargs)
                raise UnpicklableArgument(
                    f"the call of {operation!r} cannot be pickled to send it to the Dask "
                    f"cluster ({_reason(exc)})"
                ) from exc
            raise BackendError(f"{entry}: Dask refused the task: {_reason(exc)}") from exc

    def _outcome(self, entry: _Attempt, future: distributed.Future) -> Any:
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
                f"{entry}: the Dask worker it ran or waited on died"
                f"{f' ({worker})' if worker else ''} and Dask gave up on the task"
            ) from exc
        except _NO_WORKER_ERRORS as exc:
            raise BackendError(
                f"{entry}: no worker of the Dask cluster could run it ({_reason(exc)})"
            ) from exc
        except (concurrent.futures.CancelledError, asyncio.CancelledError) as exc:
            _check_client(future.client, entry)  # cancelled by a closing client
            raise BackendError(
                f"{entry}: the Dask cluster dropped the task ({_reason(exc)})"
            ) from exc


class _Attempt:
    """One attempt of a token on its way to the cluster (``future`` None until it is sent)."""

    __slots__ = ("attempt", "future", "token")

    def __init__(self, token: TaskToken, attempt: int) -> None:
        self.token = token
        self.attempt = attempt
        self.future: distributed.Future | None = None

    def __str__(self) -> str:
        t = self.token
        return f"token {t.token_id} ({t.operation_type}), attempt {self.attempt}"


class _Pending(Exception):
    """The attempt's task has not finished yet."""


def _seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigurationError(f"{name} must be a number of seconds > 0, got {value!r}")
    return float(value)


def _retarget(client: distributed.Client, name: str, limit: int, *, only_if_idle: bool) -> bool:
    """Set the scheduler's bound of semaphore ``name``, if it is registered, to ``limit``
    (with ``only_if_idle``, only if no lease of it is held or awaited); whether it did. The
    public Semaphore API fixes ``max_leases`` at registration, so the scheduler's extension is
    changed in place (one step of its event loop) and its waiters are woken to look again."""

    def retarget(dask_scheduler: Any) -> bool:
        ext = dask_scheduler.extensions["semaphores"]
        if name not in ext.max_leases:
            return False  # not registered yet: it will be, with the new limit, at first use
        if only_if_idle and (ext.leases.get(name) or ext.metrics["pending"].get(name)):
            return False
        ext.max_leases[name] = limit
        ext.events[name].set()
        return True

    return bool(client.run_on_scheduler(retarget))


def _check_client(client: distributed.Client, entry: _Attempt) -> None:
    """Raise :class:`BackendError` once ``client`` closes (its futures never finish then)."""
    if client.status in ("closing", "closed"):
        raise BackendError(
            f"{entry}: the Dask client is {client.status} (the scheduler was lost, or it was "
            "closed) before the task finished"
        )


def _release(client: distributed.Client, sem: Any, tier: str | None) -> None:
    """Give a storage lease back (not once the client stopped: the scheduler times it out)."""
    if client.status != "running":
        return
    try:
        sem.release()
    except Exception:
        log.debug("dask: releasing a %s lease failed", tier, exc_info=True)


def _stop_refresh(client: distributed.Client, sem: Any) -> None:
    """Stop a semaphore's periodic lease refresh (it runs on the client's loop)."""
    refresh = getattr(sem, "refresh_callback", None)
    loop = client.loop
    if refresh is not None and loop is not None:
        loop.add_callback(refresh.stop)


def _may_run(client: distributed.Client, future: distributed.Future) -> bool:
    """Whether the scheduler may have given the task to a worker (or it ran): asked only for
    an abandoned attempt holding a lease; True when the scheduler cannot say."""
    key = future.key

    def state(dask_scheduler: Any) -> str | None:
        ts = dask_scheduler.tasks.get(key)
        return None if ts is None else ts.state

    try:
        st = client.run_on_scheduler(state)
    except Exception:
        return True
    return st not in (None, "released", "waiting", "queued", "no-worker", "forgotten")


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
        text = str(e).lower()
        if isinstance(e, pickle.PicklingError) or "pickle" in text or "serializ" in text:
            return True
        e = e.__cause__ or e.__context__
    return False
