"""Which evicted blocks go to the offload store (genset.offload.admission): the rule as a pure
function, its bounded memory of refusals, the pool's `reused` mark, and the core asking it
before it reads a block's KV (refused: not read, not handed over)."""

from __future__ import annotations

import pytest

from genset.engines.mocker import MockerConfig, MockerCore
from genset.kv.block_pool import BlockPool
from genset.kv.hashing import block_hashes
from genset.offload.admission import OffloadAdmission, admit_block
from tests.test_engine_core import BS, prompt_of
from tests.test_offload_engine import Sink, run


def test_the_rule_ships_a_block_reused_or_refused_before():
    assert admit_block(reused=True, refused_before=False)
    assert admit_block(reused=False, refused_before=True)
    assert admit_block(reused=True, refused_before=True)
    assert not admit_block(reused=False, refused_before=False)


def test_a_block_used_once_is_refused_once_then_admitted():
    a = OffloadAdmission()
    assert not a.admit(7, False)  # first eviction of a block nobody took again
    assert a.would_admit(7, False)  # its second eviction would ship it ...
    assert a.admit(7, False)  # ... and does, and is forgotten
    assert not a.admit(7, False)
    assert a.admit(8, True)  # reused: shipped at its first eviction, nothing remembered
    assert (a.admitted, a.refused, len(a)) == (2, 2, 1)


def test_would_admit_remembers_nothing():
    a = OffloadAdmission()
    assert not a.would_admit(1, False) and not a.would_admit(1, False)
    assert a.would_admit(1, True)
    assert len(a) == 0 and a.refused == 0


def test_the_memory_is_bounded_oldest_first():
    a = OffloadAdmission(capacity=2)
    for h in (1, 2, 3):
        assert not a.admit(h, False)
    assert len(a) == 2
    assert not a.would_admit(1, False)  # forgotten
    assert a.would_admit(2, False) and a.would_admit(3, False)


def test_mode_all_ships_everything_and_bad_settings_are_refused():
    a = OffloadAdmission("all")
    assert a.admit(1, False) and a.admit(1, False) and a.would_admit(2, False)
    assert len(a) == 0
    with pytest.raises(ValueError):
        OffloadAdmission("sometimes")
    with pytest.raises(ValueError):
        OffloadAdmission(capacity=0)


def test_the_pool_marks_a_block_taken_again_until_its_eviction():
    pool = BlockPool(4, BS)
    pool.evicted = []
    blocks = pool.allocate(2)
    pool.cache_block(blocks[0], 100, None)
    pool.cache_block(blocks[1], 101, 100)
    pool.free(blocks)
    assert not pool.reused[blocks[0]] and not pool.reused[blocks[1]]
    pool.touch([blocks[0]])  # a prefix hit on the first block only
    pool.free([blocks[0]])
    cand = {c[0]: c[4] for c in pool.eviction_candidates(4)}
    assert cand == {100: 1, 101: 0}
    pool.allocate(4)  # evicts both
    assert {e[0]: e[4] for e in pool.evicted} == {100: 1, 101: 0}
    assert not any(pool.reused)  # the mark leaves with the hash


class AdmittingSink(Sink):
    def __init__(self, admission: OffloadAdmission) -> None:
        super().__init__()
        self.admit = admission.admit
        self.would_admit = admission.would_admit


def test_the_core_hands_over_only_admitted_blocks():
    """A prompt used once is not handed over at its eviction; one whose prefix a second
    request hit is; the once-used prompt, computed again and evicted again, is."""
    core = MockerCore(MockerConfig(block_size=BS, num_blocks=16, vocab_size=4096))
    admission = OffloadAdmission()
    sink = AdmittingSink(admission)
    core.set_eviction_sink(sink)
    shared = prompt_of(1, 4 * BS)
    once = prompt_of(2, 4 * BS + 3)
    run(core, "s1", shared + prompt_of(3, 3))
    run(core, "s2", shared + prompt_of(4, 3))  # hits the shared 4 blocks
    run(core, "o1", once)
    for i in range(3):  # push everything out of the 16-block cache
        run(core, f"f{i}", prompt_of(10 + i, 7 * BS + 1))
    handed = {b.hash for b in sink.blocks}
    assert set(block_hashes(shared, BS)) <= handed
    assert not set(block_hashes(once, BS)) & handed
    assert core.evictions_refused == admission.refused > 0
    run(core, "o2", once)  # computed again ...
    for i in range(3):
        run(core, f"g{i}", prompt_of(20 + i, 7 * BS + 1))
    handed = {b.hash for b in sink.blocks}
    assert set(block_hashes(once, BS)) <= handed  # ... and shipped at its second eviction


def test_the_replay_workers_ask_the_same_admission_when_told():
    from genset.replay.offload import OffloadConfig, OffloadSim, _Sink

    sink = _Sink(OffloadSim(OffloadConfig(ram_blocks=64, worker_admit="reused"), BS), 1024)
    assert not sink.admit(5, False) and sink.admit(5, False) and sink.admit(6, True)
    plain = _Sink(OffloadSim(OffloadConfig(ram_blocks=64), BS), 1024)
    assert plain.admit is None and plain.would_admit is None  # "all": as before
    with pytest.raises(ValueError):
        OffloadConfig(worker_admit="sometimes")
