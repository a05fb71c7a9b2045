"""``contextvars`` propagation (issue #9): a token runs in a copy of its submitter's context,
taken when it is submitted (as ``asyncio.to_thread`` and ``loop.run_in_executor`` with
``contextvars.copy_context().run`` do), so what the caller set is seen in the task, and what
the task sets stays in the token. ``task_token_guard(copy_context=False)`` opts an operation
out (its task runs in the worker thread's own context).

What the tests pin down, beyond "the caller's value is seen":

* a value set inside a task leaks neither into its caller nor into the next task on the same
  worker (one core, one worker, so both run on the same thread);
* concurrent submitters each see their own value;
* a chain step (``token.then(f)``) runs in a copy of the context of the caller of ``then()``,
  taken when ``then()`` is called (not of the step before's task, whose changes stay its own);
* each retry starts again from the submit-time copy: what attempt 1 set is not seen by
  attempt 2;
* an asyncio task that submits and awaits a token has its own context seen by the token;
* ``tokengate.Executor.submit`` propagates too (unlike ``concurrent.futures.
  ThreadPoolExecutor``, whose workers run in their own context), also for a call held back by
  ``max_workers`` (submitted later from another call's done callback, in its submitter's
  context all the same).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest

from _support import SAFETY
from tokengate import Executor, current_token, task_token_guard

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("tokengate_test_var", default="unset")


def in_fresh_context(fn, *args):
    """Run ``fn(*args)`` in an empty context, so a test's ``VAR.set`` cannot leak out of it."""
    return contextvars.Context().run(fn, *args)


@task_token_guard(operation_type="ctx_read")
def read():
    return VAR.get()


@task_token_guard(operation_type="ctx_set_and_read")
def set_and_read(value):
    before = VAR.get()
    VAR.set(value)
    return before, VAR.get()


# ----------------------------------------------------------------------------- caller -> task


def test_the_task_sees_the_callers_value(coord):
    def body():
        VAR.set("caller")
        return read().get(timeout=SAFETY)

    assert in_fresh_context(body) == "caller"
    assert in_fresh_context(lambda: read().get(timeout=SAFETY)) == "unset"


def test_the_value_is_copied_at_submission(coord, make_latch):
    latch = make_latch()

    @task_token_guard(operation_type="ctx_read_late")
    def read_late():
        latch.enter()
        return VAR.get()

    def body():
        VAR.set("at submit")
        token = read_late()
        assert latch.wait_entered(1)
        VAR.set("changed after submit")
        latch.release()
        return token.get(timeout=SAFETY)

    assert in_fresh_context(body) == "at submit"


def test_a_value_set_in_the_task_leaks_neither_to_the_caller_nor_to_the_next_task(make_coord):
    make_coord(cores=1, workers_per_core=1)

    def body():
        VAR.set("caller")
        first = set_and_read("set by task 1")
        assert first.get(timeout=SAFETY) == ("caller", "set by task 1")
        assert VAR.get() == "caller"
        second = set_and_read("set by task 2")
        assert second.get(timeout=SAFETY) == ("caller", "set by task 2")
        assert (first.core_id, first.worker_id) == (second.core_id, second.worker_id)
        return first, second

    first, _second = in_fresh_context(body)
    third = in_fresh_context(read)  # submitted where VAR is unset, on the same thread
    assert third.get(timeout=SAFETY) == "unset"
    assert (third.core_id, third.worker_id) == (first.core_id, first.worker_id)
    # Nor into the worker's own context: a plain callable run there later sees nothing.
    assert VAR.get() == "unset"


def test_concurrent_submitters_each_see_their_own_value(coord):
    start = threading.Barrier(4, timeout=SAFETY)
    seen: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def submitter(name):
        try:
            VAR.set(name)
            start.wait()
            tokens = [read() for _ in range(50)]
            seen[name] = [t.get(timeout=SAFETY) for t in tokens]
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=in_fresh_context, args=(submitter, f"thread-{i}")) for i in range(4)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(SAFETY)
    assert errors == []
    assert seen == {f"thread-{i}": [f"thread-{i}"] * 50 for i in range(4)}


# ----------------------------------------------------------------------------- chains, retries


def test_a_chain_step_runs_in_the_context_of_the_caller_of_then(coord, make_latch):
    latch = make_latch()

    @task_token_guard(operation_type="ctx_first_step")
    def first_step():
        latch.enter()
        VAR.set("set by the step before")
        return VAR.get()

    def next_step(before):
        return before, VAR.get()

    def body():
        VAR.set("at submit")
        first = first_step()
        VAR.set("at then")
        second = first.then(next_step)
        VAR.set("after then")
        assert latch.wait_entered(1)
        latch.release()
        return second.get(timeout=SAFETY)

    assert in_fresh_context(body) == ("set by the step before", "at then")


def test_each_retry_starts_from_the_submit_time_copy(coord):
    @task_token_guard(operation_type="ctx_retried", retries=2)
    def retried(seen):
        seen.append(VAR.get())
        VAR.set(f"set by attempt {current_token().attempts}")
        if current_token().attempts < 3:
            raise ConnectionError("again")
        return current_token().attempts

    def body():
        VAR.set("caller")
        seen: list[str] = []
        assert retried(seen).get(timeout=SAFETY) == 3
        return seen

    assert in_fresh_context(body) == ["caller", "caller", "caller"]


def test_copy_context_false_runs_without_the_callers_context(coord):
    @task_token_guard(operation_type="ctx_no_copy", copy_context=False)
    def no_copy():
        return VAR.get()

    def body():
        VAR.set("caller")
        return no_copy().get(timeout=SAFETY), read().get(timeout=SAFETY)

    assert in_fresh_context(body) == ("unset", "caller")


# ----------------------------------------------------------------------------- asyncio, Executor


def test_an_asyncio_task_awaiting_a_token_has_its_context_seen(coord):
    async def one(name):
        VAR.set(name)
        await asyncio.sleep(0)  # let the other task set its own value meanwhile
        return await read()

    async def main():
        VAR.set("main")
        results = await asyncio.gather(one("task a"), one("task b"))
        return results, VAR.get(), await read()

    assert in_fresh_context(asyncio.run, main()) == (["task a", "task b"], "main", "main")


@pytest.mark.parametrize("shared", [False, True], ids=["private", "shared"])
def test_executor_submit_propagates(make_coord, shared):
    coord = make_coord(cores=2, workers_per_core=2) if shared else None

    def body():
        VAR.set("submitter")
        with Executor(max_workers=8, coordinator=coord) as ex:  # no call held back
            futures = [ex.submit(VAR.get) for _ in range(4)]
            mapped = list(ex.map(lambda _: VAR.get(), range(3)))
            return [f.result(timeout=SAFETY) for f in futures], mapped

    assert in_fresh_context(body) == (["submitter"] * 4, ["submitter"] * 3)


def test_executor_call_held_by_max_workers_keeps_its_submitters_context(make_coord, make_latch):
    coord = make_coord(cores=2, workers_per_core=2)
    latch = make_latch()

    def first():
        latch.enter()
        VAR.set("set inside the first call")
        return VAR.get()

    def submit(ex, value, fn):
        VAR.set(value)
        return ex.submit(fn)

    with Executor(max_workers=1, coordinator=coord) as ex:
        a = in_fresh_context(submit, ex, "submitter a", first)
        assert latch.wait_entered(1)
        b = in_fresh_context(submit, ex, "submitter b", VAR.get)  # held: the one slot is busy
        assert b.token is None
        latch.release()
        assert a.result(timeout=SAFETY) == "set inside the first call"
        assert b.result(timeout=SAFETY) == "submitter b"
