"""``await token``: waits for a token without blocking the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import Any

from ._core import TaskToken


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def await_token(token: TaskToken) -> Generator[Any, None, Any]:
    """The iterator behind ``TaskToken.__await__``.

    The token's done callback hops onto the awaiting loop with ``call_soon_threadsafe``.
    Cancelling the awaiting task (``asyncio.wait_for`` timing out, a ``TaskGroup`` being
    cancelled, ...) ends only this await, like ``get(timeout=...)`` passing: the token still
    runs and its other waiters get its result. ``token.kill()`` is the way to cancel it.
    """
    if not token.done():
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def on_done(_token: TaskToken) -> None:
            try:
                loop.call_soon_threadsafe(_resolve, fut)
            except RuntimeError:  # the loop was closed meanwhile
                pass

        token.add_done_callback(on_done)
        yield from fut
    return token.get()
