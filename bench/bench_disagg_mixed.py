"""Disaggregated serving under a live mixed load (issue 11), genset vs Dynamo 1.6.1.

Mixed load = two of the peer's neutral `load.py` processes at once against one endpoint:

* decode streams: 480 requests, 48 at a time, short prompts (~116 tokens over 4 shared
  prefixes) with long outputs (256 tokens, ignore_eos);
* long prompts: 320 requests, 16 at a time, long unique prompts (~6,700 tokens, nothing shared)
  with short outputs (16 tokens).

(At 32 streams and 4 long prompts at a time every configuration kept every request within the
SLOs on this machine: the mocker at speedup 1 prefills 6,700 tokens in ~200 ms; 16 long prompts
at a time is what makes the prefill placement matter.) Fixed counts: every run does the same
work.

Every configuration has 4 mocker workers in all, speedup 1, 8,192 KV blocks of 16, at most 256
running sequences and 8,192 batched tokens a step, the Dynamo peer's model directory as the
tokenizer, and the same modelled KV transfer (--kv-bytes-per-token, --kv-transfer-bandwidth:
both mockers take the same two knobs; genset's mocker sends hashes only, paced to that link,
unless --kv-payload dummy: the bytes were ~3 s of the workers' CPU a run on this 2-core box,
which a GPU deployment's DMA does not spend and Dynamo's mocker does not either).
Configurations:

    genset:agg           genset up --workers 4                       (aggregated)
    genset:1p3d-always   --prefill-workers 1 --workers 3, workers --disagg always
    genset:2p2d-always   --prefill-workers 2 --workers 2, workers --disagg always
    genset:1p3d-auto     --prefill-workers 1 --workers 3, workers --disagg auto (cost model)
    genset:2p2d-auto     --prefill-workers 2 --workers 2, workers --disagg auto
    genset:1p3d-tielocal, genset:2p2d-tielocal: `auto` with --disagg-spare-budget-ms 0 (ties
                         stay local: `auto` before session 7's spare-pool rule), for A/B runs
    dynamo:agg           4 x dynamo.mocker, dynamo.frontend --router-mode kv
    dynamo:1p3d          1 x --disaggregation-mode prefill + 3 x decode, --router-mode kv
    dynamo:2p2d          2 x prefill + 2 x decode
    dynamo:1p3d-cond     1P+3D, frontend --router-conditional-disagg (Dynamo's experimental
    dynamo:2p2d-cond     per-request choice of local or remote prefill: its analogue of auto)

Each run starts its stack from scratch (own ports, NATS, etcd) and stops it after; rounds go
through the configurations in order, so systems alternate and one never loads the machine while
the other is measured. Per run, over both classes: goodput = share of requests with TTFT <= the
TTFT SLO and mean ITL (TPOT) <= the ITL SLO; per class: TTFT p50/p99 and ITL p50/p99 (gaps
between streamed tokens, load.py's figures). Results: one JSON per run in --out-dir and a
Markdown table of medians over rounds on stdout.

    .venv/bin/python bench/bench_disagg_mixed.py --reps 3 --out-dir /tmp/mixed

Needs the Dynamo peer (`../shared/peers/dynamo/setup.sh`, DYNAMO_PEER_DIR, default
/tmp/dynamo-peer): its venv runs load.py and Dynamo, its model directory is the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from _common import MODEL_NAME, PEER_DIR, REPO, free_port, get_json, pct
from _common import descendants as children

# the peer's scripts: ../shared/peers/dynamo from the main checkout, ../../shared/... from a
# worktree under /work/wt (DYNAMO_PEER_HOME wins)
PEER = Path(os.environ.get("DYNAMO_PEER_HOME") or next(
    (p for p in (REPO.parent / "shared" / "peers" / "dynamo",
                 REPO.parent.parent / "shared" / "peers" / "dynamo") if p.exists()),
    REPO.parent / "shared" / "peers" / "dynamo"))

CONFIGS = ("genset:agg", "genset:1p3d-always", "genset:2p2d-always", "genset:1p3d-auto",
           "genset:2p2d-auto", "genset:1p3d-tielocal", "genset:2p2d-tielocal", "dynamo:agg",
           "dynamo:1p3d", "dynamo:2p2d", "dynamo:1p3d-cond", "dynamo:2p2d-cond")
# the systems alternate within a round
DEFAULT_CONFIGS = ("genset:agg", "dynamo:agg", "genset:1p3d-always", "dynamo:1p3d",
                   "genset:2p2d-always", "dynamo:2p2d", "genset:1p3d-auto", "genset:2p2d-auto")
ENGINE = {"kv_blocks": 8192, "block_size": 16, "max_running": 256, "max_batch_tokens": 8192}


def low_port() -> int:
    """A free port below 32768: Dynamo 1.6.1 reads DYN_SYSTEM_PORT as an i16."""
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def split_of(config: str) -> tuple[int, int]:
    """(prefill workers, decode workers) of a configuration name; 4 workers in all."""
    kind = config.split(":", 1)[1]
    if kind == "agg":
        return 0, 4
    p, d = int(kind[0]), int(kind[2])
    return p, d


def wait_for(what: str, check, procs: list[subprocess.Popen], timeout: float, log: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: a process exited with {proc.returncode}; see {log}")
        try:
            if check():
                return
        except (OSError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready in {timeout:.0f} s; see {log}")
        time.sleep(0.5)


def stop_proc(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM, SIGKILL of its process group after `timeout` (each was started in its own)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


class GensetStack:
    """`genset up` with mocker workers, P prefill + D decode (0 + 4: aggregated)."""

    def __init__(self, config: str, args, run_dir: Path) -> None:
        self.name = config
        self.prefill, self.decode = split_of(config)
        self.mode = "always" if config.endswith("-always") else "auto"
        self.args = args
        self.run_dir = run_dir
        self.url = ""
        self.pids: dict[str, int] = {}
        self.metrics_urls: list[str] = []
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        a = self.args
        port = free_port()
        # the state dir keeps every process's log: kept with the run's results
        state = self.run_dir / "state"
        # `python -m genset.cli`, not the venv's `genset` script: the shared venv's script
        # can name another checkout's interpreter in its shebang
        cmd = [str(REPO / ".venv" / "bin" / "python"), "-m", "genset.cli", "up",
               "--port", str(port),
               "--workers", str(self.decode), "--prefill-workers", str(self.prefill),
               "--engine", "mocker", "--model", str(PEER_DIR / "model"),
               "--served-model-name", MODEL_NAME, "--speedup", f"{a.speedup:g}",
               "--state-dir", str(state), "--nats", f"nats://127.0.0.1:{free_port()}",
               "--etcd", f"127.0.0.1:{free_port()}", "--log-level", "warning",
               f"--worker-arg=--kv-blocks={ENGINE['kv_blocks']}",
               f"--worker-arg=--block-size={ENGINE['block_size']}",
               f"--worker-arg=--max-running={ENGINE['max_running']}",
               f"--worker-arg=--max-batch-tokens={ENGINE['max_batch_tokens']}",
               f"--worker-arg=--kv-bytes-per-token={a.kv_bytes_per_token}",
               f"--worker-arg=--kv-transfer-bandwidth={a.kv_transfer_bandwidth:g}",
               f"--worker-arg=--kv-payload={a.kv_payload}"]
        if self.prefill:
            cmd.append(f"--worker-arg=--disagg={self.mode}")
        if self.name.endswith("-tielocal"):
            cmd.append("--worker-arg=--disagg-spare-budget-ms=0")
        log_path = self.run_dir / "genset-up.log"
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                         start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            models = get_json(self.url + "/v1/models")["data"]
            return bool(models) and models[0].get("workers", 0) >= self.decode

        wait_for(self.name, ready, [self.proc], 180, str(log_path))
        # `genset up` starts the frontend after every worker (prefill ones too) is ready;
        # a decode worker learns of the prefill pool from etcd at once, give it a moment
        time.sleep(2)
        for pid, cmdline in children(self.proc.pid):
            if " frontend " in cmdline:
                self.pids["frontend"] = pid
            elif " worker " in cmdline:
                self.pids[f"worker{len(self.pids)}"] = pid
                port = cmdline.split("--metrics-port ", 1)[1].split(" ", 1)[0]
                self.metrics_urls.append(f"http://127.0.0.1:{port}/metrics")

    def disagg_counts(self) -> dict[str, float]:
        """The workers' disaggregation counters summed by name and labels (where each prefill
        went and why, fallbacks, transfers)."""
        out: dict[str, float] = {}
        for url in self.metrics_urls:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    text = r.read().decode()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith(("genset_disagg_decisions_total{", "genset_kv_transfers_total{",
                                    "genset_disagg_fallbacks_total{",
                                    "genset_disagg_resume_seconds_bucket{",
                                    "genset_disagg_remote_prefills_total ")):
                    key, _, value = line.rpartition(" ")
                    out[key] = out.get(key, 0.0) + float(value)
        return out

    def stop(self) -> None:
        if self.proc is not None:
            stop_proc(self.proc, 40)


class DynamoStack:
    """Dynamo 1.6.1 as up.sh starts it (same env, flags), with a disaggregation mode per
    mocker: P `--disaggregation-mode prefill` + D `decode` workers, or 4 aggregated ones.
    Own ports and state under the run's directory, so it never meets another user's peer."""

    def __init__(self, config: str, args, run_dir: Path) -> None:
        self.name = config
        self.prefill, self.decode = split_of(config)
        self.args = args
        self.run_dir = run_dir
        self.procs: list[subprocess.Popen] = []
        self.pids: dict[str, int] = {}
        self.url = ""

    def _start(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        with open(self.run_dir / f"dynamo-{name}.log", "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        self.pids[name] = proc.pid
        return proc

    def start(self) -> None:
        a = self.args
        d = self.run_dir / "dynamo-state"
        for sub in ("home", "cache", "tmp"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        py = str(PEER_DIR / "venv" / "bin" / "python")
        http, etcd, etcd_peer, nats = (free_port() for _ in range(4))
        env = {k: v for k, v in os.environ.items() if k != "ETCD_ENDPOINTS"}
        self._start("etcd", ["etcd", "--name", "dynpeer", "--data-dir", str(d / "etcd"),
                             "--listen-client-urls", f"http://127.0.0.1:{etcd}",
                             "--advertise-client-urls", f"http://127.0.0.1:{etcd}",
                             "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
                             "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
                             "--initial-cluster", f"dynpeer=http://127.0.0.1:{etcd_peer}"], env)
        self._start("nats", [str(PEER_DIR / "venv" / "bin" / "nats-server"), "-a", "127.0.0.1",
                             "-p", str(nats), "-js", "-sd", str(d / "js")], env)
        wait_for("etcd", lambda: get_json(f"http://127.0.0.1:{etcd}/health")["health"] == "true",
                 self.procs, 60, str(self.run_dir))
        nats_log = self.run_dir / "dynamo-nats.log"
        wait_for("nats", lambda: b"Server is ready" in nats_log.read_bytes(), self.procs, 60,
                 str(nats_log))
        # the environment up.sh writes to env.sh for every Dynamo process
        env.update({
            "ETCD_ENDPOINTS": f"http://127.0.0.1:{etcd}", "NATS_SERVER": f"nats://127.0.0.1:{nats}",
            "DYN_DISCOVERY_BACKEND": "etcd", "DYN_REQUEST_PLANE": "tcp", "DYN_EVENT_PLANE": "nats",
            "DYN_NAMESPACE": "dynamo", "DYN_LOG": env.get("DYN_LOG", "info"),
            "DYN_SDK_DISABLE_ANSI_LOGGING": "1", "DYN_TCP_RPC_HOST": "127.0.0.1",
            "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1", "DYN_EVENT_PLANE_HOST": "127.0.0.1",
            "DYN_SYSTEM_HOST": "127.0.0.1", "HOME": str(d / "home"),
            "XDG_CACHE_HOME": str(d / "cache"), "HF_HOME": str(d / "cache" / "huggingface"),
            "HF_HUB_OFFLINE": "1", "TMPDIR": str(d / "tmp")})
        modes = ["prefill"] * self.prefill + (["decode"] if self.prefill else [None]) * self.decode
        for i, mode in enumerate(modes, 1):
            cmd = [py, "-m", "dynamo.mocker", "--model-path", str(PEER_DIR / "model"),
                   "--model-name", MODEL_NAME, "--block-size", str(ENGINE["block_size"]),
                   "--num-gpu-blocks-override", str(ENGINE["kv_blocks"]),
                   "--max-num-seqs", str(ENGINE["max_running"]),
                   "--max-num-batched-tokens", str(ENGINE["max_batch_tokens"]),
                   "--speedup-ratio", f"{a.speedup:g}",
                   "--kv-bytes-per-token", str(a.kv_bytes_per_token),
                   "--kv-transfer-bandwidth", f"{a.kv_transfer_bandwidth:g}"]
            if mode is not None:
                cmd += ["--disaggregation-mode", mode]
            if mode == "prefill":  # the rendezvous port decode workers connect to
                cmd += ["--bootstrap-ports", str(low_port())]
            self._start(f"mocker{i}", cmd, {**env, "DYN_SYSTEM_PORT": str(low_port())})
        frontend = [py, "-m", "dynamo.frontend", "--http-host", "127.0.0.1",
                    "--http-port", str(http), "--router-mode", "kv",
                    "--kv-cache-block-size", str(ENGINE["block_size"])]
        if self.name.endswith("-cond"):
            frontend.append("--router-conditional-disagg")
        self._start("frontend", frontend, env)
        self.url = f"http://127.0.0.1:{http}"

        def ready() -> bool:
            models = get_json(self.url + "/v1/models")["data"]
            if not any(m.get("id") == MODEL_NAME for m in models):
                return False
            health = get_json(self.url + "/health")
            ids = {i["instance_id"] for i in health.get("instances", [])
                   if i.get("endpoint") == "generate"}
            return len(ids) >= self.prefill + self.decode

        wait_for(self.name, ready, self.procs, 180, str(self.run_dir))
        time.sleep(2)

    def stop(self) -> None:
        # frontend and workers first, then NATS and etcd (as down.sh)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def load_cmd(url: str, args, cls: str, out: Path, pids: dict[str, int]) -> list[str]:
    common = [str(PEER_DIR / "venv" / "bin" / "python"), str(PEER / "load.py"), "--url", url,
              "--model", MODEL_NAME, "--ignore-eos", "--warmup", "1", "--timeout", "300",
              "--run-timeout", str(args.run_timeout), "--out", str(out)]
    if pids:
        common += ["--pids", ",".join(f"{k}={v}" for k, v in pids.items())]
    if cls == "decode":
        # ~100-token prompts: 4 shared 40-word prefixes + 20 unique words (~1.6 tokens/word)
        return [*common, "--n", str(args.decode_n),
                "--concurrency", str(args.decode_concurrency),
                "--max-tokens", str(args.decode_max_tokens), "--num-prefixes", "4",
                "--prefix-words", "40", "--suffix-words", "20", "--seed", "11"]
    # long unique prompts: no shared prefix, every word drawn for this request
    return [*common, "--n", str(args.long_n), "--concurrency", str(args.long_concurrency),
            "--max-tokens", str(args.long_max_tokens), "--num-prefixes", "1",
            "--prefix-words", "0", "--suffix-words", str(args.long_words), "--seed", "12"]


def mean_itl(rec: dict) -> float | None:
    """Mean gap between a request's tokens after the first (load.py's TPOT; from the chunks
    when the server sent no usage)."""
    if rec.get("tpot") is not None:
        return rec["tpot"]
    if rec.get("n_chunks", 0) > 1:
        return (rec["e2e"] - rec["ttft"]) / (rec["n_chunks"] - 1)
    return None


def score(run_dir: Path, args) -> dict:
    """Per class and over both: from the two load.py result files of a run."""
    row: dict = {}
    good = total = 0
    for cls in ("decode", "long"):
        out = run_dir / f"load-{cls}.json"
        if not out.exists():
            raise RuntimeError(f"load.py ({cls}) wrote no results; see {run_dir}")
        data = json.loads(out.read_text())
        recs, summary = data["requests"], data["summary"]
        ok = [r for r in recs if r.get("ok")]
        ttfts = [r["ttft"] for r in ok]
        itls = [mean_itl(r) for r in ok]
        ttft_miss = sum(1 for t in ttfts if t > args.ttft_slo)
        itl_miss = sum(1 for i in itls if i is None or i > args.itl_slo)
        cls_good = sum(1 for t, i in zip(ttfts, itls, strict=True)
                       if t <= args.ttft_slo and i is not None and i <= args.itl_slo)
        good += cls_good
        total += len(recs)
        known = [i for i in itls if i is not None]
        row[cls] = {
            "n": len(recs), "errors": len(recs) - len(ok), "good": cls_good,
            "ttft_miss": ttft_miss, "itl_miss": itl_miss,
            "prompt_tokens": (sum((r.get("usage") or {}).get("prompt_tokens", 0) for r in ok)
                              // max(1, len(ok))),
            "ttft_p50_ms": round(1000 * pct(ttfts, 0.5), 1) if ttfts else None,
            "ttft_p99_ms": round(1000 * pct(ttfts, 0.99), 1) if ttfts else None,
            # per-token gaps as the client saw them (chunks read together give ~0 gaps)
            "itl_p50_ms": summary["itl_ms"]["p50"], "itl_p99_ms": summary["itl_ms"]["p99"],
            # per-request mean ITL (what the SLO is on)
            "mean_itl_p50_ms": round(1000 * pct(known, 0.5), 1) if known else None,
            "mean_itl_p99_ms": round(1000 * pct(known, 0.99), 1) if known else None,
            "wall_s": summary.get("wall_s"),
        }
    row["goodput"] = round(good / total, 3) if total else 0.0
    return row


def measure(system, args, run_dir: Path) -> dict:
    outs = {cls: run_dir / f"load-{cls}.json" for cls in ("decode", "long")}
    procs = {}
    for cls, out in outs.items():
        log = open(run_dir / f"load-{cls}.log", "wb")
        with log:
            procs[cls] = subprocess.Popen(load_cmd(system.url, args, cls, out, system.pids),
                                          stdout=log, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    for proc in procs.values():
        try:
            proc.wait(args.run_timeout + 120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    wall = time.monotonic() - t0
    with open("/proc/loadavg") as f:
        loadavg = f.read().split()[0]
    row: dict = {"config": system.name, "wall_s": round(wall, 1), "loadavg_end": loadavg}
    row.update(score(run_dir, args))
    if isinstance(system, GensetStack):
        counts = row["disagg"] = system.disagg_counts()
        decided = {k: v for k, v in counts.items() if k.startswith("genset_disagg_decisions")}
        remote = sum(v for k, v in decided.items() if 'mode="remote"' in k)
        row["remote_share"] = round(remote / sum(decided.values()), 2) if decided else None
        row["fallbacks"] = sum(v for k, v in counts.items() if "fallbacks" in k)
        row["resume"] = resume_gaps(counts)
    return row


def resume_gaps(counts: dict[str, float]) -> dict[str, dict[str, float]]:
    """The decode workers' resume-gap histogram (genset_disagg_resume_seconds, summed over
    workers) as per-stage count and p50/p90/p99 in ms, interpolated within 5 ms buckets."""
    per: dict[str, dict[float, float]] = {}
    for key, value in counts.items():
        if not key.startswith("genset_disagg_resume_seconds_bucket{"):
            continue
        labels = dict(part.split("=", 1) for part in key[key.index("{") + 1:-1].split(","))
        stage, le = labels["stage"].strip('"'), labels["le"].strip('"')
        edge = float("inf") if le == "+Inf" else float(le)
        # every prompt, and the long ones apart ("long-kv", ...)
        for name in (stage, f"long-{stage}") if labels.get("prompt") == '"long"' else (stage,):
            got = per.setdefault(name, {})
            got[edge] = got.get(edge, 0.0) + value
    out: dict[str, dict[str, float]] = {}
    for stage, by_edge in per.items():
        buckets = sorted(by_edge.items())
        n = buckets[-1][1] if buckets else 0
        row: dict[str, float] = {"n": n}
        for q in (0.5, 0.9, 0.99):
            rank, lo_edge, lo_count = q * n, 0.0, 0.0
            for edge, cum in buckets:
                if cum >= rank and n:
                    hi = edge if edge != float("inf") else lo_edge
                    frac = (rank - lo_count) / (cum - lo_count) if cum > lo_count else 1.0
                    row[f"p{round(q * 100)}"] = round((lo_edge + frac * (hi - lo_edge)) * 1e3, 1)
                    break
                lo_edge, lo_count = edge, cum
        out[stage] = row
    return out


def resume_table(results: dict[str, list[dict]]) -> str:
    lines = ["| config | resumes (runs) | first token -> next: p50 / p90 / p99 | KV complete "
             "p50 / p99 | submitted p50 / p99 | engine's next token p50 / p99 | long prompts "
             "(runs): first token -> next p50 / p90 / p99 | long: KV complete p50 / p99 |",
             "|---|---|---|---|---|---|---|---|"]
    for config, rows in results.items():
        rows = [r for r in rows if r.get("resume", {}).get("total", {}).get("n")]
        if not rows:
            continue
        ns = ", ".join(f"{r['resume']['total']['n']:.0f}" for r in rows)

        def q(stage, *ps, rows=rows):
            return " / ".join(f"{med(rows, 'resume', stage, p)}" for p in ps)
        lines.append(f"| {config} | {ns} | {q('total', 'p50', 'p90', 'p99')} "
                     f"| {q('kv', 'p50', 'p99')} | {q('submit', 'p50', 'p99')} "
                     f"| {q('step', 'p50', 'p99')} "
                     f"| {', '.join(str(r['resume'].get('long-total', {}).get('n')) for r in rows)}"
                     f": {q('long-total', 'p50', 'p90', 'p99')} "
                     f"| {q('long-kv', 'p50', 'p99')} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def med(rows: list[dict], *keys):
    vals = []
    for r in rows:
        v = r
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        if v is not None:
            vals.append(v)
    digits = 3 if keys[-1] == "goodput" else 2 if keys[-1] == "remote_share" else 1
    return round(statistics.median(vals), digits) if vals else None


def table(results: dict[str, list[dict]]) -> str:
    def pair(rows, cls, a, b, digits=0):
        return f"{med(rows, cls, a):.{digits}f} / {med(rows, cls, b):.{digits}f}"

    lines = ["| config | runs | goodput (runs) | decode TTFT p50 / p99 | decode ITL p50 / p99 "
             "| decode mean ITL p50 / p99 | long TTFT p50 / p99 | long ITL p50 / p99 "
             "| long mean ITL p50 / p99 | missed TTFT / ITL SLO: decode; long "
             "| remote share | wall (s) | load avg at end |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for config, rows in results.items():
        if not rows:
            continue
        goods = ", ".join(f"{r['goodput']:.3f}" for r in rows)
        errors = sum(r["decode"]["errors"] + r["long"]["errors"] for r in rows)
        loads = ", ".join(r["loadavg_end"] for r in rows)
        misses = "; ".join(f"{med(rows, c, 'ttft_miss'):.0f} / {med(rows, c, 'itl_miss'):.0f}"
                           for c in ("decode", "long"))
        if errors:
            misses += f" ({errors} errors)"
        lines.append(
            f"| {config} | {len(rows)} | {med(rows, 'goodput'):.3f} ({goods}) "
            f"| {pair(rows, 'decode', 'ttft_p50_ms', 'ttft_p99_ms')} "
            f"| {pair(rows, 'decode', 'itl_p50_ms', 'itl_p99_ms', 1)} "
            f"| {pair(rows, 'decode', 'mean_itl_p50_ms', 'mean_itl_p99_ms', 1)} "
            f"| {pair(rows, 'long', 'ttft_p50_ms', 'ttft_p99_ms')} "
            f"| {pair(rows, 'long', 'itl_p50_ms', 'itl_p99_ms', 1)} "
            f"| {pair(rows, 'long', 'mean_itl_p50_ms', 'mean_itl_p99_ms', 1)} "
            f"| {misses} "
            f"| {med(rows, 'remote_share') if 'remote_share' in rows[0] else '-'} "
            f"| {med(rows, 'wall_s')} | {loads} |")
    return "\n".join(lines)


def report(args) -> int:
    rows = []
    for d in args.report:
        for f in sorted(Path(d).glob("*/row.json")):
            row = json.loads(f.read_text())
            row.update(score(f.parent, args))  # again: with this version's figures
            rows.append(row)
    order = [c.strip() for c in args.configs.split(",")] + list(CONFIGS)
    results: dict[str, list[dict]] = {}
    for config in dict.fromkeys(order):
        results[config] = [r for r in rows if r["config"] == config]
    print(table(results))
    resume = resume_table(results)
    if resume:
        print("\nResume gap after a remote first token (decode workers' histogram, ms):\n")
        print(resume)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help=f"comma-separated, run in this order each round; of: {', '.join(CONFIGS)}")
    p.add_argument("--reps", type=int, default=3, help="rounds (fresh stacks every run)")
    p.add_argument("--out-dir", default="/tmp/bench-disagg-mixed")
    p.add_argument("--speedup", type=float, default=1.0)
    p.add_argument("--decode-n", type=int, default=480, help="decode-stream requests a run")
    p.add_argument("--decode-concurrency", type=int, default=48)
    p.add_argument("--decode-max-tokens", type=int, default=256)
    p.add_argument("--long-n", type=int, default=320, help="long-prompt requests a run")
    p.add_argument("--long-concurrency", type=int, default=16)
    p.add_argument("--long-words", type=int, default=4400,
                   help="words of a long prompt (~1.6 tokens a word; the model takes 32,768)")
    p.add_argument("--long-max-tokens", type=int, default=16)
    p.add_argument("--kv-bytes-per-token", type=int, default=1024,
                   help="modelled KV size on both mockers (genset sends dummy payloads this big)")
    p.add_argument("--kv-transfer-bandwidth", type=float, default=0.2,
                   help="modelled KV link, GB/s, on both mockers")
    p.add_argument("--kv-payload", choices=("dummy", "none"), default="none",
                   help="genset's mocker: hashes only, paced to the modelled link (as Dynamo's "
                        "mocker, which moves no bytes, and genset's own offload path, which "
                        "moves a placeholder), or dummy KV payloads of the modelled size")
    p.add_argument("--ttft-slo", type=float, default=2.0, help="s")
    p.add_argument("--itl-slo", type=float, default=0.050, help="mean ITL, s")
    p.add_argument("--run-timeout", type=float, default=400.0, help="s, each load.py")
    p.add_argument("--report", nargs="+", metavar="DIR", default=None,
                   help="run nothing: print the table of the runs (row.json) under these "
                        "--out-dir folders, configurations in --configs order")
    args = p.parse_args()
    if args.report:
        return report(args)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        p.error(f"unknown --configs {bad}; known: {', '.join(CONFIGS)}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {c: [] for c in configs}
    for rep in range(1, args.reps + 1):
        for config in configs:
            run_dir = out_dir / f"r{rep}-{config.replace(':', '-')}"
            run_dir.mkdir(parents=True, exist_ok=True)
            cls = GensetStack if config.startswith("genset:") else DynamoStack
            system = cls(config, args, run_dir)
            started = time.strftime("%H:%M:%S", time.gmtime())
            try:
                system.start()
                row = measure(system, args, run_dir)
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                print(f"round {rep} {config}: FAILED: {exc}", file=sys.stderr, flush=True)
                continue
            finally:
                system.stop()
            row.update(rep=rep, started_utc=started)
            (run_dir / "row.json").write_text(json.dumps(row, indent=1))
            results[config].append(row)
            print(f"round {rep} {config} ({started} UTC): goodput {row['goodput']:.3f} "
                  f"decode ITL p99 {row['decode']['itl_p99_ms']} ms, long TTFT p50 "
                  f"{row['long']['ttft_p50_ms']} ms, resume gap p50/p99 "
                  f"{row.get('resume', {}).get('total', {}).get('p50')}/"
                  f"{row.get('resume', {}).get('total', {}).get('p99')} ms, wall {row['wall_s']} s, "
                  f"load {row['loadavg_end']}", file=sys.stderr, flush=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    resume = resume_table(results)
    if resume:
        print("\nResume gap after a remote first token (decode workers' histogram, ms):\n")
        print(resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
