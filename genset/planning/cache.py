"""Which cached KV blocks each worker holds that no other worker does.

Removing a worker loses the blocks only it held: the next requests for those prefixes pay a
full prefill. The planner drains the worker whose loss costs least, so it keeps a hash set
per worker from the workers' KV events (device tier only). Exactness is not needed here:
batches are applied even across event-id gaps (a missed batch skews one worker's count until
its next snapshot), and each set is capped so a misbehaving publisher cannot grow memory
without bound.
"""

from __future__ import annotations

from collections import Counter

from proto.kv import TIER_DEVICE, Cleared, KvEventBatch, Removed, Stored


class CacheTracker:
    def __init__(self, max_blocks_per_worker: int = 1 << 20) -> None:
        self.max_blocks = max_blocks_per_worker
        self.sets: dict[int, set[int]] = {}

    def apply(self, batch: KvEventBatch, capacity: int = 0) -> None:
        """`capacity`: the worker's KV blocks when its card says (its device tier holds no
        more; a publisher claiming more is held to it), else the tracker's own cap."""
        if batch.tier != TIER_DEVICE:
            return
        cap = min(self.max_blocks, capacity) if capacity > 0 else self.max_blocks
        held = self.sets.setdefault(batch.worker_id, set())
        for ev in batch.events:
            if isinstance(ev, Stored):
                room = cap - len(held)
                if room > 0:
                    held.update(b.hash for b in ev.blocks[:room])
            elif isinstance(ev, Removed):
                held.difference_update(ev.hashes)
            elif isinstance(ev, Cleared):
                held.clear()

    def remove_worker(self, worker_id: int) -> None:
        self.sets.pop(worker_id, None)

    def held(self, worker_id: int) -> int:
        return len(self.sets.get(worker_id, ()))

    def unique_counts(self, worker_ids) -> dict[int, int]:
        """Blocks each of `worker_ids` holds that no other tracked worker holds (one pass
        over every set: run when choosing whom to drain, not per message)."""
        counts: Counter[int] = Counter()
        for held in self.sets.values():
            counts.update(held)
        return {w: sum(1 for h in self.sets.get(w, ()) if counts[h] == 1) for w in worker_ids}
