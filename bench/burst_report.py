"""The opening burst of an aiperf run: how it was taken in, split and prefilled.

At concurrency 64 aiperf opens with 64 requests ~1 ms apart; on 2 mocker workers they are
4-5 prefill steps per worker, and the run's TTFT p99 is the last of those steps (issue 15,
docs/benchmarks.md §5e, §5k). For each run directory of `bench/bench_aiperf.py --records`
(genset or Dynamo) this prints, for the burst (the first N measured requests by aiperf's issue
time):

- aiperf's send span (first to last request start) and the burst's TTFT max / 2nd / 3rd;
- the first-token clusters: requests whose first token reached aiperf within `--gap` ms of
  each other came out of one engine step (or two steps ending together) — their sizes;
- genset runs with `--timeline` too: the split per worker, each worker's steps (sizes and
  modelled ms, from `w_first_step` / `w_step_ms`), the frontend's intake (aiperf start ->
  handler; handler-to-handler spacing; the frontend thread's CPU per request from its handler's
  start to the request sent, `intake_cpu_ms`), and the first token's way back (worker step
  end -> first SSE write) for the last step.

    .venv/bin/python bench/burst_report.py /tmp/a2/g-w2s1c64r0 /tmp/a2/d-w2s1c64r0 [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import pairwise
from pathlib import Path


def _records(run_dir: Path) -> list[dict]:
    files = sorted(run_dir.glob("a/aiperf/profile_export.jsonl"))
    if not files:
        raise SystemExit(f"{run_dir}: no a/aiperf/profile_export.jsonl (run with --records)")
    out = []
    with files[0].open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise SystemExit(f"{files[0]}:{n}: not a JSON line: {exc}") from None
            md, m = rec.get("metadata", {}), rec.get("metrics", {})
            if md.get("benchmark_phase") != "profiling" or "time_to_first_token" not in m:
                continue
            start = md["request_start_ns"] / 1e6
            ttft = m["time_to_first_token"]["value"]
            out.append({"id": md.get("x_request_id"), "issued": md["credit_issued_ns"] / 1e6,
                        "start": start, "ttft": ttft, "first": start + ttft})
    out.sort(key=lambda r: r["issued"])
    return out


def _timeline(run_dir: Path) -> dict[str, dict]:
    path = run_dir / "timeline.jsonl"
    if not path.exists():
        return {}
    out = {}
    with path.open(encoding="utf-8") as f:
        for line in f:
            if '"id"' in line:
                rec = json.loads(line)
                out[rec["id"]] = rec
    return out


def _clusters(times: list[float], gap: float) -> list[list[float]]:
    groups: list[list[float]] = []
    for t in sorted(times):
        if groups and t - groups[-1][-1] <= gap:
            groups[-1].append(t)
        else:
            groups.append([t])
    return groups


def burst(run_dir: Path, n: int = 64, gap: float = 1.5) -> dict:
    recs = _records(run_dir)[:n]
    if not recs:
        raise SystemExit(f"{run_dir}: no profiling records")
    t0 = recs[0]["start"]
    ttfts = sorted(r["ttft"] for r in recs)
    res: dict = {
        "run": run_dir.name, "n": len(recs),
        "send_span_ms": round(recs[-1]["start"] - t0, 1),
        "ttft_top3_ms": [round(x, 1) for x in ttfts[-3:][::-1]],
        "clusters": [len(g) for g in _clusters([r["first"] for r in recs], gap)],
        "last_first_token_ms": round(max(r["first"] for r in recs) - t0, 1),
    }
    tl = _timeline(run_dir)
    if not tl:
        return res
    joined = [(r, tl[r["id"]]) for r in recs if r["id"] in tl]
    workers: dict = {}
    intake = []
    intake_cpu = []
    for r, t in joined:
        st = t["stages"]
        wid = t.get("values", {}).get("worker")
        # the frontend's clock is the machine's: t0 (unix s) vs aiperf's unix ns
        handler = t["t0"] * 1000.0
        intake.append(handler - r["start"])
        if "intake_cpu_ms" in t.get("values", {}):
            intake_cpu.append(t["values"]["intake_cpu_ms"])
        w = workers.setdefault(wid, {"n": 0, "steps": {}})
        w["n"] += 1
        if "w_first_step" in st:
            key = round(handler + st["w_first_step"] - t0, 1)
            step = w["steps"].setdefault(key, {"n": 0, "ms": t["values"].get("w_step_ms", 0.0),
                                               "back": []})
            step["n"] += 1
            if "first_written" in st and "w_first_token" in st:
                step["back"].append(st["first_written"] - st["w_first_token"])
    handlers = sorted(t["t0"] * 1000.0 for _, t in joined)
    spacing = sorted(b - a for a, b in pairwise(handlers))
    res["split"] = sorted((w["n"] for w in workers.values()), reverse=True)
    res["intake_ms"] = {  # aiperf's request start -> the frontend's handler
        "first": round(intake[0], 1), "p50": round(sorted(intake)[len(intake) // 2], 1),
        "max": round(max(intake), 1)}
    res["handler_span_ms"] = round(handlers[-1] - handlers[0], 1)
    res["handler_spacing_p50_ms"] = round(spacing[len(spacing) // 2], 2) if spacing else None
    if intake_cpu:  # the frontend thread's CPU from handler start to sent, per request
        intake_cpu.sort()
        res["intake_cpu_ms"] = {"p50": round(intake_cpu[len(intake_cpu) // 2], 3),
                                "mean": round(sum(intake_cpu) / len(intake_cpu), 3),
                                "max": round(intake_cpu[-1], 3)}
    res["workers"] = []
    for w in workers.values():
        steps = [(k, s) for k, s in sorted(w["steps"].items())]
        res["workers"].append({
            "n": w["n"],
            "steps": [f"{s['n']}@{k:.0f}+{s['ms']:.0f}" for k, s in steps],
            "last_step_back_ms_max": round(max(steps[-1][1]["back"]), 1) if steps and
            steps[-1][1]["back"] else None})
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories of bench_aiperf.py")
    p.add_argument("-n", type=int, default=64, help="requests in the burst (the concurrency)")
    p.add_argument("--gap", type=float, default=1.5, help="ms between first tokens of a cluster")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    out = [burst(d, args.n, args.gap) for d in args.runs]
    for r in out:
        print(json.dumps(r))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
