"""Router index micro-benchmarks: KV event ingest rate and lookup latency.

    .venv/bin/python bench/bench_router_index.py [--workers 64] [--prompt-tokens 12000]

- ingest: `KvEventBatch`es of Stored (32 blocks each) and Removed events from `--workers`
  workers, applied to the index in one process; reported as block events/s, both for decoded
  batches (what the index does) and from msgpack bytes (decode + apply, what the service does).
- lookup: every worker holds prefixes of the prompt (random depths, so the walk narrows as
  it goes); one lookup = hash a `--prompt-tokens` prompt (packed int32 bytes, as it arrives
  in a RouteRequest) into chained block hashes + walk the index; and a full routing
  decision (lookup + load model + genset policy over all workers).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from _common import pct

import proto
from genset.kv.hashing import block_hashes
from genset.routing.core import RouterConfig, RouterCore
from genset.routing.index import PrefixIndex


def bench_ingest(workers: int, batches: int, blocks_per_event: int) -> dict:
    rng = random.Random(1)
    msgs = []
    for i in range(batches):
        w = i % workers
        hs = [rng.getrandbits(64) for _ in range(blocks_per_event)]
        events = [proto.Stored(parent_hash=None, blocks=[proto.StoredBlock(hash=h) for h in hs])]
        if i % 4 == 3:  # every 4th batch also evicts what an earlier batch stored
            events.append(proto.Removed(hashes=[b.hash for b in msgs[i - 3].events[0].blocks]))
        msgs.append(proto.KvEventBatch(worker_id=1000 + w, event_id=i // workers + 1, events=events))
    block_events = sum(sum(len(e.blocks) if isinstance(e, proto.Stored) else len(e.hashes)
                           for e in m.events) for m in msgs)
    raw = [proto.encode(m) for m in msgs]

    def run_decoded() -> float:
        idx = PrefixIndex()
        t0 = time.perf_counter()
        for m in msgs:
            idx.apply_batch(m)
        return time.perf_counter() - t0

    def run_bytes() -> float:
        idx = PrefixIndex()
        t0 = time.perf_counter()
        for data in raw:
            idx.apply_batch(proto.decode(data, proto.KvEventBatch))
        return time.perf_counter() - t0

    dec = statistics.median(run_decoded() for _ in range(3))
    byt = statistics.median(run_bytes() for _ in range(3))
    return {"block_events": block_events, "decoded_events_per_s": block_events / dec,
            "from_bytes_events_per_s": block_events / byt}


def bench_lookup(workers: int, prompt_tokens: int, block_size: int, iters: int) -> dict:
    rng = random.Random(2)
    toks = [rng.randrange(1, 32000) for _ in range(prompt_tokens)]
    data = proto.pack_tokens(toks)
    hashes = block_hashes(data, block_size)
    core = RouterCore(RouterConfig(block_size=block_size, seed=1))
    for w in range(workers):
        core.add_worker(1000 + w, model="m", block_size=block_size, kv_blocks=100_000)
        depth = rng.randrange(0, len(hashes) + 1)
        core.index.store_hashes(1000 + w, hashes[:depth])
        core.index.store_hashes(1000 + w, [rng.getrandbits(64) for _ in range(2000)])  # other prefixes
    idx = core.index

    def timed(fn) -> list[float]:
        out = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e6)
        out.sort()
        return out

    hash_only = timed(lambda: block_hashes(data, block_size))
    lookup = timed(lambda: idx.overlaps(block_hashes(data, block_size)))
    walk = timed(lambda: idx.overlaps(hashes))
    n = [0]

    def decide() -> None:
        n[0] += 1
        rid = f"r{n[0]}"
        core.route_tokens(rid, data, prompt_tokens, 64, model="m")
        core.on_done(rid)

    decision = timed(decide)

    return {name: {"p50_us": pct(v, 0.5), "p99_us": pct(v, 0.99)} for name, v in
            [("hash", hash_only), ("hash+lookup", lookup), ("lookup_walk_only", walk),
             ("full_decision", decision)]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=12000)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--batches", type=int, default=20000)
    ap.add_argument("--iters", type=int, default=2000)
    args = ap.parse_args()
    ing = bench_ingest(args.workers, args.batches, 32)
    print(f"ingest: {ing['block_events']} block events; decoded batches {ing['decoded_events_per_s'] / 1e6:.2f} M/s; "
          f"from msgpack bytes {ing['from_bytes_events_per_s'] / 1e6:.2f} M/s")
    for bs in sorted({args.block_size, 64}):
        res = bench_lookup(args.workers, args.prompt_tokens, bs, args.iters)
        for name, r in res.items():
            print(f"lookup {args.workers} workers, {args.prompt_tokens} tokens, block {bs}: {name:<17} "
                  f"p50 {r['p50_us']:.0f} us  p99 {r['p99_us']:.0f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
