"""The offload store service and its client over real NATS and etcd (the service runs in this
process; the restart test with real processes is in test_offload_process.py)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid

import msgspec
import pytest

import proto
from genset.kv.replica import HashSetReplica
from genset.offload.client import OffloadClient, block_bytes
from genset.runtime.bus import Bus
from genset.runtime.bus_errors import RemoteError
from genset.runtime.config import CommonConfig, FieldError
from genset.runtime.discovery import Discovery
from proto import keys, subjects
from proto.offload import OffloadBlock, OffloadLookup, OffloadLookupReply, OffloadPut
from services.kv_offload.service import OffloadOptions, OffloadService
from tests.offload_helpers import chain, kv_payload

WAIT = 20.0  # generous deadline for conditions (never a timing assertion)


@contextlib.asynccontextmanager
async def running_store(nats_server, etcd_server, namespace: str, *, clock=None, **options):
    """An OffloadService started the way run_service starts one, stopped the way it stops
    (`clock`: the expiry clock of its blocks in parts)."""
    config = CommonConfig(namespace=namespace, nats=nats_server.url,
                          etcd=etcd_server.endpoint, lease_ttl=5.0, drain_timeout=10.0)
    # these tests check that token ids round-trip; a store serves them only when told to
    # (test_a_lookup_gets_no_token_ids_unless_the_store_serves_them: the default)
    options.setdefault("serve_token_ids", True)
    svc = OffloadService(config, OffloadOptions(**options))
    if clock is not None:
        svc.clock = clock
    svc.bus = await Bus.connect(nats_server.url, name=f"store-{uuid.uuid4().hex[:6]}",
                                namespace=namespace)
    svc.discovery = await Discovery.connect(etcd_server.endpoint, ttl=5.0)
    try:
        await svc.start()
        await svc.discovery.register(svc.instance_key, svc.instance_record())
        svc.state = "ready"
        yield svc
    finally:
        if svc.state == "ready":
            await svc.discovery.unregister(svc.instance_key)
            await svc.drain()
        await svc.stop()
        await svc.discovery.close()
        await svc.bus.close()


async def wait_for(predicate, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"not {what} after {WAIT} s")
        await asyncio.sleep(0.02)


@pytest.fixture
def ns() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


async def started_client(bus, discovery, ns, n_instances: int, **kw) -> OffloadClient:
    client = OffloadClient(bus, ns, discovery=discovery, sender_id=7, **kw)
    await client.start()
    await wait_for(lambda: len(client.instances) == n_instances, f"{n_instances} stores seen")
    return client


def same(a: list[OffloadBlock], b: list[OffloadBlock], tokens: bool = True) -> bool:
    return [(x.hash, x.parent_hash, x.data) + ((x.token_ids,) if tokens else ()) for x in a] \
        == [(x.hash, x.parent_hash, x.data) + ((x.token_ids,) if tokens else ()) for x in b]


async def test_a_lookup_gets_no_token_ids_unless_the_store_serves_them(
        nats_server, etcd_server, bus, discovery, ns):
    # By default a store answers payloads only: a worker that learnt another request's block
    # hashes (prefill workers publish them) cannot read that request's prompt tokens.
    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.01,
                             serve_token_ids=False) as store:
        client = await started_client(bus, discovery, ns, 1)
        blocks = chain(3, 4, 2000)
        assert client.put_behind(blocks) == 4
        assert await client.flush(WAIT)
        run = await client.lookup([b.hash for b in blocks], deadline_s=WAIT, want_tokens=True)
        assert same(run, blocks, tokens=False) and all(b.token_ids == b"" for b in run)
        assert store.metrics.registry.get_sample_value(
            "genset_offload_token_ids_withheld_lookups_total") >= 1
        await client.close()


async def test_put_behind_then_lookup_round_trip(nats_server, etcd_server, bus, discovery, ns):
    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.01):
        client = await started_client(bus, discovery, ns, 1)
        blocks = chain(1, 12, 2000)
        assert client.put_behind(blocks) == 12
        assert await client.flush(WAIT)
        assert client.stats["put_stored"] == 12
        hashes = [b.hash for b in blocks]
        run = await client.lookup(hashes, deadline_s=WAIT, want_tokens=True)
        assert same(run, blocks)
        run = await client.lookup(hashes, deadline_s=WAIT)
        assert same(run, blocks, tokens=False) and all(b.token_ids == b"" for b in run)
        # a run stops at the first block the store lacks
        other = chain(2, 3, 2000)
        assert same(await client.lookup([*hashes[:5], other[0].hash, *hashes[5:]],
                                        deadline_s=WAIT), blocks[:5], tokens=False)
        assert await client.lookup([other[0].hash], deadline_s=WAIT) == []
        assert len(await client.lookup(hashes, deadline_s=WAIT, max_blocks=4)) == 4
        await client.close()


async def test_several_instances_split_the_blocks_and_one_lookup_stitches_them(
        nats_server, etcd_server, bus, discovery, ns):
    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.01) as a, \
            running_store(nats_server, etcd_server, ns, offload_ram_gb=0.01) as b:
        client = await started_client(bus, discovery, ns, 2)
        blocks = chain(3, 40, 1000)
        client.put_behind(blocks)
        assert await client.flush(WAIT)
        held_a, held_b = len(a.store.cache.ram), len(b.store.cache.ram)
        assert held_a + held_b == 40 and held_a and held_b  # both hold some
        rounds = client.stats["lookup_rounds"]
        run = await client.lookup([x.hash for x in blocks], deadline_s=WAIT, want_tokens=True)
        assert same(run, blocks)
        assert client.stats["lookup_rounds"] == rounds + 1  # one round trip, both in parallel
        await client.close()


async def test_a_run_larger_than_a_nats_message_comes_in_several_replies(
        nats_server, etcd_server, bus, discovery, ns):
    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.05):
        client = await started_client(bus, discovery, ns, 1)
        blocks = chain(4, 48, 32 * 1024)  # 1.5 MB: over NATS' 1 MB max_payload
        assert client.put_behind(blocks) == 48
        assert await client.flush(WAIT)
        rounds = client.stats["lookup_rounds"]
        run = await client.lookup([x.hash for x in blocks], deadline_s=WAIT)
        assert same(run, blocks, tokens=False)
        assert client.stats["lookup_rounds"] - rounds >= 2
        # a byte budget smaller than the run: the leading blocks that fit
        run = await client.lookup([x.hash for x in blocks], deadline_s=WAIT,
                                  max_bytes=5 * 33 * 1024)
        assert 0 < len(run) < 48 and same(run, blocks[:len(run)], tokens=False)
        await client.close()


async def test_a_flood_over_nats_keeps_the_store_within_its_bytes(
        nats_server, etcd_server, bus, discovery, ns):
    ram_bytes = 64 * 1024
    async with running_store(nats_server, etcd_server, ns,
                             offload_ram_gb=ram_bytes / 2**30) as store:
        client = await started_client(bus, discovery, ns, 1)
        peak = 0
        for i in range(40):
            client.put_behind(chain(100 + i % 20, 16, 4096))  # each chain comes twice
            assert await client.flush(WAIT)
            peak = max(peak, store.store.accounted_bytes)
        assert client.stats["put_sent"] == 40 * 16
        assert peak <= ram_bytes and store.store.cache.ram.evictions > 0
        h = store.health()
        assert h["tiers"]["host"]["bytes"] <= ram_bytes and h["accounted_bytes"] <= ram_bytes
        await client.close()


async def test_lookup_without_a_store_is_empty_not_an_error(nats_server, etcd_server, bus,
                                                           discovery, ns):
    client = OffloadClient(bus, ns, discovery=discovery)
    await client.start()
    assert await client.lookup([1, 2, 3], deadline_s=0.5) == []
    assert client.put_behind(chain(5, 2)) == 0
    assert client.stats["put_dropped_no_store"] == 2
    await client.close()
    # a store listed but not answering (gone without a trace): still [], within the deadline
    ghost = OffloadClient(bus, ns)
    await ghost.start(instances=[0xDEAD])
    assert await ghost.lookup([1, 2, 3], deadline_s=0.5) == []
    assert ghost.put_behind(chain(6, 2)) == 2
    assert await ghost.flush(WAIT)
    assert ghost.stats["put_failed"] == 2
    await ghost.close()


async def test_put_behind_drops_under_pressure_and_works_from_another_thread(
        nats_server, etcd_server, bus, discovery, ns):
    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.01) as store:
        blocks = chain(7, 20, 1000)
        limit = 5 * block_bytes(blocks[0])
        client = await started_client(bus, discovery, ns, 1, max_queue_bytes=limit)
        queued = client.put_behind(blocks)  # nothing is sent before we yield: 5 fit
        assert queued == 5 and client.stats["put_dropped_full"] == 15
        assert client.queued_bytes <= limit
        assert await client.flush(WAIT)
        more = chain(8, 4, 1000)
        t = threading.Thread(target=client.put_behind, args=(more,))
        t.start()
        await asyncio.to_thread(t.join)
        await wait_for(lambda: all(b.hash in store.store.cache.ram for b in more),
                       "blocks from a thread stored")
        await client.close()


async def test_bad_messages_get_errors_are_counted_and_the_store_goes_on(
        nats_server, etcd_server, bus, discovery, ns):
    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.01) as store:
        sid = store.instance_id
        put, lookup = subjects.offload_put(ns, sid), subjects.offload_lookup(ns, sid)
        with pytest.raises(RemoteError, match="not msgpack"):
            await bus.request(put, b"\xc1garbage", timeout=WAIT)
        with pytest.raises(RemoteError, match=r"\$\.blocks\[0\]\.hash"):
            await bus.request(put, msgspec.msgpack.encode(
                {"v": 1, "blocks": [{"hash": -5}]}), timeout=WAIT)
        with pytest.raises(RemoteError, match="unsupported protocol major version 9"):
            await bus.request(lookup, msgspec.msgpack.encode({"v": 9, "hashes": [1]}),
                              timeout=WAIT)
        with pytest.raises(RemoteError, match="is not this store"):
            await bus.request(subjects.offload_resync(ns, sid),
                              proto.KvResyncRequest(worker_id=sid + 1), timeout=WAIT)
        # a block that is wrong in itself is refused by name, the others are kept
        good, bad = chain(9, 2, 100)
        bad.hash ^= 1
        reply = await bus.request(put, OffloadPut(blocks=[good, bad]), timeout=WAIT,
                                  reply_type=proto.OffloadPutReply)
        assert (reply.stored, reply.refused) == (1, 1) and "does not match" in reply.error
        # max_bytes larger than a message is capped by the store: the reply always fits
        reply = await bus.request(lookup, OffloadLookup(hashes=[good.hash], max_bytes=1 << 40),
                                  timeout=WAIT, reply_type=OffloadLookupReply)
        assert reply.held == 1 and reply.blocks[0].data == good.data
        text = store.metrics.render().decode()
        assert 'genset_offload_bad_messages_total{endpoint="put"} 2.0' in text
        assert 'genset_offload_bad_messages_total{endpoint="lookup"} 1.0' in text
        assert 'genset_offload_bad_messages_total{endpoint="resync"} 1.0' in text


async def test_puts_without_token_ids_are_counted_unverified_or_refused_when_required(
        nats_server, etcd_server, bus, discovery, ns):
    """A put without token ids cannot have its hashes checked: by default the store keeps it
    and counts it apart (genset_offload_unverified_blocks_total); with require_token_ids it
    refuses it by name, counted with the other refusals, and goes on serving."""
    good, bare = chain(11, 2, 100)
    bare.token_ids = b""
    for strict in (False, True):
        async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.01,
                                 require_token_ids=strict) as store:
            put = subjects.offload_put(ns, store.instance_id)
            reply = await bus.request(put, OffloadPut(sender_id=0xAB, blocks=[good, bare]),
                                      timeout=WAIT, reply_type=proto.OffloadPutReply)
            text = store.metrics.render().decode()
            if strict:
                assert (reply.stored, reply.refused) == (1, 1)
                assert "no token ids" in reply.error
                assert 'genset_offload_put_blocks_total{outcome="refused"} 1.0' in text
                assert "genset_offload_unverified_blocks_total 0.0" in text
                assert store.store.contains([bare.hash]) == (0, 0)
            else:
                assert (reply.stored, reply.refused, reply.error) == (2, 0, None)
                assert "genset_offload_unverified_blocks_total 1.0" in text
                assert store.health()["counts"]["unverified"] == 1
            # the store goes on: the verified block is served
            reply = await bus.request(subjects.offload_lookup(ns, store.instance_id),
                                      OffloadLookup(hashes=[good.hash], max_bytes=1 << 20),
                                      timeout=WAIT, reply_type=OffloadLookupReply)
            assert reply.held == 1 and reply.blocks[0].data == good.data


async def test_a_block_with_non_finite_kv_is_refused_counted_and_the_others_kept(
        nats_server, etcd_server, bus, discovery, ns):
    """A put whose middle block's KV (a torch worker's payload, which says its dtype) holds a
    NaN: that block is refused by reason (genset_offload_refused_blocks_total{reason=
    "non_finite"}), logged with the sender and the block, and never served; the other blocks
    of the same put are kept and served, and the store goes on taking puts. Every torch worker
    refuses such a block on import, so keeping it only wasted transfers."""
    import numpy as np
    from structlog.testing import capture_logs

    rng = np.random.default_rng(5)
    blocks = chain(21, 4, 0)
    for b in blocks:
        b.data = kv_payload(rng.standard_normal(2 * 16 * 64), "float16")
    values = rng.standard_normal(2 * 16 * 64)
    values[700] = np.nan
    blocks[1].data = kv_payload(values, "float16")
    inf = rng.standard_normal(2 * 16 * 32)
    inf[0] = -np.inf
    blocks[3].data = kv_payload(inf, "float32")
    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.01) as store:
        sid = store.instance_id
        put, lookup = subjects.offload_put(ns, sid), subjects.offload_lookup(ns, sid)
        with capture_logs() as logs:
            reply = await bus.request(put, OffloadPut(sender_id=0xBEEF, blocks=blocks),
                                      timeout=WAIT, reply_type=proto.OffloadPutReply)
        assert (reply.stored, reply.refused) == (2, 2)
        assert f"block {blocks[1].hash:016x}" in reply.error and "NaN" in reply.error
        text = store.metrics.render().decode()
        assert 'genset_offload_refused_blocks_total{reason="non_finite"} 2.0' in text
        assert 'genset_offload_put_blocks_total{outcome="refused"} 2.0' in text
        assert 'genset_offload_put_blocks_total{outcome="stored"} 2.0' in text
        lines = [e for e in logs if e["event"] == "blocks refused at put"]
        assert len(lines) == 1, lines  # one line for the reason, the put's two blocks
        assert lines[0]["reason"] == "non_finite" and lines[0]["sender"] == "beef"
        assert lines[0]["block"] == f"{blocks[1].hash:016x}" and lines[0]["blocks"] == 2
        assert store.store.contains([blocks[1].hash]) == (0, 0)
        assert store.store.contains([blocks[3].hash]) == (0, 0)

        async def held(hashes) -> list[OffloadBlock]:
            r = await bus.request(lookup, OffloadLookup(hashes=hashes, max_bytes=1 << 20),
                                  timeout=WAIT, reply_type=OffloadLookupReply)
            return r.blocks

        # the run stops where the refused block is missing; the kept ones are served
        assert [b.data for b in await held([b.hash for b in blocks])] == [blocks[0].data]
        assert [b.data for b in await held([blocks[2].hash])] == [blocks[2].data]
        # the store goes on: a later put of clean blocks (one the sender fixed) is kept
        blocks[1].data = kv_payload(np.nan_to_num(values), "float16")
        with capture_logs() as logs:
            reply = await bus.request(put, OffloadPut(sender_id=0xBEEF, blocks=blocks[:2]),
                                      timeout=WAIT, reply_type=proto.OffloadPutReply)
        assert (reply.stored, reply.known, reply.refused) == (1, 1, 0)
        assert not [e for e in logs if e["event"] == "blocks refused at put"]
        assert len(await held([b.hash for b in blocks])) == 3


async def test_with_verify_kv_values_off_the_store_keeps_what_it_is_given(
        nats_server, etcd_server, bus, discovery, ns):
    import numpy as np

    good, bad = chain(22, 2, 0)
    good.data = kv_payload(np.ones(2 * 16 * 32), "float32")
    bad.data = kv_payload(np.full(2 * 16 * 32, np.inf), "float32")
    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.01,
                             verify_kv_values=False) as store:
        reply = await bus.request(subjects.offload_put(ns, store.instance_id),
                                  OffloadPut(blocks=[good, bad]), timeout=WAIT,
                                  reply_type=proto.OffloadPutReply)
        assert (reply.stored, reply.refused) == (2, 0)


async def test_a_store_refusing_every_put_is_one_warning_per_interval(
        nats_server, etcd_server, bus, discovery, ns):
    """A store with require_token_ids refuses every put of an engine whose blocks carry no
    token ids: the worker's client warned once per refused put; now once per interval
    (LogThrottle, its clock here a test's), counting the blocks and replies since the line
    before."""
    from structlog.testing import capture_logs

    from genset.offload.client import REFUSED
    from genset.runtime.logging import LogThrottle

    now = [0.0]
    throttle = LogThrottle(30.0, clock=lambda: now[0])
    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.01,
                             require_token_ids=True):
        client = await started_client(bus, discovery, ns, 1, refused_warn=throttle)
        try:
            def bare(seed: int) -> list[OffloadBlock]:
                blocks = chain(seed, 2, 100)
                for b in blocks:
                    b.token_ids = b""
                return blocks

            with capture_logs() as logs:
                for seed in range(20):  # one put (one reply) at a time: 20 refusals
                    assert client.put_behind(bare(seed)) == 2
                    assert await client.flush(WAIT)
                first = [e for e in logs if e["event"] == REFUSED]
                assert len(first) == 1, first  # the first refusal, then quiet
                assert first[0]["refused"] == 2 and first[0]["replies"] == 1
                assert "no token ids" in first[0]["error"]
                assert first[0]["log_level"] == "warning"
                now[0] += 30.0  # an interval later: one line for the 19 + this one
                assert client.put_behind(bare(99)) == 2
                assert await client.flush(WAIT)
            lines = [e for e in logs if e["event"] == REFUSED]
            assert len(lines) == 2, lines
            assert lines[1]["refused"] == 40 and lines[1]["replies"] == 20
            assert client.stats["put_refused"] == 42  # every refusal still counted
        finally:
            await client.close()


async def test_events_per_tier_and_resync(nats_server, etcd_server, bus, discovery, ns,
                                          tmp_path):
    batches: list[proto.KvEventBatch] = []

    async def on_event(msg) -> None:
        batches.append(proto.decode(msg.data, proto.KvEventBatch))

    sub = await bus.subscribe(subjects.offload_events_all(ns), on_event)
    # plain LRU: the pushers below push the reused blocks out of RAM onto disk (`slru`, the
    # default, would keep the reused ones in RAM and spill the pushers instead)
    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=8 * 1400 / 2**30,
                             offload_disk_gb=0.001, offload_dir=str(tmp_path),
                             admission="lru") as store:
        sid = store.instance_id
        replicas = {"host": HashSetReplica(), "disk": HashSetReplica()}
        seen = 0

        def apply_new() -> None:
            nonlocal seen
            for b in batches[seen:]:
                assert b.worker_id == sid
                assert replicas[b.tier].apply(b), b
            seen = len(batches)

        await wait_for(lambda: {b.tier for b in batches} == {"host", "disk"}, "start events")
        assert batches[0].tier == "host" and batches[0].events == [proto.Cleared()]
        client = await started_client(bus, discovery, ns, 1)
        reused = chain(10, 6, 1000)
        client.put_behind(reused)
        client.put_behind(reused)
        assert await client.flush(WAIT)
        pushers = chain(11, 8, 1000)
        for _ in range(3):
            await client.lookup([b.hash for b in pushers], deadline_s=WAIT)
        client.put_behind(pushers)
        assert await client.flush(WAIT)
        assert await store.store.flush(WAIT)
        cache = store.store.cache

        def in_step() -> bool:
            apply_new()
            return (replicas["host"].hashes == set(cache.ram.entries)
                    and replicas["disk"].hashes == set(cache.disk.entries))

        await wait_for(in_step, "replicas in step with the tiers")
        assert {b.hash for b in reused} <= replicas["disk"].hashes
        # a resync: the snapshot arrives on the events subject where the reply says
        reply = await bus.request(subjects.offload_resync(ns, sid),
                                  proto.KvResyncRequest(worker_id=sid), timeout=WAIT,
                                  reply_type=proto.OffloadResyncReply)
        ranges = {t.tier: t for t in reply.tiers}
        assert ranges["disk"].blocks == len(cache.disk)
        await wait_for(lambda: any(b.tier == "disk" and
                                   b.event_id == ranges["disk"].last_event_id
                                   for b in batches), "snapshot published")
        first = next(b for b in batches
                     if b.tier == "host" and b.event_id == ranges["host"].first_event_id)
        assert first.events[0] == proto.Cleared()
        assert in_step()
        await client.close()
    # a clean stop announces the RAM tier cleared
    await wait_for(lambda: batches[-1].tier == "host" and batches[-1].events[-1] ==
                   proto.Cleared(), "RAM cleared on stop")
    await sub.unsubscribe()


async def test_the_store_is_listed_in_etcd_under_its_lease(nats_server, etcd_server,
                                                         discovery, ns):
    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.01) as store:
        found = await discovery.get_prefix(keys.offload_instances_prefix(ns),
                                           proto.InstanceRecord)
        (rec,) = found.values()
        assert rec.instance_id == store.instance_id and rec.component == "kv_offload"
        assert rec.subjects["lookup"] == subjects.offload_lookup(ns, store.instance_id)
        assert int(rec.labels["ram_bytes"]) == int(0.01 * 2**30)
    assert await discovery.get_prefix(keys.offload_instances_prefix(ns)) == {}


def _outbox_entries(store: OffloadService) -> int:
    """Block entries (hashes) in the store's unpublished event batches."""
    return sum(len(ev.blocks) if isinstance(ev, proto.Stored) else
               len(ev.hashes) if isinstance(ev, proto.Removed) else 1
               for b in store._outbox for ev in b.events)


async def test_a_flood_of_resyncs_queues_one_snapshot_per_tier_not_one_per_request(
        nats_server, etcd_server, bus, discovery, ns):
    """Anyone on the bus may ask for resyncs: each used to queue a full snapshot of every tier
    (memory and CPU in proportion to the store, per request; 128 requests took a store of 30k
    blocks from 97 to 737 MB). A snapshot not yet started on the wire serves every request
    that comes before it goes out."""
    batches: list[proto.KvEventBatch] = []

    async def on_event(msg) -> None:
        batches.append(proto.decode(msg.data, proto.KvEventBatch))

    sub = await bus.subscribe(subjects.offload_events_all(ns), on_event)
    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.01) as store:
        sid = store.instance_id
        client = await started_client(bus, discovery, ns, 1)
        client.put_behind(chain(30, 40, 100))
        assert await client.flush(WAIT)
        held = len(store.store.cache.ram)
        assert held == 40
        # 200 requests before the publisher gets a turn (the handler never waits, so called
        # back to back nothing is published in between): a burst the loop takes in at once
        request = proto.encode(proto.KvResyncRequest(worker_id=sid))
        replies = [await store._on_resync(request) for _ in range(200)]
        assert {tuple((t.tier, t.first_event_id, t.last_event_id) for t in r.tiers)
                for r in replies} == {tuple((t.tier, t.first_event_id, t.last_event_id)
                                            for t in replies[0].tiers)}
        assert _outbox_entries(store) <= 2 * (held + 2)  # one snapshot (+ events before it)
        # over NATS too, concurrently: every reply names a snapshot that does go out, in order
        over_nats = await asyncio.gather(*(
            bus.request(subjects.offload_resync(ns, sid), proto.KvResyncRequest(worker_id=sid),
                        timeout=WAIT, reply_type=proto.OffloadResyncReply) for _ in range(50)))
        wanted = {(t.tier, t.first_event_id) for r in [*replies, *over_nats] for t in r.tiers}
        await wait_for(lambda: wanted <= {(b.tier, b.event_id) for b in batches
                                          if b.events and b.events[0] == proto.Cleared()},
                       "every named snapshot published, each starting with cleared")
        replica = HashSetReplica()
        for b in batches:
            if b.tier == "host":
                assert replica.apply(b), b
        assert replica.hashes == set(store.store.cache.ram.entries)
        await client.close()
    await sub.unsubscribe()


@pytest.mark.parametrize("flag", ["--offload-ram-gb", "--offload-disk-gb", "--spill-queue-mb",
                                  "--max-block-mb"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_size_that_is_not_a_finite_number_is_a_usage_error_naming_the_flag(
        flag, value, capsys):
    """NaN passed `min=0` (NaN < 0 is false): the store then failed at start-up, connected,
    with "cannot convert float NaN to integer" (or ran with --max-block-mb nan ignored)."""
    from services.kv_offload.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main([flag, value, "--nats", "nats://127.0.0.1:1", "--etcd", "127.0.0.1:1"])
    assert exc.value.code == 2
    # refused where flags are parsed (genset.runtime.config), naming the flag
    err = capsys.readouterr().err
    assert f"{flag}: " in err and "not a finite number" in err
    # and by the options themselves when built in code (OffloadOptions.__post_init__)
    with pytest.raises(FieldError, match="must be a finite number"):
        OffloadOptions(**{flag[2:].replace("-", "_"): float(value)})


async def test_a_disk_read_rate_that_is_not_a_believable_number_is_not_taken(bus, ns):
    """The client keeps the disk read rate lookup replies carry; the worker weighs disk runs
    with it and puts it in its load reports, where routers refuse the whole onboarding cost
    when a rate is not a finite number <= 1e5 GB/s. A reply saying inf (a broken or forged
    responder) made every later report of that worker refused."""
    fake = 0xFA4E
    blocks = chain(31, 2, 100)
    rates = iter([float("inf"), 1e300, float("nan"), -1.0, 3.5])

    async def answer(data: bytes) -> OffloadLookupReply:
        proto.decode(data, OffloadLookup)
        # (a Struct is not checked when built: this is what a broken peer can send)
        return OffloadLookupReply(store_id=fake, held=len(blocks), blocks=blocks,
                                  disk_read_gbps=next(rates))

    sub = await bus.serve(subjects.offload_lookup(ns, fake), answer)
    client = OffloadClient(bus, ns)
    await client.start(instances=[fake])
    hashes = [b.hash for b in blocks]
    for _ in range(4):
        assert same(await client.lookup(hashes, deadline_s=WAIT), blocks)
        assert client.disk_read_gbps == 0.0
    assert same(await client.lookup(hashes, deadline_s=WAIT), blocks)
    assert client.disk_read_gbps == 3.5
    await client.close()
    await sub.unsubscribe()



async def test_event_batches_fit_a_server_with_a_small_max_payload(etcd_server, bus, ns,
                                                                  tmp_path):
    """A batch held up to 8192 entries whatever the server's max_payload (~560 KB when each
    block is its own chain): on a server configured below that, the batches of a put that
    fitted, and every resync snapshot, failed to publish, and routers never saw the store's
    blocks."""
    from genset.runtime.infra import NatsServer

    conf = tmp_path / "nats.conf"
    conf.write_text("max_payload: 131072\n")
    small = NatsServer(config_file=conf, data_dir=tmp_path / "nats").start()
    try:
        peer = await Bus.connect(small.url, name="peer", namespace=ns)
        batches: list[proto.KvEventBatch] = []

        async def on_event(msg) -> None:
            batches.append(proto.decode(msg.data, proto.KvEventBatch))

        sub = await peer.subscribe(subjects.offload_events_all(ns), on_event)
        async with running_store(small, etcd_server, ns, offload_ram_gb=0.05) as store:
            assert store.bus.nc.max_payload == 131072
            sid = store.instance_id
            # unchained blocks (one Stored event each, the largest entries), as many as a
            # put that fits the server's limit carries
            blocks = [OffloadBlock(hash=(i + 1) * 0x9E3779B97F4A7C15 % 2**64,
                                   parent_hash=(i + 3) * 0xC2B2AE3D27D4EB4F % 2**64)
                      for i in range(2000)]  # a 110 KB put; its events were one 136 KB batch
            reply = await peer.request(subjects.offload_put(ns, sid), OffloadPut(blocks=blocks),
                                       timeout=WAIT, reply_type=proto.OffloadPutReply)
            assert reply.stored == 2000
            replica = HashSetReplica()

            def seen_all() -> bool:
                for b in batches[seen_all.applied:]:
                    if b.tier == "host":
                        assert replica.apply(b), b
                seen_all.applied = len(batches)
                return {b.hash for b in blocks} <= replica.hashes

            seen_all.applied = 0
            await wait_for(seen_all, "the put's events published")
            reply = await peer.request(subjects.offload_resync(ns, sid),
                                       proto.KvResyncRequest(worker_id=sid), timeout=WAIT,
                                       reply_type=proto.OffloadResyncReply)
            host = next(t for t in reply.tiers if t.tier == "host")
            await wait_for(lambda: any(b.tier == "host" and b.event_id == host.last_event_id
                                       for b in batches), "the snapshot published")
            assert seen_all()
            assert 'event_batches_total{outcome="failed"}' not in store.metrics.render().decode()
        await sub.unsubscribe()
        await peer.close()
    finally:
        small.cleanup()


async def test_a_store_refuses_to_start_on_a_server_whose_messages_are_too_small(
        etcd_server, ns, tmp_path):
    """Below 64 KiB the store's replies (a 64 KiB floor before) and event batches would pass
    the server's max_payload and be lost: it says so at start, naming the setting."""
    from genset.runtime.config import ConfigError
    from genset.runtime.infra import NatsServer

    conf = tmp_path / "nats.conf"
    conf.write_text("max_payload: 32768\n")
    small = NatsServer(config_file=conf, data_dir=tmp_path / "nats").start()
    try:
        with pytest.raises(ConfigError, match=r"max_payload is 32768 bytes.*at least 65536"):
            async with running_store(small, etcd_server, ns, offload_ram_gb=0.05):
                pass
    finally:
        small.cleanup()
