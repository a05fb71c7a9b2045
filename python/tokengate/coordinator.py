"""``OperationsCoordinator``: starts the native runtime and its asyncio control loop, and
exposes admission control (drain, pause, resume), stats and worker counts."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import decimal
import inspect
import logging
import math
import numbers
import os
import threading
import time
import types
import typing
import weakref
from collections.abc import Callable, Coroutine, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from . import _core
from ._core import TaskToken
from ._types import STORAGE_SPEEDS
from .backends.base import Backend, LocalBackend
from .errors import ConfigurationError, CoordinatorForked, CoordinatorNotRunning, InvalidOption
from .guard.breaker import CircuitBreaker, Quarantine, guard_settings
from .guard.guard_house import GuardHouse
from .observe.events import EventFeed
from .policy import options as _options

if TYPE_CHECKING:
    from .dashboard import DashboardServer
    from .observe.metrics import MetricsServer
    from .policy.convergence import Convergence

__all__ = ["OperationsCoordinator"]

log = logging.getLogger("tokengate")

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_running: weakref.WeakSet[OperationsCoordinator] = weakref.WeakSet()
#: The names of the coordinators alive in this process (so a default name is never taken).
_names: weakref.WeakValueDictionary[str, OperationsCoordinator] = weakref.WeakValueDictionary()
_names_made = 0
_names_lock = threading.Lock()


def _take_name(coord: OperationsCoordinator, name: str | None) -> str:
    """``name``, or the first free one of "default", "coordinator-2", "coordinator-3", ..."""
    global _names_made
    with _names_lock:
        while name is None:
            _names_made += 1
            candidate = "default" if _names_made == 1 else f"coordinator-{_names_made}"
            if candidate not in _names:
                name = candidate
        _names[name] = coord
        return name


_SAMPLE_EVERY = 0.5
#: How long leaving a `with` block on Ctrl-C (or interpreter exit) waits for running tokens.
_INTERRUPT_GRACE = 1.0
#: The core's limits (sized so its queue indices and counters cannot overflow).
_MAX_MAILBOX_CAPACITY = 2**24
_MAX_POOL_CAPACITY = 2**40
#: Bounds of worker_stack_size, and its default when nothing else says (as on Linux).
_MIN_STACK = 64 * 1024
_MAX_STACK = 1024 * 1024 * 1024
_FALLBACK_STACK = 8 * 1024 * 1024
#: How long stop() waits for the event feed to deliver what is left.
_EVENTS_GRACE = 5.0
#: The longest stop() waits in one go, so that a concurrent stop(wait=False) is seen promptly.
_STOP_SLICE = 0.05


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise ConfigurationError(f"{name} must be {bound}, got {value}")
    return value


def _check_timeout(name: str, value: object) -> float | None:
    """A number of seconds >= 0, or None for "no limit". An infinite value (``math.inf``, or
    an int too large for a float) also means no limit and becomes None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ConfigurationError(f"{name} must be a number of seconds or None, got {value!r}")
    if value < 0:
        raise ConfigurationError(f"{name} must be >= 0, got {value}")
    try:
        seconds = float(value)
    except OverflowError:  # an int beyond the float range
        return None
    return None if seconds == math.inf else seconds


def _mode_from_env() -> Literal["threads", "inline"]:
    """The default ``mode``: ``"inline"`` if ``TOKENGATE_INLINE`` is 1/true/yes/on (any case),
    ``"threads"`` if it is unset, empty or 0/false/no/off; anything else is refused."""
    raw = os.environ.get("TOKENGATE_INLINE", "")
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return "inline"
    if value in ("", "0", "false", "no", "off"):
        return "threads"
    raise ConfigurationError(
        f"TOKENGATE_INLINE must be 1/true/yes/on or 0/false/no/off (or unset), got {raw!r}"
    )


def _check_storage_limits(limits: object) -> list[int] | None:
    """Per-tier permits from a ``{"SLOW": n, ...}`` mapping, in tier order; None: defaults."""
    if limits is None:
        return None
    if not isinstance(limits, Mapping):
        raise ConfigurationError(
            f"storage_limits must be a dict like {{'SLOW': 10}}, got {type(limits).__name__}"
        )
    out = dict(STORAGE_SPEEDS)
    for name, n in limits.items():
        key = name.upper() if isinstance(name, str) else name
        if key not in out:
            valid = ", ".join(STORAGE_SPEEDS)
            raise ConfigurationError(f"storage_limits: unknown tier {name!r}; valid: {valid}")
        out[key] = _check_int(f"storage_limits[{name!r}]", n, 1, 1_000_000)
    return list(out.values())


def _default_stack_size() -> int:
    """The stack a ``threading.Thread`` started now would get: ``threading.stack_size()`` if
    set, else the soft ``RLIMIT_STACK`` when finite and >= 2 MiB, else 8 MiB; kept within
    the bounds of ``worker_stack_size``."""
    size = threading.stack_size()
    if not size:
        size = _FALLBACK_STACK
        try:
            import resource
        except ImportError:  # not on Unix
            pass
        else:
            soft, _hard = resource.getrlimit(resource.RLIMIT_STACK)
            if soft != resource.RLIM_INFINITY and soft >= 2 * 1024 * 1024:
                size = soft
    return min(max(size, _MIN_STACK), _MAX_STACK)


class _ControlLoop:
    """An asyncio event loop in a daemon thread: admission policy, delayed retries and
    convergence run here; today it samples throughput."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.close()

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            if threading.current_thread() is not self._thread:
                self._thread.join()


class _Stop:
    """One ``stop()`` in progress. Concurrent ``stop()`` calls share it: they wait for its
    result, and one with ``wait=False`` escalates it (everything queued is killed, now and
    from then on, and its own timeout, if shorter, becomes the deadline)."""

    def __init__(
        self,
        rt: _core.Runtime,
        control: _ControlLoop | None,
        wait: bool,
        timeout: float | None,
        backend: Backend,
    ) -> None:
        self.rt = rt
        self.backend = backend
        self.control = control
        self.owner = threading.get_ident()
        self.done = threading.Event()
        self.result = False
        self._lock = threading.Lock()
        self._kill = not wait
        self._deadline = None if timeout is None else time.monotonic() + timeout

    @property
    def killing(self) -> bool:
        """Whether queued tokens are to be killed rather than run."""
        with self._lock:
            return self._kill

    def escalate(self, timeout: float | None) -> None:
        """A concurrent ``stop(wait=False, timeout=timeout)``: kill what is queued at once and
        finish by ``timeout`` (when given) even if the first caller allowed more."""
        with self._lock:
            self._kill = True
            if timeout is not None:
                deadline = time.monotonic() + timeout
                if self._deadline is None or deadline < self._deadline:
                    self._deadline = deadline
        self.kill_pending()

    def kill_pending(self) -> int:
        """Kill every token that has not started: queued here, or taken by the backend but
        not sent anywhere yet."""
        return self.rt.kill_pending() + self.backend.kill_unsent()

    def left(self) -> float | None:
        """Seconds until the deadline (0.0 once it passed), None without one."""
        with self._lock:
            deadline = self._deadline
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def slice(self) -> float:
        """How long to wait before looking at the deadline and the kill flag again."""
        left = self.left()
        return _STOP_SLICE if left is None else min(_STOP_SLICE, left)


class OperationsCoordinator:
    """Admits tokens, routes them by weight to per-core mailboxes and runs them on worker
    threads pinned to CPU cores.

    Args:
        workers_per_core: worker threads started per core.
        mailbox_capacity: bounded FIFO size of each worker's mailbox (1 to 2**24).
        cores: virtual cores to route over (default: the CPUs this process may use; more
            than there are map round-robin onto them).
        pool_capacity: how many tokens may wait in the pool (1 to 2**40).
        overflow: ``"block"`` (the caller waits for room, GIL released) or ``"reject"``
            (raises :class:`PoolFull`).
        submit_timeout: with ``"block"``, the longest a submission waits before
            :class:`PoolFull` (None: no limit).
        pin_workers: pin each worker to its core's CPU (Linux).
        max_workers_per_core: the most workers :meth:`set_active_workers` may ask for.
        worker_stack_size: stack size in bytes of each worker thread (64 KiB to 1 GiB).
            Default: what a ``threading.Thread`` gets, i.e. ``threading.stack_size()`` if it
            was set, else the soft ``RLIMIT_STACK`` when finite and at least 2 MiB, else
            8 MiB (read at :meth:`start`).
        decorated_calls: whether calls of ``@task_token_guard`` functions come to this
            coordinator while it runs (the last started one that accepts them gets them);
            ``False`` for a coordinator used only through :meth:`submit` or an
            :class:`~tokengate.Executor`, so it never takes decorated calls from another.
        mode: ``"threads"`` (the default: tokens run on the workers) or ``"inline"``
            (passthrough: every call runs synchronously in its caller and returns a finished
            token; see docs/policy.md). The environment variable ``TOKENGATE_INLINE`` set
            to 1/true/yes/on makes ``"inline"`` the default (0/false/no/off or unset:
            ``"threads"``; anything else raises :class:`ConfigurationError`).
        storage_limits: tokens of each storage tier that may run at once, e.g.
            ``{"SLOW": 4}``; tiers not named keep ``STORAGE_SPEEDS`` (SLOW 10, MODERATE 25,
            FAST 50, INSANE 70).
        memory_budget: bytes of arguments that queued tokens may hold (estimated: the
            length of bytes/str arguments, 8 bytes a slot of containers; calls estimated
            under 1 KiB are bounded by ``pool_capacity`` alone). Above it, ``overflow``
            applies as at the pool bound (:class:`PoolFull`, or waiting for room). Default
            75 MiB; None: no budget.
        grow_on_demand: a monitor thread gives a core more active workers (up to
            ``max_workers_per_core``) within about a millisecond when every worker of the core
            has been executing its token for 1 ms or more with the GIL released (a sleep, I/O,
            a lock) while tokens for the core queue, as ``ThreadPoolExecutor`` starts threads
            on demand. ``False``: a core runs exactly the workers it was given (a hard limit
            of its concurrency). See docs/convergence.md.
        convergence_interval: seconds between convergence rounds on the control loop, which
            set each core's active worker count from what it did meanwhile (fewer under light
            load, down to 1; one more per round under sustained pressure). ``None`` or ``0``
            disables convergence. Default 5.0.
        guard_house: keep per-operation health, breakers, spike detection and the
            execution history (docs/guard-house.md). ``False`` turns all of it off (no
            breaker gate, no history), e.g. to measure what it costs.
        auto_block: breakers of every operation trip by themselves (with the defaults of
            :class:`~tokengate.CircuitBreaker`); default False: the Guard House observes and
            only an operator (``guard_house.block()``) blocks an operation.
        circuit_breaker: the breaker settings of every operation (a
            :class:`~tokengate.CircuitBreaker`, or True for its defaults: implies
            ``auto_block``). An operation's own ``task_token_guard(circuit_breaker=...)``
            takes precedence.
        quarantine: True or a :class:`~tokengate.Quarantine`: spike detection for every
            operation (default off; per operation with ``task_token_guard(quarantine=...)``).
        quarantine_dir: where the quarantine store keeps its records (default
            ``$TOKENGATE_QUARANTINE_DIR``, else under the user's data directory).
        history_size: execution records kept (the newest, in a ring; 0 keeps none).
        name: what the coordinator is called in metrics (the ``coordinator`` label) and
            logs. Default: ``"default"`` for the first coordinator made without a name in
            this process, then ``"coordinator-2"``, ``"coordinator-3"``, ... (skipping names
            of coordinators alive).
        event_capacity: lifecycle events the core buffers for :attr:`events` subscribers
            (1 to 2**24; beyond it events are dropped and counted, never waited for).
        tracing: one OpenTelemetry span per attempt (docs/observability.md): True uses the
            global tracer provider, or pass a ``TracerProvider``. Needs
            ``pip install 'tokengate[otel]'``.
        backend: what executes the attempts (docs/scale-out.md): None or
            :class:`~tokengate.backends.LocalBackend` for this machine's worker threads, or
            e.g. ``DaskBackend("tcp://scheduler:8786")`` for a Dask cluster. Everything
            else (admission, the gate, priorities, timeouts, retries, the Guard House,
            history, events, metrics) is the same on every backend. A remote backend sets
            the local worker threads itself (one core of dispatch slots, unpinned, without
            convergence or on-demand growth): ``cores``, ``workers_per_core``,
            ``pin_workers``, ``grow_on_demand`` and ``convergence_interval`` then do not
            apply, and ``mode="inline"`` is refused.
    """

    def __init__(
        self,
        workers_per_core: int = 4,
        mailbox_capacity: int = 120,
        cores: int | None = None,
        pool_capacity: int = 100_000,
        overflow: Literal["block", "reject"] = "block",
        submit_timeout: float | None = None,
        pin_workers: bool = True,
        max_workers_per_core: int | None = None,
        worker_stack_size: int | None = None,
        *,
        decorated_calls: bool = True,
        mode: Literal["threads", "inline"] | None = None,
        storage_limits: Mapping[str, int] | None = None,
        memory_budget: int | None = 75 * 1024 * 1024,
        grow_on_demand: bool = True,
        convergence_interval: float | None = 5.0,
        guard_house: bool = True,
        auto_block: bool = False,
        circuit_breaker: bool | CircuitBreaker | None = None,
        quarantine: bool | Quarantine | None = None,
        quarantine_dir: str | os.PathLike[str] | None = None,
        history_size: int = 10_000,
        name: str | None = None,
        event_capacity: int = 65_536,
        tracing: bool | Any = False,
        backend: Backend | None = None,
    ) -> None:
        self._workers_per_core = _check_int("workers_per_core", workers_per_core, 1, 1024)
        self._mailbox_capacity = _check_int(
            "mailbox_capacity", mailbox_capacity, 1, _MAX_MAILBOX_CAPACITY
        )
        self._cores = None if cores is None else _check_int("cores", cores, 1, 4096)
        self._pool_capacity = _check_int("pool_capacity", pool_capacity, 1, _MAX_POOL_CAPACITY)
        if overflow not in ("block", "reject"):
            raise ConfigurationError(f"overflow must be 'block' or 'reject', got {overflow!r}")
        self._overflow = overflow
        self._submit_timeout = _check_timeout("submit_timeout", submit_timeout)
        self._pin = bool(pin_workers)
        if not isinstance(decorated_calls, bool):
            raise ConfigurationError(
                f"decorated_calls must be True or False, got {decorated_calls!r}"
            )
        self._decorated_calls = decorated_calls
        if mode is None:
            mode = _mode_from_env()
        if mode not in ("threads", "inline"):
            raise ConfigurationError(f"mode must be 'threads' or 'inline', got {mode!r}")
        self._mode = mode
        if backend is None:
            backend = LocalBackend()
        elif not isinstance(backend, Backend):
            raise ConfigurationError(
                "backend must be None, a LocalBackend() or a remote backend such as "
                f"DaskBackend(address), got {type(backend).__name__}"
            )
        if mode == "inline" and not backend.local:
            raise ConfigurationError(
                f"mode='inline' (or TOKENGATE_INLINE) runs every call in its caller: it "
                f"cannot take the {backend.name} backend, which runs them remotely"
            )
        self._backend: Backend = backend
        self._storage_limits = _check_storage_limits(storage_limits)
        self._memory_budget = (
            None
            if memory_budget is None
            else _check_int("memory_budget", memory_budget, 1024, 2**62)
        )
        if not isinstance(grow_on_demand, bool):
            raise ConfigurationError(
                f"grow_on_demand must be True or False, got {grow_on_demand!r}"
            )
        self._grow_on_demand = grow_on_demand
        # Imported here, not with the package: `import tokengate` stays as fast as it was.
        from .policy.convergence import check_interval

        self._convergence_interval = check_interval("convergence_interval", convergence_interval)
        self._max_workers = (
            None
            if max_workers_per_core is None
            else _check_int("max_workers_per_core", max_workers_per_core, workers_per_core, 1024)
        )
        self._stack_size = (
            None
            if worker_stack_size is None
            else _check_int("worker_stack_size", worker_stack_size, _MIN_STACK, _MAX_STACK)
        )
        for flag, value in (("guard_house", guard_house), ("auto_block", auto_block)):
            if not isinstance(value, bool):
                raise ConfigurationError(f"{flag} must be True or False, got {value!r}")
        if circuit_breaker is not None and not isinstance(circuit_breaker, (bool, CircuitBreaker)):
            raise InvalidOption(
                "circuit_breaker must be True, False, a CircuitBreaker(...) or None, got "
                f"{circuit_breaker!r}"
            )
        if not guard_house and (auto_block or circuit_breaker or quarantine):
            raise ConfigurationError(
                "guard_house=False turns the Guard House off: it cannot take auto_block, "
                "circuit_breaker or quarantine as well"
            )
        if quarantine_dir is not None and not isinstance(quarantine_dir, (str, os.PathLike)):
            raise ConfigurationError(
                f"quarantine_dir must be a path (str or os.PathLike) or None, "
                f"got {quarantine_dir!r}"
            )
        if quarantine_dir is not None and os.path.exists(quarantine_dir):
            if not os.path.isdir(quarantine_dir):
                raise ConfigurationError(f"quarantine_dir {quarantine_dir!r} is not a directory")
        self._guard_on = guard_house
        self._guard_defaults = guard_settings(
            circuit_breaker if circuit_breaker is not None else (True if auto_block else None),
            quarantine,
        )
        self._history_size = _check_int("history_size", history_size, 0, 2**24)
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ConfigurationError(f"name must be a non-empty str or None, got {name!r}")
        #: The coordinator's name (the ``coordinator`` label of its metrics).
        self.name: str = _take_name(self, name)
        self._event_capacity = _check_int("event_capacity", event_capacity, 1, 2**24)
        self._attempt_hook: Callable[..., Any] | None = None
        if tracing is not False and tracing is not None:
            from .observe.otel import attempt_hook

            self._attempt_hook = attempt_hook(None if tracing is True else tracing)
        #: The lifecycle event feed (docs/observability.md): ``events.subscribe(fn)``,
        #: ``async for event in events``.
        self.events = EventFeed(name=self.name)
        self._metrics_registry: Any = None
        #: The Guard House: health, breakers, quarantine and history (docs/guard-house.md).
        self.guard_house = GuardHouse(self._last_runtime, quarantine_dir)
        self._lock = threading.RLock()
        self._rt: _core.Runtime | None = None
        self._last_rt: _core.Runtime | None = None
        self._control: _ControlLoop | None = None
        self._stopping: _Stop | None = None
        self._rate = 0.0
        self._forked = False
        self._convergence: Convergence | None = None
        self._launchables: dict[str, Callable[..., Any]] = {}
        self._started_at: float | None = None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> OperationsCoordinator:
        """Start the workers and the control loop; decorated calls now come here."""
        with self._lock:
            if self._forked:
                raise CoordinatorForked(
                    "this coordinator was started before os.fork(); "
                    "create a new OperationsCoordinator in this process"
                )
            if self._rt is not None:
                raise ConfigurationError("this coordinator is already running")
            # Token ids keep increasing across stop() + start() of this coordinator.
            first_id = 1 if self._last_rt is None else self._last_rt.next_token_id
            backend = self._backend
            backend.open(self)
            try:
                rt = self._make_runtime(backend, first_id)
                backend.attach(rt)
                rt.start()
            except BaseException:
                backend.close()
                raise
            self._started_at = time.time()
            self._rt = rt
            self._last_rt = rt
            self.events._attach(rt)
            self._control = _ControlLoop(f"tokengate-control-{id(self):x}")
            self._control.start()
            self._control.submit(self._sample_rate())
            if self._convergence_interval is not None and backend.local:
                from .policy.convergence import Convergence, ConvergenceOptions

                self._convergence = Convergence(
                    rt, self._convergence_interval, ConvergenceOptions()
                )
                self._control.submit(self._convergence.run())
            watch = backend.control()
            if watch is not None:
                self._control.submit(watch)
            _running.add(self)
        if self._pin and backend.local and not rt.pinned:
            log.warning(
                "worker threads could not be pinned to CPUs on this platform; they run unpinned"
            )
        log.debug(
            "coordinator started: %d cores x %d workers, cpus %s, backend %s",
            rt.cores,
            rt.active_workers(1),
            rt.cpu_map,
            backend.name,
        )
        return self

    def _make_runtime(self, backend: Backend, first_id: int) -> _core.Runtime:
        """The runtime of one run, with its worker layout and hooks (not started)."""
        layout = backend.layout()
        remote = not backend.local
        rt = _core.Runtime(
            cores=self._cores if layout is None else layout.cores,
            workers_per_core=self._workers_per_core if layout is None else layout.workers,
            max_workers_per_core=(self._max_workers if layout is None else layout.max_workers),
            mailbox_capacity=self._mailbox_capacity,
            pool_capacity=self._pool_capacity,
            overflow=self._overflow,
            submit_timeout=self._submit_timeout,
            pin_workers=self._pin and not remote,
            first_token_id=first_id,
            worker_stack_size=(
                _default_stack_size() if self._stack_size is None else self._stack_size
            ),
            decorated_calls=self._decorated_calls,
            mode=self._mode,
            storage_limits=self._storage_limits,
            memory_budget=self._memory_budget,
            grow_on_demand=self._grow_on_demand and not remote,
            guard_house=self._guard_on,
            history_size=self._history_size,
            guard_hook=_quarantine_hook(self.guard_house),
            event_capacity=self._event_capacity,
        )
        hook = _compose_hooks(self._attempt_hook, backend.attempt_hook())
        if hook is not None:
            rt.set_attempt_hook(hook)
        check = backend.submit_check()
        if check is not None:
            rt.set_submit_check(check)
        if self._guard_on:
            if self._guard_defaults is not None:
                rt.guard_defaults(self._guard_defaults)
            self.guard_house._restore(rt)
        return rt

    def stop(self, wait: bool = True, timeout: float | None = None) -> bool:
        """Stop the coordinator.

        ``wait=True`` finishes queued and running tokens first; ``wait=False`` kills every
        token that has not started (its waiters get :class:`TokenKilled`) and lets running
        ones finish. With ``timeout``, tokens still queued when it passes are killed too.
        Returns False if some worker was still busy when ``timeout`` passed.
        Stopping a coordinator that is not running does nothing (returns True).

        While one ``stop()`` is in progress, another one (from any thread) does not start a
        second stop: it waits, up to its own ``timeout``, for the first and returns its
        result (False if its ``timeout`` passed first). With ``wait=False`` it escalates the
        first: every queued token is killed at once and the first finishes by this call's
        ``timeout``. Called from inside a task of this coordinator, or from a done callback
        run by the thread doing the stop, it does not wait for the stop in progress (which
        waits for that task or that callback): it returns False at once, or the result if
        that stop already finished.
        """
        timeout = _check_timeout("timeout", timeout)
        with self._lock:
            rt, control, pending = self._rt, self._control, self._stopping
            if self._forked:
                # In a forked child the workers (and the control loop) live in the parent.
                self._rt = self._control = self._stopping = None
                return True
            if rt is None:
                if pending is None:
                    return True
            else:
                self._rt = None
                self._control = None
                # Closed under the lock: a start() right after this reads the old runtime's
                # next token id only once no new token can be accepted there.
                rt.close()
                pending = None
                stop = self._stopping = _Stop(rt, control, wait, timeout, self._backend)
        if pending is not None:
            return self._join_stop(pending, wait, timeout)
        # This call does the stop (inline, so Ctrl-C lands in stop() itself).
        rt = stop.rt
        joined = False
        try:
            if stop.killing:
                # before unpause, so nothing paused in the pool starts meanwhile
                stop.kill_pending()
            rt.unpause()
            # Wait in slices: a concurrent stop(wait=False) may kill the queue or shorten the
            # deadline meanwhile.
            while not rt.wait_quiet(stop.slice()):
                if stop.killing:
                    stop.kill_pending()  # a submission that raced with close() got in
                if stop.left() == 0.0:
                    killed = stop.kill_pending()
                    log.warning("stop(): timeout passed, %d queued tokens were killed", killed)
                    break
            while True:
                if rt.shutdown(stop.slice()):
                    joined = True
                    break
                if stop.left() == 0.0:
                    break
            stop.kill_pending()  # anything that raced in after the workers left
        except BaseException:
            # Interrupted (Ctrl-C) while waiting: still leave nothing running behind.
            try:
                stop.kill_pending()
                rt.shutdown(_INTERRUPT_GRACE)
            finally:
                self._finish_stop(stop, False)
            raise
        self._finish_stop(stop, joined)
        return joined

    def _join_stop(self, pending: _Stop, wait: bool, timeout: float | None) -> bool:
        """A stop() while another one is in progress: wait for it (escalate it first when
        ``wait`` is False) and return its result."""
        if not wait:
            pending.escalate(timeout)
        if pending.owner == threading.get_ident() or pending.rt.on_worker_thread():
            # Inside one of its tasks (the stop in progress waits for this very task), or in
            # a done callback the stopping thread runs: waiting here would never end.
            return pending.result if pending.done.is_set() else False
        try:
            finished = pending.done.wait(timeout)
        except BaseException:
            # Ctrl-C while waiting for another thread's stop(): stop waiting for the queue.
            pending.escalate(_INTERRUPT_GRACE)
            raise
        return pending.result if finished else False

    def _finish_stop(self, stop: _Stop, result: bool) -> None:
        try:
            try:
                if stop.control is not None:
                    stop.control.stop()
            finally:
                # Tokens a remote backend still executes end now (killed), never left waiting.
                self._backend.close(stop.left())
        finally:
            try:
                # Bounded: a subscriber that never returns must not keep stop() waiting.
                self.events._detach(timeout=_EVENTS_GRACE, rt=stop.rt)
            except Exception:  # pragma: no cover - never keeps a stop from finishing
                log.exception("stopping the event feed of %r failed", self)
            with self._lock:
                if self._stopping is stop:
                    self._stopping = None
                if self._rt is None:
                    _running.discard(self)
            stop.result = result
            stop.done.set()

    def __enter__(self) -> OperationsCoordinator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            # Ctrl-C: don't make the user wait for queued work (or a task that never ends).
            self.stop(wait=False, timeout=_INTERRUPT_GRACE)
        else:
            self.stop()

    async def __aenter__(self) -> OperationsCoordinator:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and issubclass(
            exc_type, (KeyboardInterrupt, asyncio.CancelledError)
        ):
            # Ctrl-C (asyncio.run turns it into a cancellation) or a cancelled task: as in
            # the sync `with`, don't wait for queued work or a task that never ends.
            wait, timeout = False, _INTERRUPT_GRACE
        else:
            wait, timeout = True, None
        try:
            await asyncio.to_thread(self.stop, wait, timeout)
        except asyncio.CancelledError:
            # Cancelled while stop() waits in its thread (a second Ctrl-C, the task being
            # cancelled): escalate that stop, wait out the grace period, and leave.
            self.stop(wait=False, timeout=_INTERRUPT_GRACE)
            raise

    # -- admission -------------------------------------------------------------------

    def _runtime(self) -> _core.Runtime:
        rt = self._rt
        if self._forked:
            raise CoordinatorForked(
                "this coordinator was started before os.fork(): its workers live in the "
                "parent process; start a new OperationsCoordinator in this process"
            )
        if rt is None:
            raise CoordinatorNotRunning(
                "this OperationsCoordinator is not running: call start() or use `with`"
            )
        return rt

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskToken:
        """Run ``fn(*args, **kwargs)`` as a token (weight medium) on this coordinator."""
        return self._runtime().submit(fn, args, kwargs or None)

    def drain(self, timeout: float | None = None) -> dict[str, Any]:
        """Close admission (new calls raise :class:`AdmissionClosed`), un-pause, and wait
        until every accepted token is settled. Returns what happened meanwhile:
        ``completed``, ``failed``, ``killed``, ``expired`` (tokens that ended TIMED_OUT),
        ``remaining``, ``seconds``, and ``timed_out`` (whether this drain's own ``timeout``
        passed first).
        :meth:`resume` reopens admission."""
        timeout = _check_timeout("timeout", timeout)
        rt = self._runtime()
        before = rt.stats()
        started = time.monotonic()
        rt.close()
        rt.unpause()
        finished = rt.wait_quiet(timeout)
        after = rt.stats()
        return {
            "completed": after["completed"] - before["completed"],
            "failed": after["failed"] - before["failed"],
            "killed": after["killed"] - before["killed"],
            "expired": after["timed_out"] - before["timed_out"],
            "remaining": rt.in_flight(),
            "seconds": time.monotonic() - started,
            "timed_out": not finished,
        }

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every accepted token is settled, without closing admission (new calls
        keep coming in and are waited for too); True if that happened within ``timeout``.
        :meth:`drain` is this after closing admission."""
        timeout = _check_timeout("timeout", timeout)
        return self._runtime().wait_quiet(timeout)

    def pause(self) -> None:
        """New tokens wait in the pool (WAITING) until :meth:`resume`; admitted ones run."""
        self._runtime().pause()

    def resume(self) -> None:
        """Reopen admission after :meth:`drain` and let the pool feed workers after
        :meth:`pause`."""
        rt = self._runtime()
        rt.open()
        rt.unpause()

    # -- introspection ---------------------------------------------------------------

    def _last_runtime(self) -> _core.Runtime:
        if self._forked:
            return self._runtime()  # raises CoordinatorForked
        rt = self._rt or self._last_rt
        if rt is None:
            raise CoordinatorNotRunning(
                "this OperationsCoordinator was never started: call start() or use `with`"
            )
        return rt

    def stats(self) -> dict[str, Any]:
        """Counters (created, waiting, admitted, executing, completed, failed, killed),
        configuration and the per-core distribution (``per_core``). After :meth:`stop` it
        reports the final counts of the last run."""
        rt = self._last_runtime()
        s: dict[str, Any] = rt.stats()
        s["running"] = self._rt is not None
        s["paused"] = rt.paused
        s["admission_open"] = self._rt is not None and not rt.closed
        s["throughput_per_s"] = self._rate if self._rt is not None else 0.0
        s["events"] = self.events.stats()
        s["backend"] = self._backend.describe()
        conv = self._convergence
        if conv is not None and conv.rt is rt:
            s["convergence"] = conv.summary()
        else:
            from .policy.convergence import Convergence

            # (a remote backend runs no convergence: its dispatch slots follow the cluster)
            interval = self._convergence_interval if self._backend.local else None
            s["convergence"] = Convergence.empty_summary(interval)
        return s

    # -- observability ---------------------------------------------------------------

    def serve_dashboard(
        self, host: str = "127.0.0.1", port: int = 0, **options: Any
    ) -> DashboardServer:
        """Serve the live dashboard (docs/dashboard.md) from a background thread at
        ``http://host:port/`` (port 0: a free port, see the result's ``.url``); close it with
        the result's ``close()``. Binds to loopback unless told otherwise and always needs a
        login; ``options`` are those of :func:`tokengate.dashboard.serve` (users, audit_log,
        TLS, ...). Needs ``pip install 'tokengate[dashboard]'``."""
        from .dashboard import serve

        return serve(self, host, port, **options)

    def serve_metrics(self, port: int = 0, addr: str = "127.0.0.1") -> MetricsServer:
        """Serve this coordinator's Prometheus metrics at ``http://addr:port/metrics`` from
        a background thread (port 0: a free port, see the result's ``.port``); close it with
        the result's ``close()``. Binds to loopback unless told otherwise; the endpoint has
        no login, so binding elsewhere logs a warning. See docs/observability.md."""
        from .observe.metrics import serve

        return serve(self, port, addr)

    @property
    def metrics_registry(self) -> Any:
        """This coordinator's own ``prometheus_client.CollectorRegistry`` (several
        coordinators never collide; each sample has a ``coordinator`` label)."""
        from .observe.metrics import registry_for

        return registry_for(self)

    def dump_history(self, path: str | os.PathLike[str]) -> int:
        """Writes the execution history to ``path`` as JSON; returns the records written
        (same as ``guard_house.dump_history``)."""
        return self.guard_house.dump_history(path)

    # -- tokens by id ------------------------------------------------------------------

    def queued(self, limit: int = 50) -> list[TaskToken]:
        """Up to ``limit`` tokens that have not started: in the pool (high lane first), in a
        mailbox, held by a limit or a storage tier, or waiting for a retry."""
        return self._runtime().queued(_check_int("limit", limit, 0, 1_000_000))

    def kill(self, token_id: int) -> bool:
        """Kill the queued token ``token_id`` (see :meth:`queued`): it ends KILLED and its
        waiters get :class:`TokenKilled`. With a remote backend (docs/scale-out.md) a token
        running there is killed too (its task is called off). False (nothing changes) if no
        such token has that id: it runs on this machine (kill it through its
        ``TaskToken.kill()``), finished, or is unknown."""
        rt = self._runtime()
        token_id = _check_id(token_id)
        token = rt.find_queued(token_id)
        if token is not None:
            return token.cancel_queued()
        # A remote backend knows the tokens it executes: killing one cancels its task there.
        running = self._backend.running(token_id)
        return running is not None and running.kill()

    # -- launchable operations -----------------------------------------------------------

    @overload
    def register_launchable(self, fn: F, /, *, name: str | None = None) -> F: ...

    @overload
    def register_launchable(self, /, *, name: str | None = None) -> Callable[[F], F]: ...

    def register_launchable(self, fn: Any = None, /, *, name: str | None = None) -> Any:
        """Let the dashboard's admins launch ``fn`` (a ``@task_token_guard`` function or any
        callable) by ``name`` (default: its ``__name__``) with JSON arguments; see
        :meth:`launch`. Returns ``fn``, so it also works as a decorator, with or without
        ``name=``. Registering another function under a name in use raises
        :class:`ConfigurationError`."""
        if fn is None:
            return lambda f: self.register_launchable(f, name=name)
        if not callable(fn):
            raise ConfigurationError(f"register_launchable() needs a callable, got {fn!r}")
        if inspect.iscoroutinefunction(fn):
            raise ConfigurationError(
                f"{fn!r} is a coroutine function: tokens run plain callables; launch a "
                "function that calls asyncio.run() instead"
            )
        key = getattr(fn, "__name__", None) if name is None else name
        if not isinstance(key, str) or not key.strip() or len(key) > 200:
            raise ConfigurationError(
                f"a launchable's name must be a non-empty str of at most 200 characters, "
                f"got {key!r}" + (" (pass name=...)" if name is None else "")
            )
        try:
            inspect.signature(fn)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(
                f"{key!r} cannot be launched: its signature cannot be read ({exc})"
            ) from None
        with self._lock:
            known = self._launchables.get(key)
            if known is not None and known is not fn:
                raise ConfigurationError(f"a launchable named {key!r} is already registered")
            self._launchables[key] = fn
        return fn

    def launchables(self) -> dict[str, Callable[..., Any]]:
        """The functions :meth:`register_launchable` registered, by name."""
        with self._lock:
            return dict(self._launchables)

    def launch(
        self,
        name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> TaskToken:
        """Submit the launchable ``name`` with ``args`` and ``kwargs`` to this coordinator and
        return its token. The arguments are bound against the function's signature first:
        an unknown name or arguments that do not fit raise :class:`InvalidOption` before
        anything is submitted."""
        with self._lock:
            fn = self._launchables.get(name) if isinstance(name, str) else None
            known = sorted(self._launchables)
        if fn is None:
            raise InvalidOption(
                f"no launchable named {name!r}; registered: {', '.join(map(repr, known)) or 'none'}"
            )
        if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
            raise InvalidOption(f"args of {name!r} must be a list, got {type(args).__name__}")
        if kwargs is None:
            kwargs = {}
        if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
            raise InvalidOption(f"kwargs of {name!r} must be a dict with str keys, got {kwargs!r}")
        signature = _signature(fn)
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise InvalidOption(f"the arguments do not fit {name}{signature}: {exc}") from None
        _check_argument_types(name, signature, bound)
        rt = self._runtime()
        if isinstance(fn, _core.GuardedFunction):
            return rt.call_guarded(fn, tuple(args), dict(kwargs))
        return rt.submit(fn, tuple(args), dict(kwargs) or None)

    # -- policy ------------------------------------------------------------------------

    def reprioritize(self, token_id: int, priority: str) -> bool:
        """Move the queued token ``token_id`` to lane ``priority`` (high, normal, low); it
        goes to the back of that lane. False (nothing changes) if it started, finished, or is
        not queued here. A token held by a limiter (waiting for a permit) takes the new
        priority in the limiter's queue too."""
        return self._runtime().reprioritize(
            _check_id(token_id), ("high", "normal", "low")[_options.parse_priority(priority)]
        )

    def reroute(self, token_id: int, weight: str) -> bool:
        """Route the queued token ``token_id`` as ``weight`` (light, medium, heavy): it moves
        to a core that takes that weight. False (nothing changes) if it started, finished,
        or is not queued here."""
        return self._runtime().reroute(_check_id(token_id), _options.parse_weight(weight).value)

    def set_limit(
        self,
        operation: str,
        *,
        max_concurrency: int | None = None,
        rate_limit: float | None = None,
        rate_burst: int | None = None,
        limit_by: str | None = None,
    ) -> None:
        """Set the limit of ``operation`` (its ``operation_type``) for this coordinator,
        replacing the one its decorator declares: at most ``max_concurrency`` running at
        once and/or ``rate_limit`` per second (``rate_burst`` at once), per operation or per
        value of the tag ``limit_by``. Raising a limit admits waiting tokens at once;
        lowering one never stops running tokens. With neither ``max_concurrency`` nor
        ``rate_limit`` the operation runs unlimited (its decorator's limit is lifted too)."""
        if not isinstance(operation, str) or not operation:
            raise ConfigurationError(f"operation must be a non-empty str, got {operation!r}")
        clean = _options.normalize(
            {
                "max_concurrency": max_concurrency,
                "rate_limit": rate_limit,
                "rate_burst": rate_burst,
                "limit_by": limit_by,
            }
        )
        self._runtime().set_limit(
            operation,
            clean["max_concurrency"],
            clean["rate_limit"],
            clean["rate_burst"],
            clean["limit_by"],
        )

    def set_storage_limit(self, tier: str, limit: int) -> None:
        """Set how many tokens of storage tier ``tier`` (SLOW, MODERATE, FAST, INSANE) may run
        at once; raising it admits waiting tokens at once."""
        limit = _check_int("limit", limit, 1, 1_000_000)
        self._runtime().set_storage_limit(tier, limit)
        self._backend.set_storage_limit(tier.upper(), limit)  # the core took any case

    def set_active_workers(self, core: int, n: int) -> None:
        """Set how many workers of 1-based ``core`` receive new work (1 to
        ``max_workers_per_core``); threads start as needed. With ``grow_on_demand`` and
        convergence on (the defaults) the count changes again as the load does."""
        self._runtime().set_active_workers(core, n)

    def active_workers(self, core: int) -> int:
        """How many workers of 1-based ``core`` receive new work."""
        return self._runtime().active_workers(core)

    @property
    def running(self) -> bool:
        """Whether this coordinator's workers are running (in this process)."""
        return self._rt is not None and not self._forked

    @property
    def storage_limits(self) -> dict[str, int]:
        """The storage-tier limits each run starts with (``storage_limits=`` over
        ``STORAGE_SPEEDS``; :meth:`set_storage_limit` changes a running one's)."""
        limits = self._storage_limits
        if limits is None:
            return dict(STORAGE_SPEEDS)
        return dict(zip(STORAGE_SPEEDS, limits, strict=True))

    @property
    def backend(self) -> Backend:
        """What executes this coordinator's attempts (docs/scale-out.md)."""
        return self._backend

    @property
    def started_at(self) -> float | None:
        """When the coordinator last started (UNIX time), None if it never did; it stays set
        after :meth:`stop`."""
        return self._started_at

    @property
    def paused(self) -> bool:
        return self._rt is not None and self._rt.paused

    @property
    def admission_open(self) -> bool:
        return self._rt is not None and not self._rt.closed

    @property
    def cores(self) -> int:
        """Virtual cores tokens are routed over."""
        return self._last_runtime().cores

    @property
    def cpu_map(self) -> list[int]:
        """The OS CPU each virtual core (1, 2, ...) maps to."""
        return self._last_runtime().cpu_map

    @property
    def pinned(self) -> bool:
        """Whether every worker is pinned to its CPU."""
        return self._runtime().pinned

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The asyncio control loop (runs in a background thread)."""
        if self._control is None:
            raise CoordinatorNotRunning("the control loop runs only while the coordinator does")
        return self._control.loop

    def run_control(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the control loop; returns a concurrent future."""
        control = self._control
        if control is None:
            if asyncio.iscoroutine(coro):
                coro.close()  # it will never run: don't leave it "never awaited"
            raise CoordinatorNotRunning("the control loop runs only while the coordinator does")
        if not asyncio.iscoroutine(coro):
            raise TypeError(f"run_control() needs a coroutine object, got {type(coro).__name__}")
        return control.submit(coro)

    async def _sample_rate(self) -> None:
        last_done, last_t = 0, time.monotonic()
        while True:
            await asyncio.sleep(_SAMPLE_EVERY)
            rt = self._rt
            if rt is None:
                return
            s = rt.stats()
            done = s["completed"] + s["failed"]
            now = time.monotonic()
            self._rate = (done - last_done) / (now - last_t)
            last_done, last_t = done, now

    def __repr__(self) -> str:
        state = "running" if self._rt is not None else "stopped"
        return f"<OperationsCoordinator {state} workers_per_core={self._workers_per_core}>"


def _compose_hooks(
    tracing: Callable[..., Any] | None, run: Callable[..., Any] | None
) -> Callable[..., Any] | None:
    """The attempt hook of a run: a backend's (which executes the attempt) inside the
    tracing hook (whose span then covers the remote execution), either, or none."""
    if run is None or tracing is None:
        return run if tracing is None else tracing

    def hook(
        token: TaskToken,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        previous: TaskToken | None,
    ) -> Any:
        def remote(*a: Any, **k: Any) -> Any:
            return run(token, func, a, k or None, previous)

        return tracing(token, remote, args, kwargs, previous)

    return hook


def _quarantine_hook(gh: GuardHouse) -> Callable[..., str]:
    """The core's hook for quarantined calls. It holds the Guard House weakly: the runtime
    keeps it, and a strong reference would tie the runtime to its coordinator in a cycle the
    collector cannot see through the core."""
    ref = weakref.ref(gh)

    def hook(*args: Any) -> str:
        target = ref()
        if target is None:
            raise CoordinatorNotRunning("the coordinator of this Guard House is gone")
        return target._on_quarantine(*args)

    return hook


def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    """``fn``'s signature with string annotations evaluated when they can be."""
    try:
        return inspect.signature(fn, eval_str=True)
    except Exception:  # an annotation that does not evaluate: keep it as a string
        return inspect.signature(fn)


_TYPE_NAMES: dict[type, str] = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    tuple: "a list",
    dict: "an object",
    type(None): "null",
}


def _fits(annotation: Any, value: object) -> bool | None:
    """Whether ``value`` fits ``annotation`` (the plain types of JSON values, unions and
    Optional of them; containers by their outer type); None when it cannot tell."""
    if isinstance(annotation, type) and annotation in _TYPE_NAMES:
        if annotation is float:  # what Python callers pass for a float too
            return isinstance(value, (numbers.Real, decimal.Decimal)) and not isinstance(
                value, bool
            )
        if annotation is int:
            return isinstance(value, int) and not isinstance(value, bool)
        if annotation in (list, tuple):  # JSON has lists; Python callers pass either
            return isinstance(value, (list, tuple))
        return isinstance(value, annotation)
    if annotation is None:
        return value is None
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        found = [_fits(a, value) for a in typing.get_args(annotation)]
        if True in found:
            return True
        return False if all(f is False for f in found) else None
    if isinstance(origin, type) and origin in _TYPE_NAMES:
        return _fits(origin, value)
    return None


def _expected(annotation: Any) -> str:
    """What ``annotation`` asks for, in JSON words ("an integer or null")."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    parts = typing.get_args(annotation) if union else (annotation,)
    names = []
    for a in parts:
        a = typing.get_origin(a) or a
        names.append(_TYPE_NAMES.get(a, getattr(a, "__name__", str(a))) if a else "null")
    return " or ".join(dict.fromkeys(names))


def _check_argument_types(
    name: str, signature: inspect.Signature, bound: inspect.BoundArguments
) -> None:
    """Refuses a launch argument whose annotation (a JSON value type) it does not fit."""
    for pname, value in bound.arguments.items():
        param = signature.parameters[pname]
        values: list[tuple[int | str | None, Any]]
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            values = list(enumerate(value))
        elif param.kind is inspect.Parameter.VAR_KEYWORD:
            values = list(value.items())
        else:
            values = [(None, value)]
        for key, item in values:
            if _fits(param.annotation, item) is False:
                where = pname if key is None else f"{pname}[{key!r}]"
                raise InvalidOption(
                    f"argument {where} of {name} must be {_expected(param.annotation)}, "
                    f"got {item!r:.80}"
                )


def _check_id(token_id: object) -> int:
    if isinstance(token_id, TaskToken):
        return token_id.token_id
    if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
        raise ConfigurationError(f"token_id must be a token id (an int >= 0), got {token_id!r}")
    return token_id


def _after_fork_in_child() -> None:
    _core._after_fork_in_child()
    for coord in list(_running):
        coord._forked = True
    _running.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _stop_all_at_exit() -> None:
    for coord in list(_running):
        try:
            coord.stop(wait=False, timeout=_INTERRUPT_GRACE)
        except Exception:  # pragma: no cover - best effort at interpreter exit
            log.exception("stopping %r at exit failed", coord)
