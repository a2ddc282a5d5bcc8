"""The offload store's check of a block's KV values (genset.offload.payload, pure): a torch
worker's payload (genset.engines.torch.kvformat) holding a NaN or an infinity is refused, in
float16, bfloat16 and float32, wherever the value sits; a clean one, one the store cannot read
(the mocker's, another format or dtype) is kept; one that does not match its own header is
refused as bad. Payloads built with kvformat itself, so the store's torch-free reader follows
the real format."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from genset.offload.payload import BAD_PAYLOAD, NON_FINITE, payload_problem

torch = pytest.importorskip("torch")
from genset.engines.torch import kvformat  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# one block of the tiny model: [1, layers 4, 2, block 16, kv heads 2, head dim 32]
SHAPE = (1, 4, 2, 16, 2, 32)


def block(dtype: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(SHAPE, generator=g) * 3).to(DTYPES[dtype])


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_a_clean_block_passes_and_any_nan_or_infinity_is_refused(dtype):
    t = block(dtype)
    assert payload_problem(kvformat.encode(t)) is None
    # the extremes of finite values pass: the largest, the smallest subnormal, -0.0
    info = torch.finfo(DTYPES[dtype])
    edge = t.clone().flatten()
    edge[:4] = torch.tensor([info.max, -info.max, info.smallest_normal / 4, -0.0])
    assert payload_problem(kvformat.encode(edge.view(SHAPE))) is None
    n = t.numel()
    for bad in (float("nan"), float("inf"), float("-inf"), -float("nan")):
        for at in (0, 1, n // 2 + 3, n - 1):
            poisoned = t.clone().flatten()
            poisoned[at] = bad
            why = payload_problem(kvformat.encode(poisoned.view(SHAPE)))
            assert why is not None and why[0] == NON_FINITE, (bad, at)
            assert dtype in why[1]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_bit_check_agrees_with_torch_isfinite_on_every_16_bit_pattern(dtype):
    """All 65 536 bit patterns, one value a block: refused exactly when torch says the value
    is not finite (NaN payloads with any mantissa, both signs)."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    values = torch.from_numpy(bits.view(np.int16).copy()).view(DTYPES[dtype])
    finite = torch.isfinite(values.float()).numpy()
    assert (~finite).sum() > 2  # NaNs and both infinities among them
    for i in np.flatnonzero(~finite).tolist() + list(range(0, 1 << 16, 251)):
        one = values[i].reshape(1, 1, 1, 1, 1, 1).expand(1, 1, 2, 1, 1, 1).clone()
        got = payload_problem(kvformat.encode(one))
        assert (got is None) == bool(finite[i]), (dtype, hex(i), got)


def test_float32_special_bit_patterns():
    specials = np.array([0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF,
                         0x7F7FFFFF, 0x00000001, 0x80000000], dtype=np.uint32)
    for u in specials.tolist():
        value = torch.from_numpy(np.array([u, 0], dtype=np.uint32).view(np.int32)
                                 ).view(torch.float32).reshape(1, 1, 2, 1, 1, 1)
        got = payload_problem(kvformat.encode(value))
        assert (got is None) == bool(torch.isfinite(value).all()), hex(u)


def test_what_the_store_cannot_read_is_kept_and_what_contradicts_itself_is_refused():
    from genset.engines.mocker import MOCK_KV_MAGIC

    assert payload_problem(b"") is None
    assert payload_problem(MOCK_KV_MAGIC + struct.pack("<Q", 4096)) is None  # the mocker's
    assert payload_problem(b"\x00" * 1000) is None  # some other engine's bytes
    nan = float("nan")
    raw = np.array([nan, 1.0], dtype=np.float32).tobytes()
    # a format or dtype this store does not know: nothing it can tell
    assert payload_problem(kvformat.encode_raw("float8", [1, 1, 2, 1, 1, 1], raw[:2])) is None
    header = json.dumps({"format": "genset-kv/2", "dtype": "float32",
                         "shape": [1, 1, 2, 1, 1, 1]}).encode()
    assert payload_problem(kvformat.MAGIC + struct.pack("<I", len(header)) + header + raw) \
        is None
    # the real format, contradicting itself: refused as bad (no engine can import it)
    good = kvformat.encode(block("float32"))
    for bad in (good[:-1], good + b"\x00\x00\x00\x00", good[:20],
                kvformat.MAGIC + struct.pack("<I", 1 << 30) + b"{}",
                kvformat.MAGIC + struct.pack("<I", 5) + b"{not json",
                kvformat.MAGIC + struct.pack("<I", 2) + b"[]",
                kvformat.encode_raw("float32", [1, -1, 2, 1, 1, 1], raw)):
        why = payload_problem(bad)
        assert why is not None and why[0] == BAD_PAYLOAD, bad[:40]
    header = b'{"format":"genset-kv/1","dtype":"float32","shape":[1e999]}'
    why = payload_problem(kvformat.MAGIC + struct.pack("<I", len(header)) + header)
    assert why is not None and why[0] == BAD_PAYLOAD
    # an empty block of the real format is kept (nothing in it)
    assert payload_problem(kvformat.encode_raw("bfloat16", [0, 4, 2, 16, 2, 32], b"")) is None
    # memoryview and bytearray as the store may hold them
    assert payload_problem(memoryview(good)) is None
    assert payload_problem(bytearray(good)) is None


def _unpadded(payload: bytes) -> bytes:
    """The same payload as written before kvformat padded its header (values right after
    the JSON)."""
    hlen = struct.unpack_from("<I", payload, 4)[0]
    header = payload[8:8 + hlen].rstrip(b" ")
    return b"GSKV" + struct.pack("<I", len(header)) + header + payload[8 + hlen:]


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_values_start_aligned_and_unpadded_payloads_still_read(dtype):
    """kvformat pads its header so the values start at a multiple of 16 (a bfloat16 block's
    started at an odd offset); a payload written before (an offload disk tier may hold
    some) is read, checked and decoded as before."""
    for shape in (SHAPE, (1, 32, 2, 16, 8, 128), (3, 1, 2, 1, 1, 1)):
        g = torch.Generator().manual_seed(1)
        t = torch.randn(shape, generator=g).to(DTYPES[dtype])
        data = kvformat.encode(t)
        header, off = kvformat.read_header(data)
        assert off % kvformat.ALIGN == 0 and header["dtype"] == dtype
        assert payload_problem(data) is None
        old = _unpadded(data)
        assert payload_problem(old) is None
        assert torch.equal(kvformat.decode(old).view(torch.uint8), t.view(torch.uint8))
        assert torch.equal(kvformat.decode(data).view(torch.uint8), t.view(torch.uint8))
        bad = bytearray(old)
        bad[-2:] = b"\xff\xff"  # NaN in every dtype's top bytes (float32: exponent ones)
        assert payload_problem(bytes(bad))[0] == NON_FINITE
        # per-block payloads of a padded one are padded too, and join back
        parts = kvformat.split(data)
        assert all(kvformat.read_header(p)[1] % kvformat.ALIGN == 0 for p in parts)
        assert kvformat.join(parts) == data
