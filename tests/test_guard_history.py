"""The execution history: one record per attempt, written by the workers into a preallocated
ring in the core, read (and dumped) on demand (issue #8)."""

from __future__ import annotations

import json

import pytest

from _support import SAFETY
from tokengate import Retry, task_token_guard
from tokengate.cli import main
from tokengate.guard.history import load


class Boom(Exception):
    pass


def test_records_match_the_tokens(make_coord):
    coord = make_coord()

    @task_token_guard(operation_type="gh_hist", tags={"weight": "heavy"})
    def work(i):
        if i == 3:
            raise Boom("three")
        return i

    tokens = [work(i) for i in range(6)]
    for t in tokens:
        t.wait(SAFETY)
    records = {r.token_id: r for r in coord.guard_house.history() if r.operation_type == "gh_hist"}
    assert set(records) == {t.token_id for t in tokens}
    for t in tokens:
        r = records[t.token_id]
        assert r.core_id == t.core_id and r.worker_id == t.worker_id
        assert r.attempt == 1
        assert r.complexity_score == pytest.approx(t.complexity_score, rel=1e-6)
        assert r.predicted_duration is None  # the operation does not predict
        assert r.execution_time == pytest.approx(t.finished_at - t.started_at, abs=1e-3)
        assert r.queue_wait == pytest.approx(t.started_at - t.created_at, abs=1e-3)
    bad = records[tokens[3].token_id]
    assert not bad.success and bad.outcome == "failed"
    assert (bad.error_type, bad.error_message) == ("Boom", "three")
    good = records[tokens[0].token_id]
    assert good.success and good.error_type is None


def test_each_retry_is_an_attempt(make_coord):
    coord = make_coord()
    calls = {"n": 0}

    @task_token_guard(operation_type="gh_retry", retries=3)
    def flaky():
        calls["n"] += 1
        if calls["n"] < 3:
            raise Retry(delay=0)
        return "ok"

    t = flaky()
    assert t.get(timeout=SAFETY) == "ok"
    mine = [r for r in coord.guard_house.history() if r.token_id == t.token_id]
    assert [(r.attempt, r.outcome) for r in mine] == [
        (1, "failed"),
        (2, "failed"),
        (3, "completed"),
    ]
    h = coord.guard_house.health("gh_retry")
    assert (h.attempts, h.failed, h.completed) == (3, 2, 1)


def test_predicting_operations_record_their_prediction(make_coord):
    coord = make_coord()

    @task_token_guard(operation_type="gh_pred", predict=True)
    def work(items):
        return len(items)

    for i in range(25):
        work(list(range(10 + i))).get(timeout=SAFETY)
    t = work(list(range(20)))
    t.get(timeout=SAFETY)
    assert t.predicted_duration is not None
    (r,) = [r for r in coord.guard_house.history() if r.token_id == t.token_id]
    assert r.predicted_duration == pytest.approx(t.predicted_duration, rel=1e-6)
    assert coord.guard_house.health("gh_pred").model["typical_error"] is not None


def test_the_ring_is_bounded(make_coord):
    coord = make_coord(history_size=32, cores=2)

    @task_token_guard(operation_type="gh_ring")
    def work(i):
        return i

    tokens = [work(i) for i in range(300)]
    for t in tokens:
        t.get(timeout=SAFETY)
    hist = coord.guard_house.history()
    assert len(hist) == 32
    assert len(coord.guard_house.history(limit=5)) == 5
    assert [r.finished_at for r in hist] == sorted(r.finished_at for r in hist)
    # the ring keeps the newest records (by when they were written, not by token id)
    newest = sorted(t.finished_at for t in tokens)[-64]
    assert all(r.finished_at >= newest - 1e-3 for r in hist)


def test_history_off(make_coord):
    coord = make_coord(history_size=0)

    @task_token_guard(operation_type="gh_nohist")
    def work():
        return 1

    assert work().get(timeout=SAFETY) == 1
    assert coord.guard_house.history() == []
    assert coord.guard_house.health("gh_nohist").completed == 1


def test_dump_round_trips(make_coord, tmp_path):
    coord = make_coord()

    @task_token_guard(operation_type="gh_dump")
    def work(i):
        if i % 3 == 0:
            raise Boom(f"ünïcode {i}")
        return i

    for i in range(9):
        work(i).wait(SAFETY)
    path = tmp_path / "dumps" / "history.json"
    n = coord.dump_history(path)
    assert n == len(coord.guard_house.history())
    loaded = load(path)
    assert [r.to_dict() for r in loaded.records] == [
        r.to_dict() for r in coord.guard_house.history()
    ]
    raw = json.loads(path.read_text())
    assert raw["count"] == n and raw["coordinator"]["capacity"] == 10_000


def test_cli_history_dump_and_show(tmp_path, capsys):
    out = tmp_path / "h.json"
    assert main(["history", "dump", "-o", str(out), "--seconds", "1", "--seed", "7"]) == 0
    printed = capsys.readouterr().out
    records = load(out).records
    assert f"wrote {len(records)} execution records" in printed
    assert len(records) > 0
    assert main(["history", "show", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert sum(op["count"] for op in summary.values()) == len(records)
