"""The router in the caller's process (a frontend with `--router embedded` or a policy name)."""

from __future__ import annotations

import contextlib
import random
import time

import proto
from genset.routing.api import POLICY_GENSET
from genset.routing.core import RouterConfig, RouterCore
from genset.routing.feeds import RouterFeeds
from proto import subjects


class EmbeddedRouter:
    """Index, load model and policies in-process, fed from the bus (see `RouterFeeds`).

    Its decisions are broadcast on `route_decisions(ns)` like a router replica's, so several
    frontends embedding a router (or a mix with `genset router` services) share one load view.
    """

    def __init__(self, bus, namespace: str, *, discovery=None, policy: str = POLICY_GENSET,
                 model: str | None = None, metrics=None, broadcast: bool = True, **options) -> None:
        options.setdefault("router_id", random.getrandbits(62) or 1)
        self.core = RouterCore(RouterConfig(policy=policy, **options))
        self.feeds = RouterFeeds(self.core, bus=bus, namespace=namespace, discovery=discovery,
                                 metrics=metrics)
        self.bus = bus
        self.namespace = namespace
        self.model = model
        self.broadcast = broadcast
        self._decisions_subject = subjects.route_decisions(namespace)

    async def start(self) -> None:
        await self.feeds.start()

    async def route(self, req: proto.RouteRequest) -> proto.RouteDecision:
        t0 = time.perf_counter()
        decision = self.core.route(req)
        self.feeds.record_decision(decision, t0)
        if self.broadcast and decision.worker_id is not None:
            with contextlib.suppress(Exception):  # replicas' views are best effort
                await self.bus.publish(self._decisions_subject, decision)
        return decision

    def on_first_token(self, request_id: str) -> None:
        self.core.on_first_token(request_id)

    def on_done(self, request_id: str) -> None:
        self.core.on_done(request_id)

    async def close(self) -> None:
        await self.feeds.close()
