"""The offload store's tier policy: which blocks it keeps in RAM, which go to disk, which go.

Pure bookkeeping (no I/O, no clock): the store process keeps the block bytes and the files
and does what the outcomes here say; the replay runs the same policy with every block of
size 1 (`TieredCache.in_blocks`).

What the peers' users ran into, and the answer here:

- **A CPU tier that churns** (an LRU in front of a cache that is not much smaller evicts
  exactly what will be asked for next): admission is frequency-aware, TinyLFU-style. A
  count-min sketch (`FrequencySketch`) counts how often each block hash was put or asked
  for; when the RAM tier is full, a newcomer only displaces the least recently used block if
  it is at least as frequent. A block that was never reused cannot push out one that was, so
  a scan of one-off prompts leaves the reused prefixes in place. Counts are halved every
  `sample_size` additions, so popularity fades and a once-hot block cannot squat forever.
- **Eviction that never fires**: both tiers are bounded (bytes, or blocks in the replay) and
  every admission that does not fit evicts right away, in the same call; equal frequencies
  admit the newcomer (plain LRU among equals), so a cold tier keeps turning over.
- **Disk writes for blocks nobody wants**: the disk tier only receives what RAM evicts, or
  turns away at admission, *and* was reused (sketch estimate >= `spill_min_freq`, 2 by
  default: put or asked for at least twice); the disk tier applies the same admission
  against its own LRU victim.

A block can be in both tiers (a disk hit is promoted to RAM and the file stays): when its RAM
copy is evicted later nothing is written again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from genset.offload.events import TierLog
from genset.offload.placement import mix64
from proto.kv import TIER_DISK, TIER_HOST

TIER_RAM = TIER_HOST  # the wire name of the store's RAM tier is "host"

# Counters per row per block the tiers can hold. At 1 a one-off block often collides up to the
# count of a reused one in every row (a scan of 1000 new blocks through a 1024-wide sketch let
# some in past reused ones); at 4 that takes four unlucky rows (~1e-6 per block).
SKETCH_PER_ENTRY = 4

# A block seen this often (put or asked for twice) counts as reused.
REUSED = 2

_HALF = bytes(i >> 1 for i in range(256))  # bytes.translate table: every counter halved


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class FrequencySketch:
    """How often each hash was seen, approximately (TinyLFU's counter).

    A doorkeeper (a Bloom filter, 2 bits per hash) absorbs the first sighting of each hash;
    only repeats reach the count-min sketch: 4 rows of saturating counters (capped at 15),
    estimate = the minimum over the rows, +1 when the doorkeeper has the hash; conservative
    update (only the rows holding the minimum are raised). Without the doorkeeper a stream
    of one-off blocks fills every counter with ones and new one-offs soon estimate 2, as often
    as a reused block; with it, one-offs leave the counters alone.

    Memory: 4 x `width` bytes of counters + 4 x `width` bytes of doorkeeper. Every
    `sample_size` additions the counters are halved and the doorkeeper cleared (TinyLFU's
    reset), so the sketch measures recent popularity.
    """

    DEPTH = 4
    MAX_COUNT = 15

    __slots__ = ("_additions", "_door", "_door_mask", "_mask", "_rows", "resets", "sample_size",
                 "width")

    def __init__(self, width: int = 1024, sample_size: int | None = None) -> None:
        self.width = _pow2(max(16, width))
        self._mask = self.width - 1
        self._rows = [bytearray(self.width) for _ in range(self.DEPTH)]
        self._door = bytearray(4 * self.width)  # 32 bits per counter column
        self._door_mask = 32 * self.width - 1
        self.sample_size = sample_size if sample_size is not None else 10 * self.width
        if self.sample_size <= 0:
            raise ValueError(f"sample_size must be > 0, got {self.sample_size}")
        self._additions = 0
        self.resets = 0

    @property
    def nbytes(self) -> int:
        return self.DEPTH * self.width + len(self._door)

    def _slots(self, h: int) -> tuple[int, int, int, int, int, int]:
        x = mix64(h)
        y = mix64(x ^ 0x5851F42D4C957F2D)
        z = mix64(y ^ 0x14057B7EF767814F)
        m, dm = self._mask, self._door_mask
        return x & m, (x >> 32) & m, y & m, (y >> 32) & m, z & dm, (z >> 32) & dm

    def _in_door(self, p: int, q: int) -> bool:
        door = self._door
        return bool(door[p >> 3] & (1 << (p & 7))) and bool(door[q >> 3] & (1 << (q & 7)))

    def estimate(self, h: int) -> int:
        a, b, c, d, p, q = self._slots(h)
        r = self._rows
        return min(r[0][a], r[1][b], r[2][c], r[3][d]) + self._in_door(p, q)

    def increment(self, h: int) -> None:
        a, b, c, d, p, q = self._slots(h)
        if not self._in_door(p, q):
            door = self._door
            door[p >> 3] |= 1 << (p & 7)
            door[q >> 3] |= 1 << (q & 7)
        else:
            r0, r1, r2, r3 = self._rows
            low = min(r0[a], r1[b], r2[c], r3[d])
            if low < self.MAX_COUNT:
                if r0[a] == low:
                    r0[a] = low + 1
                if r1[b] == low:
                    r1[b] = low + 1
                if r2[c] == low:
                    r2[c] = low + 1
                if r3[d] == low:
                    r3[d] = low + 1
        self._additions += 1
        if self._additions >= self.sample_size:
            self.halve()

    def halve(self) -> None:
        self._rows = [bytearray(row.translate(_HALF)) for row in self._rows]
        self._door = bytearray(len(self._door))
        self._additions //= 2
        self.resets += 1


class Entry(msgspec.Struct, gc=False):
    """One block a tier holds: `size` in the tier's unit (bytes, or 1 in the replay), `value`
    whatever the owner keeps with it (the RAM tier: the block's bytes).

    Untracked by the cyclic GC (`gc=False`: it holds ints and a decoded block, never a
    cycle). As a plain slotted class every held block was one tracked object, so a store
    holding ~170k blocks had that many for each full collection to walk (150-450 ms pauses
    measured after `gc.freeze`, issue 11's helper); the decoded blocks themselves are
    msgspec structs of atomic fields, already untracked."""

    hash: int
    parent: int | None
    size: int
    value: Any = None

    def __repr__(self) -> str:
        return f"Entry({self.hash:x}, size={self.size})"


# Admission of a newcomer that needs room: `frequency` (TinyLFU, the default: it displaces
# only blocks no more frequent than itself, so a scan of one-offs cannot flush reused ones);
# `lru` (plain LRU: always, the least recently used go). On the synthetic Mooncake replay
# plain LRU served more: 35.9 / 56.5% hit at 1x / 4x the GPU blocks against 34.2 / 54.0%
# (its reuse is recent more than frequent; at 10x equal, nothing is turned away).
# `slru` (segmented LRU: every newcomer gets in, LRU, but into a probation segment; a block
# used again while held (a lookup served it, another worker put it too, a disk copy was
# promoted) moves to a protected segment of at most `PROTECTED_SHARE` of the tier, and victims
# come from probation first, so blocks put once and never asked for go before reused ones
# without ever turning a newcomer away, unlike `frequency`). On the Mooncake replay a block
# put for the first time was used again 39% of the time, one already used by two requests
# 75% (2026-12-06): protecting the reused ones served more from the store than LRU.
ADMIT_FREQUENCY = "frequency"
ADMIT_LRU = "lru"
ADMIT_SLRU = "slru"
ADMISSION_POLICIES = (ADMIT_FREQUENCY, ADMIT_LRU, ADMIT_SLRU)
# the protected segment's share of an `slru` tier (the usual SLRU split; 0.5-0.95 gave the
# same hit rate on the Mooncake replay)
PROTECTED_SHARE = 0.8
# What the store runs unless told (`--admission`): segmented LRU. On the synthetic Mooncake
# replay (8 workers, store 4x / 10x their GPU blocks, arrivals 1x and 3x, 3 router seeds
# each) it served more prompt tokens from the store than plain LRU at 4x (hit 57.8 vs 56.2%
# at 1x, 57.6 vs 55.4% at 3x) and lowered the mean TTFT (165.4 vs 168.8 ms at 1x, 182.6 vs
# 188.7 at 3x); at 10x the same (nothing useful is evicted there) (2026-12-06). Plain LRU had
# in turn beaten the TinyLFU filter there (4x: 167.9 vs 176.7 ms), that trace's reuse being
# recent more than repeated: `frequency` stays selectable for workloads with scans of
# one-off prompts that must never displace a reused prefix. The classes below keep
# frequency as their own default (their tests are about it).
DEFAULT_ADMISSION = ADMIT_SLRU


class SizedLru:
    """An LRU bounded by the sum of its entries' sizes, with frequency-aware admission.

    `admit` plans the evictions a newcomer needs (least recently used first) and refuses when
    any of those victims is more frequent than the newcomer, or when more than `max_victims`
    would have to go for one newcomer (a huge block does not get to flush the tier).
    `admission="lru"` never refuses for frequency; `"slru"` neither, and evicts blocks never
    used since they came in (probation) before blocks used again (protected; see ADMIT_SLRU).
    """

    def __init__(self, capacity: int, sketch: FrequencySketch, *, log: TierLog | None = None,
                 max_victims: int = 64, admission: str = ADMIT_FREQUENCY) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        if admission not in ADMISSION_POLICIES:
            raise ValueError(f"admission must be one of {ADMISSION_POLICIES}, got {admission!r}")
        self.admission = admission
        self.capacity = capacity
        self.sketch = sketch
        self.log = log
        self.max_victims = max_victims
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self.used = 0
        self.evictions = 0
        # `slru`: the two segments (hashes, least recently used first; together = entries)
        self.probation: OrderedDict[int, None] | None = None
        self.protected: OrderedDict[int, None] | None = None
        self.protected_used = 0
        self.protected_capacity = int(capacity * PROTECTED_SHARE)
        if admission == ADMIT_SLRU:
            self.probation, self.protected = OrderedDict(), OrderedDict()

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, block_hash: int) -> Entry | None:
        return self.entries.get(block_hash)

    def touch(self, block_hash: int) -> bool:
        """Mark as most recently used (a use of the block: `slru` protects it); False when
        not held."""
        try:
            self.entries.move_to_end(block_hash)
        except KeyError:
            return False
        if self.protected is not None:
            self._protect(block_hash)
        return True

    def _protect(self, block_hash: int) -> None:
        prot = self.protected
        if block_hash in prot:
            prot.move_to_end(block_hash)
            return
        del self.probation[block_hash]
        prot[block_hash] = None
        self.protected_used += self.entries[block_hash].size
        # over its share: the protected LRU goes back to probation, as its newest (it gets a
        # probation's length of time to be used again)
        while self.protected_used > self.protected_capacity and len(prot) > 1:
            h, _ = prot.popitem(last=False)
            self.protected_used -= self.entries[h].size
            self.probation[h] = None

    def _eviction_order(self) -> Iterator[Entry]:
        """Entries in the order they are evicted: least recently used first (`slru`: the
        probation segment's, then the protected one's)."""
        if self.protected is None:
            return iter(self.entries.values())
        entries = self.entries
        return (entries[h] for seg in (self.probation, self.protected) for h in seg)

    def items(self) -> Iterator[tuple[int, int | None]]:
        """(hash, parent) of every entry, least recently used first (snapshots)."""
        return ((e.hash, e.parent) for e in self.entries.values())

    def plan(self, entry: Entry) -> list[Entry] | None:
        """The entries admitting `entry` would evict ([] when it fits), or None: refused.

        A victim that was reused (estimate >= REUSED) only goes for a strictly more frequent
        newcomer; a cold victim goes for one at least as frequent (so cold blocks turn over,
        LRU first). Ties at "reused" refuse because a sketch can overestimate: a one-off that
        collides up to 2 must not push out a block that really was reused."""
        if entry.size > self.capacity:
            return None
        need = self.used + entry.size - self.capacity
        if need <= 0:
            return []
        lru = self.admission != ADMIT_FREQUENCY
        freq = 0 if lru else self.sketch.estimate(entry.hash)
        estimate = self.sketch.estimate
        victims: list[Entry] = []
        for victim in self._eviction_order():
            if len(victims) >= self.max_victims:
                return None
            if not lru:
                vf = estimate(victim.hash)
                if vf > freq or (vf == freq and vf >= REUSED):
                    return None
            victims.append(victim)
            need -= victim.size
            if need <= 0:
                return victims
        return None  # unreachable while used <= capacity

    def commit(self, entry: Entry, victims: list[Entry]) -> None:
        for victim in victims:
            self._drop(victim.hash)
            self.evictions += 1
        self.entries[entry.hash] = entry
        self.used += entry.size
        if self.probation is not None:
            self.probation[entry.hash] = None
        if self.log is not None:
            self.log.stored(entry.hash, entry.parent)

    def admit(self, entry: Entry) -> list[Entry] | None:
        """Admit `entry` (evicting as planned); returns the victims, or None when refused."""
        victims = self.plan(entry)
        if victims is not None:
            self.commit(entry, victims)
        return victims

    def insert(self, entry: Entry) -> list[Entry]:
        """Admit `entry` unconditionally, evicting LRU entries until it fits (rebuilding a tier
        from what is already there); returns the victims."""
        victims = []
        while self.entries and self.used + entry.size > self.capacity:
            victim = next(self._eviction_order())
            self._drop(victim.hash)
            self.evictions += 1
            victims.append(victim)
        self.commit(entry, [])
        return victims

    def remove(self, block_hash: int) -> Entry | None:
        if block_hash not in self.entries:
            return None
        return self._drop(block_hash)

    def _drop(self, block_hash: int) -> Entry:
        entry = self.entries.pop(block_hash)
        self.used -= entry.size
        if self.protected is not None:
            if block_hash in self.protected:
                del self.protected[block_hash]
                self.protected_used -= entry.size
            else:
                del self.probation[block_hash]
        if self.log is not None:
            self.log.removed(block_hash)
        return entry

    def clear(self) -> list[Entry]:
        gone = list(self.entries.values())
        self.entries.clear()
        self.used = 0
        if self.protected is not None:
            self.probation.clear()
            self.protected.clear()
            self.protected_used = 0
        if self.log is not None:
            self.log.cleared()
        return gone


# What PutOutcome.status says about the offered block.
STORED = "stored"  # now in RAM
KNOWN = "known"  # was already held (RAM, or disk and not admitted to RAM): counted as a reuse
STORED_DISK = "stored_disk"  # not admitted to RAM but reused: written to disk instead
REJECTED = "rejected"  # not kept: the tiers are full of more frequently reused blocks


# What happened to a block leaving RAM (TieredCache._spill).
_KEPT = "kept"  # admitted to disk: to be written
_ON_DISK = "on_disk"  # already there
_COLD = "cold"  # not reused, or no disk tier
_DISK_HOTTER = "disk_hotter"  # disk full of more reused blocks
_QUEUE_FULL = "queue_full"  # the owner's write queue is full


@dataclass(slots=True)
class PutOutcome:
    status: str
    # RAM victims (or the offered block itself, status STORED_DISK) the owner must write to disk
    spilled: list[Entry] = field(default_factory=list)
    disk_evicted: list[Entry] = field(default_factory=list)  # files the owner must delete
    dropped: int = 0  # RAM victims kept nowhere (not reused, or disk full of hotter blocks)


class TieredCache:
    """A RAM tier in front of a disk tier, sharing one frequency sketch.

    ram_capacity / disk_capacity: in the unit of the entries' sizes (bytes in the store;
    blocks in the replay). disk_capacity 0 = no disk tier.
    spill_min_freq: a RAM victim goes to disk only if seen at least this often.
    disk_size(entry): the disk-tier size of a RAM entry (the file's size); default: the same.
    spill_gate(entry): asked before a spill is committed; False drops it (the store says no
    when its queue of pending disk writes is full: a write is never waited for).
    sketch_width: counters per row; default: sized at the first put from the capacities and
    that block's size (SKETCH_PER_ENTRY counters per block both tiers can hold, at most
    `max_sketch_width`: 2 Mi columns = 16 MB with the doorkeeper).
    events: keep a `TierLog` per tier (`ram_log`, `disk_log`).
    """

    def __init__(self, ram_capacity: int, disk_capacity: int = 0, *, spill_min_freq: int = 2,
                 disk_size: Callable[[Entry], int] | None = None,
                 spill_gate: Callable[[Entry], bool] | None = None,
                 sketch_width: int | None = None, max_sketch_width: int = 1 << 21,
                 events: bool = True, max_event_blocks: int = 8192,
                 admission: str = ADMIT_FREQUENCY) -> None:
        if spill_min_freq < 0:
            raise ValueError(f"spill_min_freq must be >= 0, got {spill_min_freq}")
        self.spill_min_freq = spill_min_freq
        self.disk_size = disk_size or (lambda e: e.size)
        self.spill_gate = spill_gate
        self._max_sketch_width = max_sketch_width
        self._sized = sketch_width is not None
        self.sketch = FrequencySketch(sketch_width or 1024)
        self.ram = SizedLru(ram_capacity, self.sketch, admission=admission)
        self.disk = SizedLru(disk_capacity, self.sketch, admission=admission)
        self.ram_log: TierLog | None = None
        self.disk_log: TierLog | None = None
        if events:
            self.ram_log = self.ram.log = TierLog(TIER_RAM, self.ram.items,
                                                  max_blocks=max_event_blocks)
            self.disk_log = self.disk.log = TierLog(TIER_DISK, self.disk.items,
                                                    max_blocks=max_event_blocks)
        self.counts: dict[str, int] = dict.fromkeys(
            ("stored", "stored_disk", "known", "rejected", "spilled", "spill_refused", "dropped",
             "disk_evicted", "promoted"), 0)

    @classmethod
    def in_blocks(cls, ram_blocks: int, disk_blocks: int = 0, **kw: Any) -> TieredCache:
        """The replay's model: capacities in blocks, every block of size 1."""
        kw.setdefault("sketch_width", _pow2(max(1024, SKETCH_PER_ENTRY * (ram_blocks + disk_blocks))))
        return cls(ram_blocks, disk_blocks, **kw)

    @property
    def has_disk(self) -> bool:
        return self.disk.capacity > 0

    def _size_sketch(self, entry: Entry) -> None:
        self._sized = True
        per_ram = max(1, entry.size)
        per_disk = max(1, self.disk_size(entry))
        expected = self.ram.capacity // per_ram + self.disk.capacity // per_disk
        width = min(self._max_sketch_width, _pow2(max(1024, SKETCH_PER_ENTRY * expected)))
        if width != self.sketch.width:
            self.sketch = self.ram.sketch = self.disk.sketch = FrequencySketch(width)

    # ---- what the store does -----------------------------------------------------------------
    def record(self, hashes: Iterable[int]) -> None:
        """Hashes asked for (a lookup): demand counts towards admission, hit or miss."""
        inc = self.sketch.increment
        for h in hashes:
            inc(h)

    def offer(self, block_hash: int, parent: int | None, size: int = 1,
              value: Any = None) -> PutOutcome:
        """A block a worker evicted (counted as one use of it)."""
        entry = Entry(block_hash, parent, size, value)
        if not self._sized:
            self._size_sketch(entry)
        self.sketch.increment(block_hash)
        return self._to_ram(entry, "stored")

    def promote(self, block_hash: int, parent: int | None, size: int = 1,
                value: Any = None) -> PutOutcome:
        """A disk hit that was read: into RAM if admitted (the lookup already counted it)."""
        return self._to_ram(Entry(block_hash, parent, size, value), "promoted")

    def _to_ram(self, entry: Entry, counter: str) -> PutOutcome:
        h = entry.hash
        if self.ram.touch(h):
            self.counts["known"] += 1
            return PutOutcome(KNOWN)
        victims = self.ram.admit(entry)
        if victims is None:
            if self.disk.touch(h):
                self.counts["known"] += 1
                return PutOutcome(KNOWN)
            # Turned away at RAM's door is evicted from RAM too: a reused block goes to disk
            # (without this, a reused working set larger than RAM never reached the disk tier:
            # RAM kept the first reused blocks and refused every equally reused one after)
            out = PutOutcome(REJECTED)
            if self._spill(entry, out) == _KEPT:
                out.status = STORED_DISK
                self.counts["stored_disk"] += 1
            else:
                self.counts["rejected"] += 1
            return out
        self.counts[counter] += 1
        out = PutOutcome(STORED)
        for victim in victims:
            if self._spill(victim, out) not in (_KEPT, _ON_DISK):
                out.dropped += 1
                self.counts["dropped"] += 1
        return out

    def _spill(self, block: Entry, out: PutOutcome) -> str:
        """Put a block leaving RAM on disk if it is worth it; what happened (_KEPT: the
        owner must write it, listed in out.spilled)."""
        disk = self.disk
        if disk.touch(block.hash):
            return _ON_DISK  # already there (a promoted copy): nothing to write
        if disk.capacity <= 0 or self.sketch.estimate(block.hash) < self.spill_min_freq:
            return _COLD
        d = Entry(block.hash, block.parent, self.disk_size(block))
        evict = disk.plan(d)
        if evict is None:
            return _DISK_HOTTER
        if self.spill_gate is not None and not self.spill_gate(block):
            self.counts["spill_refused"] += 1
            return _QUEUE_FULL
        disk.commit(d, evict)
        out.spilled.append(block)
        out.disk_evicted.extend(evict)
        self.counts["spilled"] += 1
        self.counts["disk_evicted"] += len(evict)
        return _KEPT

    def locate(self, hashes: Iterable[int]) -> list[str]:
        """The tier of each block of the leading run of `hashes` held (RAM first)."""
        out: list[str] = []
        ram, disk = self.ram.entries, self.disk.entries
        for h in hashes:
            if h in ram:
                out.append(TIER_RAM)
            elif h in disk:
                out.append(TIER_DISK)
            else:
                break
        return out

    def touch(self, block_hash: int) -> None:
        """A hit: most recently used in whichever tiers hold it."""
        self.ram.touch(block_hash)
        self.disk.touch(block_hash)

    def touch_run(self, hashes: Sequence[int]) -> None:
        """A hit on a run of a prefix's blocks: most recently used, last block first, so the
        run's first block is the most recent of all. A block is only ever onboarded after
        its parents (a lookup serves the leading run), so a tier that dropped the run's head
        first would keep its tail as dead weight; touched in prefix order, LRU did exactly
        that. (Workers hand evicted blocks over tail first for the same reason.)"""
        ram, disk = self.ram.touch, self.disk.touch
        for h in reversed(hashes):
            ram(h)
            disk(h)

    def drop_from_disk(self, block_hash: int) -> Entry | None:
        """A file that could not be written or read back: the disk tier no longer has it."""
        return self.disk.remove(block_hash)

    def load_disk_entry(self, block_hash: int, parent: int | None, size: int) -> list[Entry]:
        """An existing file found at start-up; returns entries evicted to make room (a disk
        tier started with less capacity than last time): the owner deletes their files."""
        if block_hash in self.disk:
            return []
        return self.disk.insert(Entry(block_hash, parent, size))

    def clear_ram(self) -> list[Entry]:
        return self.ram.clear()
