"""The ``tokengate`` command line.

::

    tokengate [-v | -vv] topology [--json]
    tokengate [-v | -vv] demo [--seconds 20] [--workers-per-core N] [--seed S] [--json]
    tokengate [-v | -vv] dashboard [--host H] [--port P] [--demo] [--users-file F] ...
    tokengate dashboard hash-password [--password-stdin]
    tokengate audit [--file F] [--limit N] [--user U] [--action A] [--outcome O] [--json]

``-v`` / ``--verbose`` (before or after the subcommand, counted together) sends the
``tokengate`` loggers to stderr: none given, warnings and errors only; ``-v``, info; ``-vv``,
debug, which includes the lifecycle events of the demo's coordinator (one line per event on
``tokengate.events``). The library itself never configures logging; only this command does.

Each subcommand is a ``_cmd_*`` function registered in :func:`build_parser`; new ones (a future
``tokengate bench``) add a subparser there and a handler here, keeping the work itself in the
library modules.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import threading

    from tokengate import OperationsCoordinator

__all__ = ["build_parser", "main"]

logger = logging.getLogger("tokengate")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _int(text: str, noun: str = "an integer") -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {noun}: {text!r}") from None


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def _cmd_topology(args: argparse.Namespace) -> int:
    from tokengate.topology import detect

    topo = detect()
    if args.json:
        _print_json(topo.as_dict())
    else:
        print(topo.format())
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .. import bench

    info = bench.machine_info()
    print(
        f"# {info['nproc']} CPUs ({info['cpu_model']}), Python {info['python']}, "
        f"tokengate {info['tokengate']}",
        flush=True,
    )
    rows = bench.run_quick(
        args.json,
        full=args.full,
        window_seconds=args.window_seconds,
        systems=args.systems.split(",") if args.systems else None,
        progress=lambda m: print(f"... {m}", file=sys.stderr, flush=True),
    )
    print(bench.format_table(rows))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    # Imported here so that `tokengate topology` and `--help` do not load the workload.
    from tokengate.demo import format_report, run_demo

    report = run_demo(
        seconds=args.seconds,
        workers_per_core=args.workers_per_core,
        progress=not args.no_progress,
        cores=args.cores,
        seed=args.seed,
    )
    if args.json:
        _print_json(report)
    else:
        encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "")
        print(format_report(report, unicode=encoding in ("utf8", "utf8sig")))
    if report["interrupted"]:
        return 130
    return 0 if report["ok"] else 1


def _dashboard_import_error(exc: ImportError) -> int:
    if "tokengate[dashboard]" in str(exc):  # the package says so itself
        print(f"tokengate: error: {exc}", file=sys.stderr)
    else:
        print(
            f"tokengate: error: the dashboard needs its extra ({exc}): "
            "pip install 'tokengate[dashboard]'",
            file=sys.stderr,
        )
    return 1


#: The demo tasks an admin may launch from the dashboard of ``tokengate dashboard --demo``.
_DEMO_LAUNCHABLES = ("fibonacci", "prime_sieve", "sleep_io", "hash_blob", "string_ops")


def _cmd_dashboard(args: argparse.Namespace) -> int:
    """``tokengate dashboard``: a coordinator and its dashboard until Ctrl-C or SIGTERM."""
    import signal
    import threading

    if args.keyfile is not None and args.certfile is None:
        print("tokengate: error: --keyfile needs --certfile", file=sys.stderr)
        return 2
    from tokengate import OperationsCoordinator

    try:
        from tokengate.dashboard import serve
    except ImportError as exc:
        return _dashboard_import_error(exc)

    coord_kwargs: dict[str, Any] = {}
    if args.workers_per_core is not None:
        coord_kwargs["workers_per_core"] = args.workers_per_core
    if args.cores is not None:
        coord_kwargs["cores"] = args.cores
    options: dict[str, Any] = {
        "users_file": args.users_file,
        "audit_log": args.audit_log,
        "certfile": args.certfile,
        "keyfile": args.keyfile,
        "behind_proxy": args.behind_proxy,
        "allowed_origins": tuple(args.allowed_origin),
        "allowed_hosts": tuple(args.allowed_host),
    }

    # SIGTERM (a service manager, `kill`) stops the command the way Ctrl-C does.
    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous_sigterm = signal.signal(signal.SIGTERM, on_sigterm)
    coord = OperationsCoordinator(**coord_kwargs)
    stop = threading.Event()
    workload: threading.Thread | None = None
    report: dict[str, Any] = {}
    try:
        coord.start()
        if args.demo:
            _register_demo_launchables(coord)  # before serving: the page lists them at connect
        try:
            server = serve(coord, args.host, args.port, **options)
        except OSError as exc:
            print(
                f"tokengate: error: cannot listen on {args.host}:{args.port}: "
                f"{exc.strerror or exc}",
                file=sys.stderr,
            )
            return 1
        try:
            print(f"TokenGate dashboard: {server.url}/", flush=True)
            if server.generated_password is not None:
                print(
                    f"  no users are configured: log in as 'admin' with password "
                    f"{server.generated_password}\n"
                    "  (choose users with --users-file or $TOKENGATE_DASHBOARD_USERS; "
                    "hashes from `tokengate dashboard hash-password`)",
                    flush=True,
                )
            print(f"  audit log: {server.audit.path}", flush=True)
            if args.demo:
                workload = threading.Thread(
                    target=_demo_workload,
                    args=(coord, stop, args.seed, report),
                    name="tokengate-demo-workload",
                    daemon=True,
                )
                workload.start()
                print("  running the demo workload", flush=True)
            print("  press Ctrl-C to stop", flush=True)
            try:
                threading.Event().wait()  # until Ctrl-C or SIGTERM raise KeyboardInterrupt
            except KeyboardInterrupt:
                pass
            print("tokengate dashboard: stopping", file=sys.stderr, flush=True)
        finally:
            stop.set()
            server.close()
        if workload is not None:
            # The workload waits for its tokens in flight (milliseconds each); a paused
            # coordinator would hold them, so give up after a while and let stop() kill them.
            workload.join(timeout=5.0)
        coord.stop(timeout=5.0)
        if workload is not None:
            workload.join(timeout=10.0)
            if report:
                print(
                    f"demo workload: {report['submitted']:,} tokens submitted, "
                    f"{report['completed']:,} completed, {report['failed']:,} failed, "
                    f"{report['killed']:,} killed",
                    file=sys.stderr,
                )
        return 0
    finally:
        stop.set()
        if coord.running:
            coord.stop(wait=False, timeout=1.0)
        signal.signal(signal.SIGTERM, previous_sigterm)


def _register_demo_launchables(coord: OperationsCoordinator) -> None:
    """Let the admin launch a few of the demo's tasks from the dashboard."""
    from tokengate import demo

    for name in _DEMO_LAUNCHABLES:
        coord.register_launchable(getattr(demo, name), name=name)


def _demo_workload(
    coord: OperationsCoordinator, stop: threading.Event, seed: int | None, report: dict[str, Any]
) -> None:
    """Body of the ``--demo`` thread: the demo's workload until ``stop`` is set."""
    from tokengate.demo import run_workload

    try:
        report.update(run_workload(coord, stop=stop, seed=seed))
    except Exception:
        logger.exception("dashboard: the demo workload failed")


def _cmd_hash_password(args: argparse.Namespace) -> int:
    """``tokengate dashboard hash-password``: print the argon2id hash of a password."""
    if args.password_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        password = password[:-1] if password.endswith("\r") else password
    else:
        import getpass

        try:
            password = getpass.getpass("Password: ")
            if password:
                again = getpass.getpass("Password again: ")
                if again != password:
                    print("tokengate: error: the passwords do not match", file=sys.stderr)
                    return 2
        except EOFError:
            print("tokengate: error: no password given", file=sys.stderr)
            return 2
    if not password:
        print("tokengate: error: an empty password is refused", file=sys.stderr)
        return 2
    try:
        from tokengate.dashboard import hash_password
    except ImportError as exc:
        return _dashboard_import_error(exc)
    from tokengate import ConfigurationError

    try:
        digest = hash_password(password)
    except ConfigurationError as exc:  # e.g. longer than the dashboard verifies
        print(f"tokengate: error: {exc}", file=sys.stderr)
        return 2
    print(digest)
    return 0


#: Columns of ``tokengate audit``, in order.
_AUDIT_COLUMNS = ("time", "user", "role", "client", "action", "target", "outcome", "detail")
_AUDIT_OUTCOMES = ("ok", "refused", "invalid", "failed")


def _printable(value: object) -> str:
    """An audit field as one line of text: ``-`` for null, control characters escaped (user
    names tried at a login and task errors come from outside; they must not drive the
    terminal)."""
    if value is None:
        return "-"
    text = value if isinstance(value, str) else json.dumps(value)
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )


def _read_audit(path: str, malformed: list[int]) -> Iterator[dict[str, Any]]:
    """The records of the audit log at ``path`` in file order (oldest first); the numbers
    of lines that are not a record (a JSON object with an ``action``) go to ``malformed``."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                malformed.append(number)
                continue
            if isinstance(record, dict) and isinstance(record.get("action"), str):
                yield record
            else:
                malformed.append(number)


def _cmd_audit(args: argparse.Namespace) -> int:
    """``tokengate audit``: print the dashboard's audit log, oldest first."""
    from collections import deque

    path = args.file
    if path is None:
        try:
            from tokengate.dashboard.audit import default_path
        except ImportError as exc:
            print(
                f"tokengate: error: cannot find the default audit log ({exc}); "
                "give it with --file or install tokengate[dashboard]",
                file=sys.stderr,
            )
            return 1
        path = str(default_path())
    malformed: list[int] = []
    wanted = {"user": args.user, "action": args.action, "outcome": args.outcome}
    wanted = {k: v for k, v in wanted.items() if v is not None}
    try:
        matching = (
            r for r in _read_audit(path, malformed) if all(r.get(k) == v for k, v in wanted.items())
        )
        records = list(deque(matching, maxlen=args.limit))
    except FileNotFoundError:
        print(f"tokengate: error: there is no audit log at {path}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"tokengate: error: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if malformed:
        shown = ", ".join(map(str, malformed[:5])) + (", ..." if len(malformed) > 5 else "")
        print(
            f"tokengate: warning: {path}: skipped {len(malformed)} line(s) that are not "
            f"audit records (line {shown})",
            file=sys.stderr,
        )
    if args.json:
        for record in records:
            sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")
        return 0
    if not records:
        what = "matching audit records" if wanted else "audit records"
        print(f"no {what} in {path}", file=sys.stderr)
        return 0
    rows = [[_printable(r.get(c)) for c in _AUDIT_COLUMNS] for r in records]
    header = [c.upper() for c in _AUDIT_COLUMNS]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    for row in [header, *rows]:
        # The last column (detail) is not padded: it runs to the end of the line.
        cells = [cell.ljust(w) for cell, w in zip(row[:-1], widths[:-1], strict=True)]
        print("  ".join([*cells, row[-1]]).rstrip())
    return 0


def _add_dashboard_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``tokengate dashboard`` (and its ``hash-password`` action) and ``tokengate audit``;
    returns the ``dashboard`` parser."""
    dash = sub.add_parser(
        "dashboard",
        usage=(
            "tokengate dashboard [--host H] [--port P] [--demo] [--users-file F] "
            "[--audit-log F]\n"
            "                           [--certfile F [--keyfile F]] [--behind-proxy] [options]\n"
            "       tokengate dashboard hash-password [--password-stdin]"
        ),
        help="start a coordinator with its web dashboard (live state, controls, audit log)",
        description=(
            "Start an OperationsCoordinator and serve its web dashboard: live system status, "
            "token pool, core affinity, Guard House, recent executions, throughput and latency "
            "charts, the quarantine, the audit log, and (by role) controls to drain, pause, "
            "kill, reprioritize, block, release, set limits and launch tasks. Runs until "
            "Ctrl-C or SIGTERM. Users come from --users-file, $TOKENGATE_DASHBOARD_USERS or "
            "$TOKENGATE_DASHBOARD_USERS_FILE; with none, an 'admin' with a generated password "
            "is made and printed. See docs/dashboard.md."
        ),
        epilog=(
            "Without TLS and --behind-proxy, listening on anything but a loopback address logs "
            "a warning: passwords and session cookies would cross the network in clear text."
        ),
    )
    dash.set_defaults(handler=_cmd_dashboard)
    dash.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s, this machine only)",
    )
    dash.add_argument(
        "--port",
        type=_port,
        default=8765,
        help="TCP port (default: %(default)s; 0: any free port, printed at start)",
    )
    dash.add_argument(
        "--demo",
        action="store_true",
        help="run the demo's mixed workload on the coordinator, so there is something to watch",
    )
    dash.add_argument(
        "--seed", type=int, default=None, help="seed of the --demo workload (default: random)"
    )
    dash.add_argument(
        "--users-file",
        metavar="FILE",
        default=None,
        help="TOML file of users ([users.NAME] role = ..., password_hash = ...)",
    )
    dash.add_argument(
        "--audit-log",
        metavar="FILE",
        default=None,
        help="where the audit log goes (default: $TOKENGATE_AUDIT_LOG, else "
        "~/.local/share/tokengate/audit.jsonl or under $XDG_DATA_HOME)",
    )
    dash.add_argument(
        "--certfile", metavar="FILE", default=None, help="serve HTTPS with this PEM certificate"
    )
    dash.add_argument(
        "--keyfile",
        metavar="FILE",
        default=None,
        help="the certificate's private key (if not in --certfile)",
    )
    dash.add_argument(
        "--behind-proxy",
        action="store_true",
        help="a TLS-terminating reverse proxy is in front (no warning for a public --host)",
    )
    dash.add_argument(
        "--allowed-origin",
        action="append",
        default=[],
        metavar="URL",
        help="another origin the page may be served from, e.g. https://ops.example.com "
        "(the proxy's public address; repeatable)",
    )
    dash.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name the page may be opened by, besides localhost and IP addresses, e.g. "
        "ops.example.com (requests naming another host are refused, against DNS rebinding; "
        "repeatable; '*' accepts any)",
    )
    dash.add_argument(
        "--workers-per-core",
        type=_positive_int,
        default=None,
        metavar="N",
        help="workers per virtual core (default: the coordinator's default)",
    )
    dash.add_argument(
        "--cores",
        type=_positive_int,
        default=None,
        metavar="N",
        help="virtual cores (default: the CPUs this process may use)",
    )
    actions = dash.add_subparsers(dest="dashboard_command", metavar="ACTION")
    hashp = actions.add_parser(
        "hash-password",
        help="print the argon2id hash of a password, for a users file or variable",
        description=(
            "Ask for a password twice (or read one line from stdin with --password-stdin) and "
            "print its argon2id hash, the form the dashboard's users file and "
            "$TOKENGATE_DASHBOARD_USERS take. An empty password or a mismatch exits 2."
        ),
    )
    hashp.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of stdin instead of asking",
    )
    hashp.set_defaults(handler=_cmd_hash_password)

    audit = sub.add_parser(
        "audit",
        help="print the dashboard's audit log",
        description=(
            "Print the dashboard's audit log (logins, refusals and every control action), one "
            "aligned line per record: time (UTC), user, role, client, action, target, outcome, "
            "detail; newest last. Filters combine (all must match)."
        ),
    )
    audit.add_argument(
        "--file",
        metavar="FILE",
        default=None,
        help="the audit log (default: $TOKENGATE_AUDIT_LOG, else "
        "~/.local/share/tokengate/audit.jsonl or under $XDG_DATA_HOME)",
    )
    audit.add_argument(
        "--limit",
        type=_positive_int,
        default=None,
        metavar="N",
        help="show only the newest N matching records",
    )
    audit.add_argument("--user", default=None, help="only records of this user")
    audit.add_argument(
        "--action", default=None, help="only this action (login, drain, kill, set_limit, ...)"
    )
    audit.add_argument("--outcome", choices=_AUDIT_OUTCOMES, default=None, help="only this outcome")
    audit.add_argument(
        "--json", action="store_true", help="print the records as JSON lines, as stored"
    )
    audit.set_defaults(handler=_cmd_audit)
    return dash


def _port(text: str) -> int:
    value = _int(text, "a port number")
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the ``tokengate`` command."""
    parser = argparse.ArgumentParser(
        prog="tokengate",
        description="TokenGate: run decorated Python calls as tokens on pinned per-core workers.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help=_VERBOSE_HELP)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    topo = sub.add_parser(
        "topology",
        help="show the CPU topology and recommended worker counts",
        description="Show the CPU topology this process sees and recommended worker counts.",
    )
    topo.add_argument("--json", action="store_true", help="print JSON instead of text")
    topo.set_defaults(handler=_cmd_topology)

    demo = sub.add_parser(
        "demo",
        help="run a mixed workload through a coordinator and report on it",
        description=(
            "Run a mixed workload (string ops, sorting, a prime sieve, Fibonacci, hashing, JSON, "
            "fsync'd blob writes, sleeps) of heavy, medium and light tokens for a bounded time, "
            "then print a report. Exits 1 if the core broke its contract during the run."
        ),
    )
    demo.add_argument(
        "--seconds",
        type=_positive_float,
        default=20.0,
        metavar="S",
        help="how long to keep submitting work (default: %(default)g)",
    )
    demo.add_argument(
        "--workers-per-core",
        type=_positive_int,
        default=None,
        metavar="N",
        help="workers per virtual core (default: the coordinator's default)",
    )
    demo.add_argument(
        "--cores",
        type=_positive_int,
        default=None,
        metavar="N",
        help="virtual cores (default: the CPUs this process may use)",
    )
    demo.add_argument(
        "--seed", type=int, default=None, help="seed of the random mix (default: random)"
    )
    demo.add_argument("--json", action="store_true", help="print the report as JSON")
    demo.add_argument(
        "--no-progress", action="store_true", help="do not show the progress indicator"
    )
    demo.set_defaults(handler=_cmd_demo)

    from .. import bench

    bench_p = sub.add_parser(
        "bench",
        help="compare TokenGate with ThreadPoolExecutor, asyncio.to_thread and Dask",
        description=bench.BENCH_DESCRIPTION,
    )
    bench.add_arguments(bench_p)
    bench_p.set_defaults(handler=_cmd_bench)

    history = sub.add_parser(
        "history",
        help="write or read execution-history dumps",
        description="Write the execution history of a demo run to a JSON dump, or summarize one.",
    )
    hsub = history.add_subparsers(dest="history_command", metavar="ACTION", required=True)
    hdump = hsub.add_parser(
        "dump",
        help="run the demo workload and write its execution history",
        description=(
            "Run the demo workload for a few seconds and write the execution history of its "
            "coordinator (one record per attempt) as JSON. An application writes its own with "
            "coordinator.dump_history(path)."
        ),
    )
    hdump.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write")
    hdump.add_argument(
        "--seconds", type=_positive_float, default=3.0, metavar="S", help="demo run time"
    )
    hdump.add_argument("--seed", type=int, default=None, help="seed of the demo mix")
    hdump.set_defaults(handler=_cmd_history_dump)
    hshow = hsub.add_parser(
        "show",
        help="summarize a history dump per operation",
        description="Load a history dump and print per-operation counts and durations.",
    )
    hshow.add_argument("file", metavar="FILE")
    hshow.add_argument("--json", action="store_true", help="print the summary as JSON")
    hshow.set_defaults(handler=_cmd_history_show)

    from . import quarantine as quarantine_cli

    quarantine_cli.add_quarantine_parser(sub)
    dashboard = _add_dashboard_parsers(sub)
    _add_verbose_to_subcommands(parser)
    # `dashboard` has an action of its own (hash-password), so the walk above gives it no -v;
    # one with its own dest keeps `tokengate dashboard -v --demo` working.
    dashboard.add_argument(
        "-v", "--verbose", action="count", default=0, dest="verbose_dashboard", help=_VERBOSE_HELP
    )
    return parser


_VERBOSE_HELP = "log more to stderr (-v: info, -vv: debug and lifecycle events)"


def _add_verbose_to_subcommands(parser: argparse.ArgumentParser) -> None:
    """Accept ``-v`` after the subcommand too (``tokengate demo -vv``).

    Each innermost subcommand gets its own ``-v`` counted into ``verbose_sub`` (added to the
    top-level count by :func:`_verbosity`). Parsers that have subcommands of their own do
    not get one: argparse would overwrite their count with the inner parser's default.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to one parser
                if any(isinstance(a, argparse._SubParsersAction) for a in child._actions):
                    _add_verbose_to_subcommands(child)
                else:
                    child.add_argument(
                        "-v",
                        "--verbose",
                        action="count",
                        default=0,
                        dest="verbose_sub",
                        help=_VERBOSE_HELP,
                    )


def _verbosity(args: argparse.Namespace) -> int:
    return (
        int(args.verbose)
        + int(getattr(args, "verbose_sub", 0) or 0)
        + int(getattr(args, "verbose_dashboard", 0) or 0)
    )


def _cmd_history_dump(args: argparse.Namespace) -> int:
    from tokengate.demo import run_demo

    report = run_demo(
        seconds=args.seconds, progress=False, seed=args.seed, history_path=args.output
    )
    from tokengate.guard.history import load

    print(f"wrote {len(load(args.output).records)} execution records to {args.output}")
    return 0 if report["ok"] else 1


def _cmd_history_show(args: argparse.Namespace) -> int:
    from tokengate.guard.history import load, render_summary, summarize

    try:
        records = load(args.file).records
    except OSError as exc:
        print(f"tokengate: error: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    summary = summarize(records)
    if args.json:
        _print_json(summary)
    else:
        print(render_summary(summary))
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tokengate")
    except PackageNotFoundError:
        return "unknown"


_LOG_HANDLER_NAME = "tokengate-cli"


def _configure_logging(verbosity: int) -> None:
    """Send the ``tokengate`` logger to stderr at a level set by ``-v`` (idempotent).

    0: WARNING (the quiet default), 1: INFO, 2 or more: DEBUG, which also makes the demo log
    every lifecycle event of its coordinator (``tokengate.events`` is then enabled for DEBUG).
    A handler on the ``tokengate`` logger rather than ``logging.basicConfig()``: the root
    logger stays as it was, so ``-vv`` does not turn on the debug output of other libraries.
    """
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    if not any(h.get_name() == _LOG_HANDLER_NAME for h in logger.handlers):
        handler = logging.StreamHandler()  # resolves sys.stderr at emit time
        handler.set_name(_LOG_HANDLER_NAME)
        handler.setFormatter(logging.Formatter(_LOG_FORMAT, _LOG_DATEFMT))
        logger.addHandler(handler)
    logger.setLevel(level)


#: ``12:34:56.789 INFO tokengate: demo: ...``
_LOG_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s"
_LOG_DATEFMT = "%H:%M:%S"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tokengate`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    _configure_logging(_verbosity(args))

    from tokengate import TokenGateError

    try:
        return int(handler(args))
    except KeyboardInterrupt:
        print("tokengate: interrupted", file=sys.stderr)
        return 130
    except TokenGateError as exc:
        logger.debug("command failed", exc_info=True)
        print(f"tokengate: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `tokengate demo --json | head`
        # Point stdout at devnull so the interpreter's final flush does not complain again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
