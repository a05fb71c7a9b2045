"""The invariant at quiescence (issue #7), over random mixes of every policy feature:

    created == completed + failed + killed + timed_out
    waiting == admitted == executing == held == 0

and the counters agree with the tokens themselves (each token's final state, its attempts).
"""

from __future__ import annotations

import threading
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokengate
from _support import SAFETY, wait_until
from tokengate import OperationsCoordinator, TokenCancelled, TokenState, task_token_guard

FINAL = (TokenState.COMPLETED, TokenState.FAILED, TokenState.KILLED, TokenState.TIMED_OUT)


def _until_cancelled():
    """A cooperative task: polls checkpoint() until its token is killed or timed out."""

    def cancelled():
        try:
            tokengate.checkpoint()
        except TokenCancelled:
            return True
        return False

    assert wait_until(cancelled)
    tokengate.checkpoint()  # raises


class Flaky:
    def __init__(self, fails):
        self.fails = fails
        self.lock = threading.Lock()
        self.calls = 0

    def __call__(self, *_):
        with self.lock:
            self.calls += 1
            n = self.calls
        if n <= self.fails:
            raise OSError(f"attempt {n}")
        return n


ok = task_token_guard(operation_type="inv_ok")(lambda i: i)
fail = task_token_guard(operation_type="inv_fail")(lambda i: 1 // 0)
slow_tier = task_token_guard(operation_type="inv_slow", tags={"storage_speed": "SLOW"})(lambda i: i)
limited = task_token_guard(operation_type="inv_limited", max_concurrency=1, limit_by="tenant")(
    lambda i: i
)
rated = task_token_guard(operation_type="inv_rate", rate_limit=400.0, rate_burst=2)(lambda i: i)
timed = task_token_guard(operation_type="inv_timeout", timeout=0.02)(lambda i: _until_cancelled())
killable = task_token_guard(operation_type="inv_kill")(lambda i: _until_cancelled())
low = task_token_guard(operation_type="inv_low", priority="low")(lambda i: i)

KINDS = [
    "ok",
    "fail",
    "flaky",
    "exhaust",
    "slow_tier",
    "limited",
    "rate",
    "timeout",
    "kill",
    "chain",
    "chain_fail",
    "low",
    "reprioritize",
]


def _submit(kind, i, coord):
    """Submit one item of the mix; returns the tokens it created."""
    if kind == "ok":
        return [ok(i)]
    if kind == "fail":
        return [fail(i)]
    if kind == "flaky":
        return [task_token_guard(operation_type="inv_flaky", retries=2)(Flaky(1))(i)]
    if kind == "exhaust":
        return [task_token_guard(operation_type="inv_exhaust", retries=1)(Flaky(9))(i)]
    if kind == "slow_tier":
        return [slow_tier(i)]
    if kind == "limited":
        return [limited.options(tags={"tenant": i % 3})(i)]
    if kind == "rate":
        return [rated(i)]
    if kind == "timeout":
        return [timed(i)]
    if kind == "kill":
        token = killable(i)
        token.kill()
        return [token]
    if kind == "chain":
        head = ok(i)
        return [head, head.then(lambda x: x + 1)]
    if kind == "chain_fail":
        head = fail(i)
        return [head, head.then(lambda x: x)]
    if kind == "low":
        return [low(i)]
    if kind == "reprioritize":
        token = ok(i)
        coord.reprioritize(token, "high")
        return [token]
    raise AssertionError(kind)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    mix=st.lists(st.sampled_from(KINDS), min_size=1, max_size=40),
    cores=st.integers(min_value=1, max_value=3),
    workers=st.integers(min_value=1, max_value=3),
)
def test_counters_balance_at_quiescence_for_any_mix(mix, cores, workers):
    coord = OperationsCoordinator(
        cores=cores, workers_per_core=workers, storage_limits={"SLOW": 1}
    ).start()
    try:
        tokens = []
        for i, kind in enumerate(mix):
            tokens.extend(_submit(kind, i, coord))
        for t in tokens:
            assert t.wait(SAFETY), t
        # settled is not quiet: killed/timed-out tasks may still be polling checkpoint()
        assert wait_until(lambda: all(t.state in FINAL for t in tokens)), tokens
        assert wait_until(
            lambda: (
                coord.stats()["executing"] == 0
                and coord.stats()["held"] == 0
                and coord.stats()["waiting"] == 0
                and coord.stats()["admitted"] == 0
            )
        ), coord.stats()
        s = coord.stats()
        by_state = Counter(t.state for t in tokens)
        assert s["created"] == len(tokens)
        assert s["created"] == s["completed"] + s["failed"] + s["killed"] + s["timed_out"], s
        assert s["completed"] == by_state[TokenState.COMPLETED]
        assert s["failed"] == by_state[TokenState.FAILED]
        assert s["killed"] == by_state[TokenState.KILLED]
        assert s["timed_out"] == by_state[TokenState.TIMED_OUT]
        assert s["retried"] == sum(max(0, t.attempts - 1) for t in tokens)
        assert s["storage"]["SLOW"]["running"] == s["storage"]["SLOW"]["held"] == 0
        for lim in s["limits"].values():
            assert lim["running"] == lim["held"] == 0
        # per kind: the outcome the mix asked for
        expected = {
            "ok": TokenState.COMPLETED,
            "fail": TokenState.FAILED,
            "flaky": TokenState.COMPLETED,
            "exhaust": TokenState.FAILED,
            "timeout": TokenState.TIMED_OUT,
            "kill": TokenState.KILLED,
        }
        by_op = {}
        for t in tokens:
            by_op.setdefault(t.operation_type, set()).add(t.state)
        for kind, state in expected.items():
            if f"inv_{kind}" in by_op:
                assert by_op[f"inv_{kind}"] == {state}, (kind, by_op[f"inv_{kind}"])
    finally:
        coord.stop(wait=False, timeout=SAFETY)
