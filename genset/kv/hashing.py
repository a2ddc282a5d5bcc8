"""Chained KV block hashes: the identity of a cached prefix, shared by engines and the router.

Byte layout (the same scheme as NVIDIA Dynamo's kv-router, so its engines' events could be
ingested; XXH3 is the 64-bit XXH3 of xxHash 0.8, all integers little-endian):

1. A prompt is cut into blocks of `block_size` tokens. Only **full** blocks get a hash; a
   trailing partial block has none (it is not shareable until it fills).
2. Local hash of block i: ``local_i = XXH3_64(seed=1337, bytes = tokens of block i, each as a
   u32 little-endian)``, i.e. ``4 * block_size`` bytes. (Dynamo: `compute_block_hash_for_seq`,
   `LocalBlockHash`.)
3. Block hash (Dynamo's "sequence hash", `compute_seq_hash_for_block`):
   ``h_0 = local_0`` for the first block of a sequence, and
   ``h_i = XXH3_64(seed=1337, bytes = u64_le(h_{i-1}) || u64_le(local_i))`` (16 bytes) after.
   When a chain continues from a known parent (``parent`` argument), the first new block is
   chained to it like any later block.

So a block hash names the whole prefix that ends with that block: equal prompts share hashes
up to their first differing block, and a change in any earlier block changes every later hash.
Hashes are unsigned 64-bit ints (0 .. 2**64-1), exactly what `proto.kv.StoredBlock.hash`
carries.

Token ids may be given as a list/sequence of ints, an `array.array`, a numpy integer array,
or packed int32 little-endian bytes (`proto.tokens.pack_tokens`): for non-negative ids the
int32 LE and u32 LE byte strings are identical, so wire bytes are hashed without unpacking.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence

import xxhash

HASH_SEED = 1337

_xxh3 = xxhash.xxh3_64_intdigest
_pack_pair = struct.Struct("<QQ").pack
_NATIVE_LE = sys.byteorder == "little"


def _token_bytes(token_ids: object) -> bytes | memoryview:
    """The tokens as u32 little-endian bytes (no copy when they already are)."""
    if isinstance(token_ids, bytes | bytearray | memoryview):
        if len(token_ids) % 4:
            raise ValueError(
                f"packed token ids must be a multiple of 4 bytes, got {len(token_ids)}"
            )
        return token_ids
    if isinstance(token_ids, array) and token_ids.itemsize == 4 and _NATIVE_LE:
        return token_ids.tobytes()
    if hasattr(token_ids, "dtype"):  # numpy without importing numpy here
        return token_ids.astype("<u4", copy=False).tobytes()  # type: ignore[attr-defined]
    arr = array("I", token_ids)  # type: ignore[arg-type]
    if not _NATIVE_LE:
        arr.byteswap()
    return arr.tobytes()


def local_block_hash(block_token_ids: Sequence[int] | bytes) -> int:
    """XXH3-64 (seed 1337) of one block's tokens as u32 LE: Dynamo's `LocalBlockHash`."""
    return _xxh3(_token_bytes(block_token_ids), HASH_SEED)


def chain_hash(parent_hash: int | None, local_hash: int) -> int:
    """The block hash of a block whose local hash is `local_hash`, after `parent_hash`."""
    if parent_hash is None:
        return local_hash
    return _xxh3(_pack_pair(parent_hash, local_hash), HASH_SEED)


def block_hashes(token_ids: object, block_size: int, parent: int | None = None) -> list[int]:
    """Chained hashes of every full block of `token_ids` (a trailing partial block is left out).

    `parent` is the hash of the block just before `token_ids[0]` when the tokens continue an
    already-hashed sequence; None at the start of a sequence.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    data = memoryview(_token_bytes(token_ids))
    stride = 4 * block_size
    end = len(data) - len(data) % stride
    out: list[int] = []
    append = out.append
    prev = parent
    for start in range(0, end, stride):
        local = _xxh3(data[start : start + stride], HASH_SEED)
        prev = local if prev is None else _xxh3(_pack_pair(prev, local), HASH_SEED)
        append(prev)
    return out


def extend_block_hashes(hashes: list[int], token_ids: Sequence[int], block_size: int) -> list[int]:
    """Append to `hashes` the hashes of full blocks of `token_ids` it does not have yet.

    `hashes` must be the block hashes of a prefix of `token_ids` (as this function leaves
    them), so a growing sequence is hashed once per block over its lifetime. Returns the
    newly added hashes (a list, possibly empty).
    """
    done = len(hashes)
    full = len(token_ids) // block_size
    if full <= done:
        return []
    parent = hashes[-1] if hashes else None
    new = block_hashes(token_ids[done * block_size : full * block_size], block_size, parent)
    hashes.extend(new)
    return new


class BlockHasher:
    """Incremental hashing of one sequence whose tokens arrive in pieces (e.g. a stream).

    >>> h = BlockHasher(block_size=4)
    >>> h.extend([1, 2, 3])         # no full block yet
    []
    >>> len(h.extend([4, 5]))       # block [1, 2, 3, 4] is now full
    1
    """

    __slots__ = ("_parent_offset", "_pending", "block_size", "hashes")

    def __init__(self, block_size: int, parent: int | None = None) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.hashes: list[int] = []
        self._pending: list[int] = []
        if parent is not None:
            self.hashes.append(parent)  # kept only as the chain's parent, hidden by block_hashes
        self._parent_offset = 1 if parent is not None else 0

    @property
    def block_hashes(self) -> list[int]:
        """Hashes of the full blocks added so far (without a given parent)."""
        return self.hashes[self._parent_offset :]

    @property
    def last_hash(self) -> int | None:
        return self.hashes[-1] if self.hashes else None

    def extend(self, token_ids: Sequence[int]) -> list[int]:
        """Add tokens; return the hashes of the blocks that became full."""
        self._pending.extend(token_ids)
        full = len(self._pending) // self.block_size
        if not full:
            return []
        cut = full * self.block_size
        new = block_hashes(self._pending[:cut], self.block_size, self.last_hash)
        del self._pending[:cut]
        self.hashes.extend(new)
        return new
