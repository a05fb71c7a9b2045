"""The pytest plugin ``tokengate.testing.plugin``: its fixtures, what it does when
pytest-benchmark is missing, loading it twice, opting out, and the docs' example file.

Inner pytest runs opt in with ``-p tokengate.testing.plugin``; when tokengate is installed
its entry point loads the plugin too, which must be harmless, so every test passes either
way (a fake ``pytest11`` entry point on ``sys.path`` simulates the installed case here).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import pytest

import tokengate
from tokengate import InvalidDecoration, task_token_guard
from tokengate.testing import Comparison, compare_concurrency

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ("-p", "tokengate.testing.plugin")
#: inner runs leave out the cache and hypothesis's plugin (which takes most of a run's time)
QUIET = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest")
BASE = (*QUIET, *PLUGIN)
DOC_MARKER = "a pytest file that tests/test_plugin.py runs with pytest -->"
FENCE = re.compile(r"```python\n(?P<code>.*?)\n```", re.DOTALL)


def _doc_files() -> list[str]:
    """The ``python`` blocks of docs/benchmarks.md that follow the plugin marker."""
    text = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    blocks = []
    for part in text.split(DOC_MARKER)[1:]:
        m = FENCE.match(part.lstrip("\n"))
        assert m, "a plugin marker in docs/benchmarks.md is not followed by a python block"
        blocks.append(m["code"] + "\n")
    return blocks


def _child_env(*extra_paths: Path) -> dict[str, str]:
    """The environment of a child pytest: tokengate importable however this run found it."""
    env = dict(os.environ)
    pkg_root = str(Path(tokengate.__file__).resolve().parent.parent)
    paths = [str(p) for p in extra_paths]
    if Path(pkg_root).name not in ("site-packages", "dist-packages"):
        paths.append(pkg_root)  # a source checkout on PYTHONPATH
    paths += [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_DISABLE_PLUGIN_AUTOLOAD", None)
    return env


@pytest.fixture
def fake_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A distribution on sys.path whose ``pytest11`` entry point is the installed wheel's."""
    site = tmp_path / "fake-site"
    info = site / "tokengate_plugin_probe-0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: tokengate-plugin-probe\nVersion: 0.0\n"
    )
    (info / "entry_points.txt").write_text("[pytest11]\ntokengate = tokengate.testing.plugin\n")
    monkeypatch.syspath_prepend(str(site))
    return site


# --------------------------------------------------------------------------------------------
# The plugin stays out of the way
# --------------------------------------------------------------------------------------------


def test_the_plugin_adds_fixtures_only_and_a_test_asking_for_none_sets_none_up(
    pytester: pytest.Pytester,
):
    pytester.makepyfile(
        """
        def test_plain(request):
            pm = request.config.pluginmanager
            mod = pm.get_plugin("tokengate.testing.plugin") or pm.get_plugin("tokengate")
            assert [n for n in dir(mod) if n.startswith("pytest_")] == [
                "pytest_plugin_registered"
            ]
            assert sorted(mod.__all__) == [
                "concurrency_compare",
                "tokengate_coordinator",
                "tokengate_coordinator_options",
                "tokengate_teardown_timeout",
            ]
        """
    )
    result = pytester.runpytest(*BASE, "--setup-show")
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    assert "test_plain (fixtures used: request)" in out
    assert not re.search(r"SETUP.*(tokengate|concurrency_compare)", out)


# --------------------------------------------------------------------------------------------
# tokengate_coordinator
# --------------------------------------------------------------------------------------------


def test_coordinator_runs_the_test_and_is_stopped_after(pytester: pytest.Pytester):
    pytester.makepyfile(
        """
        from tokengate import task_token_guard

        SEEN = []

        @task_token_guard(operation_type="square")
        def square(x):
            return x * x

        def test_uses_it(tokengate_coordinator):
            SEEN.append(tokengate_coordinator)
            assert tokengate_coordinator.running
            assert square(7).get(timeout=10) == 49
            square(3)  # not awaited: it finishes within the teardown timeout

        def test_after():
            (coord,) = SEEN
            assert not coord.running
            assert coord.stats()["completed"] == 2

        def test_stopped_by_the_test(tokengate_coordinator):
            tokengate_coordinator.stop()
        """
    )
    pytester.runpytest(*BASE).assert_outcomes(passed=3)


def test_options_fixture_and_indirect_parameters(pytester: pytest.Pytester):
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def tokengate_coordinator_options():
            return {"cores": 1, "workers_per_core": 3}

        def test_options(tokengate_coordinator):
            s = tokengate_coordinator.stats()
            assert (s["cores"], s["workers_per_core"]) == (1, 3)

        @pytest.mark.parametrize("tokengate_coordinator", [{"workers_per_core": 2}], indirect=True)
        def test_indirect(tokengate_coordinator):
            s = tokengate_coordinator.stats()
            assert (s["cores"], s["workers_per_core"]) == (1, 2)

        @pytest.mark.parametrize("tokengate_coordinator", [3], indirect=True)
        def test_not_a_dict(tokengate_coordinator):
            pass
        """
    )
    result = pytester.runpytest(*BASE)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*indirect parameter of tokengate_coordinator must be a dict*"])


def test_tokens_left_in_flight_error_at_teardown_naming_them(pytester: pytest.Pytester):
    pytester.makepyfile(
        """
        import threading

        import pytest
        from tokengate import task_token_guard

        GATE = threading.Event()
        STARTED = threading.Event()

        @pytest.fixture
        def tokengate_teardown_timeout():
            return 0.05

        @pytest.fixture
        def tokengate_coordinator_options():
            return {"cores": 1, "workers_per_core": 1, "grow_on_demand": False}

        @task_token_guard(operation_type="stuck_job")
        def stuck():
            STARTED.set()
            GATE.wait(30)

        @task_token_guard(operation_type="queued_job")
        def queued():
            return 1

        def test_leaves_tokens(tokengate_coordinator):
            stuck()
            assert STARTED.wait(10)
            queued()

        def test_release_the_worker():
            GATE.set()
        """
    )
    result = pytester.runpytest(*BASE)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaves_tokens*",
            "*tokengate_coordinator: 2 tokens still unresolved 0.05 s after test_leaves_tokens*",
            "*#1 'stuck_job' EXECUTING on core 1 (worker 0)",
            "*#2 'queued_job' ADMITTED on core 1",
            "*1 token not yet started was killed at teardown; 1 still executing*",
            "*override the tokengate_teardown_timeout fixture*",
        ]
    )


def test_a_zero_teardown_timeout_reports_queued_tokens_at_once(pytester: pytest.Pytester):
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def tokengate_teardown_timeout():
            return 0

        def paused_job():
            return 1

        def test_leaves_a_paused_token(tokengate_coordinator):
            tokengate_coordinator.pause()
            tokengate_coordinator.submit(paused_job)
        """
    )
    result = pytester.runpytest(*BASE)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*1 token still unresolved 0 s after test_leaves_a_paused_token ended:",
            "*#1 '*paused_job' WAITING",
            "*1 token not yet started was killed at teardown.",
        ]
    )


def test_tokens_still_running_at_teardown_may_submit_more(pytester: pytest.Pytester):
    pytester.makepyfile(
        """
        import threading

        import pytest

        GATE = threading.Event()
        PARENTS = []

        @pytest.fixture
        def open_the_gate_at_teardown(tokengate_coordinator):
            yield
            GATE.set()  # runs before tokengate_coordinator's teardown check

        def test_parent_outlives_the_test(tokengate_coordinator, open_the_gate_at_teardown):
            coord = tokengate_coordinator

            def parent():
                GATE.wait(30)
                return coord.submit(lambda: "child").get(timeout=30)  # admission still open

            PARENTS.append(coord.submit(parent))

        def test_after():
            (parent,) = PARENTS
            assert parent.get(timeout=10) == "child"
        """
    )
    pytester.runpytest(*BASE).assert_outcomes(passed=2)


# --------------------------------------------------------------------------------------------
# concurrency_compare and compare_concurrency
# --------------------------------------------------------------------------------------------


def test_the_docs_show_the_plugin_files():
    files = _doc_files()
    assert len(files) == 2
    assert "concurrency_compare" in files[0] and "tokengate_coordinator" in files[1]
    assert len(files[0].strip().splitlines()) <= 12  # "a dozen lines"


def test_doc_example_records_timings_and_ratios(pytester: pytest.Pytester, tmp_path: Path):
    compare, coordinator = _doc_files()
    pytester.makepyfile(test_checksum=compare, test_checksum_tokens=coordinator)
    out = tmp_path / "checksum.json"
    result = pytester.runpytest(*BASE, "-s", f"--benchmark-json={out}")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*checksum: 200 calls on * threads, median of 5: threadpool *"])
    (bench,) = json.loads(out.read_text())["benchmarks"]
    info = bench["extra_info"]
    for system in ("threadpool", "asyncio_to_thread", "tokengate"):
        for figure in ("median_s", "min_s", "us_per_call"):
            assert info[f"{system}_{figure}"] > 0, (system, figure)
    assert info["ratio_vs_threadpool"] == pytest.approx(
        info["tokengate_median_s"] / info["threadpool_median_s"]
    )
    assert info["ratio_vs_asyncio_to_thread"] == pytest.approx(
        info["tokengate_median_s"] / info["asyncio_to_thread_median_s"]
    )
    assert (info["workload"], info["calls_per_round"], info["rounds"]) == ("checksum", 200, 5)
    assert info["threads"] == info["cores"] * info["workers_per_core"]
    assert bench["stats"]["rounds"] == 5  # TokenGate's rounds, run by benchmark.pedantic


def test_benchmark_disable_runs_each_system_once_and_a_second_call_is_refused(
    pytester: pytest.Pytester,
):
    pytester.makepyfile(
        """
        import pytest

        def work(x):
            return x + 1

        def test_once(concurrency_compare):
            result = concurrency_compare(work, 1, calls=10)
            assert result.rounds == 1
            assert all(len(t) == 1 for t in result.seconds.values())
            with pytest.raises(RuntimeError, match="runs once per test"):
                concurrency_compare(work, 1)
        """
    )
    pytester.runpytest(*BASE, "--benchmark-disable").assert_outcomes(passed=1)


def test_without_pytest_benchmark_the_compare_test_is_skipped_naming_the_install(
    tmp_path: Path,
):
    (tmp_path / "test_x.py").write_text(
        textwrap.dedent(
            """
            def test_compare(concurrency_compare):
                raise AssertionError("not reached")

            def test_coordinator_still_works(tokengate_coordinator):
                assert tokengate_coordinator.submit(int, "5").get(timeout=10) == 5
            """
        )
    )
    # pytest-benchmark made unimportable, as if it were not installed
    hide = textwrap.dedent(
        """
        import sys
        from importlib.machinery import PathFinder

        find = PathFinder.find_spec

        def hide(cls, name, path=None, target=None):
            if name.partition(".")[0] == "pytest_benchmark":
                return None
            return find(name, path, target)

        PathFinder.find_spec = classmethod(hide)  # before pytest's rewriting hook copies it
        import pytest

        sys.exit(pytest.main(sys.argv[1:]))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", hide, "-p", "no:benchmark", *BASE, "-rs", "test_x.py"],
        cwd=tmp_path,
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "1 passed, 1 skipped" in out
    assert 'concurrency_compare needs pytest-benchmark: pip install "tokengate[test]"' in out


def _count_calls(x: int) -> int:
    return x


def test_compare_concurrency_runs_every_system_the_same_calls():
    calls: list[int] = []

    def work(x: int) -> int:
        calls.append(x)
        return x

    result = compare_concurrency(work, 7, calls=20, rounds=2, warmup_rounds=1)
    assert isinstance(result, Comparison)
    assert result.systems == ("threadpool", "asyncio.to_thread", "tokengate")
    assert len(calls) == 3 * (2 + 1) * 20 and set(calls) == {7}
    assert all(len(t) == 2 and min(t) > 0 for t in result.seconds.values())
    assert set(result.ratios) == {"threadpool", "asyncio.to_thread"}
    assert result.ratios["threadpool"] == pytest.approx(
        result.median("tokengate") / result.median("threadpool")
    )
    assert result.weight == "medium" and result.calls == 20
    info = result.extra_info()
    assert info["tokengate_us_per_call"] == pytest.approx(result.median("tokengate") / 20 * 1e6)


def test_compare_concurrency_with_arglist_and_a_decorated_function():
    @task_token_guard(operation_type="double", tags={"weight": "heavy"})
    def double(x: int) -> int:
        return 2 * x

    # The peers must run double.__wrapped__: the decorated function itself needs a running
    # coordinator and returns tokens.
    result = compare_concurrency(
        double, arglist=[(i,) for i in range(10)], rounds=1, warmup_rounds=0, peers=["threadpool"]
    )
    assert (result.workload, result.weight, result.calls) == ("double", "heavy", 10)
    assert result.systems == ("threadpool", "tokengate")


def test_compare_concurrency_names_a_partial_after_its_function_and_may_run_alone():
    result = compare_concurrency(
        partial(_count_calls, 1), calls=3, rounds=1, warmup_rounds=0, peers=()
    )
    assert (result.workload, result.systems, result.ratios) == ("_count_calls", ("tokengate",), {})


async def _inside_a_loop() -> None:
    compare_concurrency(_count_calls, 1, calls=1)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: compare_concurrency(_count_calls, 1, arglist=[(1,)]), TypeError, "not both"),
        (lambda: compare_concurrency(_count_calls, arglist=[]), ValueError, "empty"),
        (lambda: compare_concurrency(_count_calls, calls=0), ValueError, "calls must be >= 1"),
        (lambda: compare_concurrency(_count_calls, rounds=True), TypeError, "rounds must be"),
        (lambda: compare_concurrency(_count_calls, peers=["dask"]), ValueError, "unknown peer"),
        (lambda: compare_concurrency(_count_calls, peers="threadpool"), TypeError, "sequence"),
        (lambda: compare_concurrency(42), TypeError, "callable"),
        (lambda: compare_concurrency(_count_calls, weight="huge"), ValueError, "weight"),
        (lambda: asyncio.run(_inside_a_loop()), RuntimeError, "synchronous test"),
    ],
    ids=[
        "arglist-and-args",
        "empty-arglist",
        "zero-calls",
        "bool-rounds",
        "unknown-peer",
        "peers-str",
        "not-callable",
        "bad-weight",
        "running-loop",
    ],
)
def test_compare_concurrency_rejects_bad_input_before_running(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_compare_concurrency_refuses_async_functions_and_a_weight_for_a_decorated_one():
    async def coro_fn() -> None:
        pass

    with pytest.raises(InvalidDecoration):
        compare_concurrency(coro_fn)
    guarded = task_token_guard(operation_type="g")(_count_calls)
    with pytest.raises(TypeError, match="already decorated"):
        compare_concurrency(guarded, 1, weight="heavy")


# --------------------------------------------------------------------------------------------
# Loading: entry point, explicit opt-in (both at once), opt-out
# --------------------------------------------------------------------------------------------

_USES_IT = """
def test_uses_it(tokengate_coordinator, request):
    pm = request.config.pluginmanager
    names = [n for n in ("tokengate", "tokengate.testing.plugin") if pm.get_plugin(n)]
    assert len(names) == 1, names
    assert tokengate_coordinator.submit(len, "abc").get(timeout=10) == 3
"""


def test_the_entry_point_alone_loads_it(pytester: pytest.Pytester, fake_entry_point: Path):
    pytester.makepyfile(_USES_IT)
    pytester.runpytest(*QUIET).assert_outcomes(passed=1)


def test_entry_point_plus_dash_p_registers_it_once(
    pytester: pytest.Pytester, fake_entry_point: Path
):
    pytester.makepyfile(_USES_IT)
    pytester.runpytest(*BASE).assert_outcomes(passed=1)


def test_entry_point_plus_pytest_plugins_registers_it_once(
    pytester: pytest.Pytester, fake_entry_point: Path
):
    pytester.makeconftest('pytest_plugins = ["tokengate.testing.plugin"]\n')
    pytester.makepyfile(_USES_IT)
    pytester.runpytest(*QUIET).assert_outcomes(passed=1)


def test_opting_out_loads_neither_the_plugin_nor_tokengate(tmp_path: Path, fake_entry_point: Path):
    (tmp_path / "test_out.py").write_text(
        textwrap.dedent(
            """
            import sys

            def test_nothing_loaded(request):
                assert "tokengate" not in sys.modules
                assert request.config.pluginmanager.get_plugin("tokengate") is None

            def test_fixture_gone(tokengate_coordinator):
                pass
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *QUIET, "-p", "no:tokengate"],
        cwd=tmp_path,
        env=_child_env(fake_entry_point),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert "1 passed, 1 error" in out, out
    assert "fixture 'tokengate_coordinator' not found" in out


def test_loading_the_plugin_imports_nothing_of_tokengate(tmp_path):
    """A project that has tokengate installed but uses none of its fixtures pays nothing: the
    plugin module lives outside the package and imports tokengate only inside its fixtures."""
    (tmp_path / "test_other.py").write_text(
        "import sys\n\n"
        "def test_other():\n"
        "    assert 'tokengate' not in sys.modules, sorted(sys.modules)\n"
        "    assert '_tokengate_pytest' in sys.modules\n"
    )
    import _tokengate_pytest

    where = str(Path(_tokengate_pytest.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([where, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "_tokengate_pytest", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
