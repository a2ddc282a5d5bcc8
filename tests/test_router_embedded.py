"""The embedded router against real NATS and etcd (workers simulated by publishing their
messages directly, so no processes start)."""

from __future__ import annotations

import asyncio
import uuid

import proto
from genset.kv.hashing import block_hashes
from genset.routing.api import Router, create_router
from genset.runtime.metrics import Metrics
from proto import keys, subjects

BS = 16


def toks(seed: int, n: int = 8 * BS) -> list[int]:
    return [(seed * 31 + i * 7) % 5000 + 1 for i in range(n)]


def stored_batch(worker: int, event_id: int, tokens: list[int]) -> proto.KvEventBatch:
    hs = block_hashes(proto.pack_tokens(tokens), BS)
    return proto.KvEventBatch(worker_id=worker, event_id=event_id, events=[
        proto.Stored(blocks=[proto.StoredBlock(hash=h) for h in hs])])


async def eventually(check, what: str, wait_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + wait_s
    while not check():
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_embedded_router_follows_events_heals_gaps_and_membership(bus, discovery):
    ns = f"e{uuid.uuid4().hex[:8]}"
    w1, w2 = 0x11, 0x22
    # worker 1 answers resync requests with a snapshot, as real workers do
    snapshot_tokens = toks(3)
    resyncs: list[proto.KvResyncRequest] = []

    async def on_resync(data: bytes):
        resyncs.append(proto.decode(data, proto.KvResyncRequest))
        snap = stored_batch(w1, 50, snapshot_tokens)
        snap.events.insert(0, proto.Cleared())
        return snap

    resync_sub = await bus.serve(subjects.kv_resync(ns, w1), on_resync)
    for wid in (w1, w2):
        await discovery.register(keys.model(ns, "m", wid), proto.ModelCard(
            model="m", instance_id=wid, block_size=BS, kv_blocks=1024))
    metrics = Metrics(process_metrics=False)
    router = create_router("embedded", bus=bus, namespace=ns, discovery=discovery, metrics=metrics,
                           seed=1)
    assert isinstance(router, Router)
    await router.start()
    try:
        core = router.core
        assert set(core.workers) == {w1, w2}
        await eventually(lambda: resyncs, "the start-up resync of worker 1")
        await eventually(lambda: core.index.overlaps(block_hashes(proto.pack_tokens(snapshot_tokens), BS)),
                         "the snapshot applied")

        # live events: worker 2 caches a prompt, the router sends its prefix there
        await bus.publish(subjects.kv_events(ns, w2), stored_batch(w2, 1, toks(1)))
        await eventually(lambda: core.index.blocks_held(w2) == 8, "worker 2's events")
        d = await router.route(proto.RouteRequest(request_id="a", model="m",
                                                  token_ids=proto.pack_tokens([*toks(1), 9, 9])))
        assert d.worker_id == w2 and d.overlap_blocks == 8
        router.on_first_token("a")
        router.on_done("a")
        assert core.load.inflight_count(w2) == 0

        # a gap in worker 1's event ids: detected, and healed by a resync
        n = len(resyncs)
        await bus.publish(subjects.kv_events(ns, w1), stored_batch(w1, 51, toks(4)))
        await bus.publish(subjects.kv_events(ns, w1), stored_batch(w1, 55, toks(5)))
        await eventually(lambda: len(resyncs) > n, "a resync request after the gap")
        assert resyncs[-1].worker_id == w1
        await eventually(lambda: not core.resync_wanted, "the gap healed")
        assert not core.index.overlaps(block_hashes(proto.pack_tokens(toks(5)), BS))

        # garbage on the events subject is counted and ignored
        await bus.publish(subjects.kv_events(ns, w1), b"\x00garbage")
        await eventually(lambda: metrics.registry.get_sample_value(
            "genset_router_bad_messages_total", {"kind": "kv_events"}) == 1, "bad message counted")

        # the worker's card goes (lease expired / drained): its state is dropped at once
        await discovery.unregister(keys.model(ns, "m", w2))
        await eventually(lambda: w2 not in core.workers, "worker 2 removed")
        assert core.index.blocks_held(w2) == 0
        d = await router.route(proto.RouteRequest(request_id="b", model="m",
                                                  token_ids=proto.pack_tokens(toks(1))))
        assert d.worker_id == w1
    finally:
        await router.close()
        await resync_sub.unsubscribe()


async def test_replica_decisions_keep_load_views_in_sync(bus):
    ns = f"r{uuid.uuid4().hex[:8]}"
    a = create_router("embedded", bus=bus, namespace=ns, seed=1)
    b = create_router("embedded", bus=bus, namespace=ns, seed=2)
    await a.start()
    await b.start()
    try:
        for r in (a, b):
            for wid in (1, 2, 3):
                r.core.add_worker(wid, model="m", block_size=BS, kv_blocks=1024)
        for i in range(6):
            await a.route(proto.RouteRequest(request_id=f"x{i}", model="m",
                                             token_ids=proto.pack_tokens(toks(100 + i))))
        await eventually(lambda: len(b.core.load.inflight) == 6, "b to apply a's decisions")
        assert {w: b.core.load.inflight_count(w) for w in (1, 2, 3)} == \
               {w: a.core.load.inflight_count(w) for w in (1, 2, 3)}
        # workers publish lifecycle; both replicas free the load
        for i in range(6):
            await bus.publish(subjects.request_lifecycle(ns), proto.RequestLifecycle(
                request_id=f"x{i}", worker_id=a.core.load.inflight[f"x{i}"].worker_id,
                phase=proto.PHASE_DONE))
        await eventually(lambda: not a.core.load.inflight and not b.core.load.inflight, "load freed")
    finally:
        await a.close()
        await b.close()


async def test_frontend_router_modes_resolve_to_one_router_each(bus, discovery):
    """`genset frontend --router MODE`: every mode (and old spelling) gives the routing
    library's router; auto is the service only when a router service is registered."""
    from genset.routing.embedded import EmbeddedRouter
    from genset.routing.remote import RemoteRouter
    from services.frontend import routing

    ns = f"m{uuid.uuid4().hex[:8]}"

    async def make(mode):
        return await routing.create(mode, bus=bus, discovery=discovery, namespace=ns)

    auto = await make("auto")
    assert isinstance(auto, EmbeddedRouter) and auto.core.default_policy.name == "genset"
    for mode in ("service", "remote"):
        assert isinstance(await make(mode), RemoteRouter)
    for mode, policy in [("round-robin", "round-robin"), ("round_robin", "round-robin"),
                         ("least-loaded", "least-loaded"), ("kv", "genset"), ("dynamo", "dynamo")]:
        r = await make(mode)
        assert isinstance(r, EmbeddedRouter) and r.core.default_policy.name == policy
    await discovery.register(keys.instance(ns, "router", 7), proto.InstanceRecord(
        instance_id=7, component="router", namespace=ns))
    assert isinstance(await make("auto"), RemoteRouter)


async def test_frontend_embedded_router_waits_for_a_worker_to_join(bus, discovery):
    """`genset up`'s default embeds the router in the frontend: a request the frontend lets in
    (its registry lists the model) while the router's own etcd watch has not shown the worker
    yet waits for it to join and is routed there, instead of failing "no worker"."""
    from services.frontend import routing

    ns = f"w{uuid.uuid4().hex[:8]}"
    router = await routing.create("auto", bus=bus, discovery=discovery, namespace=ns)
    assert router.wait_for_worker_s == routing.WORKER_WAIT_S > 0
    await router.start()
    try:
        req = proto.RouteRequest(request_id="early", model="m",
                                 token_ids=proto.pack_tokens(toks(1)))
        waiting = asyncio.create_task(router.route(req))
        await asyncio.sleep(0)
        assert not waiting.done()  # no worker known: it waits (bounded), it does not fail
        await discovery.register(keys.model(ns, "m", 0x33), proto.ModelCard(
            model="m", instance_id=0x33, block_size=BS, kv_blocks=1024))
        async with asyncio.timeout(30):  # generous: the watch delivers within milliseconds
            decision = await waiting
        assert decision.worker_id == 0x33 and not decision.error
        # what the request's exclusions left empty is answered at once (workers are known)
        d = await router.route(proto.RouteRequest(request_id="x", model="m", exclude=[0x33],
                                                  token_ids=proto.pack_tokens(toks(1))))
        assert d.worker_id is None and "no worker" in d.error
    finally:
        await router.close()


async def test_warm_copy_beside_the_service_does_not_wait(bus, discovery):
    """The warm copy kept beside the router service asks the service when it knows no
    worker: it answers at once (the wait is for the embedded router only)."""
    from genset.routing.api import create_router

    router = create_router("service", bus=bus, namespace=f"n{uuid.uuid4().hex[:8]}",
                           discovery=discovery, fallback=True)
    assert router.fallback.wait_for_worker_s == 0
    req = proto.RouteRequest(request_id="a", model="m", token_ids=proto.pack_tokens(toks(1)))
    assert (await router.fallback.route(req)).worker_id is None  # not started: nothing known
