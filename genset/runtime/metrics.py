"""Prometheus metrics for a service.

Each service owns a `Metrics` (its own CollectorRegistry, so two services in one test
process never collide); metric names get the `genset_` prefix. Creating a metric that
already exists returns the existing one, so modules can declare their metrics at start-up
without coordinating. `LATENCY_BUCKETS` suit TTFT / inter-token latency in seconds.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

PREFIX = "genset_"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)
FAST_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                0.01, 0.025, 0.1)  # e.g. router decision time


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, *,
                 process_metrics: bool = True):
        if registry is None:
            registry = CollectorRegistry()
            if process_metrics:
                ProcessCollector(registry=registry)
                PlatformCollector(registry=registry)
        self.registry = registry
        self._metrics: dict[str, object] = {}

    def _name(self, name: str) -> str:
        return name if name.startswith(PREFIX) else PREFIX + name

    def _get(self, kind, name: str, doc: str, labels: Sequence[str], **kw):
        full = self._name(name)
        existing = self._metrics.get(full)
        if existing is not None:
            if not isinstance(existing, kind):
                raise ValueError(f"metric {full} already exists as a {type(existing).__name__}")
            return existing
        metric = kind(full, doc, labelnames=tuple(labels), registry=self.registry, **kw)
        self._metrics[full] = metric
        return metric

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        return self._get(Counter, name, doc, labels)

    def gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        return self._get(Gauge, name, doc, labels)

    def histogram(self, name: str, doc: str, labels: Sequence[str] = (),
                  buckets: Sequence[float] = LATENCY_BUCKETS) -> Histogram:
        return self._get(Histogram, name, doc, labels, buckets=tuple(buckets))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric in this registry."""
        return generate_latest(self.registry)

    content_type = CONTENT_TYPE
