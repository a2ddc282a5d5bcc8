"""Bus overhead: streamed-reply throughput and request latency, genset Bus vs raw nats-py.

Starts its own loopback nats-server. Both ends run in this process on two separate NATS
connections (requester and responder, as two services would have), so the numbers are the
total CPU cost of both ends on one event loop. Each frame is a proto.StreamChunk with one
token (as a decode step of one sequence produces); the raw baseline publishes the same
encoded bytes to per-stream subjects received by one wildcard subscription (the same shape
as the bus's inbox routing), so the ratio is what the wrapper costs. A second baseline, raw
nats-py with one subscription and one reader task per stream, is what a per-request consumer
costs without the Bus. Throughput is wall-clock (noisy on shared cores); CPU us/frame is this
process's CPU time per frame (both ends), the steadier number; ratios are taken per round.

    .venv/bin/python bench/bench_bus.py                # 5 repeats, asyncio and uvloop
    .venv/bin/python bench/bench_bus.py --repeat 5 --frames 100000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nats
from _common import pct

import proto
from genset.runtime.bus import Bus
from genset.runtime.infra import NatsServer

PENDING = 8 * 1024 * 1024  # the bus's pending_size; the raw clients get the same


async def _settle(nc) -> None:
    # nats-py's flush() PING can overtake a SUB still in its write buffer; yield first and
    # round-trip twice (what Bus.flush does).
    await asyncio.sleep(0)
    await nc.flush()
    await nc.flush()


async def _publish_streams(pub, prefix: str, payload: bytes, streams: int, per_stream: int,
                           yield_every: int) -> None:
    """`per_stream` frames to each of the subjects `prefix.0` .. `prefix.{streams-1}`, one
    producer task per stream (what the raw baselines send)."""

    async def produce(k: int) -> None:
        subject = f"{prefix}.{k}"
        for i in range(per_stream):
            await pub.publish(subject, payload)
            if yield_every and i % yield_every == 0:
                await asyncio.sleep(0)

    await asyncio.gather(*(produce(k) for k in range(streams)))


async def raw_stream_throughput(url: str, streams: int, frames: int, yield_every: int) -> tuple[float, float]:
    pub = await nats.connect(url, pending_size=PENDING)
    sub_nc = await nats.connect(url, pending_size=PENDING)
    payload = proto.encode(proto.StreamChunk(seq=1, token_ids=proto.pack_tokens([1234])))
    per_stream = frames // streams
    total = per_stream * streams
    done = asyncio.Event()
    got = 0

    async def on_msg(msg):
        nonlocal got
        got += 1
        if got == total:
            done.set()

    prefix = sub_nc.new_inbox()
    await sub_nc.subscribe(prefix + ".*", cb=on_msg, pending_msgs_limit=1 << 20)
    await _settle(sub_nc)

    t0, c0 = time.perf_counter(), time.process_time()
    await _publish_streams(pub, prefix, payload, streams, per_stream, yield_every)
    await asyncio.wait_for(done.wait(), 120)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    await pub.close()
    await sub_nc.close()
    return total / elapsed, cpu / total * 1e6


async def raw_per_stream_throughput(url: str, streams: int, frames: int,
                                    yield_every: int) -> tuple[float, float]:
    """Raw nats-py the way a per-request consumer would use it: one subscription per
    stream, read by its own task (what the Bus API gives each request)."""
    pub = await nats.connect(url, pending_size=PENDING)
    sub_nc = await nats.connect(url, pending_size=PENDING)
    payload = proto.encode(proto.StreamChunk(seq=1, token_ids=proto.pack_tokens([1234])))
    per_stream = frames // streams
    prefix = sub_nc.new_inbox()
    subs = [await sub_nc.subscribe(f"{prefix}.{k}", pending_msgs_limit=1 << 20)
            for k in range(streams)]
    await _settle(sub_nc)

    async def consume(sub) -> int:
        n = 0
        async for _msg in sub.messages:
            n += 1
            if n == per_stream:
                break
        return n

    t0, c0 = time.perf_counter(), time.process_time()
    consumers = [asyncio.ensure_future(consume(sub)) for sub in subs]
    await _publish_streams(pub, prefix, payload, streams, per_stream, yield_every)
    total = sum(await asyncio.wait_for(asyncio.gather(*consumers), 120))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    await pub.close()
    await sub_nc.close()
    return total / elapsed, cpu / total * 1e6


async def bus_stream_throughput(url: str, streams: int, frames: int,
                                yield_every: int) -> tuple[float, float]:
    req = await Bus.connect(url, name="bench-req")
    resp = await Bus.connect(url, name="bench-resp")
    per_stream = frames // streams
    token = proto.pack_tokens([1234])

    async def handler(request, stream):
        send = stream.send
        for i in range(per_stream - 1):
            await send(token)
            if yield_every and i % yield_every == 0:
                await asyncio.sleep(0)
        await send(token, finish_reason="length", final=True)

    await resp.serve_stream("bench.gen", handler, max_concurrent=streams)
    await resp.flush()

    async def consume() -> int:
        n = 0
        stream = await req.stream_request("bench.gen", b"", timeout=120, max_buffered=1 << 20)
        async for _chunk in stream:
            n += 1
        return n

    t0, c0 = time.perf_counter(), time.process_time()
    counts = await asyncio.gather(*(consume() for _ in range(streams)))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    total = sum(counts)
    assert total == per_stream * streams, counts
    await req.close()
    await resp.close()
    return total / elapsed, cpu / total * 1e6


def _pcts(samples: list[float]) -> tuple[float, float]:
    return pct(samples, 0.5), pct(samples, 0.99)


async def raw_rtt(url: str, n: int) -> tuple[float, float]:
    a = await nats.connect(url)
    b = await nats.connect(url)
    payload = proto.encode(proto.StreamChunk(seq=0, token_ids=proto.pack_tokens([1]),
                                             final=True))

    async def echo(msg):
        await b.publish(msg.reply, payload)

    await b.subscribe("bench.raw", cb=echo)
    await _settle(b)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await a.request("bench.raw", b"ping", timeout=5)
        samples.append((time.perf_counter() - t0) * 1e6)
    await a.close()
    await b.close()
    return _pcts(samples)


async def bus_rtt(url: str, n: int, streamed: bool) -> tuple[float, float]:
    req = await Bus.connect(url, name="bench-req")
    resp = await Bus.connect(url, name="bench-resp")
    payload = proto.encode(proto.StreamChunk(seq=0, token_ids=proto.pack_tokens([1]),
                                             final=True))

    async def unary(data):
        return payload

    async def one_frame(request, stream):
        await stream.send(proto.pack_tokens([1]), final=True)

    await resp.serve("bench.unary", unary)
    await resp.serve_stream("bench.one", one_frame)
    await resp.flush()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        if streamed:
            await (await req.stream_request("bench.one", b"ping", timeout=5)).collect()
        else:
            await req.request("bench.unary", b"ping", timeout=5)
        samples.append((time.perf_counter() - t0) * 1e6)
    await req.close()
    await resp.close()
    return _pcts(samples)


async def one_round(url: str, args) -> dict[str, float]:
    r: dict[str, float] = {}
    for streams in (1, 64):
        r[f"raw_{streams}"], r[f"rawcpu_{streams}"] = await raw_stream_throughput(
            url, streams, args.frames, args.yield_every)
        r[f"bus_{streams}"], r[f"buscpu_{streams}"] = await bus_stream_throughput(
            url, streams, args.frames, args.yield_every)
        r[f"rawps_{streams}"], r[f"rawpscpu_{streams}"] = await raw_per_stream_throughput(
            url, streams, args.frames, args.yield_every)
        r[f"cpuratiops_{streams}"] = r[f"rawpscpu_{streams}"] / r[f"buscpu_{streams}"]
        # ratios per round (raw and Bus ran back to back), so machine load cancels out
        r[f"ratio_{streams}"] = r[f"bus_{streams}"] / r[f"raw_{streams}"]
        r[f"cpuratio_{streams}"] = r[f"rawcpu_{streams}"] / r[f"buscpu_{streams}"]
    r["raw_p50"], r["raw_p99"] = await raw_rtt(url, args.requests)
    r["unary_p50"], r["unary_p99"] = await bus_rtt(url, args.requests, streamed=False)
    r["stream_p50"], r["stream_p99"] = await bus_rtt(url, args.requests, streamed=True)
    return r


def run_loop(kind: str, url: str, args) -> list[dict[str, float]]:
    rounds = []
    for _ in range(args.repeat):
        if kind == "uvloop":
            import uvloop

            rounds.append(uvloop.run(one_round(url, args)))
        else:
            rounds.append(asyncio.run(one_round(url, args)))
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=32_000, help="frames per throughput run")
    parser.add_argument("--requests", type=int, default=1000, help="requests per latency run")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--yield-every", type=int, default=1,
                        help="producers yield to the loop every N frames (0: never), as an "
                             "engine does between steps")
    parser.add_argument("--loops", default="asyncio,uvloop")
    args = parser.parse_args()
    server = NatsServer().start()
    try:
        print(f"frames={args.frames} requests={args.requests} repeat={args.repeat} "
              f"yield_every={args.yield_every} (medians)")
        print("| loop | streams | raw frames/s | Bus frames/s | Bus / raw (wall) "
              "| raw CPU us/frame | Bus CPU us/frame | Bus / raw (CPU) "
              "| raw sub-per-stream CPU us/frame | Bus / raw sub-per-stream (CPU) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        latency_rows = []
        for kind in args.loops.split(","):
            rounds = run_loop(kind, server.url, args)
            med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
            for streams in (1, 64):
                raw, bus = med[f"raw_{streams}"], med[f"bus_{streams}"]
                print(f"| {kind} | {streams} | {raw:,.0f} | {bus:,.0f} | "
                      f"{med[f'ratio_{streams}']:.0%} | {med[f'rawcpu_{streams}']:.1f} | "
                      f"{med[f'buscpu_{streams}']:.1f} | {med[f'cpuratio_{streams}']:.0%} | "
                      f"{med[f'rawpscpu_{streams}']:.1f} | {med[f'cpuratiops_{streams}']:.0%} |")
            latency_rows.append(
                f"| {kind} | {med['raw_p50']:.0f} / {med['raw_p99']:.0f} | "
                f"{med['unary_p50']:.0f} / {med['unary_p99']:.0f} | "
                f"{med['stream_p50']:.0f} / {med['stream_p99']:.0f} |"
            )
        print()
        print("| loop | raw nc.request p50 / p99 us | Bus.request p50 / p99 us | "
              "stream_request (1 final frame) p50 / p99 us |")
        print("|---|---|---|---|")
        for row in latency_rows:
            print(row)
    except BaseException:
        print("nats-server log tail:\n" + server.log_tail(15), file=sys.stderr)
        raise
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
