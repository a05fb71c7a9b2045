"""One test per row of docs/errors.md: trigger the error, check its class, its builtin base and a
stable part of its message. The row ids here and in the document must match one to one."""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import tokengate
import tokengate.errors
from _support import SAFETY, wait_until
from tokengate import (
    AdmissionClosed,
    ConfigurationError,
    CoordinatorForked,
    CoordinatorNotRunning,
    GuardedFunction,
    InternalError,
    InvalidDecoration,
    InvalidOption,
    InvalidTag,
    OperationsCoordinator,
    PoolFull,
    Retry,
    TokenCancelled,
    TokenDeadlock,
    TokenGateError,
    TokenKilled,
    TokenTimeout,
    task_token_guard,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "errors.md"


@dataclass
class Row:
    id: str
    cls: type[BaseException]
    base: type[BaseException]
    fragment: str
    trigger: Callable[[Any], Any]


@dataclass
class Ctx:
    make_coord: Callable[..., OperationsCoordinator]
    make_latch: Callable[..., Any]
    child: Callable[[str], dict]


# ----------------------------------------------------------------------------- triggers


def _decorated_without_coordinator(ctx):
    task_token_guard(operation_type="orphan")(lambda: 1)()


def _submit_before_start(ctx):
    OperationsCoordinator(cores=1, workers_per_core=1).submit(print)


def _stats_never_started(ctx):
    OperationsCoordinator(cores=1, workers_per_core=1).stats()


def _control_loop_not_running(ctx):
    OperationsCoordinator(cores=1, workers_per_core=1).loop  # noqa: B018


def _submit_after_drain(ctx):
    coord = ctx.make_coord(cores=1, workers_per_core=1)
    coord.drain(timeout=SAFETY)
    coord.submit(print)


def _pool_full_reject(ctx):
    coord = ctx.make_coord(cores=1, workers_per_core=1, pool_capacity=3, overflow="reject")
    coord.pause()
    for _ in range(3):
        coord.submit(print)
    coord.submit(print)


def _pool_full_timeout(ctx):
    coord = ctx.make_coord(cores=1, workers_per_core=1, pool_capacity=2, submit_timeout=0.01)
    coord.pause()
    for _ in range(2):
        coord.submit(print)
    coord.submit(print)


def _memory_budget_reject(ctx):
    coord = ctx.make_coord(cores=1, workers_per_core=1, memory_budget=4096, overflow="reject")
    coord.pause()
    coord.submit(len, b"x" * 3000)
    coord.submit(len, b"x" * 3000)


def _memory_budget_timeout(ctx):
    coord = ctx.make_coord(cores=1, workers_per_core=1, memory_budget=4096, submit_timeout=0.01)
    coord.pause()
    coord.submit(len, b"x" * 3000)
    coord.submit(len, b"x" * 3000)


def _chain_upstream_killed(ctx):
    coord = ctx.make_coord(cores=1, workers_per_core=1)
    coord.pause()
    first = coord.submit(print)
    second = first.then(print)
    assert first.kill()
    second.get(timeout=SAFETY)


def _get_killed(ctx):
    coord = ctx.make_coord(cores=1, workers_per_core=1)
    coord.pause()
    token = coord.submit(print)
    assert token.kill()
    token.get()


def _get_killed_running(ctx):
    coord = ctx.make_coord(cores=1, workers_per_core=1)
    latch = ctx.make_latch()
    token = coord.submit(latch.enter)
    assert latch.wait_entered(1)
    assert token.kill()  # CANCELLING: the waiters are released, the task still runs
    try:
        token.get(timeout=SAFETY)
    finally:
        latch.release()


def _own_timeout(ctx):
    ctx.make_coord(cores=1, workers_per_core=1)
    latch = ctx.make_latch()
    token = task_token_guard(operation_type="slow", timeout=0.01)(latch.enter)()
    try:
        token.get(timeout=SAFETY)
    finally:
        latch.release()


def _checkpoint_after_kill(ctx):
    coord = ctx.make_coord(cores=1, workers_per_core=1)
    started, killed, returned = threading.Event(), threading.Event(), threading.Event()
    box = {}

    def task():
        started.set()
        killed.wait(SAFETY)
        try:
            tokengate.checkpoint()
        except BaseException as exc:
            box["exc"] = exc
        finally:
            returned.set()

    token = coord.submit(task)
    assert started.wait(SAFETY)
    assert token.kill()
    killed.set()
    assert returned.wait(SAFETY)
    if "exc" in box:
        raise box["exc"]


def _retry_exhausted(ctx):
    ctx.make_coord(cores=1, workers_per_core=1)

    def poll():
        raise Retry(delay=0)

    token = task_token_guard(operation_type="poll", retries=1)(poll)()
    token.get(timeout=SAFETY)


def _unknown_option(ctx):
    task_token_guard(operation_type="typo")(print).options(priorty="high")


def _reprioritize_bad_id(ctx):
    coord = ctx.make_coord(cores=1, workers_per_core=1)
    coord.reprioritize("7", "high")


def _set_limit_bad_operation(ctx):
    coord = ctx.make_coord(cores=1, workers_per_core=1)
    coord.set_limit("", max_concurrency=1)


def _set_storage_limit_bad_tier(ctx):
    coord = ctx.make_coord(cores=1, workers_per_core=1)
    coord.set_storage_limit("WARP", 3)


def _get_timeout(ctx):
    ctx.make_coord(cores=1, workers_per_core=1)
    latch = ctx.make_latch()
    token = task_token_guard(operation_type="held")(latch.enter)()
    assert latch.wait_entered(1)
    token.get(timeout=0.01)


def _self_wait(ctx):
    coord = ctx.make_coord(cores=1, workers_per_core=1)
    coord.pause()  # so the task runs only once it can find its own token
    box = {}
    box["me"] = coord.submit(lambda: box["me"].get(timeout=SAFETY))
    coord.resume()
    box["me"].get(timeout=SAFETY)  # re-raises what the task's own wait raised


def _decorate(**kwargs):
    def trigger(ctx):
        task_token_guard(**kwargs)

    return trigger


def _decorate_coroutine(ctx):
    async def coro():
        return 1

    task_token_guard()(coro)


def _decorate_staticmethod(ctx):
    task_token_guard()(staticmethod(print))


def _decorate_non_callable(ctx):
    task_token_guard()(42)


def _config(**kwargs):
    def trigger(ctx):
        OperationsCoordinator(**kwargs)

    return trigger


def _executor(**kwargs):
    def trigger(ctx):
        tokengate.Executor(2, **kwargs)

    return trigger


def _wait_on(fn_name, tokens_of, **kwargs):
    def trigger(ctx):
        coord = ctx.make_coord(cores=1, workers_per_core=1)
        fn = getattr(tokengate, fn_name)
        result = fn(tokens_of(coord), **kwargs)
        if fn_name == "as_completed":
            list(result)

    return trigger


def _gather_timeout(ctx):
    coord = ctx.make_coord(cores=1, workers_per_core=1, grow_on_demand=False)
    release = threading.Event()
    try:
        tokengate.gather(coord.submit(release.wait, 20), coord.submit(int), timeout=0.01)
    finally:
        release.set()


def _stop_timeout_string(ctx):
    coord = ctx.make_coord(cores=1, workers_per_core=1)
    coord.stop(timeout="soon")


def _drain_negative(ctx):
    coord = ctx.make_coord(cores=1, workers_per_core=1)
    coord.drain(timeout=-1)


def _start_twice(ctx):
    coord = ctx.make_coord(cores=1, workers_per_core=1)
    coord.start()


def _bad_core(ctx):
    coord = ctx.make_coord(cores=2, workers_per_core=1)
    coord.set_active_workers(3, 1)


def _bad_active(ctx):
    coord = ctx.make_coord(cores=1, workers_per_core=2, max_workers_per_core=4)
    coord.set_active_workers(1, 5)


def _token_wait(method: str, timeout):
    def trigger(ctx):
        coord = ctx.make_coord(cores=1, workers_per_core=1)
        coord.pause()  # the token is not final, so the timeout is looked at
        token = coord.submit(print)
        getattr(token, method)(timeout=timeout)

    return trigger


def _guarded_bad_index(ctx):
    GuardedFunction(print, "x", 7)


def _panic(ctx):
    coord = ctx.make_coord(cores=1, workers_per_core=1)
    coord.pause()
    token = coord.submit(print)
    tokengate._core._debug_panic_on_run(token)
    coord.resume()
    token.get(timeout=SAFETY)


def _submit_non_callable(ctx):
    ctx.make_coord(cores=1, workers_per_core=1).submit(42)


def _callback_non_callable(ctx):
    token = ctx.make_coord(cores=1, workers_per_core=1).submit(print)
    token.add_done_callback(42)


def _guarded_non_callable(ctx):
    GuardedFunction(42, "x", 1)


def _run_control_non_coroutine(ctx):
    ctx.make_coord(cores=1, workers_per_core=1).run_control(42)


class _OddlyNamed:
    def __call__(self):
        return 1


def _decorate_unnamed(ctx):
    odd = _OddlyNamed()
    odd.__dict__["__qualname__"] = 42
    task_token_guard(odd)


_FORK_CHILD = """
import json, os, sys, threading
from tokengate import OperationsCoordinator, task_token_guard

coord = OperationsCoordinator(cores=1, workers_per_core=1)
coord.start()
pid = os.fork()
if pid == 0:
    out = {}
    def capture(name, fn):
        try:
            fn()
        except BaseException as exc:
            out[name] = {"cls": type(exc).__name__, "message": str(exc)}
    capture("forked", lambda: coord.submit(print))
    capture("forked-start", coord.start)
    print("RESULT " + json.dumps(out), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
coord.stop()
"""

_SPAWN_CHILD = """
import json, resource
from tokengate import OperationsCoordinator

# leave ~64 MiB of address space: thread stacks run out long before 256 workers start
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 64 * 2**20, resource.RLIM_INFINITY))
coord = OperationsCoordinator(cores=4, workers_per_core=64, pin_workers=False)
out = {}
try:
    coord.start()
except BaseException as exc:
    out["internal-spawn"] = {"cls": type(exc).__name__, "message": str(exc)}
print("RESULT " + json.dumps(out), flush=True)
"""


def _failing_op(ctx, name, **breaker):
    coord = ctx.make_coord(cores=1, workers_per_core=1)

    @task_token_guard(
        operation_type=name,
        circuit_breaker=tokengate.CircuitBreaker(min_calls=1, window=1, **breaker),
    )
    def f(gate=None):
        if gate is not None:
            gate.enter()
        raise ValueError("x")

    with pytest.raises(ValueError):
        f().get(timeout=SAFETY)
    return coord, f


def _breaker_open(ctx):
    _failing_op(ctx, "erows_open", open_duration=60)[1]()


def _breaker_half_open(ctx):
    coord, f = _failing_op(ctx, "erows_half", open_duration=0.01)
    assert wait_until(lambda: coord.guard_house.breaker_state("erows_half") == "half_open")
    latch = ctx.make_latch()
    f(latch)  # the probe: it holds the only place while it runs
    latch.wait_entered(1)
    f()


def _blocked_by_operator(ctx):
    coord = ctx.make_coord(cores=1, workers_per_core=1)
    coord.guard_house.block("erows_blocked")
    task_token_guard(operation_type="erows_blocked")(print)()


def _quarantined(ctx):
    ctx.make_coord(cores=1, workers_per_core=1)

    never = threading.Event()

    @task_token_guard(
        operation_type="erows_q", quarantine=tokengate.Quarantine(threshold=2, min_samples=4)
    )
    def f(items):
        never.wait(len(items) * 1e-5)  # costs time in proportion to its input
        return len(items)

    for n in (10, 100, 10, 100):
        f(list(range(n))).get(timeout=SAFETY)
    f(list(range(1_000_000))).get(timeout=SAFETY)


def _quarantine_no_record(ctx):
    ctx.make_coord(cores=1, workers_per_core=1).guard_house.quarantine.get("nope-1")


def _history_format(ctx):
    import tempfile

    from tokengate.guard.history import load

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"format": "other"}, f)
    load(f.name)


_DASK_CHILD = """
import json, os, signal, threading
import dask
from distributed import LocalCluster
from tokengate import OperationsCoordinator, task_token_guard
from tokengate.backends import DaskBackend

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def add(a, b):
    return a + b

def capture(out, name, fn):
    try:
        fn()
    except BaseException as exc:
        out[name] = {"cls": type(exc).__name__, "message": str(exc)}

if __name__ == "__main__":  # the cluster's worker processes import this file too
    out = {}
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                               host="127.0.0.1", dashboard_address="127.0.0.1:0",
                               silence_logs=50)
    with OperationsCoordinator(backend=DaskBackend(cluster)):
        add_t = task_token_guard(operation_type="add")(add)
        capture(out, "unpicklable-argument", lambda: add_t(1, threading.Lock()))
        die_t = task_token_guard(operation_type="die")(die)
        capture(out, "worker-lost", lambda: die_t().get(timeout=60))
    cluster.close()
    print("RESULT " + json.dumps(out), flush=True)
"""


def _unreachable_scheduler(ctx):
    from tokengate.backends import DaskBackend

    OperationsCoordinator(backend=DaskBackend("tcp://127.0.0.1:9", connect_timeout=1)).start()


def _in_child(script: str, row_id: str):
    def trigger(ctx):
        return ctx.child(script)[row_id]

    return trigger


ROWS = [
    Row(
        "not-running-decorated",
        CoordinatorNotRunning,
        RuntimeError,
        "no OperationsCoordinator is running: start one with",
        _decorated_without_coordinator,
    ),
    Row(
        "not-running-method",
        CoordinatorNotRunning,
        RuntimeError,
        "this OperationsCoordinator is not running: call start()",
        _submit_before_start,
    ),
    Row(
        "never-started",
        CoordinatorNotRunning,
        RuntimeError,
        "this OperationsCoordinator was never started",
        _stats_never_started,
    ),
    Row(
        "no-control-loop",
        CoordinatorNotRunning,
        RuntimeError,
        "the control loop runs only while the coordinator does",
        _control_loop_not_running,
    ),
    Row(
        "forked",
        CoordinatorForked,
        RuntimeError,
        "this coordinator was started before os.fork(): its workers live in the parent process",
        _in_child(_FORK_CHILD, "forked"),
    ),
    Row(
        "forked-start",
        CoordinatorForked,
        RuntimeError,
        "this coordinator was started before os.fork(); create a new OperationsCoordinator",
        _in_child(_FORK_CHILD, "forked-start"),
    ),
    Row(
        "admission-closed",
        AdmissionClosed,
        Exception,
        "admission is closed (drain() or stop() was called); call resume() to reopen it",
        _submit_after_drain,
    ),
    Row(
        "pool-full-reject",
        PoolFull,
        Exception,
        "token pool is full (pool_capacity=3) and overflow='reject'",
        _pool_full_reject,
    ),
    Row(
        "pool-full-timeout",
        PoolFull,
        Exception,
        "token pool is full (pool_capacity=2) and no room freed within submit_timeout=0.01 s",
        _pool_full_timeout,
    ),
    Row(
        "memory-budget-reject",
        PoolFull,
        Exception,
        "memory budget for queued work is full (memory_budget=4096 bytes, 3000 queued, this "
        "call's arguments about 3000) and overflow='reject'; raise memory_budget or use "
        "overflow='block'",
        _memory_budget_reject,
    ),
    Row(
        "memory-budget-timeout",
        PoolFull,
        Exception,
        "(memory_budget=4096 bytes, 3000 queued, this call's arguments about 3000) and no room "
        "freed within submit_timeout=0.01 s",
        _memory_budget_timeout,
    ),
    Row("killed", TokenKilled, Exception, "was killed before it ran", _get_killed),
    Row(
        "killed-running",
        TokenKilled,
        Exception,
        "was killed while it ran; its result is discarded",
        _get_killed_running,
    ),
    Row("timeout", TokenTimeout, TimeoutError, "(held) did not finish within 0.01 s", _get_timeout),
    Row(
        "token-timeout",
        TokenTimeout,
        TimeoutError,
        "(slow) timed out: its timeout of 0.01 s passed before it finished",
        _own_timeout,
    ),
    Row(
        "chain-upstream",
        TokenKilled,
        Exception,
        "did not run: token 1, the step before it in its chain, was killed",
        _chain_upstream_killed,
    ),
    Row(
        "checkpoint",
        TokenCancelled,
        Exception,
        "was killed: stop this task (checkpoint() raises until it returns)",
        _checkpoint_after_kill,
    ),
    Row("retry-exhausted", Retry, Exception, "retry requested (delay=0)", _retry_exhausted),
    Row(
        "deadlock",
        TokenDeadlock,
        RuntimeError,
        "waits on itself: a task cannot wait on its own token",
        _self_wait,
    ),
    Row(
        "tag-weight",
        InvalidTag,
        ValueError,
        "tags['weight'] must be one of 'light', 'medium', 'heavy' (any case), got 'huge'",
        _decorate(tags={"weight": "huge"}),
    ),
    Row(
        "tag-storage",
        InvalidTag,
        ValueError,
        "tags['storage_speed'] must be one of 'SLOW', 'MODERATE', 'FAST', 'INSANE'",
        _decorate(tags={"storage_speed": "warp"}),
    ),
    Row(
        "priority",
        ConfigurationError,
        ValueError,
        "priority must be one of 'high', 'normal', 'low' (any case), got 'urgent'",
        _decorate(priority="urgent"),
    ),
    Row(
        "tags-not-dict",
        InvalidTag,
        ValueError,
        "tags must be a dict (or None), got list",
        _decorate(tags=["weight"]),
    ),
    Row(
        "tag-name",
        InvalidTag,
        ValueError,
        "tag names must be strings, got 1",
        _decorate(tags={1: "x"}),
    ),
    Row(
        "operation-type",
        InvalidTag,
        ValueError,
        "operation_type must be a non-empty string or None, got '  '",
        _decorate(operation_type="  "),
    ),
    Row(
        "option-type",
        InvalidOption,
        TypeError,
        "retry_on must be an exception class or a tuple of them "
        "(e.g. (ConnectionError, TokenTimeout)), got 42",
        _decorate(retry_on=42),
    ),
    Row(
        "option-range",
        ConfigurationError,
        ValueError,
        "timeout must be a number of seconds > 0 or None, got 0",
        _decorate(timeout=0),
    ),
    Row(
        "unknown-option",
        InvalidOption,
        TypeError,
        "unknown option(s) 'priorty'; valid: circuit_breaker, copy_context, limit_by, "
        "max_concurrency, on_exhausted, predict, priority, quarantine,",
        _unknown_option,
    ),
    Row(
        "decorate-coroutine",
        InvalidDecoration,
        TypeError,
        "task_token_guard cannot guard the coroutine function",
        _decorate_coroutine,
    ),
    Row(
        "decorate-descriptor",
        InvalidDecoration,
        TypeError,
        "apply @task_token_guard below @staticmethod/@classmethod",
        _decorate_staticmethod,
    ),
    Row(
        "decorate-unnamed",
        InvalidDecoration,
        TypeError,
        "task_token_guard cannot name '_OddlyNamed' (__qualname__=42: not a non-blank str): "
        "pass operation_type='...'",
        _decorate_unnamed,
    ),
    Row(
        "decorate-non-callable",
        InvalidDecoration,
        TypeError,
        "task_token_guard needs a function, got int",
        _decorate_non_callable,
    ),
    Row(
        "config-int",
        ConfigurationError,
        ValueError,
        "workers_per_core must be an int, got float",
        _config(workers_per_core=2.0),
    ),
    Row(
        "config-range",
        ConfigurationError,
        ValueError,
        "cores must be between 1 and 4096, got 0",
        _config(cores=0),
    ),
    Row(
        "config-overflow",
        ConfigurationError,
        ValueError,
        "overflow must be 'block' or 'reject', got 'drop'",
        _config(overflow="drop"),
    ),
    Row(
        "config-seconds",
        ConfigurationError,
        ValueError,
        "timeout must be a number of seconds or None, got 'soon'",
        _stop_timeout_string,
    ),
    Row(
        "config-negative-seconds",
        ConfigurationError,
        ValueError,
        "timeout must be >= 0, got -1",
        _drain_negative,
    ),
    Row(
        "already-running",
        ConfigurationError,
        ValueError,
        "this coordinator is already running",
        _start_twice,
    ),
    Row(
        "core-range",
        ConfigurationError,
        ValueError,
        "core must be between 1 and 2, got 3",
        _bad_core,
    ),
    Row(
        "active-workers-range",
        ConfigurationError,
        ValueError,
        "active workers must be between 1 and 4 (max_workers_per_core), got 5",
        _bad_active,
    ),
    Row(
        "token-id",
        ConfigurationError,
        ValueError,
        "token_id must be a token id (an int >= 0), got '7'",
        _reprioritize_bad_id,
    ),
    Row(
        "limit-operation",
        ConfigurationError,
        ValueError,
        "operation must be a non-empty str, got ''",
        _set_limit_bad_operation,
    ),
    Row(
        "storage-tier",
        ConfigurationError,
        ValueError,
        "storage tier must be one of 'SLOW', 'MODERATE', 'FAST', 'INSANE', got",
        _set_storage_limit_bad_tier,
    ),
    Row(
        "token-timeout-value",
        ConfigurationError,
        ValueError,
        "timeout must be a number of seconds >= 0 or None, got -1",
        _token_wait("get", -1.0),
    ),
    Row(
        "guarded-index",
        ConfigurationError,
        ValueError,
        "weight index must be 0, 1 or 2, got 7",
        _guarded_bad_index,
    ),
    Row(
        "config-decorated-calls",
        ConfigurationError,
        ValueError,
        "decorated_calls must be True or False, got 1",
        _config(decorated_calls=1),
    ),
    Row(
        "config-mode",
        ConfigurationError,
        ValueError,
        "mode must be 'threads' or 'inline', got 'fast'",
        _config(mode="fast"),
    ),
    Row(
        "config-storage-limits",
        ConfigurationError,
        ValueError,
        "storage_limits: unknown tier 'WARP'; valid: SLOW, MODERATE, FAST, INSANE",
        _config(storage_limits={"WARP": 1}),
    ),
    Row(
        "executor-weight",
        ConfigurationError,
        ValueError,
        "weight must be one of 'light', 'medium', 'heavy' (any case), got 'huge'",
        _executor(weight="huge"),
    ),
    Row(
        "executor-priority",
        ConfigurationError,
        ValueError,
        "priority must be one of 'high', 'normal', 'low' (any case), got 'urgent'",
        _executor(priority="urgent"),
    ),
    Row(
        "executor-operation-type",
        ConfigurationError,
        ValueError,
        "operation_type must be a non-blank str or None, got ''",
        _executor(operation_type=""),
    ),
    Row(
        "wait-timeout",
        TokenTimeout,
        TimeoutError,
        "2 (of 2) tokens unfinished",
        _gather_timeout,
    ),
    Row(
        "internal-panic",
        InternalError,
        Exception,
        "internal error in the tokengate core while running token 1: ",
        _panic,
    ),
    Row(
        "internal-spawn",
        InternalError,
        Exception,
        "could not start a worker thread: ",
        _in_child(_SPAWN_CHILD, "internal-spawn"),
    ),
    Row(
        "submit-non-callable",
        TypeError,
        TypeError,
        "submit() needs a callable, got int",
        _submit_non_callable,
    ),
    Row(
        "callback-non-callable",
        TypeError,
        TypeError,
        "add_done_callback needs a callable, got int",
        _callback_non_callable,
    ),
    Row(
        "guarded-non-callable", TypeError, TypeError, "func must be callable", _guarded_non_callable
    ),
    Row(
        "timeout-type",
        TypeError,
        TypeError,
        "must be real number, not str",
        _token_wait("get", "soon"),
    ),
    Row(
        "executor-coordinator",
        TypeError,
        TypeError,
        "coordinator must be an OperationsCoordinator or None, got str",
        _executor(coordinator="mine"),
    ),
    Row(
        "wait-single-token",
        TypeError,
        TypeError,
        "wait() takes an iterable of TaskTokens, got a single TaskToken: pass [token]",
        _wait_on("wait", lambda c: c.submit(int)),
    ),
    Row(
        "wait-non-token",
        TypeError,
        TypeError,
        "as_completed() takes TaskTokens, got 42 (int) at position 1",
        _wait_on("as_completed", lambda c: [c.submit(int), 42]),
    ),
    Row(
        "wait-return-when",
        ValueError,
        ValueError,
        "Invalid return condition: 'SOON'",
        _wait_on("wait", lambda c: [c.submit(int)], return_when="SOON"),
    ),
    Row(
        "run-control-non-coroutine",
        TypeError,
        TypeError,
        "run_control() needs a coroutine object, got int",
        _run_control_non_coroutine,
    ),
    Row(
        "breaker-open",
        tokengate.MethodBlocked,
        TokenGateError,
        "operation 'erows_open' is blocked: its circuit breaker is open because 1 of 1 calls "
        "failed (100.0 %); it lets a probe call through in 60 s",
        _breaker_open,
    ),
    Row(
        "breaker-half-open",
        tokengate.MethodBlocked,
        TokenGateError,
        "operation 'erows_half' is blocked: its circuit breaker is half-open because 1 of 1 "
        "calls failed (100.0 %) and its probe calls are running; it closes once they succeed",
        _breaker_half_open,
    ),
    Row(
        "blocked-by-operator",
        tokengate.MethodBlocked,
        TokenGateError,
        "operation 'erows_blocked' is blocked by an operator; "
        "guard_house.unblock('erows_blocked') reopens it",
        _blocked_by_operator,
    ),
    Row(
        "quarantined",
        tokengate.TokenQuarantined,
        TokenGateError,
        "(erows_q) was quarantined: its arguments predict a cost far above the operation's "
        "baseline, so it did not run; release record ",
        _quarantined,
    ),
    Row(
        "quarantine-no-record",
        tokengate.QuarantineError,
        LookupError,
        "no quarantine record 'nope-1' in ",
        _quarantine_no_record,
    ),
    Row(
        "history-format",
        tokengate.HistoryFormatError,
        ValueError,
        "is not a history dump: its format is 'other', expected 'tokengate-history'",
        _history_format,
    ),
    Row(
        "backend-connect",
        tokengate.BackendError,
        Exception,
        "could not connect to the Dask scheduler at tcp://127.0.0.1:9",
        _unreachable_scheduler,
    ),
    Row(
        "unpicklable-argument",
        tokengate.UnpicklableArgument,
        TypeError,
        "argument 'b' (position 1) of 'add' cannot be pickled to send it to the Dask cluster",
        _in_child(_DASK_CHILD, "unpicklable-argument"),
    ),
    Row(
        "worker-lost",
        tokengate.WorkerLost,
        Exception,
        "attempt 1: the Dask worker it ran or waited on died",
        _in_child(_DASK_CHILD, "worker-lost"),
    ),
]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def child_results(tmp_path_factory) -> Callable[[str], dict]:
    """Runs each subprocess script once per module and caches what it printed."""
    cache: dict[str, dict] = {}

    def run(script: str) -> dict:
        if script not in cache:
            path = tmp_path_factory.mktemp("errors") / "child.py"
            path.write_text(textwrap.dedent(script))
            try:
                proc = subprocess.run(
                    [sys.executable, str(path)], capture_output=True, text=True, timeout=60
                )
            except subprocess.TimeoutExpired as exc:
                pytest.fail(f"child hung: {exc}")
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            assert proc.returncode == 0 and len(lines) == 1, (proc.stdout, proc.stderr)
            cache[script] = json.loads(lines[0][len("RESULT ") :])
        return cache[script]

    return run


@pytest.fixture
def ctx(make_coord, make_latch, child_results) -> Ctx:
    return Ctx(make_coord, make_latch, child_results)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_error_row(row: Row, ctx: Ctx):
    assert issubclass(row.cls, row.base)
    if issubclass(row.cls, TokenGateError):
        assert row.cls.__module__ == "tokengate.errors"
        assert getattr(tokengate, row.cls.__name__) is row.cls
    try:
        described = row.trigger(ctx)
    except BaseException as exc:
        assert type(exc) is row.cls, (type(exc), exc)
        assert isinstance(exc, row.base)
        assert isinstance(exc, TokenGateError) == issubclass(row.cls, TokenGateError)
        message = str(exc)
    else:
        # raised in a subprocess: compare what it reported
        assert described is not None, f"{row.id}: nothing was raised"
        assert described["cls"] == row.cls.__name__, described
        message = described["message"]
    assert row.fragment in message, (row.fragment, message)


def test_other_waits_check_the_timeout_value_too(make_coord):
    """``result``, ``exception`` and ``wait`` validate ``timeout`` like ``get`` (row
    ``token-timeout-value``)."""
    coord = make_coord(cores=1, workers_per_core=1)
    coord.pause()
    token = coord.submit(print)
    for method in ("result", "exception", "wait"):
        for bad in (-0.5, math.nan):
            with pytest.raises(ConfigurationError, match="timeout must be a number of seconds"):
                getattr(token, method)(timeout=bad)
    assert not token.done()


def test_run_control_when_not_running_is_row_no_control_loop():
    coord = OperationsCoordinator(cores=1, workers_per_core=1)
    coro = asyncio.sleep(0)
    try:
        with pytest.raises(CoordinatorNotRunning, match="the control loop runs only"):
            coord.run_control(coro)
    finally:
        coro.close()


def _doc_row_ids() -> list[str]:
    ids, in_rows = [], False
    for line in DOC.read_text().splitlines():
        if line.startswith("| row id |"):
            in_rows = True
            continue
        if not line.startswith("|"):
            in_rows = False
            continue
        m = re.match(r"\| `([a-z0-9-]+)` \|", line)
        if in_rows and m:
            ids.append(m.group(1))
    return ids


def test_the_document_and_the_tests_list_the_same_rows():
    doc_ids = _doc_row_ids()
    assert len(doc_ids) == len(set(doc_ids)), "duplicate row id in docs/errors.md"
    assert doc_ids == [r.id for r in ROWS]


def test_the_document_lists_every_error_class_with_its_base():
    text = DOC.read_text()
    classes = [getattr(tokengate.errors, name) for name in tokengate.errors.__all__]
    assert TokenGateError in classes and CoordinatorForked in classes
    for cls in classes:
        m = re.search(rf"^\| `{cls.__name__}` \| (.+) \|$", text, re.MULTILINE)
        assert m, f"{cls.__name__} is missing from the hierarchy table"
        assert issubclass(cls, TokenGateError)
        for base in (RuntimeError, TimeoutError, ValueError, TypeError):
            if base in cls.__bases__:
                assert f"`{base.__name__}`" in m.group(1), (cls, m.group(1))
        # every class that can be raised has at least one row (TokenGateError is the root)
        if cls is not TokenGateError:
            assert any(r.cls is cls for r in ROWS), f"no row raises {cls.__name__}"
