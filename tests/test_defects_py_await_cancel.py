"""Cancelling a task that awaits a token ends only that await: the token is not killed, it
runs, and every other waiter (sync or async) gets its result, as after ``get(timeout=...)``."""

from __future__ import annotations

import asyncio

import pytest

from _support import SAFETY
from tokengate import TokenKilled, TokenState


class _Boom(Exception):
    pass


def _queued_behind_a_held_worker(make_coord, make_latch):
    """A token that stays queued (ADMITTED/WAITING) until the returned latch is released."""
    # a held worker makes the rest queue (no growth on demand)
    coord = make_coord(cores=1, workers_per_core=1, grow_on_demand=False)
    latch = make_latch()
    coord.submit(latch.enter)
    assert latch.wait_entered(1)
    token = coord.submit(lambda: "the result")
    return token, latch


def _not_started(token) -> bool:
    return token.state in (TokenState.WAITING, TokenState.ADMITTED)


def test_cancelling_the_awaiting_task_leaves_the_token_to_the_other_waiters(make_coord, make_latch):
    token, latch = _queued_behind_a_held_worker(make_coord, make_latch)

    async def main():
        impatient = asyncio.create_task(_await(token))
        patient = asyncio.create_task(_await(token))
        await asyncio.sleep(0)  # both are now suspended in their await
        impatient.cancel()
        with pytest.raises(asyncio.CancelledError):
            await impatient
        assert _not_started(token)
        latch.release()
        return await asyncio.wait_for(patient, SAFETY)

    assert asyncio.run(main()) == "the result"
    assert token.get(timeout=0) == "the result"
    assert token.state is TokenState.COMPLETED


def test_wait_for_timing_out_does_not_kill_the_token(make_coord, make_latch):
    token, latch = _queued_behind_a_held_worker(make_coord, make_latch)

    async def main():
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(token, 0.01)

    asyncio.run(main())
    assert _not_started(token)
    latch.release()
    assert token.get(timeout=SAFETY) == "the result"


def test_a_task_group_cancelling_its_awaiter_does_not_kill_the_token(make_coord, make_latch):
    token, latch = _queued_behind_a_held_worker(make_coord, make_latch)

    async def fail_soon():
        await asyncio.sleep(0)
        raise _Boom

    async def main():
        async with asyncio.TaskGroup() as group:
            group.create_task(_await(token))
            group.create_task(fail_soon())

    with pytest.raises(ExceptionGroup) as ei:
        asyncio.run(main())
    assert [type(e) for e in ei.value.exceptions] == [_Boom]
    assert _not_started(token)
    latch.release()
    assert token.get(timeout=SAFETY) == "the result"


def test_a_token_cancelled_away_from_can_be_awaited_again(make_coord, make_latch):
    token, latch = _queued_behind_a_held_worker(make_coord, make_latch)

    async def main():
        first = asyncio.create_task(_await(token))
        await asyncio.sleep(0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        latch.release()
        return await asyncio.wait_for(_await(token), SAFETY)

    assert asyncio.run(main()) == "the result"


def test_kill_is_still_the_explicit_way_to_cancel_the_token(make_coord, make_latch):
    token, latch = _queued_behind_a_held_worker(make_coord, make_latch)

    async def main():
        waiter = asyncio.create_task(_await(token))
        await asyncio.sleep(0)
        assert token.kill() is True
        return await asyncio.gather(waiter, return_exceptions=True)

    (outcome,) = asyncio.run(main())
    assert isinstance(outcome, TokenKilled)
    assert token.state is TokenState.KILLED
    latch.release()


async def _await(token):
    return await token
