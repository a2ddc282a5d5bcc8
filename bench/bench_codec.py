"""Encode+decode rate of wire messages: msgspec Structs (typed, validated decode) vs the same
content as plain dicts through the `msgpack` package (no validation at all).

    .venv/bin/python bench/bench_codec.py            # median of 7 repeats
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgpack

import proto
from proto.codec import decoder


def generate_request(prompt_tokens: int) -> proto.GenerateRequest:
    return proto.GenerateRequest(
        request_id="req-6f1c2a9e4b7d4e0f",
        model="Qwen/Qwen2.5-0.5B-Instruct",
        token_ids=proto.pack_tokens(list(range(1000, 1000 + prompt_tokens))),
        sampling=proto.SamplingParams(temperature=0.7, top_p=0.9, seed=42),
        stop=proto.StopConditions(max_tokens=256, stop_token_ids=[151645, 151643]),
        deadline_ms=1_790_000_000_000,
    )


def kv_batch(blocks: int, with_tokens: bool) -> proto.KvEventBatch:
    return proto.KvEventBatch(
        worker_id=0x5DEECE66D,
        event_id=123456,
        ts_ms=1_790_000_000_000,
        events=[proto.Stored(
            parent_hash=0xFEEDFACECAFEBEEF,
            blocks=[proto.StoredBlock(
                hash=(0x9E3779B97F4A7C15 * (i + 1)) & 0xFFFFFFFFFFFFFFFF,
                token_ids=proto.pack_tokens(list(range(i * 16, i * 16 + 16)))
                if with_tokens else None,
            ) for i in range(blocks)],
        )],
    )


def stream_chunk() -> proto.StreamChunk:
    return proto.StreamChunk(seq=17, token_ids=proto.pack_tokens([151644]))


def as_dict(message) -> dict:
    """The same content as nested plain dicts (what a hand-built msgpack protocol sends)."""
    return msgpack.unpackb(proto.encode(message))


def rate(fn, min_time: float) -> float:
    n, elapsed = 1, 0.0
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time:
            return n / elapsed
        n *= 2


def bench_message(name: str, message, repeat: int, min_time: float) -> str:
    typ = type(message)
    dec = decoder(typ).decode
    enc = proto.encode
    plain = as_dict(message)
    packb, unpackb = msgpack.packb, msgpack.unpackb
    size = len(enc(message))

    def typed() -> None:
        dec(enc(message))

    def dicts() -> None:
        unpackb(packb(plain))

    # back to back per repeat, so a burst of load from elsewhere hits both; ratios per repeat
    pairs = [(rate(typed, min_time), rate(dicts, min_time)) for _ in range(repeat)]
    ms = statistics.median(p[0] for p in pairs)
    mp = statistics.median(p[1] for p in pairs)
    ratio = statistics.median(p[0] / p[1] for p in pairs)
    return f"| {name} | {size} | {ms:,.0f} | {mp:,.0f} | {ratio:.1f}x |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--min-time", type=float, default=0.1, help="seconds per measurement")
    args = parser.parse_args()
    cases = [
        ("GenerateRequest, 512-token prompt", generate_request(512)),
        ("GenerateRequest, 8k-token prompt", generate_request(8192)),
        ("KvEventBatch, 1 Stored x 16 blocks (hashes only)", kv_batch(16, False)),
        ("KvEventBatch, 1 Stored x 16 blocks (+16 token ids each)", kv_batch(16, True)),
        ("StreamChunk, 1 token", stream_chunk()),
    ]
    print(f"encode+decode round trips per second, median of {args.repeat}")
    print("| message | bytes | msgspec Struct (typed decode) /s | msgpack dicts /s | ratio |")
    print("|---|---|---|---|---|")
    for name, message in cases:
        print(bench_message(name, message, args.repeat, args.min_time))


if __name__ == "__main__":
    main()
