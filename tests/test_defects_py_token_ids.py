"""Token ids are unique and increasing per coordinator, also across ``stop()`` + ``start()``
of the same ``OperationsCoordinator`` (each run continues where the previous one ended)."""

from __future__ import annotations

import threading

from _support import SAFETY, wait_until
from tokengate import OperationsCoordinator, TokenState, task_token_guard


@task_token_guard(operation_type="ids_probe")
def _probe(x):
    return x


def test_ids_continue_after_a_restart():
    coord = OperationsCoordinator(cores=1, workers_per_core=1)
    seen = []
    for _run in range(3):
        with coord:
            tokens = [coord.submit(abs, -i) for i in range(4)] + [_probe(7)]
            for token in tokens:
                token.get(timeout=SAFETY)
            seen.extend(t.token_id for t in tokens)
    assert seen == list(range(1, 16))


def test_ids_continue_after_tokens_were_killed_and_refused(make_coord):
    coord = make_coord(cores=1, workers_per_core=1)
    coord.pause()
    killed = [coord.submit(int) for _ in range(3)]
    assert coord.stop(wait=False) is True
    assert [t.state for t in killed] == [TokenState.KILLED] * 3
    coord.start()
    after = coord.submit(int)
    assert after.get(timeout=SAFETY) == 0
    assert after.token_id > max(t.token_id for t in killed)


def test_a_new_coordinator_starts_at_one(make_coord):
    first = make_coord(cores=1, workers_per_core=1)
    for _ in range(5):
        first.submit(int)
    first.stop()
    other = make_coord(cores=1, workers_per_core=1)
    assert other.submit(int).token_id == 1


def test_restarting_while_a_stop_is_in_progress_keeps_ids_unique(make_coord, make_latch):
    """start() after stop() has begun but before it finished: the new run's ids are above
    every id the old run handed out."""
    coord = make_coord(cores=1, workers_per_core=1)
    latch = make_latch()
    held = coord.submit(latch.enter)
    assert latch.wait_entered(1)
    queued = [coord.submit(int) for _ in range(3)]
    stopper = threading.Thread(target=coord.stop)
    stopper.start()
    assert wait_until(lambda: not coord.running)  # that stop() has begun
    coord.start()  # the old runtime is still finishing its queue
    fresh = coord.submit(int)
    latch.release()
    stopper.join(SAFETY)
    assert not stopper.is_alive()
    old_ids = [held.token_id] + [t.token_id for t in queued]
    assert fresh.token_id > max(old_ids)
    assert fresh.get(timeout=SAFETY) == 0
