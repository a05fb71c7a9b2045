"""Ctrl-C while stop() waits for running work still leaves nothing running behind."""

from __future__ import annotations

import subprocess
import sys
import textwrap

_CHILD = textwrap.dedent(
    """
    import os, signal, sys, threading
    from tokengate import CoordinatorNotRunning, OperationsCoordinator, task_token_guard

    release = threading.Event()

    @task_token_guard(operation_type="held")
    def held():
        release.wait(30)
        return 1

    coord = OperationsCoordinator(cores=1, workers_per_core=1, grow_on_demand=False).start()
    running = held()
    queued = [held() for _ in range(3)]
    main = threading.get_ident()

    def interrupt_inside_stop():
        idle = threading.Event()
        while True:  # until the main thread sits inside stop()'s wait
            frame = sys._current_frames().get(main)
            if frame is not None and frame.f_code.co_name == "stop":
                break
            idle.wait(0.001)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_inside_stop, daemon=True).start()
    try:
        coord.stop()
        print("NOT INTERRUPTED")
    except KeyboardInterrupt:
        print("INTERRUPTED", coord.running, [t.state.name for t in queued])
    try:
        held()
    except CoordinatorNotRunning:
        print("REFUSED")
    release.set()
    print("RUNNING", running.get(timeout=30))
    """
)


def test_ctrl_c_during_stop_kills_queued_work_and_unregisters():
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "INTERRUPTED False ['KILLED', 'KILLED', 'KILLED']" in lines, proc.stdout
    assert "REFUSED" in lines
    assert "RUNNING 1" in lines  # the token that was running finishes and its waiter sees it
