"""Fan-out of an engine's KV event batches to its subscribers (the worker's KV publisher,
tests), each behind its own bounded queue."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from proto.kv import KvEventBatch


class KvEventSubscription:
    """One subscriber's bounded queue of KV event batches (async iterator). When full, the
    oldest batch is dropped: the subscriber sees an event_id gap and asks for a snapshot."""

    def __init__(self, maxsize: int, on_close: Callable[[KvEventSubscription], None]) -> None:
        self._queue: asyncio.Queue[KvEventBatch] = asyncio.Queue(maxsize)
        self._on_close = on_close
        self._closed = False
        self.dropped = 0
        # Set by the consumer: `direct(batch) -> bool` takes a batch when nothing is queued
        # before it (so order holds), without waking the consumer's task; False queues it.
        # The worker's KV feed publishes a step's batch this way, from the step's delivery.
        self.direct: Callable[[KvEventBatch], bool] | None = None

    def put(self, batch: KvEventBatch) -> bool:
        """Hand `batch` over; True when it was queued (the consumer's task wakes for it),
        False when `direct` took it."""
        direct = self.direct
        if direct is not None and self._queue.empty() and not self._closed and direct(batch):
            return False
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(batch)
        return True

    def __aiter__(self) -> KvEventSubscription:
        return self

    async def __anext__(self) -> KvEventBatch:
        if self._closed:
            raise StopAsyncIteration
        return await self._queue.get()

    def get_nowait(self) -> KvEventBatch | None:
        return None if self._queue.empty() else self._queue.get_nowait()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._on_close(self)


class KvEventFanout:
    """An engine's KV event subscribers: every batch published goes to each of them."""

    __slots__ = ("_subs",)

    def __init__(self) -> None:
        self._subs: list[KvEventSubscription] = []

    def subscribe(self, maxsize: int) -> KvEventSubscription:
        sub = KvEventSubscription(maxsize, self._subs.remove)
        self._subs.append(sub)
        return sub

    def publish(self, batch: KvEventBatch) -> bool:
        """Give `batch` to every subscriber; True when some subscriber's task was woken for
        it (it was queued rather than taken directly)."""
        queued = False
        for sub in self._subs:
            queued = sub.put(batch) or queued
        return queued
