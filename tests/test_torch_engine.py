"""TorchEngine (shared scheduler + block pool + ModelRunner, stepping in its own thread):
prefix-cache reuse, preemption under a tiny KV capacity, KV export/import between engines,
all checked token for token against transformers' dense greedy decoding of the tiny model."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from genset.engines.torch.engine import TorchEngine  # noqa: E402
from genset.engines.torch.tiny import resolve_model  # noqa: E402
from genset.engines.types import EngineRequest, KvImport  # noqa: E402
from genset.kv.hashing import block_hashes  # noqa: E402
from genset.kv.replica import HashSetReplica  # noqa: E402
from proto.generate import SamplingParams, StopConditions  # noqa: E402
from tests.helpers.torch_reference import hf_greedy, tiny_reference_model  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def reference():
    """Dense greedy continuation by transformers with the tiny model's weights."""
    from genset.engines.torch.runner import ModelRunner

    model = tiny_reference_model(ModelRunner("tiny", num_blocks=1, block_size=16))

    def greedy(prompt, n):
        return hf_greedy(model, [prompt], n)[0]

    return greedy


async def _run(engine, rid, prompt, max_tokens, kv_import=None, sampling=GREEDY):
    req = EngineRequest(
        rid,
        list(prompt),
        sampling,
        StopConditions(max_tokens=max_tokens, ignore_eos=True),
        kv_import=kv_import,
    )
    tokens, last = [], None
    async for out in await engine.submit(req):
        tokens.extend(out.token_ids)
        last = out
    assert last is not None and last.finish_reason == "length", last
    return tokens, last


def _prompt(seed, n):
    rng = random.Random(seed)
    return [rng.randrange(3, 4096) for _ in range(n)]


async def test_prefix_cache_computes_only_uncached_tokens(reference):
    engine = TorchEngine("tiny", num_blocks=64, block_size=16, max_batch_tokens=48)
    events = engine.kv_events()
    try:
        prompt = _prompt(1, 70)  # 4 full blocks + 6 tokens
        first, out1 = await _run(engine, "a", prompt, 8)
        assert out1.cached_tokens == 0
        before = engine.runner.tokens_computed
        second, out2 = await _run(engine, "b", prompt, 8)
        assert second == first == reference(prompt, 8)
        assert out2.cached_tokens == 64
        # Only the 6 uncached prompt tokens, then 7 decode steps (the 8th token needs none).
        assert engine.runner.tokens_computed - before == 6 + 7
        # The published events describe exactly what the pool holds.
        replica = HashSetReplica()
        while (batch := events.get_nowait()) is not None:
            assert replica.apply(batch)
        assert replica.hashes == engine.scheduler.pool.cached_hashes()
        assert set(block_hashes(prompt, 16)) <= replica.hashes
    finally:
        events.close()
        await engine.stop()


def test_preemption_under_tiny_kv_capacity_matches_reference(reference):
    # The core is stepped directly with all four requests queued first, so the contention
    # (and with it the preemption) does not depend on when a stepping thread picks them up.
    from genset.engines.torch.engine import TorchEngineCore
    from genset.engines.torch.runner import ModelRunner

    # 10 blocks of 8 = 80 tokens of KV for four sequences that need ~40 each.
    core = TorchEngineCore(ModelRunner("tiny", num_blocks=10, block_size=8), max_batch_tokens=32)
    plans = []
    execute = core.runner.execute

    def observe(plan):  # records what the scheduler asked for, then runs it unchanged
        plans.append([(len(c.token_ids), c.start_pos) for c in plan.chunks])
        return execute(plan)

    core.runner.execute = observe
    shared = _prompt(2, 12)
    prompts = [shared + _prompt(10 + i, 10 + 5 * i) for i in range(4)]
    for i, p in enumerate(prompts):
        core.add_request(
            EngineRequest(f"r{i}", p, GREEDY, StopConditions(max_tokens=12, ignore_eos=True))
        )
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(4)}
    while core.has_work():
        for out in core.step()[0]:
            got[out.request_id].extend(out.token_ids)
    assert core.scheduler.num_preemptions > 0
    # The load also forced chunked prefill (a prompt continued at start_pos > 0) and
    # steps mixing prefill chunks with decodes.
    assert any(n > 1 and start > 0 for p in plans for n, start in p)
    assert any({n == 1 for n, _ in p} == {True, False} for p in plans)
    for i, p in enumerate(prompts):
        assert got[f"r{i}"] == reference(p, 12)
    core.scheduler.pool.check_invariants()


async def test_kv_export_import_between_engines(reference):
    bs = 8
    prompt = _prompt(3, 37)  # 4 full blocks + 5 tokens
    a = TorchEngine("tiny", num_blocks=32, block_size=bs)
    b = TorchEngine("tiny", num_blocks=32, block_size=bs)
    other = TorchEngine("tiny", num_blocks=32, block_size=16)
    try:
        await _run(a, "prefill", prompt, 1)
        hashes = block_hashes(prompt, bs)
        blocks = await a.export_kv(hashes)
        assert [blk.hash for blk in blocks] == hashes
        assert all(isinstance(blk.data, bytes) for blk in blocks)

        # Occupy b's first blocks with something else, so the import lands elsewhere.
        await _run(b, "unrelated", _prompt(4, 40), 2)
        before = b.runner.tokens_computed
        tokens, out = await _run(b, "decode", prompt, 10, kv_import=KvImport(blocks))
        assert out.cached_tokens == 32
        assert b.runner.tokens_computed - before == 5 + 9  # the partial block, then decodes
        assert tokens == reference(prompt, 10)

        # Blocks of a different layout (block size 16) are refused with a clear error, and the
        # engine keeps serving.
        with pytest.raises(ValueError, match="does not match"):
            await other.submit(EngineRequest("bad", prompt, GREEDY, kv_import=KvImport(blocks[:1])))
        assert (await _run(other, "ok", prompt, 3))[0] == reference(prompt, 3)
    finally:
        for e in (a, b, other):
            await e.stop()


async def test_bad_requests_are_refused_and_engine_keeps_serving(reference):
    engine = TorchEngine("tiny", num_blocks=16, block_size=16)
    try:
        with pytest.raises(ValueError, match="vocabulary"):
            await engine.submit(EngineRequest("x", [1, 99999], GREEDY))
        with pytest.raises(ValueError, match="no tokens"):
            await engine.submit(EngineRequest("y", [], GREEDY))
        prompt = _prompt(5, 20)
        assert (await _run(engine, "z", prompt, 4))[0] == reference(prompt, 4)
        card = engine.card
        assert (card.engine, card.block_size, card.kv_blocks) == ("torch", 16, 16)
        assert card.context_length == 8192 and card.vocab_size == 4096
        assert 2 in card.eos_token_ids
    finally:
        await engine.stop()


async def test_huge_finite_imported_kv_ends_that_request_alone(reference):
    """KV imported from a peer with huge but finite values (the import's finiteness check lets
    them in) overflows that request's attention into NaN logits. Before, sampling raised and
    the failed step ended every request and stopped the engine thread; now that request's
    stream ends with an error of its own, a request running beside it completes as the
    reference says, and the engine serves another one afterwards."""
    import asyncio

    from genset.engines.torch import kvformat
    from genset.engines.types import KvBlockData

    engine = TorchEngine("tiny", num_blocks=64, block_size=16)
    engine.runner.kv_bound = float("inf")  # an import check that misses them
    try:
        poisoned = _prompt(31, 37)  # 2 full blocks imported, 5 tokens computed
        hashes = block_hashes(poisoned, 16)
        huge = torch.full((len(hashes), *engine.runner.block_shape), 3e38)
        blocks = [KvBlockData(h, p)
                  for h, p in zip(hashes, kvformat.split(kvformat.encode(huge)), strict=True)]

        async def bad():
            req = EngineRequest("bad", poisoned, GREEDY,
                                StopConditions(max_tokens=8, ignore_eos=True),
                                kv_import=KvImport(blocks))
            return [out async for out in await engine.submit(req)]

        good = _prompt(32, 30)
        outs, (tokens, _) = await asyncio.gather(bad(), _run(engine, "good", good, 8))
        assert [o.token_ids for o in outs] == [[]]
        assert outs[-1].finish_reason == "error" and "NaN or infinite" in outs[-1].error
        assert tokens == reference(good, 8)
        after = _prompt(33, 20)
        assert (await _run(engine, "after", after, 4))[0] == reference(after, 4)
    finally:
        await engine.stop()


async def test_poisoned_imported_kv_is_dropped_and_the_prefix_recomputed(reference):
    """Imported KV that is finite but poisoned (huge values that overflow only inside
    attention) and that the import's checks miss (the model's bound is turned off here) is
    cached under the prompt's hashes. The first
    request over it ends with an error; the blocks it used from the import on are dropped
    from the prefix cache then (before, every later request with that prefix ended with an
    error until they were evicted), so the next request with that prefix computes them and
    gets the reference's tokens, even when it brings the same poisoned import again (as an
    offload store still holding it would: the dropped hashes are not imported again). The
    prefix computed here before the import stays cached; the published events match."""
    from genset.engines.torch import kvformat
    from genset.engines.types import KvBlockData

    engine = TorchEngine("tiny", num_blocks=64, block_size=16)
    engine.runner.kv_bound = float("inf")  # an import check that misses them
    events = engine.kv_events()
    try:
        prompt = _prompt(34, 70)  # 4 full blocks + 6 tokens
        hashes = block_hashes(prompt, 16)
        own = prompt[:20]  # block 0 computed here
        assert (await _run(engine, "own", own, 1))[0] == reference(own, 1)
        huge = torch.full((2, *engine.runner.block_shape), 3e38)
        poison = KvImport([KvBlockData(h, p) for h, p in zip(
            hashes[1:3], kvformat.split(kvformat.encode(huge)), strict=True)],
            parent_hash=hashes[0])

        async def submit(rid):
            req = EngineRequest(rid, prompt, GREEDY,
                                StopConditions(max_tokens=8, ignore_eos=True),
                                kv_import=poison)
            return [out async for out in await engine.submit(req)]

        outs = await submit("bad")
        assert [o.token_ids for o in outs] == [[]] and outs[-1].finish_reason == "error"
        assert "NaN or infinite" in outs[-1].error and "3 cached KV blocks" in outs[-1].error
        pool = engine.scheduler.pool
        # dropped (as the request ended, before its output): the two imported blocks and
        # the one computed over them; block 0 stays
        assert pool.cached_hashes() == {hashes[0]}
        assert engine.scheduler.num_foreign_dropped == 3

        before = engine.runner.tokens_computed
        outs = await submit("again")
        assert [t for o in outs for t in o.token_ids] == reference(prompt, 8)
        assert outs[-1].finish_reason == "length" and outs[-1].cached_tokens == 16
        assert engine.runner.tokens_computed - before == 70 - 16 + 7  # recomputed
        assert set(hashes) <= pool.cached_hashes()
        # what the cache holds under those hashes now is the model's own KV
        held = await engine.export_kv(hashes)
        kv = torch.cat([kvformat.decode(b.data) for b in held])
        assert len(held) == 4 and kv.abs().max().item() < 1e4
        replica = HashSetReplica()
        while (batch := events.get_nowait()) is not None:
            assert replica.apply(batch)
        assert replica.hashes == pool.cached_hashes()
        pool.check_invariants()
    finally:
        events.close()
        await engine.stop()


async def test_kv_beyond_what_the_model_computes_is_refused(reference):
    """One value of a peer's KV beyond the model's bound (`kv_bound`: no K/V the model
    computes is larger), finite or not, and the import is refused before anything is cached
    (the worker then computes the prompt). Within the bound the same blocks import fine."""
    from genset.engines.torch import kvformat
    from genset.engines.types import KvBlockData

    a = TorchEngine("tiny", num_blocks=32, block_size=16)
    b = TorchEngine("tiny", num_blocks=32, block_size=16)
    try:
        prompt = _prompt(35, 40)  # 2 full blocks + 8 tokens
        hashes = block_hashes(prompt, 16)
        await _run(a, "prefill", prompt, 1)
        honest = torch.cat([kvformat.decode(blk.data) for blk in await a.export_kv(hashes)])
        bound = b.runner.kv_bound
        assert honest.abs().max().item() * 2 <= bound < 1e6
        for value in (bound * 1.01, 1e30, -1e30, 3e38):
            bad = honest.clone()
            bad[1, 2, 1, 3, 0, 5] = value  # block 1, layer 2, V, one element
            blocks = [KvBlockData(h, p) for h, p in zip(
                hashes, kvformat.split(kvformat.encode(bad)), strict=True)]
            with pytest.raises(ValueError, match=r"beyond the .* this model can compute"):
                await b.submit(EngineRequest("x", prompt, GREEDY, kv_import=KvImport(blocks)))
            assert not b.scheduler.pool.cached_hashes() and b.scheduler.num_pinned_blocks == 0
        blocks = [KvBlockData(h, p) for h, p in zip(
            hashes, kvformat.split(kvformat.encode(honest)), strict=True)]
        tokens, out = await _run(b, "imported", prompt, 6, kv_import=KvImport(blocks))
        assert out.cached_tokens == 32 and tokens == reference(prompt, 6)
    finally:
        await a.stop()
        await b.stop()


async def test_seeded_sampling_is_reproducible_across_engines():
    prompt = _prompt(6, 25)
    spec = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    e1 = TorchEngine("tiny", num_blocks=32, block_size=16)
    e2 = TorchEngine("tiny", num_blocks=32, block_size=16, max_batch_tokens=8)
    try:
        # e2 also runs a second request concurrently and prefills in chunks of 8.
        import asyncio

        t1, _ = await _run(e1, "s", prompt, 10, sampling=spec)
        (t2, _), _ = await asyncio.gather(
            _run(e2, "s", prompt, 10, sampling=spec), _run(e2, "noise", _prompt(7, 30), 10)
        )
        assert t1 == t2
    finally:
        await e1.stop()
        await e2.stop()


async def test_stop_token_and_kv_sizing(reference):
    from genset.engines.torch.config import load_config
    from genset.engines.torch.runner import kv_bytes_per_block, size_num_blocks

    prompt = _prompt(8, 30)
    expected = reference(prompt, 6)
    engine = TorchEngine("tiny", kv_memory_bytes=64 * 32768, block_size=16)
    try:
        assert engine.card.kv_blocks == 64  # 4 layers * K,V * 16 slots * 2 heads * 32 * 4 B
        stop = StopConditions(max_tokens=20, stop_token_ids=[expected[3]], ignore_eos=True)
        tokens = []
        async for out in await engine.submit(EngineRequest("s", prompt, GREEDY, stop)):
            tokens.extend(out.token_ids)
            last = out
        assert last.finish_reason == "stop"
        assert tokens == expected[: expected.index(expected[3]) + 1]
    finally:
        await engine.stop()
    cfg = load_config(resolve_model("tiny"))
    assert kv_bytes_per_block(cfg, 16, torch.float32) == 32768
    assert size_num_blocks(cfg, 16, torch.float32, torch.device("cpu"), 1 << 20) == 32
    with pytest.raises(ValueError, match="holds no block"):
        size_num_blocks(cfg, 16, torch.float32, torch.device("cpu"), 1000)


async def test_engine_steps_off_the_event_loop():
    """A step in progress does not hold the loop: the first forward pass waits until a
    coroutine, which can only run on a free loop, lets it go. Were the step on the loop, the
    coroutine could not run, the wait would end unreleased and the test would fail."""
    import asyncio
    import threading

    engine = TorchEngine("tiny", num_blocks=16, block_size=16)
    loop = asyncio.get_running_loop()
    in_step = asyncio.Event()
    release = threading.Event()
    seen: dict[str, object] = {}
    execute = engine.runner.execute

    def gated(plan):
        if "thread" not in seen:
            seen["thread"] = threading.get_ident()
            loop.call_soon_threadsafe(in_step.set)
            seen["released"] = release.wait(timeout=60)
        return execute(plan)

    engine.runner.execute = gated
    try:
        task = asyncio.create_task(_run(engine, "a", _prompt(9, 16), 2))
        async with asyncio.timeout(60):
            await in_step.wait()  # the loop runs while the step is in progress
            release.set()
            await task
        assert seen["released"] is True
        assert seen["thread"] != threading.get_ident()
    finally:
        release.set()
        await engine.stop()


def test_burst_sharing_a_prefix_computes_it_once_and_matches_reference(reference):
    """Requests admitted in one step with a common prefix: the first computes it, the others
    read its blocks within the same forward pass; every output equals the dense reference."""
    from genset.engines.torch.engine import TorchEngineCore
    from genset.engines.torch.runner import ModelRunner

    core = TorchEngineCore(
        ModelRunner("tiny", num_blocks=64, block_size=16), max_batch_tokens=256
    )
    prefix = _prompt(7, 48)  # 3 full blocks
    prompts = {rid: prefix + _prompt(8 + i, 5 + 3 * i) for i, rid in enumerate("abc")}
    for rid, prompt in prompts.items():
        core.add_request(
            EngineRequest(rid, prompt, GREEDY, StopConditions(max_tokens=6, ignore_eos=True))
        )
    got: dict[str, list[int]] = {rid: [] for rid in prompts}
    cached: dict[str, int] = {}
    first = True
    while core.has_work():
        outputs, _ = core.step()
        if first:  # one prefix computation for the three, then each one's own tail
            assert core.runner.tokens_computed == 48 + 5 + 8 + 11
            first = False
        for out in outputs:
            got[out.request_id].extend(out.token_ids)
            cached[out.request_id] = out.cached_tokens
    assert got == {rid: reference(prompt, 6) for rid, prompt in prompts.items()}
    assert cached == {"a": 0, "b": 48, "c": 48}
