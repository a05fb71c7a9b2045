"""The Dask backend against a real ``LocalCluster(processes=True, n_workers=2)`` on 127.0.0.1:
results, exceptions with their tracebacks, retries, kill (queued here and queued on the
cluster), timeouts, drain, pause, resources, priorities, the storage-tier semaphore across two
coordinators, a worker killed mid-task, unpicklable arguments, and stop with work on the
cluster.

Every remote task that must wait does so on a ``distributed.Event`` the test sets (never on a
sleep); ``busy`` sleeps only as the simulated work whose overlaps the resource and semaphore
tests count."""

from __future__ import annotations

import logging
import os
import threading
import traceback
import uuid
from pathlib import Path

import pytest

distributed = pytest.importorskip(
    "distributed", reason="the Dask backend needs dask[distributed]: pip install 'tokengate[dask]'"
)

import dask  # noqa: E402
from distributed import Client, Event, LocalCluster  # noqa: E402

import _dask_tasks as tasks  # noqa: E402
from _support import SAFETY, child_json, run_child, wait_until  # noqa: E402
from tokengate import (  # noqa: E402
    AdmissionClosed,
    BackendError,
    ConfigurationError,
    OperationsCoordinator,
    TokenKilled,
    TokenState,
    TokenTimeout,
    UnpicklableArgument,
    WorkerLost,
    task_token_guard,
)
from tokengate.backends import DaskBackend, LocalBackend  # noqa: E402

THREADS = 2  # per worker


@pytest.fixture(scope="module")
def cluster():
    # Dask would re-run a task whose worker died up to 3 times on its own: 0 leaves worker
    # deaths to TokenGate's retry policy (as docs/scale-out.md recommends).
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cl = LocalCluster(
            n_workers=2,
            threads_per_worker=THREADS,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",  # no fixed port, loopback only
            resources={"heavy": 1},
            silence_logs=logging.ERROR,
        )
    try:
        yield cl
    finally:
        cl.close()


@pytest.fixture(scope="module")
def client(cluster):
    c = Client(cluster, set_as_default=False)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def dask_coord(make_coord, cluster, client):
    """A started coordinator on the cluster (its own client, by address)."""
    client.wait_for_workers(2, timeout=60)

    def factory(backend_options=None, **kwargs):
        backend = DaskBackend(cluster.scheduler_address, **(backend_options or {}))
        return make_coord(backend=backend, **kwargs)

    return factory


@pytest.fixture
def event(client):
    """A fresh ``distributed.Event`` name, set at teardown so no task is left waiting."""
    names = []

    def make():
        name = f"tokengate-test-{uuid.uuid4().hex}"
        names.append(name)
        return name

    yield make
    for name in names:
        Event(name, client=client).set()


def _worker_pids(client):
    return set(client.run(os.getpid).values())


def _peak(intervals):
    """The most intervals ``(start, end)`` open at one moment."""
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    now = peak = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


# ------------------------------------------------------------------------ results and errors


def test_results_come_back_through_the_tokens(dask_coord, client):
    coord = dask_coord()
    whoami = task_token_guard(operation_type="whoami")(tasks.whoami)
    tokens = [whoami(i) for i in range(12)]
    results = [t.get(timeout=SAFETY) for t in tokens]
    assert [r[0] for r in results] == list(range(12))
    pids = {r[1] for r in results}
    assert os.getpid() not in pids  # ran on the cluster, not here
    assert pids <= _worker_pids(client)
    assert all(t.state is TokenState.COMPLETED for t in tokens)
    stats = coord.stats()
    assert stats["completed"] == 12
    assert stats["backend"]["name"] == "dask"
    assert stats["backend"]["workers"] == 2
    assert stats["backend"]["threads"] == 2 * THREADS
    assert stats["backend"]["in_flight"] == 4 * THREADS  # twice the cluster's threads
    assert stats["backend"]["resources"] == ["heavy"]


def test_an_exception_comes_back_with_its_remote_traceback(dask_coord):
    coord = dask_coord()
    fail = task_token_guard(operation_type="fail")(tasks.fail)
    token = fail(7)
    with pytest.raises(ValueError, match="task failed on 7") as info:
        token.get(timeout=SAFETY)
    assert token.state is TokenState.FAILED
    assert isinstance(token.exception(), ValueError)
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "fail" in frames  # the task's own frame, from the worker process
    assert any(f.filename.endswith("_dask_tasks.py") for f in traceback.extract_tb(info.tb))
    # the Guard House and the history saw the failure as locally
    health = coord.guard_house.health("fail")
    assert health.failed == 1
    assert health.last_error is not None and "task failed on 7" in str(health.last_error)
    (record,) = [r for r in coord.guard_house.history() if r.token_id == token.token_id]
    assert record.outcome == "failed" and record.error_type == "ValueError"


def test_retries_follow_the_policy_on_the_cluster(dask_coord, tmp_path):
    dask_coord()
    flaky = task_token_guard(
        operation_type="flaky", retries=2, retry_backoff=0.01, retry_on=ConnectionError
    )(tasks.connection_error_once)
    token = flaky(str(tmp_path / "flaky"))
    assert token.get(timeout=SAFETY) == "recovered"
    assert token.attempts == 2
    assert [type(e) for e in token.errors] == [ConnectionError]
    # Retry raised on a worker crosses the process boundary with its delay and reason
    again = task_token_guard(operation_type="again", retries=1)(tasks.retry_once)
    token = again(str(tmp_path / "again"))
    assert token.get(timeout=SAFETY) == "second attempt"
    assert token.attempts == 2


def test_chains_run_step_after_step_on_the_cluster(dask_coord):
    dask_coord()
    add = task_token_guard(operation_type="add")(tasks.add)
    token = add(1, 2).then(tasks.add, 10).then(tasks.add, 100)
    assert token.get(timeout=SAFETY) == 113


# ------------------------------------------------------------------------- pickling


def test_an_unpicklable_argument_fails_at_submission_naming_it(dask_coord):
    coord = dask_coord()
    add = task_token_guard(operation_type="add")(tasks.add)
    before = coord.stats()["created"]
    with pytest.raises(UnpicklableArgument, match=r"argument 'b' \(position 1\) of 'add'"):
        add(1, threading.Lock())
    with pytest.raises(UnpicklableArgument, match=r"argument 'b' of 'add' cannot be pickled"):
        add(1, b=threading.Lock())
    with pytest.raises(TypeError):  # also a TypeError, as pickle's own error is
        add(threading.Lock(), 1)
    assert coord.stats()["created"] == before  # no token was made
    assert add(1, 2).get(timeout=SAFETY) == 3


def test_an_unpicklable_function_fails_at_submission(dask_coord):
    dask_coord()
    lock = threading.Lock()

    def closure(x):
        with lock:
            return x

    guarded = task_token_guard(operation_type="closure")(closure)
    with pytest.raises(UnpicklableArgument, match="the function of 'closure' cannot be pickled"):
        guarded(1)


def test_a_chain_step_with_an_unpicklable_argument_is_refused_by_then(dask_coord):
    dask_coord()
    add = task_token_guard(operation_type="add")(tasks.add)
    parent = add(1, 2)
    # the parent's result comes first: the extra argument is 'b', at position 1
    with pytest.raises(UnpicklableArgument, match=r"argument 'b' \(position 1\) of 'add'"):
        parent.then(tasks.add, threading.Lock())
    assert parent.get(timeout=SAFETY) == 3


def test_a_decorated_function_as_an_argument_is_refused_at_the_call(dask_coord):
    dask_coord()
    add = task_token_guard(operation_type="add")(tasks.add)
    with pytest.raises(UnpicklableArgument, match=r"is a @task_token_guard function"):
        add(1, add)
    whoami = task_token_guard(operation_type="whoami")(tasks.whoami)
    fn, _pid = whoami(add.__wrapped__).get(timeout=SAFETY)  # the plain function travels
    assert fn(2, 3) == 5


# ---------------------------------------------------------------------------- control


def test_kill_of_a_token_queued_here_never_sends_it(dask_coord, event, tmp_path):
    coord = dask_coord(backend_options={"in_flight": 1})
    wait_for = task_token_guard(operation_type="wait_for")(tasks.wait_for)
    touch = task_token_guard(operation_type="touch")(tasks.touch)
    go = event()
    started = tmp_path / "started"
    blocker = wait_for(go, str(started))
    assert wait_until(started.exists)
    queued = touch(str(tmp_path / "never"))
    assert [t.token_id for t in coord.queued()] == [queued.token_id]
    assert coord.kill(queued.token_id)
    with pytest.raises(TokenKilled):
        queued.get(timeout=SAFETY)
    Event(go, client=coord.backend.client).set()
    blocker.get(timeout=SAFETY)
    coord.drain(timeout=SAFETY)
    assert not (tmp_path / "never").exists()
    assert queued.state is TokenState.KILLED


def test_kill_of_a_token_queued_on_the_cluster_cancels_its_future(dask_coord, event, tmp_path):
    coord = dask_coord()  # 8 slots for 4 Dask threads: some wait on the cluster
    wait_for = task_token_guard(operation_type="wait_for")(tasks.wait_for)
    touch = task_token_guard(operation_type="touch")(tasks.touch)
    go = event()
    blockers = [wait_for(go, str(tmp_path / f"b{i}")) for i in range(2 * THREADS)]
    assert wait_until(lambda: all((tmp_path / f"b{i}").exists() for i in range(2 * THREADS)))
    victim = touch(str(tmp_path / "victim"))
    # dispatched: executing here, waiting for a Dask thread there
    assert wait_until(lambda: coord.backend.running(victim.token_id) is not None)
    assert coord.queued() == []
    assert coord.kill(victim.token_id)  # found through the backend
    with pytest.raises(TokenKilled):
        victim.get(timeout=SAFETY)
    # its slot calls the task off on the cluster before the blockers free a thread
    assert wait_until(lambda: coord.backend.running(victim.token_id) is None)
    Event(go, client=coord.backend.client).set()
    for b in blockers:
        b.get(timeout=SAFETY)
    coord.drain(timeout=SAFETY)
    assert victim.state is TokenState.KILLED
    assert not (tmp_path / "victim").exists()  # the cancelled task never ran


def test_a_timeout_releases_the_waiter_and_calls_the_task_off(dask_coord, event):
    coord = dask_coord()
    slow = task_token_guard(operation_type="slow", timeout=0.3)(tasks.wait_for)
    go = event()
    token = slow(go)
    with pytest.raises(TokenTimeout):
        token.get(timeout=SAFETY)
    assert token.state is TokenState.TIMED_OUT
    assert wait_until(lambda: coord.stats()["backend"]["running"] == 0)
    assert coord.drain(timeout=SAFETY)["remaining"] == 0


def test_drain_waits_for_the_cluster_and_closes_admission(dask_coord):
    coord = dask_coord()
    busy = task_token_guard(operation_type="busy")(tasks.busy)
    tokens = [busy(i, 0.05) for i in range(16)]
    summary = coord.drain(timeout=SAFETY)
    assert summary["completed"] == 16 and summary["remaining"] == 0
    assert not summary["timed_out"]
    assert all(t.state is TokenState.COMPLETED for t in tokens)
    with pytest.raises(AdmissionClosed):
        busy(99, 0)
    coord.resume()
    assert busy(100, 0).get(timeout=SAFETY)[0] == 100


def test_pause_keeps_tokens_here_until_resume(dask_coord, tmp_path):
    coord = dask_coord()
    touch = task_token_guard(operation_type="touch")(tasks.touch)
    coord.pause()
    tokens = [touch(str(tmp_path / f"p{i}")) for i in range(3)]
    assert {t.state for t in tokens} == {TokenState.WAITING}
    assert coord.stats()["backend"]["running"] == 0
    assert not any((tmp_path / f"p{i}").exists() for i in range(3))
    coord.resume()
    for t in tokens:
        t.get(timeout=SAFETY)
    assert all((tmp_path / f"p{i}").exists() for i in range(3))


def test_stop_with_work_on_the_cluster_ends_every_token(cluster, event):
    coord = OperationsCoordinator(backend=DaskBackend(cluster.scheduler_address))
    coord.start()
    wait_for = task_token_guard(operation_type="wait_for")(tasks.wait_for)
    go = event()
    tokens = [wait_for(go) for _ in range(3)]
    assert wait_until(lambda: coord.stats()["backend"]["running"] == 3)
    assert coord.stop(wait=True, timeout=0.5) is False  # the tasks still wait
    for t in tokens:
        with pytest.raises(TokenKilled):
            t.get(timeout=SAFETY)
    assert not coord.running
    assert coord.backend.client is None


# ------------------------------------------------------------------------ mappings


def test_heavy_tokens_take_the_heavy_resource(dask_coord, client):
    """Both workers declare heavy=1: at most one heavy token runs on each at a time, although
    each has two threads, and both workers take heavy tokens."""
    dask_coord()
    heavy = task_token_guard(operation_type="heavy", tags={"weight": "heavy"})(tasks.busy)
    runs = [t.get(timeout=SAFETY) for t in [heavy(i, 0.15) for i in range(6)]]
    by_pid: dict[int, list[tuple[float, float]]] = {}
    for _, pid, start, end in runs:
        by_pid.setdefault(pid, []).append((start, end))
    assert set(by_pid) == _worker_pids(client)
    assert all(_peak(spans) == 1 for spans in by_pid.values()), by_pid


def test_weights_no_worker_declares_run_anywhere(dask_coord, client, event, tmp_path):
    """No worker declares ``light``: light tokens are not restricted, so all four Dask threads
    run them at once (they rendezvous: each waits until the test saw all four start)."""
    dask_coord()
    light = task_token_guard(operation_type="light", tags={"weight": "light"})(tasks.wait_for)
    go = event()
    tokens = [light(go, str(tmp_path / f"l{i}")) for i in range(2 * THREADS)]
    assert wait_until(lambda: all((tmp_path / f"l{i}").exists() for i in range(2 * THREADS)))
    Event(go, client=client).set()
    pids = {t.get(timeout=SAFETY) for t in tokens}
    assert pids == _worker_pids(client)


def test_an_explicit_resource_mapping_applies(dask_coord, client):
    """``resources={"light": {"heavy": 1}}``: light tokens now take the heavy resource."""
    dask_coord(backend_options={"resources": {"light": {"heavy": 1}}})
    light = task_token_guard(operation_type="light_busy", tags={"weight": "light"})(tasks.busy)
    runs = [t.get(timeout=SAFETY) for t in [light(i, 0.15) for i in range(6)]]
    by_pid: dict[int, list[tuple[float, float]]] = {}
    for _, pid, start, end in runs:
        by_pid.setdefault(pid, []).append((start, end))
    assert all(_peak(spans) == 1 for spans in by_pid.values()), by_pid


def test_priority_reaches_the_scheduler(dask_coord, event, tmp_path):
    coord = dask_coord()
    wait_for = task_token_guard(operation_type="wait_for")(tasks.wait_for)
    go = event()
    blockers = [wait_for(go, str(tmp_path / f"b{i}")) for i in range(2 * THREADS)]
    assert wait_until(lambda: all((tmp_path / f"b{i}").exists() for i in range(2 * THREADS)))
    low = wait_for.options(priority="low")(go)
    high = wait_for.options(priority="high")(go)
    backend = coord.backend
    assert wait_until(lambda: backend.running(low.token_id) and backend.running(high.token_id))

    def priorities(dask_scheduler):
        return {
            str(key): ts.priority[0]
            for key, ts in dask_scheduler.tasks.items()
            if str(key).startswith("wait_for-")
        }

    ends = (f"-{low.token_id}-1", f"-{high.token_id}-1")
    mine: dict[str, int] = {}

    def both_on_the_scheduler() -> bool:
        seen = backend.client.run_on_scheduler(priorities)
        mine.clear()
        mine.update({k: v for k, v in seen.items() if k.endswith(ends)})
        return len(mine) == 2

    assert wait_until(both_on_the_scheduler)  # the client sends its graph asynchronously
    by_token = {int(k.rsplit("-", 2)[1]): v for k, v in mine.items()}
    # Dask runs the smallest first: its first item is minus the user priority
    assert by_token[high.token_id] == -10 and by_token[low.token_id] == 10
    Event(go, client=backend.client).set()
    for t in [*blockers, low, high]:
        t.get(timeout=SAFETY)


# ------------------------------------------------------------------- storage tiers


_TIER_CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
from distributed import Event
import _dask_tasks as tasks
from tokengate import OperationsCoordinator, task_token_guard
from tokengate.backends import DaskBackend

slow = task_token_guard(operation_type="tier", tags={{"storage_speed": "SLOW"}})(tasks.busy)
with OperationsCoordinator(backend=DaskBackend({address!r}), storage_limits={{"SLOW": 2}}) as c:
    Event({ready!r}, client=c.backend.client).set()
    Event({go!r}, client=c.backend.client).wait(60)
    runs = [t.get(timeout=60) for t in [slow("child", 0.1) for _ in range(8)]]
print("RESULT " + json.dumps([[s, e] for _, _, s, e in runs]))
"""


def test_a_storage_tier_is_bounded_across_coordinators(dask_coord, event, tmp_path, client):
    """Two coordinators (this process and a child) each allow 2 SLOW tokens at once; the
    cluster-wide semaphore keeps all of them together at 2 (the local permits alone would
    allow 4 on the cluster's 4 threads)."""
    ready, go = event(), event()
    child = threading.Thread(
        target=lambda: out.append(
            run_child(
                tmp_path,
                _TIER_CHILD.format(
                    tests=str(Path(__file__).parent),
                    address=client.scheduler.address,
                    ready=ready,
                    go=go,
                ),
                timeout=120,
            )
        )
    )
    out: list = []
    child.start()
    coord = dask_coord(storage_limits={"SLOW": 2})
    slow = task_token_guard(operation_type="tier", tags={"storage_speed": "SLOW"})(tasks.busy)
    assert Event(ready, client=client).wait(60)
    Event(go, client=client).set()
    mine = [t.get(timeout=60) for t in [slow("parent", 0.1) for _ in range(8)]]
    child.join(120)
    rc, stdout, stderr = out[0]
    assert rc == 0, stderr
    theirs = child_json(stdout)
    spans = [(s, e) for _, _, s, e in mine] + [tuple(x) for x in theirs]
    assert len(spans) == 16
    assert _peak(spans) <= 2, sorted(spans)
    assert coord.stats()["completed"] == 8


# -------------------------------------------------------------------- worker death


def test_a_worker_killed_mid_task_fails_the_token_with_the_cause(dask_coord, client, tmp_path):
    dask_coord()
    die = task_token_guard(operation_type="die")(tasks.die_once)
    token = die(str(tmp_path / "died"))
    with pytest.raises(
        WorkerLost, match=r"attempt 1: the Dask worker it ran or waited on died"
    ) as info:
        token.get(timeout=60)
    assert token.state is TokenState.FAILED
    assert type(info.value.__cause__).__name__ == "KilledWorker"
    assert (tmp_path / "died").exists()
    client.wait_for_workers(2, timeout=60)  # the nanny restarts it


def test_a_worker_killed_mid_task_is_retried_per_policy(dask_coord, client, tmp_path):
    dask_coord()
    die = task_token_guard(operation_type="die", retries=1, retry_backoff=0.01)(tasks.die_once)
    token = die(str(tmp_path / "died"))
    result, _pid = token.get(timeout=60)
    assert result == "survived"
    assert token.attempts == 2
    assert [type(e) for e in token.errors] == [WorkerLost]
    client.wait_for_workers(2, timeout=60)


# -------------------------------------------------------------------- configuration


def test_backend_arguments_are_checked_at_construction():
    with pytest.raises(ConfigurationError, match="address_or_client must be"):
        DaskBackend(42)
    with pytest.raises(ConfigurationError, match="in_flight must be an int from 1 to 1024"):
        DaskBackend("tcp://127.0.0.1:1", in_flight=0)
    with pytest.raises(ConfigurationError, match="'huge' is not a weight"):
        DaskBackend("tcp://127.0.0.1:1", resources={"huge": {"gpu": 1}})
    with pytest.raises(ConfigurationError, match=r"resources\['heavy'\]\['gpu'\] must be"):
        DaskBackend("tcp://127.0.0.1:1", resources={"heavy": {"gpu": 0}})
    with pytest.raises(ConfigurationError, match="resources must be 'auto' or a mapping"):
        DaskBackend("tcp://127.0.0.1:1", resources="all")
    with pytest.raises(ConfigurationError, match="cannot take the dask backend"):
        OperationsCoordinator(backend=DaskBackend("tcp://127.0.0.1:1"), mode="inline")
    with pytest.raises(ConfigurationError, match="backend must be None, a LocalBackend"):
        OperationsCoordinator(backend="dask")  # type: ignore[arg-type]


def test_an_unreachable_scheduler_fails_the_start():
    coord = OperationsCoordinator(backend=DaskBackend("tcp://127.0.0.1:9", connect_timeout=1))
    with pytest.raises(BackendError, match="could not connect to the Dask scheduler at tcp://"):
        coord.start()
    assert not coord.running


def test_a_client_given_is_left_open_and_a_cluster_given_gets_its_own(cluster, client):
    with OperationsCoordinator(backend=DaskBackend(client)) as coord:
        assert coord.backend.client is client
        add = task_token_guard(operation_type="add")(tasks.add)
        assert add(2, 3).get(timeout=SAFETY) == 5
    assert client.status == "running"
    backend = DaskBackend(cluster)
    with OperationsCoordinator(backend=backend):
        own = backend.client
        assert own is not None and own is not client
    assert own.status == "closed"


def test_the_local_backend_is_the_default():
    coord = OperationsCoordinator()
    assert isinstance(coord.backend, LocalBackend)
    with coord:
        assert coord.stats()["backend"] == {"name": "local"}


# ------------------------------------------------------- governance on the cluster


def test_a_blocked_operation_queues_nothing_and_events_and_metrics_count(dask_coord):
    from tokengate import MethodBlocked
    from tokengate.observe.metrics import generate_latest

    coord = dask_coord()
    seen: list[str] = []
    coord.events.subscribe(lambda e: seen.append(e.kind), kinds=["completed", "failed"])
    add = task_token_guard(operation_type="metered")(tasks.add)
    fail = task_token_guard(operation_type="metered_fail")(tasks.fail)
    assert [add(i, 1).get(timeout=SAFETY) for i in range(3)] == [1, 2, 3]
    with pytest.raises(ValueError):
        fail(0).get(timeout=SAFETY)
    assert coord.events.flush(SAFETY)
    assert sorted(seen) == ["completed"] * 3 + ["failed"]
    text = generate_latest(coord).decode()
    assert 'operation="metered"' in text and 'operation="metered_fail"' in text
    coord.guard_house.block("metered")
    with pytest.raises(MethodBlocked):
        add(1, 1)
    coord.guard_house.unblock("metered")
    assert add(1, 1).get(timeout=SAFETY) == 2


def test_tracing_spans_cover_the_remote_execution(make_coord, cluster):
    pytest.importorskip("opentelemetry.sdk", reason="pip install opentelemetry-sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    make_coord(backend=DaskBackend(cluster.scheduler_address), tracing=provider)
    busy = task_token_guard(operation_type="traced_busy")(tasks.busy)
    _, _, start, end = busy("t", 0.2).get(timeout=SAFETY)
    fail = task_token_guard(operation_type="traced_fail")(tasks.fail)
    with pytest.raises(ValueError):
        fail(1).get(timeout=SAFETY)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"traced_busy", "traced_fail"}
    assert (spans["traced_busy"].end_time - spans["traced_busy"].start_time) / 1e9 >= end - start
    assert spans["traced_fail"].status.status_code.name == "ERROR"


def test_a_coordinator_restarts_on_the_same_backend(cluster, client):
    backend = DaskBackend(cluster.scheduler_address)
    coord = OperationsCoordinator(backend=backend)
    add = task_token_guard(operation_type="add")(tasks.add)
    for round_ in range(2):
        with coord:
            assert add(round_, 1).get(timeout=SAFETY) == round_ + 1
        assert backend.client is None
    with pytest.raises(ConfigurationError, match="already serves a running coordinator"):
        with coord:
            OperationsCoordinator(backend=backend).start()


# ------------------------------------------------------- when the cluster cannot run it


@pytest.fixture
def small_cluster():
    """A cluster of its own (in-process, one worker) that a test may take apart."""
    cl = LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=False,
        dashboard_address="127.0.0.1:0",
        worker_dashboard_address="127.0.0.1:0",
        silence_logs=logging.ERROR,
    )
    try:
        yield cl
    finally:
        cl.close()


def test_an_attempt_no_worker_can_run_fails_after_no_worker_timeout(make_coord, small_cluster):
    coord = make_coord(backend=DaskBackend(small_cluster, no_worker_timeout=1))
    add = task_token_guard(operation_type="add")(tasks.add)
    assert add(1, 1).get(timeout=SAFETY) == 2
    small_cluster.scale(0)
    assert wait_until(lambda: coord.stats()["backend"]["workers"] == 0)
    token = add(2, 2)
    with pytest.raises(BackendError, match=r"could run it for 1 s \(the cluster has no workers\)"):
        token.get(timeout=SAFETY)
    assert token.state is TokenState.FAILED
    assert coord.stop(timeout=SAFETY)


def test_a_resource_no_worker_declares_fails_after_no_worker_timeout(dask_coord):
    dask_coord(backend_options={"resources": {"light": {"gpu": 1}}, "no_worker_timeout": 0.5})
    light = task_token_guard(operation_type="gpu_work", tags={"weight": "light"})(tasks.add)
    with pytest.raises(BackendError, match="no worker declares resource 'gpu'"):
        light(1, 2).get(timeout=SAFETY)


def test_a_client_closed_under_a_running_token_fails_it(cluster, event, make_coord):
    own = Client(cluster.scheduler_address, set_as_default=False)
    coord = make_coord(backend=DaskBackend(own))
    wait_for = task_token_guard(operation_type="wait_for")(tasks.wait_for)
    token = wait_for(event())
    assert wait_until(lambda: coord.backend.running(token.token_id) is not None)
    own.close()
    with pytest.raises(BackendError, match=r"the Dask client is (closing|closed)"):
        token.get(timeout=SAFETY)
    with pytest.raises(BackendError):  # later calls fail at once too
        wait_for("never").get(timeout=SAFETY)


def test_kill_by_id_reaches_a_retried_attempt(dask_coord, event):
    coord = dask_coord()
    slow = task_token_guard(
        operation_type="slow_retried",
        timeout=0.5,
        retries=1,
        retry_on=TokenTimeout,
        retry_backoff=0.01,
    )(tasks.wait_for)
    token = slow(event())
    assert wait_until(lambda: token.attempts == 2)
    assert wait_until(lambda: coord.backend.running(token.token_id) is not None)
    assert coord.kill(token.token_id)
    with pytest.raises(TokenKilled):
        token.get(timeout=SAFETY)


# ---------------------------------------------------------------- the tier semaphore


def _max_leases(client, name):
    return client.run_on_scheduler(
        lambda dask_scheduler: dask_scheduler.extensions["semaphores"].max_leases.get(name)
    )


def _tier_op(operation, tier, fn):
    return task_token_guard(operation_type=operation, tags={"storage_speed": tier})(fn)


class _HeldLease:
    """A storage tier of a namespace of its own, bounded at ``limit``, one of whose leases a
    token of ``coord`` holds while its task runs, until :meth:`release`."""

    def __init__(self, dask_coord, cluster, event, tmp_path, tier, limit):
        self.ns = f"t{uuid.uuid4().hex[:8]}"
        self.tier = tier
        self._address = cluster.scheduler_address
        self.coord = dask_coord(
            storage_limits={tier: limit}, backend_options={"namespace": self.ns}
        )
        self.go = event()
        self.hold = _tier_op(f"hold_{tier}", tier, tasks.wait_for)
        self.holder = self.hold(self.go, str(tmp_path / "holder"))
        assert wait_until((tmp_path / "holder").exists)  # its task runs on a worker

    @property
    def name(self):
        return f"{self.ns}-storage-{self.tier}"

    def other(self, limit):
        """Another coordinator of the namespace (not started; decorated calls go to it once it
        is, being the last started)."""
        return OperationsCoordinator(
            backend=DaskBackend(self._address, namespace=self.ns), storage_limits={self.tier: limit}
        )

    def release(self):
        Event(self.go, client=self.coord.backend.client).set()


def test_a_token_killed_while_waiting_for_a_lease_never_runs(dask_coord, cluster, event, tmp_path):
    """Two coordinators share the SLOW bound of 1: while the first one's token holds the
    lease, the second one's waits for it on its dispatch slot; killed there, it never runs."""
    held = _HeldLease(dask_coord, cluster, event, tmp_path, "SLOW", 1)
    slow_touch = _tier_op("lease2", "SLOW", tasks.touch)
    second = held.other(1)
    with second:
        waiting = slow_touch(str(tmp_path / "never"))
        assert wait_until(lambda: second.backend.running(waiting.token_id) is not None)
        assert second.kill(waiting.token_id)
        with pytest.raises(TokenKilled):
            waiting.get(timeout=SAFETY)
        held.release()
        held.holder.get(timeout=SAFETY)
        assert second.drain(timeout=SAFETY)["remaining"] == 0
    assert waiting.state is TokenState.KILLED
    assert not (tmp_path / "never").exists()  # it never got the lease, so it never ran
    assert _max_leases(held.coord.backend.client, held.name) == 1


def test_set_storage_limit_moves_the_cluster_wide_bound(dask_coord, client):
    ns = f"t{uuid.uuid4().hex[:8]}"
    coord = dask_coord(storage_limits={"FAST": 2}, backend_options={"namespace": ns})
    fast = task_token_guard(operation_type="fast", tags={"storage_speed": "FAST"})(tasks.add)
    assert fast(1, 2).get(timeout=SAFETY) == 3
    assert _max_leases(client, f"{ns}-storage-FAST") == 2
    coord.set_storage_limit("fast", 3)
    assert _max_leases(client, f"{ns}-storage-FAST") == 3
    assert fast(2, 2).get(timeout=SAFETY) == 4


def test_coordinators_disagreeing_on_a_tier_limit_are_told(dask_coord, cluster, event, tmp_path):
    held = _HeldLease(dask_coord, cluster, event, tmp_path, "MODERATE", 2)
    moderate = _tier_op("mod", "MODERATE", tasks.add)
    with held.other(5):  # while the first coordinator's token holds a lease
        with pytest.raises(ConfigurationError, match="bounded at another limit on this cluster"):
            moderate(1, 1).get(timeout=SAFETY)
    held.release()
    held.holder.get(timeout=SAFETY)


def test_a_bound_no_one_uses_is_taken_over(dask_coord, cluster, client):
    """An earlier run left the tier at another limit: a coordinator with a new limit takes it
    over while no lease of it is held or awaited."""
    ns = f"t{uuid.uuid4().hex[:8]}"
    moderate = task_token_guard(operation_type="mod", tags={"storage_speed": "MODERATE"})(tasks.add)
    for limit in (2, 5):
        with OperationsCoordinator(
            backend=DaskBackend(cluster.scheduler_address, namespace=ns),
            storage_limits={"MODERATE": limit},
        ):
            assert moderate(1, limit).get(timeout=SAFETY) == 1 + limit
        assert _max_leases(client, f"{ns}-storage-MODERATE") == limit


def test_a_killed_running_tier_task_keeps_its_lease_until_it_ends(
    dask_coord, cluster, event, tmp_path
):
    """Locally a killed task keeps its permit until it returns, so the bound holds: on the
    cluster its slot keeps the lease until the task ends there."""
    held = _HeldLease(dask_coord, cluster, event, tmp_path, "SLOW", 1)
    first = held.holder
    assert first.kill()
    with pytest.raises(TokenKilled):
        first.get(timeout=SAFETY)
    # another coordinator of the namespace: only the cluster-wide lease stands in its way
    with held.other(1):
        second = held.hold(held.go, str(tmp_path / "second"))  # ends with the holder
        assert not wait_until((tmp_path / "second").exists, timeout=2.0)
        assert first.state is TokenState.CANCELLING  # its slot waits for the task to end
        held.release()
        second.get(timeout=SAFETY)
    assert wait_until(lambda: first.state is TokenState.KILLED)


def test_stop_without_wait_kills_a_token_waiting_for_a_lease(dask_coord, cluster, event, tmp_path):
    held = _HeldLease(dask_coord, cluster, event, tmp_path, "SLOW", 1)
    touch = _tier_op("slow_touch", "SLOW", tasks.touch)
    second = held.other(1)
    second.start()
    waiting = touch(str(tmp_path / "never"))
    assert wait_until(lambda: second.backend.running(waiting.token_id) is not None)
    assert second.stop(wait=False, timeout=SAFETY)
    assert waiting.state is TokenState.KILLED
    held.release()
    held.holder.get(timeout=SAFETY)
    assert not (tmp_path / "never").exists()


def test_bad_addresses_are_refused_at_construction():
    for address, fragment in [
        ("not an address", "missing port number"),
        ("foo://127.0.0.1:1", "unknown protocol 'foo'"),
        ("tcp://127.0.0.1:99999", "needs a port from 1 to 65535"),
        ("tcp://127.0.0.1", "missing port number"),
    ]:
        with pytest.raises(ConfigurationError, match=fragment):
            DaskBackend(address)


def test_a_decorated_function_of_a_module_is_sent_by_name(dask_coord):
    """The worker runs its own import of the module: module state persists between calls and
    a module-level lock is no obstacle (sent by value, each call would get a fresh copy)."""
    dask_coord()
    runs = [tasks.counted().get(timeout=SAFETY) for _ in range(8)]
    by_pid: dict[int, list[int]] = {}
    for n, pid in runs:
        by_pid.setdefault(pid, []).append(n)
    assert all(ns == sorted(ns) and len(set(ns)) == len(ns) for ns in by_pid.values()), by_pid
    assert max(len(ns) for ns in by_pid.values()) >= 2
    assert any(ns[-1] > 1 for ns in by_pid.values())


def test_a_decorated_call_inside_a_task_on_a_worker_says_where_it_ran(dask_coord):
    from tokengate import CoordinatorNotRunning

    coord = dask_coord()
    with pytest.raises(CoordinatorNotRunning, match="inside a task running on a Dask worker"):
        tasks.nested().get(timeout=SAFETY)
    # submit() of a decorated function would make the same call on the worker: refused
    with pytest.raises(UnpicklableArgument, match=r"submitted through submit\(\)"):
        coord.submit(tasks.counted)
