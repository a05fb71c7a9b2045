"""The ``tokengate`` command line.

::

    tokengate [-v | -vv] topology [--json]
    tokengate [-v | -vv] demo [--seconds 20] [--workers-per-core N] [--seed S] [--json]

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
from collections.abc import Sequence
from typing import Any

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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
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
    from . import bench

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

    from . import bench

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

    from .guard import _cli as quarantine_cli

    quarantine_cli.add_quarantine_parser(sub)
    _add_verbose_to_subcommands(parser)
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
    return int(args.verbose) + int(getattr(args, "verbose_sub", 0) or 0)


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
