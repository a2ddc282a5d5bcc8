"""The idle stack's CPU, per process: `genset up` (mocker workers, the bench's settings) started,
left to settle, then every process's CPU (/proc utime + stime) over `--seconds` with no
requests. What a stack costs per second whatever it serves (etcd's raft ticks, lease
keep-alives, load reports, the frontend's and workers' timers): divided by a run's req/s it is
the per-second share of the per-request CPU that bench_aiperf.py reports.

    .venv/bin/python bench/bench_idle_cpu.py --workers 4 --kv-blocks 1024 --seconds 30 --reps 2
    .venv/bin/python bench/bench_idle_cpu.py --baseline /work/main ...   # also that checkout, alternated

Prints % of one core per process (and the total) for each run, and the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import GensetUp

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """utime + stime of `pid` in seconds (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def measure(source: Path | None, args) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="idlecpu-") as d:
        stack = GensetUp(workers=args.workers, speedup=1.0, log_dir=Path(d),
                         kv_blocks=args.kv_blocks, source=source, extra_args=args.genset_arg)
        stack.start()
        try:
            time.sleep(args.settle)
            pids = stack.pids
            before = {k: cpu_s(p) for k, p in pids.items()}
            t0 = time.monotonic()
            time.sleep(args.seconds)
            elapsed = time.monotonic() - t0
            after = {k: cpu_s(p) for k, p in pids.items()}
        finally:
            stack.stop()
    pct = {k: 100 * (after[k] - before[k]) / elapsed for k in pids}
    pct["total"] = sum(pct.values())
    return pct


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--kv-blocks", type=int, default=1024)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--settle", type=float, default=5.0)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--baseline", default="", help="another checkout, measured alternated")
    p.add_argument("--genset-arg", action="append", default=[])
    args = p.parse_args()
    systems = [("this", None)] + ([("baseline", Path(args.baseline))] if args.baseline else [])
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in systems}
    for rep in range(args.reps):
        for name, source in systems:
            pct = measure(source, args)
            runs[name].append(pct)
            print(f"{name} rep {rep} load {os.getloadavg()[0]:.1f}: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in pct.items()), flush=True)
    for name, recs in runs.items():
        keys = recs[0].keys()
        print(f"{name} medians (% of one core): "
              + ", ".join(f"{k} {statistics.median(r.get(k, 0.0) for r in recs):.2f}"
                          for k in keys))


if __name__ == "__main__":
    main()
