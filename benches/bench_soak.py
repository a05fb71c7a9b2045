"""Soak: a mixed workload for ``TOKENGATE_SOAK_SECONDS`` (default 600) seconds.

Run: ``pytest benches/bench_soak.py -q -s`` (``TOKENGATE_SOAK_SECONDS=60`` for a short run).
It is not part of ``pytest tests``.

The workload runs in *epochs* of about 30 s. Each epoch starts a coordinator (2 cores x 4
workers, small pool) and three submitter threads next to the main thread; every round mixes
light/medium/heavy decorated calls, tasks that raise, tokens killed right after submission, done
callbacks, nested submit-and-wait, pause/resume and drain/resume cycles (with a submitter hitting
``AdmissionClosed`` meanwhile). At the end of an epoch the submitters are joined and the
coordinator is stopped, so coordinator and thread churn are part of the soak too.

The RSS (psutil) and the thread count (``/proc/self/task``) are sampled every
``TOKENGATE_SOAK_INTERVAL`` seconds (default 5) at the end of a round, i.e. always at the same
point of the workload. After the warm-up (the first 10 % of the run, at least 1 sample, at most
60 s), the growth between the median of the first three samples and the median of the last three
must stay below 5 % for both series. The series and its summary are printed.
"""

from __future__ import annotations

import hashlib
import os
import random
import statistics
import threading
import time
from dataclasses import dataclass, field

import psutil
import pytest

from tokengate import (
    AdmissionClosed,
    OperationsCoordinator,
    TokenKilled,
    TokenState,
    task_token_guard,
)

DURATION = float(os.environ.get("TOKENGATE_SOAK_SECONDS", "600"))
INTERVAL = float(os.environ.get("TOKENGATE_SOAK_INTERVAL", "5"))
EPOCH = min(30.0, max(DURATION / 4, 1.0))
WARMUP = min(60.0, DURATION * 0.1)
MAX_GROWTH = 0.05
#: Stop early (and fail) past this RSS, so a leak cannot take the machine down.
MAX_RSS_MIB = float(os.environ.get("TOKENGATE_SOAK_MAX_RSS_MB", "2048"))
ROUND = 400  # tokens per round and submitter

_PAYLOAD = os.urandom(1024)


class Boom(Exception):
    pass


@task_token_guard(operation_type="soak_light", tags={"weight": "light"})
def light(i: int) -> int:
    return i


@task_token_guard(operation_type="soak_medium", tags={"weight": "medium"})
def medium(i: int) -> str:
    return hashlib.sha256(_PAYLOAD + i.to_bytes(8, "little")).hexdigest()


@task_token_guard(operation_type="soak_heavy", tags={"weight": "heavy"})
def heavy(i: int) -> int:
    return sum(range(i % 2000))


@task_token_guard(operation_type="soak_fail", tags={"weight": "medium"})
def failing(i: int) -> None:
    raise Boom(i)


@task_token_guard(operation_type="soak_nested", tags={"weight": "heavy"})
def nested(i: int) -> int:
    return light(i).get() + 1


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    killed: int = 0
    callbacks: int = 0
    rejected: int = 0

    def add(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)


def _expected(kind: str, i: int) -> object:
    if kind == "light":
        return i
    if kind == "medium":
        return hashlib.sha256(_PAYLOAD + i.to_bytes(8, "little")).hexdigest()
    if kind == "heavy":
        return sum(range(i % 2000))
    return i + 1  # nested


_KINDS = {"light": light, "medium": medium, "heavy": heavy, "nested": nested, "fail": failing}


def one_round(rng: random.Random, tally: Tally) -> None:
    """Submit a mixed batch, kill some, check every outcome."""
    batch = []
    cb_hits = [0]
    cb_lock = threading.Lock()

    def on_done(_token: object) -> None:
        with cb_lock:
            cb_hits[0] += 1

    kinds = rng.choices(list(_KINDS), weights=[40, 25, 15, 5, 15], k=ROUND)
    for kind in kinds:
        i = rng.randrange(1 << 30)
        token = _KINDS[kind](i)
        batch.append((kind, i, token))
    callbacks = 0
    for _, _, token in rng.sample(batch, ROUND // 10):
        token.add_done_callback(on_done)
        callbacks += 1
    for _, _, token in rng.sample(batch, ROUND // 20):
        token.kill()
    completed = failed = killed = 0
    for kind, i, token in batch:
        try:
            value = token.get(timeout=60)
        except TokenKilled:
            assert token.state is TokenState.KILLED
            killed += 1
        except Boom as exc:
            assert kind == "fail" and exc.args == (i,)
            failed += 1
        else:
            assert value == _expected(kind, i), (kind, i, value)
            completed += 1
    # callbacks run after the final state is visible; wait for the stragglers
    deadline = time.monotonic() + 60
    idle = threading.Event()
    while True:
        with cb_lock:
            if cb_hits[0] == callbacks:
                break
        assert time.monotonic() < deadline, "done callbacks did not all run"
        idle.wait(0.001)
    tally.add(
        submitted=ROUND, completed=completed, failed=failed, killed=killed, callbacks=callbacks
    )


def submitter(
    seed: int,
    stop: threading.Event,
    reopened: threading.Event,
    tally: Tally,
    errors: list[BaseException],
) -> None:
    rng = random.Random(seed)
    try:
        while not stop.is_set():
            try:
                one_round(rng, tally)
            except AdmissionClosed:
                # a drain is running on the main thread (which cleared `reopened` before it
                # closed admission): tokens already submitted in this round are finished by the
                # drain; wait until the main thread has resumed
                tally.add(rejected=1)
                reopened.wait()
    except BaseException as exc:  # reported by the main thread
        errors.append(exc)


def sample(proc: psutil.Process) -> tuple[float, int]:
    rss = proc.memory_info().rss / 2**20
    threads = len(os.listdir("/proc/self/task"))
    return rss, threads


def _print_series(series: list[tuple[float, float, int]]) -> None:
    print(f"\n{'t (s)':>7} {'RSS (MiB)':>10} {'threads':>8}")
    for t, rss, nthreads in series:
        print(f"{t:7.1f} {rss:10.1f} {nthreads:8d}")


@pytest.mark.timeout(DURATION + 600)
def test_soak_mixed_workload() -> None:
    proc = psutil.Process()
    rng = random.Random(20240601)
    tally = Tally()
    series: list[tuple[float, float, int]] = []  # (elapsed, rss MiB, threads)
    t0 = time.monotonic()
    next_sample = t0
    epochs = rounds = drains = pauses = 0
    end = t0 + DURATION

    while time.monotonic() < end:
        epochs += 1
        epoch_end = min(end, time.monotonic() + EPOCH)
        coord = OperationsCoordinator(cores=2, workers_per_core=4, pool_capacity=4096)
        coord.start()
        stop = threading.Event()
        reopened = threading.Event()
        reopened.set()
        errors: list[BaseException] = []
        threads = [
            threading.Thread(
                target=submitter,
                args=(rng.randrange(1 << 30), stop, reopened, tally, errors),
                name=f"soak-submitter-{k}",
            )
            for k in range(3)
        ]
        for t in threads:
            t.start()
        try:
            while time.monotonic() < epoch_end:
                rounds += 1
                one_round(rng, tally)
                if rounds % 7 == 0:
                    pauses += 1
                    coord.pause()
                    held = [light(k) for k in range(50)]
                    assert all(not t.done() or t.state is TokenState.COMPLETED for t in held)
                    coord.resume()
                    assert [t.get(timeout=60) for t in held] == list(range(50))
                if rounds % 11 == 0:
                    drains += 1
                    reopened.clear()
                    report = coord.drain(timeout=60)
                    assert not report["timed_out"], report
                    assert report["remaining"] == 0, report
                    coord.resume()
                    reopened.set()
                assert not errors, errors
                now = time.monotonic()
                if now >= next_sample:
                    rss, nthreads = sample(proc)
                    series.append((now - t0, rss, nthreads))
                    next_sample = now + INTERVAL
                    if rss > MAX_RSS_MIB:
                        _print_series(series)
                        pytest.fail(
                            f"RSS reached {rss:.0f} MiB after {now - t0:.0f} s "
                            f"(cap TOKENGATE_SOAK_MAX_RSS_MB={MAX_RSS_MIB:.0f}): leak"
                        )
        finally:
            stop.set()
            reopened.set()
            if coord.paused or not coord.admission_open:
                coord.resume()
            for t in threads:
                t.join(120)
            assert not any(t.is_alive() for t in threads), "a submitter did not finish"
            assert coord.stop(timeout=120)
        assert not errors, errors
        s = coord.stats()
        assert s["illegal_transitions"] == 0
        assert s["waiting"] == s["admitted"] == s["executing"] == 0
        assert s["created"] == s["completed"] + s["failed"] + s["killed"]

    elapsed = time.monotonic() - t0
    after = [row for row in series if row[0] >= WARMUP] or series[-1:]
    if len(after) < 2:
        after = series[-2:]
    head, tail = after[:3], after[-3:]
    rss_start = statistics.median(r[1] for r in head)
    rss_end = statistics.median(r[1] for r in tail)
    thr_start = statistics.median(r[2] for r in head)
    thr_end = statistics.median(r[2] for r in tail)
    rss_growth = (rss_end - rss_start) / rss_start
    thr_growth = (thr_end - thr_start) / thr_start

    print()
    print(
        f"soak: {elapsed:.0f} s, {epochs} epochs, {rounds} main rounds, {drains} drains, "
        f"{pauses} pauses, warm-up {WARMUP:.0f} s"
    )
    print(
        f"tokens: submitted {tally.submitted}, completed {tally.completed}, failed "
        f"{tally.failed}, killed {tally.killed}, callbacks {tally.callbacks}, "
        f"rounds cut by a drain {tally.rejected}"
    )
    _print_series(series)
    print(
        f"RSS after warm-up: {rss_start:.1f} MiB -> {rss_end:.1f} MiB "
        f"({rss_growth * 100:+.2f} %); min {min(r[1] for r in after):.1f}, "
        f"max {max(r[1] for r in after):.1f}"
    )
    print(f"threads after warm-up: {thr_start:.0f} -> {thr_end:.0f} ({thr_growth * 100:+.2f} %)")

    assert tally.submitted > 0
    assert tally.submitted == tally.completed + tally.failed + tally.killed
    assert rss_growth < MAX_GROWTH, f"RSS grew {rss_growth * 100:.2f} % after warm-up"
    assert thr_growth < MAX_GROWTH, f"thread count grew {thr_growth * 100:.2f} % after warm-up"
