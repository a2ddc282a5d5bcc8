"""What a clairvoyant planner would spend: the cheapest pool schedule found for a workload.

The SLO goal of issue 13 (>= 90 % attainment at <= 70 % of the worker-seconds of static at
peak) is a property of the planner *and* of the trace: with whole workers, a trace whose load
rarely drops below two thirds of its peak leaves little to save. This bench asks the trace:
it replays it (`genset replay`'s simulation, as `bench_planner_replay.py` does) with the pool
driven by a fixed schedule of sizes per window instead of a planner, the schedule known in
advance (a worker is asked for `--startup-s` before its window starts, so it serves from the
first second), and searches for a cheap schedule that keeps the attainment target:

1. what each window costs alone: the trace replayed with one window at each smaller size,
   every other window at static at peak (the attainment lost, the worker-seconds saved);
2. steps in order of attainment lost per worker-second saved, cheapest first (one window one
   size down at a time), while the losses summed stay within the budget (static at peak's
   attainment minus --target);
3. that schedule replayed whole (losses of neighbouring windows add up: a queue carries
   over), giving back the last step while it misses the target, then trying the next steps
   while it keeps it.

The search needs start-ups shorter than a window (a one-window dip saves nothing when the
next window's workers must be asked for before it starts): search at `--startup-s 0`, then
replay what it found with a real start-up (`--schedule-from`), which pays for every start.

The result is an achievable schedule (so an upper bound on what the best clairvoyant planner
needs), not a proven optimum: a window's size changes the queue the next window inherits, and
a greedy pass does not try every combination. It is reported as a share of static at peak's
worker-seconds, with the schedule, so it can be set beside the planner's rows.

    python bench/planner_oracle.py --workload azure-conv --startup-s 0 --json s0.json
    python bench/planner_oracle.py --workload azure-conv --startup-s 30 --schedule-from s0.json

Each replay of Azure conv 4x takes ~10-20 s on this box; a search is 30-90 replays.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_planner_replay as bpr

import genset.replay.planner_sim as planner_sim
from genset.planning import ROLE_DECODE
from genset.planning.core import Decision, PoolDecision
from genset.replay.planner_sim import PlannerSimConfig
from genset.replay.trace import load_trace


class ScheduleCore:
    """Stands in for `PlannerCore` inside the replay's `Fleet`: sizes the pool from a fixed
    schedule (`sizes[k]` workers in window k), asking for a worker `startup_s` before the
    window that needs it and draining the least busy ready workers when no window within a
    start-up needs them (one drained sooner could not be back in time). Reads only what the
    Fleet feeds a planner (load reports), so the replay is unchanged. `run_schedule` puts it
    in the Fleet by swapping `planner_sim.PlannerCore` for the replay's duration: the Fleet
    builds its core itself, and a bench should not widen the replay's API for a stand-in."""

    def __init__(self, config, *, clock, sizes: list[int], window_s: float, startup_s: float):
        self.config = config
        self.clock = clock
        self.sizes = sizes
        self.window_ms = window_s * 1000.0
        self.startup_ms = startup_s * 1000.0
        self.startup = SimpleNamespace(estimate_s=startup_s)
        self.start_failures = 0
        self.ready: set[int] = set()
        self.starting = 0
        self.draining: set[int] = set()
        self.busy: dict[int, int] = {}
        self.decisions = 0

    # the observations a planner gets: only the load reports matter here
    def worker_up(self, wid: int, role: str, **_card) -> None:
        if wid not in self.ready and wid not in self.draining:
            if self.starting > 0:  # one the schedule asked for (the first ones are there)
                self.starting -= 1
            self.ready.add(wid)

    def worker_down(self, wid: int) -> None:
        self.ready.discard(wid)
        self.draining.discard(wid)

    def observe_load(self, wid: int, *, running: int, waiting: int, **_rest) -> None:
        self.busy[wid] = running + waiting

    def observe_arrival(self, *_a, **_k) -> None:
        pass

    observe_ttft = observe_finished = observe_itl = observe_step = observe_arrival

    def size_at(self, t_ms: float) -> int:
        return self.sizes[self._window(t_ms)]

    def _window(self, t_ms: float) -> int:
        return min(len(self.sizes) - 1, max(0, int(t_ms // self.window_ms)))

    def most_within(self, t_ms: float, span_ms: float) -> int:
        """The most workers any window overlapping [t, t + span] needs."""
        return max(self.sizes[self._window(t_ms):self._window(t_ms + span_ms) + 1])

    def decide(self) -> Decision:
        t = self.clock()
        self.decisions += 1
        have = len(self.ready) + self.starting
        ahead = self.size_at(t + self.startup_ms)  # what a worker asked for now would serve
        # a worker drained now could not be back within a start-up: keep what any window
        # until then needs
        keep = self.most_within(t, self.startup_ms)
        start, drain = 0, []
        if have < ahead:
            start = ahead - have
            self.starting += start
        elif len(self.ready) > keep:
            idle_first = sorted(self.ready, key=lambda w: (self.busy.get(w, 0), w))
            drain = idle_first[:len(self.ready) - keep]
            for w in drain:
                self.ready.discard(w)
                self.draining.add(w)
        target = len(self.ready) + self.starting
        pool = PoolDecision(role=ROLE_DECODE, target=target, previous=have, ready=len(self.ready),
                            starting=self.starting, draining=len(self.draining),
                            action="up" if start else ("down" if drain else "steady"),
                            reason="schedule", start=start, drain=drain)
        return Decision(ts_ms=t, decision_id=self.decisions, policy="schedule",
                        pools={ROLE_DECODE: pool}, inputs={}, changed=pool.changed)


def run_schedule(trace, sizes: list[int], args) -> dict:
    """One replay with the pool following `sizes` (per window of args.window_s)."""
    def make_core(config, clock):
        return ScheduleCore(config, clock=clock, sizes=sizes, window_s=args.window_s,
                            startup_s=args.startup_s)

    saved = planner_sim.PlannerCore
    planner_sim.PlannerCore = make_core
    try:
        cfg = PlannerSimConfig(policy="slo", min_workers=1, max_workers=max(sizes),
                               startup_s=args.startup_s, interval_s=args.interval_s)
        # the workers of the first start-up's windows are there from the start (a planner
        # run starts with static at peak's), or the schedule could not be kept
        first = max(sizes[:int(args.startup_s // args.window_s) + 1])
        return bpr.replay(trace, first, args, cfg)
    finally:
        planner_sim.PlannerCore = saved


def increment(table: dict[tuple[int, int], float], k: int, m: int, peak: int) -> float:
    """What window k's step from m + 1 to m adds to `table` (loss or saving, from peak)."""
    return table[k, m] - (table.get((k, m + 1), 0.0) if m + 1 < peak else 0.0)


def plan_steps(loss: dict[tuple[int, int], float], saved: dict[tuple[int, int], float],
               peak: int, n_win: int) -> list[tuple[int, int]]:
    """The order to take workers off in (pure): (window, size) steps, each one size below the
    window's previous step, least attainment lost per worker-second saved first. `loss[k, m]`
    and `saved[k, m]`: attainment lost and worker-seconds saved with window k alone at size m
    (m < peak). A window's deeper step is offered only once its shallower one is taken, at
    its own increments. A step that saves nothing (a dip shorter than a start-up: the
    schedule keeps the workers the next window needs) is left out, and so are the ones
    below it."""
    import heapq

    def entry(k: int, m: int):
        gain = increment(saved, k, m, peak)
        if gain <= 1e-9:
            return None
        return (max(0.0, increment(loss, k, m, peak)) / gain, k, m)

    heap = [e for k in range(n_win) if (k, peak - 1) in loss
            if (e := entry(k, peak - 1)) is not None]
    heapq.heapify(heap)
    steps = []
    while heap:
        _, k, m = heapq.heappop(heap)
        steps.append((k, m))
        if (k, m - 1) in loss and (e := entry(k, m - 1)) is not None:
            heapq.heappush(heap, e)
    return steps


def search(trace, peak: int, n_win: int, base: dict, args, log):
    """See the module docstring. Returns (sizes, the replay of them, replays run)."""
    replays = 1
    loss: dict[tuple[int, int], float] = {}
    saved: dict[tuple[int, int], float] = {}
    t0 = time.perf_counter()
    for k in range(n_win):
        for m in range(peak - 1, 0, -1):
            trial = [peak] * n_win
            trial[k] = m
            r = run_schedule(trace, trial, args)
            replays += 1
            loss[k, m] = max(0.0, base["sla_attainment"] - r["sla_attainment"])
            saved[k, m] = base["worker_seconds"] - r["worker_seconds"]
        log(f"  window {k:>3}: attainment lost / worker-seconds saved at " + ", ".join(
            f"{m} workers {loss[k, m]:.4f} / {saved[k, m]:.0f}" for m in range(peak - 1, 0, -1))
            + f" ({time.perf_counter() - t0:.0f} s)")
    steps = plan_steps(loss, saved, peak, n_win)
    budget = base["sla_attainment"] - args.target
    spent, taken = 0.0, 0
    for k, m in steps:
        inc = max(0.0, increment(loss, k, m, peak))
        if spent + inc > budget + 1e-12:
            break
        spent += inc
        taken += 1

    def sizes_after(n: int) -> list[int]:
        sizes = [peak] * n_win
        for k, m in steps[:n]:
            sizes[k] = m
        return sizes

    def replay_of(n: int) -> dict:
        nonlocal replays
        replays += 1
        r = run_schedule(trace, sizes_after(n), args)
        log(f"  {n} steps: {r['sla_attainment']:.4f} at {r['worker_seconds']:.0f} ws")
        return r

    r = replay_of(taken)
    while taken > 0 and r["sla_attainment"] + 1e-12 < args.target:
        taken -= 1  # the windows' losses added up to more than their sum: give one back
        r = replay_of(taken)
    best = r
    while taken < len(steps):  # the sum overestimated: take more while the target holds
        nxt = replay_of(taken + 1)
        if nxt["sla_attainment"] + 1e-12 < args.target:
            break
        taken, best = taken + 1, nxt
    return sizes_after(taken), best, replays


def refine(trace, sizes: list[int], best: dict, args, log, ref_ws: float):
    """From a schedule that keeps the target: take one worker off the window whose step
    saves the most worker-seconds while the whole trace keeps the target, replayed whole at
    this run's start-up; again until no step does. ~one replay per window per step."""
    replays = 0
    while True:
        found = None
        for k in range(len(sizes)):
            if sizes[k] <= 1:
                continue
            trial = sizes.copy()
            trial[k] -= 1
            r = run_schedule(trace, trial, args)
            replays += 1
            gain = best["worker_seconds"] - r["worker_seconds"]
            if r["sla_attainment"] + 1e-12 >= args.target and gain > 1e-6 and (
                    found is None or gain > found[0]):
                found = (gain, trial, r)
        if found is None:
            return sizes, best, replays
        _, sizes, best = found
        log(f"  refined: {best['sla_attainment']:.4f} at {best['worker_seconds']:.0f} ws "
            f"({best['worker_seconds'] / ref_ws:.3f}); {replays} replays")


def read_schedule(path: str, window_s: float) -> list[int]:
    """The schedule of an earlier run's --json, checked (SystemExit naming what is wrong)."""
    try:
        earlier = json.loads(Path(path).read_text())
        sizes = [int(n) for n in earlier["schedule"]]
        window = float(earlier["window_s"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"--schedule-from {path}: not an earlier run's --json ({exc!r})") from None
    if not sizes or min(sizes) < 1:
        raise SystemExit(f"--schedule-from {path}: a schedule needs >= 1 worker per window")
    if window != window_s:
        raise SystemExit(f"--schedule-from {path}: its windows are {window:g} s, this run's "
                         f"--window-s is {window_s:g}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="azure-conv",
                   help="mooncake | azure-conv | azure-code (as bench_planner_replay.py)")
    p.add_argument("--window-s", type=float, default=30.0, help="length of a schedule window")
    p.add_argument("--startup-s", type=float, default=0.0,
                   help="worker start-up; the schedule asks this long ahead (worker-seconds "
                        "count from the ask)")
    p.add_argument("--target", type=float, default=0.90, help="attainment to keep")
    p.add_argument("--peak", type=int, default=0,
                   help="static at peak (0: found by bisection as bench_planner_replay does)")
    bpr.add_workload_args(p)
    p.add_argument("--seed", type=int, default=0, help="the routers' seed")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--schedule-from", metavar="FILE",
                   help="no search: replay the schedule of an earlier run's --json (e.g. one "
                        "found with --startup-s 0, replayed with this run's start-up)")
    p.add_argument("--refine", action="store_true",
                   help="with --schedule-from: then take workers off one window at a time "
                        "while the target holds, at this run's start-up")
    args = p.parse_args(argv)
    for name in ("window_s", "interval_s"):
        if not getattr(args, name) > 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be > 0")
    if args.refine and not args.schedule_from:
        raise SystemExit("--refine refines a schedule given with --schedule-from")
    if not (args.startup_s >= 0 and 0 < args.target <= 1):
        raise SystemExit("--startup-s must be >= 0 and --target in (0, 1]")
    args.workloads = [args.workload]
    given = read_schedule(args.schedule_from, args.window_s) if args.schedule_from else None

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        path, _ = bpr.workloads(args, Path(tmp))[args.workload]
        trace = load_trace(str(path))
    span_s = max(r.arrival_ms for r in trace) / 1000.0
    n_win = max(1, math.ceil(span_s / args.window_s))
    if given is not None and len(given) != n_win:
        raise SystemExit(f"--schedule-from {args.schedule_from}: {len(given)} windows, this "
                         f"trace has {n_win} of {args.window_s:g} s")
    if args.peak:
        peak, static = args.peak, bpr.replay(trace, args.peak, args)
    else:
        peak, runs = bpr.static_at_peak(trace, args, log)
        static = runs[peak]
    ref_ws = static["worker_seconds"]
    log(f"{args.workload}: {len(trace)} requests over {span_s:.0f} s, {n_win} windows of "
        f"{args.window_s:g} s; static at peak {peak} workers: "
        f"{static['sla_attainment']:.4f}, {ref_ws:.0f} worker-seconds")

    base = run_schedule(trace, [peak] * n_win, args)
    log(f"  static at peak as a schedule: {base['sla_attainment']:.4f}, "
        f"{base['worker_seconds']:.0f} ws")
    if given is not None:
        sizes = given
        best, replays = run_schedule(trace, sizes, args), 2
        log(f"  the schedule given: {best['sla_attainment']:.4f} at "
            f"{best['worker_seconds']:.0f} ws ({best['worker_seconds'] / ref_ws:.3f})")
        if args.refine:
            sizes, best, more = refine(trace, sizes, best, args, log, ref_ws)
            replays += more
    else:
        sizes, best, replays = search(trace, peak, n_win, base, args, log)
    out = {
        "workload": args.workload, "window_s": args.window_s, "startup_s": args.startup_s,
        "target": args.target, "static_at_peak": peak,
        "static_worker_seconds": ref_ws, "static_attainment": static["sla_attainment"],
        "schedule": sizes, "sla_attainment": best["sla_attainment"],
        "worker_seconds": best["worker_seconds"],
        "share_of_static_at_peak": best["worker_seconds"] / ref_ws,
        "avg_workers": best["avg_workers"], "replays": replays,
        "settings": {k: v for k, v in vars(args).items() if k != "workloads"},
    }
    print(f"{args.workload}, start-up {args.startup_s:g} s, windows of {args.window_s:g} s: "
          f"attainment {out['sla_attainment']:.4f} at {out['worker_seconds']:.0f} "
          f"worker-seconds = {out['share_of_static_at_peak']:.3f} of static at peak "
          f"({peak} workers, {ref_ws:.0f}); schedule {sizes}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
