"""Guard House health per operation and the circuit breaker enforced at the core's gate
(issue #8).

Health is recorded by the workers before a token's final state is published, so a report
read after ``get()`` returned counts that token. Breakers only intervene when asked to.
"""

from __future__ import annotations

import threading

import pytest

from _support import SAFETY, wait_until
from tokengate import (
    CircuitBreaker,
    ConfigurationError,
    InvalidOption,
    MethodBlocked,
    TokenKilled,
    TokenState,
    task_token_guard,
)
from tokengate.guard.guard_house import health_class


class Boom(Exception):
    pass


def _drain_outcomes(tokens):
    ok = failed = 0
    for t in tokens:
        try:
            t.get(timeout=SAFETY)
            ok += 1
        except Boom:
            failed += 1
    return ok, failed


# --------------------------------------------------------------------------- health


@pytest.mark.parametrize(
    ("rate", "cls"),
    [
        (1.0, "EXCELLENT"),
        (0.9501, "EXCELLENT"),
        (0.95, "GOOD"),
        (0.8001, "GOOD"),
        (0.80, "POOR"),
        (0.5001, "POOR"),
        (0.50, "CRITICAL"),
        (0.0, "CRITICAL"),
        (None, "UNRATED"),
    ],
)
def test_health_classes_at_their_boundaries(rate, cls):
    assert health_class(rate) == cls


@pytest.mark.parametrize(
    ("n_ok", "n_fail", "cls"),
    [
        (20, 0, "EXCELLENT"),
        (19, 1, "GOOD"),
        (20, 1, "EXCELLENT"),
        (4, 1, "POOR"),
        (5, 5, "CRITICAL"),
    ],
)
def test_health_class_of_a_real_workload(make_coord, n_ok, n_fail, cls):
    coord = make_coord()
    name = f"gh_cls_{n_ok}_{n_fail}"

    @task_token_guard(operation_type=name)
    def work(fail):
        if fail:
            raise Boom("no")
        return 1

    assert _drain_outcomes([work(i < n_fail) for i in range(n_ok + n_fail)]) == (n_ok, n_fail)
    h = coord.guard_house.health(name)
    assert (h.attempts, h.completed, h.failed) == (n_ok + n_fail, n_ok, n_fail)
    assert h.success_rate == pytest.approx(n_ok / (n_ok + n_fail))
    assert h.health == cls


def test_health_counts_durations_and_last_error_exactly(make_coord):
    coord = make_coord()

    @task_token_guard(operation_type="gh_counts")
    def work(i):
        if i % 4 == 0:
            raise Boom(f"bad input {i}")
        return i

    tokens = [work(i) for i in range(40)]
    assert _drain_outcomes(tokens) == (30, 10)
    h = coord.guard_house.health("gh_counts")
    assert h.attempts == 40
    assert (h.completed, h.failed, h.timed_out, h.killed) == (30, 10, 0, 0)
    assert h.failure_rate == pytest.approx(0.25)
    assert h.health == "POOR"
    assert h.last_error is not None
    assert h.last_error["type"] == "Boom"
    assert h.last_error["message"].startswith("bad input ")
    assert h.p50_duration is not None and h.p95_duration is not None
    assert 0 < h.p50_duration <= h.p95_duration
    assert h.max_duration >= h.p50_duration / 1.2
    assert h.mean_duration > 0
    assert h.mean_queue_wait is not None
    assert h.breaker_state == "closed"
    assert h.complexity_score is not None and h.complexity_score >= 1


def test_report_renders_the_seed_sections(make_coord):
    coord = make_coord()

    @task_token_guard(operation_type="gh_fine")
    def fine():
        return 1

    @task_token_guard(operation_type="gh_broken")
    def broken():
        raise Boom("always")

    _drain_outcomes([fine() for _ in range(5)] + [broken() for _ in range(5)])
    report = coord.guard_house.report()
    assert set(report.operations) >= {"gh_fine", "gh_broken"}
    assert report.operations["gh_fine"].health == "EXCELLENT"
    assert report.operations["gh_broken"].health == "CRITICAL"
    text = report.render()
    assert "EXCELLENT PERFORMERS" in text
    assert "CRITICAL OPERATIONS" in text
    fine_at = text.index("gh_fine")
    assert text.index("EXCELLENT PERFORMERS") < fine_at < text.index("CRITICAL OPERATIONS")
    assert "last error Boom: always" in text
    data = report.as_dict()
    assert data["operations"]["gh_broken"]["failed"] == 5
    assert data["operations"]["gh_broken"]["breaker_state"] == "closed"


def test_passive_by_default_never_blocks(make_coord):
    coord = make_coord()

    @task_token_guard(operation_type="gh_passive")
    def broken():
        raise Boom("always")

    for _ in range(3):  # far past the default minimum of 20 calls at 100 % failures
        assert _drain_outcomes([broken() for _ in range(40)]) == (0, 40)
    h = coord.guard_house.health("gh_passive")
    assert h.breaker_state == "closed"
    assert h.blocked == 0 and h.failed == 120


def test_guard_house_off(make_coord):
    coord = make_coord(guard_house=False)

    @task_token_guard(operation_type="gh_off")
    def work():
        return 2

    assert work().get(timeout=SAFETY) == 2
    with pytest.raises(ConfigurationError, match="guard_house=False"):
        coord.guard_house.report()


def test_unknown_operation_is_named(make_coord):
    coord = make_coord()
    with pytest.raises(ConfigurationError, match="'nope' has not been seen"):
        coord.guard_house.health("nope")


def test_bad_breaker_settings_fail_at_decoration():
    with pytest.raises(ConfigurationError, match="failure_rate must be a fraction"):
        CircuitBreaker(failure_rate=1.5)
    with pytest.raises(ConfigurationError, match="min_calls must be an int >= 1"):
        CircuitBreaker(min_calls=0)
    with pytest.raises(ConfigurationError, match=r"open_duration \(60\) must be <= open_max"):
        CircuitBreaker(open_duration=60, open_max=10)
    with pytest.raises(ConfigurationError, match=r"min_calls \(200\) must be <= window \(10\)"):
        CircuitBreaker(min_calls=200, window=10)
    with pytest.raises(ConfigurationError, match="not both"):
        CircuitBreaker(window=10, window_seconds=5)
    with pytest.raises(ConfigurationError, match="ValueError cannot be both in failure_on"):
        CircuitBreaker(failure_on=ValueError, ignore=ValueError)
    with pytest.raises(InvalidOption, match="failure_on must be an exception class"):
        CircuitBreaker(failure_on=(ValueError, "x"))
    with pytest.raises(InvalidOption, match="circuit_breaker must be True, False or a"):
        task_token_guard(operation_type="x", circuit_breaker="yes")


# --------------------------------------------------------------------------- breaker: tripping


def _breaker(**kw):
    base = {"min_calls": 10, "window": 10, "open_duration": 600.0}
    return CircuitBreaker(**(base | kw))


def test_breaker_opens_on_failure_rate_only_after_min_calls(make_coord):
    coord = make_coord()

    @task_token_guard(operation_type="gh_rate", circuit_breaker=_breaker())
    def work(fail):
        if fail:
            raise Boom("x")
        return 1

    # 9 failures: below min_calls, still closed
    for _ in range(9):
        _drain_outcomes([work(True)])
    assert coord.guard_house.breaker_state("gh_rate") == "closed"
    _drain_outcomes([work(True)])  # the 10th call: 10 of 10 failed
    assert coord.guard_house.breaker_state("gh_rate") == "open"
    created = coord.stats()["created"]
    with pytest.raises(MethodBlocked) as e:
        work(False)
    msg = str(e.value)
    assert "operation 'gh_rate' is blocked" in msg
    assert "open because 10 of 10 calls failed (100.0 %)" in msg
    assert "lets a probe call through in" in msg
    assert e.value.operation == "gh_rate"
    assert 0 < e.value.retry_in <= 600
    assert coord.stats()["created"] == created, "a blocked call queued nothing"
    assert coord.guard_house.health("gh_rate").blocked == 1


def test_breaker_rate_boundary(make_coord):
    coord = make_coord()

    @task_token_guard(operation_type="gh_boundary", circuit_breaker=_breaker(failure_rate=0.5))
    def work(fail):
        if fail:
            raise Boom("x")
        return 1

    for fail in [False, True] * 4 + [False]:  # 4 of 9 failed
        _drain_outcomes([work(fail)])
    _drain_outcomes([work(False)])  # 4 of 10 (40 %): closed
    assert coord.guard_house.breaker_state("gh_boundary") == "closed"
    _drain_outcomes([work(True)])  # the oldest success slides out: 5 of 10 = 50 %: open
    assert coord.guard_house.breaker_state("gh_boundary") == "open"


def test_breaker_opens_on_slow_calls(make_coord):
    coord = make_coord()
    hold = threading.Event()

    @task_token_guard(
        operation_type="gh_slow",
        circuit_breaker=_breaker(min_calls=4, window=4, slow_call=0.02, slow_call_rate=0.5),
    )
    def work(slow):
        if slow:
            hold.wait(0.03)  # a slow call: its duration is what is measured, not a sync
        return 1

    for slow in (False, False, True):
        work(slow).get(timeout=SAFETY)
    assert coord.guard_house.breaker_state("gh_slow") == "closed"
    work(True).get(timeout=SAFETY)
    h = coord.guard_house.health("gh_slow")
    assert h.breaker_state == "open"
    assert "slower than" in h.breaker["last_trip"]
    assert h.slow_call_threshold == pytest.approx(0.02)
    assert h.slow_call_rate == pytest.approx(0.5)


def test_breaker_opens_on_consecutive_failures_before_min_calls(make_coord):
    coord = make_coord()

    @task_token_guard(
        operation_type="gh_consec",
        circuit_breaker=_breaker(min_calls=100, window=100, consecutive_failures=3),
    )
    def work(fail):
        if fail:
            raise Boom("x")
        return 1

    for fail in (True, True, False, True, True):
        _drain_outcomes([work(fail)])
    assert coord.guard_house.breaker_state("gh_consec") == "closed"
    _drain_outcomes([work(True)])
    h = coord.guard_house.health("gh_consec")
    assert h.breaker_state == "open"
    assert h.breaker["last_trip"] == "3 failures in a row"


def test_failure_on_and_ignore_choose_what_counts(make_coord):
    coord = make_coord()

    @task_token_guard(
        operation_type="gh_classes",
        circuit_breaker=_breaker(
            min_calls=3,
            window=3,
            failure_rate=1.0,
            failure_on=(Boom, LookupError),
            ignore=(KeyError,),
        ),
    )
    def work(exc):
        raise exc

    for exc in (ValueError("v"), KeyError("k"), ValueError("v"), Boom("b"), Boom("b")):
        with pytest.raises(type(exc)):
            work(exc).get(timeout=SAFETY)
    assert coord.guard_house.breaker_state("gh_classes") == "closed"
    with pytest.raises(Boom):
        work(Boom("b")).get(timeout=SAFETY)  # 3 of the last 3 count
    assert coord.guard_house.breaker_state("gh_classes") == "open"
    assert coord.guard_house.health("gh_classes").failed == 6, "health counts every failure"


def test_auto_block_applies_to_every_operation(make_coord):
    coord = make_coord(circuit_breaker=_breaker(min_calls=5, window=5))

    @task_token_guard(operation_type="gh_auto")
    def work():
        raise Boom("x")

    _drain_outcomes([work() for _ in range(5)])
    assert wait_until(lambda: coord.guard_house.breaker_state("gh_auto") == "open")
    with pytest.raises(MethodBlocked):
        work()


# --------------------------------------------------------------------------- breaker: recovery


def _open_with_short_duration(coord, name, probes=1, failing=None):
    failing = failing if failing is not None else {"on": True}
    gate = threading.Event()

    @task_token_guard(
        operation_type=name,
        circuit_breaker=_breaker(
            min_calls=2, window=2, open_duration=0.05, half_open_probes=probes
        ),
    )
    def work(wait_gate=False):
        if wait_gate:
            gate.wait(SAFETY)
        if failing["on"]:
            raise Boom("x")
        return 1

    _drain_outcomes([work(), work()])
    assert coord.guard_house.breaker_state(name) == "open"
    assert wait_until(lambda: coord.guard_house.breaker_state(name) == "half_open")
    return work, gate, failing


@pytest.mark.parametrize("probes", [1, 2, 3])
def test_half_open_admits_exactly_the_probes_under_racing_submitters(make_coord, probes):
    coord = make_coord()
    name = f"gh_probes_{probes}"
    work, gate, failing = _open_with_short_duration(coord, name, probes=probes)
    failing["on"] = False
    barrier = threading.Barrier(8)
    admitted, refused = [], []
    lock = threading.Lock()

    def submit():
        barrier.wait()
        try:
            t = work(wait_gate=True)
        except MethodBlocked as e:
            with lock:
                refused.append(e)
        else:
            with lock:
                admitted.append(t)

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(SAFETY)
    assert len(admitted) == probes
    assert len(refused) == 8 - probes
    assert all("half-open" in str(e) for e in refused)
    gate.set()
    for t in admitted:
        assert t.get(timeout=SAFETY) == 1
    h = coord.guard_house.health(name)
    assert h.breaker_state == "closed"
    assert [tr["to"] for tr in h.breaker["history"]][-3:] == ["open", "half_open", "closed"]
    assert work().get(timeout=SAFETY) == 1


def test_a_failed_probe_reopens(make_coord):
    coord = make_coord()
    work, gate, _ = _open_with_short_duration(coord, "gh_reopen")
    gate.set()
    with pytest.raises(Boom):
        work().get(timeout=SAFETY)  # the probe
    h = coord.guard_house.health("gh_reopen")
    assert h.breaker_state in ("open", "half_open")
    assert h.breaker["times_opened"] == 2
    assert h.breaker["history"][-1]["reason"]


def test_a_killed_probe_gives_its_place_back(make_coord, make_latch):
    coord = make_coord(cores=1, workers_per_core=1, grow_on_demand=False)
    latch = make_latch()

    @task_token_guard(operation_type="gh_blocker")
    def blocker():
        latch.enter()

    work, gate, failing = _open_with_short_duration(coord, "gh_killprobe")
    failing["on"] = False
    gate.set()
    hold = blocker()
    assert latch.wait_entered(1)
    probe = work()  # queued behind the blocker
    with pytest.raises(MethodBlocked):
        work()
    assert probe.kill()
    with pytest.raises(TokenKilled):
        probe.get(timeout=SAFETY)
    second = work()  # the probe place came back
    latch.release()
    hold.get(timeout=SAFETY)
    assert second.get(timeout=SAFETY) == 1
    assert coord.guard_house.breaker_state("gh_killprobe") == "closed"


# --------------------------------------------------------------------------- buttons


def test_manual_buttons_return_the_new_state(make_coord):
    coord = make_coord()
    gh = coord.guard_house
    events = []
    gh.on_action.append(events.append)

    @task_token_guard(operation_type="gh_buttons")
    def work():
        return 3

    assert work().get(timeout=SAFETY) == 3
    assert gh.block("gh_buttons") == "forced_open"
    with pytest.raises(MethodBlocked, match="blocked by an operator"):
        work()
    assert gh.unblock("gh_buttons") == "closed"
    assert work().get(timeout=SAFETY) == 3
    assert gh.force_open("gh_buttons") == "open"
    with pytest.raises(MethodBlocked, match="circuit breaker is open"):
        work()
    assert gh.disable("gh_buttons") == "disabled"
    assert work().get(timeout=SAFETY) == 3
    assert gh.unblock("gh_buttons") == "closed"
    assert [e["action"] for e in events] == ["block", "unblock", "force_open", "disable", "unblock"]
    assert all(e["target"] == "gh_buttons" for e in events)
    hist = gh.health("gh_buttons").breaker["history"]
    assert [h["to"] for h in hist] == ["forced_open", "closed", "open", "disabled", "closed"]
    # an operation never called can be blocked ahead of time
    assert gh.block("gh_future") == "forced_open"

    @task_token_guard(operation_type="gh_future")
    def later():
        return 0

    with pytest.raises(MethodBlocked):
        later()


def test_disabled_breaker_never_trips(make_coord):
    coord = make_coord()

    @task_token_guard(operation_type="gh_disabled", circuit_breaker=_breaker(min_calls=2, window=2))
    def work():
        raise Boom("x")

    coord.guard_house.disable("gh_disabled")
    _drain_outcomes([work() for _ in range(10)])
    assert coord.guard_house.breaker_state("gh_disabled") == "disabled"


def test_unknown_button_is_refused(make_coord):
    coord = make_coord()
    with pytest.raises(InvalidOption, match="operation must be an operation name"):
        coord.guard_house.block("")


def test_blocked_calls_leave_no_token_and_other_operations_run(make_coord):
    coord = make_coord()

    @task_token_guard(operation_type="gh_iso_a")
    def a():
        return "a"

    @task_token_guard(operation_type="gh_iso_b")
    def b():
        return "b"

    coord.guard_house.block("gh_iso_a")
    before = coord.stats()
    for _ in range(50):
        with pytest.raises(MethodBlocked):
            a()
    assert b().get(timeout=SAFETY) == "b"
    after = coord.stats()
    assert after["created"] == before["created"] + 1
    assert coord.guard_house.health("gh_iso_a").blocked == 50
    assert TokenState.QUARANTINED.is_final
