"""Ask the `genset router` service (any replica: they share one queue group); with a fallback
router, route with the same policy in this process while no router service answers.

Why a fallback and not a 503: the frontend knows every worker (model cards in etcd) and has the
routing code, so a router that crashed, restarts or hangs must not stop the serving. The
fallback is an `EmbeddedRouter` kept warm from the start: it follows the same feeds a router
replica does (KV events, load reports, lifecycle, membership) and applies the service's own
decisions (`route_decisions`) to its load model, so the decision it takes when the service is
gone is the one the service would have taken. Keeping it warm costs the frontend one more copy
of the prefix index (~130 B per cached block held by any worker) and ~2.4 us of CPU per block
event (decode + apply, measured on this machine's CPU: 10k block events/s are ~2.4% of one
core); `create_router(..., fallback=False)` (`genset frontend --no-router-fallback`) saves it
and gives "router unavailable" answers instead.

Local first (the default with a fallback, `local_first=True`): the warm copy decides every
request in this process and the decision is broadcast on `route_decisions(ns)` without
waiting (as every replica's is), so the service and the other replicas apply it to their load
models as they apply each other's. The service is asked only when this process cannot decide
(no worker known here yet: a worker the service has seen first, the first moments after a
start). Why: asking costs a NATS round trip to another process on every request, which on a
busy host is not a fraction of a millisecond but that process's scheduling delay: measured
with `--timeline` at concurrency 16 on a loaded 2-core machine, the wait for the service's
answer was 58 ms p50 / 201 ms p99 (31 % of TTFT) against 0.3 / 20 ms embedded, and requests
held there reached the workers in clumps, which made their prefill steps longer. The decision
is the same one: same policy (the service's, from its etcd record or answers), same KV events,
load reports, lifecycle and peer decisions (the router replicas' agreement, checked in the
replay, covers it). `local_first=False` asks the service for every request (the behaviour
before; `genset frontend --no-router-local-first`).
"""

from __future__ import annotations

import asyncio
import time

import structlog

import proto
from genset.routing.api import policy_name
from genset.runtime.bus_errors import BusError, NoResponders, RequestTimeout
from proto import keys, subjects

log = structlog.get_logger("genset.routing.remote")

# Why a decision came from the fallback (label of genset_frontend_router_fallback_decisions).
REASON_UNAVAILABLE = "unavailable"  # the service was asked: no responders, timeout, bus down
REASON_ROUTER_DOWN = "router_down"  # not asked: it failed recently / none is registered
REASON_NO_WORKER = "no_worker"  # it answered without a worker, the fallback knew one
REASON_LOCAL_FIRST = "local_first"  # decided here by design (local_first), the service told


ASK = "ask"  # ask the service
PROBE = "probe"  # ask the service to learn whether it is back (one at a time)
FALL_BACK = "fall_back"  # route with the fallback without asking


class FallbackState:
    """When to ask the router service and when to route with the fallback. Pure: the caller
    passes the clock (`now`, seconds) in.

    While the service answers (`fallback` False) every request asks it. A failed ask (no
    responders, timeout, bus down), or etcd showing no router registered, switches to the
    fallback: requests are routed by the fallback at once, and one request at a time asks the
    service again (a probe) every `probe_interval` seconds, doubling up to
    `max_probe_interval` while probes keep failing (a hung router costs a probe at most the
    route timeout; a dead one gets "no responders" at once). Any answer switches back. A
    router registering in etcd makes the next request a probe.
    """

    def __init__(self, *, probe_interval: float = 1.0, max_probe_interval: float = 10.0) -> None:
        if not 0 < probe_interval <= max_probe_interval:
            raise ValueError("need 0 < probe_interval <= max_probe_interval")
        self.probe_interval = probe_interval
        self.max_probe_interval = max_probe_interval
        self.fallback = False
        self.reason = ""
        self._interval = probe_interval
        self._next_probe = 0.0
        self._probing = False

    def decide(self, now: float) -> str:
        """ASK, PROBE or FALL_BACK for the next request. After ASK or PROBE report the outcome
        with `answered` / `failed` (or `abandoned` if the request went away first)."""
        if not self.fallback:
            return ASK
        if self._probing or now < self._next_probe:
            return FALL_BACK
        self._probing = True
        return PROBE

    def answered(self, now: float, how: str = ASK) -> bool:
        """The service answered. True when this switches back from the fallback."""
        if how == PROBE:
            self._probing = False
        if not self.fallback:
            return False
        self.fallback = False
        self.reason = ""
        self._probing = False
        self._interval = self.probe_interval
        return True

    def failed(self, now: float, reason: str, how: str = ASK) -> bool:
        """An ask failed. True when this switches to the fallback."""
        if how == PROBE:
            self._probing = False
            self._interval = min(self._interval * 2, self.max_probe_interval)
            self._next_probe = now + self._interval
        if self.fallback:
            return False
        self.fallback = True
        self.reason = reason
        self._interval = self.probe_interval
        self._next_probe = now + self._interval
        return True

    def abandoned(self, how: str) -> None:
        """The request went away (cancelled) before an outcome: another may probe."""
        if how == PROBE:
            self._probing = False

    def routers_registered(self, count: int, now: float) -> bool:
        """etcd's list of router instances changed. None registered: fall back without asking
        (still probing, rarely: etcd's view may be stale). One (re)appearing: probe now.
        True when this switches to the fallback."""
        if count == 0:
            switched = self.failed(now, "no router registered in etcd")
            self._next_probe = now + self.max_probe_interval
            return switched
        if self.fallback:
            self._interval = self.probe_interval
            self._next_probe = now
        return False


class RemoteRouter:
    """`route()` is a NATS request to `proto.subjects.route(ns)` that waits at most `timeout`
    seconds. Without a fallback, a router that cannot be reached gives a decision with
    `worker_id=None` and an `error` naming why. With a `fallback` router (see the module
    docstring), such a request is routed by the fallback instead, and so is every request
    while the service is down (`FallbackState`); `discovery` lets etcd's list of router
    instances speed both ways up; `metrics` (a `genset.runtime.metrics.Metrics`) gets
    `genset_frontend_router_fallback` (1 while falling back) and
    `genset_frontend_router_fallback_decisions{reason}`.

    `on_first_token` / `on_done` reach the fallback for the requests it routed (and nothing
    else): for those the caller is its one source; the service's own decisions are followed
    through the workers' `RequestLifecycle`, which every router replica listens to.
    """

    def __init__(self, bus, namespace: str, *, timeout: float = 0.5, policy: str | None = None,
                 fallback=None, discovery=None, metrics=None,
                 state: FallbackState | None = None, clock=time.monotonic,
                 local_first: bool = True) -> None:
        if timeout <= 0:
            raise ValueError(f"router timeout must be positive, got {timeout!r}")
        self.bus = bus
        self.namespace = namespace
        self.timeout = timeout
        self.policy = policy
        self.subject = subjects.route(namespace)
        self.fallback = fallback
        # decide here first (module docstring); needs the warm copy
        self.local_first = local_first and fallback is not None
        self.discovery = discovery
        self.state = state or FallbackState()
        self.clock = clock
        self._routers = None  # etcd membership of router instances
        self._service_policy = policy  # the service's default, learned from its answers
        self._gauge = self._decisions = self._local_decisions = None
        self._routed_here: set[str] = set()  # in flight, routed by the fallback
        if metrics is not None and fallback is not None:
            self._gauge = metrics.gauge(
                "frontend_router_fallback",
                "1 while requests are routed in the frontend because the router service does "
                "not answer (or none is registered)")
            self._decisions = metrics.counter(
                "frontend_router_fallback_decisions",
                "Requests routed by the frontend's fallback router, by why", ["reason"])
            self._local_decisions = self._decisions.labels(REASON_LOCAL_FIRST)

    async def start(self) -> None:
        if self.fallback is None:
            return
        await self.fallback.start()
        if self.discovery is None:
            return
        prefix = keys.instances_prefix(self.namespace, "router")
        try:
            self._routers = await self.discovery.watch(prefix, proto.InstanceRecord)
            listed = True
        except Exception as exc:  # etcd away: asking the service tells us soon enough
            log.warning("etcd not answering; router instances unknown", error=repr(exc))
            self._routers = await self.discovery.watch(prefix, proto.InstanceRecord,
                                                       require_initial=False)
            listed = False
        for record in list(self._routers.items.values()):
            self._learn_policy(record)
        self._routers.add_listener(self._on_router_record)
        if listed and not self._routers.items:
            self._on_router_record("delete", "", None)  # none registered: fall back now

    def _learn_policy(self, record) -> None:
        """Decide as the service does: its default policy is in its record's labels."""
        if self.policy is not None or not isinstance(record, proto.InstanceRecord):
            return
        named = record.labels.get("policy")
        if named:
            try:
                self._service_policy = policy_name(named)
            except ValueError:
                log.warning("router record names an unknown policy", policy=named)

    def _on_router_record(self, kind: str, key: str, value) -> None:
        if kind == "put":
            self._learn_policy(value)
        count = len(self._routers.items) if self._routers is not None else 0
        if self.state.routers_registered(count, self.clock()):
            self._switched(True)

    def _switched(self, to_fallback: bool) -> None:
        if to_fallback:
            log.warning("router service not answering: routing in this process until it does",
                        reason=self.state.reason, timeout_s=self.timeout)
        else:
            log.info("router service answers again: routing through it")
        if self._gauge is not None:
            self._gauge.set(1 if to_fallback else 0)

    async def ask(self, req: proto.RouteRequest) -> proto.RouteDecision:
        """The service's decision; raises BusError / ProtocolError when it does not give one
        within `timeout` seconds (never waits longer)."""
        if self.policy and not req.policy:
            req.policy = self.policy
        try:
            async with asyncio.timeout(self.timeout):
                reply = await self.bus.request(self.subject, req, timeout=self.timeout,
                                               reply_type=proto.RouteDecision)
        except TimeoutError:  # the bus itself was stuck (e.g. reconnecting)
            raise RequestTimeout(f"no reply on {self.subject} within {self.timeout:g} s") from None
        if isinstance(reply, bytes | bytearray):
            reply = proto.decode(bytes(reply), proto.RouteDecision)
        return reply

    async def route(self, req: proto.RouteRequest) -> proto.RouteDecision:
        if self.fallback is None:
            try:
                return await self.ask(req)
            except (BusError, proto.ProtocolError) as exc:
                return _unavailable(req, exc)
        if self.local_first:
            if not req.policy and self._service_policy:
                req.policy = self._service_policy  # decide as the service would
            decision = await self.fallback.route(req)  # broadcast to the service, not awaited
            if decision.worker_id is not None:
                self._routed_here.add(req.request_id)
                if self._local_decisions is not None:
                    self._local_decisions.inc()
                return decision
            # nothing known here (yet): the service may know a worker
        state = self.state
        own_policy = bool(req.policy)
        how = state.decide(self.clock())
        if how == FALL_BACK:
            return await self._fall_back(req, REASON_ROUTER_DOWN)
        outcome = None
        try:
            decision = await self.ask(req)
            outcome = "answered"
        except (BusError, proto.ProtocolError) as exc:
            outcome = "failed"
            if state.failed(self.clock(), _why(exc), how):
                self._switched(True)
            return await self._fall_back(req, REASON_UNAVAILABLE)
        finally:
            if outcome is None:  # cancelled while asking
                state.abandoned(how)
        if state.answered(self.clock(), how):
            self._switched(False)
        if not own_policy and decision.policy:
            self._service_policy = decision.policy  # e.g. `genset router --policy dynamo`
        if decision.worker_id is None:
            # The service knows no worker (it may not have seen a new one yet): the frontend's
            # own view may, and a 503 is worse than a decision from the same policy here.
            second = await self.fallback.route(req)
            if second.worker_id is not None:
                self._count(REASON_NO_WORKER)
                self._routed_here.add(req.request_id)
                return second
        return decision

    async def _fall_back(self, req: proto.RouteRequest, reason: str) -> proto.RouteDecision:
        self._count(reason)
        if not req.policy and self._service_policy:
            req.policy = self._service_policy  # decide as the service would have
        decision = await self.fallback.route(req)
        if decision.worker_id is not None:
            self._routed_here.add(req.request_id)
        return decision

    def _count(self, reason: str) -> None:
        if self._decisions is not None:
            self._decisions.labels(reason).inc()

    def on_first_token(self, request_id: str) -> None:
        if request_id in self._routed_here:
            self.fallback.on_first_token(request_id)

    def on_done(self, request_id: str) -> None:
        if request_id in self._routed_here:
            self._routed_here.discard(request_id)
            self.fallback.on_done(request_id)

    async def close(self) -> None:
        if self._routers is not None:
            self._routers.remove_listener(self._on_router_record)
            await self._routers.close()
            self._routers = None
        if self.fallback is not None:
            await self.fallback.close()


def _why(exc: Exception) -> str:
    if isinstance(exc, NoResponders):
        return "no router responds"
    if isinstance(exc, RequestTimeout):
        return "no reply in time"
    return f"{type(exc).__name__}: {exc}"


def _unavailable(req: proto.RouteRequest, exc: Exception) -> proto.RouteDecision:
    return proto.RouteDecision(request_id=req.request_id, worker_id=None, model=req.model,
                               error=f"router unavailable: {type(exc).__name__}: {exc}")
