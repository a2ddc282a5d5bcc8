"""The router treats what arrives from the bus as hostile (issue 14): messages about workers
that are not live in etcd, messages that name another worker than their subject's, cards
stored under another worker's key, and workers claiming more blocks than they have change
nothing but a counter. Real NATS and etcd (open, as in the other router tests; the refusals
by the servers themselves are in test_security.py).

Ordering instead of waiting: the messages of one connection reach one subscription in the
order they were sent, so each test sends its forgeries, then one genuine message, and waits
for the genuine one to be applied; every forgery was handled before it.
"""

from __future__ import annotations

import asyncio
import uuid

import proto
from genset.routing.api import create_router
from genset.runtime.metrics import Metrics
from proto import keys, subjects
from tests.stack import metric, parse_metrics

LIVE = 0x11
GHOST = 0x5EC  # never registered in etcd


def stored(worker: int, event_id: int, hashes, tier: str = "device") -> proto.KvEventBatch:
    return proto.KvEventBatch(worker_id=worker, event_id=event_id, tier=tier, events=[
        proto.Stored(blocks=[proto.StoredBlock(hash=h) for h in hashes])])


async def eventually(check, what: str, wait_s: float = 10.0) -> None:
    """Poll `check` until true; fail naming `what` after a generous deadline."""
    loop = asyncio.get_running_loop()
    end = loop.time() + wait_s
    while not check():
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


class Rig:
    def __init__(self, bus, discovery) -> None:
        self.bus, self.discovery = bus, discovery
        self.ns = f"u{uuid.uuid4().hex[:8]}"
        self.metrics = Metrics(process_metrics=False)
        self.router = None
        self.next_event = 1

    async def __aenter__(self) -> Rig:
        await self.discovery.register(keys.model(self.ns, "m", LIVE), proto.ModelCard(
            model="m", instance_id=LIVE, block_size=16, kv_blocks=100))
        self.router = create_router("embedded", bus=self.bus, namespace=self.ns,
                                    discovery=self.discovery, metrics=self.metrics, seed=1)
        await self.router.start()  # its resync request to LIVE finds no responder at once
        return self

    async def __aexit__(self, *exc) -> None:
        await self.router.close()
        await self.discovery.unregister(keys.model(self.ns, "m", LIVE))

    @property
    def core(self):
        return self.router.core

    def ignored(self, kind: str, reason: str) -> float:
        return metric(parse_metrics(self.metrics.render().decode()),
                      "genset_router_ignored_messages_total", kind=kind, reason=reason)

    async def genuine_event(self, block: int) -> None:
        """One true batch from the live worker, applied before this returns."""
        event_id = self.next_event
        self.next_event += 1
        await self.bus.publish(subjects.kv_events(self.ns, LIVE), stored(LIVE, event_id, [block]))
        await eventually(lambda: self.core.index.events.get((LIVE, "device")) is not None
                         and self.core.index.events[(LIVE, "device")].last_event_id >= event_id,
                         f"event {event_id} of the live worker")


async def test_events_load_and_decisions_about_unknown_workers_are_ignored(bus, discovery):
    async with Rig(bus, discovery) as rig:
        # a thousand made-up workers, each claiming a prefix
        for i in range(1000):
            wid = GHOST + i
            await bus.publish(subjects.kv_events(rig.ns, wid), stored(wid, 1, range(1, 33)))
        await rig.genuine_event(block=7)
        assert set(rig.core.workers) == {LIVE}
        assert set(rig.core.index.workers) == {LIVE}
        assert rig.core.index.blocks_held(LIVE) == 1
        assert rig.ignored("kv_events", "not_live") == 1000

        await bus.publish(subjects.load_report(rig.ns, GHOST), proto.LoadReport(
            worker_id=GHOST, ts_ms=1, running=0, kv_total_blocks=10))
        await bus.publish(subjects.load_report(rig.ns, LIVE), proto.LoadReport(
            worker_id=LIVE, ts_ms=1, running=3, kv_total_blocks=100))
        await eventually(lambda: rig.ignored("load_report", "not_live") == 1, "ghost load")
        assert GHOST not in rig.core.workers

        await bus.publish(subjects.route_decisions(rig.ns), proto.RouteDecision(
            request_id="r1", worker_id=GHOST, router_id=999, policy="genset"))
        await eventually(lambda: rig.ignored("route_decision", "not_live") == 1, "decision")
        assert GHOST not in rig.core.workers


async def test_a_message_must_name_the_worker_of_its_subject(bus, discovery):
    async with Rig(bus, discovery) as rig:
        # published on the ghost's own subject (what its credential allows), naming LIVE
        await bus.publish(subjects.kv_events(rig.ns, GHOST), stored(LIVE, 1, [1, 2, 3]))
        await bus.publish(subjects.kv_events(rig.ns, LIVE), stored(GHOST, 1, [4, 5, 6]))
        rig.next_event = 1
        await rig.genuine_event(block=9)
        assert rig.ignored("kv_events", "wrong_subject") == 2
        assert rig.core.index.blocks_held(LIVE) == 1  # not 4: nothing forged was applied
        await bus.publish(subjects.load_report(rig.ns, GHOST), proto.LoadReport(
            worker_id=LIVE, ts_ms=1, running=500))
        await eventually(lambda: rig.ignored("load_report", "wrong_subject") == 1, "load")


async def test_a_worker_claiming_more_blocks_than_it_has_is_reset(bus, discovery):
    async with Rig(bus, discovery) as rig:
        await rig.genuine_event(block=1)
        # capacity 100 (+ slack): 10 000 blocks is a lie, whoever tells it
        event_id = rig.next_event
        rig.next_event += 1
        await bus.publish(subjects.kv_events(rig.ns, LIVE),
                          stored(LIVE, event_id, range(1000, 11000)))
        await eventually(lambda: rig.ignored("kv_events", "over_capacity") == 1, "reset")
        assert rig.core.index.blocks_held(LIVE) == 0
        # unknown tiers are not kept either
        await bus.publish(subjects.kv_events(rig.ns, LIVE),
                          stored(LIVE, rig.next_event, [5], tier="x" * 1000))
        await eventually(lambda: rig.ignored("kv_events", "bad_tier") == 1, "bad tier")
        assert {tier for _, tier in rig.core.index.events} == {"device"}


async def test_a_card_under_another_workers_key_is_ignored(bus, discovery):
    async with Rig(bus, discovery) as rig:
        # a worker may write only its own key; it could still put another id in its card
        key = keys.model(rig.ns, "m", GHOST)
        await discovery.register(key, proto.ModelCard(model="m", instance_id=GHOST + 1,
                                                      kv_blocks=100))
        try:
            await eventually(lambda: rig.ignored("model_card", "wrong_key") == 1, "card")
            assert GHOST + 1 not in rig.core.workers and GHOST not in rig.core.workers
        finally:
            await discovery.unregister(key)
        # a well-formed card makes a worker live, and its removal makes it unknown again
        await discovery.register(key, proto.ModelCard(model="m", instance_id=GHOST,
                                                      kv_blocks=100))
        await eventually(lambda: GHOST in rig.core.workers, "ghost registered")
        await bus.publish(subjects.kv_events(rig.ns, GHOST), stored(GHOST, 1, [1]))
        await eventually(lambda: rig.core.index.blocks_held(GHOST) == 1, "ghost's event")
        await discovery.unregister(key)
        await eventually(lambda: GHOST not in rig.core.workers, "ghost gone")
        await bus.publish(subjects.kv_events(rig.ns, GHOST), stored(GHOST, 2, [2]))
        await eventually(lambda: rig.ignored("kv_events", "not_live") == 1, "late event")
        assert GHOST not in rig.core.index.workers


async def test_an_unbelievable_onboarding_cost_is_counted_and_not_used(bus, discovery):
    """A load report's onboarding cost (issue 12 item 4) that no worker could have measured
    (NaN, negative, absurd) is refused and counted; the report's load is still applied and
    the worker's store runs are priced with the router's defaults."""
    async with Rig(bus, discovery) as rig:
        subject = subjects.load_report(rig.ns, LIVE)
        bad = [{"onboard_ram_gbps": float("nan")}, {"kv_bytes_per_token": -4096.0},
               {"onboard_disk_gbps": 1e30}, {"prefill_ms_per_token": float("inf")}]
        for i, cost in enumerate(bad):
            await bus.publish(subject, proto.LoadReport(worker_id=LIVE, ts_ms=i, running=2,
                                                        kv_total_blocks=100, **cost))
        await eventually(lambda: rig.ignored("load_report", "bad_onboard_cost") == len(bad),
                         "the bad costs counted")
        assert rig.core.workers[LIVE].onboard is None
        assert rig.core.load.workers[LIVE].report.running == 2
        await bus.publish(subject, proto.LoadReport(
            worker_id=LIVE, ts_ms=9, kv_total_blocks=100, kv_bytes_per_token=131072.0,
            onboard_ram_gbps=1.5, prefill_ms_per_token=0.02))
        await eventually(lambda: rig.core.workers[LIVE].onboard is not None, "a good cost")
        assert rig.core.workers[LIVE].onboard.ram_gbps == 1.5
        assert rig.ignored("load_report", "bad_onboard_cost") == len(bad)


STORE = 0x5707  # an offload store registered in etcd for the test below


async def test_store_events_must_come_from_a_live_store_on_its_own_subject(bus, discovery):
    async with Rig(bus, discovery) as rig:
        # made-up store ids, each on its own subject: not in etcd, so not stores
        for i in range(50):
            sid = GHOST + i
            await bus.publish(subjects.offload_events(rig.ns, sid),
                              stored(sid, 1, [100 + i], tier="host"))
        await bus.publish(subjects.kv_events(rig.ns, LIVE), stored(LIVE, 1, [1]))
        await eventually(lambda: rig.ignored("offload_events", "not_live") == 50, "ghost stores")
        assert not rig.core.stores

        await discovery.register(keys.offload_instance(rig.ns, STORE), proto.InstanceRecord(
            instance_id=STORE, component=subjects.OFFLOAD_COMPONENT, namespace=rig.ns))
        try:
            await eventually(lambda: STORE in rig.core.stores, "the registered store")
            # a live store's id, published on another subject: refused
            await bus.publish(subjects.offload_events(rig.ns, GHOST),
                              stored(STORE, 1, [7, 8], tier="host"))
            # the store's own batch, on its subject: applied, after the forgery
            await bus.publish(subjects.offload_events(rig.ns, STORE),
                              stored(STORE, 1, [9], tier="host"))
            await eventually(lambda: rig.core.index.events.get((STORE, "host")) is not None,
                             "the store's own batch")
            assert rig.ignored("offload_events", "wrong_subject") == 1
            assert rig.core.index.blocks_held(STORE, "host") == 1  # 9 only, not 7 and 8
        finally:
            await discovery.unregister(keys.offload_instance(rig.ns, STORE))
