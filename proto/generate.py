"""Generate requests and the streamed reply protocol (chunks, cancel, errors)."""

from __future__ import annotations

import msgspec

from proto.base import Message
from proto.values import FinishReason


class SamplingParams(msgspec.Struct, kw_only=True):
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 - at `$.temperature`")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1] - at `$.top_p`")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 - at `$.top_k`")


class StopConditions(msgspec.Struct, kw_only=True):
    max_tokens: int = 16
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1 - at `$.max_tokens`")


class GenerateRequest(Message, kw_only=True):
    """Tokens in, tokens out: what the frontend sends a worker (and NATS-native clients)."""

    request_id: str
    model: str
    token_ids: bytes  # packed little-endian int32 (proto.tokens.pack_tokens)
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    stop: StopConditions = msgspec.field(default_factory=StopConditions)
    deadline_ms: int | None = None  # absolute unix time in ms after which the work is moot
    priority: int = 0


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from a cache


class ErrorInfo(msgspec.Struct, kw_only=True):
    """A failure, in a form every side can act on.

    code: a short machine-readable word, e.g. bad_request, not_found, overloaded,
    deadline_exceeded, cancelled, internal, lost_chunks, peer_gone, no_responders,
    disconnected, context_length_exceeded.
    """

    code: str
    message: str
    retryable: bool = False


class StreamChunk(Message, kw_only=True):
    """One frame of a streamed reply.

    `seq` starts at 0 and increases by one per frame of a stream (heartbeats included), so a
    receiver detects loss. A data frame carries the tokens of one engine step (several tokens
    travel together). The last frame has `final=True`; it carries `finish_reason` and `usage`
    for token streams, or `error` when the stream failed. A heartbeat (`heartbeat=True`)
    carries nothing and goes out when no other frame has for ~1 s. `data` carries an opaque
    msgpack payload for non-token streams (KV block transfer, route decisions).
    """

    seq: int
    token_ids: bytes = b""
    finish_reason: FinishReason | None = None  # stop | length | cancelled | error
    usage: Usage | None = None
    error: ErrorInfo | None = None
    heartbeat: bool = False
    final: bool = False
    data: bytes | None = None


class Cancel(Message, kw_only=True):
    """Stops a streamed request. Published on `proto.subjects.stream_cancel(ns)`; every
    responder listens there and drops the stream whose reply inbox is `stream_id`."""

    stream_id: str  # the reply inbox subject of the stream
    reason: str = "cancelled"
