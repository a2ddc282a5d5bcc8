"""CPU time per request of the offload store's small-block paths, without NATS: the store's
put (decode, checks, tiers, reply encoded) and lookup (the run, reply encoded), and the
client's lookup against a bus that answers at once from the encoded reply (request encoded,
reply decoded, the run stitched). 28 blocks of 32 KiB per request (a tiny-model prompt's
run, as many as fit one 1 MiB reply). Process CPU time, so other load on the box moves it
less than wall time; runs from the tree it is started in, so it times an older checkout too
(A/B: run it from each tree, alternated):

    cd <tree> && nice -n 10 <venv>/bin/python bench/bench_offload_cpu.py [rounds, default 7]

Prints the median µs per request over the rounds (300 requests each).
"""
import asyncio
import inspect
import random
import statistics
import sys
import time

sys.path.insert(0, ".")
import proto
from genset.kv.hashing import block_hashes
from genset.offload.client import OffloadClient
from proto.offload import (
    OffloadBlock,
    OffloadLookupReply,
    OffloadPut,
    OffloadPutReply,
)
from proto.tokens import pack_tokens
from services.kv_offload.store import BlockStore

N, SIZE = 28, 32 * 1024
rng = random.Random(1)
tokens = [rng.randrange(1, 30000) for _ in range(N * 16)]
hashes = block_hashes(tokens, 16)
payload = rng.randbytes(SIZE)
blocks = [OffloadBlock(hash=h, parent_hash=(hashes[i - 1] if i else None),
                       token_ids=pack_tokens(tokens[i * 16:(i + 1) * 16]), data=payload)
          for i, h in enumerate(hashes)]
put_bytes = proto.encode(OffloadPut(sender_id=1, blocks=blocks))
LIMIT = (1 << 20) - 4096
# a tree from before blocks larger than a message (its lookup has no such arguments)
new_lookup = "message_bytes" in inspect.signature(BlockStore.lookup).parameters


async def main() -> None:
    store = BlockStore(ram_bytes=1 << 30, max_block_bytes=LIMIT - 4096)
    await store.open()
    store.put(blocks)

    def put_once():
        req = proto.decode(put_bytes, OffloadPut)
        store.cache.ram.clear()
        c = store.put(req.blocks, notify=False)
        return proto.encode(OffloadPutReply(store_id=1, stored=c.stored))

    async def lookup_once():
        kw = dict(message_bytes=LIMIT, max_large_bytes=256 << 20) if new_lookup else {}
        res = await store.lookup(hashes, LIMIT, False, False, **kw)
        extra = dict(large=res.large) if new_lookup else {}
        return proto.encode(OffloadLookupReply(store_id=1, held=res.held, blocks=res.blocks,
                                               disk_blocks=res.disk_blocks, **extra))

    reply = await lookup_once()

    class Bus:
        nc = None

        async def request(self, subject, message, *, timeout, reply_type=None):  # noqa: ASYNC109 (the Bus API)
            proto.encode(message)
            return proto.decode(reply, reply_type)

    client = OffloadClient(Bus(), "ns", max_message_bytes=LIMIT)
    client.set_instances([1])

    async def client_once():
        run = await client.lookup(hashes, 5.0)
        assert len(run) == N

    out: dict[str, list[float]] = {"store put": [], "store lookup": [], "client lookup": []}
    for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 7):
        for name, fn in (("store put", put_once), ("store lookup", lookup_once),
                         ("client lookup", client_once)):
            reps = 300
            t0 = time.process_time()
            for _ in range(reps):
                r = fn()
                if inspect.isawaitable(r):
                    await r
            out[name].append((time.process_time() - t0) / reps * 1e6)
            if name == "store put":
                store.put(blocks)
    for name, v in out.items():
        print(f"{name:14s} median {statistics.median(v):8.1f} us/request  "
              f"(rounds {', '.join(f'{x:.0f}' for x in v)})")


asyncio.run(main())
