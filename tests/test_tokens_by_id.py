"""Tokens by id: ``coordinator.queued()``, ``coordinator.kill(id)`` wherever a queued token
waits, and the launchable operations (``register_launchable`` / ``launch``) the dashboard's
admins start."""

from __future__ import annotations

import threading
import time

import pytest

from tokengate import (
    ConfigurationError,
    CoordinatorNotRunning,
    InvalidOption,
    OperationsCoordinator,
    TokenKilled,
    TokenState,
    task_token_guard,
)


def _coord(**kw: object) -> OperationsCoordinator:
    kw.setdefault("cores", 1)
    kw.setdefault("workers_per_core", 1)
    kw.setdefault("grow_on_demand", False)
    kw.setdefault("convergence_interval", None)
    return OperationsCoordinator(**kw)  # type: ignore[arg-type]


def test_queued_lists_the_pool_high_lane_first_and_kill_takes_one_out() -> None:
    with _coord() as c:
        c.pause()
        low = c.submit(int, 1)
        normal = c.submit(int, 2)
        assert c.reprioritize(low.token_id, "low")
        high = c.submit(int, 3)
        assert c.reprioritize(high.token_id, "high")
        ids = [t.token_id for t in c.queued()]
        assert ids == [high.token_id, normal.token_id, low.token_id]
        assert [t.token_id for t in c.queued(limit=1)] == [high.token_id]
        assert c.queued(limit=0) == []
        assert c.kill(normal.token_id) is True
        assert normal.state is TokenState.KILLED
        with pytest.raises(TokenKilled):
            normal.get(timeout=5)
        assert c.kill(normal.token_id) is False, "a settled token is not queued"
        assert [t.token_id for t in c.queued()] == [high.token_id, low.token_id]
        c.resume()
        assert (high.get(timeout=5), low.get(timeout=5)) == (3, 1)
        assert c.queued() == []


def test_kill_finds_a_token_admitted_to_a_mailbox_but_not_a_running_one() -> None:
    gate, started = threading.Event(), threading.Event()

    def hold() -> str:
        started.set()
        gate.wait(10)
        return "held"

    with _coord() as c:
        running = c.submit(hold)
        assert started.wait(5)
        behind = [c.submit(int, i) for i in range(3)]
        states = {t.token_id: t.state for t in c.queued()}
        assert set(states) == {t.token_id for t in behind}
        assert c.kill(running.token_id) is False, "a running token is not queued"
        assert c.kill(behind[1].token_id) is True
        gate.set()
        assert running.get(timeout=5) == "held"
        assert behind[1].state is TokenState.KILLED
        assert [behind[0].get(timeout=5), behind[2].get(timeout=5)] == [0, 2]


def test_kill_finds_a_token_held_by_a_concurrency_limit() -> None:
    gate, started = threading.Event(), threading.Event()

    @task_token_guard(operation_type="tokens-by-id-limited", max_concurrency=1)
    def limited(wait: bool) -> bool:
        if wait:
            started.set()
            gate.wait(10)
        return wait

    with _coord(workers_per_core=2) as c:
        first = limited(True)
        assert started.wait(5)
        held = limited(False)
        assert [t.token_id for t in c.queued()] == [held.token_id]
        assert c.kill(held.token_id) is True
        gate.set()
        assert first.get(timeout=5) is True
        assert held.state is TokenState.KILLED
        assert c.stats()["limits"]["tokens-by-id-limited"]["held"] == 0


def test_kill_finds_a_token_waiting_for_its_retry() -> None:
    failed_once = threading.Event()

    @task_token_guard(operation_type="tokens-by-id-retry", retries=1, retry_backoff=60)
    def flaky() -> None:
        failed_once.set()
        raise ValueError("first attempt fails")

    with _coord() as c:
        token = flaky()
        assert failed_once.wait(5)
        deadline = threading.Event()
        for _ in range(500):  # the failed attempt settles into the retry timer
            if c.queued():
                break
            deadline.wait(0.01)
        assert [t.token_id for t in c.queued()] == [token.token_id]
        assert c.kill(token.token_id) is True
        with pytest.raises(TokenKilled):
            token.get(timeout=5)


def test_kill_and_queued_check_their_arguments_and_need_a_running_coordinator() -> None:
    c = _coord()
    with pytest.raises(CoordinatorNotRunning):
        c.kill(1)
    with c:
        for bad in (-1, True, "3", 1.5):
            with pytest.raises(ConfigurationError, match="token_id"):
                c.kill(bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="limit"):
            c.queued(limit=-1)
        assert c.kill(10**9) is False


def test_launch_binds_the_arguments_before_submitting() -> None:
    calls: list[tuple[int, str]] = []

    with _coord() as c:

        @c.register_launchable
        def job(n: int, label: str = "x") -> str:
            calls.append((n, label))
            return f"{label}{n}"

        assert c.launchables() == {"job": job}
        assert c.launch("job", [3]).get(timeout=5) == "x3"
        assert c.launch("job", [], {"n": 4, "label": "y"}).get(timeout=5) == "y4"
        created = c.stats()["created"]
        for args, kwargs, needle in (
            ([], {}, "missing a required argument: 'n'"),
            ([1, "a", 3], {}, "too many positional arguments"),
            ([1], {"colour": "red"}, "unexpected keyword argument 'colour'"),
        ):
            with pytest.raises(InvalidOption, match=needle):
                c.launch("job", args, kwargs)
        with pytest.raises(InvalidOption, match="no launchable named 'nope'; registered: 'job'"):
            c.launch("nope")
        with pytest.raises(InvalidOption, match="args of 'job' must be a list"):
            c.launch("job", "12")
        with pytest.raises(InvalidOption, match="kwargs of 'job' must be a dict"):
            c.launch("job", [1], [("label", "z")])  # type: ignore[arg-type]
        assert c.stats()["created"] == created, "nothing was submitted"
        assert calls == [(3, "x"), (4, "y")]


def test_a_decorated_launchable_runs_on_its_own_coordinator_under_its_operation() -> None:
    @task_token_guard(operation_type="tokens-by-id-launched", tags={"weight": "heavy"})
    def heavy(x: int) -> int:
        return x * 2

    with _coord() as other, _coord() as c:
        c.register_launchable(heavy, name="double")
        token = c.launch("double", [21])
        assert token.get(timeout=5) == 42
        assert token.operation_type == "tokens-by-id-launched"
        assert token.weight.value == "heavy"
        assert other.stats()["created"] == 0, "it ran on the coordinator that launched it"


def test_register_launchable_refuses_what_cannot_be_launched() -> None:
    c = _coord()

    async def coro() -> None:
        return None

    with pytest.raises(ConfigurationError, match="coroutine function"):
        c.register_launchable(coro)
    with pytest.raises(ConfigurationError, match="needs a callable"):
        c.register_launchable(42)
    with pytest.raises(ConfigurationError, match="signature cannot be read"):
        c.register_launchable(int)

    def to_int(text: str) -> int:
        return int(text)

    with pytest.raises(ConfigurationError, match="non-empty str"):
        c.register_launchable(to_int, name="")
    c.register_launchable(to_int)
    c.register_launchable(to_int)  # the same function again: fine
    with pytest.raises(ConfigurationError, match="already registered"):
        c.register_launchable(lambda text: text, name="to_int")
    with pytest.raises(CoordinatorNotRunning):
        c.launch("to_int", ["1"])

    @c.register_launchable(name="named")
    def f() -> int:
        return 1

    assert set(c.launchables()) == {"to_int", "named"}


def test_wait_idle_waits_for_the_tokens_without_closing_admission() -> None:
    gate = threading.Event()
    c = _coord()
    assert c.started_at is None
    with c:
        assert c.started_at is not None and c.started_at <= time.time()
        token = c.submit(gate.wait, 10)
        assert c.wait_idle(timeout=0) is False
        gate.set()
        assert c.wait_idle(timeout=10) is True
        assert token.done() and c.admission_open
        assert c.submit(int, 5).get(timeout=5) == 5
        with pytest.raises(ConfigurationError, match="timeout"):
            c.wait_idle(timeout=-1)
    assert c.started_at is not None, "it stays set after stop()"
