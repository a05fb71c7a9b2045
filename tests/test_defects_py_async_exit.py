"""``async with OperationsCoordinator()`` leaves like the sync ``with`` on Ctrl-C: under
``asyncio.run`` a Ctrl-C (delivered as a cancellation) or any cancellation of the task kills
the queued tokens and waits at most the 1 s grace for running ones; a cancellation while
``__aexit__`` waits for the queue escalates that stop the same way."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
from typing import Any

import pytest

from _support import SAFETY, wait_until
from tokengate import OperationsCoordinator, TokenState

#: What both children share: a task held until released, and the record of what happened.
_PRELUDE = """
import asyncio, os, signal, threading, time
from tokengate import OperationsCoordinator

release, entered = threading.Event(), threading.Event()
seen = {}

def held():
    entered.set()
    release.wait(30)
    return "held"
"""

#: Prints ``LEFT <seconds from the Ctrl-C to leaving asyncio.run>``, the queued states, and
#: the result of the task that was running (released only after leaving).
_CTRL_C_IN_BODY = (
    _PRELUDE
    + """
async def main():
    async with OperationsCoordinator(cores=1, workers_per_core=1, grow_on_demand=False) as coord:
        seen["running"] = coord.submit(held)
        seen["queued"] = [coord.submit(int) for _ in range(5)]
        await asyncio.to_thread(entered.wait, 30)
        seen["coord"] = coord
        seen["t"] = time.monotonic()
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, handled by asyncio.run
        await asyncio.sleep(30)

try:
    asyncio.run(main())
    print("NOT INTERRUPTED")
except KeyboardInterrupt:
    print("INTERRUPTED")
print("LEFT", time.monotonic() - seen["t"])
print("RUNNING-AT-EXIT", seen["running"].state.name, "coordinator running:", seen["coord"].running)
print("QUEUED", sorted({t.state.name for t in seen["queued"]}))
release.set()
print("RESULT", seen["running"].get(timeout=30))
"""
)

#: The body ends normally; Ctrl-C comes while __aexit__ waits for the queue behind a held task.
_CTRL_C_IN_EXIT = (
    _PRELUDE
    + """
def interrupt_once_stopping(coord):
    idle = threading.Event()
    while coord.running:  # until __aexit__'s stop() has begun (in its thread)
        idle.wait(0.001)
    seen["t"] = time.monotonic()
    os.kill(os.getpid(), signal.SIGINT)

async def main():
    async with OperationsCoordinator(cores=1, workers_per_core=1, grow_on_demand=False) as coord:
        seen["running"] = coord.submit(held)
        seen["queued"] = [coord.submit(int) for _ in range(5)]
        await asyncio.to_thread(entered.wait, 30)
        seen["coord"] = coord
        threading.Thread(target=interrupt_once_stopping, args=(coord,), daemon=True).start()

try:
    asyncio.run(main())
    print("NOT INTERRUPTED")
except KeyboardInterrupt:
    print("INTERRUPTED")
print("LEFT", time.monotonic() - seen["t"])
print("QUEUED", sorted({t.state.name for t in seen["queued"]}))
release.set()
print("RESULT", seen["running"].get(timeout=30))
"""
)


def _run_child(script: str) -> dict[str, str]:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = {}
    for line in proc.stdout.splitlines():
        key, _, rest = line.partition(" ")
        out[key] = rest
    assert "INTERRUPTED" in out, proc.stdout
    return out


def test_ctrl_c_in_the_body_kills_the_queue_and_leaves_after_the_grace():
    out = _run_child(_CTRL_C_IN_BODY)
    left = float(out["LEFT"])
    # the running task is given the 1 s grace, not waited for (it is held for 30 s)
    assert 0.9 <= left < 6, out
    assert out["RUNNING-AT-EXIT"] == "EXECUTING coordinator running: False", out
    assert out["QUEUED"] == "['KILLED']", out
    assert out["RESULT"] == "held"  # it was not interrupted, only no longer waited for


def test_ctrl_c_while_exit_waits_for_the_queue_escalates_the_stop():
    out = _run_child(_CTRL_C_IN_EXIT)
    assert float(out["LEFT"]) < 6, out
    assert out["QUEUED"] == "['KILLED']", out
    assert out["RESULT"] == "held"


# ----------------------------------------------------------------------------- in process


def test_a_cancelled_task_leaves_async_with_killing_the_queue(make_latch):
    tokens = []
    coords = []

    async def body():
        async with OperationsCoordinator(
            cores=1, workers_per_core=1, grow_on_demand=False
        ) as coord:
            coords.append(coord)
            coord.pause()
            tokens.extend(coord.submit(int) for _ in range(5))
            await asyncio.Event().wait()  # until cancelled

    async def main():
        task = asyncio.create_task(body())
        while not tokens:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert not coords[0].running
    assert [t.state for t in tokens] == [TokenState.KILLED] * 5


def test_a_cancellation_while_exit_waits_kills_the_queue(make_latch):
    latch = make_latch()
    seen: dict[str, Any] = {}

    def release_once_queue_killed() -> None:
        # if the stop were not escalated, the queue would never be killed and the latch
        # would be released only by the safety timeout
        wait_until(
            lambda: "queued" in seen and all(t.state is TokenState.KILLED for t in seen["queued"])
        )
        latch.release()

    async def body():
        async with OperationsCoordinator(
            cores=1, workers_per_core=1, grow_on_demand=False
        ) as coord:
            seen["coord"] = coord
            seen["running"] = coord.submit(latch.enter)
            await asyncio.to_thread(latch.wait_entered, 1)
            seen["queued"] = [coord.submit(int) for _ in range(5)]
        seen["left"] = True  # not reached: the exit is cancelled

    async def main():
        task = asyncio.create_task(body())
        await asyncio.to_thread(wait_until, lambda: "queued" in seen)
        await asyncio.to_thread(wait_until, lambda: not seen["coord"].running)
        task.cancel()  # __aexit__ is waiting for stop() in its thread
        with pytest.raises(asyncio.CancelledError):
            await task

    releaser = threading.Thread(target=release_once_queue_killed)
    releaser.start()
    asyncio.run(main())
    releaser.join(SAFETY)
    assert "left" not in seen
    assert [t.state for t in seen["queued"]] == [TokenState.KILLED] * 5
    assert seen["running"].get(timeout=SAFETY) is None
    assert not seen["coord"].running


def test_a_normal_exit_still_finishes_the_queue():
    async def main():
        async with OperationsCoordinator(
            cores=1, workers_per_core=1, grow_on_demand=False
        ) as coord:
            coord.pause()
            tokens = [coord.submit(pow, i, 2) for i in range(10)]
        return coord, tokens

    coord, tokens = asyncio.run(main())
    assert not coord.running
    assert [t.get(timeout=0) for t in tokens] == [i * i for i in range(10)]
