"""Regression tests for the defects a review and a new-user trial found in the Guard House
(issue #8), one test each."""

from __future__ import annotations

import pickle
import threading
import weakref

import pytest

from _support import SAFETY, wait_until
from tokengate import (
    CircuitBreaker,
    ConfigurationError,
    InvalidOption,
    MethodBlocked,
    OperationsCoordinator,
    Quarantine,
    TokenState,
    TokenTimeout,
    task_token_guard,
)


class Boom(Exception):
    pass


def _half_open(coord, name, fn, fail):
    fail["on"] = True
    for _ in range(2):
        with pytest.raises(Boom):
            fn().get(timeout=SAFETY)
    assert coord.guard_house.breaker_state(name) in ("open", "half_open")
    fail["on"] = False
    assert wait_until(lambda: coord.guard_house.breaker_state(name) == "half_open")


def _flaky(name, **breaker):
    fail = {"on": True}

    @task_token_guard(
        operation_type=name,
        circuit_breaker=CircuitBreaker(min_calls=2, window=2, open_duration=0.05, **breaker),
    )
    def fn(*_):
        if fail["on"]:
            raise Boom("x")
        return 1

    return fn, fail


def test_a_chain_step_killed_while_its_parent_ran_keeps_no_probe(make_coord, make_latch):
    coord = make_coord(cores=1, workers_per_core=2)
    latch = make_latch()
    fn, fail = _flaky("rv_chain")
    _half_open(coord, "rv_chain", fn, fail)

    @task_token_guard(operation_type="rv_parent")
    def parent():
        latch.enter()
        return 0

    p = parent()
    assert latch.wait_entered(1)
    child = p.then(fn)
    assert child.kill()
    latch.release()
    p.get(timeout=SAFETY)
    assert fn().get(timeout=SAFETY) == 1, "the probe place is free: the call is the probe"
    assert coord.guard_house.breaker_state("rv_chain") == "closed"


def test_a_stale_probe_never_counts_in_a_later_round(make_coord, make_latch):
    coord = make_coord(cores=1, workers_per_core=1, grow_on_demand=False)
    latch = make_latch()

    @task_token_guard(operation_type="rv_blocker")
    def blocker():
        latch.enter()

    @task_token_guard(
        operation_type="rv_stale",
        circuit_breaker=CircuitBreaker(min_calls=2, window=2, open_duration=0.05),
    )
    def op(fail_it):
        if fail_it:
            raise Boom("x")
        return 1

    for _ in range(2):
        with pytest.raises(Boom):
            op(True).get(timeout=SAFETY)
    gh = coord.guard_house
    assert wait_until(lambda: gh.breaker_state("rv_stale") == "half_open")
    b = blocker()
    assert latch.wait_entered(1)
    stale = op(False)  # round 1's probe, queued behind the blocker
    gh.force_open("rv_stale")
    assert wait_until(lambda: gh.breaker_state("rv_stale") == "half_open")
    real = op(True)  # round 2's probe: it fails
    latch.release()
    b.get(timeout=SAFETY)
    assert stale.get(timeout=SAFETY) == 1
    with pytest.raises(Boom):
        real.get(timeout=SAFETY)
    assert gh.breaker_state("rv_stale") in ("open", "half_open"), "round 2's probe failed"
    assert gh.health("rv_stale").breaker["history"][-1]["reason"] != "1 probe succeeded"


def test_a_decorators_settings_apply_after_a_button_created_the_operation(make_coord):
    coord = make_coord()
    coord.guard_house.unblock("rv_decl")  # the operation exists before its first call
    fn, _ = _flaky("rv_decl")
    for _ in range(2):
        with pytest.raises(Boom):
            fn().get(timeout=SAFETY)
    h = coord.guard_house.health("rv_decl")
    assert h.breaker["auto"] and h.breaker_state in ("open", "half_open")


def test_options_refuses_operation_settings():
    fn, _ = _flaky("rv_opts")
    for key in ("circuit_breaker", "predict"):
        with pytest.raises(InvalidOption, match=f"options\\({key}=...\\) is not a per-call"):
            fn.options(**{key: True})


@task_token_guard(operation_type="rv_pickled", retries=1)
def pickled(n):
    return n + 1


def test_a_guarded_function_made_by_options_pickles_and_runs(make_coord):
    make_coord()
    derived = pickled.options(priority="high", timeout=30).options(quarantine=False)
    back = pickle.loads(pickle.dumps(derived))
    assert back._settings()["timeout"] == 30 and back._settings()["priority"] == 0
    assert back._settings()["spike_check"] is False
    assert back(1).get(timeout=SAFETY) == 2


def test_a_hung_call_counts_as_timed_out_when_its_deadline_passes(make_coord):
    coord = make_coord()
    release = threading.Event()

    @task_token_guard(
        operation_type="rv_hang",
        timeout=0.05,
        circuit_breaker=CircuitBreaker(min_calls=10, window=10, consecutive_failures=3),
    )
    def hang():
        release.wait(SAFETY)

    try:
        for _ in range(3):
            with pytest.raises(TokenTimeout):
                hang().get(timeout=SAFETY)
        h = coord.guard_house.health("rv_hang")
        assert h.timed_out == 3 and h.attempts == 3  # while the tasks still hang
        assert h.breaker_state == "open"
        with pytest.raises(MethodBlocked):
            hang()
    finally:
        release.set()


def test_retries_stop_while_the_breaker_is_open(make_coord):
    coord = make_coord()
    runs = {"n": 0}

    @task_token_guard(
        operation_type="rv_retry",
        retries=5,
        circuit_breaker=CircuitBreaker(min_calls=10, window=10, consecutive_failures=2),
    )
    def flaky():
        runs["n"] += 1
        raise Boom("x")

    with pytest.raises(Boom):
        flaky().get(timeout=SAFETY)
    assert runs["n"] == 2, "no retry once its breaker opened"
    assert coord.guard_house.breaker_state("rv_retry") == "open"


def test_a_standing_block_and_configure_survive_a_restart():
    coord = OperationsCoordinator(cores=1, workers_per_core=1)

    @task_token_guard(operation_type="rv_restart")
    def work():
        return 1

    with coord:
        coord.guard_house.block("rv_restart")
        coord.guard_house.configure("rv_other", predict=True)
    with coord:
        with pytest.raises(MethodBlocked):
            work()
        assert coord.guard_house.health("rv_other").model["enabled"]
        coord.guard_house.unblock("rv_restart")
    with coord:
        assert work().get(timeout=SAFETY) == 1


_never = threading.Event()


@task_token_guard(operation_type="rv_two", quarantine=Quarantine(min_samples=20))
def two(items):
    _never.wait(len(items) * 1e-5)
    return len(items)


def test_a_release_runs_on_its_own_coordinator(tmp_path):
    a = OperationsCoordinator(cores=1, workers_per_core=1, quarantine_dir=tmp_path)
    b = OperationsCoordinator(cores=1, workers_per_core=1, quarantine_dir=tmp_path)
    with a:
        for i in range(30):
            two(list(range(100 + 4 * i))).get(timeout=SAFETY)
        assert two(list(range(20_000))).state is TokenState.QUARANTINED
        with b:  # b now takes decorated calls
            a.guard_house.block("rv_two")
            res = a.guard_house.release(operation="rv_two")
            assert res.done == [] and "blocked" in next(iter(res.failed.values()))
            a.guard_house.unblock("rv_two")
            (tok,) = a.guard_house.release(operation="rv_two").results
            assert tok.get(timeout=SAFETY) == 20_000
            assert a.guard_house.health("rv_two").completed == 31
            assert b.guard_house.operations() == []


def test_configure_changes_only_what_it_is_given(make_coord):
    coord = make_coord()
    gh = coord.guard_house
    gh.configure("rv_cfg", predict=True)
    gh.configure("rv_cfg", circuit_breaker=True)
    assert gh.health("rv_cfg").model["enabled"], "a breaker setting left predict alone"


def test_passthrough_calls_past_their_timeout_are_recorded_timed_out(make_coord):
    coord = make_coord(mode="inline")
    clock = threading.Event()

    @task_token_guard(operation_type="rv_inline", timeout=0.01)
    def slow():
        clock.wait(0.03)  # runs past its timeout (the duration is what is measured)

    t = slow()
    assert t.state is TokenState.TIMED_OUT
    h = coord.guard_house.health("rv_inline")
    assert (h.timed_out, h.completed) == (1, 0)
    (r,) = coord.guard_house.history()
    assert r.outcome == "timed_out"


def test_a_retrys_queue_wait_leaves_out_the_attempt_before(make_coord):
    coord = make_coord()
    hold = threading.Event()
    calls = {"n": 0}

    @task_token_guard(operation_type="rv_qwait", retries=1, retry_backoff=0)
    def flaky():
        calls["n"] += 1
        if calls["n"] == 1:
            hold.wait(0.05)  # a long first attempt
            raise Boom("x")
        return 1

    t = flaky()
    assert t.get(timeout=SAFETY) == 1
    first, second = [r for r in coord.guard_house.history() if r.token_id == t.token_id]
    assert first.execution_time >= 0.04
    assert second.queue_wait < first.execution_time


def test_huge_numbers_are_huge_sizes(make_coord, tmp_path):
    make_coord(quarantine_dir=tmp_path)

    @task_token_guard(operation_type="rv_huge", quarantine=Quarantine(min_samples=20))
    def count(n):
        _never.wait(min(n, 1e4) * 2e-7)
        return 0

    for i in range(30):
        count(100 + 40 * i).get(timeout=SAFETY)
    assert count(1e39).state is TokenState.QUARANTINED


def test_sizes_never_run_user_code(make_coord):
    make_coord()
    calls = []

    class Sized:
        def __len__(self):
            calls.append(1)
            return 5

    obj = Sized()

    @task_token_guard(operation_type="rv_len", predict=True)
    def f(x):
        return 0

    f(obj).get(timeout=SAFETY)
    f(weakref.proxy(obj)).get(timeout=SAFETY)
    assert calls == []


def test_guard_settings_with_the_guard_house_off_are_refused():
    with pytest.raises(ConfigurationError, match="guard_house=False"):
        OperationsCoordinator(guard_house=False, auto_block=True)
    with pytest.raises(ConfigurationError, match="guard_house=False"):
        OperationsCoordinator(guard_house=False, quarantine=True)
    assert OperationsCoordinator(circuit_breaker=True) is not None
    with pytest.raises(InvalidOption, match="circuit_breaker must be True, False, a"):
        OperationsCoordinator(circuit_breaker="yes")


def test_release_arguments_are_checked(make_coord, tmp_path):
    coord = make_coord(quarantine_dir=tmp_path)
    with pytest.raises(InvalidOption, match="record_ids must be a record id"):
        coord.guard_house.release(123)
    with pytest.raises(InvalidOption, match="dry_run must be True or False"):
        coord.guard_house.discard(operation="x", dry_run="no")


def test_quarantine_audit_events_name_target_and_outcome(make_coord, tmp_path):
    coord = make_coord(quarantine_dir=tmp_path)
    events = []
    coord.guard_house.on_action.append(events.append)
    coord.guard_house.discard(operation="nothing", dry_run=True)
    (e,) = events
    assert e["action"] == "discard" and e["dry_run"]
    assert e["target"] == "(nothing selected)"
    assert e["outcome"] == "dry run: would do 0 done, 0 failed"


def test_an_executor_gives_a_blocked_call_as_a_failed_future(make_coord):
    import concurrent.futures as cf

    from tokengate import Executor

    coord = make_coord()
    coord.guard_house.block("rv_exec")
    with Executor(coordinator=coord, operation_type="rv_exec") as ex:
        futures = [ex.submit(int, "1") for _ in range(3)]
        done, _ = cf.wait(futures, timeout=SAFETY)
        assert len(done) == 3
        assert all(isinstance(f.exception(), MethodBlocked) for f in futures)


def _scored(n):
    for i in range(n):
        if i % 2:
            n += i
    return n


def test_submitted_functions_are_scored_when_asked_not_on_submit(make_coord):
    coord = make_coord()
    t = coord.submit(_scored, 3)
    assert t.get(timeout=SAFETY) == 4
    from tokengate.guard.inspector import score_of

    assert t.complexity_score == score_of(_scored)
    (r,) = [r for r in coord.guard_house.history() if r.token_id == t.token_id]
    assert r.complexity_score == pytest.approx(score_of(_scored), rel=1e-6)


def test_configure_wins_over_the_decorator_across_restarts_options_and_coordinators():
    coord = OperationsCoordinator(cores=1, workers_per_core=1)

    @task_token_guard(
        operation_type="rv_cfgwin",
        circuit_breaker=CircuitBreaker(min_calls=10, window=10, consecutive_failures=7),
    )
    def f(n):
        return n

    def consecutive():
        return coord.guard_house.health("rv_cfgwin").breaker["config"]["consecutive_failures"]

    with coord:
        assert f(1).get(timeout=SAFETY) == 1
        coord.guard_house.configure(
            "rv_cfgwin",
            circuit_breaker=CircuitBreaker(min_calls=2, window=2, consecutive_failures=2),
        )
        assert f.options(priority="high")(2).get(timeout=SAFETY) == 2
        assert consecutive() == 2
    with coord:
        assert f(3).get(timeout=SAFETY) == 3
        assert consecutive() == 2, "configure() carried over and the decorator left it"


def test_force_open_ends_a_carried_block():
    coord = OperationsCoordinator(cores=1, workers_per_core=1)

    @task_token_guard(operation_type="rv_carry")
    def f():
        return 1

    with coord:
        coord.guard_house.block("rv_carry")
        coord.guard_house.force_open("rv_carry")
    with coord:
        assert f().get(timeout=SAFETY) == 1


class _Holder:
    def method(self, n):
        for i in range(n):
            if i:
                n += 1
        return n


def test_bound_methods_are_scored(make_coord):
    from tokengate.guard.inspector import score_of

    coord = make_coord()
    t = coord.submit(_Holder().method, 2)
    assert t.get(timeout=SAFETY) == 3
    assert t.complexity_score == score_of(_Holder.method)


def test_ctrl_c_in_the_quarantine_store_reaches_the_caller(tmp_path):
    with OperationsCoordinator(quarantine_dir=tmp_path) as coord:
        for i in range(30):
            two(list(range(100 + 4 * i))).get(timeout=SAFETY)

        def interrupted(*_):
            raise KeyboardInterrupt

        coord.guard_house._on_quarantine = interrupted
        with pytest.raises(KeyboardInterrupt):
            two(list(range(20_000)))
        assert coord.guard_house.health("rv_two").quarantined == 1


def test_release_on_a_stopped_coordinator_says_so(tmp_path):
    from tokengate import CoordinatorNotRunning

    coord = OperationsCoordinator(quarantine_dir=tmp_path)
    with coord:
        pass
    with pytest.raises(CoordinatorNotRunning, match="not running: start it first"):
        coord.guard_house.release(operation="rv_two")
    assert coord.guard_house.release(operation="rv_two", dry_run=True).done == []


# --------------------------------------------------------------------------- third review


def _store_record(store):
    import operator

    return store.add(
        1,
        "op",
        operator.add,
        (1, 2),
        {},
        predicted=1,
        baseline=0.1,
        deviation=10,
        threshold=3,
        reason="r",
    )


@pytest.mark.skipif(not hasattr(__import__("os"), "getuid"), reason="POSIX permissions")
def test_pickles_under_a_world_writable_parent_are_refused(tmp_path):
    import os

    from tokengate import QuarantineError
    from tokengate.guard.quarantine import QuarantineStore

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # anyone could swap the store's directory inside it
    store = QuarantineStore(shared / "q")
    rec = _store_record(store)
    with pytest.raises(QuarantineError, match="writable by others"):
        store.load_call(rec.record_id)


def test_parents_the_store_creates_are_private(tmp_path):
    import os
    import stat

    from tokengate.guard.quarantine import QuarantineStore

    old = os.umask(0)
    try:
        store = QuarantineStore(tmp_path / "a" / "b" / "q")
        _store_record(store)
    finally:
        os.umask(old)
    for d in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "q"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_a_release_that_died_after_its_replay_is_never_replayed_again(tmp_path):
    import os

    from tokengate.guard import quarantine as q

    store = q.QuarantineStore(tmp_path)
    rec = _store_record(store)
    ran = []

    def replay_then_die(fn, args, kwargs):
        ran.append(args)
        raise SystemExit  # the process "dies" right after the replay (a BaseException)

    with pytest.raises(SystemExit):
        store.release([rec.record_id], replay=replay_then_die)
    # a BaseException puts the record back (the replay raised: it did not complete)...
    assert [r.record_id for r in store.list()] == [rec.record_id]
    # ...but one whose process vanished while it was marked replaying stays out for good
    marker = next(iter(tmp_path.glob("*.json")))
    os.rename(marker, tmp_path / f"{rec.record_id}.replaying-1-999999999-abcd")
    later = q.QuarantineStore(tmp_path)
    _store_record(later)  # a scan of the directory (the first add of a store)
    assert rec.record_id not in [r.record_id for r in later.list()]
    assert ran == [(1, 2)]


def test_cli_times_that_look_like_dates_are_refused():
    from tokengate.cli.quarantine import parse_time

    for text in ("20261201", "2026"):
        with pytest.raises(ValueError, match="not a plausible UNIX time"):
            parse_time(text)
    assert parse_time("1764583200") == 1764583200.0


def test_a_corrupt_record_is_skipped_not_fatal(tmp_path, caplog):
    import json

    from tokengate.guard.quarantine import QuarantineStore

    store = QuarantineStore(tmp_path)
    good = _store_record(store)
    bad = json.loads((tmp_path / f"{good.record_id}.json").read_text())
    bad["record_id"] = good.record_id[:-6] + "ffffff"
    bad["predicted_duration"] = 10**400
    (tmp_path / f"{bad['record_id']}.json").write_text(json.dumps(bad))
    assert [r.record_id for r in store.list()] == [good.record_id]


def test_history_files_with_absurd_numbers_are_refused(tmp_path):
    import json

    from tokengate import HistoryFormatError
    from tokengate.guard.history import load

    rec = {
        "token_id": 1,
        "operation_type": "x",
        "success": True,
        "outcome": "completed",
        "execution_time": 1e308,
        "queue_wait": 0.0,
        "core_id": 1,
        "worker_id": 0,
        "complexity_score": None,
        "predicted_duration": None,
        "attempt": 1,
        "error_type": None,
        "error_message": None,
        "started_at": 1.0,
        "finished_at": 2.0,
    }
    path = tmp_path / "h.json"
    path.write_text(json.dumps([rec]))
    with pytest.raises(HistoryFormatError, match="execution_time"):
        load(path)
    path.write_text("[" * 100_000)
    with pytest.raises(HistoryFormatError, match="not JSON"):
        load(path)


def test_the_inspector_never_raises():
    from tokengate.guard.inspector import inspect_function

    class Hostile:
        def __getattribute__(self, name):
            raise RuntimeError("no attributes for you")

        def __call__(self):
            return 0

    r = inspect_function(Hostile())
    assert not r.source and r.complexity_score >= 1
