"""Onboarding into a KV cache too small for the queue (a mocker worker with the offload hook,
a real store, the session's real NATS and etcd): a request queued behind one that cannot fit
beside the running ones gets no blocks it could not keep. Before, it onboarded what was free
at its arrival, the head of the queue released those pins at every step while it waited
(though that could not make it fit), and its admission then evicted them unused: the store's
lookup, the transfer and the import for nothing (`genset up --engine mocker
--worker-arg=--kv-blocks=128`, 8 clients over 12 prefixes: thousands of blocks onboarded,
0 cached tokens on almost every request). Now the blocks it has no room for wait in host
memory until its admission (`Scheduler.hold_kv`). Counts only: every wait is on a condition."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid

import pytest

from genset.kv.hashing import block_hashes
from genset.worker.offload_hook import OffloadHook, OffloadHookConfig
from tests.test_offload_service import WAIT, running_store, wait_for
from tests.test_worker import Host

BS = 16
BLOCKS = 48


def prompt_of(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(n)]


@pytest.mark.parametrize("hold_mb", [0, 16])
async def test_a_queued_request_onboards_only_blocks_it_can_keep(
        nats_server, etcd_server, bus, discovery, hold_mb):
    """With no host memory to hold them (`--offload-hold-mb 0`), a queued request that has
    no room in the cache fetches nothing; with it, its blocks wait in host memory and its
    admission writes them: its whole stored prefix comes from the store."""
    ns = f"t{uuid.uuid4().hex[:10]}"
    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.01) as store:
        hook = OffloadHook(discovery=discovery, config=OffloadHookConfig(
            deadline_s=WAIT, max_held_bytes=hold_mb << 20))
        h = Host(bus, discovery, speedup=1.0, num_blocks=BLOCKS, block_size=BS,
                 context_length=4096, hooks=hook, namespace=ns)
        await h.host.start()
        try:
            await wait_for(lambda: hook.client.instances == (store.instance_id,),
                           "the store seen by the worker")
            sched = h.engine.core.scheduler  # the mocker steps on this loop: safe to read
            pool = sched.pool

            async def generate(tokens, max_tokens=2, stream_out=None):
                req = h.request(tokens, max_tokens=max_tokens)
                stream = await bus.stream_request(h.subject, req, timeout=WAIT)
                if stream_out is not None:
                    stream_out.append(stream)
                chunks = [c async for c in stream]
                return chunks[-1]

            # two prompts of 20 full blocks (+1 token) go to the store: computed, then
            # pushed out of the 48-block cache by others
            stored = [prompt_of(1, 20 * BS + 1), prompt_of(2, 20 * BS + 1)]
            for p in stored:
                assert (await generate(p)).error is None
            for i in range(3):
                assert (await generate(prompt_of(10 + i, 30 * BS))).error is None
            hashes = [block_hashes(p[:20 * BS], BS) for p in stored]
            assert all(h.engine.cached_prefix(hs) == 0 for hs in hashes)
            assert await hook.client.flush(WAIT)
            await wait_for(lambda: all(x in store.store.cache.ram for hs in hashes for x in hs),
                           "the stored prompts in the store")
            base_unused = pool.num_imports_evicted_unused

            # A runs (31 blocks and growing); H (21 blocks, nothing stored) cannot fit beside
            # it and waits at the head of the queue. The mocker slowed 20x meanwhile (a
            # decode step >= 0.1 s): A, cancelled by the test once the queue is as wanted, cannot
            # end or outgrow its free blocks first (no timing is asserted)
            timing = h.engine.core.timing
            timing.speedup_ratio = 0.05
            streams: list = []
            a = asyncio.create_task(generate(prompt_of(20, 30 * BS), max_tokens=250,
                                             stream_out=streams))
            await wait_for(lambda: sched.num_running == 1 and streams, "A running")
            head = asyncio.create_task(generate(prompt_of(21, 21 * BS)))
            await wait_for(lambda: sched.num_waiting == 1, "H queued")
            # R, behind H, has all its 20 blocks in the store
            lookups = hook.counts["lookups"]
            r = asyncio.create_task(generate(stored[0]))
            await wait_for(lambda: sched.num_waiting == 2, "R queued behind H")
            assert sched.num_running == 1  # (A still runs: H could not fit)
            timing.speedup_ratio = 1.0
            await streams[0].cancel()  # A goes: H, then R run
            final_h, final_r = await head, await r
            assert final_h.error is None and final_r.error is None
            with contextlib.suppress(Exception):
                await a  # (its stream ended by the cancel)
            # no onboarded block was evicted before a request used it ...
            assert pool.num_imports_evicted_unused == base_unused
            assert sched.num_pinned_blocks == 0
            if not hold_mb:
                # ... because none was fetched for R: the engine had no room for it beside
                # H's prompt (the blocks would have gone to H before R ran)
                assert hook.counts["skipped_no_room"] == 1
                assert hook.counts["lookups"] == lookups
                assert final_r.usage.cached_tokens == 0
                assert sched.num_held_blocks == 0
            else:
                # ... and R's were fetched all the same, held in host memory (nothing of
                # the cache), and written into its blocks when it was admitted
                assert hook.counts["skipped_no_room"] == 0
                assert hook.counts["lookups"] == lookups + 1
                assert final_r.usage.cached_tokens == 20 * BS
                assert sched.num_held_blocks == 20 and sched.num_held_used == 20
                assert sched.held_bytes == 0

            # idle, the other stored prompt is onboarded whole and used
            onboarded = hook.counts["onboarded_blocks"]
            final = await generate(stored[1])
            assert final.error is None
            assert final.usage.cached_tokens == 20 * BS
            assert hook.counts["onboarded_blocks"] == onboarded + 20
            assert pool.num_imports_evicted_unused == base_unused
            assert sched.num_pinned_blocks == 0
        finally:
            await h.host.close()

