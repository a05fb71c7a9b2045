"""pytest plugin: fixtures to test code that uses TokenGate and to compare it with its peers.

Installing tokengate registers this module as the pytest plugin ``tokengate`` (entry point
``pytest11``). It lives outside the ``tokengate`` package, and imports tokengate only when one
of its fixtures is used, so a test run in a project that does not use them pays nothing (no
import of tokengate, of its native core or of asyncio). ``tokengate.testing.plugin`` is this
same module. Without the installed entry point (a source checkout, or
``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1``) opt in with ``-p tokengate.testing.plugin`` or
``pytest_plugins = ["tokengate.testing.plugin"]`` in a conftest; ``-p no:tokengate`` opts
out. It defines fixtures only (none autouse) and one hook that keeps the plugin from being
registered twice; a test run that requests none of the fixtures is not affected.

Fixtures:

``tokengate_coordinator``
    A started :class:`~tokengate.OperationsCoordinator` for one test (decorated calls go to
    it). At teardown tokens still in flight get ``tokengate_teardown_timeout`` seconds to
    finish; the coordinator is then stopped, and if some were still unresolved the test
    errors at teardown with their count, ids, operation types and states.
``tokengate_coordinator_options``
    The keyword arguments of that coordinator (default ``{}``); override it in a conftest
    or a test module, or parametrise ``tokengate_coordinator`` indirectly with a dict.
``tokengate_teardown_timeout``
    Seconds tokens may still take after the test returns (default 5.0; 0: none).
``concurrency_compare``
    ``concurrency_compare(fn, *args, calls=100, ...)`` runs ``fn`` under ThreadPoolExecutor,
    ``asyncio.to_thread`` and TokenGate in the same test with pytest-benchmark and records the
    timings and ratios in ``benchmark.extra_info``; see
    :func:`tokengate.testing.compare_concurrency`. Needs pytest-benchmark
    (``pip install "tokengate[test]"``); without it the test is skipped, saying so.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tokengate import OperationsCoordinator
    from tokengate.testing import Comparison

__all__ = [
    "concurrency_compare",
    "tokengate_coordinator",
    "tokengate_coordinator_options",
    "tokengate_teardown_timeout",
]

#: The names this module is registered under: the entry point's, and the module's own
#: (``-p tokengate.testing.plugin`` or ``pytest_plugins``).
_NAMES = ("tokengate", __name__, "tokengate.testing.plugin")

MISSING_BENCHMARK = (
    'concurrency_compare needs pytest-benchmark: pip install "tokengate[test]" '
    "(or pip install pytest-benchmark)"
)


def _benchmark_installed() -> bool:
    try:
        return importlib.util.find_spec("pytest_benchmark") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["pytest_benchmark"] is None
        return False


def pytest_plugin_registered(plugin: object, plugin_name: str, manager: Any) -> None:
    """Once this module is registered under one of its names, block the other one.

    The installed entry point registers the module as ``tokengate``; ``-p
    tokengate.testing.plugin`` or ``pytest_plugins = ["tokengate.testing.plugin"]`` would
    register the very same module again under its module name, which pluggy refuses with a
    ``ValueError`` that aborts the run. Blocking the other name makes the second one a no-op.
    Nothing else is touched: other plugins' registrations are ignored.
    """
    if plugin is not sys.modules.get(__name__) or plugin_name not in _NAMES:
        return
    for other in _NAMES:
        if other != plugin_name and manager.get_plugin(other) is None:
            manager.set_blocked(other)


@pytest.fixture
def tokengate_coordinator_options() -> dict[str, Any]:
    """Keyword arguments of the ``tokengate_coordinator`` coordinator (default: none, the
    ``OperationsCoordinator`` defaults). Override this fixture to change them, e.g.::

        @pytest.fixture
        def tokengate_coordinator_options():
            return {"cores": 2, "workers_per_core": 2}
    """
    return {}


@pytest.fixture
def tokengate_teardown_timeout() -> float:
    """Seconds that tokens still in flight when a test returns may take to finish before
    ``tokengate_coordinator`` reports them as unresolved (default 5.0; 0 checks at once).
    Override this fixture to change it."""
    return 5.0


@pytest.fixture
def tokengate_coordinator(
    request: pytest.FixtureRequest,
    tokengate_coordinator_options: dict[str, Any],
    tokengate_teardown_timeout: float,
) -> Iterator[OperationsCoordinator]:
    """A started :class:`~tokengate.OperationsCoordinator` for this test; decorated calls go
    to it (the most recently started coordinator takes them).

    Its arguments come from ``tokengate_coordinator_options``, updated by the dict given when
    the fixture is parametrised indirectly::

        @pytest.mark.parametrize("tokengate_coordinator", [{"cores": 1}], indirect=True)

    At teardown, tokens still in flight get ``tokengate_teardown_timeout`` seconds to finish
    (as they are: admission stays open, a paused coordinator stays paused), then the
    coordinator is stopped. If some were still unresolved the test
    errors at teardown with a message giving their count and, for each, its id, operation
    type and state; those not yet started are killed, and the message says how many were
    still executing. A coordinator the test stopped itself is not checked.
    """
    from tokengate import OperationsCoordinator
    from tokengate.testing._leaks import monotonic, settle

    options = dict(tokengate_coordinator_options)
    param = getattr(request, "param", None)
    if param is not None:
        if not isinstance(param, dict):
            raise TypeError(
                "an indirect parameter of tokengate_coordinator must be a dict of "
                f"OperationsCoordinator arguments, got {type(param).__name__}"
            )
        options.update(param)
    timeout = float(tokengate_teardown_timeout)
    if not timeout >= 0:
        raise ValueError(f"tokengate_teardown_timeout must be >= 0, got {timeout}")
    coord = OperationsCoordinator(**options)
    since = monotonic()
    coord.start()
    try:
        yield coord
    finally:
        problem = settle(coord, since, timeout, label=request.node.name)
    if problem is not None:
        pytest.fail(problem, pytrace=False)


if _benchmark_installed():

    @pytest.fixture
    def concurrency_compare(benchmark: Any) -> Callable[..., Comparison]:
        """``concurrency_compare(fn, *args, calls=100, ...)``: run ``fn`` under
        ThreadPoolExecutor, ``asyncio.to_thread`` and TokenGate in this test, TokenGate's
        rounds through pytest-benchmark, and record every system's timings and the ratios in
        ``benchmark.extra_info``. Returns a :class:`tokengate.testing.Comparison`. The
        arguments are those of :func:`tokengate.testing.compare_concurrency`. Once per test
        (pytest-benchmark records one benchmark per test)."""
        from tokengate.testing._compare import compare_concurrency

        used: list[bool] = []

        def run(fn: Callable[..., Any], *args: Any, **options: Any) -> Comparison:
            if used:
                raise RuntimeError(
                    "concurrency_compare runs once per test (pytest-benchmark records one "
                    "benchmark per test): parametrise the test to compare several workloads"
                )
            used.append(True)
            return compare_concurrency(fn, *args, benchmark=benchmark, **options)

        return run

else:

    @pytest.fixture
    def concurrency_compare() -> Callable[..., Comparison]:
        """Skips the test: pytest-benchmark is not installed (``pip install
        "tokengate[test]"``)."""
        pytest.skip(MISSING_BENCHMARK)
