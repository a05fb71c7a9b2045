"""task_token_guard: decoration-time validation, metadata, binding, calls without a coordinator."""

from __future__ import annotations

import functools
import inspect

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokengate import (
    STORAGE_SPEEDS,
    CoordinatorNotRunning,
    InvalidDecoration,
    InvalidTag,
    TaskToken,
    TaskWeight,
    TokenGateError,
    task_token_guard,
)

WEIGHTS = ("light", "medium", "heavy")
SPEEDS = ("SLOW", "MODERATE", "FAST", "INSANE")


def _plain(x: int, y: int = 1) -> int:
    """Adds two numbers."""
    return x + y


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bad", ["huge", "", "heavyy", " medium", "LIGHTER"])
def test_invalid_weight_raises_invalid_tag_naming_key_value_and_valid_values(bad):
    with pytest.raises(InvalidTag) as ei:
        task_token_guard(tags={"weight": bad})(_plain)
    err = ei.value
    assert isinstance(err, ValueError)
    assert isinstance(err, TokenGateError)
    msg = str(err)
    assert "weight" in msg
    assert repr(bad) in msg or bad in msg
    for valid in WEIGHTS:
        assert valid in msg.lower()


@pytest.mark.parametrize("bad", ["WARP", "fastest", "", "10", "LUDICROUS"])
def test_invalid_storage_speed_raises_invalid_tag_naming_valid_values(bad):
    with pytest.raises(InvalidTag) as ei:
        task_token_guard(tags={"storage_speed": bad})(_plain)
    msg = str(ei.value)
    assert isinstance(ei.value, ValueError)
    assert "storage_speed" in msg
    assert repr(bad) in msg or bad in msg
    for valid in SPEEDS:
        assert valid in msg.upper()


@pytest.mark.parametrize("bad", [5, 1.5, None, b"heavy", ["heavy"]])
def test_non_string_weight_is_rejected(bad):
    with pytest.raises(InvalidTag):
        task_token_guard(tags={"weight": bad})(_plain)


@pytest.mark.parametrize("bad", [50, 1.0, b"FAST", ["FAST"]])
def test_non_string_storage_speed_is_rejected(bad):
    with pytest.raises(InvalidTag):
        task_token_guard(tags={"storage_speed": bad})(_plain)


def test_validation_happens_at_decoration_time_without_a_coordinator():
    # No coordinator is running: the tag error comes first, not CoordinatorNotRunning at call time.
    calls = []
    with pytest.raises(InvalidTag):

        @task_token_guard(tags={"weight": "enormous"})
        def never(x):
            calls.append(x)

    assert calls == []


@given(
    st.sampled_from(WEIGHTS).flatmap(
        lambda w: st.tuples(*[st.sampled_from([c.lower(), c.upper()]) for c in w]).map("".join)
    )
)
def test_weight_is_case_insensitive(spelling):
    fn = task_token_guard(tags={"weight": spelling})(_plain)
    assert callable(fn)


@given(
    st.sampled_from(SPEEDS).flatmap(
        lambda s: st.tuples(*[st.sampled_from([c.lower(), c.upper()]) for c in s]).map("".join)
    )
)
def test_storage_speed_is_case_insensitive(spelling):
    fn = task_token_guard(tags={"storage_speed": spelling})(_plain)
    assert callable(fn)


@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=12))
def test_arbitrary_weight_strings_are_accepted_iff_valid(text):
    if text.lower() in WEIGHTS:
        assert callable(task_token_guard(tags={"weight": text})(_plain))
    else:
        with pytest.raises(InvalidTag):
            task_token_guard(tags={"weight": text})(_plain)


@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=12))
def test_arbitrary_storage_speed_strings_are_accepted_iff_valid(text):
    if text.upper() in SPEEDS:
        assert callable(task_token_guard(tags={"storage_speed": text})(_plain))
    else:
        with pytest.raises(InvalidTag):
            task_token_guard(tags={"storage_speed": text})(_plain)


@pytest.mark.parametrize("weight", list(TaskWeight))
def test_task_weight_enum_is_accepted(weight):
    assert callable(task_token_guard(tags={"weight": weight})(_plain))


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        ("heavy", TaskWeight.HEAVY),
        ("HEAVY", TaskWeight.HEAVY),
        ("Medium", TaskWeight.MEDIUM),
        ("LIGHT", TaskWeight.LIGHT),
        (TaskWeight.LIGHT, TaskWeight.LIGHT),
    ],
)
def test_weight_spelling_reaches_the_token(make_coord, spelling, expected):
    make_coord(cores=3, workers_per_core=1)
    fn = task_token_guard(tags={"weight": spelling, "storage_speed": "fast"})(_plain)
    token = fn(2)
    assert token.weight is expected
    assert token.get() == 3


def test_default_weight_is_medium(make_coord):
    make_coord(cores=2, workers_per_core=1)
    token = task_token_guard()(_plain)(1)
    assert token.weight is TaskWeight.MEDIUM
    assert token.get() == 2


def test_enums_and_constants_match_contract():
    assert STORAGE_SPEEDS == {"SLOW": 10, "MODERATE": 25, "FAST": 50, "INSANE": 70}
    assert TaskWeight.HEAVY.value == "heavy"
    assert TaskWeight.MEDIUM.value == "medium"
    assert TaskWeight.LIGHT.value == "light"
    assert isinstance(TaskWeight.HEAVY, str)
    assert TaskWeight("light") is TaskWeight.LIGHT


def test_free_form_tags_are_kept_as_metadata():
    fn = task_token_guard(tags={"owner": "team-a", "weight": "light", "retries": 3})(_plain)
    assert fn.tags["owner"] == "team-a"
    assert fn.tags["retries"] == 3


@pytest.mark.parametrize("bad", [["weight", "heavy"], "weight=heavy", 42])
def test_tags_must_be_a_dict(bad):
    with pytest.raises((ValueError, TypeError)):
        task_token_guard(tags=bad)(_plain)


def test_tag_keys_must_be_strings():
    with pytest.raises((ValueError, TypeError)):
        task_token_guard(tags={1: "heavy"})(_plain)


@pytest.mark.parametrize("bad", ["", 42, b"op"])
def test_operation_type_must_be_a_non_empty_string(bad):
    with pytest.raises((ValueError, TypeError)):
        task_token_guard(operation_type=bad)(_plain)


# --------------------------------------------------------------------------- what can be decorated


async def _coroutine_fn(x):
    return x


async def _async_gen_fn():
    yield 1


def test_async_def_raises_invalid_decoration():
    with pytest.raises(InvalidDecoration) as ei:
        task_token_guard()(_coroutine_fn)
    assert isinstance(ei.value, TypeError)
    assert isinstance(ei.value, TokenGateError)


def test_async_method_raises_invalid_decoration():
    with pytest.raises(InvalidDecoration):

        class _C:
            @task_token_guard()
            async def run(self):
                return 1


@pytest.mark.parametrize("not_callable", [42, "fn", None, [1, 2]])
def test_non_callable_raises_invalid_decoration(not_callable):
    with pytest.raises(InvalidDecoration) as ei:
        task_token_guard()(not_callable)
    assert isinstance(ei.value, TypeError)


def test_callable_object_and_partial_can_be_decorated(make_coord):
    class Adder:
        def __call__(self, a, b):
            return a + b

    make_coord(cores=2, workers_per_core=1)
    obj = task_token_guard(operation_type="adder")(Adder())
    part = task_token_guard(operation_type="partial")(functools.partial(_plain, 10))
    assert obj(2, 3).get() == 5
    assert part(y=5).get() == 15


# --------------------------------------------------------------------------- metadata


def test_functools_wraps_metadata_is_kept():
    fn = task_token_guard()(_plain)
    assert fn.__name__ == "_plain"
    assert fn.__qualname__ == "_plain"
    assert fn.__doc__ == "Adds two numbers."
    assert fn.__module__ == __name__
    assert fn.__wrapped__ is _plain
    assert inspect.signature(fn) == inspect.signature(_plain)


def test_wrapped_runs_the_plain_function_without_a_coordinator():
    calls = []

    def body(x):
        calls.append(x)
        return x * 3

    fn = task_token_guard()(body)
    assert fn.__wrapped__(7) == 21
    assert calls == [7]


def test_default_operation_type_is_qualname(make_coord):
    def local_fn():
        return "ok"

    make_coord(cores=2, workers_per_core=1)
    token = task_token_guard()(local_fn)()
    assert token.operation_type == local_fn.__qualname__
    assert token.operation_type.endswith("<locals>.local_fn")
    assert token.get() == "ok"


def test_explicit_operation_type_is_used(make_coord):
    make_coord(cores=2, workers_per_core=1)
    token = task_token_guard(operation_type="hash_blob")(_plain)(1)
    assert token.operation_type == "hash_blob"
    token.get()


# --------------------------------------------------------------------------- calling


def test_call_returns_a_token_at_once_and_passes_args_and_kwargs(make_coord):
    make_coord(cores=2, workers_per_core=1)
    fn = task_token_guard()(_plain)
    token = fn(4, y=6)
    assert isinstance(token, TaskToken)
    assert token.get() == 10


class Account:
    def __init__(self, balance: int) -> None:
        self.balance = balance

    @task_token_guard(operation_type="deposit", tags={"weight": "light"})
    def deposit(self, amount: int) -> int:
        """Deposit money."""
        self.balance += amount
        return self.balance


def test_binds_as_a_method(make_coord):
    make_coord(cores=3, workers_per_core=1)
    acct = Account(100)
    token = acct.deposit(5)
    assert isinstance(token, TaskToken)
    assert token.get() == 105
    assert acct.balance == 105
    assert token.operation_type == "deposit"
    assert token.weight is TaskWeight.LIGHT
    # Accessed on the class it behaves like a plain function taking self explicitly.
    assert Account.deposit(acct, 1).get() == 106
    assert Account.deposit.__doc__ == "Deposit money."
    # __wrapped__ on the bound attribute still runs directly.
    assert Account.deposit.__wrapped__(acct, 4) == 110


def test_two_instances_bind_independently(make_coord):
    make_coord(cores=3, workers_per_core=2)
    a, b = Account(0), Account(1000)
    ta, tb = a.deposit(1), b.deposit(2)
    assert (ta.get(), tb.get()) == (1, 1002)


# --------------------------------------------------------------------------- no coordinator


def test_calling_without_coordinator_raises_coordinator_not_running():
    calls = []

    @task_token_guard()
    def fn():
        calls.append(1)

    with pytest.raises(CoordinatorNotRunning) as ei:
        fn()
    assert isinstance(ei.value, RuntimeError)
    assert isinstance(ei.value, TokenGateError)
    assert "OperationsCoordinator" in str(ei.value)
    assert calls == []


def test_calling_after_coordinator_stopped_raises(make_coord):
    fn = task_token_guard()(_plain)
    coord = make_coord(cores=2, workers_per_core=1)
    assert fn(1).get() == 2
    coord.stop()
    with pytest.raises(CoordinatorNotRunning):
        fn(1)
