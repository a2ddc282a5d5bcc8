"""`genset up --planner slo` live (real processes, mocker workers, the local connector): a
load ramp up and back down, with the pool size and each request's TTFT over time.

    python bench/planner_live_ramp.py --json ramp.json --plot docs/planner_live_ramp.png

Starts its own `genset up` (NATS and etcd on free ports, a fresh state directory), waits until
it serves, runs `--levels` closed-loop clients (streaming completions, each request's TTFT
and end recorded) for `--phase-s` each, then stops everything with SIGTERM. The pool size is
read from the launcher's own lines (`planner: started worker-N`, `planner: draining
worker-N`, `worker-N drained and exited`) as they appear in its log. Wall-clock timings:
they depend on the machine and its load (say which in any figure).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LogWatch:
    """Pool events from the launcher's log, stamped when first seen (polled every 0.25 s)."""

    PATTERNS = (("start", re.compile(r"planner: started (worker-\d+)")),
                ("drain", re.compile(r"planner: draining (worker-\d+)")),
                ("exit", re.compile(r"(worker-\d+) drained and exited")))

    def __init__(self, path: Path, t0: float) -> None:
        self.path, self.t0 = path, t0
        self.pos = 0
        self.events: list[dict] = []

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except OSError:
            return
        cut = data.rfind(b"\n") + 1
        self.pos += cut
        for line in data[:cut].decode(errors="replace").splitlines():
            for kind, pat in self.PATTERNS:
                m = pat.search(line)
                if m:
                    self.events.append({"t_s": round(time.monotonic() - self.t0, 2),
                                        "event": kind, "worker": m.group(1)})

    def text(self) -> str:
        return self.path.read_text(errors="replace")


async def client(i: int, url: str, state: dict, out: list, t0: float, args) -> None:
    n = 0
    async with httpx.AsyncClient(timeout=300) as http:
        while i < state["level"]:
            n += 1
            sent = time.monotonic()
            first = None
            ok = False
            try:
                async with http.stream("POST", f"{url}/v1/completions", json={
                        "model": "tiny", "prompt": f"client {i} request {n}: " + "tell me a "
                        "story " * args.prompt_words, "max_tokens": args.max_tokens,
                        "ignore_eos": True, "stream": True}) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data:") and first is None and "[DONE]" not in line:
                            first = time.monotonic()
                    ok = r.status_code == 200 and first is not None
            except httpx.HTTPError as exc:
                state["errors"].append(repr(exc))
            end = time.monotonic()
            out.append({"t_s": round(sent - t0, 3), "ok": ok,
                        "ttft_ms": round((first - sent) * 1000, 1) if first else None,
                        "e2e_ms": round((end - sent) * 1000, 1)})


async def ramp(url: str, watch: LogWatch, args, t0: float) -> dict:
    state = {"level": 0, "errors": []}
    reqs: list[dict] = []
    tasks: list[asyncio.Task] = []
    phases = []
    for level in args.levels:
        old, state["level"] = state["level"], level
        phases.append({"t_s": round(time.monotonic() - t0, 2), "clients": level})
        for i in range(old, level):
            tasks.append(asyncio.create_task(client(i, url, state, reqs, t0, args)))
        end = time.monotonic() + args.phase_s
        while time.monotonic() < end:
            watch.poll()
            await asyncio.sleep(0.25)
    state["level"] = 0
    await asyncio.gather(*tasks)
    watch.poll()
    return {"phases": phases, "requests": reqs, "errors": state["errors"][:20]}


def pool_series(events: list[dict], initial: int, end_s: float) -> list[tuple[float, int]]:
    """(time, workers asked for and not drained) at every change."""
    n, out = initial, [(0.0, initial)]
    for e in events:
        if e["event"] in ("start", "drain"):
            n += 1 if e["event"] == "start" else -1
            out.append((e["t_s"], n))
    out.append((end_s, n))
    return out


def plot(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    series = doc["pool"]
    xs, ys = [], []
    for (t, n), (t2, _) in zip(series, [*series[1:], series[-1]], strict=True):
        xs += [t, t2]
        ys += [n, n]
    ax1.plot(xs, ys, color="tab:blue", label="workers (asked for, not drained)")
    lv_x, lv_y = [], []
    for p, nxt in zip(doc["phases"], [*doc["phases"][1:], None], strict=True):
        end = nxt["t_s"] if nxt else doc["end_s"]
        lv_x += [p["t_s"], end]
        lv_y += [p["clients"], p["clients"]]
    ax1b = ax1.twinx()
    ax1b.plot(lv_x, lv_y, color="tab:gray", linestyle="--", label="clients")
    ax1.set_ylabel("workers")
    ax1b.set_ylabel("concurrent clients")
    ax1.legend(loc="upper left")
    ax1b.legend(loc="upper right")
    ok = [r for r in doc["requests"] if r["ttft_ms"] is not None]
    ax2.scatter([r["t_s"] for r in ok], [r["ttft_ms"] for r in ok], s=4, alpha=0.5,
                label="TTFT per request")
    ax2.axhline(doc["settings"]["ttft_ms"], color="tab:red", linestyle=":",
                label="TTFT target")
    ax2.set_yscale("log")
    ax2.set_ylabel("TTFT (ms)")
    ax2.set_xlabel("time (s) since the load started")
    ax2.legend(loc="upper left")
    fig.suptitle(doc["title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--levels", default="2,16,2", help="clients per phase, comma separated")
    p.add_argument("--phase-s", type=float, default=120.0)
    p.add_argument("--speedup", type=float, default=4.0, help="mocker --speedup")
    p.add_argument("--kv-blocks", type=int, default=96, help="worker KV blocks (of 16 tokens)")
    p.add_argument("--worker-load-s", type=float, default=0.0,
                   help="each mocker worker's modelled load time (--mocker-load-s): a start-up "
                        "as long as a real model's, for the planner to plan ahead of")
    p.add_argument("--max-workers", type=int, default=4)
    p.add_argument("--ttft-ms", type=float, default=1000.0)
    p.add_argument("--itl-ms", type=float, default=20.0)
    p.add_argument("--down-cooldown-s", type=float, default=20.0)
    p.add_argument("--max-tokens", type=int, default=300)
    p.add_argument("--prompt-words", type=int, default=12)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--plot", metavar="PNG")
    args = p.parse_args(argv)
    args.levels = [int(x) for x in args.levels.split(",") if x.strip()]
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="planner-ramp-"))
    log = tmp / "up.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENSET_")}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "genset.cli", "up", "--engine", "mocker", "--speedup",
           str(args.speedup), "--workers", "1", "--planner", "slo", "--min-workers", "1",
           "--max-workers", str(args.max_workers), f"--worker-arg=--kv-blocks={args.kv_blocks}",
           f"--worker-arg=--mocker-load-s={args.worker_load_s:g}",
           f"--planner-arg=--ttft-ms={args.ttft_ms:g}", f"--planner-arg=--itl-ms={args.itl_ms:g}",
           f"--planner-arg=--down-cooldown-s={args.down_cooldown_s:g}",
           "--router", "embedded", "--port", str(port),
           "--nats", f"nats://127.0.0.1:{free_port()}", "--etcd", f"127.0.0.1:{free_port()}",
           "--namespace", f"ramp{os.getpid()}", "--state-dir", str(tmp / "state")]
    print(" ".join(cmd[2:]), file=sys.stderr)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240 + args.worker_load_s
        while "Ctrl-C stops everything" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"genset up did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        t0 = time.monotonic()
        watch = LogWatch(log, t0)
        watch.pos = log.stat().st_size
        res = asyncio.run(ramp(f"http://127.0.0.1:{port}", watch, args, t0))
        end_s = time.monotonic() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = None
    reqs = res["requests"]
    ok = [r for r in reqs if r["ok"]]
    within = [r for r in ok if r["ttft_ms"] <= args.ttft_ms]
    doc = {"settings": vars(args), "command": " ".join(cmd[2:]), "end_s": round(end_s, 1),
           "exit_code": rc, "phases": res["phases"], "pool_events": watch.events,
           "pool": pool_series(watch.events, 1, end_s), "requests": reqs,
           "summary": {"requests": len(reqs), "ok": len(ok), "failed": len(reqs) - len(ok),
                       "ttft_within_target": len(within) / len(ok) if ok else None,
                       "peak_workers": max(n for _, n in pool_series(watch.events, 1, end_s)),
                       "errors": res["errors"]},
           "title": (f"genset up --planner slo, mocker x{args.speedup:g}, clients "
                     f"{'/'.join(map(str, args.levels))} for {args.phase_s:g} s each, TTFT "
                     f"target {args.ttft_ms:g} ms, ITL {args.itl_ms:g} ms"
                     + (f", worker load {args.worker_load_s:g} s" if args.worker_load_s else ""))}
    print(json.dumps(doc["summary"], indent=1))
    for e in watch.events:
        print(f"{e['t_s']:8.1f} s  {e['event']:<6} {e['worker']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    if args.plot:
        plot(doc, args.plot)
    return 0 if rc == 0 and len(ok) == len(reqs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
