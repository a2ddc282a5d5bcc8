"""Simulated engine steps per second of one process hosting many mocker workers.

Each worker is a `MockerCore` (the shared scheduler + block pool + timing model) kept under
load: whenever fewer than `--concurrency` requests are active on a worker, new ones arrive
(prompts share prefixes drawn from a small set, so the prefix cache and its KV events work
as in a real trace). The workers are stepped round-robin in simulated time, KV event batches
are drained after every step, and the wall-clock rate of steps is measured.

    .venv/bin/python bench/bench_mocker.py                 # 64 workers, 3 runs of 8 s
    .venv/bin/python bench/bench_mocker.py --workers 8 --seconds 3 --runs 1
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genset.engines.mocker import MockerConfig, MockerCore
from genset.engines.types import EngineRequest
from proto.generate import StopConditions


def run_once(args: argparse.Namespace, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(32000) for _ in range(args.prefix_len)] for _ in range(16)]
    # unique prompt tails are slices of one random pool: generating tokens one by one would
    # cost more than the mocker steps being measured
    pool = [rng.randrange(32000) for _ in range(1 << 16)]
    cores = [
        MockerCore(MockerConfig(num_blocks=args.kv_blocks), worker_id=i)
        for i in range(args.workers)
    ]
    next_id = 0

    def top_up(core: MockerCore) -> None:
        nonlocal next_id
        while core.num_running + core.num_waiting < args.concurrency:
            prompt = rng.choice(prefixes)[: rng.randint(0, args.prefix_len)]
            offset = rng.randrange(len(pool) - args.suffix_len)
            prompt = prompt + pool[offset : offset + rng.randint(16, args.suffix_len)]
            stop = StopConditions(max_tokens=rng.randint(16, args.max_tokens), ignore_eos=True)
            core.add_request(EngineRequest(f"r{next_id}", prompt, stop=stop))
            next_id += 1

    for core in cores:
        top_up(core)
    steps = tokens = events = 0
    sim_ms = 0.0
    start = time.perf_counter()
    deadline = start + args.seconds
    while time.perf_counter() < deadline:
        for core in cores:
            outputs, step_ms = core.step()
            sim_ms += step_ms
            steps += 1
            tokens += len(outputs)
            batch = core.take_kv_batch()
            if batch is not None:
                events += len(batch.events)
            top_up(core)
    elapsed = time.perf_counter() - start
    return {
        "steps_per_s": steps / elapsed,
        "output_tokens_per_s": tokens / elapsed,
        "simulated_speedup": sim_ms / args.workers / 1000 / elapsed,
        "event_batches_events": events,
        "requests": next_id,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=32, help="active requests per worker")
    p.add_argument("--kv-blocks", type=int, default=4096)
    p.add_argument("--prefix-len", type=int, default=1024)
    p.add_argument("--suffix-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()

    results = [run_once(args, seed) for seed in range(args.runs)]
    for i, r in enumerate(results):
        print(
            f"run {i}: {r['steps_per_s']:.0f} steps/s, {r['output_tokens_per_s']:.0f} output tokens/s, "
            f"simulated time {r['simulated_speedup']:.1f}x real per worker, {r['requests']} requests"
        )
    med = statistics.median(r["steps_per_s"] for r in results)
    med_tok = statistics.median(r["output_tokens_per_s"] for r in results)
    print(
        f"median: {med:.0f} steps/s ({med / args.workers:.0f} per worker), {med_tok:.0f} output tokens/s; "
        f"{args.workers} workers x {args.concurrency} active requests; python {platform.python_version()}"
    )


if __name__ == "__main__":
    main()
