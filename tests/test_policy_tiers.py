"""Storage-tier throttling (issue #7): a token tagged ``storage_speed`` holds a permit of its
tier while it runs; tokens without a free permit are *held* outside the mailboxes, occupy no
worker, and are admitted when a permit frees.

Every test sizes the coordinator explicitly (``cores=``, ``workers_per_core=``) so that there
are more workers than permits: a bound that holds only because the pool is small proves
nothing.
"""

from __future__ import annotations

import threading

import pytest

from _support import SAFETY, Peak, quiescent, wait_until
from tokengate import (
    STORAGE_SPEEDS,
    ConfigurationError,
    InvalidTag,
    TokenKilled,
    TokenState,
    task_token_guard,
)

# --------------------------------------------------------------------------- the bound


@pytest.mark.parametrize("tier,limit", [("SLOW", 2), ("MODERATE", 3), ("FAST", 1), ("INSANE", 4)])
def test_peak_of_a_tier_never_exceeds_its_limit_and_every_token_completes(
    make_coord, tier, limit, make_latch
):
    coord = make_coord(
        grow_on_demand=False, cores=1, workers_per_core=6, storage_limits={tier: limit}
    )
    peak = Peak()
    gate = make_latch()

    @task_token_guard(operation_type=f"tier_{tier}", tags={"storage_speed": tier.lower()})
    def write(i):
        with peak:
            gate.enter()
            # a little work, so that permits are returned and re-granted while others run
            return sum(range(200)) + i

    n = 40
    tokens = [write(i) for i in range(n)]
    # the first `limit` run and block; the others are held, not on a worker
    assert wait_until(lambda: peak.entered == limit)
    assert wait_until(lambda: coord.stats()["storage"][tier]["held"] == n - limit)
    s = coord.stats()
    assert s["storage"][tier]["running"] == limit
    assert s["storage"][tier]["limit"] == limit
    assert s["executing"] == limit
    assert peak.entered == limit  # still: the held ones never started
    gate.release()
    assert [t.get(timeout=SAFETY) for t in tokens] == [sum(range(200)) + i for i in range(n)]
    assert peak.peak == limit
    assert all(t.state is TokenState.COMPLETED for t in tokens)
    assert all(t.storage_speed == tier for t in tokens)
    s = quiescent(coord)
    st = s["storage"][tier]
    assert st["running"] == st["held"] == 0
    assert st["granted"] == n
    assert st["delayed"] >= n - limit


def test_default_limits_are_the_documented_ones(make_coord):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=1)
    storage = coord.stats()["storage"]
    assert {tier: storage[tier]["limit"] for tier in STORAGE_SPEEDS} == {
        "SLOW": 10,
        "MODERATE": 25,
        "FAST": 50,
        "INSANE": 70,
    }


def test_default_slow_limit_of_ten_holds_with_twelve_workers(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=12)
    peak = Peak()
    gate = make_latch()

    @task_token_guard(operation_type="tier_default_slow", tags={"storage_speed": "SLOW"})
    def write():
        with peak:
            gate.enter()

    tokens = [write() for _ in range(30)]
    assert wait_until(lambda: peak.entered == 10)
    assert wait_until(lambda: coord.stats()["storage"]["SLOW"]["held"] == 20)
    gate.release()
    for t in tokens:
        t.get(timeout=SAFETY)
    assert peak.peak == 10
    quiescent(coord)


def test_tiers_are_independent(make_coord, make_latch):
    """A full SLOW tier does not hold FAST tokens (or untagged ones)."""
    coord = make_coord(
        grow_on_demand=False, cores=1, workers_per_core=4, storage_limits={"SLOW": 1, "FAST": 2}
    )
    slow_gate = make_latch()
    slow_peak, fast_peak = Peak(), Peak()
    fast_in = threading.Barrier(2)

    @task_token_guard(operation_type="indep_slow", tags={"storage_speed": "SLOW"})
    def slow():
        with slow_peak:
            slow_gate.enter()

    @task_token_guard(operation_type="indep_fast", tags={"storage_speed": "FAST"})
    def fast():
        with fast_peak:
            fast_in.wait(SAFETY)  # both FAST permits must be in use at once
            return "fast"

    slows = [slow() for _ in range(5)]
    assert wait_until(lambda: slow_peak.entered == 1)
    fasts = [fast() for _ in range(4)]
    assert [f.get(timeout=SAFETY) for f in fasts] == ["fast"] * 4
    assert fast_peak.peak == 2
    assert slow_peak.entered == 1
    slow_gate.release()
    for t in slows:
        t.get(timeout=SAFETY)
    assert slow_peak.peak == 1
    quiescent(coord)


# ------------------------------------------------------------------ no head-of-line blocking


def test_untagged_tokens_after_a_slow_burst_finish_before_the_burst(make_coord, make_latch):
    """The seed's starvation: a burst of SLOW writes blocked every worker in a semaphore.
    Here the SLOW tasks cannot finish until the untagged ones did; if the untagged ones could
    not get a worker, the get() below would time out instead."""
    coord = make_coord(
        grow_on_demand=False, cores=1, workers_per_core=4, storage_limits={"SLOW": 2}
    )
    release_slow = make_latch()
    finished: list[str] = []
    lock = threading.Lock()

    @task_token_guard(operation_type="hol_slow", tags={"storage_speed": "SLOW"})
    def slow_write(i):
        release_slow.enter()
        with lock:
            finished.append(f"slow{i}")

    @task_token_guard(operation_type="hol_plain")
    def plain(i):
        with lock:
            finished.append(f"plain{i}")
        return i

    burst = [slow_write(i) for i in range(200)]
    plains = [plain(i) for i in range(50)]
    assert [p.get(timeout=SAFETY) for p in plains] == list(range(50))
    assert not any(t.done() for t in burst)
    release_slow.release()
    for t in burst:
        t.get(timeout=SAFETY)
    # every plain token finished before the first SLOW write did
    assert sorted(finished[:50]) == sorted(f"plain{i}" for i in range(50))
    assert sorted(finished[50:]) == sorted(f"slow{i}" for i in range(200))
    quiescent(coord)


def test_held_tokens_occupy_no_worker(make_coord, make_latch):
    """1 core x 3 workers, SLOW limit 1: one SLOW task runs, four are held; the two other
    workers are free, proven by two untagged tasks being inside at the same time."""
    coord = make_coord(
        grow_on_demand=False, cores=1, workers_per_core=3, storage_limits={"SLOW": 1}
    )
    slow_latch = make_latch()
    plain_latch = make_latch()

    @task_token_guard(operation_type="noworker_slow", tags={"storage_speed": "SLOW"})
    def slow():
        slow_latch.enter()

    slows = [slow() for _ in range(5)]
    assert slow_latch.wait_entered(1)
    assert wait_until(lambda: coord.stats()["held"] == 4)
    s = coord.stats()
    assert s["per_core"][0]["executing"] == 1
    assert s["per_core"][0]["queue_depth"] == 0  # held outside the mailboxes
    assert s["pool_len"] == 0
    assert all(t.state is TokenState.WAITING for t in slows[1:])
    assert all(t.worker_id is None and t.started_at is None for t in slows[1:])

    plains = [coord.submit(plain_latch.enter) for _ in range(2)]
    assert plain_latch.wait_entered(2)
    assert slow_latch.entered == 1
    plain_latch.release()
    slow_latch.release()
    for t in plains + slows:
        t.get(timeout=SAFETY)
    quiescent(coord)


def test_slow_tokens_interleaved_with_plain_ones_in_one_mailbox(make_coord, make_latch):
    """1 core x 1 worker, SLOW limit 1: a SLOW token waiting for its permit must not sit at the
    head of the mailbox in front of untagged tokens queued behind it."""
    coord = make_coord(
        grow_on_demand=False, cores=1, workers_per_core=2, storage_limits={"SLOW": 1}
    )
    release = make_latch()
    order: list[str] = []

    @task_token_guard(operation_type="mix_slow", tags={"storage_speed": "SLOW"})
    def slow(i):
        release.enter()
        order.append(f"s{i}")

    @task_token_guard(operation_type="mix_plain")
    def plain(i):
        order.append(f"p{i}")

    tokens = []
    for i in range(10):
        tokens.append(slow(i))
        tokens.append(plain(i))
    plains = tokens[1::2]
    for p in plains:
        p.get(timeout=SAFETY)
    assert sorted(order) == sorted(f"p{i}" for i in range(10))
    release.release()
    for t in tokens:
        t.get(timeout=SAFETY)
    assert sorted(order[10:]) == sorted(f"s{i}" for i in range(10))
    quiescent(coord)


# --------------------------------------------------------------------------- permits come back


def test_permit_is_returned_when_a_task_fails(make_coord):
    coord = make_coord(
        grow_on_demand=False, cores=1, workers_per_core=3, storage_limits={"SLOW": 1}
    )

    @task_token_guard(operation_type="tier_fail", tags={"storage_speed": "SLOW"})
    def flaky(i):
        if i % 2 == 0:
            raise OSError(f"disk {i}")
        return i

    tokens = [flaky(i) for i in range(10)]
    for i, t in enumerate(tokens):
        if i % 2 == 0:
            with pytest.raises(OSError, match=f"disk {i}"):
                t.get(timeout=SAFETY)
        else:
            assert t.get(timeout=SAFETY) == i
    s = quiescent(coord)
    assert s["storage"]["SLOW"]["granted"] == 10
    assert s["storage"]["SLOW"]["running"] == 0


def test_permit_is_returned_after_a_killed_running_task_returns(make_coord, make_latch):
    coord = make_coord(
        grow_on_demand=False, cores=1, workers_per_core=3, storage_limits={"SLOW": 1}
    )
    inside = threading.Event()
    go = make_latch()
    ran = []

    @task_token_guard(operation_type="tier_kill_running", tags={"storage_speed": "SLOW"})
    def write(i):
        ran.append(i)
        if i == 0:
            inside.set()
            go.enter()
        return i

    first = write(0)
    assert inside.wait(SAFETY)
    rest = [write(i) for i in range(1, 4)]
    assert first.kill() is True
    with pytest.raises(TokenKilled):
        first.get(timeout=SAFETY)
    go.release()
    assert [t.get(timeout=SAFETY) for t in rest] == [1, 2, 3]
    assert first.wait(SAFETY)
    assert wait_until(lambda: first.state is TokenState.KILLED)
    assert sorted(ran) == [0, 1, 2, 3]
    quiescent(coord)


# --------------------------------------------------------------------------- stats


def test_stats_show_held_running_and_wait_figures(make_coord, make_latch):
    coord = make_coord(
        grow_on_demand=False, cores=1, workers_per_core=4, storage_limits={"SLOW": 2}
    )
    latch = make_latch()

    @task_token_guard(operation_type="tier_stats", tags={"storage_speed": "SLOW"})
    def write():
        latch.enter()

    before = coord.stats()["storage"]["SLOW"]
    assert before["wait_seconds_total"] == 0.0
    assert before["wait_seconds_p95"] is None
    tokens = [write() for _ in range(7)]
    assert latch.wait_entered(2)
    assert wait_until(lambda: coord.stats()["storage"]["SLOW"]["held"] == 5)
    s = coord.stats()
    st = s["storage"]["SLOW"]
    assert st["running"] == 2
    assert st["held"] == 5
    assert st["limit"] == 2
    assert s["held"] == 5
    assert s["waiting"] == 5  # held tokens are WAITING
    for tier in ("MODERATE", "FAST", "INSANE"):
        assert s["storage"][tier]["running"] == s["storage"][tier]["held"] == 0
    # a held token has waited by the time it is let in (an observable wait, no sleep needed:
    # the latch is released only after the held figure was read)
    latch.release()
    for t in tokens:
        t.get(timeout=SAFETY)
    st = coord.stats()["storage"]["SLOW"]
    assert st["granted"] == 7
    assert st["delayed"] == 5
    assert st["wait_seconds_total"] > 0
    assert 0 < st["wait_seconds_max"] <= st["wait_seconds_total"]
    assert st["wait_seconds_p95"] is not None
    assert 0 < st["wait_seconds_p95"] <= st["wait_seconds_max"]
    # the held ones waited at least as long as from their submission to the latch release
    assert st["wait_seconds_max"] >= max(t.started_at - t.created_at for t in tokens) - 0.05
    quiescent(coord)


def test_storage_speed_tag_is_case_insensitive_and_reported_by_name(make_coord):
    make_coord(grow_on_demand=False, cores=1, workers_per_core=1)
    for spelling in ("slow", "Slow", "SLOW"):
        fn = task_token_guard(tags={"storage_speed": spelling})(lambda: 1)
        token = fn()
        assert token.get(timeout=SAFETY) == 1
        assert token.storage_speed == "SLOW"
        assert fn.tags["storage_speed"] == "SLOW"
    untagged = task_token_guard()(lambda: 1)()
    untagged.get(timeout=SAFETY)
    assert untagged.storage_speed is None


def test_storage_speed_per_call_through_options(make_coord, make_latch):
    coord = make_coord(
        grow_on_demand=False, cores=1, workers_per_core=3, storage_limits={"FAST": 1}
    )
    latch_peak = Peak()
    gate = make_latch()

    @task_token_guard(operation_type="tier_per_call")
    def write():
        with latch_peak:
            gate.enter()

    fast = write.options(tags={"storage_speed": "fast"})
    tokens = [fast() for _ in range(4)]
    assert wait_until(lambda: latch_peak.entered == 1)
    assert wait_until(lambda: coord.stats()["storage"]["FAST"]["held"] == 3)
    assert latch_peak.entered == 1
    assert all(t.storage_speed == "FAST" for t in tokens)
    gate.release()
    for t in tokens:
        t.get(timeout=SAFETY)
    assert latch_peak.peak == 1
    # the original function is untouched
    assert write.storage_speed is None
    quiescent(coord)


@pytest.mark.parametrize("bad", ["slowish", "", 3, None.__class__])
def test_bad_storage_speed_tag_raises_invalid_tag(bad):
    with pytest.raises(InvalidTag, match="storage_speed") as ei:
        task_token_guard(tags={"storage_speed": bad})(lambda: 1)
    assert isinstance(ei.value, ValueError)
    assert "SLOW" in str(ei.value)


# --------------------------------------------------------------------------- runtime limit


def test_set_storage_limit_raises_the_bound_and_admits_held_tokens(make_coord, make_latch):
    coord = make_coord(
        grow_on_demand=False, cores=1, workers_per_core=5, storage_limits={"SLOW": 1}
    )
    latch = make_latch()
    peak = Peak()

    @task_token_guard(operation_type="tier_raise", tags={"storage_speed": "SLOW"})
    def write():
        with peak:
            latch.enter()

    tokens = [write() for _ in range(6)]
    assert latch.wait_entered(1)
    assert wait_until(lambda: coord.stats()["storage"]["SLOW"]["held"] == 5)
    coord.set_storage_limit("SLOW", 4)
    # held tokens are admitted at once, while the first one still runs
    assert latch.wait_entered(4)
    assert wait_until(lambda: coord.stats()["storage"]["SLOW"]["held"] == 2)
    st = coord.stats()["storage"]["SLOW"]
    assert st["limit"] == 4
    assert st["running"] == 4
    latch.release()
    for t in tokens:
        t.get(timeout=SAFETY)
    assert peak.peak == 4
    quiescent(coord)


def test_lowering_a_storage_limit_stops_nothing_and_applies_to_new_grants(make_coord, make_latch):
    coord = make_coord(
        grow_on_demand=False, cores=1, workers_per_core=6, storage_limits={"SLOW": 4}
    )
    peak = Peak()
    first_gate = make_latch()
    second_gate = make_latch()
    second_peak = Peak()

    @task_token_guard(operation_type="tier_lower", tags={"storage_speed": "SLOW"})
    def write(phase):
        if phase == 1:
            with peak:
                first_gate.enter()
        else:
            with second_peak:
                second_gate.enter()

    first = [write(1) for _ in range(4)]
    assert wait_until(lambda: peak.entered == 4)
    coord.set_storage_limit("SLOW", 1)
    second = [write(2) for _ in range(5)]
    assert wait_until(lambda: coord.stats()["storage"]["SLOW"]["held"] == 5)
    assert all(t.state is TokenState.EXECUTING for t in first)  # nothing was stopped
    first_gate.release()
    for t in first:
        t.get(timeout=SAFETY)
    assert wait_until(lambda: second_peak.entered == 1)
    assert coord.stats()["storage"]["SLOW"]["held"] == 4
    second_gate.release()
    for t in second:
        t.get(timeout=SAFETY)
    assert second_peak.peak == 1
    quiescent(coord)


@pytest.mark.parametrize(
    "tier,limit,exc",
    [
        ("SLUGGISH", 2, ConfigurationError),
        ("SLOW", 0, ConfigurationError),
        ("SLOW", -1, ConfigurationError),
        ("SLOW", 2.5, ConfigurationError),
        ("SLOW", True, ConfigurationError),
    ],
)
def test_set_storage_limit_rejects_bad_input(coord, tier, limit, exc):
    with pytest.raises(exc):
        coord.set_storage_limit(tier, limit)
    assert coord.stats()["storage"]["SLOW"]["limit"] == 10


def test_set_storage_limit_accepts_any_case_like_the_tag(coord):
    coord.set_storage_limit("slow", 3)
    assert coord.stats()["storage"]["SLOW"]["limit"] == 3


@pytest.mark.parametrize(
    "limits",
    [{"SLUGGISH": 1}, {"SLOW": 0}, {"SLOW": -3}, {"SLOW": "2"}, ["SLOW", 2], {"SLOW": 1.5}],
)
def test_bad_storage_limits_are_refused_at_construction(limits):
    from tokengate import OperationsCoordinator

    with pytest.raises(ConfigurationError):
        OperationsCoordinator(cores=1, workers_per_core=1, storage_limits=limits)


# --------------------------------------------------------------------------- kill / stop


def test_kill_of_a_held_token_ends_it_at_once_and_it_never_runs(make_coord, make_latch):
    coord = make_coord(
        grow_on_demand=False, cores=1, workers_per_core=3, storage_limits={"SLOW": 1}
    )
    latch = make_latch()
    ran = []

    @task_token_guard(operation_type="tier_kill_held", tags={"storage_speed": "SLOW"})
    def write(i):
        ran.append(i)
        latch.enter()
        return i

    tokens = [write(i) for i in range(4)]
    assert latch.wait_entered(1)
    assert wait_until(lambda: coord.stats()["storage"]["SLOW"]["held"] == 3)
    victim = tokens[2]
    assert victim.kill() is True
    assert victim.state is TokenState.KILLED
    with pytest.raises(TokenKilled):
        victim.get(timeout=0)
    assert victim.kill() is False
    st = coord.stats()["storage"]["SLOW"]
    assert st["held"] == 2
    assert coord.stats()["held"] == 2
    latch.release()
    assert [tokens[i].get(timeout=SAFETY) for i in (0, 1, 3)] == [0, 1, 3]
    assert sorted(ran) == [0, 1, 3]
    s = quiescent(coord)
    assert s["killed"] == 1
    assert s["storage"]["SLOW"]["granted"] == 3


def test_stop_without_wait_kills_held_tokens_and_leaves_nothing_waiting(make_coord, make_latch):
    coord = make_coord(
        grow_on_demand=False, cores=1, workers_per_core=3, storage_limits={"SLOW": 1}
    )
    latch = make_latch()
    ran = []

    @task_token_guard(operation_type="tier_stop_held", tags={"storage_speed": "SLOW"})
    def write(i):
        ran.append(i)
        latch.enter()
        return i

    running = write(0)
    assert latch.wait_entered(1)
    held = [write(i) for i in range(1, 8)]
    assert wait_until(lambda: coord.stats()["storage"]["SLOW"]["held"] == 7)

    outcomes: list[object] = [None] * len(held)
    ready = threading.Barrier(len(held) + 1)

    def waiter(k):
        ready.wait(SAFETY)
        try:
            outcomes[k] = held[k].get(timeout=SAFETY)
        except BaseException as exc:
            outcomes[k] = exc

    waiters = [threading.Thread(target=waiter, args=(k,), daemon=True) for k in range(len(held))]
    for t in waiters:
        t.start()
    ready.wait(SAFETY)
    stopper = threading.Thread(target=coord.stop, kwargs={"wait": False}, daemon=True)
    stopper.start()
    for t in held:
        assert t.wait(SAFETY)
        assert t.state is TokenState.KILLED
    for t in waiters:
        t.join(SAFETY)
        assert not t.is_alive()
    assert all(isinstance(o, TokenKilled) for o in outcomes), outcomes
    latch.release()
    stopper.join(SAFETY)
    assert not stopper.is_alive()
    assert running.get(timeout=SAFETY) == 0
    assert ran == [0]
    s = coord.stats()
    assert s["held"] == 0
    assert s["storage"]["SLOW"]["held"] == 0
    assert s["killed"] == 7
    assert s["created"] == s["completed"] + s["failed"] + s["killed"] + s["timed_out"]
    assert s["waiting"] == s["admitted"] == s["executing"] == 0


def test_stop_with_wait_runs_every_held_token(make_coord):
    coord = make_coord(
        grow_on_demand=False, cores=1, workers_per_core=4, storage_limits={"SLOW": 1}
    )
    peak = Peak()

    @task_token_guard(operation_type="tier_stop_wait", tags={"storage_speed": "SLOW"})
    def write(i):
        with peak:
            return i

    tokens = [write(i) for i in range(30)]
    assert coord.stop(wait=True, timeout=SAFETY) is True
    assert [t.get(timeout=0) for t in tokens] == list(range(30))
    assert peak.peak == 1


# ------------------------------------------------------------------ fairness across operations


def test_permits_go_round_robin_across_operations(make_coord, make_latch):
    """SLOW limit 1: operation A has a backlog of 20 held tokens; B submits 3 after it. With
    round robin across operations, B's tokens do not wait behind A's whole backlog."""
    coord = make_coord(
        grow_on_demand=False, cores=1, workers_per_core=4, storage_limits={"SLOW": 1}
    )
    latch = make_latch()
    order: list[str] = []

    @task_token_guard(operation_type="rr_a", tags={"storage_speed": "SLOW"})
    def a(i):
        if i == 0:
            latch.enter()
        order.append(f"a{i}")

    @task_token_guard(operation_type="rr_b", tags={"storage_speed": "SLOW"})
    def b(i):
        order.append(f"b{i}")

    a_tokens = [a(i) for i in range(21)]
    assert latch.wait_entered(1)
    b_tokens = [b(i) for i in range(3)]
    assert wait_until(lambda: coord.stats()["storage"]["SLOW"]["held"] == 23)
    latch.release()
    for t in a_tokens + b_tokens:
        t.get(timeout=SAFETY)
    # FIFO within an operation
    assert [x for x in order if x[0] == "a"] == [f"a{i}" for i in range(21)]
    assert [x for x in order if x[0] == "b"] == ["b0", "b1", "b2"]
    # B's last token ran within the first few grants, not after A's backlog
    assert order.index("b2") <= 8, order
    quiescent(coord)


def test_a_high_priority_token_gets_the_next_permit(make_coord, make_latch):
    """SLOW limit 1: three low-priority SLOW tokens and then a high-priority one wait for the
    permit; when it frees, the high one should run first (priority orders every queue a token
    waits in, not only the mailboxes)."""
    coord = make_coord(
        grow_on_demand=False, cores=1, workers_per_core=4, storage_limits={"SLOW": 1}
    )
    latch = make_latch()
    order = []
    slow = task_token_guard(operation_type="tier_prio", tags={"storage_speed": "SLOW"})
    blocker = slow(latch.enter)()
    assert latch.wait_entered(1)
    record = slow(order.append)
    lows = [record.options(priority="low")(f"low{i}") for i in range(3)]
    high = record.options(priority="high")("high")
    assert wait_until(lambda: coord.stats()["storage"]["SLOW"]["held"] == 4)
    latch.release()
    for t in [blocker, *lows, high]:
        t.get(timeout=SAFETY)
    assert order == ["high", "low0", "low1", "low2"]
