"""Token ids on the wire: packed little-endian int32 bytes (lists cost ~2x in NATS throughput)."""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable

_NATIVE_LE = sys.byteorder == "little"


def pack_tokens(token_ids: Iterable[int]) -> bytes:
    arr = token_ids if isinstance(token_ids, array) and token_ids.typecode == "i" else array("i", token_ids)
    if not _NATIVE_LE:
        arr = array("i", arr)
        arr.byteswap()
    return arr.tobytes()


def unpack_tokens(data: bytes) -> list[int]:
    if len(data) % 4:
        raise ValueError(f"token_ids must be a multiple of 4 bytes (int32 LE), got {len(data)}")
    arr = array("i")
    arr.frombytes(data)
    if not _NATIVE_LE:
        arr.byteswap()
    return arr.tolist()


def token_count(data: bytes) -> int:
    return len(data) // 4
