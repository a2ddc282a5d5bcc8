"""What the offload store's KV-value check costs per block (genset.offload.payload.
payload_problem: a NaN / infinity in a torch worker's payload), against the rest of a put's
per-block work (the hash check), on clean blocks (the whole payload is read: the worst case).

Block shapes: the tiny model's (4 layers, 2 KV heads x 32, 16 tokens, float32: 32 KiB) and a
Llama-3-8B-shaped one (32 layers, 8 KV heads x 128, 16 tokens, bfloat16: 2 MiB); also a
Llama-8B block in float16. Each as kvformat writes it now (header padded: values at a
multiple of 16) and, for the Llama-8B ones, as it wrote it before (values right after the
JSON header: at an odd offset in bfloat16). Alternatives timed beside it, in the same rounds,
alternated:
numpy's isfinite().all() on the float view (no bfloat16 in numpy) and the engine's own
torch.aminmax (when torch is installed; the store does not load torch).

    nice -n 10 .venv/bin/python bench/bench_offload_payload_check.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from genset.kv.hashing import chain_hash, local_block_hash
from genset.offload.payload import _layouts, payload_problem

ALIGN = 16  # genset.engines.torch.kvformat.ALIGN (the store does not load torch)
SHAPES = {  # name: (dtype, shape, header padded)
    "tiny f32 (32 KiB)": ("float32", (1, 4, 2, 16, 2, 32), True),
    "llama8b bf16 (2 MiB)": ("bfloat16", (1, 32, 2, 16, 8, 128), True),
    "llama8b bf16 (2 MiB, unpadded: before)": ("bfloat16", (1, 32, 2, 16, 8, 128), False),
    "llama8b f16 (2 MiB)": ("float16", (1, 32, 2, 16, 8, 128), True),
    "llama8b f16 (2 MiB, unpadded: before)": ("float16", (1, 32, 2, 16, 8, 128), False),
}


def payload(dtype: str, shape: tuple[int, ...], rng, padded: bool = True) -> bytes:
    values = rng.standard_normal(int(np.prod(shape))).astype(np.float32)
    if dtype == "bfloat16":  # the top half of each float32
        raw = (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    else:
        raw = values.astype(dtype).tobytes()
    header = json.dumps({"format": "genset-kv/1", "dtype": dtype, "shape": list(shape)},
                        separators=(",", ":")).encode()
    if padded:
        header += b" " * (-(8 + len(header)) % ALIGN)
    return b"GSKV" + struct.pack("<I", len(header)) + header + raw


def per_call_us(fn, arg, budget_s: float = 0.25) -> float:
    """Median µs per call over batches of calls filling ~budget_s."""
    n, t = 1, 0.0
    while t < 0.02:  # size a batch to ~20 ms
        t0 = time.perf_counter()
        for _ in range(n):
            fn(arg)
        t = time.perf_counter() - t0
        if t < 0.02:
            n *= 2
    samples = []
    end = time.perf_counter() + budget_s
    while time.perf_counter() < end or len(samples) < 5:
        t0 = time.perf_counter()
        for _ in range(n):
            fn(arg)
        samples.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(samples)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    tokens = struct.pack("<16i", *range(100, 116))
    th = local_block_hash(tokens)

    def hash_check(_):
        return chain_hash(12345, local_block_hash(tokens)) == th

    results: dict[str, dict[str, list[float]]] = {}
    for name, (dtype, shape, padded) in SHAPES.items():
        data = payload(dtype, shape, rng, padded)
        assert payload_problem(data) is None
        off = 8 + struct.unpack_from("<I", data, 4)[0]
        name = f"{name} [values at byte {off}]"
        def uncached(d):  # the header's JSON parsed every time (before the layout cache)
            _layouts.clear()
            return payload_problem(d)

        fns = {"payload_problem": (payload_problem, data),
               "... header not cached": (uncached, data)}
        if dtype != "bfloat16":
            fns["np.isfinite().all()"] = (
                lambda d, off=off, dt=dtype: bool(np.isfinite(np.frombuffer(d, dt, offset=off)
                                                               ).all()), data)
        if torch is not None:
            tdt = {"float32": torch.float32, "float16": torch.float16,
                   "bfloat16": torch.bfloat16}[dtype]
            buf = bytearray(data[off:])

            def aminmax(b, tdt=tdt):
                lo, hi = torch.aminmax(torch.frombuffer(b, dtype=tdt))
                return lo.item(), hi.item()
            fns["torch.aminmax (engine's)"] = (aminmax, buf)
        fns["hash check (for scale)"] = (hash_check, None)
        res = results[name] = {k: [] for k in fns}
        for _ in range(args.rounds):  # alternated: each round times every variant once
            for k, (fn, arg) in fns.items():
                res[k].append(per_call_us(fn, arg))
    for name, res in results.items():
        print(name)
        for k, v in res.items():
            runs = ", ".join(f"{x:.2f}" for x in v)
            print(f"  {k:28s} median {statistics.median(v):9.2f} us/block  (rounds: {runs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
