"""Workers with the offload hook (genset.worker.offload_hook) against a real store service in
this process, over the session's real NATS and etcd: evicted blocks are written behind with
their KV and onboarded again, on the same worker and on another one, and greedy output is
exactly what computing the prompt gives; a flood of evictions stays within the worker's
bounds; no store, or a store gone, means computing, never an error."""

from __future__ import annotations

import uuid

import pytest

import proto
from genset.kv.hashing import block_hashes
from genset.runtime.metrics import Metrics
from genset.worker import HostConfig, WorkerHost
from genset.worker.offload_hook import OffloadHook, OffloadHookConfig
from tests.test_offload_service import WAIT, running_store, wait_for

torch = pytest.importorskip("torch")

from genset.engines.torch.engine import TorchEngine  # noqa: E402

MODEL = "tiny"
BS = 16


class TorchWorker:
    """A WorkerHost on a tiny torch engine with the offload hook."""

    def __init__(self, bus, discovery, namespace: str, *, num_blocks: int = 16,
                 queue_bytes: int = 64 << 20, handover_bytes: int = 64 << 20,
                 block_size: int = BS) -> None:
        self.instance_id = int(uuid.uuid4().int & ((1 << 63) - 1)) or 1
        self.metrics = Metrics(process_metrics=False)
        self.engine = TorchEngine("tiny", num_blocks=num_blocks, block_size=block_size,
                                  worker_id=self.instance_id)
        # a generous deadline: these tests check what onboarding gives, not how fast
        self.hook = OffloadHook(discovery=discovery, metrics=self.metrics,
                                config=OffloadHookConfig(deadline_s=WAIT,
                                                         max_queue_bytes=queue_bytes))
        self.host = WorkerHost(self.engine, bus=bus, discovery=discovery,
                               instance_id=self.instance_id, metrics=self.metrics,
                               hooks=self.hook,
                               config=HostConfig(namespace=namespace, model=MODEL,
                                                 tokenizer="tiny",
                                                 evict_handover_bytes=handover_bytes))
        self.bus = bus

    async def generate(self, prompt: list[int], max_tokens: int = 6,
                       offload_hint: int | None = None):
        req = proto.GenerateRequest(
            request_id=uuid.uuid4().hex, model=MODEL, token_ids=proto.pack_tokens(prompt),
            stop=proto.StopConditions(max_tokens=max_tokens, ignore_eos=True),
            sampling=proto.SamplingParams(temperature=0.0), offload_hint=offload_hint)
        stream = await self.bus.stream_request(self.host.generate_subject, req, timeout=WAIT)
        chunks = [c async for c in stream]
        final = chunks[-1]
        assert final.final and final.error is None, final
        return [t for c in chunks for t in proto.unpack_tokens(c.token_ids)], final.usage


def prompt_of(seed: int, n: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, 4096) for _ in range(n)]


async def evict_to_store(worker: TorchWorker, store, hashes: list[int],
                         others: list[list[int]]) -> None:
    """Push the blocks `hashes` out of `worker`'s cache by serving the `others` prompts, then
    wait until the store holds them (written behind)."""
    for other in others:
        await worker.generate(other)
    assert worker.engine.cached_prefix(hashes) == 0
    assert await worker.hook.client.flush(WAIT)
    await wait_for(lambda: all(h in store.store.cache.ram for h in hashes),
                   "the prompt's blocks in the store")


@pytest.fixture
def ns() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


async def test_evicted_blocks_onboard_on_the_same_and_another_worker_with_equal_output(
        nats_server, etcd_server, bus, discovery, ns):
    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.05) as store:
        a = TorchWorker(bus, discovery, ns)
        await a.host.start()
        b = None
        try:
            await wait_for(lambda: a.hook.client.instances == (store.instance_id,),
                           "the store seen by the worker")
            prompt = prompt_of(1, 5 * BS + 3)  # 5 full blocks
            hashes = block_hashes(prompt, BS)
            computed, usage = await a.generate(prompt)
            assert usage.cached_tokens == 0
            # other prompts push the prompt's blocks out of the 16-block cache
            await evict_to_store(a, store, hashes, [prompt_of(10 + i, 7 * BS) for i in range(4)])

            # a router that saw none of the prompt in the store (hint 0): no lookup, computed
            lookups = a.hook.counts["lookups"]
            hinted, usage = await a.generate(prompt, offload_hint=0)
            assert usage.cached_tokens == 0
            assert hinted == computed
            assert a.hook.counts["lookups"] == lookups
            assert a.hook.counts["skipped_hint"] == 1
            for i in range(4):  # out of the cache again
                await a.generate(prompt_of(20 + i, 7 * BS))
            assert a.engine.cached_prefix(hashes) == 0

            again, usage = await a.generate(prompt, offload_hint=5)
            assert usage.cached_tokens == 5 * BS  # onboarded, not computed
            assert again == computed

            b = TorchWorker(bus, discovery, ns)
            await b.host.start()
            await wait_for(lambda: b.hook.client.instances == (store.instance_id,),
                           "the store seen by the second worker")
            elsewhere, usage = await b.generate(prompt)
            assert usage.cached_tokens == 5 * BS
            assert elsewhere == computed
            assert b.hook.counts["onboarded_blocks"] == 5
            assert a.hook.counts["written_blocks"] > 0
        finally:
            await a.host.close()
            if b is not None:
                await b.host.close()


async def test_blocks_larger_than_a_nats_message_are_written_and_onboarded_in_parts(
        nats_server, etcd_server, bus, discovery, ns):
    """The tiny model with 1024-token blocks: 2 MiB of float32 KV per block (a Llama-3-8B
    16-token block's size), over the session's NATS with its default 1 MiB max_payload.
    Evicted, they are written behind in parts; another worker onboards them in parts and
    its greedy output is the computed one."""
    bs = 1024
    assert bus.nc.max_payload == 1 << 20
    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.1) as store:
        a = TorchWorker(bus, discovery, ns, num_blocks=8, block_size=bs)
        await a.host.start()
        b = None
        try:
            await wait_for(lambda: a.hook.client.instances == (store.instance_id,),
                           "the store seen by the worker")
            prompt = prompt_of(3, 3 * bs + 3)  # 3 full blocks
            hashes = block_hashes(prompt, bs)
            computed, _ = await a.generate(prompt)
            # push the prompt's blocks out of the 8-block cache
            await evict_to_store(a, store, hashes, [prompt_of(40 + i, 5 * bs) for i in range(2)])
            assert a.hook.client.stats["put_large"] >= 3
            assert a.hook.client.stats["put_dropped_too_large"] == 0
            assert len(store.store.cache.ram.get(hashes[0]).value.data) > 2 << 20

            b = TorchWorker(bus, discovery, ns, num_blocks=8, block_size=bs)
            await b.host.start()
            await wait_for(lambda: b.hook.client.instances == (store.instance_id,),
                           "the store seen by the second worker")
            elsewhere, usage = await b.generate(prompt)
            assert usage.cached_tokens == 3 * bs
            assert elsewhere == computed
            assert b.hook.counts["onboarded_blocks"] == 3
            assert b.hook.client.stats["lookup_large"] == 3
            text = b.metrics.render().decode()
            assert 'genset_worker_offload_large_blocks{kind="lookup_large"} 3.0' in text
        finally:
            await a.host.close()
            if b is not None:
                await b.host.close()


async def test_no_store_means_computing_and_no_payload_is_read(bus, discovery, ns):
    w = TorchWorker(bus, discovery, ns)
    await w.host.start()
    try:
        assert w.hook.client.instances == ()
        assert w.engine.evictions is not None and w.engine.evictions.paused
        prompt = prompt_of(2, 3 * BS + 1)
        first, _ = await w.generate(prompt)
        for i in range(3):
            await w.generate(prompt_of(30 + i, 7 * BS))
        again, usage = await w.generate(prompt)
        assert again == first and usage.cached_tokens == 0
        assert w.engine.evictions.handed == 0 and w.engine.evictions.skipped > 0
        assert w.hook.counts["lookups"] == 0
    finally:
        await w.host.close()


async def test_an_eviction_flood_keeps_the_worker_within_its_bounds(
        nats_server, etcd_server, bus, discovery, ns):
    """Far more evicted KV than the hand-over and the write-behind queue hold: what waits
    never exceeds either bound; the excess is dropped and counted, requests all succeed."""
    queue_bytes = 4 * 33 * 1024  # four tiny-model blocks
    handover_bytes = 3 * 33 * 1024
    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.002):
        w = TorchWorker(bus, discovery, ns, num_blocks=12, queue_bytes=queue_bytes,
                        handover_bytes=handover_bytes)
        peaks = {"queue": 0, "handover": 0}
        client_put = None
        await w.host.start()
        try:
            await wait_for(lambda: w.hook.client.instances, "the store seen")
            client = w.hook.client
            handover = w.engine.evictions
            client_put = client.put_behind

            def watched(blocks):  # the peaks, right where the bytes pile up
                n = client_put(blocks)
                peaks["queue"] = max(peaks["queue"], client.queued_bytes)
                return n

            client.put_behind = watched
            real_put = handover.put

            def watched_put(blocks, dropped):
                real_put(blocks, dropped)
                peaks["handover"] = max(peaks["handover"], handover.pending_bytes)

            handover.put = watched_put
            for i in range(12):
                await w.generate(prompt_of(100 + i, 10 * BS), max_tokens=2)
            assert peaks["queue"] <= queue_bytes
            assert peaks["handover"] <= handover_bytes
            assert handover.handed > 0
            dropped = handover.dropped + client.stats["put_dropped_full"]
            assert dropped > 0  # the flood was larger than the bounds
        finally:
            await w.host.close()


async def test_the_router_follows_the_stores_tiers_and_membership(
        nats_server, etcd_server, bus, discovery, ns):
    from genset.offload.client import OffloadClient
    from genset.routing.core import STORE_TIERS, RouterConfig, RouterCore
    from genset.routing.feeds import RouterFeeds
    from tests.offload_helpers import chain

    core = RouterCore(RouterConfig(block_size=16))
    feeds = RouterFeeds(core, bus=bus, namespace=ns, discovery=discovery)
    await feeds.start(initial_sync_s=0)
    try:
        async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.01) as store:
            await wait_for(lambda: store.instance_id in core.stores, "the store known")
            client = OffloadClient(bus, ns)
            await client.start(instances=[store.instance_id])
            blocks = chain(5, 9, 500)
            client.put_behind(blocks)
            assert await client.flush(WAIT)
            hashes = [b.hash for b in blocks]
            await wait_for(lambda: core.index.run_by_tier(hashes, 0, STORE_TIERS) == [9, 0],
                           "the store's RAM blocks in the router's index")
            assert store.instance_id not in core.workers
            await client.close()
        # a clean stop: RAM announced cleared and the record gone
        await wait_for(lambda: not core.stores, "the store forgotten")
        assert core.index.run_by_tier(hashes, 0, STORE_TIERS) == [0, 0]
    finally:
        await feeds.close()


async def test_a_block_the_engine_refuses_is_not_asked_for_again(
        nats_server, etcd_server, bus, discovery, ns):
    """A store block whose values are finite but far beyond what the model computes (the
    store cannot check the model's bound, and keeps it; here put before the honest copy, as
    a faulty or hostile worker could): the engine refuses it and the request is computed;
    the worker then stops its lookups before that block, so it costs one refused import,
    and the blocks before it are still onboarded."""
    from genset.engines.torch import kvformat
    from proto.offload import OffloadBlock

    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.05) as store:
        a = TorchWorker(bus, discovery, ns)
        await a.host.start()
        try:
            await wait_for(lambda: a.hook.client.instances == (store.instance_id,),
                           "the store seen by the worker")
            prompt = prompt_of(3, 5 * BS + 3)  # 5 full blocks
            hashes = block_hashes(prompt, BS)
            computed, _ = await a.generate(prompt)
            (third,) = await a.engine.export_kv([hashes[2]])
            poisoned = kvformat.encode(kvformat.decode(third.data) * 1e6)
            counts = store.store.put([OffloadBlock(
                hash=hashes[2], parent_hash=hashes[1],
                token_ids=proto.pack_tokens(prompt[2 * BS:3 * BS]), data=poisoned)])
            assert counts.stored == 1  # finite: the store takes it

            async def evict_and_ask(tag: int):
                await evict_to_store(a, store, hashes,
                                     [prompt_of(tag + i, 7 * BS) for i in range(4)])
                return await a.generate(prompt)

            refused, usage = await evict_and_ask(40)
            assert refused == computed and usage.cached_tokens == 0  # computed instead
            assert a.hook.counts["refused_blocks"] == 1
            assert store.store.cache.ram.get(hashes[2]).value.data == poisoned  # still there
            again, usage = await evict_and_ask(50)
            assert again == computed
            assert usage.cached_tokens == 2 * BS  # the two blocks before it, onboarded
            assert a.hook.counts["refused_blocks"] == 1  # not refused a second time
        finally:
            await a.host.close()


async def test_a_refused_import_computes_the_prompt_instead_of_failing(bus, discovery):
    """A store that serves a payload the engine cannot take (another model's KV, a corrupt
    block): the request is computed, and the hook's fault is counted."""
    from genset.engines.types import KvBlockData, KvImport
    from genset.worker import WorkerHooks
    from tests.test_worker import Host

    prompt = list(range(1, 42))

    class BadStore(WorkerHooks):
        async def before_run(self, request, token_ids):
            return KvImport([KvBlockData(h, b"not a KV payload")
                             for h in block_hashes(prompt, 4)[:3]])

    h = Host(bus, discovery, hooks=BadStore())
    await h.host.start()
    try:
        chunks = await h.generate(h.request(prompt, max_tokens=3))
        assert chunks[-1].finish_reason == "length" and chunks[-1].usage.cached_tokens == 0
        assert h.metric("genset_worker_hook_errors_total", hook="before_run") == 1
    finally:
        await h.host.close()
