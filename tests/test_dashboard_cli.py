"""The dashboard's command line: ``tokengate dashboard``, ``tokengate dashboard hash-password``
and ``tokengate audit``.

``tokengate dashboard`` runs for real as a subprocess (``python -m tokengate``): the test reads
its printed URL from stdout (lines read with a deadline, never a sleep), asks the server over
HTTP, then sends SIGINT or SIGTERM and checks that it exits 0 and stops listening.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("flask")
pytest.importorskip("argon2")

from _support import SAFETY, wait_until
from tokengate import ConfigurationError, CoordinatorNotRunning, OperationsCoordinator, cli
from tokengate.dashboard import AuditLog, hash_password, verify_password
from tokengate.demo import format_report, run_workload

URL = re.compile(r"https?://[^\s/]+")
PASSWORD = re.compile(r"log in as 'admin' with password (\S+)")
COMPLETED_STRING_OPS = re.compile(
    rb'^tokengate_tokens_total\{[^}]*operation="string_ops",outcome="completed"\} [1-9]', re.M
)


def _run(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> tuple[int, str, str]:
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "tokengate", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"tokengate {' '.join(args)} hung:\n{exc.stderr}")
    return proc.returncode, proc.stdout, proc.stderr


# --------------------------------------------------------------------------------------------
# hash-password
# --------------------------------------------------------------------------------------------


def test_hash_password_from_stdin_gives_a_hash_verify_password_accepts():
    rc, out, err = _run("dashboard", "hash-password", "--password-stdin", stdin="s3cret pass\n")
    assert rc == 0, err
    digest = out.strip()
    assert digest.startswith("$argon2id$"), out
    assert ":" not in digest and ";" not in digest  # fits the name:role:hash env format
    assert verify_password(digest, "s3cret pass")
    assert not verify_password(digest, "s3cret pass\n")
    assert not verify_password(digest, "other")


def test_hash_password_refuses_an_empty_password_from_stdin():
    for stdin in ("\n", ""):
        rc, out, err = _run("dashboard", "hash-password", "--password-stdin", stdin=stdin)
        assert rc == 2 and out == "", (out, err)
        assert "empty password" in err, err


def test_hash_password_refuses_a_password_too_long_to_verify():
    rc, out, err = _run("dashboard", "hash-password", "--password-stdin", stdin="x" * 5000 + "\n")
    assert rc == 2 and out == "", (out, err)
    assert "at most" in err, err


def _prompted(monkeypatch, answers: list[str]) -> list[str]:
    prompts: list[str] = []

    def fake_getpass(prompt: str = "Password: ") -> str:
        prompts.append(prompt)
        return answers.pop(0)

    monkeypatch.setattr("getpass.getpass", fake_getpass)
    return prompts


def test_hash_password_prompts_twice(monkeypatch, capsys):
    prompts = _prompted(monkeypatch, ["correct horse", "correct horse"])
    assert cli.main(["dashboard", "hash-password"]) == 0
    assert len(prompts) == 2
    assert verify_password(capsys.readouterr().out.strip(), "correct horse")


def test_hash_password_refuses_a_mismatch(monkeypatch, capsys):
    _prompted(monkeypatch, ["correct horse", "correct hose"])
    assert cli.main(["dashboard", "hash-password"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "do not match" in captured.err


def test_hash_password_refuses_an_empty_prompted_password(monkeypatch, capsys):
    prompts = _prompted(monkeypatch, [""])
    assert cli.main(["dashboard", "hash-password"]) == 2
    assert len(prompts) == 1  # not asked again for nothing
    captured = capsys.readouterr()
    assert captured.out == "" and "empty password" in captured.err


# --------------------------------------------------------------------------------------------
# tokengate audit
# --------------------------------------------------------------------------------------------


@pytest.fixture
def audit_file(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.record(action="login", outcome="failed", user="mallory", client="10.0.0.9", detail="x")
    log.record(action="login", outcome="ok", user="alice", role="admin", client="127.0.0.1")
    log.record(
        action="kill",
        outcome="failed",
        user="alice",
        role="admin",
        client="127.0.0.1",
        target="42",
        detail="token 42 is not queued here",
    )
    log.record(action="drain", outcome="refused", user="bob", role="viewer", client="127.0.0.1")
    log.record(
        action="set_limit",
        outcome="ok",
        user="alice",
        role="admin",
        client="127.0.0.1",
        target="fibonacci",
        detail="max_concurrency=2",
    )
    log.close()
    return path


def _lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.strip()]


def test_audit_prints_aligned_lines_oldest_first(audit_file):
    rc, out, err = _run("audit", "--file", str(audit_file))
    assert rc == 0, err
    header, *rows = _lines(out)
    assert header.split() == [
        "TIME",
        "USER",
        "ROLE",
        "CLIENT",
        "ACTION",
        "TARGET",
        "OUTCOME",
        "DETAIL",
    ]
    assert [row.split()[4] for row in rows] == ["login", "login", "kill", "drain", "set_limit"]
    # aligned: every column starts at the same offset on every line
    for column in ("USER", "ACTION", "OUTCOME", "DETAIL"):
        start = header.index(column)
        for row in rows:
            assert row[start - 2 : start] == "  " and row[start] != " ", (column, row)
    assert rows[0].split()[1:4] == ["mallory", "-", "10.0.0.9"]  # null role shown as -
    assert rows[2].endswith("token 42 is not queued here")
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", rows[0])


def test_audit_filters_and_limit(audit_file):
    def actions(*args: str) -> list[str]:
        rc, out, err = _run("audit", "--file", str(audit_file), *args)
        assert rc == 0, err
        return [row.split()[4] for row in _lines(out)[1:]]

    assert actions("--user", "alice") == ["login", "kill", "set_limit"]
    assert actions("--action", "login") == ["login", "login"]
    assert actions("--outcome", "failed") == ["login", "kill"]
    assert actions("--user", "alice", "--outcome", "ok") == ["login", "set_limit"]
    assert actions("--limit", "2") == ["drain", "set_limit"]  # the newest two, newest last
    assert actions("--user", "alice", "--limit", "1") == ["set_limit"]
    rc, out, err = _run("audit", "--file", str(audit_file), "--user", "nobody")
    assert rc == 0 and out == "" and "no matching audit records" in err
    rc, _, err = _run("audit", "--file", str(audit_file), "--outcome", "maybe")
    assert rc == 2 and "invalid choice" in err


def test_audit_json_lines(audit_file):
    rc, out, err = _run("audit", "--file", str(audit_file), "--json", "--action", "kill")
    assert rc == 0, err
    records = [json.loads(line) for line in _lines(out)]
    assert len(records) == 1
    (record,) = records
    assert {
        k: record[k] for k in ("user", "role", "client", "action", "target", "outcome", "detail")
    } == {
        "user": "alice",
        "role": "admin",
        "client": "127.0.0.1",
        "action": "kill",
        "target": "42",
        "outcome": "failed",
        "detail": "token 42 is not queued here",
    }
    assert isinstance(record["ts"], float) and record["time"].endswith("Z")


def test_audit_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    rc, out, err = _run("audit", "--file", str(missing))
    assert rc == 1 and out == ""
    assert f"there is no audit log at {missing}" in err


def test_audit_default_path_comes_from_the_environment(audit_file):
    env = {**os.environ, "TOKENGATE_AUDIT_LOG": str(audit_file)}
    rc, out, err = _run("audit", "--json", env=env)
    assert rc == 0, err
    assert len(_lines(out)) == 5


def test_audit_escapes_control_characters_and_skips_garbage(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.record(action="login", outcome="failed", user="\x1b[31mevil\x1b[0m", client="127.0.0.1")
    log.close()
    with path.open("a", encoding="utf-8") as f:
        f.write("not json\n[1, 2]\n")
    rc, out, err = _run("audit", "--file", str(path))
    assert rc == 0, err
    assert "\x1b" not in out and "\\x1b[31mevil" in out
    assert "skipped 2 line(s)" in err


# --------------------------------------------------------------------------------------------
# tokengate.demo.run_workload, what --demo runs
# --------------------------------------------------------------------------------------------


def test_run_workload_on_a_running_coordinator():
    with OperationsCoordinator(cores=1, workers_per_core=2) as coord:
        report = run_workload(coord, 0.3, seed=11)
        assert report["ok"], report["problems"]
        assert report["submitted"] > 0 and report["unresolved"] == 0
        assert report["refused"] == {}
        assert report["config"]["seed"] == 11 and report["config"]["seconds"] == 0.3
        assert coord.running  # left running
        assert coord.stats()["completed"] + coord.stats()["failed"] == report["resolved"]
        format_report(report)


def test_run_workload_stops_when_the_event_is_set():
    stop = threading.Event()
    with OperationsCoordinator(cores=1, workers_per_core=2) as coord:
        stop.set()
        report = run_workload(coord, stop=stop)
        assert report["submitted"] == 0 and report["ok"], report
        assert report["config"]["seconds"] is None
        assert "run until stopped" in format_report(report)

        stop = threading.Event()
        done = threading.Event()
        result: dict = {}

        def run() -> None:
            result.update(run_workload(coord, stop=stop, max_in_flight=4))
            done.set()

        thread = threading.Thread(target=run)
        thread.start()
        assert wait_until(lambda: coord.stats()["completed"] > 0)
        assert not done.is_set()
        stop.set()
        assert done.wait(SAFETY)
        thread.join(SAFETY)
        assert result["submitted"] > 0 and result["unresolved"] == 0, result


def test_run_workload_counts_refusals_while_admission_is_closed():
    with OperationsCoordinator(cores=1, workers_per_core=2) as coord:
        coord.drain()
        report = run_workload(coord, 0.25)
        assert report["submitted"] == 0
        assert report["refused"].get("AdmissionClosed", 0) > 0, report["refused"]
        coord.resume()


def test_run_workload_checks_its_arguments():
    coord = OperationsCoordinator(cores=1)
    with pytest.raises(CoordinatorNotRunning, match="not running"):
        run_workload(coord, 1)
    with coord:
        for bad in (0, -1, True, "1"):
            with pytest.raises(ConfigurationError, match="seconds"):
                run_workload(coord, bad)
        with pytest.raises(ConfigurationError, match="max_in_flight"):
            run_workload(coord, 1, max_in_flight=0)


# --------------------------------------------------------------------------------------------
# tokengate dashboard
# --------------------------------------------------------------------------------------------


class _Lines:
    """The stdout lines of a child process, read on a thread; :meth:`next` waits with a
    deadline."""

    def __init__(self, stream) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: re.Pattern[str], timeout: float = SAFETY) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no line matching {pattern.pattern!r} in time; got {self.seen}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(f"stdout closed before a match of {pattern.pattern!r}: {self.seen}")
            self.seen.append(line)
            m = pattern.search(line)
            if m:
                return m


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TOKENGATE_DASHBOARD_USERS", "TOKENGATE_DASHBOARD_USERS_FILE")
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


SIGINT_IGNORED = signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def start_dashboard(tmp_path) -> Iterator:
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str, env: dict[str, str]) -> tuple[subprocess.Popen[str], _Lines]:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tokengate",
                "dashboard",
                "--port",
                "0",
                "--cores",
                "1",
                "--workers-per-core",
                "2",
                "--audit-log",
                str(tmp_path / "audit.jsonl"),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            # A test run started in the background (a script's `pytest &`) ignores SIGINT, and
            # children inherit that; Ctrl-C is what this test sends, so restore the default.
            preexec_fn=_default_sigint if SIGINT_IGNORED else None,
        )
        procs.append(proc)
        return proc, _Lines(proc.stdout)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=SAFETY)


def _get(url: str, *, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=SAFETY) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _stops_cleanly(proc: subprocess.Popen[str], url: str, sig: int) -> str:
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=SAFETY)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"tokengate dashboard did not stop on signal {sig}")
    assert proc.returncode == 0, err
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=5):
        pass
    return err


def test_dashboard_demo_with_a_generated_password(start_dashboard):
    proc, lines = start_dashboard("--demo", "--seed", "7", env=_env())
    url = lines.wait_for(URL).group(0)
    password = lines.wait_for(PASSWORD).group(1)
    assert url.startswith("http://127.0.0.1:")

    status, body = _get(url + "/healthz")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    assert _get(url + "/metrics")[0] == 401  # the metrics need a login
    assert _get(url + "/metrics", auth=("admin", "wrong"))[0] == 401

    def demo_tokens_completed() -> bool:
        status, body = _get(url + "/metrics", auth=("admin", password))
        assert status == 200, body
        # a demo operation (light, so it runs on the one core) completed tokens
        return bool(COMPLETED_STRING_OPS.search(body))

    assert wait_until(demo_tokens_completed), "the demo workload never showed up in /metrics"
    err = _stops_cleanly(proc, url, signal.SIGINT)
    assert "demo workload:" in err, err


def test_dashboard_with_configured_users_stops_on_sigterm(start_dashboard):
    users = f"ops:operator:{hash_password('pw-ops')}"
    proc, lines = start_dashboard(
        "--allowed-host", "dash.example", env=_env(TOKENGATE_DASHBOARD_USERS=users)
    )
    url = lines.wait_for(URL).group(0)
    lines.wait_for(re.compile("press Ctrl-C to stop"))
    assert not any(PASSWORD.search(line) for line in lines.seen), lines.seen
    assert _get(url + "/healthz")[0] == 200
    for host, status in (("dash.example", 200), ("evil.example", 400)):
        request = urllib.request.Request(url + "/healthz", headers={"Host": host})
        try:
            with urllib.request.urlopen(request, timeout=SAFETY) as response:
                got = response.status
        except urllib.error.HTTPError as exc:
            got = exc.code
        assert got == status, host
    assert _get(url + "/metrics", auth=("ops", "pw-ops"))[0] == 200
    _stops_cleanly(proc, url, signal.SIGTERM)


def test_dashboard_refuses_a_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, out, err = _run(
            "dashboard",
            "--port",
            str(port),
            "--cores",
            "1",
            "--audit-log",
            str(tmp_path / "audit.jsonl"),
            env=_env(),
        )
    assert rc == 1, (out, err)
    # one line saying what is wrong (not werkzeug's own message and exit)
    assert re.search(rf"^tokengate: error: .*{port}", err, re.M), err
    assert "TokenGate dashboard:" not in out


def test_dashboard_usage_errors():
    rc, _, err = _run("dashboard", "--port", "70000")
    assert rc == 2 and "0..65535" in err
    rc, _, err = _run("dashboard", "--keyfile", "k.pem")
    assert rc == 2 and "--keyfile needs --certfile" in err


def test_topology_and_help_do_not_import_flask(tmp_path):
    code = (
        "import contextlib, io, sys\n"
        "from tokengate.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['topology'])\n"
        "    for argv in (['--help'], ['dashboard', '--help'], ['audit', '--help']):\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "print(sorted(m for m in ('flask', 'flask_socketio', 'argon2') if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout
