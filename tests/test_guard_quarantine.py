"""Spike detection, quarantine and replay through a real coordinator (issue #8).

The operation's cost model learns from real attempts: these tasks take time in proportion to
the size of their argument (an ``Event.wait`` that is never set, i.e. a measured duration, not
a synchronisation), so a much larger call is predicted far above the baseline.
"""

from __future__ import annotations

import os
import threading

import pytest

from _support import SAFETY, child_json, run_child
from tokengate import (
    MethodBlocked,
    OperationsCoordinator,
    Quarantine,
    TokenQuarantined,
    TokenState,
    task_token_guard,
)

_never = threading.Event()


def _cost(items) -> int:
    _never.wait(len(items) * 1e-5)  # ~1-2 ms for 100-216 items: well above scheduling jitter
    return len(items)


@task_token_guard(operation_type="gq_scan", quarantine=Quarantine(threshold=3.0, min_samples=20))
def scan(items):
    return _cost(items)


def _train(fn, n=30):
    for i in range(n):
        assert fn(list(range(100 + 4 * i))).get(timeout=SAFETY) == 100 + 4 * i


def test_a_spike_is_quarantined_and_stored(tmp_path):
    with OperationsCoordinator(quarantine_dir=tmp_path) as coord:
        _train(scan)
        normal = scan(list(range(150)))
        assert normal.get(timeout=SAFETY) == 150
        assert normal.predicted_duration is not None and normal.predicted_duration > 0
        big = scan(list(range(20_000)))
        assert big.state is TokenState.QUARANTINED
        assert big.done()
        with pytest.raises(TokenQuarantined, match=r"token \d+ \(gq_scan\) was quarantined"):
            big.get(timeout=SAFETY)
        h = coord.guard_house.health("gq_scan")
        assert h.quarantined == 1
        assert h.attempts == 31, "the quarantined call never ran"
        assert h.model["samples"] >= 31 and h.model["slope"] > 0.3
        records = coord.guard_house.quarantined()
        assert len(records) == 1
        r = records[0]
        assert r.token_id == big.token_id
        assert r.operation_type == "gq_scan"
        assert r.deviation >= 3.0
        assert r.predicted_duration > r.baseline_duration * 3
        assert r.threshold == 3.0
        assert r.replayable
        assert "list" in r.argument_summary
        assert "baseline" in r.reason
        # a normal call after the spike still runs
        assert scan(list(range(120))).get(timeout=SAFETY) == 120


def test_no_judgement_before_min_samples(tmp_path):
    @task_token_guard(operation_type="gq_cold", quarantine=Quarantine(min_samples=20))
    def cold(items):
        return _cost(items)

    with OperationsCoordinator(quarantine_dir=tmp_path) as coord:
        _train(cold, n=5)
        t = cold(list(range(5_000)))
        assert t.get(timeout=SAFETY) == 5_000
        assert t.predicted_duration is None
        assert coord.guard_house.health("gq_cold").quarantined == 0


def test_zero_spread_sizes_never_judge(tmp_path):
    """Every training call had the same size: the model cannot know how cost follows size, so
    a call of a new size is no evidence of a spike (the zero-spread guard): it runs."""

    @task_token_guard(operation_type="gq_flat", quarantine=True)
    def flat(items):
        return _cost(items)

    with OperationsCoordinator(quarantine_dir=tmp_path) as coord:
        for _ in range(25):
            flat(list(range(100))).get(timeout=SAFETY)
        big = flat(list(range(5_000)))
        assert big.get(timeout=SAFETY) == 5_000
        assert big.predicted_duration is not None  # predicted (with the prior slope)...
        h = coord.guard_house.health("gq_flat")
        assert h.quarantined == 0  # ...but not judged
        assert h.model["slope"] == pytest.approx(1.0, abs=0.3)


def test_the_quarantined_error_names_its_record(tmp_path):
    with OperationsCoordinator(quarantine_dir=tmp_path) as coord:
        _train(scan)
        big = scan(list(range(20_000)))
        with pytest.raises(TokenQuarantined) as e:
            big.get(timeout=SAFETY)
        (rec,) = coord.guard_house.quarantined()
        assert e.value.record_id == rec.record_id
        assert e.value.token_id == big.token_id and e.value.operation == "gq_scan"
        assert f"release record {rec.record_id}" in str(e.value)


def test_a_store_that_cannot_write_says_so(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with OperationsCoordinator(quarantine_dir=blocker / "sub") as coord:
        _train(scan)
        big = scan(list(range(20_000)))
        assert big.state is TokenState.QUARANTINED
        with pytest.raises(TokenQuarantined, match="its record could not be stored") as e:
            big.get(timeout=SAFETY)
        assert e.value.record_id is None
        assert coord.guard_house.health("gq_scan").quarantined == 1


def test_a_quarantine_dir_that_is_a_file_is_refused_at_once(tmp_path):
    from tokengate import ConfigurationError

    f = tmp_path / "f"
    f.write_text("")
    with pytest.raises(ConfigurationError, match="is not a directory"):
        OperationsCoordinator(quarantine_dir=f)
    with pytest.raises(ConfigurationError, match="quarantine_dir must be a path"):
        OperationsCoordinator(quarantine_dir=5)


_CHILD = """
import sys, json
sys.path.insert(0, {tests!r})
from tokengate import OperationsCoordinator, TokenState
import test_guard_quarantine as m
with OperationsCoordinator(quarantine_dir={qdir!r}) as coord:
    m._train(m.scan)
    t = m.scan(list(range(20_000)))
    print("RESULT " + json.dumps({{"state": t.state.name, "id": t.token_id}}))
"""


def test_the_store_survives_a_restart_and_a_release_passes_the_breaker(tmp_path):
    qdir = tmp_path / "q"
    rc, out, err = run_child(
        tmp_path, _CHILD.format(tests=os.path.dirname(__file__), qdir=str(qdir))
    )
    assert rc == 0, err
    child = child_json(out)
    assert child["state"] == "QUARANTINED"
    with OperationsCoordinator(quarantine_dir=qdir) as coord:
        gh = coord.guard_house
        (rec,) = gh.quarantined(operation="gq_scan")
        assert rec.token_id == child["id"]
        # the released call is a new token through the gate: a blocked operation refuses it
        gh.block("gq_scan")
        res = gh.release([rec.record_id])
        assert res.done == [] and rec.record_id in res.failed
        assert "blocked" in res.failed[rec.record_id]
        assert len(gh.quarantined()) == 1, "a refused release keeps its record"
        gh.unblock("gq_scan")
        preview = gh.release(operation="gq_scan", dry_run=True)
        assert [r.record_id for r in preview.selected] == [rec.record_id]
        assert preview.dry_run and preview.done == [rec.record_id], "what it would do"
        assert len(gh.quarantined()) == 1, "a dry run touches nothing"
        res = gh.release(operation="gq_scan")
        assert res.done == [rec.record_id]
        (tok,) = res.results
        assert tok.get(timeout=SAFETY) == 20_000, "released: runs without the spike check"
        assert gh.quarantined() == []


@task_token_guard(operation_type="gq_bulk", quarantine=True)
def bulk(items):
    return _cost(items)


@task_token_guard(operation_type="gq_locks", quarantine=True)
def locks(items):
    return _cost(items)


def test_bulk_release_and_discard_with_dry_run(tmp_path):
    with OperationsCoordinator(quarantine_dir=tmp_path) as coord:
        gh = coord.guard_house
        actions = []
        gh.on_action.append(actions.append)
        _train(bulk)
        spikes = [bulk(list(range(20_000 + i))) for i in range(4)]
        assert all(t.state is TokenState.QUARANTINED for t in spikes)
        assert len(gh.quarantined(operation="gq_bulk")) == 4
        dry = gh.discard(operation="gq_bulk", dry_run=True)
        assert len(dry.selected) == 4 and len(gh.quarantined()) == 4
        ids = [r.record_id for r in gh.quarantined()]
        assert gh.discard(ids[:1]).done == ids[:1]
        res = gh.release(operation="gq_bulk")
        assert sorted(res.done) == sorted(ids[1:])
        assert sorted(t.get(timeout=SAFETY) for t in res.results) == [20_001, 20_002, 20_003]
        assert gh.quarantined() == []
        assert [(a["action"], a["dry_run"]) for a in actions] == [
            ("discard", True),
            ("discard", False),
            ("release", False),
        ]


def test_unpicklable_arguments_are_summarised_not_replayable(tmp_path):
    with OperationsCoordinator(quarantine_dir=tmp_path) as coord:
        _train(locks)
        lock = threading.Lock()
        t = locks([lock] * 20_000)
        assert t.state is TokenState.QUARANTINED
        (rec,) = coord.guard_house.quarantined(operation="gq_locks")
        assert not rec.replayable
        assert "pickle" in (rec.why_not_replayable or "")
        res = coord.guard_house.release([rec.record_id])
        assert res.done == [] and rec.record_id in res.failed


def test_a_blocked_quarantined_operation_raises_before_judging(tmp_path):
    with OperationsCoordinator(quarantine_dir=tmp_path) as coord:
        _train(scan)
        coord.guard_house.block("gq_scan")
        with pytest.raises(MethodBlocked):
            scan(list(range(20_000)))
        assert coord.guard_house.health("gq_scan").quarantined == 0


def test_options_quarantine_only_accepts_false():
    from tokengate import InvalidOption

    with pytest.raises(InvalidOption, match=r"options\(quarantine=...\) only accepts False"):
        scan.options(quarantine=True)
    assert scan.options(quarantine=False)._settings()["spike_check"] is False
    assert scan._settings()["spike_check"] is True


def test_a_step_after_a_quarantined_step_says_so(tmp_path):
    from tokengate import TokenKilled

    with OperationsCoordinator(quarantine_dir=tmp_path):
        _train(scan)
        big = scan(list(range(20_000)))
        child = big.then(len)
        with pytest.raises(TokenKilled, match=r"the step before it in its chain, was quarantined"):
            child.get(timeout=SAFETY)
        assert child.state is TokenState.KILLED
