"""Blocks with real chained hashes for the offload store's tests and benchmark."""

from __future__ import annotations

import random

from genset.kv.hashing import block_hashes
from proto.offload import OffloadBlock
from proto.tokens import pack_tokens

BLOCK_SIZE = 16


def chain(seed: int, n: int, data_bytes: int = 256, parent: int | None = None
          ) -> list[OffloadBlock]:
    """`n` consecutive blocks of one sequence, hashed like an engine would, each with
    `data_bytes` of seeded payload (so corruption shows)."""
    rng = random.Random(seed)
    tokens = [rng.randrange(1, 30000) for _ in range(n * BLOCK_SIZE)]
    hashes = block_hashes(tokens, BLOCK_SIZE, parent)
    out = []
    prev = parent
    for i, h in enumerate(hashes):
        out.append(OffloadBlock(
            hash=h, parent_hash=prev,
            token_ids=pack_tokens(tokens[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]),
            data=rng.randbytes(data_bytes)))
        prev = h
    return out


def kv_payload(values, dtype: str = "float16", shape: tuple[int, ...] | None = None) -> bytes:
    """A torch worker's block payload (genset.engines.torch.kvformat's layout: b"GSKV", u32 LE
    header length, JSON header, raw values), built with numpy: float16 / float32 `values`
    (shape [1, layers, 2, block, kv heads, head dim]; default one of (1, 1, 2, 16, 1, n))."""
    import json
    import struct

    import numpy as np

    arr = np.ascontiguousarray(np.asarray(values, dtype=dtype))
    shape = shape or (1, 1, 2, 16, 1, arr.size // 32)
    header = json.dumps({"format": "genset-kv/1", "dtype": dtype, "shape": list(shape)},
                        separators=(",", ":")).encode()
    return b"GSKV" + struct.pack("<I", len(header)) + header + arr.tobytes()
