"""The dashboard's audit log: one JSON object a line, appended, never rewritten.

Every control action taken through the dashboard (and every login, logout and refused
connection from another origin) becomes one record::

    {"time": "2026-12-01T15:04:05.123Z", "ts": 1796137445.123, "user": "alice",
     "role": "operator", "client": "127.0.0.1", "action": "pause", "target": null,
     "outcome": "ok", "detail": null}

The file is opened with ``O_APPEND`` (each record is one ``write()``: concurrent writers, in
this process or another, never interleave within a line), created ``0o600`` in a private
directory, and is never truncated or rewritten by TokenGate. Strings are cut to a bounded
length, so a record stays well under the size the kernel appends atomically.
"""

from __future__ import annotations

import collections
import datetime
import json
import logging
import math
import os
import stat
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from ..errors import ConfigurationError

__all__ = ["OUTCOMES", "AuditLog", "Once", "data_directory", "default_path"]

log = logging.getLogger("tokengate.dashboard")

#: The outcomes a record may carry.
OUTCOMES: Final = ("ok", "refused", "invalid", "failed")

#: The environment variable naming the audit log file.
ENV_PATH: Final = "TOKENGATE_AUDIT_LOG"

#: Longest string kept in a field (``detail`` may be longer); longer ones are cut with "…".
FIELD_LIMIT: Final = 200
DETAIL_LIMIT: Final = 1000

#: Records kept in memory for the dashboard's audit panel.
_KEEP: Final = 200
#: How much of the end of the file tail() reads at first (it reads more if it needs more).
_TAIL_CHUNK: Final = 64 * 1024
#: The most tail() ever reads from the end of the file.
_TAIL_MAX: Final = 16 * 1024 * 1024


def data_directory() -> Path:
    """The user's data directory, as the quarantine store finds it: ``$XDG_DATA_HOME`` (if
    absolute) or ``~/.local/share`` on Linux and other Unix systems, ``~/Library/Application
    Support`` on macOS, ``%LOCALAPPDATA%`` on Windows.

    Raises:
        ConfigurationError: the home directory cannot be determined.
    """
    try:
        if sys.platform == "win32":
            local = os.environ.get("LOCALAPPDATA", "").strip()
            return Path(local) if local else Path.home() / "AppData" / "Local"
        if sys.platform == "darwin":
            return Path.home() / "Library" / "Application Support"
        xdg = os.environ.get("XDG_DATA_HOME", "").strip()
        # The XDG spec says to ignore a relative value.
        return Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "share"
    except RuntimeError as exc:  # Path.home() without HOME / a password entry
        raise ConfigurationError(
            f"cannot find the user's data directory ({exc}); set ${ENV_PATH}"
        ) from None


def default_path() -> Path:
    """Where the audit log is unless told otherwise: ``$TOKENGATE_AUDIT_LOG`` (``~``
    expanded), else ``<data directory>/tokengate/audit.jsonl``."""
    env = os.environ.get(ENV_PATH, "").strip()
    if env:
        return Path(env).expanduser()
    return data_directory() / "tokengate" / "audit.jsonl"


def _cut(value: object, limit: int) -> str | None:
    if value is None:
        return None
    s = value if isinstance(value, str) else str(value)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _iso(ts: float) -> str:
    dt = datetime.datetime.fromtimestamp(ts, datetime.UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _valid(record: object) -> bool:
    return (
        isinstance(record, dict)
        and isinstance(record.get("action"), str)
        and isinstance(record.get("ts"), (int, float))
    )


class AuditLog:
    """The append-only audit log at ``path`` (default :func:`default_path`).

    Thread-safe: :meth:`record` may be called from any thread. The file is opened once, for
    appending, when the log is made (its directory is created ``0o700`` if missing); a
    symbolic link at ``path`` is refused.

    Args:
        path: the file (str or path-like); None for :func:`default_path`.
        clock: the wall clock stamping records (``time.time``).

    Raises:
        ConfigurationError: the file cannot be opened for appending, or is not a regular
            file owned by this user.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise ConfigurationError(f"audit_log must be a path or None, got {path!r}")
        self.path: Path = Path(path).expanduser() if path is not None else default_path()
        self._clock = clock
        self._lock = threading.Lock()
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=_KEEP)
        self._fd: int | None = self._open()
        self._recent.extend(self.tail(_KEEP))

    def _open(self) -> int:
        parent = self.path.parent
        try:
            if not parent.exists():
                parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
            flags |= getattr(os, "O_NOFOLLOW", 0)
            fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot open the audit log {str(self.path)!r} for appending: {exc.strerror}"
            ) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigurationError(f"the audit log {str(self.path)!r} is not a regular file")
            if hasattr(os, "getuid") and st.st_uid != os.getuid():
                raise ConfigurationError(
                    f"the audit log {str(self.path)!r} belongs to another user (uid {st.st_uid})"
                )
            if st.st_mode & 0o077 and hasattr(os, "fchmod"):
                os.fchmod(fd, 0o600)
                log.warning(
                    "the audit log %s was readable or writable by others: made it 0600",
                    self.path,
                )
        except BaseException:
            os.close(fd)
            raise
        return fd

    # -- writing ------------------------------------------------------------------------

    def record(
        self,
        action: str,
        outcome: str,
        *,
        user: str | None = None,
        role: str | None = None,
        client: str | None = None,
        target: object = None,
        detail: object = None,
    ) -> dict[str, Any]:
        """Appends one record and returns it. ``outcome`` is one of :data:`OUTCOMES`;
        strings are cut to :data:`FIELD_LIMIT` characters (``detail`` to
        :data:`DETAIL_LIMIT`). A write that fails is logged at ERROR (the record is still
        kept in memory and returned): an audit failure never breaks the action itself."""
        if outcome not in OUTCOMES:
            raise ConfigurationError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        ts = self._clock()
        if not isinstance(ts, (int, float)) or not math.isfinite(ts):
            ts = time.time()
        rec: dict[str, Any] = {
            "time": _iso(ts),
            "ts": round(float(ts), 3),
            "user": _cut(user, FIELD_LIMIT),
            "role": _cut(role, FIELD_LIMIT),
            "client": _cut(client, FIELD_LIMIT),
            "action": _cut(action, FIELD_LIMIT),
            "target": _cut(target, FIELD_LIMIT),
            "outcome": outcome,
            "detail": _cut(detail, DETAIL_LIMIT),
        }
        line = (json.dumps(rec, ensure_ascii=True, separators=(",", ":")) + "\n").encode()
        with self._lock:
            self._recent.append(rec)
            fd = self._fd
            if fd is None:
                log.error("audit log %s is closed; record not written: %s", self.path, line)
                return dict(rec)
            try:
                written = os.write(fd, line)
                if written != len(line):  # pragma: no cover - a full disk mid-line
                    log.error("audit log %s: short write (%d of %d)", self.path, written, len(line))
            except OSError as exc:
                log.error("writing the audit log %s failed: %s; record: %s", self.path, exc, line)
        return dict(rec)

    def close(self) -> None:
        """Closes the file (idempotent); later records are only logged."""
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ------------------------------------------------------------------------

    def recent(self, n: int = 50) -> list[dict[str, Any]]:
        """The newest ``n`` records (at most 200) known to this log, newest first: those
        written through it and the file's last ones when it was opened."""
        with self._lock:
            items = list(self._recent)
        return [dict(r) for r in reversed(items[-n:])] if n > 0 else []

    def tail(self, n: int = 50) -> list[dict[str, Any]]:
        """The last ``n`` records of the file, oldest first (as ``tail -n``). Lines that are
        not a record are skipped with a WARNING saying how many."""
        return read_tail(self.path, n)

    def __repr__(self) -> str:
        return f"<AuditLog {str(self.path)!r}>"


def read_tail(path: str | os.PathLike[str], n: int = 50) -> list[dict[str, Any]]:
    """The last ``n`` records of the audit log at ``path``, oldest first; ``[]`` if there is
    no such file. Corrupt lines are skipped (one WARNING per call, with their count)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigurationError(f"n must be an int >= 0, got {n!r}")
    if n == 0:
        return []
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigurationError(f"cannot read the audit log {str(path)!r}: {exc}") from None
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        chunk = _TAIL_CHUNK
        while True:
            start = max(0, size - chunk)
            f.seek(start)
            data = f.read(size - start)
            lines = data.split(b"\n")
            if start > 0:
                lines = lines[1:]  # the first one is probably cut
            lines = [line for line in lines if line.strip()]
            if len(lines) >= n or start == 0 or chunk >= _TAIL_MAX:
                break
            chunk *= 4
    records: list[dict[str, Any]] = []
    bad = 0
    for raw in reversed(lines):
        if len(records) >= n:
            break
        try:
            rec = json.loads(raw)
        except ValueError:
            bad += 1
            continue
        if not _valid(rec):
            bad += 1
            continue
        records.append(rec)
    if bad:
        log.warning("audit log %s: skipped %d corrupt line(s)", path, bad)
    records.reverse()
    return records


class Once:
    """Whether something of a key (a client address) is the first within ``every`` seconds:
    for audit records that anyone can cause, so that they mark an event without flooding the
    log. Remembers at most ``keys`` keys (the stalest are forgotten). Thread-safe."""

    def __init__(self, every: float, keys: int = 1000) -> None:
        self.every = every
        self._keys = keys
        self._lock = threading.Lock()
        self._last: OrderedDict[str, float] = OrderedDict()

    def first(self, key: object, now: float) -> bool:
        """True if ``key`` had no first within ``every`` seconds before ``now`` (it has now)."""
        k = str(key)
        with self._lock:
            last = self._last.get(k)
            if last is not None and 0 <= now - last < self.every:
                return False
            self._last[k] = now
            self._last.move_to_end(k)
            while len(self._last) > self._keys:
                self._last.popitem(last=False)
            return True
