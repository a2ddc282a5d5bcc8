"""KV-cache transfer between workers (disaggregated prefill): offer, header, chunks, credits,
acks.

A transfer moves a run of full KV blocks, in prefix order, from the worker that computed them
(the sender, e.g. a prefill worker) to the worker that continues the request (the receiver,
the decode worker). The receiver opens it:

1. The receiver makes a `KvTransferTarget` (its offer: where to send, its window, and a
   direct TCP endpoint with a one-time token when it listens) and hands it to the sender
   inside whatever request asks for the prefill.
2. The sender sends a `KvTransferHeader` (block count and size, the chained hashes, the
   payload layout) to `target.subject` as a NATS request whose reply subject is its own
   `reply_subject` (so "no responders" also arrives there), or as the first frame on a TCP
   connection to `target.tcp` (written together with the first chunk). The receiver answers
   with a `KvTransferCredit` (accepted, nothing consumed yet; over NATS only: on TCP an
   accepted header gets no answer) or a `KvTransferAck` with `ok=False` (refused: layout or
   hash mismatch, cancelled, too busy).
3. The sender streams `KvTransferChunk`s right after the header (it need not wait for the
   answer; a refusal arrives as a nack while they travel and the receiver drops them): a
   byte range of the concatenated block payloads with an XXH3-64 checksum. At most
   `window_bytes` may be sent and not yet credited; the receiver returns `KvTransferCredit`s
   (cumulative bytes it has consumed, i.e. imported) as it goes, so memory is bounded on
   both ends and block k is imported while k+1 travels.
4. The receiver ends with a `KvTransferAck` (ok, or not with the reason); the sender unpins
   its blocks on it. A sender that gives up sends `KvTransferAbort`.

Over NATS the header and chunks go to `target.subject`, credits and acks to
`header.reply_subject`; each chunk fits the server's max_payload. Over TCP every message is a
frame: u32 little-endian length, then the msgpack message; a chunk frame carries `data=b""`
and is followed by exactly `size` raw bytes. All messages are msgpack maps tagged by `kind`
(one decoder reads any of them: `KvTransferMessage`).
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from proto.base import Message
from proto.generate import ErrorInfo, GenerateRequest, TokenLogprobs

# Checksum of a chunk's bytes: XXH3-64, seed 0 (the same xxHash library as block hashes).
CHECKSUM_ALGORITHM = "xxh3_64"

# Counts, sizes and offsets: a negative one is refused by the decoder itself.
Count = Annotated[int, msgspec.Meta(ge=0)]
# (msgpack itself has no integer above 2**64 - 1, so ge=0 is all a u64 needs)
U64 = Annotated[int, msgspec.Meta(ge=0)]


class KvLayout(msgspec.Struct, kw_only=True):
    """What a block's payload holds, so a receiver refuses KV it cannot import before any
    byte moves. Two layouts match when every field is equal.

    engine: torch | mocker | trtllm. format: the payload format ("genset-kv/1" for the torch
    engine; "" when blocks carry no payload, as the mocker's). block_shape (torch):
    [layers, 2, block_size, kv_heads, head_dim]. bytes_per_block: payload bytes per block.
    """

    engine: str
    format: str = ""
    dtype: str = ""
    block_shape: list[int] = msgspec.field(default_factory=list)
    bytes_per_block: Count = 0


class TcpEndpoint(msgspec.Struct, kw_only=True):
    """A direct TCP endpoint: connect to host:port and open with a header carrying `token`
    (one-time: the listener forgets it once used)."""

    host: str
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    token: str


class KvTransferTarget(msgspec.Struct, kw_only=True):
    """The receiver's offer (embedded in the remote-prefill request; not sent on its own).

    `first_block`: index, in the request's block chain, of the first block wanted (the
    receiver already holds the ones before). `window_bytes`: bytes the sender may have in
    flight (sent, not yet credited); never less than one block. `deadline_ms`: unix ms after
    which the receiver has given up.
    """

    transfer_id: str
    worker_id: int
    subject: str
    window_bytes: Count
    first_block: Count = 0
    tcp: TcpEndpoint | None = None
    layout: KvLayout | None = None
    deadline_ms: int | None = None


class KvTransferHeader(Message, tag="header", tag_field="kind", kw_only=True):
    """Opens a transfer. `hashes` are the chained block hashes (genset.kv.hashing) of the
    blocks sent, in order; `parent_hash` is the block before the first (None at the start of
    the sequence). total_bytes == num_blocks * bytes_per_block. `token`: the TCP token (empty
    over NATS)."""

    transfer_id: str
    request_id: str
    sender_id: int
    reply_subject: str = ""
    block_size: Annotated[int, msgspec.Meta(ge=1)]
    first_block: Count = 0
    num_blocks: Count
    bytes_per_block: Count
    total_bytes: Count
    hashes: list[U64]
    parent_hash: U64 | None = None
    layout: KvLayout
    token: str = ""


class KvTransferChunk(Message, tag="chunk", tag_field="kind", kw_only=True):
    """Bytes [offset, offset + size) of the concatenated block payloads. `seq` counts chunks
    from 0; `first_block` is the index (within this transfer) of the block holding byte
    `offset`; `checksum` is XXH3-64 of the bytes; `last` marks the final chunk (the receiver
    then checks it got exactly total_bytes). Over TCP `data` is empty and the bytes follow
    the frame."""

    transfer_id: str
    seq: Count
    offset: Count
    size: Count
    first_block: Count = 0
    checksum: U64
    last: bool = False
    data: bytes = b""


class KvTransferCredit(Message, tag="credit", tag_field="kind", kw_only=True):
    """Receiver -> sender: every byte before `consumed_bytes` has been imported (the sender
    may send up to consumed_bytes + window_bytes). The first one accepts the header."""

    transfer_id: str
    consumed_bytes: Count = 0
    imported_blocks: Count = 0


class KvTransferAck(Message, tag="ack", tag_field="kind", kw_only=True):
    """Receiver -> sender, final: `ok` when every block was received intact and imported
    (the sender unpins them); otherwise `error` says why (the sender unpins too)."""

    transfer_id: str
    ok: bool
    imported_blocks: Count = 0
    received_bytes: Count = 0
    error: ErrorInfo | None = None


class KvTransferAbort(Message, tag="abort", tag_field="kind", kw_only=True):
    """Sender -> receiver, final: the sender gave up (cancelled, its source failed)."""

    transfer_id: str
    error: ErrorInfo


class RemotePrefillRequest(Message, kw_only=True):
    """Decode worker -> prefill worker, a NATS request on
    `proto.subjects.remote_prefill(ns, prefill_worker_id)`: compute `request`'s prompt, answer
    with its first token (`RemotePrefillReply`) as soon as it exists, then send the prompt's
    full blocks from `first_block` on (the decode worker holds the ones before) to `target`
    as a KV transfer (this module). `request` is the client's request as the decode worker
    got it (sampling and stop conditions included: the first token is drawn exactly as the
    decode worker would have drawn it); the prefill worker generates that one token only.
    A refusal (bad request, layout mismatch, overloaded) is the request's error reply.
    """

    request: GenerateRequest
    target: KvTransferTarget
    first_block: Count = 0


class RemotePrefillReply(Message, kw_only=True):
    """Prefill worker -> decode worker: the first output token, sent before the KV.

    `first_token_ids`: packed int32 LE (one token); `logprobs` when the request asked.
    `cached_tokens`: prompt tokens the prefill worker found in its own prefix cache.
    `blocks`: how many blocks (from `first_block` on) it pinned and is sending; fewer than the
    prompt's full blocks when some were evicted before it could pin them (the decode worker
    computes the rest).
    `tail_tokens`: the prompt's tokens after its last full block, whose KV (`tail`: that
    partial block's payload, None for an engine whose blocks carry none, or when it is over
    the reply's size bound) the decode worker uses instead of computing them again; 0: it
    computes them."""

    request_id: str
    transfer_id: str
    first_token_ids: bytes
    logprobs: TokenLogprobs | None = None
    prompt_tokens: Count = 0
    cached_tokens: Count = 0
    blocks: Count = 0
    tail_tokens: Count = 0
    tail: bytes | None = None


KvTransferMessage = (
    KvTransferHeader | KvTransferChunk | KvTransferCredit | KvTransferAck | KvTransferAbort
)

# Top-level transfer messages, for documentation and JSON Schema.
TRANSFER_MESSAGES = (
    KvTransferHeader,
    KvTransferChunk,
    KvTransferCredit,
    KvTransferAck,
    KvTransferAbort,
)

# The remote-prefill request and its reply (top-level messages of the wire contract).
REMOTE_PREFILL_MESSAGES = (RemotePrefillRequest, RemotePrefillReply)
