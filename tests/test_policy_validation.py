"""Bad input (issue #7): unknown priority, negative or zero timeout, negative retries, a
non-exception in ``retry_on``, bad limits raise at decoration (or ``options()``) time, as a
``ValueError`` (:class:`ConfigurationError`, :class:`InvalidTag`) or ``TypeError``
(:class:`InvalidOption`), with a message naming the option and what is valid.

Properties are checked with hypothesis over both entry points: ``task_token_guard(**kw)`` and
``fn.options(**kw)``.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _support import child_json, run_child
from tokengate import (
    ConfigurationError,
    InvalidOption,
    InvalidTag,
    TokenGateError,
    TokenTimeout,
    task_token_guard,
)


def _target(x=None):
    return x


BASE = task_token_guard(operation_type="val_base")(_target)


def _via_decorator(**kw):
    return task_token_guard(operation_type="val_deco", **kw)(_target)


def _via_options(**kw):
    return BASE.options(**kw)


ENTRY_POINTS = pytest.mark.parametrize(
    "apply", [_via_decorator, _via_options], ids=["decorator", "options"]
)
PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID_PRIORITIES = {"high", "normal", "low"}


def _check(exc_info, cls, *words):
    err = exc_info.value
    assert isinstance(err, cls), type(err)
    assert isinstance(err, TokenGateError)
    msg = str(err)
    for w in words:
        assert w in msg, (w, msg)


def test_the_error_classes_are_the_builtins_a_caller_would_catch():
    assert issubclass(ConfigurationError, ValueError)
    assert issubclass(InvalidTag, ValueError)
    assert issubclass(InvalidOption, TypeError)


def test_errors_come_at_decoration_time_before_any_function_or_call():
    with pytest.raises(ConfigurationError):
        task_token_guard(timeout=0)  # no function given yet, no coordinator running
    with pytest.raises(ConfigurationError):
        task_token_guard(priority="urgent")
    with pytest.raises(InvalidOption):
        task_token_guard(retry_on="ValueError")


# --------------------------------------------------------------------------- priority


@ENTRY_POINTS
@PROPS
@given(st.text(max_size=12).filter(lambda s: s.lower() not in VALID_PRIORITIES))
def test_an_unknown_priority_string_is_refused_naming_the_valid_ones(apply, value):
    with pytest.raises(ConfigurationError) as ei:
        apply(priority=value)
    _check(ei, ConfigurationError, "priority", "'high'", "'normal'", "'low'")


@ENTRY_POINTS
@PROPS
@given(st.sampled_from(sorted(VALID_PRIORITIES)), st.lists(st.booleans(), min_size=6))
def test_a_priority_in_any_case_is_accepted(apply, name, upper):
    spelled = "".join(c.upper() if u else c for c, u in zip(name, upper, strict=False))
    apply(priority=spelled)


@ENTRY_POINTS
@pytest.mark.parametrize("value", [None, 0, 1, 2.0, b"high", ["high"]])
def test_a_priority_that_is_not_a_str_is_refused(apply, value):
    with pytest.raises((ConfigurationError, InvalidOption)) as ei:
        apply(priority=value)
    assert "priority" in str(ei.value)


def test_reprioritize_refuses_the_same_way(coord):
    with pytest.raises(ConfigurationError, match="priority"):
        coord.reprioritize(1, "asap")


# --------------------------------------------------------------------------- timeout


@ENTRY_POINTS
@PROPS
@given(st.one_of(st.floats(max_value=0.0, allow_nan=False), st.integers(max_value=0)))
def test_a_zero_or_negative_timeout_is_refused(apply, value):
    with pytest.raises(ConfigurationError) as ei:
        apply(timeout=value)
    _check(ei, ConfigurationError, "timeout", "> 0")


@ENTRY_POINTS
@PROPS
@given(
    st.one_of(
        st.floats(min_value=1e-9, allow_nan=False, allow_infinity=True),
        st.integers(min_value=1, max_value=10**9),
    )
)
def test_a_positive_timeout_is_accepted(apply, value):
    apply(timeout=value)


@ENTRY_POINTS
@pytest.mark.parametrize("value", ["5", b"5", [1], True, False, object()])
def test_a_timeout_that_is_not_a_number_is_refused(apply, value):
    with pytest.raises(InvalidOption) as ei:
        apply(timeout=value)
    _check(ei, InvalidOption, "timeout", "number of seconds")


@ENTRY_POINTS
def test_a_nan_timeout_is_refused(apply):
    with pytest.raises((ConfigurationError, InvalidOption), match="timeout"):
        apply(timeout=math.nan)


# --------------------------------------------------------------------------- retries


@ENTRY_POINTS
@PROPS
@given(st.integers(max_value=-1))
def test_negative_retries_are_refused(apply, value):
    with pytest.raises(ConfigurationError) as ei:
        apply(retries=value)
    _check(ei, ConfigurationError, "retries", ">= 0")


@ENTRY_POINTS
@PROPS
@given(st.integers(min_value=0, max_value=2**31))
def test_retries_from_zero_are_accepted(apply, value):
    apply(retries=value)


@ENTRY_POINTS
@PROPS
@given(
    st.one_of(
        st.floats(allow_nan=True),
        st.text(max_size=3),
        st.none(),
        st.booleans(),
        st.lists(st.integers(), max_size=2),
    )
)
def test_retries_that_are_not_an_int_are_refused(apply, value):
    with pytest.raises(InvalidOption) as ei:
        apply(retries=value)
    _check(ei, InvalidOption, "retries", "int")


@ENTRY_POINTS
@pytest.mark.parametrize(
    "opt,value",
    [
        ("retry_backoff", -0.5),
        ("retry_backoff_max", -1),
        ("retry_budget", 0),
        ("retry_budget", -3),
    ],
)
def test_bad_retry_durations_are_refused(apply, opt, value):
    with pytest.raises(ConfigurationError) as ei:
        apply(**{opt: value})
    _check(ei, ConfigurationError, opt)


@ENTRY_POINTS
def test_a_backoff_cap_below_the_backoff_is_refused(apply):
    with pytest.raises(ConfigurationError) as ei:
        apply(retry_backoff=2.0, retry_backoff_max=1.0)
    _check(ei, ConfigurationError, "retry_backoff_max", "retry_backoff")


@ENTRY_POINTS
@pytest.mark.parametrize("value", [0, 1, "yes", None])
def test_retry_jitter_must_be_a_bool(apply, value):
    with pytest.raises(InvalidOption) as ei:
        apply(retry_jitter=value)
    _check(ei, InvalidOption, "retry_jitter", "True or False")


@ENTRY_POINTS
@pytest.mark.parametrize("value", [3, "log", object()])
def test_on_exhausted_must_be_callable(apply, value):
    with pytest.raises(InvalidOption) as ei:
        apply(on_exhausted=value)
    _check(ei, InvalidOption, "on_exhausted", "callable")


# --------------------------------------------------------------------------- retry_on

NOT_EXCEPTION_CLASSES = st.one_of(
    st.integers(),
    st.text(max_size=5),
    st.sampled_from([int, str, object, type, dict, ValueError("an instance"), None.__class__]),
    st.lists(st.just(ValueError), min_size=1, max_size=2),  # a list, not a tuple
)


@ENTRY_POINTS
@PROPS
@given(NOT_EXCEPTION_CLASSES)
def test_retry_on_refuses_anything_but_exception_classes(apply, value):
    with pytest.raises(InvalidOption) as ei:
        apply(retry_on=value)
    _check(ei, InvalidOption, "retry_on", "exception class")


@ENTRY_POINTS
@PROPS
@given(
    st.lists(
        st.sampled_from([ValueError, KeyError, OSError, ConnectionError, TokenTimeout]),
        min_size=1,
        max_size=4,
    ),
    NOT_EXCEPTION_CLASSES.filter(lambda v: not isinstance(v, list)),
)
def test_retry_on_refuses_a_tuple_with_one_bad_entry(apply, good, bad):
    with pytest.raises(InvalidOption) as ei:
        apply(retry_on=(*good, bad))
    _check(ei, InvalidOption, "retry_on")


@ENTRY_POINTS
@PROPS
@given(
    st.lists(
        st.sampled_from([ValueError, KeyError, OSError, ConnectionError, TokenTimeout]),
        min_size=1,
        max_size=4,
    )
)
def test_retry_on_accepts_a_class_or_a_tuple_of_them(apply, classes):
    apply(retry_on=tuple(classes))
    apply(retry_on=classes[0])


@ENTRY_POINTS
def test_an_empty_retry_on_is_refused(apply):
    with pytest.raises(ConfigurationError) as ei:
        apply(retry_on=())
    _check(ei, ConfigurationError, "retry_on")


# --------------------------------------------------------------------------- limits


@ENTRY_POINTS
@PROPS
@given(st.integers(max_value=0))
def test_max_concurrency_below_one_is_refused(apply, value):
    with pytest.raises(ConfigurationError) as ei:
        apply(max_concurrency=value)
    _check(ei, ConfigurationError, "max_concurrency", ">= 1")


@ENTRY_POINTS
@pytest.mark.parametrize("value", [1.0, "2", True, [1]])
def test_max_concurrency_must_be_an_int(apply, value):
    with pytest.raises(InvalidOption) as ei:
        apply(max_concurrency=value)
    _check(ei, InvalidOption, "max_concurrency", "int")


@ENTRY_POINTS
@PROPS
@given(st.one_of(st.floats(max_value=0.0, allow_nan=False), st.just(math.inf)))
def test_a_rate_limit_not_positive_and_finite_is_refused(apply, value):
    with pytest.raises(ConfigurationError) as ei:
        apply(rate_limit=value)
    _check(ei, ConfigurationError, "rate_limit", "> 0")


@ENTRY_POINTS
@PROPS
@given(st.floats(min_value=1e-6, max_value=1e9), st.integers(min_value=1, max_value=10**6))
def test_a_positive_rate_and_burst_are_accepted(apply, rate, burst):
    apply(rate_limit=rate, rate_burst=burst)


@ENTRY_POINTS
def test_rate_burst_needs_a_rate_and_limit_by_needs_a_limit(apply):
    with pytest.raises(ConfigurationError) as ei:
        apply(rate_burst=3)
    _check(ei, ConfigurationError, "rate_burst", "rate_limit")
    with pytest.raises(ConfigurationError) as ei:
        apply(limit_by="tenant")
    _check(ei, ConfigurationError, "limit_by", "max_concurrency", "rate_limit")


@ENTRY_POINTS
@pytest.mark.parametrize("value", [0, -1])
def test_rate_burst_below_one_is_refused(apply, value):
    with pytest.raises(ConfigurationError) as ei:
        apply(rate_limit=10, rate_burst=value)
    _check(ei, ConfigurationError, "rate_burst")


@ENTRY_POINTS
@pytest.mark.parametrize("value", [3, ["tenant"], b"tenant"])
def test_limit_by_must_be_a_tag_name(apply, value):
    with pytest.raises(InvalidOption) as ei:
        apply(max_concurrency=1, limit_by=value)
    _check(ei, InvalidOption, "limit_by")


@ENTRY_POINTS
def test_an_empty_limit_by_is_refused(apply):
    with pytest.raises((ConfigurationError, InvalidOption), match="limit_by"):
        apply(max_concurrency=1, limit_by="")


# --------------------------------------------------------------------------- names, tags, weight

POLICY_NAMES = {
    "timeout",
    "retries",
    "retry_backoff",
    "retry_backoff_max",
    "retry_jitter",
    "retry_on",
    "retry_budget",
    "on_exhausted",
    "max_concurrency",
    "rate_limit",
    "rate_burst",
    "limit_by",
}


@ENTRY_POINTS
@PROPS
@given(
    st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True).filter(
        lambda s: s not in POLICY_NAMES | {"priority", "weight", "tags"}
    )
)
def test_an_unknown_option_name_is_refused_listing_the_valid_ones(apply, name):
    with pytest.raises(InvalidOption) as ei:
        apply(**{name: 1})
    _check(ei, InvalidOption, repr(name), "valid", "timeout", "retries", "retry_on")


def test_a_typo_is_caught_not_ignored():
    with pytest.raises(InvalidOption, match="'retires'"):
        task_token_guard(retires=3)
    with pytest.raises(InvalidOption, match="'time_out'"):
        BASE.options(time_out=1)


@pytest.mark.parametrize("value", ["featherweight", "", 3, None])
def test_options_refuses_a_bad_weight(value):
    with pytest.raises(InvalidTag) as ei:
        BASE.options(weight=value)
    _check(ei, InvalidTag, "weight", "'light'", "'medium'", "'heavy'")


@pytest.mark.parametrize(
    "tags,word",
    [
        ({"weight": "huge"}, "weight"),
        ({"storage_speed": "WARP"}, "storage_speed"),
        ({1: "x"}, "tag names"),
        ("tenant=a", "tags"),
    ],
)
def test_options_refuses_bad_tags(tags, word):
    with pytest.raises(InvalidTag) as ei:
        BASE.options(tags=tags)
    _check(ei, InvalidTag, word)


def test_a_failed_options_call_leaves_the_function_untouched(coord):
    fn = task_token_guard(operation_type="val_untouched", timeout=5.0, priority="low")(_target)
    with pytest.raises(ConfigurationError):
        fn.options(timeout=-1)
    with pytest.raises(InvalidOption):
        fn.options(retries="x")
    token = fn(7)
    assert token.get(timeout=5.0) == 7
    assert token.timeout == 5.0
    assert token.priority == "low"


def test_options_validates_the_merged_options_not_only_the_new_ones():
    fn = task_token_guard(operation_type="val_merged", rate_limit=5.0)(_target)
    fn.options(rate_burst=3)  # rate_limit comes from the decorator
    with pytest.raises(ConfigurationError, match="rate_burst"):
        task_token_guard(operation_type="val_merged2")(_target).options(rate_burst=3)
    capped = task_token_guard(operation_type="val_merged3", retry_backoff_max=1.0)(_target)
    with pytest.raises(ConfigurationError, match="retry_backoff_max"):
        capped.options(retry_backoff=2.0)


# --------------------------------------------------------------------------- coordinator inputs


@pytest.mark.parametrize(
    "kwargs",
    [{"storage_limits": {"SLOW": 0}}, {"storage_limits": {"WARP": 2}}, {"mode": "async"}],
)
def test_bad_coordinator_policy_arguments(kwargs):
    from tokengate import OperationsCoordinator

    with pytest.raises(ConfigurationError):
        OperationsCoordinator(**kwargs)


# ------------------------------------------------- regression: B15 (gc during options())


@pytest.mark.parametrize("keep", [False, True])
def test_gc_during_options_does_not_crash(tmp_path, keep):
    """A collection at every allocation (gc threshold 1) while options() builds guarded
    functions, in a child process (a crash must not take this run down)."""
    rc, out, err = run_child(
        tmp_path,
        f"""
        import gc, json
        from tokengate import task_token_guard

        def target(x=None):
            return x

        base = task_token_guard(operation_type="b15", timeout=5.0)(target)
        kept = []
        gc.set_threshold(1)
        for i in range(300):
            fn = base.options(priority="high", retries=1)
            if {keep!r}:
                kept.append(fn)
        gc.set_threshold(700)
        print("RESULT " + json.dumps({{"made": i + 1}}))
        """,
    )
    assert rc == 0, f"rc={rc}\n{err[-2000:]}"
    assert child_json(out) == {"made": 300}
