"""The frontend's generate service for NATS-native clients (no HTTP).

A client sends a `ClientGenerateRequest` as a streamed request to
`proto.subjects.frontend_generate(ns)` (frontends answer in one queue group). The reply is a
stream of `proto.StreamChunk`s exactly as a worker sends them (seq, heartbeats, cancel via
`proto.Cancel` on `proto.subjects.stream_cancel(ns)`), where each data frame additionally
carries `data` = msgpack of a `ClientDelta` with the text of the frame's tokens. The final
frame carries `finish_reason` and `usage` (prompt, completion and cached tokens), or `error`.
"""

from __future__ import annotations

import math

import msgspec

from proto.base import Message
from proto.generate import SamplingParams


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str


class ClientGenerateRequest(Message, kw_only=True):
    """Exactly one of `messages` (chat, the model's template applies), `prompt` (text) or
    `token_ids` (packed int32 LE, used as is) is set."""

    request_id: str = ""  # empty: the frontend assigns one
    model: str = ""  # empty: the only model served (an error if there are several)
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    token_ids: bytes | None = None
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    max_tokens: int | None = None  # None: up to the context length
    stop: list[str] = msgspec.field(default_factory=list)  # stop strings (not shown)
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    detokenize: bool = True  # False: token ids only, no text (cheaper)
    timeout_s: float | None = None  # the frontend's default deadline when None (or 0)

    def __post_init__(self) -> None:
        # NaN / inf became a NaN / inf deadline (then "cannot convert float NaN to integer"
        # when the worker's deadline_ms was computed): refused here, naming the field
        t = self.timeout_s
        if t is not None and not (t >= 0 and math.isfinite(t)):
            raise ValueError(f"timeout_s must be a finite number of seconds >= 0 or nil, got "
                             f"{t} - at `$.timeout_s`")


class ClientDelta(msgspec.Struct, kw_only=True):
    """`StreamChunk.data` of a frontend reply frame."""

    text: str = ""
