"""What carrying token ids with imported KV blocks costs (docs/architecture.md, "The offload
store checks every hash it can"), A/B alternated, medians of 7 (each the best of 20 / 5):

- `Scheduler.import_kv` of 256 new 16-token blocks with the pool keeping tokens (an eviction
  sink attached): without `token_ids` vs with the prompt (a slice and a pack per block);
- `BlockStore.put` of 2,000 checked blocks (1 KiB payload) into an empty RAM tier: with the
  probe for an unverified copy to replace (`_replace_unverified`) vs with it stubbed out.

    .venv/bin/python bench/bench_import_tokens.py
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genset.engines.scheduler import Scheduler, SchedulerConfig
from genset.kv.hashing import block_hashes
from services.kv_offload.store import BlockStore
from tests.offload_helpers import chain

BS, N, PUTS = 16, 256, 2000


def import_once(prompt: list[int], hashes: list[int], with_tokens: bool) -> float:
    s = Scheduler(SchedulerConfig(block_size=BS, num_blocks=N + 8))
    s.pool.keep_tokens = True
    s.pool.evicted = []
    t0 = time.perf_counter()
    s.import_kv(hashes, None, token_ids=prompt if with_tokens else None)
    return time.perf_counter() - t0


async def put_once(blocks, probe: bool) -> float:
    s = BlockStore(ram_bytes=1 << 30)
    await s.open()
    if not probe:
        s._replace_unverified = lambda h: None
    t0 = time.perf_counter()
    s.put(blocks)
    dt = time.perf_counter() - t0
    await s.close()
    return dt


async def main() -> None:
    prompt = [(i * 7919) % 30000 + 3 for i in range(N * BS)]
    hashes = block_hashes(prompt, BS)
    blocks = chain(1, PUTS, 1024)
    imp: dict[bool, list[float]] = {False: [], True: []}
    put: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(7):
        for w in (False, True):
            imp[w].append(min(import_once(prompt, hashes, w) for _ in range(20)))
            put[w].append(min([await put_once(blocks, w) for _ in range(5)]))
    for w in (False, True):
        m = statistics.median(imp[w])
        print(f"import_kv, token_ids={'prompt' if w else 'None':6}: {m * 1e3:.3f} ms / {N} blocks"
              f" = {m / N * 1e6:.2f} us/block")
    for w in (False, True):
        m = statistics.median(put[w])
        print(f"store put, replace probe={'on' if w else 'off':3}: {m * 1e3:.2f} ms / {PUTS} blocks"
              f" = {m / PUTS * 1e6:.2f} us/block")


if __name__ == "__main__":
    asyncio.run(main())
