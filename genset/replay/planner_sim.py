"""The worker fleet of a replay over time, and the planner that sizes it (`genset replay
--planner load|slo`).

`Fleet` owns which simulated workers exist, when, and in which state: *starting* (asked for,
not routable yet), *ready* (routable), *draining* (no longer routable, finishing what it
holds) and *gone*. Without a planner the fleet is the fixed `--workers`; with one, the same
`genset.planning.PlannerCore` that runs live decides in simulated time:

- it is fed what the live planner reads, from the simulation: every arrival (prompt tokens,
  and the cached part the router expects, as a router decision says), each request's TTFT at
  its first token and its mean inter-token latency and output length when it finishes (what
  a frontend's `FrontendStats` carry), every engine step (`WorkerStepStats`), and at each
  tick a load report of every worker (`LoadReport`: running, waiting, waiting prompt tokens,
  KV blocks in use);
- every `interval_s` of simulated time it decides. A worker it starts counts (worker-seconds)
  from that moment and becomes routable `startup_s` later, when the core is told it
  registered (so the core measures the start-up time itself, as live); a worker it drains is
  removed from the routers at once, finishes the requests it holds, then leaves.

Worker-seconds count every worker from when it was asked for until it left (or the replay's
end): starting and draining workers cost as much as serving ones, as in Dynamo's GPU-hours.
The timeline (load, pool sizes, TTFT per bucket of simulated time) is computed afterwards from
the requests and the workers' life times, so it costs the simulation nothing.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass

from genset.planning import (
    POLICIES,
    ROLE_DECODE,
    LoadPolicyConfig,
    PlannerConfig,
    PlannerCore,
    PoolBounds,
    SloPolicyConfig,
    StepTimePrior,
)


@dataclass
class PlannerSimConfig:
    policy: str = "load"  # load | slo
    min_workers: int = 1
    max_workers: int = 8
    startup_s: float = 30.0  # asked for -> routable, in simulated seconds
    interval_s: float = 1.0  # simulated seconds between decisions (the live default)
    down_cooldown_s: float = 60.0
    ttft_ms: float | None = None  # the SLO policy's targets; None: the replay's SLAs
    itl_ms: float | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown planner policy {self.policy!r} (use "
                             f"{', '.join(POLICIES)})")
        if self.min_workers < 1:
            raise ValueError(f"--min-workers must be >= 1, got {self.min_workers}")
        if self.max_workers < self.min_workers:
            raise ValueError(f"--max-workers {self.max_workers} is below --min-workers "
                             f"{self.min_workers}")
        for name in ("startup_s",):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {v}")
        for name in ("interval_s", "down_cooldown_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {v}")
        for name in ("ttft_ms", "itl_ms"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"the planner's {name} target must be > 0, got {v}")


@dataclass(slots=True)
class WorkerLife:
    index: int
    asked_ms: float
    ready_ms: float | None = None
    drain_ms: float | None = None
    left_ms: float | None = None


class Fleet:
    """See the module docstring. `workers` is the simulation's list (index = worker id, it
    only grows); `make_worker(index)` builds a new simulated worker; `attach(index)` makes a
    worker routable (registers it with every router); `detach(index)` removes it."""

    def __init__(self, workers: list, *, make_worker: Callable[[int], object],
                 attach: Callable[[int], None], detach: Callable[[int], None],
                 clock: Callable[[], float], planner: PlannerSimConfig | None = None,
                 kv_blocks: int = 0, block_size: int = 0, max_running: int = 256,
                 speedup_ratio: float = 1.0, sla_ttft_ms: float = 2000.0,
                 sla_itl_ms: float = 50.0) -> None:
        self.workers = workers
        self.make_worker = make_worker
        self.attach = attach
        self.detach = detach
        self.clock = clock
        self.pc = planner
        self.card = dict(kv_blocks=kv_blocks, block_size=block_size, max_running=max_running)
        self.initial = len(workers)
        self.lives = [WorkerLife(i, 0.0, 0.0) for i in range(len(workers))]
        self.scale_events: list[dict] = []
        self._starting: list[tuple[float, int]] = []  # (ready at ms, index), a heap
        self.next_tick = math.inf
        self.core: PlannerCore | None = None
        for i in range(len(workers)):
            attach(i)
        if planner is None:
            return
        self.core = PlannerCore(PlannerConfig(
            policy=planner.policy,
            pools={ROLE_DECODE: PoolBounds(planner.min_workers, planner.max_workers)},
            load=LoadPolicyConfig(),
            slo=SloPolicyConfig(ttft_ms=planner.ttft_ms or sla_ttft_ms,
                                itl_ms=planner.itl_ms or sla_itl_ms),
            down_cooldown_s=planner.down_cooldown_s,
            # the operator's estimate, corrected by what the core measures from then on
            startup_s=max(0.1, planner.startup_s),
            horizon_extra_s=2 * planner.interval_s,
            default_kv_blocks=kv_blocks or 16384, default_block_size=block_size or 16,
            # the mocker's own polynomial is the prior (its coefficients are the prior's
            # defaults, divided by the speed-up): the fit then only confirms it
            step_prior=StepTimePrior().scaled(speedup_ratio)), clock=clock)
        for i in range(len(workers)):
            self.core.worker_up(i, ROLE_DECODE, **self.card)
        self.next_tick = planner.interval_s * 1000.0

    # ------------------------------------------------------------------ the event loop
    def next_event_ms(self) -> float:
        """When the fleet next has something to do (a decision, a worker ready); inf without
        a planner."""
        nxt = self.next_tick
        if self._starting and self._starting[0][0] < nxt:
            nxt = self._starting[0][0]
        return nxt

    def advance(self, t: float) -> None:
        """Everything due at `t` (the clock reads `t`): workers whose start-up ended join,
        then the planner decides if a tick is due."""
        while self._starting and self._starting[0][0] <= t:
            _, i = heapq.heappop(self._starting)
            self.lives[i].ready_ms = t
            self.attach(i)
            if self.core is not None:
                self.core.worker_up(i, ROLE_DECODE, **self.card)
        if t >= self.next_tick:
            self.next_tick += self.pc.interval_s * 1000.0
            self._tick(t)

    def _tick(self, t: float) -> None:
        core = self.core
        for life in self.lives:
            if life.ready_ms is None or life.left_ms is not None:
                continue
            rep = self.workers[life.index].core.load_report(int(t))
            core.observe_load(life.index, running=rep.running, waiting=rep.waiting,
                              waiting_prefill_tokens=rep.waiting_prefill_tokens,
                              kv_used_blocks=rep.kv_used_blocks,
                              kv_total_blocks=rep.kv_total_blocks)
        d = core.decide()
        if not d.changed:
            return
        for role, p in d.pools.items():
            if p.changed:
                self.scale_events.append({
                    "t_s": round(t / 1000.0, 3), "pool": role, "from": p.previous,
                    "to": p.target, "action": p.action, "start": p.start,
                    "drain": len(p.drain), "reason": p.reason})
        for n in d.start.values():
            for _ in range(n):
                self._spawn(t)
        for wid in d.drain:
            self._drain(wid, t)

    def _spawn(self, t: float) -> None:
        i = len(self.workers)
        self.workers.append(self.make_worker(i))
        self.lives.append(WorkerLife(i, t))
        heapq.heappush(self._starting, (t + self.pc.startup_s * 1000.0, i))

    def _drain(self, i: int, t: float) -> None:
        life = self.lives[i]
        if life.drain_ms is not None or life.ready_ms is None:
            return
        life.drain_ms = t
        self.detach(i)
        w = self.workers[i]
        if not w.busy and not w.core.has_work():
            self._leave(i, t)

    def _leave(self, i: int, t: float) -> None:
        self.lives[i].left_ms = t
        if self.core is not None:
            self.core.worker_down(i)

    # ------------------------------------------------------------------ observations
    def on_arrival(self, prompt_tokens: int, cached_tokens: int) -> None:
        if self.core is not None:
            self.core.observe_arrival(prompt_tokens,
                                      cached_tokens=max(0, min(cached_tokens, prompt_tokens)))

    def on_first_token(self, ttft_ms: float) -> None:
        if self.core is not None:
            self.core.observe_ttft(ttft_ms)

    def on_finish(self, outputs: int, first_ms: float, last_ms: float) -> None:
        if self.core is not None:
            self.core.observe_finished(1, outputs)
            if outputs > 1:
                self.core.observe_itl((last_ms - first_ms) / (outputs - 1))

    def on_step(self, w) -> None:
        """`w` just ran one (non-bulk) step: its `core.last_step` is the sample."""
        if self.core is not None:
            s = w.core.last_step
            if s.step_ms > 0:
                self.core.observe_step(s.prefill_tokens, s.decode_tokens,
                                       min(1.0, s.kv_usage), s.step_ms)

    def on_idle(self, w, t: float) -> None:
        """`w` has nothing left to do: a draining worker leaves."""
        life = self.lives[w.index]
        if life.drain_ms is not None and life.left_ms is None:
            self._leave(w.index, t)

    # ------------------------------------------------------------------ results
    def summary(self, reqs, end_ms: float, bucket_s: float = 10.0, sla=None) -> dict:
        """`sla`: (TTFT ms, ITL ms) for the timeline's per-bucket attainment."""
        end = max(end_ms, 0.0)
        ws = 0.0
        for life in self.lives:
            stop = min(end, life.left_ms if life.left_ms is not None else end)
            ws += max(0.0, stop - life.asked_ms) / 1000.0
        duration = end / 1000.0
        counts = _counts_over_time(self.lives, end)
        out = {
            "worker_seconds": ws,
            "avg_workers": ws / duration if duration > 0 else float(len(self.lives)),
            "peak_workers": max((n for _, n in counts), default=len(self.lives)),
            "min_workers": min((n for _, n in counts), default=len(self.lives)),
            "workers_started": len(self.lives) - self.initial,
            "workers_drained": sum(1 for w in self.lives if w.drain_ms is not None),
            "scale_events": self.scale_events,
            "worker_lives": [{
                "worker": w.index, "asked_s": _s(w.asked_ms), "ready_s": _s(w.ready_ms),
                "drain_s": _s(w.drain_ms), "left_s": _s(w.left_ms)} for w in self.lives],
            "timeline": timeline(reqs, self.lives, end, bucket_s, sla),
        }
        if self.pc is not None:
            out["planner"] = {
                "policy": self.pc.policy, "min_workers": self.pc.min_workers,
                "max_workers": self.pc.max_workers, "startup_s": self.pc.startup_s,
                "interval_s": self.pc.interval_s, "down_cooldown_s": self.pc.down_cooldown_s,
                "ttft_target_ms": self.core.config.slo.ttft_ms,
                "itl_target_ms": self.core.config.slo.itl_ms,
                "startup_measured_s": self.core.startup.estimate_s,
                "start_failures": self.core.start_failures,
            }
        return out


def _s(ms: float | None) -> float | None:
    return None if ms is None else round(ms / 1000.0, 3)


def _counts_over_time(lives: list[WorkerLife], end: float) -> list[tuple[float, int]]:
    """(time, workers counted from then on) at every change, workers counted from asked to
    left."""
    deltas: dict[float, int] = {}
    for w in lives:
        if w.asked_ms > end:
            continue
        deltas[w.asked_ms] = deltas.get(w.asked_ms, 0) + 1
        if w.left_ms is not None and w.left_ms < end:
            deltas[w.left_ms] = deltas.get(w.left_ms, 0) - 1
    out, n = [], 0
    for t in sorted(deltas):
        n += deltas[t]
        out.append((t, n))
    return out


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


MAX_TIMELINE_BUCKETS = 10_000


def timeline(reqs, lives: list[WorkerLife], end_ms: float, bucket_s: float,
             sla: tuple[float, float] | None = None) -> list[dict]:
    """Per bucket of simulated time: arrivals/s and prompt tokens/s, workers counted (asked
    to left) and ready (routable), on average over the bucket, and the TTFT (p50 / p90) and
    SLO attainment (with `sla`) of the requests that arrived in it. A replay longer than
    `MAX_TIMELINE_BUCKETS` buckets gets buckets that many times `bucket_s` wide."""
    from genset.replay.metrics import request_ok

    # bounded: two requests a year apart in a trace (or a tiny --arrival-speedup) asked for
    # millions of rows (MemoryError), 1e300 ms for more than an index can hold
    if end_ms / (bucket_s * 1000.0) > MAX_TIMELINE_BUCKETS:
        bucket_s *= math.ceil(end_ms / (bucket_s * 1000.0) / MAX_TIMELINE_BUCKETS)
    b_ms = bucket_s * 1000.0
    n = min(MAX_TIMELINE_BUCKETS, max(1, math.ceil(end_ms / b_ms))) if end_ms > 0 else 1
    arrivals = [0] * n
    tokens = [0] * n
    ttfts: list[list[float]] = [[] for _ in range(n)]
    good = [0] * n
    for r in reqs:
        k = min(n - 1, int(r.arrival_ms // b_ms))
        arrivals[k] += 1
        tokens[k] += r.trace.input_length
        if r.first_token_ms is not None:
            ttfts[k].append(r.first_token_ms - r.arrival_ms)
        if sla is not None:
            good[k] += all(request_ok(r.arrival_ms, r.first_token_ms, r.last_token_ms,
                                      r.trace.output_length, *sla))
    rows = []
    for k in range(n):
        t0, t1 = k * b_ms, min(end_ms, (k + 1) * b_ms) if end_ms > 0 else b_ms
        span = max(1e-9, t1 - t0)
        counted = ready = 0.0
        for w in lives:
            left = w.left_ms if w.left_ms is not None else end_ms
            counted += _overlap(t0, t1, w.asked_ms, left)
            if w.ready_ms is not None:
                ready += _overlap(t0, t1, w.ready_ms,
                                  w.drain_ms if w.drain_ms is not None else left)
        v = sorted(ttfts[k])
        rows.append({
            "t_s": round(t0 / 1000.0, 3),
            "arrivals_per_s": arrivals[k] / bucket_s,
            "prompt_tokens_per_s": tokens[k] / bucket_s,
            "workers": round(counted / span, 3),
            "ready": round(ready / span, 3),
            "ttft_p50_ms": v[round(0.5 * (len(v) - 1))] if v else None,
            "ttft_p90_ms": v[round(0.9 * (len(v) - 1))] if v else None,
            "sla_attainment": good[k] / arrivals[k] if sla is not None and arrivals[k] else None,
        })
    return rows
