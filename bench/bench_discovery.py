"""Discovery and service-lifecycle numbers on a local etcd (and NATS for the service start).

    .venv/bin/python bench/bench_discovery.py [--n 500] [--runs 3]

- register -> watcher sees it: latency p50/p99 of `Discovery.register` as seen by another
  Discovery's Membership listener (same process, loopback etcd);
- watcher resume after an etcd restart: etcd start -> watch re-established;
- service start: `python tests/helpers/echo_service.py` spawn -> /health 200 (ready, record
  in etcd), and SIGTERM -> exit with an empty drain.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from _common import pct

from genset.runtime.discovery import Discovery
from genset.runtime.infra import EtcdServer, NatsServer, free_port

REPO = Path(__file__).resolve().parent.parent


async def watch_latency(endpoint: str, n: int) -> list[float]:
    owner = await Discovery.connect(endpoint)
    viewer = await Discovery.connect(endpoint)
    prefix = f"bench/{time.monotonic_ns()}/"
    m = await viewer.watch(prefix)
    arrived: dict[str, float] = {}
    seen = asyncio.Event()

    def on_change(kind: str, key: str, value: object) -> None:
        arrived.setdefault(key, time.perf_counter())
        seen.set()

    m.add_listener(on_change)
    lat = []
    for i in range(n):
        key = f"{prefix}{i}"
        seen.clear()
        sent = time.perf_counter()
        await owner.register(key, b"x" * 200)
        await asyncio.wait_for(seen.wait(), 5)
        lat.append(arrived[key] - sent)
    await owner.close()
    await viewer.close()
    return lat


async def resume_after_restart(etcd: EtcdServer) -> float:
    d = await Discovery.connect(etcd.endpoint)
    m = await d.watch("bench/resume/")
    etcd.stop()
    await asyncio.sleep(1.0)
    etcd.start()
    started = time.monotonic()
    while True:
        if m.connected:
            break
        await asyncio.sleep(0.005)
    took = time.monotonic() - started
    await d.close()
    return took


def service_start(nats: str, etcd: str) -> tuple[float, float]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "GENSET_LOG_FORMAT": "json"}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(REPO / "tests/helpers/echo_service.py"),
                             "--nats", nats, "--etcd", etcd, "--metrics-port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.01)
        ready = time.monotonic() - t0
        t1 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        return ready, time.monotonic() - t1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    etcd, nats = EtcdServer().start(), NatsServer().start()
    try:
        p50s, p99s, resumes, readies, stops = [], [], [], [], []
        for _ in range(a.runs):
            lat = asyncio.run(watch_latency(etcd.endpoint, a.n))
            p50s.append(pct(lat, 0.5) * 1e3)
            p99s.append(pct(lat, 0.99) * 1e3)
            resumes.append(asyncio.run(resume_after_restart(etcd)) * 1e3)
            ready, stop = service_start(nats.url, etcd.endpoint)
            readies.append(ready * 1e3)
            stops.append(stop * 1e3)
        med = statistics.median
        print(f"register -> watcher sees it (n={a.n}): p50 {med(p50s):.2f} ms, "
              f"p99 {med(p99s):.2f} ms")
        print(f"watch re-established after etcd start: {med(resumes):.0f} ms")
        print(f"service spawn -> /health 200 (ready, registered): {med(readies):.0f} ms")
        print(f"service SIGTERM -> exit (empty drain, lease revoked): {med(stops):.0f} ms")
        print(f"(median of {a.runs} runs)")
    finally:
        etcd.cleanup()
        nats.cleanup()


if __name__ == "__main__":
    main()
