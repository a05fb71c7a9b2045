"""The quarantine store: calls held back by spike detection, kept on disk until an operator
releases (replays) or discards them.

With quarantine enabled for an operation, the core predicts each call's cost from its
arguments; a call predicted to cost more than ``threshold`` times the operation's baseline does
not run. Its token ends QUARANTINED (its waiter gets :class:`~tokengate.errors.TokenQuarantined`)
and the Python layer writes a :class:`QuarantineRecord` here with :meth:`QuarantineStore.add`.
The store is a directory that survives restarts and may be shared by several processes:

* one ``<record_id>.json`` per record (the metadata, always there) and, when the call pickles,
  ``<record_id>.pkl`` holding ``pickle.dumps((fn, args, kwargs))``;
* every file is written atomically (a private temporary file, fsync'd, then ``os.replace``);
* a release or discard first *claims* a record by renaming its JSON file, an atomic step only
  one process can win, so a record is replayed at most once even when two processes act on
  the same directory; the loser reports it as "already gone";
* bounded: :meth:`QuarantineStore.add` drops records older than ``retention``, then the oldest
  beyond ``max_records`` and beyond ``max_bytes``; a single call's pickle above
  ``max_pickle_bytes`` is not kept (the record says the call cannot be replayed).

.. warning::
   Pickles are code: loading one may run arbitrary code. Only load them from a directory you
   trust. The store creates its directory private (mode ``0o700``, files ``0o600``) and, on
   POSIX, refuses to load pickles when the directory or the pickle is not owned by the current
   user or is writable by others.

The library never prints; it logs to ``logging.getLogger("tokengate.guard")``.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import copy
import dataclasses
import io
import json
import logging
import math
import os
import pickle
import re
import secrets
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigurationError, InvalidOption, QuarantineError

__all__ = [
    "ActionResult",
    "QuarantineRecord",
    "QuarantineStore",
    "ReplayFunction",
    "default_directory",
    "summarize_arguments",
]

logger = logging.getLogger("tokengate.guard")

#: What ``QuarantineStore.release`` calls for each record: ``replay(fn, args, kwargs)``; it
#: submits the call as a new token and returns it (or raises: the record then stays).
ReplayFunction = Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]

_ENV_DIR = "TOKENGATE_QUARANTINE_DIR"
_FORMAT = "tokengate.quarantine/1"

#: Record ids: letters, digits, '_' and '-' only, so an id is always a plain file name.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
#: Ids made by this module start with the zero-padded time in ns, so they sort by time.
_ID_TIME_RE = re.compile(r"(\d{20})-")
_CLAIM_RE = re.compile(r"([A-Za-z0-9][A-Za-z0-9_-]{0,127})\.claim-(\d{1,20})-(\d{1,10})-[0-9a-z-]+")
#: A record whose call is being replayed: never put back by itself (the replay may have run).
_REPLAYING_RE = re.compile(
    r"([A-Za-z0-9][A-Za-z0-9_-]{0,127})\.replaying-(\d{1,20})-(\d{1,10})-[0-9a-z-]+"
)

_MAX_JSON_BYTES = 1024 * 1024  # records are a few hundred bytes; anything bigger is not one
_MAX_TEXT = 1000  # reason / why_not_replayable / function are cut to this many characters
#: Temporary files, orphan pickles and claims older than this are left over by a process that
#: died mid-write or mid-action; the bounds pass cleans them up (claims are restored).
_STALE_SECONDS = 3600.0


#: Adds between two scans that enforce the store's bounds (so ``max_records`` may be passed by
#: up to this many records for a moment).
_ENFORCE_EVERY = 32


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (True when that cannot be told)."""
    if pid <= 0 or os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _wall_ns() -> int:
    return time.time_ns()


#: The clock of the store (UNIX time in ns); a module global so that tests can replace it.
_clock_ns: Callable[[], int] = _wall_ns


def default_directory() -> Path:
    """Where the quarantine store lives unless told otherwise.

    ``$TOKENGATE_QUARANTINE_DIR`` if set (``~`` is expanded), else the user's data directory:
    ``$XDG_DATA_HOME/tokengate/quarantine`` (or ``~/.local/share/tokengate/quarantine``) on
    Linux and other Unix systems, ``~/Library/Application Support/tokengate/quarantine`` on
    macOS, ``%LOCALAPPDATA%\\tokengate\\quarantine`` on Windows.

    Raises:
        QuarantineError: no environment variable names a directory and the home directory
            cannot be determined.
    """
    env = os.environ.get(_ENV_DIR, "").strip()
    if env:
        return Path(env).expanduser()
    try:
        if sys.platform == "win32":
            local = os.environ.get("LOCALAPPDATA", "").strip()
            base = Path(local) if local else Path.home() / "AppData" / "Local"
        elif sys.platform == "darwin":
            base = Path.home() / "Library" / "Application Support"
        else:
            xdg = os.environ.get("XDG_DATA_HOME", "").strip()
            # The XDG spec says to ignore a relative value.
            base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "share"
    except RuntimeError as exc:  # Path.home() without HOME / a password entry
        raise QuarantineError(
            f"cannot find the user's data directory ({exc}); set ${_ENV_DIR}"
        ) from None
    return base / "tokengate" / "quarantine"


# -- argument summaries -------------------------------------------------------------------

_SMALL_INT = 10**15
_SIZED_TYPES: tuple[type, ...] = (
    str,
    bytes,
    bytearray,
    list,
    tuple,
    dict,
    set,
    frozenset,
    collections.deque,
)
_type_qualname = type.__dict__["__qualname__"].__get__  # the C slot: no metaclass code runs


def _type_name(tp: type) -> str:
    try:
        name = _type_qualname(tp, type)
    except Exception:
        return "?"
    return name if len(name) <= 60 else name[:59] + "…"


def _summarize_value(value: object) -> str:
    """A short description of one argument that runs none of the object's own code: the type
    name, plus the length for builtin containers, str and bytes, and the value only for None,
    bools, small ints and floats."""
    try:
        tp = type(value)
        if value is None or tp is bool or tp is float:
            return repr(value)
        if tp is int:
            assert isinstance(value, int)
            if -_SMALL_INT < value < _SMALL_INT:
                return repr(value)
            return f"int({value.bit_length()} bits)"
        if tp is complex:
            return repr(value)
        if tp in _SIZED_TYPES:  # exact builtin types only: len() runs no user code
            return f"{tp.__name__}[{len(value)}]"  # type: ignore[arg-type]
        if tp is memoryview:
            assert isinstance(value, memoryview)
            return f"memoryview[{value.nbytes} bytes]"
        return _type_name(tp)
    except Exception:
        return "?"


def _key_text(key: object) -> str:
    if type(key) is str:
        if key.isidentifier() and len(key) <= 32:
            return key
        return repr(key[:32]) + ("…" if len(key) > 32 else "")
    return _summarize_value(key)


def _join(items: Iterable[str], count: int, budget: int) -> str:
    """``items`` joined with ", " in at most about ``budget`` characters, ending with
    "…+N more" when they do not all fit (only the items shown are ever produced)."""
    parts: list[str] = []
    used = 0
    for i, text in enumerate(items):
        piece = text if i == 0 else ", " + text
        reserve = 0 if i + 1 == count else len(f", …+{count} more")
        if used + len(piece) + reserve > budget:
            parts.append(f"{', ' if i else ''}…+{count - i} more")
            break
        parts.append(piece)
        used += len(piece)
    return "".join(parts)


def summarize_arguments(args: object, kwargs: object, limit: int = 200) -> str:
    """A short, safe description of a call's arguments, e.g.
    ``args=(list[100000], str[12], 3) kwargs={n: 5, data: bytes[4096]}``.

    It never includes the data itself: builtin containers, ``str`` and ``bytes`` show their
    type and length, ``None``, bools, small ints and floats their value, every other object
    its type name only (no ``__repr__``, ``__len__`` or other code of the object runs). The
    result has at most ``limit`` characters (at least 16), and this function never raises.
    """
    try:
        limit = max(16, int(limit))
    except Exception:
        limit = 200
    try:
        n_args = len(args) if type(args) in (tuple, list) else -1  # type: ignore[arg-type]
        n_kwargs = len(kwargs) if type(kwargs) is dict else -1  # type: ignore[arg-type]
        budget = max(0, limit - 17)  # 17: "args=()" + " kwargs={}"
        if n_args >= 0:
            assert isinstance(args, (tuple, list))
            share = budget if n_kwargs <= 0 else budget * 2 // 3
            inner = _join((_summarize_value(a) for a in args), n_args, share)
            args_text = f"args=({inner})"
            budget -= len(inner)
        else:
            args_text = "args=" + _summarize_value(args)
        if n_kwargs >= 0:
            assert isinstance(kwargs, dict)
            items = (f"{_key_text(k)}: {_summarize_value(v)}" for k, v in kwargs.items())
            kwargs_text = f"kwargs={{{_join(items, n_kwargs, budget)}}}"
        else:
            kwargs_text = "kwargs=" + _summarize_value(kwargs)
        text = f"{args_text} {kwargs_text}"
    except Exception:
        text = "args=? kwargs=?"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cut(text: str, limit: int = _MAX_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _exc_text(exc: BaseException) -> str:
    try:
        msg = str(exc)
    except Exception:
        msg = "<unprintable>"
    name = type(exc).__name__
    return _cut(f"{name}: {msg}" if msg else name, 500)


def _function_name(fn: object) -> str | None:
    try:
        module = getattr(fn, "__module__", None)
        qualname = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
        if not isinstance(qualname, str):
            return None
        name = f"{module}:{qualname}" if isinstance(module, str) else qualname
        return _cut(name, 500)
    except Exception:
        return None


# -- records ------------------------------------------------------------------------------

_FLOAT_FIELDS = (
    "quarantined_at",
    "predicted_duration",
    "baseline_duration",
    "deviation",
    "threshold",
)


@dataclass(frozen=True)
class QuarantineRecord:
    """One quarantined call, as stored in ``<record_id>.json``.

    Attributes:
        record_id: unique across processes and restarts; sorts by the time it was made.
        token_id: the id of the token that was quarantined.
        operation_type: the operation the call belongs to.
        quarantined_at: when (UNIX time, as ``time.time()``).
        predicted_duration: the predicted cost of the call, in seconds.
        baseline_duration: the operation's baseline cost, in seconds.
        deviation: ``predicted_duration / baseline_duration``.
        threshold: the deviation above which calls of the operation are quarantined.
        reason: why the call was quarantined, in words.
        argument_summary: a short, bounded description of the arguments (never the data;
            see :func:`summarize_arguments`).
        replayable: whether the call was kept (pickled) and can be released.
        why_not_replayable: when it cannot, why (e.g. the arguments do not pickle).
        function: ``"module:qualname"`` of the guarded function, if known.
    """

    record_id: str
    token_id: int
    operation_type: str
    quarantined_at: float
    predicted_duration: float
    baseline_duration: float
    deviation: float
    threshold: float
    reason: str
    argument_summary: str
    replayable: bool
    why_not_replayable: str | None = None
    function: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-compatible dict (what :meth:`from_dict` reads back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuarantineRecord:
        """Build a record from :meth:`to_dict` output; unknown keys are ignored.

        Raises:
            ValueError: a field is missing or has the wrong type.
        """
        if not isinstance(data, Mapping):
            raise ValueError(
                f"a quarantine record must be a JSON object, got {type(data).__name__}"
            )

        def need(name: str, kinds: type | tuple[type, ...], optional: bool = False) -> Any:
            if name not in data:
                if optional:
                    return None
                raise ValueError(f"field {name!r} is missing")
            value = data[name]
            if value is None and optional:
                return None
            if isinstance(value, bool) and bool not in (
                kinds if isinstance(kinds, tuple) else (kinds,)
            ):
                raise ValueError(f"field {name!r} has the wrong type (bool)")
            if not isinstance(value, kinds):
                raise ValueError(f"field {name!r} has the wrong type ({type(value).__name__})")
            return value

        record_id = need("record_id", str)
        if not _ID_RE.fullmatch(record_id):
            raise ValueError(f"field 'record_id' is not a valid record id: {record_id[:80]!r}")
        floats = {}
        for name in _FLOAT_FIELDS:
            try:
                v = float(need(name, (int, float)))
            except OverflowError:
                v = math.inf
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"field {name!r} must be a finite number >= 0, got {v!r}")
            floats[name] = v
        return cls(
            record_id=record_id,
            token_id=need("token_id", int),
            operation_type=need("operation_type", str),
            reason=need("reason", str),
            argument_summary=need("argument_summary", str),
            replayable=need("replayable", bool),
            why_not_replayable=need("why_not_replayable", str, optional=True),
            function=need("function", str, optional=True),
            **floats,
        )


@dataclass
class ActionResult:
    """What :meth:`QuarantineStore.release` or :meth:`QuarantineStore.discard` did (or, with
    ``dry_run``, would do).

    Attributes:
        action: ``"release"`` or ``"discard"``.
        dry_run: True if nothing was touched.
        selected: the records the selection matched (oldest first).
        done: ids of the records released / discarded (would be, in a dry run).
        failed: record id -> why it was not (not replayable, replay raised, already gone, no
            such record...). Such records stay in the store.
        results: for a release, what ``replay`` returned for each id of ``done``, in the same
            order (e.g. the new tokens); empty for a discard or a dry run.
    """

    action: Literal["release", "discard"]
    dry_run: bool
    selected: list[QuarantineRecord] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    results: list[Any] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True if nothing failed."""
        return not self.failed


# -- the store ----------------------------------------------------------------------------


class _TooLarge(Exception):
    pass


class _BoundedBuffer(io.BytesIO):
    """A BytesIO that refuses to grow past ``limit`` bytes (so a huge call is never held in
    memory whole just to find out that it is too large to keep)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self._limit = limit

    def write(self, data: Any) -> int:
        if self.tell() + memoryview(data).nbytes > self._limit:
            raise _TooLarge
        return super().write(data)


class _Corrupt(Exception):
    pass


def _check_time(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidOption(f"{name} must be a UNIX time (a number) or None, got {value!r}")
    if math.isnan(value):
        raise ConfigurationError(f"{name} must not be NaN")
    return float(value)


def _positive_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigurationError(f"{name} must be an int >= {low}, got {value!r}")
    return value


class QuarantineStore:
    """The on-disk store of quarantined calls.

    Args:
        directory: where the records live (default: :func:`default_directory`). It is
            created on the first :meth:`add`, with mode ``0o700``; reading a store whose
            directory does not exist yet finds no records.
        max_records: the most records kept; :meth:`add` drops the oldest beyond it.
        retention: seconds a record is kept (None: no age limit); :meth:`add` drops older
            ones.
        max_pickle_bytes: the largest pickled call kept (default 16 MiB); a larger one is not
            written and its record is not replayable.
        max_bytes: the most bytes the records may take together (default 1 GiB; None: no
            limit); :meth:`add` drops the oldest records beyond it (never the newest).

    .. warning::
       The ``.pkl`` files are pickles, and loading a pickle can run arbitrary code: only
       point a store at a directory you trust. That is why the directory is private; on POSIX
       :meth:`load_call` and :meth:`release` refuse a directory or pickle that another user
       owns or can write.

    The store is safe to use from several threads and several processes at once.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        max_records: int = 10_000,
        retention: float | None = 7 * 24 * 3600,
        max_pickle_bytes: int = 16 * 1024 * 1024,
        max_bytes: int | None = 1024 * 1024 * 1024,
    ) -> None:
        self._dir = Path(directory).expanduser() if directory is not None else default_directory()
        self._max_records = _positive_int("max_records", max_records, 1)
        self._max_pickle_bytes = _positive_int("max_pickle_bytes", max_pickle_bytes, 0)
        self._max_bytes = None if max_bytes is None else _positive_int("max_bytes", max_bytes, 1)
        if retention is not None:
            if isinstance(retention, bool) or not isinstance(retention, (int, float)):
                raise ConfigurationError(
                    f"retention must be a number of seconds or None, got {retention!r}"
                )
            if not retention > 0:
                raise ConfigurationError(f"retention must be > 0, got {retention!r}")
        self._retention = None if retention is None else float(retention)
        #: Hooks called with an audit dict after every release / discard (dry runs too).
        self.on_action: list[Callable[[dict[str, Any]], None]] = []
        self._lock = threading.Lock()
        # What the last scan of the directory found, plus this store's adds since.
        self._adds_since = 0
        self._warned: set[str] = set()
        self._enforced_once = False
        self._est_count = 0
        self._est_bytes = 0
        self._est_oldest: float | None = None
        self._last_ns = 0
        self._dir_checked = False

    # -- properties ---------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        """The directory of the store."""
        return self._dir

    def __repr__(self) -> str:
        return f"QuarantineStore({str(self._dir)!r})"

    def __len__(self) -> int:
        """The number of record files (without reading them: corrupt ones count too)."""
        return sum(1 for _ in self._record_names())

    # -- paths and low-level file handling ----------------------------------------------

    def _json_path(self, record_id: str) -> Path:
        return self._dir / f"{record_id}.json"

    def _pkl_path(self, record_id: str) -> Path:
        return self._dir / f"{record_id}.pkl"

    def _now(self) -> float:
        return _clock_ns() / 1e9

    def _new_id(self, token_id: int) -> tuple[str, int]:
        with self._lock:
            ns = max(_clock_ns(), self._last_ns + 1)  # strictly increasing in this store
            self._last_ns = ns
        return f"{ns:020d}-{os.getpid()}-{token_id}-{secrets.token_hex(3)}", ns

    def _ensure_dir(self) -> None:
        if not self._dir.is_dir():
            # Every directory it creates (the parents too) is rwx------, whatever the umask.
            missing = []
            p = self._dir
            while not p.exists() and p != p.parent:
                missing.append(p)
                p = p.parent
            for d in reversed(missing):
                with contextlib.suppress(FileExistsError):
                    d.mkdir(mode=0o700)
                if os.name != "nt":
                    os.chmod(d, 0o700)
        elif not self._dir_checked and os.name != "nt":  # warn once per store
            mode = stat.S_IMODE(self._dir.stat().st_mode)
            if mode & 0o077:
                logger.warning(
                    "quarantine directory %s is open to other users (mode %#o); it holds "
                    "pickles, which are code: chmod 700 it (until then, replays are refused "
                    "if others can write it)",
                    self._dir,
                    mode,
                )
        self._dir_checked = True

    def _fsync_dir(self) -> None:
        if os.name == "nt":
            return
        with contextlib.suppress(OSError):
            fd = os.open(self._dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _atomic_write(self, final: Path, data: bytes | memoryview) -> None:
        """Write ``data`` to ``final`` atomically: a private (0o600) temporary file in the same
        directory, fsync'd, then renamed over ``final``."""
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=self._dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _record_names(self) -> Iterable[str]:
        """Ids of the ``<id>.json`` regular files in the directory (unsorted)."""
        try:
            entries = list(os.scandir(self._dir))
        except FileNotFoundError:
            return []
        ids = []
        for entry in entries:
            name = entry.name
            if not name.endswith(".json"):
                continue
            rid = name[:-5]
            if not _ID_RE.fullmatch(rid):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
            except OSError:
                continue
            ids.append(rid)
        return ids

    def _read_file(self, path: Path, record_id: str) -> QuarantineRecord:
        """Read one record file; FileNotFoundError if it is gone, _Corrupt if it is not a
        record (or not the record its name says)."""
        flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
        flags |= getattr(os, "O_NONBLOCK", 0)  # a FIFO planted here must not block us
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise _Corrupt(f"cannot be read: {_exc_text(exc)}") from None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise _Corrupt("is not a regular file")
            raw = f.read(_MAX_JSON_BYTES + 1)
        if len(raw) > _MAX_JSON_BYTES:
            raise _Corrupt(f"is larger than {_MAX_JSON_BYTES} bytes")
        try:
            data = json.loads(raw.decode("utf-8"))
            record = QuarantineRecord.from_dict(data)
        except (ValueError, UnicodeDecodeError, RecursionError, OverflowError) as exc:
            raise _Corrupt(f"is not a valid record: {_exc_text(exc)}") from None
        if record.record_id != record_id:
            raise _Corrupt(f"holds record {record.record_id!r}, not {record_id!r}")
        return record

    def _check_trusted(self, pkl: Path | None = None) -> None:
        """Refuse to unpickle from a directory (or file) another user owns or can write."""
        if os.name == "nt" or not hasattr(os, "getuid"):
            return
        uid = os.getuid()
        for path, what in ((self._dir, "directory"), (pkl, "pickle")):
            if path is None:
                continue
            try:
                st = os.lstat(path) if what == "pickle" else os.stat(path)
            except FileNotFoundError:
                continue
            problem = None
            if st.st_uid != uid:
                problem = f"it is owned by uid {st.st_uid}, not by this user (uid {uid})"
            elif st.st_mode & 0o022:
                problem = f"others can write it (mode {stat.S_IMODE(st.st_mode):#o})"
            elif what == "pickle" and not stat.S_ISREG(st.st_mode):
                problem = "it is not a regular file"
            if problem:
                raise QuarantineError(
                    f"refusing to load pickles from the quarantine {what} {path}: {problem}; "
                    "pickles are code, so the store must be private (chmod 700 the directory)"
                )

    def _open_trusted(self, pkl: Path) -> io.BufferedReader:
        """``pkl`` opened for reading, checked on the descriptor that is read (not by path, so
        nothing can be swapped in between): the store's directory opened without following a
        link in its last component, owned by this user and writable by no one else, its
        parents writable by no one else (unless sticky, like /tmp), and the pickle a regular
        file of this user with one link that no one else can write."""
        if os.name == "nt" or not hasattr(os, "getuid") or not hasattr(os, "O_NOFOLLOW"):
            return open(pkl, "rb")
        uid = os.getuid()

        def refuse(what: object, problem: str) -> QuarantineError:
            return QuarantineError(
                f"refusing to load pickles from the quarantine store: {what} {problem}; "
                "pickles are code, so the store and its parents must be private"
            )

        for parent in Path(os.path.realpath(self._dir)).parents:
            st = os.stat(parent)
            if st.st_uid not in (0, uid):
                raise refuse(parent, f"is owned by uid {st.st_uid}")
            if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
                raise refuse(parent, f"is writable by others (mode {stat.S_IMODE(st.st_mode):#o})")
        dfd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            st = os.fstat(dfd)
            if st.st_uid != uid or st.st_mode & 0o022:
                raise refuse(self._dir, "is not private to this user")
            fd = os.open(pkl.name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
        finally:
            os.close(dfd)
        st = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = "is not a regular file"
        elif st.st_uid != uid:
            problem = f"is owned by uid {st.st_uid}"
        elif st.st_mode & 0o022:
            problem = f"is writable by others (mode {stat.S_IMODE(st.st_mode):#o})"
        elif st.st_nlink != 1:
            problem = f"has {st.st_nlink} hard links"
        if problem:
            os.close(fd)
            raise refuse(pkl, problem)
        return os.fdopen(fd, "rb")

    # -- adding -------------------------------------------------------------------------

    def add(
        self,
        token_id: int,
        operation_type: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        predicted: float,
        baseline: float,
        deviation: float,
        threshold: float,
        reason: str,
    ) -> QuarantineRecord:
        """Record a quarantined call and return its record.

        The call ``(fn, args, kwargs)`` is pickled (``fn`` by reference, as a plain or guarded
        module-level function is) into ``<record_id>.pkl``; if that fails, or the pickle
        would be larger than ``max_pickle_bytes``, only the record is kept, with
        ``replayable=False`` and the reason. Then the bounds are enforced: records older than
        ``retention`` are dropped, then the oldest beyond ``max_records`` and ``max_bytes``
        (logged at INFO).

        Raises:
            OSError: the record could not be written (nothing is left behind then).
        """
        if isinstance(token_id, bool) or not isinstance(token_id, int):
            raise TypeError(f"token_id must be an int, got {token_id!r}")
        if not isinstance(operation_type, str):
            raise TypeError(f"operation_type must be a str, got {operation_type!r}")
        record_id, ns = self._new_id(token_id)
        summary = summarize_arguments(args, kwargs)
        payload, why = self._pickle_call(fn, args, kwargs)
        record = QuarantineRecord(
            record_id=record_id,
            token_id=token_id,
            operation_type=operation_type,
            quarantined_at=ns / 1e9,
            predicted_duration=float(predicted),
            baseline_duration=float(baseline),
            deviation=float(deviation),
            threshold=float(threshold),
            reason=_cut(str(reason)),
            argument_summary=summary,
            replayable=payload is not None,
            why_not_replayable=why,
            function=_function_name(fn),
        )
        self._ensure_dir()
        pkl = self._pkl_path(record_id)
        if payload is not None:
            self._atomic_write(pkl, payload)
        try:
            # The JSON file is written last: once it exists the record is complete.
            data = json.dumps({"format": _FORMAT, **record.to_dict()}, indent=1)
            self._atomic_write(self._json_path(record_id), data.encode("utf-8"))
        except BaseException:
            if payload is not None:
                with contextlib.suppress(OSError):
                    os.unlink(pkl)
            raise
        self._fsync_dir()
        logger.debug(
            "quarantined token %d of %r: predicted %.3g s vs baseline %.3g s (x%.3g, "
            "threshold x%.3g); record %s%s",
            token_id,
            operation_type,
            record.predicted_duration,
            record.baseline_duration,
            record.deviation,
            record.threshold,
            record_id,
            "" if why is None else " (not replayable)",
        )
        if why is not None:
            logger.warning("quarantine record %s cannot be replayed: %s", record_id, why)
        # The bounds are enforced by a scan of the directory. It runs on the first add, when
        # what this store added since the last scan may have crossed a bound (by its own
        # count: another process's adds are seen at the next scan), and every _ENFORCE_EVERY
        # adds (leftovers of dead processes): a store near its bounds does not rescan on every
        # quarantined call.
        size = len(data) + (0 if payload is None else len(payload))
        with self._lock:
            self._adds_since += 1
            self._est_count += 1
            self._est_bytes += size
            t = record.quarantined_at
            self._est_oldest = t if self._est_oldest is None else min(self._est_oldest, t)
            due = (
                not self._enforced_once
                or self._adds_since >= _ENFORCE_EVERY
                or self._est_count > self._max_records
                or (self._max_bytes is not None and self._est_bytes > self._max_bytes)
                or (
                    self._retention is not None and self._now() - self._est_oldest > self._retention
                )
            )
        if due:
            try:
                self._enforce_bounds()
            except OSError:
                logger.warning(
                    "quarantine store %s: enforcing its bounds failed", self._dir, exc_info=True
                )
        return record

    def _pickle_call(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[memoryview | None, str | None]:
        limit = self._max_pickle_bytes
        too_large = (
            f"the pickled call is larger than max_pickle_bytes ({limit} bytes): it was not kept"
        )
        for what, obj in (("the function", fn), ("arguments", (fn, args, kwargs))):
            buf = _BoundedBuffer(limit)
            try:
                pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
            except _TooLarge:
                return None, too_large
            except Exception as exc:
                return None, f"{what} cannot be pickled: {_exc_text(exc)}"
        return buf.getbuffer(), None

    # -- bounds -------------------------------------------------------------------------

    def _enforce_bounds(self) -> None:
        with self._lock:
            self._enforce_bounds_locked()

    def _enforce_bounds_locked(self) -> None:
        now = self._now()
        wall = time.time()
        records: dict[str, tuple[float, int]] = {}  # id -> (time, size of json)
        pickles: dict[str, tuple[float, int]] = {}  # id -> (mtime, size)
        claims: list[tuple[str, str, float]] = []  # (file name, record id, claim time)
        claimed: set[str] = set()
        temps: list[tuple[str, float]] = []
        try:
            entries = list(os.scandir(self._dir))
        except FileNotFoundError:
            return
        for entry in entries:
            name = entry.name
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if name.startswith(".") and name.endswith(".tmp"):
                temps.append((name, st.st_mtime))
                continue
            stem, dot, ext = name.rpartition(".")
            if dot and ext in ("json", "pkl") and _ID_RE.fullmatch(stem):
                if ext == "json":
                    m = _ID_TIME_RE.match(stem)
                    t = int(m.group(1)) / 1e9 if m else st.st_mtime
                    records[stem] = (t, st.st_size)
                else:
                    pickles[stem] = (st.st_mtime, st.st_size)
                continue
            m = _CLAIM_RE.fullmatch(name)
            if m:
                if _pid_alive(int(m.group(3))):
                    claimed.add(m.group(1))  # a live action's: not ours to restore
                    continue
                claims.append((name, m.group(1), int(m.group(2)) / 1e9))
                claimed.add(m.group(1))
                continue
            m = _REPLAYING_RE.fullmatch(name)
            if m:
                claimed.add(m.group(1))
                if not _pid_alive(int(m.group(3))) and m.group(1) not in self._warned:
                    self._warned.add(m.group(1))
                    logger.warning(
                        "quarantine record %s was being replayed by a process that is gone: "
                        "its call may have run; it is left as %s (rename it to %s.json to "
                        "release it again, or delete it)",
                        m.group(1),
                        self._dir / name,
                        m.group(1),
                    )

        # Leftovers of processes that died mid-write or mid-action.
        for name, rid, claimed_at in claims:
            if now - claimed_at > _STALE_SECONDS and rid not in records:
                try:
                    os.replace(self._dir / name, self._json_path(rid))
                except OSError:
                    continue
                m = _ID_TIME_RE.match(rid)
                records[rid] = (int(m.group(1)) / 1e9 if m else now, 0)
                claimed.discard(rid)
                logger.warning(
                    "quarantine record %s was left claimed by a release/discard that did "
                    "not finish (its process died?); restored it",
                    rid,
                )
        for name, mtime in temps:
            if wall - mtime > _STALE_SECONDS:
                with contextlib.suppress(OSError):
                    os.unlink(self._dir / name)
        for rid, (mtime, _) in list(pickles.items()):
            if rid not in records and rid not in claimed and wall - mtime > _STALE_SECONDS:
                with contextlib.suppress(OSError):
                    os.unlink(self._pkl_path(rid))
                del pickles[rid]

        order = sorted(records, key=lambda r: (records[r][0], r))  # oldest first
        drop_old: list[str] = []
        if self._retention is not None:
            horizon = now - self._retention
            drop_old = [r for r in order if records[r][0] < horizon]
        keep = order[len(drop_old) :]
        over = max(0, len(keep) - self._max_records)
        drop_many, keep = keep[:over], keep[over:]
        drop_big: list[str] = []
        if self._max_bytes is not None:
            total = sum(records[r][1] + pickles.get(r, (0, 0))[1] for r in keep)
            while len(keep) > 1 and total > self._max_bytes:
                rid = keep.pop(0)
                drop_big.append(rid)
                total -= records[rid][1] + pickles.get(rid, (0, 0))[1]
        self._adds_since = 0
        self._enforced_once = True
        self._est_count = len(keep)
        self._est_bytes = sum(records[r][1] + pickles.get(r, (0, 0))[1] for r in keep)
        self._est_oldest = records[keep[0]][0] if keep else None
        dropped = 0
        for rid in (*drop_old, *drop_many, *drop_big):
            try:
                os.unlink(self._json_path(rid))
            except FileNotFoundError:
                continue  # claimed or removed by another process: theirs now
            dropped += 1
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._pkl_path(rid))
        if dropped:
            logger.info(
                "quarantine store %s: dropped %d record(s) (%d past retention, %d beyond "
                "max_records=%d, %d beyond max_bytes)",
                self._dir,
                dropped,
                len(drop_old),
                len(drop_many),
                self._max_records,
                len(drop_big),
            )

    # -- reading ------------------------------------------------------------------------

    def list(
        self,
        *,
        operation: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
    ) -> list[QuarantineRecord]:
        """The records, oldest first, optionally only those of ``operation`` quarantined at
        ``since <= quarantined_at < until`` (UNIX times), at most ``limit`` of them (the
        oldest). A record file that cannot be read as a record is skipped with a WARNING
        naming the file."""
        if operation is not None and not isinstance(operation, str):
            raise InvalidOption(f"operation must be a str or None, got {operation!r}")
        lo = _check_time("since", since)
        hi = _check_time("until", until)
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 0
        ):
            raise ConfigurationError(f"limit must be an int >= 0 or None, got {limit!r}")
        found: list[QuarantineRecord] = []
        for rid in self._record_names():
            m = _ID_TIME_RE.match(rid)
            if m:  # skip files outside the time range without reading them
                t = int(m.group(1)) / 1e9
                if (lo is not None and t < lo) or (hi is not None and t >= hi):
                    continue
            path = self._json_path(rid)
            try:
                record = self._read_file(path, rid)
            except FileNotFoundError:
                continue  # released or discarded meanwhile
            except _Corrupt as exc:
                logger.warning("skipping quarantine record file %s: it %s", path, exc)
                continue
            if operation is not None and record.operation_type != operation:
                continue
            t = record.quarantined_at
            if (lo is not None and t < lo) or (hi is not None and t >= hi):
                continue
            found.append(record)
        found.sort(key=lambda r: (r.quarantined_at, r.record_id))
        return found if limit is None else found[:limit]

    def newest(self, limit: int) -> builtins.list[QuarantineRecord]:
        """The newest ``limit`` records, newest first, reading only as many files as that
        takes (record ids sort by the time they were made). Unreadable files are skipped
        with a WARNING, as in :meth:`list`."""
        limit = _positive_int("limit", limit, 0)
        found: list[QuarantineRecord] = []
        for rid in sorted(self._record_names(), reverse=True):
            if len(found) >= limit:
                break
            path = self._json_path(rid)
            try:
                found.append(self._read_file(path, rid))
            except FileNotFoundError:
                continue
            except _Corrupt as exc:
                logger.warning("skipping quarantine record file %s: it %s", path, exc)
        found.sort(key=lambda r: (r.quarantined_at, r.record_id), reverse=True)
        return found

    def _checked_id(self, record_id: object) -> str:
        if not isinstance(record_id, str) or not _ID_RE.fullmatch(record_id):
            text = repr(record_id)
            raise QuarantineError(f"not a valid quarantine record id: {_cut(text, 80)}")
        return record_id

    def get(self, record_id: str) -> QuarantineRecord:
        """The record ``record_id``.

        Raises:
            QuarantineError: there is no such record (or its file is corrupt; the message
                names the file).
        """
        rid = self._checked_id(record_id)
        path = self._json_path(rid)
        try:
            return self._read_file(path, rid)
        except FileNotFoundError:
            raise QuarantineError(f"no quarantine record {rid!r} in {self._dir}") from None
        except _Corrupt as exc:
            raise QuarantineError(f"quarantine record file {path} {exc}") from None

    def load_call(
        self, record_id: str
    ) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
        """Unpickle the call of record ``record_id``: ``(fn, args, kwargs)``.

        This imports ``fn``'s module and runs whatever the pickle holds: only use it on a
        store you trust (see the class docstring).

        Raises:
            QuarantineError: no such record, it is not replayable, the directory is not
                private, or the pickle cannot be loaded.
        """
        record = self.get(record_id)
        if not record.replayable:
            raise QuarantineError(
                f"quarantine record {record.record_id} is not replayable: "
                f"{record.why_not_replayable}"
            )
        return self._load_pickle(record.record_id)

    def _load_pickle(self, rid: str) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
        pkl = self._pkl_path(rid)
        self._check_trusted(pkl)
        try:
            with self._open_trusted(pkl) as f:
                call = pickle.load(f)
        except QuarantineError:
            raise
        except FileNotFoundError:
            raise QuarantineError(
                f"the call data of quarantine record {rid} is missing ({pkl})"
            ) from None
        except Exception as exc:
            hint = ""
            if "__main__" in str(exc):
                hint = (
                    " (its function is defined in the program's __main__, which only that "
                    "program can import: release it there with guard_house.release(), or define "
                    "the function in an importable module)"
                )
            raise QuarantineError(
                f"cannot load the call of quarantine record {rid}: {_exc_text(exc)}{hint}"
            ) from exc
        if not (
            type(call) is tuple
            and len(call) == 3
            and callable(call[0])
            and type(call[1]) is tuple
            and type(call[2]) is dict
        ):
            raise QuarantineError(f"{pkl} does not hold a call (fn, args, kwargs)")
        return call[0], call[1], call[2]

    # -- claims -------------------------------------------------------------------------

    def _claim(self, rid: str) -> Path | None:
        """Take record ``rid`` for this action by renaming its JSON file (atomic: of two
        processes, one wins); None if it is already gone."""
        claim = self._dir / f"{rid}.claim-{_clock_ns()}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.rename(self._json_path(rid), claim)
        except FileNotFoundError:
            return None
        return claim

    def _unclaim(self, claim: Path, rid: str) -> None:
        try:
            os.replace(claim, self._json_path(rid))
        except OSError:
            logger.error(
                "could not restore quarantine record %s from %s", rid, claim, exc_info=True
            )

    def _remove_claimed(self, claim: Path, rid: str) -> None:
        # The claim first: a pickle left without it is an orphan, cleaned up later.
        for path in (claim, self._pkl_path(rid)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError:  # the action happened: report it done, but say what is left
                logger.error(
                    "could not remove %s of quarantine record %s", path, rid, exc_info=True
                )

    # -- actions ------------------------------------------------------------------------

    @staticmethod
    def _as_ids(record_ids: str | Iterable[str] | None) -> builtins.list[Any] | None:
        if record_ids is None:
            return None
        return [record_ids] if isinstance(record_ids, str) else list(record_ids)

    def _select(
        self,
        ids: builtins.list[Any] | None,
        operation: str | None,
        since: float | None,
        until: float | None,
    ) -> tuple[builtins.list[QuarantineRecord], dict[str, str]]:
        has_filter = operation is not None or since is not None or until is not None
        failed: dict[str, str] = {}
        if ids is None:
            if not has_filter:
                raise QuarantineError("give record ids or a filter (operation, since, until)")
            return self.list(operation=operation, since=since, until=until), failed
        if has_filter:
            raise QuarantineError("give record ids or a filter (operation, since, until), not both")
        if not ids:
            raise QuarantineError("give record ids or a filter (operation, since, until)")
        selected = []
        for rid in dict.fromkeys(ids):
            if not isinstance(rid, str) or not _ID_RE.fullmatch(rid):
                failed[_cut(str(rid), 130)] = "not a valid record id"
                continue
            try:
                selected.append(self._read_file(self._json_path(rid), rid))
            except FileNotFoundError:
                failed[rid] = "no such record"
            except _Corrupt as exc:
                failed[rid] = f"corrupt record file {self._json_path(rid)}: it {exc}"
        selected.sort(key=lambda r: (r.quarantined_at, r.record_id))
        return selected, failed

    def release(
        self,
        record_ids: str | Iterable[str] | None = None,
        *,
        operation: str | None = None,
        since: float | None = None,
        until: float | None = None,
        dry_run: bool = False,
        replay: ReplayFunction,
    ) -> ActionResult:
        """Replay quarantined calls and remove their records.

        Selects the records ``record_ids``, or those matching the filter (``operation``,
        quarantined at ``since <= t < until``); one of the two is required. For each selected
        record, oldest first, it claims the record (so no other process replays it too),
        loads the call and calls ``replay(fn, args, kwargs)``, which should submit it as a
        new token through the normal gate (only the spike check skipped) and return the
        token. When ``replay`` returns, the record is removed and what it returned goes to
        ``results``; a record that is not replayable, cannot be loaded, whose replay raised,
        or that another process took first (``"already gone"``) is reported in ``failed``
        (and stays, unless it is gone).

        ``dry_run=True`` touches nothing (loads no pickle, calls no ``replay``) and reports
        what would be released: the same selection, ``done`` the records that are
        replayable and whose call data is present and trusted.

        Every call (dry runs too) is audited: see :attr:`on_action`.

        Raises:
            QuarantineError: neither ids nor a filter were given, or both.
        """
        ids = self._as_ids(record_ids)
        selected, failed = self._select(ids, operation, since, until)
        result = ActionResult("release", bool(dry_run), selected, failed=failed)
        try:
            try:
                self._check_trusted()
                untrusted = None
            except QuarantineError as exc:
                untrusted = str(exc)
            for record in selected:
                rid = record.record_id
                if not record.replayable:
                    failed[rid] = f"not replayable: {record.why_not_replayable}"
                    continue
                if untrusted is not None:
                    failed[rid] = untrusted
                    continue
                if dry_run:
                    pkl = self._pkl_path(rid)
                    if not self._json_path(rid).exists():
                        failed[rid] = "already gone"
                    elif not pkl.exists():
                        failed[rid] = f"the call data is missing ({pkl})"
                    else:
                        try:
                            self._check_trusted(pkl)
                        except QuarantineError as exc:
                            failed[rid] = str(exc)
                        else:
                            result.done.append(rid)
                    continue
                self._release_one(rid, replay, result)
        finally:
            self._audit(result, ids, operation, since, until)
        return result

    def _release_one(self, rid: str, replay: ReplayFunction, result: ActionResult) -> None:
        claim = self._claim(rid)
        if claim is None:
            result.failed[rid] = "already gone"
            return
        try:
            try:
                fn, args, kwargs = self._load_pickle(rid)
            except QuarantineError as exc:
                self._unclaim(claim, rid)
                result.failed[rid] = str(exc)
                return
            # From here on the record is marked as replaying: a process that dies during the
            # replay leaves it so, never released again by itself (at most once).
            replaying = self._dir / claim.name.replace(".claim-", ".replaying-", 1)
            os.rename(claim, replaying)
            claim = replaying
            try:
                out = replay(fn, args, kwargs)
            except Exception as exc:
                self._unclaim(claim, rid)
                result.failed[rid] = f"replay raised {_exc_text(exc)}"
                logger.warning(
                    "replaying quarantine record %s raised %s",
                    rid,
                    _exc_text(exc),
                    exc_info=logger.isEnabledFor(logging.DEBUG),
                )
                return
        except BaseException:  # KeyboardInterrupt and the like: put the record back
            self._unclaim(claim, rid)
            raise
        self._remove_claimed(claim, rid)
        result.done.append(rid)
        result.results.append(out)

    def discard(
        self,
        record_ids: str | Iterable[str] | None = None,
        *,
        operation: str | None = None,
        since: float | None = None,
        until: float | None = None,
        dry_run: bool = False,
    ) -> ActionResult:
        """Remove records without running them.

        The selection works as in :meth:`release` (ids, or a filter; one is required).
        ``dry_run=True`` touches nothing and reports what would be removed. Records another
        process removed first are reported in ``failed`` as ``"already gone"``. Audited like
        :meth:`release`.

        Raises:
            QuarantineError: neither ids nor a filter were given, or both.
        """
        ids = self._as_ids(record_ids)
        selected, failed = self._select(ids, operation, since, until)
        result = ActionResult("discard", bool(dry_run), selected, failed=failed)
        try:
            for record in selected:
                rid = record.record_id
                if dry_run:
                    if self._json_path(rid).exists():
                        result.done.append(rid)
                    else:
                        failed[rid] = "already gone"
                    continue
                claim = self._claim(rid)
                if claim is None:
                    failed[rid] = "already gone"
                    continue
                self._remove_claimed(claim, rid)
                result.done.append(rid)
        finally:
            self._audit(result, ids, operation, since, until)
        return result

    def _audit(
        self,
        result: ActionResult,
        record_ids: builtins.list[Any] | None,
        operation: str | None,
        since: float | None,
        until: float | None,
    ) -> None:
        ids = None if record_ids is None else [_cut(str(r), 130) for r in record_ids]
        audit: dict[str, Any] = {
            "time": self._now(),
            "action": result.action,
            "dry_run": result.dry_run,
            "records": [r.record_id for r in result.selected],
            "done": list(result.done),
            "failed": dict(result.failed),
            "filter": {
                "record_ids": ids,
                "operation": operation,
                "since": since,
                "until": until,
            },
            "directory": str(self._dir),
        }

        def some(items: Iterable[Any], n: int = 20) -> str:
            items = list(items)
            more = f" …+{len(items) - n} more" if len(items) > n else ""
            return ", ".join(map(str, items[:n])) + more

        logger.info(
            "quarantine %s%s in %s: %d selected, %d done [%s], %d failed [%s]; filter %s",
            result.action,
            " (dry run)" if result.dry_run else "",
            self._dir,
            len(result.selected),
            len(result.done),
            some(result.done),
            len(result.failed),
            some(f"{k}: {v}" for k, v in result.failed.items()),
            {k: v for k, v in audit["filter"].items() if v is not None},
        )
        for hook in list(self.on_action):
            try:
                hook(copy.deepcopy(audit))
            except Exception:
                logger.error(
                    "quarantine on_action hook %s raised", _function_name(hook), exc_info=True
                )
