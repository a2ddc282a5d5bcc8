"""How much of a store run a worker onboards when the copy runs beside the prompt's compute
(genset.offload.onboard, pure), and the same decision in the hook, the router and the replay."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from genset.engines.mocker import MockerConfig, MockerCore, PolynomialTiming
from genset.offload.onboard import (
    chunked_compute,
    eviction_copies_ms,
    onboard_split,
    overlapped_copy_ms,
    split_for_core,
)
from genset.routing.policies import PredictedTTFT, RouteContext, WorkerView
from genset.worker.offload_hook import OffloadHook

BS = 64
COPY = 131072 * BS / 32e6  # an 8 MiB block at 32 GB/s: 0.262 ms
POLY = PolynomialTiming()


def ttft(n: int, rest: int, m: int, chunk: int = 8192, copy: float = COPY) -> float:
    """What the mocker charges: max(copy, first step) + copy's first layer + later steps."""
    beside, after = chunked_compute(rest + (n - m) * BS, chunk, POLY.prefill_ms)
    c = copy * m
    return max(c, beside) + c / 32 + after


def split(n: int, rest: int, chunk: int = 8192, copy: float = COPY) -> int:
    return onboard_split(n, copy, lambda m: chunked_compute(rest + (n - m) * BS, chunk,
                                                            POLY.prefill_ms))


def test_the_split_is_the_best_of_every_choice():
    rng = random.Random(7)
    for _ in range(300):
        n, rest = rng.randint(1, 1200), rng.randint(1, 20000)
        chunk = rng.choice((2048, 8192))
        best = min(ttft(n, rest, m, chunk) for m in range(n + 1))
        assert ttft(n, rest, split(n, rest, chunk), chunk) == pytest.approx(best)


def test_a_run_whose_copy_the_compute_hides_is_onboarded_whole():
    # 20 blocks: 5 ms of copy beside ~300 ms of compute
    assert split(20, 20000) == 20
    # a free copy, or no run
    assert onboard_split(50, 0.0, lambda m: (1.0, 0.0)) == 50
    assert onboard_split(0, COPY, lambda m: (1.0, 0.0)) == 0


def test_a_long_run_with_little_to_compute_onboards_its_head_and_computes_its_tail():
    # 351 blocks (92 ms of copy) and 1,000 tokens to compute (~32 ms): the tail is computed
    m = split(351, 1000)
    assert 0 < m < 351
    assert ttft(351, 1000, m) < ttft(351, 1000, 351) - 10
    # at the balance point the copy and the compute meet (within a block of either)
    beside, _ = chunked_compute(1000 + (351 - m) * BS, 8192, POLY.prefill_ms)
    assert abs(COPY * m - beside) < 2.0
    # a copy slower than computing a block still pays for what the compute hides
    assert 0 < split(100, 1000, copy=5.0) < 100
    # one slower than the whole prompt's compute: nothing onboarded
    assert split(100, 1000, copy=1000.0) == 0


def ttft_out(n: int, rest: int, m: int, out, chunk: int = 8192) -> float:
    """The mocker's charge with the copies out the first step waits for on the other lane."""
    beside, after = chunked_compute(rest + (n - m) * BS, chunk, POLY.prefill_ms)
    lane = max(COPY * m, out(m))
    return max(lane, beside) + lane / 32 + after


def test_with_copies_out_the_split_is_still_the_best_and_the_largest_of_the_best():
    rng = random.Random(11)
    for _ in range(300):
        n, rest = rng.randint(1, 900), rng.randint(1, 12000)
        chunk = rng.choice((2048, 8192))
        # the cached blocks the first step's new blocks evict: a run of the pool's LRU
        # frontier (some uncached or known: no copy), indexed by blocks allocated
        frontier = [COPY * (rng.random() < 0.8) for _ in range(n + chunk // BS + 2)]
        acc = [0.0]
        for c in frontier:
            acc.append(acc[-1] + c)

        def out(m, rest=rest, chunk=chunk, acc=acc, n=n):
            return acc[m + -(-min(chunk, rest + (n - m) * BS) // BS)]

        got = onboard_split(n, COPY, lambda m, rest=rest, chunk=chunk, n=n: chunked_compute(
            rest + (n - m) * BS, chunk, POLY.prefill_ms), out_ms=out)
        times = [ttft_out(n, rest, m, out, chunk) for m in range(n + 1)]
        best = min(times)
        assert times[got] == pytest.approx(best)


def test_a_run_whose_copies_out_bind_anyway_is_onboarded_whole():
    # 351 blocks, 1,000 tokens to compute, and every new block evicts a block to copy out:
    # the first step waits for ~367 blocks' copy out whatever is onboarded, so computing
    # the run's tail would gain nothing (the split without the copies out trims ~40 blocks)
    def out(m):
        return COPY * (m + -(-(1000 + (351 - m) * BS) // BS))

    assert split(351, 1000) < 320
    got = onboard_split(351, COPY, lambda m: chunked_compute(1000 + (351 - m) * BS, 8192,
                                                               POLY.prefill_ms), out_ms=out)
    assert got == 351


def test_the_pool_names_what_the_split_copies_out():
    core = mocker(d2h=32.0)
    pool = core.pool
    blocks = pool.allocate(3)
    for i, b in enumerate(blocks):
        pool.cache_block(b, 100 + i, 99 + i if i else None)
    pool.free(blocks)  # cached, free: the tail (102) goes first, after the never-used ones
    order = pool.eviction_order(pool.num_blocks)
    assert order[-3:] == [102, 101, 100] and set(order[:-3]) == {None}
    out = eviction_copies_ms(core, pool.num_blocks, known=lambda h: h == 101)
    assert out[-1] == pytest.approx(2 * COPY) and out[pool.num_blocks - 3] == 0.0
    assert eviction_copies_ms(mocker(d2h=0.0), 4) is None  # a free copy out: not weighed
    assert pool.chain_to(102) == blocks and pool.chain_to(7) == []
    cand = pool.eviction_candidates(pool.num_blocks)
    assert [(h, p, b) for h, p, _, b, _ in cand] == [(102, 101, blocks[2]), (101, 100, blocks[1]),
                                                  (100, None, blocks[0])]
    assert [c[0] for c in pool.eviction_candidates(pool.num_blocks - 2)] == [102]


def test_the_first_step_full_is_where_computing_more_stops_paying():
    # a chunk of 2048 tokens: beyond it extra tokens go to a later step the copy cannot hide
    # (1000 blocks: 262 ms of copy; the 1,500-token rest fills the step's 2,048 with 8 more
    # blocks; a 9th would start a second step)
    m = split(1000, 1500, chunk=2048)
    assert 1000 - 9 <= m < 1000
    assert ttft(1000, 1500, m, 2048) < ttft(1000, 1500, 1000, 2048)


def test_chunked_compute_and_bad_layers():
    assert chunked_compute(0, 8192, POLY.prefill_ms) == (0.0, 0.0)
    first, after = chunked_compute(10000, 4096, POLY.prefill_ms)
    assert first == POLY.prefill_ms(4096)
    assert after == pytest.approx(POLY.prefill_ms(4096) + POLY.prefill_ms(1808))
    with pytest.raises(ValueError, match="layers"):
        onboard_split(5, 1.0, lambda m: (1.0, 0.0), layers=0)


def mocker(overlap: bool = True, h2d: float = 32.0, d2h: float = 0.0) -> MockerCore:
    return MockerCore(MockerConfig(block_size=BS, num_blocks=4096, max_batch_tokens=8192,
                                   kv_bytes_per_token=131072, offload_h2d_gbps=h2d,
                                   offload_d2h_gbps=d2h, kv_copy_overlap=overlap))


def test_only_an_engine_that_copies_beside_its_compute_splits():
    assert overlapped_copy_ms(mocker()) == pytest.approx(COPY)
    assert overlapped_copy_ms(mocker(overlap=False)) == 0.0  # the step waits: never split
    assert overlapped_copy_ms(mocker(h2d=0.0)) == 0.0  # a free copy
    assert overlapped_copy_ms(SimpleNamespace(config=SimpleNamespace())) == 0.0  # torch
    assert overlapped_copy_ms(None) == 0.0
    assert split_for_core(mocker(), 351, COPY, 1000, BS) == split(351, 1000)


def test_the_hook_imports_the_head_its_engine_would_choose():
    hook = OffloadHook()
    hook.ctx = SimpleNamespace(engine=SimpleNamespace(core=mocker()), block_size=BS)
    assert hook._split(351, 1000) == split(351, 1000) < 351
    assert hook._split(20, 20000) == 20
    hook.ctx = SimpleNamespace(engine=SimpleNamespace(core=mocker(overlap=False)),
                               block_size=BS)
    assert hook._split(351, 1000) == 351
    hook.ctx = SimpleNamespace(engine=SimpleNamespace(), block_size=BS)  # no core: all
    assert hook._split(351, 1000) == 351
    # a core whose model cannot be read: the whole run, never an error
    broken = SimpleNamespace(config=mocker().config, timing=None)
    hook.ctx = SimpleNamespace(engine=SimpleNamespace(core=broken), block_size=BS)
    assert hook._split(351, 1000) == 351


def test_the_router_prices_a_long_run_as_the_worker_splits_it():
    ctx = RouteContext(prompt_tokens=351 * BS + 1000, prompt_blocks=351 + 15, block_size=BS)
    view = WorkerView(worker_id=1, host_blocks=351, max_batch_tokens=8192)
    opts = dict(kv_bytes_per_token=131072, host_gbps=32.0, copy_overlap=True, kv_layers=32)
    whole = PredictedTTFT(split_runs=False, **opts).score(ctx, view)
    split_ = PredictedTTFT(**opts).score(ctx, view)
    assert split_ < whole - 10  # ~92 ms of copy against ~30 of compute, balanced
    # a run the compute hides is priced the same either way
    short = WorkerView(worker_id=1, host_blocks=10, max_batch_tokens=8192)
    assert PredictedTTFT(**opts).score(ctx, short) == \
        PredictedTTFT(split_runs=False, **opts).score(ctx, short)


async def test_a_live_mocker_worker_imports_the_head_and_computes_the_tail(
        nats_server, etcd_server, bus, discovery):
    """A worker whose mocker copies beside its compute, against a real store: a run whose
    copy would outlast the prompt's compute is imported in part, the rest computed; the
    output is the same as computing the prompt."""
    import uuid

    from genset.kv.hashing import block_hashes
    from tests.helpers.offload_worker import offload_worker, prompt_of
    from tests.test_offload_service import WAIT, running_store, wait_for

    bs, ns = 16, f"t{uuid.uuid4().hex[:10]}"
    # 16 MiB blocks at 4 GB/s: ~4.2 ms of copy each, 21 ms for the run, against ~17 ms for
    # the 3-token rest (the polynomial's fixed cost): one block is computed instead
    config = MockerConfig(block_size=bs, num_blocks=16, kv_bytes_per_token=1 << 20,
                          offload_h2d_gbps=4.0, kv_copy_overlap=True)
    worker = offload_worker(config, bus=bus, discovery=discovery, namespace=ns, wait_s=WAIT)
    engine, hook = worker.engine, worker.hook

    async def generate(prompt: list[int]):
        return await worker.generate(bus, prompt)

    async with (running_store(nats_server, etcd_server, ns, offload_ram_gb=0.05) as store,
                worker.serving(store)):
        prompt = prompt_of(1, 5 * bs + 3)  # 5 full blocks
        hashes = block_hashes(prompt, bs)
        computed, _ = await generate(prompt)
        for i in range(4):  # push the prompt's blocks out of the 16-block cache
            await generate(prompt_of(10 + i, 7 * bs))
        assert engine.cached_prefix(hashes) == 0
        assert await hook.client.flush(WAIT)
        await wait_for(lambda: all(h in store.store.cache.ram for h in hashes),
                       "the prompt's blocks in the store")
        keep = hook._split(5, 3)
        assert 0 < keep < 5
        again, usage = await generate(prompt)
        assert again == computed
        assert usage.cached_tokens == keep * bs  # the head onboarded, the tail computed
        assert hook.counts["split_blocks"] == 5 - keep
        assert hook.counts["onboarded_blocks"] == keep
