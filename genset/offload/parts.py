"""Offload blocks larger than one NATS message, in parts (pure: no I/O, the clock injected).

A Llama-3-8B block of 16 tokens is 2 MiB of KV; NATS carries at most `max_payload` (1 MiB by
default) per message. Such a block travels as parts, each naming the block (its hash), the
byte offset of the part in the block's payload and the payload's total size
(`proto.offload.OffloadPutPart` worker -> store, `OffloadGetPart` / `OffloadPart` store ->
worker); the receiver gathers them into one buffer of the declared size (`PartBuffer`).
Blocks that fit a message keep the one-message path.

Whoever is on the bus is untrusted, so the store's side (`Assemblies`) is bounded:
- a declared size over the store's per-block limit is refused before anything is allocated
  (by the caller, which knows that limit: `too_large`);
- the buffers of blocks being gathered hold at most `max_bytes` in all and `max_sender_bytes`
  per sender (the store's: `buffer_bounds`, a quarter each, which holds one largest block);
  a first part beyond either is refused (`parts_full`), and the ones in progress are never
  pushed out for it (an honest sender mid-block finishes);
- a part that overlaps one already received (`part_overlap`), that is empty or ends past
  the declared size (`part_range`), or that names another size, parent or token ids than
  the block's first part (`part_mismatch`) drops the whole block; so does a block scattered
  over more than MAX_RANGES disjoint pieces (`part_range`: an honest sender sends its parts
  in order, one piece);
- a block not complete `ttl_s` after its first part is dropped (`part_expired`; counted
  from the first part, not the last, so a sender trickling bytes cannot keep one alive);
- a block starts with the part at offset 0: any other part of a block not in progress (its
  block expired or was dropped) is refused (`part_start`), so its sender stops at once
  instead of starting a buffer that could never complete.
Every drop is counted by reason (`Assemblies.counts`).

A block is keyed by (sender id, hash): two workers that evict the same block at once each
complete their own (the second is a `known` put). The sender id is the last token of the
part's subject (`proto.subjects.offload_put_part`), which the store reads off the message
NATS delivered; the message's own `sender_id` must say the same, or the part is refused
(`part_sender`, `check_sender`; a subject token that is not an instance id too). In a secured
stack (`genset.runtime.auth`) a worker may publish parts only under its own id, so the server
vouches for the sender and the per-sender share bounds a hostile worker as it does a crashed
or buggy one: it cannot take more than its share by sending under other ids. In an open stack
(no NATS users, `genset up --insecure`) nothing is authenticated: anyone on the bus can send
under many ids, fill the overall bound, and big puts are refused until its blocks expire
(small blocks and lookups are not affected, and nothing wrong is ever kept: an assembled
block is checked like any other put).

After its first part, a block's parts may arrive in any order and from several requests in
flight at once (the client keeps a window of them, `genset.offload.client.PART_PUTS`): a
buffer takes any part that does not overlap the bytes received, in up to MAX_RANGES
disjoint pieces, and the block is complete when every byte is in, whichever part brings the
last one. (Parts published by
one connection reach the store's one subscription in order anyway; the window's replies
carry the part they answer, so the client takes the outcome from whichever reply has it.)

Fetching (`OffloadGetPart`) keeps nothing on the store between requests and nothing keyed by
who asks (a part is read from the held block, or from one disk read shared by the parts that
arrive while it runs), so its subject names no sender: there is no per-sender state to bound.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

PART_OVERLAP = "part_overlap"
PART_RANGE = "part_range"
PART_MISMATCH = "part_mismatch"
PARTS_FULL = "parts_full"
PART_EXPIRED = "part_expired"
PART_SENDER = "part_sender"
PART_START = "part_start"
PART_REASONS = (PART_OVERLAP, PART_RANGE, PART_MISMATCH, PARTS_FULL, PART_EXPIRED, PART_SENDER,
                PART_START)

MAX_RANGES = 64  # disjoint pieces of one block received so far, at most
BUFFER_OVERHEAD = 512  # bytes per block being gathered beyond its payload and token ids
# One sender may hold 1/SENDER_SHARES of the store's part buffers: filling them takes that
# many hostile (or broken) workers, each authenticated in a secured stack.
SENDER_SHARES = 4

PENDING = "pending"
COMPLETE = "complete"
DROPPED = "dropped"


def split(size: int, part_bytes: int) -> list[tuple[int, int]]:
    """(offset, length) of the parts a payload of `size` bytes goes out as."""
    if part_bytes < 1:
        raise ValueError(f"part_bytes must be >= 1, got {part_bytes}")
    return [(s, min(part_bytes, size - s)) for s in range(0, size, part_bytes)]


def buffer_bounds(max_block_bytes: int, budget_bytes: int | None = None) -> tuple[int, int]:
    """(max_bytes, max_sender_bytes) of the store's `Assemblies` for blocks of at most
    `max_block_bytes` (payload + token ids) and `budget_bytes` of blocks being gathered in all
    (None: SENDER_SHARES largest blocks). One sender holds 1/SENDER_SHARES of the whole, and
    that share must hold one largest block, or no sender could ever put one: a budget below
    SENDER_SHARES largest blocks is refused (ValueError) rather than given a larger share (a
    floor of one block made one sender's share half the buffers under the store's former
    defaults, 64 MiB and 32 MiB blocks; all of them for a budget of one block). Each block
    in progress is accounted BUFFER_OVERHEAD bytes beyond its payload and token ids: the
    bounds add it once per share, so a budget of exactly SENDER_SHARES largest blocks holds
    them (the flags compose as an operator reads them: 128 MiB is four 32 MiB blocks)."""
    if max_block_bytes < 1:
        raise ValueError(f"max_block_bytes must be >= 1, got {max_block_bytes}")
    least = SENDER_SHARES * max_block_bytes
    if budget_bytes is None:
        budget_bytes = least
    if budget_bytes < least:
        raise ValueError(
            f"a part budget of {budget_bytes} bytes gives one sender a share "
            f"(1/{SENDER_SHARES}) of {budget_bytes // SENDER_SHARES} bytes, less than one "
            f"largest block of {max_block_bytes}: it needs at least {least}")
    share = budget_bytes // SENDER_SHARES + BUFFER_OVERHEAD
    return SENDER_SHARES * share, share


def check_sender(subject_sender: int | None, body_sender: int,
                 token: str = "") -> tuple[str, str] | None:
    """Why a part whose subject names `subject_sender` (None: its last token, `token`, is not
    an instance id) and whose body says `body_sender` is refused, as (reason, text), or None.
    The subject is what the bus vouches for; a body that names another sender is a forgery or
    a broken client, and the part is not taken under either id."""
    if subject_sender is None:
        return PART_SENDER, (f"the subject's last token {token!r} is not a sender instance id "
                             "(lowercase hex)")
    if body_sender != subject_sender:
        return PART_SENDER, (f"part says sender {body_sender:x}, sent under sender "
                             f"{subject_sender:x}'s subject")
    return None


class PartBuffer:
    """One block's payload gathered from parts: a buffer of the declared size and the byte
    ranges received so far (sorted, disjoint, adjacent ones merged)."""

    __slots__ = ("buf", "parent_hash", "ranges", "received", "sender", "size", "started",
                 "token_ids")

    def __init__(self, size: int, *, parent_hash: int | None = None, token_ids: bytes = b"",
                 sender: int = 0, started: float = 0.0) -> None:
        if size < 1:
            raise ValueError(f"a block in parts has a size >= 1, got {size}")
        self.size = size
        self.buf = bytearray(size)
        self.ranges: list[list[int]] = []  # [start, end) pieces
        self.received = 0
        self.parent_hash = parent_hash
        self.token_ids = token_ids
        self.sender = sender
        self.started = started

    @property
    def complete(self) -> bool:
        return self.received == self.size

    @property
    def nbytes(self) -> int:
        """What this buffer is accounted as."""
        return self.size + len(self.token_ids) + BUFFER_OVERHEAD

    def check(self, offset: int, length: int) -> tuple[str, str] | None:
        """Why a part [offset, offset + length) cannot be added, as (reason, text), or None."""
        end = offset + length
        if length <= 0 or offset < 0 or end > self.size:
            return PART_RANGE, (f"part [{offset}, {end}) of a {self.size}-byte block: "
                                "empty or past its end")
        r = self.ranges
        i = bisect_left(r, [offset + 1]) - 1  # the piece starting at or before offset
        if (i >= 0 and r[i][1] > offset) or (i + 1 < len(r) and r[i + 1][0] < end):
            return PART_OVERLAP, f"part [{offset}, {end}) overlaps bytes already received"
        touches = (i >= 0 and r[i][1] == offset) or (i + 1 < len(r) and r[i + 1][0] == end)
        if not touches and len(r) >= MAX_RANGES:
            return PART_RANGE, f"parts scattered over more than {MAX_RANGES} pieces"
        return None

    def add(self, offset: int, data: bytes | bytearray | memoryview) -> tuple[str, str] | None:
        """Copy a part in; why not, as (reason, text) (nothing copied), or None."""
        n = len(data)
        why = self.check(offset, n)
        if why is not None:
            return why
        end = offset + n
        self.buf[offset:end] = data
        self.received += n
        r = self.ranges
        i = bisect_left(r, [offset])
        left = i > 0 and r[i - 1][1] == offset
        right = i < len(r) and r[i][0] == end
        if left and right:
            r[i - 1][1] = r[i][1]
            del r[i]
        elif left:
            r[i - 1][1] = end
        elif right:
            r[i][0] = offset
        else:
            r.insert(i, [offset, end])
        return None


@dataclass(slots=True)
class Added:
    """What became of a part: PENDING (the block waits for more), COMPLETE (`buffer` holds
    the whole payload; the block is no longer tracked) or DROPPED (`reason`, `text`)."""

    status: str
    buffer: PartBuffer | None = None
    reason: str = ""
    text: str = ""


class Assemblies:
    """The store's blocks being gathered from parts, keyed by (sender, hash); see the module
    docstring for the bounds. `clock`: seconds, monotonic (a test's own)."""

    def __init__(self, *, max_bytes: int, max_sender_bytes: int | None = None,
                 ttl_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes < 1 or ttl_s <= 0:
            raise ValueError("need max_bytes >= 1 and ttl_s > 0")
        self.max_bytes = max_bytes
        self.max_sender_bytes = min(max_bytes, max_sender_bytes or max_bytes)
        self.ttl_s = ttl_s
        self.clock = clock
        self._blocks: OrderedDict[tuple[int, int], PartBuffer] = OrderedDict()  # by start
        self._sender_bytes: dict[int, int] = {}
        self.bytes = 0
        self.counts: dict[str, int] = dict.fromkeys(
            ("parts", "completed", *PART_REASONS), 0)

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self._blocks

    def sender_bytes(self, sender: int) -> int:
        return self._sender_bytes.get(sender, 0)

    def expire(self, now: float | None = None) -> int:
        """Drop the blocks whose first part is older than ttl_s; how many."""
        now = self.clock() if now is None else now
        blocks = self._blocks
        n = 0
        while blocks:
            key, buf = next(iter(blocks.items()))
            if now - buf.started < self.ttl_s:
                break
            self._forget(key)
            n += 1
        self.counts[PART_EXPIRED] += n
        return n

    def add(self, sender: int, block_hash: int, *, size: int, offset: int,
            data: bytes | bytearray | memoryview, parent_hash: int | None = None,
            token_ids: bytes = b"") -> Added:
        """One part of block `block_hash` from `sender`. The caller has refused a declared
        `size` over its per-block limit before calling (nothing is allocated here before the
        checks that need no buffer)."""
        now = self.clock()
        self.expire(now)
        key = (sender, block_hash)
        buf = self._blocks.get(key)
        if buf is None:
            end = offset + len(data)
            if size < 1 or not data or offset < 0 or end > size:
                return self._drop(None, PART_RANGE, f"part [{offset}, {end}) of a {size}-byte "
                                                    "block: empty or past its end")
            if offset != 0:
                # A block starts with its first bytes, sent alone (the client waits for its
                # answer before the rest). A later part with no block in progress is one whose
                # block expired or was dropped: taken as a new block it could never complete
                # and would hold a buffer for ttl_s; refused, the sender stops at once.
                return self._drop(None, PART_START, (
                    f"part at offset {offset} of a block not in progress (a block's first "
                    "part starts at 0; it expired, was dropped, or never came)"))
            need = size + len(token_ids) + BUFFER_OVERHEAD
            if self.bytes + need > self.max_bytes:
                return self._drop(None, PARTS_FULL, (
                    f"blocks being gathered hold {self.bytes} bytes; {need} more would pass "
                    f"the bound of {self.max_bytes}"))
            if self.sender_bytes(sender) + need > self.max_sender_bytes:
                return self._drop(None, PARTS_FULL, (
                    f"sender {sender:x}'s blocks being gathered hold "
                    f"{self.sender_bytes(sender)} bytes; {need} more would pass its share "
                    f"of {self.max_sender_bytes}"))
            buf = PartBuffer(size, parent_hash=parent_hash, token_ids=token_ids,
                             sender=sender, started=now)
            self._blocks[key] = buf
            self.bytes += buf.nbytes
            self._sender_bytes[sender] = self.sender_bytes(sender) + buf.nbytes
        elif (size != buf.size or parent_hash != buf.parent_hash
              or token_ids != buf.token_ids):
            return self._drop(key, PART_MISMATCH, (
                f"part names a {size}-byte block (parent {parent_hash}), its first part a "
                f"{buf.size}-byte one (parent {buf.parent_hash}), or other token ids"))
        why = buf.add(offset, data)
        if why is not None:
            return self._drop(key, *why)
        self.counts["parts"] += 1
        if not buf.complete:
            return Added(PENDING)
        self._forget(key)
        self.counts["completed"] += 1
        return Added(COMPLETE, buffer=buf)

    def refuse(self, sender: int | None, block_hash: int, reason: str, text: str) -> Added:
        """A part refused before it reached `add` (e.g. `check_sender`'s): counted; like any
        bad part it drops its block in progress, (sender, block_hash), if there is one."""
        key = (sender, block_hash) if sender is not None else None
        return self._drop(key if key in self._blocks else None, reason, text)

    def _drop(self, key: tuple[int, int] | None, reason: str, text: str) -> Added:
        if key is not None:
            self._forget(key)
        self.counts[reason] += 1
        return Added(DROPPED, reason=reason, text=text)

    def _forget(self, key: tuple[int, int]) -> None:
        buf = self._blocks.pop(key)
        self.bytes -= buf.nbytes
        left = self._sender_bytes[buf.sender] - buf.nbytes
        if left:
            self._sender_bytes[buf.sender] = left
        else:
            del self._sender_bytes[buf.sender]
