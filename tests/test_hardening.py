"""Core hardening: what a hostile caller or an unusual task can do to the native core (huge
timeouts, fork inside a task, deep recursion, reference cycles, thread exhaustion, Ctrl-C in a
callback) ends in a clear error or the documented behaviour, never a panic, a hang or a leak."""

from __future__ import annotations

import copy
import gc
import pickle
import threading
import weakref
from pathlib import Path

import pytest

import tokengate
import tokengate._core as core
from _support import SAFETY, child_json, run_child
from tokengate import (
    ConfigurationError,
    GuardedFunction,
    TokenState,
    TokenTimeout,
    task_token_guard,
)

# ------------------------------------------------------------------ huge timeouts (defect 01)


@pytest.mark.parametrize("huge", [float("inf"), 1e300, 1e19, 2.0**64])
def test_huge_timeouts_mean_no_limit_in_the_core(make_coord, huge):
    """The native waits treat any timeout too long to represent as "no limit"; none of them
    panics, and nothing queued is lost."""
    coord = make_coord(cores=1, workers_per_core=1)
    rt = coord._rt
    assert rt is not None
    token = coord.submit(lambda: "done")
    assert token.get(timeout=huge) == "done"
    assert token.wait(timeout=huge) is True
    assert rt.wait_quiet(huge) is True
    report = coord.drain(timeout=huge)
    assert report["timed_out"] is False and report["remaining"] == 0
    coord.resume()
    assert coord.stop(timeout=huge) is True


def test_a_huge_submit_timeout_waits_for_room(make_coord):
    coord = make_coord(
        cores=1, workers_per_core=1, mailbox_capacity=1, pool_capacity=1, submit_timeout=1e300
    )
    coord.pause()
    first = coord.submit(int)  # the pool is full now: nothing is admitted while paused
    threading.Timer(0.2, coord.resume).start()
    second = coord.submit(str, "x")  # blocks until resume() frees room
    assert (first.get(timeout=SAFETY), second.get(timeout=SAFETY)) == (0, "x")


def test_tiny_timeouts_read_well_in_the_message(make_coord, make_latch):
    coord = make_coord(cores=1, workers_per_core=1)
    latch = make_latch()
    held = coord.submit(latch.enter)
    with pytest.raises(TokenTimeout) as info:
        held.get(timeout=1e-300)
    assert str(info.value).endswith("did not finish within 1e-300 s")
    with pytest.raises(TokenTimeout, match=r"within 0\.05 s$"):
        held.get(timeout=0.05)
    latch.release()


# ------------------------------------------------------------- fork inside a task (06, 07)


def test_a_task_that_forks_and_returns_in_the_child_ends_the_child(tmp_path):
    """The child (whose only thread is the worker) must not go back into the parent's worker
    loop: the queued tokens run once, in the parent, and the child exits by itself."""
    log = tmp_path / "runs.log"
    rc, out, err = run_child(
        tmp_path,
        f"""
        import json, logging, os, threading, time
        from tokengate import OperationsCoordinator
        logging.basicConfig()

        def record(tag):
            with open({str(log)!r}, "a") as f:
                f.write(f"{{tag}} {{os.getpid()}}\\n")
            return tag

        gate = threading.Event()

        def forker():
            gate.wait(10)
            pid = os.fork()
            return "child" if pid == 0 else pid

        with OperationsCoordinator(cores=1, workers_per_core=1) as coord:
            f = coord.submit(forker)
            later = [coord.submit(record, f"tok{{i}}") for i in range(3)]
            gate.set()
            pid = f.get(timeout=10)
            results = [t.get(timeout=10) for t in later]
            deadline = time.monotonic() + 10
            status = None
            while time.monotonic() < deadline:
                done, st = os.waitpid(pid, os.WNOHANG)
                if done:
                    status = os.waitstatus_to_exitcode(st)
                    break
                time.sleep(0.01)
            if status is None:
                os.kill(pid, 9)
        print("RESULT", json.dumps({{"results": results, "status": status,
                                     "parent": os.getpid()}}))
        """,
    )
    assert rc == 0, err
    r = child_json(out)
    assert r["results"] == ["tok0", "tok1", "tok2"]
    assert r["status"] == 0, "the child must exit by itself, with the task's status"
    runs = log.read_text().split()
    assert runs[1::2] == [str(r["parent"])] * 3, "queued tokens ran in the child too"
    assert "returned in the child process" in err


def test_the_core_shares_no_parking_lot_state_with_a_forked_child():
    """parking_lot keeps a process-wide table whose locks a parent thread may hold at fork
    time; a child contending any parking_lot lock then hangs. The core must not link it."""
    binary = Path(core.__file__).read_bytes()
    assert b"parking_lot" not in binary


@pytest.mark.timeout(120)
def test_forks_while_other_threads_wait_on_tokens_leave_working_children(tmp_path):
    rc, out, err = run_child(
        tmp_path,
        """
        import json, os, threading, time
        from tokengate import OperationsCoordinator

        coord = OperationsCoordinator(cores=2, workers_per_core=2).start()
        stop = threading.Event()

        def hammer():
            while not stop.is_set():
                for t in [coord.submit(int, "1") for _ in range(8)]:
                    t.get(timeout=30)

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        hung = 0
        for _ in range(40):
            pid = os.fork()
            if pid == 0:
                code = 3
                try:
                    with OperationsCoordinator(cores=2, workers_per_core=2) as c:
                        for _ in range(5):
                            for t in [c.submit(time.sleep, 0.0002) for _ in range(8)]:
                                t.get(timeout=20)
                    code = 0
                finally:
                    os._exit(code)
            deadline = time.monotonic() + 20
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    hung += os.waitstatus_to_exitcode(status) != 0
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    hung += 1
                    break
                time.sleep(0.002)
        stop.set()
        for t in threads:
            t.join()
        coord.stop()
        print("RESULT", json.dumps({"bad_children": hung}))
        """,
        timeout=110,
    )
    assert rc == 0, err
    assert child_json(out)["bad_children"] == 0


# --------------------------------------------------------------- worker stacks (defect 08)


def test_deep_recursion_a_thread_survives_also_survives_as_a_token(tmp_path):
    rc, out, err = run_child(
        tmp_path,
        """
        import sys
        from tokengate import OperationsCoordinator
        sys.setrecursionlimit(100_000)

        class Node:
            def __init__(self, n):
                self.child = Node(n - 1) if n else None

        def deep(n):
            Node(n)
            return "ok"

        with OperationsCoordinator(cores=1, workers_per_core=1) as c:
            print("RESULT", '"' + c.submit(deep, 4000).get(timeout=30) + '"')
        """,
    )
    assert rc == 0, f"worker crashed (rc={rc}): {err[-500:]}"
    assert child_json(out) == "ok"


def test_worker_stack_size_reaches_the_threads(make_coord):
    coord = make_coord(cores=1, workers_per_core=1, worker_stack_size=16 << 20)
    assert coord._rt is not None and coord._rt.worker_stack_size == 16 << 20
    with pytest.raises(ConfigurationError, match="worker_stack_size"):
        core.Runtime(cores=1, workers_per_core=1, worker_stack_size=1024)


# ------------------------------------------------------------ reference cycles (defect 09)


def test_cycles_through_submitted_and_decorated_functions_are_collected(make_coord):
    coord = make_coord(cores=1, workers_per_core=1)

    class Job:
        def run(self):
            return bytearray(1 << 16)

    def method_stored_on_its_object():
        j = Job()
        j.token = coord.submit(j.run)
        j.token.get(timeout=SAFETY)
        return weakref.ref(j)

    def closure_holding_its_token():
        box = []
        tok = coord.submit(lambda: len(box))
        box.append(tok)
        tok.get(timeout=SAFETY)
        return weakref.ref(tok)

    def decorated_recursive_closure():
        @task_token_guard
        def walk(n):
            return 0 if n == 0 else walk(n - 1).get()

        walk(2).get(timeout=SAFETY)
        return weakref.ref(walk)

    def class_with_a_decorated_method_using_class_cell():
        class K:
            @task_token_guard
            def m(self):
                return __class__

        assert K().m().get(timeout=SAFETY) is K
        return weakref.ref(K)

    refs = {
        f.__name__: f()
        for f in (
            method_stored_on_its_object,
            closure_holding_its_token,
            decorated_recursive_closure,
            class_with_a_decorated_method_using_class_cell,
        )
    }
    gc.collect()
    assert {name: r() is None for name, r in refs.items()} == dict.fromkeys(refs, True)


# ------------------------------------------------- a scale-up that cannot start threads (12)


def test_a_failed_scale_up_changes_nothing_and_a_retry_tries_again(tmp_path):
    rc, out, err = run_child(
        tmp_path,
        """
        import json, os, resource, time
        from tokengate import InternalError, OperationsCoordinator

        vm = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        c = OperationsCoordinator(cores=1, workers_per_core=1, max_workers_per_core=1024,
                                  pin_workers=False, worker_stack_size=8 << 20)
        c.start()
        resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), resource.RLIM_INFINITY))

        def threads():
            return sum(open(f"/proc/self/task/{t}/comm").read().startswith("tokengate-")
                       for t in os.listdir("/proc/self/task"))

        errors = []
        for _ in range(2):
            try:
                c.set_active_workers(1, 1024)
            except InternalError as e:
                errors.append(str(e))
        spawned = c.stats()["per_core"][0]["spawned_workers"]
        deadline = time.monotonic() + 10  # a thread just started may not have its name yet
        while threads() != spawned and time.monotonic() < deadline:
            time.sleep(0.01)
        r = {"errors": len(errors), "active": c.active_workers(1),
             "spawned": spawned, "real": threads(),
             "works": c.submit(int, "7").get(timeout=20)}
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY,) * 2)
        c.stop(timeout=20)
        print("RESULT", json.dumps(r))
        """,
    )
    assert rc == 0, err
    r = child_json(out)
    assert r["errors"] == 2, "the retry must try again (and fail again), not return silently"
    assert r["active"] == 1
    assert r["spawned"] == r["real"]
    assert r["works"] == 7


# ------------------------------------------------- Ctrl-C inside a done callback (defect 13)


def test_ctrl_c_in_a_callback_run_by_stop_reaches_the_caller(tmp_path):
    rc, out, err = run_child(
        tmp_path,
        """
        import json, os, signal, threading, time
        from tokengate import OperationsCoordinator

        c = OperationsCoordinator(cores=1, workers_per_core=1).start()
        c.pause()
        toks = [c.submit(int) for _ in range(3)]
        ran = []
        entered = threading.Event()

        def slow(tok):
            entered.set()
            ran.append(tok.token_id)
            time.sleep(0.3)

        for t in toks:
            t.add_done_callback(slow)

        def interrupt():
            entered.wait(10)
            os.kill(os.getpid(), signal.SIGINT)

        threading.Thread(target=interrupt).start()
        try:
            c.stop(wait=False)
            outcome = "returned"
        except KeyboardInterrupt:
            outcome = "interrupted"
        print("RESULT", json.dumps({"outcome": outcome, "ran": len(ran),
                                    "states": sorted({t.state.name for t in toks})}))
        """,
    )
    assert rc == 0, err
    r = child_json(out)
    assert r == {"outcome": "interrupted", "ran": 3, "states": ["KILLED"]}


# ------------------------------------------------------ GuardedFunction edges (14, 17c)


@pytest.mark.parametrize(("args", "what"), [((-1,), "weight"), ((1, 300), "priority")])
def test_guarded_function_indexes_are_checked(args, what):
    with pytest.raises(ConfigurationError, match=f"{what} index must be 0, 1 or 2"):
        GuardedFunction(len, "op", *args)


@task_token_guard(operation_type="module_level")
def module_level(x):
    return x + 1


def test_a_decorated_function_pickles_copies_and_weakrefs_like_a_function(make_coord):
    assert pickle.loads(pickle.dumps(module_level)) is module_level
    assert copy.deepcopy(module_level) is module_level
    assert weakref.ref(module_level)() is module_level
    make_coord(cores=1, workers_per_core=1)
    assert pickle.loads(pickle.dumps(module_level))(1).get(timeout=SAFETY) == 2

    @task_token_guard
    def local(x):
        return x

    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(local)


def test_stats_report_the_blocking_counters(make_coord):
    coord = make_coord(cores=1, workers_per_core=1)
    s = coord.stats()
    assert {"inline_runs", "blocked_waits", "spawn_failures"} <= s.keys()
    assert {"blocked_workers", "compensations", "uncompensated"} <= s["per_core"][0].keys()
    assert coord.submit(lambda: TokenState.COMPLETED).get(timeout=SAFETY) is TokenState.COMPLETED
    assert tokengate.TokenDeadlock.__mro__[1] is tokengate.TokenGateError


def test_the_collector_never_clears_the_function_of_a_queued_token(tmp_path):
    """A nested decorated function that refers to itself, dropped while one of its tokens is
    queued: its cycle is not collectable yet (the token still calls it)."""
    rc, out, err = run_child(
        tmp_path,
        """
        import gc, json
        from tokengate import OperationsCoordinator, task_token_guard

        def make():
            @task_token_guard(operation_type="walk")
            def walk(n, scale=10):
                return n * scale if walk is not None else -1
            return walk

        coord = OperationsCoordinator(cores=1, workers_per_core=1).start()
        coord.pause()
        tok = make()(3)
        gc.collect()
        coord.resume()
        print("RESULT", json.dumps(tok.get(timeout=10)))
        coord.stop()
        """,
    )
    assert rc == 0, f"rc={rc}: {err[-500:]}"
    assert child_json(out) == 30


def test_a_forked_task_waiting_in_the_child_touches_nothing_of_the_parent(tmp_path):
    """In the child of a task that forked, a timed wait on a fresh coordinator's token must not
    hand a place of the parent's runtime to a compensating worker (which would run the parent's
    queued tokens in the child)."""
    log = tmp_path / "runs.log"
    rc, out, err = run_child(
        tmp_path,
        f"""
        import json, os, threading
        from tokengate import OperationsCoordinator

        queued_in = threading.Event()

        def queued(i):
            with open({str(log)!r}, "a") as f:
                f.write(f"{{os.getpid()}}\\n")
            return i

        def forker():
            queued_in.wait(10)
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    with OperationsCoordinator(cores=1, workers_per_core=1) as c2:
                        code = 0 if c2.submit(int, "42").get(timeout=10) == 42 else 2
                finally:
                    os._exit(code)
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

        coord = OperationsCoordinator(cores=1, workers_per_core=1).start()
        f = coord.submit(forker)
        qs = [coord.submit(queued, i) for i in range(3)]
        queued_in.set()
        status = f.get(timeout=30)
        print("RESULT", json.dumps({{"child": status, "results": [q.get(timeout=10) for q in qs],
                                     "parent": os.getpid()}}))
        coord.stop()
        """,
    )
    assert rc == 0, err
    r = child_json(out)
    assert r["child"] == 0 and r["results"] == [0, 1, 2]
    assert log.read_text().split() == [str(r["parent"])] * 3


def test_a_transient_thread_shortage_does_not_break_the_core_for_good(tmp_path):
    rc, out, err = run_child(
        tmp_path,
        """
        import json, os, resource, time
        from tokengate import OperationsCoordinator

        c = OperationsCoordinator(cores=1, workers_per_core=1, pin_workers=False,
                                  worker_stack_size=64 << 20).start()
        vm = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")

        def nested():
            return c.submit(int, "5").get(timeout=1.0)

        # no room for another 64 MiB stack: the first wait's compensating worker cannot start
        resource.setrlimit(resource.RLIMIT_AS, (vm + (32 << 20), resource.RLIM_INFINITY))
        first = c.submit(nested)
        try:
            first_result = first.get(timeout=10)
        except Exception as e:
            first_result = type(e).__name__
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY,) * 2)
        second = c.submit(nested).get(timeout=10)
        c.set_active_workers(1, 3)

        def threads():
            return sum(open(f"/proc/self/task/{t}/comm").read().startswith("tokengate-")
                       for t in os.listdir("/proc/self/task"))

        spawned = c.stats()["per_core"][0]["spawned_workers"]
        deadline = time.monotonic() + 10  # a thread just started may not have its name yet
        while threads() != spawned and time.monotonic() < deadline:
            time.sleep(0.01)
        s = c.stats()
        print("RESULT", json.dumps({"first": first_result, "second": second,
                                    "threads": threads(), "failures": s["spawn_failures"],
                                    "spawned": s["per_core"][0]["spawned_workers"]}))
        c.stop(timeout=10)
        """,
    )
    assert rc == 0, err
    r = child_json(out)
    assert r["failures"] >= 1, r  # the shortage happened
    assert r["first"] == 5, r  # no compensating worker could start: the child ran inline
    assert r["second"] == 5  # and the core recovered once threads could start again
    assert r["threads"] >= 3 and r["spawned"] == r["threads"], r
