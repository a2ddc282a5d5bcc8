"""Which evicted blocks go to the offload store (genset.offload.admission): the rule as a pure
function, the pool's marks (REUSED, GENERATED), and the core asking the sink before it reads
a block's KV (refused: not read, not handed over)."""

from __future__ import annotations

import pytest

from genset.engines.mocker import MockerConfig, MockerCore
from genset.kv.block_pool import GENERATED, REUSED, BlockPool
from genset.kv.hashing import block_hashes
from genset.offload.admission import admission, admit_block, admit_prompt
from tests.test_engine_core import BS, prompt_of, req
from tests.test_offload_engine import Sink, run


def test_the_rule_ships_prompt_blocks_and_reused_generated_ones():
    assert admit_block(0)  # a prompt block, used once
    assert admit_block(REUSED)
    assert admit_block(GENERATED | REUSED)  # a reply a later request hit on the worker
    assert not admit_block(GENERATED)  # generated, never taken again
    assert admit_prompt(123, 0) and not admit_prompt(123, GENERATED)


def test_modes():
    assert admission("prompt") is admit_prompt
    assert admission("all") is None  # the sink then hands every block over
    with pytest.raises(ValueError):
        admission("sometimes")


def test_the_pool_marks_a_block_taken_again_until_its_eviction():
    pool = BlockPool(4, BS)
    pool.evicted = []
    blocks = pool.allocate(2)
    pool.cache_block(blocks[0], 100, None)
    pool.cache_block(blocks[1], 101, 100)
    pool.free(blocks)
    assert not pool.marks[blocks[0]] and not pool.marks[blocks[1]]
    pool.touch([blocks[0]])  # a prefix hit on the first block only
    pool.free([blocks[0]])
    pool.marks[blocks[1]] |= GENERATED
    cand = {c[0]: c[4] for c in pool.eviction_candidates(4)}
    assert cand == {100: REUSED, 101: GENERATED}
    pool.allocate(4)  # evicts both
    assert {e[0]: e[4] for e in pool.evicted} == {100: REUSED, 101: GENERATED}
    assert not any(pool.marks)  # the marks leave with the hash


def test_the_scheduler_marks_blocks_holding_generated_tokens():
    core = MockerCore(MockerConfig(block_size=BS, num_blocks=32, vocab_size=4096))
    core.set_eviction_sink(Sink())  # token ids kept: blocks registered one by one
    prompt = prompt_of(1, 3 * BS + 5)  # 3 full prompt blocks, the 4th part prompt
    core.add_request(req("a", prompt, max_tokens=2 * BS))
    while core.has_work():
        core.step()
    pool = core.pool
    marks = {h: pool.marks[pool.block_of(h)] for h in pool.cached_hashes()}
    hashes = block_hashes(prompt, BS)
    assert [marks[h] for h in hashes] == [0, 0, 0]
    generated = set(marks) - set(hashes)
    assert len(generated) == 2 and all(marks[h] == GENERATED for h in generated)


class AdmittingSink(Sink):
    admit = staticmethod(admit_prompt)


def test_the_core_hands_over_prompt_blocks_and_reused_replies_only():
    """Evicted: a prompt's blocks are handed over; its reply's blocks are not, unless a
    second request continuing the first (prompt + reply) hit them first."""
    core = MockerCore(MockerConfig(block_size=BS, num_blocks=24, vocab_size=4096))
    sink = AdmittingSink()
    core.set_eviction_sink(sink)
    once = prompt_of(2, 4 * BS)
    out_once = run(core, "o", once, max_tokens=2 * BS)
    turn1 = prompt_of(3, 4 * BS)
    out1 = run(core, "t1", turn1, max_tokens=2 * BS)
    run(core, "t2", turn1 + out1 + prompt_of(4, 3))  # the next turn hits the reply's blocks
    for i in range(4):  # push everything out of the 24-block cache
        run(core, f"f{i}", prompt_of(10 + i, 11 * BS + 1))
    handed = {b.hash for b in sink.blocks}
    assert set(block_hashes(once, BS)) <= handed  # prompt blocks, used once: shipped
    reply_once = set(block_hashes(once + out_once, BS)) - set(block_hashes(once, BS))
    assert reply_once and not reply_once & handed  # a reply nobody continued: not
    reply1 = set(block_hashes(turn1 + out1, BS)) - set(block_hashes(turn1, BS))
    assert reply1 and reply1 <= handed  # a reply the next turn hit: shipped
    assert core.evictions_refused > 0


def test_the_replay_workers_ask_the_same_admission_when_told():
    from genset.replay.offload import OffloadConfig, OffloadSim, _Sink

    sink = _Sink(OffloadSim(OffloadConfig(ram_blocks=64, worker_admit="prompt"), BS), 1024)
    assert sink.admit is admit_prompt
    plain = _Sink(OffloadSim(OffloadConfig(ram_blocks=64), BS), 1024)
    assert plain.admit is None  # "all": as before
    with pytest.raises(ValueError):
        OffloadConfig(worker_admit="sometimes")


def test_copying_ahead_asks_the_same_admission():
    """The copy-out lane's idle time copies the next evictions ahead (`copy_ahead`): a block
    the admission refuses is not copied there either; a prompt block is."""
    from tests.test_offload_copy_ahead import BS as BS4
    from tests.test_offload_copy_ahead import Sink as KeepingSink
    from tests.test_offload_copy_ahead import core_with, request, run_all

    class Refusing(KeepingSink):
        admit = staticmethod(admit_prompt)

    core = core_with(d2h=32.0, num_blocks=32)
    sink = Refusing(room=0)  # no room while r1 runs: nothing copied yet
    core.set_eviction_sink(sink)
    prompt = prompt_of(5, 3 * BS4 + 1)
    core.add_request(request("r1", prompt, max_tokens=2 * BS4))
    run_all(core)
    assert core.copied_ahead == 0
    pool = core.pool
    cached = {h: pool.marks[pool.block_of(h)] for h in pool.cached_hashes()}
    generated = {h for h, m in cached.items() if m & GENERATED}
    prompt_blocks = set(block_hashes(prompt, BS4))
    assert generated and prompt_blocks <= set(cached)
    sink.space = 1 << 50
    core.add_request(request("r2", prompt_of(6, 3), max_tokens=1))
    core.step()  # its lane copies the pool's next evictions ahead
    copied = {b.hash for b in sink.blocks}
    assert copied and copied <= prompt_blocks  # prompt blocks only
    assert not copied & generated
