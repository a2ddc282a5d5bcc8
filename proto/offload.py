"""The KV offload store's messages: batched put, batched lookup, contains, resync answer.

A store instance serves one hash range (clients place each block on an instance by
rendezvous hashing over the live instances, `genset.offload.placement`), so every request
goes to one instance's own subjects (`proto.subjects.offload_*`).

Sizes: every message must fit a NATS message (1 MB by default, `max_payload`). A put is cut
by the client into requests that fit; a lookup carries `max_bytes` and the store answers
with the longest leading run that fits, saying in `held` how many more it has, so the client
asks again for the rest while its deadline allows.

A block larger than a message (a Llama-3-8B block of 16 tokens is 2 MiB) travels in parts
(`genset.offload.parts`): put as `OffloadPutPart`s on `offload_put_part(ns, id, sender)`
(the sender's instance id is the subject's last token: the store's per-sender bounds rest on
it, and a secured stack lets a worker publish only under its own), each answered with an
`OffloadPutReply` (all counts 0: more parts expected; the part that completes the block gets
the block's outcome; a refused part `refused` = 1); in a lookup
reply it is named in `large` (an `OffloadBlockRef`, when the request's `max_large_bytes`
allows) right after `blocks`, and its payload is fetched with `OffloadGetPart` requests on
`offload_get_part(ns, id)`. Blocks that fit a message travel as before.

The store's KV events are ordinary `proto.kv.KvEventBatch`es with `worker_id` = the store's
instance id and `tier` = `host` (its RAM) or `disk`, published on `offload_events(ns, id)`.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from proto.base import Message

# (msgspec cannot bound past int64; msgpack itself stops at 2**64 - 1)
U64 = Annotated[int, msgspec.Meta(ge=0, description="unsigned 64-bit")]

# Bounds checked by the decoder (in C) before any handler sees a message: a hostile or buggy
# sender cannot make a store allocate more than this many entries per request.
MAX_BLOCKS_PER_MESSAGE = 65_536
MAX_HASHES_PER_MESSAGE = 65_536

HashList = Annotated[list[U64], msgspec.Meta(max_length=MAX_HASHES_PER_MESSAGE)]


class OffloadBlock(msgspec.Struct, kw_only=True):
    """One full KV block: its chained hash (`genset.kv.hashing`), the hash of the block before
    it (None at the start of a sequence), its token ids (packed int32 LE; may be empty when
    the sender does not have them) and the engine's K/V payload (the torch engine's
    `kvformat` bytes; empty for the mocker, which has no tensors)."""

    hash: U64
    parent_hash: U64 | None = None
    token_ids: bytes = b""
    data: bytes = b""


BlockList = Annotated[list[OffloadBlock], msgspec.Meta(max_length=MAX_BLOCKS_PER_MESSAGE)]


Size = Annotated[int, msgspec.Meta(ge=0)]


class OffloadPut(Message, kw_only=True):
    """Blocks a worker evicted, for the store to keep (write-behind; best effort)."""

    sender_id: int = 0  # the worker's instance id (logs, metrics)
    blocks: BlockList = msgspec.field(default_factory=list)


class OffloadPutReply(Message, kw_only=True):
    store_id: int
    stored: int = 0  # newly kept (in RAM, or on disk when RAM holds more reused blocks)
    known: int = 0  # already held: counted as a reuse, nothing stored twice
    rejected: int = 0  # not admitted: keeping it would have pushed out a more reused block
    refused: int = 0  # invalid (see `error`): too large, token ids not int32, hash mismatch
    error: str | None = None  # the first refusal's reason


class OffloadLookup(Message, kw_only=True):
    """"The longest run of these hashes, from the first, in order, that you hold", with the
    blocks' data, at most `max_bytes` of it (block payloads and token ids)."""

    hashes: HashList = msgspec.field(default_factory=list)
    max_bytes: Annotated[int, msgspec.Meta(ge=0)] = 0
    want_tokens: bool = False  # also return each block's token ids
    # stop the run at the first block not in RAM (`held` counts only up to there): the asker
    # computes a disk block faster than it can have it read
    ram_only: bool = False
    # blocks larger than a message may be named in the reply's `large`, up to this many
    # payload bytes in all (0: none, as from a client that cannot fetch parts)
    max_large_bytes: Annotated[int, msgspec.Meta(ge=0)] = 0


class OffloadPutPart(Message, kw_only=True):
    """Bytes [offset, offset + len(data)) of the payload of one block larger than a message
    (worker -> store). Every part names the whole block: its hash, parent, token ids and
    the payload's total `size`; the store gathers the parts of (sender, hash) into one
    buffer of that size (bounded; `genset.offload.parts`) and, once complete, puts the block
    like any other (the same checks). Answered with an `OffloadPutReply`."""

    # the sender's instance id: the same as the subject's last token (`offload_put_part`),
    # which is what the store goes by; a part whose body says otherwise is refused
    sender_id: int = 0
    hash: U64
    parent_hash: U64 | None = None
    token_ids: bytes = b""
    size: Size
    offset: Size = 0
    data: bytes = b""


class OffloadBlockRef(msgspec.Struct, kw_only=True):
    """A held block too large for one message, named in a lookup reply instead of sent: its
    payload (`size` bytes) comes with `OffloadGetPart` requests."""

    hash: U64
    parent_hash: U64 | None = None
    token_ids: bytes = b""  # when the lookup asked for them
    size: Size


class OffloadGetPart(Message, kw_only=True):
    """"Bytes [offset, offset + max_bytes) of block `hash`'s payload" (store -> worker
    onboarding of a block larger than a message)."""

    hash: U64
    offset: Size = 0
    max_bytes: Size = 0


class OffloadPart(Message, kw_only=True):
    """The answer to an `OffloadGetPart`: `data` = bytes [offset, offset + len(data)) of the
    `size`-byte payload (capped to what fits a message); `size` 0: not held (any more)."""

    store_id: int
    hash: U64
    size: Size = 0
    offset: Size = 0
    data: bytes = b""


LargeList = Annotated[list[OffloadBlockRef], msgspec.Meta(max_length=MAX_BLOCKS_PER_MESSAGE)]


class OffloadLookupReply(Message, kw_only=True):
    store_id: int
    held: int = 0  # length of the leading run of `hashes` this store holds
    blocks: BlockList = msgspec.field(default_factory=list)  # the first len(blocks) of that run
    disk_blocks: int = 0  # how many of `blocks` were read from disk
    # the store's disk tier read rate as it measured it lately, GB/s decimal (0: not yet)
    disk_read_gbps: float = 0.0
    # the blocks of the run right after `blocks` that are each larger than a message, named
    # only (fetch them with `OffloadGetPart`)
    large: LargeList = msgspec.field(default_factory=list)


class TierSnapshot(msgspec.Struct, kw_only=True):
    """Where one tier's snapshot sits in that tier's event sequence."""

    tier: str
    first_event_id: int  # the batch that starts with `cleared`
    last_event_id: int  # the last batch of the snapshot
    blocks: int = 0


class OffloadResyncReply(Message, kw_only=True):
    """The answer to a `KvResyncRequest` sent to a store. Unlike a worker, the store does not
    return the snapshot itself (a disk tier's snapshot can be larger than a NATS message): it
    publishes it on its events subject, in order, as batches `first_event_id ..
    last_event_id` per tier, and says here where they are."""

    store_id: int
    tiers: list[TierSnapshot] = msgspec.field(default_factory=list)


OFFLOAD_MESSAGES = (
    OffloadPut,
    OffloadPutReply,
    OffloadPutPart,
    OffloadGetPart,
    OffloadPart,
    OffloadLookup,
    OffloadLookupReply,
    OffloadResyncReply,
)
