"""An idle stack's CPU and wake-ups per thread kind: `genset up` (mocker workers, as
bench_idle_cpu.py starts it) left to settle, then, over `--seconds` with no requests, each
thread's CPU from /proc/<pid>/task/<tid>/schedstat (ns, not 10 ms ticks) and its voluntary
and involuntary context switches (wake-ups), summed per process and per thread name
(`event_engine`: gRPC's thread pool; `python`: the event loop and gRPC's completion-queue
poller; `etcd`, `nats-server`: the Go runtimes' threads).

    .venv/bin/python bench/bench_idle_threads.py --workers 2 --seconds 30
    .venv/bin/python bench/bench_idle_threads.py --source /work/main ...   # another checkout
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import GensetUp


def snapshot(pid: int) -> dict[str, tuple[str, float, int, int]]:
    """tid -> (name, CPU s, voluntary, involuntary context switches) of `pid`'s threads."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            cpu = int((task / "schedstat").read_text().split()[0]) / 1e9
            vol = nonvol = 0
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches"):
                    vol = int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches"):
                    nonvol = int(line.split()[1])
            out[task.name] = (name, cpu, vol, nonvol)
        except OSError:
            pass  # a thread that ended meanwhile
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--kv-blocks", type=int, default=8192)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--settle", type=float, default=5.0)
    p.add_argument("--source", default="", help="another checkout to run instead of this one")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="idlethreads-") as d:
        stack = GensetUp(workers=args.workers, speedup=1.0, log_dir=Path(d),
                         kv_blocks=args.kv_blocks,
                         source=Path(args.source) if args.source else None)
        stack.start()
        try:
            time.sleep(args.settle)
            pids = stack.pids
            before = {k: snapshot(pid) for k, pid in pids.items()}
            t0 = time.monotonic()
            time.sleep(args.seconds)
            elapsed = time.monotonic() - t0
            after = {k: snapshot(pid) for k, pid in pids.items()}
        finally:
            stack.stop()
    print(f"load {os.getloadavg()[0]:.1f}, {elapsed:.0f} s")
    for proc in pids:
        kinds: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0, 0])
        for tid, (name, cpu, vol, nonvol) in after[proc].items():
            _, cpu0, vol0, nonvol0 = before[proc].get(tid, (name, 0.0, 0, 0))
            k = kinds[name]
            k[0] += 1
            k[1] += cpu - cpu0
            k[2] += vol - vol0
            k[3] += nonvol - nonvol0
        cpu = sum(k[1] for k in kinds.values())
        wakes = sum(k[2] + k[3] for k in kinds.values())
        print(f"{proc}: CPU {100 * cpu / elapsed:.3f} % of a core, {wakes / elapsed:.1f} wake-ups/s")
        for name, (n, c, vol, nonvol) in sorted(kinds.items(), key=lambda kv: -kv[1][2]):
            if vol or nonvol or c:
                print(f"    {name:16s} threads {n:2d}  CPU {100 * c / elapsed:.3f} %  "
                      f"voluntary {vol / elapsed:.1f}/s  involuntary {nonvol / elapsed:.1f}/s")


if __name__ == "__main__":
    main()
