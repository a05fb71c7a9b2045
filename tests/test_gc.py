"""Reference cycles through a token are collected (the token takes part in Python's GC)."""

from __future__ import annotations

import gc
import weakref

from tokengate import task_token_guard


class Payload:
    """Something a frame holds while it waits on a token."""


@task_token_guard(operation_type="gc_fail")
def fail() -> None:
    raise ValueError("expected")


@task_token_guard(operation_type="gc_echo")
def echo(x: object) -> object:
    return x


def test_failed_get_inside_a_frame_does_not_leak(coord):
    # Re-raising the stored exception appends the waiting frame to its traceback:
    # token -> exception -> traceback -> frame -> token. The collector must break it.
    def wait_in_a_frame() -> weakref.ref[Payload]:
        payload = Payload()
        token = fail()
        try:
            token.get()
        except ValueError:
            pass
        return weakref.ref(payload)

    refs = [wait_in_a_frame() for _ in range(20)]
    gc.collect()
    assert all(r() is None for r in refs)


def test_result_that_references_its_token_is_collected(coord):
    holder: list[object] = []
    token = echo(holder)
    assert token.get() is holder
    holder.append(token)  # token -> result -> token
    payload = Payload()
    holder.append(payload)
    ref = weakref.ref(payload)
    del token, holder, payload
    gc.collect()
    assert ref() is None


def test_pending_callback_cycle_is_collected(coord):
    payload = Payload()
    ref = weakref.ref(payload)
    token = echo(1)
    token.get()

    def on_done(t: object, keep: Payload = payload) -> None:
        pass

    # A callback added to a finished token runs at once and is not kept.
    token.add_done_callback(on_done)
    del token, on_done, payload
    gc.collect()
    assert ref() is None
