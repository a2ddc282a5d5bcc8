"""Write planner workloads as Mooncake-format JSONL (what `genset replay` reads).

    # the Mooncake trace, arrivals following a 5-minute sinusoid between peak/4 and peak
    python bench/make_modulated_trace.py mooncake -o /tmp/mooncake_sine.jsonl --period-s 300
    # the Azure conversation trace, 2x slower (a lighter load), first 5000 requests
    python bench/make_modulated_trace.py azure ../shared/data/azure_llm_conv_2023.csv \
        -o /tmp/azure_conv.jsonl --time-scale 2 --limit 5000

It prints the rate per bucket so the shape can be checked at a glance.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone

from genset.planning.workload import (
    WorkloadError,
    modulate,
    rate_profile,
    read_azure,
)

# ../shared/data from the project's root, as the data README says (GENSET_DATA overrides)
DATA = Path(os.environ.get("GENSET_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
MOONCAKE = DATA / "mooncake_synthetic_trace.jsonl"


def read_jsonl(path: Path) -> list[dict]:
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise WorkloadError(f"cannot read trace {path}: {exc.strerror}") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("timestamp"), int | float):
            raise WorkloadError(f"{path}:{lineno}: expected an object with a numeric timestamp")
        out.append(rec)
    out.sort(key=lambda r: r["timestamp"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="source", required=True)
    m = sub.add_parser("mooncake", help="the Mooncake trace with sinusoidal arrivals")
    m.add_argument("trace", nargs="?", default=str(MOONCAKE))
    m.add_argument("--period-s", type=float, default=300.0, help="period of the sinusoid")
    m.add_argument("--low", type=float, default=0.25, help="lowest rate as a share of the peak")
    m.add_argument("--peak-rate", type=float, default=None,
                   help="peak requests/s (default: keep the trace's duration)")
    a = sub.add_parser("azure", help="an Azure LLM trace (CSV) as Mooncake records")
    a.add_argument("trace")
    a.add_argument("--time-scale", type=float, default=1.0, help=">1 stretches time")
    a.add_argument("--limit", type=int, default=None, help="first N requests only")
    for sp in (m, a):
        sp.add_argument("-o", "--output", required=True)
        sp.add_argument("--bucket-s", type=float, default=30.0, help="bucket of the printed rates")
    args = p.parse_args(argv)
    try:
        if args.source == "mooncake":
            records = modulate(read_jsonl(Path(args.trace)), period_s=args.period_s,
                               low=args.low, peak_rate=args.peak_rate)
        else:
            records = read_azure(args.trace, limit=args.limit, time_scale=args.time_scale)
    except WorkloadError as exc:
        print(f"make_modulated_trace: {exc}", file=sys.stderr)
        return 2
    with open(args.output, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    rates = rate_profile(records, args.bucket_s)
    span = records[-1]["timestamp"] / 1000.0 if records else 0.0
    print(f"{len(records)} requests over {span:.0f} s -> {args.output}")
    print(f"req/s per {args.bucket_s:.0f} s: " + " ".join(f"{r:.1f}" for r in rates))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
