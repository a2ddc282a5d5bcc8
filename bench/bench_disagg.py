"""Time to first token of a disaggregated request against an aggregated one, torch engine.

Starts its own nats-server and etcd; three workers in this process (one event loop, each
engine stepping in its own thread): an aggregated worker, a prefill worker and a decode
worker that sends every prefill there (`--disagg always`). For each prompt length and round a
fresh prompt (nothing cached anywhere) goes to the aggregated worker and another to the
decode worker, greedy, `--max-tokens` tokens; alternating which goes first. Reported
(medians over rounds):

- TTFT: request sent -> first token frame received. Disaggregated, the first token is the
  prefill worker's, forwarded before the KV moves: the overhead over aggregated is the
  decision, one request/reply hop and the prefill worker's own queueing;
- 2nd token: first frame -> second frame. Disaggregated, this gap holds the KV transfer and
  import and the decode worker's prefill of the last partial block plus the first token;
- total: request sent -> last frame.

    .venv/bin/python bench/bench_disagg.py                       # 128, 512, 1024 tokens
    .venv/bin/python bench/bench_disagg.py --lengths 256 --rounds 5 --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import proto
from genset.disagg.worker import DisaggConfig, DisaggHook
from genset.runtime.bus import Bus
from genset.runtime.discovery import Discovery
from genset.runtime.infra import EtcdServer, NatsServer
from genset.runtime.metrics import Metrics
from genset.worker import HostConfig, WorkerHost


async def make_host(bus, disc, ns: str, role: str, args) -> tuple[WorkerHost, Metrics]:
    from genset.engines.torch.engine import TorchEngine

    wid = int(uuid.uuid4().int & ((1 << 63) - 1)) or 1
    metrics = Metrics(process_metrics=False)
    engine = TorchEngine(args.model, worker_id=wid, num_blocks=args.kv_blocks, block_size=16,
                         device=args.device)
    hook = None
    if role != "both":
        hook = DisaggHook(DisaggConfig(policy="always", transport=args.transport),
                          discovery=disc, metrics=metrics)
    host = WorkerHost(engine, bus=bus, discovery=disc, instance_id=wid, metrics=metrics,
                      hooks=hook, config=HostConfig(namespace=ns, model="m", role=role,
                                                   # a decode worker's record names its KV
                                                   # TCP endpoint (genset.disagg.endpoints)
                                                   register_instance=role == "decode"))
    await host.start()
    return host, metrics


async def one(bus, host: WorkerHost, tokens: list[int], max_tokens: int) -> tuple[float, ...]:
    req = proto.GenerateRequest(request_id=uuid.uuid4().hex, model="m",
                                token_ids=proto.pack_tokens(tokens),
                                sampling=proto.SamplingParams(temperature=0.0),
                                stop=proto.StopConditions(max_tokens=max_tokens, ignore_eos=True))
    t0 = time.perf_counter()
    stream = await bus.stream_request(host.generate_subject, req, timeout=300)
    times = []
    async for chunk in stream:
        if chunk.token_ids:
            times.append(time.perf_counter())
    first, second = times[0], times[1] if len(times) > 1 else times[0]
    return (first - t0) * 1e3, (second - first) * 1e3, (times[-1] - t0) * 1e3


async def main(args) -> None:
    nats = NatsServer().start()
    etcd = EtcdServer().start()
    bus = await Bus.connect(nats.url, name="bench-disagg")
    disc = await Discovery.connect(etcd.endpoint, ttl=10.0)
    ns = f"b{uuid.uuid4().hex[:6]}"
    hosts = []
    try:
        agg, _ = await make_host(bus, disc, ns, "both", args)
        pre, _ = await make_host(bus, disc, ns, "prefill", args)
        dec, _ = await make_host(bus, disc, ns, "decode", args)
        hosts = [dec, pre, agg]
        for _ in range(600):  # the decode worker sees the prefill worker's card
            if len(dec.hooks.pool):
                break
            await asyncio.sleep(0.05)
        rng = random.Random(1)
        print(f"torch {args.model} on {args.device}, {args.max_tokens} tokens, transport "
              f"{args.transport}, medians of {args.rounds} rounds (ms)")
        print(f"{'prompt':>7} | {'TTFT agg':>9} {'disagg':>8} {'overhead':>9} | "
              f"{'2nd tok agg':>11} {'disagg':>8} | {'total agg':>9} {'disagg':>8}")
        for n in args.lengths:
            res: dict[str, list[tuple[float, ...]]] = {"agg": [], "dis": []}
            for _ in range(args.warmup):
                await one(bus, agg, [rng.randrange(3, 4000) for _ in range(n)], 2)
                await one(bus, dec, [rng.randrange(3, 4000) for _ in range(n)], 2)
            for r in range(args.rounds):
                order = [("agg", agg), ("dis", dec)]
                if r % 2:
                    order.reverse()
                for name, host in order:
                    tokens = [rng.randrange(3, 4000) for _ in range(n)]
                    res[name].append(await one(bus, host, tokens, args.max_tokens))
            med = {k: [statistics.median(x[i] for x in v) for i in range(3)]
                   for k, v in res.items()}
            a, d = med["agg"], med["dis"]
            print(f"{n:>7} | {a[0]:>9.1f} {d[0]:>8.1f} {d[0] - a[0]:>+9.1f} | {a[1]:>11.1f} "
                  f"{d[1]:>8.1f} | {a[2]:>9.1f} {d[2]:>8.1f}")
        m = dec.hooks.m
        print(f"remote prefills done: {m.remote_done._value.get():.0f}")
    finally:
        for h in hosts:
            await h.close()
        await disc.close()
        await bus.close()
        nats.cleanup()
        etcd.cleanup()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")],
                   default=[128, 512, 1024])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--kv-blocks", type=int, default=2048)
    p.add_argument("--transport", default="auto", choices=("auto", "nats", "tcp"))
    asyncio.run(main(p.parse_args()))
