"""The values that cross the engine interface: requests, step outputs, KV blocks, the card.

Plain data (no behaviour), shared by every engine, the driver, the worker and the offline
replay; importing it pulls in nothing but `proto`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from proto.generate import SamplingParams, StopConditions
from proto.transfer import KvLayout
from proto.values import FINISH_CANCELLED, FINISH_ERROR, FINISH_LENGTH, FINISH_STOP

# The finish reasons are the wire's (proto.values): re-exported for the engines.
__all__ = ["FINISH_CANCELLED", "FINISH_ERROR", "FINISH_LENGTH", "FINISH_STOP"]


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
    # Disaggregation imports a transfer block run by block run as it arrives (pipelined), each
    # run pinned under this key (`Engine.import_kv(kv, pin_for=key)`): a request submitted
    # with `KvImport(blocks=[], pinned_as=key)` takes those pins over instead of importing.
    pinned_as: str | None = None
    # The prompt's last partial block (its `tail_tokens` tokens after the last full block),
    # computed by the engine that prefilled the prompt: with it a resumed request's first
    # step computes only its first token (a decode step) instead of that block again.
    # Never cached by hash (it is not a full block); used only when every full block of the
    # prompt is cached at admission, else the prompt's rest is computed as before. `tail`:
    # the block's payload as `Engine.export`ed (`EngineOutput.kv_tail`), None for an engine
    # whose blocks carry none (the mocker).
    tail_tokens: int = 0
    tail: Any = None
    # The tokens of the sequence the chain belongs to, where the importer knows them (an
    # offload hit's or a remote prefill's prompt): `blocks[i]` holds the block_size tokens
    # from position (first_block + i) x block_size. The engine keeps each imported block's
    # tokens as it keeps a computed block's, so when it evicts the block again the offload
    # store gets them and checks the hash (else the put counts as unverified). The importer
    # vouches that the blocks' hashes are these tokens' (it hashed the prompt to ask for
    # them; a transfer's hashes are checked against that chain); nothing re-hashes them.
    # None: not known (the block is kept without tokens, as before).
    token_ids: Sequence[int] | None = None
    first_block: int = 0
    # The importer can do without the blocks (an offload hit: the store keeps them, the
    # engine computes what it does not import). The engine then imports at most what fits
    # beside the requests queued ahead (`Scheduler.import_room`) and drops the rest: blocks
    # beyond it would be reclaimed for those requests, and evicted, before this one runs.
    # False (a transfer's KV, which exists nowhere else): import all that the pool takes.
    optional: bool = False


@dataclass(slots=True)
class EngineRequest:
    request_id: str
    token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: StopConditions = field(default_factory=StopConditions)
    kv_import: KvImport | None = None
    # A request being timed (genset.runtime.timeline): an engine that can fills in
    # `w_first_step` (unix s when the step that computed the first token started) and
    # `w_step_ms` (that step's duration). None: not timed, nothing is looked at.
    trace: dict[str, float] | None = None
    # Tokens already generated for this request elsewhere (a remote prefill's first token):
    # the engine continues after them as if it had produced them itself (they count as
    # output: sampling index, penalties, min/max_tokens), so a seeded or greedy request goes on
    # exactly as on one engine. The engine emits only the tokens after them.
    resume_token_ids: list[int] = field(default_factory=list)
    # Hand out the prompt's last partial block when the request finishes
    # (`EngineOutput.kv_tail`): a prefill worker's remote prefill, whose decode worker then
    # need not compute it again (`KvImport.tail`).
    export_tail: bool = False


@dataclass(slots=True)
class Logprobs:
    """Log-probabilities of consecutive output tokens, one entry per token: the chosen
    token's, and the k most likely tokens' ids and log-probabilities (most likely first).
    Values are log_softmax of the model's raw logits (see `genset.engines.torch.sampling`)."""

    logprobs: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]

    def extend(self, other: Logprobs) -> None:
        self.logprobs.extend(other.logprobs)
        self.top_ids.extend(other.top_ids)
        self.top_logprobs.extend(other.top_logprobs)


@dataclass(slots=True)
class EngineOutput:
    """What one step produced for one request.

    `token_ids`: new tokens since the previous output (one per step; several when the
    consumer lagged and outputs were coalesced). `finish_reason` is set on the last output:
    stop | length | cancelled | error. `cached_tokens` (prompt tokens served from the
    prefix cache) is known from the first output on. `logprobs`: one entry per token of
    `token_ids`, only for requests with `sampling.logprobs` set.
    """

    request_id: str
    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    logprobs: Logprobs | None = None
    # On the last output of an `export_tail` request: (tokens, payload) of its prompt's last
    # partial block (payload: what `read_kv` gives, placeholder bytes for the mocker); None
    # when the prompt ends on a block boundary
    kv_tail: tuple[int, Any] | None = None


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
    supports_logprobs: bool = False  # False: requests with sampling.logprobs are refused
    # What its exported block payloads hold (disaggregation refuses a peer whose layout
    # differs before any byte moves); None: the engine cannot export or import KV by hash.
    kv_layout: KvLayout | None = None


class EngineOverloaded(RuntimeError):
    """Too many requests in flight on this engine."""


class KvBlockRefused(ValueError):
    """An imported KV block the engine refuses for its values (a NaN, an infinity, or a
    magnitude its model cannot compute), naming the block: `block_index` in the import's
    `blocks`. The import as a whole fails (a ValueError, as for any bad payload); whoever
    supplied the block can remember it (`WorkerHooks.import_refused`)."""

    def __init__(self, message: str, block_index: int) -> None:
        super().__init__(message)
        self.block_index = block_index


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
