"""The dashboard's control actions without a server (``Controls.run``), the state builder's
quarantine panel, and the launch argument checks: regressions from the review of issue #10."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

pytest.importorskip("flask_socketio", reason="pip install 'tokengate[dashboard]'")

from tokengate import InvalidOption, OperationsCoordinator, task_token_guard
from tokengate.dashboard.audit import AuditLog
from tokengate.dashboard.controls import MAX_SELECTED, Controls
from tokengate.dashboard.state import StateBuilder


def double(x: int) -> int:
    return 2 * x


def unimportable(x: int) -> int:  # replaced below so that its pickle cannot be loaded
    return x


@pytest.fixture
def coord(tmp_path):
    with OperationsCoordinator(
        cores=1,
        workers_per_core=1,
        grow_on_demand=False,
        convergence_interval=None,
        quarantine_dir=tmp_path / "q",
    ) as c:
        yield c


def _quarantine(coord: OperationsCoordinator, n: int, op: str = "qop", fn: Any = double) -> None:
    store = coord.guard_house.quarantine
    for i in range(n):
        store.add(
            i,
            op,
            fn,
            (i,),
            {},
            predicted=2.0,
            baseline=0.01,
            deviation=200.0,
            threshold=10.0,
            reason="seeded",
        )


def test_a_preview_lists_at_most_the_cap_says_so_and_touches_nothing(coord) -> None:
    _quarantine(coord, MAX_SELECTED + 20)
    out = Controls(coord).run("quarantine_preview", "operator", {"operation": "qop"})
    assert out.outcome == "ok", out.message
    assert out.result["selected_count"] == MAX_SELECTED + 20
    assert len(out.result["selected"]) == MAX_SELECTED
    assert f"{MAX_SELECTED + 20} records match" in out.message
    assert f"the oldest {MAX_SELECTED} are listed" in out.message
    assert len(coord.guard_house.quarantine) == MAX_SELECTED + 20
    refused = Controls(coord).run("quarantine_preview", "viewer", {"operation": "qop"})
    assert refused.outcome == "refused"


def test_bulk_actions_say_what_they_did_and_why_records_failed(coord, monkeypatch) -> None:
    _quarantine(coord, 2)
    _quarantine(coord, 1, op="broken", fn=unimportable)
    controls = Controls(coord)
    gone = controls.run("quarantine_discard", "operator", {"operation": "qop"})
    assert (gone.outcome, gone.message) == ("ok", "discarded 2, 0 failed")
    # The pickled function cannot be found any more: the release fails, and says why.
    monkeypatch.delitem(globals(), "unimportable")
    failed = controls.run("quarantine_release", "operator", {"operation": "broken"})
    assert failed.outcome == "failed"
    assert failed.message.startswith("released 0, 1 failed: ")
    assert "unimportable" in failed.message


def test_a_role_refusal_names_its_target() -> None:
    out = Controls(OperationsCoordinator()).run("kill", "viewer", {"token_id": 7})
    assert (out.outcome, out.target) == ("refused", "7")


def test_a_launch_message_carries_its_arguments(coord) -> None:
    coord.register_launchable(double)
    out = Controls(coord).run("launch", "admin", {"name": "double", "args": [21]})
    assert out.outcome == "ok"
    assert out.message.startswith("launched double(21) as token ")
    bad = Controls(coord).run("launch", "admin", {"name": "double", "args": ["21"]})
    assert bad.outcome == "invalid"
    assert "argument x of double must be an integer, got '21'" in bad.message


def test_drains_share_one_waiter_that_ends_when_admission_reopens(coord) -> None:
    gate = threading.Event()
    controls = Controls(coord)
    running = coord.submit(gate.wait, 30)
    names = lambda: [t for t in threading.enumerate() if t.name == "tokengate-dashboard-drain"]  # noqa: E731
    for _ in range(5):
        assert controls.run("drain", "operator", {}).outcome == "ok"
        assert controls.run("resume", "operator", {}).outcome == "ok"
    assert len(names()) <= 1, "one waiter at a time"
    assert coord.admission_open
    for t in names():
        t.join(5)  # admission is open again: the waiter sees the drain is over
        assert not t.is_alive()
    gate.set()
    running.get(timeout=5)
    controls.close(timeout=5)


def test_close_stops_a_waiting_drain_waiter(coord) -> None:
    gate = threading.Event()
    controls = Controls(coord)
    running = coord.submit(gate.wait, 30)
    assert controls.run("drain", "operator", {}).outcome == "ok"
    controls.close(timeout=5)
    assert not [t for t in threading.enumerate() if t.name == "tokengate-dashboard-drain"]
    gate.set()
    running.get(timeout=5)
    coord.resume()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["3"], "argument n of job must be an integer, got '3'"),
        ([True], "argument n of job must be an integer, got True"),
        ([1.5], "argument n of job must be an integer, got 1.5"),
        ([1, "a"], "argument ratio of job must be a number, got 'a'"),
        ([1, 2.0, 3], "argument label of job must be a string or null, got 3"),
        ([1, 2, None, 4, "z"], "argument rest[1] of job must be an integer, got 'z'"),
    ],
)
def test_launch_checks_json_values_against_the_annotations(args, message) -> None:
    c = OperationsCoordinator()

    @c.register_launchable
    def job(n: int, ratio: float = 1.0, label: str | None = None, *rest: int, **kw: str) -> None:
        return None

    with pytest.raises(InvalidOption) as info:
        c.launch("job", args)
    assert str(info.value) == message


def test_launch_takes_what_python_callers_pass_for_floats_and_lists(coord) -> None:
    import decimal
    import fractions

    @coord.register_launchable
    def scale(factor: float, items: list[int]) -> float:
        return float(factor) * len(items)

    for factor in (2, 2.0, fractions.Fraction(2), decimal.Decimal("2")):
        assert coord.launch("scale", [factor, (1, 2)]).get(timeout=5) == 4.0
    with pytest.raises(InvalidOption, match="must be a number, got True"):
        coord.launch("scale", [True, []])


def test_launch_lets_through_what_the_annotations_do_not_pin_down(coord) -> None:
    @coord.register_launchable
    def loose(a, b: Any, c: list[int], d: dict[str, Any], e: float = 0) -> tuple:  # type: ignore[no-untyped-def]
        return (a, b, c, d, e)

    token = coord.launch("loose", ["x", {"y": 1}, [1, "two"], {"k": None}, 3])
    assert token.get(timeout=5) == ("x", {"y": 1}, [1, "two"], {"k": None}, 3)
    with pytest.raises(InvalidOption, match="argument c of loose must be a list"):
        coord.launch("loose", [1, 2, {"not": "a list"}, {}])


def test_the_quarantine_panel_reads_the_newest_records_only(coord, tmp_path, monkeypatch) -> None:
    _quarantine(coord, 80)
    store = coord.guard_house.quarantine
    reads: list[str] = []
    real = type(store)._read_file

    def counting(self, path, rid):  # type: ignore[no-untyped-def]
        reads.append(rid)
        return real(self, path, rid)

    monkeypatch.setattr(type(store), "_read_file", counting)
    builder = StateBuilder(coord, AuditLog(tmp_path / "audit.jsonl"))
    panel = builder.build()["quarantine"]
    assert panel["count"] == 80
    assert len(panel["records"]) == len(reads) == 50
    assert [r["token_id"] for r in panel["records"]] == list(range(79, 29, -1))


def test_breaker_buttons_log_the_state_before_and_after(coord, caplog) -> None:
    @task_token_guard(operation_type="dash-controls-op")
    def op() -> int:
        return 1

    op().get(timeout=5)
    with caplog.at_level(logging.WARNING, logger="tokengate.guard"):
        coord.guard_house.block("dash-controls-op")
        coord.guard_house.unblock("dash-controls-op")
    lines = [r.getMessage() for r in caplog.records if "circuit breaker" in r.getMessage()]
    assert lines == [
        "circuit breaker of 'dash-controls-op': closed -> forced_open (block() by an operator)",
        "circuit breaker of 'dash-controls-op': forced_open -> closed (unblock() by an operator)",
    ]
