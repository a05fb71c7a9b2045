"""Runtime settings refuse bad values with ConfigurationError (never a bare OverflowError)."""

from __future__ import annotations

import weakref

import pytest

from tokengate import ConfigurationError, task_token_guard


@task_token_guard(operation_type="validation_echo")
def echo(x: int) -> int:
    return x


@pytest.mark.parametrize("core, n", [(1, -1), (-1, 1), (0, 1), (1, 0), (10**30, 1), (1, 10**30)])
def test_set_active_workers_rejects_out_of_range(make_coord, core, n):
    coord = make_coord(cores=2, workers_per_core=1, max_workers_per_core=4)
    with pytest.raises(ConfigurationError, match=r"must be between 1 and \d+"):
        coord.set_active_workers(core, n)
    assert coord.active_workers(1) == 1


@pytest.mark.parametrize("core", [-1, 0, 3])
def test_active_workers_rejects_out_of_range(make_coord, core):
    coord = make_coord(cores=2, workers_per_core=1)
    with pytest.raises(ConfigurationError, match="core must be between 1 and 2"):
        coord.active_workers(core)


def test_tokens_support_weak_references(coord):
    token = echo(3)
    ref = weakref.ref(token)
    assert ref() is token
    assert token.get() == 3
