"""``tokengate -v/-vv``: how much the command logs to stderr (the library never configures
logging itself; only the command line does).

Each run is a fresh ``python -m tokengate`` subprocess, so the logging configuration of one
run cannot leak into another or into this test process.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import defaultdict

import pytest

from _support import child_json, run_child
from tokengate.cli import _verbosity, build_parser
from tokengate.observe.events import EVENT_KINDS

#: One record of the command's handler: ``12:34:56.789 LEVEL logger.name: message``.
RECORD = re.compile(
    r"^\d\d:\d\d:\d\d\.\d{3} (?P<level>[A-Z]+) (?P<name>tokengate[\w.]*): (?P<msg>.*)$"
)
#: The lifecycle event lines of ``log_events``: ``completed token=12 op=sort_list ...``.
EVENT = re.compile(r"^(?P<kind>[a-z_]+) token=(?P<token>\d+|-) op=\S+")
KINDS = frozenset(EVENT_KINDS)
FINAL = frozenset({"completed", "failed", "killed", "timed_out", "quarantined", "refused"})

DEMO = ("demo", "--seconds", "0.3", "--cores", "1", "--workers-per-core", "2", "--seed", "5")


def _cli(*args: str, timeout: float = 120.0) -> tuple[int, str, str]:
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "tokengate", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"tokengate {' '.join(args)} hung:\n{exc.stderr}")
    return proc.returncode, proc.stdout, proc.stderr


def _records(stderr: str) -> list[tuple[str, str, str]]:
    out = []
    for line in stderr.splitlines():
        m = RECORD.match(line)
        if m:
            out.append((m["level"], m["name"], m["msg"]))
    return out


def _levels(stderr: str) -> set[str]:
    return {level for level, _, _ in _records(stderr)}


def _demo(*before: str, after: tuple[str, ...] = ()) -> tuple[list[tuple[str, str, str]], dict]:
    """Runs a short demo with ``before`` ahead of the subcommand and ``after`` behind it."""
    rc, out, err = _cli(*before, *DEMO, "--json", "--no-progress", *after)
    assert rc == 0, err
    report = json.loads(out)
    assert report["submitted"] > 0, report
    return _records(err), report


def test_verbosity_counts_before_and_after_the_subcommand():
    parser = build_parser()
    assert _verbosity(parser.parse_args(["demo"])) == 0
    assert _verbosity(parser.parse_args(["-v", "demo"])) == 1
    assert _verbosity(parser.parse_args(["demo", "-vv"])) == 2
    assert _verbosity(parser.parse_args(["-v", "demo", "--verbose"])) == 2
    assert _verbosity(parser.parse_args(["--verbose", "--verbose", "topology", "-v"])) == 3
    assert _verbosity(parser.parse_args(["history", "dump", "-o", "x", "-v"])) == 1
    assert _verbosity(parser.parse_args(["quarantine", "list", "-vv"])) == 2


def test_default_is_quiet():
    rc, out, err = _cli(*DEMO, "--json", "--no-progress")
    assert rc == 0, err
    assert json.loads(out)["submitted"] > 0
    # whatever the format: no info or debug output at all, in particular not the demo's
    assert not re.search(r"\b(INFO|DEBUG)\b", err), err
    assert "demo: 1 cores" not in err and "token=" not in err, err
    rc, _, err = _cli("topology")
    assert rc == 0 and not re.search(r"\b(INFO|DEBUG)\b", err), err


def test_v_shows_info_but_no_debug():
    records, _ = _demo("-v")
    levels = {r[0] for r in records}
    assert "INFO" in levels, records
    assert any(msg.startswith("demo: 1 cores") for _, _, msg in records), records
    assert "DEBUG" not in levels, records
    assert not [r for r in records if r[1] == "tokengate.events"], records


@pytest.mark.parametrize(
    "before,after",
    [(("-vv",), ()), ((), ("-vv",)), (("-v",), ("--verbose",))],
    ids=["before", "after", "split"],
)
def test_vv_shows_debug(before, after):
    records, _ = _demo(*before, after=after)
    levels = {r[0] for r in records}
    assert {"INFO", "DEBUG"} <= levels, records


def test_vv_topology_logs_the_detection():
    rc, out, err = _cli("-vv", "topology", "--json")
    assert rc == 0, err
    json.loads(out)  # logging goes to stderr only
    assert any(
        level == "DEBUG" and msg.startswith("detected topology") for level, _, msg in _records(err)
    ), err
    rc, _, err = _cli("topology", "-v")
    assert rc == 0 and "DEBUG" not in _levels(err), err


def test_vv_demo_logs_every_lifecycle_event():
    # NEEDS THE LEAD: python/tokengate/demo.py must subscribe log_events on the demo's
    # coordinator when tokengate.events is enabled for DEBUG (which is what -vv does); this is
    # the one assertion of this file that fails without that hook.
    records, report = _demo("-vv")
    lines = [msg for level, name, msg in records if name == "tokengate.events"]
    assert lines, "no lifecycle event lines at -vv (is the demo.py log_events hook in?)"
    per_token: dict[str, list[str]] = defaultdict(list)
    for line in lines:
        m = EVENT.match(line)
        assert m and m["kind"] in KINDS, line
        assert all(r[0] == "DEBUG" for r in records if r[1] == "tokengate.events")
        per_token[m["token"]].append(m["kind"])
    assert {"created", "admitted", "started", "completed"} <= {
        k for ks in per_token.values() for k in ks
    }
    # one created and exactly one final line for every token the demo made
    tokens = {t: ks for t, ks in per_token.items() if t != "-"}
    assert len(tokens) >= report["submitted"], (len(tokens), report["submitted"])
    for token, kinds in tokens.items():
        assert kinds[0] == "created", (token, kinds)
        assert [k for k in kinds if k in FINAL] == [kinds[-1]], (token, kinds)


def test_the_library_alone_configures_no_logging(tmp_path):
    rc, out, err = run_child(
        tmp_path,
        """
        import json, logging
        import tokengate
        from tokengate import OperationsCoordinator

        with OperationsCoordinator(cores=1, workers_per_core=1) as coord:
            coord.events.log_events()
            coord.submit(lambda: 1).get(timeout=20)
        tg = logging.getLogger("tokengate")
        print("RESULT " + json.dumps({
            "root": [type(h).__name__ for h in logging.getLogger().handlers],
            "tokengate": [type(h).__name__ for h in tg.handlers],
            "level": tg.level,
        }))
        """,
    )
    assert rc == 0, err
    res = child_json(out)
    assert res == {"root": [], "tokengate": ["NullHandler"], "level": 0}, res
    assert err == "", err  # nothing printed: DEBUG event lines go nowhere by default
