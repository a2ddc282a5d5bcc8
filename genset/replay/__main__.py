"""`genset replay TRACE`: a Mooncake-format trace through the router and N mocker workers in
simulated time (no NATS, no etcd, no sleeping).

Prints hit rate, TTFT / ITL, SLO attainment (TTFT <= --sla-ttft-ms and the request's mean ITL
<= --sla-itl-ms), worker-seconds and load balance per policy (`--json`: one JSON object), and
with `--plot` a bar chart comparing them. With `--planner load|slo` the planner's core sizes
the fleet in simulated time (workers start --workers strong, within [--min-workers,
--max-workers], and become routable --startup-s after they are asked for); the result adds
every scaling event, and `--plot` draws load, pool size and TTFT over time. The simulation
itself is `genset.replay.simulate`, the fleet and planner `genset.replay.planner_sim`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from genset.offload.admission import ADMIT_MODES
from genset.offload.tiers import ADMISSION_POLICIES, DEFAULT_ADMISSION
from genset.planning import POLICIES as PLANNER_POLICIES
from genset.replay import disagg_sim
from genset.replay.cli_args import in_range, non_negative, positive
from genset.replay.disagg_sim import GBPS_RANGE, RATIO_RANGE
from genset.replay.metrics import DEFAULT_SLA_ITL_MS, DEFAULT_SLA_TTFT_MS
from genset.replay.offload import OffloadConfig
from genset.replay.planner_sim import PlannerSimConfig
from genset.replay.simulate import ReplayConfig, run_replay
from genset.replay.trace import TraceError, load_trace
from genset.routing.api import POLICY_GENSET, POLICY_NAMES, policy_name
from genset.runtime.config import DefaultsHelpFormatter

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


def plot_timeline(results: list[dict], path: str, title: str = "") -> None:
    """Load, pool size and TTFT over simulated time, one column per result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(results), figsize=(6 * len(results), 7.5), sharex="col",
                             squeeze=False)
    for col, r in enumerate(results):
        rows = r["timeline"]
        t = [row["t_s"] for row in rows]
        ax = axes[0][col]
        ax.plot(t, [row["arrivals_per_s"] for row in rows], color="#2b6cb0")
        ax.set_ylabel("arrivals / s")
        name = r.get("planner", {}).get("policy", "static")
        ax.set_title(f"{r['policy']} router, {name}: SLO {r['sla_attainment']:.1%}, "
                     f"{r['worker_seconds']:.0f} worker-s", fontsize=9)
        ax = axes[1][col]
        ax.step(t, [row["workers"] for row in rows], where="post", label="counted (incl. "
                "starting, draining)", color="#c05621")
        ax.step(t, [row["ready"] for row in rows], where="post", label="routable",
                color="#2f855a")
        ax.set_ylabel("workers")
        ax.legend(fontsize=7, loc="upper left")
        ax = axes[2][col]
        for key, color in (("ttft_p50_ms", "#718096"), ("ttft_p90_ms", "#c53030")):
            ax.plot(t, [row[key] if row[key] is not None else float("nan") for row in rows],
                    label=key.replace("_ms", "").replace("ttft_", "TTFT "), color=color)
        ax.axhline(r["sla_ttft_ms"], color="black", linestyle="--", linewidth=0.8,
                   label="SLA")
        ax.set_yscale("log")
        ax.set_ylabel("TTFT ms (by arrival)")
        ax.set_xlabel("simulated s")
        ax.legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Upper bounds of the sizes a replay builds in memory (measured: 4,096 workers took 2.7 GB,
# 2^26 offload blocks per tier 4.2 GB, 1,000 router replicas 0.76 GB; 10^10 KV blocks or
# 100,000 workers were a MemoryError after the trace was read)
MAX_WORKERS = disagg_sim.MAX_FLEET  # 1024
MAX_KV_BLOCKS = 1 << 22  # per worker: 268 M tokens at the default 64-token blocks
MAX_OFFLOAD_BLOCKS = 1 << 24  # per tier
MAX_ROUTER_REPLICAS = 64


def _ratio():
    """--speedup-ratio, --arrival-speedup: a finite ratio in RATIO_RANGE (why: there)."""
    return in_range(float, RATIO_RANGE, allow_zero=False)


def _gbps():
    """A copy rate in GB/s: 0 (free) or in GBPS_RANGE (why: there)."""
    return in_range(float, GBPS_RANGE, allow_zero=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genset replay", description=__doc__.split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter)
    p.add_argument("trace", help="Mooncake-format JSONL trace")
    p.add_argument("--policy", default=POLICY_GENSET,
                   help=f"one or several comma-separated policies to compare ({', '.join(POLICY_NAMES)})")
    p.add_argument("--workers", type=positive(int, MAX_WORKERS), default=8)
    p.add_argument("--block-size", type=positive(int), default=64)
    p.add_argument("--kv-blocks", type=positive(int, MAX_KV_BLOCKS), default=4688, help="KV capacity per worker, in blocks")
    p.add_argument("--arrival-speedup", type=_ratio(), default=1.0,
                   help="3 = arrivals three times faster than in the trace")
    p.add_argument("--speedup-ratio", type=_ratio(), default=1.0,
                   help="mocker step-time divisor")
    p.add_argument("--limit", type=positive(int), default=None, help="only the first N requests")
    p.add_argument("--max-num-seqs", type=positive(int), default=256)
    p.add_argument("--max-batched-tokens", type=positive(int), default=8192)
    p.add_argument("--router-replicas", type=positive(int, MAX_ROUTER_REPLICAS), default=1,
                   help="router replicas sharing decisions (they take arrivals in turn)")
    off = p.add_argument_group("KV offload store (shared by every worker; genset.replay.offload)")
    off.add_argument("--offload-ram-blocks", type=non_negative(int, MAX_OFFLOAD_BLOCKS), default=0,
                     help="the store's RAM tier, blocks (0 with no disk tier: no store)")
    off.add_argument("--offload-disk-blocks", type=non_negative(int, MAX_OFFLOAD_BLOCKS), default=0,
                     help="the store's disk tier, blocks")
    off.add_argument("--kv-bytes-per-token", type=non_negative(int), default=131072,
                     help="KV bytes of one token (default 131072: Llama-3-8B-shaped, bf16)")
    off.add_argument("--offload-d2h-gbps", type=_gbps(), default=32.0,
                     help="GB/s copying an evicted block out of a worker (0: free)")
    off.add_argument("--offload-h2d-gbps", type=_gbps(), default=32.0,
                     help="GB/s copying an onboarded block into a worker (0: free)")
    off.add_argument("--offload-disk-gbps", type=_gbps(), default=4.0,
                     help="GB/s reading a block from the store's disk tier (0: free)")
    off.add_argument("--offload-admission", choices=ADMISSION_POLICIES, default=DEFAULT_ADMISSION,
                     help="the store's admission (its --admission)")
    off.add_argument("--offload-admit", choices=ADMIT_MODES, default="all",
                     help="which evicted blocks workers ship to the store (the worker's "
                          "--offload-admit; default here: all, as before)")
    off.add_argument("--offload-sync-copies", action="store_true",
                     help="workers' steps wait for their KV copies (default: the copies run "
                          "beside the step's compute, layer by layer)")
    off.add_argument("--offload-no-copy-ahead", action="store_true",
                     help="workers copy a block out only when it is evicted (default: each "
                          "step's idle copy-out lane copies the worker's next blocks to be "
                          "evicted to the store ahead of time, as the mocker does: "
                          "MockerConfig.offload_copy_ahead_blocks)")
    off.add_argument("--offload-copy-ahead-blocks", type=non_negative(int), default=1024,
                     help="how far from its LRU end a worker copies out ahead (free blocks)")
    off.add_argument("--offload-hold-mb", type=non_negative(float), default=256.0,
                     help="each worker's host memory, MiB, for onboarded blocks with no room "
                          "in its cache beside the queue ahead, held until their request is "
                          "admitted (the worker's --offload-hold-mb; 0: not fetched)")
    off.add_argument("--offload-no-split", action="store_true",
                     help="onboard a store run whole even when its copy outlasts the prompt's "
                          "compute (default: compute its tail beside the copy, to the balance "
                          "point; genset.offload.onboard)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sla-ttft-ms", type=positive(float), default=DEFAULT_SLA_TTFT_MS,
                   help="a request meets its SLO when its TTFT is at most this (default 2000)")
    p.add_argument("--sla-itl-ms", type=positive(float), default=DEFAULT_SLA_ITL_MS,
                   help="... and its mean inter-token latency at most this (default 50)")
    g = p.add_argument_group("planner (the fleet sized in simulated time)")
    g.add_argument("--planner", choices=PLANNER_POLICIES, default=None,
                   help="size the fleet with the planner's core: load (KV use, waiting prompt "
                        "tokens) or slo (the smallest fleet meeting the SLAs); --workers is "
                        "the initial size")
    g.add_argument("--min-workers", type=positive(int, MAX_WORKERS), default=1)
    g.add_argument("--max-workers", type=positive(int, MAX_WORKERS), default=8)
    g.add_argument("--startup-s", type=non_negative(float), default=30.0,
                   help="simulated seconds from a worker being asked for to it being routable")
    g.add_argument("--planner-interval-s", type=positive(float), default=1.0,
                   help="simulated seconds between decisions")
    g.add_argument("--down-cooldown-s", type=positive(float), default=60.0,
                   help="a pool shrinks only after needing fewer workers for this long")
    g.add_argument("--planner-ttft-ms", type=positive(float), default=None,
                   help="slo policy: the TTFT it sizes for (default --sla-ttft-ms)")
    g.add_argument("--planner-itl-ms", type=positive(float), default=None,
                   help="slo policy: the ITL it sizes for (default --sla-itl-ms)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="FILE.png", help="bar chart comparing the policies")
    disagg_sim.add_args(p)  # --prefill-workers, --decode-workers, --disagg (+ SLAs)
    return p


def given_of(parser: argparse.ArgumentParser, args: argparse.Namespace,
             why_of) -> list[tuple[str, str]]:
    """(flag, why) of each flag given a value other than its default for which `why_of(flag)`
    says why it cannot be taken (None: it can): what a mode of the replay would otherwise
    silently ignore. A flag given explicitly at its default asks for nothing."""
    out = []
    for action in parser._actions:
        flag = action.option_strings[0] if action.option_strings else ""
        why = why_of(flag) if flag else None
        if why and getattr(args, action.dest) != action.default:
            out.append((flag, why))
    return out


def not_in_disagg(parser: argparse.ArgumentParser,
                  args: argparse.Namespace) -> list[tuple[str, str]]:
    """(flag, why) of the flags given (a value other than their default) that the
    disaggregated replay does not model: refused there rather than silently ignored."""
    return given_of(parser, args, lambda flag: (
        "it models one router" if flag == "--router-replicas" else
        "it models no KV offload store" if flag.startswith("--offload-") else
        "its fleet is fixed" if flag == "--planner" else
        "it draws no plot" if flag == "--plot" else None))


# the planner group's settings: without --planner the fleet is fixed at --workers and they
# were silently ignored
PLANNER_FLAGS = ("--min-workers", "--max-workers", "--startup-s", "--planner-interval-s",
                 "--down-cooldown-s", "--planner-ttft-ms", "--planner-itl-ms")


def needs_planner(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The planner flags given (a value other than their default) without --planner."""
    if args.planner is not None:
        return []
    return [flag for flag, _ in given_of(
        parser, args, lambda flag: "planner" if flag in PLANNER_FLAGS else None)]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        policies = [policy_name(s.strip()) for s in args.policy.split(",") if s.strip()]
    except ValueError as exc:
        print(f"genset replay: --policy: {exc}", file=sys.stderr)
        return 2
    if not policies:  # ran nothing and printed `{}` with exit status 0
        print(f"genset replay: --policy {args.policy!r} names no policy", file=sys.stderr)
        return 2
    # checked before the replay, which can take minutes, rather than a traceback after it
    if args.plot and not Path(args.plot).resolve().parent.is_dir():
        print(f"genset replay: --plot {args.plot}: no such directory", file=sys.stderr)
        return 2
    # what a disaggregated replay does not model: said before the trace is read, rather than
    # run without what was asked for
    refused = not_in_disagg(parser, args) if disagg_sim.wanted(args) else []
    for flag, why in refused:
        print(f"genset replay: {flag} is not available with a disaggregated replay "
              f"(--prefill-workers, --decode-workers, --disagg, --peer-prefill): {why}",
              file=sys.stderr)
    # the planner's settings without a planner: each named, rather than a fixed fleet run
    # as if they had been taken
    unplanned = needs_planner(parser, args)
    for flag in unplanned:
        print(f"genset replay: {flag} needs --planner ({' or '.join(PLANNER_POLICIES)}); "
              f"without it the fleet is fixed at --workers", file=sys.stderr)
    if refused or unplanned:
        return 2
    try:
        trace = load_trace(args.trace, limit=args.limit)
    except TraceError as exc:
        print(f"genset replay: {exc}", file=sys.stderr)
        return 2
    if disagg_sim.wanted(args):
        return disagg_sim.main_from_args(args, trace, policies)
    planner = None
    workers = args.workers
    if args.planner is not None:
        try:
            planner = PlannerSimConfig(
                policy=args.planner, min_workers=args.min_workers, max_workers=args.max_workers,
                startup_s=args.startup_s, interval_s=args.planner_interval_s,
                down_cooldown_s=args.down_cooldown_s, ttft_ms=args.planner_ttft_ms,
                itl_ms=args.planner_itl_ms)
        except ValueError as exc:
            print(f"genset replay: {exc}", file=sys.stderr)
            return 2
        workers = max(args.min_workers, min(args.max_workers, args.workers))
    cfg = ReplayConfig(workers=workers, block_size=args.block_size, kv_blocks=args.kv_blocks,
                       max_num_seqs=args.max_num_seqs, max_batched_tokens=args.max_batched_tokens,
                       arrival_speedup=args.arrival_speedup, speedup_ratio=args.speedup_ratio,
                       seed=args.seed, router_replicas=args.router_replicas,
                       offload=OffloadConfig(
                           ram_blocks=args.offload_ram_blocks,
                           disk_blocks=args.offload_disk_blocks,
                           kv_bytes_per_token=args.kv_bytes_per_token,
                           d2h_gbps=args.offload_d2h_gbps, h2d_gbps=args.offload_h2d_gbps,
                           disk_gbps=args.offload_disk_gbps,
                           copy_overlap=not args.offload_sync_copies,
                           admission=args.offload_admission,
                           worker_admit=args.offload_admit,
                           split_runs=not args.offload_no_split,
                           copy_ahead=not args.offload_no_copy_ahead,
                           copy_ahead_blocks=args.offload_copy_ahead_blocks,
                           hold_mb=args.offload_hold_mb),
                       sla_ttft_ms=args.sla_ttft_ms, sla_itl_ms=args.sla_itl_ms, planner=planner)
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
        fleet = (f"planner {planner.policy} ({cfg.workers} workers at start, {planner.min_workers}"
                 f"-{planner.max_workers}, start-up {planner.startup_s:g} s)" if planner
                 else f"{cfg.workers} workers")
        print(f"{len(trace)} requests, {fleet} x {cfg.kv_blocks} blocks of {cfg.block_size}, "
              f"arrival speedup {cfg.arrival_speedup:g}, SLA TTFT <= {cfg.sla_ttft_ms:g} ms and "
              f"ITL <= {cfg.sla_itl_ms:g} ms")
        print(f"{'policy':<14}{'hit %':>7}{'TTFT mean':>11}{'p50':>8}{'p90':>8}{'p99':>8}{'ITL':>7}"
              f"{'SLA %':>7}{'worker-s':>10}{'avg wk':>8}{'load cov':>10}{'wall s':>8}")
        for r in results:
            print(f"{r['policy']:<14}{r['hit_rate'] * 100:>7.1f}{r['ttft_mean_ms']:>11.0f}{r['ttft_p50_ms']:>8.0f}"
                  f"{r['ttft_p90_ms']:>8.0f}{r['ttft_p99_ms']:>8.0f}{r['itl_mean_ms']:>7.2f}"
                  f"{r['sla_attainment'] * 100:>7.1f}{r['worker_seconds']:>10.0f}{r['avg_workers']:>8.2f}"
                  f"{r['load_cov']:>10.3f}{r['wall_s']:>8.1f}")
        for r in results:
            for e in r["scale_events"]:
                print(f"  {r['policy']} t={e['t_s']:>8.1f}s {e['pool']} {e['from']}->{e['to']} "
                      f"({e['action']}): {e['reason']}")
            if "offload" in r:
                tiers = r["offload"]["hit_rate_by_tier"]
                print(f"{r['policy']:<14}hit % by tier: " + ", ".join(
                    f"{k} {v * 100:.1f}" for k, v in tiers.items()))
    if args.plot:
        title = f"{len(trace)} requests, {cfg.workers} workers, {cfg.kv_blocks} blocks"
        try:
            if planner is not None:
                plot_timeline(results, args.plot, title=title)
            else:
                plot(results, args.plot, title=title)
        except OSError as exc:  # read-only, full disk...: the results above still stand
            print(f"genset replay: --plot {args.plot}: cannot write: {exc.strerror or exc}",
                  file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
