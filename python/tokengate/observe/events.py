"""The lifecycle event feed of a coordinator (``coordinator.events``, issue #9).

The core records a :class:`~tokengate._core.LifecycleEvent` when a token is created, admitted,
started, retried and when it reaches its final state (completed, failed, killed, timed_out,
quarantined or refused), and when a breaker refuses a call (blocked). An :class:`EventFeed`
hands those events to Python callbacks::

    def on_failure(event):
        log.warning("token %s of %s failed: %r", event.token_id, event.operation, event.error)

    with coordinator.events.subscribe(on_failure, kinds={"failed", "timed_out"}):
        ...

    async for event in coordinator.events:      # asyncio consumers
        ...

Threading model:

* Workers, submitters and the core's timer thread only *record* events, into a bounded ring in
  the core (``OperationsCoordinator(event_capacity=...)``, 65 536 by default). Recording never
  waits: when the ring is full the event is dropped and counted (``stats()["dropped"]``), so a
  slow subscriber can never slow the workers down.
* One daemon thread per attached feed, named ``tokengate-events``, takes events from the ring
  in batches and calls every matching subscriber, one event after another, in the order the
  core recorded them (for each token: created, admitted, started, retried..., final). **Every
  callback runs on that thread**, never on a worker or on the caller's thread; a callback that
  blocks delays the delivery of the following events (and, once the ring is full, makes the
  core drop them) but nothing else.
* The core records only the kinds somebody subscribed to: with no subscriber its mask is 0 and
  an unobserved coordinator pays nothing for the feed.

A subscriber that raises is logged on the ``tokengate.events`` logger (at most once a minute
per subscriber, with the number of errors since), counted (:attr:`Subscription.errors`) and
stays subscribed; the other subscribers still get the event.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

from tokengate import _core
from tokengate.errors import ConfigurationError

if TYPE_CHECKING:
    from types import TracebackType

    from tokengate._core import Runtime

#: One lifecycle event, and a batch of them (made by the core; importable from here).
LifecycleEvent = _core.LifecycleEvent
EventBatch = _core.EventBatch

__all__ = [
    "EVENT_KINDS",
    "EventBatch",
    "EventFeed",
    "EventStream",
    "LifecycleEvent",
    "Subscription",
]

logger = logging.getLogger("tokengate.events")

#: The event kinds, in mask-bit order (kind ``i`` is bit ``1 << i`` of the core's mask).
EVENT_KINDS: Final[tuple[str, ...]] = tuple(_core.EVENT_KINDS)
_BIT: Final[dict[str, int]] = {kind: 1 << i for i, kind in enumerate(EVENT_KINDS)}
_ALL: Final[int] = (1 << len(EVENT_KINDS)) - 1

#: Events taken from the core per delivery round.
_BATCH: Final = 65_536
#: How long the delivery thread waits for the first event of a round (``wake_events`` cuts it
#: short when a flush or a detach needs the thread).
_WAIT: Final = 0.25
#: Shortest interval between two log records about the same failing subscriber.
_ERROR_LOG_INTERVAL: Final = 60.0
#: How often a waiting flush or detach nudges the delivery thread again.
_NUDGE: Final = 0.05


def _mask_of(kinds: Iterable[str] | str | None) -> tuple[frozenset[str], int]:
    """Validates ``kinds`` (None: all); returns the kinds and their mask."""
    if kinds is None:
        return frozenset(EVENT_KINDS), _ALL
    if isinstance(kinds, str):
        kinds = (kinds,)
    try:
        names = list(kinds)
    except TypeError:
        raise ConfigurationError(
            f"kinds must be None or an iterable of event kinds, got {type(kinds).__name__}"
        ) from None
    valid = ", ".join(EVENT_KINDS)
    mask = 0
    for name in names:
        bit = _BIT.get(name) if isinstance(name, str) else None
        if bit is None:
            raise ConfigurationError(f"unknown event kind {name!r}; valid kinds: {valid}")
        mask |= bit
    if not mask:
        raise ConfigurationError(f"kinds is empty (None means every kind); valid kinds: {valid}")
    return frozenset(names), mask


def _kinds_of(mask: int) -> list[str]:
    return [kind for kind, bit in _BIT.items() if mask & bit]


class Subscription:
    """One subscriber of an :class:`EventFeed` (returned by :meth:`EventFeed.subscribe`).

    A context manager: leaving the ``with`` block unsubscribes.

    Attributes:
        kinds: the event kinds it receives.
        delivered: events its callback took without raising.
        errors: events on which its callback raised.
    """

    __slots__ = (
        "_active",
        "_batch",
        "_callback",
        "_feed",
        "_last_log",
        "_mask",
        "_unlogged",
        "delivered",
        "errors",
        "kinds",
    )

    def __init__(
        self,
        feed: EventFeed,
        callback: Callable[[Any], object],
        kinds: frozenset[str],
        mask: int,
        batch: bool = False,
    ) -> None:
        self._feed = feed
        self._callback = callback
        self._batch = batch
        self.kinds: frozenset[str] = kinds
        self._mask = mask
        self._active = True
        self.delivered = 0
        self.errors = 0
        self._last_log: float | None = None
        self._unlogged = 0

    @property
    def active(self) -> bool:
        """Whether it still receives events (False after :meth:`unsubscribe`)."""
        return self._active

    @property
    def callback(self) -> Callable[[LifecycleEvent], object]:
        """The subscribed callable."""
        return self._callback

    def unsubscribe(self) -> None:
        """Stops the delivery to this subscriber (idempotent).

        An event already being delivered on the feed's thread may still reach the callback
        when this is called from another thread; none after this returns on that thread
        completes a delivery round.
        """
        self._feed._remove(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.unsubscribe()

    def __repr__(self) -> str:
        state = "active" if self._active else "unsubscribed"
        kinds = "all" if self._mask == _ALL else ",".join(_kinds_of(self._mask))
        return (
            f"<Subscription {self._callback!r} kinds={kinds} {state} "
            f"delivered={self.delivered} errors={self.errors}>"
        )

    # -- delivery thread only --------------------------------------------------------------

    def _failed(self, event: LifecycleEvent, exc: BaseException) -> None:
        self.errors += 1
        now = time.monotonic()
        if self._last_log is not None and now - self._last_log < _ERROR_LOG_INTERVAL:
            self._unlogged += 1
            return
        since = f"; {self._unlogged} more since the last report" if self._unlogged else ""
        self._last_log = now
        self._unlogged = 0
        logger.error(
            "event subscriber %r raised on a %r event of token %s (%d errors so far%s; "
            "reported at most once a minute; it stays subscribed)",
            self._callback,
            event.kind,
            event.token_id,
            self.errors,
            since,
            exc_info=(type(exc), exc, exc.__traceback__),
        )


class _Pump:
    """The delivery thread of one attachment (one runtime)."""

    def __init__(self, feed: EventFeed, rt: Runtime, before: _Pump | None = None) -> None:
        self.rt = rt
        #: The delivery thread of the feed's previous runtime, still delivering that run's
        #: last events: this one starts delivering once it is done (one thread at a time).
        self.before = before
        self.dropped_seen = 0
        self.dropped_reported = 0
        self.stopping = threading.Event()
        self.cond = threading.Condition(threading.Lock())
        self.round_started = 0  # id of the last round that began taking
        self.round_drained = 0  # id of the last round that emptied the ring and delivered it
        self.clean_exit = False
        self.thread = threading.Thread(
            target=feed._run, args=(self,), name="tokengate-events", daemon=True
        )

    def alive(self) -> bool:
        return self.thread.is_alive()


class EventFeed:
    """Delivers a coordinator's lifecycle events to subscribers (``coordinator.events``).

    See the module documentation for the threading model: callbacks run one at a time on the
    feed's ``tokengate-events`` daemon thread, in the order the core recorded the events; the
    core's bounded ring drops (and counts) events when the subscribers fall behind, it never
    blocks a worker. Subscriptions survive ``coordinator.stop()`` / ``start()``.

    Args:
        name: the coordinator's name (shown in reprs and log records).
    """

    def __init__(self, name: str = "default") -> None:
        self.name = name
        self._lock = threading.RLock()  # RLock: a stream's __del__ may unsubscribe anywhere
        self._subs: tuple[Subscription, ...] = ()
        self._mask = 0
        self._rt: Runtime | None = None
        self._last_rt: Runtime | None = None
        self._pump: _Pump | None = None
        self._delivered = 0
        self._stream_dropped = 0
        self._errors = 0
        self._drops_logged_at: float | None = None
        #: The previous run's delivery thread, handed over at the last _attach and maybe still
        #: delivering that run's last events.
        self._finishing: _Pump | None = None
        self._mask_set_on: Runtime | None = None  # runtime that got self._mask last
        self._mask_sent = 0

    # -- subscribing -----------------------------------------------------------------------

    def subscribe(
        self,
        callback: Callable[[Any], object],
        kinds: Iterable[str] | str | None = None,
        *,
        batch: bool = False,
    ) -> Subscription:
        """Calls ``callback(event)`` with each event of ``kinds`` (None: every kind).

        Args:
            callback: called on the feed's delivery thread with each
                :class:`~tokengate._core.LifecycleEvent`; what it returns is ignored; what it
                raises is logged and counted, and it stays subscribed.
            kinds: names from ``EVENT_KINDS`` (a single name is accepted too).
            batch: call ``callback(events)`` once per batch the delivery thread takes, with
                its events of ``kinds`` as an :class:`~tokengate._core.EventBatch` (a
                read-only sequence, oldest first, never empty, whose event objects are made
                only when read; ``events.counts()`` counts them by kind without making any),
                instead of once per event. A Python call and an object per event is what
                delivery costs most: a subscriber that must keep up with every event of a busy
                coordinator takes batches (docs/observability.md has the figures). The batch
                is valid after the callback returns.

        Returns:
            A :class:`Subscription` (a context manager that unsubscribes at exit).

        Raises:
            ConfigurationError: ``callback`` is not callable or is a coroutine function, or a
                kind is unknown (the message names the valid kinds).
        """
        if not callable(callback):
            raise ConfigurationError(
                f"an event subscriber must be callable, got {type(callback).__name__}"
            )
        if inspect.iscoroutinefunction(callback) or inspect.iscoroutinefunction(
            getattr(callback, "__call__", None)  # noqa: B004 (an async __call__)
        ):
            raise ConfigurationError(
                f"event subscriber {callback!r} is a coroutine function: callbacks run on the "
                "feed's delivery thread, where nothing awaits them; consume events from "
                "asyncio with `async for event in coordinator.events` (or events.stream())"
            )
        if not isinstance(batch, bool):
            raise ConfigurationError(f"batch must be True or False, got {batch!r}")
        names, mask = _mask_of(kinds)
        sub = Subscription(self, callback, names, mask, batch)
        with self._lock:
            self._subs = (*self._subs, sub)
            self._sync_mask()
            if self._rt is not None and self._pump is None:
                self._start_pump(self._rt)
        return sub

    def unsubscribe(self, subscription: Subscription) -> None:
        """Same as ``subscription.unsubscribe()`` (idempotent).

        Raises:
            ConfigurationError: ``subscription`` belongs to another feed.
        """
        if not isinstance(subscription, Subscription) or subscription._feed is not self:
            raise ConfigurationError(f"{subscription!r} is not a subscription of {self!r}")
        self._remove(subscription)

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            if not sub._active:
                return
            sub._active = False
            self._subs = tuple(s for s in self._subs if s is not sub)
            self._sync_mask()

    def _sync_mask(self) -> None:
        """Sends the union of the subscribed kinds to the attached runtime (under the lock)."""
        mask = 0
        for s in self._subs:
            mask |= s._mask
        self._mask = mask
        rt = self._rt
        if rt is not None and (self._mask_set_on is not rt or self._mask_sent != mask):
            rt.set_event_mask(mask)
            self._mask_set_on = rt
            self._mask_sent = mask

    # -- asyncio ---------------------------------------------------------------------------

    def stream(
        self, kinds: Iterable[str] | str | None = None, maxsize: int = 10_000
    ) -> EventStream:
        """An async iterator over the events of ``kinds`` (None: every kind).

        ``async for event in coordinator.events`` is ``stream()`` with the defaults. The events
        are buffered for the consumer (at most ``maxsize``; when the buffer is full further
        events are dropped and counted in :attr:`EventStream.dropped`, the delivery thread never
        waits for the consumer). Leaving the ``async for`` loop, ``aclose()``, or cancelling the
        consuming task unsubscribes.

        Raises:
            ConfigurationError: an unknown kind, or ``maxsize`` not a positive int.
        """
        return EventStream(self, kinds, maxsize)

    def __aiter__(self) -> EventStream:
        return self.stream()

    # -- waiting for delivery ----------------------------------------------------------------

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Waits until every event the core recorded before this call reached the subscribers.

        Returns:
            True once they were delivered (at once when the feed is not attached: its last
            detach delivered everything), False if ``timeout`` seconds passed first. Called
            from a subscriber (on the delivery thread, which cannot wait for itself) it returns
            False at once.
        """
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout != timeout
        ):
            raise ConfigurationError(
                f"timeout must be a number of seconds or None, got {timeout!r}"
            )
        with self._lock:
            pump = self._pump
        if pump is None:
            return True
        if threading.current_thread() is pump.thread:
            return False
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        with pump.cond:
            # A round that began after this point and emptied the ring took (and, being
            # marked after its delivery, delivered) every event recorded before it.
            start = pump.round_started
            while pump.round_drained <= start:
                if not pump.alive():
                    return pump.clean_exit
                if deadline is None:
                    wait = _NUDGE
                else:
                    wait = min(_NUDGE, deadline - time.monotonic())
                    if wait <= 0:
                        return False
                pump.rt.wake_events()
                pump.cond.wait(wait)
            return True

    # -- coordinator side --------------------------------------------------------------------

    def _attach(self, rt: Runtime) -> None:
        """Called by the coordinator after ``rt`` started: sends the mask, starts delivery."""
        with self._lock:
            if self._rt is rt:
                return
            old = self._pump
            if old is not None and old.rt is not rt:
                # The previous run's thread (its runtime stopped, or is stopping) delivers that
                # run's last events, then ends; the new one waits for it, so callbacks still run
                # one at a time and in order. It is never waited for here, under the
                # coordinator's lock.
                old.stopping.set()
                old.rt.wake_events()
                self._pump = None
                self._finishing = old
            self._rt = rt
            self._last_rt = rt
            self._mask_set_on = None
            self._sync_mask()
            if self._subs and self._pump is None:
                self._start_pump(rt, before=old if old is not None and old.alive() else None)

    def _detach(self, timeout: float | None = None, rt: Runtime | None = None) -> bool:
        """Called by the coordinator after its runtime shut down: delivers what is still
        buffered, then stops the delivery thread (subscriptions are kept for the next
        :meth:`_attach`).

        Returns False if the thread was still busy after ``timeout`` seconds (None: no limit;
        a subscriber that never returns would then keep ``stop()`` waiting): it is left to
        finish on its own (a daemon thread) and a warning is logged. Called on the delivery
        thread itself (a subscriber stopping the coordinator), it only asks the thread to
        finish and returns True.
        """
        with self._lock:
            pump = self._pump
            if rt is not None and self._rt is not rt:
                # A start() after this stop attached the feed to the next runtime already: this
                # run's thread was handed over then and finishes by itself.
                pump = None
            else:
                self._rt = None
                self._mask_set_on = None
        if pump is None:
            return True
        pump.stopping.set()
        if threading.current_thread() is pump.thread:
            return True
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while pump.thread.is_alive():
            pump.rt.wake_events()
            wait = _NUDGE if deadline is None else min(_NUDGE, deadline - time.monotonic())
            if wait <= 0:
                logger.warning(
                    "event feed %r: still delivering after %.1fs (a subscriber is slow, or "
                    "tokens of the stopped run still execute); the rest of the events is "
                    "delivered in the background",
                    self.name,
                    timeout,
                )
                return False
            pump.thread.join(wait)
        with self._lock:
            if self._pump is pump:
                self._pump = None
        return True

    def _start_pump(self, rt: Runtime, before: _Pump | None = None) -> None:
        if before is None and self._finishing is not None and self._finishing.alive():
            before = self._finishing  # (a subscription made while it still finishes)
        pump = _Pump(self, rt, before)
        self._pump = pump
        pump.thread.start()

    def _run(self, pump: _Pump) -> None:
        """The delivery thread: takes batches and hands each event to its subscribers."""
        rt = pump.rt
        try:
            if pump.before is not None:
                pump.before.thread.join()
                pump.before = None
            while True:
                # Stopping: the runtime is shut down (or was replaced). Take until its ring is
                # empty and no token of it can still record an event (one still running when
                # stop() gave up ends later, and its final event is delivered then).
                final = pump.stopping.is_set() and rt.in_flight() == 0
                with pump.cond:
                    pump.round_started += 1
                    round_id = pump.round_started
                batch = rt.take_events(_BATCH, _WAIT)
                taken = len(batch)
                if taken:
                    self._deliver(batch)
                # Not kept while waiting for the next round: its events (and their errors)
                # are the subscribers' to keep or let go.
                del batch
                self._note_drops(pump)
                with pump.cond:
                    if taken < _BATCH:
                        pump.round_drained = round_id
                    pump.cond.notify_all()
                if final and not taken:
                    pump.clean_exit = True
                    return
        except BaseException:
            logger.exception("event feed %r: the delivery thread failed", self.name)
        finally:
            with self._lock:
                if self._pump is pump:
                    self._pump = None
            with pump.cond:
                pump.cond.notify_all()

    def _note_drops(self, pump: _Pump) -> None:
        """Warns (at most once a minute) when the core dropped events since the last look."""
        dropped = pump.rt.events_dropped
        if dropped <= pump.dropped_seen:
            return
        now = time.monotonic()
        if self._drops_logged_at is None or now - self._drops_logged_at >= _ERROR_LOG_INTERVAL:
            logger.warning(
                "event feed %r: %d lifecycle events were dropped (%d in all this run): the "
                "subscribers fall behind the core; take events in batches "
                "(subscribe(..., batch=True)) or raise OperationsCoordinator(event_capacity=...)",
                self.name,
                dropped - pump.dropped_reported,
                dropped,
            )
            self._drops_logged_at = now
            pump.dropped_reported = dropped
        pump.dropped_seen = dropped

    def _deliver(self, batch: EventBatch) -> None:
        subs = self._subs  # a snapshot: (un)subscribing replaces the tuple
        each = tuple(s for s in subs if not s._batch)
        for sub in subs:
            if sub._batch and sub._active:
                # The core records only the union of the kinds: a subscriber to all of them
                # takes the batch as it is.
                # The batch was recorded under the kinds wanted then (a wider union if a
                # subscription left since): only a batch of its own kinds goes as it is.
                events = batch if batch.mask() & ~sub._mask == 0 else batch.select(sub._mask)
                if events:
                    try:
                        sub._callback(events)
                    except BaseException as exc:  # a subscriber cannot kill the delivery thread
                        self._errors += 1
                        sub._failed(events[0], exc)
                    else:
                        sub.delivered += len(events)
        for event in batch if each else ():
            bit = _BIT.get(event.kind, 0)
            for sub in each:
                if not sub._mask & bit or not sub._active:
                    continue
                try:
                    sub._callback(event)
                except BaseException as exc:  # a subscriber cannot kill the delivery thread
                    self._errors += 1
                    sub._failed(event, exc)
                else:
                    sub.delivered += 1
        self._delivered += len(batch)

    # -- introspection -----------------------------------------------------------------------

    @property
    def mask(self) -> int:
        """The union of the subscribed kinds as a mask (0: nobody listens)."""
        return self._mask

    def stats(self) -> dict[str, Any]:
        """Counters of the feed.

        Returns:
            ``subscribers`` (active subscriptions), ``delivered`` (events taken from the core
            and handed to the subscribers), ``dropped`` (events the core's ring lost because it
            was full, of the attached or last runtime), ``stream_dropped`` (events async streams
            lost because their consumer fell behind), ``subscriber_errors`` (callbacks that
            raised, since the feed was made) and ``mask`` (the recorded kinds' names).
        """
        with self._lock:
            subs = self._subs
            rt = self._rt or self._last_rt
            mask = self._mask
        return {
            "subscribers": len(subs),
            "delivered": self._delivered,
            "dropped": int(rt.events_dropped) if rt is not None else 0,
            "stream_dropped": self._stream_dropped,
            "subscriber_errors": self._errors,
            "mask": _kinds_of(mask),
        }

    def log_events(
        self, level: int = logging.DEBUG, kinds: Iterable[str] | str | None = None
    ) -> Subscription:
        """Subscribes a callback that logs each event as one line on ``tokengate.events``.

        The line names the kind, token id, operation, core/worker, attempt, the queue wait
        or duration when the event has them, and the error's type and message for failures,
        e.g. ``failed token=17 op=fetch core=2 worker=1 attempt=3 duration=12.1ms
        error=ConnectionError: refused``.
        """
        if not isinstance(level, int):
            raise ConfigurationError(f"level must be a logging level (int), got {level!r}")

        def log_event(event: LifecycleEvent) -> None:
            if logger.isEnabledFor(level):
                logger.log(level, "%s", format_event(event))

        return self.subscribe(log_event, kinds)

    def __repr__(self) -> str:
        state = "attached" if self._rt is not None else "detached"
        return f"<EventFeed {self.name!r} {state} subscribers={len(self._subs)}>"


def _seconds(value: float) -> str:
    if value < 1e-3:
        return f"{value * 1e6:.0f}us"
    if value < 1.0:
        return f"{value * 1e3:.1f}ms"
    return f"{value:.3f}s"


def format_event(event: LifecycleEvent) -> str:
    """One readable line for ``event`` (what :meth:`EventFeed.log_events` logs)."""
    parts = [event.kind]
    parts.append("token=-" if event.token_id is None else f"token={event.token_id}")
    parts.append(f"op={event.operation}")
    if event.core is not None:
        parts.append(f"core={event.core}")
    if event.worker is not None:
        parts.append(f"worker={event.worker}")
    if event.attempt:
        parts.append(f"attempt={event.attempt}")
    if event.queue_wait is not None:
        parts.append(f"queue_wait={_seconds(event.queue_wait)}")
    if event.duration is not None:
        parts.append(f"duration={_seconds(event.duration)}")
    if event.error is not None:
        err = event.error
        message = str(err)
        parts.append(
            f"error={type(err).__qualname__}: {message}"
            if message
            else f"error={type(err).__qualname__}"
        )
    if event.detail:
        parts.append(f"({event.detail})")
    return " ".join(parts)


class _StreamBuffer:
    """What the delivery thread shares with an :class:`EventStream`'s consumer. The
    subscription's callback holds this, not the stream, so an abandoned stream is collected
    (and unsubscribes) as soon as its ``async for`` loop is left."""

    __slots__ = ("closed", "dropped", "feed", "items", "lock", "loop", "maxsize", "sub", "waiter")

    def __init__(self, feed: EventFeed, loop: asyncio.AbstractEventLoop, maxsize: int) -> None:
        self.feed = feed
        self.loop = loop
        self.maxsize = maxsize
        self.items: collections.deque[LifecycleEvent] = collections.deque()
        self.lock = threading.RLock()  # RLock: a collected stream may close it mid-push
        self.waiter: asyncio.Future[None] | None = None
        self.dropped = 0
        self.closed = False
        self.sub: Subscription | None = None

    def push(self, event: LifecycleEvent) -> None:
        """The subscription's callback (delivery thread): buffer, drop, or wake the consumer."""
        if self.loop.is_closed():  # the consumer's loop is gone: nobody will read this
            self.close()
            return
        with self.lock:
            if self.closed:
                return
            if len(self.items) >= self.maxsize:
                self.dropped += 1
                self.feed._stream_dropped += 1  # only the delivery thread writes it
                return
            self.items.append(event)
            waiter, self.waiter = self.waiter, None
        if waiter is not None:
            try:
                self.loop.call_soon_threadsafe(_wake, waiter)
            except RuntimeError:  # the consumer's loop is closed: nobody will read this
                self.close()

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            waiter, self.waiter = self.waiter, None
            sub, self.sub = self.sub, None
        if sub is not None:
            sub.unsubscribe()
        if waiter is not None and not waiter.done():
            try:
                self.loop.call_soon_threadsafe(_wake, waiter)
            except RuntimeError:
                pass


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class EventStream:
    """An async iterator over a feed's events (from :meth:`EventFeed.stream`).

    It subscribes on the running event loop it is created on (or, created outside one, at the
    first ``__anext__``). The delivery thread buffers events for it (``maxsize`` at most; the
    excess is dropped and counted in :attr:`dropped`) and wakes the consumer through
    ``loop.call_soon_threadsafe``. :meth:`aclose` / :meth:`close`, leaving an ``async with
    stream:`` block, or the stream being garbage collected unsubscribes; iteration then ends.
    A cancelled ``__anext__`` (``asyncio.wait_for(anext(stream), 1)`` as a heartbeat) leaves the
    stream open, as ``asyncio.Queue.get`` does. If the consumer's loop is closed, the stream
    unsubscribes quietly.
    """

    def __init__(
        self, feed: EventFeed, kinds: Iterable[str] | str | None = None, maxsize: int = 10_000
    ) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ConfigurationError(f"maxsize must be a positive int, got {maxsize!r}")
        self._feed = feed
        self._names, self._kind_mask = _mask_of(kinds)
        self._maxsize = maxsize
        self._buf: _StreamBuffer | None = None
        self._closed = False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._open(loop)

    def _open(self, loop: asyncio.AbstractEventLoop) -> _StreamBuffer:
        buf = _StreamBuffer(self._feed, loop, self._maxsize)
        self._buf = buf
        buf.sub = self._feed.subscribe(buf.push, self._names)
        return buf

    @property
    def kinds(self) -> frozenset[str]:
        """The event kinds it receives."""
        return self._names

    @property
    def dropped(self) -> int:
        """Events lost because its buffer was full (the consumer fell behind)."""
        return 0 if self._buf is None else self._buf.dropped

    @property
    def closed(self) -> bool:
        """Whether it was closed (iteration has ended), also by its loop closing."""
        return self._closed or (self._buf is not None and self._buf.closed)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> LifecycleEvent:
        buf = self._buf
        if buf is None:
            if self._closed:
                raise StopAsyncIteration
            buf = self._open(asyncio.get_running_loop())
        while True:
            with buf.lock:
                if buf.items and not self._closed:
                    return buf.items.popleft()
                if self._closed or buf.closed:
                    self._closed = True
                    raise StopAsyncIteration
                waiter: asyncio.Future[None] = buf.loop.create_future()
                buf.waiter = waiter
            try:
                await waiter  # cancelled (a timeout, a heartbeat): the stream stays open
            finally:
                with buf.lock:
                    if buf.waiter is waiter:
                        buf.waiter = None

    def close(self) -> None:
        """Unsubscribes; iteration ends (idempotent, callable from any thread)."""
        self._closed = True
        if self._buf is not None:
            self._buf.close()

    async def aclose(self) -> None:
        """Same as :meth:`close` (for ``contextlib.aclosing`` and async-generator habits)."""
        self.close()

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        buf = getattr(self, "_buf", None)
        if buf is not None and not buf.closed:
            buf.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<EventStream of {self._feed.name!r} {state} dropped={self.dropped}>"
