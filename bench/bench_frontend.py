"""Frontend overhead, genset vs Dynamo 1.6.1, side by side with the same load generator.

Both systems run 2 mocker workers (same KV capacity, block size, batch limits, speedup) and
serve the same tokenizer (the Dynamo peer's model directory), and are driven by the peer's
`load.py` (streamed chat, ~1000-token prompts over 4 shared prefixes, 64 output tokens).
Runs alternate A, B, A, B...; every run starts its system from scratch and stops it after, so
one system never loads the machine while the other is measured. Results: one JSON per run
(load.py's output) in --out-dir, and a Markdown table of medians on stdout.

    .venv/bin/python bench/bench_frontend.py --reps 3                 # the full matrix
    .venv/bin/python bench/bench_frontend.py --stress 1000            # 1,000 concurrent streams

Needs the Dynamo peer installed (`../shared/peers/dynamo/setup.sh`, DYNAMO_PEER_DIR, default
/tmp/dynamo-peer). genset is started with `genset up` (mocker engine) on free ports with its
own NATS and etcd under a temporary state directory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from _common import MODEL_NAME, PEER_DIR, REPO, GensetUp, med

PEER = Path(os.environ.get("DYNAMO_PEER_HOME", REPO.parent / "shared" / "peers" / "dynamo"))


class GensetSystem(GensetUp):
    name = "genset"

    def __init__(self, speedup: float, router: str, log_dir: Path, *, coalesce: bool = True,
                 worker_coalesce_ms: float | None = None, source: Path | None = None) -> None:
        extra = ([] if worker_coalesce_ms is None
                 else [f"--worker-arg=--coalesce-ms={worker_coalesce_ms:g}"])
        super().__init__(workers=2, speedup=speedup, log_dir=log_dir, router=router,
                         source=source, extra_args=extra,
                         env={"GENSET_COALESCE": "true" if coalesce else "false"},
                         log_name="genset-up-{port}.log", worker_label="mocker", stop_s=30)
        if source is not None:
            self.name = "genset-base"


class DynamoSystem:
    name = "dynamo"

    def __init__(self, speedup: float, router: str, log_dir: Path) -> None:
        self.speedup = speedup
        self.router = router
        self.url = "http://127.0.0.1:" + os.environ.get("DYNAMO_PEER_HTTP_PORT", "8090")
        self.pids: dict[str, int] = {}
        self.env = {**os.environ, "DYNAMO_PEER_DIR": str(PEER_DIR),
                    "DYNAMO_PEER_SPEEDUP": str(speedup), "DYNAMO_PEER_ROUTER_MODE": router}

    def start(self) -> None:
        subprocess.run([str(PEER / "up.sh")], env=self.env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)
        piddir = PEER_DIR / "pids"
        self.pids = {name: int((piddir / f"{name}.pid").read_text())
                     for name in ("frontend", "mocker1", "mocker2", "nats", "etcd")}

    def stop(self) -> None:
        subprocess.run([str(PEER / "down.sh")], env=self.env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=120)


def run_load(system, *, n: int, concurrency: int, out: Path, max_tokens: int = 64,
             run_timeout: float = 600.0) -> dict:
    pids = ",".join(f"{k}={v}" for k, v in system.pids.items())
    cmd = [str(PEER_DIR / "venv" / "bin" / "python"), str(PEER / "load.py"), "--url", system.url,
           "--model", MODEL_NAME, "--n", str(n), "--concurrency", str(concurrency),
           "--max-tokens", str(max_tokens), "--num-prefixes", "4", "--prefix-words", "600",
           "--suffix-words", "40", "--seed", "2", "--warmup", "4", "--ignore-eos",
           "--run-timeout", str(run_timeout), "--pids", pids, "--out", str(out)]
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=run_timeout + 120)
    return json.loads(out.read_text())["summary"]


def summarize(rows: list[dict]) -> dict:
    n = rows[0]["n"]
    cpu = lambda key: [r["cpu"][key]["cpu_s"] * 1000 / n for r in rows if key in r["cpu"]]  # noqa: E731
    return {
        "runs": len(rows),
        "req_s": med([r["requests_per_s"] for r in rows]),
        "ttft_p50": med([r["ttft_ms"]["p50"] for r in rows]),
        "ttft_p99": med([r["ttft_ms"]["p99"] for r in rows]),
        "itl_p50": med([r["itl_ms"]["p50"] for r in rows]),
        "itl_p99": med([r["itl_ms"]["p99"] for r in rows]),
        "tpot_mean": med([r["tpot_ms"]["mean"] for r in rows]),
        "fe_cpu_ms": med(cpu("frontend")),
        "worker_cpu_ms": med([a + b for a, b in zip(cpu("mocker1"), cpu("mocker2"), strict=False)]),
        "infra_cpu_ms": med([a + b for a, b in zip(cpu("nats"), cpu("etcd"), strict=False)]),
        "client_cpu_ms": med(cpu("load_client")),
        "chunks": med([r["mean_chunks_per_request"] for r in rows]),
        "busy": med([r["machine_cpu_busy_pct_of_all_cores"] for r in rows]),
        "errors": sum(r["errors"] for r in rows),
        "prompt_tokens": med([r["mean_prompt_tokens"] for r in rows]),
        "completion_tokens": med([r["mean_completion_tokens"] for r in rows]),
    }


def matrix(args) -> int:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[tuple, list[dict]] = {}
    systems = ["genset", "dynamo"] + (["genset-base"] if args.genset_baseline else [])
    for speedup in args.speedups:
        for conc in args.concurrency:
            for rep in range(args.reps):
                for kind in systems if rep % 2 == 0 else reversed(systems):
                    if kind == "dynamo":
                        system = DynamoSystem(speedup, args.dynamo_router, out_dir)
                    else:
                        base = Path(args.genset_baseline) if kind == "genset-base" else None
                        system = GensetSystem(speedup, args.genset_router, out_dir,
                                              coalesce=not args.no_coalesce,
                                              worker_coalesce_ms=None if base else
                                              args.worker_coalesce_ms, source=base)
                    tag = f"{system.name}_s{speedup:g}_c{conc}_r{rep}"
                    try:
                        system.start()
                        summary = run_load(system, n=args.n, concurrency=conc,
                                           out=out_dir / f"{tag}.json")
                    finally:
                        system.stop()
                    results.setdefault((system.name, speedup, conc), []).append(summary)
                    print(f"{tag}: {summary['requests_per_s']} req/s, frontend "
                          f"{summary['cpu']['frontend']['cpu_s'] * 1000 / args.n:.2f} ms CPU/req, "
                          f"errors {summary['errors']}", file=sys.stderr, flush=True)
    print("| speedup | conc | system | runs | req/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | "
          "TPOT mean ms | frontend CPU ms/req | workers CPU ms/req | NATS+etcd CPU ms/req | "
          "client CPU ms/req | SSE chunks/req | machine busy % | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (name, speedup, conc), rows in results.items():
        s = summarize(rows)
        print(f"| {speedup:g} | {conc} | {name} | {s['runs']} | {s['req_s']} | {s['ttft_p50']} / "
              f"{s['ttft_p99']} | {s['itl_p50']} / {s['itl_p99']} | {s['tpot_mean']} | "
              f"{s['fe_cpu_ms']} | {s['worker_cpu_ms']} | {s['infra_cpu_ms']} | "
              f"{s['client_cpu_ms']} | {s['chunks']} | {s['busy']} | {s['errors']} |")
    (out_dir / "summary.json").write_text(json.dumps(
        {f"{k[0]}_s{k[1]:g}_c{k[2]}": summarize(v) for k, v in results.items()}, indent=1))
    return 0


def stress(args) -> int:
    """N concurrent streams against genset mocker workers: every one must finish with all its
    tokens, and nothing may stay in flight afterwards."""
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    system = GensetSystem(args.stress_speedup, args.genset_router, out_dir)
    try:
        system.start()
        summary = run_load(system, n=args.stress, concurrency=args.stress,
                           out=out_dir / f"stress_{args.stress}.json", run_timeout=300)
        time.sleep(1.0)
        metrics = urllib.request.urlopen(system.url + "/metrics", timeout=5).read().decode()
        inflight = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                       if line.startswith("genset_frontend_inflight_requests{"))
    finally:
        system.stop()
    ok = summary["ok"] == args.stress and summary["errors"] == 0 and inflight == 0 and \
        summary["mean_completion_tokens"] == 64
    print(json.dumps({"requests": args.stress, "ok": summary["ok"], "errors": summary["errors"],
                      "first_errors": summary.get("first_errors"), "wall_s": summary["wall_s"],
                      "req_s": summary["requests_per_s"],
                      "mean_completion_tokens": summary["mean_completion_tokens"],
                      "ttft_ms": summary["ttft_ms"], "e2e_ms": summary["e2e_ms"],
                      "frontend_inflight_after": inflight, "passed": ok}, indent=1))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--n", type=int, default=200, help="measured requests per run")
    p.add_argument("--speedups", type=float, nargs="+", default=[1000.0, 1.0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    p.add_argument("--genset-router", default="round-robin")
    p.add_argument("--dynamo-router", default="round-robin")
    p.add_argument("--out-dir", default="/tmp/genset-bench-frontend")
    p.add_argument("--no-coalesce", action="store_true",
                   help="genset frontend: one SSE event per worker frame (--no-coalesce)")
    p.add_argument("--worker-coalesce-ms", type=float, default=None,
                   help="genset mocker workers' --coalesce-ms (default: the worker's, 0.5; "
                        "0: one frame per engine step)")
    p.add_argument("--genset-baseline", default="",
                   help="also run this other genset checkout (e.g. `git archive <commit>` "
                        "unpacked) as system genset-base, alternated with the others")
    p.add_argument("--stress", type=int, default=0, help="run the N-concurrent-streams check instead")
    p.add_argument("--stress-speedup", type=float, default=100.0)
    args = p.parse_args(argv)
    if not (PEER_DIR / "venv" / "bin" / "python").exists():
        print(f"Dynamo peer not installed in {PEER_DIR}: run {PEER}/setup.sh", file=sys.stderr)
        return 2
    return stress(args) if args.stress else matrix(args)


if __name__ == "__main__":
    sys.exit(main())
