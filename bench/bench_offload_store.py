"""KV offload store throughput: blocks/s put and got over NATS, 1 and N clients, RAM and disk.

Starts its own loopback nats-server and etcd and one `genset offload` process per tier
setting; the clients (`genset.offload.client.OffloadClient`, each on its own NATS
connection) run in this process on one event loop, as a worker's would run beside its engine.
Blocks are the built-in tiny model's size by default (32 KiB: 4 layers x K,V x 16 tokens x 2
KV heads x 32 dims x fp32) with real chained hashes and 16 token ids each.

- put: every client `put_behind`s its own blocks and waits until all are answered; blocks/s
  is acknowledged blocks over wall time. On the disk tier the RAM tier is tiny and every block
  is put twice (reused), so almost every block is evicted to disk: the time runs until the
  store's write queue is empty, and "written" says how many reached disk (the rest were
  dropped by the bounded write queue, by design).
- get: every client looks up runs of `--run` consecutive blocks (one parallel round trip per
  run, several when a run exceeds a NATS message) until it has fetched its share; on the disk
  tier the blocks are only on disk (the RAM tier holds a handful) so each get reads files.

    .venv/bin/python bench/bench_offload_store.py                  # 4096 blocks, 1 and 8 clients
    .venv/bin/python bench/bench_offload_store.py --blocks 1024 --clients 1,8 --tiers ram,disk

Wall-clock numbers on shared cores are noisy: compare runs from one machine and one sitting.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from genset.kv.hashing import block_hashes
from genset.offload.client import OffloadClient
from genset.runtime.bus import Bus
from genset.runtime.infra import EtcdServer, NatsServer, free_port
from proto.offload import OffloadBlock
from proto.tokens import pack_tokens

ROOT = Path(__file__).resolve().parents[1]
BLOCK_TOKENS = 16


def make_chains(n_blocks: int, run: int, block_bytes: int, seed: int) -> list[list[OffloadBlock]]:
    rng = random.Random(seed)
    payload = rng.randbytes(block_bytes)  # shared bytes: the store copies what it receives
    chains = []
    for c in range(-(-n_blocks // run)):
        tokens = [rng.randrange(1, 30000) for _ in range(run * BLOCK_TOKENS)]
        hashes = block_hashes(tokens, BLOCK_TOKENS)
        prev = None
        chain = []
        for i, h in enumerate(hashes[: min(run, n_blocks - c * run)]):
            chain.append(OffloadBlock(hash=h, parent_hash=prev, data=payload, token_ids=pack_tokens(
                tokens[i * BLOCK_TOKENS:(i + 1) * BLOCK_TOKENS])))
            prev = h
        chains.append(chain)
    return chains


class Store:
    def __init__(self, nats_url: str, etcd: str, namespace: str, args: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "genset.cli", "offload", "--nats", nats_url, "--etcd", etcd,
             "--namespace", namespace, "--metrics-port", str(self.port), "--log-format", "json",
             *args], cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)

    async def health(self) -> dict:
        async with httpx.AsyncClient(timeout=5) as c:
            return (await c.get(self.url + "/health")).json()

    async def ready(self) -> dict:
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"offload store exited ({self.proc.returncode}); see its log")
            try:
                h = await self.health()
                if h.get("ready"):
                    return h
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("offload store not ready after 60 s")
            await asyncio.sleep(0.1)

    async def until(self, predicate, wait_s: float = 300) -> dict:
        deadline = time.monotonic() + wait_s
        while True:
            h = await self.health()
            if predicate(h) or time.monotonic() > deadline:
                return h
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def clients_for(nats_url: str, namespace: str, sid: int, n: int,
                      max_inflight: int = 4) -> list[OffloadClient]:
    out = []
    for i in range(n):
        bus = await Bus.connect(nats_url, name=f"bench-{i}", namespace=namespace)
        c = OffloadClient(bus, namespace, sender_id=i + 1, max_queue_bytes=256 << 20,
                          max_inflight=max_inflight, put_timeout_s=30)
        await c.start(instances=[sid])
        out.append(c)
    return out


async def close_all(clients: list[OffloadClient]) -> None:
    for c in clients:
        await c.close()
        await c.bus.close()


async def run_tier(tier: str, n_clients: int, a, nats_url: str, etcd: str, work: Path) -> list[dict]:
    namespace = f"bench{random.getrandbits(24):x}"
    block_bytes = a.block_kb * 1024
    total = a.blocks
    chains = make_chains(total, a.run, block_bytes, seed=n_clients)
    per_file = -(-(block_bytes + 40 + 64 * 4 + 100) // 4096) * 4096
    if tier == "ram":
        store_args = ["--offload-ram-gb", f"{(total * (block_bytes + 2048)) * 2 / 2**30:.6f}",
                      "--offload-disk-gb", "0"]
    else:
        store_args = ["--offload-ram-gb", f"{8 * (block_bytes + 2048) / 2**30:.9f}",
                      "--offload-disk-gb", f"{total * per_file * 2 / 2**30:.6f}",
                      "--offload-dir", str(work / f"disk-{n_clients}"),
                      "--spill-queue-mb", str(a.spill_queue_mb)]
    store = Store(nats_url, etcd, namespace, store_args, work / f"store-{tier}-{n_clients}.log")
    rows = []
    try:
        sid = int((await store.ready())["store_id"], 16)
        clients = await clients_for(nats_url, namespace, sid, n_clients, a.max_inflight)
        share = [chains[i::n_clients] for i in range(n_clients)]

        # ---- put
        async def put(c: OffloadClient, mine: list[list[OffloadBlock]]) -> None:
            for chain in mine:
                c.put_behind(chain)
                if tier == "disk":
                    c.put_behind(chain)  # reused: worth a disk write when RAM evicts it
                if c.queued_bytes > 64 << 20:
                    await c.flush(300)
            await c.flush(300)

        t0 = time.perf_counter()
        await asyncio.gather(*(put(c, m) for c, m in zip(clients, share, strict=True)))
        if tier == "disk":
            h = await store.until(lambda h: h["pending_write_bytes"] == 0)
        dt = time.perf_counter() - t0
        h = await store.health()
        sent = sum(c.stats["put_sent"] for c in clients) // (2 if tier == "disk" else 1)
        written = h["tiers"]["disk"]["blocks"] if tier == "disk" else None
        rows.append(dict(op="put", tier=tier, clients=n_clients, blocks=sent, seconds=dt,
                         written=written))

        # ---- get
        held = h["tiers"]["disk" if tier == "disk" else "host"]["blocks"]
        async def get(c: OffloadClient, mine: list[list[OffloadBlock]]) -> int:
            got = 0
            for _ in range(a.get_rounds):
                for chain in mine:
                    run = await c.lookup([b.hash for b in chain], deadline_s=30)
                    got += len(run)
            return got

        t0 = time.perf_counter()
        got = sum(await asyncio.gather(*(get(c, m) for c, m in zip(clients, share, strict=True))))
        dt = time.perf_counter() - t0
        rows.append(dict(op="get", tier=tier, clients=n_clients, blocks=got, seconds=dt,
                         written=None, held=held))
        await close_all(clients)
    finally:
        store.stop()
    for r in rows:
        r["blocks_s"] = r["blocks"] / r["seconds"] if r["seconds"] else 0.0
        r["mb_s"] = r["blocks_s"] * block_bytes / 2**20
    return rows


async def main_async(a) -> None:
    nats = NatsServer().start()
    etcd = EtcdServer().start()
    work = Path(tempfile.mkdtemp(prefix="gs-offload-bench-"))
    try:
        rows = []
        for tier in a.tiers.split(","):
            for n in [int(x) for x in a.clients.split(",")]:
                rows += await run_tier(tier, n, a, nats.url, etcd.endpoint, work)
    finally:
        nats.cleanup()
        etcd.cleanup()
    print(f"\nblocks of {a.block_kb} KiB, runs of {a.run} blocks, {a.blocks} blocks "
          f"(get: x{a.get_rounds}); logs in {work}")
    print(f"{'op':4} {'tier':5} {'clients':>7} {'blocks':>8} {'seconds':>8} {'blocks/s':>9} "
          f"{'MiB/s':>7}  note")
    for r in rows:
        note = ""
        if r["op"] == "put" and r["written"] is not None:
            note = f"{r['written']} written to disk"
        if r["op"] == "get":
            note = f"{r.get('held', 0)} held in the tier"
        print(f"{r['op']:4} {r['tier']:5} {r['clients']:>7} {r['blocks']:>8} "
              f"{r['seconds']:>8.2f} {r['blocks_s']:>9.0f} {r['mb_s']:>7.1f}  {note}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=4096, help="blocks put (and fetched) per run")
    p.add_argument("--block-kb", type=int, default=32, help="K/V payload per block, KiB")
    p.add_argument("--run", type=int, default=32, help="blocks per lookup (one prompt's run)")
    p.add_argument("--clients", default="1,8", help="client counts, comma separated")
    p.add_argument("--tiers", default="ram,disk", help="ram, disk or both")
    p.add_argument("--get-rounds", type=int, default=1, help="times every run is fetched")
    p.add_argument("--max-inflight", type=int, default=4,
                   help="requests (or blocks in parts) each client has in flight at once; 1: "
                        "one large block at a time, as a worker evicting a trickle of them")
    p.add_argument("--spill-queue-mb", type=float, default=256.0,
                   help="the store's disk write queue (disk tier)")
    a = p.parse_args(argv)
    if a.blocks <= 0 or a.block_kb <= 0 or a.run <= 0 or a.get_rounds <= 0:
        p.error("--blocks, --block-kb, --run and --get-rounds must be > 0")
    if not set(a.tiers.split(",")) <= {"ram", "disk"}:
        p.error(f"--tiers: use ram, disk or ram,disk (got {a.tiers!r})")
    try:
        clients = [int(x) for x in a.clients.split(",")]
    except ValueError:
        p.error(f"--clients: comma-separated integers (got {a.clients!r})")
    if min(clients) < 1:
        p.error("--clients must be >= 1")
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    asyncio.run(main_async(a))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
