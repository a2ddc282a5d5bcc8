"""The values that cross the engine interface: requests, step outputs, KV blocks, the card.

Plain data (no behaviour), shared by every engine, the driver, the worker and the offline
replay; importing it pulls in nothing but `proto`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proto.generate import SamplingParams, StopConditions

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"
FINISH_ERROR = "error"


@dataclass(slots=True)
class KvBlockData:
    """One KV block travelling between engines: its chained hash and an engine-specific
    payload (the torch engine: its K/V tensors for the block; the mocker: None)."""

    hash: int
    data: Any = None


@dataclass(slots=True)
class KvImport:
    """KV blocks to load before a request starts (a remote prefill, an offload hit): a chain
    of full blocks in prefix order; `parent_hash` is the block before the first (None when
    they start the sequence)."""

    blocks: list[KvBlockData]
    parent_hash: int | None = None


@dataclass(slots=True)
class EngineRequest:
    request_id: str
    token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: StopConditions = field(default_factory=StopConditions)
    kv_import: KvImport | None = None


@dataclass(slots=True)
class EngineOutput:
    """What one step produced for one request.

    `token_ids`: new tokens since the previous output (one per step; several when the
    consumer lagged and outputs were coalesced). `finish_reason` is set on the last output:
    stop | length | cancelled | error. `cached_tokens` (prompt tokens served from the
    prefix cache) is known from the first output on.
    """

    request_id: str
    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass(slots=True)
class EngineCard:
    """What an engine can do; the worker copies it into `proto.discovery.ModelCard`."""

    engine: str  # torch | mocker | trtllm
    block_size: int
    kv_blocks: int
    max_batch_tokens: int
    max_running: int
    context_length: int
    eos_token_ids: list[int] = field(default_factory=list)
    vocab_size: int = 0


class EngineOverloaded(RuntimeError):
    """Too many requests in flight on this engine."""


@dataclass(slots=True, frozen=True)
class EvictedBlock:
    """A full block the engine dropped from its prefix cache, handed over with its KV before
    the engine reused its memory (`Engine.hand_over_evictions`; the worker's `on_evict`)."""

    hash: int  # chained block hash (genset.kv.hashing)
    parent_hash: int | None  # the block before it in its sequence; None for a first block
    token_ids: bytes | None  # packed int32 LE; None when the engine did not keep them
    # The engine's payload (torch: `kvformat` bytes; mocker: a small placeholder naming the
    # modelled size, see `genset.engines.mocker.mock_payload`); None when not read.
    data: bytes | None = None
