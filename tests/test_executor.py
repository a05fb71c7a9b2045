"""``tokengate.Executor`` against ``concurrent.futures.ThreadPoolExecutor``: the same test body
runs on both (``kind`` is ``threadpool``, ``tokengate`` with its private coordinator, or
``shared`` on a coordinator it is given) wherever the standard library's behaviour is the
contract; the TokenGate-only behaviour (tokens, kills, the coordinator) follows."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gc
import threading
import weakref
from concurrent.futures.thread import BrokenThreadPool

import pytest

from _support import SAFETY, Latch, child_json, run_child, wait_until
from tokengate import (
    ConfigurationError,
    CoordinatorNotRunning,
    Executor,
    OperationsCoordinator,
    TaskToken,
    TokenDeadlock,
    TokenState,
)

KINDS = ["threadpool", "tokengate", "shared"]


@pytest.fixture
def make_executor(make_coord):
    """``make_executor(kind, *args, **kwargs)``; every executor is shut down at teardown."""
    made: list[cf.Executor] = []
    shared: list[OperationsCoordinator] = []

    def factory(kind: str, *args, **kwargs) -> cf.Executor:
        if kind == "threadpool":
            ex: cf.Executor = cf.ThreadPoolExecutor(*args, **kwargs)
        elif kind == "tokengate":
            ex = Executor(*args, **kwargs)
        else:
            if not shared:
                shared.append(make_coord(cores=2, workers_per_core=8))
            ex = Executor(*args, coordinator=shared[0], **kwargs)
        made.append(ex)
        return ex

    yield factory
    for ex in made:
        ex.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def latch(make_latch) -> Latch:
    return make_latch()


def square(x):
    return x * x


def fail(x):
    raise ValueError(f"bad {x}")


# -- Future, submit ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_submit_returns_a_real_future(make_executor, kind):
    ex = make_executor(kind, 2)
    f = ex.submit(square, 7)
    assert isinstance(f, cf.Future)
    assert f.result(timeout=SAFETY) == 49
    assert f.done() and not f.cancelled() and f.exception() is None
    g = ex.submit(pow, 2, exp=10)  # keyword arguments reach the function
    assert g.result(timeout=SAFETY) == 1024


@pytest.mark.parametrize("kind", KINDS)
def test_exception_is_stored_and_reraised(make_executor, kind):
    ex = make_executor(kind, 2)
    f = ex.submit(fail, 3)
    with pytest.raises(ValueError, match="bad 3"):
        f.result(timeout=SAFETY)
    assert isinstance(f.exception(), ValueError)


@pytest.mark.parametrize("kind", KINDS)
def test_concurrent_futures_wait_and_as_completed(make_executor, kind):
    ex = make_executor(kind, 4)
    fs = [ex.submit(square, i) for i in range(20)]
    done, not_done = cf.wait(fs, timeout=SAFETY)
    assert len(done) == 20 and not not_done
    assert sorted(f.result() for f in cf.as_completed(fs, timeout=SAFETY)) == [
        i * i for i in range(20)
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_result_timeout(make_executor, kind, latch):
    ex = make_executor(kind, 1)
    f = ex.submit(latch.enter)
    assert latch.wait_entered(1)
    with pytest.raises(TimeoutError):
        f.result(timeout=0.01)
    with pytest.raises(TimeoutError):
        f.result(timeout=-1)  # negative: as 0
    assert f.running() and not f.done()
    latch.release()
    assert f.result(timeout=SAFETY) is None


@pytest.mark.parametrize("kind", KINDS)
def test_done_callbacks_run(make_executor, kind):
    ex = make_executor(kind, 2)
    seen: list[int] = []
    ran = threading.Event()
    f = ex.submit(square, 5)
    f.add_done_callback(lambda fut: (seen.append(fut.result()), ran.set()))
    assert ran.wait(SAFETY)
    assert seen == [25]


# -- cancellation --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_cancel_queued_and_running(make_executor, kind, latch):
    ex = make_executor(kind, 1)
    running = ex.submit(latch.enter)
    assert latch.wait_entered(1)
    queued = ex.submit(square, 3)
    assert queued.cancel() is True
    assert queued.cancelled() and queued.done()
    assert running.cancel() is False  # it runs
    assert running.running()
    latch.release()
    assert running.result(timeout=SAFETY) is None
    with pytest.raises(cf.CancelledError):
        queued.result()
    assert queued.cancel() is True  # cancelling again: still cancelled
    done, _ = cf.wait([queued], timeout=0)  # wait() sees the cancellation
    assert queued in done


def test_cancel_kills_a_queued_token(make_executor, latch):
    coord_kind = "shared"
    ex = make_executor(coord_kind, 4)
    coord = ex.coordinator
    # Fill core 2 (medium work) so the next token stays queued in the coordinator.
    blockers = [coord.submit(latch.enter) for _ in range(8)]
    assert latch.wait_entered(8)
    f = ex.submit(square, 2)
    assert isinstance(f.token, TaskToken)
    assert f.token.state in (TokenState.WAITING, TokenState.ADMITTED)
    assert f.cancel() is True
    assert f.token.state is TokenState.KILLED
    assert f.cancelled()
    latch.release()
    for b in blockers:
        b.get(timeout=SAFETY)


def test_token_kill_cancels_future(make_coord, make_latch):
    # a held worker makes the rest queue (no growth on demand)
    coord = make_coord(cores=2, workers_per_core=1, grow_on_demand=False)
    latch = make_latch()
    with Executor(4, coordinator=coord) as ex:
        running = ex.submit(latch.enter)  # takes core 2's only worker
        assert latch.wait_entered(1)
        queued = ex.submit(square, 6)
        token = queued.token
        assert token is not None and token.kill()
        assert queued.cancelled()
        with pytest.raises(cf.CancelledError):
            queued.result(timeout=SAFETY)
        latch.release()
        assert running.result(timeout=SAFETY) is None


def test_stop_without_wait_cancels_queued_futures(make_coord, make_latch):
    # a held worker makes the rest queue (no growth on demand)
    coord = make_coord(cores=2, workers_per_core=1, grow_on_demand=False)
    latch = make_latch()
    ex = Executor(4, coordinator=coord)
    running = ex.submit(latch.enter)
    assert latch.wait_entered(1)
    queued = [ex.submit(square, i) for i in range(3)]
    stopper = threading.Thread(target=coord.stop, kwargs={"wait": False, "timeout": SAFETY})
    stopper.start()
    assert wait_until(lambda: all(f.cancelled() for f in queued))
    latch.release()
    stopper.join(SAFETY)
    assert running.result(timeout=SAFETY) is None
    ex.shutdown()


# -- map -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_map_in_order(make_executor, kind):
    ex = make_executor(kind, 3)
    assert list(ex.map(square, range(50))) == [i * i for i in range(50)]
    assert list(ex.map(pow, [2, 3], [5, 2], chunksize=7)) == [32, 9]
    assert list(ex.map(square, [])) == []


@pytest.mark.parametrize("kind", KINDS)
def test_map_submits_everything_before_the_first_result(make_executor, kind):
    ex = make_executor(kind, 8)
    started = threading.Barrier(5, timeout=SAFETY)

    def meet(i):
        started.wait()  # only returns once all five calls run: all submitted up front
        return i

    it = ex.map(meet, range(5))
    assert list(it) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("kind", KINDS)
def test_map_raises_when_the_result_is_reached(make_executor, kind):
    ex = make_executor(kind, 2)

    def maybe(i):
        if i == 2:
            raise KeyError(i)
        return i

    it = ex.map(maybe, range(5))
    assert next(it) == 0
    assert next(it) == 1
    with pytest.raises(KeyError):
        next(it)


@pytest.mark.parametrize("kind", KINDS)
def test_map_timeout_cancels_the_rest(make_executor, kind, latch):
    ex = make_executor(kind, 1)
    calls = []

    def work(i):
        calls.append(i)
        if i == 0:
            latch.enter()
        return i

    it = ex.map(work, range(4), timeout=0.05)
    with pytest.raises(TimeoutError):
        next(it)
    latch.release()
    ex.shutdown(wait=True)
    assert calls == [0]  # the outstanding calls were cancelled, never run


@pytest.mark.parametrize("kind", KINDS)
def test_map_keeps_no_reference_to_yielded_results(make_executor, kind):
    ex = make_executor(kind, 2)

    class Obj:
        pass

    refs = []
    for obj in ex.map(lambda _: Obj(), range(5)):
        refs.append(weakref.ref(obj))
        del obj
        gc.collect()
        # The worker may still hold the result for an instant after the future got it.
        assert wait_until(lambda: refs[-1]() is None)


# -- shutdown ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_submit_after_shutdown_raises(make_executor, kind):
    ex = make_executor(kind, 2)
    ex.shutdown()
    with pytest.raises(RuntimeError, match=r"^cannot schedule new futures after shutdown$"):
        ex.submit(square, 1)
    ex.shutdown()  # again: fine


@pytest.mark.parametrize("kind", KINDS)
def test_context_manager_waits(make_executor, kind):
    done = []
    with make_executor(kind, 2) as ex:
        for i in range(10):
            ex.submit(done.append, i)
    assert sorted(done) == list(range(10))


@pytest.mark.parametrize("kind", KINDS)
def test_shutdown_cancel_futures(make_executor, kind, latch):
    ex = make_executor(kind, 1)
    running = ex.submit(latch.enter)
    assert latch.wait_entered(1)
    queued = [ex.submit(square, i) for i in range(5)]
    ex.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    assert not running.cancelled()
    latch.release()
    assert running.result(timeout=SAFETY) is None


@pytest.mark.parametrize("kind", KINDS)
def test_shutdown_without_wait_lets_queued_work_finish(make_executor, kind, latch):
    ex = make_executor(kind, 1)
    running = ex.submit(latch.enter)
    assert latch.wait_entered(1)
    queued = [ex.submit(square, i) for i in range(5)]
    ex.shutdown(wait=False)
    latch.release()
    assert [f.result(timeout=SAFETY) for f in queued] == [i * i for i in range(5)]
    assert running.result(timeout=SAFETY) is None


def test_private_coordinator_is_started_lazily_and_stopped_by_shutdown():
    ex = Executor(2)
    coord = ex.coordinator
    assert not coord.running  # no thread before the first submit, like ThreadPoolExecutor
    assert ex.submit(square, 3).result(timeout=SAFETY) == 9
    assert coord.running
    ex.shutdown(wait=True)
    assert not coord.running


def test_private_coordinator_stops_after_shutdown_without_wait(make_latch):
    latch = make_latch()
    ex = Executor(1)
    f = ex.submit(latch.enter)
    assert latch.wait_entered(1)
    ex.shutdown(wait=False)
    assert ex.coordinator.running  # the call still runs
    latch.release()
    assert f.result(timeout=SAFETY) is None
    assert wait_until(lambda: not ex.coordinator.running)


def test_given_coordinator_is_never_stopped(make_coord):
    coord = make_coord(cores=2, workers_per_core=2)
    with Executor(2, coordinator=coord) as ex:
        assert ex.submit(square, 2).result(timeout=SAFETY) == 4
    assert coord.running
    assert coord.submit(square, 3).get(timeout=SAFETY) == 9


def test_given_coordinator_not_running(make_coord):
    coord = OperationsCoordinator(cores=2, workers_per_core=1)
    ex = Executor(2, coordinator=coord)
    with pytest.raises(CoordinatorNotRunning):
        ex.submit(square, 2)
    coord.start()
    try:
        assert ex.submit(square, 2).result(timeout=SAFETY) == 4  # the slot was given back
        assert ex.submit(square, 3).result(timeout=SAFETY) == 9
    finally:
        ex.shutdown()
        coord.stop()


def test_shutdown_wait_inside_its_own_call_raises_deadlock(make_executor):
    ex = make_executor("tokengate", 2)

    def inner():
        ex.shutdown(wait=True)

    with pytest.raises(TokenDeadlock):
        ex.submit(inner).result(timeout=SAFETY)


def test_interpreter_exit_with_work_running_and_queued(tmp_path):
    rc, out, err = run_child(
        tmp_path,
        """
        import threading, json
        import tokengate
        started = threading.Event()
        never = threading.Event()
        def block():
            started.set()
            never.wait(60)        # still running when the interpreter exits
        ex = tokengate.Executor(2)
        running = ex.submit(block)
        queued = [ex.submit(sum, [i]) for i in range(100)]   # held back or queued
        started.wait(10)
        shared = tokengate.OperationsCoordinator(cores=2, workers_per_core=1).start()
        ex2 = tokengate.Executor(1, coordinator=shared)
        r2 = ex2.submit(block)
        q2 = [ex2.submit(sum, [i]) for i in range(10)]
        print("RESULT " + json.dumps({"started": started.is_set()}))
        """,
        timeout=30,  # waiting for the running calls (60 s) would fail this
    )
    assert rc == 0, err
    assert child_json(out)["started"] is True


# -- the bound, the initializer --------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_max_workers_bounds_concurrency(make_executor, kind, make_latch):
    ex = make_executor(kind, 3)
    latch = make_latch()
    lock = threading.Lock()
    now = [0]
    peak = [0]

    def work():
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        latch.enter()
        with lock:
            now[0] -= 1

    fs = [ex.submit(work) for _ in range(9)]
    assert latch.wait_entered(3)
    assert not latch.wait_entered(4, timeout=0.05)  # a fourth never starts meanwhile
    latch.release()
    for f in fs:
        f.result(timeout=SAFETY)
    assert peak[0] == 3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [0, -1])
def test_max_workers_must_be_positive(kind, bad):
    cls = cf.ThreadPoolExecutor if kind == "threadpool" else Executor
    with pytest.raises(ValueError, match=r"^max_workers must be greater than 0$"):
        cls(bad)


def test_max_workers_default_is_the_stdlib_formula():
    assert Executor()._max_workers == cf.ThreadPoolExecutor()._max_workers


@pytest.mark.parametrize("kind", KINDS)
def test_initializer_runs_once_per_worker_thread(make_executor, kind):
    inits: list[int] = []
    lock = threading.Lock()

    def init(tag):
        assert tag == "x"
        with lock:
            inits.append(threading.get_ident())

    ex = make_executor(kind, 3, initializer=init, initargs=("x",))
    threads = set(ex.map(lambda _: threading.get_ident(), range(60)))
    ex.shutdown(wait=True)
    assert len(inits) == len(set(inits))  # once per thread
    assert threads <= set(inits)  # in every thread its work ran on
    if kind != "threadpool":  # ThreadPoolExecutor runs it in every thread it starts
        assert set(inits) == threads  # TokenGate's workers are shared: only where needed


@pytest.mark.parametrize("kind", KINDS)
def test_initializer_failure_breaks_the_executor(make_executor, kind, latch):
    def init():
        raise OSError("no")

    ex = make_executor(kind, 1, initializer=init)
    fs = [ex.submit(square, i) for i in range(4)]
    for f in fs:
        with pytest.raises(BrokenThreadPool):
            f.result(timeout=SAFETY)
    with pytest.raises(BrokenThreadPool):
        ex.submit(square, 1)


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_constructor_rejects_what_threadpool_rejects(kind):
    cls = cf.ThreadPoolExecutor if kind == "threadpool" else Executor
    with pytest.raises(TypeError):
        cls("4")
    with pytest.raises(TypeError, match=r"^initializer must be a callable$"):
        cls(2, initializer=42)


@pytest.mark.parametrize("kind", KINDS)
def test_submit_and_map_reject_what_threadpool_rejects(make_executor, kind):
    ex = make_executor(kind, 2)
    with pytest.raises(TypeError):
        ex.submit()
    with pytest.raises(TypeError):
        ex.submit(fn=square)  # fn is positional-only
    with pytest.raises(TypeError):
        ex.map(square, 5)  # not iterable
    with pytest.raises(TypeError):
        ex.map(square, [1], timeout="soon")


def test_non_callable_fails_at_once():
    with Executor(2) as ex:
        with pytest.raises(TypeError, match="'int' object is not callable"):
            ex.submit(42)
        with pytest.raises(TypeError, match="'str' object is not callable"):
            ex.map("nope", [1, 2])
    # ThreadPoolExecutor only fails when the call runs:
    with cf.ThreadPoolExecutor(1) as tpe:
        with pytest.raises(TypeError):
            tpe.submit(42).result(timeout=SAFETY)


def test_tokengate_options_are_checked():
    with pytest.raises(ConfigurationError, match="weight"):
        Executor(weight="huge")
    with pytest.raises(ConfigurationError, match="priority"):
        Executor(priority="urgent")
    with pytest.raises(ConfigurationError, match="operation_type"):
        Executor(operation_type=" ")
    with pytest.raises(TypeError, match="coordinator"):
        Executor(coordinator="local")


# -- TokenGate specifics -------------------------------------------------------------------


def test_tokens_carry_the_options(make_coord):
    coord = make_coord(cores=3, workers_per_core=1)
    with Executor(
        2, coordinator=coord, weight="HEAVY", operation_type="resize", priority="high"
    ) as ex:
        f = ex.submit(square, 4)
        assert f.result(timeout=SAFETY) == 16
        token = f.token
        assert isinstance(token, TaskToken)
        assert token.operation_type == "resize"
        assert token.weight == "heavy"
        g = ex.submit(square, 1)
        g.result(timeout=SAFETY)
    with Executor(2, coordinator=coord, initializer=lambda: None) as ex:
        f = ex.submit(square, 5)
        assert f.result(timeout=SAFETY) == 25
        assert f.token is not None and f.token.operation_type == "square"


def test_nested_waits_inside_calls_do_not_deadlock():
    # Unlike a ThreadPoolExecutor with 2 threads, a call may wait on calls submitted after it
    # while they are queued in the coordinator: the wait runs them inline.
    with Executor(64) as ex:

        def walk(depth):
            if depth == 0:
                return 1
            kids = [ex.submit(walk, depth - 1) for _ in range(2)]
            return sum(k.result() for k in kids)

        assert ex.submit(walk, 4).result(timeout=SAFETY) == 16


def test_is_a_threadpool_subclass_for_asyncio():
    ex = Executor(1)
    assert isinstance(ex, cf.ThreadPoolExecutor) and isinstance(ex, cf.Executor)
    assert not ex._threads
    ex.shutdown()


def test_asyncio_default_executor_runs_tokens():
    ex = Executor(4)

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ex)
        on_worker = lambda: ex.coordinator._rt.on_worker_thread()  # noqa: E731
        a = await asyncio.to_thread(on_worker)
        b = await loop.run_in_executor(None, on_worker)
        c = await asyncio.gather(*(asyncio.to_thread(square, i) for i in range(10)))
        return a, b, c

    a, b, c = asyncio.run(main())  # asyncio.run shuts the default executor down
    assert a is True and b is True
    assert c == [i * i for i in range(10)]
    assert ex.coordinator.stats()["completed"] >= 12
    assert not ex.coordinator.running


def test_a_private_coordinator_never_takes_decorated_calls(make_coord):
    """The executor's own coordinator is started with decorated_calls=False: decorated calls
    made while it runs still go to the user's coordinator."""
    from tokengate import task_token_guard

    mine = make_coord(cores=1, workers_per_core=1)

    @task_token_guard(operation_type="decorated")
    def where():
        return threading.current_thread().name

    with Executor(2) as ex:
        assert ex.submit(int, "3").result(timeout=SAFETY) == 3  # its coordinator runs now
        where().get(timeout=SAFETY)
        assert mine.stats()["created"] == 1  # the decorated call came to `mine`
