"""The offload store's pure parts: tier policy, per-tier event logs, rendezvous placement."""

from __future__ import annotations

import random

import pytest

from genset.kv.replica import HashSetReplica
from genset.offload.events import TierLog
from genset.offload.placement import Placement
from genset.offload.tiers import (
    KNOWN,
    REJECTED,
    STORED,
    TIER_RAM,
    FrequencySketch,
    TieredCache,
)
from proto.kv import TIER_DISK, Cleared, Removed, Stored


def hashes(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.getrandbits(64) for _ in range(n)]


# ---- frequency sketch ---------------------------------------------------------------------------

def test_sketch_counts_and_saturates():
    s = FrequencySketch(1024)
    for _ in range(3):
        s.increment(42)
    assert s.estimate(42) == 3
    assert s.estimate(43) == 0
    for _ in range(40):
        s.increment(7)
    assert s.estimate(7) == FrequencySketch.MAX_COUNT + 1  # + the doorkeeper's bit


def test_one_offs_do_not_inflate_each_other():
    s = FrequencySketch(1024)
    for h in hashes(5000, 1):  # five times more one-offs than columns
        s.increment(h)
    assert max(s.estimate(h) for h in hashes(5000, 1)) <= 2
    assert sum(s.estimate(h) for h in hashes(1000, 2)) < 1000


def test_sketch_halves_after_its_sample_size():
    s = FrequencySketch(64, sample_size=100)
    for _ in range(8):
        s.increment(1)
    assert s.estimate(1) == 8
    for h in hashes(92, 1):
        s.increment(h)
    assert s.resets == 1 and s.estimate(1) == 3  # 7 repeats -> 3, the doorkeeper cleared


# ---- RAM tier: bounds and admission ------------------------------------------------------------

def test_ram_tier_stays_within_its_byte_bound():
    cache = TieredCache(10_000, sketch_width=4096)
    rng = random.Random(3)
    for h in hashes(5000, 2):
        cache.offer(h, None, size=rng.randint(100, 900), value=b"")
        assert cache.ram.used <= 10_000
    assert cache.ram.used == sum(e.size for e in cache.ram.entries.values())
    assert cache.ram.evictions > 0  # eviction fires


def test_a_block_larger_than_the_tier_is_rejected():
    cache = TieredCache(1000)
    assert cache.offer(1, None, size=1001).status == REJECTED
    assert cache.ram.used == 0


def test_never_reused_blocks_do_not_push_out_reused_ones():
    cache = TieredCache.in_blocks(100)
    hot = hashes(100, 1)
    for h in hot:  # every hot block evicted by two workers: put twice
        cache.offer(h, None)
        cache.offer(h, None)
    outcomes = [cache.offer(h, None).status for h in hashes(1000, 2)]  # a scan of one-offs
    assert set(outcomes) == {REJECTED}
    assert set(cache.ram.entries) == set(hot)


def test_lru_admission_lets_the_newest_in_whatever_its_frequency():
    cache = TieredCache.in_blocks(100, admission="lru")
    hot = hashes(100, 1)
    for h in hot:
        cache.offer(h, None)
        cache.offer(h, None)
    scan = hashes(150, 2)
    assert {cache.offer(h, None).status for h in scan} == {STORED}
    assert set(cache.ram.entries) == set(scan[50:])
    with pytest.raises(ValueError, match="admission"):
        TieredCache.in_blocks(10, admission="lfu")


def test_slru_evicts_blocks_never_used_again_before_reused_ones():
    """`slru`: newcomers always get in, but a block used again while held (a served lookup,
    a second worker's put) is evicted only after every block that never was."""
    cache = TieredCache.in_blocks(100, admission="slru")
    reused = hashes(30, 1)
    once = hashes(70, 2)
    for h in reused + once:
        assert cache.offer(h, None).status == STORED
    cache.touch_run(reused[:20])  # a lookup served them
    for h in reused[20:]:
        assert cache.offer(h, None).status == KNOWN  # put again by another worker
    scan = hashes(70, 3)
    assert {cache.offer(h, None).status for h in scan} == {STORED}  # never turned away
    assert set(cache.ram.entries) == set(reused) | set(scan)  # the one-offs went first
    assert cache.ram.used == 100 and cache.ram.protected_used == 30


def test_slru_protected_segment_is_bounded_and_demotes_lru_first():
    cache = TieredCache.in_blocks(10, admission="slru")
    ram = cache.ram
    blocks = hashes(10, 1)
    for h in blocks:
        cache.offer(h, None)
    for h in blocks:
        cache.touch(h)  # all used again: only 8 (80%) stay protected
    assert list(ram.protected) == blocks[2:]
    assert list(ram.probation) == blocks[:2]  # demoted, oldest first
    new = hashes(3, 2)
    for h in new:  # probation turns over, LRU first: the demoted two, then the first newcomer
        cache.offer(h, None)
    assert set(ram.entries) == set(blocks[2:]) | set(new[1:])
    assert ram.used == 10 and ram.protected_used == 8
    cache.ram.clear()
    assert ram.used == ram.protected_used == 0 and not ram.probation and not ram.protected


def test_slru_tier_stays_within_its_byte_bound():
    cache = TieredCache(10_000, sketch_width=4096, admission="slru")
    rng = random.Random(5)
    pool = hashes(400, 4)
    for _ in range(5000):
        h = rng.choice(pool)
        if rng.random() < 0.3:
            cache.touch(h)
        else:
            cache.offer(h, None, size=rng.randint(100, 900), value=b"")
        ram = cache.ram
        assert ram.used <= 10_000 and ram.protected_used <= ram.protected_capacity + 900
        assert set(ram.entries) == set(ram.probation) | set(ram.protected)
    assert ram.used == sum(e.size for e in ram.entries.values())
    assert ram.protected_used == sum(ram.entries[h].size for h in ram.protected)


def test_equally_cold_blocks_turn_over_lru_first():
    cache = TieredCache.in_blocks(100)
    first = hashes(100, 1)
    for h in first:
        assert cache.offer(h, None).status == STORED
    later = hashes(50, 2)
    for h in later:
        assert cache.offer(h, None).status == STORED
    assert set(cache.ram.entries) == set(first[50:]) | set(later)


def test_a_hit_run_keeps_its_head_longest():
    """Onboarding serves a prefix's leading run only: a hit leaves the run's first block the
    most recent, so LRU drops a prefix's tail before its head (never an orphaned tail)."""
    cache = TieredCache.in_blocks(4, admission="lru")
    run = hashes(4, 1)
    for h in reversed(run):  # handed over tail first, as workers evict
        cache.offer(h, None)
    cache.touch_run(run)
    assert list(cache.ram.entries) == list(reversed(run))  # LRU first: the tail
    cache.offer(hashes(1, 2)[0], None)
    assert cache.locate(run) == [TIER_RAM] * 3  # the tail went, the head stays usable


def test_a_block_that_becomes_popular_gets_in():
    cache = TieredCache.in_blocks(10)
    hot = hashes(10, 1)
    for h in hot:
        cache.offer(h, None)
        cache.offer(h, None)
    newcomer = 12345
    assert cache.offer(newcomer, None).status == REJECTED
    cache.record([newcomer])  # asked for by a worker
    assert cache.offer(newcomer, None).status == STORED
    assert newcomer in cache.ram


def test_popularity_fades_so_a_formerly_hot_block_can_be_displaced():
    cache = TieredCache.in_blocks(4, sketch_width=16)
    cache.sketch = cache.ram.sketch = cache.disk.sketch = FrequencySketch(16, sample_size=40)
    old = hashes(4, 1)
    for h in old:
        for _ in range(4):
            cache.offer(h, None)
    new = hashes(4, 2)
    for _ in range(6):  # the workload moves on; old counts halve along the way
        for h in new:
            cache.offer(h, None)
    assert set(new) <= set(cache.ram.entries)


def test_a_known_block_is_counted_not_stored_twice():
    cache = TieredCache(1000)
    assert cache.offer(1, None, size=100).status == STORED
    assert cache.offer(1, None, size=100).status == KNOWN
    assert cache.ram.used == 100 and cache.sketch.estimate(1) == 2


# ---- RAM -> disk ---------------------------------------------------------------------------------

def test_only_reused_ram_victims_spill_to_disk():
    cache = TieredCache.in_blocks(10, 100)
    reused, once = hashes(5, 1), hashes(5, 2)
    for h in reused:
        cache.offer(h, None)
        cache.offer(h, None)
    for h in once:
        cache.offer(h, None)
    spilled, dropped = [], 0
    for h in hashes(10, 3):  # more wanted newcomers push everything out of RAM, LRU first
        cache.record([h, h])
        out = cache.offer(h, None)
        spilled += [e.hash for e in out.spilled]
        dropped += out.dropped
    assert set(spilled) == set(reused) == set(cache.disk.entries)
    assert dropped == len(once)
    assert cache.locate(reused) == [TIER_DISK] * 5


def seen(cache: TieredCache, h: int, times: int) -> None:
    """`h` asked for times - 1 times, then put: its count is `times`."""
    cache.record([h] * (times - 1))
    cache.offer(h, None)


def test_disk_applies_admission_against_its_own_victims():
    cache = TieredCache.in_blocks(2, 2)
    a, b, x, y, w1, w2, n, h1, h2, h3 = range(100, 110)
    seen(cache, a, 5)
    seen(cache, b, 5)
    seen(cache, x, 7)  # pushes a (5) to disk
    seen(cache, y, 7)  # pushes b (5) to disk
    assert set(cache.disk.entries) == {a, b}
    cache.ram.remove(x)
    cache.ram.remove(y)
    seen(cache, w1, 2)
    seen(cache, w2, 2)
    seen(cache, n, 4)  # pushes w1 out of RAM: reused, but colder than all of disk
    assert w1 not in cache.disk and cache.counts["dropped"] == 1
    seen(cache, h1, 9)  # pushes w2 out: same
    seen(cache, h2, 10)  # pushes n (4) out: colder than a (5)
    assert set(cache.disk.entries) == {a, b} and cache.counts["dropped"] == 3
    seen(cache, h3, 11)  # pushes h1 (9) out: hotter than a, the disk's LRU block
    assert set(cache.disk.entries) == {b, h1}


def test_a_reused_working_set_larger_than_ram_reaches_disk():
    cache = TieredCache.in_blocks(8, 100)
    blocks = list(range(1000, 1032))
    for _ in range(2):  # every block evicted twice (by two workers, or twice by one)
        for h in blocks:
            cache.offer(h, None)
    assert set(cache.ram.entries) | set(cache.disk.entries) == set(blocks)
    assert len(cache.ram) == 8 and cache.counts["stored_disk"] == 24
    assert cache.locate(blocks) == [TIER_RAM] * 8 + [TIER_DISK] * 24


def test_spill_gate_refusal_drops_the_block():
    cache = TieredCache.in_blocks(1, 10, spill_gate=lambda e: False)
    cache.offer(1, None)
    cache.offer(1, None)
    cache.record([2, 2])
    out = cache.offer(2, None)
    assert out.status == STORED and out.spilled == [] and out.dropped == 1
    assert cache.counts["spill_refused"] == 1 and len(cache.disk) == 0


def test_promoted_disk_hit_is_not_written_again():
    cache = TieredCache.in_blocks(1, 10)
    cache.offer(1, None)
    cache.offer(1, None)
    cache.record([2, 2])
    assert [e.hash for e in cache.offer(2, None).spilled] == [1]
    cache.record([1, 1])
    out = cache.promote(1, None)  # a lookup read it back from disk
    assert out.status == STORED and 1 in cache.ram and 1 in cache.disk
    cache.record([3, 3, 3, 3])
    out = cache.offer(3, None)  # pushes 1 out of RAM again: already on disk
    assert out.spilled == [] and out.dropped == 0 and 1 in cache.disk


def test_disk_rebuild_evicts_beyond_a_smaller_capacity():
    cache = TieredCache(0, 1000)
    evicted = []
    for h in range(5):
        evicted += cache.load_disk_entry(h, None, 300)
    assert [e.hash for e in evicted] == [0, 1]
    assert cache.disk.used == 900


# ---- events --------------------------------------------------------------------------------------

def apply_all(replica: HashSetReplica, batches) -> None:
    for b in batches:
        assert replica.apply(b), b


def test_tier_logs_follow_the_tiers():
    cache = TieredCache.in_blocks(20, 50, max_event_blocks=7)
    ram, disk = HashSetReplica(), HashSetReplica()
    rng = random.Random(5)
    pool = hashes(200, 4)
    for i in range(3000):
        h = rng.choice(pool)
        cache.record([h])
        cache.offer(h, pool[pool.index(h) - 1] if i % 3 else None)
        if i % 97 == 0:
            apply_all(ram, cache.ram_log.take_batches(1))
            apply_all(disk, cache.disk_log.take_batches(1))
    apply_all(ram, cache.ram_log.take_batches(1))
    apply_all(disk, cache.disk_log.take_batches(1))
    assert ram.hashes == set(cache.ram.entries)
    assert disk.hashes == set(cache.disk.entries)
    assert all(b.tier == TIER_RAM for b in cache.ram_log.take_batches(1)) is True


def test_batches_are_bounded_and_chains_continue_across_them():
    entries = [(h, None if i == 0 else h - 1) for i, h in enumerate(range(100, 130))]
    log = TierLog(TIER_DISK, lambda: iter(entries), max_blocks=8)
    batches = log.snapshot_batches(worker_id=3)
    assert [b.event_id for b in batches] == list(range(1, len(batches) + 1))
    assert isinstance(batches[0].events[0], Cleared)
    stored = [ev for b in batches for ev in b.events if isinstance(ev, Stored)]
    assert all(len(b.events) and sum(len(e.blocks) if isinstance(e, Stored) else 1
                                     for e in b.events) <= 8 for b in batches)
    chain = [blk.hash for ev in stored for blk in ev.blocks]
    assert chain == list(range(100, 130))
    for ev in stored[1:]:
        assert ev.parent_hash == ev.blocks[0].hash - 1


def test_unpublished_events_past_the_bound_become_a_snapshot():
    held = {1, 2, 3}
    log = TierLog(TIER_RAM, lambda: ((h, None) for h in sorted(held)), max_pending=10)
    for h in range(100):
        log.removed(h + 1000)
    assert log.overflows == 1
    batches = log.take_batches(7)
    replica = HashSetReplica()
    replica.hashes = {999}
    apply_all(replica, batches)
    assert replica.hashes == held
    assert not any(isinstance(ev, Removed) for b in batches for ev in b.events)


def test_cleared_supersedes_pending_events():
    log = TierLog(TIER_RAM, lambda: iter(()))
    log.stored(1, None)
    log.cleared()
    (batch,) = log.take_batches(1)
    assert batch.events == [Cleared()]


# ---- placement -----------------------------------------------------------------------------------

def test_placement_is_balanced_and_deterministic():
    p = Placement([11, 22, 33, 44])
    keys = hashes(20_000, 8)
    owners = [p.owner(h) for h in keys]
    assert owners == [Placement([44, 33, 22, 11]).owner(h) for h in keys]
    for inst in p.instances:
        assert 0.2 < owners.count(inst) / len(keys) < 0.3


def test_placement_moves_only_what_it_must():
    keys = hashes(20_000, 9)
    before = Placement([1, 2, 3, 4])
    grown = Placement([1, 2, 3, 4, 5])
    moved = [h for h in keys if before.owner(h) != grown.owner(h)]
    assert all(grown.owner(h) == 5 for h in moved)  # only to the newcomer
    assert 0.12 < len(moved) / len(keys) < 0.28  # about 1/5
    shrunk = Placement([1, 2, 4])
    for h in keys:
        if before.owner(h) != 3:
            assert shrunk.owner(h) == before.owner(h)  # only instance 3's blocks move


def test_placement_groups_positions_per_owner():
    p = Placement([1, 2])
    keys = hashes(50, 3)
    groups = p.group(keys)
    assert sorted(i for g in groups.values() for i in g) == list(range(50))
    assert Placement([]).owner(5) is None and Placement([]).group(keys) == {}


@pytest.mark.parametrize("n", [1, 3])
def test_placement_single_and_small_sets(n):
    p = Placement(range(1, n + 1))
    assert all(p.owner(h) in p.instances for h in hashes(100, n))
