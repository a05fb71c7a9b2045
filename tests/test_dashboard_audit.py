"""The dashboard's append-only audit log (tokengate.dashboard.audit)."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading

import pytest

pytest.importorskip("flask_socketio")

from tokengate.dashboard import AuditLog
from tokengate.dashboard import audit as audit_mod
from tokengate.errors import ConfigurationError


def test_a_record_has_every_field_and_is_one_json_line(tmp_path):
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, clock=lambda: 1_796_137_445.1234) as log:
        rec = log.record(
            "pause", "ok", user="alice", role="operator", client="127.0.0.1", detail="paused"
        )
    assert rec == {
        "time": "2026-12-01T15:04:05.123Z",
        "ts": 1796137445.123,
        "user": "alice",
        "role": "operator",
        "client": "127.0.0.1",
        "action": "pause",
        "target": None,
        "outcome": "ok",
        "detail": "paused",
    }
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 2
    assert json.loads(lines[0]) == rec


def test_the_file_is_private_and_opened_for_appending(tmp_path):
    path = tmp_path / "sub" / "dir" / "audit.jsonl"
    with AuditLog(path) as log:
        log.record("login", "ok")
        fd = log._fd
        assert fd is not None
        import fcntl

        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    # a second log on the same file appends: nothing written before is lost
    with AuditLog(path) as log:
        log.record("logout", "ok")
    assert [r["action"] for r in AuditLog(path).tail(10)] == ["login", "logout"]


def test_an_existing_file_open_to_others_is_made_private(tmp_path, caplog):
    path = tmp_path / "audit.jsonl"
    path.write_text("")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, "tokengate.dashboard"), AuditLog(path):
        pass
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "made it 0600" in caplog.text


def test_a_symlink_or_a_directory_is_refused(tmp_path):
    target = tmp_path / "real.jsonl"
    target.write_text("")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    with pytest.raises(ConfigurationError, match="cannot open the audit log"):
        AuditLog(link)
    with pytest.raises(ConfigurationError, match="cannot open the audit log"):
        AuditLog(tmp_path)


def test_concurrent_writers_produce_whole_lines(tmp_path):
    path = tmp_path / "audit.jsonl"
    logs = [AuditLog(path), AuditLog(path)]  # two descriptors, as two processes would have
    start = threading.Barrier(8)

    def write(i: int) -> None:
        start.wait()
        for j in range(200):
            logs[i % 2].record("kill", "ok", user=f"u{i}", target=str(j), detail="x" * 900)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for log in logs:
        log.close()
    lines = path.read_bytes().splitlines()
    assert len(lines) == 8 * 200
    seen = set()
    for line in lines:
        rec = json.loads(line)  # every line is a whole record
        seen.add((rec["user"], rec["target"]))
    assert len(seen) == 8 * 200


def test_tail_returns_the_last_records_oldest_first(tmp_path):
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        for i in range(30):
            log.record("kill", "ok", target=str(i))
        assert [r["target"] for r in log.tail(3)] == ["27", "28", "29"]
        assert [r["target"] for r in log.recent(3)] == ["29", "28", "27"]
        assert len(log.tail(100)) == 30
        assert log.tail(0) == []
        with pytest.raises(ConfigurationError):
            log.tail(-1)


def test_tail_reads_more_than_its_first_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(audit_mod, "_TAIL_CHUNK", 256)
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        for i in range(50):
            log.record("kill", "ok", target=str(i))
        assert [r["target"] for r in log.tail(40)] == [str(i) for i in range(10, 50)]


def test_a_corrupt_line_is_skipped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        log.record("pause", "ok")
    with open(path, "ab") as f:
        f.write(b'{"truncated": \n')
        f.write(b"[1, 2]\n")
    with AuditLog(path) as log:
        log.record("resume", "ok")
        with caplog.at_level(logging.WARNING, "tokengate.dashboard"):
            caplog.clear()
            records = log.tail(10)
    assert [r["action"] for r in records] == ["pause", "resume"]
    assert "skipped 2 corrupt line(s)" in caplog.text


def test_long_fields_are_cut(tmp_path):
    with AuditLog(tmp_path / "a.jsonl") as log:
        rec = log.record("kill", "ok", user="u" * 1000, target="t" * 1000, detail="d" * 5000)
    assert len(rec["user"]) == audit_mod.FIELD_LIMIT and rec["user"].endswith("…")
    assert len(rec["target"]) == audit_mod.FIELD_LIMIT
    assert len(rec["detail"]) == audit_mod.DETAIL_LIMIT
    line = (tmp_path / "a.jsonl").read_bytes()
    assert len(line) < 4096  # well under the size an O_APPEND write() keeps whole


def test_newlines_in_fields_cannot_forge_records(tmp_path):
    path = tmp_path / "a.jsonl"
    with AuditLog(path) as log:
        log.record("block", "ok", target='op\n{"action": "forged"}')
    lines = path.read_bytes().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["target"] == 'op\n{"action": "forged"}'


def test_an_unknown_outcome_is_refused(tmp_path):
    with AuditLog(tmp_path / "a.jsonl") as log, pytest.raises(ConfigurationError):
        log.record("pause", "maybe")


def test_a_closed_log_does_not_raise(tmp_path, caplog):
    log = AuditLog(tmp_path / "a.jsonl")
    log.close()
    log.close()
    with caplog.at_level(logging.ERROR, "tokengate.dashboard"):
        log.record("pause", "ok")
    assert "is closed" in caplog.text


def test_default_path(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENGATE_AUDIT_LOG", str(tmp_path / "x.jsonl"))
    assert audit_mod.default_path() == tmp_path / "x.jsonl"
    monkeypatch.delenv("TOKENGATE_AUDIT_LOG")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert audit_mod.default_path() == tmp_path / "data" / "tokengate" / "audit.jsonl"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert audit_mod.default_path() == tmp_path / "home" / ".local/share/tokengate/audit.jsonl"


def test_a_missing_file_has_no_tail(tmp_path):
    assert audit_mod.read_tail(tmp_path / "none.jsonl", 5) == []
