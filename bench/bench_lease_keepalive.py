"""What one etcd lease refresh costs: etcd's CPU and the client's, per refresh.

A lone etcd (as genset starts it) and one `EtcdClient` refreshing one lease `--rate` times a
second for `--seconds`; a run with `--rate 0` gives the idle cost of the same pair, which the
figures subtract. `--checkout` measures another checkout's client (e.g. main before a change),
alternated with this one:

    python bench/bench_lease_keepalive.py --checkout /path/to/other --reps 3

Figures: docs/benchmarks.md 5z.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

CHILD = r"""
import asyncio, json, os, resource, sys, time
sys.path.insert(0, sys.argv[1])
from genset.runtime.etcd_client import EtcdClient
from genset.runtime.infra import EtcdServer

def proc_cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

def own_cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

async def main(rate, seconds):
    server = EtcdServer().start()
    try:
        client = EtcdClient(server.endpoint, timeout=3)
        lease = await client.lease_grant(30)
        await asyncio.sleep(1)
        etcd0, own0, t0 = proc_cpu(server.proc.pid), own_cpu(), time.monotonic()
        refreshes = 0
        while time.monotonic() - t0 < seconds:
            if rate:
                await client.lease_keepalive(lease)
                refreshes += 1
            await asyncio.sleep(1 / rate if rate else seconds)
        print(json.dumps({"refreshes": refreshes, "seconds": time.monotonic() - t0,
                          "etcd_s": proc_cpu(server.proc.pid) - etcd0,
                          "client_s": own_cpu() - own0}))
        await client.close()
    finally:
        server.cleanup()  # stops it and removes its data directory

asyncio.run(main(float(sys.argv[2]), float(sys.argv[3])))
"""


def run(checkout: str, rate: float, seconds: float) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, checkout, str(rate), str(seconds)],
                         capture_output=True, text=True, timeout=seconds + 60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=20.0, help="refreshes per second")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--checkout", help="another checkout's client, alternated with this one")
    args = ap.parse_args()
    if args.rate <= 0 or args.seconds <= 0 or args.reps < 1:
        ap.error("--rate and --seconds must be > 0, --reps >= 1")
    sides = {"this": str(HERE)}
    if args.checkout:
        sides["other"] = str(Path(args.checkout).resolve())
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    for rep in range(args.reps):
        for name, path in sides.items():
            idle = run(path, 0, args.seconds)
            busy = run(path, args.rate, args.seconds)
            n = busy["refreshes"]
            per = (1000 * (busy["etcd_s"] - idle["etcd_s"]) / n,
                   1000 * (busy["client_s"] - idle["client_s"]) / n)
            results[name].append(per)
            print(f"{name} rep {rep} load {os.getloadavg()[0]:.1f}: {n} refreshes, etcd "
                  f"{per[0]:.3f} ms, client {per[1]:.3f} ms per refresh", flush=True)
    for name, per in results.items():
        print(f"{name} medians: etcd {statistics.median(p[0] for p in per):.3f} ms, client "
              f"{statistics.median(p[1] for p in per):.3f} ms per refresh ({sides[name]})")


if __name__ == "__main__":
    main()
