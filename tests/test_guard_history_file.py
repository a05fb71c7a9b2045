"""Execution-history files (tokengate.guard.history): round trips, the file's shape, atomic
writes, clear errors on bad files, exact summaries and their table."""

from __future__ import annotations

import json
import math
import os
import stat
import statistics
from dataclasses import FrozenInstanceError, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tokengate.errors import HistoryFormatError, TokenGateError
from tokengate.guard.history import (
    ExecutionRecord,
    HistoryDump,
    dump,
    load,
    render_summary,
    summarize,
)

FIELDS = [
    "token_id",
    "operation_type",
    "success",
    "outcome",
    "execution_time",
    "queue_wait",
    "core_id",
    "worker_id",
    "complexity_score",
    "predicted_duration",
    "attempt",
    "error_type",
    "error_message",
    "started_at",
    "finished_at",
]


def rec(**over: Any) -> dict[str, Any]:
    """A record as the binding returns it."""
    base: dict[str, Any] = {
        "token_id": 1,
        "operation_type": "fetch",
        "success": True,
        "outcome": "completed",
        "execution_time": 0.5,
        "queue_wait": 0.01,
        "core_id": 1,
        "worker_id": 0,
        "complexity_score": 5.25,
        "predicted_duration": 0.4,
        "attempt": 1,
        "error_type": None,
        "error_message": None,
        "started_at": 100.0,
        "finished_at": 100.5,
    }
    base.update(over)
    return base


SAMPLE = [
    rec(),
    rec(
        token_id=2,
        operation_type="écrire",
        success=False,
        outcome="failed",
        complexity_score=None,
        predicted_duration=None,
        error_type="ValueError",
        error_message='échec — 失败 🚫\nsecond line "quoted"',
        core_id=2,
        worker_id=3,
    ),
    rec(token_id=3, outcome="timed_out", success=False, attempt=2, error_type="TokenTimeout"),
    rec(token_id=4, outcome="killed", success=False, execution_time=0, queue_wait=0),
]


# --- the record -----------------------------------------------------------------------------------


def test_record_fields_are_exactly_the_binding_keys():
    assert [f.name for f in fields(ExecutionRecord)] == FIELDS
    record = ExecutionRecord.from_dict(rec())
    assert list(record.to_dict()) == FIELDS
    assert record.to_dict() == rec()
    with pytest.raises(FrozenInstanceError):
        record.token_id = 2  # type: ignore[misc]


def test_from_dict_takes_ints_for_floats_and_stores_floats():
    record = ExecutionRecord.from_dict(rec(execution_time=2, started_at=7))
    assert record.execution_time == 2.0 and type(record.execution_time) is float
    assert type(record.started_at) is float


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        ({"token_id": "1"}, "token_id", "an integer"),
        ({"token_id": True}, "token_id", "an integer"),
        ({"token_id": 1.0}, "token_id", "an integer"),
        ({"success": 1}, "success", "true or false"),
        ({"execution_time": "slow"}, "execution_time", "a number"),
        ({"execution_time": False}, "execution_time", "a number"),
        ({"execution_time": -1.0}, "execution_time", ">= 0"),
        ({"execution_time": math.nan}, "execution_time", "finite"),
        ({"queue_wait": math.inf}, "queue_wait", "finite"),
        ({"outcome": "exploded"}, "outcome", "one of completed, failed, killed, timed_out"),
        ({"core_id": 0}, "core_id", "1-based"),
        ({"operation_type": None}, "operation_type", "a string"),
        ({"error_message": 3}, "error_message", "a string or null"),
        ({"complexity_score": "high"}, "complexity_score", "a number or null"),
        ({"predicted_duration": -0.5}, "predicted_duration", ">= 0"),
    ],
)
def test_from_dict_names_the_bad_key(change, key, words):
    with pytest.raises(HistoryFormatError) as info:
        ExecutionRecord.from_dict(rec(**change), context="somewhere")
    message = str(info.value)
    assert message.startswith("somewhere: ")
    assert repr(key) in message
    assert words in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, TokenGateError)


def test_from_dict_names_missing_and_unknown_keys():
    incomplete = rec()
    del incomplete["queue_wait"], incomplete["attempt"]
    with pytest.raises(HistoryFormatError, match=r"lacks the key\(s\) queue_wait, attempt"):
        ExecutionRecord.from_dict(incomplete)
    with pytest.raises(HistoryFormatError, match=r"unknown key\(s\) 'colour'"):
        ExecutionRecord.from_dict(rec(colour="red"))
    with pytest.raises(HistoryFormatError, match="must be a JSON object, got list"):
        ExecutionRecord.from_dict([1, 2])  # type: ignore[arg-type]


# --- dump and load ------------------------------------------------------------------------------


def test_round_trip_keeps_every_field(tmp_path):
    path = tmp_path / "history.json"
    info = {"workers": 4, "name": "coordinateur ✓", "cores": [1, 2]}
    before = datetime.now(UTC).replace(microsecond=0)
    assert dump(SAMPLE, path, coordinator_info=info) == 4
    after = datetime.now(UTC)
    loaded = load(path)
    assert isinstance(loaded, HistoryDump)
    assert loaded.records == [ExecutionRecord.from_dict(r) for r in SAMPLE]
    assert [r.to_dict() for r in loaded.records] == [
        ExecutionRecord.from_dict(r).to_dict() for r in SAMPLE
    ]
    assert loaded.records[1].error_message == 'échec — 失败 🚫\nsecond line "quoted"'
    assert loaded.records[1].complexity_score is None
    assert loaded.records[1].predicted_duration is None
    assert loaded.coordinator == info
    assert loaded.dumped_at is not None
    assert loaded.dumped_at.tzinfo is not None
    assert before <= loaded.dumped_at <= after


def test_round_trip_of_record_objects_and_of_nothing(tmp_path):
    records = [ExecutionRecord.from_dict(r) for r in SAMPLE]
    assert dump(iter(records), tmp_path / "objects.json") == 4
    assert load(tmp_path / "objects.json").records == records
    assert dump([], str(tmp_path / "empty.json")) == 0
    empty = load(str(tmp_path / "empty.json"))
    assert empty.records == [] and empty.coordinator is None


def test_the_file_shape(tmp_path):
    path = tmp_path / "history.json"
    dump(SAMPLE[:2], path, coordinator_info={"workers": 2})
    text = path.read_text(encoding="utf-8")
    assert "失败" in text  # written as UTF-8, not \u escapes
    document = json.loads(text)
    assert list(document) == [
        "format",
        "version",
        "dumped_at",
        "clock",
        "coordinator",
        "count",
        "records",
    ]
    assert document["format"] == "tokengate-history"
    assert document["version"] == 1
    assert document["clock"] == "monotonic"
    assert document["coordinator"] == {"workers": 2}
    assert document["count"] == 2
    assert [list(r) for r in document["records"]] == [FIELDS, FIELDS]
    stamp = datetime.fromisoformat(document["dumped_at"])
    assert stamp.utcoffset() == timedelta(0)
    dump([], path)
    assert json.loads(path.read_text())["coordinator"] is None


def test_dump_creates_parent_directories_and_takes_pathlike(tmp_path):
    class Where(os.PathLike):
        def __fspath__(self) -> str:
            return str(tmp_path / "a" / "b" / "h.json")

    assert dump(SAMPLE, Where()) == 4
    assert len(load(Where()).records) == 4


def test_new_files_are_private_and_replaced_files_keep_their_mode(tmp_path):
    path = tmp_path / "h.json"
    dump(SAMPLE, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)
    dump(SAMPLE[:1], path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert len(load(path).records) == 1


def test_an_unserialisable_value_leaves_the_old_file_intact(tmp_path):
    path = tmp_path / "history.json"
    dump(SAMPLE, path)
    original = path.read_bytes()
    # json.dump fails half-way through writing the temporary file
    with pytest.raises(TypeError, match="not JSON serializable"):
        dump(SAMPLE, path, coordinator_info={"workers": 2, "lock": object()})
    with pytest.raises(ValueError, match="Out of range float"):
        dump(SAMPLE, path, coordinator_info={"ratio": math.nan})
    # an invalid record is refused before anything is written
    with pytest.raises(HistoryFormatError, match=r"record 1: key 'execution_time'"):
        dump([rec(), rec(execution_time="slow")], path)
    with pytest.raises(TypeError, match="coordinator_info must be a mapping"):
        dump(SAMPLE, path, coordinator_info=[("a", 1)])  # type: ignore[arg-type]
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json"]  # no temp file left


def test_a_failed_first_dump_leaves_no_file(tmp_path):
    path = tmp_path / "new.json"
    with pytest.raises(TypeError):
        dump(SAMPLE, path, coordinator_info={"x": {1, 2}})
    assert list(tmp_path.iterdir()) == []


def test_load_accepts_a_bare_list_of_records(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps(SAMPLE), encoding="utf-8")
    loaded = load(path)
    assert loaded.records == [ExecutionRecord.from_dict(r) for r in SAMPLE]
    assert loaded.dumped_at is None and loaded.coordinator is None


def _document(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "format": "tokengate-history",
        "version": 1,
        "dumped_at": "2025-01-31T12:00:00.000+00:00",
        "clock": "monotonic",
        "coordinator": None,
        "count": 1,
        "records": [rec()],
    }
    doc.update(over)
    return doc


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe\x00garbage", "not UTF-8"),
        (b"", "not JSON"),
        (b'"a string"', "holds a JSON str"),
        (json.dumps(_document(format="other")).encode(), "format is 'other'"),
        (json.dumps({"records": []}).encode(), "format is None"),
        (json.dumps(_document(version=2)).encode(), "version 2 is not supported"),
        (json.dumps(_document(version="1")).encode(), "version '1' is not supported"),
        (json.dumps(_document(version=True)).encode(), "version True is not supported"),
        (json.dumps(_document(clock="wall")).encode(), "clock 'wall'"),
        (json.dumps(_document(coordinator=[1])).encode(), "'coordinator' must be an object"),
        (json.dumps(_document(dumped_at="yesterday")).encode(), "'dumped_at' is not an ISO"),
        (json.dumps(_document(dumped_at="2025-01-31T12:00:00")).encode(), "no time zone"),
        (json.dumps(_document(dumped_at=None)).encode(), "'dumped_at' must be"),
        (json.dumps(_document(records={"a": 1})).encode(), "'records' must be a list, got dict"),
        (json.dumps(_document(count=2)).encode(), "'count' says 2 but the file holds 1"),
        (
            json.dumps(_document(count=2, records=[rec(), rec(attempt=-1)])).encode(),
            "record 1: key 'attempt' must be an integer >= 0",
        ),
        (
            json.dumps([rec(), rec(), {"token_id": 1}]).encode(),
            "record 2: record lacks the key(s) operation_type",
        ),
        (json.dumps([rec(), 5]).encode(), "record 1: an execution record must be a JSON object"),
    ],
)
def test_bad_files_give_clear_errors_naming_the_file(tmp_path, content, words):
    path = tmp_path / "bad-dump.json"
    path.write_bytes(content)
    with pytest.raises(HistoryFormatError) as info:
        load(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert words in message


def test_nan_in_a_loaded_record_is_refused(tmp_path):
    path = tmp_path / "nan.json"
    record = json.dumps(rec()).replace('"execution_time": 0.5', '"execution_time": NaN')
    path.write_text(f"[{record}]")
    with pytest.raises(
        HistoryFormatError, match=r"record 0: key 'execution_time' must be a finite"
    ):
        load(path)


def test_a_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nowhere.json")


# --- summaries -----------------------------------------------------------------------------------


def _timed(op: str, seconds: list[float], failures: int = 0) -> list[dict[str, Any]]:
    out = []
    for i, s in enumerate(seconds):
        ok = i >= failures
        out.append(
            rec(
                token_id=i,
                operation_type=op,
                execution_time=s,
                success=ok,
                outcome="completed" if ok else "failed",
            )
        )
    return out


def test_summarize_exact_numbers():
    a_times = [4.0, 1.0, 10.0, 2.0, 3.0]  # unsorted on purpose
    records = _timed("b_op", [0.25], failures=1) + _timed("a_op", a_times, failures=2)
    summary = summarize(records)
    assert list(summary) == ["a_op", "b_op"]  # sorted by name
    a = summary["a_op"]
    assert (a["count"], a["successes"], a["failures"]) == (5, 3, 2)
    assert a["success_rate"] == 0.6
    assert a["mean_execution_time"] == 4.0
    assert a["p50_execution_time"] == 3.0
    # linear interpolation between the nearest ranks: 4 + (10 - 4) * 0.8
    assert a["p95_execution_time"] == pytest.approx(8.8, rel=1e-12)
    assert a["p95_execution_time"] == pytest.approx(
        statistics.quantiles(a_times, n=20, method="inclusive")[18], rel=1e-12
    )
    b = summary["b_op"]
    assert b == {
        "count": 1,
        "successes": 0,
        "failures": 1,
        "success_rate": 0.0,
        "mean_execution_time": 0.25,
        "p50_execution_time": 0.25,
        "p95_execution_time": 0.25,
    }


def test_summarize_takes_record_objects_and_validates_dicts():
    objects = [ExecutionRecord.from_dict(r) for r in _timed("x", [1.0, 3.0])]
    summary = summarize(objects)
    assert summary["x"]["mean_execution_time"] == 2.0
    assert summary["x"]["p50_execution_time"] == 2.0
    assert summarize([]) == {}
    with pytest.raises(HistoryFormatError, match="record 1: key 'success'"):
        summarize([rec(), rec(success="yes")])


def test_summarize_of_a_loaded_dump(tmp_path):
    path = tmp_path / "h.json"
    dump(SAMPLE, path)
    summary = summarize(load(path).records)
    assert summary["fetch"]["count"] == 3
    assert summary["fetch"]["successes"] == 1
    assert summary["écrire"]["failures"] == 1


def test_render_summary_table():
    summary = summarize(
        _timed("fetch_user", [0.010, 0.020, 0.030], failures=1) + _timed("x", [1.5])
    )
    text = render_summary(summary)
    lines = text.splitlines()
    assert lines[0].split() == ["operation", "count", "ok", "failed", "success", "mean", "ms",
                                "p50", "ms", "p95", "ms"]  # fmt: skip
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["fetch_user", "3", "2", "1", "66.7%", "20.000", "20.000", "29.000"]
    assert lines[3].split() == ["x", "1", "1", "0", "100.0%", "1500.000", "1500.000", "1500.000"]
    assert len({len(line) for line in lines}) == 1  # aligned columns
    assert render_summary({}) == "no execution records"


def test_dump_refuses_a_path_it_cannot_write(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError):
        dump(SAMPLE, Path(blocker) / "sub" / "h.json")
    assert blocker.read_text() == "x"
