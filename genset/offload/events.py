"""One storage tier's KV event log: what it gained and lost, as numbered `KvEventBatch`es.

The store keeps one log per tier (RAM = `host`, `disk`); each has its own `event_id`
sequence, as consumers track gaps per (instance, tier). Like the block pool's log,
consecutive stores continuing one chain merge into one `Stored` and consecutive removals into
one `Removed`, so a put of a 32-block chain is one event.

Everything here is bounded: a batch carries at most `max_blocks` block entries (hashes in
`Stored` and `Removed`), so it fits a NATS message (~15 bytes per hash: 8192 per batch is
about 120 KB), and a long chain is split into `Stored` events that continue each other. If
more than `max_pending` entries pile up unpublished (NATS away), the log forgets them and its
next batches are a full snapshot instead (Cleared + Stored for everything the tier holds):
the same state in bounded memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from proto.kv import Cleared, KvEvent, KvEventBatch, Removed, Stored, StoredBlock

# (hash, parent_hash) of every block a tier holds, for snapshots.
SnapshotSource = Callable[[], Iterable[tuple[int, int | None]]]


class TierLog:
    def __init__(self, tier: str, snapshot_source: SnapshotSource, *, max_blocks: int = 8192,
                 max_pending: int = 1 << 20) -> None:
        if max_blocks <= 0 or max_pending <= 0:
            raise ValueError(f"need max_blocks > 0 and max_pending > 0, got {max_blocks}, "
                             f"{max_pending}")
        self.tier = tier
        self.max_blocks = max_blocks
        self.max_pending = max_pending
        self._source = snapshot_source
        self._pending: list[KvEvent] = []
        self._pending_items = 0
        self._open_store: Stored | None = None
        self._open_tail: int | None = None
        self._needs_snapshot = False
        self.event_id = 0  # id of the last batch handed out
        self.overflows = 0  # times pending events were replaced by a snapshot

    @property
    def pending(self) -> bool:
        return bool(self._pending) or self._needs_snapshot

    # ---- recording ------------------------------------------------------------------------------
    def stored(self, block_hash: int, parent_hash: int | None) -> None:
        if self._needs_snapshot:
            return  # the coming snapshot includes it
        store = self._open_store
        if store is None or self._open_tail != parent_hash:
            store = self._open_store = Stored(parent_hash=parent_hash, blocks=[])
            self._pending.append(store)
        store.blocks.append(StoredBlock(hash=block_hash))
        self._open_tail = block_hash
        self._count()

    def removed(self, block_hash: int) -> None:
        if self._needs_snapshot:
            return
        last = self._pending[-1] if self._pending else None
        if isinstance(last, Removed):
            last.hashes.append(block_hash)
        else:
            self._open_store = None
            self._pending.append(Removed(hashes=[block_hash]))
        self._count()

    def cleared(self) -> None:
        """Everything the tier held is gone: earlier pending events no longer matter."""
        self._needs_snapshot = False
        self._pending = [Cleared()]
        self._pending_items = 0
        self._open_store = None

    def _count(self) -> None:
        self._pending_items += 1
        if self._pending_items > self.max_pending:
            self._pending = []
            self._pending_items = 0
            self._open_store = None
            self._needs_snapshot = True
            self.overflows += 1

    # ---- batches --------------------------------------------------------------------------------
    def take_batches(self, worker_id: int, ts_ms: int = 0) -> list[KvEventBatch]:
        """Pending events as numbered batches of at most `max_blocks` entries each (none when
        nothing happened)."""
        if self._needs_snapshot:
            self._needs_snapshot = False
            self._pending = self._snapshot_events()
        events, self._pending = self._pending, []
        self._pending_items = 0
        self._open_store = None
        return self._number(_split(events, self.max_blocks), worker_id, ts_ms)

    def snapshot_batches(self, worker_id: int, ts_ms: int = 0) -> list[KvEventBatch]:
        """A numbered snapshot (the first batch starts with Cleared); pending events are folded
        in, as the snapshot covers them, so the id sequence stays gap-free."""
        self._needs_snapshot = False
        self._pending = []
        self._pending_items = 0
        self._open_store = None
        return self._number(_split(self._snapshot_events(), self.max_blocks), worker_id, ts_ms)

    def _snapshot_events(self) -> list[KvEvent]:
        events: list[KvEvent] = [Cleared()]
        store: Stored | None = None
        tail: int | None = None
        for h, parent in self._source():
            if store is None or tail != parent:
                store = Stored(parent_hash=parent, blocks=[])
                events.append(store)
            store.blocks.append(StoredBlock(hash=h))
            tail = h
        return events

    def _number(self, groups: list[list[KvEvent]], worker_id: int,
                ts_ms: int) -> list[KvEventBatch]:
        out = []
        for events in groups:
            self.event_id += 1
            out.append(KvEventBatch(worker_id=worker_id, event_id=self.event_id, events=events,
                                    tier=self.tier, ts_ms=ts_ms))
        return out


def _size(ev: KvEvent) -> int:
    if isinstance(ev, Stored):
        return len(ev.blocks)
    if isinstance(ev, Removed):
        return len(ev.hashes)
    return 1


def _split(events: list[KvEvent], max_blocks: int) -> list[list[KvEvent]]:
    """Events in groups of at most `max_blocks` entries, in order; a long Stored or Removed is
    cut into pieces (a Stored piece continues the chain: its parent is the previous piece's
    last hash)."""
    groups: list[list[KvEvent]] = []
    cur: list[KvEvent] = []
    room = max_blocks
    for ev in events:
        while True:
            n = _size(ev)
            if n <= room:
                cur.append(ev)
                room -= n
                break
            if room == 0 or isinstance(ev, Cleared):
                groups.append(cur)
                cur, room = [], max_blocks
                continue
            head: KvEvent
            if isinstance(ev, Stored):
                head = Stored(parent_hash=ev.parent_hash, blocks=ev.blocks[:room])
                ev = Stored(parent_hash=ev.blocks[room - 1].hash, blocks=ev.blocks[room:])
            else:
                assert isinstance(ev, Removed)
                head = Removed(hashes=ev.hashes[:room])
                ev = Removed(hashes=ev.hashes[room:])
            cur.append(head)
            groups.append(cur)
            cur, room = [], max_blocks
    if cur:
        groups.append(cur)
    return groups
