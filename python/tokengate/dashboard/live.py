"""The dashboard's Socket.IO side: connection checks, the state publisher with per-client
flow control, and the ``control`` event.

Flow control: a ``state`` message is sent with an acknowledgement callback, and a client gets
nothing more until it acknowledges (it does once it has drawn the snapshot); then, if a newer
snapshot exists, it gets the newest at once. So at most one snapshot per client is in flight,
a slow browser costs one snapshot of memory, and nothing waits for it.

Threads: the publisher thread (``tokengate-dashboard-publisher``) builds a snapshot every
``update_interval`` seconds (sooner after a control action) and pushes it when it changed;
Socket.IO handlers and acknowledgements run on the server's threads. The client table is
guarded by one lock, and no lock is held while a message is emitted.
"""

from __future__ import annotations

import itertools
import json
import logging
import socket as socketlib
import threading
import time
import urllib.parse
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, NoReturn

from flask import request
from flask_socketio import ConnectionRefusedError, SocketIO
from socketio import packet
from werkzeug.http import parse_cookie

from .audit import Once
from .auth import SessionStore, same_token
from .controls import Controls, actions_for, launchables_of

if TYPE_CHECKING:
    from ..coordinator import OperationsCoordinator
    from .audit import AuditLog
    from .state import StateBuilder

__all__ = [
    "MAX_SOCKETS",
    "MAX_SOCKETS_PER_USER",
    "SESSION_COOKIE",
    "LiveHub",
    "SocketGate",
    "own_origin",
]

log = logging.getLogger("tokengate.dashboard")

SESSION_COOKIE: Final = "tokengate_session"
#: A client whose session ended is disconnected this long after it was told (so the
#: acknowledgement of its refused control reaches it first).
_DISCONNECT_GRACE: Final = 0.25
#: At most one ``connect refused`` audit record per client address in this many seconds.
_ORIGIN_AUDIT_EVERY: Final = 10.0
#: Seconds after a refused WebSocket connect before its TCP connection is cut.
_REFUSED_CUT_AFTER: Final = 1.0
#: Engine.IO connections one user may hold at once, over all their sessions (a browser tab
#: holds one).
MAX_SOCKETS_PER_USER: Final = 16
#: Engine.IO connections the dashboard holds at once, in all.
MAX_SOCKETS: Final = 256
#: The WSGI environ keys under which :class:`SocketGate` leaves a new connection's own id and
#: its user (Flask-SocketIO keeps a copy of the environ: the id says they are one connection).
_CONN_ENV: Final = "tokengate.connection"
_USER_ENV: Final = "tokengate.user"

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment


def own_origin(environ: Mapping[str, Any]) -> str | None:
    """``scheme://host[:port]`` of a request, from its WSGI environ (after any proxy fix)."""
    host = environ.get("HTTP_HOST") or ""
    scheme = environ.get("wsgi.url_scheme") or "http"
    if not host:
        return None
    return f"{scheme}://{host}".lower()


@dataclass
class _Client:
    sid: str
    session_key: str
    user: str
    role: str
    address: str | None
    in_flight: bool = True
    sent_version: int = -1
    disconnect_at: float | None = None


class LiveHub:
    """The Socket.IO handlers and the state publisher of one dashboard app.

    Args:
        socketio: the app's ``SocketIO``.
        coordinator: the coordinator shown.
        state: builds snapshots.
        sessions: the session store (a socket needs a live session).
        controls: runs ``control`` actions.
        audit: the audit log.
        update_interval: seconds between snapshots.
        allowed_origins: origins accepted besides the server's own.
        clock: monotonic clock (sessions use the same one).
    """

    def __init__(
        self,
        socketio: SocketIO,
        coordinator: OperationsCoordinator,
        state: StateBuilder,
        sessions: SessionStore,
        controls: Controls,
        audit: AuditLog,
        *,
        update_interval: float,
        allowed_origins: Collection[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sio = socketio
        self._coord = coordinator
        self._state = state
        self._sessions = sessions
        self._controls = controls
        self._audit = audit
        self._interval = update_interval
        self._allowed = frozenset(o.lower() for o in allowed_origins)
        self._clock = clock
        self._lock = threading.Lock()
        self._publish_lock = threading.Lock()
        self._clients: dict[str, _Client] = {}
        self._version = 0
        self._latest: dict[str, Any] | None = None
        self._fingerprint: str | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._origin_audited = Once(_ORIGIN_AUDIT_EVERY)
        self._pending: dict[int, str] = {}  # connection id -> user, being handshaken
        self._connections = itertools.count(1)
        self.max_per_user = MAX_SOCKETS_PER_USER
        self.max_sockets = MAX_SOCKETS
        self._register()

    # -- origin checks --------------------------------------------------------------------

    def origin_allowed(self, origin: object, environ: Mapping[str, Any]) -> bool:
        """Whether ``origin`` is the server's own or an allowed one; a mismatch is audited
        (at most once per client address every 10 s). Also Engine.IO's
        ``cors_allowed_origins`` check, so a request from another origin is refused before
        it reaches Socket.IO."""
        if isinstance(origin, str) and origin:
            o = origin.lower()
            if o == own_origin(environ) or o in self._allowed:
                return True
        if not origin:
            # No Origin: a same-origin polling request (Engine.IO asks for every response)
            # or a client that is no browser; nothing to log, and the session cookie and
            # CSRF token are still needed.
            return False
        address = environ.get("REMOTE_ADDR")
        log.info("dashboard connection refused: origin %r is not allowed", origin)
        self._audit_origin(str(origin), address)
        return False

    def admit(self, environ: dict[str, Any], new: bool) -> tuple[str, str] | None:
        """Whether a request to Engine.IO may go on: None if so, else the HTTP status line
        and the reason. It needs a live session cookie and, when it sends an ``Origin``,
        an allowed one; a ``new`` connection (no ``sid``) must also stay within
        :data:`MAX_SOCKETS_PER_USER` and :data:`MAX_SOCKETS`. Called by
        :class:`SocketGate`, which then calls :meth:`admitted` when Engine.IO is done."""
        origin = environ.get("HTTP_ORIGIN")
        if origin and not self.origin_allowed(origin, environ):
            return "403 Forbidden", "connection refused: origin not allowed"
        cookies = parse_cookie(environ.get("HTTP_COOKIE", ""))
        session = self._sessions.get(cookies.get(SESSION_COOKIE))
        if session is None:
            return "401 Unauthorized", "connection refused: log in first"
        if not new:
            return None
        with self._lock:
            owners = {
                e.get(_CONN_ENV, id(e)): e.get(_USER_ENV)
                for e in list(self._sio.server.environ.values())
            }
            owners.update(self._pending)
            if len(owners) >= self.max_sockets:
                refused = "503 Service Unavailable", "too many connections to the dashboard"
            elif sum(1 for u in owners.values() if u == session.user) >= self.max_per_user:
                refused = "429 Too Many Requests", "too many connections for this user"
            else:
                conn = next(self._connections)
                environ[_CONN_ENV] = conn
                environ[_USER_ENV] = session.user
                self._pending[conn] = session.user
                return None
        log.info("dashboard connection refused from %s: %s", environ.get("REMOTE_ADDR"), refused[1])
        return refused

    def admitted(self, environ: Mapping[str, Any]) -> None:
        """Engine.IO is done with the request of a new connection :meth:`admit` let in (it
        is counted through Socket.IO's table of connections from now on)."""
        conn = environ.get(_CONN_ENV)
        if isinstance(conn, int):
            with self._lock:
                self._pending.pop(conn, None)

    def _audit_origin(self, origin: str, address: object) -> None:
        if not self._origin_audited.first(address, self._clock()):
            return
        self._audit.record(
            "connect",
            "refused",
            client=None if address is None else str(address),
            target=origin,
            detail="connection from another origin",
        )

    # -- handlers -------------------------------------------------------------------------

    def _register(self) -> None:
        self._sio.on_event("connect", self._on_connect)
        self._sio.on_event("disconnect", self._on_disconnect)
        self._sio.on_event("control", self._on_control)

    def _on_connect(self, auth: object = None) -> None:
        environ = request.environ
        sid: str = request.sid  # type: ignore[attr-defined]
        # A browser always sends Origin on a WebSocket handshake and on a cross-site request;
        # only a same-origin polling GET (or a client that is no browser) comes without one,
        # and the session cookie and CSRF token checked below are still needed then.
        origin = request.headers.get("Origin")
        if origin is not None and not self.origin_allowed(origin, environ):
            self._refuse_connect(sid, "connection refused: origin not allowed")
        session = self._sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is None:
            log.info("dashboard connection refused from %s: no live session", request.remote_addr)
            self._refuse_connect(sid, "connection refused: log in first")
        csrf = auth.get("csrf") if isinstance(auth, dict) else None
        if not same_token(session.csrf_token, csrf):
            log.info("dashboard connection refused from %s: bad CSRF token", request.remote_addr)
            self._refuse_connect(sid, "connection refused: invalid CSRF token")
        client = _Client(sid, session.key, session.user, session.role, request.remote_addr)
        with self._lock:
            self._clients[sid] = client  # in flight: the publisher leaves it alone for now
        actions = actions_for(session.role)
        launchables: list[dict[str, str]] = []
        if "launch" in actions:
            try:
                launchables = launchables_of(self._coord)
            except Exception:
                log.exception("listing the coordinator's launchables failed")
        self._sio.server.emit(
            "hello",
            {
                "user": session.user,
                "role": session.role,
                "actions": actions,
                "launchables": launchables,
                "coordinator": self._coord.name,
            },
            to=sid,
        )
        log.info(
            "dashboard client connected: %s (%s) from %s",
            session.user,
            session.role,
            request.remote_addr,
        )
        self.publish_now(force=True)
        with self._lock:
            latest, version = self._latest, self._version
            if latest is None or sid not in self._clients:
                client.in_flight = False
                return
            client.sent_version = version
        self._send(sid, latest)

    def _refuse_connect(self, sid: str, message: str) -> NoReturn:
        """Refuses a Socket.IO connect and closes its Engine.IO connection too (python-socketio
        answers CONNECT_ERROR but keeps the Engine.IO connection, and its threads, open):
        the CONNECT_ERROR is queued first, then the close, so the client reads the reason."""
        server = self._sio.server
        eio_sid = server.manager.eio_sid_from_sid(sid, "/")
        sock = server.eio.sockets.get(eio_sid) if eio_sid is not None else None
        if sock is not None:
            try:
                error = packet.Packet(
                    packet.CONNECT_ERROR, data={"message": message}, namespace="/"
                )
                server.eio.send(eio_sid, error.encode())
                sock.close(wait=False, reason=server.eio.reason.SERVER_DISCONNECT)
                server.eio.sockets.pop(eio_sid, None)
            except Exception:  # pragma: no cover - the client went away meanwhile
                log.debug("closing the refused connection %s failed", eio_sid, exc_info=True)
            raw = request.environ.get("werkzeug.socket")
            if raw is not None and request.environ.get("HTTP_UPGRADE", "").lower() == "websocket":
                # simple-websocket closes the socket without shutting it down, so its reader
                # thread (and the request's thread) stay blocked in recv() until the client
                # hangs up; a client that never does held them for good. Cut it once the
                # queued CONNECT_ERROR and CLOSE are out.
                timer = threading.Timer(_REFUSED_CUT_AFTER, _shutdown, args=(raw,))
                timer.daemon = True
                timer.start()
        # python-socketio's own CONNECT_ERROR then goes nowhere (the socket is closed)
        raise ConnectionRefusedError(message)

    def _on_disconnect(self, *reason: object) -> None:
        sid = request.sid  # type: ignore[attr-defined]
        with self._lock:
            self._clients.pop(sid, None)

    def _on_control(self, *args: object) -> dict[str, Any]:
        sid = request.sid  # type: ignore[attr-defined]
        address = request.remote_addr
        with self._lock:
            client = self._clients.get(sid)
        # exactly one dict; anything else (no argument, two, a list) is invalid, and audited
        payload = args[0] if len(args) == 1 else None
        data = payload if isinstance(payload, dict) else {}
        action = data.get("action")
        action_name = action[:200] if isinstance(action, str) and action else "control"
        if client is None:
            return self._refuse(action_name, None, None, address, "not connected")
        if not isinstance(payload, dict):
            why = f"a control event takes one object argument, got {len(args)} argument(s)"
            self._audit.record(
                action_name,
                "invalid",
                user=client.user,
                role=client.role,
                client=address,
                detail=why,
            )
            return {"ok": False, "outcome": "invalid", "message": why, "result": None}
        session = self._sessions.by_key(client.session_key)
        if session is None:
            with self._lock:
                client.disconnect_at = self._clock() + _DISCONNECT_GRACE
            return self._refuse(
                action_name, client.user, client.role, address, "your session expired: log in again"
            )
        if not same_token(session.csrf_token, data.get("csrf")):
            return self._refuse(
                action_name, session.user, session.role, address, "invalid CSRF token"
            )
        params = {k: v for k, v in data.items() if k not in ("action", "csrf")}
        outcome = self._controls.run(action, session.role, params)
        self._audit.record(
            action_name,
            outcome.outcome,
            user=session.user,
            role=session.role,
            client=address,
            target=outcome.target,
            detail=outcome.message,
        )
        log.info(
            "dashboard control by %s: %s %s -> %s: %s",
            session.user,
            action_name,
            outcome.target or "",
            outcome.outcome,
            outcome.message,
        )
        if outcome.ok:
            self.wake()
        return outcome.ack()

    def _refuse(
        self, action: str, user: str | None, role: str | None, address: str | None, why: str
    ) -> dict[str, Any]:
        self._audit.record(action, "refused", user=user, role=role, client=address, detail=why)
        return {"ok": False, "outcome": "refused", "message": why, "result": None}

    # -- publishing -----------------------------------------------------------------------

    def start(self) -> None:
        """Starts the publisher thread (idempotent)."""
        with self._lock:
            if self._thread is not None or self._stop.is_set():
                return
            self._thread = threading.Thread(
                target=self._run, name="tokengate-dashboard-publisher", daemon=True
            )
            self._thread.start()

    def wake(self) -> None:
        """Makes the publisher build a snapshot now."""
        self._wake.set()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.publish_now()
                failures = 0
            except Exception:
                failures += 1
                if failures == 1 or failures % 100 == 0:
                    log.exception("the dashboard's state publisher failed (%d in a row)", failures)

    def publish_now(self, force: bool = False) -> int:
        """Builds a snapshot and sends it to every client that has nothing in flight, if it
        differs from the last one (ignoring ``time``); returns the current version. Also
        disconnects clients whose session ended. Without clients nothing is built unless
        ``force``."""
        with self._publish_lock:
            self._drop_expired()
            with self._lock:
                idle = bool(self._clients)
            if not idle and not force:
                return self._version
            snap = self._state.build()
            fp = _fingerprint(snap)
            targets: list[str] = []
            with self._lock:
                if fp != self._fingerprint or self._latest is None:
                    self._fingerprint = fp
                    self._version += 1
                    snap["version"] = self._version
                    self._latest = snap
                    for c in self._clients.values():
                        if not c.in_flight and c.disconnect_at is None:
                            c.in_flight = True
                            c.sent_version = self._version
                            targets.append(c.sid)
                version = self._version
            for sid in targets:
                self._send(sid, snap)
            return version

    def snapshot(self) -> dict[str, Any]:
        """A fresh snapshot (for ``/api/state``), stamped with the current version."""
        snap = self._state.build()
        with self._lock:
            snap["version"] = self._version
        return snap

    def _send(self, sid: str, snap: dict[str, Any]) -> None:
        def acked(*_: object) -> None:
            self._on_ack(sid)

        try:
            self._sio.server.emit("state", snap, to=sid, namespace="/", callback=acked)
        except Exception:
            log.exception("sending the dashboard state to %s failed", sid)
            with self._lock:
                c = self._clients.get(sid)
                if c is not None:
                    c.in_flight = False

    def _on_ack(self, sid: str) -> None:
        with self._lock:
            c = self._clients.get(sid)
            if c is None:
                return
            c.in_flight = False
            latest = self._latest
            if latest is None or c.disconnect_at is not None or c.sent_version >= self._version:
                return
            c.in_flight = True
            c.sent_version = self._version
        self._send(sid, latest)

    def _drop_expired(self) -> None:
        now = self._clock()
        drop: list[str] = []
        with self._lock:
            for c in list(self._clients.values()):
                if c.disconnect_at is None and self._sessions.by_key(c.session_key) is None:
                    c.disconnect_at = now + _DISCONNECT_GRACE
                if c.disconnect_at is not None and now >= c.disconnect_at:
                    drop.append(c.sid)
                    del self._clients[c.sid]
        for sid in drop:
            log.info("dashboard client %s disconnected: its session ended", sid)
            self._disconnect(sid)

    def disconnect_session(self, session_key: str) -> None:
        """Disconnects every socket of the session ``session_key`` (at logout)."""
        with self._lock:
            sids = [c.sid for c in self._clients.values() if c.session_key == session_key]
            for sid in sids:
                del self._clients[sid]
        for sid in sids:
            self._disconnect(sid)

    def _disconnect(self, sid: str) -> None:
        try:
            self._sio.server.disconnect(sid, namespace="/")
        except Exception:  # pragma: no cover - the client may be gone already
            log.debug("disconnecting %s failed", sid, exc_info=True)

    def clients(self) -> int:
        """How many sockets are connected."""
        with self._lock:
            return len(self._clients)

    def close(self, timeout: float = 5.0) -> None:
        """Stops the publisher and disconnects every client (idempotent)."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():  # pragma: no cover - a snapshot build that hangs
                log.warning("the dashboard's state publisher did not stop within %s s", timeout)
        with self._lock:
            sids = list(self._clients)
            self._clients.clear()
        for sid in sids:
            self._disconnect(sid)


def _shutdown(sock: Any) -> None:
    try:
        sock.shutdown(socketlib.SHUT_RDWR)
    except OSError:  # closed already (by simple-websocket or the client)
        pass


def _fingerprint(snap: Mapping[str, Any]) -> str:
    body = {k: v for k, v in snap.items() if k not in ("time", "version")}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)


class SocketGate:
    """WSGI middleware in front of Engine.IO (``path``, Socket.IO's ``/socket.io``): a
    request without a live session cookie (401), with an ``Origin`` that is not allowed
    (403), or opening a connection beyond the limits of :meth:`LiveHub.admit` (429, 503) is
    answered here, before Engine.IO makes a connection (and threads) for it."""

    def __init__(self, hub: LiveHub, app: WSGIApplication, path: str = "/socket.io") -> None:
        self.hub = hub
        self.app = app
        self.path = "/" + path.strip("/")

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or ""
        if path != self.path and not path.startswith(self.path + "/"):
            return self.app(environ, start_response)
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING") or "")
        new = "sid" not in query
        refused = self.hub.admit(environ, new)
        if refused is not None:
            body = (refused[1] + "\n").encode()
            start_response(
                refused[0],
                [
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("Content-Length", str(len(body))),
                    ("Cache-Control", "no-store"),
                ],
            )
            return [body]
        if not new:
            return self.app(environ, start_response)
        try:
            # a WebSocket is served inside this call, for its whole life
            return self.app(environ, start_response)
        finally:
            self.hub.admitted(environ)
