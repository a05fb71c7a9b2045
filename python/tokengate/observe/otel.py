"""OpenTelemetry tracing of TokenGate tokens: one span per attempt.

Enabling it
-----------
``OperationsCoordinator(tracing=True)`` traces with the global tracer provider
(``opentelemetry.trace.set_tracer_provider``; set it before or after the start, the tracer
follows it); ``OperationsCoordinator(tracing=provider)`` uses that ``TracerProvider``. Either
needs the OpenTelemetry API, ``pip install 'tokengate[otel]'``; exporting the spans anywhere
needs an SDK and an exporter, configured as for any other OpenTelemetry instrumentation. This
module is the only place TokenGate imports ``opentelemetry``, and only once tracing is asked
for. At each start the coordinator installs :func:`attempt_hook`'s hook in the core, which then
runs every attempt of every token through it.

What a span carries
-------------------
One span per attempt, named after the token's operation (``token.operation_type``), of kind
``CONSUMER``, with the messaging semantic conventions where they fit: ``messaging.system =
"tokengate"``, ``messaging.operation.type = "process"``, ``messaging.destination.name`` (the
operation) and ``messaging.message.id`` (the token id, as a string); and TokenGate's own
attributes: ``tokengate.token_id``, ``tokengate.operation``, ``tokengate.weight`` (``heavy``,
``medium``, ``light``), ``tokengate.priority`` (``high``, ``normal``, ``low``),
``tokengate.core`` (1-based) and ``tokengate.worker`` (0-based) when the token runs on a
worker, ``tokengate.attempt`` (1 for the first attempt, 2 for the first retry, ...),
``tokengate.queue_wait_s`` (seconds between the attempt becoming ready to run and its start:
from the token's creation for a first attempt, from the end of the step before for a chain
step, from its admission back into a mailbox for a retry, so a retry delay is not counted as
queueing; missing on a retry run again in its caller, ``mode="inline"``),
``tokengate.previous_token_id`` on a chain step, and, when the attempt ends,
``tokengate.outcome``: ``completed``, ``failed``, ``timed_out`` (the token's timeout passed
while it ran, including an attempt abandoned for a retry when ``retry_on`` names
``TokenTimeout``) or ``killed`` (``token.kill()`` while it ran). A failing attempt records
its exception as a span event and sets the status to ERROR (as does a timeout); the exception
itself goes on to the core unchanged, the same object (the hook adds one traceback frame).

The span's parent is the submitter's current span: a token runs in a copy of its submitter's
``contextvars`` context, so a call made inside ``tracer.start_as_current_span("request")``
yields a child of "request" in the same trace, although it runs on a worker thread. A call
made without a current span starts a new trace. The span is current while the task runs, so
the spans the task opens (or the instrumented libraries it calls) are its children.

Retries and chains
------------------
Each attempt is a span of its own, with the same parent and ``tokengate.attempt`` 1, 2, ...:
OpenTelemetry's convention for a resent request (HTTP clients give every resend its own span
with ``http.request.resend_count``), and what shows where the time of a retried token went.
A chain step (``token.then(f)``) is a child of the span of the last attempt of the step before
it, so ``a.then(b).then(c)`` reads as a -> b -> c in the trace; when the current context at the
step's start holds a span of another trace, the step's span links to it. A step whose
predecessor has no span (it ran before tracing was on) is parented like any call.

What has no span
----------------
Only attempts that start have spans: a token killed or timed out while queued, a call refused
by an open breaker (``MethodBlocked``), a quarantined call and a chain step ended by the
failure of the step before never run, so they have none (the lifecycle events of
``coordinator.events`` and the metrics count them).

Cost
----
One Python call and one span per attempt (the core calls the hook instead of the task, and
the hook calls the task), plus whatever the tracer provider's processors do with the span;
with tracing off (the default) the core makes no Python call at all. The lead's benchmark
(``python -m tokengate.bench``) measures the per-token cost of ``tracing=True``.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias

from .._core import TaskToken
from .._core import __version__ as _version
from .._types import TokenState
from ..errors import ConfigurationError

if TYPE_CHECKING:
    from opentelemetry.trace import SpanContext, TracerProvider

__all__ = ["AttemptHook", "attempt_hook"]

log = logging.getLogger("tokengate.observe")

#: What the core calls per attempt: ``hook(token, func, args, kwargs, previous)``.
AttemptHook: TypeAlias = Callable[
    [TaskToken, Callable[..., Any], tuple[Any, ...], dict[str, Any] | None, TaskToken | None],
    Any,
]

_INSTALL = "pip install 'tokengate[otel]'"
_EXECUTING = TokenState.EXECUTING
_CANCELLING = TokenState.CANCELLING


def _outcome(token: TaskToken, attempt: int, failed: bool) -> str:
    """How the attempt ended, from the task's outcome and the token's state at that moment."""
    if token.attempts != attempt:
        # Its deadline passed and the policy retries timeouts: the token moved on to another
        # attempt while this one ran (that attempt's result is discarded).
        return "timed_out"
    state = token.state
    if state is _EXECUTING:
        return "failed" if failed else "completed"
    if state.is_settled:  # settled while it ran: its result is discarded
        return "killed" if state is _CANCELLING else state.name.lower()
    return "timed_out"  # abandoned for a retry that has not started yet


def _describe(exc: BaseException) -> str:
    """``Type: message`` for the span status (never raises, whatever ``__str__`` does)."""
    name = type(exc).__qualname__
    try:
        text = str(exc)
    except Exception:
        return name
    return f"{name}: {text}" if text else name


def attempt_hook(tracer_provider: TracerProvider | None = None) -> AttemptHook:
    """The hook the core runs every attempt through, tracing it as an OpenTelemetry span.

    Args:
        tracer_provider: the ``TracerProvider`` to get the tracer from; None: the global one
            (``opentelemetry.trace.get_tracer_provider()``, looked up when spans are made, so
            a provider set later is used).

    Returns:
        ``hook(token, func, args, kwargs, previous)``: runs ``func(*args, **kwargs)`` in a span
        of its own (see the module docstring) and returns what it returns or raises what it
        raises, the same object. ``previous`` is the chain step whose completion submitted
        ``token``, or None.

    Raises:
        ConfigurationError: OpenTelemetry is not installed (``pip install 'tokengate[otel]'``),
            or ``tracer_provider`` has no ``get_tracer``.
    """
    try:
        from opentelemetry import context as otel_context
        from opentelemetry import trace
    except ImportError as exc:
        raise ConfigurationError(
            f"tracing needs the OpenTelemetry API, which is not installed: {_INSTALL}"
        ) from exc
    if tracer_provider is not None and not callable(getattr(tracer_provider, "get_tracer", None)):
        raise ConfigurationError(
            "tracing= must be True, False or an OpenTelemetry TracerProvider, got "
            f"{type(tracer_provider).__name__}"
        )

    tracer = trace.get_tracer("tokengate", _version, tracer_provider=tracer_provider)
    start_span = tracer.start_span
    get_current_span = trace.get_current_span
    set_span_in_context = trace.set_span_in_context
    non_recording = trace.NonRecordingSpan
    link = trace.Link
    consumer = trace.SpanKind.CONSUMER
    status = trace.Status
    error = trace.StatusCode.ERROR
    attach = otel_context.attach
    detach = otel_context.detach
    # token -> the SpanContext of its last attempt, for the chain step it submits. Weak keys:
    # an entry lives as long as its token (reads and writes are single dict operations).
    last_span: weakref.WeakKeyDictionary[TaskToken, SpanContext] = weakref.WeakKeyDictionary()

    def hook(
        token: TaskToken,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        previous: TaskToken | None,
    ) -> Any:
        attempt = token.attempts
        operation = token.operation_type
        token_id = token.token_id
        attrs: dict[str, Any] = {
            "messaging.system": "tokengate",
            "messaging.operation.type": "process",
            "messaging.destination.name": operation,
            "messaging.message.id": str(token_id),
            "tokengate.token_id": token_id,
            "tokengate.operation": operation,
            "tokengate.weight": token.weight.value,
            "tokengate.priority": token.priority,
            "tokengate.attempt": attempt,
        }
        core = token.core_id
        if core is not None:
            attrs["tokengate.core"] = core
            worker = token.worker_id
            if worker is not None:
                attrs["tokengate.worker"] = worker
        started = token.started_at
        parent = None
        links = None
        ready: float | None = None
        if previous is not None:
            attrs["tokengate.previous_token_id"] = previous.token_id
            ready = previous.finished_at
            before = last_span.get(previous)
            if before is not None:
                parent = set_span_in_context(non_recording(before))
                caller = get_current_span().get_span_context()
                if caller.is_valid and caller.trace_id != before.trace_id:
                    links = [link(caller)]
        if attempt > 1:
            # A retry queues from its admission back into a mailbox; one that runs again in
            # its caller (inline mode) was never queued: no figure then.
            ready = token.admitted_at
            if ready is not None and started is not None:
                attrs["tokengate.queue_wait_s"] = max(0.0, started - ready)
        elif started is not None:
            if ready is None:
                ready = token.created_at
            attrs["tokengate.queue_wait_s"] = max(0.0, started - ready)

        span = start_span(operation, parent, consumer, attrs, links)
        scope = attach(set_span_in_context(span))
        failed = False
        try:
            if kwargs:
                return func(*args, **kwargs)
            return func(*args)
        except BaseException as exc:  # Ctrl-C, SystemExit too: recorded, then re-raised as is
            failed = True
            try:
                span.set_status(status(error, _describe(exc)))
                span.record_exception(exc)
            except Exception:  # e.g. an exception whose __str__ raises: the task's goes on
                log.debug("tracing: could not record the exception of %r", token, exc_info=True)
            raise
        finally:
            try:
                detach(scope)
                outcome = _outcome(token, attempt, failed)
                if outcome == "timed_out" and not failed:
                    span.set_status(status(error, "timed out"))
                span.set_attribute("tokengate.outcome", outcome)
                span.end()
                if token.attempts == attempt:  # not an attempt abandoned for a newer one
                    last_span[token] = span.get_span_context()
            except Exception:
                log.debug("tracing: could not end the span of %r", token, exc_info=True)

    return hook
