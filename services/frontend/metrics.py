"""The frontend's Prometheus metrics (served at /metrics on the API port)."""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25,
                0.5, 1.0, 2.5)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class FrontendMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("genset_frontend_time_to_first_token_seconds",
                              "Time from request arrival to the first generated token",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("genset_frontend_inter_token_latency_seconds",
                             "Time between consecutive generated tokens (a chunk of k tokens "
                             "counts as k gaps of 1/k of the wait)",
                             ["model"], buckets=_ITL_BUCKETS, registry=r)
        self.duration = Histogram("genset_frontend_request_duration_seconds",
                                  "Request duration, arrival to last byte", ["model"],
                                  buckets=_DURATION_BUCKETS, registry=r)
        self.inflight = Gauge("genset_frontend_inflight_requests",
                              "Requests being served now", ["model"], registry=r)
        self.requests = Counter("genset_frontend_requests",
                                "Finished requests by endpoint and outcome",
                                ["model", "endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("genset_frontend_prompt_tokens", "Prompt tokens", ["model"],
                                     registry=r)
        self.output_tokens = Counter("genset_frontend_output_tokens", "Generated tokens",
                                     ["model"], registry=r)
        self.cached_tokens = Counter("genset_frontend_cached_tokens",
                                     "Prompt tokens served from a KV cache", ["model"], registry=r)
        self.migrations = Counter("genset_frontend_migrations",
                                  "Requests moved to another worker after a worker failed",
                                  ["model", "phase"], registry=r)
        self.worker_failures = Counter(
            "genset_frontend_worker_failures",
            "Workers marked suspect (kept out of routing until they prove alive) after a "
            "request failed on them, by how it failed", ["model", "reason"], registry=r)
        self.suspect_routes = Counter(
            "genset_frontend_suspect_routes",
            "Requests routed to a suspect worker because no other worker could take them",
            ["model"], registry=r)
        self.disconnects = Counter("genset_frontend_client_disconnects",
                                   "Streams the client closed before the end", ["model"],
                                   registry=r)
        self._models: dict[str, ModelMetrics] = {}

    def model(self, name: str) -> ModelMetrics:
        """The children of one served model's series, looked up once: prometheus_client's
        `labels()` takes a lock and builds a key each call (~3-10 us measured), and a
        request used it 9 times. Names are served models (a few); the map is bounded anyway."""
        found = self._models.get(name)
        if found is None:
            if len(self._models) >= _MAX_MODELS:
                self._models.clear()
            found = self._models[name] = ModelMetrics(self, name)
        return found


_MAX_MODELS = 256


class ModelMetrics:
    """One model's children of the per-model series (`FrontendMetrics.model`)."""

    __slots__ = ("_parent", "_requests", "cached_tokens", "disconnects", "duration",
                 "inflight", "itl", "name", "output_tokens", "prompt_tokens", "ttft")

    def __init__(self, parent: FrontendMetrics, name: str) -> None:
        self.name = name
        self._parent = parent
        self.ttft = parent.ttft.labels(name)
        self.itl = parent.itl.labels(name)
        self.duration = parent.duration.labels(name)
        self.inflight = parent.inflight.labels(name)
        self.prompt_tokens = parent.prompt_tokens.labels(name)
        self.output_tokens = parent.output_tokens.labels(name)
        self.cached_tokens = parent.cached_tokens.labels(name)
        self.disconnects = parent.disconnects.labels(name)
        self._requests: dict[tuple[str, str], object] = {}  # (endpoint, status) -> child

    def requests(self, endpoint: str, status: str):
        key = (endpoint, status)
        child = self._requests.get(key)
        if child is None:
            if len(self._requests) >= _MAX_MODELS:  # statuses are a few codes; bounded anyway
                self._requests.clear()
            child = self._requests[key] = self._parent.requests.labels(self.name, endpoint,
                                                                         status)
        return child


class LocalHistogram:
    """Per-request accumulation of a histogram child, added to it once at the end.

    The inter-token latency is observed per chunk (64 times for a 64-token reply); bucketing
    locally and flushing once saves most of prometheus_client's per-observe cost. Falls back
    to plain observe() if the client library's internals differ.
    """

    __slots__ = ("_bounds", "_child", "_counts", "_sum")

    def __init__(self, child) -> None:
        self._child = child
        bounds = getattr(child, "_upper_bounds", None)
        self._bounds = bounds if isinstance(bounds, list) and hasattr(child, "_buckets") else None
        self._counts = [0] * len(bounds) if self._bounds else []
        self._sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        if self._bounds is None:
            for _ in range(count):
                self._child.observe(value)
            return
        self._counts[bisect_left(self._bounds, value)] += count
        self._sum += value * count

    def flush(self) -> None:
        if self._bounds is None or (not self._sum and not any(self._counts)):
            return
        buckets = self._child._buckets
        for i, n in enumerate(self._counts):
            if n:
                buckets[i].inc(n)
                self._counts[i] = 0
        self._child._sum.inc(self._sum)
        self._sum = 0.0
