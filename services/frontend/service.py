"""The frontend service: HTTP API + NATS generate service over one shared pipeline."""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field

from genset.routing.api import DEFAULT_ROUTE_TIMEOUT_S, POLICY_NAMES, ROUTER_MODE_INPUTS
from genset.runtime.config import ConfigError, opt
from genset.runtime.service import Service
from genset.runtime.timeline import TimelineSink
from services.frontend import routing
from services.frontend.dashboard import Dashboard
from services.frontend.http_app import FrontendHttp, error_body
from services.frontend.httpserver import HttpServer
from services.frontend.metrics import FrontendMetrics
from services.frontend.nats_service import NatsGenerateService
from services.frontend.pipeline import Pipeline
from services.frontend.registry import ModelRegistry
from services.frontend.stats import FrontendStatsPublisher

# The cyclic GC's youngest generation is collected after this many net allocations (Python's
# default: 700). A c=64 burst allocates a few hundred tracked objects per request (tasks,
# coroutines, streams, Structs, the prompt's id list) that live as long as the request; at 700
# they were walked again and again and promoted, and generation-1 collections of 7-11 ms fell
# inside the burst's intake in 4 of 12 timed runs. At 10,000, 3 alternated c=64 runs each
# (docs/benchmarks.md issue 15 §5n): no collection of 5 ms or more in a run, TTFT p99 668.3 /
# 707.9 / 700.2 ms against 724.0 / 731.7 / 706.3. Most objects die by reference count
# anyway; the collector is only for cycles.
GC_YOUNG_THRESHOLD = 10_000


@dataclass
class FrontendOptions:
    port: int = field(default=8000, metadata=opt("port of the OpenAI-compatible HTTP API",
                                                 min=0, max=65535))
    http_host: str | None = field(default=None, metadata=opt(
        "address the HTTP API listens on (default: --host)"))
    router: str = field(default="auto", metadata=opt(
        "how workers are picked: auto (service if a router service runs, else embedded), "
        "embedded (the KV-aware router in this process), service (ask the router service), "
        f"or a routing policy run embedded ({', '.join(POLICY_NAMES)})",
        choices=ROUTER_MODE_INPUTS))
    router_timeout: float = field(default=DEFAULT_ROUTE_TIMEOUT_S, metadata=opt(
        "seconds a request waits for the router service before it is routed in this process",
        min=0.001))
    router_fallback: bool = field(default=True, metadata=opt(
        "with the router service: keep its policy warm in this process and route with it while "
        "no router answers (off: such requests fail with 503 'router unavailable')"))
    router_local_first: bool = field(default=True, metadata=opt(
        "with the router service and its fallback: decide every request in this process with "
        "the warm copy of the service's policy and state, and tell the service (no round trip "
        "per request); off: ask the service for every request"))
    request_timeout: float = field(default=600.0, metadata=opt(
        "deadline of every request, seconds", min=0.1))
    migration_limit: int = field(default=3, metadata=opt(
        "times a request may move to another worker after its worker failed", min=0))
    heartbeat_timeout: float = field(default=1.5, metadata=opt(
        "silence from a worker (seconds) after which it is presumed dead and its requests "
        "move on (workers heartbeat after at most 0.625 s of silence)", min=0.5))
    api_key: str | None = field(default=None, metadata=opt(
        "require `Authorization: Bearer <key>` on /v1 endpoints (comma-separated keys)",
        secret=True))
    coalesce: bool = field(default=True, metadata=opt(
        "send the tokens of worker frames that queued up while the frontend was busy as one "
        "event (fewer, larger SSE chunks under load; off: one event per worker frame)"))
    nats_max_concurrent: int = field(default=4096, metadata=opt(
        "NATS-native generate requests in progress before new ones are refused", min=1))
    reuse_port: bool = field(default=False, metadata=opt(
        "share --port with other frontend processes on this host (SO_REUSEPORT: the kernel "
        "spreads new connections over them; `genset up --frontends N`)"))
    timeline: str = field(default="", metadata=opt(
        "append each request's timeline (when it reached each stage, frontend and worker; "
        "JSON lines, see genset/runtime/timeline.py; bench/timeline_report.py summarises it) "
        "to this file (empty: off, no cost)"))


class FrontendService(Service):
    component = "frontend"

    def __init__(self, config, options: FrontendOptions) -> None:
        super().__init__(config)
        self.options = options
        self.frontend_metrics = FrontendMetrics(self.metrics.registry)
        self.registry: ModelRegistry | None = None
        self.router = None
        self.pipeline: Pipeline | None = None
        self.stats: FrontendStatsPublisher | None = None
        self.nats_service: NatsGenerateService | None = None
        self.server: HttpServer | None = None
        self.dashboard: Dashboard | None = None
        self.timeline: TimelineSink | None = None
        self.api_url = ""

    async def start(self) -> None:
        opts = self.options
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        self.registry = ModelRegistry(self.discovery, self.namespace)
        await self.registry.start()
        self.router = await routing.create(opts.router, bus=self.bus, discovery=self.discovery,
                                           namespace=self.namespace,
                                           route_timeout=opts.router_timeout,
                                           fallback=opts.router_fallback, metrics=self.metrics,
                                           local_first=opts.router_local_first)
        await self.router.start()
        self.stats = FrontendStatsPublisher(self.bus, self.namespace, self.instance_id)
        self.stats.start()  # the planner's view of the traffic (services/frontend/stats.py)
        if opts.timeline:
            try:
                self.timeline = TimelineSink(opts.timeline)
            except OSError as exc:
                raise ConfigError(f"--timeline {opts.timeline}: cannot open for appending: "
                                  f"{exc.strerror or exc}") from None
        self.pipeline = Pipeline(bus=self.bus, registry=self.registry, router=self.router,
                                 metrics=self.frontend_metrics,
                                 request_timeout=opts.request_timeout,
                                 migration_limit=opts.migration_limit,
                                 heartbeat_timeout=opts.heartbeat_timeout,
                                 coalesce=opts.coalesce, stats=self.stats,
                                 timeline=self.timeline)
        self.nats_service = NatsGenerateService(self.pipeline, self.bus, self.namespace,
                                                max_concurrent=opts.nats_max_concurrent)
        await self.nats_service.start()
        self.subjects["generate"] = self.nats_service.subject

        self.dashboard = Dashboard(bus=self.bus, discovery=self.discovery,
                                   namespace=self.namespace, registry=self.registry,
                                   metrics=self.frontend_metrics)
        await self.dashboard.start()
        http = FrontendHttp(self.pipeline, health=self.health, metrics_text=self.metrics.render,
                            api_keys=(opts.api_key or "").split(","), dashboard=self.dashboard)
        host = opts.http_host or self.config.host
        self.server = HttpServer(http.handle, error_body=error_body, body_limit=http.body_limit)
        try:
            port = await self.server.start(host, opts.port, reuse_port=opts.reuse_port)
        except OSError as exc:  # say which flags chose the address, not just errno
            flags = ("--http-host" if opts.http_host else "--host") + ", --port"
            raise ConfigError(f"cannot serve the HTTP API on {host}:{opts.port} ({flags}): "
                              f"{exc.strerror or exc}") from None
        self.api_url = f"http://{host}:{port}"
        self.labels["api_url"] = self.api_url
        self.log.info("http_api", url=self.api_url, router=opts.router)

    def _inflight(self) -> float:
        return sum(s.value for m in self.frontend_metrics.inflight.collect() for s in m.samples)

    async def drain(self) -> None:
        if self.nats_service is not None:
            await self.nats_service.stop()
        if self.server is not None:
            # No new connections or requests; wait for the requests in flight to finish.
            await self.server.stop_accepting()
            await self.server.wait_idle()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()
        if self.dashboard is not None:
            with contextlib.suppress(Exception):
                await self.dashboard.close()
        if self.router is not None:
            with contextlib.suppress(Exception):
                await self.router.close()
        if self.registry is not None:
            with contextlib.suppress(Exception):
                await self.registry.close()
        if self.pipeline is not None:
            self.pipeline.close()
        if self.timeline is not None:
            self.timeline.close()

    def health(self) -> dict:
        body = super().health()
        body["api_url"] = self.api_url
        body["models"] = sorted(self.registry.models) if self.registry is not None else []
        body["inflight"] = self._inflight()
        return body
