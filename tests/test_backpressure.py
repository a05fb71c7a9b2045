"""Bounded token pool: overflow="reject" raises PoolFull, overflow="block" blocks the submitter."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from _support import SAFETY, wait_until
from tokengate import PoolFull, TokenGateError, TokenState, task_token_guard


def _invariant(s):
    return s["created"] == (
        s["waiting"] + s["admitted"] + s["executing"] + s["completed"] + s["failed"] + s["killed"]
    )


def test_reject_raises_pool_full_exactly_at_the_bound(make_coord):
    coord = make_coord(cores=2, workers_per_core=1, pool_capacity=5, overflow="reject")
    ran = []
    coord.pause()
    accepted = [coord.submit(ran.append, i) for i in range(5)]
    assert all(t.state is TokenState.WAITING for t in accepted)
    with pytest.raises(PoolFull) as ei:
        coord.submit(ran.append, 99)
    assert isinstance(ei.value, TokenGateError)
    guarded = task_token_guard()(ran.append)
    with pytest.raises(PoolFull):
        guarded(100)
    s = coord.stats()
    assert s["waiting"] == 5
    assert _invariant(s), s

    coord.resume()
    for t in accepted:
        assert t.get() is None
    assert sorted(ran) == [0, 1, 2, 3, 4]
    # room again
    assert coord.submit(lambda: "again").get() == "again"


def test_reject_with_workers_blocked_loses_no_token(make_coord, make_latch):
    pool_capacity, mailbox_capacity = 3, 2
    coord = make_coord(
        cores=1,
        workers_per_core=1,
        pool_capacity=pool_capacity,
        mailbox_capacity=mailbox_capacity,
        overflow="reject",
    )
    latch = make_latch()
    blocker = coord.submit(latch.enter)
    assert latch.wait_entered(1)

    ran = []
    accepted = []
    rejected = 0
    for i in range(100):
        try:
            accepted.append((i, coord.submit(ran.append, i)))
        except PoolFull:
            rejected += 1
            break
    assert rejected == 1, "the bound was never reached"
    # Whether the capacity counts only pooled or all in-flight tokens, it lies in this range.
    assert pool_capacity - 1 <= len(accepted) <= pool_capacity + mailbox_capacity
    # repeated attempts keep failing while nothing drains
    with pytest.raises(PoolFull):
        coord.submit(ran.append, -1)

    latch.release()
    blocker.get()
    for i, tok in accepted:
        assert tok.get() is None
        assert tok.state is TokenState.COMPLETED, i
    assert Counter(ran) == Counter(i for i, _ in accepted)
    assert -1 not in ran
    assert coord.submit(lambda: 1).get() == 1


def test_reject_concurrent_submitters_every_token_accounted_for(make_coord):
    coord = make_coord(cores=2, workers_per_core=2, pool_capacity=20, overflow="reject")
    n_threads, per_thread = 4, 300
    ran = []
    ran_lock = threading.Lock()

    def record(k, i):
        with ran_lock:
            ran.append((k, i))
        return (k, i)

    accepted: list[list] = [[] for _ in range(n_threads)]
    rejected = [0] * n_threads
    barrier = threading.Barrier(n_threads)

    def submitter(k):
        barrier.wait(SAFETY)
        for i in range(per_thread):
            try:
                accepted[k].append(coord.submit(record, k, i))
            except PoolFull:
                rejected[k] += 1

    threads = [threading.Thread(target=submitter, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SAFETY)
        assert not t.is_alive()
    for k in range(n_threads):
        assert len(accepted[k]) + rejected[k] == per_thread
    results = [tok.get() for chunk in accepted for tok in chunk]
    assert Counter(results) == Counter(ran)
    assert len(set(ran)) == len(ran)
    assert wait_until(lambda: coord.stats()["executing"] == 0, timeout=5)
    s = coord.stats()
    assert s["completed"] == len(results)
    assert _invariant(s), s


def _blocked_submit(coord, fn, *args):
    """Submit from another thread; returns (thread, about_to_submit, submitted, box)."""
    about = threading.Event()
    submitted = threading.Event()
    box = {}

    def run():
        about.set()
        try:
            box["token"] = coord.submit(fn, *args)
        except BaseException as exc:
            box["exc"] = exc
        finally:
            submitted.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert about.wait(SAFETY)
    return thread, submitted, box


def test_block_waits_until_room_frees_on_resume(make_coord):
    coord = make_coord(cores=2, workers_per_core=1, pool_capacity=3, overflow="block")
    coord.pause()
    ran = []
    first = [coord.submit(ran.append, i) for i in range(3)]
    thread, submitted, box = _blocked_submit(coord, ran.append, 3)
    # the submitting thread stays blocked while the pool is full
    assert not submitted.wait(0.2)
    assert box == {}
    s = coord.stats()
    assert s["waiting"] == 3
    assert s["created"] == 3

    coord.resume()
    assert submitted.wait(SAFETY)
    thread.join(SAFETY)
    assert "exc" not in box, box
    assert box["token"].get() is None
    for t in first:
        assert t.get() is None
    assert sorted(ran) == [0, 1, 2, 3]


def test_block_unblocks_when_a_waiting_token_is_killed(make_coord):
    coord = make_coord(cores=2, workers_per_core=1, pool_capacity=2, overflow="block")
    coord.pause()
    ran = []
    a = coord.submit(ran.append, "a")
    b = coord.submit(ran.append, "b")
    thread, submitted, box = _blocked_submit(coord, ran.append, "c")
    assert not submitted.wait(0.1)
    assert a.kill() is True
    # still paused: the room comes from the killed token only
    assert submitted.wait(SAFETY)
    thread.join(SAFETY)
    c = box["token"]
    assert c.state is TokenState.WAITING
    coord.resume()
    assert b.get() is None and c.get() is None
    assert sorted(ran) == ["b", "c"]


def test_block_with_busy_workers_unblocks_when_work_finishes(make_coord, make_latch):
    coord = make_coord(
        cores=1,
        workers_per_core=1,
        pool_capacity=2,
        mailbox_capacity=1,
        overflow="block",
        grow_on_demand=False,  # a held worker makes the rest queue
    )
    latch = make_latch()
    blocker = coord.submit(latch.enter)
    assert latch.wait_entered(1)
    ran = []
    accepted = []
    # fill everything: submissions from a helper thread until one blocks
    stuck = threading.Event()

    def filler():
        for i in range(50):
            accepted.append(coord.submit(ran.append, i))
        stuck.set()  # never reached while blocked

    thread = threading.Thread(target=filler, daemon=True)
    thread.start()
    # the filler must block before it gets through 50 submissions
    assert not stuck.wait(0.3)
    n_blocked_at = len(accepted)
    assert 1 <= n_blocked_at <= 3
    latch.release()
    thread.join(SAFETY)
    assert not thread.is_alive()
    assert stuck.is_set()
    blocker.get()
    assert [t.get() for t in accepted] == [None] * 50
    assert sorted(ran) == list(range(50))


def test_submit_timeout_turns_block_into_pool_full(make_coord):
    coord = make_coord(
        cores=2, workers_per_core=1, pool_capacity=2, overflow="block", submit_timeout=0.1
    )
    coord.pause()
    held = [coord.submit(lambda: None) for _ in range(2)]
    t0 = time.monotonic()
    with pytest.raises(PoolFull):
        coord.submit(lambda: None)
    assert time.monotonic() - t0 >= 0.09
    s = coord.stats()
    assert s["waiting"] == 2
    assert _invariant(s), s
    coord.resume()
    for t in held:
        assert t.get() is None


def test_submit_timeout_not_hit_when_room_frees_in_time(make_coord):
    coord = make_coord(
        cores=2, workers_per_core=1, pool_capacity=1, overflow="block", submit_timeout=SAFETY
    )
    coord.pause()
    first = coord.submit(lambda: 1)
    thread, submitted, box = _blocked_submit(coord, lambda: 2)
    assert not submitted.wait(0.1)
    coord.resume()
    assert submitted.wait(SAFETY)
    thread.join(SAFETY)
    assert "exc" not in box, box
    assert first.get() == 1
    assert box["token"].get() == 2
