"""Errors: hierarchy, every kind of task exception, Rust panics, bad configuration."""

from __future__ import annotations

import threading

import pytest

import tokengate
from _support import SAFETY
from tokengate import (
    AdmissionClosed,
    ConfigurationError,
    CoordinatorNotRunning,
    InternalError,
    InvalidDecoration,
    InvalidTag,
    OperationsCoordinator,
    PoolFull,
    TokenGateError,
    TokenKilled,
    TokenState,
    TokenTimeout,
)


def test_exception_hierarchy():
    for exc in (
        CoordinatorNotRunning,
        AdmissionClosed,
        PoolFull,
        TokenKilled,
        TokenTimeout,
        InvalidTag,
        InvalidDecoration,
        ConfigurationError,
        InternalError,
    ):
        assert issubclass(exc, TokenGateError), exc
        assert issubclass(exc, Exception), exc
    assert issubclass(CoordinatorNotRunning, RuntimeError)
    assert issubclass(TokenTimeout, TimeoutError)
    assert issubclass(InvalidTag, ValueError)
    assert issubclass(InvalidDecoration, TypeError)
    assert issubclass(ConfigurationError, ValueError)
    assert issubclass(TokenGateError, Exception)


class CustomError(Exception):
    def __init__(self, code):
        super().__init__(f"custom {code}")
        self.code = code


class CustomBase(BaseException):
    pass


def _raiser(exc):
    raise exc


CASES = [
    ValueError("v"),
    CustomError(7),
    SystemExit(3),
    KeyboardInterrupt(),
    GeneratorExit(),
    CustomBase("base"),
    MemoryError(),
    RecursionError("deep"),
    StopIteration(5),
]


@pytest.mark.parametrize("exc", CASES, ids=lambda e: type(e).__name__)
def test_any_task_exception_fails_only_that_token_and_the_worker_lives_on(make_coord, exc):
    coord = make_coord(cores=1, workers_per_core=1)
    before = coord.submit(lambda: "before")
    assert before.get() == "before"

    token = coord.submit(_raiser, exc)
    with pytest.raises(type(exc)) as ei:
        token.get(timeout=SAFETY)
    assert ei.value is exc
    assert token.state is TokenState.FAILED
    assert token.exception(timeout=SAFETY) is exc

    # the same (only) worker runs subsequent tokens
    after = [coord.submit(lambda i=i: i) for i in range(5)]
    assert [t.get(timeout=SAFETY) for t in after] == list(range(5))
    assert {t.worker_id for t in after} == {before.worker_id} == {token.worker_id}
    assert {t.core_id for t in after} == {1}
    s = coord.stats()
    assert s["failed"] == 1
    assert s["completed"] == 6
    assert s["illegal_transitions"] == 0


def test_custom_exception_attributes_survive(coord):
    token = coord.submit(_raiser, CustomError(42))
    exc = token.exception(timeout=SAFETY)
    assert isinstance(exc, CustomError)
    assert exc.code == 42
    assert str(exc) == "custom 42"


def test_exception_chaining_is_kept(coord):
    def chained():
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise RuntimeError("outer") from inner

    exc = coord.submit(chained).exception(timeout=SAFETY)
    assert isinstance(exc, RuntimeError)
    assert isinstance(exc.__cause__, KeyError)


def test_many_failures_interleaved_with_successes(make_coord):
    coord = make_coord(cores=1, workers_per_core=2)

    def maybe(i):
        if i % 3 == 0:
            raise ValueError(i)
        return i

    tokens = [coord.submit(maybe, i) for i in range(300)]
    for i, t in enumerate(tokens):
        if i % 3 == 0:
            assert isinstance(t.exception(timeout=SAFETY), ValueError)
            assert t.state is TokenState.FAILED
        else:
            assert t.get(timeout=SAFETY) == i
    s = coord.stats()
    assert s["failed"] == 100
    assert s["completed"] == 200


def test_rust_panic_becomes_internal_error_and_worker_lives_on(make_coord):
    coord = make_coord(cores=1, workers_per_core=1)
    ran = []
    warm = coord.submit(lambda: "warm")
    assert warm.get(timeout=SAFETY) == "warm"

    coord.pause()
    victim = coord.submit(ran.append, "victim")
    assert victim.state is TokenState.WAITING
    assert tokengate._core._debug_panic_on_run(victim) is None
    coord.resume()

    with pytest.raises(InternalError) as ei:
        victim.get(timeout=SAFETY)
    assert isinstance(ei.value, TokenGateError)
    assert victim.state is TokenState.FAILED
    assert ran == []

    follow = [coord.submit(ran.append, i) for i in range(3)]
    for t in follow:
        assert t.get(timeout=SAFETY) is None
    assert ran == [0, 1, 2]
    assert {t.worker_id for t in follow} == {warm.worker_id}
    assert coord.stats()["illegal_transitions"] == 0


def test_panic_waiter_in_other_thread_gets_internal_error(make_coord):
    coord = make_coord(cores=1, workers_per_core=1)
    coord.pause()
    victim = coord.submit(lambda: 1)
    tokengate._core._debug_panic_on_run(victim)
    box = {}
    started = threading.Event()

    def waiter():
        started.set()
        try:
            box["value"] = victim.get(timeout=SAFETY)
        except BaseException as exc:
            box["exc"] = exc

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    assert started.wait(SAFETY)
    coord.resume()
    t.join(SAFETY)
    assert not t.is_alive()
    assert isinstance(box.get("exc"), InternalError), box


@pytest.mark.parametrize(
    "kwargs",
    [
        {"workers_per_core": 0},
        {"workers_per_core": -1},
        {"mailbox_capacity": 0},
        {"cores": 0},
        {"cores": -2},
        {"pool_capacity": 0},
        {"overflow": "sideways"},
        {"submit_timeout": -1.0},
    ],
    ids=lambda kw: next(iter(kw.items())).__repr__(),
)
def test_bad_configuration_raises_configuration_error(kwargs):
    with pytest.raises(ConfigurationError) as ei:
        coord = OperationsCoordinator(**kwargs)
        # validation may happen at start(); make sure nothing is left running either way
        try:
            coord.start()
        finally:
            if coord.running:
                coord.stop()
    assert isinstance(ei.value, ValueError)
    assert next(iter(kwargs)) in str(ei.value)


def test_set_active_workers_rejects_bad_values(make_coord):
    coord = make_coord(cores=2, workers_per_core=2)
    for core, n in [(0, 1), (3, 1), (-1, 1), (1, -1)]:
        with pytest.raises((ConfigurationError, ValueError, OverflowError)):
            coord.set_active_workers(core, n)
    assert coord.active_workers(1) == 2
    assert coord.active_workers(2) == 2
