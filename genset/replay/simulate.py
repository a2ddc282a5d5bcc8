"""A Mooncake-format trace through the router and N mocker workers in simulated time (no
NATS, no etcd, no sleeping): what `genset replay` runs.

The simulation is event driven. Each worker is a `genset.engines.mocker.MockerCore` (the same
scheduler and block pool as live workers, with the modelled step time); a worker runs one
step at a time, and what a step produced (first tokens, finished requests, KV events) becomes
visible at the step's end. Arrivals are routed by `RouterCore` against the index as it is at
that moment (KV events arrive instantly, as in Dynamo's offline replay), and a request joins
its worker's queue at once (it is admitted at the worker's next step).

Metrics follow Dynamo's replay (peers/dynamo/replay_eval.py) so numbers compare directly:
hit_rate = prompt tokens served from the chosen worker's cache at admission / prompt tokens;
TTFT = first token - arrival; percentiles nearest-rank (sorted[round(q*(n-1))]);
itl_mean = sum(last - first token) / sum(output tokens - 1); load_cov = population stdev /
mean of requests per worker.
"""

from __future__ import annotations

import bisect
import gc
import heapq
import math
import statistics
import time
from dataclasses import dataclass, field

import proto
from genset.replay.metrics import DEFAULT_SLA_ITL_MS, DEFAULT_SLA_TTFT_MS, sla_summary
from genset.replay.offload import OffloadConfig, OffloadSim
from genset.replay.planner_sim import Fleet, PlannerSimConfig
from genset.replay.trace import TRACE_BLOCK, TraceRequest
from genset.routing.api import policy_name
from genset.routing.core import RouterConfig, RouterCore


@dataclass
class ReplayConfig:
    workers: int = 8
    block_size: int = 64
    kv_blocks: int = 4688
    max_num_seqs: int = 256
    max_batched_tokens: int = 8192
    arrival_speedup: float = 1.0
    speedup_ratio: float = 1.0  # mocker step-time divisor
    seed: int = 0
    policy_options: dict = field(default_factory=dict)
    router_replicas: int = 1  # >1: replicas route in turn and share decisions (like live replicas)
    dynamo_exact_timing: bool = True  # step time exactly as Dynamo's replay charges it
    offload: OffloadConfig | None = None  # a KV offload store shared by the workers
    sla_ttft_ms: float = DEFAULT_SLA_TTFT_MS  # a request is good when TTFT <= this ...
    sla_itl_ms: float = DEFAULT_SLA_ITL_MS  # ... and its mean inter-token latency <= this
    planner: PlannerSimConfig | None = None  # None: the fixed `workers`; else they start there


@dataclass
class _Req:
    trace: TraceRequest
    arrival_ms: float
    worker: int = -1
    first_token_ms: float | None = None
    last_token_ms: float | None = None
    cached_tokens: int = 0
    outputs: int = 0
    onboarded_blocks: tuple[int, int, int] = (0, 0, 0)  # offload: (device prefix, RAM, disk)
    # offload's TTFT breakdown: first step with a prompt chunk of it, its prompt steps'
    # compute / copy-out / copy-in ms, and its worker's copy ms between arrival and first
    # token (copies of any step it waited for)
    admit_ms: float | None = None
    own: list | None = None
    copies_at_arrival: tuple[float, float] = (0.0, 0.0)
    copies_waited: tuple[float, float] = (0.0, 0.0)


class _Worker:
    __slots__ = ("busy", "copy_in", "copy_out", "core", "index", "run_ends", "step_end",
                 "token")

    def __init__(self, index: int, core) -> None:
        self.index = index
        self.core = core
        self.copy_out = self.copy_in = 0.0  # ms of this worker's steps spent on KV copies
        self.busy = False
        self.step_end = 0.0
        self.token = -1  # seq of this worker's live entry in the step heap (others are stale)
        self.run_ends: list[float] | None = None  # end times of a run of plain decode steps


# longest run of plain decode steps taken at once (runs end anyway when a block fills)
MAX_DECODE_RUN = 4096


def make_mocker(cfg: ReplayConfig, worker_id: int):
    """A mocker engine core configured like the Dynamo replay settings."""
    from genset.engines.mocker import MockerConfig, MockerCore, PolynomialTiming

    off = cfg.offload if cfg.offload is not None and cfg.offload.enabled else None
    transfers = {} if off is None else off.engine_options()
    return MockerCore(MockerConfig(**transfers,
        block_size=cfg.block_size,
        num_blocks=cfg.kv_blocks,
        max_batch_tokens=cfg.max_batched_tokens,
        max_running=cfg.max_num_seqs,
        context_length=1 << 30,
        timing=PolynomialTiming(speedup_ratio=cfg.speedup_ratio, dynamo_exact=cfg.dynamo_exact_timing),
    ), worker_id=worker_id)


class _HashCache:
    """Engine-block hashes of trace prompts. Because a Mooncake hash id implies its whole
    prefix, the engine blocks inside one full 512-token trace block always hash the same:
    cache them per id, and hash only the cut last block fresh."""

    def __init__(self, block_size: int) -> None:
        from genset.kv.hashing import block_hashes

        self._block_hashes = block_hashes
        self.bs = block_size
        self.per_id: dict[int, list[int]] = {}
        self.exact = TRACE_BLOCK % block_size == 0

    def hashes(self, req: TraceRequest, token_bytes: bytes) -> list[int]:
        if not self.exact:
            return self._block_hashes(token_bytes, self.bs)
        per = TRACE_BLOCK // self.bs
        out: list[int] = []
        n_full_engine_blocks = req.input_length // self.bs
        parent = None
        for j, h in enumerate(req.hash_ids):
            if (j + 1) * per > n_full_engine_blocks:
                start = j * per * self.bs * 4
                end = n_full_engine_blocks * self.bs * 4
                if end > start:
                    out.extend(self._block_hashes(token_bytes[start:end], self.bs, parent))
                break
            got = self.per_id.get(h)
            if got is None:
                start = j * TRACE_BLOCK * 4
                got = self._block_hashes(token_bytes[start:start + TRACE_BLOCK * 4], self.bs, parent)
                self.per_id[h] = got
            out.extend(got)
            parent = got[-1]
        return out


def _nearest_rank(sorted_vals: list[float], q: float) -> float:
    return sorted_vals[round(q * (len(sorted_vals) - 1))] if sorted_vals else float("nan")


MAX_PLANNER_TICKS = 10_000_000  # a week of decisions at 1 s is 604,800


def check_span(span_ms: float, cfg: ReplayConfig) -> None:
    """The replay's simulated span must be finite and, with a planner, hold a bounded number
    of decisions: it decides every --planner-interval-s of simulated time, requests or not,
    so two requests years apart (or a tiny interval) meant billions of decisions: a hang."""
    if not math.isfinite(span_ms):
        raise ValueError(f"the trace spans more simulated time than a float holds "
                         f"(timestamps / --arrival-speedup {cfg.arrival_speedup:g})")
    if cfg.planner is not None:
        ticks = span_ms / (cfg.planner.interval_s * 1000.0)
        if ticks > MAX_PLANNER_TICKS:
            raise ValueError(
                f"the trace spans {span_ms / 1000.0:.6g} simulated s (timestamps / "
                f"--arrival-speedup {cfg.arrival_speedup:g}): {ticks:.3g} planner decisions at "
                f"--planner-interval-s {cfg.planner.interval_s:g}, more than the "
                f"{MAX_PLANNER_TICKS:,} a replay makes; use a larger interval or a shorter "
                f"trace")


def run_replay(trace: list[TraceRequest], policy: str, cfg: ReplayConfig) -> dict:
    from genset.engines.types import EngineRequest
    from proto.generate import SamplingParams, StopConditions

    policy = policy_name(policy)  # results name it one way whatever spelling was asked for
    routers = []
    now = [0.0]
    for r in range(max(1, cfg.router_replicas)):
        routers.append(RouterCore(RouterConfig(policy=policy, block_size=cfg.block_size, seed=cfg.seed + r,
                                               policy_options=dict(cfg.policy_options), router_id=r + 1),
                                  clock=lambda: now[0]))
    workers = [_Worker(i, make_mocker(cfg, i)) for i in range(cfg.workers)]
    # KV offload store (genset.replay.offload): evictions written behind, runs onboarded
    store = None
    if cfg.offload is not None and cfg.offload.enabled:
        store = OffloadSim(cfg.offload, cfg.block_size)
        for w in workers:
            store.attach(w.core)
            w.core.executor.record_prefill_ids = True
        if policy == "genset":
            # the policy costs onboarding like this store (`RouterCore.policy` keeps the one it
            # built first under a name: a fresh one, or these options were never seen)
            from genset.routing.policies import make_policy

            for rc in routers:
                rc.default_policy = rc._policies[policy] = make_policy(
                    policy, **{**cfg.policy_options, **cfg.offload.policy_options()})

    def new_worker(i: int) -> _Worker:
        w = _Worker(i, make_mocker(cfg, i))
        if store is not None:  # a worker the planner adds writes to the same store
            store.attach(w.core)
            w.core.executor.record_prefill_ids = True
        return w

    def attach(i: int) -> None:
        for rc in routers:
            rc.add_worker(i, model="replay", block_size=cfg.block_size, kv_blocks=cfg.kv_blocks,
                          max_batch_tokens=cfg.max_batched_tokens)

    def detach(i: int) -> None:
        for rc in routers:
            rc.remove_worker(i)

    for rc in routers:
        rc.GONE_MEMORY_MS = math.inf  # a drained worker's late KV events never bring it back
    # the worker set over time (and the planner sizing it, with `cfg.planner`)
    fleet = Fleet(workers, make_worker=new_worker, attach=attach,
                  detach=detach, clock=lambda: now[0], planner=cfg.planner,
                  kv_blocks=cfg.kv_blocks, block_size=cfg.block_size,
                  max_running=cfg.max_num_seqs, speedup_ratio=cfg.speedup_ratio,
                  sla_ttft_ms=cfg.sla_ttft_ms, sla_itl_ms=cfg.sla_itl_ms)
    hash_cache = _HashCache(cfg.block_size)
    t0 = trace[0].arrival_ms
    reqs = [_Req(t, (t.arrival_ms - t0) / cfg.arrival_speedup) for t in trace]
    check_span(reqs[-1].arrival_ms, cfg)
    by_id: dict[str, _Req] = {}
    steps: list[tuple[float, int, int]] = []  # (end time, seq, worker) of steps in flight
    pending: dict[int, tuple[list, object]] = {}  # worker -> (outputs, kv batch) of its step
    seq = 0
    wall0 = time.perf_counter()

    def push(w: _Worker, end: float) -> None:
        nonlocal seq
        seq += 1
        w.token = seq
        w.step_end = end
        heapq.heappush(steps, (end, seq, w.index))

    def start_step(w: _Worker, t: float) -> None:
        # Steps in which every running request just decodes inside its blocks change nothing
        # anyone sees before they end (no KV event, first token or finish): take them as one
        # run, each step ending exactly where it would have (same float sums), cut short if a
        # request arrives for this worker (`cut_run`). The bulk of a replay's steps are these.
        durs = w.core.decode_run(MAX_DECODE_RUN)
        if durs:
            ends = []
            e = t
            for d in durs:
                e = e + max(d, 1e-6)
                ends.append(e)
            w.run_ends = ends
            w.busy = True
            push(w, e)
            return
        outputs, dur = w.core.step(t)
        fleet.on_step(w)
        if store is not None:
            st = w.core.last_step
            account_copies(w, t, st)
        batch = w.core.take_kv_batch(int(t + dur))
        w.busy = True
        pending[w.index] = (outputs, batch)
        push(w, t + max(dur, 1e-6))
        if store is not None:
            publish_store(t)

    def account_copies(w: _Worker, t: float, stats) -> None:
        w.copy_out += stats.copy_out_ms
        w.copy_in += stats.copy_in_ms
        compute = stats.step_ms - stats.copy_out_ms - stats.copy_in_ms
        for rid in stats.prefill_ids or ():
            r = by_id.get(rid)
            if r is None or r.first_token_ms is not None:
                continue
            if r.admit_ms is None:
                r.admit_ms = t
                r.own = [0.0, 0.0, 0.0]
            own = r.own
            own[0] += compute
            own[1] += stats.copy_out_ms
            own[2] += stats.copy_in_ms

    def publish_store(t: float) -> None:
        for b in store.take_batches(int(t)):
            for rc in routers:
                rc.on_store_batch(b)

    def cut_run(w: _Worker, t: float) -> None:
        """A request arrived at `t` for `w` during its decode run: the step under way at `t`
        is the run's last (the next one admits the request)."""
        ends = w.run_ends
        j = bisect.bisect_right(ends, t)  # t < ends[-1]: that step was still in the heap
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
        start_step(w, t)  # the run's requests are still running

    def finish_step(w: _Worker, t: float) -> None:
        outputs, batch = pending.pop(w.index)
        w.busy = False
        if batch is not None and batch.events:
            for rc in routers:
                rc.on_kv_batch(batch)
        for out in outputs:
            r = by_id.get(out.request_id)
            if r is None:
                continue
            if r.first_token_ms is None:
                r.first_token_ms = t
                r.cached_tokens = out.cached_tokens
                if store is not None:
                    a_out, a_in = r.copies_at_arrival
                    r.copies_waited = (w.copy_out - a_out, w.copy_in - a_in)
                fleet.on_first_token(t - r.arrival_ms)
                for rc in routers:
                    rc.on_first_token(out.request_id)
            r.last_token_ms = t
            r.outputs += len(out.token_ids)
            if out.finish_reason is not None:
                for rc in routers:
                    rc.on_done(out.request_id)
                fleet.on_finish(r.outputs, r.first_token_ms, t)
        if w.core.has_work():
            start_step(w, t)
        else:
            fleet.on_idle(w, t)

    # The run makes millions of long-lived small objects (token lists, events, index
    # entries) and hardly any reference cycles: the cyclic GC would only rescan them again
    # and again (about a tenth of the run). Cycles made meanwhile are collected once it is
    # back on.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        i = 0
        n = len(reqs)
        while i < n or steps:
            t_arr = reqs[i].arrival_ms if i < n else math.inf
            t_fleet = fleet.next_event_ms()
            if t_fleet <= t_arr and (not steps or t_fleet <= steps[0][0]):
                now[0] = t_fleet  # a planner decision, or started workers becoming routable
                fleet.advance(t_fleet)
                continue
            if steps and steps[0][0] <= t_arr:
                t, sq, wi = heapq.heappop(steps)
                w = workers[wi]
                if sq != w.token:
                    continue  # the end of a decode run that was cut short
                now[0] = t
                if w.run_ends is not None:
                    finish_run(w, t)
                else:
                    finish_step(w, t)
                continue
            r = reqs[i]
            now[0] = t_arr
            rid = f"r{r.trace.index}"
            toks = r.trace.token_array()
            token_bytes = toks.tobytes()
            hashes = hash_cache.hashes(r.trace, token_bytes)
            rc = routers[i % len(routers)]
            routed = rc.route_tokens(rid, token_bytes, r.trace.input_length, r.trace.output_length,
                                     hashes_by_block_size={cfg.block_size: hashes})
            for other in routers:
                if other is not rc:  # replicas broadcast their decisions to each other
                    other.on_peer_decision(proto.RouteDecision(
                        request_id=rid, worker_id=routed.worker_id, overlap_blocks=routed.overlap_blocks,
                        prompt_tokens=routed.prompt_tokens, router_id=rc.config.router_id))
            r.worker = routed.worker_id
            by_id[rid] = r
            fleet.on_arrival(r.trace.input_length, routed.overlap_blocks * cfg.block_size)
            w = workers[routed.worker_id]
            kv_import = None
            if w.run_ends is not None:
                # the steps of its decode run started by now made their copies out ahead of
                # eviction (the mocker makes a step's as it takes it), before the import
                w.core.decode_run_started(bisect.bisect_right(w.run_ends, t_arr) + 1)
            if store is not None:  # the worker's before_run: onboard from the store
                kv_import, ram_n, disk_n, have = store.onboard(w.core, hashes,
                                                               r.trace.input_length)
                r.onboarded_blocks = (have, ram_n, disk_n)
                r.copies_at_arrival = (w.copy_out, w.copy_in)
            w.core.add_request(EngineRequest(
                rid, toks.tolist(), SamplingParams(temperature=0.0),
                StopConditions(max_tokens=r.trace.output_length, ignore_eos=True),
                kv_import=kv_import))
            if store is not None:
                publish_store(t_arr)
            # the worker would hash the prompt again on admission: hand it the router's hashes
            # (the same chained hashes of the same full blocks)
            w.core.scheduler.requests[rid].block_hashes = list(hashes)
            if not w.busy:
                start_step(w, t_arr)
            elif w.run_ends is not None:
                cut_run(w, t_arr)
            i += 1

    finally:
        if gc_was_enabled:
            gc.enable()
    wall = time.perf_counter() - wall0
    result = summarize(reqs, cfg, policy, wall, fleet)
    if store is not None:
        result["offload"] = offload_summary(reqs, cfg, store)
    return result


def offload_summary(reqs: list[_Req], cfg: ReplayConfig, store: OffloadSim) -> dict:
    """Where the prompt tokens served without computing came from: the worker's own cache,
    or the store's RAM / disk (`hit_rate` above counts them all)."""
    bs = cfg.block_size
    done = [r for r in reqs if r.first_token_ms is not None]
    tin = sum(r.trace.input_length for r in done) or 1
    by_tier = {"device": 0, "host": 0, "disk": 0}
    for r in done:
        have, ram_n, disk_n = r.onboarded_blocks
        # imported blocks sit right after the device prefix the worker had at arrival; if
        # that prefix was evicted before the request was admitted, they were not reachable
        cached = r.cached_tokens
        if not ram_n and not disk_n:
            by_tier["device"] += cached
            continue
        device_t = min(cached, have * bs)
        ram_t = min(cached - device_t, ram_n * bs)
        disk_t = min(cached - device_t - ram_t, disk_n * bs)
        by_tier["device"] += cached - ram_t - disk_t
        by_tier["host"] += ram_t
        by_tier["disk"] += disk_t
    # Dynamo's definition (its replay's prefix_cache_reused_ratio, host tier included) counts
    # the tokens a request did not compute: `hit_rate` above. With the split, a store run's
    # tail is found but computed; counted as found too, that is `hit_rate_found`.
    onboarded = sum(store.onboarded.values())
    found_extra = max(0, store.found_blocks - onboarded) * bs
    return {"hit_rate_by_tier": {k: v / tin for k, v in by_tier.items()},
            "hit_rate_found": (sum(by_tier.values()) + found_extra) / tin,
            "ttft_breakdown_ms": ttft_breakdown(done), **store.summary()}


def ttft_breakdown(done: list[_Req]) -> dict:
    """Where the mean TTFT goes: queued (arrival -> first prompt step), then the request's
    own prompt steps split into compute, copies out and copies in (the rest: waiting between
    its prompt steps); `copies_waited_*`: KV copy time of every step its worker ran between
    its arrival and its first token (what copies cost it, queueing included)."""
    n = len(done) or 1
    out = dict.fromkeys(("ttft", "queued", "prompt_compute", "prompt_copy_out",
                         "prompt_copy_in", "copies_waited_out", "copies_waited_in"), 0.0)
    for r in done:
        out["ttft"] += r.first_token_ms - r.arrival_ms
        if r.admit_ms is not None:
            out["queued"] += r.admit_ms - r.arrival_ms
            out["prompt_compute"] += r.own[0]
            out["prompt_copy_out"] += r.own[1]
            out["prompt_copy_in"] += r.own[2]
        out["copies_waited_out"] += r.copies_waited[0]
        out["copies_waited_in"] += r.copies_waited[1]
    return {k: v / n for k, v in out.items()}


def summarize(reqs: list[_Req], cfg: ReplayConfig, policy: str, wall_s: float,
              fleet: Fleet | None = None) -> dict:
    done = [r for r in reqs if r.first_token_ms is not None]
    ttft = sorted(r.first_token_ms - r.arrival_ms for r in done)
    tin = sum(r.trace.input_length for r in done)
    reused = sum(r.cached_tokens for r in done)
    itl_num = sum(r.last_token_ms - r.first_token_ms for r in done if r.trace.output_length > 1)
    itl_den = sum(r.trace.output_length - 1 for r in done if r.trace.output_length > 1)
    per_worker = [0] * (len(fleet.lives) if fleet is not None else cfg.workers)
    for r in done:
        per_worker[r.worker] += 1
    mean_w = statistics.fmean(per_worker)
    end = max((r.last_token_ms for r in done), default=0.0)
    duration_s = (end - min(r.arrival_ms for r in reqs)) / 1000.0
    fleet_out = fleet.summary(reqs, end, sla=(cfg.sla_ttft_ms, cfg.sla_itl_ms)) if fleet else {
        "worker_seconds": cfg.workers * duration_s, "avg_workers": float(cfg.workers),
        "scale_events": []}
    return {
        "policy": policy,
        "requests": len(reqs),
        "completed": len(done),
        "hit_rate": reused / tin if tin else 0.0,
        "ttft_mean_ms": statistics.fmean(ttft) if ttft else float("nan"),
        "ttft_p50_ms": _nearest_rank(ttft, 0.5),
        "ttft_p90_ms": _nearest_rank(ttft, 0.9),
        "ttft_p99_ms": _nearest_rank(ttft, 0.99),
        "itl_mean_ms": itl_num / itl_den if itl_den else float("nan"),
        "load_cov": statistics.pstdev(per_worker) / mean_w if mean_w else 0.0,
        "requests_per_worker": per_worker,
        "duration_s": duration_s,
        **sla_summary(done, cfg.sla_ttft_ms, cfg.sla_itl_ms, duration_s),
        **fleet_out,
        "wall_s": wall_s,
        "settings": {
            "workers": cfg.workers, "block_size": cfg.block_size, "kv_blocks": cfg.kv_blocks,
            "max_num_seqs": cfg.max_num_seqs, "max_batched_tokens": cfg.max_batched_tokens,
            "arrival_speedup": cfg.arrival_speedup, "router_replicas": cfg.router_replicas,
        },
    }
