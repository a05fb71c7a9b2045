"""Concurrency and rate limits per operation or per tag value (issue #7).

``max_concurrency=`` / ``rate_limit=`` (GCRA, ``rate_burst=``) per operation type, or per value
of a tag (``limit_by='tenant'``). Tokens over the limit are *held*: never dropped, never on a
worker; keys are independent and served fairly; ``coord.set_limit(...)`` changes a limit at
runtime. Limits are global to the coordinator (across cores).
"""

from __future__ import annotations

import threading

import pytest

from _support import SAFETY, Peak, quiescent, wait_until
from tokengate import (
    ConfigurationError,
    TokenKilled,
    TokenState,
    task_token_guard,
)

# --------------------------------------------------------------------------- max_concurrency


def test_max_concurrency_is_never_exceeded_and_every_token_completes(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=6)
    peak = Peak()
    gate = make_latch()

    @task_token_guard(operation_type="lim_mc", max_concurrency=2)
    def work(i):
        with peak:
            gate.enter()
            return i

    tokens = [work(i) for i in range(40)]
    assert wait_until(lambda: peak.entered == 2)
    assert wait_until(lambda: coord.stats()["limits"]["lim_mc"]["held"] == 38)
    lim = coord.stats()["limits"]["lim_mc"]
    assert lim["running"] == 2
    assert lim["max_concurrency"] == 2
    assert lim["limit_by"] is None
    assert coord.stats()["held"] == 38
    assert peak.entered == 2
    gate.release()
    assert [t.get(timeout=SAFETY) for t in tokens] == list(range(40))
    assert peak.peak == 2
    s = quiescent(coord)
    lim = s["limits"]["lim_mc"]
    assert lim["granted"] == 40
    assert lim["held"] == lim["running"] == 0
    assert lim["delayed"] >= 38
    assert lim["wait_seconds_total"] > 0


def test_max_concurrency_is_global_across_cores(make_coord, make_latch):
    """Heavy tokens may run on both cores (2 x 4 workers): the limit counts them all."""
    coord = make_coord(grow_on_demand=False, cores=2, workers_per_core=4)
    peak = Peak()
    gate = make_latch()

    @task_token_guard(operation_type="lim_global", tags={"weight": "heavy"}, max_concurrency=3)
    def work():
        with peak:
            gate.enter()

    tokens = [work() for _ in range(30)]
    assert wait_until(lambda: peak.entered == 3)
    assert wait_until(lambda: coord.stats()["held"] == 27)
    gate.release()
    for t in tokens:
        t.get(timeout=SAFETY)
    assert peak.peak == 3
    quiescent(coord)


def test_held_tokens_occupy_no_worker(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=3)
    limited_latch = make_latch()
    plain_latch = make_latch()
    limited = task_token_guard(operation_type="lim_noworker", max_concurrency=1)(
        limited_latch.enter
    )
    tokens = [limited() for _ in range(6)]
    assert limited_latch.wait_entered(1)
    assert wait_until(lambda: coord.stats()["held"] == 5)
    s = coord.stats()
    assert s["per_core"][0]["executing"] == 1
    assert s["per_core"][0]["queue_depth"] == 0
    assert all(t.state is TokenState.WAITING and t.worker_id is None for t in tokens[1:])
    plains = [coord.submit(plain_latch.enter) for _ in range(2)]
    assert plain_latch.wait_entered(2)  # both other workers are free
    plain_latch.release()
    limited_latch.release()
    for t in plains + tokens:
        t.get(timeout=SAFETY)
    quiescent(coord)


def test_held_tokens_are_fifo_per_key(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=4)
    latch = make_latch()
    order = []

    @task_token_guard(operation_type="lim_fifo", max_concurrency=1)
    def work(i):
        order.append(i)
        if i == 0:
            latch.enter()

    tokens = [work(i) for i in range(25)]
    assert latch.wait_entered(1)
    latch.release()
    for t in tokens:
        t.get(timeout=SAFETY)
    assert order == list(range(25))
    quiescent(coord)


def test_limits_never_drop_tokens(make_coord):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=4)
    peak = Peak()

    @task_token_guard(operation_type="lim_nodrop", max_concurrency=1)
    def work(i):
        with peak:
            return i

    tokens = [work(i) for i in range(3000)]
    assert [t.get(timeout=SAFETY) for t in tokens] == list(range(3000))
    assert peak.peak == 1
    s = quiescent(coord)
    assert s["completed"] == 3000
    assert s["killed"] == s["failed"] == 0


def test_a_failing_token_frees_its_slot(make_coord):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=3)

    @task_token_guard(operation_type="lim_fail", max_concurrency=1)
    def work(i):
        if i % 2:
            raise ValueError(i)
        return i

    tokens = [work(i) for i in range(10)]
    for i, t in enumerate(tokens):
        if i % 2:
            with pytest.raises(ValueError):
                t.get(timeout=SAFETY)
        else:
            assert t.get(timeout=SAFETY) == i
    quiescent(coord)


# --------------------------------------------------------------------------- per key


def test_a_small_tenant_is_not_delayed_by_a_huge_tenants_backlog(make_coord, make_latch):
    """Tenant A: 10 000 tokens, whose first two (its whole max_concurrency) block until B is
    done. Tenant B's 10 tokens, submitted after A's burst, must all finish while A's backlog
    waits: if B queued behind A, B's get() would time out (A cannot advance)."""
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=4)
    latch = make_latch()
    lock = threading.Lock()
    finished: list[tuple[str, int]] = []

    @task_token_guard(operation_type="lim_tenant", max_concurrency=2, limit_by="tenant")
    def work(tenant, i):
        if tenant == "A" and i < 2:
            latch.enter()
        with lock:
            finished.append((tenant, i))

    a = work.options(tags={"tenant": "A"})
    b = work.options(tags={"tenant": "B"})
    a_tokens = [a("A", i) for i in range(10_000)]
    assert latch.wait_entered(2)
    b_tokens = [b("B", i) for i in range(10)]
    for t in b_tokens:
        t.get(timeout=SAFETY)
    assert [x for x in finished if x[0] == "A"] == []
    lim = coord.stats()["limits"]["lim_tenant"]
    assert lim["limit_by"] == "tenant"
    assert lim["keys"] >= 1
    assert lim["held"] == 10_000 - 2
    latch.release()
    for t in a_tokens:
        t.get(timeout=SAFETY)
    assert len(finished) == 10_010
    # B's tokens all finished before any of A's
    assert {x[0] for x in finished[:10]} == {"B"}
    quiescent(coord)


def test_each_tenant_has_its_own_concurrency(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=8)
    latch = make_latch()
    peaks = {"x": Peak(), "y": Peak(), "z": Peak()}

    @task_token_guard(operation_type="lim_keys", max_concurrency=2, limit_by="tenant")
    def work(tenant):
        with peaks[tenant]:
            latch.enter()

    tokens = [work.options(tags={"tenant": k})(k) for _ in range(5) for k in "xyz"]
    assert wait_until(lambda: sum(p.entered for p in peaks.values()) == 6)
    assert wait_until(lambda: coord.stats()["limits"]["lim_keys"]["held"] == 9)
    assert coord.stats()["limits"]["lim_keys"]["keys"] == 3
    latch.release()
    for t in tokens:
        t.get(timeout=SAFETY)
    assert {k: p.peak for k, p in peaks.items()} == {"x": 2, "y": 2, "z": 2}
    quiescent(coord)


def test_the_tenant_tag_from_the_decorator(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=4)
    latch = make_latch()
    peak = Peak()

    def limited(name, tenant):
        @task_token_guard(
            operation_type=name, tags={"tenant": tenant}, max_concurrency=1, limit_by="tenant"
        )
        def work():
            with peak:
                latch.enter()

        return work

    # the same operation type from two decorated functions: one limit, two keys
    acme = limited("lim_deco", "acme")
    globex = limited("lim_deco", "globex")
    tokens = [acme(), acme(), globex(), globex()]
    assert latch.wait_entered(2)
    assert wait_until(lambda: coord.stats()["held"] == 2)
    latch.release()
    for t in tokens:
        t.get(timeout=SAFETY)
    assert peak.peak == 2
    quiescent(coord)


def test_tokens_without_the_limit_tag_are_still_limited_and_complete(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=4)
    latch = make_latch()
    peak = Peak()

    @task_token_guard(operation_type="lim_untagged", max_concurrency=1, limit_by="tenant")
    def work():
        with peak:
            latch.enter()

    tokens = [work() for _ in range(4)]
    assert latch.wait_entered(1)
    assert wait_until(lambda: coord.stats()["held"] == 3)
    latch.release()
    for t in tokens:
        t.get(timeout=SAFETY)
    assert peak.peak == 1
    quiescent(coord)


# --------------------------------------------------------------------------- rate limits


def test_rate_limit_holds_a_burst_and_completes_everything(make_coord):
    """100/s with a burst of 5: 30 tokens submitted at once cannot all have started before
    (30 - 5) / 100 s passed since the first was submitted (a lower bound, whatever the
    machine's speed); some of them were delayed; all complete."""
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=4)
    work = task_token_guard(operation_type="lim_rate", rate_limit=100, rate_burst=5)(lambda i: i)
    tokens = [work(i) for i in range(30)]
    assert [t.get(timeout=SAFETY) for t in tokens] == list(range(30))
    lim = coord.stats()["limits"]["lim_rate"]
    assert lim["rate"] == 100.0
    assert lim["burst"] == 5
    assert lim["granted"] == 30
    assert lim["delayed"] > 0
    assert lim["held"] == 0
    last_start = max(t.started_at for t in tokens)
    assert last_start - tokens[0].created_at >= (30 - 5) / 100 - 0.01
    quiescent(coord)


def test_rate_limit_no_fixed_window_double_burst(make_coord):
    """GCRA: after the burst is spent, grants are spaced by 1/rate. Two bursts back to back
    (a fixed window's failure) would start 2 * burst tokens within one interval."""
    make_coord(grow_on_demand=False, cores=1, workers_per_core=4)
    rate, burst = 50.0, 4
    work = task_token_guard(operation_type="lim_gcra", rate_limit=rate, rate_burst=burst)(
        lambda: None
    )
    tokens = [work() for _ in range(16)]
    for t in tokens:
        t.get(timeout=SAFETY)
    t0 = tokens[0].created_at
    starts = sorted(t.started_at for t in tokens)
    # the k-th start (0-based) cannot come before (k - burst + 1) / rate after submission
    for k, s in enumerate(starts):
        assert s - t0 >= max(0, k - burst + 1) / rate - 0.01, (k, s - t0)


def test_rate_limit_per_tenant(make_coord):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=4)
    work = task_token_guard(
        operation_type="lim_rate_key", rate_limit=40, rate_burst=2, limit_by="tenant"
    )(lambda i: i)
    slow_tenant = work.options(tags={"tenant": "big"})
    quick_tenant = work.options(tags={"tenant": "small"})
    big = [slow_tenant(i) for i in range(100)]  # 2.5 s at 40/s
    small = [quick_tenant(i) for i in range(2)]  # within its own burst
    assert [t.get(timeout=SAFETY) for t in small] == [0, 1]
    assert sum(t.done() for t in big) < 100
    assert coord.stats()["limits"]["lim_rate_key"]["keys"] >= 1
    coord.set_limit("lim_rate_key")  # lift it: the backlog drains at once
    # the rest at the old 40/s would need about 2.4 s: lifted, they are admitted at once
    assert wait_until(lambda: all(t.done() for t in big), timeout=1.0)
    assert [t.get(timeout=SAFETY) for t in big] == list(range(100))
    quiescent(coord)


# --------------------------------------------------------------------------- set_limit


def test_set_limit_raised_admits_held_tokens_at_once(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=6)
    latch = make_latch()
    peak = Peak()

    @task_token_guard(operation_type="lim_raise", max_concurrency=1)
    def work():
        with peak:
            latch.enter()

    tokens = [work() for _ in range(8)]
    assert latch.wait_entered(1)
    assert wait_until(lambda: coord.stats()["held"] == 7)
    coord.set_limit("lim_raise", max_concurrency=4)
    assert latch.wait_entered(4)  # while the first still runs
    assert wait_until(lambda: coord.stats()["held"] == 4)
    assert coord.stats()["limits"]["lim_raise"]["max_concurrency"] == 4
    latch.release()
    for t in tokens:
        t.get(timeout=SAFETY)
    assert peak.peak == 4
    quiescent(coord)


def test_set_limit_removed_means_no_limit(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=6)
    latch = make_latch()

    @task_token_guard(operation_type="lim_remove", max_concurrency=1)
    def work():
        latch.enter()

    tokens = [work() for _ in range(5)]
    assert latch.wait_entered(1)
    assert wait_until(lambda: coord.stats()["held"] == 4)
    coord.set_limit("lim_remove")
    assert latch.wait_entered(5)
    more = work()  # new tokens are not limited either
    assert latch.wait_entered(6)
    lim = coord.stats()["limits"].get("lim_remove")
    assert lim is None or lim["max_concurrency"] is lim["rate"] is None
    latch.release()
    for t in [*tokens, more]:
        t.get(timeout=SAFETY)
    quiescent(coord)


def test_set_limit_removing_a_keyed_limit_admits_held_tokens(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=6)
    latch = make_latch()

    @task_token_guard(operation_type="lim_remove_key", max_concurrency=1, limit_by="tenant")
    def work():
        latch.enter()

    tokens = [work.options(tags={"tenant": "a"})() for _ in range(5)]
    assert latch.wait_entered(1)
    assert wait_until(lambda: coord.stats()["held"] == 4)
    coord.set_limit("lim_remove_key")
    assert latch.wait_entered(5, timeout=1.0)  # all of them while the first still runs
    latch.release()
    for t in tokens:
        t.get(timeout=SAFETY)


@pytest.mark.xfail(strict=True, reason="bug B10: set_limit ignores tokens already running")
def test_set_limit_on_an_unlimited_operation_and_lowering_stops_nothing(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=6)
    first_gate = make_latch()
    second_gate = make_latch()
    second_peak = Peak()

    @task_token_guard(operation_type="lim_added")
    def work(phase):
        if phase == 1:
            first_gate.enter()
        else:
            with second_peak:
                second_gate.enter()

    first = [work(1) for _ in range(3)]
    assert first_gate.wait_entered(3)
    coord.set_limit("lim_added", max_concurrency=1)
    second = [work(2) for _ in range(3)]
    # 3 already run, over the new limit of 1: nothing stopped, the new ones are held
    assert wait_until(lambda: coord.stats()["held"] + second_peak.entered == 3)
    assert second_peak.entered == 0
    assert all(t.state is TokenState.EXECUTING for t in first)
    first_gate.release()
    for t in first:
        t.get(timeout=SAFETY)
    assert second_gate.wait_entered(1)
    second_gate.release()
    for t in second:
        t.get(timeout=SAFETY)
    assert second_peak.peak == 1
    quiescent(coord)


def test_set_limit_to_a_rate(make_coord):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=2)
    work = task_token_guard(operation_type="lim_set_rate")(lambda: None)
    coord.set_limit("lim_set_rate", rate_limit=200.0, rate_burst=3)
    lim = coord.stats()["limits"]["lim_set_rate"]
    assert (lim["rate"], lim["burst"], lim["max_concurrency"]) == (200.0, 3, None)
    tokens = [work() for _ in range(10)]
    for t in tokens:
        t.get(timeout=SAFETY)
    assert coord.stats()["limits"]["lim_set_rate"]["granted"] == 10


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_concurrency": 0},
        {"max_concurrency": -1},
        {"rate_limit": 0},
        {"rate_limit": -5.0},
        {"rate_burst": 3},  # without rate_limit
        {"limit_by": "tenant"},  # without a limit
        {"rate_limit": float("inf")},
    ],
)
def test_set_limit_rejects_bad_values(coord, kwargs):
    with pytest.raises(ValueError) as ei:
        coord.set_limit("lim_bad", **kwargs)
    assert isinstance(ei.value, ConfigurationError)
    assert "lim_bad" not in coord.stats()["limits"]


@pytest.mark.parametrize(
    "kwargs", [{"max_concurrency": 2.5}, {"max_concurrency": "2"}, {"rate_limit": "fast"}]
)
def test_set_limit_rejects_bad_types(coord, kwargs):
    with pytest.raises(TypeError):
        coord.set_limit("lim_bad_type", **kwargs)


@pytest.mark.parametrize("operation", ["", None, 3])
def test_set_limit_needs_an_operation_name(coord, operation):
    with pytest.raises(ConfigurationError, match="operation"):
        coord.set_limit(operation, max_concurrency=1)


# --------------------------------------------------------------------------- kill / stop


def test_kill_of_a_held_token(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=3)
    latch = make_latch()
    ran = []

    @task_token_guard(operation_type="lim_kill", max_concurrency=1)
    def work(i):
        ran.append(i)
        latch.enter()

    tokens = [work(i) for i in range(4)]
    assert latch.wait_entered(1)
    assert wait_until(lambda: coord.stats()["held"] == 3)
    assert tokens[2].kill() is True
    assert tokens[2].state is TokenState.KILLED
    with pytest.raises(TokenKilled):
        tokens[2].get(timeout=0)
    assert coord.stats()["held"] == 2
    assert coord.stats()["limits"]["lim_kill"]["held"] == 2
    latch.release()
    for i in (0, 1, 3):
        tokens[i].get(timeout=SAFETY)
    assert ran == [0, 1, 3]
    quiescent(coord)


def test_stop_without_wait_kills_held_tokens(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=3)
    latch = make_latch()
    ran = []

    @task_token_guard(operation_type="lim_stop", max_concurrency=1, limit_by="tenant")
    def work(i):
        ran.append(i)
        latch.enter()

    tokens = [work.options(tags={"tenant": i % 2})(i) for i in range(10)]
    assert latch.wait_entered(2)
    assert wait_until(lambda: coord.stats()["held"] == 8)
    stopper = threading.Thread(target=coord.stop, kwargs={"wait": False}, daemon=True)
    stopper.start()
    for t in tokens[2:]:
        assert t.wait(SAFETY)
        assert t.state is TokenState.KILLED
    latch.release()
    stopper.join(SAFETY)
    assert not stopper.is_alive()
    assert sorted(ran) == [0, 1]
    s = coord.stats()
    assert s["held"] == 0
    assert s["killed"] == 8
    assert s["created"] == s["completed"] + s["failed"] + s["killed"] + s["timed_out"]


def test_a_high_priority_token_gets_the_next_slot(make_coord, make_latch):
    coord = make_coord(grow_on_demand=False, cores=1, workers_per_core=4)
    latch = make_latch()
    order = []

    @task_token_guard(operation_type="lim_prio", max_concurrency=1)
    def work(label):
        if label == "blocker":
            latch.enter()
        else:
            order.append(label)

    blocker = work("blocker")
    assert latch.wait_entered(1)
    lows = [work.options(priority="low")(f"low{i}") for i in range(3)]
    high = work.options(priority="high")("high")
    assert wait_until(lambda: coord.stats()["held"] == 4)
    latch.release()
    for t in [blocker, *lows, high]:
        t.get(timeout=SAFETY)
    assert order == ["high", "low0", "low1", "low2"]


def test_limits_and_tiers_hold_while_the_core_grows_workers(make_coord, make_latch):
    """With on-demand growth (the default) blocked plain tasks make the core start more
    workers; the extra workers must not let held tokens past their limit or tier."""
    coord = make_coord(
        cores=1, workers_per_core=2, max_workers_per_core=12, storage_limits={"SLOW": 1}
    )
    gate = make_latch()
    limited_peak, slow_peak = Peak(), Peak()

    @task_token_guard(operation_type="grow_limited", max_concurrency=2)
    def limited():
        with limited_peak:
            gate.enter()

    @task_token_guard(operation_type="grow_slow", tags={"storage_speed": "SLOW"})
    def slow():
        with slow_peak:
            gate.enter()

    tokens = [limited() for _ in range(10)] + [slow() for _ in range(10)]
    plains = [coord.submit(gate.enter) for _ in range(6)]
    # 2 limited + 1 SLOW + 6 plain = 9 inside at once: the core grew past its 2 workers
    assert gate.wait_entered(9)
    assert sum(c["active_workers"] for c in coord.stats()["per_core"]) >= 9
    assert coord.stats()["held"] == 8 + 9
    gate.release()
    for t in tokens + plains:
        t.get(timeout=SAFETY)
    assert limited_peak.peak == 2
    assert slow_peak.peak == 1
    quiescent(coord)
