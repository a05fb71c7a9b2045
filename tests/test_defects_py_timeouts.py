"""An infinite timeout means "no limit": ``stop(timeout=inf)``, ``drain(timeout=inf)`` and
``submit_timeout=inf`` behave like ``None`` (queued work completes, nothing is killed)."""

from __future__ import annotations

import math
import sys
import threading
from typing import Any

import pytest

from _support import SAFETY, wait_until
from tokengate import ConfigurationError, OperationsCoordinator, TokenState

#: Infinite, or too large for a float at all: both mean "no limit".
UNLIMITED = [math.inf, 10**400]


@pytest.mark.parametrize("timeout", UNLIMITED, ids=["inf", "int-beyond-float"])
def test_stop_with_an_infinite_timeout_finishes_the_queue(timeout):
    coord = OperationsCoordinator(cores=1, workers_per_core=1).start()
    coord.pause()  # everything below is still queued when stop() starts
    tokens = [coord.submit(pow, i, 2) for i in range(5)]
    assert not any(t.done() for t in tokens)
    assert coord.stop(timeout=timeout) is True
    assert [t.state for t in tokens] == [TokenState.COMPLETED] * 5
    assert [t.get() for t in tokens] == [0, 1, 4, 9, 16]


@pytest.mark.parametrize("timeout", UNLIMITED, ids=["inf", "int-beyond-float"])
def test_drain_with_an_infinite_timeout_waits_for_everything(make_coord, timeout):
    coord = make_coord(cores=1, workers_per_core=1)
    coord.pause()
    tokens = [coord.submit(abs, -i) for i in range(4)]
    report = coord.drain(timeout=timeout)
    assert report["timed_out"] is False
    assert report["completed"] == 4
    assert report["remaining"] == 0
    assert [t.get(timeout=0) for t in tokens] == [0, 1, 2, 3]


def test_submit_timeout_inf_blocks_until_room_frees(make_coord):
    coord = make_coord(
        cores=1, workers_per_core=1, mailbox_capacity=1, pool_capacity=1, submit_timeout=math.inf
    )
    coord.pause()
    first = coord.submit(str, "first")  # the pool is full now (paused: nothing is admitted)
    outcome: dict[str, Any] = {}

    def blocked_submit() -> None:
        try:
            outcome["token"] = coord.submit(str, "second")
        except BaseException as exc:  # reported to the test thread
            outcome["error"] = exc

    submitter = threading.Thread(target=blocked_submit)
    submitter.start()
    # wait until the submitter is inside submit() (blocked on the full pool, or about to be)
    assert wait_until(lambda: _in_function(submitter, "submit"))
    assert "error" not in outcome
    coord.resume()
    submitter.join(SAFETY)
    assert not submitter.is_alive()
    assert "error" not in outcome, outcome.get("error")
    assert first.get(timeout=SAFETY) == "first"
    second = outcome["token"]
    assert second.get(timeout=SAFETY) == "second"


def test_an_infinite_timeout_is_still_checked_for_sign():
    coord = OperationsCoordinator(cores=1, workers_per_core=1)
    with pytest.raises(ConfigurationError, match="submit_timeout must be >= 0, got -inf"):
        OperationsCoordinator(submit_timeout=-math.inf)
    with pytest.raises(ConfigurationError, match="timeout must be >= 0, got -inf"):
        coord.stop(timeout=-math.inf)
    with pytest.raises(ConfigurationError, match="a number of seconds or None, got nan"):
        coord.stop(timeout=math.nan)


def _in_function(thread: threading.Thread, name: str) -> bool:
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_name == name:
            return True
        frame = frame.f_back
    return False


def test_huge_finite_timeouts_wait_like_no_limit(make_coord):
    """1e300 s passes the Python check as a float; the core clamps it (no overflow)."""
    coord = make_coord(cores=1, workers_per_core=1)
    coord.pause()
    queued = coord.submit(abs, -7)
    assert coord.drain(timeout=1e19)["timed_out"] is False
    coord.resume()
    coord.pause()
    tokens = [coord.submit(abs, -i) for i in range(3)]
    assert coord.stop(timeout=1e300) is True
    assert queued.get(timeout=0) == 7
    assert [t.get(timeout=0) for t in tokens] == [0, 1, 2]
