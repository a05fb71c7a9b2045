"""Bad input gets the documented error class and message, raised where the mistake is made:
decorator placement, coroutine functions hidden in a partial, odd ``__qualname__`` values,
capacities beyond the core's limits (checked by the constructor), ``run_control`` of a
non-coroutine."""

from __future__ import annotations

import asyncio
import functools

import pytest

from tokengate import (
    ConfigurationError,
    CoordinatorNotRunning,
    InvalidDecoration,
    OperationsCoordinator,
    task_token_guard,
)

BELOW = "apply @task_token_guard below @staticmethod/@classmethod, directly on the function"


async def _fetch(url):
    return url


async def _stream():
    yield 1


# ----------------------------------------------------------------------------- placement


def test_bare_decorator_above_classmethod_says_to_go_below_it():
    with pytest.raises(InvalidDecoration, match="below @staticmethod/@classmethod") as ei:

        class _Service:
            @task_token_guard
            @classmethod
            def build(cls):
                return cls

    assert str(ei.value) == BELOW


def test_bare_decorator_above_staticmethod_says_to_go_below_it():
    with pytest.raises(InvalidDecoration) as ei:

        class _Service:
            @task_token_guard
            @staticmethod
            def ping():
                return "pong"

    assert str(ei.value) == BELOW


def test_the_right_order_still_works_for_both_forms():
    class Service:
        @classmethod
        @task_token_guard
        def build(cls):
            return cls

        @staticmethod
        @task_token_guard(operation_type="ping")
        def ping():
            return "pong"

    assert Service.ping.operation_type == "ping"
    assert Service.build.__func__.operation_type.endswith("Service.build")


# ----------------------------------------------------------------------------- coroutines


@pytest.mark.parametrize(
    "wrap",
    [
        lambda f: functools.partial(f, "http://x"),
        lambda f: functools.partial(functools.partial(f), "http://x"),
    ],
    ids=["partial", "partial-of-partial"],
)
@pytest.mark.parametrize("bare", [False, True], ids=["called", "bare"])
def test_coroutine_function_inside_a_partial_is_refused_by_name(wrap, bare):
    target = wrap(_fetch)
    with pytest.raises(InvalidDecoration, match="cannot guard the coroutine function '_fetch'"):
        if bare:
            task_token_guard(target)
        else:
            task_token_guard()(target)


def test_async_generator_inside_a_partial_is_refused():
    with pytest.raises(InvalidDecoration, match="coroutine function '_stream'"):
        task_token_guard()(functools.partial(_stream))


def test_object_with_an_async_call_method_is_refused():
    class Client:
        async def __call__(self, url):
            return url

    with pytest.raises(InvalidDecoration, match=r"coroutine function '.*Client\.__call__'"):
        task_token_guard(operation_type="client")(Client())


def test_partial_of_a_plain_function_is_still_accepted():
    guarded = task_token_guard()(functools.partial(divmod, 7))
    assert guarded.__wrapped__(2) == (3, 1)


# ----------------------------------------------------------------------------- names


class _NamedOddly:
    """A callable whose instance carries non-str name attributes."""

    def __init__(self, qualname, name=None):
        self.__dict__["__qualname__"] = qualname
        if name is not None:
            self.__dict__["__name__"] = name

    def __call__(self):
        return "called"


@pytest.mark.parametrize("qualname", [123, None, "", "   ", b"bytes"])
def test_non_str_qualname_falls_back_to_name(qualname):
    guarded = task_token_guard(_NamedOddly(qualname, name="resize"))
    assert guarded.operation_type == "resize"


@pytest.mark.parametrize("name", [7, ""])
def test_without_any_usable_name_decoration_is_refused(name):
    with pytest.raises(InvalidDecoration, match=r"cannot name '_NamedOddly'.*operation_type"):
        task_token_guard()(_NamedOddly(42, name=name))
    with pytest.raises(InvalidDecoration, match="__qualname__=42"):
        task_token_guard(_NamedOddly(42))


def test_a_callable_without_name_attributes_goes_by_its_type_name():
    class Resizer:
        def __call__(self):
            return "called"

    guarded = task_token_guard()(Resizer())
    assert guarded.operation_type == "Resizer"
    assert guarded.__wrapped__() == "called"


def test_an_explicit_operation_type_wins_over_an_odd_qualname():
    guarded = task_token_guard(operation_type="explicit")(_NamedOddly(42))
    assert guarded.operation_type == "explicit"


def test_the_fallback_name_reaches_the_tokens(make_coord):
    make_coord(cores=1, workers_per_core=1)
    token = task_token_guard(_NamedOddly(3.5, name="odd_job"))()
    assert token.get(timeout=20) == "called"
    assert token.operation_type == "odd_job"


# ----------------------------------------------------------------------------- capacities


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mailbox_capacity": 2**25}, "mailbox_capacity must be between 1 and 16777216, got"),
        ({"mailbox_capacity": 2**70}, "mailbox_capacity must be between 1 and 16777216, got"),
        ({"mailbox_capacity": 0}, "mailbox_capacity must be between 1 and 16777216, got 0"),
        ({"pool_capacity": 2**64}, "pool_capacity must be between 1 and 1099511627776, got"),
        ({"pool_capacity": 2**40 + 1}, "pool_capacity must be between 1 and 1099511627776"),
        ({"pool_capacity": -5}, "pool_capacity must be between 1 and 1099511627776, got -5"),
    ],
)
def test_capacities_beyond_the_core_limits_fail_in_the_constructor(kwargs, message):
    with pytest.raises(ConfigurationError) as ei:
        OperationsCoordinator(cores=1, workers_per_core=1, **kwargs)
    assert message in str(ei.value)
    assert str(next(iter(kwargs.values()))) in str(ei.value)


def test_the_largest_mailbox_and_pool_are_accepted():
    coord = OperationsCoordinator(
        cores=1, workers_per_core=1, mailbox_capacity=2**24, pool_capacity=2**40
    )
    assert not coord.running


# ----------------------------------------------------------------------------- run_control


@pytest.mark.parametrize("not_a_coroutine", [42, None, asyncio.sleep, lambda: None])
def test_run_control_on_a_stopped_coordinator_says_it_is_not_running(not_a_coroutine):
    coord = OperationsCoordinator(cores=1, workers_per_core=1)
    with pytest.raises(CoordinatorNotRunning, match="the control loop runs only"):
        coord.run_control(not_a_coroutine)


def test_run_control_of_a_non_coroutine_is_the_same_type_error_when_running(make_coord):
    coord = make_coord(cores=1, workers_per_core=1)
    with pytest.raises(TypeError, match="run_control\\(\\) needs a coroutine object, got int"):
        coord.run_control(42)
    assert coord.run_control(asyncio.sleep(0, result="still works")).result(20) == "still works"


def test_run_control_of_a_coroutine_when_stopped_is_still_not_running():
    coord = OperationsCoordinator(cores=1, workers_per_core=1)
    coro = asyncio.sleep(0)
    with pytest.raises(CoordinatorNotRunning, match="the control loop runs only"):
        coord.run_control(coro)
    assert coro.cr_frame is None  # closed: no "never awaited" warning later
