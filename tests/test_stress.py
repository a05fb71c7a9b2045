"""Stress: many no-op tokens from 8 submitting threads while another thread kills random
submitted tokens and another runs drain()/resume() cycles.

Every task records its id; at the end every token is final, no id ran twice, no killed token
ran, ``executed + killed == submitted`` and ``stats()`` agrees.

The CI size is 100 000 tokens (``TOKENGATE_STRESS_TOKENS`` overrides it). The full
1 000 000-token run is ``test_stress_full``, marked ``stress`` and skipped unless
``TOKENGATE_STRESS_FULL=1``::

    TOKENGATE_STRESS_FULL=1 pytest tests/test_stress.py -m stress
"""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass, field

import pytest

from _support import SAFETY, wait_until
from tokengate import AdmissionClosed, OperationsCoordinator, TokenKilled, TokenState

CI_TOKENS = int(os.environ.get("TOKENGATE_STRESS_TOKENS", "100000"))
FULL_TOKENS = 1_000_000
SUBMITTERS = 8
DRAIN_CYCLES = 10
FULL = os.environ.get("TOKENGATE_STRESS_FULL") == "1"


class AdmissionGate:
    """Lets submitters wait, without sleeping, for the drainer's next resume().

    A submitter reads :attr:`generation` *before* it submits. If the submission raises
    ``AdmissionClosed``, some drain closed admission after that read or is still running, and
    its ``resume()`` has not been announced yet when the generation is unchanged; the drainer
    bumps the generation only *after* ``resume()``, so waiting for ``generation > seen`` never
    misses a reopening and never returns while that drain is still closed.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generation = 0

    @property
    def generation(self) -> int:
        with self._cond:
            return self._generation

    def reopened(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def wait_reopened(self, seen: int, timeout: float = SAFETY) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._generation > seen, timeout)


@dataclass
class Run:
    coord: OperationsCoordinator
    total: int
    #: ids the tasks ran (list.append is atomic); duplicates mean a token ran twice
    executed: list[int] = field(default_factory=list)
    #: (id, token) of every accepted submission, in acceptance order per thread
    submitted: list[tuple[int, object]] = field(default_factory=list)
    killed: set[int] = field(default_factory=set)
    kill_attempts: int = 0
    retries: int = 0
    drains: list[dict] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    gate: AdmissionGate = field(default_factory=AdmissionGate)
    submitters_done: threading.Event = field(default_factory=threading.Event)


def _run_stress(coord: OperationsCoordinator, total: int) -> Run:
    run = Run(coord, total)
    per_thread = total // SUBMITTERS
    assert per_thread * SUBMITTERS == total
    record = run.executed.append
    retries_lock = threading.Lock()

    def submitter(k: int) -> None:
        base = k * per_thread
        retries = 0
        try:
            for i in range(base, base + per_thread):
                while True:
                    seen = run.gate.generation
                    try:
                        token = coord.submit(record, i)
                    except AdmissionClosed:
                        retries += 1
                        assert run.gate.wait_reopened(seen), "admission never reopened"
                        continue
                    run.submitted.append((i, token))
                    break
        except BaseException as exc:
            run.errors.append(exc)
        finally:
            with retries_lock:
                run.retries += retries

    def killer() -> None:
        rng = random.Random(1234)
        try:
            while not run.submitters_done.is_set():
                # A yield, not a wait: a pure-Python loop would otherwise hold the GIL for
                # whole switch intervals and starve the submitters it is meant to race with.
                time.sleep(0)
                n = len(run.submitted)
                if n == 0:
                    continue
                # recent submissions are the ones most likely not to have started yet
                i, token = run.submitted[rng.randrange(max(0, n - 2000), n)]
                run.kill_attempts += 1
                if token.kill():
                    assert token.state is TokenState.KILLED
                    run.killed.add(i)
        except BaseException as exc:
            run.errors.append(exc)

    def drainer() -> None:
        try:
            for cycle in range(1, DRAIN_CYCLES + 1):
                threshold = total * cycle // (DRAIN_CYCLES + 1)
                ok = wait_until(
                    lambda t=threshold: len(run.submitted) >= t or run.submitters_done.is_set(),
                    timeout=120,
                )
                assert ok, "submitters made no progress"
                report = coord.drain(timeout=SAFETY)
                run.drains.append(report)
                assert not coord.admission_open
                coord.resume()
                run.gate.reopened()
        except BaseException as exc:
            run.errors.append(exc)
            coord.resume()
            run.gate.reopened()

    threads = [threading.Thread(target=submitter, args=(k,), name=f"submit-{k}") for k in range(8)]
    helpers = [
        threading.Thread(target=killer, name="killer"),
        threading.Thread(target=drainer, name="drainer"),
    ]
    for t in threads + helpers:
        t.start()
    for t in threads:
        t.join(600)
        assert not t.is_alive(), f"{t.name} did not finish"
    run.submitters_done.set()
    for t in helpers:
        t.join(600)
        assert not t.is_alive(), f"{t.name} did not finish"
    assert not run.errors, run.errors
    return run


def _check(run: Run) -> None:
    coord, total = run.coord, run.total
    report = coord.drain(timeout=120)
    assert not report["timed_out"] and report["remaining"] == 0, report
    coord.resume()

    # every drain that ran alongside the load finished every accepted token
    assert len(run.drains) == DRAIN_CYCLES
    for r in run.drains:
        assert r["timed_out"] is False and r["remaining"] == 0, r

    assert len(run.submitted) == total
    ids = [i for i, _ in run.submitted]
    assert len(set(ids)) == total

    states = {}
    for i, token in run.submitted:
        assert token.done(), (i, token.state)
        states[i] = token.state
    executed = run.executed
    executed_set = set(executed)
    assert len(executed) == len(executed_set), "a token ran twice"
    assert not (executed_set & run.killed), "a killed token ran"
    killed_states = {i for i, st in states.items() if st is TokenState.KILLED}
    assert killed_states == run.killed  # nobody else kills here
    assert executed_set | run.killed == set(ids)
    assert len(executed) + len(run.killed) == total
    for i, token in run.submitted:
        if i in run.killed:
            with pytest.raises(TokenKilled):
                token.get(timeout=0)
        else:
            assert states[i] is TokenState.COMPLETED
            assert token.get(timeout=0) is None  # list.append's result

    s = coord.stats()
    assert s["created"] == total
    assert s["completed"] == len(executed)
    assert s["killed"] == len(run.killed)
    assert s["failed"] == 0
    assert s["waiting"] == s["admitted"] == s["executing"] == 0
    assert s["illegal_transitions"] == 0

    coord.stop()
    assert coord.stats()["created"] == total
    assert len(executed) == len(executed_set)  # nothing ran late, after the checks


def _coord(make_coord) -> OperationsCoordinator:
    return make_coord(cores=2, workers_per_core=4, mailbox_capacity=64, pool_capacity=20_000)


@pytest.mark.timeout(180)
def test_stress_ci(make_coord):
    run = _run_stress(_coord(make_coord), CI_TOKENS)
    _check(run)
    # the side activities really happened alongside the submissions
    assert run.kill_attempts > 0
    print(
        f"\nstress: {CI_TOKENS} tokens, {len(run.killed)} killed of {run.kill_attempts} "
        f"attempts, {len(run.drains)} drains, {run.retries} AdmissionClosed retries"
    )


@pytest.mark.stress
@pytest.mark.timeout(1800)
@pytest.mark.skipif(not FULL, reason="1 000 000 tokens: set TOKENGATE_STRESS_FULL=1")
def test_stress_full(make_coord):
    run = _run_stress(_coord(make_coord), FULL_TOKENS)
    _check(run)
    assert run.kill_attempts > 0
    print(
        f"\nstress: {FULL_TOKENS} tokens, {len(run.killed)} killed of {run.kill_attempts} "
        f"attempts, {len(run.drains)} drains, {run.retries} AdmissionClosed retries"
    )
