"""Ask the `genset router` service (any replica: they share one queue group)."""

from __future__ import annotations

import proto
from genset.runtime.bus_errors import BusError
from proto import subjects


class RemoteRouter:
    """`route()` is a NATS request to `proto.subjects.route(ns)`. A router that cannot be
    reached gives a decision with `worker_id=None` and an `error` naming why (the caller may
    fall back, e.g. to round-robin over the workers it knows).

    `on_first_token` / `on_done` are no-ops here: workers publish `RequestLifecycle` for every
    request themselves, and every router replica listens to it.
    """

    def __init__(self, bus, namespace: str, *, timeout: float = 2.0, policy: str | None = None) -> None:
        self.bus = bus
        self.namespace = namespace
        self.timeout = timeout
        self.policy = policy
        self.subject = subjects.route(namespace)

    async def start(self) -> None:
        return None

    async def route(self, req: proto.RouteRequest) -> proto.RouteDecision:
        if self.policy and not req.policy:
            req.policy = self.policy
        try:
            reply = await self.bus.request(self.subject, req, timeout=self.timeout,
                                           reply_type=proto.RouteDecision)
        except (BusError, proto.ProtocolError) as exc:
            return proto.RouteDecision(request_id=req.request_id, worker_id=None, model=req.model,
                                       error=f"router unavailable: {type(exc).__name__}: {exc}")
        if isinstance(reply, bytes | bytearray):
            reply = proto.decode(bytes(reply), proto.RouteDecision)
        return reply

    def on_first_token(self, request_id: str) -> None:
        return None

    def on_done(self, request_id: str) -> None:
        return None

    async def close(self) -> None:
        return None
