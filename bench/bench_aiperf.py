"""genset vs Dynamo 1.6.1, measured by NVIDIA's own load generator (aiperf 0.13).

Each run starts one system from scratch (genset: `genset up`, mocker workers, its own NATS and
etcd, secure by default as users get it; Dynamo: the peer's `up.sh`), runs the aiperf profile
of `../shared/peers/aiperf/run.sh` against it (200 streamed chat requests, ~1,000 unique prompt
tokens, 64 output tokens, 4 warm-up; or the shared-prefix variant), samples the CPU of every
process of the stack over aiperf's profiling window (cpumon.py, `SERVER_PIDS`), and stops it.
Systems alternate A, B, B, A, ...; a Markdown table of medians goes to stdout, every run's
aiperf summary to --out-dir.

    .venv/bin/python bench/bench_aiperf.py --reps 3 --concurrency 16 64           # default stacks
    .venv/bin/python bench/bench_aiperf.py --systems genset:embedded dynamo:kv ...
    .venv/bin/python bench/bench_aiperf.py --systems genset:round-robin dynamo:round-robin \\
        --timeline                                  # + a per-request TTFT breakdown per genset run
    .venv/bin/python bench/bench_aiperf.py --workers 4 --prefix-prompts 4          # shared prefixes

A system is `genset:<router mode>` (`genset` alone: `genset up`'s default, the router embedded
in its one frontend since session 9; `genset:service` the router service;
`genset:embedded`, `genset:round-robin`, ...) or `dynamo:<router mode>` (`dynamo` alone: the KV
router, as in the issue's figures). `genset-base:<mode>` runs another checkout (--baseline).

Needs the Dynamo peer (`../shared/peers/dynamo/setup.sh`) and aiperf's venv (run.sh creates it
on first use). Dynamo runs from a private state directory (symlinks to the peer's venv and
model) and private ports, so it never meets another user's peer stack.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from _common import MODEL_NAME, PEER_DIR, REPO, GensetUp, descendants, med

PEERS = Path(os.environ.get("GENSET_PEERS", REPO.parent / "shared" / "peers"))
if not PEERS.exists():
    PEERS = Path("/work/shared/peers")


class GensetSystem(GensetUp):
    def __init__(self, name: str, router: str, args, run_dir: Path, source: Path | None = None,
                 extra: list[str] | None = None):
        env = dict(kv.partition("=")[::2] for kv in args.genset_env)
        self.timeline = run_dir / "timeline.jsonl" if args.timeline else None
        if self.timeline is not None:
            env["GENSET_TIMELINE"] = str(self.timeline)
        super().__init__(workers=args.workers, speedup=args.speedup, log_dir=run_dir,
                         kv_blocks=args.kv_blocks, router=None if router == "default" else router,
                         source=source, extra_args=[*args.genset_arg, *(extra or [])], env=env)
        self.name = name


class DynamoSystem:
    def __init__(self, name: str, router: str, args, run_dir: Path):
        self.name = name
        self.router = "kv" if router == "default" else router
        self.args = args
        self.run_dir = run_dir
        self.timeline = None
        # a private state dir: the peer's venv and model by symlink, our own pids/logs/etcd
        self.dir = Path(args.dynamo_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        for sub in ("venv", "model"):
            link = self.dir / sub
            if not link.exists():
                link.symlink_to(PEER_DIR / sub)
        base = args.dynamo_port_base
        self.url = f"http://127.0.0.1:{base}"
        self.env = {**os.environ, "DYNAMO_PEER_DIR": str(self.dir),
                    "DYNAMO_PEER_SPEEDUP": f"{args.speedup:g}", "DYNAMO_PEER_ROUTER_MODE": self.router,
                    "DYNAMO_PEER_WORKERS": str(args.workers),
                    "DYNAMO_PEER_HTTP_PORT": str(base), "DYNAMO_PEER_ETCD_PORT": str(base + 1),
                    "DYNAMO_PEER_ETCD_PEER_PORT": str(base + 2),
                    "DYNAMO_PEER_NATS_PORT": str(base + 3),
                    "DYNAMO_PEER_METRICS_PORT": str(base + 10),
                    "DYNAMO_PEER_MOCKER_ARGS": f"--num-gpu-blocks-override {args.kv_blocks}"}
        self.pids: dict[str, int] = {}

    def start(self) -> None:
        out = open(self.run_dir / "dynamo-up.log", "wb")
        with out:
            subprocess.run([str(PEERS / "dynamo" / "up.sh")], env=self.env, check=True,
                           stdout=out, stderr=subprocess.STDOUT, timeout=240)
        piddir = self.dir / "pids"
        names = ["frontend", "nats", "etcd"] + [f"mocker{i}" for i in range(1, self.args.workers + 1)]
        self.pids = {n: int((piddir / f"{n}.pid").read_text()) for n in names}

    def launcher_cpu(self) -> float:
        return 0.0

    def stop(self) -> None:
        subprocess.run([str(PEERS / "dynamo" / "down.sh")], env=self.env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)


_PROM = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$')
DYNAMO_TTFT = "dynamo_frontend_time_to_first_token_seconds"


def scrape(url: str) -> dict[str, float]:
    """One Prometheus scrape of `url` as {name{labels}: value}; {} when it cannot be read."""
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=10) as resp:
            text = resp.read().decode()
    except (OSError, ValueError):
        return {}
    out = {}
    for line in text.splitlines():
        m = _PROM.match(line.strip())
        if m and not line.startswith("#"):
            try:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
            except ValueError:
                continue
    return out


def histogram_delta(before: dict, after: dict, name: str) -> dict | None:
    """Mean and bucket-interpolated p50 / p90 / p99 (ms) of histogram `name` over the
    observations between two scrapes (summed over label sets); None when there were none."""
    def total(vals, key):
        return sum(v for k, v in vals.items() if k == key or k.startswith(key + "{"))
    count = total(after, name + "_count") - total(before, name + "_count")
    if count <= 0:
        return None
    mean = 1000 * (total(after, name + "_sum") - total(before, name + "_sum")) / count
    buckets: dict[float, float] = {}
    for k, v in after.items():
        m = re.match(re.escape(name) + r'_bucket\{.*le="([^"]+)"', k)
        if m:
            le = float(m.group(1))
            buckets[le] = buckets.get(le, 0.0) + v - before.get(k, 0.0)
    out = {"count": int(count), "mean_ms": round(mean, 1)}
    edges = sorted(buckets)
    for q in (50, 90, 99):
        rank, lo_edge, lo_n = count * q / 100, 0.0, 0.0
        for le in edges:
            n = buckets[le]
            if n >= rank:
                if le == float("inf"):
                    out[f"p{q}_ms"] = None  # beyond the last finite bucket
                else:  # linear inside the bucket, as Prometheus' histogram_quantile
                    out[f"p{q}_ms"] = round(
                        1000 * (lo_edge + (le - lo_edge) * (rank - lo_n) / max(n - lo_n, 1e-9)), 1)
                break
            lo_edge, lo_n = le, n
    return out


def timeline_ttft(recs: list[dict]) -> dict | None:
    """genset's server TTFT (handler to first SSE write, ms) over every request of a
    --timeline file, warm-up included as in Dynamo's histogram."""
    from bench.timeline_report import pct
    vals = [r["stages"]["first_written"] for r in recs
            if r.get("ok") and "first_written" in r.get("stages", {})]
    if not vals:
        return None
    return {"count": len(vals), "mean_ms": round(sum(vals) / len(vals), 1),
            **{f"p{q}_ms": round(pct(vals, q), 1) for q in (50, 90, 99)}}


def run_aiperf(system, args, concurrency: int, run_dir: Path) -> dict:
    env = {**os.environ, "N": str(args.n), "CONCURRENCY": str(concurrency),
           "SERVER_PIDS": ",".join(f"{k}={v}" for k, v in system.pids.items()),
           "TIMEOUT_S": str(args.run_timeout)}
    if args.isl:
        env["ISL"] = str(args.isl)
    extra: list[str] = []
    if args.prefix_prompts:
        env.setdefault("ISL", "50")
        extra = ["--num-prefix-prompts", str(args.prefix_prompts),
                 "--prefix-prompt-length", str(args.prefix_length)]
    if args.records:
        # aiperf's per-request records (a/aiperf/**/profile_export.jsonl): each request's
        # start and TTFT, for both systems (bench/burst_report.py reads them)
        extra.append("--export-level=records")
    cmd = [str(PEERS / "aiperf" / "run.sh"), system.url, MODEL_NAME, str(PEER_DIR / "model"),
           str(run_dir / "a"), *extra]
    with open(run_dir / "run.log", "wb") as log:
        subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                       timeout=args.run_timeout + 120)
    summary = run_dir / "a" / "summary.json"
    if not summary.exists():
        raise RuntimeError(f"aiperf gave no summary; see {run_dir / 'run.log'}")
    return json.loads(summary.read_text())


def wakeups(pids: dict[str, int]) -> dict[str, int]:
    """Voluntary context switches so far of every thread of each server process and its
    descendants: each is a thread that blocked (socket, timer, lock) and was woken again. The
    stack's CPU on 2 cores follows its wake-ups, and unlike CPU seconds their count does not
    move with how fast the shared machine happens to run (CPU per request of the same code
    spread 10-15 ms between consecutive runs, every process by the same factor;
    docs/benchmarks.md, issue 15 §5t)."""
    out: dict[str, int] = {}
    for name, pid in pids.items():
        total = 0
        for proc in [pid, *(p for p, _ in descendants(pid))]:
            for status in Path(f"/proc/{proc}/task").glob("*/status"):
                try:
                    for line in status.read_text().splitlines():
                        if line.startswith("voluntary_ctxt_switches:"):
                            total += int(line.split()[1])
                except OSError:  # a thread that just ended
                    pass
        out[name] = total
    return out


def server_cpu(summary: dict, pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds of each server process over aiperf's profiling window."""
    win = summary.get("cpu", {}).get("profiling_window", {})
    return {name: win.get(f"{name}_cpu_s", 0.0) for name in pids}


def row_of(rec: dict) -> dict:
    s = rec["summary"]
    n = s.get("completed_request_count") or 1
    cpu = rec["server_cpu"]
    total = sum(cpu.values()) + rec.get("launcher_cpu_s", 0.0)
    groups: dict[str, float] = {}
    for name, v in cpu.items():
        g = ("workers" if name.startswith(("worker", "mocker")) else
             "nats+etcd" if name in ("nats", "etcd") else
             name.rstrip("0123456789"))  # frontend2 (--frontends 2) is a frontend too
        groups[g] = groups.get(g, 0.0) + v
    client = s.get("cpu", {}).get("profiling_window", {}).get("client_cpu_s")
    # The same code's CPU per request moves by up to a third between series ten minutes
    # apart on this VM, and aiperf's own CPU moves with it (docs/benchmarks.md §5x): the
    # server's CPU over the client's, in the same run, is the steadier figure to compare.
    per_client = total / client if client else None
    return {
        "req_s": s.get("request_throughput_rps"),
        "ttft_p50": (s.get("ttft_ms") or {}).get("p50"),
        "ttft_p99": (s.get("ttft_ms") or {}).get("p99"),
        "ttft_avg": (s.get("ttft_ms") or {}).get("avg"),
        # server-side TTFT (handler to first token): Dynamo's own histogram, genset's
        # --timeline; None without them
        "srv_ttft_avg": (rec.get("server_ttft") or {}).get("mean_ms"),
        "srv_ttft_p50": (rec.get("server_ttft") or {}).get("p50_ms"),
        "itl_p50": (s.get("itl_ms") or {}).get("p50"),
        "chunk_p50": (s.get("inter_chunk_ms") or {}).get("p50"),
        "cpu_ms": 1000 * total / n,
        **{f"cpu_{g}": 1000 * v / n for g, v in groups.items()},
        "client_cpu_ms": 1000 * client / n if client is not None else None,
        "cpu_per_client": round(per_client, 3) if per_client is not None else None,
        "cached_pct": s.get("cached_prompt_pct"),
        "errors": s.get("error_request_count") or 0,
        "load1": rec["load1"],
        "busy": s.get("cpu", {}).get("machine_busy_pct_all_cores_whole_run"),
        # per request of the whole aiperf run: its start and run.sh's 4 warm-up requests are
        # counted too (seconds at the stack's idle rate), so compare versions of one stack
        "wakeups": (round(sum(rec["wakeups"].values()) / (n + 4))
                    if rec.get("wakeups") else None),
    }


def table(results: dict[tuple, list[dict]]) -> str:
    lines = ["| workers | speedup | conc | system | runs | req/s | TTFT p50 / p99 ms | ITL p50 ms | "
             "server CPU ms/req (frontend / router / workers / NATS+etcd) | cached % | "
             "client CPU ms/req | server / client CPU | load avg (1 min) | errors | "
             "TTFT mean: aiperf / server ms | server wake-ups/req |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (name, workers, speedup, conc), recs in results.items():
        rows = [row_of(r) for r in recs]
        m = {k: med([r.get(k) for r in rows]) for k in rows[0]}
        parts = " / ".join(str(m.get(f"cpu_{g}") if m.get(f"cpu_{g}") is not None else "-")
                           for g in ("frontend", "router", "workers", "nats+etcd"))
        lines.append(
            f"| {workers} | {speedup:g} | {conc} | {name} | {len(rows)} | {m['req_s']} | "
            f"{m['ttft_p50']} / {m['ttft_p99']} | {m['itl_p50']} | **{m['cpu_ms']}** ({parts}) | "
            f"{m['cached_pct']} | {m['client_cpu_ms']} | "
            f"{m['cpu_per_client'] if m['cpu_per_client'] is not None else '-'} | {m['load1']} | "
            f"{sum(r['errors'] for r in rows)} | {m['ttft_avg']} / {m['srv_ttft_avg']} | "
            f"{m['wakeups'] if m['wakeups'] is not None else '-'} |")
    return "\n".join(lines)


def make_system(spec: str, args, run_dir: Path):
    # genset[:mode][+ARG...]: `genset up` arguments of this system only (an A/B of a flag in
    # one alternated series), e.g. genset+--offload-ram-gb=0
    spec_mode, *extra = spec.split("+")
    kind, _, router = spec_mode.partition(":")
    router = router or "default"
    if extra and not kind.startswith("genset"):
        raise SystemExit(f"{spec!r}: only genset systems take +ARG")
    if kind == "genset":
        return GensetSystem(spec, router, args, run_dir, extra=extra)
    if kind == "genset-base":
        if not args.baseline:
            raise SystemExit("genset-base needs --baseline DIR")
        return GensetSystem(spec, router, args, run_dir, source=Path(args.baseline), extra=extra)
    if kind == "dynamo":
        return DynamoSystem(spec, router, args, run_dir)
    raise SystemExit(f"unknown system {spec!r} (genset[:mode], genset-base[:mode], dynamo[:mode])")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--systems", nargs="+", default=["genset", "dynamo"],
                   help="genset[:router mode][+GENSET_UP_ARG...] | genset-base[...] | "
                        "dynamo[:router mode], run alternated")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--n", type=int, default=200, help="measured requests per run")
    p.add_argument("--concurrency", type=int, nargs="+", default=[16])
    p.add_argument("--speedup", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--kv-blocks", type=int, default=8192)
    p.add_argument("--isl", type=int, default=0, help="aiperf ISL (default: run.sh's, 1000)")
    p.add_argument("--prefix-prompts", type=int, default=0,
                   help="shared-prefix workload: aiperf --num-prefix-prompts N (ISL 50 + prefix)")
    p.add_argument("--prefix-length", type=int, default=950)
    p.add_argument("--timeline", action="store_true",
                   help="genset runs write a per-request timeline (bench/timeline_report.py)")
    p.add_argument("--records", action="store_true",
                   help="aiperf writes per-request records (bench/burst_report.py)")
    p.add_argument("--genset-arg", action="append", default=[], help="extra `genset up` argument")
    p.add_argument("--genset-env", action="append", default=[], help="NAME=VALUE for genset up")
    p.add_argument("--baseline", default="", help="checkout run as genset-base")
    p.add_argument("--dynamo-dir", default="/tmp/gba-dynpeer")
    p.add_argument("--dynamo-port-base", type=int, default=18890)
    p.add_argument("--run-timeout", type=int, default=600)
    p.add_argument("--out-dir", default="/tmp/gba", help="keep it short (aiperf socket paths)")
    args = p.parse_args(argv)
    if not (PEER_DIR / "venv" / "bin" / "python").exists():
        print(f"Dynamo peer not installed in {PEER_DIR}: run {PEERS}/dynamo/setup.sh",
              file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[tuple, list[dict]] = {}
    for conc in args.concurrency:
        for rep in range(args.reps):
            order = args.systems if rep % 2 == 0 else list(reversed(args.systems))
            for spec in order:
                # short: aiperf's ZMQ socket paths under the run directory must stay under
                # 107 characters
                short = (spec.replace("genset-base", "gb").replace("genset", "g")
                         .replace("dynamo", "d").replace("round-robin", "rr")
                         .replace("embedded", "emb").replace(":", "-")
                         .replace("+", "_").replace("=", "").replace("--", ""))
                tag = f"{short}-w{args.workers}s{args.speedup:g}c{conc}r{rep}"
                run_dir = out / tag
                run_dir.mkdir(parents=True, exist_ok=True)
                system = make_system(spec, args, run_dir)
                load1 = os.getloadavg()[0]
                started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
                server_ttft = None
                woken = {}
                try:
                    system.start()
                    # Dynamo's frontend times TTFT itself (handler to first token): scraped
                    # around the run, it splits aiperf's TTFT into server and outside (the
                    # client and the HTTP intake), as genset's --timeline does
                    before = scrape(system.url + "/metrics") if isinstance(system, DynamoSystem) else {}
                    woken = wakeups(system.pids)
                    summary = run_aiperf(system, args, conc, run_dir)
                    woken = {k: v - woken[k] for k, v in wakeups(system.pids).items()}
                    if before:
                        server_ttft = histogram_delta(before, scrape(system.url + "/metrics"),
                                                      DYNAMO_TTFT)
                    launcher = system.launcher_cpu()
                finally:
                    system.stop()
                rec = {"system": spec, "rep": rep, "concurrency": conc, "started": started,
                       "load1": round(load1, 2), "summary": summary, "pids": system.pids,
                       "server_cpu": server_cpu(summary, system.pids),
                       "launcher_cpu_s": launcher, "wakeups": woken}
                if system.timeline is not None and system.timeline.exists():
                    from bench.timeline_report import breakdown, load
                    rec["timeline"] = breakdown(load(system.timeline, skip=4))
                    server_ttft = timeline_ttft(load(system.timeline))
                if server_ttft is not None:
                    rec["server_ttft"] = server_ttft
                (run_dir / "record.json").write_text(json.dumps(rec, indent=1))
                results.setdefault((spec, args.workers, args.speedup, conc), []).append(rec)
                r = row_of(rec)
                print(f"{tag}: {r['req_s']} req/s, TTFT p50/p99 {r['ttft_p50']}/{r['ttft_p99']} "
                      f"ms (mean {r['ttft_avg']}, server {r['srv_ttft_avg']}), server CPU "
                      f"{r['cpu_ms']:.2f} ms/req ({r['cpu_per_client'] or 0:.2f} of the client's), "
                      f"wake-ups {r['wakeups'] or 0:.0f}/req, "
                      f"load {load1:.1f}, errors {r['errors']}",
                      file=sys.stderr, flush=True)
    print(table(results))
    (out / "summary.json").write_text(json.dumps(
        {"|".join(map(str, k)): [row_of(r) for r in v] for k, v in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
