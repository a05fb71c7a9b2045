"""`await token` inside asyncio: results, exceptions, kills, and never blocking the event loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from _support import SAFETY
from tokengate import OperationsCoordinator, TokenKilled, TokenState, task_token_guard


class AsyncCustom(Exception):
    pass


def test_await_returns_result(coord):
    @task_token_guard()
    def triple(x):
        return x * 3

    async def main():
        return await triple(5)

    assert asyncio.run(main()) == 15


def test_await_does_not_block_the_event_loop(make_coord, make_latch):
    """The task only finishes once another coroutine releases it, so awaiting it must leave the
    loop free. If ``await`` blocked the loop, the latch would hit its safety timeout and the
    token would fail instead of returning "released"."""
    make_coord(cores=1, workers_per_core=1)
    latch = make_latch(safety=10)
    token = task_token_guard()(lambda: latch.enter() or "released")()
    assert latch.wait_entered(1)
    progress = []

    async def awaiter():
        result = await token
        progress.append("awaited")
        return result

    async def other():
        for i in range(5):
            progress.append(i)
            await asyncio.sleep(0)
        assert not token.done()
        latch.release()

    async def main():
        return await asyncio.gather(awaiter(), other())

    result, _ = asyncio.run(main())
    assert result == "released"
    assert progress == [0, 1, 2, 3, 4, "awaited"]


def test_many_concurrent_awaits_with_gather(coord):
    async def main():
        tokens = [coord.submit(lambda i=i: i * i) for i in range(100)]
        return await asyncio.gather(*tokens)

    assert asyncio.run(main()) == [i * i for i in range(100)]


def test_await_already_finished_token_and_await_twice(coord):
    token = coord.submit(lambda: "done")
    assert token.get() == "done"

    async def main():
        first = await token
        second = await token
        return first, second

    assert asyncio.run(main()) == ("done", "done")


def test_await_failing_token_raises_its_exception(coord):
    def boom():
        raise AsyncCustom("async boom")

    token = coord.submit(boom)

    async def main():
        await token

    with pytest.raises(AsyncCustom, match="async boom"):
        asyncio.run(main())
    assert token.state is TokenState.FAILED


def test_await_killed_token_raises_token_killed(coord):
    coord.pause()
    token = coord.submit(lambda: "never")

    async def main():
        waiter = asyncio.ensure_future(_await(token))
        await asyncio.sleep(0)  # let the waiter start awaiting (ordering, not timing)
        assert token.kill() is True
        return await waiter

    with pytest.raises(TokenKilled):
        asyncio.run(main())
    coord.resume()
    assert token.state is TokenState.KILLED


def test_await_token_killed_before_await(coord):
    coord.pause()
    token = coord.submit(lambda: "never")
    assert token.kill()

    async def main():
        return await token

    with pytest.raises(TokenKilled):
        asyncio.run(main())
    coord.resume()


async def _await(token):
    return await token


def test_await_from_multiple_event_loops_in_threads(coord):
    token_values = {}
    tokens = [coord.submit(lambda i=i: i + 100) for i in range(4)]

    def run_loop(k):
        token_values[k] = asyncio.run(_await(tokens[k]))

    threads = [threading.Thread(target=run_loop, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SAFETY)
        assert not t.is_alive()
    assert token_values == {k: k + 100 for k in range(4)}


def test_async_with_coordinator_and_await_decorated_calls():
    @task_token_guard(tags={"weight": "light"})
    def add(a, b):
        return a + b

    async def main():
        async with OperationsCoordinator(cores=3, workers_per_core=1) as coord:
            results = await asyncio.gather(*(add(i, i) for i in range(10)))
            return coord, results

    coord, results = asyncio.run(main())
    assert results == [2 * i for i in range(10)]
    assert not coord.running
