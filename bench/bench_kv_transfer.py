"""KV transfer throughput on loopback: NATS chunks and direct TCP, each as a ratio to a raw
socket copy of the same bytes in the same run.

Starts its own nats-server. Both workers' hubs (receiver and sender, each on its own NATS
connection, as two worker processes would have) run in this process on one event loop, so
the numbers are the cost of both ends on one core's worth of loop. Per size and round, three
transfers run in alternating order (raw, nats, tcp; then reversed): the raw one is one
`sock_sendall` of the bytes on a loopback TCP connection and `sock_recv_into` into one
preallocated buffer (one copy, no framing, no checksum: the ceiling); the two transfers go
through `KvTransferHub` end to end (header, credits, XXH3 checksums, reassembly, ack) with an
importer that only counts. Reported: median throughput of `--rounds` rounds and the median of
the per-round ratios to raw.

    .venv/bin/python bench/bench_kv_transfer.py                      # 1 MB .. 256 MB, 3 rounds
    .venv/bin/python bench/bench_kv_transfer.py --sizes 1,16,64 --loop asyncio
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genset.kv.hashing import block_hashes
from genset.runtime.bus import Bus
from genset.runtime.infra import NatsServer
from genset.transfer import KvTransferHub
from proto.transfer import KvLayout

MB = 1_000_000


async def raw_copy(data: bytes) -> float:
    """Seconds to move `data` over a fresh loopback TCP connection (asyncio sock calls)."""
    loop = asyncio.get_running_loop()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    lsock.setblocking(False)
    client = socket.socket()
    client.setblocking(False)
    accept = asyncio.ensure_future(loop.sock_accept(lsock))
    await loop.sock_connect(client, lsock.getsockname())
    server, _ = await accept
    server.setblocking(False)
    buf = bytearray(len(data))
    view = memoryview(buf)

    async def receive() -> None:
        pos = 0
        while pos < len(buf):
            n = await loop.sock_recv_into(server, view[pos:])
            if n == 0:
                raise EOFError
            pos += n

    t0 = time.perf_counter()
    await asyncio.gather(loop.sock_sendall(client, data), receive())
    elapsed = time.perf_counter() - t0
    for s in (client, server, lsock):
        s.close()
    return elapsed


async def hub_copy(rx_hub: KvTransferHub, tx_hub: KvTransferHub, blocks: list[bytes],
                   block_bytes: int, transport: str) -> float:
    hashes = block_hashes(list(range(len(blocks) * 16)), 16)
    layout = KvLayout(engine="bench", bytes_per_block=block_bytes)
    got = 0

    async def on_blocks(run) -> None:
        nonlocal got
        got += len(run.payloads)

    async def source(first: int, count: int) -> list[bytes]:
        return blocks[first : first + count]

    rx = await rx_hub.open_receive("bench", on_blocks=on_blocks, expected_hashes=hashes,
                                   layout=layout, deadline_s=600)
    t0 = time.perf_counter()
    result = await tx_hub.send(rx.target, request_id="bench", hashes=hashes, block_size=16,
                               layout=layout, source=source, transport=transport,
                               deadline_s=600)
    await rx.wait()
    elapsed = time.perf_counter() - t0
    assert got == len(blocks) and result.transport == transport, (got, result)
    return elapsed


async def run(args: argparse.Namespace) -> None:
    server = NatsServer().start()
    try:
        rx_bus = await Bus.connect(server.url, name="bench-rx")
        tx_bus = await Bus.connect(server.url, name="bench-tx")
        rx_hub = KvTransferHub(rx_bus, 1, window_bytes=args.window_mb * 1024 * 1024,
                               tcp_chunk_bytes=args.tcp_chunk_kb * 1024)
        tx_hub = KvTransferHub(tx_bus, 2, tcp_chunk_bytes=args.tcp_chunk_kb * 1024)
        await rx_hub.start()
        await tx_hub.start()
        block = args.block_kb * 1024
        print(f"loop={args.loop} block={args.block_kb} KiB window={args.window_mb} MiB "
              f"tcp_chunk={args.tcp_chunk_kb} KiB nats max_payload={rx_bus.nc.max_payload} "
              f"rounds={args.rounds}")
        print(f"{'size MB':>8} {'raw MB/s':>10} {'nats MB/s':>10} {'nats/raw':>9} "
              f"{'tcp MB/s':>10} {'tcp/raw':>8}")
        for size_mb in args.sizes:
            n = max(1, round(size_mb * MB / block))
            blocks = [os.urandom(block) for _ in range(n)]
            data = b"".join(blocks)
            total = len(data)
            await hub_copy(rx_hub, tx_hub, blocks[: min(n, 4)], block, "tcp")  # warm up
            times: dict[str, list[float]] = {"raw": [], "nats": [], "tcp": []}
            ratios: dict[str, list[float]] = {"nats": [], "tcp": []}
            for r in range(args.rounds):
                order = ["raw", "nats", "tcp"] if r % 2 == 0 else ["tcp", "nats", "raw"]
                round_t: dict[str, float] = {}
                for kind in order:
                    if kind == "raw":
                        round_t[kind] = await raw_copy(data)
                    else:
                        round_t[kind] = await hub_copy(rx_hub, tx_hub, blocks, block, kind)
                    times[kind].append(round_t[kind])
                for kind in ("nats", "tcp"):
                    ratios[kind].append(round_t["raw"] / round_t[kind])
            med = {k: total / statistics.median(v) / MB for k, v in times.items()}
            print(f"{total / MB:8.1f} {med['raw']:10.0f} {med['nats']:10.0f} "
                  f"{statistics.median(ratios['nats']):9.2f} {med['tcp']:10.0f} "
                  f"{statistics.median(ratios['tcp']):8.2f}")
            del blocks, data
        await rx_hub.close()
        await tx_hub.close()
        await rx_bus.close()
        await tx_bus.close()
    finally:
        server.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1,4,16,64,256",
                   type=lambda s: [float(x) for x in s.split(",")], help="MB, comma-separated")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--block-kb", type=int, default=256, help="payload bytes per KV block")
    p.add_argument("--window-mb", type=int, default=32, help="the receiver's window")
    p.add_argument("--tcp-chunk-kb", type=int, default=4096)
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = p.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(run(args))
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
