"""``priority`` is a keyword-only argument of ``task_token_guard`` (high / normal / low), and
no longer a recognised tag: a ``"priority"`` key in ``tags`` is ordinary free-form metadata."""

from __future__ import annotations

import pytest

from _support import SAFETY
from tokengate import ConfigurationError, InvalidTag, task_token_guard


def _run_in_order(coord, guarded_fns):
    """Queue one call of each function while paused on a single worker, then let them run;
    returns the order in which they ran (pool and mailbox take the highest lane first)."""
    ran: list[str] = []
    coord.pause()
    tokens = [fn(ran) for fn in guarded_fns]
    coord.resume()
    for token in tokens:
        token.get(timeout=SAFETY)
    return ran


def _recorder(label, **guard_kwargs):
    def record(ran):
        ran.append(label)

    return task_token_guard(operation_type=label, **guard_kwargs)(record)


def test_priority_argument_picks_the_lane(make_coord):
    coord = make_coord(cores=1, workers_per_core=1)
    order = _run_in_order(
        coord,
        [
            _recorder("low", priority="low"),
            _recorder("normal"),
            _recorder("high", priority="high"),
            _recorder("low-2", priority="LOW"),
            _recorder("high-2", priority="High"),
        ],
    )
    assert order == ["high", "high-2", "normal", "low", "low-2"]


def test_a_priority_tag_is_only_metadata(make_coord):
    coord = make_coord(cores=1, workers_per_core=1)
    tagged = _recorder("tagged-high", tags={"priority": "high"})
    assert tagged.tags["priority"] == "high"
    order = _run_in_order(
        coord,
        [_recorder("plain"), tagged, _recorder("argument-high", priority="high")],
    )
    # the tag does not move the token out of the normal lane: FIFO with the plain one
    assert order == ["argument-high", "plain", "tagged-high"]


@pytest.mark.parametrize("value", [5, None, "urgent", ["high"], {"level": 1}, 0.5])
def test_any_value_of_a_priority_tag_is_kept(value):
    fn = task_token_guard(tags={"priority": value, "owner": "team-x"})(len)
    assert fn.tags["priority"] == value
    assert fn.tags["owner"] == "team-x"


@pytest.mark.parametrize("bad", ["urgent", "", " high", "HIGHEST", 0, 1, None, b"high"])
def test_invalid_priority_is_a_configuration_error_naming_the_valid_values(bad):
    with pytest.raises(ConfigurationError) as ei:
        task_token_guard(operation_type="op", priority=bad)
    assert not isinstance(ei.value, InvalidTag)
    assert str(ei.value) == (
        f"priority must be one of 'high', 'normal', 'low' (any case), got {bad!r}"
    )


def test_priority_is_validated_in_the_bare_form_too():
    assert task_token_guard(len, priority="low").operation_type == "len"
    with pytest.raises(ConfigurationError, match="priority must be one of"):
        task_token_guard(len, priority="later")


def test_priority_is_keyword_only():
    with pytest.raises(TypeError):
        task_token_guard("op", None, "high")  # type: ignore[call-overload]
