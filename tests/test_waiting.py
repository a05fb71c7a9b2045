"""tokengate.wait / as_completed / gather over TaskTokens, and asyncio's helpers on tokens."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import math
import threading
import weakref

import pytest

import tokengate
from _support import SAFETY, wait_until
from tokengate import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    TokenDeadlock,
    TokenKilled,
    TokenState,
    TokenTimeout,
    as_completed,
    gather,
    wait,
)
from tokengate import waiting as waiting_mod


def boom(msg: str = "boom") -> None:
    raise ValueError(msg)


def live(kind: type) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is kind)


# -- constants and input checking ---------------------------------------------------------------


def test_constants_are_concurrent_futures_own():
    assert ALL_COMPLETED is concurrent.futures.ALL_COMPLETED
    assert FIRST_COMPLETED is concurrent.futures.FIRST_COMPLETED
    assert FIRST_EXCEPTION is concurrent.futures.FIRST_EXCEPTION


def test_concurrent_futures_constant_is_accepted(coord, make_latch):
    latch = make_latch()
    quick = coord.submit(int, "7")
    held = coord.submit(latch.enter)
    done, not_done = wait(
        [quick, held], timeout=SAFETY, return_when=concurrent.futures.FIRST_COMPLETED
    )
    assert done == {quick} and not_done == {held}


def test_invalid_return_when_raises_value_error_even_if_all_done(coord):
    tok = coord.submit(int, "1")
    tok.get()
    with pytest.raises(ValueError, match=r"Invalid return condition: 'SOMETIMES'"):
        wait([tok], return_when="SOMETIMES")


@pytest.mark.parametrize("fn", [wait, as_completed])
def test_non_token_element_is_named(coord, fn):
    tok = coord.submit(int, "1")
    with pytest.raises(TypeError, match=r"got 'oops' \(str\) at position 1"):
        fn([tok, "oops"])


@pytest.mark.parametrize("fn", [wait, as_completed])
def test_single_token_or_non_iterable_is_refused(coord, fn):
    tok = coord.submit(int, "1")
    with pytest.raises(TypeError, match=r"single TaskToken: pass \[token\]"):
        fn(tok)
    with pytest.raises(TypeError, match="iterable of TaskTokens, got int"):
        fn(42)


def test_concurrent_futures_future_is_refused():
    fut: concurrent.futures.Future[int] = concurrent.futures.Future()
    with pytest.raises(TypeError, match=r"\(Future\) at position 0"):
        wait([fut])
    with pytest.raises(TypeError, match=r"\(Future\) at position 0"):
        gather(fut)  # type: ignore[arg-type]


@pytest.mark.parametrize(("timeout", "exc"), [("1", TypeError), (math.nan, ValueError)])
def test_bad_timeout(coord, timeout, exc):
    tok = coord.submit(int, "1")
    with pytest.raises(exc, match="timeout must be a number of seconds or None"):
        wait([tok], timeout=timeout)
    with pytest.raises(exc, match="timeout must be a number of seconds or None"):
        as_completed([tok], timeout=timeout)
    with pytest.raises(exc, match="timeout must be a number of seconds or None"):
        gather(tok, timeout=timeout)


def test_as_completed_checks_input_at_call_time():
    with pytest.raises(TypeError):
        as_completed([None])  # type: ignore[list-item]  # not on first next()


# -- wait ------------------------------------------------------------------------------------


def test_wait_empty():
    assert wait([]) == (set(), set())
    assert wait([], return_when=FIRST_COMPLETED) == (set(), set())


def test_wait_all_completed_returns_named_sets(coord):
    toks = [coord.submit(pow, i, 2) for i in range(50)]
    res = wait(toks)
    assert isinstance(res, tokengate.waiting.DoneAndNotDoneTokens)
    assert res.done == set(toks) and res.not_done == set()
    assert all(t.state is TokenState.COMPLETED for t in res.done)
    assert sorted(t.get() for t in res.done) == [i * i for i in range(50)]


def test_wait_dedups(coord):
    tok = coord.submit(int, "3")
    done, not_done = wait([tok, tok, tok])
    assert done == {tok} and not not_done


def test_wait_accepts_any_iterable(coord):
    toks = [coord.submit(int, str(i)) for i in range(5)]
    done, _ = wait(t for t in toks)
    assert done == set(toks)


@pytest.mark.parametrize("return_when", [ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION])
def test_wait_timeout_returns_not_done(coord, make_latch, return_when):
    latch = make_latch()
    held = coord.submit(latch.enter)
    assert latch.wait_entered(1)
    done, not_done = wait([held], timeout=0.01, return_when=return_when)
    assert done == set() and not_done == {held}
    done, not_done = wait([held], timeout=0, return_when=return_when)
    assert not_done == {held}
    done, not_done = wait([held], timeout=-1, return_when=return_when)  # like concurrent.futures
    assert not_done == {held}
    latch.release()
    assert wait([held], timeout=SAFETY, return_when=return_when) == ({held}, set())


def test_wait_all_completed_waits_for_every_token(coord, make_latch):
    latch = make_latch()
    held = [coord.submit(latch.enter) for _ in range(2)]
    quick = [coord.submit(int, "1") for _ in range(3)]
    assert latch.wait_entered(2)
    threading.Thread(target=latch.release).start()
    done, not_done = wait(held + quick, timeout=SAFETY)
    assert done == set(held + quick) and not not_done


def test_first_completed_returns_with_the_finished_one(coord, make_latch):
    latch = make_latch()
    held = coord.submit(latch.enter)
    assert latch.wait_entered(1)
    gate = threading.Event()
    later = coord.submit(gate.wait, SAFETY)
    threading.Thread(target=gate.set).start()
    done, not_done = wait([held, later], timeout=SAFETY, return_when=FIRST_COMPLETED)
    assert later in done and held in not_done
    assert later.get() is True


def test_first_completed_already_done(coord, make_latch):
    latch = make_latch()
    held = coord.submit(latch.enter)
    quick = coord.submit(int, "2")
    quick.get()
    done, not_done = wait([held, quick], return_when=FIRST_COMPLETED)
    assert done == {quick} and not_done == {held}


def test_first_exception_returns_on_a_failure(coord, make_latch):
    latch = make_latch()
    held = coord.submit(latch.enter)
    assert latch.wait_entered(1)
    gate = threading.Event()
    bad = coord.submit(lambda: gate.wait(SAFETY) and boom())
    threading.Thread(target=gate.set).start()
    done, not_done = wait([held, bad], timeout=SAFETY, return_when=FIRST_EXCEPTION)
    assert done == {bad} and not_done == {held}
    assert isinstance(bad.exception(), ValueError)


def test_first_exception_already_failed(coord, make_latch):
    latch = make_latch()
    held = coord.submit(latch.enter)
    bad = coord.submit(boom)
    bad.wait()
    assert wait([held, bad], return_when=FIRST_EXCEPTION) == ({bad}, {held})


def test_first_exception_without_failures_is_all_completed(coord):
    toks = [coord.submit(int, str(i)) for i in range(20)]
    assert wait(toks, return_when=FIRST_EXCEPTION) == (set(toks), set())


def test_first_exception_does_not_count_killed_as_exception(make_coord, make_latch):
    c = make_coord(cores=1, workers_per_core=1)
    latch = make_latch()
    held = c.submit(latch.enter)
    assert latch.wait_entered(1)
    queued = c.submit(int, "1")  # behind `held` on the only worker
    assert queued.kill()
    # KILLED is done but not an exception: the wait goes on until `held` finishes too.
    threading.Thread(target=latch.release).start()
    done, not_done = wait([queued, held], timeout=SAFETY, return_when=FIRST_EXCEPTION)
    assert done == {queued, held} and not not_done
    assert queued.state is TokenState.KILLED


def test_killed_counts_as_done_for_first_completed(make_coord, make_latch):
    c = make_coord(cores=1, workers_per_core=1)
    latch = make_latch()
    held = c.submit(latch.enter)
    assert latch.wait_entered(1)
    queued = c.submit(int, "1")
    threading.Thread(target=queued.kill).start()
    done, not_done = wait([held, queued], timeout=SAFETY, return_when=FIRST_COMPLETED)
    assert done == {queued} and not_done == {held}


def test_wait_releases_the_gil(coord, make_latch):
    # The releasing thread is Python code: it can only run if the waiter let go of the GIL.
    for return_when in (ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION):
        latch = make_latch()
        held = coord.submit(latch.enter)

        def release(latch=latch):
            latch.wait_entered(1)
            latch.release()

        threading.Thread(target=release).start()
        done, _ = wait([held], timeout=SAFETY, return_when=return_when)
        assert done == {held}


def test_wait_leaves_no_waiter_behind(coord, make_latch):
    latch = make_latch()
    held = coord.submit(latch.enter)
    assert latch.wait_entered(1)
    before_w, before_n = live(waiting_mod._Waiter), live(waiting_mod._Notify)
    for _ in range(200):
        assert wait([held], timeout=0.0001, return_when=FIRST_COMPLETED).not_done == {held}
    # Callbacks stay registered on the running token, but they are detached forwarders:
    # no waiter (condition, lists) survives the calls.
    assert live(waiting_mod._Waiter) == before_w
    assert live(waiting_mod._Notify) == before_n + 200
    latch.release()
    held.get()
    # Once the token is final the core drops its callbacks: nothing at all is left.
    assert wait_until(lambda: live(waiting_mod._Notify) == before_n)


def test_callback_after_return_is_harmless(coord, make_latch):
    latch = make_latch()
    held = coord.submit(latch.enter)
    quick = coord.submit(int, "1")
    done, not_done = wait([held, quick], timeout=SAFETY, return_when=FIRST_COMPLETED)
    assert quick in done and held in not_done
    latch.release()
    assert held.get() is None  # its (detached) callback ran on the worker without error
    assert wait([held, quick]) == ({held, quick}, set())


# -- as_completed --------------------------------------------------------------------------


def test_as_completed_yields_finished_first_then_in_finishing_order(make_coord, make_latch):
    coord = make_coord(cores=2, workers_per_core=4)
    a, b = make_latch(), make_latch()
    ta = coord.submit(a.enter)
    tb = coord.submit(b.enter)
    t0 = coord.submit(int, "0")
    t1 = coord.submit(int, "1")
    t0.get(), t1.get()
    assert a.wait_entered(1) and b.wait_entered(1)
    it = as_completed([ta, t1, tb, t0, t1])
    assert next(it) is t1  # already final: in the order given, duplicates once
    assert next(it) is t0
    b.release()
    assert next(it) is tb
    a.release()
    assert next(it) is ta
    with pytest.raises(StopIteration):
        next(it)


def test_as_completed_many(coord):
    toks = [coord.submit(pow, i, 3) for i in range(200)]
    seen = list(as_completed(toks + toks[:10]))
    assert len(seen) == 200 and set(seen) == set(toks)


def test_as_completed_empty():
    assert list(as_completed([])) == []


def test_as_completed_timeout(coord, make_latch):
    latch = make_latch()
    held = coord.submit(latch.enter)
    quick = coord.submit(int, "1")
    quick.get()
    it = as_completed([held, quick, coord.submit(latch.enter)], timeout=0.02)
    assert next(it) is quick
    with pytest.raises(TokenTimeout, match=r"^2 \(of 3\) tokens unfinished$") as info:
        next(it)
    assert isinstance(info.value, TimeoutError)


def test_as_completed_keeps_no_reference_to_yielded_tokens(coord, make_latch):
    latch = make_latch()
    gate = threading.Event()
    first = coord.submit(gate.wait, SAFETY)
    held = coord.submit(latch.enter)
    ref = weakref.ref(first)
    it = as_completed(iter([first, held]))
    del first
    gate.set()
    tok = next(it)
    assert tok is ref()
    del tok
    gc.collect()
    assert ref() is None
    latch.release()
    assert [t.get() for t in it] == [None]


def test_as_completed_closed_early_detaches(coord, make_latch):
    latch = make_latch()
    held = coord.submit(latch.enter)
    quick = coord.submit(int, "5")
    before = live(waiting_mod._Waiter)
    it = as_completed([quick, held])
    assert next(it).get() == 5
    assert live(waiting_mod._Waiter) == before + 1
    it.close()
    assert live(waiting_mod._Waiter) == before
    latch.release()
    assert held.get() is None


def test_as_completed_releases_the_gil(coord, make_latch):
    latch = make_latch()
    held = coord.submit(latch.enter)

    def release():
        latch.wait_entered(1)
        latch.release()

    threading.Thread(target=release).start()
    assert list(as_completed([held], timeout=SAFETY)) == [held]


# -- inside a task -------------------------------------------------------------------------


def test_any_waits_inside_a_task_do_not_starve_the_core(make_coord):
    # One worker: the children queue behind the waiting parent. A parent blocked on a Python
    # Condition would never let them run; waiting inside a task parks in native waits, which
    # the core compensates.
    c = make_coord(cores=1, workers_per_core=1)

    def parent():
        kids = [c.submit(pow, i, 2) for i in range(4)]
        first = wait(kids, timeout=SAFETY, return_when=FIRST_COMPLETED)
        failed = wait([*kids, c.submit(boom)], timeout=SAFETY, return_when=FIRST_EXCEPTION)
        order = [t.get() for t in as_completed(kids, timeout=SAFETY)]
        return len(first.done), len(failed.done), sorted(order)

    n_first, n_failed, order = c.submit(parent).get(timeout=SAFETY * 2)
    assert n_first >= 1 and n_failed >= 1
    assert order == [0, 1, 4, 9]


def test_all_completed_inside_a_task_runs_queued_children_inline(make_coord):
    c = make_coord(cores=1, workers_per_core=1)

    def parent():
        kids = [c.submit(pow, i, 2) for i in range(5)]
        done, not_done = wait(kids)
        return sorted(t.get() for t in done), len(not_done)

    assert c.submit(parent).get(timeout=SAFETY) == ([0, 1, 4, 9, 16], 0)
    assert c.stats()["inline_runs"] >= 1


def test_own_token_inside_a_task(coord):
    box: dict[str, tokengate.TaskToken] = {}
    ready = threading.Event()

    def me():
        ready.wait(SAFETY)
        other = coord.submit(int, "4")
        done, _ = wait([box["me"], other], timeout=SAFETY, return_when=FIRST_COMPLETED)
        assert done == {other}
        try:
            wait([box["me"]], return_when=FIRST_COMPLETED)
        except TokenDeadlock as exc:
            return str(exc)
        return "no deadlock"

    box["me"] = coord.submit(me)
    ready.set()
    assert "waits on itself" in box["me"].get(timeout=SAFETY)


# -- gather --------------------------------------------------------------------------------


def test_gather_in_order(coord):
    toks = [coord.submit(pow, i, 2) for i in range(30)]
    assert gather(*toks) == [i * i for i in range(30)]
    assert gather(toks[3], toks[3], toks[0]) == [9, 9, 0]
    assert gather() == []


def test_gather_raises_first_failure_in_argument_order(coord, make_latch):
    latch = make_latch()
    gate = threading.Event()
    late = coord.submit(lambda: gate.wait(SAFETY) and boom("late"))
    early = coord.submit(boom, "early")
    early.wait()
    # `early` failed first in time, but `late` comes first in the arguments.
    threading.Thread(target=gate.set).start()
    with pytest.raises(ValueError, match=r"^late$"):
        gather(late, early)
    held = coord.submit(latch.enter)
    with pytest.raises(ValueError, match=r"^early$"):
        gather(early, held)  # raised without waiting for the tokens after it


def test_gather_return_exceptions(make_coord, make_latch):
    c = make_coord(cores=1, workers_per_core=1)
    latch = make_latch()
    held = c.submit(latch.enter)
    assert latch.wait_entered(1)
    killed = c.submit(int, "1")
    assert killed.kill()
    bad = c.submit(boom, "x")
    ok = c.submit(int, "8")
    latch.release()
    out = gather(ok, bad, killed, held, return_exceptions=True)
    assert out[0] == 8 and out[3] is None
    assert isinstance(out[1], ValueError) and str(out[1]) == "x"
    assert isinstance(out[2], TokenKilled)
    with pytest.raises(TokenKilled):
        gather(ok, killed)


def test_gather_timeout(coord, make_latch):
    latch = make_latch()
    held = coord.submit(latch.enter)
    quick = coord.submit(int, "1")
    with pytest.raises(TokenTimeout, match=r"^1 \(of 2\) tokens unfinished$") as info:
        gather(quick, held, held, timeout=0.02)
    assert isinstance(info.value, TimeoutError)
    latch.release()
    assert gather(quick, held, timeout=SAFETY) == [1, None]


def test_gather_names_a_non_token(coord):
    tok = coord.submit(int, "1")
    with pytest.raises(TypeError, match=r"got 3 \(int\) at position 1"):
        gather(tok, 3)  # type: ignore[arg-type]


# -- asyncio on tokens ---------------------------------------------------------------------


def test_asyncio_gather_and_as_completed_take_tokens(coord):
    async def main():
        toks = [coord.submit(pow, i, 2) for i in range(10)]
        results = await asyncio.gather(*toks)
        order = [await f for f in asyncio.as_completed(toks)]
        one = await asyncio.wait_for(toks[2], SAFETY)
        return results, sorted(order), one

    results, order, one = asyncio.run(main())
    assert results == order == [i * i for i in range(10)]
    assert one == 4


def test_asyncio_wait_needs_tasks(coord, make_latch):
    latch = make_latch()

    async def main():
        held = coord.submit(latch.enter)
        quick = coord.submit(int, "6")
        tasks = [asyncio.ensure_future(t) for t in (held, quick)]
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        first = [t.result() for t in done]
        latch.release()
        done, pending = await asyncio.wait(tasks)
        return first, len(done), len(pending)

    assert asyncio.run(main()) == ([6], 2, 0)


def test_asyncio_wait_on_bare_tokens_does_not_work(coord):
    # asyncio.wait (3.11+) drives its arguments as asyncio futures (add/remove_done_callback
    # on the loop's thread); a token is awaitable but not a future. Wrap with ensure_future.
    tok = coord.submit(int, "1")
    tok.get()

    async def main():
        await asyncio.wait([tok])  # type: ignore[list-item]

    with pytest.raises((AttributeError, TypeError)):
        asyncio.run(main())
