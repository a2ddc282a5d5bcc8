"""`genset replay TRACE`: a Mooncake-format trace through the router and N mocker workers in
simulated time (no NATS, no etcd, no sleeping).

Prints hit rate, TTFT / ITL and load balance per policy (`--json`: one JSON object), and with
`--plot` a bar chart comparing them. The simulation itself is `genset.replay.simulate`.
"""

from __future__ import annotations

import argparse
import json
import sys

from genset.replay import disagg_sim
from genset.replay.simulate import ReplayConfig, run_replay
from genset.replay.trace import TraceError, load_trace
from genset.routing.api import POLICY_GENSET, POLICY_NAMES, policy_name

PLOT_KEYS = ("hit_rate", "ttft_mean_ms", "ttft_p90_ms", "itl_mean_ms")


def plot(results: list[dict], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["policy"] for r in results]
    fig, axes = plt.subplots(1, len(PLOT_KEYS), figsize=(4 * len(PLOT_KEYS), 3.6))
    for ax, key in zip(axes, PLOT_KEYS, strict=True):
        vals = [r[key] * (100 if key == "hit_rate" else 1) for r in results]
        ax.bar(names, vals, color=["#2b6cb0" if n == POLICY_GENSET else "#a0aec0" for n in names])
        ax.set_title(key.replace("_", " ").replace("hit rate", "hit rate %"))
        ax.tick_params(axis="x", rotation=30)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _positive(kind):
    def conv(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return v
    return conv


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genset replay", description=__doc__.split("\n\n")[0])
    p.add_argument("trace", help="Mooncake-format JSONL trace")
    p.add_argument("--policy", default=POLICY_GENSET,
                   help=f"one or several comma-separated policies to compare ({', '.join(POLICY_NAMES)})")
    p.add_argument("--workers", type=_positive(int), default=8)
    p.add_argument("--block-size", type=_positive(int), default=64)
    p.add_argument("--kv-blocks", type=_positive(int), default=4688, help="KV capacity per worker, in blocks")
    p.add_argument("--arrival-speedup", type=_positive(float), default=1.0,
                   help="3 = arrivals three times faster than in the trace")
    p.add_argument("--speedup-ratio", type=_positive(float), default=1.0, help="mocker step-time divisor")
    p.add_argument("--limit", type=_positive(int), default=None, help="only the first N requests")
    p.add_argument("--max-num-seqs", type=_positive(int), default=256)
    p.add_argument("--max-batched-tokens", type=_positive(int), default=8192)
    p.add_argument("--router-replicas", type=_positive(int), default=1,
                   help="router replicas sharing decisions (they take arrivals in turn)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="FILE.png", help="bar chart comparing the policies")
    disagg_sim.add_args(p)  # --prefill-workers, --decode-workers, --disagg (+ SLAs)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        policies = [policy_name(s.strip()) for s in args.policy.split(",") if s.strip()]
    except ValueError as exc:
        print(f"genset replay: --policy: {exc}", file=sys.stderr)
        return 2
    try:
        trace = load_trace(args.trace, limit=args.limit)
    except TraceError as exc:
        print(f"genset replay: {exc}", file=sys.stderr)
        return 2
    if disagg_sim.wanted(args):
        return disagg_sim.main_from_args(args, trace, policies)
    cfg = ReplayConfig(workers=args.workers, block_size=args.block_size, kv_blocks=args.kv_blocks,
                       max_num_seqs=args.max_num_seqs, max_batched_tokens=args.max_batched_tokens,
                       arrival_speedup=args.arrival_speedup, speedup_ratio=args.speedup_ratio,
                       seed=args.seed, router_replicas=args.router_replicas)
    results = []
    for name in policies:
        try:
            results.append(run_replay(trace, name, cfg))
        except ValueError as exc:
            print(f"genset replay: {exc}", file=sys.stderr)
            return 2
    if args.json:
        doc = results[0] if len(results) == 1 else {r["policy"]: r for r in results}
        print(json.dumps(doc))
    else:
        print(f"{len(trace)} requests, {cfg.workers} workers x {cfg.kv_blocks} blocks of {cfg.block_size}, "
              f"arrival speedup {cfg.arrival_speedup:g}")
        print(f"{'policy':<14}{'hit %':>7}{'TTFT mean':>11}{'p50':>8}{'p90':>8}{'p99':>8}{'ITL':>7}{'load cov':>10}{'wall s':>8}")
        for r in results:
            print(f"{r['policy']:<14}{r['hit_rate'] * 100:>7.1f}{r['ttft_mean_ms']:>11.0f}{r['ttft_p50_ms']:>8.0f}"
                  f"{r['ttft_p90_ms']:>8.0f}{r['ttft_p99_ms']:>8.0f}{r['itl_mean_ms']:>7.2f}{r['load_cov']:>10.3f}"
                  f"{r['wall_s']:>8.1f}")
    if args.plot:
        plot(results, args.plot, title=f"{len(trace)} requests, {cfg.workers} workers, {cfg.kv_blocks} blocks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
