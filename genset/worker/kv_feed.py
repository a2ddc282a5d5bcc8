"""A worker's KV event feed: the engine's `KvEventBatch`es on `kv_events(ns, id)` in event_id
order, snapshots for routers that lost track (`KvResyncRequest` on `kv_resync(ns, id)`), and
the evicted blocks handed to the `on_evict` hook.

A resync snapshot (Cleared + Stored for everything held, numbered in sequence) goes through
the same queue as the step batches, so it is published after every batch numbered before
it, and is also returned to the asker, who need not wait for it on the events subject. A
snapshot being taken, or queued and not yet published, answers every resync that arrives
before it goes out (as the offload store's do): a flood of resyncs, which anyone on the bus
can send, costs one snapshot, not one per request.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable

import structlog

import proto
from genset.engines.interface import Engine
from genset.worker.hooks import EvictedBlock
from genset.worker.metrics import WorkerMetrics
from proto import subjects

log = structlog.get_logger("genset.worker")

# Batches an engine may have out before the feed publishes them; a feed that falls further
# behind loses the oldest, and routers heal the event_id gap with a resync.
KV_QUEUE_BATCHES = 4096


class EvictionTracker:
    """Parent hash and token ids of every block the engine holds, kept from its `Stored`
    events, so that a `Removed` event can be reported as `EvictedBlock`s.

    Only kept when a hook wants evictions. Bounded by `max_entries` (the engine's capacity
    plus slack): it mirrors the engine's cache, and only lost batches (a feed that fell
    behind) could make it grow past that; then the oldest entries are forgotten. A block
    it does not know is not reported. `Cleared` outside a snapshot (the engine dropped its
    cache, e.g. new weights) forgets everything without reporting it: that KV is not worth
    writing behind.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max(1, max_entries)
        self._blocks: OrderedDict[int, tuple[int | None, bytes | None]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def apply(self, batch: proto.KvEventBatch, snapshot: bool = False) -> list[EvictedBlock]:
        """Follow one batch; returns the blocks it evicted that were known."""
        blocks = self._blocks
        evicted: list[EvictedBlock] = []
        for event in batch.events:
            if isinstance(event, proto.Stored):
                parent = event.parent_hash
                for block in event.blocks:
                    blocks[block.hash] = (parent, block.token_ids)
                    parent = block.hash
                while len(blocks) > self.max_entries:
                    blocks.popitem(last=False)
            elif isinstance(event, proto.Removed):
                if snapshot:
                    continue
                for h in event.hashes:
                    known = blocks.pop(h, None)
                    if known is not None:
                        evicted.append(EvictedBlock(hash=h, parent_hash=known[0],
                                                    token_ids=known[1]))
            else:  # Cleared: a snapshot restates everything next; otherwise all is gone
                blocks.clear()
        return evicted


class KvFeed:
    """Publishes the engine's KV event batches and answers resync requests."""

    def __init__(self, engine: Engine, *, bus, namespace: str, instance_id: int,
                 metrics: WorkerMetrics, changed: asyncio.Event,
                 on_evict: Callable[[list[EvictedBlock]], None] | None = None) -> None:
        self.engine = engine
        self.bus = bus
        self.instance_id = instance_id
        self.m = metrics
        self.changed = changed  # set after each batch: the load report may have moved too
        self.events_subject = subjects.kv_events(namespace, instance_id)
        self.resync_subject = subjects.kv_resync(namespace, instance_id)
        self.on_evict = on_evict
        self.tracker: EvictionTracker | None = None
        self._snapshot_ids: set[int] = set()  # event_ids of snapshots queued, not yet seen
        self._sub = None
        # The last snapshot queued for a resync and the event_id of the last batch taken off
        # the queue (published or not); a snapshot being taken. A snapshot whose event_id is
        # above `_taken` has not gone out yet and answers every resync (`_resync_snapshot`).
        self._queued_snapshot: proto.KvEventBatch | None = None
        self._taken = 0
        self._taking: asyncio.Task | None = None

    def start(self) -> asyncio.Task:
        """Subscribe to the engine's batches (from now on) and start publishing them; the
        caller owns the returned task."""
        if self.on_evict is not None:
            self.tracker = EvictionTracker(self.engine.card.kv_blocks + 1024)
        self._sub = self.engine.kv_events(maxsize=KV_QUEUE_BATCHES)
        if getattr(self.bus, "publish_nowait", None) is not None:
            self._sub.direct = self._publish_direct
        return asyncio.create_task(self._publish(), name="kv-events")

    def close(self) -> None:
        if self._sub is not None:
            self._sub.close()

    async def _publish(self) -> None:
        """One task publishes every batch, so batches leave in event_id order."""
        async for batch in self._sub:
            self._taken = max(self._taken, batch.event_id)
            try:
                await self.bus.publish(self.events_subject, batch)
                self.m.kv_batches.inc()
            except Exception as exc:  # NATS away: the router heals the gap by resync
                log.warning("KV event batch not published", event_id=batch.event_id,
                            error=repr(exc))
            self.changed.set()
            if self.tracker is not None:
                self._track(batch)

    def _publish_direct(self, batch: proto.KvEventBatch) -> bool:
        """A batch published from the engine's step delivery (`KvEventSubscription.direct`):
        queued on the connection at once, so it leaves in the step's one write with its token
        frames, without waking this feed's task. False (connection not ready, encoding
        failed): the batch goes through the queue and the task, as before."""
        try:
            if not self.bus.publish_nowait(self.events_subject, batch):
                return False
        except Exception:  # the task's path reports it
            return False
        self._taken = max(self._taken, batch.event_id)
        self.m.kv_batches.inc()
        self.changed.set()
        if self.tracker is not None:
            self._track(batch)
        return True

    def _track(self, batch: proto.KvEventBatch) -> None:
        snapshot = batch.event_id in self._snapshot_ids
        self._snapshot_ids.discard(batch.event_id)
        evicted = self.tracker.apply(batch, snapshot)
        if not evicted:
            return
        try:
            self.on_evict(evicted)
        except Exception as exc:  # a hook's fault: the feed goes on
            self.m.hook_errors.labels("on_evict").inc()
            log.warning("on_evict hook failed", blocks=len(evicted), error=repr(exc))

    async def on_resync(self, data: bytes):
        try:
            req = proto.decode(data, proto.KvResyncRequest)
        except proto.ProtocolError:
            self.m.bad_messages.labels("kv_resync").inc()
            raise  # the bus answers with a bad_request error naming the field
        if req.worker_id != self.instance_id:
            raise proto.ProtocolError(
                f"KvResyncRequest.worker_id {req.worker_id:x} is not this worker "
                f"({self.instance_id:x})")
        snapshot, reused = await self._resync_snapshot()
        self.m.kv_resyncs.inc()
        if not reused:
            log.info("KV snapshot sent", reason=req.reason, event_id=snapshot.event_id,
                     blocks=len(snapshot.events) - 1)
        return snapshot

    async def _resync_snapshot(self) -> tuple[proto.KvEventBatch, bool]:
        """The snapshot that answers a resync, and whether it is one an earlier resync got.

        A snapshot queued but not taken off the queue yet, or still being taken, is reused:
        the asker has not missed it (nothing numbered after it has gone out; the queue keeps
        event_id order) and gets every batch after it in order, exactly as with a fresh one.
        A flood of resyncs then costs one snapshot's memory and engine time, not one per
        request (each is Cleared + Stored for every block held, taken on the engine's
        stepping side)."""
        snap = self._queued_snapshot
        if snap is not None and self._taken < snap.event_id:
            return snap, True
        task = self._taking
        if task is not None:
            return await asyncio.shield(task), True
        task = self._taking = asyncio.create_task(self._take_snapshot(), name="kv-snapshot")
        # shielded: a resync given up (its handler cancelled) must not cancel the snapshot
        # the others wait for
        return await asyncio.shield(task), False

    async def _take_snapshot(self) -> proto.KvEventBatch:
        try:
            snapshot = await self.engine.kv_snapshot()
            snapshot.worker_id = self.instance_id
            if self.tracker is not None:
                if len(self._snapshot_ids) > 64:  # snapshots the queue dropped: never seen
                    self._snapshot_ids.clear()
                self._snapshot_ids.add(snapshot.event_id)
            self._queued_snapshot = snapshot
            # Through the same queue as step batches: it follows every batch numbered before
            # it (or goes out at once, directly, when nothing is queued).
            self._sub.put(snapshot)
            return snapshot
        finally:
            self._taking = None
