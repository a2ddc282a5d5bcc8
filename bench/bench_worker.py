"""Worker host overhead: streamed tokens/s one worker serves when the engine costs ~nothing.

    .venv/bin/python bench/bench_worker.py --concurrency 64 --tokens 128 --runs 3

Starts its own NATS and etcd, a `WorkerHost` on a mocker engine with a huge speedup (step time
~0), and a requester in another process-less task on a second NATS connection; every request
streams `--tokens` chunks (one per engine step). Reports the median of the runs: output
tokens/s, requests/s, and the process's CPU seconds per 1,000 tokens (host + requester, both
in this process, so an upper bound on the host's share).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import median_of_runs

import proto
from genset.engines.mocker import MockerConfig, PolynomialTiming, create_mocker_engine
from genset.runtime.bus import Bus
from genset.runtime.discovery import Discovery
from genset.runtime.infra import EtcdServer, NatsServer
from genset.runtime.metrics import Metrics
from genset.worker import HostConfig, WorkerHost


async def run(concurrency: int, tokens: int, requests: int, runs: int) -> None:
    nats, etcd = NatsServer().start(), EtcdServer().start()
    try:
        host_bus = await Bus.connect(nats.url, name="bench-worker")
        client = await Bus.connect(nats.url, name="bench-client")
        discovery = await Discovery.connect(etcd.endpoint)
        engine = create_mocker_engine(MockerConfig(
            num_blocks=65536, vocab_size=1000, eos_token_ids=(0,), max_running=concurrency,
            timing=PolynomialTiming(speedup_ratio=1e9)), worker_id=1)
        host = WorkerHost(engine, bus=host_bus, discovery=discovery, instance_id=1,
                          metrics=Metrics(process_metrics=False),
                          config=HostConfig(namespace="bench", model="m"))
        await host.start()
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> int:
            async with sem:
                req = proto.GenerateRequest(
                    request_id=uuid.uuid4().hex, model="m",
                    token_ids=proto.pack_tokens([(i * 7 + j) % 997 + 1 for j in range(64)]),
                    stop=proto.StopConditions(max_tokens=tokens, ignore_eos=True))
                stream = await client.stream_request(host.generate_subject, req, timeout=120)
                n = 0
                async for chunk in stream:
                    n += len(chunk.token_ids) // 4
                return n

        results = []
        for _ in range(runs):
            cpu0, t0 = time.process_time(), time.perf_counter()
            got = await asyncio.gather(*(one(i) for i in range(requests)))
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            assert sum(got) == requests * tokens, sum(got)
            results.append((sum(got) / wall, requests / wall, cpu / sum(got) * 1000))
        for name, i in (("output tokens/s", 0), ("requests/s", 1), ("CPU s per 1k tokens", 2)):
            print(f"c={concurrency} tokens={tokens} {name}: "
                  f"{median_of_runs([r[i] for r in results])}")
        await host.drain(1.0)
        await host.close()
        await client.close()
        await host_bus.close()
        await discovery.close()
    finally:
        nats.cleanup()
        etcd.cleanup()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()
    asyncio.run(run(a.concurrency, a.tokens, a.requests, a.runs))


if __name__ == "__main__":
    main()
