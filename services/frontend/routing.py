"""Choosing the router: the router engineer's `services.router.api.create_router`, or a small
built-in round-robin / least-loaded picker over the workers the registry knows.

The built-in picker implements the same `Router` protocol (route / on_first_token / on_done),
so the pipeline never cares which one it got. It is the fallback when the router package is
not available in this installation, and the cheapest choice when routing quality does not
matter (`--router round-robin`).
"""

from __future__ import annotations

import itertools

import structlog

import proto
from proto import keys
from services.frontend.registry import ModelRegistry

log = structlog.get_logger("frontend.routing")

BUILTIN_MODES = ("round-robin", "least-loaded")


class BuiltinRouter:
    def __init__(self, registry: ModelRegistry, mode: str = "round-robin") -> None:
        if mode not in BUILTIN_MODES:
            raise ValueError(f"unknown built-in router mode {mode!r}: use {' or '.join(BUILTIN_MODES)}")
        self.registry = registry
        self.mode = mode
        self._counter = itertools.count()
        self._load: dict[int, int] = {}  # worker -> requests in flight from this frontend
        self._assigned: dict[str, int] = {}  # request id -> worker

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def route(self, req: proto.RouteRequest) -> proto.RouteDecision:
        entry = self.registry.get(req.model)
        workers = [w for w in (entry.cards if entry else ()) if w not in req.exclude]
        if not workers:
            return proto.RouteDecision(request_id=req.request_id, worker_id=None, model=req.model,
                                       policy=self.mode, error="no worker serves this model")
        if self.mode == "least-loaded":
            start = next(self._counter)  # rotate ties so equal loads still spread
            n = len(workers)
            worker = min((workers[(start + i) % n] for i in range(n)),
                         key=lambda w: self._load.get(w, 0))
        else:
            workers.sort()
            worker = workers[next(self._counter) % len(workers)]
        self._load[worker] = self._load.get(worker, 0) + 1
        self._assigned[req.request_id] = worker
        return proto.RouteDecision(request_id=req.request_id, worker_id=worker, model=req.model,
                                   prompt_tokens=len(req.token_ids) // 4, policy=self.mode)

    def on_first_token(self, request_id: str) -> None:
        pass

    def on_done(self, request_id: str) -> None:
        worker = self._assigned.pop(request_id, None)
        if worker is not None:
            left = self._load.get(worker, 1) - 1
            if left > 0:
                self._load[worker] = left
            else:
                self._load.pop(worker, None)


async def create(mode: str, *, bus, discovery, registry: ModelRegistry, namespace: str):
    """`mode`: auto | embedded | remote | round-robin | least-loaded | a router policy name.

    auto = remote when a router service is registered in etcd, else embedded. When the router
    package cannot provide the mode, the built-in picker is used (and said so in the log).
    """
    if mode in BUILTIN_MODES:
        return BuiltinRouter(registry, mode)
    if mode == "auto":
        routers = await discovery.get_prefix(keys.instances_prefix(namespace, "router"))
        mode = "remote" if routers else "embedded"
    try:
        from services.router.api import create_router

        # caller_reports: the pipeline tells an embedded router of first token / done itself
        router = create_router(mode.replace("-", "_"), bus=bus, namespace=namespace,
                               discovery=discovery, caller_reports=True)
    except ImportError as exc:
        log.warning("router_unavailable_using_builtin", mode=mode, error=str(exc))
        return BuiltinRouter(registry, "least-loaded")
    log.info("router", mode=mode)
    return router
