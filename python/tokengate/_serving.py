"""What the HTTP endpoints of TokenGate (metrics, dashboard) share: a server answering from a
daemon thread, its address, and an idempotent ``close()``."""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Any, Self

__all__ = ["BackgroundServer"]


class BackgroundServer:
    """A bound ``httpd`` (``serve_forever`` on ``thread``) with its ``host`` and ``port``;
    subclasses may give another ``url`` and stop more before the server in
    :meth:`_stopping`."""

    def __init__(self, httpd: Any, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        self._lock = threading.Lock()
        self._closed = False
        address = httpd.server_address
        #: The address the endpoint is bound to.
        self.host: str = str(address[0])
        #: The port it is bound to (the one the system chose, with ``port=0``).
        self.port: int = int(address[1])

    def _origin(self, scheme: str) -> str:
        """``scheme://HOST:PORT`` (an IPv6 host in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    @property
    def url(self) -> str:
        """Where it answers."""
        return self._origin("http")

    @property
    def closed(self) -> bool:
        return self._closed

    def _stopping(self) -> None:
        """What stops before the server itself (nothing here)."""

    def _close(self, timeout: float | None) -> bool:
        """Stop once: :meth:`_stopping`, then the server, then join its thread (up to
        ``timeout``); False if it was closed already."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
        try:
            self._stopping()
        finally:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout)
        return True

    def close(self, timeout: float | None = None) -> None:
        """Stops serving and frees the port, waiting up to ``timeout`` for the serving thread
        (None: as long as it takes); idempotent."""
        self._close(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "serving"
        return f"<{type(self).__name__} {self.url} {state}>"
