"""Block pool: refcounts, prefix cache, LRU eviction, and an event log that rebuilds it."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from genset.kv.block_pool import BlockPool
from genset.kv.replica import HashSetReplica
from proto.codec import decode, encode
from proto.kv import Cleared, KvEventBatch, Removed, Stored

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(0, 6)),
        st.tuples(st.just("free"), st.integers(0, 50)),
        st.tuples(st.just("cache"), st.integers(0, 50), st.integers(0, 30)),
        st.tuples(st.just("hit"), st.lists(st.integers(0, 30), max_size=4)),
        st.tuples(st.just("flush")),
        st.tuples(st.just("evict"), st.integers(0, 3)),
        st.tuples(st.just("clear")),
        st.tuples(st.just("uncache"), st.integers(0, 50)),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(OPS, st.integers(1, 12))
def test_pool_invariants_under_random_operations(ops, num_blocks):
    pool = BlockPool(num_blocks, block_size=4)
    replica = HashSetReplica()
    holders: list[list[int]] = []  # each: the blocks one "sequence" holds a reference on
    pinned_hash: dict[int, int] = {}  # referenced cached blocks after the previous op

    def sync():
        batch = pool.take_batch(worker_id=1)
        if batch is not None:
            # through the wire codec, as a router would receive it
            assert replica.apply(decode(encode(batch), KvEventBatch))
        assert replica.hashes == pool.cached_hashes()

    for op in ops:
        kind = op[0]
        if kind == "alloc":
            before = pool.num_free
            got = pool.allocate(op[1])
            if op[1] > before:
                assert got is None and pool.num_free == before
            else:
                assert got is not None and len(set(got)) == op[1]
                holders.append(got)
        elif kind == "free" and holders:
            blocks = holders.pop(op[1] % len(holders))
            pool.free(blocks)
        elif kind == "cache" and holders:
            blocks = holders[op[1] % len(holders)]
            if blocks:
                b = blocks[op[1] % len(blocks)]
                pool.cache_block(b, op[2], parent_hash=None)
        elif kind == "hit":
            found = pool.lookup(op[1])
            if found:
                pool.touch(found)
                holders.append(found)
        elif kind == "flush":
            sync()
        elif kind == "evict":
            pool.evict_cached(op[1])
        elif kind == "clear":
            pool.clear_cache()
        elif kind == "uncache":
            pool.uncache([op[1] % num_blocks])

        pool.check_invariants()
        assert 0 <= pool.num_used <= pool.num_blocks
        assert all(c >= 0 for c in pool.ref_cnt)
        # every reference is accounted for by exactly the holders' lists
        counts = [0] * num_blocks
        for blocks in holders:
            for b in blocks:
                counts[b] += 1
        assert counts == pool.ref_cnt
        # a referenced cached block is never evicted (no op frees and allocates at once, so
        # a block referenced before and after the op was held throughout)
        for b, h in pinned_hash.items():
            if pool.ref_cnt[b] > 0 and kind not in ("clear", "uncache"):
                assert pool.block_hash[b] == h and pool.block_of(h) == b
        pinned_hash = {
            b: h for b, h in enumerate(pool.block_hash) if h is not None and pool.ref_cnt[b] > 0
        }
    sync()


def test_lru_evicts_least_recently_freed_and_tail_first():
    pool = BlockPool(4, block_size=2)
    a = pool.allocate(2)
    b = pool.allocate(2)
    assert a is not None and b is not None
    for i, blk in enumerate(a + b):
        pool.cache_block(blk, 100 + i, parent_hash=None)
    pool.free(a)  # a's tail block is released first, so evicted first
    pool.free(b)
    pool.drain_events()
    pool.allocate(1)
    assert pool.drain_events() == [Removed(hashes=[101])]
    pool.allocate(2)
    assert pool.drain_events() == [Removed(hashes=[100, 103])]
    assert pool.cached_hashes() == {102}


def test_touch_reclaims_a_free_cached_block():
    pool = BlockPool(2, block_size=2)
    blocks = pool.allocate(2)
    assert blocks is not None
    pool.cache_block(blocks[0], 7, None)
    pool.free(blocks)
    assert pool.num_free == 2
    hit = pool.lookup([7, 8])
    assert hit == [blocks[0]]
    pool.touch(hit)
    assert pool.num_free == 1 and pool.ref_cnt[blocks[0]] == 1
    assert pool.allocate(2) is None


def test_stored_events_merge_along_a_chain():
    pool = BlockPool(8, block_size=2, emit_token_ids=True)
    blocks = pool.allocate(3)
    assert blocks is not None
    pool.cache_block(blocks[0], 1, None, [1, 2])
    pool.cache_block(blocks[1], 2, 1, [3, 4])
    pool.cache_block(blocks[2], 9, 5, [5, 6])  # another chain
    events = pool.drain_events()
    assert len(events) == 2
    first, second = events
    assert isinstance(first, Stored) and isinstance(second, Stored)
    assert first.parent_hash is None and [b.hash for b in first.blocks] == [1, 2]
    assert first.blocks[1].token_ids == b"\x03\x00\x00\x00\x04\x00\x00\x00"
    assert second.parent_hash == 5


def test_duplicate_hash_stays_private():
    pool = BlockPool(4, block_size=2)
    blocks = pool.allocate(2)
    assert blocks is not None
    assert pool.cache_block(blocks[0], 5, None)
    assert not pool.cache_block(blocks[1], 5, None)
    assert pool.block_of(5) == blocks[0]
    assert len(pool.drain_events()) == 1


def test_event_ids_and_snapshot_resync():
    pool = BlockPool(6, block_size=2)
    blocks = pool.allocate(3)
    assert blocks is not None
    pool.cache_block(blocks[0], 1, None)
    b1 = pool.take_batch(3)
    pool.cache_block(blocks[1], 2, 1)
    b2 = pool.take_batch(3)
    assert pool.take_batch(3) is None
    assert b1 is not None and b2 is not None and (b1.event_id, b2.event_id) == (1, 2)

    late = HashSetReplica()
    assert not late.apply(b2)  # gap: refuses
    pool.cache_block(blocks[2], 3, 2)
    snap = pool.snapshot_batch(3)
    assert snap.event_id == 3 and isinstance(snap.events[0], Cleared)
    assert late.apply(snap)
    assert late.hashes == {1, 2, 3} == pool.cached_hashes()
    assert pool.take_batch(3) is None  # pending events were folded into the snapshot


def test_clear_cache_emits_cleared():
    pool = BlockPool(4, block_size=2)
    blocks = pool.allocate(1)
    assert blocks is not None
    pool.cache_block(blocks[0], 11, None)
    pool.clear_cache()
    replica = HashSetReplica()
    batch = pool.take_batch(0)
    assert batch is not None and replica.apply(batch)
    assert replica.hashes == set() == pool.cached_hashes()
    assert pool.ref_cnt[blocks[0]] == 1


def test_uncache_drops_blocks_and_everything_chained_below_them():
    """`uncache` (a request ended on bad KV): the blocks' hashes and those of every cached
    block descending from them go, in use or free; nothing else; one `Removed`; nothing is
    handed to the eviction sink (bad KV must not travel on); the free ones are taken next."""
    pool = BlockPool(8, block_size=2)
    pool.evicted = []  # an eviction sink is attached
    blocks = pool.allocate(6)
    assert blocks is not None
    a, b, c, d, e, f = blocks
    pool.cache_block(a, 1, None)  # 1 -> 2 -> 3, 2 -> 4 (a branch), 5 (another chain)
    pool.cache_block(b, 2, 1)
    pool.cache_block(c, 3, 2)
    pool.cache_block(d, 4, 2)
    pool.cache_block(e, 5, None)
    replica = HashSetReplica()
    assert replica.apply(pool.take_batch(0))
    pool.free([c])  # one of them free, the others held
    assert pool.uncache([b, f]) == [2, 3, 4]  # (f holds no hash: nothing to drop)
    assert pool.cached_hashes() == {1, 5}
    assert pool.lookup([1, 2]) == [a]
    assert pool.evicted == [] and pool.num_uncached == 3
    batch = pool.take_batch(0)
    assert batch is not None and batch.events == [Removed(hashes=[2, 3, 4])]
    assert replica.apply(batch) and replica.hashes == pool.cached_hashes()
    assert pool.ref_cnt[b] == 1 and pool.block_hash[b] is None  # its holder keeps it
    assert pool.allocate(1) == [c]  # the dropped free block is taken first
    assert pool.uncache([b]) == []
    pool.check_invariants()
