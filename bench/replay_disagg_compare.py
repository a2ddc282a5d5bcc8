"""Disaggregated replay: genset aggregated vs 2P+6D / 4P+4D (auto, always) vs `auto` with 8
peers (every worker both decodes and may prefill for the others), at 1x and 3x arrivals,
beside Dynamo 1.6.1's own replay in the same settings.

Settings as Dynamo's harness (`../shared/peers/dynamo/replay_wave2.py`, README "Offline
replay, wave 2"): the synthetic Mooncake trace, 8 workers, block size 64, 4,688 blocks (0.3M
tokens of KV) per worker, 256 seqs, 8192 batched tokens, polynomial timing, SLOs TTFT <= 2 s
and mean ITL <= 50 ms; KV 131,072 B/token (Dynamo's runs: 0, 50 and 450 GB/s; ours 25 GB/s).
Dynamo's numbers are the means of 3 runs from that README's table (its JSON is not stored in
this repository); they are printed as stored, not rerun.

    .venv/bin/python bench/replay_disagg_compare.py [--speeds 1,3] [--limit N] [--out F.json]
        [--only LABELS] [--spare-budget-ms MS] [--ship-tail 0|1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genset.replay.disagg_sim import DisaggReplayConfig, run_disagg_replay
from genset.replay.trace import load_trace

HERE = os.path.dirname(os.path.abspath(__file__))
TRACE = os.path.join(HERE, "..", "..", "shared", "data", "mooncake_synthetic_trace.jsonl")
# (label, prefill workers, decode workers, --disagg, peer prefill)
SETTINGS = [
    ("aggregated", 0, 8, "never", False),
    ("2P+6D always", 2, 6, "always", False),
    ("2P+6D auto", 2, 6, "auto", False),
    ("4P+4D always", 4, 4, "always", False),
    ("4P+4D auto", 4, 4, "auto", False),
    ("8 peers auto", 0, 8, "auto", True),
]
# Dynamo 1.6.1, small KV (0.3M tokens/worker): SLA attainment, TTFT mean ms, hit rate, ITL
# mean ms (mean of 3 runs; for the splits the range over 0/50/450 GB/s)
DYNAMO = {
    "1x": [("aggregated", "99.7", "254", "23.7", "7.66"),
           ("2P+6D", "95.9-96.4", "564-602", "8.3-8.5", "7.26"),
           ("4P+4D", "99.7", "300-340", "14.5-15.1", "7.79")],
    "3x": [("aggregated", "96.0", "317", "15.9", "18.40"),
           ("2P+6D", "0.7", "96,000", "5.5", "8.2"),
           ("4P+4D", "70.8-71.4", "2317-2447", "7.3-7.6", "13.4")],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", default=TRACE)
    ap.add_argument("--speeds", default="1,3")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--only", default=None, help="comma-separated labels to run")
    ap.add_argument("--out", default=None, help="write every result as JSON here")
    ap.add_argument("--ship-tail", type=int, choices=(0, 1), default=1,
                    help="1: a remote prefill's partial last block travels with its first "
                    "token (as live); 0: the decode worker computes it")
    ap.add_argument("--spare-budget-ms", type=float, default=0.0,
                    help="genset replay --disagg-spare-budget-ms for every row (0: off)")
    args = ap.parse_args()
    trace = load_trace(args.trace, limit=args.limit)
    only = set(args.only.split(",")) if args.only else None
    rows = []
    print("| load | system | setting | SLA attainment % | TTFT mean ms | TTFT p90 | hit % | "
          "ITL mean ms | remote % |")
    print("|---|---|---|---|---|---|---|---|---|")
    for speed in (float(s) for s in args.speeds.split(",")):
        key = f"{speed:g}x"
        for label, p, d, mode, peers in SETTINGS:
            if only and label not in only:
                continue
            r = run_disagg_replay(trace, "genset", DisaggReplayConfig(
                prefill_workers=p, decode_workers=d, disagg=mode, peer_prefill=peers,
                arrival_speedup=speed, spare_budget_ms=args.spare_budget_ms,
                ship_tail=bool(args.ship_tail)))
            rows.append({"load": key, "setting": label, **r})
            print(f"| {key} | genset | {label} | {r['sla_attainment'] * 100:.1f} | "
                  f"{r['ttft_mean_ms']:.0f} | {r['ttft_p90_ms']:.0f} | "
                  f"{r['hit_rate'] * 100:.1f} | {r['itl_mean_ms']:.2f} | "
                  f"{r['remote_share'] * 100:.1f} |", flush=True)
        for label, sla, ttft, hit, itl in DYNAMO.get(key, []):
            print(f"| {key} | Dynamo 1.6.1 | {label} | {sla} | {ttft} | | {hit} | {itl} | |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
