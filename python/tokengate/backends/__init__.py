"""Backends: what executes the attempts of a coordinator's tokens (docs/scale-out.md).

:class:`LocalBackend` (the default) runs them on the coordinator's pinned worker threads;
:class:`~tokengate.backends.dask.DaskBackend` (``pip install 'tokengate[dask]'``) on a Dask
distributed cluster. Importing this package does not import Dask: ``DaskBackend`` is loaded
when it is first named.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Backend, LocalBackend, WorkerLayout

if TYPE_CHECKING:
    from .dask import DaskBackend

__all__ = ["Backend", "DaskBackend", "LocalBackend", "WorkerLayout"]


def __getattr__(name: str) -> Any:
    if name == "DaskBackend":
        from .dask import DaskBackend

        return DaskBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
