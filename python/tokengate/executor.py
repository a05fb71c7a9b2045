"""``tokengate.Executor``: a ``concurrent.futures`` executor whose calls run as TaskTokens.

Code written for ``ThreadPoolExecutor`` runs unchanged against it: ``submit`` returns a real
``concurrent.futures.Future`` (linked to the call's :class:`TaskToken`, reachable as
``future.token``), ``map``, ``shutdown`` and the context manager behave as the standard library
documents, ``initializer`` runs once per worker thread, and ``max_workers`` bounds how many of
its calls run at once. It subclasses ``ThreadPoolExecutor`` (``loop.set_default_executor()``
accepts nothing else) but starts no thread of its own: the work runs on the workers of an
:class:`OperationsCoordinator`, a private one it starts and stops, or one given to it.

How it works (docs/executor.md has the user's view):

* **The bound.** A counter of calls handed to the coordinator (the set ``_inflight``) and a
  deque of calls held back. ``submit`` hands a call over while fewer than ``max_workers`` are
  in flight, else appends it to the deque; the done callback of a finished token hands the
  oldest held call over in its place. No thread, no polling.
* **The link.** Each token gets one done callback, a bound method of its future
  (``_TokenFuture._tg_done``), that copies the outcome into the future (a killed token cancels
  it) and releases the slot. ``result()``/``exception()`` wait on the token itself (a TokenGate
  wait: no deadlock inside tasks, GIL released) and link the future themselves once it is final,
  so a result never waits for the callback's turn at the GIL.
* **Cancellation.** ``future.cancel()`` kills a token that has not started, or drops a held
  call; it returns False once the call runs or ran.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextvars
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import _base
from concurrent.futures.thread import BrokenThreadPool
from typing import Any, TypeVar

from ._core import TaskToken
from ._types import TaskWeight, TokenState
from .coordinator import OperationsCoordinator
from .errors import ConfigurationError, MethodBlocked
from .topology import allowed_cores, allowed_cpu_count

__all__ = ["Executor"]

T = TypeVar("T")

_LOGGER = _base.LOGGER  # the "concurrent.futures" logger, as ThreadPoolExecutor logs there

_PENDING = _base.PENDING
_CANCELLED = _base.CANCELLED
_FINISHED = _base.FINISHED
_COMPLETED = TokenState.COMPLETED
_FAILED = TokenState.FAILED
_KILLED = TokenState.KILLED
_EXECUTING = TokenState.EXECUTING
_InvalidStateError = concurrent.futures.InvalidStateError

_WEIGHTS = {w.value: w.value for w in TaskWeight}
_PRIORITIES = ("high", "normal", "low")
_BROKEN = "A thread initializer failed, the thread pool is not usable anymore"

#: One call held back by the bound: (future, fn, args, kwargs).
#: A call held back by ``max_workers``: its future, the call, and its submitter's context
#: (the token is made later, on another thread, and must still run in that context).
_Held = tuple[
    "_TokenFuture", Callable[..., Any], tuple[Any, ...], dict[str, Any], contextvars.Context
]


def _cpu_count() -> int:
    """What ThreadPoolExecutor's default uses on this Python (process_cpu_count on 3.13+)."""
    counter = getattr(os, "process_cpu_count", os.cpu_count)
    return counter() or 1


class _TokenFuture(concurrent.futures.Future[Any]):
    """A ``concurrent.futures.Future`` linked to the :class:`TaskToken` of its call.

    ``token`` is that token, or None while the call is held back by ``max_workers`` (it gets
    its token when a slot frees up) or if it never got one (cancelled while held, broken
    executor)."""

    #: The call's token (a class default: no __init__ of its own on the hot path).
    token: TaskToken | None = None
    _tg_executor: Executor

    # -- the link ------------------------------------------------------------------------

    def _tg_done(self, token: TaskToken) -> None:
        """The token's one done callback (on the thread that finished it): link, release."""
        if self._state is _PENDING:
            if token.state is _COMPLETED:
                try:
                    self.set_result(token.get())
                except _InvalidStateError:  # a waiter linked it first
                    pass
            else:
                self._tg_link(token)
        self._tg_executor._release(self)

    def _tg_link(self, token: TaskToken) -> None:
        """Copy the final token's outcome into this future, unless that happened already
        (the callback and a waiter may both try; the first one wins)."""
        state = token.state
        try:
            if state is _COMPLETED:
                self.set_result(token.get())
            elif state is _FAILED:
                self.set_exception(token.exception())
            elif state is _KILLED:
                self._tg_cancel_now()
        except _InvalidStateError:
            pass

    def _tg_cancel_now(self) -> bool:
        """Cancel this (not running) future and notify ``wait()``/``as_completed()`` waiters,
        as an executor does when it drops a cancelled call. Returns whether it is cancelled."""
        fire = False
        with self._condition:
            if self._state is _PENDING:
                self._state = _CANCELLED
                self._condition.notify_all()
                fire = True
            if self._state is _CANCELLED:
                self.set_running_or_notify_cancel()  # -> CANCELLED_AND_NOTIFIED, waiters told
            cancelled = self._state is not _FINISHED
        if fire:
            self._invoke_callbacks()  # type: ignore[attr-defined]  # outside the lock, as cancel()
        return cancelled

    def _tg_wait(self, timeout: float | None) -> float | None:
        """Wait on the token (a TokenGate wait: inline run or compensation inside a task,
        TokenDeadlock for a wait that cannot end) and link; returns the timeout left for the
        future's own wait."""
        token = self.token
        if token is None:
            return timeout  # held back: the future's condition is all there is to wait on
        if timeout is not None and timeout < 0:
            timeout = 0
        if token.wait(timeout):
            self._tg_link(token)
        return None if timeout is None else 0

    # -- Future API ----------------------------------------------------------------------

    def result(self, timeout: float | None = None) -> Any:
        if self._state is not _FINISHED:
            timeout = self._tg_wait(timeout)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state is not _FINISHED:
            timeout = self._tg_wait(timeout)
        return super().exception(timeout)

    def cancel(self) -> bool:
        """Kill the call's token if it has not started (or drop the call if it is still held
        back): True if the future is cancelled, False if the call runs or ran."""
        token = self.token
        if token is None:
            with self._condition:  # the executor hands a held call over under this lock
                token = self.token
                if token is None:
                    return self._tg_cancel_now()
        if token.cancel_queued() or token.state is _KILLED:
            self._tg_link(token)
            return True
        return self._state is _CANCELLED or self._state is _base.CANCELLED_AND_NOTIFIED

    def running(self) -> bool:
        token = self.token
        return super().running() or (
            token is not None and token.state is _EXECUTING and not self.done()
        )


class _Private:
    """The coordinator an executor created itself, and the one stop() it may issue."""

    def __init__(self, coord: OperationsCoordinator) -> None:
        self.coord = coord
        self.lock = threading.Lock()
        self.started = False
        self.stopped = False

    def start(self) -> None:
        with self.lock:
            if not self.started and not self.stopped:
                self.coord.start()
                self.started = True

    def stop(self, join: bool) -> None:
        """Stop the coordinator once. ``join``: also wait for a stop another thread issued."""
        with self.lock:
            first = self.started and not self.stopped
            self.stopped = True
        if first or (join and self.started):
            self.coord.stop()


class Executor(concurrent.futures.ThreadPoolExecutor):
    """A ``concurrent.futures`` executor whose calls run as TaskTokens.

    Args:
        max_workers: the most calls of this executor that run at once (default: the standard
            library's ``min(32, cpu_count + 4)``; 0 or less: ``ValueError``).
        thread_name_prefix: accepted for compatibility; the coordinator's worker threads are
            shared and keep their names.
        initializer: called as ``initializer(*initargs)`` once in each worker thread before
            the first call of this executor runs there; if it raises, the executor is broken
            (pending and later calls fail with ``BrokenThreadPool``).
        initargs: the initializer's arguments.
        coordinator: run on this (running) coordinator, which the executor never stops.
            Default: a private coordinator started on the first ``submit`` and stopped by
            ``shutdown()``, sized so that ``max_workers`` calls of ``weight`` fit at once.
        weight: routing weight of every call (``light``, ``medium``, ``heavy``).
        operation_type: the tokens' operation type (default: each function's qualname).
        priority: ``high``, ``normal`` or ``low``.
    """

    _tg_counter = 0

    def __init__(
        self,
        max_workers: int | None = None,
        thread_name_prefix: str = "",
        initializer: Callable[..., None] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        coordinator: OperationsCoordinator | None = None,
        weight: str | TaskWeight = "medium",
        operation_type: str | None = None,
        priority: str = "normal",
    ) -> None:
        # The standard library's checks, in its order and with its messages.
        if max_workers is None:
            max_workers = min(32, _cpu_count() + 4)
        if max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if coordinator is not None and not isinstance(coordinator, OperationsCoordinator):
            raise TypeError(
                f"coordinator must be an OperationsCoordinator or None, "
                f"got {type(coordinator).__name__}"
            )
        wname = weight.lower() if isinstance(weight, str) else None
        if wname not in _WEIGHTS:
            raise ConfigurationError(
                f"weight must be one of 'light', 'medium', 'heavy' (any case), got {weight!r}"
            )
        pname = priority.lower() if isinstance(priority, str) else None
        if pname not in _PRIORITIES:
            raise ConfigurationError(
                f"priority must be one of 'high', 'normal', 'low' (any case), got {priority!r}"
            )
        if operation_type is not None and (
            not isinstance(operation_type, str) or not operation_type.strip()
        ):
            raise ConfigurationError(
                f"operation_type must be a non-blank str or None, got {operation_type!r}"
            )

        # What ThreadPoolExecutor's own attributes say, for code that looks at them.
        self._max_workers = max_workers
        if not thread_name_prefix:
            Executor._tg_counter += 1
            thread_name_prefix = f"TokenGateExecutor-{Executor._tg_counter}"
        self._thread_name_prefix = thread_name_prefix
        self._initializer = initializer
        self._initargs = initargs
        self._threads: set[threading.Thread] = set()  # it never starts one
        self._broken: str | bool = False  # type: ignore[assignment]  # stdlib's str, untyped
        self._shutdown = False
        self._shutdown_lock = threading.Lock()

        self._weight = wname
        self._priority = pname
        self._operation_type = operation_type
        opts: dict[str, Any] = {}
        if wname != "medium":
            opts["weight"] = wname
        if pname != "normal":
            opts["priority"] = pname
        if operation_type is not None:
            opts["operation_type"] = operation_type
        self._opts = opts
        self._plain = not opts and initializer is None  # submit's shortest path

        self._inflight: set[_TokenFuture] = set()  # handed to the coordinator, not linked yet
        self._held: collections.deque[_Held] = collections.deque()
        self._stop_when_idle = False
        self._init_done = threading.local()
        if coordinator is None:
            cores = allowed_cpu_count()
            per_core = min(1024, max(1, math.ceil(max_workers / len(allowed_cores(wname, cores)))))
            self._private: _Private | None = _Private(
                OperationsCoordinator(workers_per_core=per_core, cores=cores, decorated_calls=False)
            )
            self._coord = self._private.coord
        else:
            self._private = None
            self._coord = coordinator

    # -- properties ----------------------------------------------------------------------

    @property
    def coordinator(self) -> OperationsCoordinator:
        """The coordinator this executor's calls run on."""
        return self._coord

    @property
    def max_workers(self) -> int:
        """The most calls of this executor that run at once."""
        return self._max_workers

    def __repr__(self) -> str:
        state = "shut down" if self._shutdown else "broken" if self._broken else "open"
        return (
            f"<tokengate.Executor {self._thread_name_prefix!r} {state} "
            f"max_workers={self._max_workers} weight={self._weight}>"
        )

    # -- submitting ----------------------------------------------------------------------

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        if not callable(fn):
            raise TypeError(f"{type(fn).__name__!r} object is not callable")
        f = _TokenFuture()
        f._tg_executor = self
        with self._shutdown_lock:
            if self._broken:
                raise BrokenThreadPool(self._broken)
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if len(self._inflight) >= self._max_workers:
                self._held.append((f, fn, args, kwargs, contextvars.copy_context()))
                return f
            self._inflight.add(f)
        rt = self._coord._rt
        try:
            if self._plain and rt is not None:
                token = rt.submit(fn, args, kwargs or None)
            else:
                token = self._submit_token(fn, args, kwargs)
        except MethodBlocked as exc:
            # Its operation's breaker refused it: a failed future, as for any call that
            # cannot run (a bare exception here would break `wait()` over many submissions).
            self._release(f)
            f.set_exception(exc)
            return f
        except BaseException:
            self._release(f)  # give the slot back (to a call held meanwhile, if any)
            raise
        f.token = token
        token.add_done_callback(f._tg_done)
        return f

    def _submit_token(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> TaskToken:
        rt = self._coord._rt
        if rt is None:
            if self._private is not None:
                self._private.start()
            rt = self._coord._runtime()  # CoordinatorNotRunning / CoordinatorForked
        if self._initializer is not None:
            opts = self._opts
            if "operation_type" not in opts:
                opts = {**opts, "operation_type": _name_of(fn)}
            return rt.submit(self._run_initialized, (fn, args, kwargs), None, **opts)
        if self._opts:
            return rt.submit(fn, args, kwargs or None, **self._opts)
        return rt.submit(fn, args, kwargs or None)

    def _run_initialized(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """The token's function when there is an initializer: run it once per thread."""
        if self._broken:
            raise BrokenThreadPool(self._broken)
        done = self._init_done
        if not getattr(done, "ok", False):
            assert self._initializer is not None
            try:
                self._initializer(*self._initargs)
            except BaseException as exc:
                _LOGGER.critical("Exception in initializer:", exc_info=True)
                self._initializer_failed()
                raise BrokenThreadPool(self._broken) from exc
            done.ok = True
        return fn(*args, **kwargs)

    def _initializer_failed(self) -> None:
        with self._shutdown_lock:
            self._broken = _BROKEN
            held = list(self._held)
            self._held.clear()
        for f, *_call in held:
            try:
                f.set_exception(BrokenThreadPool(_BROKEN))
            except _InvalidStateError:  # cancelled meanwhile
                f._tg_cancel_now()
        self._maybe_idle()

    # -- the bound -----------------------------------------------------------------------

    def _release(self, f: _TokenFuture) -> None:
        """``f`` no longer holds a slot: hand the oldest held call over in its place. Runs in
        done callbacks, so it never waits; a held call that takes no slot (cancelled, failed
        to submit, or already finished when it is linked) frees it again in this loop."""
        lock = self._shutdown_lock
        inflight = self._inflight
        held = self._held
        while True:
            with lock:
                inflight.discard(f)
                if not held:
                    break
                item = held.popleft()
                f = item[0]
                inflight.add(f)
            if self._hand_over(item):
                return
        if self._stop_when_idle:
            self._maybe_idle()

    def _hand_over(self, item: _Held) -> bool:
        """Submit a held call's token and link it. False if it no longer holds the slot
        (cancelled while held, failed to submit, or its token finished already)."""
        f, fn, args, kwargs, ctx = item
        error: BaseException | None = None
        with f._condition:  # against a concurrent cancel(), which reads f.token under it
            if f._state is not _PENDING:
                token = None
            elif self._broken:
                token = None
                error = BrokenThreadPool(self._broken)
            else:
                try:
                    # Submitted in the submitter's context: the token copies it from here.
                    token = f.token = ctx.run(self._submit_now, fn, args, kwargs)
                except BaseException as exc:  # stopped coordinator, PoolFull, ...
                    token = None
                    error = exc
        if token is None:
            if error is None:
                f._tg_cancel_now()  # cancelled while held: notify wait()/as_completed()
            else:
                try:
                    f.set_exception(error)
                except _InvalidStateError:
                    pass
            return False
        if token.done():
            # Linking it here keeps this loop flat (its callback would re-enter _release).
            f._tg_link(token)
            return False
        token.add_done_callback(f._tg_done)
        return True

    def _submit_now(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> TaskToken:
        rt = self._coord._rt
        if self._plain and rt is not None:
            return rt.submit(fn, args, kwargs or None)
        return self._submit_token(fn, args, kwargs)

    def _maybe_idle(self) -> None:
        """After shutdown(wait=False): once nothing is in flight, stop the private
        coordinator (on whichever thread finished the last call)."""
        if not self._stop_when_idle:
            return
        with self._shutdown_lock:
            if self._inflight or not self._stop_when_idle:
                return
            self._stop_when_idle = False
        if self._private is not None:
            self._private.stop(join=False)

    # -- map, shutdown -------------------------------------------------------------------

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        **kwargs: Any,
    ) -> Iterator[T]:
        """``concurrent.futures.Executor.map``: every call is submitted before the first
        result is taken; results in order; a call's exception is raised when its result is
        reached; ``TimeoutError`` after ``timeout`` (outstanding calls are cancelled);
        ``chunksize`` is ignored, as by ThreadPoolExecutor."""
        if not callable(fn):
            raise TypeError(f"{type(fn).__name__!r} object is not callable")
        return super().map(fn, *iterables, timeout=timeout, chunksize=chunksize, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more submissions. ``cancel_futures``: cancel every call that has not started.
        ``wait``: return once every call of this executor finished. A private coordinator is
        stopped then (after ``wait=False``: once the last call finished)."""
        with self._shutdown_lock:
            self._shutdown = True
            held: list[_Held] = []
            inflight: list[_TokenFuture] = []
            if cancel_futures:
                held = list(self._held)
                self._held.clear()
                inflight = list(self._inflight)
            if not wait:
                self._stop_when_idle = True
        for f, *_call in held:
            f._tg_cancel_now()
        for f in inflight:
            f.cancel()  # kills the token if it has not started
        self._maybe_idle()
        if wait:
            self._wait_idle()
            if self._private is not None:
                self._private.stop(join=True)

    def _wait_idle(self) -> None:
        """Wait until no call of this executor is in flight or held. Waits on the tokens
        (TokenGate waits: inside a task the worker's place goes to a compensating worker, and
        a task waiting on its own call gets TokenDeadlock); each round finishes every call in
        flight, which hands the held ones over."""
        while True:
            with self._shutdown_lock:
                if not self._inflight:
                    return  # nothing is held without a call in flight
                futures = list(self._inflight)
            for f in futures:
                token = f.token
                if token is not None:
                    token.wait()
                else:  # being handed over at this instant: wait on the future itself
                    concurrent.futures.wait([f])


def _name_of(fn: object) -> str:
    for attr in ("__qualname__", "__name__"):
        name = getattr(fn, attr, None)
        if isinstance(name, str) and name.strip():
            return name
    return type(fn).__name__
