"""Shared fixtures for the TokenGate test suite.

Synchronisation rules used throughout the suite:

* tasks are held with :class:`Latch` (a ``threading.Event`` plus a counter of tasks that have
  entered it), never with sleeps;
* results are synchronised with ``token.get()`` / ``token.wait()``;
* :func:`wait_until` polls an observable condition (bounded by a safety deadline) for the few
  places where the contract exposes a state but no event to wait on (e.g. ``admission_open``
  turning False while ``drain()`` runs in another thread).

Every coordinator created through the ``make_coord`` fixture is stopped at teardown, after every
latch created through ``make_latch`` has been released, so a failing test never leaves held
workers or running coordinators behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator

import pytest

from _support import SAFETY, Latch
from tokengate import CoordinatorNotRunning, OperationsCoordinator, task_token_guard

# The quarantine store defaults to the user's data directory: the suite never writes there.
os.environ.setdefault(
    "TOKENGATE_QUARANTINE_DIR", tempfile.mkdtemp(prefix="tokengate-test-quarantine-")
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "stress: full-size stress run (1 000 000 tokens); skipped unless TOKENGATE_STRESS_FULL=1",
    )


@pytest.fixture
def latches() -> Iterator[list[Latch]]:
    created: list[Latch] = []
    yield created
    for latch in created:
        latch.release()


@pytest.fixture
def make_latch(latches: list[Latch]) -> Callable[..., Latch]:
    def factory(safety: float = SAFETY) -> Latch:
        latch = Latch(safety)
        latches.append(latch)
        return latch

    return factory


@pytest.fixture
def make_coord(latches: list[Latch]) -> Iterator[Callable[..., OperationsCoordinator]]:
    """Factory creating *started* coordinators; all of them are stopped at teardown."""
    created: list[OperationsCoordinator] = []

    def factory(**kwargs) -> OperationsCoordinator:
        coord = OperationsCoordinator(**kwargs)
        created.append(coord)
        coord.start()
        return coord

    yield factory

    for latch in latches:
        latch.release()
    for coord in reversed(created):
        if coord.running:
            if coord.paused or not coord.admission_open:
                coord.resume()
            coord.stop(wait=False, timeout=SAFETY)
        assert not coord.running


@pytest.fixture
def coord(make_coord) -> OperationsCoordinator:
    """A small started coordinator: 2 virtual cores x 2 workers."""
    return make_coord(cores=2, workers_per_core=2)


@task_token_guard(operation_type="conftest_probe")
def _probe() -> int:
    return 1


@pytest.fixture(autouse=True)
def _no_coordinator_leaks() -> Iterator[None]:
    """After every test no coordinator may still be running (the decorator must refuse calls)."""
    yield
    with pytest.raises(CoordinatorNotRunning):
        _probe()
