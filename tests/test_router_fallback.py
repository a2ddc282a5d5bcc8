"""The frontend's router fallback: the pure state machine, then `RemoteRouter` with its warm
embedded fallback against real NATS and etcd (the "router service" is a responder this test
controls; workers are model cards in etcd, so no processes start)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import yaml

import proto
from genset.routing.api import create_router
from genset.routing.remote import ASK, FALL_BACK, PROBE, FallbackState, RemoteRouter
from genset.runtime.metrics import Metrics
from proto import keys, subjects
from tests.stack import REPO_ROOT, metric, parse_metrics


def test_state_asks_until_a_failure_then_probes_one_at_a_time_with_backoff():
    s = FallbackState(probe_interval=1.0, max_probe_interval=4.0)
    assert s.decide(0.0) == ASK and s.decide(0.0) == ASK  # concurrent asks are fine
    assert s.failed(0.1, "no router responds") is True
    assert s.failed(0.1, "no router responds") is False  # the second one changes nothing
    assert s.fallback and s.reason == "no router responds"
    assert s.decide(0.5) == FALL_BACK  # not yet due
    assert s.decide(1.2) == PROBE
    assert s.decide(1.2) == FALL_BACK  # one probe at a time
    assert s.failed(1.3, "x", PROBE) is False
    assert s.decide(2.3) == FALL_BACK  # the interval doubled: next probe at 3.3
    assert s.decide(3.3) == PROBE
    s.failed(3.3, "x", PROBE)  # interval 4 (the cap)
    assert s.decide(7.2) == FALL_BACK and s.decide(7.3) == PROBE
    assert s.answered(7.3, PROBE) is True and not s.fallback
    assert s.decide(7.4) == ASK


def test_state_an_abandoned_probe_lets_another_probe_and_etcd_speeds_things_up():
    s = FallbackState(probe_interval=1.0, max_probe_interval=8.0)
    assert s.routers_registered(0, 0.0) is True  # none registered: fall back at once
    assert s.decide(7.9) == FALL_BACK  # and probe only rarely
    assert s.decide(8.0) == PROBE
    s.abandoned(PROBE)  # the client went away mid-probe
    assert s.decide(8.0) == PROBE
    s.failed(8.1, "x", PROBE)
    assert s.routers_registered(1, 8.2) is False  # a router registered: probe now
    assert s.decide(8.2) == PROBE
    assert s.answered(8.3, PROBE) is True
    assert s.routers_registered(2, 9.0) is False and s.decide(9.0) == ASK
    with pytest.raises(ValueError):
        FallbackState(probe_interval=0)


def test_state_a_late_answer_switches_back():
    s = FallbackState()
    s.failed(0.0, "no reply in time")
    assert s.answered(0.2) is True and s.decide(0.3) == ASK


class FakeRouterService:
    """What answers on the route subject: a real NATS responder this test can make slow."""

    def __init__(self, bus, ns: str, worker_id: int) -> None:
        self.bus, self.ns, self.worker_id = bus, ns, worker_id
        self.sub = None
        self.hang = False  # answer only once `release` is set
        self.release = asyncio.Event()
        self.asked = 0

    async def start(self) -> None:
        self.sub = await self.bus.serve(subjects.route(self.ns), self.on_route, queue="router")

    async def stop(self) -> None:
        self.release.set()
        await self.sub.unsubscribe()
        await self.bus.nc.flush()

    async def on_route(self, data: bytes):
        self.asked += 1
        req = proto.decode(data, proto.RouteRequest)
        if self.hang:
            await self.release.wait()
        return proto.RouteDecision(request_id=req.request_id, worker_id=self.worker_id,
                                   model=req.model, policy="least-loaded", router_id=99)


def request(i: int) -> proto.RouteRequest:
    return proto.RouteRequest(request_id=f"r{i}", model="m", max_tokens=4,
                              token_ids=proto.pack_tokens(list(range(1, 40))))


async def test_remote_router_falls_back_while_no_router_answers_and_returns(bus, discovery):
    ns = f"f{uuid.uuid4().hex[:8]}"
    workers = (0x11, 0x22)
    for wid in workers:
        await discovery.register(keys.model(ns, "m", wid), proto.ModelCard(
            model="m", instance_id=wid, block_size=16, kv_blocks=1024))
    metrics = Metrics(process_metrics=False)
    clock = [0.0]
    # local_first=False: every request asks the service (the path this test is about)
    router = create_router("service", bus=bus, namespace=ns, discovery=discovery,
                           timeout=0.3, fallback=True, metrics=metrics, local_first=False)
    assert isinstance(router, RemoteRouter)
    router.clock = lambda: clock[0]
    service = FakeRouterService(bus, ns, worker_id=0x22)

    def values() -> dict[str, float]:
        return parse_metrics(metrics.render().decode())

    await router.start()
    try:
        # No router registered in etcd and none answering: routed here, no error.
        assert router.state.fallback
        assert values()["genset_frontend_router_fallback"] == 1.0
        d = await router.route(request(1))
        assert d.worker_id in workers and d.error is None, d
        assert service.asked == 0  # not even asked

        # A router registers and answers: the next request probes it and we are back.
        await service.start()
        await discovery.register(keys.instance(ns, "router", 7), proto.InstanceRecord(
            instance_id=7, component="router", namespace=ns))
        # A probe slower than the 0.3 s timeout (a loaded machine) falls back again and waits
        # out the probe interval on the fake clock: move the clock on between tries, so only
        # the outcome (routed by the service) is checked, not how fast the probe answered.
        d = await route_until(router, lambda d: d.router_id == 99, "routed by the service",
                              wait_s=60, between=lambda: clock.__setitem__(0, clock[0] + 10.0))
        assert d.worker_id == 0x22 and not router.state.fallback
        assert values()["genset_frontend_router_fallback"] == 0.0
        # the fallback will decide with the service's default policy, learned from its answer
        assert router._service_policy == "least-loaded"

        # It hangs (never answers while we wait): the request is routed here after the
        # timeout, no error.
        service.hang = True
        d = await router.route(request(3))
        assert d.worker_id in workers and d.error is None and d.policy == "least-loaded", d
        assert router.state.fallback
        assert values()["genset_frontend_router_fallback"] == 1.0
        asked = service.asked
        for i in range(4, 10):  # the following ones do not wait for it
            d = await router.route(request(i))
            assert d.worker_id in workers
        assert service.asked == asked

        # It is gone (no responders): the probe falls back at once, the request still served.
        await service.stop()
        clock[0] += 10.0
        d = await router.route(request(10))
        assert d.worker_id in workers and router.state.fallback
        counts = values()
        assert metric(counts, "genset_frontend_router_fallback_decisions_total",
                      reason="unavailable") >= 2
        assert metric(counts, "genset_frontend_router_fallback_decisions_total",
                      reason="router_down") >= 7
    finally:
        await router.close()


async def test_local_first_decides_here_tells_the_service_and_asks_only_when_blind(bus, discovery):
    """The default with a fallback: decisions are taken in this process with the service's
    policy (from its etcd record) and broadcast, so a replica applies them to its load; the
    service is asked only for a request this process cannot route."""
    ns = f"f{uuid.uuid4().hex[:8]}"
    await discovery.register(keys.model(ns, "m", 0x11), proto.ModelCard(
        model="m", instance_id=0x11, block_size=16, kv_blocks=1024))
    service = FakeRouterService(bus, ns, worker_id=0x33)  # knows a worker we do not
    await service.start()
    await discovery.register(keys.instance(ns, "router", 7), proto.InstanceRecord(
        instance_id=7, component="router", namespace=ns, labels={"policy": "round-robin"}))
    seen: list[proto.RouteDecision] = []

    async def on_decision(msg) -> None:
        seen.append(proto.decode(msg.data, proto.RouteDecision))

    sub = await bus.subscribe(subjects.route_decisions(ns), on_decision)
    metrics = Metrics(process_metrics=False)
    router = create_router("service", bus=bus, namespace=ns, discovery=discovery,
                           timeout=30.0, fallback=True, metrics=metrics)
    assert isinstance(router, RemoteRouter) and router.local_first
    await router.start()
    try:
        for i in range(5):
            d = await router.route(request(i))
            assert d.worker_id == 0x11 and d.error is None, d
            assert d.policy == "round-robin"  # the service's default, from its record
            router.on_first_token(d.request_id)
            router.on_done(d.request_id)
        assert service.asked == 0
        await bus.nc.flush()
        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        while len(seen) < 5:  # every decision told to the replicas
            assert loop.time() < end, seen
            await asyncio.sleep(0.01)
        assert {d.request_id for d in seen} == {f"r{i}" for i in range(5)}
        # this replica's view saw each request end (reported by the caller)
        assert router.fallback.core.load.inflight == {}
        counts = parse_metrics(metrics.render().decode())
        assert metric(counts, "genset_frontend_router_fallback_decisions_total",
                      reason="local_first") == 5

        # Nothing routable here (the only worker excluded): the service is asked.
        req = request(99)
        req.exclude = [0x11]
        d = await router.route(req)
        assert d.worker_id == 0x33 and d.router_id == 99 and service.asked == 1
    finally:
        await router.close()
        await sub.unsubscribe()
        await service.stop()


async def test_without_fallback_an_absent_router_is_an_error_decision(bus):
    ns = f"f{uuid.uuid4().hex[:8]}"
    router = create_router("service", bus=bus, namespace=ns, timeout=0.3)
    await router.start()
    d = await router.route(request(1))
    assert d.worker_id is None and d.error.startswith("router unavailable: NoResponders")
    await router.close()


async def route_until(router, check, what: str, wait_s: float = 10.0,
                      between=None) -> proto.RouteDecision:
    """Route requests until a decision passes `check` (e.g. once etcd's news arrived);
    `between()` runs before each retry."""
    loop = asyncio.get_running_loop()
    end = loop.time() + wait_s
    i = 1000
    while True:
        i += 1
        d = await router.route(request(i))
        if check(d):
            return d
        assert d.worker_id is not None, d  # meanwhile every request is still routed
        assert loop.time() < end, f"timed out waiting for {what}"
        if between is not None:
            between()
        await asyncio.sleep(0.02)


def test_compose_runs_two_router_replicas():
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["router"]["deploy"]["replicas"] >= 2
