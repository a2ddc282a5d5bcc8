"""Onboarding into a small KV cache, live: is what workers onboard from the store used?

In-process: its own nats-server and etcd, a real offload store (`OffloadService`), two mocker
workers (`WorkerHost` + `OffloadHook`, `--kv-blocks` blocks of 16 tokens, real-time steps)
and N closed-loop clients sending ~1,480-token prompts that share 12 prefixes, each request
to a worker drawn at random (no router). What `genset up --engine mocker
--worker-arg=--kv-blocks=128` with 8 clients showed: thousands of blocks onboarded, 0 cached
tokens on almost every request.

    .venv/bin/python bench/bench_onboard_small_cache.py --requests 200 --clients 8

Prints one JSON line: requests, those with 0 cached tokens, prompt tokens served from the
cache, blocks the store served, blocks the workers onboarded (imported), onboarded blocks
evicted before any request used them (`BlockPool.num_imports_evicted_unused`; null where
the code has no such counter), blocks dropped for want of room (`import_blocks_no_room`),
lookups skipped for want of room, blocks held in host memory until admission and used
there, time to each request's first frame (p50, mean), wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import proto
from genset.engines.mocker import MockerConfig, PolynomialTiming, create_mocker_engine
from genset.runtime.bus import Bus
from genset.runtime.discovery import Discovery
from genset.runtime.infra import EtcdServer, NatsServer
from genset.runtime.metrics import Metrics
from genset.worker import HostConfig, WorkerHost
from genset.worker.offload_hook import OffloadHook, OffloadHookConfig
from tests.helpers.waiting import until
from tests.stack import metric, parse_metrics
from tests.test_offload_service import running_store

BS = 16


async def main(args) -> dict:
    nats, etcd = NatsServer().start(), EtcdServer().start()
    ns = f"b{uuid.uuid4().hex[:8]}"
    bus = await Bus.connect(nats.url, name="bench")
    disc = await Discovery.connect(etcd.endpoint, ttl=5.0)
    workers = []
    try:
        async with running_store(nats, etcd, ns, offload_ram_gb=1.0) as store:
            for _ in range(args.workers):
                iid = int(uuid.uuid4().int & ((1 << 63) - 1)) or 1
                engine = create_mocker_engine(MockerConfig(
                    block_size=BS, num_blocks=args.kv_blocks, vocab_size=32000,
                    context_length=8192, timing=PolynomialTiming(
                        speedup_ratio=args.speedup, dynamo_exact=True)), worker_id=iid)
                hook = OffloadHook(discovery=disc, metrics=None, config=OffloadHookConfig(
                    max_held_bytes=int(args.hold_mb * (1 << 20))))
                host = WorkerHost(engine, bus=bus, discovery=disc, instance_id=iid,
                                  metrics=Metrics(process_metrics=False), hooks=hook,
                                  config=HostConfig(namespace=ns, model="m", tokenizer="tiny"))
                await host.start()
                workers.append((host, engine, hook))
            await until(lambda: all(h.client.instances for _, _, h in workers), 30,
                        what="the store seen by every worker")
            rng = random.Random(args.seed)
            prefixes = [[rng.randrange(3, 32000) for _ in range(args.prefix_tokens)]
                        for _ in range(12)]
            stats = {"requests": 0, "zero_cached": 0, "cached_tokens": 0, "errors": 0}
            left = [args.requests]
            ttfts: list[float] = []  # s, to each request's first frame

            async def client(c: int) -> None:
                crng = random.Random(args.seed * 1000 + c)
                while left[0] > 0:
                    left[0] -= 1
                    prompt = prefixes[crng.randrange(12)] + [
                        crng.randrange(3, 32000) for _ in range(args.suffix_tokens)]
                    host = workers[crng.randrange(len(workers))][0]
                    req = proto.GenerateRequest(
                        request_id=uuid.uuid4().hex, model="m",
                        token_ids=proto.pack_tokens(prompt),
                        stop=proto.StopConditions(max_tokens=args.max_tokens, ignore_eos=True),
                        sampling=proto.SamplingParams(temperature=0.0))
                    t_sent = time.monotonic()
                    stream = await bus.stream_request(host.generate_subject, req, timeout=60)
                    chunks = []
                    async for ch in stream:
                        if not chunks:
                            ttfts.append(time.monotonic() - t_sent)
                        chunks.append(ch)
                    final = chunks[-1]
                    if final.error is not None:
                        stats["errors"] += 1
                        continue
                    stats["requests"] += 1
                    stats["cached_tokens"] += final.usage.cached_tokens
                    stats["zero_cached"] += final.usage.cached_tokens == 0

            t0 = time.monotonic()
            await asyncio.gather(*(client(c) for c in range(args.clients)))
            stats["wall_s"] = round(time.monotonic() - t0, 1)
            ttfts.sort()
            if ttfts:
                stats["ttft_ms_p50"] = round(1000 * ttfts[len(ttfts) // 2], 1)
                stats["ttft_ms_mean"] = round(1000 * sum(ttfts) / len(ttfts), 1)
            served = metric(parse_metrics(store.metrics.render().decode()),
                            "genset_offload_lookup_blocks_total", tier="host")
            stats["store_served_blocks"] = served
            stats["onboarded_blocks"] = sum(h.counts["onboarded_blocks"] for _, _, h in workers)
            stats["lookups"] = sum(h.counts["lookups"] for _, _, h in workers)
            stats["skipped_no_room"] = sum(h.counts.get("skipped_no_room", 0)
                                           for _, _, h in workers)
            pools = [e.core.scheduler.pool for _, e, _ in workers]
            stats["onboarded_evicted_unused"] = (
                sum(p.num_imports_evicted_unused for p in pools)
                if hasattr(pools[0], "num_imports_evicted_unused") else None)
            stats["import_blocks_no_room"] = (
                sum(e.core.import_blocks_no_room for _, e, _ in workers)
                if hasattr(workers[0][1].core, "import_blocks_no_room") else None)
            scheds = [e.core.scheduler for _, e, _ in workers]
            if hasattr(scheds[0], "num_held_blocks"):
                stats["held_blocks"] = sum(s.num_held_blocks for s in scheds)
                stats["held_used"] = sum(s.num_held_used for s in scheds)
            return stats
    finally:
        for host, _, _ in workers:
            await host.close()
        await disc.close()
        await bus.close()
        nats.cleanup()
        etcd.cleanup()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--kv-blocks", type=int, default=128)
    ap.add_argument("--prefix-tokens", type=int, default=1400)
    ap.add_argument("--suffix-tokens", type=int, default=80)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--speedup", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hold-mb", type=float, default=256.0,
                    help="each worker's host memory for onboarded blocks held until their "
                         "request's admission (0: off, as before 2026-12-08)")
    print(json.dumps(asyncio.run(main(ap.parse_args()))))
