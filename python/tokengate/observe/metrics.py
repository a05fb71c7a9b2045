"""Prometheus export of coordinator metrics.

``coordinator.serve_metrics(port)`` serves the figures of one coordinator over HTTP for
Prometheus to scrape; :class:`TokenGateCollector` puts them into any
``prometheus_client`` registry. This module is the only one that imports
``prometheus_client``, and ``import tokengate`` does not import it.

Each scrape costs one ``Runtime.metrics()`` call per coordinator: the core keeps every figure
in per-core relaxed atomics as tokens run and hands over a snapshot, so the export adds no
Python call per token. Every sample carries a ``coordinator`` label (``coordinator.name``);
labels are bounded (operation names, core numbers, weights, tiers, states), never token ids,
worker ids or arguments.

Metrics (counters end in ``_total``; durations are in seconds):

``tokengate_tokens_total{operation, outcome}`` (counter)
    Tokens of an operation by final outcome: ``completed``, ``failed``, ``killed``,
    ``timed_out``, ``quarantined``, ``refused`` (the submission raised, e.g. ``PoolFull``);
    also ``blocked`` (calls refused by the operation's breaker before a token existed) and
    ``retried`` (attempts that failed and were tried again; not a final outcome). Refused and
    blocked calls were never accepted: they are not in ``tokengate_tokens_accepted_total``.
``tokengate_attempts_total{operation, outcome}`` (counter)
    Attempts that ran, by outcome: ``completed``, ``failed``, ``timed_out``, ``killed``. A token
    with retries runs several attempts.
``tokengate_tokens_accepted_total`` (counter)
    Tokens accepted by the coordinator.
``tokengate_tokens_inflight{state}`` (gauge)
    Tokens now ``waiting``, ``admitted``, ``executing`` or ``held`` (by a limit or a storage tier).
``tokengate_pool_depth`` (gauge)
    Tokens in the shared pool, not yet routed to a core.
``tokengate_queue_depth{core}``, ``tokengate_workers_active{core}``,
``tokengate_workers_busy{core}`` (gauges)
    Per virtual core (1-based): tokens queued in its mailboxes, its active workers (see
    convergence) and those executing a token now.
``tokengate_routed_total{core, weight}`` (counter)
    Admissions of tokens into a core's mailboxes, by weight (``heavy``, ``medium``, ``light``):
    each attempt of a retried token is routed again, and a ``reroute()`` to another core counts
    there too, so the sum may exceed ``tokengate_tokens_accepted_total``.
``tokengate_queue_wait_seconds`` (histogram)
    Time from a token's submission to the start of each of its attempts, all cores together
    (one observation per attempt; a retry's includes the earlier attempts and the backoff).
``tokengate_execution_seconds{operation}`` (histogram)
    Duration of the attempts of an operation.
``tokengate_storage_wait_seconds{tier}`` (histogram)
    Time a token waited for a permit of its storage tier (``SLOW``, ``MODERATE``, ``FAST``,
    ``INSANE``); a permit granted at once counts in the first bucket. Bucket bounds are powers
    of two of nanoseconds, from 2**10 ns (about 1 us) to 2**36 ns (about 69 s).
``tokengate_storage_limit{tier}``, ``tokengate_storage_running{tier}``,
``tokengate_storage_held{tier}`` (gauges)
    Per tier: its permits, those in use, and the tokens held waiting for one.
``tokengate_breaker_state{operation, state}`` (gauge)
    1 for the current state of the operation's circuit breaker, 0 for the others of
    ``closed``, ``open``, ``half_open``, ``blocked`` (an operator's ``guard_house.block()``)
    and ``disabled``.
``tokengate_events_dropped_total`` (counter)
    Lifecycle events lost because the event ring was full.

Things to know when reading them:

* Counters restart from zero when a coordinator is stopped and started again: each run has a
  new runtime. Prometheus treats a counter that went down as a reset (``rate()`` and
  ``increase()`` handle it). A stopped coordinator keeps exposing the final figures of its
  last run; one that was never started exposes no samples.
* The per-operation series (``operation`` label) come from the Guard House, on by default:
  with ``OperationsCoordinator(guard_house=False)`` they are absent, the rest remains.
* The buckets of ``tokengate_execution_seconds`` come from the core's log-linear histogram,
  whose cells are about 12.5 % wide: an observation within about 12.5 % of a bucket bound may
  be counted on either side of it. ``_sum`` and ``_count`` are exact.

Several coordinators on one endpoint: give one collector all of them (one collector per
coordinator in the same registry would repeat every family)::

    from prometheus_client import REGISTRY, start_http_server
    from tokengate.observe.metrics import TokenGateCollector

    REGISTRY.register(TokenGateCollector([coord1, coord2]))
    start_http_server(9464, addr="127.0.0.1")

"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, Protocol, cast
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry
from prometheus_client import generate_latest as _prom_generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app
from prometheus_client.utils import floatToGoString

from .._serving import BackgroundServer
from ..errors import ConfigurationError, CoordinatorNotRunning, TokenGateError

__all__ = [
    "MetricsServer",
    "TokenGateCollector",
    "generate_latest",
    "registry_for",
    "serve",
]

log = logging.getLogger("tokengate.observe")

#: Final (and ``retried``) outcomes of ``tokengate_tokens_total``, in exposition order.
TOKEN_OUTCOMES: Final = (
    "completed",
    "failed",
    "killed",
    "timed_out",
    "quarantined",
    "refused",
    "blocked",
    "retried",
)
#: Outcomes of ``tokengate_attempts_total``.
ATTEMPT_OUTCOMES: Final = ("completed", "failed", "timed_out", "killed")
#: States of ``tokengate_tokens_inflight``.
TOKEN_STATES: Final = ("waiting", "admitted", "executing", "held")
#: States of ``tokengate_breaker_state``.
BREAKER_STATES: Final = ("closed", "open", "half_open", "blocked", "disabled")
#: Breaker state names of the Guard House API that the metric spells otherwise.
_BREAKER_ALIASES: Final = {"forced_open": "blocked"}
_WEIGHTS: Final = ("heavy", "medium", "light")


class _Coordinator(Protocol):
    """What the collector needs of an ``OperationsCoordinator``."""

    @property
    def name(self) -> str: ...

    def _last_runtime(self) -> Any: ...


# -- families ---------------------------------------------------------------------------

# key -> (type, name given to prometheus_client, help, labels after "coordinator").
# Counter names are given without "_total": prometheus_client appends it to the sample.
_FAMILIES: Final[dict[str, tuple[str, str, str, tuple[str, ...]]]] = {
    "tokens_total": (
        "counter",
        "tokengate_tokens",
        "Tokens by final outcome per operation (blocked: calls refused by the breaker; "
        "retried: attempts tried again)",
        ("operation", "outcome"),
    ),
    "attempts_total": (
        "counter",
        "tokengate_attempts",
        "Attempts that ran, by outcome, per operation",
        ("operation", "outcome"),
    ),
    "created_total": (
        "counter",
        "tokengate_tokens_accepted",
        "Tokens accepted by the coordinator",
        (),
    ),
    "tokens": (
        "gauge",
        "tokengate_tokens_inflight",
        "Tokens now waiting, admitted, executing or held",
        ("state",),
    ),
    "pool_depth": ("gauge", "tokengate_pool_depth", "Tokens in the shared pool", ()),
    "queue_depth": (
        "gauge",
        "tokengate_queue_depth",
        "Tokens queued in the mailboxes of a core",
        ("core",),
    ),
    "workers_active": (
        "gauge",
        "tokengate_workers_active",
        "Active workers of a core",
        ("core",),
    ),
    "workers_busy": (
        "gauge",
        "tokengate_workers_busy",
        "Workers of a core executing a token now",
        ("core",),
    ),
    "routed_total": (
        "counter",
        "tokengate_routed",
        "Admissions of tokens into a core, by weight (each retry is routed again)",
        ("core", "weight"),
    ),
    "queue_wait": (
        "histogram",
        "tokengate_queue_wait_seconds",
        "Seconds from submission to the start of an attempt",
        (),
    ),
    "execution": (
        "histogram",
        "tokengate_execution_seconds",
        "Seconds an attempt of an operation ran (log-linear buckets, about 12.5% wide)",
        ("operation",),
    ),
    "storage_wait": (
        "histogram",
        "tokengate_storage_wait_seconds",
        "Seconds a token waited for a permit of its storage tier",
        ("tier",),
    ),
    "storage_limit": (
        "gauge",
        "tokengate_storage_limit",
        "Permits of a storage tier",
        ("tier",),
    ),
    "storage_running": (
        "gauge",
        "tokengate_storage_running",
        "Permits of a storage tier in use",
        ("tier",),
    ),
    "storage_held": (
        "gauge",
        "tokengate_storage_held",
        "Tokens held waiting for a permit of a storage tier",
        ("tier",),
    ),
    "breaker_state": (
        "gauge",
        "tokengate_breaker_state",
        "1 for the current state of the operation's circuit breaker, 0 for the others",
        ("operation", "state"),
    ),
    "events_dropped_total": (
        "counter",
        "tokengate_events_dropped",
        "Lifecycle events lost because the event ring was full",
        (),
    ),
}

# A sample: (family key, label values after "coordinator", value). A histogram's value is
# (cumulative buckets as (le, count) ending with "+Inf", sum).
_Sample = tuple[str, tuple[str, ...], Any]


def _buckets(bounds: Sequence[float], counts: Sequence[int], cumulative: bool) -> list[Any]:
    """``(le, cumulative count)`` pairs ending with ``+Inf``."""
    if len(bounds) != len(counts):
        raise ValueError(f"{len(bounds)} bucket bounds but {len(counts)} bucket counts")
    out: list[tuple[str, float]] = []
    total = 0.0
    for bound, n in zip(bounds, counts, strict=True):
        total = float(n) if cumulative else total + n
        out.append((floatToGoString(bound), total))
    if not out or not math.isinf(bounds[-1]):
        out.append(("+Inf", total))
    return out


#: Bounds exported for the storage waits, which the core counts in 64 log2 buckets of
#: nanoseconds (bucket i: 2**i to 2**(i+1) - 1 ns): the cumulative counts at 2**k ns for k in
#: 10..36, i.e. about 1 us to 69 s, exact at each of those bounds.
_STORAGE_LOG2_NS: Final = range(10, 37)


def _storage_buckets(t: Mapping[str, Any], queue_bounds: Sequence[float]) -> list[Any]:
    """One storage tier's wait buckets as ``(le, cumulative count)`` pairs."""
    counts = list(t["wait_buckets"])
    if "wait_bounds" in t:
        return _buckets(list(t["wait_bounds"]), counts, cumulative=False)
    if len(counts) == len(queue_bounds):  # the layout of the queue waits
        return _buckets(queue_bounds, counts, cumulative=False)
    if len(counts) != 64:
        raise ValueError(f"{len(counts)} storage wait buckets: unknown layout")
    out: list[tuple[str, float]] = []
    for k in _STORAGE_LOG2_NS:  # buckets 0..k-1 hold the waits below 2**k ns
        out.append((floatToGoString(2**k / 1e9), float(sum(counts[:k]))))
    out.append(("+Inf", float(sum(counts))))
    return out


def _samples(m: Mapping[str, Any]) -> list[_Sample]:
    """The samples of one ``Runtime.metrics()`` snapshot (raises if it is malformed)."""
    out: list[_Sample] = []
    add = out.append
    add(("created_total", (), m["created"]))
    tokens = m["tokens"]
    for state in TOKEN_STATES:
        add(("tokens", (state,), tokens.get(state, 0)))
    add(("pool_depth", (), m["pool_depth"]))
    add(("events_dropped_total", (), m.get("events_dropped", 0)))

    bounds = list(m["queue_wait_bounds"])
    merged = [0] * len(bounds)
    wait_sum = 0.0
    for c in m["per_core"]:
        core = str(c["core"])
        add(("queue_depth", (core,), c["queue_depth"]))
        add(("workers_active", (core,), c["active_workers"]))
        add(("workers_busy", (core,), c["busy_workers"]))
        routed = c["routed"]
        for weight in (*_WEIGHTS, *sorted(set(routed) - set(_WEIGHTS))):
            add(("routed_total", (core, str(weight)), routed.get(weight, 0)))
        per_bucket = c["queue_wait_buckets"]
        if len(per_bucket) != len(bounds):
            raise ValueError(
                f"core {core}: {len(per_bucket)} queue wait buckets for {len(bounds)} bounds"
            )
        merged = [a + b for a, b in zip(merged, per_bucket, strict=True)]
        wait_sum += c["queue_wait_sum"]
    add(("queue_wait", (), (_buckets(bounds, merged, cumulative=False), wait_sum)))

    for tier, t in m["storage"].items():
        label = (str(tier),)
        add(("storage_limit", label, t["limit"]))
        add(("storage_running", label, t["running"]))
        add(("storage_held", label, t["held"]))
        buckets = _storage_buckets(t, bounds)
        add(("storage_wait", label, (buckets, t["wait_sum"])))

    for op in m.get("operations") or ():
        name = str(op["operation"])
        toks = op["tokens"]
        for outcome in (*TOKEN_OUTCOMES, *sorted(set(toks) - set(TOKEN_OUTCOMES))):
            add(("tokens_total", (name, outcome), toks.get(outcome, 0)))
        atts = op["attempts"]
        for outcome in (*ATTEMPT_OUTCOMES, *sorted(set(atts) - set(ATTEMPT_OUTCOMES))):
            add(("attempts_total", (name, outcome), atts.get(outcome, 0)))
        ex_bounds = list(op["execution_bounds"])
        ex = _buckets(ex_bounds, op["execution_buckets"], cumulative=True)
        if not ex_bounds or not math.isinf(ex_bounds[-1]):
            ex[-1] = ("+Inf", float(op["execution_count"]))
        add(("execution", (name,), (ex, op["execution_sum"])))
        state = str(op["breaker"])
        state = _BREAKER_ALIASES.get(state, state)
        states = BREAKER_STATES if state in BREAKER_STATES else (*BREAKER_STATES, state)
        for s in states:
            add(("breaker_state", (name, s), 1 if s == state else 0))
    return out


def _snapshot(coordinator: _Coordinator) -> Mapping[str, Any] | None:
    """``Runtime.metrics()`` of the coordinator's live or last runtime; None if it never ran."""
    try:
        rt = coordinator._last_runtime()
    except CoordinatorNotRunning:
        return None  # never started
    except TokenGateError as e:  # e.g. CoordinatorForked: its runtime is the parent's
        log.debug("no metrics for coordinator %r: %s", coordinator.name, e)
        return None
    if rt is None:
        return None
    snapshot: Mapping[str, Any] = rt.metrics()
    return snapshot


class TokenGateCollector:
    """A ``prometheus_client`` collector of the metrics of one or more coordinators.

    ``TokenGateCollector(coord)`` or ``TokenGateCollector([coord1, coord2])``. At each scrape
    it reads one ``Runtime.metrics()`` snapshot per coordinator (the live runtime, else the last
    stopped one; a coordinator never started adds no samples) and yields one family per metric
    name (the list is in :mod:`tokengate.observe.metrics`), each sample labelled
    ``coordinator=coordinator.name``. A coordinator whose snapshot cannot be read is logged on
    ``tokengate.observe`` and left out of that scrape; the others are still exported.

    :meth:`describe` returns ``[]``: the registry then neither checks the names at
    ``register()`` nor scrapes to learn them. Register one collector per registry: to export
    several coordinators together, give them all to one collector (two collectors in one
    registry would each yield every family).

    The collector keeps its coordinators alive while it is referenced.
    """

    def __init__(self, coordinators: _Coordinator | Iterable[_Coordinator]) -> None:
        if hasattr(coordinators, "_last_runtime"):
            coords: list[_Coordinator] = [coordinators]  # type: ignore[list-item]
        elif isinstance(coordinators, Iterable) and not isinstance(coordinators, (str, bytes)):
            coords = []
            for c in coordinators:
                if not hasattr(c, "_last_runtime"):
                    raise ConfigurationError(
                        f"TokenGateCollector needs OperationsCoordinator objects, got {c!r}"
                    )
                if all(c is not d for d in coords):
                    coords.append(c)
        else:
            raise ConfigurationError(
                "TokenGateCollector needs an OperationsCoordinator or a list of them, got "
                f"{coordinators!r}"
            )
        if not coords:
            raise ConfigurationError("TokenGateCollector needs at least one coordinator")
        names = [str(c.name) for c in coords]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigurationError(
                "coordinators exported together need distinct names (their `coordinator` "
                f"label); several are named {', '.join(map(repr, dupes))}"
            )
        self._coordinators: tuple[_Coordinator, ...] = tuple(coords)

    @property
    def coordinators(self) -> tuple[_Coordinator, ...]:
        """The coordinators this collector exports."""
        return self._coordinators

    def describe(self) -> list[Metric]:
        """No description: ``register()`` neither checks names nor scrapes."""
        return []

    def collect(self) -> Iterator[Metric]:
        """One family per metric name, with the samples of every coordinator that ran."""
        by_key: dict[str, list[tuple[tuple[str, ...], Any]]] = defaultdict(list)
        for coord in self._coordinators:
            name = str(coord.name)
            try:
                snapshot = _snapshot(coord)
                samples = [] if snapshot is None else _samples(snapshot)
            except Exception:
                log.exception("metrics of coordinator %r could not be read", name)
                continue
            for key, labels, value in samples:
                by_key[key].append(((name, *labels), value))
        for key, (kind, fname, doc, labels) in _FAMILIES.items():
            names = ["coordinator", *labels]
            family: CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily
            if kind == "histogram":
                family = HistogramMetricFamily(fname, doc, labels=names)
                for lv, (buckets, total) in by_key[key]:
                    family.add_metric(list(lv), buckets, sum_value=float(total))
            else:
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                family = cls(fname, doc, labels=names)
                for lv, v in by_key[key]:
                    family.add_metric(list(lv), float(v))
            yield family

    def __repr__(self) -> str:
        names = ", ".join(repr(str(c.name)) for c in self._coordinators)
        return f"<TokenGateCollector of {names}>"


# -- registry and endpoint --------------------------------------------------------------

_registry_lock = threading.Lock()


def registry_for(coordinator: _Coordinator) -> CollectorRegistry:
    """The registry of ``coordinator`` alone (one :class:`TokenGateCollector`), made on first
    use and cached on the coordinator (``coordinator.metrics_registry`` returns it)."""
    registry: CollectorRegistry | None = getattr(coordinator, "_metrics_registry", None)
    if registry is not None:
        return registry
    collector = TokenGateCollector(coordinator)  # validates before anything is cached
    with _registry_lock:
        registry = getattr(coordinator, "_metrics_registry", None)
        if registry is None:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(collector)
            coordinator._metrics_registry = registry  # type: ignore[attr-defined]
    return registry


def generate_latest(coordinator: _Coordinator) -> bytes:
    """The coordinator's metrics in the Prometheus text format 0.0.4 (what the endpoint of
    :func:`serve` answers)."""
    return _prom_generate_latest(registry_for(coordinator))


class _SilentHandler(WSGIRequestHandler):
    """Logs no line per request on stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets or a zone) is
    this machine only: ``localhost`` or a loopback address."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class MetricsServer(BackgroundServer):
    """An HTTP endpoint serving one coordinator's metrics at ``/metrics`` (any path does),
    made by :func:`serve`. A daemon thread answers scrapes until :meth:`close` (or the end of
    a ``with`` block); it outlives ``coordinator.stop()``, serving the last run's figures."""

    @property
    def url(self) -> str:
        """``http://HOST:PORT/metrics``."""
        return self._origin("http") + "/metrics"


def serve(
    coordinator: _Coordinator | Iterable[_Coordinator], port: int = 0, addr: str = "127.0.0.1"
) -> MetricsServer:
    """Serves ``coordinator``'s metrics over HTTP on ``addr:port`` (``port=0``: a free port,
    see ``.port``) from a daemon thread, and returns the :class:`MetricsServer`. Given several
    coordinators (a list), one endpoint serves them all (one :class:`TokenGateCollector`;
    their samples differ by their ``coordinator`` label).

    The endpoint has no authentication and no TLS: it binds to the loopback address by
    default, and binding elsewhere (e.g. ``"0.0.0.0"``) logs a warning on
    ``tokengate.observe``. Raises :class:`~tokengate.ConfigurationError` for a port that is
    not an int in 0..65535 or an address that is not a non-empty str or does not resolve, and
    ``OSError`` if the address cannot be bound (e.g. the port is taken).
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigurationError(
            f"port must be an int in 0..65535 (0: any free port), got {port!r}"
        )
    if not isinstance(addr, str) or not addr:
        raise ConfigurationError(
            f"addr must be a host name or IP address (a non-empty str), got {addr!r}"
        )
    if isinstance(coordinator, (list, tuple, set, frozenset)):
        several = list(coordinator)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(TokenGateCollector(several))
        label = "+".join(c.name for c in several)
    else:
        one = cast("_Coordinator", coordinator)
        registry = registry_for(one)
        label = one.name
    try:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigurationError(f"addr {addr!r} does not resolve: {e}") from e
    family, _, _, _, sockaddr = infos[0]
    host = str(sockaddr[0])

    class _Server(ThreadingWSGIServer):
        address_family = family

    app = make_wsgi_app(registry)
    httpd = make_server(host, port, app, _Server, handler_class=_SilentHandler)
    thread = threading.Thread(
        target=httpd.serve_forever,
        name=f"tokengate-metrics-{label}",
        daemon=True,
    )
    thread.start()
    server = MetricsServer(httpd, thread)
    if not is_loopback(server.host):
        log.warning(
            "serving the metrics of coordinator %r on %s, which is not a loopback address: "
            "the endpoint has no authentication",
            label,
            server.url,
        )
    else:
        log.info("serving the metrics of coordinator %r on %s", label, server.url)
    return server
