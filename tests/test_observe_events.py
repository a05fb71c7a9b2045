"""Lifecycle event feed (issue #9): ``coordinator.events`` and ``tokengate.observe.events``.

Exact event sequences per token for each outcome, exactly one final event per token under a
concurrent workload, kinds filters and the core's mask, unsubscribing, failing and slow
subscribers (the ring drops and counts, workers never wait), asyncio streams, ``flush()``,
subscriptions across stop()/start(), ``log_events``.

Synchronisation: a :class:`Collector` subscriber keeps what it got under a condition variable
and tests wait on it (bounded by SAFETY); ``coordinator.stop()`` delivers everything still
buffered before it returns, so after it the collected events are complete.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable

import pytest

from _support import SAFETY, wait_until
from tokengate import (
    ConfigurationError,
    MethodBlocked,
    PoolFull,
    TokenState,
    TokenTimeout,
    _core,
    task_token_guard,
)
from tokengate.observe.events import EVENT_KINDS, EventFeed, EventStream, Subscription

FINAL = frozenset({"completed", "failed", "killed", "timed_out", "quarantined", "refused"})
SIMPLE = ["created", "admitted", "started", "completed"]
SHORT = 0.05


class Collector:
    """A subscriber that keeps every event it gets (and the threads it got them on)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.events: list = []
        self.threads: set[threading.Thread] = set()

    def __call__(self, event) -> None:
        with self.cond:
            self.events.append(event)
            self.threads.add(threading.current_thread())
            self.cond.notify_all()

    def snapshot(self) -> list:
        with self.cond:
            return list(self.events)

    def wait_for(self, predicate: Callable[[list], bool], timeout: float = SAFETY) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self.events), timeout)

    def wait_final(self, *token_ids: int) -> bool:
        want = set(token_ids)
        return self.wait_for(
            lambda evs: want <= {e.token_id for e in evs if e.kind in FINAL}, SAFETY
        )

    def kinds_of(self, token_id: int) -> list[str]:
        return [e.kind for e in self.snapshot() if e.token_id == token_id]

    def of(self, token_id: int, kind: str):
        found = [e for e in self.snapshot() if e.token_id == token_id and e.kind == kind]
        assert len(found) == 1, (token_id, kind, found)
        return found[0]


@pytest.fixture
def collector() -> Collector:
    return Collector()


def _bits(*kinds: str) -> int:
    return sum(1 << EVENT_KINDS.index(k) for k in kinds)


# --------------------------------------------------------------------------- the API surface


def test_event_kinds_are_the_cores():
    assert EVENT_KINDS == tuple(_core.EVENT_KINDS)
    assert EVENT_KINDS == (
        "created",
        "admitted",
        "started",
        "completed",
        "failed",
        "killed",
        "timed_out",
        "retried",
        "quarantined",
        "blocked",
        "refused",
    )


def test_the_coordinator_has_a_feed_named_after_it():
    from tokengate import OperationsCoordinator

    coord = OperationsCoordinator(cores=1, workers_per_core=1)
    assert isinstance(coord.events, EventFeed)
    assert coord.events.name == coord.name
    assert coord.events.stats() == {
        "subscribers": 0,
        "delivered": 0,
        "dropped": 0,
        "stream_dropped": 0,
        "subscriber_errors": 0,
        "mask": [],
    }


def test_subscribe_validates_kinds_and_callback(coord):
    feed = coord.events
    with pytest.raises(ConfigurationError, match=r"'bogus'.*created.*refused"):
        feed.subscribe(print, kinds={"completed", "bogus"})
    with pytest.raises(ConfigurationError, match="unknown event kind 3"):
        feed.subscribe(print, kinds=[3])
    with pytest.raises(ConfigurationError, match="empty"):
        feed.subscribe(print, kinds=[])
    with pytest.raises(ConfigurationError, match="callable"):
        feed.subscribe("print")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="'nope'"):
        feed.stream(kinds=["nope"])  # at the call, not at the first iteration
    with pytest.raises(ConfigurationError, match="maxsize"):
        feed.stream(maxsize=0)
    # nothing half-subscribed was left behind
    assert feed.stats()["subscribers"] == 0
    assert coord._rt.event_mask == 0

    sub = feed.subscribe(print, kinds="failed")  # a single name is one kind
    assert isinstance(sub, Subscription)
    assert sub.kinds == frozenset({"failed"})
    assert feed.subscribe(print).kinds == frozenset(EVENT_KINDS)
    other = EventFeed("other")
    with pytest.raises(ConfigurationError, match="not a subscription"):
        other.unsubscribe(sub)


def test_mask_follows_the_union_of_subscriptions_and_is_zero_without_any(coord, collector):
    feed, rt = coord.events, coord._rt
    assert feed.mask == 0 and rt.event_mask == 0

    @task_token_guard(operation_type="ev_unobserved")
    def unobserved():
        return 1

    first = unobserved()
    assert first.get(timeout=SAFETY) == 1

    a = feed.subscribe(collector, kinds={"completed"})
    assert rt.event_mask == _bits("completed")
    b = feed.subscribe(collector, kinds=["created", "completed"])
    assert rt.event_mask == _bits("created", "completed")
    assert feed.stats()["mask"] == ["created", "completed"]
    a.unsubscribe()
    assert rt.event_mask == _bits("created", "completed")
    feed.unsubscribe(b)
    assert rt.event_mask == 0 and feed.mask == 0
    assert feed.stats()["subscribers"] == 0 and feed.stats()["mask"] == []

    # with mask 0 the core recorded nothing of the first token: nothing is delivered later
    witness = Collector()
    feed.subscribe(witness)
    assert feed.flush(SAFETY)
    second = unobserved()
    assert second.get(timeout=SAFETY) == 1
    assert witness.wait_final(second.token_id)
    assert first.token_id not in {e.token_id for e in witness.snapshot()}
    assert first.token_id not in {e.token_id for e in collector.snapshot()}


# --------------------------------------------------------------------------- sequences


def test_a_simple_call_is_created_admitted_started_completed(make_coord, collector):
    coord = make_coord(cores=2, workers_per_core=1)
    coord.events.subscribe(collector)

    @task_token_guard(operation_type="ev_simple", tags={"weight": "light", "team": "a"})
    def square(x):
        return x * x

    t0 = time.time()
    token = square(7)
    assert token.get(timeout=SAFETY) == 49
    assert collector.wait_final(token.token_id)
    t1 = time.time()
    assert collector.kinds_of(token.token_id) == SIMPLE
    events = [e for e in collector.snapshot() if e.token_id == token.token_id]
    for e in events:
        assert isinstance(e, _core.LifecycleEvent)
        assert e.operation == "ev_simple"
        assert e.weight == "light" and e.priority == "normal"
        assert e.tags == token.tags and e.tags["team"] == "a"
        assert t0 - 0.01 <= e.time <= t1 + 0.01
        assert e.error is None
        json.dumps(e.as_dict())  # JSON-safe
    assert [e.time for e in events] == sorted(e.time for e in events)
    created, started, completed = events[0], events[2], events[3]
    assert created.attempt == 0 and created.queue_wait is None and created.duration is None
    assert started.attempt == 1 and completed.attempt == 1
    assert started.queue_wait is not None and 0 <= started.queue_wait < SAFETY
    assert completed.duration is not None and 0 <= completed.duration < SAFETY
    assert started.core == completed.core == token.core_id
    assert started.worker == completed.worker == token.worker_id
    assert completed.core in range(1, coord.cores + 1)
    assert collector.threads and all(t.name == "tokengate-events" for t in collector.threads)
    assert threading.current_thread() not in collector.threads


def test_a_raising_call_ends_with_failed_and_its_error(coord, collector):
    coord.events.subscribe(collector)

    @task_token_guard(operation_type="ev_fail")
    def boom():
        raise ValueError("boom 42")

    token = boom()
    with pytest.raises(ValueError, match="boom 42"):
        token.get(timeout=SAFETY)
    assert collector.wait_final(token.token_id)
    assert collector.kinds_of(token.token_id) == ["created", "admitted", "started", "failed"]
    failed = collector.of(token.token_id, "failed")
    assert isinstance(failed.error, ValueError) and str(failed.error) == "boom 42"
    assert failed.error is token.exception()
    assert failed.duration is not None and failed.attempt == 1
    d = failed.as_dict()
    assert d["kind"] == "failed"
    assert d["error"] == {"type": "ValueError", "message": "boom 42"}
    json.dumps(d)


def test_retried_attempts_then_completed(make_coord, collector):
    coord = make_coord(cores=1, workers_per_core=2, grow_on_demand=False)
    coord.events.subscribe(collector)
    calls = []

    @task_token_guard(operation_type="ev_retry", retries=3)
    def flaky():
        calls.append(1)
        if len(calls) <= 2:
            raise ConnectionError(f"attempt {len(calls)}")
        return "ok"

    token = flaky()
    assert token.get(timeout=SAFETY) == "ok"
    assert collector.wait_final(token.token_id)
    kinds = collector.kinds_of(token.token_id)
    assert kinds[:2] == ["created", "admitted"], kinds
    assert [k for k in kinds if k != "admitted"] == [
        "created",
        "started",
        "retried",
        "started",
        "retried",
        "started",
        "completed",
    ], kinds
    evs = [e for e in collector.snapshot() if e.token_id == token.token_id]
    assert [e.attempt for e in evs if e.kind == "started"] == [1, 2, 3]
    retried = [e for e in evs if e.kind == "retried"]
    assert [e.attempt for e in retried] == [1, 2]
    assert [str(e.error) for e in retried] == ["attempt 1", "attempt 2"]
    assert all(isinstance(e.error, ConnectionError) for e in retried)
    assert all(e.duration is not None for e in retried)
    assert Counter(kinds)["completed"] == 1 and FINAL & set(kinds) == {"completed"}


def test_a_retried_event_says_when_the_next_attempt_runs(make_coord, collector):
    # spec: the retried event's detail is "retry in 0.100s" (the delay before the next attempt)
    coord = make_coord(cores=1, workers_per_core=2, grow_on_demand=False)
    coord.events.subscribe(collector, kinds={"retried", "completed"})
    calls = []

    @task_token_guard(
        operation_type="ev_retry_delay", retries=1, retry_backoff=0.01, retry_jitter=False
    )
    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("once")
        return "ok"

    token = flaky()
    assert token.get(timeout=SAFETY) == "ok"
    assert collector.wait_final(token.token_id)
    retried = collector.of(token.token_id, "retried")
    assert retried.detail == "retry in 0.010s", retried.as_dict()


def test_a_queued_token_killed_gets_killed_and_never_started(make_coord, make_latch, collector):
    coord = make_coord(cores=1, workers_per_core=1, grow_on_demand=False)
    coord.events.subscribe(collector)
    latch = make_latch()
    holder = coord.submit(latch.enter)
    assert latch.wait_entered(1)
    queued = coord.submit(lambda: "never")
    assert queued.kill() is True
    assert queued.state is TokenState.KILLED
    assert collector.wait_final(queued.token_id)
    kinds = collector.kinds_of(queued.token_id)
    assert kinds in (["created", "killed"], ["created", "admitted", "killed"]), kinds
    killed = collector.of(queued.token_id, "killed")
    assert killed.duration is None and killed.attempt == 0
    latch.release()
    assert holder.get(timeout=SAFETY) is None
    assert collector.wait_final(holder.token_id)
    assert collector.kinds_of(holder.token_id) == SIMPLE


def test_a_running_token_past_its_timeout_gets_timed_out(make_coord, make_latch, collector):
    coord = make_coord(cores=1, workers_per_core=2, grow_on_demand=False)
    coord.events.subscribe(collector)
    latch = make_latch()

    @task_token_guard(operation_type="ev_timeout", timeout=SHORT)
    def stuck():
        latch.enter()

    token = stuck()
    assert latch.wait_entered(1)
    with pytest.raises(TokenTimeout):
        token.get(timeout=SAFETY)
    assert collector.wait_final(token.token_id)
    assert collector.kinds_of(token.token_id) == ["created", "admitted", "started", "timed_out"]
    timed_out = collector.of(token.token_id, "timed_out")
    assert timed_out.duration is not None and 0 <= timed_out.duration < SAFETY
    assert timed_out.attempt == 1


def test_a_call_refused_by_a_blocked_breaker_is_blocked_without_a_token(coord, collector):
    feed = coord.events
    feed.subscribe(collector)

    @task_token_guard(operation_type="ev_blocked")
    def work():
        return 1

    assert work().get(timeout=SAFETY) == 1
    coord.guard_house.block("ev_blocked")
    with pytest.raises(MethodBlocked):
        work()
    assert feed.flush(SAFETY)  # recorded before the call raised, so delivered now
    blocked = [e for e in collector.snapshot() if e.kind == "blocked"]
    assert len(blocked) == 1, blocked
    (b,) = blocked
    assert b.token_id is None and b.operation == "ev_blocked"
    assert b.detail, b
    assert b.core is None and b.worker is None
    json.dumps(b.as_dict())


def test_a_submission_refused_by_a_full_pool_is_created_then_refused(
    make_coord, make_latch, collector
):
    coord = make_coord(
        cores=1,
        workers_per_core=1,
        pool_capacity=3,
        mailbox_capacity=2,
        overflow="reject",
        grow_on_demand=False,
    )
    coord.events.subscribe(collector)
    latch = make_latch()
    blocker = coord.submit(latch.enter)
    assert latch.wait_entered(1)
    accepted, errors = [], []
    for _ in range(100):
        try:
            accepted.append(coord.submit(lambda: None))
        except PoolFull as exc:
            errors.append(exc)
            if len(errors) == 3:
                break
    assert len(errors) == 3, "the pool never filled"
    assert coord.events.flush(SAFETY)
    refused = [e for e in collector.snapshot() if e.kind == "refused"]
    assert len(refused) == 3, refused
    accepted_ids = {t.token_id for t in accepted} | {blocker.token_id}
    for e in refused:
        assert e.token_id is not None and e.token_id not in accepted_ids
        assert collector.kinds_of(e.token_id) == ["created", "refused"]
        assert e.detail in {str(x) for x in errors}, (e.detail, errors)
    latch.release()
    for t in accepted:
        assert t.get(timeout=SAFETY) is None
    coord.stop()
    finals = Counter(e.token_id for e in collector.snapshot() if e.kind in FINAL)
    assert set(finals) == accepted_ids | {e.token_id for e in refused}
    assert set(finals.values()) == {1}


def test_every_token_gets_exactly_one_final_event_under_a_concurrent_workload(
    make_coord, collector
):
    coord = make_coord(cores=2, workers_per_core=2)
    coord.events.subscribe(collector)

    @task_token_guard(operation_type="ev_load")
    def work(i):
        if i % 7 == 0:
            raise ValueError(i)
        return i

    tokens: list = []
    lock = threading.Lock()

    def submitter(base):
        mine = [work(base + i) for i in range(750)]
        with lock:
            tokens.extend(mine)

    threads = [threading.Thread(target=submitter, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SAFETY)
    assert len(tokens) == 3000
    for t in tokens:
        assert t.wait(SAFETY)
    coord.stop()  # delivers everything still buffered before it returns
    assert coord.events.stats()["dropped"] == 0
    per_token: dict[int, list[str]] = defaultdict(list)
    for e in collector.snapshot():
        per_token[e.token_id].append(e.kind)
    by_id = {t.token_id: t for t in tokens}
    assert set(per_token) == set(by_id)
    for tid, kinds in per_token.items():
        finals = [k for k in kinds if k in FINAL]
        expected = "failed" if by_id[tid].state is TokenState.FAILED else "completed"
        assert finals == [expected], (tid, kinds)
        assert kinds == ["created", "admitted", "started", expected], (tid, kinds)
    assert Counter(k for ks in per_token.values() for k in ks)["failed"] == sum(
        1 for t in tokens if t.state is TokenState.FAILED
    )
    assert coord.events.stats()["delivered"] == 4 * 3000


# --------------------------------------------------------------------------- subscribers


def test_kinds_filter_what_each_subscriber_gets(coord):
    feed = coord.events
    done, failed, every = Collector(), Collector(), Collector()
    feed.subscribe(done, kinds={"completed"})
    feed.subscribe(failed, kinds="failed")
    feed.subscribe(every)

    @task_token_guard(operation_type="ev_kinds")
    def maybe(fail):
        if fail:
            raise KeyError("k")
        return "v"

    ok, bad = maybe(False), maybe(True)
    assert ok.get(timeout=SAFETY) == "v"
    assert isinstance(bad.exception(timeout=SAFETY), KeyError)
    coord.stop()
    assert [(e.kind, e.token_id) for e in done.snapshot()] == [("completed", ok.token_id)]
    assert [(e.kind, e.token_id) for e in failed.snapshot()] == [("failed", bad.token_id)]
    assert every.kinds_of(ok.token_id) == SIMPLE
    assert every.kinds_of(bad.token_id) == ["created", "admitted", "started", "failed"]


def test_unsubscribe_stops_delivery(coord):
    feed = coord.events
    gone, witness = Collector(), Collector()
    sub = feed.subscribe(gone)
    feed.subscribe(witness)

    first = coord.submit(lambda: 1)
    assert first.get(timeout=SAFETY) == 1
    assert gone.wait_final(first.token_id)
    sub.unsubscribe()
    sub.unsubscribe()  # idempotent
    feed.unsubscribe(sub)  # also fine
    assert not sub.active
    seen = len(gone.snapshot())
    second = coord.submit(lambda: 2)
    assert second.get(timeout=SAFETY) == 2
    assert witness.wait_final(second.token_id)  # the delivery thread is past token 2
    assert len(gone.snapshot()) == seen
    assert second.token_id not in {e.token_id for e in gone.snapshot()}
    assert sub.delivered == seen

    with feed.subscribe(gone, kinds={"created"}) as scoped:
        assert scoped.active
        assert coord._rt.event_mask == (1 << len(EVENT_KINDS)) - 1  # witness wants all
    assert not scoped.active
    assert feed.stats()["subscribers"] == 1


def test_a_subscriber_may_unsubscribe_itself_from_its_callback(coord):
    feed = coord.events
    got = []
    witness = Collector()

    def once(event):
        got.append(event)
        sub.unsubscribe()

    sub = feed.subscribe(once)
    feed.subscribe(witness)
    tokens = [coord.submit(lambda: None) for _ in range(5)]
    for t in tokens:
        t.get(timeout=SAFETY)
    assert witness.wait_final(*(t.token_id for t in tokens))
    assert len(got) == 1 and not sub.active


def test_a_raising_subscriber_neither_stops_others_nor_breaks_execution(coord, caplog):
    feed = coord.events
    good = Collector()

    def bad(event):
        raise RuntimeError("subscriber bug")

    def also_bad(event):
        raise KeyError(event.kind)

    bad_sub = feed.subscribe(bad)
    feed.subscribe(good)
    also_sub = feed.subscribe(also_bad, kinds={"completed"})

    @task_token_guard(operation_type="ev_raising_sub")
    def double(x):
        return 2 * x

    with caplog.at_level(logging.ERROR, logger="tokengate.events"):
        tokens = [double(i) for i in range(50)]
        assert [t.get(timeout=SAFETY) for t in tokens] == [2 * i for i in range(50)]
        coord.stop()
    assert len(good.snapshot()) == 4 * 50
    assert all(len(good.kinds_of(t.token_id)) == 4 for t in tokens)
    assert bad_sub.active and bad_sub.errors == 4 * 50 and bad_sub.delivered == 0
    assert also_sub.active and also_sub.errors == 50
    assert feed.stats()["subscriber_errors"] == 4 * 50 + 50
    records = [r for r in caplog.records if r.name == "tokengate.events"]
    # at most one record per subscriber per minute, whatever the number of errors
    assert len(records) == 2, [r.getMessage() for r in records]
    assert all(r.levelno == logging.ERROR and r.exc_info for r in records)
    messages = sorted(r.getMessage() for r in records)
    assert any(".also_bad at" in m for m in messages), messages
    assert any(".bad at" in m for m in messages), messages
    assert all("stays subscribed" in m for m in messages), messages
    assert {r.exc_info[0] for r in records} == {RuntimeError, KeyError}


def test_a_slow_subscriber_makes_the_ring_drop_but_never_blocks_workers(make_coord):
    coord = make_coord(cores=1, workers_per_core=2, event_capacity=64)
    feed = coord.events
    entered, gate = threading.Event(), threading.Event()
    got = []

    def slow(event):
        got.append(event)
        entered.set()
        gate.wait(SAFETY)

    feed.subscribe(slow)
    try:
        first = coord.submit(lambda: -1)
        assert first.get(timeout=SAFETY) == -1
        assert entered.wait(SAFETY)  # the delivery thread is stuck in `slow` now
        tokens = [coord.submit(lambda i=i: i) for i in range(500)]
        assert [t.get(timeout=SAFETY) for t in tokens] == list(range(500))
        assert feed.stats()["dropped"] > 0
        assert feed.flush(timeout=SHORT) is False  # delivery cannot finish while stuck
    finally:
        gate.set()
    coord.stop()
    s = feed.stats()
    assert s["dropped"] == coord._last_runtime().events_dropped
    # every event was either delivered or counted as dropped
    assert len(got) + s["dropped"] == 4 * 501, (len(got), s)
    assert s["delivered"] == len(got)
    assert coord.stats()["completed"] == 501


# --------------------------------------------------------------------------- flush and restarts


def test_flush_waits_for_what_was_recorded_before_it(coord, collector):
    feed = coord.events
    feed.subscribe(collector, kinds={"created"})
    coord.pause()  # nothing runs: only the created events exist
    tokens = [coord.submit(lambda: None) for _ in range(50)]
    assert feed.flush(timeout=SAFETY) is True
    assert {e.token_id for e in collector.snapshot()} == {t.token_id for t in tokens}
    coord.resume()
    for t in tokens:
        t.get(timeout=SAFETY)
    assert feed.flush(timeout=None) is True
    assert len(collector.snapshot()) == 50


def test_flush_from_a_subscriber_returns_false_at_once(coord):
    feed = coord.events
    results, elapsed = [], []
    witness = Collector()

    def flusher(event):
        t0 = time.monotonic()
        results.append(feed.flush(timeout=SAFETY))
        elapsed.append(time.monotonic() - t0)

    feed.subscribe(flusher, kinds={"created"})
    feed.subscribe(witness)
    token = coord.submit(lambda: None)
    token.get(timeout=SAFETY)
    assert witness.wait_final(token.token_id)
    assert results == [False]
    assert elapsed[0] < SAFETY / 2  # returned, not timed out


def test_flush_of_a_feed_without_a_runtime_returns_true():
    feed = EventFeed("lonely")
    assert feed.flush(timeout=0) is True
    feed.subscribe(print)
    assert feed.flush(timeout=0) is True
    assert feed.stats()["subscribers"] == 1


def test_subscriptions_survive_stop_and_start(make_coord, collector):
    coord = make_coord(cores=1, workers_per_core=1)
    feed = coord.events
    sub = feed.subscribe(collector, kinds={"created", "completed"})

    first = coord.submit(lambda: 1)
    assert first.get(timeout=SAFETY) == 1
    coord.stop()
    # stop() delivered what was buffered, and the delivery thread is gone
    assert collector.kinds_of(first.token_id) == ["created", "completed"]
    assert collector.threads and not any(t.is_alive() for t in collector.threads)
    assert sub.active and feed.stats()["subscribers"] == 1

    coord.start()
    assert coord._rt.event_mask == _bits("created", "completed")
    second = coord.submit(lambda: 2)
    assert second.get(timeout=SAFETY) == 2
    assert collector.wait_final(second.token_id)
    assert collector.kinds_of(second.token_id) == ["created", "completed"]
    assert sub.delivered == 4
    coord.stop()
    assert not any(t.is_alive() for t in collector.threads)


def test_detach_delivers_what_the_stopped_runtime_still_buffers(collector):
    rt = _core.Runtime(cores=1, workers_per_core=1, pin_workers=False)
    rt.start()
    feed = EventFeed("bare")
    feed._attach(rt)
    gate = threading.Event()
    entered = threading.Event()

    def held(event):
        if event.kind == "created" and not entered.is_set():
            entered.set()
            gate.wait(SAFETY)
        collector(event)

    feed.subscribe(held)
    try:
        tokens = [rt.submit(lambda i=i: i, ()) for i in range(20)]
        assert entered.wait(SAFETY)
        for t in tokens:
            t.get(timeout=SAFETY)
        rt.close()
        assert rt.shutdown(SAFETY)
        # the delivery thread is stuck in a subscriber: a bounded detach gives up
        assert feed._detach(timeout=SHORT) is False
    finally:
        gate.set()
    assert collector.wait_for(lambda evs: len(evs) == 4 * 20)  # finished in the background
    assert wait_until(lambda: feed.stats()["subscribers"] == 1 and feed.flush(0) is True)
    assert len(rt.take_events(10, 0)) == 0


def test_a_subscription_made_before_start_gets_the_runs_events(collector):
    from tokengate import OperationsCoordinator

    coord = OperationsCoordinator(cores=1, workers_per_core=1)
    coord.events.subscribe(collector, kinds={"completed"})
    with coord:
        assert coord._rt.event_mask == _bits("completed")
        token = coord.submit(lambda: 3)
        assert token.get(timeout=SAFETY) == 3
    assert [(e.kind, e.token_id) for e in collector.snapshot()] == [("completed", token.token_id)]


# --------------------------------------------------------------------------- asyncio


def test_async_for_over_the_feed(coord):
    feed = coord.events

    @task_token_guard(operation_type="ev_async")
    def inc(x):
        return x + 1

    async def main():
        stream = feed.stream(kinds={"completed"})
        assert isinstance(stream, EventStream)
        assert feed.stats()["subscribers"] == 1
        tokens = [inc(i) for i in range(20)]
        got = []
        async for event in stream:
            got.append(event)
            if len(got) == 20:
                break
        return tokens, got

    tokens, got = asyncio.run(asyncio.wait_for(main(), SAFETY))
    assert {e.token_id for e in got} == {t.token_id for t in tokens}
    assert {e.kind for e in got} == {"completed"}
    assert feed.stats()["subscribers"] == 0  # the stream unsubscribed once dropped


def test_breaking_out_of_async_for_unsubscribes(coord):
    feed = coord.events

    async def main():
        token = coord.submit(lambda: None)
        async for event in feed:  # every kind
            assert event.token_id == token.token_id
            break
        return feed.stats()["subscribers"]

    assert asyncio.run(asyncio.wait_for(main(), SAFETY)) == 0
    assert coord._rt.event_mask == 0


def test_aclose_unsubscribes_and_a_cancelled_wait_does_not(coord):
    feed = coord.events

    async def main():
        closed = feed.stream()
        assert feed.stats()["subscribers"] == 1
        await closed.aclose()
        assert closed.closed and feed.stats()["subscribers"] == 0
        assert [e async for e in closed] == []

        stream = feed.stream()
        started = asyncio.Event()

        async def consume():
            started.set()
            async for _ in stream:
                pass

        task = asyncio.create_task(consume())
        await started.wait()  # the consumer is now parked inside __anext__
        assert feed.stats()["subscribers"] == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # a cancelled wait (a timeout, a heartbeat) leaves the stream open for the next one
        assert not stream.closed and feed.stats()["subscribers"] == 1
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(stream), 0.01)
        token = coord.submit(lambda: 7)
        event = await asyncio.wait_for(anext(stream), SAFETY)
        assert event.token_id == token.token_id
        async with stream:
            pass
        return stream

    stream = asyncio.run(asyncio.wait_for(main(), SAFETY))
    assert stream.closed
    assert feed.stats()["subscribers"] == 0


def test_a_stream_drops_and_counts_when_its_consumer_falls_behind(coord):
    feed = coord.events

    async def main():
        stream = feed.stream(kinds={"completed"}, maxsize=5)
        tokens = [coord.submit(lambda i=i: i) for i in range(20)]
        await asyncio.to_thread(lambda: [t.get(timeout=SAFETY) for t in tokens])
        assert await asyncio.to_thread(wait_until, lambda: stream.dropped == 15)
        got = []
        async for event in stream:
            got.append(event)
            if len(got) == 5:
                break
        return stream, tokens, got

    stream, tokens, got = asyncio.run(asyncio.wait_for(main(), SAFETY))
    assert stream.dropped == 15
    assert len({e.token_id for e in got}) == 5
    assert {e.token_id for e in got} <= {t.token_id for t in tokens}
    assert feed.stats()["stream_dropped"] == 15
    assert feed.stats()["dropped"] == 0  # the core's ring lost nothing


def test_a_stream_whose_loop_closed_unsubscribes_quietly(coord, caplog):
    feed = coord.events

    async def make():
        return feed.stream()

    with caplog.at_level(logging.WARNING, logger="tokengate"):
        stream = asyncio.run(make())  # leaked: its loop is closed once run() returns
        assert feed.stats()["subscribers"] == 1
        token = coord.submit(lambda: None)
        token.get(timeout=SAFETY)
        assert wait_until(lambda: feed.stats()["subscribers"] == 0)
    assert stream.closed
    assert [r for r in caplog.records if r.name.startswith("tokengate")] == []


# --------------------------------------------------------------------------- logging and stats


def test_log_events_writes_one_line_per_event(coord, caplog):
    feed = coord.events

    @task_token_guard(operation_type="ev_log")
    def work(fail):
        if fail:
            raise ValueError("bad input")
        return 1

    with caplog.at_level(logging.DEBUG, logger="tokengate.events"):
        sub = feed.log_events()
        failures = feed.log_events(level=logging.INFO, kinds={"failed"})
        ok, bad = work(False), work(True)
        ok.get(timeout=SAFETY)
        bad.exception(timeout=SAFETY)
        coord.stop()
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "tokengate.events"]
    debug = [m for lvl, m in lines if lvl == logging.DEBUG]
    info = [m for lvl, m in lines if lvl == logging.INFO]
    assert len(debug) == 8, debug
    assert any(m.startswith(f"created token={ok.token_id} op=ev_log") for m in debug)
    started = next(m for m in debug if m.startswith(f"started token={ok.token_id} "))
    assert "core=" in started and "worker=" in started and "attempt=1" in started
    assert "queue_wait=" in started
    completed = next(m for m in debug if m.startswith(f"completed token={ok.token_id} "))
    assert "duration=" in completed
    failed = next(m for m in debug if m.startswith(f"failed token={bad.token_id} "))
    assert "error=ValueError: bad input" in failed
    assert info == [failed]
    assert all("\n" not in m for _, m in lines)
    assert sub.active and failures.kinds == frozenset({"failed"})


def test_stats_and_the_coordinators_stats(coord, collector):
    feed = coord.events
    feed.subscribe(collector, kinds={"created", "completed"})
    token = coord.submit(lambda: None)
    token.get(timeout=SAFETY)
    assert collector.wait_final(token.token_id)
    s = feed.stats()
    assert s == {
        "subscribers": 1,
        "delivered": 2,
        "dropped": 0,
        "stream_dropped": 0,
        "subscriber_errors": 0,
        "mask": ["created", "completed"],
    }
    assert coord.stats()["events"]["subscribers"] == 1


# --------------------------------------------------------------------------- batch subscribers


def test_a_batch_subscriber_gets_every_event_once_in_order_and_in_batches(make_coord, collector):
    coord = make_coord(cores=2, workers_per_core=2)
    batches: list = []
    got = threading.Condition()

    def on_batch(batch) -> None:
        assert isinstance(batch, _core.EventBatch) and len(batch) > 0
        with got:
            batches.append([(e.kind, e.token_id) for e in batch])
            got.notify_all()

    coord.events.subscribe(on_batch, batch=True)
    coord.events.subscribe(collector)  # a per-event subscriber alongside it

    @task_token_guard(operation_type="batched")
    def f(x):
        return x

    tokens = [f(i) for i in range(300)]
    for t in tokens:
        t.get(timeout=SAFETY)
    assert coord.events.flush(SAFETY)
    flat = [item for b in batches for item in b]
    assert flat == [(e.kind, e.token_id) for e in collector.snapshot()]
    per_token = defaultdict(list)
    for kind, tid in flat:
        per_token[tid].append(kind)
    assert set(per_token) == {t.token_id for t in tokens}
    assert all(kinds == SIMPLE for kinds in per_token.values())
    assert len(batches) < len(flat)  # delivered in batches, not one call per event


def test_a_batch_subscriber_to_some_kinds_gets_only_those(make_coord, collector):
    coord = make_coord(cores=1, workers_per_core=1)
    batches: list = []
    coord.events.subscribe(collector)  # every kind: the core records them all
    coord.events.subscribe(lambda b: batches.append(b), kinds={"completed", "failed"}, batch=True)

    @task_token_guard(operation_type="some")
    def f(fail):
        if fail:
            raise ValueError("no")
        return 1

    tokens = [f(i % 3 == 0) for i in range(30)]
    for t in tokens:
        t.wait(SAFETY)
    assert coord.events.flush(SAFETY)
    kinds = Counter(e.kind for b in batches for e in b)
    assert kinds == {"completed": 20, "failed": 10}
    merged = Counter()
    for b in batches:
        merged.update(b.counts())
    assert merged == kinds


def test_an_event_batch_is_a_read_only_sequence(make_coord):
    coord = make_coord(cores=1, workers_per_core=1)
    rt = coord._rt
    # "created" is recorded by the submitting thread before the call returns: after three
    # calls the core holds exactly three events.
    rt.set_event_mask(_bits("created"))

    @task_token_guard(operation_type="seq")
    def f():
        return None

    tokens = [f() for _ in range(3)]
    batch = rt.take_events(100, SAFETY)
    ids = [t.token_id for t in tokens]
    assert len(batch) == 3 and bool(batch)
    assert [e.token_id for e in batch] == ids
    assert batch[-1].token_id == ids[-1] and batch[0].token_id == ids[0]
    with pytest.raises(IndexError):
        batch[3]
    with pytest.raises(IndexError):
        batch[-4]
    assert batch.counts() == {"created": 3}
    assert len(batch.select(_bits("completed"))) == 0
    assert [e.token_id for e in batch.select(_bits("created"))] == ids
    assert repr(batch) == "<EventBatch of 3 events>"
    assert len(rt.take_events(10, 0)) == 0


def test_batch_must_be_a_bool(make_coord):
    coord = make_coord(cores=1, workers_per_core=1)
    with pytest.raises(ConfigurationError, match="batch must be True or False"):
        coord.events.subscribe(lambda b: None, batch=1)


def test_an_event_batch_slices_and_selects_by_kind_name(make_coord):
    coord = make_coord(cores=1, workers_per_core=1)
    rt = coord._rt
    rt.set_event_mask(_bits("created"))
    tokens = [coord.submit(lambda: None) for _ in range(4)]
    batch = rt.take_events(100, SAFETY)
    ids = [t.token_id for t in tokens]
    assert [e.token_id for e in batch[1:3]] == ids[1:3]
    assert [e.token_id for e in batch[::-1]] == ids[::-1]
    assert batch[10:] == []
    assert len(batch.select("created")) == 4
    assert len(batch.select({"created", "completed"})) == 4
    assert len(batch.select(["completed"])) == 0
    with pytest.raises(ConfigurationError, match="unknown event kind 'craeted'"):
        batch.select("craeted")
