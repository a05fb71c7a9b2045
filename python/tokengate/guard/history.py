"""Execution-history files: dump the core's execution records to JSON, load them back, and
summarise them per operation (``tokengate history show FILE``).

The native core keeps a bounded ring of :class:`ExecutionRecord` (one per executed attempt);
the binding hands them out as dicts with exactly the record's field names. :func:`dump` writes
them atomically, in this shape::

    {
      "format": "tokengate-history",
      "version": 1,
      "dumped_at": "2025-01-31T12:00:00.000+00:00",   # ISO-8601, UTC
      "clock": "monotonic",                          # started_at/finished_at are monotonic s
      "coordinator": {...} | null,
      "count": 2,
      "records": [{"token_id": 1, "operation_type": "fetch", ...}, ...]
    }

:func:`load` reads that back (and also a bare JSON list of records, as older dumps were) and
refuses anything else with a :class:`~tokengate.errors.HistoryFormatError` naming the file and
what is wrong with it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import stat
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypedDict

from ..errors import HistoryFormatError

__all__ = [
    "FORMAT",
    "OUTCOMES",
    "VERSION",
    "ExecutionRecord",
    "HistoryDump",
    "OperationSummary",
    "dump",
    "load",
    "render_summary",
    "summarize",
]

log = logging.getLogger("tokengate.guard.history")

#: The ``format`` field of a dump.
FORMAT: Final[str] = "tokengate-history"
#: The ``version`` of the dump format this module writes and reads.
VERSION: Final[int] = 1
#: The values of :attr:`ExecutionRecord.outcome`.
OUTCOMES: Final[frozenset[str]] = frozenset({"completed", "failed", "timed_out", "killed"})

_CLOCK: Final[str] = "monotonic"


@dataclass(frozen=True, slots=True)
class ExecutionRecord:
    """One executed attempt of a token, as the core records it. Times are in seconds;
    ``started_at``/``finished_at`` are on the monotonic clock of the process that ran it."""

    token_id: int
    operation_type: str
    success: bool
    outcome: str
    """One of :data:`OUTCOMES`: ``"completed"``, ``"failed"``, ``"timed_out"``, ``"killed"``."""
    execution_time: float
    queue_wait: float
    core_id: int
    """1-based."""
    worker_id: int
    complexity_score: float | None
    predicted_duration: float | None
    attempt: int
    error_type: str | None
    error_message: str | None
    started_at: float
    finished_at: float

    def to_dict(self) -> dict[str, Any]:
        """The record as a dict with exactly the field names (JSON-ready)."""
        return {name: getattr(self, name) for name in _FIELD_NAMES}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, context: str | None = None) -> ExecutionRecord:
        """Build a record from a mapping with exactly the field names, checking every type.

        Integers are accepted for the float fields (and stored as floats); ``bool`` is never
        taken for a number. Raises :class:`~tokengate.errors.HistoryFormatError` naming the
        bad key (prefixed by ``context``, e.g. the file and record number)."""
        where = f"{context}: " if context else ""
        if not isinstance(d, Mapping):
            raise HistoryFormatError(
                f"{where}an execution record must be a JSON object, got {type(d).__name__}"
            )
        missing = [name for name in _FIELD_NAMES if name not in d]
        if missing:
            raise HistoryFormatError(f"{where}record lacks the key(s) {', '.join(missing)}")
        unknown = sorted(repr(k) for k in d if k not in _FIELD_SET)
        if unknown:
            raise HistoryFormatError(f"{where}record has unknown key(s) {', '.join(unknown)}")
        values = {name: _check(name, d[name], where) for name in _FIELD_NAMES}
        return cls(**values)


_FIELD_NAMES: Final[tuple[str, ...]] = tuple(f.name for f in fields(ExecutionRecord))
_FIELD_SET: Final[frozenset[str]] = frozenset(_FIELD_NAMES)

# name -> (kind, nullable); kinds: int, float, bool, str
_KINDS: Final[dict[str, tuple[str, bool]]] = {
    "token_id": ("int", False),
    "operation_type": ("str", False),
    "success": ("bool", False),
    "outcome": ("str", False),
    "execution_time": ("float", False),
    "queue_wait": ("float", False),
    "core_id": ("int", False),
    "worker_id": ("int", False),
    "complexity_score": ("float", True),
    "predicted_duration": ("float", True),
    "attempt": ("int", False),
    "error_type": ("str", True),
    "error_message": ("str", True),
    "started_at": ("float", False),
    "finished_at": ("float", False),
}
_NON_NEGATIVE: Final[frozenset[str]] = frozenset(
    {"execution_time", "queue_wait", "worker_id", "attempt", "predicted_duration"}
)
_KIND_TEXT: Final[dict[str, str]] = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
}


def _check(name: str, value: Any, where: str) -> Any:
    kind, nullable = _KINDS[name]

    def bad(expected: str) -> HistoryFormatError:
        return HistoryFormatError(
            f"{where}key {name!r} must be {expected}, got {value!r} ({type(value).__name__})"
        )

    if value is None:
        if nullable:
            return None
        raise bad(_KIND_TEXT[kind])
    expected = _KIND_TEXT[kind] + (" or null" if nullable else "")
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad(expected)
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise bad(expected)
        if name == "outcome" and value not in OUTCOMES:
            raise bad("one of " + ", ".join(sorted(OUTCOMES)))
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(expected)
    if kind == "int":
        if not isinstance(value, int):
            raise bad(expected)
        if name == "core_id" and value < 1:
            raise bad("an integer >= 1 (core ids are 1-based)")
    else:
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value) or abs(value) > _MAX_MAGNITUDE:
            raise bad("a finite number" + (" or null" if nullable else ""))
    if name in _NON_NEGATIVE and value < 0:
        raise bad(expected.replace(_KIND_TEXT[kind], _KIND_TEXT[kind] + " >= 0"))
    return value


#: The largest dump ``load`` reads (a full ring of 16 Mi records is well under it).
_MAX_DUMP_BYTES = 8 * 1024**3
#: Numbers in a record beyond this (about 30 000 years, in seconds) are refused as corrupt.
_MAX_MAGNITUDE = 1e12


@dataclass(frozen=True, slots=True)
class HistoryDump:
    """What :func:`load` read from a file."""

    records: list[ExecutionRecord]
    dumped_at: datetime | None
    """When it was dumped (UTC); None for a bare-list dump, which does not say."""
    coordinator: dict[str, Any] | None
    """The ``coordinator_info`` given to :func:`dump`, if any."""


# ---------------------------------------------------------------------------------------------
# writing


def _as_record(item: ExecutionRecord | Mapping[str, Any], index: int) -> ExecutionRecord:
    if isinstance(item, ExecutionRecord):
        return item
    return ExecutionRecord.from_dict(item, context=f"record {index}")


def dump(
    records: Iterable[ExecutionRecord | Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    coordinator_info: Mapping[str, Any] | None = None,
) -> int:
    """Write ``records`` (records, or dicts as the binding returns them) to ``path`` as a
    history dump and return how many were written.

    The write is atomic: the JSON goes to a temporary file in the same directory, which is
    synced and then renamed over ``path`` with ``os.replace``; if anything fails on the way,
    the temporary file is removed and an existing ``path`` is left as it was. Missing parent
    directories are created. A new file is readable by its owner only (records may hold error
    messages); replacing a file keeps its permissions.

    Raises :class:`~tokengate.errors.HistoryFormatError` for a record that is not valid (it
    names the record and key), ``TypeError``/``ValueError`` when ``coordinator_info`` holds
    something JSON cannot encode, and ``OSError`` when the file cannot be written."""
    checked = [_as_record(item, i).to_dict() for i, item in enumerate(records)]
    if coordinator_info is not None and not isinstance(coordinator_info, Mapping):
        raise TypeError(
            f"coordinator_info must be a mapping or None, got {type(coordinator_info).__name__}"
        )
    coordinator = None if coordinator_info is None else dict(coordinator_info)
    document = {
        "format": FORMAT,
        "version": VERSION,
        "dumped_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "clock": _CLOCK,
        "coordinator": coordinator,
        "count": len(checked),
        "records": checked,
    }
    target = Path(os.fspath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.fchmod(fd, os.stat(target).st_mode & 0o7777)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(document, out, ensure_ascii=False, allow_nan=False, indent=1)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _sync_dir(target.parent)
    log.debug("wrote %d execution records to %s", len(checked), target)
    return len(checked)


def _sync_dir(directory: Path) -> None:
    """Make the rename durable where the platform allows (best effort)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


# ---------------------------------------------------------------------------------------------
# reading


def load(path: str | os.PathLike[str]) -> HistoryDump:
    """Read a history dump written by :func:`dump`, or a bare JSON list of records (older
    dumps).

    Raises :class:`~tokengate.errors.HistoryFormatError`, with a message naming the file, when
    it is not JSON, not a ``tokengate-history`` dump, of another version, or when a record or
    field is not valid; ``OSError`` (e.g. ``FileNotFoundError``) when it cannot be read."""
    name = os.fspath(path)
    path = Path(name)
    st = path.stat()  # FileNotFoundError as usual
    if not stat.S_ISREG(st.st_mode):
        raise HistoryFormatError(f"{name} is not a history dump: not a regular file")
    if st.st_size > _MAX_DUMP_BYTES:
        raise HistoryFormatError(
            f"{name} is not a history dump: {st.st_size} bytes, more than the "
            f"{_MAX_DUMP_BYTES} a dump of the largest history can take"
        )
    raw = path.read_bytes()
    try:
        document = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise HistoryFormatError(f"{name} is not a history dump: not UTF-8 text ({exc})") from None
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise HistoryFormatError(f"{name} is not a history dump: not JSON ({exc})") from None
    if isinstance(document, list):
        return HistoryDump(records=_records(document, name), dumped_at=None, coordinator=None)
    if not isinstance(document, dict):
        raise HistoryFormatError(
            f"{name} is not a history dump: it holds a JSON {type(document).__name__}, "
            "expected an object (or a list of records)"
        )
    fmt = document.get("format")
    if fmt != FORMAT:
        raise HistoryFormatError(
            f"{name} is not a history dump: its format is {fmt!r}, expected {FORMAT!r}"
        )
    version = document.get("version")
    if type(version) is not int or version != VERSION:
        raise HistoryFormatError(
            f"{name}: history dump version {version!r} is not supported "
            f"(this TokenGate reads version {VERSION})"
        )
    clock = document.get("clock", _CLOCK)
    if clock != _CLOCK:
        raise HistoryFormatError(f"{name}: clock {clock!r} is not supported, expected {_CLOCK!r}")
    coordinator = document.get("coordinator")
    if coordinator is not None and not isinstance(coordinator, dict):
        raise HistoryFormatError(
            f"{name}: 'coordinator' must be an object or null, got {type(coordinator).__name__}"
        )
    dumped_at = _parse_time(document.get("dumped_at"), name)
    body = document.get("records")
    if not isinstance(body, list):
        got = "nothing" if body is None else type(body).__name__
        raise HistoryFormatError(f"{name}: 'records' must be a list, got {got}")
    records = _records(body, name)
    count = document.get("count", len(records))
    if type(count) is not int or count != len(records):
        raise HistoryFormatError(
            f"{name}: 'count' says {count!r} but the file holds {len(records)} records"
        )
    return HistoryDump(records=records, dumped_at=dumped_at, coordinator=coordinator)


def _records(items: list[Any], name: str) -> list[ExecutionRecord]:
    return [
        ExecutionRecord.from_dict(item, context=f"{name}: record {i}")
        for i, item in enumerate(items)
    ]


def _parse_time(value: Any, name: str) -> datetime:
    if not isinstance(value, str):
        raise HistoryFormatError(
            f"{name}: 'dumped_at' must be an ISO-8601 time string, got {value!r}"
        )
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise HistoryFormatError(
            f"{name}: 'dumped_at' is not an ISO-8601 time: {value!r}"
        ) from None
    if when.tzinfo is None:
        raise HistoryFormatError(f"{name}: 'dumped_at' has no time zone: {value!r}")
    return when.astimezone(UTC)


# ---------------------------------------------------------------------------------------------
# summaries


class OperationSummary(TypedDict):
    """The figures :func:`summarize` gives for one operation (times in seconds)."""

    count: int
    successes: int
    failures: int
    success_rate: float
    mean_execution_time: float
    p50_execution_time: float
    p95_execution_time: float


def _percentile(ordered: list[float], q: float) -> float:
    """The q-quantile of sorted values, interpolating linearly between the two nearest ranks
    (numpy's default, ``statistics.quantiles(method="inclusive")``)."""
    pos = (len(ordered) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(
    records: Iterable[ExecutionRecord | Mapping[str, Any]],
) -> dict[str, OperationSummary]:
    """Per operation (sorted by name): the number of records, successes (``success`` true),
    failures (the rest), ``success_rate`` (successes / count), and the mean, median (p50) and
    95th percentile of ``execution_time``, computed exactly from every record (percentiles
    interpolate linearly between the nearest ranks). Dicts are validated as by
    :meth:`ExecutionRecord.from_dict`."""
    times: dict[str, list[float]] = {}
    successes: dict[str, int] = {}
    for i, item in enumerate(records):
        record = _as_record(item, i)
        times.setdefault(record.operation_type, []).append(record.execution_time)
        successes[record.operation_type] = successes.get(record.operation_type, 0) + int(
            record.success
        )
    out: dict[str, OperationSummary] = {}
    for op in sorted(times):
        values = sorted(times[op])
        count = len(values)
        ok = successes[op]
        out[op] = OperationSummary(
            count=count,
            successes=ok,
            failures=count - ok,
            success_rate=ok / count,
            mean_execution_time=math.fsum(values) / count,
            p50_execution_time=_percentile(values, 0.5),
            p95_execution_time=_percentile(values, 0.95),
        )
    return out


_COLUMNS: Final[tuple[str, ...]] = (
    "operation",
    "count",
    "ok",
    "failed",
    "success",
    "mean ms",
    "p50 ms",
    "p95 ms",
)


def render_summary(summary: Mapping[str, OperationSummary]) -> str:
    """A plain-text table of :func:`summarize`'s result, one row per operation (times in
    milliseconds), for the CLI to print; ``"no execution records"`` when it is empty."""
    if not summary:
        return "no execution records"
    rows = [
        (
            op,
            str(s["count"]),
            str(s["successes"]),
            str(s["failures"]),
            f"{100 * s['success_rate']:.1f}%",
            f"{1000 * s['mean_execution_time']:.3f}",
            f"{1000 * s['p50_execution_time']:.3f}",
            f"{1000 * s['p95_execution_time']:.3f}",
        )
        for op, s in summary.items()
    ]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(_COLUMNS)]

    def line(cells: tuple[str, ...]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(w) for cell, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join((first, *rest)).rstrip()

    return "\n".join([line(_COLUMNS), line(tuple("-" * w for w in widths)), *map(line, rows)])
