"""``tokengate quarantine``: list, show, release and discard quarantined calls.

::

    tokengate quarantine list [--operation OP] [--since T] [--until T] [--json] [--dir DIR]
    tokengate quarantine show RECORD_ID [--json] [--dir DIR]
    tokengate quarantine release (RECORD_ID... | --operation OP | --since T | --until T)
                                 [--dry-run] [--path DIR] [--dir DIR]
    tokengate quarantine discard (RECORD_ID... | --operation OP | --since T | --until T)
                                 [--dry-run] [--dir DIR]

``T`` is a UNIX time, an ISO-8601 time (``2026-12-01T10:00``: local time unless it has an
offset) or an age (``90s``, ``10m``, ``2h``, ``3d``, ``1w``: that long ago). ``--dir`` defaults
to :func:`tokengate.guard.quarantine.default_directory`. ``release`` replays the calls in this
process, on an ``OperationsCoordinator`` it starts, and waits for each new token.

Exit status: 0 when everything asked was done, 1 when some record could not be acted on (or a
released call did not complete), 2 for bad usage.

The command line's lead hooks this in with :func:`add_quarantine_parser` (which sets
``handler=run_quarantine`` on the ``quarantine`` parser).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import QuarantineError
from ..guard.quarantine import QuarantineRecord, QuarantineStore

__all__ = ["add_quarantine_parser", "parse_time", "run_quarantine"]

_AGE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.IGNORECASE)
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


#: UNIX times before this (2001-09-09) are refused as ambiguous (a date like 20261201).
_EARLIEST_UNIX_TIME = 1e9


def parse_time(text: str, *, now: float | None = None) -> float:
    """A UNIX time from ``text``: a UNIX time (``1764583200``), an ISO-8601 time
    (``2026-12-01T10:00``, local time unless it carries an offset such as ``+01:00`` or
    ``Z``), or an age (``30s``, ``10m``, ``2h``, ``3d``, ``1w``) meaning that long before
    ``now`` (default: the current time).

    Raises:
        ValueError: ``text`` is none of these.
    """
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):
            raise ValueError(f"not a finite UNIX time: {text!r}")
        if value < _EARLIEST_UNIX_TIME:
            # 20261201 or 2026 would be a moment of 1970: surely a date meant otherwise.
            raise ValueError(
                f"{text!r} is not a plausible UNIX time (before 2001): give an ISO-8601 date "
                "such as 2026-12-01 or 2026-12-01T10:00, or an age such as 10m, 2h, 3d"
            )
        return value
    m = _AGE_RE.fullmatch(text)
    if m:
        age = float(m.group(1)) * _UNITS[m.group(2).lower()]
        return (time.time() if now is None else now) - age
    try:
        when = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"not a time: {text!r} (give a UNIX time, an ISO-8601 time such as "
            "2026-12-01T10:00, or an age such as 10m, 2h, 3d)"
        ) from None
    return when.timestamp()  # a naive datetime is taken as local time


def _time_arg(text: str) -> float:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _when(t: float) -> str:
    try:
        return _dt.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return repr(t)


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _line(r: QuarantineRecord) -> str:
    state = "replayable" if r.replayable else "NOT replayable"
    return (
        f"{r.record_id}  {_when(r.quarantined_at)}  {r.operation_type}  "
        f"predicted {r.predicted_duration:.3g}s vs baseline {r.baseline_duration:.3g}s "
        f"(x{r.deviation:.3g}, threshold x{r.threshold:g})  {state}  {r.argument_summary}"
    )


def _details(r: QuarantineRecord) -> str:
    rows = [
        ("record", r.record_id),
        ("token", str(r.token_id)),
        ("operation", r.operation_type),
        ("function", r.function or "(unknown)"),
        ("quarantined at", f"{_when(r.quarantined_at)} ({r.quarantined_at:.3f})"),
        ("predicted", f"{r.predicted_duration:.6g} s"),
        ("baseline", f"{r.baseline_duration:.6g} s"),
        ("deviation", f"x{r.deviation:.4g} (threshold x{r.threshold:g})"),
        ("reason", r.reason),
        ("arguments", r.argument_summary),
        ("replayable", "yes" if r.replayable else f"no: {r.why_not_replayable}"),
    ]
    width = max(len(k) for k, _ in rows) + 1
    return "\n".join(f"{k + ':':<{width}} {v}" for k, v in rows)


# -- commands -----------------------------------------------------------------------------


def _store(args: argparse.Namespace) -> QuarantineStore:
    return QuarantineStore(args.dir)


def _cmd_list(args: argparse.Namespace) -> int:
    store = _store(args)
    records = store.list(operation=args.operation, since=args.since, until=args.until)
    if args.json:
        _print_json([r.to_dict() for r in records])
        return 0
    for r in records:
        print(_line(r))
    print(f"{len(records)} quarantined call(s) in {store.directory}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    record = _store(args).get(args.record_id)
    if args.json:
        _print_json(record.to_dict())
    else:
        print(_details(record))
    return 0


def _selection(args: argparse.Namespace) -> dict[str, Any]:
    filters = {"operation": args.operation, "since": args.since, "until": args.until}
    has_filter = any(v is not None for v in filters.values())
    parser: argparse.ArgumentParser = args.quarantine_parser
    if args.record_ids and has_filter:
        parser.error("give record ids or a filter (--operation, --since, --until), not both")
    if not args.record_ids and not has_filter:
        parser.error("give record ids or a filter (--operation, --since, --until)")
    if args.record_ids:
        return {"record_ids": list(args.record_ids)}
    return filters


def _report_failures(verb: str, failed: dict[str, str]) -> None:
    for rid, why in failed.items():
        print(f"not {verb} {rid}: {why}", file=sys.stderr)


def _never_replay(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    raise AssertionError("a dry run replays nothing")


class _Replayer:
    """The default replay: the call is submitted as a new token through the normal gate
    (``fn.options(quarantine=False)``: only the spike check is skipped) on a coordinator
    started in this process on the first call."""

    def __init__(self) -> None:
        self.coordinator: Any = None

    def __call__(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        from tokengate.guard.guard_house import replay_call

        if self.coordinator is None:
            from tokengate import OperationsCoordinator

            self.coordinator = OperationsCoordinator().start()
        return replay_call(fn, args, kwargs, self.coordinator._runtime())

    def close(self, wait: bool) -> None:
        if self.coordinator is not None:
            self.coordinator.stop(wait=wait)
            self.coordinator = None


def _outcome(out: Any) -> tuple[str, bool]:
    """What a replay returned, in words, and whether it went well (a token is waited for)."""
    from tokengate import TaskToken, TokenState

    if not isinstance(out, TaskToken):
        return f"ran in this process (returned {type(out).__name__})", True
    out.wait()
    state = out.state
    name = getattr(state, "name", str(state))
    if state == TokenState.COMPLETED:
        return f"token {out.token_id} {name}", True
    exc = out.exception()
    detail = "" if exc is None else f": {type(exc).__name__}: {exc}"
    return f"token {out.token_id} {name}{detail}", False


def _cmd_release(args: argparse.Namespace) -> int:
    selection = _selection(args)
    store = _store(args)
    if args.dry_run:
        result = store.release(**selection, dry_run=True, replay=_never_replay)
        ops = {r.record_id: r.operation_type for r in result.selected}
        for rid in result.done:
            print(f"would release {rid} ({ops[rid]})")
        _report_failures("releasing", result.failed)
        print(f"dry run: {len(result.done)} would be released, {len(result.failed)} not")
        return 0 if result.ok else 1

    saved_path = list(sys.path)
    cwd = os.getcwd()
    extra = [os.path.abspath(p) for p in args.path or []]
    sys.path[:0] = extra  # --path goes first: the user asked for it
    if "" not in sys.path and cwd not in sys.path:
        # The user's modules in the cwd import, but after the installed ones: a file planted
        # in the cwd cannot shadow the module a trusted pickle names.
        sys.path.append(cwd)
    replayer = _Replayer()
    finished = False
    try:
        result = store.release(**selection, replay=replayer)
        status = 0 if result.ok else 1
        for rid, out in zip(result.done, result.results, strict=True):
            text, ok = _outcome(out)
            print(f"released {rid} -> {text}", flush=True)
            if not ok:
                status = 1
        _report_failures("released", result.failed)
        finished = True
    finally:
        replayer.close(wait=finished)
        sys.path[:] = saved_path
    print(f"{len(result.done)} released, {len(result.failed)} not")
    return status


def _cmd_discard(args: argparse.Namespace) -> int:
    selection = _selection(args)
    result = _store(args).discard(**selection, dry_run=args.dry_run)
    verb = "would discard" if args.dry_run else "discarded"
    for rid in result.done:
        print(f"{verb} {rid}")
    _report_failures("discarding" if args.dry_run else "discarded", result.failed)
    summary = f"{len(result.done)} {'would be ' if args.dry_run else ''}discarded"
    print(f"{'dry run: ' if args.dry_run else ''}{summary}, {len(result.failed)} not")
    return 0 if result.ok else 1


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "list": _cmd_list,
    "show": _cmd_show,
    "release": _cmd_release,
    "discard": _cmd_discard,
}


def run_quarantine(args: argparse.Namespace) -> int:
    """Run the ``tokengate quarantine`` subcommand parsed into ``args``; returns the exit
    status (0 ok, 1 some action failed; bad usage already exited 2 in argparse)."""
    try:
        return _COMMANDS[args.quarantine_command](args)
    except QuarantineError as exc:
        print(f"tokengate: error: {exc}", file=sys.stderr)
        return 1


def add_quarantine_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the ``quarantine`` subcommand (and its ``list``, ``show``, ``release`` and
    ``discard`` actions) to ``subparsers``; the parser returned has ``handler=run_quarantine``
    as a default."""
    quarantine = subparsers.add_parser(
        "quarantine",
        help="list, show, release or discard calls held in quarantine",
        description=(
            "Calls that spike detection predicted to cost far more than their operation's "
            "baseline are held in the quarantine store instead of running. List and inspect "
            "them, release them (replay each as a new token through the normal gate, only "
            "without the spike check) or discard them."
        ),
    )
    quarantine.set_defaults(handler=run_quarantine)
    actions = quarantine.add_subparsers(dest="quarantine_command", metavar="ACTION", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="the quarantine store (default: $TOKENGATE_QUARANTINE_DIR, else the user's data "
        "directory, e.g. ~/.local/share/tokengate/quarantine)",
    )
    time_help = "UNIX time, ISO-8601 (local unless it has an offset) or an age such as 2h"

    def add_filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--operation", metavar="OP", help="only records of this operation")
        p.add_argument(
            "--since", type=_time_arg, metavar="T", help=f"quarantined at or after T ({time_help})"
        )
        p.add_argument("--until", type=_time_arg, metavar="T", help="quarantined before T")

    lst = actions.add_parser("list", parents=[common], help="list quarantined calls (oldest first)")
    add_filters(lst)
    lst.add_argument("--json", action="store_true", help="print JSON instead of text")

    show = actions.add_parser("show", parents=[common], help="show one quarantined call")
    show.add_argument("record_id", metavar="RECORD_ID")
    show.add_argument("--json", action="store_true", help="print JSON instead of text")

    release = actions.add_parser(
        "release",
        parents=[common],
        help="replay quarantined calls as new tokens and remove their records",
        description=(
            "Replay the selected calls in this process as new tokens (through the breaker, "
            "limits and every other rule of their operation; only the spike check is skipped), "
            "wait for each and remove the records of those replayed. The guarded functions "
            "must be importable: the current directory and --path directories are searched."
        ),
    )
    discard = actions.add_parser(
        "discard", parents=[common], help="remove quarantined calls without running them"
    )
    for p in (release, discard):
        p.add_argument("record_ids", nargs="*", metavar="RECORD_ID", help="records to act on")
        add_filters(p)
        p.add_argument(
            "--dry-run", action="store_true", help="show what would be done; change nothing"
        )
        p.set_defaults(quarantine_parser=p)
    release.add_argument(
        "--path",
        action="append",
        metavar="DIR",
        help="a directory to put in front of sys.path for importing the functions (repeatable)",
    )
    return quarantine
