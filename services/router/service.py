"""`genset router`: the router as its own service.

Answers `proto.RouteRequest` on `proto.subjects.route(ns)` in the queue group "router", so
replicas share the requests; every decision is broadcast on `route_decisions(ns)` and every
replica applies the others' decisions to its load model, so they agree on who is busy. KV
events, load reports, lifecycle and membership come in through `RouterFeeds`; on start every
worker in etcd is asked for a KV snapshot, so a restarted router routes with a full index
within a round trip.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import proto
from genset.routing.api import POLICY_GENSET, POLICY_INPUTS, POLICY_NAMES, policy_name
from genset.routing.core import RouterConfig, RouterCore
from genset.routing.feeds import RouterFeeds
from genset.runtime.config import opt
from genset.runtime.service import Service
from proto import subjects

QUEUE_GROUP = "router"
# After an ask, the router reads NATS unpaced for this long (RouterOptions.read_pace_ms;
# its help text says 10 s too).
HURRY_S = 10.0


@dataclass
class RouterOptions:
    policy: str = field(default=POLICY_GENSET, metadata=opt(
        f"default routing policy ({', '.join(POLICY_NAMES)}); a request may name another",
        choices=POLICY_INPUTS))
    block_size: int = field(default=16, metadata=opt(
        "KV block size in tokens of workers without a model card", min=1))
    event_silence_s: float = field(default=10.0, metadata=opt(
        "alarm when a worker we route to publishes no KV event for this many seconds", min=0.1))
    seed: int | None = field(default=None, metadata=opt("seed of tie-breaking randomness"))
    # What onboarding a block from the KV offload store costs a worker that has not reported
    # its own measured cost yet (proto.LoadReport; a worker that has is priced with it).
    onboard_kv_bytes_per_token: float = field(default=131072.0, metadata=opt(
        "genset policy: KV bytes per token of a worker that reported none measured "
        "(the default: Llama 3 8B's, bf16)", min=0, max=float(64 << 20)))
    onboard_ram_gbps: float = field(default=32.0, metadata=opt(
        "genset policy: GB/s a worker that reported none measured onboards the offload "
        "store's RAM blocks at", min=1e-9))
    onboard_disk_gbps: float = field(default=4.0, metadata=opt(
        "genset policy: GB/s the offload store reads its disk blocks at, for a worker that "
        "reported none measured", min=1e-9))
    read_pace_ms: float = field(default=20.0, metadata=opt(
        "while not asked to route for 10 s (frontends decide locally first), read NATS at "
        "most every this many ms, so that the feeds' messages wake the router in batches; "
        "an ask ends it at once (0: read every message as it comes)", min=0,
        env="GENSET_ROUTER_READ_PACE_MS"))


class RouterService(Service):
    component = "router"

    def __init__(self, config, options: RouterOptions | None = None) -> None:
        super().__init__(config)
        self.options = options or RouterOptions()
        o = self.options
        self.policy = policy_name(o.policy)
        onboard = {"kv_bytes_per_token": o.onboard_kv_bytes_per_token,
                   "host_gbps": o.onboard_ram_gbps, "disk_gbps": o.onboard_disk_gbps}
        self.core = RouterCore(RouterConfig(
            policy=self.policy, block_size=o.block_size, event_silence_s=o.event_silence_s,
            seed=o.seed, router_id=self.instance_id,
            policy_options=onboard if self.policy == POLICY_GENSET else {}))
        if self.policy != POLICY_GENSET:
            self.core.policy(POLICY_GENSET, **onboard)  # for requests that name it
        self.feeds: RouterFeeds | None = None
        self._sub = None
        self._decisions_subject = subjects.route_decisions(self.namespace)

    async def start(self) -> None:
        self.feeds = RouterFeeds(self.core, bus=self.bus, namespace=self.namespace,
                                 discovery=self.discovery, metrics=self.metrics)
        await self.feeds.start()
        route_subject = subjects.route(self.namespace)
        self._sub = await self.bus.serve(route_subject, self._on_route, queue=QUEUE_GROUP)
        if self.options.read_pace_ms > 0:
            self.bus.pace_reads(self.options.read_pace_ms / 1000)
        self.subjects = {"route": route_subject, "decisions": self._decisions_subject}
        self.labels = {"policy": self.policy}
        self.log.info("router ready", policy=self.policy, workers=len(self.core.workers))

    async def _on_route(self, data: bytes):
        t0 = time.perf_counter()
        self.bus.hurry_reads(HURRY_S)  # asked: the next asks are read as they come
        try:
            req = proto.decode(data, proto.RouteRequest)
        except proto.ProtocolError as exc:
            self.feeds._bad("route_request", exc)
            return proto.RouteDecision(request_id="", worker_id=None, error=str(exc),
                                       router_id=self.instance_id)
        decision = self.core.route(req)
        self.feeds.record_decision(decision, t0)
        if decision.worker_id is not None:
            with contextlib.suppress(Exception):
                await self.bus.publish(self._decisions_subject, decision)
        return decision

    async def drain(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def stop(self) -> None:
        if self.feeds is not None:
            await self.feeds.close()

    def health(self) -> dict:
        h = super().health()
        h["workers"] = len(self.core.workers)
        h["alarms"] = list(self.core.alarms.values())
        h["decisions"] = self.core.decisions
        return h
