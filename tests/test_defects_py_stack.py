"""``worker_stack_size``: workers get the stack a ``threading.Thread`` would get (by default
``threading.stack_size()`` if set, else the soft ``RLIMIT_STACK`` when finite and >= 2 MiB,
else 8 MiB), or the explicit size (64 KiB .. 1 GiB), so deep recursion that works in a thread
works in a task too instead of crashing the process."""

from __future__ import annotations

import ctypes
import resource
import subprocess
import sys
import textwrap
import threading

import pytest

from _support import SAFETY
from tokengate import ConfigurationError, OperationsCoordinator

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

_libc = ctypes.CDLL(None)
_libc.pthread_self.restype = ctypes.c_ulong


def _own_stack_size() -> int:
    """The stack size of the calling thread, as glibc reports it."""
    attr = ctypes.create_string_buffer(256)  # larger than any pthread_attr_t
    assert _libc.pthread_getattr_np(ctypes.c_ulong(_libc.pthread_self()), attr) == 0
    try:
        addr, size = ctypes.c_void_p(), ctypes.c_size_t()
        assert _libc.pthread_attr_getstack(attr, ctypes.byref(addr), ctypes.byref(size)) == 0
        return size.value
    finally:
        _libc.pthread_attr_destroy(attr)


def _configured(coord: OperationsCoordinator) -> int:
    rt = coord._rt
    assert rt is not None
    return rt.worker_stack_size


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bad", [2.0 * MiB, "8M", True, [MiB]])
def test_worker_stack_size_must_be_an_int(bad):
    with pytest.raises(ConfigurationError) as ei:
        OperationsCoordinator(cores=1, workers_per_core=1, worker_stack_size=bad)
    assert str(ei.value) == f"worker_stack_size must be an int, got {type(bad).__name__}"


@pytest.mark.parametrize("bad", [0, -1, 64 * KiB - 1, GiB + 1, 2**70])
def test_worker_stack_size_must_be_within_the_bounds(bad):
    with pytest.raises(ConfigurationError) as ei:
        OperationsCoordinator(cores=1, workers_per_core=1, worker_stack_size=bad)
    assert str(ei.value) == (f"worker_stack_size must be between 65536 and 1073741824, got {bad}")


# ----------------------------------------------------------------------------- explicit sizes


@pytest.mark.parametrize("size", [64 * KiB, 3 * MiB, 24 * MiB])
def test_an_explicit_size_reaches_the_worker_threads(make_coord, size):
    coord = make_coord(cores=1, workers_per_core=1, worker_stack_size=size)
    assert _configured(coord) == size
    measured = coord.submit(_own_stack_size).get(timeout=SAFETY)
    # glibc may hand out a cached, larger stack and keeps a guard page out of the count
    assert measured >= size - 64 * KiB


# ----------------------------------------------------------------------------- the default


@pytest.fixture
def thread_stack_size():
    """Sets ``threading.stack_size()`` for one test and restores it."""
    before = threading.stack_size()
    yield threading.stack_size
    threading.stack_size(before)


@pytest.fixture
def soft_stack_limit(monkeypatch):
    """Makes the soft RLIMIT_STACK read by the coordinator whatever the test says."""

    def set_soft(soft):
        real = resource.getrlimit

        def fake(which):
            if which == resource.RLIMIT_STACK:
                return soft, resource.RLIM_INFINITY
            return real(which)

        monkeypatch.setattr(resource, "getrlimit", fake)

    return set_soft


def test_the_default_follows_threading_stack_size(make_coord, thread_stack_size):
    thread_stack_size(12 * MiB)
    coord = make_coord(cores=1, workers_per_core=1)
    assert _configured(coord) == 12 * MiB
    assert coord.submit(_own_stack_size).get(timeout=SAFETY) >= 12 * MiB - 64 * KiB


@pytest.mark.parametrize(
    ("soft", "expected"),
    [
        (16 * MiB, 16 * MiB),  # finite and >= 2 MiB: used
        (2 * MiB, 2 * MiB),
        (resource.RLIM_INFINITY, 8 * MiB),  # unlimited: 8 MiB
        (1 * MiB, 8 * MiB),  # below 2 MiB: 8 MiB
        (4 * GiB, 1 * GiB),  # beyond the bounds: kept within them
    ],
    ids=["16MiB", "2MiB", "unlimited", "1MiB", "4GiB"],
)
def test_without_threading_stack_size_the_soft_rlimit_decides(
    make_coord, thread_stack_size, soft_stack_limit, soft, expected
):
    thread_stack_size(0)
    soft_stack_limit(soft)
    coord = make_coord(cores=1, workers_per_core=1)
    assert _configured(coord) == expected


def test_the_default_is_read_at_each_start(thread_stack_size):
    coord = OperationsCoordinator(cores=1, workers_per_core=1)
    thread_stack_size(4 * MiB)
    with coord:
        assert _configured(coord) == 4 * MiB
    thread_stack_size(6 * MiB)
    with coord:
        assert _configured(coord) == 6 * MiB


def test_an_explicit_size_wins_over_threading_stack_size(make_coord, thread_stack_size):
    thread_stack_size(12 * MiB)
    coord = make_coord(cores=1, workers_per_core=1, worker_stack_size=3 * MiB)
    assert _configured(coord) == 3 * MiB


# ----------------------------------------------------------------------------- end to end

#: Recursion through C frames (class instantiation) as deep recursive code does it, with the
#: recursion limit raised. About 4000 levels need more than 2 MiB of C stack on x86-64 Linux.
_DEEP = """
import sys, threading
from tokengate import OperationsCoordinator
sys.setrecursionlimit(100_000)
{setup}

class Tree:
    def __init__(self, depth):
        self.below = Tree(depth - 1) if depth else None

def grow(depth):
    Tree(depth)
    return depth

with OperationsCoordinator(cores=1, workers_per_core=1) as coord:
    print("GREW", coord.submit(grow, {depth}).get(timeout=60))
"""


@pytest.mark.parametrize(
    ("setup", "depth"),
    [("", 4000), ("threading.stack_size(32 * 2**20)", 12000)],
    ids=["default-8MiB", "threading-stack-size-32MiB"],
)
def test_deep_recursion_in_a_task_works_as_in_a_thread(setup, depth):
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_DEEP.format(setup=setup, depth=depth))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.splitlines() == [f"GREW {depth}"]
