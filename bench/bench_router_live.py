"""Live KV routing vs round-robin: `genset up` with mocker or torch workers, a shared-prefix
workload from the Dynamo peer's neutral load generator, cached-token share and TTFT per router mode.

    .venv/bin/python bench/bench_router_live.py --workers 4 --modes embedded,round-robin --reps 2
    # torch workers serve the built-in tiny model with its own tokenizer; it is slow on CPU, so
    # the workload is smaller (numbers in docs/benchmarks.md, Issue 5, "Live")
    .venv/bin/python bench/bench_router_live.py --engine torch --workers 2 --n 120 --concurrency 4 \
        --prefixes 20 --prefix-words 300 --suffix-words 20 --max-tokens 16 --ignore-eos --reps 3

Each run starts its own stack (its own NATS, etcd, ports and state dir, so nothing is shared
with other stacks on the machine), waits until the model is listed, runs load.py, stops the
stack (SIGINT, like Ctrl-C) and prints one JSON line. Modes alternate (A, B, A, B, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx

from genset.runtime.infra import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEER = os.path.join(ROOT, "..", "shared", "peers", "dynamo")
MODEL_DIR = os.environ.get("DYNAMO_PEER_DIR", "/tmp/dynamo-peer") + "/model"


def run_once(mode: str, args) -> dict:
    port = free_port()
    state = tempfile.mkdtemp(prefix="gs-live-")
    argv = [os.path.join(ROOT, ".venv", "bin", "genset"), "up", "--port", str(port),
            "--workers", str(args.workers), "--engine", args.engine, "--router", mode,
            "--speedup", str(args.speedup), "--nats", f"nats://127.0.0.1:{free_port()}",
            "--etcd", f"127.0.0.1:{free_port()}", "--state-dir", state,
            "--namespace", f"live{port}"]
    if args.kv_blocks > 0:  # 0: let the engine size its cache
        argv.append(f"--worker-arg=--kv-blocks={args.kv_blocks}")
    # mocker: the Dynamo peer's tokenizer, so prompts tokenize as they do on Dynamo; torch: the
    # built-in tiny model (its own tokenizer: it has no weights for the peer's config)
    use_peer = args.engine == "mocker" and os.path.isdir(MODEL_DIR)
    if use_peer:
        argv += ["--model", MODEL_DIR, "--served-model-name", "dynpeer-mock"]
    model = "dynpeer-mock" if use_peer else "tiny"
    log = open(os.path.join(state, "up.log"), "w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"genset up exited early, see {state}/up.log")
            try:
                if model in httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).text:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"stack not ready, see {state}/up.log")
            time.sleep(0.5)
        out = os.path.join(state, "load.json")
        cmd = [sys.executable, os.path.join(PEER, "load.py"), "--url", f"http://127.0.0.1:{port}",
               "--model", model, "--n", str(args.n), "--concurrency", str(args.concurrency),
               "--max-tokens", str(args.max_tokens), "--num-prefixes", str(args.prefixes),
               "--prefix-words", str(args.prefix_words), "--suffix-words", str(args.suffix_words),
               "--seed", "2", "--warmup", "4", "--out", out]
        if args.ignore_eos:
            cmd.append("--ignore-eos")
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=args.load_timeout)
        with open(out) as f:
            res = json.load(f)["summary"]
        return {"mode": mode, "engine": args.engine, "workers": args.workers,
                "prefixes": args.prefixes, "n": args.n, "concurrency": args.concurrency,
                "mean_prompt_tokens": res.get("mean_prompt_tokens"),
                "mean_completion_tokens": res.get("mean_completion_tokens"),
                "cached_token_share": res.get("cached_token_share"),
                "ttft_p50_ms": res["ttft_ms"]["p50"], "ttft_p90_ms": res["ttft_ms"]["p90"],
                "ttft_mean_ms": res["ttft_ms"]["mean"], "requests_per_s": res["requests_per_s"],
                "machine_busy_pct": res.get("machine_cpu_busy_pct_of_all_cores")}
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--modes", default="embedded,round-robin")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--prefixes", type=int, default=40)
    ap.add_argument("--kv-blocks", type=int, default=8192)
    ap.add_argument("--speedup", type=float, default=1.0)
    ap.add_argument("--engine", choices=["mocker", "torch"], default="mocker")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prefix-words", type=int, default=600)
    ap.add_argument("--suffix-words", type=int, default=40)
    ap.add_argument("--ignore-eos", action="store_true",
                    help="ask the engine not to stop at EOS (every request gets --max-tokens)")
    ap.add_argument("--load-timeout", type=float, default=600, help="seconds load.py may run")
    args = ap.parse_args()
    if args.engine == "torch" and args.kv_blocks == 8192:
        args.kv_blocks = 0  # the mocker default; torch sizes its cache from memory
    for _ in range(args.reps):
        for mode in args.modes.split(","):
            print(json.dumps(run_once(mode, args)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
