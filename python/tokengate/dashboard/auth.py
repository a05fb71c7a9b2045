"""Users, roles, password hashes, sessions, CSRF tokens and the login throttle.

Passwords are stored only as argon2id hashes (argon2-cffi's ``PasswordHasher`` with its
defaults); ``tokengate dashboard hash-password`` makes one. Sessions live in memory on the
server: the browser holds a random id in an HttpOnly, SameSite=Strict cookie; the store keeps
only a SHA-256 of it, with the user, role, CSRF token and expiry.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
import tomllib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from argon2 import PasswordHasher, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError

from ..errors import ConfigurationError

__all__ = [
    "ROLES",
    "VERIFICATIONS",
    "LoginThrottle",
    "Refusal",
    "Session",
    "SessionStore",
    "User",
    "VerificationSlots",
    "hash_password",
    "load_users_file",
    "parse_users",
    "resolve_users",
    "role_at_least",
    "verify_password",
]

log = logging.getLogger("tokengate.dashboard")

#: The roles, weakest first; each may do what the ones before it may.
ROLES: Final = ("viewer", "operator", "admin")

ENV_USERS: Final = "TOKENGATE_DASHBOARD_USERS"
ENV_USERS_FILE: Final = "TOKENGATE_DASHBOARD_USERS_FILE"

#: Longest password verified (argon2 hashes any length; a megabyte-long one is a DoS).
MAX_PASSWORD: Final = 1024
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.@+-]{1,64}")

_hasher = PasswordHasher()  # argon2id, argon2-cffi's (RFC 9106 low-memory) defaults
_dummy_lock = threading.Lock()
_dummy_hashes: dict[str, str] = {}


def role_at_least(role: str, needed: str) -> bool:
    """Whether ``role`` may do what ``needed`` may (both from :data:`ROLES`)."""
    return ROLES.index(role) >= ROLES.index(needed)


def hash_password(password: str) -> str:
    """The argon2id hash of ``password`` (a ``$argon2id$v=19$...`` string) to put in the
    users configuration."""
    if not isinstance(password, str) or not password:
        raise ConfigurationError("a password must be a non-empty str")
    if len(password) > MAX_PASSWORD:
        raise ConfigurationError(f"a password must be at most {MAX_PASSWORD} characters")
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """Whether ``password`` matches ``password_hash`` (an argon2 hash); False for a hash
    that is not one, never raises for a wrong password."""
    if not isinstance(password, str) or not isinstance(password_hash, str):
        return False
    if len(password) > MAX_PASSWORD:
        return False
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def _burn_time(password: str, like: str | None) -> None:
    """Spends the time of a verification, for an unknown user name (so the response time
    does not tell which names exist): against a hash made with the parameters of ``like``
    (a configured user's hash), or argon2-cffi's defaults."""
    try:
        params = extract_parameters(like) if like else None
    except InvalidHashError:
        params = None
    key = repr(params)
    with _dummy_lock:
        dummy = _dummy_hashes.get(key)
        if dummy is None:
            hasher = _hasher if params is None else PasswordHasher.from_parameters(params)
            dummy = _dummy_hashes[key] = hasher.hash(secrets.token_urlsafe(16))
            while len(_dummy_hashes) > 8:
                del _dummy_hashes[next(iter(_dummy_hashes))]
    verify_password(dummy, password[:MAX_PASSWORD])


@dataclass(frozen=True)
class User:
    """A dashboard user: its name, role (from :data:`ROLES`) and argon2 password hash."""

    name: str
    role: str
    password_hash: str

    def __repr__(self) -> str:  # never print the hash
        return f"User(name={self.name!r}, role={self.role!r})"

    def check(self, password: str) -> bool:
        """Whether ``password`` is this user's."""
        return verify_password(self.password_hash, password)


def _make_user(name: object, role: object, password_hash: object, where: str) -> User:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigurationError(
            f"{where}: user name {name!r} is not valid (1 to 64 of letters, digits, _ . @ + -)"
        )
    if role not in ROLES:
        raise ConfigurationError(
            f"{where}: user {name!r} has an unknown role {role!r}; valid roles: {', '.join(ROLES)}"
        )
    if not isinstance(password_hash, str) or not password_hash.startswith("$argon2"):
        raise ConfigurationError(
            f"{where}: the password of user {name!r} is not an argon2 hash (plain text "
            "passwords are refused); make one with `tokengate dashboard hash-password`"
        )
    try:
        extract_parameters(password_hash)
    except InvalidHashError:
        raise ConfigurationError(
            f"{where}: the password hash of user {name!r} is not a valid argon2 hash; make "
            "one with `tokengate dashboard hash-password`"
        ) from None
    return User(name, str(role), password_hash)


def parse_users(text: str, where: str = f"${ENV_USERS}") -> dict[str, User]:
    """Users from the environment format: ``name:role:hash`` entries separated by ``;`` or
    newlines (argon2 hashes never contain either separator, nor ``:``)."""
    if not isinstance(text, str):
        raise ConfigurationError(f"{where}: users must be a str, got {type(text).__name__}")
    users: dict[str, User] = {}
    for entry in re.split(r"[;\n]", text):
        entry = entry.strip()
        if not entry:
            continue
        parts = entry.split(":")
        if len(parts) != 3:
            name = parts[0] if parts else entry
            raise ConfigurationError(
                f"{where}: entry for {name!r} is not name:role:hash (the hash is made by "
                "`tokengate dashboard hash-password`)"
            )
        user = _make_user(parts[0].strip(), parts[1].strip(), parts[2].strip(), where)
        if user.name in users:
            raise ConfigurationError(f"{where}: user {user.name!r} is given twice")
        users[user.name] = user
    if not users:
        raise ConfigurationError(f"{where}: no users given")
    return users


def load_users_file(path: str | os.PathLike[str]) -> dict[str, User]:
    """Users from a TOML file::

    [users.alice]
    role = "admin"
    password_hash = "$argon2id$v=19$..."
    """
    where = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigurationError(f"cannot read the users file {where!r}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"users file {where!r} is not valid TOML: {exc}") from None
    table = data.get("users")
    if not isinstance(table, dict) or not table:
        raise ConfigurationError(f"users file {where!r} has no [users.NAME] tables")
    users: dict[str, User] = {}
    for name, entry in table.items():
        if not isinstance(entry, dict):
            raise ConfigurationError(f"{where}: users.{name} must be a table")
        if "password" in entry:
            raise ConfigurationError(
                f"{where}: user {name!r} has a plain text password (refused); put its "
                "argon2 hash in password_hash, made with `tokengate dashboard hash-password`"
            )
        unknown = set(entry) - {"role", "password_hash"}
        if unknown:
            raise ConfigurationError(
                f"{where}: users.{name} has unknown keys {sorted(unknown)}; "
                "valid: role, password_hash"
            )
        users[name] = _make_user(name, entry.get("role"), entry.get("password_hash"), where)
    return users


def _from_mapping(users: Mapping[str, Any]) -> dict[str, User]:
    out: dict[str, User] = {}
    for name, value in users.items():
        if isinstance(value, User):
            out[name] = _make_user(value.name, value.role, value.password_hash, "users")
            continue
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise ConfigurationError(
                f"users: the entry of {name!r} must be (role, password_hash), got {value!r}"
            )
        out[name] = _make_user(name, value[0], value[1], "users")
    if not out:
        raise ConfigurationError("users: no users given")
    return out


def resolve_users(
    users: Mapping[str, Any] | str | None = None,
    users_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[dict[str, User], str | None]:
    """The configured users and, when none is configured anywhere, the generated password
    of the ``admin`` user made instead (logged once at WARNING).

    Precedence: ``users`` (a mapping ``{name: (role, password_hash)}`` or the environment
    format), ``users_file``, ``$TOKENGATE_DASHBOARD_USERS``,
    ``$TOKENGATE_DASHBOARD_USERS_FILE``."""
    env = os.environ if environ is None else environ
    if users is not None:
        if isinstance(users, str):
            return parse_users(users, "users"), None
        if isinstance(users, Mapping):
            return _from_mapping(users), None
        raise ConfigurationError(
            f"users must be a mapping or a str in the name:role:hash format, got "
            f"{type(users).__name__}"
        )
    if users_file is not None:
        if not isinstance(users_file, (str, os.PathLike)):
            raise ConfigurationError(f"users_file must be a path, got {users_file!r}")
        return load_users_file(users_file), None
    text = env.get(ENV_USERS, "").strip()
    if text:
        return parse_users(text), None
    file = env.get(ENV_USERS_FILE, "").strip()
    if file:
        return load_users_file(Path(file).expanduser()), None
    password = secrets.token_urlsafe(16)
    log.warning(
        "no dashboard users are configured: log in as 'admin' with password %s "
        "(set $%s or $%s, or pass users=, to choose users)",
        password,
        ENV_USERS,
        ENV_USERS_FILE,
    )
    return {"admin": User("admin", "admin", _hasher.hash(password))}, password


def authenticate(users: Mapping[str, User], name: str, password: str) -> User | None:
    """The user ``name`` if ``password`` is theirs, else None; takes about as long for an
    unknown name as for a wrong password."""
    user = users.get(name) if isinstance(name, str) else None
    if user is None:
        like = next(iter(users.values())).password_hash if users else None
        _burn_time(password if isinstance(password, str) else "", like)
        return None
    return user if user.check(password) else None


# -- sessions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    """A logged-in browser: who, with which role, its CSRF token and when it expires (on the
    store's monotonic clock)."""

    key: str  # SHA-256 of the cookie value
    user: str
    role: str
    csrf_token: str
    expires_at: float

    def __repr__(self) -> str:
        return f"Session(user={self.user!r}, role={self.role!r}, expires_at={self.expires_at})"


def _key(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()


#: Sessions one user may hold at once (a new login beyond drops that user's oldest).
MAX_SESSIONS_PER_USER: Final = 20


class SessionStore:
    """Server-side sessions (thread-safe). At most ``max_per_user`` live at once for one
    user (beyond, that user's oldest is dropped, so one account cannot log the others out
    by logging in again and again) and ``max_sessions`` in all (beyond, the oldest)."""

    def __init__(
        self,
        lifetime: float,
        clock: Callable[[], float] = time.monotonic,
        max_sessions: int = 1000,
        max_per_user: int = MAX_SESSIONS_PER_USER,
    ) -> None:
        self.lifetime = lifetime
        self._clock = clock
        self._max = max_sessions
        self._max_per_user = max_per_user
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def create(self, user: str, role: str) -> tuple[str, Session]:
        """A new session; returns the cookie value (never stored) and the session."""
        session_id = secrets.token_urlsafe(32)
        session = Session(
            key=_key(session_id),
            user=user,
            role=role,
            csrf_token=secrets.token_urlsafe(32),
            expires_at=self._clock() + self.lifetime,
        )
        with self._lock:
            self._prune()
            mine = [k for k, s in self._sessions.items() if s.user == user]
            for key in mine[: max(0, len(mine) - self._max_per_user + 1)]:
                del self._sessions[key]  # the user's oldest first
            while len(self._sessions) >= self._max:
                self._sessions.popitem(last=False)
            self._sessions[session.key] = session
        return session_id, session

    def get(self, session_id: object) -> Session | None:
        """The live session of the cookie value ``session_id``, else None (an expired one
        is dropped)."""
        if not isinstance(session_id, str) or not session_id or len(session_id) > 200:
            return None
        return self.by_key(_key(session_id))

    def by_key(self, key: str) -> Session | None:
        """The live session stored under ``key`` (:attr:`Session.key`), else None."""
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                return None
            if self._clock() >= session.expires_at:
                del self._sessions[key]
                return None
            return session

    def drop(self, session_id: object) -> Session | None:
        """Ends the session of cookie value ``session_id``; returns it if it was live."""
        if not isinstance(session_id, str) or not session_id:
            return None
        with self._lock:
            session = self._sessions.pop(_key(session_id), None)
        if session is not None and self._clock() >= session.expires_at:
            return None
        return session

    def _prune(self) -> None:
        now = self._clock()
        for key in [k for k, s in self._sessions.items() if now >= s.expires_at]:
            del self._sessions[key]

    def __len__(self) -> int:
        with self._lock:
            self._prune()
            return len(self._sessions)


# -- CSRF for the login form ---------------------------------------------------------------


def login_csrf_token(secret: bytes, nonce: str) -> str:
    """The login form's CSRF token for the nonce of the browser's ``tokengate_login``
    cookie: HMAC-SHA256(secret, nonce)."""
    message = b"login:" + nonce.encode("utf-8", "surrogatepass")
    return hmac.new(secret, message, "sha256").hexdigest()


def check_login_csrf(secret: bytes, nonce: object, token: object) -> bool:
    """Whether ``token`` is the login CSRF token of ``nonce`` (constant-time)."""
    if not isinstance(nonce, str) or not isinstance(token, str) or not nonce or not token:
        return False
    if len(nonce) > 200 or len(token) > 200:
        return False
    return hmac.compare_digest(login_csrf_token(secret, nonce), token)


def same_token(expected: str, given: object) -> bool:
    """Constant-time comparison of a CSRF token with what a client sent."""
    if not isinstance(given, str) or not given or len(given) > 200:
        return False
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "surrogatepass"))


# -- the login throttle ---------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """Why :class:`LoginThrottle` refuses a login attempt without checking its password.

    Attributes:
        wait: seconds before the client should try again (at least 1).
        locked: True while the client is locked out; False when its budget of attempts is
            taken by attempts still being checked (parallel requests).
        audit: True for the first refusal of a lockout (or of a burst of parallel
            attempts); audit only those, so refusals cannot flood the audit log.
    """

    wait: float
    locked: bool
    audit: bool


@dataclass
class _Client:
    failures: list[float]
    checks: list[float] = field(default_factory=list)
    in_flight: int = 0
    until: float | None = None
    refusal_audited: bool = False


class LoginThrottle:
    """Counts failed logins per client address: ``max_failures`` within ``window`` seconds
    lock the client out for ``lockout`` seconds from the last of them. Thread-safe; the
    clock is injectable (monotonic seconds). At most ``max_clients`` are tracked (the
    stalest are forgotten first).

    An attempt that checks a password first takes a slot with :meth:`reserve` (under the
    lock, before the slow verification) and gives it back with :meth:`release`: a client
    with ``max_failures`` failures and attempts in flight within the window is refused, so
    parallel requests cannot get more than ``max_failures`` password checks before the
    lockout. A successful login never clears the failures of the address (another user of
    the same address, or an insider with an account of their own, could otherwise reset the
    count between guesses): failures expire by time only."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_failures: int = 5,
        window: float = 60.0,
        lockout: float = 60.0,
        max_checks: int = 20,
        max_clients: int = 10_000,
    ) -> None:
        self._clock = clock
        self.max_failures = max_failures
        self.max_checks = max_checks
        self.window = window
        self.lockout = lockout
        self._max = max_clients
        self._lock = threading.Lock()
        self._clients: OrderedDict[str, _Client] = OrderedDict()

    def _entry(self, client: str, now: float) -> _Client:
        """The client's entry with its lockout ended and old failures dropped (lock held)."""
        entry = self._clients.pop(client, None)
        if entry is None:
            entry = _Client([])
        if entry.until is not None and now >= entry.until:
            entry.until = None
            entry.failures = []
            entry.refusal_audited = False
        entry.failures = [t for t in entry.failures if now - t < self.window]
        entry.checks = [t for t in entry.checks if now - t < self.window]
        if (
            not entry.failures
            and not entry.in_flight
            and entry.until is None
            and len(entry.checks) < self.max_checks
        ):
            entry.refusal_audited = False
        self._clients[client] = entry  # the most recently used last
        while len(self._clients) > self._max:
            self._clients.popitem(last=False)
        return entry

    def _refusal(self, entry: _Client, now: float) -> Refusal | None:
        if entry.until is not None:
            locked, wait = True, entry.until - now
        elif len(entry.failures) + entry.in_flight >= self.max_failures:
            locked, wait = False, 1.0
        elif len(entry.checks) >= self.max_checks:
            # Successful checks count too: an account must not buy unlimited argon2 work.
            locked, wait = False, self.window - (now - entry.checks[0])
        else:
            return None
        first = not entry.refusal_audited
        entry.refusal_audited = True
        return Refusal(max(1.0, wait), locked, first)

    def locked_for(self, client: str) -> float | None:
        """Seconds the client stays locked out, or None if it is not locked out."""
        now = self._clock()
        with self._lock:
            entry = self._clients.get(client)
            if entry is None or entry.until is None:
                return None
            if now >= entry.until:
                self._entry(client, now)
                return None
            return entry.until - now

    def check(self, client: str) -> Refusal | None:
        """The refusal of a client that is locked out or has its budget in flight, else
        None (reserves nothing: for attempts that check no password)."""
        now = self._clock()
        with self._lock:
            return self._refusal(self._entry(client, now), now)

    def reserve(self, client: str) -> Refusal | None:
        """Takes a slot for an attempt that will check a password: None if taken (then call
        :meth:`release` exactly once), else the :class:`Refusal` (check nothing)."""
        now = self._clock()
        with self._lock:
            entry = self._entry(client, now)
            refusal = self._refusal(entry, now)
            if refusal is None:
                entry.in_flight += 1
                entry.checks.append(now)
            return refusal

    def release(self, client: str, failed: bool) -> bool:
        """Gives back the slot of :meth:`reserve`, counting a failure if ``failed``; True
        if that failure locks the client out (the lockout starts now)."""
        now = self._clock()
        with self._lock:
            entry = self._entry(client, now)
            entry.in_flight = max(0, entry.in_flight - 1)
            return self._fail(entry, now) if failed else False

    def failure(self, client: str) -> bool:
        """Counts a failed attempt that took no slot (e.g. a login without its CSRF token);
        True if it locks the client out (the lockout starts)."""
        now = self._clock()
        with self._lock:
            return self._fail(self._entry(client, now), now)

    def _fail(self, entry: _Client, now: float) -> bool:
        if entry.until is not None:
            return False  # already locked out: not a new lockout
        entry.failures.append(now)
        if len(entry.failures) < self.max_failures:
            return False
        entry.failures = []
        entry.until = now + self.lockout
        entry.refusal_audited = False  # audit the first refusal of this lockout
        return True


# -- bounding the password verifications -----------------------------------------------------

#: How many password verifications may run at once in the process (argon2-cffi's defaults
#: take 64 MiB each, and unauthenticated clients can ask for them).
VERIFY_SLOTS: Final = 2
#: Seconds a login waits for a verification slot before it is answered "busy" (503).
VERIFY_WAIT: Final = 1.0


class VerificationSlots:
    """A bound on concurrent password verifications: :meth:`acquire` waits at most
    ``wait`` seconds for one of ``slots``; :meth:`release` gives it back."""

    def __init__(self, slots: int = VERIFY_SLOTS, wait: float = VERIFY_WAIT) -> None:
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ConfigurationError(f"slots must be an int >= 1, got {slots!r}")
        self.slots = slots
        self.wait = wait
        self._sem = threading.BoundedSemaphore(slots)

    def acquire(self) -> bool:
        """Whether a slot was taken within ``wait`` seconds."""
        return self._sem.acquire(timeout=self.wait)

    def release(self) -> None:
        """Gives a slot back."""
        self._sem.release()


#: The process's bound (memory is per process, whatever the number of dashboards).
VERIFICATIONS: Final = VerificationSlots()
