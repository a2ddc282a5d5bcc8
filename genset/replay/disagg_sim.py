"""Disaggregated serving in simulated time: `genset replay --prefill-workers P
--decode-workers D --disagg auto|always|never`.

The same pieces as the live system, driven by the trace instead of the bus: the router
(`RouterCore`, over the decode pool only, as live routers never pick prefill workers), the
per-request decision (`genset.disagg.decide`, with each decode worker's cached prefix and
load and each prefill worker's cached prefix and queue, read from their cores: the view a
live decode worker builds from the bus, without its lag), mocker cores for every worker, and
the modelled KV transfer time (`genset.disagg.sim`: full blocks the decode worker lacks x
block_size x --kv-bytes-per-token at --kv-transfer-bandwidth GB/s).

A request decided remote runs on its prefill worker with max_tokens 1; its first token is its
TTFT (streamed at once, as live); its KV reaches the decode worker a transfer time later,
where it is imported (`KvImport`) and the request continues after its first token
(`resume_token_ids`), computing only the prompt's last partial block. Not modelled: the
import's own cost on the decode worker, the NATS/TCP protocol overhead (beyond the
bandwidth), the live view's lag.

Metrics as `genset.replay.simulate` (hit rate: prompt tokens found cached where the prompt was
computed), SLO attainment and goodput from `genset.replay.metrics`, plus the decisions by
mode and reason and the transfers.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import heapq
import math
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from genset.disagg.decision import (
    LOCAL,
    POLICIES,
    POLICY_AUTO,
    SINGLE_TOKEN,
    CostModel,
    Decision,
    DecodeState,
    PrefillState,
    SpareGate,
    decide,
)
from genset.disagg.sim import GB, DisaggSimConfig, transfer_blocks
from genset.replay.cli_args import in_range, non_negative, positive
from genset.replay.metrics import DEFAULT_SLA_ITL_MS, DEFAULT_SLA_TTFT_MS, sla_summary
from genset.replay.simulate import MAX_DECODE_RUN, _HashCache
from genset.replay.trace import TraceRequest
from genset.routing.api import policy_name
from genset.routing.core import RouterConfig, RouterCore

DEFAULT_KV_BYTES_PER_TOKEN = 131072  # Llama-3-8B-shaped, bf16 (as the offload replay)
DEFAULT_BANDWIDTH_GB_S = 25.0  # a fast inter-node link (e.g. one 200 Gb/s NIC)
STEP_EWMA_ALPHA = 0.2  # as the live engine driver's step-time EWMA (load reports)


MAX_FLEET = 1024  # workers a replay holds in memory (`genset replay --workers` has the same)
# Finite ranges of the replay's speed ratios (--speedup-ratio, --arrival-speedup) and of its
# copy / transfer rates in GB/s (0 = free). Past them a figure is no measurement: at 1e-300 a
# step, an arrival gap or a copy took ~1e300 ms and the replay printed TTFTs of 300 digits;
# past 1e6 a step or a copy is under a nanosecond and every figure rounds to 0. A rate as slow
# as 1e-6 GB/s (1 KB/s: a 64-token block of a 7B model in ~2 min) is still a finite figure.
RATIO_RANGE = (1e-3, 1_000_000)
GBPS_RANGE = (1e-6, 1_000_000)


@dataclass
class DisaggReplayConfig:
    prefill_workers: int = 2
    decode_workers: int = 6
    disagg: str = POLICY_AUTO
    block_size: int = 64
    kv_blocks: int = 4688
    max_num_seqs: int = 256
    max_batched_tokens: int = 8192
    arrival_speedup: float = 1.0
    speedup_ratio: float = 1.0
    seed: int = 0
    kv_bytes_per_token: int = DEFAULT_KV_BYTES_PER_TOKEN
    kv_transfer_bandwidth_gb_s: float = DEFAULT_BANDWIDTH_GB_S
    sla_ttft_ms: float = DEFAULT_SLA_TTFT_MS
    sla_itl_ms: float = DEFAULT_SLA_ITL_MS
    slowdown_weight: float = 1.0
    max_prefill_queue_ms: float = 2000.0
    dynamo_exact_timing: bool = True
    # every decode worker (role `both`) may also prefill for the others: the decision's
    # candidates are the peers (and the prefill workers, if any), each priced with the stall
    # of its own decoders
    peer_prefill: bool = False
    # CostModel.spare_budget_ms with a SpareGate per decode worker (0: off, ties stay where
    # the router put them; the live decode worker's default is 1,000)
    spare_budget_ms: float = 0.0
    # a remote prefill's partial last block reaches the decode worker with its first token
    # from a prefill worker, as live (`KvImport.tail`): the resumed request's first step
    # there is a decode step. False: that step computes the block (before session 9)
    ship_tail: bool = True
    policy_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.decode_workers < 1:
            raise ValueError(f"--decode-workers must be >= 1, got {self.decode_workers}")
        if self.prefill_workers < 0:
            raise ValueError(f"--prefill-workers must be >= 0, got {self.prefill_workers}")
        if self.prefill_workers + self.decode_workers > MAX_FLEET:
            raise ValueError(f"--prefill-workers + --decode-workers must be at most {MAX_FLEET}, "
                             f"got {self.prefill_workers + self.decode_workers}")
        if self.disagg not in POLICIES:
            raise ValueError(f"--disagg must be one of {', '.join(POLICIES)}, got {self.disagg!r}")
        bw = self.kv_transfer_bandwidth_gb_s
        if not bw >= 0:  # nan passed the check below: IndexError
            raise ValueError(f"--kv-transfer-bandwidth must be >= 0 GB/s, got {bw}")
        lo, hi = GBPS_RANGE
        if bw and not lo <= bw <= hi:
            raise ValueError(f"--kv-transfer-bandwidth must be 0 (free) or in [{lo:g}, {hi:,}] "
                             f"GB/s, got {bw:g}")
        if not (self.spare_budget_ms >= 0 and math.isfinite(self.spare_budget_ms)):
            raise ValueError(f"--disagg-spare-budget-ms must be a finite number >= 0, got "
                             f"{self.spare_budget_ms}")
        DisaggSimConfig(kv_bytes_per_token=self.kv_bytes_per_token,
                        kv_transfer_bandwidth_gb_s=self.kv_transfer_bandwidth_gb_s)


@dataclass
class _Req:
    trace: TraceRequest
    arrival_ms: float
    decode: int = -1
    prefill: int | None = None  # the prefill worker, when remote
    first_token_ms: float | None = None
    last_token_ms: float | None = None
    cached_tokens: int = 0
    outputs: int = 0
    first_token: int = 0
    hashes: list[int] | None = None
    tokens: list[int] | None = None
    decode_cached: int = 0  # blocks the decode worker held at the decision
    transfer_ms: float = 0.0


class _Worker:
    __slots__ = ("busy", "core", "index", "lent", "prefill", "run_ends", "served", "step_end",
                 "step_ms", "token")

    def __init__(self, index: int, core, prefill: bool) -> None:
        self.index = index
        self.core = core
        self.prefill = prefill
        self.busy = False
        self.step_end = 0.0
        self.token = -1
        self.run_ends: list[float] | None = None
        self.served = 0
        self.lent = 0  # remote prefills it ran for a peer (peer_prefill)
        self.step_ms = 0.0  # EWMA of its step times, as a live worker's load report has it

    def observe_step(self, ms: float) -> None:
        self.step_ms = ms if self.step_ms == 0.0 else self.step_ms + STEP_EWMA_ALPHA * (
            ms - self.step_ms)


def _mocker(cfg: DisaggReplayConfig, worker_id: int):
    from genset.engines.mocker import MockerConfig, MockerCore, PolynomialTiming

    return MockerCore(MockerConfig(
        block_size=cfg.block_size, num_blocks=cfg.kv_blocks,
        max_batch_tokens=cfg.max_batched_tokens, max_running=cfg.max_num_seqs,
        context_length=1 << 30,
        timing=PolynomialTiming(speedup_ratio=cfg.speedup_ratio,
                                dynamo_exact=cfg.dynamo_exact_timing),
    ), worker_id=worker_id)


def _nearest_rank(sorted_vals: list[float], q: float) -> float:
    return sorted_vals[round(q * (len(sorted_vals) - 1))] if sorted_vals else float("nan")


def run_disagg_replay(trace: list[TraceRequest], policy: str, cfg: DisaggReplayConfig) -> dict:
    from genset.engines.mocker import PolynomialTiming
    from genset.engines.types import EngineRequest, KvBlockData, KvImport
    from proto.generate import SamplingParams, StopConditions

    policy = policy_name(policy)
    now = [0.0]
    router = RouterCore(RouterConfig(policy=policy, block_size=cfg.block_size, seed=cfg.seed,
                                     policy_options=dict(cfg.policy_options), router_id=1),
                        clock=lambda: now[0])
    D, P = cfg.decode_workers, cfg.prefill_workers
    workers = [_Worker(i, _mocker(cfg, i), prefill=i >= D) for i in range(D + P)]
    for w in workers[:D]:
        router.add_worker(w.index, model="replay", block_size=cfg.block_size,
                          kv_blocks=cfg.kv_blocks, max_batch_tokens=cfg.max_batched_tokens)
    sim = DisaggSimConfig(role="decode", kv_bytes_per_token=cfg.kv_bytes_per_token,
                          kv_transfer_bandwidth_gb_s=cfg.kv_transfer_bandwidth_gb_s)
    timing = PolynomialTiming(speedup_ratio=cfg.speedup_ratio)
    bandwidth = (cfg.kv_transfer_bandwidth_gb_s * GB) if cfg.kv_transfer_bandwidth_gb_s else 1e15
    model = CostModel(block_size=cfg.block_size, kv_bytes_per_token=cfg.kv_bytes_per_token,
                      prefill_ms=lambda tokens, running: timing.prefill_ms(tokens),
                      bandwidth_bytes_per_s=bandwidth, transfer_setup_ms=0.0,
                      slowdown_weight=cfg.slowdown_weight,
                      max_prefill_queue_ms=cfg.max_prefill_queue_ms,
                      itl_target_ms=cfg.sla_itl_ms, ttft_target_ms=cfg.sla_ttft_ms,
                      spare_budget_ms=cfg.spare_budget_ms)
    # one per decode worker, as live
    gates = [SpareGate(cfg.max_prefill_queue_ms, cfg.spare_budget_ms) for _ in range(D)]
    hash_cache = _HashCache(cfg.block_size)
    t0 = trace[0].arrival_ms
    reqs = [_Req(t, (t.arrival_ms - t0) / cfg.arrival_speedup) for t in trace]
    by_id: dict[str, _Req] = {}
    decisions: Counter[tuple[str, str]] = Counter()
    transfer_bytes = 0
    transfer_ms_total = 0.0
    # events: (time, seq, kind, payload); kind 0 = a worker's step end, 1 = a transfer done
    events: list[tuple[float, int, int, object]] = []
    pending: dict[int, tuple[list, object]] = {}
    remote_prefilling: set[str] = set()  # requests whose remote prefill has not answered yet
    seq = 0
    wall0 = time.perf_counter()

    def push(w: _Worker, end: float) -> None:
        nonlocal seq
        seq += 1
        w.token = seq
        w.step_end = end
        heapq.heappush(events, (end, seq, 0, w.index))

    def start_step(w: _Worker, t: float) -> None:
        durs = w.core.decode_run(MAX_DECODE_RUN)
        if durs:
            ends = []
            e = t
            for d in durs:
                e = e + max(d, 1e-6)
                ends.append(e)
                w.observe_step(d)
            w.run_ends = ends
            w.busy = True
            push(w, e)
            return
        outputs, dur = w.core.step(t)
        batch = w.core.take_kv_batch(int(t + dur))
        w.observe_step(dur)
        w.busy = True
        pending[w.index] = (outputs, batch)
        push(w, t + max(dur, 1e-6))

    def wake(w: _Worker, t: float) -> None:
        if not w.busy:
            start_step(w, t)
        elif w.run_ends is not None:
            ends = w.run_ends  # a decode run: the step under way at t is its last
            j = bisect.bisect_right(ends, t)
            if j < len(ends) - 1:
                del ends[j + 1:]
                push(w, ends[j])

    def finish_run(w: _Worker, t: float) -> None:
        n_steps = len(w.run_ends)
        w.run_ends = None
        w.busy = False
        for rid in w.core.commit_decode_run(n_steps, t):
            r = by_id.get(rid)
            if r is not None:
                r.last_token_ms = t
                r.outputs += n_steps
        start_step(w, t)

    def finish_step(w: _Worker, t: float) -> None:
        nonlocal transfer_bytes, transfer_ms_total, seq
        outputs, batch = pending.pop(w.index)
        w.busy = False
        if batch is not None and batch.events and not w.prefill:
            router.on_kv_batch(batch)
        for out in outputs:
            rid = out.request_id
            if rid in remote_prefilling:  # its first token: streamed now, its KV sent now
                remote_prefilling.discard(rid)
                r = by_id[rid]
                r.first_token_ms = r.last_token_ms = t
                gates[r.decode].first_token(t - r.arrival_ms, t)
                r.cached_tokens = out.cached_tokens
                r.outputs = 1
                r.first_token = out.token_ids[0]
                router.on_first_token(rid)
                blocks = transfer_blocks(r.trace.input_length, cfg.block_size, r.decode_cached)
                ms = sim.transfer_ms(r.trace.input_length, cfg.block_size, r.decode_cached)
                transfer_bytes += blocks * cfg.block_size * cfg.kv_bytes_per_token
                transfer_ms_total += ms
                r.transfer_ms = ms
                seq += 1
                heapq.heappush(events, (t + ms, seq, 1, rid))
                continue
            r = by_id.get(rid)
            if r is None:
                continue
            if r.first_token_ms is None:
                r.first_token_ms = t
                r.cached_tokens = out.cached_tokens
                router.on_first_token(rid)
            r.last_token_ms = t
            r.outputs += len(out.token_ids)
            if out.finish_reason is not None:
                router.on_done(rid)
        if w.core.has_work():
            start_step(w, t)

    def kv_arrived(rid: str, t: float) -> None:
        """A remote prefill's KV reached its decode worker: the request continues there."""
        r = by_id[rid]
        w = workers[r.decode]
        hashes = r.hashes or []
        first = r.decode_cached
        # the prompt's partial last block travels with the first token from a prefill worker,
        # as live (`KvImport.tail`); not from a lending peer (`peer_prefill`), which no live
        # worker does yet: its rows stay as they were (8 peers at 3x: 97.8 % / 300 ms as
        # before, 97.6 / 308 with the tail shipped there too; simulated time, 2026-12-06)
        ship = cfg.ship_tail and r.prefill is not None and workers[r.prefill].prefill
        kv = KvImport([KvBlockData(h) for h in hashes[first:]],
                      parent_hash=hashes[first - 1] if first else None,
                      tail_tokens=len(r.tokens) % cfg.block_size if ship else 0)
        w.core.add_request(EngineRequest(
            rid, r.tokens, SamplingParams(temperature=0.0),
            StopConditions(max_tokens=r.trace.output_length, ignore_eos=True), kv_import=kv,
            resume_token_ids=[r.first_token]))
        w.core.scheduler.requests[rid].block_hashes = list(hashes)
        r.tokens = None
        wake(w, t)

    itl_target = cfg.sla_itl_ms

    def slack(w: _Worker, t: float) -> tuple[float, ...]:
        """Each decoding sequence's ITL slack on `w` (what a live engine would report: its
        requests' max_tokens, outputs so far and first-token times, and its step time)."""
        out = []
        step = w.step_ms
        for seq in w.core.scheduler.running:
            n = seq.max_tokens
            if n <= 1 or seq.num_output < 1:
                continue  # still prefilling (TTFT-bound) or nothing to decode
            r = by_id.get(seq.request_id)
            if r is None or r.first_token_ms is None:
                continue
            out.append(itl_target * (n - 1) - (t - r.first_token_ms)
                       - (n - seq.num_output) * step)
        out.sort()
        return tuple(out)

    def states(hashes: list[int], decode_index: int, t: float) -> list[PrefillState]:
        out = []
        for w in (workers if cfg.peer_prefill else workers[D:]):
            if w.index == decode_index:
                continue
            sched = w.core.scheduler
            running = len(sched.running)
            out.append(PrefillState(
                worker_id=w.index, cached_blocks=w.core.cached_blocks(hashes),
                queued_prefill_tokens=sched.waiting_prefill_tokens(),
                running=running, saturated=len(sched.waiting) >= cfg.max_num_seqs,
                decoding=0 if w.prefill else running, step_ms=w.step_ms,
                slack_ms=None if w.prefill else slack(w, t), lends=not w.prefill))
        return out

    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        i = 0
        n = len(reqs)
        while i < n or events:
            t_arr = reqs[i].arrival_ms if i < n else math.inf
            if events and events[0][0] <= t_arr:
                t, sq, kind, what = heapq.heappop(events)
                now[0] = t
                if kind == 1:
                    kv_arrived(what, t)
                    continue
                w = workers[what]
                if sq != w.token:
                    continue  # the end of a decode run that was cut short
                if w.run_ends is not None:
                    finish_run(w, t)
                else:
                    finish_step(w, t)
                continue
            r = reqs[i]
            i += 1
            now[0] = t_arr
            rid = f"r{r.trace.index}"
            toks = r.trace.token_array()
            token_bytes = toks.tobytes()
            hashes = hash_cache.hashes(r.trace, token_bytes)
            routed = router.route_tokens(rid, token_bytes, r.trace.input_length,
                                         r.trace.output_length,
                                         hashes_by_block_size={cfg.block_size: hashes})
            r.decode = routed.worker_id
            by_id[rid] = r
            dw = workers[r.decode]
            dsched = dw.core.scheduler
            if r.trace.output_length <= 1:
                decision = Decision(mode=LOCAL, reason=SINGLE_TOKEN)
            else:
                cached = dw.core.cached_blocks(hashes)
                decision = decide(
                    r.trace.input_length,
                    DecodeState(worker_id=dw.index, cached_blocks=cached,
                                running=len(dsched.running),
                                queued_prefill_tokens=dsched.waiting_prefill_tokens(),
                                step_ms=dw.step_ms, slack_ms=slack(dw, t_arr)),
                    states(hashes, dw.index, t_arr), model, policy=cfg.disagg,
                    max_tokens=r.trace.output_length, pool_spare=gates[dw.index].spare(t_arr))
                gates[dw.index].note(decision, t_arr)
                r.decode_cached = cached
            decisions[(decision.mode, decision.reason)] += 1
            stop = StopConditions(max_tokens=r.trace.output_length, ignore_eos=True)
            if decision.remote and decision.prefill_worker_id is not None:
                pw = workers[decision.prefill_worker_id]
                r.prefill = pw.index
                remote_prefilling.add(rid)
                r.hashes = hashes
                r.tokens = toks.tolist()
                if pw.prefill:
                    pw.served += 1
                else:
                    pw.lent += 1
                pw.core.add_request(EngineRequest(
                    rid, r.tokens, SamplingParams(temperature=0.0),
                    StopConditions(max_tokens=1, ignore_eos=True)))
                pw.core.scheduler.requests[rid].block_hashes = list(hashes)
                wake(pw, t_arr)
                continue
            dw.served += 1
            dw.core.add_request(EngineRequest(rid, toks.tolist(), SamplingParams(temperature=0.0),
                                              stop))
            dsched.requests[rid].block_hashes = list(hashes)
            wake(dw, t_arr)
    finally:
        if gc_was_enabled:
            gc.enable()
    wall = time.perf_counter() - wall0
    return summarize(reqs, cfg, policy, wall, decisions, transfer_bytes, transfer_ms_total,
                     workers)


def summarize(reqs: list[_Req], cfg: DisaggReplayConfig, policy: str, wall_s: float,
              decisions: Counter, transfer_bytes: int, transfer_ms_total: float,
              workers: list[_Worker]) -> dict:
    done = [r for r in reqs if r.first_token_ms is not None]
    ttft = sorted(r.first_token_ms - r.arrival_ms for r in done)
    tin = sum(r.trace.input_length for r in done)
    reused = sum(r.cached_tokens for r in done)
    multi = [r for r in done if r.trace.output_length > 1 and r.last_token_ms is not None]
    itl_num = sum(r.last_token_ms - r.first_token_ms for r in multi)
    itl_den = sum(r.trace.output_length - 1 for r in multi)
    start = min(r.arrival_ms for r in reqs)
    end = max((r.last_token_ms for r in done if r.last_token_ms is not None), default=start)
    duration_s = (end - start) / 1000.0
    remote = sum(v for (mode, _), v in decisions.items() if mode != LOCAL)
    D = cfg.decode_workers
    return {
        "policy": policy,
        "mode": cfg.disagg if cfg.prefill_workers or cfg.peer_prefill else "aggregated",
        "peer_prefill": cfg.peer_prefill,
        "prefill_workers": cfg.prefill_workers,
        "decode_workers": D,
        "requests": len(reqs),
        "completed": len(done),
        "hit_rate": reused / tin if tin else 0.0,
        "ttft_mean_ms": statistics.fmean(ttft) if ttft else float("nan"),
        "ttft_p50_ms": _nearest_rank(ttft, 0.5),
        "ttft_p90_ms": _nearest_rank(ttft, 0.9),
        "ttft_p99_ms": _nearest_rank(ttft, 0.99),
        "itl_mean_ms": itl_num / itl_den if itl_den else float("nan"),
        **sla_summary(done, cfg.sla_ttft_ms, cfg.sla_itl_ms, duration_s),
        "remote_prefills": remote,
        "remote_share": remote / len(reqs) if reqs else 0.0,
        "decisions": {f"{mode}/{reason}": v for (mode, reason), v in sorted(decisions.items())},
        "transfer_gb": transfer_bytes / GB,
        "transfer_ms_mean": transfer_ms_total / remote if remote else 0.0,
        "requests_per_decode_worker": [w.served for w in workers[:D]],
        "prefills_per_prefill_worker": [w.served for w in workers[D:]],
        "prefills_lent_per_decode_worker": [w.lent for w in workers[:D]],
        "duration_s": duration_s,
        "wall_s": wall_s,
        "settings": {
            "block_size": cfg.block_size, "kv_blocks": cfg.kv_blocks,
            "max_num_seqs": cfg.max_num_seqs, "max_batched_tokens": cfg.max_batched_tokens,
            "arrival_speedup": cfg.arrival_speedup, "kv_bytes_per_token": cfg.kv_bytes_per_token,
            "kv_transfer_bandwidth_gb_s": cfg.kv_transfer_bandwidth_gb_s,
        },
    }


# ---- the command line (genset replay calls these; few call sites in __main__) -----------------


def add_args(p: argparse.ArgumentParser) -> None:
    """`genset replay`'s disaggregation flags (and the SLA flags when the parser lacks them)."""
    g = p.add_argument_group("disaggregated serving (genset.replay.disagg_sim)")
    # bounded here, as --workers is: a bad value is argparse's error naming the flag, before the
    # trace is read (DisaggReplayConfig checks them again, and their sum, for other callers)
    g.add_argument("--prefill-workers", type=non_negative(int, MAX_FLEET), default=None,
                   metavar="P",
                   help="prefill workers: replay disaggregated (with --decode-workers)")
    g.add_argument("--decode-workers", type=positive(int, MAX_FLEET), default=None, metavar="D",
                   help="decode workers (default: --workers)")
    g.add_argument("--disagg", choices=POLICIES, default=None,
                   help="auto: remote prefill when the cost model says it pays; always; never")
    g.add_argument("--peer-prefill", action="store_true", default=None,
                   help="decode workers (role both) also prefill for each other when the "
                        "cost model says it pays (with or without --prefill-workers)")
    g.add_argument("--disagg-spare-budget-ms", type=non_negative(float), default=0.0,
                   metavar="MS",
                   help="--disagg auto: a prompt that stalls nobody more remote than local goes "
                        "to a prefill worker when the pool has room to spare and its first "
                        "token is predicted within this (0: off)")
    g.add_argument("--kv-transfer-bandwidth", type=in_range(float, GBPS_RANGE, allow_zero=True),
                   default=DEFAULT_BANDWIDTH_GB_S,
                   metavar="GB/S", help="KV transfer bandwidth between workers (0: free)")
    have = p._option_string_actions  # flags another part of the replay may already define
    if "--kv-bytes-per-token" not in have:
        g.add_argument("--kv-bytes-per-token", type=non_negative(int),
                       default=DEFAULT_KV_BYTES_PER_TOKEN, help="KV bytes of one token")
    if "--sla-ttft-ms" not in have:
        g.add_argument("--sla-ttft-ms", type=positive(float), default=DEFAULT_SLA_TTFT_MS,
                       help="a request meets its SLO when its TTFT is at most this")
    if "--sla-itl-ms" not in have:
        g.add_argument("--sla-itl-ms", type=positive(float), default=DEFAULT_SLA_ITL_MS,
                       help="... and its mean inter-token latency at most this")


def wanted(args: argparse.Namespace) -> bool:
    """Whether the command line asks for a disaggregated replay."""
    return (args.prefill_workers is not None or args.decode_workers is not None
            or args.disagg is not None or bool(args.peer_prefill))


def main_from_args(args: argparse.Namespace, trace: list[TraceRequest],
                   policies: list[str]) -> int:
    import json

    try:
        cfg = DisaggReplayConfig(
            prefill_workers=args.prefill_workers or 0,
            decode_workers=(args.decode_workers if args.decode_workers is not None
                            else args.workers),
            disagg=args.disagg or POLICY_AUTO, block_size=args.block_size,
            kv_blocks=args.kv_blocks, max_num_seqs=args.max_num_seqs,
            max_batched_tokens=args.max_batched_tokens, arrival_speedup=args.arrival_speedup,
            speedup_ratio=args.speedup_ratio, seed=args.seed,
            kv_bytes_per_token=args.kv_bytes_per_token,
            kv_transfer_bandwidth_gb_s=args.kv_transfer_bandwidth,
            sla_ttft_ms=args.sla_ttft_ms, sla_itl_ms=args.sla_itl_ms,
            peer_prefill=bool(args.peer_prefill), spare_budget_ms=args.disagg_spare_budget_ms)
        results = [run_disagg_replay(trace, name, cfg) for name in policies]
    except ValueError as exc:
        print(f"genset replay: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else {r["policy"]: r for r in results}))
        return 0
    peers = " (peers prefill for each other)" if cfg.peer_prefill else ""
    print(f"{len(trace)} requests, {cfg.prefill_workers} prefill + {cfg.decode_workers} decode "
          f"workers{peers} x {cfg.kv_blocks} blocks of {cfg.block_size}, --disagg {cfg.disagg}, "
          f"arrival speedup {cfg.arrival_speedup:g}, KV {cfg.kv_bytes_per_token} B/token at "
          f"{cfg.kv_transfer_bandwidth_gb_s:g} GB/s")
    print(f"{'policy':<12}{'hit %':>7}{'TTFT mean':>11}{'p90':>8}{'ITL':>7}{'SLA %':>7}"
          f"{'remote %':>10}{'wall s':>8}")
    for r in results:
        print(f"{r['policy']:<12}{r['hit_rate'] * 100:>7.1f}{r['ttft_mean_ms']:>11.0f}"
              f"{r['ttft_p90_ms']:>8.0f}{r['itl_mean_ms']:>7.2f}{r['sla_attainment'] * 100:>7.1f}"
              f"{r['remote_share'] * 100:>10.1f}{r['wall_s']:>8.1f}")
    return 0
