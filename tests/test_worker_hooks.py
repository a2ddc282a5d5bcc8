"""The worker's extension points (genset.worker.hooks) on a real mocker engine and the session's
real NATS and etcd: what each hook sees, a prefill→decode KV hand-over through them, hook
failures, evictions; plus the roles and the host's own InstanceRecord."""

from __future__ import annotations

import pytest

import proto
from genset.engines.types import KvBlockData
from genset.kv.hashing import block_hashes, chain_hash, local_block_hash
from genset.runtime.bus_errors import RemoteError
from genset.worker import (
    EvictedBlock,
    HookChain,
    KvImport,
    PrefillDone,
    WorkerContext,
    WorkerHooks,
)
from genset.worker.hooks import overridden
from genset.worker.kv_feed import EvictionTracker
from proto import keys, subjects
from tests.test_worker import MODEL, Host, wait_for


class Recorder(WorkerHooks):
    """Records every call; optionally offers an import or raises."""

    def __init__(self, offer: KvImport | None = None, fail_at: str | None = None) -> None:
        self.ctx: WorkerContext | None = None
        self.before: list[tuple[str, list[int]]] = []
        self.prefills: list[PrefillDone] = []
        self.exported: list[list[KvBlockData]] = []
        self.evicted: list[EvictedBlock] = []
        self.closed = 0
        self.offer = offer
        self.fail_at = fail_at

    async def start(self, ctx: WorkerContext) -> None:
        self.ctx = ctx

    async def before_run(self, request, token_ids):
        self.before.append((request.request_id, token_ids))
        if self.fail_at == "before_run":
            raise RuntimeError("offload store unreachable")
        return self.offer

    async def after_prefill(self, done: PrefillDone) -> None:
        self.prefills.append(done)
        # what a prefill worker does: read the prompt's blocks before anything can evict them
        self.exported.append(await self.ctx.engine.export_kv(done.block_hashes))
        if self.fail_at == "after_prefill":
            raise RuntimeError("decode worker unreachable")

    def on_evict(self, blocks: list[EvictedBlock]) -> None:
        self.evicted.extend(blocks)

    async def close(self) -> None:
        self.closed += 1


def tokens_of(chunks) -> list[int]:
    return [t for c in chunks for t in proto.unpack_tokens(c.token_ids)]


async def test_hooks_see_each_request_its_prefill_and_evicted_blocks(bus, discovery):
    # 24 blocks of 4 tokens: six distinct 40-token prompts force evictions.
    hooks = Recorder()
    h = Host(bus, discovery, num_blocks=24, emit_token_ids=True, hooks=hooks)
    await h.host.start()
    try:
        assert hooks.ctx is not None and hooks.ctx.instance_id == h.instance_id
        assert (hooks.ctx.role, hooks.ctx.model, hooks.ctx.block_size) == ("decode", MODEL, 4)
        prompts = [[(i * 100 + j) % 999 + 1 for j in range(40)] for i in range(6)]
        outputs = []
        for i, prompt in enumerate(prompts):
            outputs.append(tokens_of(await h.generate(
                h.request(prompt, max_tokens=3, request_id=f"r{i}"))))
        assert hooks.before == [(f"r{i}", p) for i, p in enumerate(prompts)]
        assert [d.request.request_id for d in hooks.prefills] == [f"r{i}" for i in range(6)]
        for done, prompt, out, exported in zip(hooks.prefills, prompts, outputs, hooks.exported,
                                               strict=True):
            assert done.token_ids == prompt and done.block_hashes == block_hashes(prompt, 4)
            assert done.first_token_ids == out[:len(done.first_token_ids)]
            assert not done.finished and done.engine_request_id.startswith(done.request.request_id)
            # every prompt block was still held when the hook ran
            assert [b.hash for b in exported] == done.block_hashes
        await wait_for(lambda: hooks.evicted, what="evicted blocks reported")
        all_hashes = {x for p in prompts for x in block_hashes(p, 4)}
        for block in hooks.evicted:
            assert block.hash in all_hashes
            assert block.token_ids is not None  # the engine emits token ids
            local = local_block_hash(proto.unpack_tokens(block.token_ids))
            assert chain_hash(block.parent_hash, local) == block.hash
        assert not {b.hash for b in hooks.evicted} & h.engine.core.pool.cached_hashes()
    finally:
        await h.host.close()
    assert hooks.closed == 1


async def test_prefill_to_decode_hand_over_through_the_hooks(bus, discovery):
    """A prefill-role worker exports the prompt's blocks after prefill; a decode worker's
    before_run imports them: its engine starts with the prompt cached."""
    prefill_hooks = Recorder()
    prefill = Host(bus, discovery, hooks=prefill_hooks, role="prefill")
    await prefill.host.start()
    prompt = list(range(1, 42))  # 10 full blocks of 4
    try:
        assert prefill.host.model_card().role == "prefill"
        chunks = await prefill.generate(prefill.request(prompt, max_tokens=1))
        assert len(tokens_of(chunks)) == 1
        [done] = prefill_hooks.prefills
        assert done.finished  # a prefill-only request: ended with its first token
        [exported] = prefill_hooks.exported
        assert len(exported) == 10
    finally:
        await prefill.host.close()

    decode_hooks = Recorder(offer=KvImport(blocks=exported))
    decode = Host(bus, discovery, hooks=decode_hooks, role="decode")
    await decode.host.start()
    try:
        chunks = await decode.generate(decode.request(prompt, max_tokens=4))
        assert chunks[-1].usage == proto.Usage(prompt_tokens=41, completion_tokens=4,
                                               cached_tokens=40)
        assert decode_hooks.prefills[0].cached_tokens == 40
    finally:
        await decode.host.close()


@pytest.mark.parametrize("where", ["before_run", "after_prefill"])
async def test_a_failing_hook_fails_only_its_request(bus, discovery, where):
    h = Host(bus, discovery, hooks=Recorder(fail_at=where))
    await h.host.start()
    try:
        with pytest.raises(RemoteError) as err:
            await h.generate(h.request([1, 2, 3, 4, 5], max_tokens=50))
        assert err.value.error.code == "internal" and err.value.error.retryable
        assert where in err.value.error.message
        assert h.metric("genset_worker_hook_errors_total", hook=where) == 1
        scheduler = h.engine.core.scheduler
        await wait_for(lambda: scheduler.num_running == 0 and scheduler.pool.num_used == 0,
                       what="nothing left running in the engine")
        assert h.metric("genset_worker_requests_running") == 0
        assert h.host.health()["ready"] is True
    finally:
        await h.host.close()


async def test_role_both_registers_as_decode_with_its_own_instance_record(bus, discovery):
    h = Host(bus, discovery, role="both", register_instance=True)
    await h.host.start()
    try:
        assert h.host.generate_subject == subjects.worker_generate(h.namespace, "decode",
                                                                   h.instance_id)
        records = await discovery.get_prefix(keys.instance(h.namespace, "decode", h.instance_id),
                                             proto.InstanceRecord)
        [record] = records.values()
        assert record.component == "decode" and record.subjects == h.host.subjects
        assert record.labels == {"model": MODEL, "engine": "mocker"}
        assert h.host.model_card().role == "decode" and h.host.health()["role"] == "both"
        chunks = await h.generate(h.request([1, 2, 3], max_tokens=2))
        assert chunks[-1].finish_reason == "length"
    finally:
        await h.host.close()


def test_default_hooks_are_skipped_and_chains_combine():
    class Offer(WorkerHooks):
        def __init__(self, kv):
            self.kv = kv

        async def before_run(self, request, token_ids):
            return self.kv

    class Evictions(WorkerHooks):
        def __init__(self):
            self.seen = []

        def on_evict(self, blocks):
            self.seen.append(blocks)

    assert not any(overridden(WorkerHooks(), n) for n in ("before_run", "after_prefill",
                                                          "on_evict", "start", "close"))
    a, b = Evictions(), Evictions()
    kv = KvImport(blocks=[KvBlockData(hash=1)])
    chain = HookChain(Offer(None), a, Offer(kv), b)
    assert overridden(chain, "before_run") and overridden(chain, "on_evict")
    assert not overridden(chain, "after_prefill")
    import asyncio

    assert asyncio.run(chain.before_run(None, [1])) is kv
    chain.on_evict([EvictedBlock(hash=5, parent_hash=None, token_ids=None)])
    assert len(a.seen) == len(b.seen) == 1


def test_eviction_tracker_follows_stores_removals_and_snapshots():
    def batch(event_id, *events):
        return proto.KvEventBatch(worker_id=1, event_id=event_id, events=list(events))

    t = EvictionTracker(max_entries=3)
    stored = proto.Stored(parent_hash=None, blocks=[
        proto.StoredBlock(hash=h, token_ids=bytes([h, 0, 0, 0])) for h in (1, 2, 3)])
    assert t.apply(batch(1, stored)) == []
    assert t.apply(batch(2, proto.Removed(hashes=[2, 9]))) == [
        EvictedBlock(hash=2, parent_hash=1, token_ids=b"\x02\x00\x00\x00")]  # 9: unknown
    # a snapshot restates what is held: nothing in it is an eviction
    snap = batch(3, proto.Cleared(), proto.Stored(parent_hash=None, blocks=[
        proto.StoredBlock(hash=1)]))
    assert t.apply(snap, snapshot=True) == [] and len(t) == 1
    # a Cleared outside a snapshot forgets everything without reporting it
    assert t.apply(batch(4, proto.Cleared(), proto.Removed(hashes=[1]))) == []
    # bounded: the oldest entries go first
    t.apply(batch(5, proto.Stored(parent_hash=7, blocks=[
        proto.StoredBlock(hash=h) for h in (10, 11, 12, 13)])))
    assert len(t) == 3
    assert [e.hash for e in t.apply(batch(6, proto.Removed(hashes=[10, 13])))] == [13]


def test_the_host_hook_deadline_is_kept_above_the_hooks_own_deadlines():
    """genset.worker.host.resolve_hook_timeout (pure): unset, the hooks' longest own wait +
    the margin, at least the floor; set below that, refused with both values named."""
    from genset.worker.host import (
        HOOK_TIMEOUT_FLOOR_S,
        HOOK_TIMEOUT_MARGIN_S,
        resolve_hook_timeout,
    )

    assert (HOOK_TIMEOUT_FLOOR_S, HOOK_TIMEOUT_MARGIN_S) == (30.0, 5.0)
    assert resolve_hook_timeout(None, 0.0) == 30.0
    assert resolve_hook_timeout(None, 0.05) == 30.0
    assert resolve_hook_timeout(None, 40.0) == 45.0  # 10 s first token + 30 s transfer
    assert resolve_hook_timeout(None, 130.0) == 135.0
    assert resolve_hook_timeout(45.0, 40.0) == 45.0
    assert resolve_hook_timeout(10.0, 0.0) == 10.0  # nothing of the hooks' own to wait out
    for bad in (30.0, 44.9, 0.0):
        with pytest.raises(ValueError, match=rf"hook_timeout_s {bad:g} s .* longest wait 40 s"):
            resolve_hook_timeout(bad, 40.0)
    with pytest.raises(ValueError, match=r"hook_timeout_s 1 s"):
        resolve_hook_timeout(1.0, 0.0)  # 1 s < 0 + 5 s margin
    # a chain sums its hooks' waits (before_run runs them one after another)

    class Waits(WorkerHooks):
        def __init__(self, s: float) -> None:
            self.s = s

        def longest_wait_s(self) -> float:
            return self.s

    assert HookChain(Waits(0.05), Waits(40.0)).longest_wait_s() == 40.05
    assert WorkerHooks().longest_wait_s() == 0.0
