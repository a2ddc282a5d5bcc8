"""Replay comparison: genset's policies vs Dynamo's own replay numbers on the Mooncake trace.

Runs `genset replay` (in-process) for every policy at the Dynamo harness settings (8 workers,
block size 64, 256 seqs, 8192 batched tokens, polynomial timing at speedup 1) for 0.3M and 3M
tokens of KV per worker and 1x / 3x arrival speed, and writes JSON, a markdown table and a
plot. Dynamo's numbers are read from `bench/replay_dynamo_reference.json` (made by
`../shared/peers/dynamo/replay.sh`, see that file's `command`).

    .venv/bin/python bench/replay_compare.py --out docs/bench/router_replay.json \
        --plot docs/bench/router_replay.png
"""

from __future__ import annotations

import argparse
import json
import os
import time

from genset.replay.simulate import ReplayConfig, run_replay
from genset.replay.trace import load_trace

HERE = os.path.dirname(os.path.abspath(__file__))
TRACE = os.path.join(HERE, "..", "..", "shared", "data", "mooncake_synthetic_trace.jsonl")
SETTINGS = [("0.3M", 4688, 1.0), ("3M", 46875, 1.0), ("0.3M", 4688, 3.0), ("3M", 46875, 3.0)]
POLICIES = ["genset", "dynamo", "sglang", "least-loaded", "random", "round-robin"]
KEYS = ("hit_rate", "ttft_mean_ms", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "itl_mean_ms", "load_cov")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", default=TRACE)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--out", default=os.path.join(HERE, "..", "docs", "bench", "router_replay.json"))
    ap.add_argument("--plot", default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--from-json", help="redraw table and plot from an earlier --out file")
    args = ap.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            rows = json.load(f)["rows"]
        print(markdown(rows))
        if args.plot:
            plot(rows, args.plot)
        return 0
    trace = load_trace(args.trace, limit=args.limit)
    with open(os.path.join(HERE, "replay_dynamo_reference.json")) as f:
        dyn = json.load(f)
    rows = []
    for cap, blocks, speed in SETTINGS:
        key = f"{cap}/{speed:g}x"
        for mode in ("kv_router", "round_robin"):
            ref = dyn["results"].get(f"{key}/{mode}")
            if ref:
                rows.append({"setting": key, "system": "dynamo", "policy": mode, **ref})
        for pol in args.policies.split(","):
            t0 = time.perf_counter()
            r = run_replay(trace, pol, ReplayConfig(kv_blocks=blocks, arrival_speedup=speed))
            row = {"setting": key, "system": "genset", "policy": r["policy"], **{k: r[k] for k in KEYS},
                   "wall_s": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump({"trace": os.path.basename(args.trace), "requests": len(trace), "rows": rows}, f, indent=1)
    print(markdown(rows))
    if args.plot:
        plot(rows, args.plot)
    return 0


def markdown(rows: list[dict]) -> str:
    out = ["| KV per worker / arrival | system | policy | hit % | TTFT mean | p50 | p90 | p99 ms | ITL ms | load CoV |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cov = f"{r['load_cov']:.3f}" if r.get("load_cov") is not None else "-"
        out.append(f"| {r['setting']} | {r['system']} | {r['policy']} | {r['hit_rate'] * 100:.1f} | "
                   f"{r['ttft_mean_ms']:.0f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p90_ms']:.0f} | "
                   f"{r['ttft_p99_ms']:.0f} | {r['itl_mean_ms']:.2f} | {cov} |")
    return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 4), sharey=False)
    for ax, s in zip(axes, settings, strict=True):
        for r in (r for r in rows if r["setting"] == s):
            label = f"{r['system']}:{r['policy']}"
            marker = "*" if r["system"] == "genset" and r["policy"] == "genset" else (
                "s" if r["system"] == "dynamo" else "o")
            size = 220 if marker == "*" else 60
            ax.scatter(r["hit_rate"] * 100, r["ttft_mean_ms"], s=size, marker=marker, label=label)
        ax.set_title(f"KV {s}")
        ax.set_xlabel("hit rate %")
        ax.set_ylabel("TTFT mean ms (log)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle("Mooncake trace, 8 workers: better = right and down")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
