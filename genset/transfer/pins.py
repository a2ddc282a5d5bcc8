"""Blocks a sending worker holds for transfers in flight, each set under a deadline.

The peers' most reported disaggregation bug is KV blocks stuck forever after a transfer went
wrong (a cancel mid-transfer, a receiver that died and never acked). Here every pin has a
deadline: the owner releases it when the receiver acks (or the send fails), and whatever is
still pinned when its deadline passes comes back from `expire(now)`, so the owner can unpin
it in its engine. Pure bookkeeping: no I/O, the clock is the caller's (`now` in any unit, as
long as deadlines use the same one).

Usage (the worker, phase 2)::

    pins.pin(transfer_id, block_ids, deadline=now + 30.0)
    ...
    freed = pins.release(transfer_id)        # on ack / failure: unpin `freed` in the engine
    for entry in pins.expire(now):           # periodically (pins.next_deadline() says when)
        engine_unpin(entry.transfer_id, entry.blocks)
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Sequence
from dataclasses import dataclass


class PinTableFull(RuntimeError):
    """No room for another pin (too many transfers or blocks pinned at once)."""


@dataclass(frozen=True, slots=True)
class PinEntry:
    transfer_id: str
    blocks: tuple[Hashable, ...]
    deadline: float


class PinTable:
    """transfer id -> (blocks, deadline). Bounded: at most `max_transfers` pins and
    `max_blocks` blocks in all (`pin` raises PinTableFull beyond, so a flood of remote
    prefills cannot pin the whole cache)."""

    __slots__ = ("_entries", "_heap", "max_blocks", "max_transfers", "num_blocks")

    def __init__(self, *, max_transfers: int = 4096, max_blocks: int = 1 << 20) -> None:
        if max_transfers < 1 or max_blocks < 1:
            raise ValueError("max_transfers and max_blocks must be >= 1")
        self.max_transfers = max_transfers
        self.max_blocks = max_blocks
        self._entries: dict[str, PinEntry] = {}
        # (deadline, transfer id); entries released or re-pinned stay until popped (checked
        # against _entries), so the heap never holds more than 2x the live pins: see _compact
        self._heap: list[tuple[float, str]] = []
        self.num_blocks = 0

    def pin(self, transfer_id: str, blocks: Sequence[Hashable], deadline: float) -> None:
        """Hold `blocks` for `transfer_id` until released or `deadline`."""
        if transfer_id in self._entries:
            raise ValueError(f"transfer {transfer_id!r} already holds pins")
        if len(self._entries) >= self.max_transfers:
            raise PinTableFull(f"{len(self._entries)} transfers already hold pins")
        if self.num_blocks + len(blocks) > self.max_blocks:
            raise PinTableFull(
                f"pinning {len(blocks)} more blocks would exceed {self.max_blocks} "
                f"({self.num_blocks} pinned)"
            )
        entry = PinEntry(transfer_id, tuple(blocks), deadline)
        self._entries[transfer_id] = entry
        self.num_blocks += len(entry.blocks)
        heapq.heappush(self._heap, (deadline, transfer_id))
        self._compact()

    def extend(self, transfer_id: str, deadline: float) -> bool:
        """Move a pin's deadline (e.g. the receiver reported progress); False if unknown."""
        entry = self._entries.get(transfer_id)
        if entry is None:
            return False
        self._entries[transfer_id] = PinEntry(transfer_id, entry.blocks, deadline)
        heapq.heappush(self._heap, (deadline, transfer_id))
        self._compact()
        return True

    def release(self, transfer_id: str) -> tuple[Hashable, ...]:
        """Drop a pin; its blocks (empty if unknown or already expired: releasing twice is
        harmless, so an ack arriving after the deadline changes nothing)."""
        entry = self._entries.pop(transfer_id, None)
        if entry is None:
            return ()
        self.num_blocks -= len(entry.blocks)
        return entry.blocks

    def expire(self, now: float) -> list[PinEntry]:
        """Drop every pin whose deadline is <= now; returns them, earliest first."""
        out: list[PinEntry] = []
        heap = self._heap
        entries = self._entries
        while heap and heap[0][0] <= now:
            deadline, tid = heapq.heappop(heap)
            entry = entries.get(tid)
            if entry is None or entry.deadline != deadline:
                continue  # released, or re-pinned with another deadline
            del entries[tid]
            self.num_blocks -= len(entry.blocks)
            out.append(entry)
        return out

    def next_deadline(self) -> float | None:
        """The earliest live deadline (when to call `expire` next); None when nothing is
        pinned."""
        heap = self._heap
        entries = self._entries
        while heap:
            deadline, tid = heap[0]
            entry = entries.get(tid)
            if entry is not None and entry.deadline == deadline:
                return deadline
            heapq.heappop(heap)
        return None

    def _compact(self) -> None:
        if len(self._heap) > 2 * len(self._entries) + 64:
            self._heap = [(e.deadline, e.transfer_id) for e in self._entries.values()]
            heapq.heapify(self._heap)

    def get(self, transfer_id: str) -> PinEntry | None:
        return self._entries.get(transfer_id)

    def __contains__(self, transfer_id: object) -> bool:
        return transfer_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)
