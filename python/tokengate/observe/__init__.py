"""Observability for TokenGate coordinators (issue #9).

Submodules, imported on demand so that ``import tokengate`` pulls in no exporter library:

* :mod:`tokengate.observe.metrics`: Prometheus export (``coordinator.serve_metrics()``,
  :class:`~tokengate.observe.metrics.TokenGateCollector`);
* :mod:`tokengate.observe.events`: the lifecycle event feed (``coordinator.events``);
* :mod:`tokengate.observe.otel`: OpenTelemetry tracing of attempts (``tracing=True``).
"""
