"""Workers on demand (the Rust monitor) and convergence (the control loop's policy).

Held tasks use latches (a ``threading.Event`` inside), never sleeps; the monitor and the
convergence loop are observed through ``stats()`` with ``wait_until``.
"""

from __future__ import annotations

import logging
import math

import pytest

from _support import wait_until
from tokengate import ConfigurationError, OperationsCoordinator, task_token_guard
from tokengate.policy.convergence import (
    ConvergenceOptions,
    CoreFigures,
    Trial,
    check_interval,
    decide,
    figures_from_stats,
    wait_percentile,
)


def _core(coord, core=1):
    return coord.stats()["per_core"][core - 1]


# -- on-demand growth ---------------------------------------------------------------------


def test_blocking_tasks_get_a_worker_each_up_to_max_workers_per_core(make_coord, make_latch):
    coord = make_coord(
        cores=1, workers_per_core=2, max_workers_per_core=5, convergence_interval=None
    )
    latch = make_latch()
    tokens = [coord.submit(latch.enter) for _ in range(5)]
    # two workers to begin with: the other three start only because the core grows
    assert latch.wait_entered(5), f"only {latch.entered} of 5 ran at once: {_core(coord)}"
    c = _core(coord)
    assert c["active_workers"] == 5
    assert c["grown_on_demand"] >= 1 and c["grown_workers"] == 3
    assert coord.stats()["growth"]["grown"] >= 1
    latch.release()
    assert [t.get(timeout=20) for t in tokens] == [None] * 5


def test_growth_never_exceeds_max_workers_per_core(make_coord, make_latch):
    coord = make_coord(
        cores=1, workers_per_core=1, max_workers_per_core=3, convergence_interval=None
    )
    latch = make_latch()
    tokens = [coord.submit(latch.enter) for _ in range(8)]
    assert latch.wait_entered(3)
    # let the monitor look again many times while five tokens still queue
    ticks = coord.stats()["growth"]["ticks"]
    assert wait_until(lambda: coord.stats()["growth"]["ticks"] >= ticks + 20)
    c = _core(coord)
    assert (c["active_workers"], c["spawned_workers"]) == (3, 3)
    assert latch.entered == 3
    assert c["queue_depth"] + c["pool_backlog"] == 5
    latch.release()
    for t in tokens:
        t.get(timeout=20)


def test_many_tiny_tasks_do_not_grow_the_pool(make_coord):
    coord = make_coord(cores=2, workers_per_core=2, convergence_interval=None)

    @task_token_guard(operation_type="tiny")
    def tiny(i):
        return i

    for _ in range(3):
        tokens = [tiny(i) for i in range(50_000)]
        assert sum(t.get(timeout=60) for t in tokens) == sum(range(50_000))
    s = coord.stats()
    assert s["growth"]["running"]
    assert s["growth"]["grown"] == 0, s["growth"]
    for c in s["per_core"]:
        assert (c["active_workers"], c["spawned_workers"], c["grown_on_demand"]) == (2, 2, 0)


def test_growth_keeps_the_affinity_rules(make_coord, make_latch):
    coord = make_coord(cores=3, workers_per_core=1, convergence_interval=None)
    latch = make_latch()

    @task_token_guard(operation_type="held_light", tags={"weight": "light"})
    def held_light():
        latch.enter()

    tokens = [held_light() for _ in range(4)]
    assert latch.wait_entered(4)
    s = coord.stats()["per_core"]
    assert s[2]["active_workers"] == 4 and s[2]["grown_on_demand"] >= 1
    assert s[0]["active_workers"] == 1 and s[1]["active_workers"] == 1, "light never on 1-2"
    latch.release()
    assert {t.get(timeout=20) or t.core_id for t in tokens} == {3}


def test_without_grow_on_demand_a_core_keeps_its_workers(make_coord, make_latch):
    coord = make_coord(cores=1, workers_per_core=1, grow_on_demand=False, convergence_interval=None)
    latch = make_latch()
    held = coord.submit(latch.enter)
    assert latch.wait_entered(1)
    queued = coord.submit(int, "3")
    s = coord.stats()
    assert not s["growth"]["enabled"] and not s["growth"]["running"]
    assert queued.wait(0.05) is False  # nothing else may run it
    latch.release()
    assert queued.get(timeout=20) == 3 and held.get(timeout=20) is None
    assert _core(coord)["active_workers"] == 1


# -- convergence --------------------------------------------------------------------------


def test_convergence_follows_the_load_up_and_down(make_coord, make_latch, caplog):
    caplog.set_level(logging.DEBUG, logger="tokengate")
    # without workers on demand the loop alone grows the core, one worker per round
    coord = make_coord(
        cores=1,
        workers_per_core=1,
        max_workers_per_core=4,
        grow_on_demand=False,
        convergence_interval=0.05,
    )
    latch = make_latch()
    tokens = [coord.submit(latch.enter) for _ in range(4)]
    assert latch.wait_entered(4), coord.stats()["convergence"]
    conv = coord.stats()["convergence"]
    assert conv["grown"] >= 3 and conv["shrunk"] == 0
    assert coord.active_workers(1) == 4
    latch.release()
    for t in tokens:
        t.get(timeout=20)
    # load gone: back down to one worker
    assert wait_until(lambda: coord.active_workers(1) == 1), coord.stats()["convergence"]
    conv = coord.stats()["convergence"]
    assert conv["shrunk"] >= 1
    assert conv["last"]["to"] == 1 and conv["last"]["core"] == 1
    assert conv["per_core"][1]["grown"] == conv["grown"]
    assert any("convergence: core 1 active workers" in r.getMessage() for r in caplog.records)
    assert all(r.levelno == logging.DEBUG for r in caplog.records if "convergence" in r.message)


def test_convergence_shrinks_a_core_grown_on_demand(make_coord, make_latch):
    coord = make_coord(
        cores=1, workers_per_core=2, max_workers_per_core=6, convergence_interval=0.05
    )
    latch = make_latch()
    tokens = [coord.submit(latch.enter) for _ in range(6)]
    assert latch.wait_entered(6)
    assert _core(coord)["grown_on_demand"] >= 1
    latch.release()
    for t in tokens:
        t.get(timeout=20)
    assert wait_until(lambda: coord.active_workers(1) == 1)
    assert coord.stats()["convergence"]["shrunk"] >= 1
    # the threads stay (parked) for the next burst, which grows the core again
    assert _core(coord)["spawned_workers"] == 6
    latch2 = make_latch()
    more = [coord.submit(latch2.enter) for _ in range(3)]
    assert latch2.wait_entered(3)
    latch2.release()
    for t in more:
        t.get(timeout=20)


def test_no_convergence_when_disabled(make_coord):
    for off in (None, 0, 0.0):
        coord = make_coord(cores=1, workers_per_core=2, convergence_interval=off)
        assert coord.submit(int, "1").get(timeout=20) == 1
        conv = coord.stats()["convergence"]
        assert conv["interval_s"] is None and conv["rounds"] == 0


@pytest.mark.parametrize("bad", [-1, -0.5, math.inf, math.nan, "5", True, [5]])
def test_convergence_interval_is_validated(bad):
    with pytest.raises(ConfigurationError, match="convergence_interval"):
        OperationsCoordinator(convergence_interval=bad)


def test_grow_on_demand_is_validated():
    with pytest.raises(ConfigurationError, match="grow_on_demand must be True or False"):
        OperationsCoordinator(grow_on_demand="yes")  # type: ignore[arg-type]


def test_check_interval():
    assert check_interval("x", 2) == 2.0
    assert check_interval("x", 0) is None
    assert check_interval("x", None) is None


# -- the pure policy ----------------------------------------------------------------------


def fig(**kw):
    base = dict(
        core=1, active=4, max_workers=8, busy_now=0, queued=0, avg_busy=0.0, wait_p95_s=None
    )
    base.update(kw)
    return CoreFigures(**base)


def test_an_idle_core_shrinks_to_the_floor():
    (d,) = decide([fig()])
    assert (d.target, d.reason) == (1, "light load")
    (d,) = decide([fig()], ConvergenceOptions(floor=2))
    assert d.target == 2


def test_a_lightly_loaded_core_keeps_what_it_uses_with_headroom():
    (d,) = decide([fig(active=8, avg_busy=2.0, busy_now=1)])
    assert d.target == 3  # ceil(2.0 * 1.5)
    (d,) = decide([fig(active=8, avg_busy=0.2, busy_now=3, queued=2, wait_p95_s=0.001)])
    assert d.target == 4  # the busy ones plus one for the queue
    (d,) = decide([fig(active=2, avg_busy=2.0, busy_now=2)])
    assert (d.target, d.reason) == (2, "steady"), "never grows without pressure"


def test_pressure_adds_one_worker_per_round_up_to_max():
    (d,) = decide([fig(active=4, busy_now=4, queued=10, avg_busy=4.0, wait_p95_s=0.02)])
    assert (d.target, d.reason) == (5, "pressure")
    assert d.trial.wait_s == 0.02
    (d,) = decide([fig(active=8, busy_now=8, queued=10, avg_busy=8.0, wait_p95_s=0.02)])
    assert d.target == 8
    # a short wait is no pressure
    (d,) = decide([fig(active=4, busy_now=4, queued=10, avg_busy=4.0, wait_p95_s=0.001)])
    assert d.target == 4


def test_a_stall_is_pressure():
    # nothing started during the interval, every worker busy, tokens queue
    (d,) = decide([fig(active=2, busy_now=2, queued=3, avg_busy=0.0, wait_p95_s=None)])
    assert (d.target, d.reason) == (3, "pressure")
    assert d.trial.wait_s == math.inf


def test_a_step_that_did_not_help_is_undone_and_held():
    f = fig(active=5, busy_now=5, queued=10, avg_busy=5.0, wait_p95_s=0.019)
    (d,) = decide([f], trials={1: Trial(0.02, queued=10)})
    assert d.target == 4 and d.reason.startswith("undo")
    assert d.trial == Trial(None, 0, 6)
    # while it holds, pressure changes nothing; then it tries again
    (d,) = decide([f], trials={1: d.trial})
    assert (d.target, d.trial.hold) == (5, 5)
    (d,) = decide([f], trials={1: Trial(None, 0, 1)})
    assert d.target == 6
    # a step that helped is kept and followed by another: a shorter wait, or a shorter queue
    (d,) = decide(
        [fig(active=5, busy_now=5, queued=10, wait_p95_s=0.01)], trials={1: Trial(0.02, 10)}
    )
    assert d.target == 6
    (d,) = decide([f], trials={1: Trial(0.019, 11)})
    assert d.target == 6
    # after a stall (infinite wait) any finite wait is progress
    (d,) = decide(
        [fig(active=3, busy_now=3, queued=2, wait_p95_s=0.5)], trials={1: Trial(math.inf, 2)}
    )
    assert d.target == 4


def test_targets_stay_between_floor_and_max():
    figs = [
        fig(core=c, active=a, max_workers=m, busy_now=b, queued=q, avg_busy=u, wait_p95_s=w)
        for c, (a, m, b, q, u, w) in enumerate(
            [(1, 1, 1, 5, 1.0, 1.0), (3, 3, 3, 9, 3.0, None), (6, 8, 0, 0, 0.0, None)], 1
        )
    ]
    for d, f in zip(decide(figs, ConvergenceOptions(floor=2)), figs, strict=True):
        assert min(2, f.max_workers) <= d.target <= f.max_workers


def test_wait_percentile_reads_log2_buckets():
    assert wait_percentile([0] * 24, 95) is None
    h = [0] * 24
    h[0] = 90  # under 1 us
    h[11] = 10  # [1024, 2048) us
    assert wait_percentile(h, 50) == 1e-6
    assert wait_percentile(h, 95) == 2048e-6


def test_figures_from_stats_take_the_interval_between_two_snapshots():
    def snap(busy_s, hist11, grown):
        h = [0] * 24
        h[11] = hist11
        return {
            "max_workers_per_core": 16,
            "per_core": [
                {
                    "core": 1,
                    "active_workers": 4,
                    "busy_workers": 3,
                    "queue_depth": 2,
                    "pool_backlog": 5,
                    "busy_seconds": busy_s,
                    "wait_histogram": h,
                    "grown_on_demand": grown,
                }
            ],
        }

    (f,) = figures_from_stats(snap(1.0, 4, 1), snap(3.0, 10, 3), 2.0)
    assert f == CoreFigures(
        core=1,
        active=4,
        max_workers=16,
        busy_now=3,
        queued=7,
        avg_busy=1.0,
        wait_p95_s=2048e-6,
        grown=2,
    )


def test_stats_carry_the_figures_convergence_reads(make_coord):
    coord = make_coord(cores=2, workers_per_core=1)
    assert coord.submit(int, "2").get(timeout=20) == 2
    s = coord.stats()
    assert s["max_workers_per_core"] == 64
    assert s["convergence"]["interval_s"] == 5.0
    assert set(s["growth"]) >= {"enabled", "running", "grown", "workers_added", "ticks"}
    c = s["per_core"][1]
    assert len(c["wait_histogram"]) == 24 and sum(c["wait_histogram"]) == 1
    assert c["busy_seconds"] > 0
    assert (c["busy_workers"], c["pool_backlog"], c["grown_on_demand"]) == (0, 0, 0)
    figures = figures_from_stats(s, coord.stats(), 1.0)
    assert [f.core for f in figures] == [1, 2]
