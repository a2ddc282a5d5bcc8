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

    `wait_for_worker_s` (the frontend's embedded router; 0 for the warm copy beside the router
    service, which asks the service instead): a request for a model this router knows no
    worker of waits up to that long for one to join before it is answered "no worker". The
    frontend's model registry and these feeds watch etcd separately, so a worker the registry
    has just listed (the frontend already lets its model's requests in) can be a moment away
    here: the request waits for it instead of failing, as the router service answered it
    before the default stack embedded the router.
    """

    def __init__(self, bus, namespace: str, *, discovery=None, policy: str = POLICY_GENSET,
                 model: str | None = None, metrics=None, broadcast: bool = True,
                 wait_for_worker_s: float = 0.0, **options) -> None:
        options.setdefault("router_id", random.getrandbits(62) or 1)
        self.core = RouterCore(RouterConfig(policy=policy, **options))
        self.feeds = RouterFeeds(self.core, bus=bus, namespace=namespace, discovery=discovery,
                                 metrics=metrics)
        self.bus = bus
        self.namespace = namespace
        self.model = model
        self.broadcast = broadcast
        self.wait_for_worker_s = wait_for_worker_s
        self._decisions_subject = subjects.route_decisions(namespace)

    async def start(self) -> None:
        await self.feeds.start()

    async def route(self, req: proto.RouteRequest) -> proto.RouteDecision:
        t0 = time.perf_counter()
        decision = self.core.route(req)
        if decision.worker_id is None and self.wait_for_worker_s > 0:
            decision = await self._wait_for_worker(req, decision)
        self.feeds.record_decision(decision, t0)
        if self.broadcast and decision.worker_id is not None:
            with contextlib.suppress(Exception):  # replicas' views are best effort
                await self.bus.publish(self._decisions_subject, decision)
        return decision

    async def _wait_for_worker(self, req: proto.RouteRequest,
                               decision: proto.RouteDecision) -> proto.RouteDecision:
        """Route again each time a worker joins, until one is picked or `wait_for_worker_s`
        passed; only while no worker of the model is known at all (not when the request's
        exclusions left none, nor for a bad request)."""
        core = self.core
        deadline = time.monotonic() + self.wait_for_worker_s
        while decision.worker_id is None and not core.eligible(req.model):
            left = deadline - time.monotonic()
            if left <= 0 or not await self.feeds.wait_worker_joined(left):
                break
            decision = core.route(req)
        return decision

    def on_first_token(self, request_id: str) -> None:
        self.core.on_first_token(request_id)

    def on_done(self, request_id: str) -> None:
        self.core.on_done(request_id)

    async def close(self) -> None:
        await self.feeds.close()
