"""How long `genset up` takes to be ready, to answer its first chat completion, and to stop.

    .venv/bin/python bench/bench_launch.py --engine mocker --workers 2 --runs 3
    .venv/bin/python bench/bench_launch.py --engine torch --workers 2 --runs 3

Each run starts a fresh stack (its own NATS and etcd on free ports, a temp state dir), times
from process start to the "genset is up" banner, then one 32-token chat completion, then
Ctrl-C to exit. Prints the median of the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _common import median_of_runs  # noqa: E402

from genset.runtime.infra import free_port  # noqa: E402


def one_run(engine: str, workers: int) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory(prefix="genset-bench-up-") as tmp:
        port = free_port()
        log = Path(tmp) / "up.log"
        args = [sys.executable, "-m", "genset.cli", "up", "--engine", engine, "--workers",
                str(workers), "--port", str(port), "--state-dir", str(Path(tmp) / "state"),
                "--nats", f"nats://127.0.0.1:{free_port()}", "--etcd", f"127.0.0.1:{free_port()}"]
        t0 = time.monotonic()
        with open(log, "wb") as out:
            proc = subprocess.Popen(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            while "Ctrl-C stops everything" not in log.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() - t0 > 300:
                    raise RuntimeError(log.read_text(errors="replace"))
                time.sleep(0.05)
            ready = time.monotonic() - t0
            body = json.dumps({"model": "tiny", "max_tokens": 32,
                               "messages": [{"role": "user", "content": "Hello!"}]}).encode()
            t1 = time.monotonic()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                         {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as resp:
                json.loads(resp.read())
            first = time.monotonic() - t1
            t2 = time.monotonic()
            proc.send_signal(signal.SIGINT)
            proc.wait(120)
            stop = time.monotonic() - t2
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        return ready, first, stop


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--engine", default="mocker", choices=("mocker", "torch"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()
    runs = [one_run(a.engine, a.workers) for _ in range(a.runs)]
    for name, i in (("ready (s)", 0), ("first chat completion (s)", 1), ("stop (s)", 2)):
        print(f"{a.engine} x{a.workers} {name}: {median_of_runs([r[i] for r in runs])}")


if __name__ == "__main__":
    main()
