"""Affinity routing: heavy -> 1..N (prefers 1), medium -> 2..N, light -> 3..N."""

from __future__ import annotations

from collections import Counter

import pytest

from _support import wait_until
from tokengate import TaskWeight, task_token_guard


def allowed_cores(n: int, weight: str) -> set[int]:
    """The contract's affinity table, written out case by case."""
    if n == 1:
        return {1}
    if n == 2:
        return {"heavy": {1, 2}, "medium": {2}, "light": {2}}[weight]
    return {
        "heavy": set(range(1, n + 1)),
        "medium": set(range(2, n + 1)),
        "light": set(range(3, n + 1)),
    }[weight]


def test_affinity_table_spelled_out():
    # Guard against a wrong helper: the literal cases from the contract.
    for weight in ("heavy", "medium", "light"):
        assert allowed_cores(1, weight) == {1}
    assert allowed_cores(2, "heavy") == {1, 2}
    assert allowed_cores(2, "medium") == {2}
    assert allowed_cores(2, "light") == {2}
    assert allowed_cores(3, "light") == {3}
    assert allowed_cores(8, "medium") == {2, 3, 4, 5, 6, 7, 8}
    assert allowed_cores(8, "light") == {3, 4, 5, 6, 7, 8}


def _guarded(weight: str):
    @task_token_guard(operation_type=f"route_{weight}", tags={"weight": weight})
    def fn(i):
        return i

    return fn


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_routing_respects_affinity(make_coord, n):
    coord = make_coord(cores=n, workers_per_core=2)
    assert coord.cores == n
    per_weight = 60
    tokens = {w: [_guarded(w)(i) for i in range(per_weight)] for w in ("heavy", "medium", "light")}
    for w, toks in tokens.items():
        assert [t.get() for t in toks] == list(range(per_weight))
        cores_used = {t.core_id for t in toks}
        assert cores_used <= allowed_cores(n, w), (w, cores_used)
        assert all(t.weight is TaskWeight(w) for t in toks)
        assert all(0 <= t.worker_id < 2 for t in toks)

    stats = coord.stats()
    assert [c["core"] for c in stats["per_core"]] == list(range(1, n + 1))
    for i, core in enumerate(stats["per_core"]):
        core_no = i + 1
        for w, toks in tokens.items():
            expected = sum(1 for t in toks if t.core_id == core_no)
            assert core["routed"][w] == expected, (core_no, w, core["routed"])
            if core_no not in allowed_cores(n, w):
                assert core["routed"][w] == 0
    for w in tokens:
        assert sum(c["routed"][w] for c in stats["per_core"]) == per_weight


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_submit_routes_as_medium(make_coord, n):
    coord = make_coord(cores=n, workers_per_core=1)
    tokens = [coord.submit(lambda i=i: i) for i in range(20)]
    assert [t.get() for t in tokens] == list(range(20))
    assert {t.core_id for t in tokens} <= allowed_cores(n, "medium")
    routed = Counter()
    for core in coord.stats()["per_core"]:
        routed.update(core["routed"])
    assert routed["medium"] == 20
    assert routed["heavy"] == routed["light"] == 0


@pytest.mark.parametrize("n", [2, 3, 8])
def test_heavy_prefers_core_one_when_all_idle(make_coord, n):
    coord = make_coord(cores=n, workers_per_core=2)
    heavy = _guarded("heavy")

    def idle():
        return all(c["executing"] == 0 and c["queue_depth"] == 0 for c in coord.stats()["per_core"])

    for i in range(5):
        assert wait_until(idle, timeout=5)
        token = heavy(i)
        assert token.get() == i
        assert token.core_id == 1, f"round {i}: heavy went to core {token.core_id} while all idle"


@pytest.mark.parametrize(("n", "weight"), [(3, "heavy"), (8, "heavy"), (8, "medium"), (8, "light")])
def test_busy_core_is_avoided_for_an_idle_allowed_one(make_coord, make_latch, n, weight):
    """Least-loaded choice: with one worker per core, k held tokens occupy k distinct cores."""
    make_coord(cores=n, workers_per_core=1)
    latch = make_latch()
    fn = task_token_guard(operation_type=f"hold_{weight}", tags={"weight": weight})(latch.enter)
    allowed = allowed_cores(n, weight)
    tokens = []
    for k in range(1, len(allowed) + 1):
        tokens.append(fn())
        assert latch.wait_entered(k, timeout=5), (
            f"token {k} was not started although an allowed core was idle; "
            f"cores so far: {[t.core_id for t in tokens]}"
        )
    cores_used = [t.core_id for t in tokens]
    assert set(cores_used) == allowed
    assert len(cores_used) == len(set(cores_used))
    latch.release()
    for t in tokens:
        assert t.get() is None


def test_light_and_medium_never_touch_core_one_under_load(make_coord, make_latch):
    coord = make_coord(cores=3, workers_per_core=1)
    latch = make_latch()
    light = task_token_guard(tags={"weight": "light"})(latch.enter)
    medium = task_token_guard(tags={"weight": "medium"})(latch.enter)
    # Every allowed core busy and more queued: still never core 1 (nor 2 for light).
    held = [light() for _ in range(4)] + [medium() for _ in range(4)]
    assert latch.wait_entered(2, timeout=5)
    latch.release()
    for t in held:
        t.get()
    assert {t.core_id for t in held[:4]} == {3}
    assert {t.core_id for t in held[4:]} <= {2, 3}
    assert coord.stats()["per_core"][0]["routed"] == {"heavy": 0, "medium": 0, "light": 0}
