"""The engine interface every worker hosts, in two layers.

- `EngineCore` (a protocol, synchronous, single-threaded): advances one step at a time.
  `genset.engines.core.SchedulingCore` (the shared scheduler over an executor) implements
  it for the torch engine and the mocker; offline simulations (`genset replay`) drive a core
  directly, in simulated time.
- `Engine` (an ABC, asyncio): what a worker uses. `genset.engines.driver.AsyncEngineDriver`
  turns a core into an `Engine`; the TensorRT-LLM adapter implements it directly.

Using an engine::

    engine = TorchEngine("tiny", worker_id=7)      # any Engine
    await engine.start()
    stream = await engine.submit(EngineRequest("r1", token_ids, SamplingParams(), StopConditions()))
    async for out in stream:          # one EngineOutput per step that produced tokens
        send(out.token_ids)
        if out.finish_reason: ...     # the last one; usage in prompt/cached/completion_tokens
    async for batch in engine.kv_events():  # proto.kv.KvEventBatch, event_id +1 per batch
        publish(batch)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Protocol

from genset.engines.types import (
    EngineCard,
    EngineOutput,
    EngineRequest,
    EvictedBlock,
    KvBlockData,
    KvImport,
)
from proto.kv import KvEventBatch, LoadReport

if TYPE_CHECKING:
    from genset.engines.driver import RequestStream


class EngineCore(Protocol):
    """A synchronous engine. All methods are called from one thread, never concurrently."""

    card: EngineCard

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request (importing `request.kv_import` first); ValueError if invalid."""

    def abort_request(self, request_id: str) -> None: ...

    def has_work(self) -> bool: ...

    def step(self) -> tuple[list[EngineOutput], float]:
        """Run one step: its outputs and its duration in ms (measured, or modelled)."""

    def take_kv_batch(self, ts_ms: int) -> KvEventBatch | None: ...

    def has_kv_pending(self) -> bool:
        """Whether `take_kv_batch` would return a batch (lets a driver skip the call)."""

    def kv_snapshot(self, ts_ms: int) -> KvEventBatch: ...

    def export_kv(self, hashes: list[int]) -> list[KvBlockData]: ...

    def import_kv(self, kv: KvImport, pin_for: str | None = None) -> int:
        """Load blocks into the prefix cache; returns how many of them (from the first) are
        now cached."""

    def pin_kv(self, key: str, hashes: list[int]) -> int:
        """Hold the leading cached run of `hashes` under `key`; returns how many."""

    def unpin_kv(self, key: str) -> None: ...

    def cached_blocks(self, hashes: list[int]) -> int:
        """How many leading blocks of `hashes` are in the prefix cache."""

    def load_report(self, ts_ms: int, step_ms_ewma: float) -> LoadReport: ...


class Engine(ABC):
    """The asyncio-facing engine interface (DESIGN section 4)."""

    @property
    @abstractmethod
    def card(self) -> EngineCard: ...

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Start stepping (idempotent)."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Stop stepping; unfinished requests end with finish_reason "cancelled"."""

    @abstractmethod
    async def submit(self, request: EngineRequest) -> RequestStream:
        """Queue a request; raises ValueError for an invalid one (empty, too long, duplicate
        id). Iterate the returned stream for outputs."""

    @abstractmethod
    async def abort(self, request_id: str) -> None:
        """End a request: its stream gets a final "cancelled" output now; the engine frees its
        blocks at the next step. Unknown ids are ignored."""

    @abstractmethod
    async def export_kv(self, hashes: list[int]) -> list[KvBlockData]:
        """The leading run of `hashes` this engine holds, with payloads."""

    @abstractmethod
    async def import_kv(self, kv: KvImport, pin_for: str | None = None) -> int:
        """Load blocks into the prefix cache; returns how many are cached. With `pin_for`,
        they are held under that key until a request submitted with
        `KvImport(pinned_as=key)` (or with that request id) is admitted, or `unpin_kv(key)`."""

    # Disaggregation (genset.disagg): engines whose card has a `kv_layout` implement these.

    async def pin_kv(self, key: str, hashes: list[int]) -> int:
        """Hold the leading run of `hashes` cached here under `key` (nothing may evict them)
        until `unpin_kv(key)`; returns how many blocks are held."""
        raise NotImplementedError(f"the {self.card.engine} engine cannot pin KV blocks")

    async def unpin_kv(self, key: str) -> None:
        """Release what is held under `key` (a no-op when nothing is)."""
        raise NotImplementedError(f"the {self.card.engine} engine cannot pin KV blocks")

    async def cached_blocks(self, hashes: list[int]) -> int:
        """How many leading blocks of `hashes` are in this engine's prefix cache."""
        return 0

    @abstractmethod
    def load(self) -> LoadReport:
        """The latest load report (cheap; refreshed after every step)."""

    @abstractmethod
    def kv_events(self, maxsize: int = 1024) -> AsyncIterator[KvEventBatch]:
        """A new subscription to this engine's KV event batches, from the call on (bounded;
        `close()` it when done)."""

    @abstractmethod
    async def kv_snapshot(self) -> KvEventBatch:
        """A resync batch (Cleared + Stored for everything held), numbered in sequence."""

    # ---- optional: KV offload (an engine without them simply has no offload) ---------------

    def cached_prefix(self, hashes: list[int]) -> int:
        """How many of `hashes`, from the first, this engine holds now (a cheap hint, no
        wait for a step; 0 when the engine cannot tell)."""
        return 0

    def import_room(self) -> int | None:
        """How many blocks an optional import (`KvImport.optional`) submitted now could take
        (a cheap hint, no wait for a step); None when the engine cannot tell."""
        return None

    def hold_onboarded(self, max_bytes: int) -> bool:
        """From now on keep up to `max_bytes` of host memory for an optional import's blocks
        beyond `import_room`, written at their request's admission instead of dropped
        (`genset.engines.scheduler.Scheduler.hold_kv`). False when this engine cannot."""
        return False

    def hold_room_bytes(self) -> int | None:
        """Bytes of held blocks the engine could take now (a hint); None when it holds none."""
        return None

    def hand_over_evictions(self, sink: Callable[[list[EvictedBlock]], None], *,
                            max_bytes: int = 64 << 20, with_tokens: bool = True) -> bool:
        """From now on, call `sink` on the event loop with the blocks this engine evicts from
        its prefix cache, each with its KV payload read before its memory was reused; at most
        `max_bytes` of payloads wait for the loop (more are dropped, never waited for).
        Returns False when this engine cannot (then nothing is ever called)."""
        return False
