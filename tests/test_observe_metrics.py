"""Prometheus export (issue #9): tokengate.observe.metrics, scraped over real HTTP endpoints."""

from __future__ import annotations

import logging
import threading
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client import generate_latest as prom_generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from _support import SAFETY, run_child, wait_until
from tokengate import (
    ConfigurationError,
    MethodBlocked,
    OperationsCoordinator,
    PoolFull,
    TokenKilled,
    task_token_guard,
)
from tokengate.observe import metrics
from tokengate.observe.metrics import (
    ATTEMPT_OUTCOMES,
    BREAKER_STATES,
    TOKEN_OUTCOMES,
    MetricsServer,
    TokenGateCollector,
    registry_for,
    serve,
)

#: Every family the collector yields, as the text-format parser names them, with its type.
FAMILIES = {
    ("tokengate_tokens", "counter"),  # tokengate_tokens_total
    ("tokengate_attempts", "counter"),
    ("tokengate_tokens_accepted", "counter"),
    ("tokengate_tokens_inflight", "gauge"),
    ("tokengate_pool_depth", "gauge"),
    ("tokengate_queue_depth", "gauge"),
    ("tokengate_workers_active", "gauge"),
    ("tokengate_workers_busy", "gauge"),
    ("tokengate_routed", "counter"),
    ("tokengate_queue_wait_seconds", "histogram"),
    ("tokengate_execution_seconds", "histogram"),
    ("tokengate_storage_wait_seconds", "histogram"),
    ("tokengate_storage_limit", "gauge"),
    ("tokengate_storage_running", "gauge"),
    ("tokengate_storage_held", "gauge"),
    ("tokengate_breaker_state", "gauge"),
    ("tokengate_events_dropped", "counter"),
}
#: Sample names that carry an ``operation`` label (Guard House series).
PER_OPERATION = (
    "tokengate_tokens_total",
    "tokengate_attempts_total",
    "tokengate_execution_seconds_bucket",
    "tokengate_execution_seconds_count",
    "tokengate_execution_seconds_sum",
    "tokengate_breaker_state",
)


class Scrape:
    """A parsed exposition: its families and a flat list of samples."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = list(text_string_to_metric_families(text))
        self.samples: list[Sample] = [s for f in self.families for s in f.samples]

    def select(self, name: str, **labels: str) -> list[Sample]:
        return [
            s
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float:
        """The value of the one sample matching ``name`` and ``labels``."""
        hits = self.select(name, **labels)
        assert len(hits) == 1, (name, labels, hits)
        return hits[0].value

    def total(self, name: str, **labels: str) -> float:
        return sum(s.value for s in self.select(name, **labels))

    def kinds(self) -> set[tuple[str, str]]:
        return {(f.name, f.type) for f in self.families}


def scrape(url: str, accept: str | None = None) -> Scrape:
    headers = {"Accept": accept} if accept else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=SAFETY) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return Scrape(r.read().decode())


def at_rest(coord: OperationsCoordinator) -> bool:
    s = coord.stats()
    return all(s[k] == 0 for k in ("waiting", "admitted", "executing", "held"))


def run_workload(prefix: str) -> dict[str, int]:
    """7 completed calls of ``{prefix}_a``, 3 failing calls of ``{prefix}_b`` and one call of
    ``{prefix}_r`` that fails twice and then succeeds (retries=2); waits for every token."""
    lock = threading.Lock()
    calls = {"r": 0}

    @task_token_guard(operation_type=f"{prefix}_a")
    def op_a(x: int) -> int:
        return x * 2

    @task_token_guard(operation_type=f"{prefix}_b")
    def op_b() -> None:
        raise ValueError("b always fails")

    @task_token_guard(operation_type=f"{prefix}_r", retries=2)
    def op_r() -> str:
        with lock:
            calls["r"] += 1
            n = calls["r"]
        if n <= 2:
            raise ConnectionError(f"attempt {n} fails")
        return "third time lucky"

    a = [op_a(i) for i in range(7)]
    b = [op_b() for _ in range(3)]
    r = op_r()
    assert [t.get(timeout=SAFETY) for t in a] == [2 * i for i in range(7)]
    for t in b:
        assert t.wait(timeout=SAFETY)
        assert isinstance(t.exception(), ValueError)
    assert r.get(timeout=SAFETY) == "third time lucky"
    assert r.attempts == 3
    return calls


def assert_workload(sc: Scrape, prefix: str, coordinator: str) -> None:
    """The exact figures of :func:`run_workload` (and nothing else ran)."""
    expected_tokens = {
        f"{prefix}_a": {"completed": 7},
        f"{prefix}_b": {"failed": 3},
        f"{prefix}_r": {"completed": 1, "retried": 2},
    }
    expected_attempts = {
        f"{prefix}_a": {"completed": 7},
        f"{prefix}_b": {"failed": 3},
        f"{prefix}_r": {"completed": 1, "failed": 2},
    }
    executions = {f"{prefix}_a": 7, f"{prefix}_b": 3, f"{prefix}_r": 3}
    c = {"coordinator": coordinator}
    ops = {s.labels["operation"] for s in sc.select("tokengate_tokens_total", **c)}
    assert ops == set(expected_tokens)
    for op, want in expected_tokens.items():
        for outcome in TOKEN_OUTCOMES:
            got = sc.value("tokengate_tokens_total", operation=op, outcome=outcome, **c)
            assert got == want.get(outcome, 0), (op, outcome, got)
    for op, want in expected_attempts.items():
        for outcome in ATTEMPT_OUTCOMES:
            got = sc.value("tokengate_attempts_total", operation=op, outcome=outcome, **c)
            assert got == want.get(outcome, 0), (op, outcome, got)
    assert sc.value("tokengate_tokens_accepted_total", **c) == 11
    # each attempt is routed: the 11 tokens, and the 2 retries of {prefix}_r again
    assert sc.total("tokengate_routed_total", **c) == 13
    for op, n in executions.items():
        assert_histogram(sc, "tokengate_execution_seconds", n, operation=op, **c)
        assert sc.value("tokengate_execution_seconds_sum", operation=op, **c) > 0
        states = {
            s.labels["state"]: s.value
            for s in sc.select("tokengate_breaker_state", operation=op, **c)
        }
        assert states == {s: (1.0 if s == "closed" else 0.0) for s in BREAKER_STATES}
    # one queue wait per attempt that started: 7 + 3 + 3
    assert_histogram(sc, "tokengate_queue_wait_seconds", 13, **c)
    for state in ("waiting", "admitted", "executing", "held"):
        assert sc.value("tokengate_tokens_inflight", state=state, **c) == 0
    assert sc.value("tokengate_pool_depth", **c) == 0
    assert sc.value("tokengate_events_dropped_total", **c) == 0


def assert_histogram(sc: Scrape, name: str, count: int, **labels: str) -> None:
    """Cumulative non-decreasing buckets ending in +Inf == _count == ``count``."""
    buckets = sc.select(f"{name}_bucket", **labels)
    assert buckets, (name, labels)
    assert buckets[-1].labels["le"] == "+Inf"
    values = [b.value for b in buckets]
    assert values == sorted(values), values
    bounds = [float(b.labels["le"]) for b in buckets]
    assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds), bounds
    assert values[-1] == count, (name, labels, values)
    assert sc.value(f"{name}_count", **labels) == count


# ------------------------------------------------------------------------------ one endpoint


def test_workload_figures_over_http(make_coord):
    coord = make_coord(cores=2, workers_per_core=2, name="obs-main")
    run_workload("om")
    assert wait_until(lambda: at_rest(coord))
    server = coord.serve_metrics(0)
    try:
        assert isinstance(server, MetricsServer)
        assert server.host == "127.0.0.1" and 0 < server.port <= 65535
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        sc = scrape(server.url)
    finally:
        server.close()

    assert sc.kinds() == FAMILIES
    assert {s.labels["coordinator"] for s in sc.samples} == {"obs-main"}
    assert_workload(sc, "om", "obs-main")
    # per core: both cores, idle, with at least one active worker
    assert {s.labels["core"] for s in sc.select("tokengate_queue_depth")} == {"1", "2"}
    for core in ("1", "2"):
        assert sc.value("tokengate_queue_depth", core=core) == 0
        assert sc.value("tokengate_workers_busy", core=core) == 0
        assert sc.value("tokengate_workers_active", core=core) >= 1
        weights = {s.labels["weight"] for s in sc.select("tokengate_routed_total", core=core)}
        assert weights == {"heavy", "medium", "light"}
    # no token id, worker id or argument ever becomes a label
    allowed = {"coordinator", "operation", "outcome", "state", "core", "weight", "tier", "le"}
    assert {k for s in sc.samples for k in s.labels} <= allowed


def test_counters_grow_between_scrapes_and_text_matches_registry(make_coord):
    coord = make_coord(cores=1, workers_per_core=2, name="obs-grow")

    @task_token_guard(operation_type="og_a")
    def op(x):
        return x

    assert op(1).get(timeout=SAFETY) == 1
    assert wait_until(lambda: at_rest(coord))
    first = Scrape(metrics.generate_latest(coord).decode())
    assert first.value("tokengate_tokens_accepted_total") == 1
    assert [op(i).get(timeout=SAFETY) for i in range(4)] == [0, 1, 2, 3]
    assert wait_until(lambda: at_rest(coord))
    with coord.serve_metrics(0) as server:
        second = scrape(server.url)
    assert second.value("tokengate_tokens_accepted_total") == 5
    assert second.value("tokengate_tokens_total", operation="og_a", outcome="completed") == 5
    assert metrics.generate_latest(coord) == prom_generate_latest(registry_for(coord))


def test_storage_tier_series(make_coord):
    coord = make_coord(cores=1, workers_per_core=2, name="obs-storage", storage_limits={"SLOW": 3})

    @task_token_guard(operation_type="os_write", tags={"storage_speed": "SLOW"})
    def write(i):
        return i

    assert [write(i).get(timeout=SAFETY) for i in range(2)] == [0, 1]
    assert wait_until(lambda: at_rest(coord))
    sc = Scrape(metrics.generate_latest(coord).decode())
    limits = {s.labels["tier"]: s.value for s in sc.select("tokengate_storage_limit")}
    assert limits == {"SLOW": 3, "MODERATE": 25, "FAST": 50, "INSANE": 70}
    for tier in limits:
        assert sc.value("tokengate_storage_running", tier=tier) == 0
        assert sc.value("tokengate_storage_held", tier=tier) == 0
    assert_histogram(sc, "tokengate_storage_wait_seconds", 2, tier="SLOW")
    assert_histogram(sc, "tokengate_storage_wait_seconds", 0, tier="FAST")


def test_blocked_operation(make_coord):
    coord = make_coord(cores=1, workers_per_core=1, name="obs-block")

    @task_token_guard(operation_type="ob_a")
    def op():
        return "ran"

    assert op().get(timeout=SAFETY) == "ran"
    coord.guard_house.block("ob_a")
    with pytest.raises(MethodBlocked):
        op()
    with pytest.raises(MethodBlocked):
        op()
    sc = Scrape(metrics.generate_latest(coord).decode())
    states = {s.labels["state"]: s.value for s in sc.select("tokengate_breaker_state")}
    assert states == {s: (1.0 if s == "blocked" else 0.0) for s in BREAKER_STATES}
    assert sc.value("tokengate_tokens_total", operation="ob_a", outcome="blocked") == 2
    assert sc.value("tokengate_tokens_total", operation="ob_a", outcome="completed") == 1
    assert sc.value("tokengate_tokens_accepted_total") == 1  # a blocked call makes no token

    # every other state, one at a time (force_open stays open for its 30 s open_duration)
    for button, state in (("unblock", "closed"), ("force_open", "open"), ("disable", "disabled")):
        getattr(coord.guard_house, button)("ob_a")
        sc = Scrape(metrics.generate_latest(coord).decode())
        states = {
            s.labels["state"]: s.value
            for s in sc.select("tokengate_breaker_state", operation="ob_a")
        }
        assert states == {s: (1.0 if s == state else 0.0) for s in BREAKER_STATES}, button


def test_refused_and_killed_tokens(make_coord):
    coord = make_coord(
        cores=1, workers_per_core=1, name="obs-refuse", pool_capacity=2, overflow="reject"
    )

    @task_token_guard(operation_type="or_a")
    def op():
        return "ran"

    coord.pause()  # everything stays in the pool
    queued = [op(), op()]
    with pytest.raises(PoolFull):
        op()
    server = coord.serve_metrics(0)
    try:
        sc = scrape(server.url)
        assert sc.value("tokengate_pool_depth") == 2
        assert sc.value("tokengate_tokens_inflight", state="waiting") == 2
        coord.stop(wait=False)  # kills what has not started
        for t in queued:
            with pytest.raises(TokenKilled):
                t.get(timeout=SAFETY)
        sc = scrape(server.url)
    finally:
        server.close()
    counts = {
        s.labels["outcome"]: s.value for s in sc.select("tokengate_tokens_total", operation="or_a")
    }
    assert counts == {o: {"killed": 2, "refused": 1}.get(o, 0) for o in TOKEN_OUTCOMES}
    assert sc.value("tokengate_tokens_accepted_total") == 2  # the refused call is not in it
    assert sc.total("tokengate_attempts_total", operation="or_a") == 0  # nothing ran
    assert_histogram(sc, "tokengate_execution_seconds", 0, operation="or_a")
    assert sc.value("tokengate_pool_depth") == 0


def test_an_openmetrics_scrape_parses_as_openmetrics(make_coord):
    from prometheus_client.openmetrics.parser import (
        text_string_to_metric_families as openmetrics_families,
    )

    coord = make_coord(cores=1, workers_per_core=1, name="obs-om")
    coord.submit(lambda: None).get(timeout=SAFETY)
    accept = "application/openmetrics-text; version=1.0.0"
    with coord.serve_metrics(0) as server:
        req = urllib.request.Request(server.url, headers={"Accept": accept})
        with urllib.request.urlopen(req, timeout=SAFETY) as r:
            assert r.headers["Content-Type"].startswith("application/openmetrics-text")
            text = r.read().decode()
    # the OpenMetrics parser refuses two families of one name, as the names once were
    families = {(f.name, f.type) for f in openmetrics_families(text)}
    assert ("tokengate_tokens", "counter") in families
    assert ("tokengate_tokens_inflight", "gauge") in families
    assert ("tokengate_tokens_accepted", "counter") in families


# ------------------------------------------------------------------- lifecycle of the figures


def test_stopped_coordinator_keeps_last_figures_and_restart_resets(make_coord):
    coord = make_coord(cores=2, workers_per_core=2, name="obs-stop")
    server = coord.serve_metrics(0)
    try:
        run_workload("os")
        coord.stop()
        assert not coord.running
        sc = scrape(server.url)
        assert_workload(sc, "os", "obs-stop")

        coord.start()  # a new runtime: counters start from zero again
        sc = scrape(server.url)
        assert sc.value("tokengate_tokens_accepted_total") == 0
        assert all(s.value == 0 for s in sc.select("tokengate_tokens_total"))
        assert all(s.value == 0 for s in sc.select("tokengate_attempts_total"))
        assert sc.value("tokengate_queue_wait_seconds_count") == 0
    finally:
        server.close()


def test_never_started_coordinator_yields_no_samples():
    coord = OperationsCoordinator(name="obs-never")
    collector = TokenGateCollector(coord)
    assert collector.describe() == []
    families = list(collector.collect())
    assert {f.name for f in families} >= {"tokengate_tokens", "tokengate_execution_seconds"}
    assert all(f.samples == [] for f in families)
    sc = Scrape(metrics.generate_latest(coord).decode())
    assert sc.samples == []


def test_guard_house_off_has_no_per_operation_series(make_coord):
    coord = make_coord(cores=1, workers_per_core=2, name="obs-noguard", guard_house=False)

    @task_token_guard(operation_type="og_off")
    def op(x):
        return x

    assert [op(i).get(timeout=SAFETY) for i in range(3)] == [0, 1, 2]
    assert wait_until(lambda: at_rest(coord))
    with coord.serve_metrics(0) as server:
        sc = scrape(server.url)
    for name in PER_OPERATION:
        assert sc.select(name) == [], name
    assert not any("operation" in s.labels for s in sc.samples)
    assert sc.value("tokengate_tokens_accepted_total") == 3
    assert sc.total("tokengate_routed_total") == 3
    assert_histogram(sc, "tokengate_queue_wait_seconds", 3)
    assert sc.value("tokengate_tokens_inflight", state="executing") == 0
    assert sc.select("tokengate_storage_limit")


# ------------------------------------------------------------------- several coordinators


def test_two_coordinators_two_endpoints(make_coord):
    c1 = make_coord(cores=1, workers_per_core=1, name="obs-one")

    @task_token_guard(operation_type="o2_a")
    def op(x):
        return x

    assert [op(i).get(timeout=SAFETY) for i in range(2)] == [0, 1]
    c2 = make_coord(cores=1, workers_per_core=1, name="obs-two")  # takes decorated calls now
    assert [op(i).get(timeout=SAFETY) for i in range(3)] == [0, 1, 2]
    assert wait_until(lambda: at_rest(c1) and at_rest(c2))
    with c1.serve_metrics(0) as s1, c2.serve_metrics(0) as s2:
        assert s1.port != s2.port
        one, two = scrape(s1.url), scrape(s2.url)
    assert {s.labels["coordinator"] for s in one.samples} == {"obs-one"}
    assert {s.labels["coordinator"] for s in two.samples} == {"obs-two"}
    assert one.value("tokengate_tokens_accepted_total") == 2
    assert two.value("tokengate_tokens_accepted_total") == 3
    assert one.value("tokengate_tokens_total", operation="o2_a", outcome="completed") == 2
    assert two.value("tokengate_tokens_total", operation="o2_a", outcome="completed") == 3
    assert registry_for(c1) is not registry_for(c2)


def test_one_collector_for_several_coordinators(make_coord):
    c1 = make_coord(cores=1, workers_per_core=1, name="obs-left")

    @task_token_guard(operation_type="o3_a")
    def op(x):
        return x

    assert op(1).get(timeout=SAFETY) == 1
    c2 = make_coord(cores=1, workers_per_core=1, name="obs-right")
    assert [op(i).get(timeout=SAFETY) for i in range(2)] == [0, 1]
    assert wait_until(lambda: at_rest(c1) and at_rest(c2))

    registry = CollectorRegistry()
    registry.register(TokenGateCollector([c1, c2]))
    text = prom_generate_latest(registry).decode()
    type_lines = [line for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(type_lines) == len(set(type_lines)) == len(FAMILIES)
    sc = Scrape(text)
    assert sc.kinds() == FAMILIES
    for family in sc.families:
        if family.name != "tokengate_events_dropped" and family.samples:
            assert {s.labels["coordinator"] for s in family.samples} == {
                "obs-left",
                "obs-right",
            }, family.name
    assert sc.value("tokengate_tokens_accepted_total", coordinator="obs-left") == 1
    assert sc.value("tokengate_tokens_accepted_total", coordinator="obs-right") == 2
    assert sc.value("tokengate_events_dropped_total", coordinator="obs-left") == 0
    assert sc.value("tokengate_events_dropped_total", coordinator="obs-right") == 0


def test_collector_arguments():
    a = OperationsCoordinator(name="obs-arg-a")
    b = OperationsCoordinator(name="obs-arg-b")
    assert TokenGateCollector([a, b, a]).coordinators == (a, b)
    assert TokenGateCollector(a).coordinators == (a,)
    with pytest.raises(ConfigurationError, match="at least one"):
        TokenGateCollector([])
    for bad in (42, "obs-arg-a", [a, object()]):
        with pytest.raises(ConfigurationError, match="OperationsCoordinator"):
            TokenGateCollector(bad)


def test_collector_refuses_two_coordinators_of_one_name():
    class Fake:
        def __init__(self, name):
            self.name = name

        def _last_runtime(self):
            return None

    with pytest.raises(ConfigurationError, match=r"distinct names.*'twin'"):
        TokenGateCollector([Fake("twin"), Fake("twin")])


def test_unreadable_snapshot_is_logged_and_others_still_exported(make_coord, caplog):
    good = make_coord(cores=1, workers_per_core=1, name="obs-good")

    class Broken:
        name = "obs-broken"

        def _last_runtime(self):
            class Rt:
                def metrics(self):
                    raise RuntimeError("snapshot failed")

            return Rt()

    registry = CollectorRegistry()
    registry.register(TokenGateCollector([Broken(), good]))
    with caplog.at_level(logging.ERROR, logger="tokengate.observe"):
        sc = Scrape(prom_generate_latest(registry).decode())
    assert {s.labels["coordinator"] for s in sc.samples} == {"obs-good"}
    assert any(
        r.name == "tokengate.observe" and "obs-broken" in r.getMessage() for r in caplog.records
    )


def test_registry_is_cached_per_coordinator():
    a = OperationsCoordinator(name="obs-reg-a")
    b = OperationsCoordinator(name="obs-reg-b")
    assert registry_for(a) is registry_for(a)
    assert a.metrics_registry is registry_for(a)
    assert registry_for(b) is not registry_for(a)


# ------------------------------------------------------------------------------ the server


@pytest.mark.parametrize("port", [-1, 65536, "9100", 1.5, True, None])
def test_invalid_port(make_coord, port):
    coord = make_coord(cores=1, workers_per_core=1)
    with pytest.raises(ConfigurationError, match=r"port must be an int in 0\.\.65535"):
        coord.serve_metrics(port)


@pytest.mark.parametrize("addr", [None, 127, "", b"127.0.0.1"])
def test_invalid_addr(make_coord, addr):
    coord = make_coord(cores=1, workers_per_core=1)
    with pytest.raises(ConfigurationError, match="addr must be a host name or IP address"):
        coord.serve_metrics(0, addr)


def test_unresolvable_addr(make_coord):
    coord = make_coord(cores=1, workers_per_core=1)
    with pytest.raises(ConfigurationError, match="does not resolve"):
        metrics.serve(coord, 0, "no such host.invalid")


def test_server_close_and_context_manager(make_coord):
    coord = make_coord(cores=1, workers_per_core=1, name="obs-close")
    with metrics.serve(coord, 0) as server:
        assert not server.closed
        assert "serving" in repr(server)
        assert scrape(server.url).value("tokengate_tokens_accepted_total") == 0
    assert server.closed
    server.close()  # idempotent
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url, timeout=SAFETY)
    # the port was freed: it can be bound again at once
    with metrics.serve(coord, server.port) as again:
        assert again.port == server.port
        scrape(again.url)
        with pytest.raises(OSError):  # taken
            metrics.serve(coord, again.port)


def test_loopback_quiet_other_addresses_warn(make_coord, caplog, monkeypatch):
    coord = make_coord(cores=1, workers_per_core=1, name="obs-warn")
    with caplog.at_level(logging.INFO, logger="tokengate.observe"):
        with metrics.serve(coord, 0, "localhost") as server:
            assert server.host in ("127.0.0.1", "::1")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert metrics.is_loopback("127.0.0.1") and metrics.is_loopback("::1")
    assert not metrics.is_loopback("0.0.0.0") and not metrics.is_loopback("192.0.2.1")

    # The warning path, still bound to loopback only (tests never listen elsewhere).
    monkeypatch.setattr(metrics, "is_loopback", lambda host: False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tokengate.observe"):
        metrics.serve(coord, 0).close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no authentication" in warnings[0].getMessage()


def test_import_tokengate_does_not_import_prometheus_client(tmp_path):
    rc, out, err = run_child(
        tmp_path,
        """
        import sys
        import tokengate
        import tokengate.observe
        with tokengate.OperationsCoordinator(cores=1, workers_per_core=1):
            pass
        assert "prometheus_client" not in sys.modules, "imported too early"
        import tokengate.observe.metrics
        assert "prometheus_client" in sys.modules
        print("OK")
        """,
    )
    assert rc == 0, err
    assert out.strip() == "OK"


def test_serve_takes_several_coordinators_on_one_endpoint(make_coord):
    a = make_coord(cores=1, workers_per_core=1, name="obs-one")
    b = make_coord(cores=1, workers_per_core=1, name="obs-two")
    a.submit(lambda: None).get(timeout=SAFETY)
    for _ in range(2):
        b.submit(lambda: None).get(timeout=SAFETY)
    with serve([a, b], 0) as server:
        sc = scrape(server.url)
    assert sc.value("tokengate_tokens_accepted_total", coordinator="obs-one") == 1
    assert sc.value("tokengate_tokens_accepted_total", coordinator="obs-two") == 2
