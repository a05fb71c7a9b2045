"""The TokenGate operator dashboard — a login-protected web page showing a
coordinator live over Socket.IO, with role-checked control actions and an audit log.

Needs the ``dashboard`` extra (``pip install 'tokengate[dashboard]'``: Flask,
Flask-SocketIO, simple-websocket, argon2-cffi). See docs/dashboard.md::

    with OperationsCoordinator() as coord, serve(coord, users_file="users.toml") as dash:
        print("dashboard at", dash.url)
"""

from __future__ import annotations

try:
    from .app import DashboardConfig, DashboardServer, create_app, serve
    from .audit import AuditLog
    from .auth import ROLES, hash_password, verify_password
except ModuleNotFoundError as exc:  # pragma: no cover - depends on what is installed
    if exc.name not in ("flask", "flask_socketio", "socketio", "engineio", "argon2", "werkzeug"):
        raise
    raise ModuleNotFoundError(
        f"the TokenGate dashboard needs its extra: pip install 'tokengate[dashboard]' ({exc})",
        name=exc.name,
    ) from exc

__all__ = [
    "ROLES",
    "AuditLog",
    "DashboardConfig",
    "DashboardServer",
    "create_app",
    "hash_password",
    "serve",
    "verify_password",
]
