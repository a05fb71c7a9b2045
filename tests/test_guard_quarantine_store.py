"""The quarantine store (tokengate.guard.quarantine) and the `tokengate quarantine` CLI.

Time-dependent behaviour (filters, retention) runs on a fake store clock, never on sleeps;
processes are synchronised through pipes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import operator
import os
import re
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import tokengate
from tokengate import InvalidOption, TaskToken, task_token_guard
from tokengate.cli import quarantine as _cli
from tokengate.errors import QuarantineError, TokenGateError
from tokengate.guard import quarantine
from tokengate.guard.quarantine import (
    ActionResult,
    QuarantineRecord,
    QuarantineStore,
    default_directory,
    summarize_arguments,
)

PYTHON_DIR = str(Path(tokengate.__file__).resolve().parents[1])
POSIX = os.name == "posix"
posix_only = pytest.mark.skipif(not POSIX, reason="POSIX permissions")

# -- module-level callables (pickled by reference) ------------------------------------------


@task_token_guard(operation_type="qtest.double")
def double(x: int) -> int:
    return 2 * x


@task_token_guard(operation_type="qtest.write_marker")
def write_marker(path: str, text: str) -> int:
    with open(path, "w") as f:
        f.write(text)
    return len(text)


@task_token_guard(operation_type="qtest.boom")
def boom(message: str) -> None:
    raise ValueError(message)


class Releasable:
    """Stands in for a guarded function: ``options(quarantine=False)`` returns the guarded
    ``target`` (so the CLI's default replay runs a real token) and records that it was asked
    for exactly that."""

    def __init__(self, target):
        self.target = target

    def options(self, **kw):
        if kw != {"quarantine": False}:
            raise AssertionError(f"unexpected options {kw}")
        return self.target

    def __call__(self, *args, **kwargs):
        raise AssertionError("the replay must go through options(quarantine=False)")


RELEASE_MARKER = Releasable(write_marker)
RELEASE_BOOM = Releasable(boom)


# -- helpers -------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> int:
        return int(self.now * 1e9)


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    c = FakeClock()
    monkeypatch.setattr(quarantine, "_clock_ns", c)
    return c


def add(store: QuarantineStore, op: str = "op", fn=operator.add, args=(1, 2), kwargs=None, **kw):
    params = {
        "predicted": 12.0,
        "baseline": 0.5,
        "deviation": 24.0,
        "threshold": 10.0,
        "reason": "predicted 12 s, 24x the baseline",
    }
    params.update(kw)
    token_id = params.pop("token_id", 7)
    return store.add(token_id, op, fn, args, {} if kwargs is None else kwargs, **params)


def snapshot(directory: Path) -> dict[str, tuple[bytes, int, int]]:
    if not directory.exists():
        return {}
    return {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns, stat.S_IMODE(p.stat().st_mode))
        for p in sorted(directory.iterdir())
    }


class Recorder:
    """A fake replay: records each call and returns a marker."""

    def __init__(self, fail_on: set | None = None) -> None:
        self.calls: list[tuple] = []
        self.fail_on = fail_on or set()

    def __call__(self, fn, args, kwargs):
        self.calls.append((fn, args, kwargs))
        if args and args[0] in self.fail_on:
            raise ValueError(f"cannot replay {args[0]}")
        return ("replayed", args)


def child_env(*extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*extra, PYTHON_DIR])
    env.pop("TOKENGATE_QUARANTINE_DIR", None)
    return env


def run_py(source: str, *args: str, cwd=None, env=None, timeout: float = 60.0):
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env or child_env(),
        timeout=timeout,
    )
    return proc


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tokengate")
    sub = parser.add_subparsers(dest="command")
    qparser = _cli.add_quarantine_parser(sub)
    assert qparser.get_default("handler") is _cli.run_quarantine
    args = parser.parse_args(argv)
    return args.handler(args)


# -- records, ids, persistence ---------------------------------------------------------------


def test_add_get_list_load_call(tmp_path):
    store = QuarantineStore(tmp_path / "q")
    assert len(store) == 0 and store.list() == []
    rec = add(store, "qtest.double", double, (21,), {}, token_id=42)
    assert rec.token_id == 42 and rec.operation_type == "qtest.double"
    assert (rec.predicted_duration, rec.baseline_duration) == (12.0, 0.5)
    assert (rec.deviation, rec.threshold) == (24.0, 10.0)
    assert rec.replayable and rec.why_not_replayable is None
    assert rec.function == f"{__name__}:double"
    assert rec.argument_summary == "args=(21) kwargs={}"
    assert (tmp_path / "q" / f"{rec.record_id}.json").is_file()
    assert (tmp_path / "q" / f"{rec.record_id}.pkl").is_file()
    assert store.get(rec.record_id) == rec
    assert store.list() == [rec] and len(store) == 1
    fn, args, kwargs = store.load_call(rec.record_id)
    assert fn is double and args == (21,) and kwargs == {}
    assert QuarantineRecord.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec


def test_ids_are_unique_and_sort_by_time(tmp_path):
    store = QuarantineStore(tmp_path)
    records = [add(store, args=(i, 0), token_id=1) for i in range(40)]  # same token id
    ids = [r.record_id for r in records]
    assert len(set(ids)) == 40
    assert sorted(ids) == ids
    assert [r.record_id for r in store.list()] == ids
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", i) for i in ids)
    times = [r.quarantined_at for r in records]
    assert times == sorted(times)


def test_newest_reads_only_the_newest_files(tmp_path, monkeypatch):
    store = QuarantineStore(tmp_path)
    records = [add(store, args=(i, 0), token_id=i) for i in range(30)]
    (tmp_path / f"{records[-2].record_id}.json").write_text("not json", encoding="utf-8")
    reads = []
    real = QuarantineStore._read_file

    def counting(self, path, rid):
        reads.append(rid)
        return real(self, path, rid)

    monkeypatch.setattr(QuarantineStore, "_read_file", counting)
    newest = store.newest(3)
    assert [r.record_id for r in newest] == [
        r.record_id for r in (records[-1], *records[-4:-2][::-1])
    ]
    assert len(reads) == 4, "three good records and the corrupt one, nothing older"
    assert store.newest(0) == [] and len(store) == 30
    assert [r.token_id for r in store.newest(100)] == [
        r.token_id for r in records[::-1] if r is not records[-2]
    ]
    with pytest.raises(tokengate.ConfigurationError):
        store.newest(-1)


def test_filters_and_time_range(tmp_path, clock):
    store = QuarantineStore(tmp_path, retention=None)
    made = {}
    for t, op in ((1000.0, "a"), (2000.0, "b"), (3000.0, "a"), (4000.0, "b")):
        clock.now = 1_800_000_000.0 + t
        made[t] = add(store, op, args=(int(t), 0))
    base = 1_800_000_000.0

    def ids(**kw):
        return [r.argument_summary for r in store.list(**kw)]

    assert [r.quarantined_at for r in store.list()] == [base + t for t in (1e3, 2e3, 3e3, 4e3)]
    assert ids(operation="a") == ["args=(1000, 0) kwargs={}", "args=(3000, 0) kwargs={}"]
    assert ids(operation="nope") == []
    # since is inclusive, until exclusive
    assert [r.record_id for r in store.list(since=base + 2000, until=base + 4000)] == [
        made[2000.0].record_id,
        made[3000.0].record_id,
    ]
    assert [r.record_id for r in store.list(operation="b", since=base + 2000.5)] == [
        made[4000.0].record_id
    ]
    assert [r.record_id for r in store.list(limit=2)] == [
        made[1000.0].record_id,
        made[2000.0].record_id,
    ]
    with pytest.raises(TypeError):
        store.list(since="yesterday")  # type: ignore[arg-type]


def test_records_survive_a_new_store_on_the_same_directory(tmp_path):
    first = QuarantineStore(tmp_path / "q")
    rec = add(first, "qtest.double", double, (5,), {})
    del first
    second = QuarantineStore(tmp_path / "q")
    assert second.list() == [rec]
    assert second.get(rec.record_id) == rec
    assert second.load_call(rec.record_id) == (double, (5,), {})


def test_records_survive_the_process_that_wrote_them(tmp_path):
    directory = tmp_path / "q"
    proc = run_py(
        """
        import operator, sys
        from tokengate.guard.quarantine import QuarantineStore
        store = QuarantineStore(sys.argv[1])
        rec = store.add(99, "child-op", operator.mul, (6, 7), {}, predicted=3.0, baseline=1.0,
                        deviation=3.0, threshold=2.0, reason="spike")
        print("RESULT", rec.record_id)
        """,
        str(directory),
    )
    assert proc.returncode == 0, proc.stderr
    (record_id,) = re.findall(r"^RESULT (\S+)$", proc.stdout, re.M)
    store = QuarantineStore(directory)
    (rec,) = store.list()
    assert rec.record_id == record_id and rec.token_id == 99 and rec.operation_type == "child-op"
    assert f"-{os.getpid()}-" not in record_id  # the id embeds the child's pid, not ours
    recorder = Recorder()
    result = store.release(record_id, replay=recorder)
    assert result.done == [record_id] and recorder.calls == [(operator.mul, (6, 7), {})]
    assert store.list() == [] and list(directory.iterdir()) == []


@posix_only
def test_directory_and_files_are_private_and_writes_leave_no_temp_files(tmp_path):
    old = os.umask(0)
    try:
        store = QuarantineStore(tmp_path / "a" / "q")
        rec = add(store, "qtest.double", double, (1,), {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a" / "q").stat().st_mode) == 0o700
    names = sorted(p.name for p in (tmp_path / "a" / "q").iterdir())
    assert names == [f"{rec.record_id}.json", f"{rec.record_id}.pkl"]
    for name in names:
        assert stat.S_IMODE((tmp_path / "a" / "q" / name).stat().st_mode) == 0o600, name


def test_reading_a_missing_directory_creates_nothing(tmp_path):
    store = QuarantineStore(tmp_path / "absent")
    assert store.list() == [] and len(store) == 0
    assert store.discard(operation="x", dry_run=True).selected == []
    assert not (tmp_path / "absent").exists()


# -- bounds ---------------------------------------------------------------------------------


def test_retention_drops_old_records_on_add(tmp_path, clock, caplog):
    caplog.set_level(logging.INFO, logger="tokengate.guard")
    store = QuarantineStore(tmp_path, retention=3600.0)
    old = [add(store, args=(i, 0)) for i in range(2)]
    clock.now += 1800
    middle = add(store, args=(10, 0))
    assert len(store) == 3
    clock.now += 1801  # the first two are now 3601 s old, the middle one 1801 s
    new = add(store, args=(20, 0))
    assert [r.record_id for r in store.list()] == [middle.record_id, new.record_id]
    for r in old:
        assert not (tmp_path / f"{r.record_id}.json").exists()
        assert not (tmp_path / f"{r.record_id}.pkl").exists()
    assert any(
        "dropped 2 record(s) (2 past retention" in r.getMessage() and r.levelno == logging.INFO
        for r in caplog.records
    )


def test_max_records_keeps_the_newest(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tokengate.guard")
    store = QuarantineStore(tmp_path, max_records=3)
    made = [add(store, args=(i, 0)) for i in range(5)]
    assert [r.record_id for r in store.list()] == [r.record_id for r in made[2:]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{r.record_id}.{ext}" for r in made[2:] for ext in ("json", "pkl")
    )
    assert any("beyond max_records=3" in r.getMessage() for r in caplog.records)


def test_max_bytes_drops_the_oldest_but_never_the_newest(tmp_path):
    store = QuarantineStore(tmp_path, max_bytes=6000)
    made = [add(store, args=(bytes(2000), i)) for i in range(4)]
    kept = [r.record_id for r in store.list()]
    assert kept == [r.record_id for r in made[-2:]]  # 2 x (2 KB pickle + JSON) fit in 6000
    huge = add(store, args=(bytes(10_000), 9))
    assert [r.record_id for r in store.list()] == [huge.record_id]


def test_store_settings_are_validated(tmp_path):
    for kw in ({"max_records": 0}, {"retention": 0}, {"max_pickle_bytes": -1}, {"max_bytes": 0}):
        with pytest.raises(ValueError):
            QuarantineStore(tmp_path, **kw)
    with pytest.raises(ValueError):
        QuarantineStore(tmp_path, retention=True)  # type: ignore[arg-type]


def test_leftovers_of_a_dead_process_are_cleaned_up(tmp_path, caplog):
    store = QuarantineStore(tmp_path)
    claimed = add(store, args=(1, 0))
    fresh_claim = add(store, args=(2, 0))
    # A release that died after claiming the record: the claim is an hour old.
    claim_ns = quarantine._clock_ns() - int(3601e9)
    claim = tmp_path / f"{claimed.record_id}.claim-{claim_ns}-12345-abcd"
    os.rename(tmp_path / f"{claimed.record_id}.json", claim)
    fresh = tmp_path / f"{fresh_claim.record_id}.claim-{quarantine._clock_ns()}-12345-abcd"
    os.rename(tmp_path / f"{fresh_claim.record_id}.json", fresh)
    assert store.list() == []
    # A temporary file and an orphan pickle left by a write that died, an hour ago.
    temp = tmp_path / ".x.json.abc.tmp"
    temp.write_bytes(b"partial")
    orphan = tmp_path / "00000000000000000001-1-1-aaaaaa.pkl"
    orphan.write_bytes(b"x")
    recent_temp = tmp_path / ".y.json.abc.tmp"
    recent_temp.write_bytes(b"being written")
    hour_ago = os.stat(temp).st_mtime - 3601
    for p in (temp, orphan):
        os.utime(p, (hour_ago, hour_ago))
    caplog.set_level(logging.WARNING, logger="tokengate.guard")
    # the next process's store cleans up at its first add (and every 32 adds after that)
    store = QuarantineStore(tmp_path)
    new = add(store, args=(3, 0))
    assert [r.record_id for r in store.list()] == [claimed.record_id, new.record_id]
    assert not claim.exists() and fresh.exists()  # a fresh claim belongs to a live action
    assert not temp.exists() and not orphan.exists() and recent_temp.exists()
    assert (tmp_path / f"{fresh_claim.record_id}.pkl").exists()  # claimed: not an orphan
    assert any(
        claimed.record_id in r.getMessage() and "restored" in r.getMessage() for r in caplog.records
    )


# -- pickling -------------------------------------------------------------------------------


def test_unpicklable_arguments_keep_the_summary_and_are_not_replayable(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="tokengate.guard")
    store = QuarantineStore(tmp_path)
    rec = add(store, "op", double, (threading.Lock(), [1, 2, 3]), {"n": 5})
    assert not rec.replayable
    assert rec.why_not_replayable is not None
    assert rec.why_not_replayable.startswith("arguments cannot be pickled: TypeError:")
    assert "lock" in rec.why_not_replayable
    assert rec.argument_summary == "args=(lock, list[3]) kwargs={n: 5}"
    assert not (tmp_path / f"{rec.record_id}.pkl").exists()
    assert store.get(rec.record_id) == rec
    assert any(rec.record_id in r.getMessage() for r in caplog.records)
    with pytest.raises(QuarantineError, match="not replayable"):
        store.load_call(rec.record_id)
    recorder = Recorder()
    result = store.release(rec.record_id, replay=recorder)
    assert recorder.calls == []
    assert result.done == [] and list(result.failed) == [rec.record_id]
    assert result.failed[rec.record_id].startswith("not replayable: arguments cannot be pickled")
    assert store.list() == [rec]  # it stays
    assert store.discard(rec.record_id).done == [rec.record_id]
    assert store.list() == []


def test_unpicklable_function_is_reported_as_such(tmp_path):
    @task_token_guard(operation_type="local")
    def local(x):
        return x

    rec = add(QuarantineStore(tmp_path), "local", local, (1,), {})
    assert not rec.replayable
    assert rec.why_not_replayable is not None
    assert rec.why_not_replayable.startswith("the function cannot be pickled:")


def test_a_pickle_above_max_pickle_bytes_is_not_kept(tmp_path):
    store = QuarantineStore(tmp_path, max_pickle_bytes=1024)
    small = add(store, args=(bytes(100), 0))
    big = add(store, args=(bytes(4096), 0))
    assert small.replayable and not big.replayable
    assert big.why_not_replayable is not None and "max_pickle_bytes (1024 bytes)" in (
        big.why_not_replayable
    )
    assert big.argument_summary == "args=(bytes[4096], 0) kwargs={}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{small.record_id}.json", f"{small.record_id}.pkl", f"{big.record_id}.json"]
    )


@posix_only
def test_pickles_are_not_loaded_from_a_directory_others_can_write(tmp_path, caplog):
    store = QuarantineStore(tmp_path / "q")
    rec = add(store, "qtest.double", double, (1,), {})
    os.chmod(tmp_path / "q", 0o777)
    try:
        caplog.set_level(logging.WARNING, logger="tokengate.guard")
        unreplayable = add(QuarantineStore(tmp_path / "q"), args=(threading.Lock(),))
        assert any("open to other users (mode 0o777)" in r.getMessage() for r in caplog.records)
        with pytest.raises(QuarantineError, match="others can write"):
            store.load_call(rec.record_id)
        recorder = Recorder()
        result = store.release(rec.record_id, replay=recorder)
        assert recorder.calls == [] and "refusing to load pickles" in result.failed[rec.record_id]
        dry = store.release(rec.record_id, replay=recorder, dry_run=True)
        assert dry.failed == result.failed
        assert store.list() == [rec, unreplayable]
    finally:
        os.chmod(tmp_path / "q", 0o700)
    assert store.load_call(rec.record_id) == (double, (1,), {})


# -- corrupt files --------------------------------------------------------------------------


def test_corrupt_records_are_skipped_with_a_warning(tmp_path, caplog):
    store = QuarantineStore(tmp_path)
    good = add(store)
    other = add(store)
    garbage = tmp_path / "00000000000000000001-1-1-000001.json"
    garbage.write_text("{not json")
    wrong_id = tmp_path / "00000000000000000002-1-1-000002.json"
    wrong_id.write_text((tmp_path / f"{other.record_id}.json").read_text())
    not_object = tmp_path / "00000000000000000003-1-1-000003.json"
    not_object.write_text("[1, 2]")
    bad_field = tmp_path / "00000000000000000004-1-1-000004.json"
    bad_field.write_text(
        json.dumps({**good.to_dict(), "record_id": bad_field.stem, "token_id": True})
    )
    (tmp_path / "unrelated.txt").write_text("ignored")
    caplog.set_level(logging.WARNING, logger="tokengate.guard")
    assert store.list() == [good, other]
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for path in (garbage, wrong_id, not_object, bad_field):
        assert str(path) in warned
    assert len(store) == 6  # counts record files without reading them
    with pytest.raises(QuarantineError, match=re.escape(str(garbage))):
        store.get(garbage.stem)
    result = store.release(garbage.stem, replay=Recorder())
    assert "corrupt record file" in result.failed[garbage.stem]


def test_invalid_and_unknown_ids(tmp_path):
    store = QuarantineStore(tmp_path)
    rec = add(store)
    (tmp_path.parent / "outside.json").write_text(json.dumps(rec.to_dict()))
    for bad in ("../outside", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(QuarantineError, match="not a valid quarantine record id"):
            store.get(bad)
    with pytest.raises(QuarantineError, match="no quarantine record"):
        store.get("00000000000000000009-1-1-abcdef")
    result = store.discard(["../outside", "00000000000000000009-1-1-abcdef", rec.record_id])
    assert result.done == [rec.record_id]
    assert result.failed == {
        "../outside": "not a valid record id",
        "00000000000000000009-1-1-abcdef": "no such record",
    }
    assert (tmp_path.parent / "outside.json").exists()
    assert issubclass(QuarantineError, LookupError) and issubclass(QuarantineError, TokenGateError)


def test_record_from_dict_rejects_bad_data():
    rec = QuarantineRecord(
        "00000000000000000001-1-1-abcdef", 1, "op", 1.0, 2.0, 1.0, 2.0, 1.5, "r", "s", True
    )
    data = rec.to_dict()
    assert QuarantineRecord.from_dict({**data, "extra": 1}) == rec
    for key, value in (("token_id", "1"), ("replayable", 1), ("deviation", None), ("reason", 3)):
        with pytest.raises(ValueError, match=key):
            QuarantineRecord.from_dict({**data, key: value})
    with pytest.raises(ValueError, match="missing"):
        QuarantineRecord.from_dict({k: v for k, v in data.items() if k != "operation_type"})
    with pytest.raises(ValueError, match="record id"):
        QuarantineRecord.from_dict({**data, "record_id": "../x"})


# -- release / discard ----------------------------------------------------------------------


def _mixed_store(tmp_path, clock) -> tuple[QuarantineStore, dict[str, QuarantineRecord]]:
    store = QuarantineStore(tmp_path, retention=None)
    made = {}
    for i, (op, args) in enumerate(
        [("a", (1, 0)), ("b", (2, 0)), ("a", (threading.Lock(), 0)), ("a", (4, 0)), ("b", (5, 0))]
    ):
        clock.now = 1_800_000_000.0 + 100 * i
        made[f"{op}{i}"] = add(store, op, args=args)
    return store, made


def test_dry_run_changes_nothing_and_reports_what_the_real_run_does(tmp_path, clock):
    store, made = _mixed_store(tmp_path, clock)
    before = snapshot(tmp_path)
    recorder = Recorder()
    dry = store.release(operation="a", dry_run=True, replay=recorder)
    assert recorder.calls == []
    assert snapshot(tmp_path) == before
    assert dry.dry_run and dry.results == []
    assert [r.record_id for r in dry.selected] == [made[k].record_id for k in ("a0", "a2", "a3")]
    assert dry.done == [made["a0"].record_id, made["a3"].record_id]
    assert list(dry.failed) == [made["a2"].record_id]

    dry_discard = store.discard(operation="b", dry_run=True)
    assert snapshot(tmp_path) == before
    assert dry_discard.done == [made["b1"].record_id, made["b4"].record_id]

    real = store.release(operation="a", replay=recorder)
    assert not real.dry_run
    assert real.selected == dry.selected and real.done == dry.done and real.failed == dry.failed
    assert real.results == [("replayed", (1, 0)), ("replayed", (4, 0))]
    real_discard = store.discard(operation="b")
    assert real_discard.done == dry_discard.done and real_discard.failed == {}
    assert [r.record_id for r in store.list()] == [made["a2"].record_id]


def test_bulk_release_by_operation_and_by_time_range(tmp_path, clock):
    store, made = _mixed_store(tmp_path, clock)
    recorder = Recorder()
    by_op = store.release(operation="b", replay=recorder)
    assert [c[1] for c in recorder.calls] == [(2, 0), (5, 0)]
    assert all(c[0] is operator.add and c[2] == {} for c in recorder.calls)
    assert by_op.done == [made["b1"].record_id, made["b4"].record_id] and by_op.ok

    recorder = Recorder()
    base = 1_800_000_000.0
    by_time = store.release(since=base, until=base + 300, replay=recorder)  # a0 and a2
    assert [c[1] for c in recorder.calls] == [(1, 0)]
    assert by_time.done == [made["a0"].record_id]
    assert list(by_time.failed) == [made["a2"].record_id]
    assert [r.record_id for r in store.list()] == [made["a2"].record_id, made["a3"].record_id]

    recorder = Recorder()
    rest = store.release(since=base + 250, replay=recorder)
    assert [c[1] for c in recorder.calls] == [(4, 0)] and rest.done == [made["a3"].record_id]


def test_a_record_whose_replay_raises_stays(tmp_path):
    store = QuarantineStore(tmp_path)
    ok = add(store, args=(1, 0))
    bad = add(store, args=(2, 0))
    result = store.release([ok.record_id, bad.record_id], replay=Recorder(fail_on={2}))
    assert result.done == [ok.record_id] and result.results == [("replayed", (1, 0))]
    assert result.failed == {bad.record_id: "replay raised ValueError: cannot replay 2"}
    assert not result.ok
    assert store.list() == [bad]
    assert (tmp_path / f"{bad.record_id}.pkl").exists()
    assert store.release(bad.record_id, replay=Recorder()).done == [bad.record_id]
    assert list(tmp_path.iterdir()) == []


def test_a_selection_is_required(tmp_path):
    store = QuarantineStore(tmp_path)
    rec = add(store)
    msg = re.escape("give record ids or a filter (operation, since, until)")
    with pytest.raises(QuarantineError, match=msg):
        store.release(replay=Recorder())
    with pytest.raises(QuarantineError, match=msg):
        store.discard()
    with pytest.raises(QuarantineError, match=msg):
        store.discard([])
    with pytest.raises(QuarantineError, match="not both"):
        store.discard([rec.record_id], operation="op")
    assert store.list() == [rec]


def test_a_record_removed_by_another_process_is_already_gone(tmp_path):
    store = QuarantineStore(tmp_path)
    other = QuarantineStore(tmp_path)  # e.g. the dashboard of another process
    first = add(store, args=(1, 0))
    second = add(store, args=(2, 0))
    calls = []

    def replay(fn, args, kwargs):
        calls.append(args)
        assert other.discard(second.record_id).done == [second.record_id]
        return "ok"

    result = store.release(operation="op", replay=replay)
    assert calls == [(1, 0)]
    assert [r.record_id for r in result.selected] == [first.record_id, second.record_id]
    assert result.done == [first.record_id]
    assert result.failed == {second.record_id: "already gone"}
    assert store.discard(first.record_id).failed == {first.record_id: "no such record"}


def test_two_processes_releasing_the_same_records_replay_each_once(tmp_path):
    directory = tmp_path / "q"
    store = QuarantineStore(directory)
    ids = [add(store, "race", args=(i, 0)).record_id for i in range(150)]
    child = """
        import json, os, sys
        from tokengate.guard.quarantine import QuarantineStore
        store = QuarantineStore(sys.argv[1])
        log = open(sys.argv[2], "w")
        def replay(fn, args, kwargs):
            log.write(f"{args[0]}\\n")
            log.flush()
            return fn(*args, **kwargs)
        print("ready", flush=True)
        sys.stdin.readline()
        r = store.release(operation="race", replay=replay)
        print("RESULT " + json.dumps({"done": r.done, "failed": r.failed}), flush=True)
    """
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(child),
                str(directory),
                str(tmp_path / f"{n}.log"),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        for n in range(2)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == "ready\n"
        for p in procs:  # let both go at once
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        (line,) = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        results.append(json.loads(line[len("RESULT ") :]))
    done = [set(r["done"]) for r in results]
    assert not done[0] & done[1]
    assert done[0] | done[1] == set(ids)
    for r in results:
        assert set(r["failed"].values()) <= {"already gone"}
    replayed = [int(x) for n in range(2) for x in (tmp_path / f"{n}.log").read_text().split()]
    assert sorted(replayed) == list(range(150))  # every call exactly once
    assert list(directory.iterdir()) == []


def test_hooks_get_audit_dicts_and_their_errors_are_logged(tmp_path, clock, caplog):
    caplog.set_level(logging.INFO, logger="tokengate.guard")
    store = QuarantineStore(tmp_path)
    a = add(store, "a", args=(1, 0))
    b = add(store, "a", args=(threading.Lock(), 0))
    seen: list[dict] = []

    def bad_hook(audit):
        audit["action"] = "tampered"
        raise RuntimeError("hook broke")

    store.on_action.extend([bad_hook, seen.append])
    clock.now = 1_800_000_123.0
    store.release(operation="a", replay=Recorder(), dry_run=True)
    store.release(operation="a", replay=Recorder())
    store.discard([b.record_id])
    assert [(e["action"], e["dry_run"]) for e in seen] == [
        ("release", True),
        ("release", False),
        ("discard", False),
    ]
    dry, real, disc = seen
    assert dry["time"] == pytest.approx(1_800_000_123.0)
    assert dry["records"] == [a.record_id, b.record_id] and dry["done"] == [a.record_id]
    assert list(dry["failed"]) == [b.record_id]
    assert dry["filter"] == {"record_ids": None, "operation": "a", "since": None, "until": None}
    assert real["done"] == [a.record_id] and list(real["failed"]) == [b.record_id]
    assert disc["records"] == [b.record_id] and disc["done"] == [b.record_id]
    assert disc["failed"] == {} and disc["filter"]["record_ids"] == [b.record_id]
    json.dumps(seen)  # plain data
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 3 and all("on_action hook" in r.getMessage() for r in errors)
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("quarantine release (dry run)" in m and "1 done" in m for m in infos)
    assert any(m.startswith("quarantine discard in") for m in infos)


def test_a_released_call_runs_as_a_new_token(tmp_path, make_coord):
    store = QuarantineStore(tmp_path)
    rec = add(store, "qtest.double", double, (21,), {}, token_id=3)
    make_coord(cores=1, workers_per_core=1)
    result = store.release(rec.record_id, replay=lambda fn, args, kwargs: fn(*args, **kwargs))
    (token,) = result.results
    assert isinstance(token, TaskToken)
    assert token.get(timeout=20) == 42
    assert token.operation_type == "qtest.double"
    assert store.list() == []


# -- summaries and the default directory ----------------------------------------------------


class Hostile:
    touched: list[str] = []

    def __repr__(self):
        Hostile.touched.append("repr")
        raise AssertionError("repr called")

    def __len__(self):
        Hostile.touched.append("len")
        raise AssertionError("len called")

    def __getattr__(self, name):
        Hostile.touched.append(name)
        raise AssertionError(f"getattr {name}")


class SneakyList(list):
    def __len__(self):
        Hostile.touched.append("sub-len")
        return 0


def test_summaries_are_short_safe_and_run_no_user_code():
    Hostile.touched.clear()
    text = summarize_arguments(
        (Hostile(), SneakyList([1]), "password123", b"\x00" * 10, 10**40, None, True, 1.5),
        {"n": 5, "weird key": {}, "h": Hostile()},
    )
    assert text == (
        "args=(Hostile, SneakyList, str[11], bytes[10], int(133 bits), None, True, 1.5) "
        "kwargs={n: 5, 'weird key': dict[0], h: Hostile}"
    )
    assert Hostile.touched == []
    assert "password" not in text
    big = summarize_arguments(tuple(range(1_000_000)), dict.fromkeys(map(str, range(50_000))))
    assert len(big) <= 200
    assert "more" in big and big.startswith("args=(0, 1, 2")
    assert len(summarize_arguments((1,), {}, limit=40)) <= 40
    assert summarize_arguments(Hostile(), Hostile()) == "args=Hostile kwargs=Hostile"
    assert Hostile.touched == []


def test_default_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENGATE_QUARANTINE_DIR", str(tmp_path / "custom"))
    assert default_directory() == tmp_path / "custom"
    assert QuarantineStore().directory == tmp_path / "custom"
    monkeypatch.delenv("TOKENGATE_QUARANTINE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_directory() == tmp_path / "xdg" / "tokengate" / "quarantine"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    assert default_directory() == Path.home() / ".local" / "share" / "tokengate" / "quarantine"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert default_directory() == (
        Path.home() / "Library" / "Application Support" / "tokengate" / "quarantine"
    )
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert default_directory() == tmp_path / "local" / "tokengate" / "quarantine"


# -- the CLI --------------------------------------------------------------------------------


def test_parse_time():
    now = 1_800_000_000.0
    assert _cli.parse_time("1764583200") == 1764583200.0
    assert _cli.parse_time("1764583200.5") == 1764583200.5
    assert _cli.parse_time("10m", now=now) == now - 600
    assert _cli.parse_time("2h", now=now) == now - 7200
    assert _cli.parse_time("3d", now=now) == now - 3 * 86400
    assert _cli.parse_time("1.5s", now=now) == now - 1.5
    assert _cli.parse_time("2026-12-01T10:00") == dt.datetime(2026, 12, 1, 10, 0).timestamp()
    utc = dt.datetime(2026, 12, 1, 10, 0, tzinfo=dt.UTC).timestamp()
    assert _cli.parse_time("2026-12-01T10:00Z") == utc
    assert _cli.parse_time("2026-12-01T11:00+01:00") == utc
    for bad in ("yesterday", "nan", "inf", "10x", ""):
        with pytest.raises(ValueError):
            _cli.parse_time(bad)


def test_cli_list_and_show(tmp_path, capsys):
    store = QuarantineStore(tmp_path)
    a = add(store, "alpha", args=(1, 0))
    b = add(store, "beta", args=(threading.Lock(),))
    assert cli(["quarantine", "list", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(a.record_id) and "alpha" in out[0] and "  replayable" in out[0]
    assert out[1].startswith(b.record_id) and "NOT replayable" in out[1]
    assert out[2] == f"2 quarantined call(s) in {tmp_path}"

    assert cli(["quarantine", "list", "--dir", str(tmp_path), "--operation", "beta", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [b.to_dict()]
    assert cli(["quarantine", "list", "--dir", str(tmp_path), "--since", "1h", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    assert cli(["quarantine", "list", "--dir", str(tmp_path), "--until", "1h", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []

    assert cli(["quarantine", "show", a.record_id, "--dir", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == a.to_dict()
    assert cli(["quarantine", "show", b.record_id, "--dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert f"record:         {b.record_id}" in text
    assert "replayable:     no: arguments cannot be pickled" in text

    assert (
        cli(["quarantine", "show", "00000000000000000009-1-1-abcdef", "--dir", str(tmp_path)]) == 1
    )
    err = capsys.readouterr().err
    assert err.startswith("tokengate: error: no quarantine record")


def test_cli_bad_usage_exits_2(tmp_path, capsys):
    store = QuarantineStore(tmp_path)
    rec = add(store)
    for argv in (
        ["quarantine"],
        ["quarantine", "release", "--dir", str(tmp_path)],
        ["quarantine", "discard", rec.record_id, "--operation", "op", "--dir", str(tmp_path)],
        ["quarantine", "list", "--since", "yesterday", "--dir", str(tmp_path)],
        ["quarantine", "show", "--dir", str(tmp_path)],
    ):
        with pytest.raises(SystemExit) as exc:
            cli(argv)
        assert exc.value.code == 2, argv
    assert "not a time: 'yesterday'" in capsys.readouterr().err
    assert store.list() == [rec]


def test_cli_discard_dry_run_then_for_real(tmp_path, capsys):
    store = QuarantineStore(tmp_path)
    a = add(store, "a")
    b = add(store, "b")
    before = snapshot(tmp_path)
    assert (
        cli(["quarantine", "discard", "--operation", "a", "--dry-run", "--dir", str(tmp_path)]) == 0
    )
    assert capsys.readouterr().out.splitlines() == [
        f"would discard {a.record_id}",
        "dry run: 1 would be discarded, 0 not",
    ]
    assert snapshot(tmp_path) == before
    assert cli(["quarantine", "discard", a.record_id, "--dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"discarded {a.record_id}"
    assert store.list() == [b]
    assert cli(["quarantine", "discard", a.record_id, "--dir", str(tmp_path)]) == 1
    assert f"not discarded {a.record_id}: no such record" in capsys.readouterr().err


def test_cli_release_replays_through_a_coordinator(tmp_path, capsys):
    store = QuarantineStore(tmp_path / "q")
    marker = tmp_path / "marker.txt"
    ok = add(store, "qtest.write_marker", RELEASE_MARKER, (str(marker), "hello"), {})
    failing = add(store, "qtest.boom", RELEASE_BOOM, ("kaput",), {})
    stuck = add(store, "qtest.stuck", double, (threading.Lock(),), {})
    d = ["--dir", str(tmp_path / "q")]

    assert cli(["quarantine", "release", ok.record_id, "--dry-run", *d]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"would release {ok.record_id} (qtest.write_marker)",
        "dry run: 1 would be released, 0 not",
    ]
    assert not marker.exists() and len(store) == 3

    assert cli(["quarantine", "release", ok.record_id, *d]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^released {ok.record_id} -> token \d+ COMPLETED$", out, re.M), out
    assert marker.read_text() == "hello"
    assert [r.record_id for r in store.list()] == [failing.record_id, stuck.record_id]

    # A replayed token that fails, and a record that cannot be replayed: exit status 1.
    assert cli(["quarantine", "release", failing.record_id, stuck.record_id, *d]) == 1
    captured = capsys.readouterr()
    assert re.search(
        rf"^released {failing.record_id} -> token \d+ FAILED: ValueError: kaput$",
        captured.out,
        re.M,
    ), captured.out
    assert f"not released {stuck.record_id}: not replayable" in captured.err
    assert store.list() == [stuck]


def test_cli_release_in_a_fresh_process_imports_from_path(tmp_path):
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "qjobs_cli.py").write_text(
        textwrap.dedent(
            """
            from tokengate import task_token_guard

            @task_token_guard(operation_type="qjobs.write")
            def write(path, text):
                with open(path, "w") as f:
                    f.write(text)
                return len(text)

            class Releasable:
                def __init__(self, target):
                    self.target = target
                def options(self, **kw):
                    assert kw == {"quarantine": False}, kw
                    return self.target
                def __call__(self, *args, **kwargs):
                    raise AssertionError("not through options()")

            releasable = Releasable(write)
            """
        )
    )
    directory = tmp_path / "q"
    marker = tmp_path / "marker.txt"
    made = run_py(
        """
        import sys, qjobs_cli
        from tokengate.guard.quarantine import QuarantineStore
        rec = QuarantineStore(sys.argv[1]).add(
            5, "qjobs.write", qjobs_cli.releasable, (sys.argv[2], "from the past"), {},
            predicted=9.0, baseline=1.0, deviation=9.0, threshold=4.0, reason="spike")
        print("RESULT", rec.record_id)
        """,
        str(directory),
        str(marker),
        env=child_env(str(jobs)),
    )
    assert made.returncode == 0, made.stderr
    (record_id,) = re.findall(r"^RESULT (\S+)$", made.stdout, re.M)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    release = """
        import argparse, sys
        from tokengate.cli import quarantine as _cli
        parser = argparse.ArgumentParser(prog="tokengate")
        _cli.add_quarantine_parser(parser.add_subparsers(dest="command"))
        args = parser.parse_args(sys.argv[1:])
        sys.exit(args.handler(args))
    """
    argv = ["quarantine", "release", record_id, "--dir", str(directory)]
    without_path = run_py(release, *argv, cwd=elsewhere)
    assert without_path.returncode == 1
    assert "No module named 'qjobs_cli'" in without_path.stderr
    assert not marker.exists() and len(QuarantineStore(directory)) == 1  # it stayed

    proc = run_py(release, *argv, "--path", str(jobs), cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert re.search(rf"^released {record_id} -> token \d+ COMPLETED$", proc.stdout, re.M)
    assert marker.read_text() == "from the past"
    assert QuarantineStore(directory).list() == []


def test_cli_release_of_a_real_guarded_function(tmp_path, capsys):
    try:
        double.options(quarantine=False)
    except InvalidOption:
        pytest.skip("this build's fn.options() does not take quarantine=False yet")
    store = QuarantineStore(tmp_path)
    rec = add(store, "qtest.double", double, (4,), {})
    assert (
        cli(["quarantine", "release", "--operation", "qtest.double", "--dir", str(tmp_path)]) == 0
    )
    assert re.search(
        rf"^released {rec.record_id} -> token \d+ COMPLETED$", capsys.readouterr().out, re.M
    )
    assert store.list() == []


def test_action_result_shape():
    r = ActionResult("discard", False)
    assert r.selected == [] and r.done == [] and r.failed == {} and r.results == [] and r.ok
