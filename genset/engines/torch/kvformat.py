"""Self-describing byte format for exported KV-cache blocks.

Layout: b"GSKV", a little-endian u32 header length, a JSON header
{"format", "dtype", "shape": [blocks, layers, 2, block_size, kv_heads, head_dim]}, then the
raw tensor bytes (C order). Block is the outermost dimension so one block's K and V for all
layers are contiguous: a payload splits into per-block payloads (what an offload store keys
by block hash) by slicing, without touching the tensor data.

The header is padded with spaces (still JSON) so the tensor bytes start at a multiple of
ALIGN: a bfloat16 header's values used to start at an odd offset, which made reading them as
numpy integers (the offload store's value check, `genset.offload.payload`) ~40 % slower
(bench/bench_offload_payload_check.py, docs/benchmarks.md). Readers take the header length
from the payload, so an unpadded payload (written before, e.g. kept in an offload store's
disk tier) reads as before, and a padded one reads with an older reader.
"""

from __future__ import annotations

import json
import struct

import torch

MAGIC = b"GSKV"
FORMAT = "genset-kv/1"
ALIGN = 16  # the tensor bytes start at a multiple of this (the header padded with spaces)
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class KVFormatError(ValueError):
    pass


def encode(blocks: torch.Tensor) -> bytes:
    """blocks: [n, layers, 2, block_size, kv_heads, head_dim] on any device."""
    if blocks.dtype not in _NAMES:
        raise KVFormatError(f"cannot export KV of dtype {blocks.dtype}")
    t = blocks.detach().contiguous().cpu()
    raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return encode_raw(_NAMES[t.dtype], list(t.shape), raw)


def read_header(data: bytes | bytearray | memoryview) -> tuple[dict, int]:
    """(header, offset of tensor bytes); checks magic, format, dtype and length."""
    mv = memoryview(data)
    if len(mv) < 8 or bytes(mv[:4]) != MAGIC:
        raise KVFormatError("not a genset KV payload (bad magic)")
    (hlen,) = struct.unpack("<I", mv[4:8])
    try:
        header = json.loads(bytes(mv[8 : 8 + hlen]))
        shape = [int(x) for x in header["shape"]]
        dtype = _DTYPES[header["dtype"]]
    except (ValueError, KeyError, TypeError) as e:
        raise KVFormatError(f"bad KV payload header: {e}") from e
    if header.get("format") != FORMAT:
        raise KVFormatError(f"unsupported KV format {header.get('format')!r}, want {FORMAT}")
    if len(shape) != 6 or shape[2] != 2 or min(shape) < 0:
        raise KVFormatError(f"bad KV payload shape {shape}")
    header["shape"] = shape
    n = 1
    for s in shape:
        n *= s
    want = n * torch.empty((), dtype=dtype).element_size()
    if len(mv) - 8 - hlen != want:
        raise KVFormatError(
            f"KV payload holds {len(mv) - 8 - hlen} data bytes, header {shape} "
            f"{header['dtype']} implies {want}"
        )
    return header, 8 + hlen


def decode(data: bytes | bytearray | memoryview) -> torch.Tensor:
    header, off = read_header(data)
    dtype = _DTYPES[header["dtype"]]
    buf = bytearray(memoryview(data)[off:])  # writable copy: the tensor owns its memory
    if not buf:
        return torch.empty(header["shape"], dtype=dtype)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(header["shape"])


def split(data: bytes) -> list[bytes]:
    """One payload per block."""
    header, off = read_header(data)
    n, *rest = header["shape"]
    if n == 0:
        return []
    per = (len(data) - off) // n
    return [
        encode_raw(header["dtype"], [1, *rest], data[off + i * per : off + (i + 1) * per])
        for i in range(n)
    ]


def join(parts: list[bytes]) -> bytes:
    """Concatenate per-block (or multi-block) payloads of the same layout into one."""
    if not parts:
        raise KVFormatError("nothing to join")
    first, _ = read_header(parts[0])
    count, chunks = 0, []
    for p in parts:
        h, off = read_header(p)
        if h["dtype"] != first["dtype"] or h["shape"][1:] != first["shape"][1:]:
            raise KVFormatError(
                f"cannot join KV payloads of layout {h['dtype']} {h['shape'][1:]} and "
                f"{first['dtype']} {first['shape'][1:]}"
            )
        count += h["shape"][0]
        chunks.append(memoryview(p)[off:])
    return encode_raw(first["dtype"], [count, *first["shape"][1:]], b"".join(chunks))


def encode_raw(dtype: str, shape: list[int], raw: bytes) -> bytes:
    header = json.dumps(
        {"format": FORMAT, "dtype": dtype, "shape": shape}, separators=(",", ":")
    ).encode()
    header += b" " * (-(len(MAGIC) + 4 + len(header)) % ALIGN)
    return MAGIC + struct.pack("<I", len(header)) + header + bytes(raw)
