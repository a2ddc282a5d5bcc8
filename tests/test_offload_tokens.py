"""Imported KV blocks go back to the offload store with their token ids (`KvImport.token_ids`),
end to end on the session's real NATS and etcd with a real store and mocker workers: a block
onboarded from the store, and a block a decode worker received from a prefill worker, are put
back verified when evicted again: the store's unverified counter stays at 0."""

from __future__ import annotations

import uuid

import proto
from genset.disagg.worker import DisaggConfig, DisaggHook
from genset.engines.mocker import MockerConfig
from genset.kv.hashing import block_hashes
from genset.runtime.metrics import Metrics
from genset.worker.hooks import HookChain
from genset.worker.offload_hook import OffloadHook, OffloadHookConfig
from tests.helpers.offload_worker import offload_worker, prompt_of
from tests.stack import metric, parse_metrics
from tests.test_disagg_worker import Worker, prompt
from tests.test_offload_service import WAIT, running_store, wait_for
from tests.test_worker import Host


def spy_puts(store) -> dict[int, bytes]:
    """hash -> token ids of every block put to `store` (a running service) from now on."""
    seen: dict[int, bytes] = {}
    inner = store.store.put

    def put(blocks, **kw):
        for b in blocks:
            seen[b.hash] = b.token_ids
        return inner(blocks, **kw)

    store.store.put = put
    return seen


def unverified(store) -> str:
    text = store.metrics.render().decode()
    return next(line for line in text.splitlines()
                if line.startswith("genset_offload_unverified_blocks_total"))


async def test_a_block_onboarded_from_the_store_is_put_back_with_its_token_ids(
        nats_server, etcd_server, bus, discovery):
    bs, ns = 16, f"t{uuid.uuid4().hex[:10]}"
    worker = offload_worker(MockerConfig(block_size=bs, num_blocks=16), bus=bus,
                            discovery=discovery, namespace=ns, wait_s=WAIT)
    hook = worker.hook
    async with (running_store(nats_server, etcd_server, ns, offload_ram_gb=0.05) as store,
                worker.serving(store)):
        p = prompt_of(1, 5 * bs + 3)  # 5 full blocks
        hashes = block_hashes(p, bs)
        await worker.generate(bus, p)
        for i in range(3):  # push its blocks out of the 16-block cache: put, computed here
            await worker.generate(bus, prompt_of(10 + i, 7 * bs))
        assert worker.engine.cached_prefix(hashes) == 0
        assert await hook.client.flush(WAIT)
        await wait_for(lambda: all(h in store.store.cache.ram for h in hashes),
                       "the prompt's blocks in the store")
        assert store.store.counts["unverified"] == 0

        _, usage = await worker.generate(bus, p)
        assert usage.cached_tokens == 5 * bs  # onboarded, not computed
        assert hook.counts["onboarded_blocks"] == 5
        # The hook skips evicting a block it onboarded lately (the store has it); its memory
        # of them is bounded (4 x the engine's blocks): forgotten here, as after that many
        # onboarded blocks, so the blocks go to the store again when evicted
        hook._onboarded.clear()
        seen = spy_puts(store)
        for i in range(3):
            await worker.generate(bus, prompt_of(20 + i, 7 * bs))
        assert worker.engine.cached_prefix(hashes) == 0
        assert await hook.client.flush(WAIT)
        await wait_for(lambda: all(h in seen for h in hashes), "the onboarded blocks put again")
        for i, h in enumerate(hashes):
            assert seen[h] == proto.pack_tokens(p[i * bs:(i + 1) * bs])
        assert store.store.counts["unverified"] == 0
        assert unverified(store) == "genset_offload_unverified_blocks_total 0.0"


async def test_a_block_received_from_a_prefill_worker_is_put_back_with_its_token_ids(
        nats_server, etcd_server, bus, discovery):
    ns = f"d{uuid.uuid4().hex[:8]}"
    offload = OffloadHook(discovery=discovery, config=OffloadHookConfig(deadline_s=WAIT))
    m = Metrics(process_metrics=False)
    disagg = DisaggHook(DisaggConfig(policy="always"), discovery=discovery, metrics=m)
    # 64 blocks of 4 tokens: three more 90-token prompts push one's 22 blocks out
    decode = Host(bus, discovery, hooks=HookChain(offload, disagg), namespace=ns,
                  role="decode", num_blocks=64)
    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.05) as store:
        prefill = await Worker(bus, discovery, "prefill", ns).start()
        await decode.host.start()
        try:
            await wait_for(lambda: len(disagg.pool) == 1 and offload.client.instances
                           == (store.instance_id,), "the prefill worker and the store seen")
            seen = spy_puts(store)
            p = prompt(0)
            hashes = block_hashes(p, 4)
            await decode.generate(decode.request(p, max_tokens=4))
            assert metric(parse_metrics(m.render().decode()),
                          "genset_disagg_remote_prefills_total") == 1  # its KV received
            assert offload.counts["onboarded_blocks"] == 0  # the store had none of it
            # a prompt whose first 10 blocks are cached here: the transfer starts at block 10
            q = p[:40] + prompt(7)[:50]
            qh = block_hashes(q, 4)
            await decode.generate(decode.request(q, max_tokens=4))
            assert metric(parse_metrics(m.render().decode()),
                          "genset_disagg_remote_prefills_total") == 2
            for i in range(1, 5):
                await decode.generate(decode.request(prompt(i), max_tokens=4))
            assert decode.engine.cached_prefix(hashes) == 0
            assert decode.engine.cached_prefix(qh) == 0
            assert await offload.client.flush(WAIT)
            await wait_for(lambda: all(h in seen for h in hashes + qh),
                           "the received blocks put to the store")
            for toks, hs in ((p, hashes), (q, qh)):
                for i, h in enumerate(hs):
                    assert seen[h] == proto.pack_tokens(toks[i * 4:(i + 1) * 4])
            assert store.store.counts["unverified"] == 0
            assert unverified(store) == "genset_offload_unverified_blocks_total 0.0"
        finally:
            await decode.host.close()
            await prefill.close()
