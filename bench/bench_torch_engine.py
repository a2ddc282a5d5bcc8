"""Torch engine vs transformers `generate()` on the same model, on this machine's CPU.

1. Output tokens/s at batch (concurrency) 1, 8, 32 with mixed prompt lengths (16-256):
   - static: b requests, all exactly --max-tokens outputs: the engine gets them at once
     (packed batches, no padding); `generate()` gets them as one left-padded batch. Both
     produce exactly b * max_tokens tokens, greedy, EOS ignored.
   - continuous: 2b requests with output lengths drawn from [8, 2 * max_tokens]: the engine
     runs at most b at a time and refills a slot as soon as a request finishes;
     `generate()` runs them b at a time in arrival order, each batch until its longest
     output is done (only the requested tokens are counted).
   - stream: the same with --stream-per-slot * b requests (default 8b). With only 2b
     requests the run is mostly ramp-down (the batch empties while the longest requests
     finish), so "continuous" understates what refilling slots does for a server that sees a
     steady stream; "stream" measures that steady state.
2. Prefix cache: time to first token of a 2,000-token prompt cold, then fully cached.

Each number is the median of --repeats runs (fresh prompts each) after one global warm-up.
Wall time and this process's CPU time are both reported: on a shared machine the CPU-time
rates are the steadier comparison.

    .venv/bin/python bench/bench_torch_engine.py            # tiny model, ~1.5 minutes
    .venv/bin/python bench/bench_torch_engine.py --model /path/to/hf-dir --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import time

import torch

from genset.engines.torch.engine import TorchEngine
from genset.engines.torch.tiny import resolve_model
from genset.engines.types import EngineRequest
from proto.generate import SamplingParams, StopConditions

GREEDY = SamplingParams(temperature=0.0)


def make_prompts(n: int, vocab: int, seed: int, lo: int, hi: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


async def engine_run(engine: TorchEngine, prompts, max_tokens: list[int], tag: str):
    """(wall seconds, process CPU seconds) to finish all requests, submitted together."""

    async def one(i, p, n):
        req = EngineRequest(f"{tag}-{i}", p, GREEDY, StopConditions(max_tokens=n, ignore_eos=True))
        got = 0
        async for out in await engine.submit(req):
            got += len(out.token_ids)
        assert got == n, (got, n)

    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(
        *(one(i, p, n) for i, (p, n) in enumerate(zip(prompts, max_tokens, strict=True)))
    )
    return time.perf_counter() - t0, time.process_time() - c0


async def engine_ttft(engine: TorchEngine, prompt, tag: str) -> tuple[float, int]:
    req = EngineRequest(tag, prompt, GREEDY, StopConditions(max_tokens=1, ignore_eos=True))
    t0 = time.perf_counter()
    cached = 0
    async for out in await engine.submit(req):
        cached = out.cached_tokens
        break
    return time.perf_counter() - t0, cached


def hf_model(engine: TorchEngine, model_dir):
    import transformers

    raw = json.loads((model_dir / "config.json").read_text())
    raw.pop("genset_dummy_weights_seed", None)
    arch = (raw.get("architectures") or ["LlamaForCausalLM"])[0]
    cfg = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
    model = getattr(transformers, arch)(cfg).eval()
    # The very tensors the engine runs, so both sides compute the same function.
    model.load_state_dict(engine.runner.weights, strict=False)
    return model.to(device=engine.runner.device, dtype=engine.runner.dtype)


def hf_run(model, prompts, max_tokens: list[int], concurrency: int):
    """generate() over the requests in arrival order, `concurrency` at a time (static
    batching: each batch is left-padded to its longest prompt and runs until its longest
    output is done)."""
    dev = model.device
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(prompts), concurrency):
        batch = prompts[i : i + concurrency]
        n = max(max_tokens[i : i + concurrency])
        width = max(len(p) for p in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(batch):
            ids[j, width - len(p) :] = torch.tensor(p)
            mask[j, width - len(p) :] = 1
        with torch.no_grad():
            out = model.generate(
                ids.to(dev),
                attention_mask=mask.to(dev),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        assert out.shape[1] == width + n
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def workload(kind: str, b: int, vocab: int, seed: int, args):
    """static: b requests of exactly --max-tokens outputs (same work for both sides);
    continuous: 2b requests with outputs drawn from [8, 2 * --max-tokens], b at a time;
    stream: the same with --stream-per-slot * b requests."""
    rng = random.Random(seed)
    n = {"static": b, "continuous": 2 * b, "stream": args.stream_per_slot * b}[kind]
    prompts = make_prompts(n, vocab, seed, args.min_prompt, args.max_prompt)
    if kind == "static":
        return prompts, [args.max_tokens] * n
    return prompts, [rng.randint(8, 2 * args.max_tokens) for _ in range(n)]


async def main_async(args) -> dict:
    model_dir = resolve_model(args.model)

    def make_engine(max_running: int) -> TorchEngine:
        return TorchEngine(
            args.model,
            num_blocks=args.num_blocks,
            block_size=16,
            max_batch_tokens=args.max_batch_tokens,
            max_running=max_running,
            device=args.device,
            dtype=args.dtype,
            weights="dummy" if args.dummy else "auto",
        )

    engine = make_engine(256)
    await engine.start()
    vocab = engine.runner.vocab_size
    model = hf_model(engine, model_dir)
    results: dict = {"throughput": [], "ttft": {}}
    try:
        # One warm-up of each side (allocator, kernels' first-call setup), not measured.
        warm_prompts = make_prompts(4, vocab, 1, args.min_prompt, args.max_prompt)
        await engine_run(engine, warm_prompts, [8] * 4, "warmup")
        hf_run(model, warm_prompts, [8] * 4, 4)
        for kind in args.workloads:
            for b in args.batches:
                eng_b = make_engine(b)
                await eng_b.start()
                eng, hf = [], []
                for r in range(args.repeats):
                    # Fresh prompts every run: nothing is served from the prefix cache.
                    prompts, outs = workload(kind, b, vocab, 1000 * b + r, args)
                    e = await engine_run(eng_b, prompts, outs, f"{kind}{b}r{r}")
                    h = hf_run(model, prompts, outs, b)
                    eng.append((e, sum(outs)))
                    hf.append((h, sum(outs)))
                await eng_b.stop()

                def rate(runs, k):
                    return statistics.median(toks / t[k] for t, toks in runs)

                row = {
                    "workload": kind,
                    "batch": b,
                    "requests": len(prompts),
                    "engine_tok_s": rate(eng, 0),
                    "generate_tok_s": rate(hf, 0),
                    # Per CPU-second of this process: steadier than wall time on a shared box.
                    "engine_tok_cpu_s": rate(eng, 1),
                    "generate_tok_cpu_s": rate(hf, 1),
                }
                row["speedup"] = row["engine_tok_s"] / row["generate_tok_s"]
                row["speedup_cpu"] = row["engine_tok_cpu_s"] / row["generate_tok_cpu_s"]
                row = {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}
                results["throughput"].append(row)
                print(json.dumps(row), flush=True)

        cold, warm = [], []
        for r in range(args.repeats + 1):  # the first pair is a warm-up
            p = make_prompts(1, vocab, 777 + r, args.ttft_len, args.ttft_len)[0]
            c, cached_c = await engine_ttft(engine, p, f"cold{r}")
            w, cached_w = await engine_ttft(engine, p, f"warm{r}")
            assert cached_c == 0 and cached_w >= args.ttft_len - 16, (cached_c, cached_w)
            if r:
                cold.append(c)
                warm.append(w)
        results["ttft"] = {
            "prompt_tokens": args.ttft_len,
            "cold_ms": round(1000 * statistics.median(cold), 1),
            "cached_ms": round(1000 * statistics.median(warm), 1),
        }
        print(json.dumps(results["ttft"]), flush=True)
    finally:
        await engine.stop()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument(
        "--dummy", action="store_true", help="random weights even if a checkpoint exists"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16, float16")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument(
        "--workloads", default="static,continuous,stream", help="any of static,continuous,stream"
    )
    ap.add_argument(
        "--stream-per-slot",
        type=int,
        default=8,
        help="stream workload: requests per batch slot (default 8, i.e. 8b requests)",
    )
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--min-prompt", type=int, default=16)
    ap.add_argument("--max-prompt", type=int, default=256)
    ap.add_argument("--ttft-len", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--num-blocks", type=int, default=2048)
    ap.add_argument("--max-batch-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batches = [int(x) for x in args.batches.split(",")]
    args.workloads = args.workloads.split(",")
    unknown = set(args.workloads) - {"static", "continuous", "stream"}
    if unknown:
        ap.error(f"--workloads: unknown workload(s) {', '.join(sorted(unknown))}")
    if args.stream_per_slot < 1:
        ap.error("--stream-per-slot must be >= 1")
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, device {args.device}, "
        f"dtype {args.dtype or 'default'}",
        flush=True,
    )
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
