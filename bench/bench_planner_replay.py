"""Planner benchmark in simulated time: static provisioning vs the planner's policies.

For each workload, in `genset replay`'s simulation (mocker timing, KV-aware router):
- static at peak: the smallest fixed fleet whose SLO attainment reaches --peak-attainment
  (0.99) on the whole trace (found by bisection over 1..--max-workers);
- static at mean: that fleet scaled by the trace's mean / peak arrival rate (rounded, >= 1);
- the load and the SLO policy, starting at the static-at-peak size, within [1, static at
  peak] (the same budget cap as Dynamo's max_gpu_budget), for each worker start-up time.

Workloads: (a) the Mooncake trace with its arrivals re-timed to a sinusoid between a quarter
of the peak and the peak (period --period-s), (b) the Azure traces' arrivals and lengths (time
compressed by --azure-time-scale: code 2x (bursty, prefill-heavy: 2k-token prompts, 28 output
tokens), conv 4x (smooth, 1.2k prompts, 211 output tokens); at their own speed both are light
for a mocker fleet).
SLO: TTFT <= 2 s and the request's mean ITL <= 50 ms (Dynamo's replay's definition).

    python bench/bench_planner_replay.py                       # everything (~15 min, 2 cores)
    python bench/bench_planner_replay.py --workloads mooncake --startups 30 --json out.json
    python bench/bench_planner_replay.py --plot-dir /tmp/plots # timeline plots per planner run
    python bench/bench_planner_replay.py --workloads mooncake --capped 3   # + runs at a budget
    python bench/bench_planner_replay.py --workloads mooncake --policies slo --seeds 0,1,2

Prints one table per workload: attainment, worker-seconds (and share of static at peak),
average workers, scale events, TTFT p50 / p99.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone

from genset.planning.workload import modulate, rate_profile, read_azure
from genset.replay.planner_sim import PlannerSimConfig
from genset.replay.simulate import ReplayConfig, run_replay
from genset.replay.trace import load_trace

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GENSET_DATA", ROOT.parent / "shared" / "data"))
if not DATA.exists():  # a worktree beside the main checkout: /work/wt/X -> /work/shared
    DATA = ROOT.parents[1] / "shared" / "data"


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        out = [json.loads(line) for line in f if line.strip()]
    out.sort(key=lambda r: r["timestamp"])
    return out


def write_jsonl(records: list[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def workloads(args, tmp: Path) -> dict[str, tuple[Path, float]]:
    """name -> (Mooncake-format trace file, peak / mean arrival rate)."""
    out = {}
    for name in args.workloads:
        if name == "mooncake":
            recs = modulate(read_jsonl(DATA / "mooncake_synthetic_trace.jsonl"),
                            period_s=args.period_s, low=0.25)
            peak_over_mean = 1 / ((1 + 0.25) / 2)  # the sinusoid's own ratio
        elif name.startswith("azure-"):
            scales = dict(kv.split("=") for kv in args.azure_time_scale.split(","))
            recs = read_azure(str(DATA / f"azure_llm_{name[6:]}_2023.csv"),
                              time_scale=float(scales[name[6:]]), limit=args.azure_limit)
            rates = rate_profile(recs, args.peak_bucket_s)[:-1] or rate_profile(recs, 60.0)
            peak_over_mean = max(rates) / statistics.fmean(rates)
        else:
            raise SystemExit(f"unknown workload {name!r} (mooncake, azure-conv, azure-code)")
        path = tmp / f"{name}.jsonl"
        write_jsonl(recs, path)
        out[name] = (path, peak_over_mean)
    return out


def replay(trace, workers: int, args, planner: PlannerSimConfig | None = None,
           seed: int | None = None) -> dict:
    cfg = ReplayConfig(workers=workers, kv_blocks=args.kv_blocks, block_size=64,
                       speedup_ratio=1.0, planner=planner,
                       seed=args.seed if seed is None else seed)
    t0 = time.perf_counter()
    r = run_replay(trace, args.router, cfg)
    r["bench_wall_s"] = time.perf_counter() - t0
    return r


def static_at_peak(trace, args, log) -> tuple[int, dict[int, dict]]:
    """Smallest N in [1, max] with attainment >= target (bisection: attainment grows with N)."""
    runs: dict[int, dict] = {}

    def ok(n: int) -> bool:
        if n not in runs:
            runs[n] = replay(trace, n, args)
            log(f"    static {n}: attainment {runs[n]['sla_attainment']:.3f} "
                f"({runs[n]['bench_wall_s']:.0f} s)")
        return runs[n]["sla_attainment"] >= args.peak_attainment

    lo, hi = 1, args.max_workers
    if not ok(hi):
        return hi, runs
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi, runs


ROW_KEYS = ("sla_attainment", "ttft_sla_attainment", "itl_sla_attainment", "worker_seconds",
            "avg_workers", "goodput_out_tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_mean_ms",
            "hit_rate", "duration_s", "bench_wall_s")


def row(label: str, r: dict, ref_ws: float) -> dict:
    out = {"config": label, **{k: r[k] for k in ROW_KEYS}}
    out["ws_share_of_peak"] = r["worker_seconds"] / ref_ws if ref_ws else float("nan")
    out["scale_events"] = len(r["scale_events"])
    out["peak_workers"] = r.get("peak_workers")
    return out


def spread(rows: list[dict]) -> list[dict]:
    """Per planner config run with several router seeds: min / median / max of attainment
    and of the share of static at peak (a planner's run is chaotic: one worker more or less
    at one peak changes its feedback and floors for the rest of the run, and the router's
    seed alone moved the Mooncake sinusoid's SLO run, 120 s start-up, from 0.74 to 0.83 of
    static at peak)."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        if "seed" in r:
            by.setdefault(r["base_config"], []).append(r)
    out = []
    for cfg, rs in by.items():
        if len(rs) < 2:
            continue
        att = sorted(r["sla_attainment"] for r in rs)
        share = sorted(r["ws_share_of_peak"] for r in rs)
        out.append({"config": cfg, "seeds": [r["seed"] for r in rs],
                    "attainment": [att[0], statistics.median(att), att[-1]],
                    "ws_share_of_peak": [share[0], statistics.median(share), share[-1]]})
    return out


def print_table(name: str, rows: list[dict], out) -> None:
    print(f"\n{name}", file=out)
    print(f"{'config':<28}{'SLO %':>7}{'TTFT %':>8}{'ITL %':>7}{'worker-s':>10}{'/peak':>7}"
          f"{'avg wk':>8}{'events':>7}{'TTFT p50':>10}{'p99':>8}{'goodput tok/s':>15}", file=out)
    for r in rows:
        print(f"{r['config']:<28}{r['sla_attainment'] * 100:>7.1f}"
              f"{r['ttft_sla_attainment'] * 100:>8.1f}{r['itl_sla_attainment'] * 100:>7.1f}"
              f"{r['worker_seconds']:>10.0f}{r['ws_share_of_peak']:>7.2f}{r['avg_workers']:>8.2f}"
              f"{r['scale_events']:>7}{r['ttft_p50_ms']:>10.0f}{r['ttft_p99_ms']:>8.0f}"
              f"{r['goodput_out_tok_s']:>15.0f}", file=out)


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """The flags that say which trace is replayed how, and what static at peak is (shared
    with bench/planner_oracle.py, whose schedules are compared with these rows)."""
    p.add_argument("--period-s", type=float, default=300.0, help="mooncake: sinusoid period")
    p.add_argument("--azure-time-scale", default="code=0.5,conv=0.25",
                   help="azure: per trace, < 1 compresses time (a heavier load; both traces "
                        "are light for a mocker fleet at their own speed)")
    p.add_argument("--azure-limit", type=int, default=None, help="azure: first N requests")
    p.add_argument("--peak-bucket-s", type=float, default=60.0,
                   help="azure: bucket of the rate profile that defines peak / mean")
    p.add_argument("--max-workers", type=int, default=12, help="ceiling of the static search")
    p.add_argument("--peak-attainment", type=float, default=0.99,
                   help="static at peak = smallest fleet reaching this attainment")
    p.add_argument("--kv-blocks", type=int, default=4688)
    p.add_argument("--router", default="genset")
    p.add_argument("--interval-s", type=float, default=1.0,
                   help="simulated seconds between a planner's decisions")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="mooncake,azure-code,azure-conv",
                   help="comma separated: mooncake, azure-conv, azure-code")
    p.add_argument("--startups", default="30,120", help="worker start-up times (s) to test")
    p.add_argument("--policies", default="load,slo")
    add_workload_args(p)
    p.add_argument("--down-cooldown-s", type=float, default=60.0)
    p.add_argument("--capped", type=int, default=0, metavar="N",
                   help="also run each policy with at most N workers (a budget: Dynamo's "
                        "planner averaged ~3 on the Mooncake sinusoid)")
    p.add_argument("--seed", type=int, default=0, help="the routers' seed")
    p.add_argument("--seeds", default=None, metavar="S,S,...",
                   help="run every planner row once per router seed (the static search uses "
                        "the first) and print min / median / max over them")
    p.add_argument("--json", metavar="FILE", help="write every row and setting here")
    p.add_argument("--plot-dir", metavar="DIR", help="timeline plot of each planner run")
    args = p.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    startups = [float(s) for s in args.startups.split(",") if s.strip()]
    policies = [s.strip() for s in args.policies.split(",") if s.strip()]
    try:
        seeds = ([int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds
                 else [args.seed])
    except ValueError:
        raise SystemExit(f"--seeds takes integers separated by commas, got {args.seeds!r}") from None
    if not seeds:
        raise SystemExit("--seeds: no seed given")
    args.seed = seeds[0]

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    doc: dict = {"settings": {k: v for k, v in vars(args).items()}, "workloads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (path, peak_over_mean) in workloads(args, Path(tmp)).items():
            trace = load_trace(str(path))
            span = (trace[-1].arrival_ms - trace[0].arrival_ms) / 1000.0
            log(f"{name}: {len(trace)} requests over {span:.0f} s, peak/mean rate "
                f"{peak_over_mean:.2f}")
            n_peak, runs = static_at_peak(trace, args, log)
            n_mean = max(1, round(n_peak / peak_over_mean))
            if n_mean not in runs:
                runs[n_mean] = replay(trace, n_mean, args)
            ref = runs[n_peak]["worker_seconds"]
            rows = [row(f"static at peak ({n_peak})", runs[n_peak], ref),
                    row(f"static at mean ({n_mean})", runs[n_mean], ref)]
            caps = [n_peak] + ([args.capped] if 0 < args.capped < n_peak else [])
            for cap in caps:
                for startup in startups:
                    for pol in policies:
                        for seed in seeds:
                            planner = PlannerSimConfig(
                                policy=pol, min_workers=1, max_workers=cap, startup_s=startup,
                                interval_s=args.interval_s,
                                down_cooldown_s=args.down_cooldown_s)
                            r = replay(trace, cap, args, planner, seed=seed)
                            tag = "" if cap == n_peak else f", max {cap}"
                            stag = f", seed {seed}" if len(seeds) > 1 else ""
                            log(f"    {pol} start-up {startup:g} s{tag}{stag}: attainment "
                                f"{r['sla_attainment']:.3f}, {r['avg_workers']:.2f} workers "
                                f"({r['bench_wall_s']:.0f} s)")
                            base = f"{pol}, start-up {startup:g}s{tag}"
                            rows.append(row(base + stag, r, ref))
                            if len(seeds) > 1:
                                rows[-1].update(seed=seed, base_config=base)
                            if args.plot_dir:
                                from genset.replay.__main__ import plot_timeline

                                os.makedirs(args.plot_dir, exist_ok=True)
                                suffix = "" if cap == n_peak else f"-max{cap}"
                                suffix += f"-seed{seed}" if len(seeds) > 1 else ""
                                plot_timeline([r], os.path.join(
                                    args.plot_dir,
                                    f"{name}-{pol}-startup{startup:g}{suffix}.png"),
                                    title=f"{name}, {pol} policy, start-up {startup:g} s"
                                          f"{tag}{stag}")
            title = (f"{name}: {len(trace)} requests over {span:.0f} s, static at peak = "
                     f"{n_peak} workers (>= {args.peak_attainment:.0%} attainment), SLO TTFT "
                     f"<= 2 s and ITL <= 50 ms")
            print_table(title, rows, sys.stdout)
            spreads = spread(rows)
            for sp in spreads:
                a, w = sp["attainment"], sp["ws_share_of_peak"]
                print(f"  {sp['config']}, seeds {','.join(map(str, sp['seeds']))}: attainment "
                      f"{a[0] * 100:.1f} / {a[1] * 100:.1f} / {a[2] * 100:.1f} %, share of "
                      f"static at peak {w[0]:.3f} / {w[1]:.3f} / {w[2]:.3f} (min / median / "
                      f"max)", file=sys.stdout)
            doc["workloads"][name] = {"requests": len(trace), "span_s": span,
                                      "peak_over_mean": peak_over_mean, "static_at_peak": n_peak,
                                      "static_at_mean": n_mean, "rows": rows,
                                      "seed_spread": spreads,
                                      "static_search": {n: r["sla_attainment"]
                                                        for n, r in sorted(runs.items())}}
            sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=lambda o: None if isinstance(o, float) and
                      math.isnan(o) else str(o))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
