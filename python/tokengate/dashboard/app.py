"""The dashboard's Flask app (routes, login, security headers) and its server thread.

``serve(coordinator)`` runs it on a werkzeug threaded server with Flask-SocketIO in threading
mode (WebSockets through simple-websocket) in a daemon thread named ``tokengate-dashboard``.
``create_app(coordinator, config)`` makes the app alone (for tests or another WSGI server);
its :class:`Dashboard` is ``app.extensions["tokengate_dashboard"]``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import re
import secrets
import socket
import ssl
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from flask import Flask, Response, jsonify, redirect, render_template, request
from flask_socketio import SocketIO
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Response as WResponse

from .._serving import BackgroundServer
from ..errors import ConfigurationError
from ..observe.metrics import generate_latest, is_loopback
from .audit import AuditLog, Once
from .auth import (
    VERIFICATIONS,
    LoginThrottle,
    Refusal,
    Session,
    SessionStore,
    User,
    authenticate,
    check_login_csrf,
    login_csrf_token,
    resolve_users,
    same_token,
)
from .controls import Controls, actions_for
from .live import SESSION_COOKIE, LiveHub, SocketGate
from .state import StateBuilder

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from ..coordinator import OperationsCoordinator

__all__ = ["Dashboard", "DashboardConfig", "DashboardServer", "create_app", "serve"]

log = logging.getLogger("tokengate.dashboard")

LOGIN_COOKIE: Final = "tokengate_login"
EXTENSION: Final = "tokengate_dashboard"

CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
_METRICS_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
_BASIC_CACHE_TTL: Final = 60.0
_MAX_NAME: Final = 200
_HOST_RE: Final = re.compile(r"[a-z0-9]([a-z0-9-]{0,62})(\.[a-z0-9]([a-z0-9-]{0,62}))*")


@dataclass(frozen=True)
class DashboardConfig:
    """What a dashboard app needs, checked. Make one with :meth:`build`.

    Attributes:
        users: name -> :class:`~tokengate.dashboard.auth.User`.
        audit_log: the audit log file.
        session_lifetime: seconds a login lasts.
        update_interval: seconds between state snapshots.
        tls: whether the server itself speaks TLS (session cookies are then ``Secure``).
        behind_proxy: trust one proxy's ``X-Forwarded-For/-Proto/-Host``.
        allowed_origins: origins accepted for Socket.IO besides the server's own.
        allowed_hosts: host names accepted in the ``Host`` header besides ``localhost``,
            IP addresses and the host names of ``allowed_origins`` (against DNS
            rebinding: a page of another site whose name resolves to this server's address
            sends its own name). ``("*",)`` accepts any. Without it, ``behind_proxy`` checks
            no ``Host`` (the proxy does).
        secret_key: the HMAC key of the login form's CSRF tokens.
        generated_password: the generated admin password when no user was configured.
        clock: the monotonic clock of sessions and the login throttle (tests inject one).
    """

    users: Mapping[str, User]
    audit_log: Path
    session_lifetime: float = 8 * 3600
    update_interval: float = 0.5
    tls: bool = False
    behind_proxy: bool = False
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    secret_key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    generated_password: str | None = field(default=None, repr=False)
    clock: Callable[[], float] = time.monotonic

    @classmethod
    def build(
        cls,
        *,
        users: Mapping[str, Any] | str | None = None,
        users_file: str | os.PathLike[str] | None = None,
        audit_log: str | os.PathLike[str] | None = None,
        session_lifetime: float = 8 * 3600,
        update_interval: float = 0.5,
        tls: bool = False,
        behind_proxy: bool = False,
        allowed_origins: Iterable[str] = (),
        allowed_hosts: Iterable[str] = (),
        secret_key: str | bytes | None = None,
        clock: Callable[[], float] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> DashboardConfig:
        """Checks every option (:class:`~tokengate.errors.ConfigurationError` naming the bad
        one) and resolves the users (see :func:`~tokengate.dashboard.auth.resolve_users`)."""
        lifetime = _positive("session_lifetime", session_lifetime, 60.0, 366 * 86400.0)
        interval = _positive("update_interval", update_interval, 0.05, 3600.0)
        for flag, value in (("tls", tls), ("behind_proxy", behind_proxy)):
            if not isinstance(value, bool):
                raise ConfigurationError(f"{flag} must be True or False, got {value!r}")
        origins = _origins(allowed_origins)
        hosts = _hosts(allowed_hosts)
        if secret_key is None:
            key = secrets.token_bytes(32)
        elif isinstance(secret_key, (str, bytes)):
            key = secret_key.encode() if isinstance(secret_key, str) else bytes(secret_key)
            if len(key) < 16:
                raise ConfigurationError("secret_key must be at least 16 bytes long")
        else:
            raise ConfigurationError(f"secret_key must be str, bytes or None, got {secret_key!r}")
        if clock is not None and not callable(clock):
            raise ConfigurationError(f"clock must be callable, got {clock!r}")
        if audit_log is not None and not isinstance(audit_log, (str, os.PathLike)):
            raise ConfigurationError(f"audit_log must be a path or None, got {audit_log!r}")
        from .audit import default_path

        path = Path(audit_log).expanduser() if audit_log is not None else default_path()
        resolved, generated = resolve_users(users, users_file, environ)
        return cls(
            users=resolved,
            audit_log=path,
            session_lifetime=lifetime,
            update_interval=interval,
            tls=tls,
            behind_proxy=behind_proxy,
            allowed_origins=origins,
            allowed_hosts=hosts,
            secret_key=key,
            generated_password=generated,
            clock=clock or time.monotonic,
        )


def _positive(name: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigurationError(f"{name} must be a number of seconds, got {value!r}")
    if not low <= value <= high:
        raise ConfigurationError(f"{name} must be between {low:g} and {high:g} s, got {value!r}")
    return float(value)


def _origins(origins: Iterable[str]) -> tuple[str, ...]:
    if isinstance(origins, str):
        origins = (origins,)
    out = []
    for o in origins:
        if not isinstance(o, str):
            raise ConfigurationError(f"allowed_origins must hold str origins, got {o!r}")
        parts = urllib.parse.urlsplit(o)
        if (
            parts.scheme not in ("http", "https")
            or not parts.netloc
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
            or "@" in parts.netloc
        ):
            raise ConfigurationError(
                f"allowed origin {o!r} is not scheme://host[:port] (e.g. https://ops.example.com)"
            )
        out.append(f"{parts.scheme}://{parts.netloc}".lower())
    return tuple(out)


def _hosts(hosts: Iterable[str]) -> tuple[str, ...]:
    if isinstance(hosts, str):
        hosts = (hosts,)
    out = []
    for h in hosts:
        if not isinstance(h, str):
            raise ConfigurationError(f"allowed_hosts must hold str host names, got {h!r}")
        name = h.strip().lower().rstrip(".")
        if name != "*" and not _HOST_RE.fullmatch(name):
            raise ConfigurationError(
                f"allowed host {h!r} is not a host name (e.g. ops.example.com, without a "
                "scheme or port), nor '*'"
            )
        out.append(name)
    return tuple(out)


def _host_name(header: str) -> str | None:
    """The host name (or IP address) of a ``Host`` header value, lowercased; None if it is
    not ``host[:port]``."""
    value = header.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        name, rest = value[1:end], value[end + 1 :]
        if end < 0 or not name:
            return None
    else:
        name, _, port = value.partition(":")
        rest = ":" + port if _ else ""
    if rest and not (rest.startswith(":") and rest[1:].isdigit()):
        return None
    return name.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    return True


class HostCheck:
    """WSGI middleware answering 400 to a request whose ``Host`` header names none of the
    accepted hosts (see :attr:`DashboardConfig.allowed_hosts`)."""

    def __init__(self, app: WSGIApplication, config: DashboardConfig) -> None:
        self.app = app
        names = {"localhost", *config.allowed_hosts}
        for origin in config.allowed_origins:
            name = _host_name(urllib.parse.urlsplit(origin).netloc)
            if name:
                names.add(name)
        self.names = frozenset(names)
        self.any = "*" in names or (config.behind_proxy and not config.allowed_hosts)

    def allowed(self, host: str | None) -> bool:
        """Whether the ``Host`` header value ``host`` is accepted (no Host: yes, that is
        no browser)."""
        if self.any or not host:
            return True
        name = _host_name(host)
        return name is not None and (name in self.names or _is_ip(name))

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        host = environ.get("HTTP_HOST")
        if self.allowed(host):
            return self.app(environ, start_response)
        log.info(
            "dashboard request refused from %s: Host %r is not accepted",
            environ.get("REMOTE_ADDR"),
            host,
        )
        body = (
            f"this dashboard does not answer to the host name {str(host)[:100]!r}; "
            "add it to allowed_hosts\n"
        ).encode()
        start_response(
            "400 Bad Request",
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
                ("X-Content-Type-Options", "nosniff"),
            ],
        )
        return [body]


@dataclass(frozen=True)
class LoginAttempt:
    """What :meth:`Dashboard.password_login` made of a login attempt.

    Attributes:
        user: the user logged in, or None.
        status: 200 (logged in), 401 (wrong name or password), 429 (refused by the
            throttle: ``wait`` seconds), 503 (no verification slot free: busy).
        wait: seconds to wait (429, 503).
        message: the text for the client.
    """

    user: User | None
    status: int
    wait: float = 0.0
    message: str = ""


class Dashboard:
    """Everything one dashboard app holds: the coordinator, the config, the audit log, the
    session store, the login throttle, the snapshot builder, the Socket.IO hub.

    Made by :func:`create_app`; ``app.extensions["tokengate_dashboard"]``."""

    def __init__(self, app: Flask, coordinator: OperationsCoordinator, config: DashboardConfig):
        self.app = app
        self.coordinator = coordinator
        self.config = config
        self.audit = AuditLog(config.audit_log)
        self.sessions = SessionStore(config.session_lifetime, config.clock)
        self.throttle = LoginThrottle(config.clock)
        #: bounds concurrent password verifications (shared by the process's dashboards)
        self.verifications = VERIFICATIONS
        self.state = StateBuilder(coordinator, self.audit)
        self.controls = Controls(coordinator, on_quarantine_change=self.state.invalidate_quarantine)
        self._basic_cache: OrderedDict[str, tuple[str, float]] = OrderedDict()
        #: Login posts without their CSRF token, audited once a minute per address.
        self.csrf_refusals = Once(60.0)
        self._basic_lock = threading.Lock()
        self._closed = False
        self._close_lock = threading.Lock()
        self.socketio = SocketIO(
            app,
            async_mode="threading",
            manage_session=False,
            cors_allowed_origins=self._origin_check,
            cors_credentials=False,
            max_http_buffer_size=256 * 1024,
            logger=False,
            engineio_logger=False,
        )
        self.live = LiveHub(
            self.socketio,
            coordinator,
            self.state,
            self.sessions,
            self.controls,
            self.audit,
            update_interval=config.update_interval,
            allowed_origins=config.allowed_origins,
            clock=config.clock,
        )
        # in front of Engine.IO (Flask-SocketIO put it in front of Flask), behind the Host
        # check (and ProxyFix, when behind a proxy)
        app.wsgi_app = HostCheck(SocketGate(self.live, app.wsgi_app), config)  # type: ignore[method-assign]

    def _origin_check(self, origin: object, environ: Mapping[str, Any] | None = None) -> bool:
        return self.live.origin_allowed(origin, environ or {})

    def start(self) -> None:
        """Subscribes to events and starts the publisher."""
        self.state.start()
        self.live.start()

    def close(self) -> None:
        """Stops the publisher, disconnects clients, unsubscribes, closes the audit log
        (idempotent)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        try:
            self.live.close()
            try:
                self.socketio.server.shutdown()
            except Exception:  # pragma: no cover
                log.debug("shutting Socket.IO down failed", exc_info=True)
            self.controls.close()
        finally:
            self.state.close()
            self.audit.close()

    # -- request helpers ------------------------------------------------------------------

    def session(self) -> Session | None:
        return self.sessions.get(request.cookies.get(SESSION_COOKIE))

    def secure_cookies(self) -> bool:
        return self.config.tls or (self.config.behind_proxy and request.is_secure)

    def password_login(self, client: str, name: str, password: str, via: str = "") -> LoginAttempt:
        """Checks a user name and password under the login throttle and the bound on
        concurrent verifications, and audits it: each attempt whose password is checked
        (``login``/``failed``), the lockout it starts (``login_lockout``), and the first
        refusal of a lockout or of a burst (``login``/``refused``). ``via`` is added to the
        audit detail (e.g. " (HTTP Basic)")."""
        target = name[:_MAX_NAME] or None
        refusal = self.throttle.reserve(client)
        if refusal is not None:
            return self.refused(client, target, refusal, via)
        failed = True
        try:
            if name and password:
                if not self.verifications.acquire():
                    failed = False  # not checked: not a failure
                    log.warning(
                        "dashboard login from %s not checked: %d password verifications "
                        "already running",
                        client,
                        self.verifications.slots,
                    )
                    return LoginAttempt(
                        None, 503, 1.0, "the server is busy checking other logins, try again"
                    )
                try:
                    user = authenticate(self.config.users, name, password)
                finally:
                    self.verifications.release()
            else:
                user = None
            failed = user is None
        finally:
            locked = self.throttle.release(client, failed)
        if user is not None:
            return LoginAttempt(user, 200)
        self.audit.record(
            "login",
            "failed",
            client=client,
            target=target,
            detail="wrong user name or password" + via,
        )
        if locked:
            self.lockout_started(client, target, via)
        return LoginAttempt(None, 401, 0.0, "wrong user name or password")

    def lockout_started(self, client: str, target: str | None, via: str = "") -> None:
        """Audits (and logs) the start of a lockout."""
        t = self.throttle
        self.audit.record(
            "login_lockout",
            "refused",
            client=client,
            target=target,
            detail=f"{t.max_failures} failed logins within {t.window:g} s: locked out for "
            f"{t.lockout:g} s" + via,
        )
        log.warning("dashboard logins from %s locked out after failures", client)

    def refused(
        self, client: str, target: str | None, refusal: Refusal, via: str = ""
    ) -> LoginAttempt:
        """A login the throttle refused without checking it; audited if it is the first
        refusal of its lockout or burst."""
        wait = max(1, math.ceil(refusal.wait))
        if refusal.locked:
            message = f"too many failed logins, try again in {wait} s"
            detail = f"locked out for {wait} s after too many failed logins"
        else:
            message = f"too many login attempts at once, try again in {wait} s"
            detail = "too many login attempts at once (not checked)"
        if refusal.audit:
            self.audit.record("login", "refused", client=client, target=target, detail=detail + via)
        return LoginAttempt(None, 429, wait, message)

    def basic_login(self) -> User | LoginAttempt | None:
        """The user of a valid ``Authorization: Basic`` header, the failed
        :class:`LoginAttempt` of a wrong or refused one, or None without such a header.
        Verifications are cached for a minute under an HMAC of the credentials (so a
        scraper does not pay argon2 each time); failures count towards the login throttle and are
        audited."""
        header = request.headers.get("Authorization", "")
        if not header[:6].lower() == "basic ":
            return None
        client = request.remote_addr or "?"
        via = " (HTTP Basic)"
        try:
            if len(header) > 2048:
                raise ValueError("too long")
            credentials = base64.b64decode(header[6:].strip(), validate=True)
            name, _, password = credentials.decode("utf-8").partition(":")
        except (ValueError, binascii.Error, UnicodeDecodeError):
            refusal = self.throttle.check(client)
            if refusal is not None:
                return self.refused(client, None, refusal, via)
            self.audit.record(
                "login", "failed", client=client, detail="malformed credentials" + via
            )
            if self.throttle.failure(client):
                self.lockout_started(client, None, via)
            return LoginAttempt(None, 401, 0.0, "login required")
        # Keyed by the credentials, not the header's text: spaces or another spelling of the
        # same base64 must not buy a fresh argon2 check.
        mac = hmac.new(self.config.secret_key, credentials, hashlib.sha256).hexdigest()
        now = self.config.clock()
        with self._basic_lock:
            hit = self._basic_cache.get(mac)
            if hit is not None and now < hit[1]:
                user = self.config.users.get(hit[0])
                if user is not None:
                    return user
        refusal = self.throttle.check(client)
        if refusal is not None:
            return self.refused(client, None, refusal, via)
        attempt = self.password_login(client, name, password, via)
        if attempt.user is None:
            return attempt
        with self._basic_lock:
            self._basic_cache[mac] = (attempt.user.name, now + _BASIC_CACHE_TTL)
            while len(self._basic_cache) > 64:
                self._basic_cache.popitem(last=False)
        return attempt.user


def create_app(coordinator: OperationsCoordinator, config: DashboardConfig | None = None) -> Flask:
    """The dashboard's Flask app for ``coordinator`` (subscribed and publishing once made;
    call ``app.extensions["tokengate_dashboard"].close()`` when done). ``config`` defaults
    to ``DashboardConfig.build()`` (users from the environment)."""
    cfg = config if config is not None else DashboardConfig.build()
    if not isinstance(cfg, DashboardConfig):
        raise ConfigurationError(f"config must be a DashboardConfig, got {cfg!r}")
    here = Path(__file__).parent
    app = Flask(
        "tokengate.dashboard",
        template_folder=str(here / "templates"),
        static_folder=str(here / "static"),
        static_url_path="/static",
    )
    app.config.update(
        SECRET_KEY=cfg.secret_key,
        MAX_CONTENT_LENGTH=64 * 1024,
        MAX_FORM_MEMORY_SIZE=16 * 1024,
        MAX_FORM_PARTS=20,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SEND_FILE_MAX_AGE_DEFAULT=300,
        TEMPLATES_AUTO_RELOAD=False,
    )
    dash = Dashboard(app, coordinator, cfg)
    app.extensions[EXTENSION] = dash
    _routes(app, dash)
    if cfg.behind_proxy:
        # outermost: Engine.IO's origin check and Flask both see the client's scheme/host
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1)  # type: ignore[method-assign]
    dash.start()
    return app


def _routes(app: Flask, dash: Dashboard) -> None:
    cfg = dash.config

    @app.after_request
    def headers(resp: Response) -> Response:
        h = resp.headers
        h["Content-Security-Policy"] = CSP
        h["X-Content-Type-Options"] = "nosniff"
        h["X-Frame-Options"] = "DENY"
        h["Referrer-Policy"] = "no-referrer"
        h["Cross-Origin-Opener-Policy"] = "same-origin"
        if not request.path.startswith("/static/"):
            h["Cache-Control"] = "no-store"
        if cfg.tls:
            h["Strict-Transport-Security"] = "max-age=31536000"
        return resp

    def login_page(status: int, error: str | None = None, username: str = "") -> Response:
        nonce = secrets.token_urlsafe(24)
        resp = Response(
            render_template(
                "login.html",
                csrf_token=login_csrf_token(cfg.secret_key, nonce),
                error=error,
                username=username,
                coordinator_name=dash.coordinator.name,
            ),
            status=status,
            mimetype="text/html",
        )
        resp.set_cookie(
            LOGIN_COOKIE,
            nonce,
            max_age=3600,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=dash.secure_cookies(),
        )
        return resp

    def client() -> str:
        return request.remote_addr or "?"

    def attempt_page(attempt: LoginAttempt, username: str) -> Response:
        resp = login_page(attempt.status, attempt.message, username)
        if attempt.status in (429, 503):
            resp.headers["Retry-After"] = str(max(1, math.ceil(attempt.wait)))
        return resp

    @app.get("/login")
    def login_form() -> WResponse:
        if dash.session() is not None:
            return redirect("/", code=303)
        return login_page(200)

    @app.post("/login")
    def login() -> WResponse:
        username = request.form.get("username", "")
        username = username[:_MAX_NAME] if isinstance(username, str) else ""
        refusal = dash.throttle.check(client())
        if refusal is not None:
            return attempt_page(dash.refused(client(), username or None, refusal), username)
        if not check_login_csrf(
            cfg.secret_key, request.cookies.get(LOGIN_COOKIE), request.form.get("csrf_token")
        ):
            # Not a failed login: any site the user visits can post this form from the
            # user's address (without the token), and must not lock the user out. Audited
            # at most once a minute per address, so it cannot flood the log either.
            if dash.csrf_refusals.first(client(), dash.config.clock()):
                dash.audit.record(
                    "login",
                    "refused",
                    client=client(),
                    target=username or None,
                    detail="invalid or missing CSRF token (further ones from this address "
                    "within a minute are not recorded)",
                )
            return login_page(400, "invalid or missing CSRF token", username)
        password = request.form.get("password", "")
        attempt = dash.password_login(
            client(), username, password if isinstance(password, str) else ""
        )
        user = attempt.user
        if user is None:
            return attempt_page(attempt, username)
        old = dash.sessions.drop(request.cookies.get(SESSION_COOKIE))
        if old is not None:
            dash.live.disconnect_session(old.key)
        session_id, _ = dash.sessions.create(user.name, user.role)
        dash.audit.record("login", "ok", user=user.name, role=user.role, client=client())
        log.info("dashboard login: %s (%s) from %s", user.name, user.role, client())
        done = redirect("/", code=303)
        done.set_cookie(
            SESSION_COOKIE,
            session_id,
            max_age=int(cfg.session_lifetime),
            path="/",
            httponly=True,
            samesite="Strict",
            secure=dash.secure_cookies(),
        )
        done.delete_cookie(
            LOGIN_COOKIE, path="/", httponly=True, samesite="Strict", secure=dash.secure_cookies()
        )
        return done

    @app.post("/logout")
    def logout() -> WResponse:
        session = dash.session()
        if session is None:
            return redirect("/login", code=303)
        if not same_token(session.csrf_token, request.form.get("csrf_token")):
            dash.audit.record(
                "logout",
                "refused",
                user=session.user,
                role=session.role,
                client=client(),
                detail="invalid or missing CSRF token",
            )
            return Response("invalid or missing CSRF token", status=400, mimetype="text/plain")
        dash.sessions.drop(request.cookies.get(SESSION_COOKIE))
        dash.live.disconnect_session(session.key)
        dash.audit.record("logout", "ok", user=session.user, role=session.role, client=client())
        resp = redirect("/login", code=303)
        resp.delete_cookie(
            SESSION_COOKIE, path="/", httponly=True, samesite="Strict", secure=dash.secure_cookies()
        )
        return resp

    @app.get("/")
    def index() -> WResponse:
        session = dash.session()
        if session is None:
            return redirect("/login", code=303)
        return Response(
            render_template(
                "index.html",
                user=session.user,
                role=session.role,
                csrf_token=session.csrf_token,
                coordinator_name=dash.coordinator.name,
                actions=actions_for(session.role),
            ),
            mimetype="text/html",
        )

    @app.get("/healthz")
    def healthz() -> WResponse:
        running = dash.coordinator.running
        resp = jsonify({"status": "ok" if running else "stopped"})
        resp.status_code = 200 if running else 503
        return resp

    def reader() -> str | LoginAttempt | None:
        """The user name of a valid session or HTTP Basic login, the failed attempt of a
        wrong or refused Basic login, or None."""
        session = dash.session()
        if session is not None:
            return session.user
        user = dash.basic_login()
        return user.name if isinstance(user, User) else user

    def refused_reader(who: LoginAttempt | None, json_body: bool) -> Response:
        status = 401 if who is None else who.status
        text = "login required" if who is None or who.status == 401 else who.message
        if json_body:
            resp = jsonify({"error": text})
            resp.status_code = status
        else:
            resp = Response(text + "\n", status=status, mimetype="text/plain")
        if status == 401 and not json_body:
            resp.headers["WWW-Authenticate"] = 'Basic realm="tokengate", charset="UTF-8"'
        elif who is not None:
            resp.headers["Retry-After"] = str(max(1, math.ceil(who.wait)))
        return resp

    @app.get("/metrics")
    def metrics() -> WResponse:
        who = reader()
        if not isinstance(who, str):
            return refused_reader(who, json_body=False)
        return Response(generate_latest(dash.coordinator), headers={"Content-Type": _METRICS_TYPE})

    @app.get("/api/state")
    def api_state() -> WResponse:
        who = reader()
        if not isinstance(who, str):
            return refused_reader(who, json_body=True)
        return jsonify(dash.live.snapshot())

    @app.get("/api/audit")
    def api_audit() -> WResponse:
        who = reader()
        if not isinstance(who, str):
            return refused_reader(who, json_body=True)
        raw = request.args.get("limit", "100")
        try:
            limit = int(raw)
        except ValueError:
            limit = -1
        if not 1 <= limit <= 1000:
            resp = jsonify({"error": "limit must be an int from 1 to 1000"})
            resp.status_code = 400
            return resp
        return jsonify(list(reversed(dash.audit.tail(limit))))


# -- the server -----------------------------------------------------------------------------


class _QuietHandler(WSGIRequestHandler):
    """Request lines go to the dashboard's logger at DEBUG, not to stderr."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        log.debug("%s %s %s", self.address_string(), self.requestline, code)

    def log_error(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)


class DashboardServer(BackgroundServer):
    """A running dashboard (made by :func:`serve`): ``url``, ``host``, ``port``, ``audit``,
    ``generated_password``; :meth:`close` (or the end of a ``with`` block) stops it."""

    def __init__(self, app: Flask, httpd: BaseWSGIServer, scheme: str) -> None:
        super().__init__(
            httpd, threading.Thread(target=self._serve, name="tokengate-dashboard", daemon=True)
        )
        self.app = app
        self.dashboard: Dashboard = app.extensions[EXTENSION]
        self._scheme = scheme
        self.audit: AuditLog = self.dashboard.audit
        self.generated_password: str | None = self.dashboard.config.generated_password
        self._thread.start()

    @property
    def url(self) -> str:
        """``http(s)://HOST:PORT``."""
        return self._origin(self._scheme)

    def _serve(self) -> None:
        try:
            self._httpd.serve_forever(poll_interval=0.2)
        except Exception:  # pragma: no cover
            log.exception("the dashboard server stopped")

    def _stopping(self) -> None:
        self.dashboard.close()

    def close(self, timeout: float | None = 5.0) -> None:
        """Stops the publisher, disconnects the clients, unsubscribes from events, shuts the
        server down and joins its thread (idempotent)."""
        if self._close(timeout):
            log.info("dashboard at %s closed", self.url)


def serve(
    coordinator: OperationsCoordinator,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    users: Mapping[str, Any] | str | None = None,
    users_file: str | os.PathLike[str] | None = None,
    audit_log: str | os.PathLike[str] | None = None,
    session_lifetime: float = 8 * 3600,
    update_interval: float = 0.5,
    certfile: str | os.PathLike[str] | None = None,
    keyfile: str | os.PathLike[str] | None = None,
    behind_proxy: bool = False,
    allowed_origins: Iterable[str] = (),
    allowed_hosts: Iterable[str] = (),
    secret_key: str | bytes | None = None,
) -> DashboardServer:
    """Serves the dashboard of ``coordinator`` at ``http(s)://host:port`` from a daemon
    thread (port 0: a free port; see the result's ``url``). See docs/dashboard.md.

    Requests are answered only when their ``Host`` header names ``localhost``, an IP
    address, ``host`` itself, the host of one of ``allowed_origins`` or one of
    ``allowed_hosts`` (host names, e.g. ``("ops.example.com",)``; ``("*",)`` accepts any);
    other Hosts get 400 (DNS rebinding). With ``behind_proxy=True`` and no
    ``allowed_hosts``, the proxy is trusted to check the Host.

    Raises:
        ConfigurationError: a bad option, users configuration or TLS file (before anything
            is bound).
    """
    if not isinstance(host, str) or not host:
        raise ConfigurationError(f"host must be a non-empty str, got {host!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigurationError(f"port must be an int from 0 to 65535, got {port!r}")
    if keyfile is not None and certfile is None:
        raise ConfigurationError("keyfile needs certfile")
    ssl_context: ssl.SSLContext | None = None
    if certfile is not None:
        ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ssl_context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ssl_context.load_cert_chain(certfile, keyfile)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(
                f"cannot load the TLS certificate {certfile!r}: {exc}"
            ) from None
    hosts = _hosts(allowed_hosts)
    name = host.lower().rstrip(".")
    # the name bound is accepted as a Host (unless that would turn on the check behind a proxy)
    if (hosts or not behind_proxy) and not _is_ip(host.strip("[]")) and _HOST_RE.fullmatch(name):
        hosts += (name,)
    config = DashboardConfig.build(
        users=users,
        users_file=users_file,
        audit_log=audit_log,
        session_lifetime=session_lifetime,
        update_interval=update_interval,
        tls=ssl_context is not None,
        behind_proxy=behind_proxy,
        allowed_origins=allowed_origins,
        allowed_hosts=hosts,
        secret_key=secret_key,
    )
    if not is_loopback(host) and ssl_context is None and not behind_proxy:
        log.warning(
            "the dashboard listens on %s without TLS: passwords and session cookies cross "
            "the network in clear; pass certfile= (or behind_proxy=True behind a TLS proxy)",
            host,
        )
    # Bound here, not by werkzeug: on a failed bind werkzeug prints to stderr and exits.
    try:
        listener = socket.create_server(
            (host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET
        )
    except OSError as exc:
        raise ConfigurationError(
            f"the dashboard cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from None
    try:
        app = create_app(coordinator, config)
        try:
            httpd = make_server(
                host,
                port,
                app,
                threaded=True,
                request_handler=_QuietHandler,
                ssl_context=ssl_context,
                fd=listener.fileno(),
            )
        except BaseException:
            app.extensions[EXTENSION].close()
            raise
    finally:
        listener.close()  # werkzeug works on a duplicate of it
    server = DashboardServer(app, httpd, "https" if ssl_context else "http")
    log.info("dashboard of %s serving at %s", coordinator.name, server.url)
    return server
