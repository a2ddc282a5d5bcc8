"""The pure parts of a KV transfer: how a sender cuts blocks into chunks, and how a receiver
checks chunks and turns them back into blocks. No I/O; both transports use these.

The transfer's bytes are the blocks' payloads laid end to end (`num_blocks *
bytes_per_block`). A chunk holds whole blocks when a block fits in a chunk (the common case:
the receiver then hands out views into the chunk, no copy), or one part of a block when a
block is larger than a chunk can be (a 70B model's 16-token block is ~5 MB, NATS' default
max_payload 1 MB); parts are gathered in one block-sized buffer before the block is handed
out. A chunk never holds parts of two blocks.

The receiver's memory for a transfer is the bytes it received and has not yet had imported
(`Assembler.held_bytes`); the sender may have at most the window in flight, so that stays
under the window. A window is never smaller than one block (`effective_window`): a block is
imported whole, so the receiver must be able to hold one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import xxhash

from genset.transfer import errors
from genset.transfer.errors import TransferError
from proto.transfer import KvTransferChunk, KvTransferHeader

checksum = xxhash.xxh3_64_intdigest

Payload = bytes | bytearray | memoryview


def effective_window(window_bytes: int, bytes_per_block: int) -> int:
    return max(window_bytes, bytes_per_block, 1)


def chunk_size_for(max_chunk_bytes: int, window: int) -> int:
    """The data bytes per chunk: at most `max_chunk_bytes`, and at most half the window
    when that leaves room for whole chunks (so the next chunk travels while the receiver
    imports the one before: the pipelining the window is for)."""
    if max_chunk_bytes < 1:
        raise ValueError(f"max_chunk_bytes must be >= 1, got {max_chunk_bytes}")
    half = window // 2
    return max(1, min(max_chunk_bytes, half)) if half else max_chunk_bytes


@dataclass(frozen=True, slots=True)
class Group:
    """Blocks the sender reads from its source at once: `count` blocks from `first`, sent as
    one chunk, or (a single block bigger than a chunk) as several parts."""

    first: int
    count: int


def plan_groups(num_blocks: int, bytes_per_block: int, chunk_bytes: int,
                first_bytes: int | None = None) -> Iterator[Group]:
    """Groups covering blocks 0..num_blocks-1 in order; with `first_bytes`, the first group
    is at most that big (at least one block): the sender checksums a chunk before its first
    byte leaves, so a small first chunk starts the stream sooner (the later checksums run
    while the socket buffer drains)."""
    if num_blocks <= 0:
        return
    if bytes_per_block <= 0:
        yield Group(0, num_blocks)  # nothing to read: every block in one empty chunk
        return
    per = max(1, chunk_bytes // bytes_per_block)
    head = 0
    if first_bytes is not None and first_bytes < chunk_bytes:
        head = min(num_blocks, max(1, first_bytes // bytes_per_block))
        yield Group(0, head)
    for first in range(head, num_blocks, per):
        yield Group(first, min(per, num_blocks - first))


def split_parts(size: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """(start, length) of the chunks a group of `size` bytes goes out as."""
    if size <= chunk_bytes:
        return [(0, size)]
    return [(s, min(chunk_bytes, size - s)) for s in range(0, size, chunk_bytes)]


def group_checksum(payloads: Sequence[Payload], start: int, length: int) -> int:
    """XXH3-64 of bytes [start, start+length) of the payloads laid end to end, without
    joining them."""
    if len(payloads) == 1:
        return checksum(memoryview(payloads[0])[start : start + length])
    h = xxhash.xxh3_64()
    pos = 0
    end = start + length
    for p in payloads:
        n = len(p)
        lo, hi = max(start, pos), min(end, pos + n)
        if lo < hi:
            h.update(memoryview(p)[lo - pos : hi - pos])
        pos += n
        if pos >= end:
            break
    return h.intdigest()


def check_header(header: KvTransferHeader) -> None:
    """Raise TransferError(kv_bad_message) if the header contradicts itself."""
    if len(header.hashes) != header.num_blocks:
        raise TransferError(
            errors.BAD_MESSAGE,
            f"header lists {len(header.hashes)} hashes for {header.num_blocks} blocks",
        )
    if header.total_bytes != header.num_blocks * header.bytes_per_block:
        raise TransferError(
            errors.BAD_MESSAGE,
            f"header total_bytes {header.total_bytes} != {header.num_blocks} blocks x "
            f"{header.bytes_per_block} bytes",
        )
    if header.layout.bytes_per_block not in (0, header.bytes_per_block):
        raise TransferError(
            errors.BAD_MESSAGE,
            f"header bytes_per_block {header.bytes_per_block} != its layout's "
            f"{header.layout.bytes_per_block}",
        )


@dataclass(slots=True)
class BlockRun:
    """Consecutive blocks ready to import, in prefix order. `first_block` is the index
    within the transfer (the index in the request's chain is header.first_block +
    first_block); `parent_hash` is the hash of the block before the first (None at the
    start of the sequence). Payloads are views into the received data: copy what must
    outlive the importer call."""

    first_block: int
    hashes: list[int]
    payloads: list[memoryview]
    parent_hash: int | None

    @property
    def nbytes(self) -> int:
        return sum(len(p) for p in self.payloads)


class Assembler:
    """The receiver's view of one transfer's byte stream.

    `admit(chunk)` when a chunk's metadata arrives (order, offsets, sizes, the window);
    `assemble(chunk, data)` when it is processed (checksum, blocks out); `consumed(n)` once
    the importer is done with n bytes. Raises TransferError on anything wrong.
    """

    __slots__ = (
        "_fill",
        "_next_block",
        "_partial",
        "blocks_out",
        "consumed_bytes",
        "done",
        "header",
        "high_water",
        "next_seq",
        "received",
        "window",
    )

    def __init__(self, header: KvTransferHeader, window_bytes: int) -> None:
        check_header(header)
        self.header = header
        self.window = effective_window(window_bytes, header.bytes_per_block)
        self.next_seq = 0
        self.received = 0  # bytes admitted (offset of the next chunk)
        self.consumed_bytes = 0  # bytes the importer is done with
        self.high_water = 0  # most bytes held at once
        self.blocks_out = 0  # blocks handed out by assemble
        self.done = False  # the last chunk was admitted
        self._next_block = 0
        self._partial: bytearray | None = None
        self._fill = 0

    @property
    def held_bytes(self) -> int:
        """Bytes received and not yet consumed: what this transfer costs in memory."""
        return self.received - self.consumed_bytes

    def admit(self, chunk: KvTransferChunk) -> None:
        h = self.header
        tid = h.transfer_id
        if self.done:
            raise TransferError(errors.BAD_MESSAGE, f"transfer {tid}: chunk after the last one")
        if chunk.seq != self.next_seq:
            raise TransferError(
                errors.TRUNCATED,
                f"transfer {tid}: expected chunk {self.next_seq}, got {chunk.seq} (lost chunks)",
            )
        if chunk.offset != self.received:
            raise TransferError(
                errors.TRUNCATED,
                f"transfer {tid}: chunk {chunk.seq} starts at byte {chunk.offset}, expected "
                f"{self.received}",
            )
        end = chunk.offset + chunk.size
        if end > h.total_bytes:
            raise TransferError(
                errors.BAD_MESSAGE,
                f"transfer {tid}: chunk {chunk.seq} ends at byte {end}, past the "
                f"{h.total_bytes} announced",
            )
        if chunk.last != (end == h.total_bytes):
            if chunk.last:
                raise TransferError(
                    errors.TRUNCATED,
                    f"transfer {tid}: ended after {end} of {h.total_bytes} bytes",
                )
            raise TransferError(
                errors.BAD_MESSAGE,
                f"transfer {tid}: chunk {chunk.seq} reaches the end but is not marked last",
            )
        if chunk.size == 0 and not chunk.last:
            raise TransferError(errors.BAD_MESSAGE, f"transfer {tid}: empty chunk {chunk.seq}")
        held = end - self.consumed_bytes
        if held > self.window:
            raise TransferError(
                errors.WINDOW_OVERRUN,
                f"transfer {tid}: chunk {chunk.seq} would hold {held} bytes, over the "
                f"{self.window}-byte window",
            )
        self.next_seq += 1
        self.received = end
        self.high_water = max(self.high_water, held)
        self.done = chunk.last

    def assemble(self, chunk: KvTransferChunk, data: Payload,
                 digest: int | None = None) -> list[BlockRun]:
        """Check an admitted chunk's bytes; the blocks it completes (at most one run).
        `digest`: the bytes' XXH3-64 when the caller computed it as they arrived."""
        h = self.header
        if len(data) != chunk.size:
            raise TransferError(
                errors.TRUNCATED,
                f"transfer {h.transfer_id}: chunk {chunk.seq} has {len(data)} bytes, "
                f"announced {chunk.size}",
            )
        if (checksum(data) if digest is None else digest) != chunk.checksum:
            raise TransferError(
                errors.CHECKSUM,
                f"transfer {h.transfer_id}: chunk {chunk.seq} (bytes {chunk.offset}.."
                f"{chunk.offset + chunk.size}) fails its checksum: torn or corrupted",
            )
        bpb = h.bytes_per_block
        first = self._next_block
        payloads: list[memoryview] = []
        if bpb == 0:
            if chunk.last:
                empty = memoryview(b"")
                payloads = [empty] * (h.num_blocks - first)
        else:
            mv = memoryview(data)
            pos, n = 0, len(mv)
            while pos < n:
                if self._partial is not None or n - pos < bpb:
                    if self._partial is None:
                        self._partial = bytearray(bpb)
                        self._fill = 0
                    take = min(bpb - self._fill, n - pos)
                    self._partial[self._fill : self._fill + take] = mv[pos : pos + take]
                    self._fill += take
                    pos += take
                    if self._fill == bpb:
                        payloads.append(memoryview(self._partial))
                        self._partial = None
                else:
                    k = (n - pos) // bpb
                    payloads.extend(mv[pos + i * bpb : pos + (i + 1) * bpb] for i in range(k))
                    pos += k * bpb
        if not payloads:
            return []
        self._next_block = first + len(payloads)
        self.blocks_out = self._next_block
        parent = h.parent_hash if first == 0 else h.hashes[first - 1]
        return [BlockRun(first, h.hashes[first : self._next_block], payloads, parent)]

    def consumed(self, nbytes: int) -> None:
        self.consumed_bytes += nbytes

    def release_all(self) -> None:
        """Forget everything held (the transfer failed or was cancelled)."""
        self._partial = None
        self.consumed_bytes = self.received

    @property
    def complete(self) -> bool:
        h = self.header
        return self.done and self.blocks_out == h.num_blocks and self.received == h.total_bytes
