"""Generate requests and the streamed reply protocol (chunks, cancel, errors)."""

from __future__ import annotations

import math
import sys
from array import array

import msgspec

from proto.base import Message
from proto.values import FinishReason

# Bounds of the sampling fields (OpenAI's documented ranges; OpenAI allows at most 20
# alternatives per token, and a `logit_bias` is one map per request, kept small: it crosses
# the bus with every request and is applied on every step).
PENALTY_RANGE = (-2.0, 2.0)
LOGIT_BIAS_RANGE = (-100.0, 100.0)
MAX_LOGIT_BIAS = 300
MAX_LOGPROBS = 20


class SamplingParams(msgspec.Struct, kw_only=True):
    """How the next token is chosen. The defaults change nothing (plain sampling).

    Logit processing, in this order, before temperature / top-k / top-p (and before greedy's
    argmax): `logit_bias` is added; `repetition_penalty` divides a positive logit (multiplies
    a negative one) of every token seen in the prompt or the output so far (> 1 discourages
    repeats, as in Hugging Face's `repetition_penalty`); `frequency_penalty` * (times the token
    was generated) + `presence_penalty` * (1 if it was generated) is subtracted, over the
    generated tokens only (OpenAI's definition).

    `logprobs`: None = off; k (0..20) = every output token comes with its log-probability
    and the k most likely alternatives (`TokenLogprobs` on the stream frames). Engines that
    cannot compute them (the mocker) refuse such a request with `bad_request`.
    """

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    seed: int | None = None
    presence_penalty: float = 0.0  # [-2, 2]
    frequency_penalty: float = 0.0  # [-2, 2]
    repetition_penalty: float = 1.0  # > 0; 1 = off
    # token id (decimal string, as in OpenAI's JSON: msgpack readers such as Python's refuse
    # integer map keys by default) -> bias in [-100, 100]
    logit_bias: dict[str, float] = msgspec.field(default_factory=dict)
    logprobs: int | None = None  # None = off; 0..20 alternatives per token

    def __post_init__(self) -> None:
        # Every float field is written so that NaN fails too (a comparison with NaN is false;
        # msgpack carries NaN and +/-inf, and `t < 0` alone let both through to the engine).
        t = self.temperature
        if not (t >= 0 and math.isfinite(t)):
            raise ValueError(f"temperature must be a finite number >= 0, got {t} - at "
                             "`$.temperature`")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p} - at `$.top_p`")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 - at `$.top_k`")
        lo, hi = PENALTY_RANGE
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not lo <= value <= hi:  # NaN fails too
                raise ValueError(f"{name} must be in [{lo:g}, {hi:g}], got {value} - at `$.{name}`")
        rp = self.repetition_penalty
        if not (rp > 0 and math.isfinite(rp)):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {rp} - at "
                             "`$.repetition_penalty`")
        if self.logit_bias:
            _check_logit_bias(self.logit_bias)
        k = self.logprobs
        if k is not None and not 0 <= k <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}] (alternatives per token) "
                             f"or nil, got {k} - at `$.logprobs`")

    @property
    def processes_logits(self) -> bool:
        """Whether any penalty or bias applies (False: the engine's plain, cheapest path)."""
        return bool(self.logit_bias) or self.presence_penalty != 0.0 or (
            self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0)

    def logit_bias_ids(self) -> dict[int, float]:
        """`logit_bias` keyed by token id (the keys were checked on construction)."""
        return {int(k): v for k, v in self.logit_bias.items()}

    def for_choice(self, index: int) -> SamplingParams:
        """The parameters of choice `index` of an n-choice request sent as n requests: the
        same, except that a seeded request's choice i > 0 uses seed + i (so seeded choices
        differ, and are reproducible; choice 0 is exactly the n = 1 request)."""
        if index == 0 or self.seed is None:
            return self
        return msgspec.structs.replace(self, seed=self.seed + index)


def _check_logit_bias(bias: dict[str, float]) -> None:
    if len(bias) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias has {len(bias)} entries, at most {MAX_LOGIT_BIAS} are "
                         "allowed - at `$.logit_bias`")
    lo, hi = LOGIT_BIAS_RANGE
    for key, value in bias.items():
        # ASCII digits only (str.isdigit alone accepts e.g. "²"); int32 range like token ids
        if not (key.isascii() and key.isdigit() and len(key) <= 10 and int(key) < 2**31):
            raise ValueError(f"logit_bias: key {key!r} is not a token id (a non-negative "
                             "integer, written in decimal) - at `$.logit_bias`")
        if not lo <= value <= hi:
            raise ValueError(f"logit_bias[{key}] must be in [{lo:g}, {hi:g}], got {value} - "
                             "at `$.logit_bias`")


class StopConditions(msgspec.Struct, kw_only=True):
    max_tokens: int = 16
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1 - at `$.max_tokens`")
        # min_tokens > max_tokens is not refused here (the output just ends at max_tokens):
        # the frontend decides whether that is a client error
        if self.min_tokens < 0:
            raise ValueError("min_tokens must be >= 0 - at `$.min_tokens`")


class GenerateRequest(Message, kw_only=True):
    """Tokens in, tokens out: what the frontend sends a worker (and NATS-native clients)."""

    request_id: str
    model: str
    token_ids: bytes  # packed little-endian int32 (proto.tokens.pack_tokens)
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    stop: StopConditions = msgspec.field(default_factory=StopConditions)
    deadline_ms: int | None = None  # absolute unix time in ms after which the work is moot
    priority: int = 0
    # Ask the worker to time its stages of this request and return them in the final frame's
    # `usage.timeline` (a frontend with `--timeline`; off: nothing is timed).
    timeline: bool = False
    # How many of the prompt's blocks the router's view places in a KV offload store (None:
    # no view of a store). 0 lets the worker skip its store lookup, which could only miss: a
    # NATS round trip and a store wake-up per request saved. A hint only: the view lags the
    # store's events by a moment, so a block put just now is recomputed, never wrong.
    offload_hint: int | None = None


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from a cache
    # Only for requests sent with `GenerateRequest.timeline`: when the worker reached each of
    # its stages of the request (stage name -> unix time in seconds; names in
    # genset.runtime.timeline.WORKER_STAGES). Nil otherwise (1 byte on the final frame).
    timeline: dict[str, float] | None = None


class ErrorInfo(msgspec.Struct, kw_only=True):
    """A failure, in a form every side can act on.

    code: a short machine-readable word, e.g. bad_request, not_found, overloaded,
    deadline_exceeded, cancelled, internal, lost_chunks, peer_gone, no_responders,
    disconnected, context_length_exceeded.
    """

    code: str
    message: str
    retryable: bool = False


_NATIVE_LE = sys.byteorder == "little"


def _pack(typecode: str, values) -> bytes:
    arr = array(typecode, values)
    if not _NATIVE_LE:
        arr.byteswap()
    return arr.tobytes()


def _unpack(typecode: str, data: bytes) -> list:
    arr = array(typecode)
    arr.frombytes(data)
    if not _NATIVE_LE:
        arr.byteswap()
    return arr.tolist()


class TokenLogprobs(msgspec.Struct, kw_only=True):
    """Log-probabilities of the tokens of one frame (a request with `sampling.logprobs` set).

    For the frame's n tokens (`StreamChunk.token_ids`, in the same order): `logprobs` holds
    n float32 (the chosen token's natural-log probability under the model's distribution:
    log_softmax of the raw logits, before penalties, bias and temperature); `top_ids` and
    `top_logprobs` hold n * `top_k` int32 / float32, token-major, most likely first
    (`top_k` = the request's `sampling.logprobs`). All packed little-endian, like token ids
    (`pack` / `unpack` do it).
    """

    logprobs: bytes = b""  # float32 LE, one per token
    top_k: int = 0
    top_ids: bytes = b""  # int32 LE, top_k per token
    top_logprobs: bytes = b""  # float32 LE, top_k per token

    def __post_init__(self) -> None:
        n, rem = divmod(len(self.logprobs), 4)
        if rem:
            raise ValueError("logprobs must be packed float32 (a multiple of 4 bytes) - at "
                             "`$.logprobs`")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 - at `$.top_k`")
        want = 4 * n * self.top_k
        for name in ("top_ids", "top_logprobs"):
            if len(getattr(self, name)) != want:
                raise ValueError(f"{name} must hold top_k={self.top_k} entries for each of the "
                                 f"{n} tokens ({want} bytes), got {len(getattr(self, name))} "
                                 f"bytes - at `$.{name}`")

    @classmethod
    def pack(cls, logprobs: list[float], top_ids: list[list[int]],
             top_logprobs: list[list[float]], top_k: int) -> TokenLogprobs:
        """From per-token lists (`top_ids[i]` / `top_logprobs[i]`: token i's alternatives)."""
        return cls(logprobs=_pack("f", logprobs), top_k=top_k,
                   top_ids=_pack("i", [t for row in top_ids for t in row]),
                   top_logprobs=_pack("f", [x for row in top_logprobs for x in row]))

    def unpack(self) -> tuple[list[float], list[list[int]], list[list[float]]]:
        """(logprobs, top_ids, top_logprobs) as per-token lists."""
        lps = _unpack("f", self.logprobs)
        k = self.top_k
        ids = _unpack("i", self.top_ids)
        tops = _unpack("f", self.top_logprobs)
        return (lps, [ids[i * k:(i + 1) * k] for i in range(len(lps))],
                [tops[i * k:(i + 1) * k] for i in range(len(lps))])


class StreamChunk(Message, kw_only=True):
    """One frame of a streamed reply.

    `seq` starts at 0 and increases by one per frame of a stream (heartbeats included), so a
    receiver detects loss. A data frame carries the tokens of one engine step (several tokens
    travel together), and their `logprobs` when the request asked for them. The last frame
    has `final=True`; it carries `finish_reason` and `usage` for token streams (and may carry
    tokens too), or `error` when the stream failed. A heartbeat (`heartbeat=True`)
    carries nothing and goes out when no other frame has for ~0.5 s. `data` carries an opaque
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
    # Only for requests with `sampling.logprobs` set: one entry per token of `token_ids`.
    # Nil otherwise: a one-token frame grows from 78 to 88 bytes and costs ~10 ns more to
    # build + encode and ~10 ns more to decode (measured), against ~20 us of worker + client
    # CPU per streamed token (bench/bench_worker.py): ~0.1%.
    logprobs: TokenLogprobs | None = None


class Cancel(Message, kw_only=True):
    """Stops a streamed request. Published on `proto.subjects.stream_cancel(ns)`; every
    responder listens there and drops the stream whose reply inbox is `stream_id`."""

    stream_id: str  # the reply inbox subject of the stream
    reason: str = "cancelled"
