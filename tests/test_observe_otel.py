"""OpenTelemetry tracing (issue #9): ``OperationsCoordinator(tracing=provider)`` makes one span
per attempt, parented on the submitter's current span (the token runs in a copy of the
submitter's context), current while the task runs, a span per retry, chain steps parented on
the step before, and no span at all with tracing off. The spans go to the SDK's
``InMemorySpanExporter`` through a ``SimpleSpanProcessor``, which exports a span when it ends:
the hook ends it before the attempt's outcome is stored, so once ``token.get()`` returned the
span of that attempt is in the exporter (an attempt whose token was settled while it ran ends
its span later: those tests wait for it).
"""

from __future__ import annotations

import sys
import threading

import pytest

pytest.importorskip("opentelemetry.sdk", reason="the tracing tests need opentelemetry-sdk")

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode

from _support import SAFETY, child_json, run_child, wait_until
from tokengate import (
    ConfigurationError,
    OperationsCoordinator,
    TaskWeight,
    TokenKilled,
    TokenState,
    TokenTimeout,
    current_token,
    task_token_guard,
)
from tokengate.observe import otel


class Tracing:
    """A TracerProvider exporting into memory, and the tracer the test's "caller" uses."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("test-caller")

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        found = self.exporter.get_finished_spans()
        return [s for s in found if name is None or s.name == name]

    def one(self, name: str) -> ReadableSpan:
        found = self.spans(name)
        assert len(found) == 1, [s.name for s in self.spans()]
        return found[0]

    def wait_for(self, name: str, n: int = 1) -> list[ReadableSpan]:
        assert wait_until(lambda: len(self.spans(name)) >= n), [s.name for s in self.spans()]
        return self.spans(name)


@pytest.fixture
def tracing():
    t = Tracing()
    yield t
    t.provider.shutdown()


@pytest.fixture
def traced(make_coord, tracing):
    """A started coordinator tracing into ``tracing``: 2 cores x 2 workers."""
    return make_coord(cores=2, workers_per_core=2, tracing=tracing.provider)


def parent_id(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


# ----------------------------------------------------------------------------- the functions


@task_token_guard(operation_type="otel_square", priority="high")
def square(x, *, plus=0):
    return x * x + plus


@task_token_guard(operation_type="otel_identity")
def identity(obj):
    return obj


@task_token_guard(operation_type="otel_nested")
def nested(provider):
    with provider.get_tracer("inside").start_as_current_span("inner") as inner:
        return inner.get_span_context().span_id


RAISED: list[BaseException] = []


@task_token_guard(operation_type="otel_boom")
def boom():
    exc = ValueError("boom 42")
    RAISED.append(exc)
    raise exc


class Abort(BaseException):
    """Not an Exception, as KeyboardInterrupt and SystemExit."""


@task_token_guard(operation_type="otel_abort")
def abort():
    raise Abort("stop here")


@task_token_guard(operation_type="otel_flaky", retries=3)
def flaky(fail_times):
    if current_token().attempts <= fail_times:
        raise ConnectionError(f"attempt {current_token().attempts}")
    return current_token().attempts


def step(x, k):
    return x * 10 + k


step2 = task_token_guard(operation_type="otel_step2")(step)
step3 = task_token_guard(operation_type="otel_step3")(step)
after_flaky = task_token_guard(operation_type="otel_after_flaky")(step)
never_runs = task_token_guard(operation_type="otel_never_runs")(step)


@task_token_guard(operation_type="otel_after_abandoned")
def after_abandoned(x, k):
    return f"{x}{k}"


# ----------------------------------------------------------------------------- the span


def test_span_is_a_child_of_the_callers_span_with_the_attributes(traced, tracing):
    with tracing.tracer.start_as_current_span("caller") as caller:
        token = square(7, plus=1)
        assert token.get(timeout=SAFETY) == 50
    span = tracing.one("otel_square")
    ctx = caller.get_span_context()
    assert span.context.trace_id == ctx.trace_id
    assert parent_id(span) == ctx.span_id
    assert span.kind is SpanKind.CONSUMER
    assert span.instrumentation_scope.name == "tokengate"
    assert span.status.status_code is StatusCode.UNSET
    attrs = dict(span.attributes)
    wait = attrs.pop("tokengate.queue_wait_s")
    assert attrs == {
        "messaging.system": "tokengate",
        "messaging.operation.type": "process",
        "messaging.destination.name": "otel_square",
        "messaging.message.id": str(token.token_id),
        "tokengate.token_id": token.token_id,
        "tokengate.operation": "otel_square",
        "tokengate.weight": "medium",
        "tokengate.priority": "high",
        "tokengate.core": token.core_id,
        "tokengate.worker": token.worker_id,
        "tokengate.attempt": 1,
        "tokengate.outcome": "completed",
    }
    assert token.core_id is not None and token.worker_id is not None
    assert isinstance(wait, float)
    assert 0.0 <= wait <= token.started_at - token.created_at + 1e-6
    # The span covers the attempt: it starts after the submission and ends before the caller
    # got the result (the clocks differ, so only the order within the span is checked).
    assert span.start_time <= span.end_time


def test_the_result_is_the_tasks_own_object(traced, tracing):
    obj = object()
    assert identity(obj).get(timeout=SAFETY) is obj
    assert tracing.one("otel_identity").attributes["tokengate.outcome"] == "completed"


def test_a_span_opened_in_the_task_is_a_child_of_the_token_span(traced, tracing):
    with tracing.tracer.start_as_current_span("caller") as caller:
        inner_id = nested(tracing.provider).get(timeout=SAFETY)
    token_span = tracing.one("otel_nested")
    inner = tracing.one("inner")
    assert inner.context.span_id == inner_id
    assert parent_id(inner) == token_span.context.span_id
    assert parent_id(token_span) == caller.get_span_context().span_id
    assert inner.context.trace_id == token_span.context.trace_id


def test_a_call_without_a_current_span_is_a_root_span(traced, tracing):
    assert trace.get_current_span() is trace.INVALID_SPAN
    first, second = square(2), square(3)
    assert (first.get(timeout=SAFETY), second.get(timeout=SAFETY)) == (4, 9)
    spans = tracing.spans("otel_square")
    assert len(spans) == 2
    assert all(s.parent is None for s in spans)
    assert spans[0].context.trace_id != spans[1].context.trace_id  # a trace each


def test_concurrent_submitters_each_parent_their_own_tokens(traced, tracing):
    ready = threading.Barrier(4, timeout=SAFETY)
    expected: dict[int, int] = {}  # token_id -> span id of the caller span it was made in
    lock = threading.Lock()

    def submitter(i):
        with tracing.tracer.start_as_current_span(f"caller-{i}") as caller:
            ready.wait()
            tokens = [square(i) for _ in range(20)]
            for t in tokens:
                t.get(timeout=SAFETY)
        with lock:
            for t in tokens:
                expected[t.token_id] = caller.get_span_context().span_id

    threads = [threading.Thread(target=submitter, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(SAFETY)
    assert len(expected) == 80
    spans = tracing.spans("otel_square")
    assert len(spans) == 80
    for s in spans:
        assert parent_id(s) == expected[s.attributes["tokengate.token_id"]]


# ----------------------------------------------------------------------------- failures


def test_a_failing_task_records_the_exception_and_the_caller_gets_it(traced, tracing):
    RAISED.clear()
    with tracing.tracer.start_as_current_span("caller") as caller:
        token = boom()
        with pytest.raises(ValueError, match="boom 42") as info:
            token.get(timeout=SAFETY)
    assert info.value is RAISED[0]
    assert token.exception() is RAISED[0]
    span = tracing.one("otel_boom")
    assert parent_id(span) == caller.get_span_context().span_id
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "ValueError: boom 42"
    assert span.attributes["tokengate.outcome"] == "failed"
    events = [e for e in span.events if e.name == "exception"]
    assert len(events) == 1
    assert events[0].attributes["exception.type"] == "ValueError"
    assert events[0].attributes["exception.message"] == "boom 42"


def test_a_base_exception_is_reraised_and_its_span_ends(traced, tracing):
    token = abort()
    with pytest.raises(Abort, match="stop here"):
        token.get(timeout=SAFETY)
    assert token.state is TokenState.FAILED
    span = tracing.one("otel_abort")
    assert span.end_time is not None
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["tokengate.outcome"] == "failed"
    assert [e.attributes["exception.type"] for e in span.events] == [f"{__name__}.Abort"]


def test_an_exception_whose_str_raises_still_reaches_the_caller(traced, tracing):
    class Odd(Exception):
        def __str__(self):
            raise RuntimeError("no str for you")

    raised = Odd()

    def task():
        raise raised

    token = traced.submit(task)
    assert token.exception(timeout=SAFETY) is raised
    span = tracing.wait_for(token.operation_type)[0]
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["tokengate.outcome"] == "failed"


# ----------------------------------------------------------------------------- retries, chains


def test_each_retry_is_a_span_of_its_own_with_the_same_parent(traced, tracing):
    with tracing.tracer.start_as_current_span("caller") as caller:
        token = flaky(2)
        assert token.get(timeout=SAFETY) == 3
    spans = sorted(tracing.spans("otel_flaky"), key=lambda s: s.attributes["tokengate.attempt"])
    assert [s.attributes["tokengate.attempt"] for s in spans] == [1, 2, 3]
    assert [s.attributes["tokengate.outcome"] for s in spans] == ["failed", "failed", "completed"]
    assert [s.status.status_code for s in spans] == [
        StatusCode.ERROR,
        StatusCode.ERROR,
        StatusCode.UNSET,
    ]
    assert {parent_id(s) for s in spans} == {caller.get_span_context().span_id}
    assert {s.attributes["tokengate.token_id"] for s in spans} == {token.token_id}
    assert len({s.context.span_id for s in spans}) == 3
    assert all(s.attributes["tokengate.queue_wait_s"] >= 0.0 for s in spans)


def test_chain_steps_are_children_of_the_step_before(traced, tracing):
    with tracing.tracer.start_as_current_span("caller") as caller:
        first = traced.submit(lambda: 1)
        second = first.then(step2, 2)
        third = second.then(step3, 3)
        assert third.get(timeout=SAFETY) == 123
    s1 = tracing.one(first.operation_type)
    s2 = tracing.one("otel_step2")
    s3 = tracing.one("otel_step3")
    assert parent_id(s1) == caller.get_span_context().span_id
    assert parent_id(s2) == s1.context.span_id
    assert parent_id(s3) == s2.context.span_id
    assert {s.context.trace_id for s in (s1, s2, s3)} == {caller.get_span_context().trace_id}
    assert s2.attributes["tokengate.previous_token_id"] == first.token_id
    assert s3.attributes["tokengate.previous_token_id"] == second.token_id
    assert "tokengate.previous_token_id" not in s1.attributes
    # The step is ready to run once the step before finished, not when then() was called.
    assert s2.attributes["tokengate.queue_wait_s"] <= second.started_at - first.finished_at + 1e-6


def test_a_chain_step_after_retries_is_a_child_of_the_last_attempt(traced, tracing):
    second = flaky(1).then(after_flaky, 5)
    assert second.get(timeout=SAFETY) == 25
    attempts = {s.attributes["tokengate.attempt"]: s for s in tracing.spans("otel_flaky")}
    assert sorted(attempts) == [1, 2]
    assert parent_id(tracing.one("otel_after_flaky")) == attempts[2].context.span_id


def test_a_failed_step_ends_its_chain_without_spans(traced, tracing):
    after = boom().then(never_runs, 1)
    with pytest.raises(ValueError):
        after.get(timeout=SAFETY)
    assert tracing.spans("otel_never_runs") == []
    assert len(tracing.spans("otel_boom")) == 1


# ----------------------------------------------------------------------------- settled meanwhile


def test_killed_while_running_is_outcome_killed(traced, tracing, make_latch):
    latch = make_latch()
    token = traced.submit(latch.enter)
    assert latch.wait_entered(1)
    assert token.kill()
    with pytest.raises(TokenKilled):
        token.get(timeout=SAFETY)
    latch.release()
    (span,) = tracing.wait_for(token.operation_type)
    assert span.attributes["tokengate.outcome"] == "killed"
    assert token.wait(SAFETY) and token.state is TokenState.KILLED


def test_timed_out_while_running_is_outcome_timed_out(traced, tracing, make_latch):
    latch = make_latch()

    @task_token_guard(operation_type="otel_slow", timeout=0.05)
    def slow():
        latch.enter()

    token = slow()
    with pytest.raises(TokenTimeout):
        token.get(timeout=SAFETY)
    latch.release()
    (span,) = tracing.wait_for("otel_slow")
    assert span.attributes["tokengate.outcome"] == "timed_out"
    assert span.status.status_code is StatusCode.ERROR


def test_an_attempt_abandoned_for_a_retry_is_timed_out(traced, tracing):
    second_started = threading.Event()
    token_done = threading.Event()

    @task_token_guard(
        operation_type="otel_hangs_once", timeout=0.05, retries=1, retry_on=TokenTimeout
    )
    def hangs_once():
        if current_token().attempts == 1:
            # Held until the retry ran and the token completed: this attempt's deadline
            # passes meanwhile, and it ends last.
            assert second_started.wait(SAFETY)
            assert token_done.wait(SAFETY)
            return "late"
        second_started.set()
        return "answer"

    with tracing.tracer.start_as_current_span("caller") as caller:
        token = hangs_once()
        token.add_done_callback(lambda _t: token_done.set())
        assert token.get(timeout=SAFETY) == "answer"
    spans = tracing.wait_for("otel_hangs_once", 2)
    by_attempt = {s.attributes["tokengate.attempt"]: s for s in spans}
    assert sorted(by_attempt) == [1, 2]
    assert by_attempt[1].attributes["tokengate.outcome"] == "timed_out"
    assert by_attempt[1].status.status_code is StatusCode.ERROR
    assert by_attempt[2].attributes["tokengate.outcome"] == "completed"
    assert parent_id(by_attempt[1]) == parent_id(by_attempt[2]) == caller.get_span_context().span_id
    # A step chained now follows the attempt that completed, not the abandoned one that
    # ended after it.
    assert token.then(after_abandoned, 1).get(timeout=SAFETY) == "answer1"
    assert parent_id(tracing.one("otel_after_abandoned")) == by_attempt[2].context.span_id


# ----------------------------------------------------------------------------- off, missing


def test_tracing_off_makes_no_span(make_coord, tracing):
    coord = make_coord(cores=2, workers_per_core=2)  # tracing=False, the default
    with tracing.tracer.start_as_current_span("caller") as caller:
        inner_id = nested(tracing.provider).get(timeout=SAFETY)
        assert square(3).get(timeout=SAFETY) == 9
        assert coord.submit(lambda: 1).get(timeout=SAFETY) == 1
    assert sorted(s.name for s in tracing.spans()) == ["caller", "inner"]
    # The context still crosses into the worker: a span the task opens is the caller's child.
    inner = tracing.one("inner")
    assert inner.context.span_id == inner_id
    assert parent_id(inner) == caller.get_span_context().span_id


def test_tracing_true_uses_the_global_tracer_provider(tmp_path):
    code, out, err = run_child(
        tmp_path,
        """
        import json
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )
        from tokengate import OperationsCoordinator, task_token_guard

        @task_token_guard(operation_type="global_op")
        def op():
            return 1

        exporter = InMemorySpanExporter()
        with OperationsCoordinator(cores=2, workers_per_core=1, tracing=True):
            # Set after the start: the hook's tracer follows the global provider.
            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(exporter))
            trace.set_tracer_provider(provider)
            with trace.get_tracer("caller").start_as_current_span("caller") as caller:
                op().get(timeout=20)
        spans = {s.name: s for s in exporter.get_finished_spans()}
        print("RESULT " + json.dumps({
            "names": sorted(spans),
            "parent_ok": spans["global_op"].parent.span_id
            == caller.get_span_context().span_id,
        }))
        """,
    )
    assert code == 0, err
    assert child_json(out) == {"names": ["caller", "global_op"], "parent_ok": True}


def test_without_opentelemetry_attempt_hook_says_which_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "opentelemetry" or m.startswith("opentelemetry.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with pytest.raises(ConfigurationError, match=r"pip install 'tokengate\[otel\]'"):
        otel.attempt_hook()


def test_a_provider_without_get_tracer_is_refused():
    with pytest.raises(ConfigurationError, match="TracerProvider"):
        otel.attempt_hook(object())  # type: ignore[arg-type]


def test_without_opentelemetry_tokengate_works_and_tracing_is_refused(tmp_path):
    # A fresh interpreter where `import opentelemetry` fails: tokengate (and this module)
    # import without it and never try to import it unless tracing is asked for.
    code, out, err = run_child(
        tmp_path,
        """
        import json, sys
        sys.modules["opentelemetry"] = None  # any `import opentelemetry...` fails now
        import tokengate
        import tokengate.observe.otel
        from tokengate import ConfigurationError, OperationsCoordinator, task_token_guard

        @task_token_guard(operation_type="plain")
        def plain():
            return 2

        with OperationsCoordinator(cores=1, workers_per_core=1) as coord:
            result = plain().get(timeout=20)
        error = None
        coord = None
        try:
            coord = OperationsCoordinator(cores=1, workers_per_core=1, tracing=True)
            coord.start()
        except ConfigurationError as exc:
            error = str(exc)
        finally:
            if coord is not None and coord.running:
                coord.stop()
        loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry") and sys.modules[m])
        print("RESULT " + json.dumps({"result": result, "error": error, "loaded": loaded}))
        """,
    )
    assert code == 0, err
    got = child_json(out)
    assert got["result"] == 2
    assert got["loaded"] == []
    assert got["error"] is not None and "pip install 'tokengate[otel]'" in got["error"]


# ------------------------------------------------------------------------- the coordinator


def test_tracing_is_an_argument_of_the_coordinator():
    import inspect

    params = inspect.signature(OperationsCoordinator).parameters
    assert "tracing" in params
    assert params["tracing"].default is False


# ----------------------------------------------------------------------------- the hook alone


class FakeToken:
    """What the hook reads of a TaskToken, for calling it without the core."""

    _next_id = 1000

    def __init__(self, operation: str = "fake_op") -> None:
        FakeToken._next_id += 1
        self.token_id = FakeToken._next_id
        self.operation_type = operation
        self.weight = TaskWeight.HEAVY
        self.priority = "low"
        self.attempts = 1
        self.core_id = 1
        self.worker_id = 0
        self.created_at = 10.0
        self.admitted_at = 10.5
        self.started_at = 11.0
        self.finished_at: float | None = None
        self.state = TokenState.EXECUTING


def test_the_hook_is_transparent(tracing):
    hook = otel.attempt_hook(tracing.provider)
    obj = object()
    assert hook(FakeToken(), lambda a, b=None: (a, b), (obj,), {"b": 2}, None) == (obj, 2)
    raised = KeyError("k")

    def fails():
        raise raised

    with pytest.raises(KeyError) as info:
        hook(FakeToken("fails"), fails, (), None, None)
    assert info.value is raised
    assert info.traceback[-1].name == "fails"  # the task's own frame is where it was raised
    assert trace.get_current_span() is trace.INVALID_SPAN  # the span is current only inside
    span = tracing.one("fake_op")
    assert span.attributes["tokengate.queue_wait_s"] == 1.0  # first attempt: since creation
    assert span.attributes["tokengate.weight"] == "heavy"
    assert span.attributes["tokengate.priority"] == "low"


def test_the_hook_times_a_retry_from_its_admission(tracing):
    hook = otel.attempt_hook(tracing.provider)
    token = FakeToken()
    token.attempts = 2
    hook(token, lambda: None, (), None, None)
    assert tracing.one("fake_op").attributes["tokengate.queue_wait_s"] == 0.5


def test_a_step_whose_predecessor_has_no_span_is_parented_on_the_current_span(tracing):
    hook = otel.attempt_hook(tracing.provider)
    before = FakeToken("never_traced")
    with tracing.tracer.start_as_current_span("caller") as caller:
        hook(FakeToken("step"), lambda: None, (), None, before)
    span = tracing.one("step")
    assert parent_id(span) == caller.get_span_context().span_id
    assert span.attributes["tokengate.previous_token_id"] == before.token_id
    assert list(span.links) == []


def test_a_step_links_a_current_span_of_another_trace(tracing):
    hook = otel.attempt_hook(tracing.provider)
    before = FakeToken("before")
    hook(before, lambda: None, (), None, None)  # a root span: a trace of its own
    with tracing.tracer.start_as_current_span("elsewhere") as elsewhere:
        hook(FakeToken("step"), lambda: None, (), None, before)
    first, second = tracing.one("before"), tracing.one("step")
    assert parent_id(second) == first.context.span_id
    assert second.context.trace_id == first.context.trace_id
    assert [link.context.span_id for link in second.links] == [elsewhere.get_span_context().span_id]
