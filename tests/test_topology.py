"""Topology detection, the virtual-core -> CPU map, and worker pinning."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from tokengate import task_token_guard
from tokengate.topology import detect

ALLOWED = set(os.sched_getaffinity(0))


def test_detect_reports_the_machine():
    topo = detect()
    assert topo.logical_cores == psutil.cpu_count(logical=True)
    physical = psutil.cpu_count(logical=False)
    if physical is not None:
        assert topo.physical_cores == physical
    assert 1 <= topo.physical_cores <= topo.logical_cores
    assert isinstance(topo.smt, bool)
    assert topo.smt == (topo.logical_cores > topo.physical_cores)
    assert set(topo.allowed_cpus) == ALLOWED
    assert len(topo.allowed_cpus) == len(set(topo.allowed_cpus))


def test_recommended_workers():
    rec = detect().recommended_workers
    assert set(rec) == {"io_bound", "mixed", "cpu_bound"}
    assert all(isinstance(v, int) and v >= 1 for v in rec.values()), rec
    assert rec["cpu_bound"] <= rec["mixed"] <= rec["io_bound"], rec


def test_cli_prints_topology():
    topo = detect()
    proc = subprocess.run(
        [sys.executable, "-m", "tokengate", "topology"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.lower()
    assert "physical" in out
    assert "logical" in out
    assert str(topo.logical_cores) in out
    assert str(topo.physical_cores) in out


@pytest.mark.parametrize("cores", [1, len(ALLOWED), 8])
def test_cpu_map_uses_allowed_cpus(make_coord, cores):
    coord = make_coord(cores=cores, workers_per_core=1)
    assert coord.cores == cores
    assert len(coord.cpu_map) == cores
    assert set(coord.cpu_map) <= ALLOWED
    if cores >= len(ALLOWED):
        # more virtual cores than CPUs: every allowed CPU gets used
        assert set(coord.cpu_map) == ALLOWED


def _affinity():
    return frozenset(os.sched_getaffinity(0))  # pid 0: the calling (worker) thread


def test_pinned_workers_run_on_their_cores_cpu(make_coord):
    n = max(3, len(ALLOWED))
    coord = make_coord(cores=n, workers_per_core=1, pin_workers=True)
    fns = {
        w: task_token_guard(operation_type=f"aff_{w}", tags={"weight": w})(_affinity)
        for w in ("heavy", "medium", "light")
    }
    tokens = [fns[w]() for w in fns for _ in range(20)]
    for t in tokens:
        affinity = t.get()
        assert affinity == {coord.cpu_map[t.core_id - 1]}, (t.core_id, affinity, coord.cpu_map)


def test_unpinned_workers_keep_the_process_affinity(make_coord):
    coord = make_coord(cores=2, workers_per_core=1, pin_workers=False)
    tokens = [coord.submit(_affinity) for _ in range(10)]
    for t in tokens:
        assert t.get() == ALLOWED
