"""Live KV onboarding on a torch worker: TTFT with the offload store (onboard) vs without it
(recompute), when the prompts' working set is several times the worker's KV pool.

Starts its own loopback nats-server and etcd. Each repetition runs one mode on a fresh worker
(a `WorkerHost` on the torch engine, in this process, its engine stepping in its own thread,
a small pool of `--kv-blocks`) and, in mode "on", a fresh `genset offload` process (RAM tier
large enough for the whole working set, no disk tier) found through etcd by the worker's
`OffloadHook` (genset.worker.offload_hook), as `genset worker --offload on` would:

- on: evicted blocks are written behind to the store; a prompt that comes back onboards its
  blocks (one batched lookup within the hook's deadline, then the engine's import) and
  computes only the last partial block;
- off: the worker has no hook; a prompt that comes back is computed again.

Workload: `--prompts` distinct random prompts of `--prompt-tokens` tokens, sent one at a
time, round-robin, for `--rounds` rounds; greedy, `--max-tokens` tokens each. With the
defaults the working set (8 x 64 blocks) is 4x the pool (128 blocks), so every prompt has left
the pool when it comes back (LRU) and the first round is cold in both modes. Repetitions
alternate the modes (on/off, then off/on, ...).

Reported, over the rounds after the first (all repetitions pooled, and the per-repetition
p50s):

- TTFT: request sent -> first token frame received, p50 / p90 (ms);
- store hits: the hook's counts (lookups, hits, misses, onboarded blocks, lookup timeouts);
- onboarding throughput: payload bytes onboarded / time in the store lookup (timed around
  `OffloadClient.lookup`) plus the engine's import (timed around the core's `import_kv` on
  the engine thread: payload decode + copy into the pool), in GB/s (1e9), against a raw copy
  of the same bytes in the same run: (a) one in-memory copy (`b"".join` of one request's
  onboarded payloads), (b) the same bytes through a loopback TCP socket to a thread.

    .venv/bin/python bench/bench_offload_live.py                     # ~30-60 s
    .venv/bin/python bench/bench_offload_live.py --reps 1 --rounds 3 --prompts 4 --kv-blocks 64

Wall-clock numbers on shared cores are noisy: compare modes from one run (they alternate).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import pct
from bench_offload_store import Store

import proto
from genset.runtime.bus import Bus
from genset.runtime.discovery import Discovery
from genset.runtime.infra import EtcdServer, NatsServer
from genset.runtime.logging import configure_logging
from genset.runtime.metrics import Metrics
from genset.worker import HostConfig, WorkerHost
from genset.worker.offload_hook import OffloadHook, OffloadHookConfig, recompute_ms_per_token

BLOCK = 16
MODEL = "m"


class Timings:
    """What one repetition measured around the onboarding path (one request at a time, so
    lookups and imports pair up in order)."""

    def __init__(self) -> None:
        self.lookups: list[tuple[float, int, int]] = []  # (seconds, blocks, payload bytes)
        self.imports: list[tuple[float, int]] = []  # (seconds, payload bytes)
        self.last_run: list[bytes] = []  # the payloads of the latest hit (for the raw copy)


def instrument(host: WorkerHost, hook: OffloadHook, t: Timings) -> None:
    """Time the store lookup and the engine's import (bench-side wrappers; nothing else
    changes)."""
    client = hook.client
    real_lookup = client.lookup

    async def lookup(*a, **kw):
        t0 = time.perf_counter()
        run = await real_lookup(*a, **kw)
        t.lookups.append((time.perf_counter() - t0, len(run), sum(len(b.data) for b in run)))
        if run:
            t.last_run = [b.data for b in run]
        return run

    client.lookup = lookup
    core = host.engine.core
    real_import = core.import_kv

    def import_kv(kv, pin_for=None):  # on the engine thread
        t0 = time.perf_counter()
        n = real_import(kv, pin_for=pin_for)
        t.imports.append((time.perf_counter() - t0, sum(len(b.data) for b in kv.blocks)))
        return n

    core.import_kv = import_kv


async def make_worker(bus, disc, ns: str, mode: str, args) -> tuple[WorkerHost, OffloadHook | None]:
    from genset.engines.torch.engine import TorchEngine

    wid = int(uuid.uuid4().int & ((1 << 63) - 1)) or 1
    metrics = Metrics(process_metrics=False)
    engine = TorchEngine(args.model, worker_id=wid, num_blocks=args.kv_blocks, block_size=BLOCK,
                         device=args.device)
    hook = None
    if mode == "on":
        # the hook's shipped settings but the deadline; mode "auto" (not "on") only so no
        # warning is logged when it starts a moment before the store's etcd record is read
        hook = OffloadHook(discovery=disc, metrics=metrics, config=OffloadHookConfig(
            deadline_s=args.deadline_ms / 1e3))
    host = WorkerHost(engine, bus=bus, discovery=disc, instance_id=wid, metrics=metrics,
                      hooks=hook, config=HostConfig(namespace=ns, model=MODEL, role="both"))
    await host.start()
    return host, hook


async def ttft(bus, host: WorkerHost, tokens: list[int], max_tokens: int) -> tuple[float, int]:
    """(ms from send to the first token frame, cached tokens the final usage reports)."""
    req = proto.GenerateRequest(request_id=uuid.uuid4().hex, model=MODEL,
                                token_ids=proto.pack_tokens(tokens),
                                sampling=proto.SamplingParams(temperature=0.0),
                                stop=proto.StopConditions(max_tokens=max_tokens, ignore_eos=True))
    t0 = time.perf_counter()
    stream = await bus.stream_request(host.generate_subject, req, timeout=300)
    first = None
    cached = 0
    async for chunk in stream:
        if first is None and chunk.token_ids:
            first = time.perf_counter()
        if chunk.final:
            if chunk.error is not None:
                raise RuntimeError(f"request failed: {chunk.error}")
            cached = chunk.usage.cached_tokens if chunk.usage is not None else 0
    if first is None:
        raise RuntimeError("no token came back")
    return (first - t0) * 1e3, cached


def memcpy_s(payloads: list[bytes], reps: int) -> float:
    """Median seconds of one in-memory copy of `payloads` (joined into one new buffer)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        b"".join(payloads)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def tcp_copy_s(payloads: list[bytes], reps: int) -> float:
    """Median seconds to push `payloads` through a loopback TCP connection to a thread that
    reads them into a buffer and answers one byte when it has them all."""
    total = sum(len(p) for p in payloads)
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            buf = bytearray(total)
            view = memoryview(buf)
            for _ in range(reps):
                got = 0
                while got < total:
                    n = conn.recv_into(view[got:])
                    if not n:
                        return
                    got += n
                conn.sendall(b"k")

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    times = []
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(reps):
            t0 = time.perf_counter()
            for p in payloads:
                c.sendall(p)
            if c.recv(1) != b"k":
                raise RuntimeError("loopback copy: the reader went away")
            times.append(time.perf_counter() - t0)
    th.join(10)
    srv.close()
    return statistics.median(times)


async def run_rep(mode: str, rep: int, args, nats: NatsServer, etcd: EtcdServer,
                  prompts: list[list[int]], work: Path) -> dict:
    ns = f"bl{uuid.uuid4().hex[:8]}"
    store = None
    if mode == "on":
        ram_gb = 2 * len(prompts) * args.prompt_tokens / BLOCK * (34 << 10) / 2**30
        store = Store(nats.url, etcd.endpoint, ns,
                      ["--offload-ram-gb", f"{max(ram_gb, 0.01):.6f}", "--offload-disk-gb", "0",
                       "--log-level", "warning"], work / f"store-{rep}.log")
    bus = await Bus.connect(nats.url, name=f"bench-w-{rep}", namespace=ns)
    req_bus = await Bus.connect(nats.url, name=f"bench-c-{rep}", namespace=ns)
    disc = await Discovery.connect(etcd.endpoint, ttl=10.0)
    host = None
    t = Timings()
    try:
        if store is not None:
            await store.ready()
        host, hook = await make_worker(bus, disc, ns, mode, args)
        if hook is not None:
            deadline = time.monotonic() + 60
            while not hook.client.instances:  # the store's etcd record seen by the hook
                if time.monotonic() > deadline:
                    raise RuntimeError("the worker did not see the offload store in 60 s")
                await asyncio.sleep(0.05)
            instrument(host, hook, t)
        ttfts: list[float] = []
        cached_tokens = 0
        cold: list[float] = []
        for rnd in range(args.rounds):
            for p in prompts:
                ms, cached = await ttft(req_bus, host, p, args.max_tokens)
                if rnd == 0:
                    cold.append(ms)
                else:
                    ttfts.append(ms)
                    cached_tokens += cached
        out = dict(mode=mode, rep=rep, ttft=ttfts, cold_p50=pct(cold, 0.5),
                   p50=pct(ttfts, 0.5), p90=pct(ttfts, 0.9),
                   cached_share=cached_tokens / (len(ttfts) * args.prompt_tokens),
                   recompute_ms_per_token=recompute_ms_per_token(host.engine.step_log))
        if hook is not None:
            out["counts"] = dict(hook.counts)
            out["lookup_timeouts"] = hook.client.stats.get("lookup_timeouts", 0)
            hits = [x for x in t.lookups if x[1]]
            out["lookup_s"] = sum(x[0] for x in hits)
            out["import_s"] = sum(x[0] for x in t.imports)
            out["bytes"] = sum(x[2] for x in hits)
            out["import_bytes"] = sum(x[1] for x in t.imports)
            out["hit_requests"] = len(hits)
            out["per_req_ms"] = [x[0] * 1e3 for x in hits]
            out["per_import_ms"] = [x[0] * 1e3 for x in t.imports]
            if t.last_run:
                out["raw_bytes"] = sum(len(p) for p in t.last_run)
                out["memcpy_s"] = memcpy_s(t.last_run, 50)
                out["tcp_s"] = await asyncio.to_thread(tcp_copy_s, t.last_run, 20)
        return out
    finally:
        if host is not None:
            await host.close()
        await disc.close()
        await req_bus.close()
        await bus.close()
        if store is not None:
            store.stop()


def gbps(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


def report(rows: list[dict], args, load: tuple[float, float], secs: float, work: Path) -> None:
    ws = len(range(args.prompts)) * (args.prompt_tokens // BLOCK)
    print(f"\ntorch {args.model} on {args.device}, pool {args.kv_blocks} blocks of {BLOCK}, "
          f"working set {ws} blocks ({ws / args.kv_blocks:.1f}x the pool): {args.prompts} prompts "
          f"x {args.prompt_tokens} tokens, {args.rounds} rounds (first one cold, not counted), "
          f"{args.max_tokens} tokens out, {args.reps} reps per mode, hook deadline "
          f"{args.deadline_ms:g} ms")
    print(f"load average before / after: {load[0]:.2f} / {load[1]:.2f}; wall {secs:.0f} s; "
          f"store logs in {work}")
    print(f"\n{'mode':4} | {'TTFT p50':>8} {'p90':>7} | {'per-rep p50s':>34} | "
          f"{'cold p50':>8} | {'cached':>6} | {'prefill ms/tok':>14}")
    for mode in ("off", "on"):
        rs = [r for r in rows if r["mode"] == mode]
        if not rs:
            continue
        all_t = [x for r in rs for x in r["ttft"]]
        reps = ", ".join(f"{r['p50']:.1f}" for r in rs)
        cached = statistics.mean(r["cached_share"] for r in rs)
        # 0 when the step log's recent steps hold no prompt step of >= 256 computed tokens
        # (mode on, once every prompt onboards): shown as n/a
        recs = [r["recompute_ms_per_token"] for r in rs if r["recompute_ms_per_token"] > 0]
        rec = f"{statistics.median(recs):.4f}" if recs else "n/a"
        print(f"{mode:4} | {pct(all_t, 0.5):>8.1f} {pct(all_t, 0.9):>7.1f} | {reps:>34} | "
              f"{statistics.median(r['cold_p50'] for r in rs):>8.1f} | {cached:>6.0%} | "
              f"{rec:>14}")
    on = [r for r in rows if r["mode"] == "on"]
    if not on:
        return
    c = {k: sum(r["counts"][k] for r in on) for k in on[0]["counts"]}
    timeouts = sum(r["lookup_timeouts"] for r in on)
    share = c["hits"] / c["lookups"] if c["lookups"] else float("nan")
    print(f"\nstore (on, all rounds incl. the cold one): lookups {c['lookups']}, hits {c['hits']} "
          f"({share:.0%}), misses {c['misses']}, skipped {c['skipped']}, skipped_slow "
          f"{c['skipped_slow']}, skipped_hint {c.get('skipped_hint', 0)}, errors {c['errors']}, "
          f"lookup timeouts {timeouts}, onboarded blocks {c['onboarded_blocks']}, written blocks {c['written_blocks']}")
    nbytes = sum(r["bytes"] for r in on)
    lk = sum(r["lookup_s"] for r in on)
    im = sum(r["import_s"] for r in on)
    per_req = [x for r in on for x in r["per_req_ms"]]
    per_imp = [x for r in on for x in r["per_import_ms"]]
    hits = sum(r["hit_requests"] for r in on)
    if not hits:
        print("no onboarding happened: no throughput to report")
        return
    print(f"onboarded {nbytes / 1e6:.1f} MB in {hits} requests ({nbytes / hits / 1e6:.2f} MB "
          f"each); per request: lookup p50 {pct(per_req, 0.5):.1f} ms, import p50 "
          f"{pct(per_imp, 0.5):.1f} ms")
    raw = [r for r in on if "raw_bytes" in r]
    mem = statistics.median(gbps(r["raw_bytes"], r["memcpy_s"]) for r in raw)
    tcp = statistics.median(gbps(r["raw_bytes"], r["tcp_s"]) for r in raw)
    rate_all = gbps(nbytes, lk + im)
    rate_lk = gbps(nbytes, lk)
    print(f"\n{'path':44} | {'GB/s':>6} | {'x memcpy':>8} | {'x tcp':>6}")
    for name, v in (("onboarding: lookup + import", rate_all), ("  lookup only (store -> worker)", rate_lk),
                    ("  import only (decode + copy into the pool)", gbps(nbytes, im)),
                    ("raw copy, in memory (b''.join)", mem),
                    ("raw copy, loopback TCP to a thread", tcp)):
        print(f"{name:44} | {v:>6.2f} | {v / mem:>8.3f} | {v / tcp:>6.3f}")


async def main_async(args, work: Path) -> list[dict]:
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(3, 4096) for _ in range(args.prompt_tokens)]
               for _ in range(args.prompts)]
    nats = NatsServer().start()
    etcd = EtcdServer().start()
    rows: list[dict] = []
    try:
        for rep in range(args.reps):
            order = ("on", "off") if rep % 2 == 0 else ("off", "on")
            for mode in order:
                if mode not in args.modes:
                    continue
                r = await run_rep(mode, rep, args, nats, etcd, prompts, work)
                print(f"rep {rep} {mode:3}: TTFT p50 {r['p50']:.1f} ms, p90 {r['p90']:.1f} ms, "
                      f"cold p50 {r['cold_p50']:.1f} ms, cached {r['cached_share']:.0%}"
                      + (f", hits {r['counts']['hits']}/{r['counts']['lookups']}"
                         if "counts" in r else ""), flush=True)
                rows.append(r)
    finally:
        nats.cleanup()
        etcd.cleanup()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=8, help="distinct prompts (round-robin)")
    p.add_argument("--prompt-tokens", type=int, default=1024, help="tokens per prompt")
    p.add_argument("--kv-blocks", type=int, default=128, help="the worker's KV pool, blocks")
    p.add_argument("--rounds", type=int, default=5, help="rounds over the prompts (first: cold)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per mode (alternating)")
    p.add_argument("--max-tokens", type=int, default=4, help="tokens generated per request")
    p.add_argument("--deadline-ms", type=float, default=50.0,
                   help="the hook's lookup deadline (OffloadHookConfig.deadline_s; default: "
                        "its shipped 50 ms)")
    p.add_argument("--modes", default="on,off", help="on, off or on,off")
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--log-level", default="warning",
                   choices=("debug", "info", "warning", "error"), help="this process's log level")
    p.add_argument("--json", type=Path, help="also write the per-repetition rows here")
    a = p.parse_args(argv)
    if min(a.prompts, a.prompt_tokens, a.kv_blocks, a.reps, a.max_tokens) <= 0:
        p.error("--prompts, --prompt-tokens, --kv-blocks, --reps and --max-tokens must be > 0")
    if a.rounds < 2:
        p.error("--rounds must be >= 2 (the first round is cold and not counted)")
    if a.deadline_ms <= 0:
        p.error("--deadline-ms must be > 0")
    a.modes = a.modes.split(",")
    if not a.modes or not set(a.modes) <= {"on", "off"}:
        p.error(f"--modes: use on, off or on,off (got {','.join(a.modes)!r})")
    if a.prompt_tokens // BLOCK > a.kv_blocks // 2:
        p.error(f"--prompt-tokens {a.prompt_tokens} is more than half the pool "
                f"({a.kv_blocks} blocks of {BLOCK}); the hook onboards at most half the pool "
                "for one request")
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    configure_logging("console", a.log_level, service="bench-offload-live")
    load0 = os.getloadavg()[0]
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="gs-offload-live-"))
    rows = asyncio.run(main_async(a, work))
    report(rows, a, (load0, os.getloadavg()[0]), time.monotonic() - t0, work)
    if a.json is not None:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
