"""What the offload store can check of a block's KV payload without the model: that its values
are finite (pure, numpy; no torch, which the store does not load).

A torch worker's block payload is self-describing (`genset.engines.torch.kvformat`: b"GSKV", a
u32 LE header length, a JSON header {"format", "dtype", "shape"}, then the raw tensor bytes);
the header is read here the same way, without importing torch. A payload in another form (the
mocker's, an empty one, a future format or dtype) says nothing the store can check: it is
kept unchecked (None). One whose GSKV header is unreadable, or whose bytes do not match it, is
refused (`bad_payload`): no engine can import it, as one holding a NaN or an infinity
(`non_finite`) is refused by every torch worker on import
(`genset.engines.torch.engine._out_of_range`), so keeping it only wastes the transfers.
What the store cannot check is the engine's other import bound, finite values beyond what
the model can compute (`runner.kv_value_bound`): that needs the model's weights
(docs/architecture.md, Known limits).

The check reads the bits: a float is NaN or infinite exactly when its exponent bits are all
ones, so `max(u & exponent_mask) == exponent_mask` over the payload viewed as unsigned
integers, one temporary and one SIMD reduction, the same for float16, bfloat16 (which numpy
has no type for) and float32. Per clean block (bench/bench_offload_payload_check.py,
2026-12-07 18:45-18:47 UTC, load 0.3-1.2, 2-core box): the tiny model's 32 KiB float32 block
~7-9 us (~11-16 us parsing the header's JSON each time: hence `_layouts`); a Llama-8B-shaped
2 MiB block ~80-85 us in float16, ~115-120 us in bfloat16 when its values start at an odd
offset (unaligned for numpy), as kvformat wrote it before it padded its header: 73-81 us
since (20:56-20:58 UTC, load 2.2-2.7, the same bench, which times both), below the engine's
own `torch.aminmax` (~121 us); numpy's `isfinite().all()` took 1.5 ms on the float16 one.
A payload written unpadded (the disk tier may hold some) reads and checks as before, at the
old cost. docs/architecture.md, Security.
"""

from __future__ import annotations

import json
import struct

import numpy as np

KV_MAGIC = b"GSKV"  # genset.engines.torch.kvformat.MAGIC
KV_FORMAT = "genset-kv/1"  # genset.engines.torch.kvformat.FORMAT
MAX_HEADER_BYTES = 4096  # a real header is ~90 bytes

NON_FINITE = "non_finite"
BAD_PAYLOAD = "bad_payload"

# dtype name (kvformat's) -> (unsigned integer type of its width, its exponent bits)
_EXPONENT = {
    "float32": (np.dtype("<u4"), 0x7F800000),
    "float16": (np.dtype("<u2"), 0x7C00),
    "bfloat16": (np.dtype("<u2"), 0x7F80),
}


# Parsed headers by their bytes: every block of one model has the same header, and parsing
# its JSON was half of a 32 KiB block's check (~4 of ~9 us)
MAX_LAYOUTS = 64
_UNKNOWN = "unknown"
_layouts: dict[bytes, tuple | str] = {}


def _layout(header_bytes: bytes):
    """A header's (dtype, unsigned type, exponent mask, dims, values), _UNKNOWN (a format or
    dtype this store cannot read) or (BAD_PAYLOAD, why)."""
    try:
        header = json.loads(header_bytes)
        fmt, dtype, shape = header.get("format"), header.get("dtype"), header["shape"]
        dims = [int(x) for x in shape]
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError,
            RecursionError) as exc:
        return BAD_PAYLOAD, f"KV payload header unreadable: {exc}"
    if fmt != KV_FORMAT or dtype not in _EXPONENT:
        return _UNKNOWN
    utype, mask = _EXPONENT[dtype]
    n = 1
    for d in dims:
        if d < 0:
            return BAD_PAYLOAD, f"KV payload shape {dims}"
        n *= d
    return dtype, utype, mask, dims, n


def payload_problem(data: bytes | bytearray | memoryview) -> tuple[str, str] | None:
    """Why a block with this KV payload is refused, as (reason, text), or None: keep it
    (its values are finite, or it is not a payload whose values the store can read)."""
    mv = memoryview(data)
    if len(mv) < 8 or mv[:4] != KV_MAGIC:
        return None
    (hlen,) = struct.unpack_from("<I", mv, 4)
    if hlen > MAX_HEADER_BYTES or 8 + hlen > len(mv):
        return BAD_PAYLOAD, f"KV payload header of {hlen} bytes in a {len(mv)}-byte payload"
    key = bytes(mv[8:8 + hlen])
    layout = _layouts.get(key)
    if layout is None:
        layout = _layout(key)
        if isinstance(layout, tuple) and layout[0] == BAD_PAYLOAD:
            return layout
        if len(_layouts) >= MAX_LAYOUTS:  # a peer sending ever new headers: start over
            _layouts.clear()
        _layouts[key] = layout
    if layout is _UNKNOWN:
        return None  # a format or dtype this store does not know: nothing it can tell
    dtype, utype, mask, dims, n = layout
    raw = mv[8 + hlen:]
    if len(raw) != n * utype.itemsize:
        return BAD_PAYLOAD, (f"KV payload holds {len(raw)} data bytes, its header "
                             f"{dims} {dtype} says {n * utype.itemsize}")
    if n == 0:
        return None
    u = np.frombuffer(raw, dtype=utype)
    if int(np.bitwise_and(u, utype.type(mask)).max()) == mask:
        return NON_FINITE, f"KV payload ({dtype}) holds NaN or infinite values"
    return None
