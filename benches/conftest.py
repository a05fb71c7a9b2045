"""pytest-benchmark suites comparing TokenGate with ThreadPoolExecutor, asyncio.to_thread and Dask.

Run: ``pytest benches/ --benchmark-only`` (add ``--tg-full`` for SERIES SATURATION, the 40 s
CONCURRENCY WINDOW and 1 000 000 queued tokens; ``--tg-assert-targets`` to fail on a missed
speed target). The files are named ``bench_*.py`` and collected by the hook below, so neither
``pytest`` nor ``pytest tests`` ever picks them up.

Each test is parametrised over the systems (ThreadPoolExecutor first); figures are recorded in
``benchmark.extra_info`` and in a session table printed at the end with each figure's ratio to
ThreadPoolExecutor's in the same run and the TokenGate targets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

FIGURES = pytest.StashKey[list[dict[str, Any]]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tokengate benches")
    group.addoption(
        "--tg-full",
        action="store_true",
        default=False,
        help="also run SERIES SATURATION, the 40 s CONCURRENCY WINDOW and 1 000 000 queued tokens",
    )
    group.addoption(
        "--tg-assert-targets",
        action="store_true",
        default=False,
        help="fail a TokenGate benchmark whose speed target is missed (default: report only)",
    )
    group.addoption(
        "--tg-window-seconds",
        type=float,
        default=None,
        help="length of the CONCURRENCY WINDOW (default 10 s, 40 s with --tg-full)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[FIGURES] = []
    config.addinivalue_line("markers", "systems(names): systems to parametrise system_name over")
    config.addinivalue_line("markers", "tg_full: runs only with --tg-full")


def pytest_collect_file(file_path: Any, parent: pytest.Collector) -> pytest.Module | None:
    # A file named on the command line is already collected by pytest's own python plugin.
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "system_name" in metafunc.fixturenames:
        from tokengate.bench import SYSTEMS

        marker = metafunc.definition.get_closest_marker("systems")
        names = list(marker.args[0]) if marker else list(SYSTEMS)
        metafunc.parametrize("system_name", names)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--tg-full"):
        return
    skip = pytest.mark.skip(reason="long benchmark: run with --tg-full")
    for item in items:
        if item.get_closest_marker("tg_full"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tg_full(pytestconfig: pytest.Config) -> bool:
    return bool(pytestconfig.getoption("--tg-full"))


@pytest.fixture
def open_system(system_name: str) -> Iterator[Callable[..., Any]]:
    """``open_system(layout, **coordinator_kwargs)`` starts ``system_name`` (stopped after)."""
    from tokengate import bench

    if system_name == "dask" and not bench.dask_available():
        pytest.skip("Dask distributed is not installed (pip install 'tokengate[bench]')")
    started: list[Any] = []

    def opener(layout: tuple[int, int] | None = None, **tg_kwargs: Any) -> Any:
        cores, wpc = layout or bench.default_layout()
        system = bench.make_system(system_name, cores, wpc, **tg_kwargs)
        system.start()
        started.append(system)
        return system

    yield opener
    for system in reversed(started):
        system.stop()


@pytest.fixture
def record(
    request: pytest.FixtureRequest, benchmark: Any, system_name: str
) -> Callable[..., dict[str, Any]]:
    """``record(workload, figure, unit, **context)``: keep a figure for the session table, put it
    in ``benchmark.extra_info``, and (for TokenGate) compare it with ThreadPoolExecutor's."""
    from tokengate import bench

    config = request.config
    figures = config.stash[FIGURES]

    def rec(workload: str, figure: float, unit: str, **context: Any) -> dict[str, Any]:
        r = bench.row(workload, system_name, figure, unit, **context)
        figures.append(r)
        bench.evaluate_rows([x for x in figures if x["workload"] == workload])
        key = workload.replace(" ", "_")
        benchmark.extra_info[key] = figure
        benchmark.extra_info[f"{key}_unit"] = unit
        for k, v in context.items():
            benchmark.extra_info[k] = v
        if r["ratio_vs_tpe"] is not None:
            benchmark.extra_info[f"{key}_ratio_vs_threadpool"] = r["ratio_vs_tpe"]
        if r.get("target"):
            benchmark.extra_info[f"{key}_target"] = r["target"]
            benchmark.extra_info[f"{key}_meets_target"] = r["meets_target"]
            if config.getoption("--tg-assert-targets") and r["meets_target"] is False:
                pytest.fail(
                    f"{workload}: {figure:.4g} {unit} misses the target {r['target']}"
                    + (f" (ratio {r['ratio_vs_tpe']:.3f})" if r["ratio_vs_tpe"] else "")
                )
        return r

    return rec


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    figures = config.stash.get(FIGURES, [])
    if not figures:
        return
    from tokengate import bench

    order = {w: i for i, w in enumerate(dict.fromkeys(r["workload"] for r in figures))}
    sysorder = {s: i for i, s in enumerate(bench.SYSTEMS)}
    rows = sorted(figures, key=lambda r: (order[r["workload"]], sysorder.get(r["system"], 99)))
    bench.evaluate_rows(rows)
    info = bench.machine_info()
    terminalreporter.write_sep("=", "TokenGate vs peers (ratio = figure / ThreadPoolExecutor's)")
    terminalreporter.write_line(
        f"{info['nproc']} CPUs ({info['cpu_model']}), Python {info['python']}, "
        f"tokengate {info['tokengate']}"
    )
    if config.getoption("benchmark_disable", False):
        terminalreporter.write_line(
            "--benchmark-disable: each benchmark ran once; these figures are not measurements"
        )
    terminalreporter.write_line(bench.format_table(rows))
