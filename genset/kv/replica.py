"""The set of block hashes one worker holds, rebuilt from its KV events alone.

What a router keeps per worker (and what tests compare against the engine's own pool).
Batches must be applied in `event_id` order; a jump means batches were lost, and the replica
refuses to guess: `apply` returns False and the owner asks the worker for a snapshot
(`BlockPool.snapshot_batch`, a `Cleared` + `Stored` batch), which `apply` accepts at any id.
"""

from __future__ import annotations

from collections.abc import Iterable

from proto.kv import Cleared, KvEvent, KvEventBatch, Removed, Stored


class HashSetReplica:
    __slots__ = ("hashes", "last_event_id")

    def __init__(self) -> None:
        self.hashes: set[int] = set()
        self.last_event_id = 0

    def apply(self, batch: KvEventBatch) -> bool:
        """Apply one batch. False (nothing applied) when `batch` is not the next one and does
        not start with `Cleared`, i.e. the replica is out of step and needs a snapshot."""
        starts_clean = bool(batch.events) and isinstance(batch.events[0], Cleared)
        if batch.event_id != self.last_event_id + 1 and not starts_clean:
            if batch.event_id <= self.last_event_id:
                return True  # a duplicate of something already applied
            return False
        self.apply_events(batch.events)
        self.last_event_id = batch.event_id
        return True

    def apply_events(self, events: Iterable[KvEvent]) -> None:
        hashes = self.hashes
        for ev in events:
            if isinstance(ev, Stored):
                hashes.update(b.hash for b in ev.blocks)
            elif isinstance(ev, Removed):
                hashes.difference_update(ev.hashes)
            elif isinstance(ev, Cleared):
                hashes.clear()

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self.hashes

    def __len__(self) -> int:
        return len(self.hashes)
