"""KV transfer throughput on loopback: NATS chunks and direct TCP, each as a ratio to a raw
socket copy of the same bytes in the same run.

Starts its own nats-server. The sending worker's hub runs in this process; the receiving
worker's hub runs in a child process (`--processes 2`, the default: two workers are two
processes) or in this one (`--processes 1`: both ends share one event loop, so every byte's
CPU on both sides is paid by one core - the stricter number). Per size and round, three
copies run in alternating order (raw, nats, tcp; then reversed):

- raw: one `sock_sendall` of the bytes on a fresh loopback TCP connection, received with
  `sock_recv_into` into one preallocated (pre-touched) buffer: one copy each way, no
  framing, no checksum, no flow control - the ceiling (the goal's reference);
- kept: the same on one connection kept open across the copies (its buffers and window
  grown): the ceiling for the TCP path, which reuses its connection between two workers;
- nats / tcp: `KvTransferHub.send` to a receive opened on the other hub, end to end (header,
  credit window, XXH3 checksum per chunk, reassembly into blocks, ack), with an importer that
  only counts blocks.

Each copy is timed from its start until the receiving side reports it complete (over NATS in
the two-process mode, the same for all three). Reported: median throughput of `--rounds`
rounds and the median of the per-round ratios to raw (and tcp to kept); then the same
ratios in CPU time (both processes): on a shared machine wall time also counts other
processes' turns, CPU time much less so.

    .venv/bin/python bench/bench_kv_transfer.py                      # 1 MB .. 256 MB, 3 rounds
    .venv/bin/python bench/bench_kv_transfer.py --sizes 1,16,64 --processes 1 --loop asyncio
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgspec

from genset.kv.hashing import block_hashes
from genset.runtime.bus import Bus
from genset.runtime.infra import NatsServer
from genset.transfer import KvTransferHub
from proto.transfer import KvLayout, KvTransferTarget

MB = 1_000_000
CTL = "bench.kvx.ctl"
DONE = "bench.kvx.done"
RX_WORKER, TX_WORKER = 1, 2


def layout_for(block: int) -> KvLayout:
    return KvLayout(engine="bench", bytes_per_block=block)


def hashes_for(n: int) -> list[int]:
    return block_hashes(list(range(n * 16)), 16)


# ---- the receiving side (in this process or in the child) -----------------------------------


class ReceiveSide:
    """Opens receives on its hub and raw listening sockets; `done(id, cpu_s)` is called when
    one completes."""

    def __init__(self, hub: KvTransferHub, done) -> None:
        self.hub = hub
        self.done = done
        self.tasks: set[asyncio.Task] = set()
        self.kept_lsock: socket.socket | None = None
        self.kept_accept: asyncio.Future | None = None
        self.kept_conn: socket.socket | None = None

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def open_hub(self, op_id: int, n: int, block: int) -> KvTransferTarget:
        c0 = time.process_time()
        got = 0

        async def on_blocks(run) -> None:
            nonlocal got
            got += len(run.payloads)

        rx = await self.hub.open_receive("bench", on_blocks=on_blocks,
                                         expected_hashes=hashes_for(n), layout=layout_for(block),
                                         deadline_s=600)

        async def finish() -> None:
            await rx.wait()
            assert got == n, (got, n)
            await self.done(op_id, time.process_time() - c0)

        self._spawn(finish())
        return rx.target

    async def open_raw(self, op_id: int, size: int) -> int:
        loop = asyncio.get_running_loop()
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        lsock.setblocking(False)
        # written once before timing: its page faults are not charged to the raw copy (the
        # hubs' chunk buffers are reused, already faulted in)
        buf = bytearray(b"\1") * size

        async def receive() -> None:
            c0 = time.process_time()
            conn, _ = await loop.sock_accept(lsock)
            conn.setblocking(False)
            view = memoryview(buf)
            pos = 0
            while pos < size:
                n = await loop.sock_recv_into(conn, view[pos:])
                if n == 0:
                    raise EOFError
                pos += n
            conn.close()
            lsock.close()
            await self.done(op_id, time.process_time() - c0)

        self._spawn(receive())
        return lsock.getsockname()[1]


    async def open_kept(self, op_id: int, size: int) -> int:
        """Like open_raw, on the one connection kept open (accepted on first use)."""
        loop = asyncio.get_running_loop()
        if self.kept_lsock is None:
            lsock = socket.socket()
            lsock.bind(("127.0.0.1", 0))
            lsock.listen(1)
            lsock.setblocking(False)
            self.kept_lsock = lsock
            self.kept_accept = asyncio.ensure_future(loop.sock_accept(lsock))
        buf = bytearray(b"\1") * size

        async def receive() -> None:
            c0 = time.process_time()
            if self.kept_conn is None:
                assert self.kept_accept is not None
                self.kept_conn, _ = await self.kept_accept
                self.kept_conn.setblocking(False)
            view = memoryview(buf)
            pos = 0
            while pos < size:
                n = await loop.sock_recv_into(self.kept_conn, view[pos:])
                if n == 0:
                    raise EOFError
                pos += n
            await self.done(op_id, time.process_time() - c0)

        self._spawn(receive())
        return self.kept_lsock.getsockname()[1]


async def child_main(args: argparse.Namespace) -> None:
    """The receiving worker in its own process, driven over NATS by the parent."""
    bus = await Bus.connect(args.child, name="bench-kvx-rx")
    hub = KvTransferHub(bus, RX_WORKER, window_bytes=args.window_mb * 1024 * 1024,
                        tcp_chunk_bytes=args.tcp_chunk_kb * 1024)
    await hub.start()
    stop = asyncio.Event()

    async def done(op_id: int, cpu: float) -> None:
        await bus.publish(DONE, msgspec.msgpack.encode({"id": op_id, "cpu": cpu}))

    side = ReceiveSide(hub, done)

    async def ctl(data: bytes) -> bytes:
        req = msgspec.msgpack.decode(data)
        if req["op"] == "hub":
            target = await side.open_hub(req["id"], req["n"], req["block"])
            return msgspec.msgpack.encode({"target": msgspec.msgpack.encode(target)})
        if req["op"] == "raw":
            return msgspec.msgpack.encode({"port": await side.open_raw(req["id"], req["size"])})
        if req["op"] == "kept":
            return msgspec.msgpack.encode({"port": await side.open_kept(req["id"], req["size"])})
        stop.set()
        return b"{}"

    await bus.serve(CTL, ctl)
    print("ready", flush=True)
    await stop.wait()
    await hub.close()
    await bus.close()


class Peer:
    """The parent's handle on the receiving side, wherever it runs."""

    def __init__(self, bus: Bus, local: ReceiveSide | None) -> None:
        self.bus = bus
        self.local = local
        self.ids = itertools.count()
        self.waiting: dict[int, asyncio.Future] = {}
        self.kept: socket.socket | None = None  # the sender's end of the kept connection

    async def start(self) -> None:
        async def on_done(msg) -> None:
            body = msgspec.msgpack.decode(msg.data)
            await self.finish(body["id"], body["cpu"])

        if self.local is None:
            await self.bus.subscribe(DONE, on_done)

    async def finish(self, op_id: int, cpu: float) -> None:  # the local side's callback
        fut = self.waiting.pop(op_id, None)
        if fut is not None and not fut.done():
            fut.set_result(cpu)

    def _new(self) -> tuple[int, asyncio.Future]:
        op_id = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.waiting[op_id] = fut
        return op_id, fut

    async def _ask(self, req: dict) -> dict:
        return msgspec.msgpack.decode(
            await self.bus.request(CTL, msgspec.msgpack.encode(req), timeout=30))

    async def open_hub(self, n: int, block: int) -> tuple[KvTransferTarget, asyncio.Future]:
        op_id, fut = self._new()
        if self.local is not None:
            return await self.local.open_hub(op_id, n, block), fut
        reply = await self._ask({"op": "hub", "id": op_id, "n": n, "block": block})
        return msgspec.msgpack.decode(reply["target"], type=KvTransferTarget), fut

    async def open_raw(self, size: int) -> tuple[int, asyncio.Future]:
        op_id, fut = self._new()
        if self.local is not None:
            return await self.local.open_raw(op_id, size), fut
        return (await self._ask({"op": "raw", "id": op_id, "size": size}))["port"], fut

    async def open_kept(self, size: int) -> tuple[int, asyncio.Future]:
        op_id, fut = self._new()
        if self.local is not None:
            return await self.local.open_kept(op_id, size), fut
        return (await self._ask({"op": "kept", "id": op_id, "size": size}))["port"], fut


# ---- the sending side -----------------------------------------------------------------------


async def raw_copy(peer: Peer, data: bytes) -> tuple[float, float]:
    """(wall s, CPU s of both sides) to move `data` over a fresh loopback connection."""
    loop = asyncio.get_running_loop()
    port, done = await peer.open_raw(len(data))
    t0, c0 = time.perf_counter(), time.process_time()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, data)
    remote_cpu = await asyncio.wait_for(done, 600)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    sock.close()
    return elapsed, cpu + (remote_cpu if peer.local is None else 0.0)


async def kept_copy(peer: Peer, data: bytes) -> tuple[float, float]:
    """(wall s, CPU s of both sides) to move `data` over the connection kept open."""
    loop = asyncio.get_running_loop()
    port, done = await peer.open_kept(len(data))
    if peer.kept is None:  # the first (warm-up) copy connects
        peer.kept = socket.socket()
        peer.kept.setblocking(False)
        await loop.sock_connect(peer.kept, ("127.0.0.1", port))
    t0, c0 = time.perf_counter(), time.process_time()
    await loop.sock_sendall(peer.kept, data)
    remote_cpu = await asyncio.wait_for(done, 600)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    return elapsed, cpu + (remote_cpu if peer.local is None else 0.0)


async def hub_copy(peer: Peer, tx_hub: KvTransferHub, blocks: list[bytes], block: int,
                   transport: str) -> tuple[float, float]:
    target, done = await peer.open_hub(len(blocks), block)

    async def source(first: int, count: int) -> list[bytes]:
        return blocks[first : first + count]

    t0, c0 = time.perf_counter(), time.process_time()
    result = await tx_hub.send(target, request_id="bench", hashes=hashes_for(len(blocks)),
                               block_size=16, layout=layout_for(block), source=source,
                               transport=transport, deadline_s=600)
    remote_cpu = await asyncio.wait_for(done, 600)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert result.transport == transport, result
    return elapsed, cpu + (remote_cpu if peer.local is None else 0.0)


async def run(args: argparse.Namespace) -> None:
    server = NatsServer().start()
    child: asyncio.subprocess.Process | None = None
    try:
        tx_bus = await Bus.connect(server.url, name="bench-kvx-tx")
        tx_hub = KvTransferHub(tx_bus, TX_WORKER, tcp_chunk_bytes=args.tcp_chunk_kb * 1024)
        await tx_hub.start()
        rx_hub = rx_bus = None
        if args.processes == 1:
            rx_bus = await Bus.connect(server.url, name="bench-kvx-rx")
            rx_hub = KvTransferHub(rx_bus, RX_WORKER, window_bytes=args.window_mb * 1024 * 1024,
                                   tcp_chunk_bytes=args.tcp_chunk_kb * 1024)
            await rx_hub.start()
            peer = Peer(tx_bus, None)
            peer.local = ReceiveSide(rx_hub, peer.finish)
        else:
            child = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--child", server.url, "--loop", args.loop,
                "--window-mb", str(args.window_mb), "--tcp-chunk-kb", str(args.tcp_chunk_kb),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
            assert child.stdout is not None
            async with asyncio.timeout(60):  # its logs come first; "ready" once it serves
                while (line := await child.stdout.readline()) != b"ready\n":
                    if not line:
                        raise RuntimeError("the receiving child process exited")
            peer = Peer(tx_bus, None)
        await peer.start()
        block = args.block_kb * 1024
        print(f"processes={args.processes} loop={args.loop} block={args.block_kb} KiB "
              f"window={args.window_mb} MiB tcp_chunk={args.tcp_chunk_kb} KiB "
              f"nats max_payload={tx_bus.nc.max_payload} rounds={args.rounds} "
              f"cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f}")
        print(f"{'size MB':>8} {'raw MB/s':>9} {'nats MB/s':>9} {'nats/raw':>8} "
              f"{'tcp MB/s':>9} {'tcp/raw':>8} {'kept MB/s':>9} {'tcp/kept':>8} | "
              f"{'cpu: nats/raw':>13} {'tcp/raw':>8} {'tcp/kept':>8}")
        for size_mb in args.sizes:
            n = max(1, round(size_mb * MB / block))
            blocks = [os.urandom(block) for _ in range(n)]
            data = b"".join(blocks)
            total = len(data)
            await hub_copy(peer, tx_hub, blocks[: min(n, 4)], block, "tcp")  # warm up
            await kept_copy(peer, data[: min(len(data), 4 * block)])
            wall: dict[str, list[float]] = {"raw": [], "kept": [], "nats": [], "tcp": []}
            ratios: dict[str, list[float]] = {"nats": [], "tcp": [], "tcp/kept": []}
            cpu_ratios: dict[str, list[float]] = {"nats": [], "tcp": [], "tcp/kept": []}
            for r in range(args.rounds):
                order = ["raw", "kept", "nats", "tcp"]
                if r % 2:
                    order.reverse()
                got: dict[str, tuple[float, float]] = {}
                for kind in order:
                    if kind == "raw":
                        got[kind] = await raw_copy(peer, data)
                    elif kind == "kept":
                        got[kind] = await kept_copy(peer, data)
                    else:
                        got[kind] = await hub_copy(peer, tx_hub, blocks, block, kind)
                    wall[kind].append(got[kind][0])
                for kind, ref in (("nats", "raw"), ("tcp", "raw"), ("tcp/kept", "kept")):
                    mine = got[kind.split("/")[0]]
                    ratios[kind].append(got[ref][0] / mine[0])
                    cpu_ratios[kind].append(got[ref][1] / max(mine[1], 1e-9))
            med = {k: total / statistics.median(v) / MB for k, v in wall.items()}
            mr = {k: statistics.median(v) for k, v in ratios.items()}
            mc = {k: statistics.median(v) for k, v in cpu_ratios.items()}
            print(f"{total / MB:8.1f} {med['raw']:9.0f} {med['nats']:9.0f} {mr['nats']:8.2f} "
                  f"{med['tcp']:9.0f} {mr['tcp']:8.2f} {med['kept']:9.0f} {mr['tcp/kept']:8.2f} | "
                  f"{mc['nats']:13.2f} {mc['tcp']:8.2f} {mc['tcp/kept']:8.2f}", flush=True)
            del blocks, data
        if peer.kept is not None:
            peer.kept.close()
        if child is not None:
            await tx_bus.request(CTL, msgspec.msgpack.encode({"op": "stop"}), timeout=30)
        await tx_hub.close()
        if rx_hub is not None and rx_bus is not None:
            await rx_hub.close()
            await rx_bus.close()
        await tx_bus.close()
    finally:
        if child is not None:
            try:
                await asyncio.wait_for(child.wait(), 10)
            except TimeoutError:
                child.kill()
        server.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1,4,16,64,256",
                   type=lambda s: [float(x) for x in s.split(",")], help="MB, comma-separated")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--processes", type=int, choices=(1, 2), default=2,
                   help="2: the receiving hub in a child process; 1: both hubs on one loop")
    p.add_argument("--block-kb", type=int, default=256, help="payload bytes per KV block")
    p.add_argument("--window-mb", type=int, default=32, help="the receiver's window")
    p.add_argument("--tcp-chunk-kb", type=int, default=8192)
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument("--child", metavar="NATS_URL", help=argparse.SUPPRESS)
    args = p.parse_args()
    coro = child_main(args) if args.child else run(args)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)


if __name__ == "__main__":
    main()
