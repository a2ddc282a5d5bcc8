"""KV-cache events and load reports that workers publish for the router."""

from __future__ import annotations

import msgspec

from proto.base import Message

TIER_DEVICE = "device"  # engine memory (GPU, or CPU for the torch engine here)
TIER_HOST = "host"  # offload store, RAM
TIER_DISK = "disk"  # offload store, disk


class StoredBlock(msgspec.Struct, kw_only=True, array_like=False):
    hash: int  # chained block hash (genset.kv.hashing), unsigned 64-bit
    token_ids: bytes | None = None  # packed int32 LE; optional


class Stored(msgspec.Struct, tag="stored", tag_field="type", kw_only=True):
    """Full blocks newly held, in prefix order; `parent_hash` is the block before the first
    one (None at the start of a sequence)."""

    parent_hash: int | None = None
    blocks: list[StoredBlock] = msgspec.field(default_factory=list)


class Removed(msgspec.Struct, tag="removed", tag_field="type", kw_only=True):
    hashes: list[int] = msgspec.field(default_factory=list)


class Cleared(msgspec.Struct, tag="cleared", tag_field="type", kw_only=True):
    """Everything this worker held (in this tier) is gone."""


KvEvent = Stored | Removed | Cleared


class KvEventBatch(Message, kw_only=True):
    """Events of one worker; `event_id` increases by exactly one per batch, per worker and
    tier, so a consumer that sees a jump knows it missed batches and must resync."""

    worker_id: int
    event_id: int
    events: list[KvEvent] = msgspec.field(default_factory=list)
    tier: str = TIER_DEVICE
    ts_ms: int = 0


class KvResyncRequest(Message, kw_only=True):
    """Asks a worker to publish a fresh snapshot of its KV state (a Cleared followed by Stored
    events for everything it holds) because the asker missed events."""

    worker_id: int
    reason: str = "gap"


class LoadReport(Message, kw_only=True):
    """A worker's own view of its load, published every ~100-500 ms and on big changes."""

    worker_id: int
    ts_ms: int
    running: int = 0  # sequences being decoded or prefilled
    waiting: int = 0  # sequences queued, not yet scheduled
    waiting_prefill_tokens: int = 0  # uncached prompt tokens not yet computed
    kv_used_blocks: int = 0
    kv_total_blocks: int = 0
    step_ms_ewma: float = 0.0
    # What onboarding a block from the KV offload store costs this worker, as measured (0 =
    # not measured yet): the KV payload bytes per token its onboarded blocks carried, the
    # rate its lookups fetched them at (bytes over the lookup's time, RAM tier), the store's
    # disk read rate, and its prefill ms per token (recomputing instead). The router prices
    # this worker's store runs with them (genset.routing.policies.PredictedTTFT).
    kv_bytes_per_token: float = 0.0
    onboard_ram_gbps: float = 0.0
    onboard_disk_gbps: float = 0.0
    prefill_ms_per_token: float = 0.0
