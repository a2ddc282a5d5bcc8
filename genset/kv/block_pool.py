"""A fixed pool of KV-cache blocks with refcounts, a prefix cache keyed by block hash, LRU
eviction, and the event log the router builds its index from.

States of a block (by id, 0 .. num_blocks-1):

- **in use**: ref_cnt > 0; held by one or more sequences (shared prefix blocks have several
  holders). Never evicted.
- **free**: ref_cnt == 0; sits in the free queue in LRU order. A free block may still be
  **cached** (its hash is registered), so a later request with the same prefix can take it
  back (`touch`) without recomputing. Allocation takes the least recently freed block first
  and, if it was cached, evicts its hash (a `Removed` event).

The idea follows vLLM's v1 block pool (a free queue in eviction order plus a hash -> block
map); the free queue here is an OrderedDict, which gives O(1) removal from the
middle (when a cached block is touched) and O(1) pop from the LRU end.

Event log: every change of the set of cached hashes is recorded as `proto.kv` events —
`Stored` when a full block's hash is registered, `Removed` when a hash is evicted or
dropped, `Cleared` when everything is dropped. Consecutive stores that continue one chain are
merged into one `Stored`, consecutive removals into one `Removed`. `take_batch()` hands the
pending events out as a `KvEventBatch` whose `event_id` grows by exactly one per batch, so a
consumer that applies every batch in order (`genset.kv.replica.HashSetReplica`) holds exactly
`cached_hashes()`; one that sees a gap asks for `snapshot_batch()`.

Not thread-safe: one owner (the scheduler, on the engine thread) calls it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice

from proto.kv import TIER_DEVICE, Cleared, KvEvent, KvEventBatch, Removed, Stored, StoredBlock
from proto.tokens import pack_tokens

# `BlockPool.marks` bits
REUSED = 1  # taken again while cached
GENERATED = 2  # holds generated tokens (registered from a sequence's output)
# its KV came from outside this engine (a KV import: a transfer, an offload hit), or was
# computed over such KV (the scheduler propagates it down a sequence's chain): what a request
# that ends on non-finite values drops from the cache (`uncache`, `Scheduler.drop_foreign`)
FOREIGN = 4
# imported (a KV import: an offload hit, a transfer) and not yet used by any request (taken
# as a prefix hit at admission, or pinned for an export): its eviction while still so marked
# is onboarding work thrown away (`BlockPool.num_imports_evicted_unused`)
UNUSED_IMPORT = 8


class BlockPool:
    """`num_blocks` blocks of `block_size` tokens each.

    `emit_token_ids`: put each stored block's token ids into its `Stored` event (costs a
    packing per block; consumers that only need hashes leave it off).
    `enable_caching`: False turns the prefix cache (and so all events) off.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_caching: bool = True,
        emit_token_ids: bool = False,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(
                f"need num_blocks > 0 and block_size > 0, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.emit_token_ids = emit_token_ids
        self.ref_cnt: list[int] = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self._parent: list[int | None] = [None] * num_blocks
        self._tokens: list[bytes | None] = [None] * num_blocks
        # ref_cnt == 0 blocks, oldest (next to evict) first; values unused
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._hash_to_block: dict[int, int] = {}
        self._pending: list[KvEvent] = []
        # the last pending event when it is a Stored, and its last hash: a block continuing
        # that chain joins it (the common case: a sequence filling blocks one by one)
        self._open_store: Stored | None = None
        self._open_tail: int | None = None
        self.event_id = 0  # id of the last batch handed out
        # hashes forgotten so far (evicted or cleared; monotonic): a lookup made when this was
        # n has lost nothing while it is still n (Scheduler.waiting_prefill_tokens memoizes)
        self.num_uncached = 0
        # imported blocks evicted before any request used them (`UNUSED_IMPORT`; monotonic):
        # onboarding that fetched, copied and imported a block for nothing
        self.num_imports_evicted_unused = 0
        # Eviction hand-over (`SchedulingCore.set_eviction_sink`): while a list, every cached
        # block evicted is recorded as (hash, parent hash, packed tokens, block id) until the
        # owner takes them (before the block's memory is written again). None: not recorded.
        # The record's last field: the block's `marks` when it was evicted.
        self.evicted: list[tuple[int, int | None, bytes | None, int, int]] | None = None
        # Per cached block, until its hash is evicted: REUSED when it was taken again after
        # it was registered (`touch`: a prefix hit, a pin, an import's held ancestors),
        # GENERATED when it holds generated tokens (the scheduler marks it at registration).
        # What the offload store's admission weighs (`genset.offload.admission`).
        self.marks = bytearray(num_blocks)
        # Keep each cached block's packed token ids (for events, or for evictions handed over)
        self.keep_tokens = emit_token_ids

    # ---- sizes ------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks that `allocate` can hand out (free ones, cached or not)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks held by at least one sequence."""
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    @property
    def num_cached(self) -> int:
        return len(self._hash_to_block)

    # ---- prefix cache -----------------------------------------------------------------------

    def lookup(self, hashes: Sequence[int]) -> list[int]:
        """Block ids of the longest run of `hashes`, from the first, that is cached.

        Does not take a reference: call `touch` on (a prefix of) the result to keep them.
        """
        found: list[int] = []
        get = self._hash_to_block.get
        for h in hashes:
            block = get(h)
            if block is None:
                break
            found.append(block)
        return found

    def block_of(self, block_hash: int) -> int | None:
        return self._hash_to_block.get(block_hash)

    def eviction_order(self, n: int) -> list[int | None]:
        """The hashes (None: not cached) of the next `n` free blocks `allocate` would take,
        in that order (what allocating them would evict). Changes nothing."""
        bh = self.block_hash
        return [bh[b] for b in islice(self._free, max(0, n))]

    def eviction_candidates(
            self, n: int) -> Iterator[tuple[int, int | None, bytes | None, int, int]]:
        """The cached blocks among the next `n` free blocks `allocate` would take, next first,
        as the `evicted` records their eviction would make (hash, parent hash, packed tokens,
        block id, marks): what an engine can copy out ahead of eviction. Lazy (a caller that needs
        a few stops early: it runs once per engine step over up to 1,024 blocks); do not
        change the pool while iterating. Changes nothing."""
        bh, parent, tokens, marks = self.block_hash, self._parent, self._tokens, self.marks
        return ((bh[b], parent[b], tokens[b], b, marks[b])
                for b in islice(self._free, max(0, n)) if bh[b] is not None)

    def chain_to(self, block_hash: int | None) -> list[int]:
        """Block ids of the cached chain that ends at `block_hash`, first block first, back
        as far as its ancestors are cached (empty when `block_hash` is not). Does not take a
        reference (see `lookup`)."""
        out: list[int] = []
        get = self._hash_to_block.get
        parent = self._parent
        h = block_hash
        while h is not None and len(out) < self.num_blocks:
            b = get(h)
            if b is None:
                break
            out.append(b)
            h = parent[b]
        out.reverse()
        return out

    def cached_hashes(self) -> set[int]:
        return set(self._hash_to_block)

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take one more reference on each block (a cache hit being reused)."""
        ref = self.ref_cnt
        free = self._free
        marks = self.marks
        for b in block_ids:
            if ref[b] == 0:
                del free[b]
            ref[b] += 1
            marks[b] |= REUSED

    def cache_block(
        self,
        block_id: int,
        block_hash: int,
        parent_hash: int | None,
        token_ids: Sequence[int] | None = None,
    ) -> bool:
        """Register a full, computed block under `block_hash`; emits `Stored`.

        Returns False (and registers nothing) when caching is off, the block already has a
        hash, or another block already holds this hash (two sequences computed the same
        prefix at once; the second copy stays private and is recycled without events).
        """
        if not self.enable_caching or self.block_hash[block_id] is not None:
            return False
        if block_hash in self._hash_to_block:
            return False
        self._hash_to_block[block_hash] = block_id
        self.block_hash[block_id] = block_hash
        self._parent[block_id] = parent_hash
        packed = pack_tokens(token_ids) if self.keep_tokens and token_ids is not None else None
        self._tokens[block_id] = packed
        self._record_store(parent_hash, StoredBlock(
            hash=block_hash, token_ids=packed if self.emit_token_ids else None))
        return True

    def cache_chain(
        self, block_ids: Sequence[int], hashes: Sequence[int], parent_hash: int | None
    ) -> None:
        """`cache_block` for consecutive blocks of one sequence: `block_ids[i]` under
        `hashes[i]`, each chained to the hash before it (`parent_hash` for the first); same
        registrations and events as calling `cache_block` block by block, one call for a
        whole prefill chunk. Token ids are not taken: with `emit_token_ids` use `cache_block`.
        """
        if not self.enable_caching:
            return
        h2b = self._hash_to_block
        block_hash = self.block_hash
        parents = self._parent
        tokens = self._tokens
        store = self._open_store
        tail = self._open_tail
        for b, h in zip(block_ids, hashes, strict=True):
            parent, parent_hash = parent_hash, h
            if block_hash[b] is not None or h in h2b:
                continue
            h2b[h] = b
            block_hash[b] = h
            parents[b] = parent
            tokens[b] = None
            if store is None or tail != parent:
                store = Stored(parent_hash=parent, blocks=[])
                self._pending.append(store)
            store.blocks.append(StoredBlock(hash=h, token_ids=None))
            tail = h
        self._open_store = store
        self._open_tail = tail

    # ---- allocation -------------------------------------------------------------------------

    def allocate(self, n: int) -> list[int] | None:
        """`n` blocks with ref_cnt 1, evicting least recently used cached ones; None (and no
        change) when fewer than `n` are free."""
        if n > len(self._free):
            return None
        out: list[int] = []
        free = self._free
        ref = self.ref_cnt
        block_hash = self.block_hash
        pop = free.popitem
        removed: list[int] | None = None  # hashes of the Removed event being extended
        for _ in range(n):
            b = pop(last=False)[0]
            h = block_hash[b]
            if h is not None:
                # evicting a cached block (as `_evict`, inlined: most allocations evict)
                self.num_uncached += 1
                m = self.marks[b]
                if self.evicted is not None:
                    self.evicted.append((h, self._parent[b], self._tokens[b], b, m))
                if m & UNUSED_IMPORT:
                    self.num_imports_evicted_unused += 1
                self.marks[b] = 0
                del self._hash_to_block[h]
                block_hash[b] = None
                self._parent[b] = None
                self._tokens[b] = None
                if removed is None:
                    last = self._pending[-1] if self._pending else None
                    if isinstance(last, Removed):
                        removed = last.hashes
                    else:
                        self._open_store = None
                        last = Removed(hashes=[])
                        self._pending.append(last)
                        removed = last.hashes
                removed.append(h)
            ref[b] = 1
            out.append(b)
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference from each block. Pass a sequence's blocks in prefix order: they
        are released last-first, so a sequence's tail is evicted before its shared head."""
        ref = self.ref_cnt
        free = self._free
        for b in reversed(block_ids):
            c = ref[b] - 1
            if c < 0:
                raise RuntimeError(f"block {b} freed more often than referenced")
            ref[b] = c
            if c == 0:
                free[b] = None

    def evict_cached(self, max_blocks: int | None = None) -> int:
        """Evict up to `max_blocks` free cached blocks (LRU first); returns how many."""
        done = 0
        for b in list(self._free):
            if max_blocks is not None and done >= max_blocks:
                break
            if self.block_hash[b] is not None:
                self._evict(b)
                done += 1
        return done

    def clear_cache(self) -> None:
        """Forget every cached hash (blocks in use stay in use, just no longer shareable);
        emits `Cleared`."""
        for b in self._hash_to_block.values():
            self.block_hash[b] = None
            self._parent[b] = None
            self._tokens[b] = None
            self.marks[b] = 0
        self.num_uncached += len(self._hash_to_block)
        self._hash_to_block.clear()
        if self.enable_caching:
            self._open_store = None
            self._pending.append(Cleared())

    def uncache(self, block_ids: Iterable[int]) -> list[int]:
        """Forget the hashes of these blocks and of every cached block chained below one of
        them (its parent, or an ancestor, is among them), in use or not: what held them keeps
        its memory, nobody can hit them again; free ones go to the front of the free queue
        (allocated next). Emits `Removed`; hands nothing to the eviction sink (`evicted`):
        this is for blocks whose KV is bad, which must not travel on. Returns the hashes
        forgotten, parents before children.

        The descendants: a block computed over bad KV holds bad KV too, and once the dropped
        hash is cached again (recomputed), a lookup would run on into them. Finding them takes
        one pass over the cache (a children map): this runs only when a request failed
        (chains of 64 blocks, load ~6: ~0.7 ms with 4,096 cached blocks, ~7 ms with 16,384)."""
        bh = self.block_hash
        roots = [h for b in block_ids if (h := bh[b]) is not None]
        if not roots:
            return []
        h2b = self._hash_to_block
        parents = self._parent
        children: dict[int, list[int]] = {}
        for h, b in h2b.items():
            p = parents[b]
            if p is not None:
                children.setdefault(p, []).append(h)
        gone: dict[int, None] = {}  # ordered; guards against a (hash-collision) cycle
        todo = roots[::-1]
        while todo:
            h = todo.pop()
            if h in gone:
                continue
            gone[h] = None
            todo.extend(reversed(children.get(h, ())))
        free = self._free
        for h in gone:
            b = h2b.pop(h)
            bh[b] = None
            parents[b] = None
            self._tokens[b] = None
            self.marks[b] = 0
            if b in free:
                free.move_to_end(b, last=False)
        self.num_uncached += len(gone)
        dropped = list(gone)
        last = self._pending[-1] if self._pending else None
        if isinstance(last, Removed):
            last.hashes.extend(dropped)
        else:
            self._open_store = None
            self._pending.append(Removed(hashes=list(dropped)))
        return dropped

    def _evict(self, b: int) -> None:
        h = self.block_hash[b]
        assert h is not None
        self.num_uncached += 1
        if self.evicted is not None:
            self.evicted.append((h, self._parent[b], self._tokens[b], b, self.marks[b]))
        if self.marks[b] & UNUSED_IMPORT:
            self.num_imports_evicted_unused += 1
        self.marks[b] = 0
        del self._hash_to_block[h]
        self.block_hash[b] = None
        self._parent[b] = None
        self._tokens[b] = None
        last = self._pending[-1] if self._pending else None
        if isinstance(last, Removed):
            last.hashes.append(h)
        else:
            self._open_store = None
            self._pending.append(Removed(hashes=[h]))

    def _record_store(self, parent_hash: int | None, block: StoredBlock) -> None:
        store = self._open_store
        if store is not None and self._open_tail == parent_hash:
            store.blocks.append(block)
        else:
            store = self._open_store = Stored(parent_hash=parent_hash, blocks=[block])
            self._pending.append(store)
        self._open_tail = block.hash

    # ---- events -----------------------------------------------------------------------------

    def drain_events(self) -> list[KvEvent]:
        """Pending events, oldest first, without numbering them (see `take_batch`)."""
        events, self._pending = self._pending, []
        self._open_store = None
        return events

    def take_batch(
        self, worker_id: int, ts_ms: int = 0, tier: str = TIER_DEVICE
    ) -> KvEventBatch | None:
        """Pending events as the next numbered batch; None when nothing happened."""
        if not self._pending:
            return None
        self.event_id += 1
        return KvEventBatch(
            worker_id=worker_id,
            event_id=self.event_id,
            events=self.drain_events(),
            tier=tier,
            ts_ms=ts_ms,
        )

    def snapshot_events(self) -> list[KvEvent]:
        """`Cleared` followed by `Stored` events for every cached hash: what a consumer that
        lost track applies to get back in step."""
        events: list[KvEvent] = [Cleared()]
        for h, b in self._hash_to_block.items():
            events.append(
                Stored(
                    parent_hash=self._parent[b],
                    blocks=[StoredBlock(
                        hash=h, token_ids=self._tokens[b] if self.emit_token_ids else None)],
                )
            )
        return events

    def snapshot_batch(
        self, worker_id: int, ts_ms: int = 0, tier: str = TIER_DEVICE
    ) -> KvEventBatch:
        """A numbered resync batch: pending events are folded in (they are covered by the
        snapshot), so the id sequence stays gap-free."""
        self._pending = self.snapshot_events()
        self._open_store = None
        batch = self.take_batch(worker_id, ts_ms, tier)
        assert batch is not None
        return batch

    # ---- checks -----------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError if the pool's bookkeeping is inconsistent (tests, debugging)."""
        assert all(c >= 0 for c in self.ref_cnt), "negative refcount"
        for b in range(self.num_blocks):
            assert (self.ref_cnt[b] == 0) == (b in self._free), f"block {b} free-queue mismatch"
        for h, b in self._hash_to_block.items():
            assert self.block_hash[b] == h, f"hash map mismatch at block {b}"
        assert sum(h is not None for h in self.block_hash) == len(self._hash_to_block)
