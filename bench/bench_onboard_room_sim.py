"""Onboarding into a small cache, in one engine core (no services, no clock): how many
onboarded blocks are used, how many evicted unused.

One `MockerCore` of `--kv-blocks` blocks of 16 tokens, `--clients` closed-loop clients
(a request finishes, the next is submitted before the next step) sending ~1,480-token
prompts that share 12 prefixes, and an ideal store that holds every block ever cached:
before each submit, the store's run after the device-cached prefix (at most half the
blocks, as the worker's hook) is imported with the request (`KvImport(optional=True)`,
where the engine has the field; `--not-optional`: as a transfer's KV).

    .venv/bin/python bench/bench_onboard_room_sim.py --clients 4 --requests 200

Prints: requests, requests with 0 cached tokens, prompt tokens served from the cache,
blocks onboarded, onboarded blocks evicted unused (`BlockPool.num_imports_evicted_unused`),
blocks cut for want of room (`import_blocks_no_room`), preemptions, blocks held in host
memory until their request's admission and used there. Deterministic.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from genset.engines.mocker import MockerConfig, MockerCore, mock_payload
from genset.engines.types import EngineRequest, KvBlockData, KvImport
from genset.kv.hashing import block_hashes
from proto.generate import SamplingParams, StopConditions

BS = 16


def main(args) -> dict:
    core = MockerCore(MockerConfig(num_blocks=args.kv_blocks, block_size=BS, vocab_size=32000))
    if hasattr(core.scheduler, "max_held_bytes"):  # as the worker's --offload-hold-mb
        core.scheduler.max_held_bytes = int(args.hold_mb * (1 << 20))
    optional = ({"optional": True} if not args.not_optional
                and "optional" in {f.name for f in dataclasses.fields(KvImport)} else {})
    rng = random.Random(args.seed)
    prefixes = [[rng.randrange(3, 30000) for _ in range(1400)] for _ in range(12)]
    store: set[int] = set()
    max_blocks = args.kv_blocks // 2
    out = {"requests": 0, "zero_cached": 0, "cached_tokens": 0, "onboarded": 0}
    n = 0

    def submit() -> None:
        nonlocal n
        p = prefixes[rng.randrange(12)] + [rng.randrange(3, 30000) for _ in range(80)]
        full = (len(p) - 1) // BS
        hs = block_hashes(p[:full * BS], BS)
        have = core.cached_blocks(hs)
        run = []
        for h in hs[have:min(full, max_blocks)]:
            if h not in store:
                break
            run.append(h)
        kv = None
        if run:
            kv = KvImport([KvBlockData(h, mock_payload(0)) for h in run],
                          parent_hash=hs[have - 1] if have else None, token_ids=p,
                          first_block=have, **optional)
            out["onboarded"] += len(run)
        core.add_request(EngineRequest(
            f"r{n}", p, SamplingParams(temperature=0.0),
            StopConditions(max_tokens=args.max_tokens, ignore_eos=True), kv_import=kv))
        n += 1

    for _ in range(args.clients):
        submit()
    while out["requests"] < args.requests:
        outs, _ = core.step()
        store |= core.pool.cached_hashes()
        for o in outs:
            if o.finish_reason is not None:
                out["requests"] += 1
                out["cached_tokens"] += o.cached_tokens
                out["zero_cached"] += o.cached_tokens == 0
                submit()
    out["onboarded_evicted_unused"] = getattr(core.pool, "num_imports_evicted_unused", None)
    out["import_blocks_no_room"] = getattr(core, "import_blocks_no_room", None)
    out["preemptions"] = core.scheduler.num_preemptions
    out["held_blocks"] = getattr(core.scheduler, "num_held_blocks", None)
    out["held_used"] = getattr(core.scheduler, "num_held_used", None)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--kv-blocks", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--not-optional", action="store_true")
    ap.add_argument("--hold-mb", type=float, default=256.0,
                    help="host memory for onboarded blocks held until their request's "
                         "admission (the worker's --offload-hold-mb; 0: off, as before "
                         "2026-12-08)")
    print(json.dumps(main(ap.parse_args())))
