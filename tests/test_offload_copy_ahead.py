"""Copies out ahead of eviction (`SchedulingCore.copy_ahead`, the mocker's
`offload_copy_ahead_blocks`): in its copy-out lane's idle time an engine copies its pool's
next blocks to be evicted to the eviction sink while they are still cached, and their
eviction later reads nothing. The engine's behaviour, its bulk decode runs (the replay), and
a live mocker worker against a real store."""

from __future__ import annotations

import random

import pytest

from genset.engines.mocker import MockerConfig, MockerCore, PolynomialTiming, mock_payload_bytes
from genset.engines.types import EngineRequest, KvBlockData, KvImport
from genset.kv.hashing import block_hashes
from genset.offload.onboard import eviction_copies_ms
from proto.generate import SamplingParams, StopConditions

BS = 4
BLOCK_BYTES = (1 << 20) * BS  # 4 MiB a block


class Sink:
    """An eviction sink that keeps what it is handed (the hand-over's contract)."""

    def __init__(self, room: int = 1 << 50) -> None:
        self.blocks = []
        self.space = room
        self.have: set[int] = set()

    def room(self) -> int:
        return self.space

    def known(self, block_hash: int) -> bool:
        return block_hash in self.have

    def put(self, blocks, dropped: int) -> None:
        self.blocks.extend(blocks)


def request(rid: str, prompt: list[int], max_tokens: int = 2, kv=None) -> EngineRequest:
    return EngineRequest(rid, prompt, SamplingParams(temperature=0.0),
                         StopConditions(max_tokens=max_tokens, ignore_eos=True), kv_import=kv)


def core_with(d2h: float = 0.6, ahead: int = 1024, overlap: bool = True,
              num_blocks: int = 16, **kw) -> MockerCore:
    return MockerCore(MockerConfig(block_size=BS, num_blocks=num_blocks, max_batch_tokens=64,
                                   kv_bytes_per_token=1 << 20, offload_d2h_gbps=d2h,
                                   offload_h2d_gbps=32.0, kv_copy_overlap=overlap,
                                   offload_copy_ahead_blocks=ahead, **kw))


def run_all(core: MockerCore) -> None:
    while core.has_work():
        core.step()


def test_the_idle_lane_copies_the_next_evictions_and_their_eviction_reads_nothing():
    core = core_with(d2h=0.45)
    per = BLOCK_BYTES / (0.45 * 1e6)  # one block's copy out: ~9.3 ms
    rng = random.Random(1)
    p1 = [rng.randrange(3, 999) for _ in range(3 * BS + 1)]
    core.add_request(request("r1", p1))
    run_all(core)  # no sink yet: nothing recorded, nothing copied
    h1 = block_hashes(p1, BS)[:3]
    assert core.cached_prefix(h1) == 3 and core.copied_ahead == 0
    sink = Sink()
    core.set_eviction_sink(sink)
    # r2 allocates never-used blocks (no eviction); its step's lane copies r1's blocks ahead,
    # as many as fit in the step's length (a prefill and a token: ~22 ms) at ~9 ms each
    core.add_request(request("r2", [5, 6, 7], max_tokens=1))
    core.step()
    st = core.last_step
    assert st.out_lane_ms == 0.0
    budget = int(st.step_ms / per)
    assert 0 < budget < 3
    assert core.copied_ahead == budget == len(sink.blocks)
    # the LRU end first (a finished request's blocks are freed tail first), with parent and
    # tokens as an eviction hands them over (none here: cached before the sink kept them),
    # and a payload naming the block's bytes
    tail_first = list(reversed(h1))[:budget]
    assert [b.hash for b in sink.blocks] == tail_first
    assert sink.blocks[0].parent_hash == h1[1]
    assert mock_payload_bytes(sink.blocks[0].data, 0) == BLOCK_BYTES
    assert core.copied_ahead_of(h1[2]) and not core.copied_ahead_of(h1[0])
    # the copies out that evicting the pool would cost: only the block not copied ahead
    out = eviction_copies_ms(core, core.pool.num_blocks)
    assert out[-1] == pytest.approx(per * (3 - budget))
    # a request taking the whole pool evicts r1's blocks: only the one not copied is read
    handed = len(sink.blocks)
    core.add_request(request("r3", list(range(100, 100 + 15 * BS)), max_tokens=1))
    core.step()
    assert core.cached_prefix(h1) == 0
    assert core.evictions_handed == 3 - budget and core.evictions_known == budget
    evicted_now = [b.hash for b in sink.blocks[handed:] if b.hash in h1]
    assert evicted_now == [h1[0]]  # never read twice
    assert not core.copied_ahead_of(h1[2])  # gone from the device: forgotten
    # the evicting step waited for that one copy out only
    assert core.last_step.out_lane_ms == pytest.approx(per * (3 - budget))


def test_nothing_is_copied_ahead_without_a_lane_a_bandwidth_or_room():
    p = list(range(10, 10 + 3 * BS + 1))
    for core, sink in ((core_with(d2h=0.0), Sink()),  # a free copy out: nothing to gain
                       (core_with(overlap=False), Sink()),  # the step waits for its copies
                       (core_with(ahead=0), Sink()),  # turned off
                       (core_with(), Sink(room=0))):  # the hand-over is full (or paused)
        core.add_request(request("a", p))
        run_all(core)
        core.set_eviction_sink(sink)
        core.add_request(request("b", [5, 6, 7], max_tokens=3))
        run_all(core)
        assert core.copied_ahead == 0 and not sink.blocks
    # blocks the sink has already (onboarded from the store) are not copied
    core, sink = core_with(d2h=64.0), Sink()
    core.add_request(request("a", p))
    run_all(core)
    sink.have = set(block_hashes(p, BS)[:2])
    core.set_eviction_sink(sink)
    core.add_request(request("b", [5, 6, 7], max_tokens=1))
    core.step()
    assert [b.hash for b in sink.blocks] == [block_hashes(p, BS)[2]]
    # room for one block (a mocker's hand-over carries a 12-byte placeholder, the tokens'
    # bound and the objects: 156 bytes here): one copied
    core, sink = core_with(d2h=64.0), Sink(room=200)
    core.add_request(request("a", p))
    run_all(core)
    core.set_eviction_sink(sink)
    core.add_request(request("b", [5, 6, 7], max_tokens=1))
    core.step()
    assert core.copied_ahead == len(sink.blocks) == 1
    with pytest.raises(ValueError, match="offload_copy_ahead_blocks"):
        core_with(ahead=-1)


def test_decode_runs_copy_ahead_as_their_single_steps_do():
    """The replay takes plain decode steps in bulk (`decode_run` / `commit_decode_run`, with
    `decode_run_started` before acting mid-run): the blocks copied ahead, and when, match
    stepping one by one, a request with a KV import arriving mid-run included."""
    reqs = [request(f"r{i}", [i % 3 * 50 + j for j in range(5 + 4 * i)], max_tokens=9 + 7 * i)
            for i in range(5)]
    late_at = 14  # r4 arrives (with an import) before this step

    def drive(bulk: bool):
        # ~1.6 ms a block's copy against ~6-20 ms steps: budgets bind, spread over steps
        core = core_with(d2h=2.6, num_blocks=40,
                         timing=PolynomialTiming(dynamo_exact=False))
        sink = Sink()
        core.set_eviction_sink(sink)
        rng = random.Random(3)
        log, n_steps, now = [], 0, 0.0
        for r in reqs[:4]:
            core.add_request(r)
        while core.has_work() or n_steps < late_at:
            if n_steps == late_at:
                imported = [KvBlockData(h) for h in block_hashes(list(range(900, 912)), BS)]
                reqs[4].kv_import = KvImport(blocks=imported)
                core.add_request(reqs[4])
            durs = core.decode_run(100) if bulk else []
            if durs:
                limit = late_at - n_steps if n_steps < late_at else len(durs)
                k = min(len(durs), limit, rng.randint(1, len(durs)))
                core.decode_run_started(rng.randint(0, k))  # acting mid-run: no change
                for d in durs[:k]:
                    now += d
                core.commit_decode_run(k, now)
                n_steps += k
            else:
                _, d = core.step(now)
                now += d
                n_steps += 1
            log.append((n_steps, [b.hash for b in sink.blocks], core.copied_ahead))
        return [e for e in log if e[0] in {x[0] for x in log}], core, sink

    single, c1, s1 = drive(False)
    bulk, c2, s2 = drive(True)
    assert c1.copied_ahead > 0 and c1.copied_ahead == c2.copied_ahead
    assert [b.hash for b in s1.blocks] == [b.hash for b in s2.blocks]
    # at every point the bulk driver stopped, the same blocks had been copied
    at = {n: (hashes, k) for n, hashes, k in single}
    assert all(at[n] == (hashes, k) for n, hashes, k in bulk)
    assert c1.evictions_handed == c2.evictions_handed


async def test_a_live_mocker_worker_copies_ahead_to_the_store_and_serves_the_same_output(
        nats_server, etcd_server, bus, discovery):
    """A mocker worker (copies beside its compute, a D2H bandwidth) against a real store: a
    finished prompt's blocks reach the store while still cached on the worker (copied ahead
    in the lane's idle time), their eviction later sends nothing again, and the prompt,
    onboarded from the store, gives the output of computing it."""
    import uuid

    from tests.helpers.offload_worker import offload_worker, prompt_of
    from tests.test_offload_service import WAIT, running_store, wait_for

    bs, ns = 16, f"t{uuid.uuid4().hex[:10]}"
    # 16 MiB blocks at 64 GB/s: 0.26 ms a copy out, dozens in one step's idle lane; copies in
    # as fast (a short run is onboarded whole)
    config = MockerConfig(block_size=bs, num_blocks=16, kv_bytes_per_token=1 << 20,
                          offload_h2d_gbps=64.0, offload_d2h_gbps=64.0, kv_copy_overlap=True)
    worker = offload_worker(config, bus=bus, discovery=discovery, namespace=ns, wait_s=WAIT)
    engine, hook = worker.engine, worker.hook
    core = engine.core

    async def generate(prompt: list[int]):
        return await worker.generate(bus, prompt)

    async with (running_store(nats_server, etcd_server, ns, offload_ram_gb=0.5) as store,
                worker.serving(store)):
        prompt = prompt_of(1, 5 * bs + 3)  # 5 full blocks
        hashes = block_hashes(prompt, bs)
        computed, _ = await generate(prompt)
        # a short request's steps copy the finished prompt's blocks ahead
        await generate(prompt_of(2, bs + 3))
        assert engine.cached_prefix(hashes) == 5  # still cached here ...
        assert all(core.copied_ahead_of(h) for h in hashes)
        assert await hook.client.flush(WAIT)
        await wait_for(lambda: all(h in store.store.cache.ram for h in hashes),
                       "the prompt's blocks in the store, copied ahead")  # ... and there
        assert core.evictions_handed == 0  # nothing evicted yet
        for i in range(4):  # push the prompt's blocks out of the 16-block cache
            await generate(prompt_of(10 + i, 7 * bs))
        assert engine.cached_prefix(hashes) == 0
        assert await hook.client.flush(WAIT)
        # no block went to the store twice: every eviction had been copied ahead, or
        # was read once at its eviction
        assert hook.client.stats["put_known"] == 0
        assert core.evictions_known >= 5
        again, usage = await generate(prompt)
        assert again == computed
        assert usage.cached_tokens == 5 * bs  # onboarded whole
        assert hook.counts["onboarded_blocks"] == 5
