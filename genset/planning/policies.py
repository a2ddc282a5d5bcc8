"""Sizing policies: from what the pools are doing (and, for SLO, the traffic forecast and the
performance model) to how many workers each pool needs.

A policy answers, per pool, three numbers (`PoolNeed`):
- `up`: the size below which the pool is overloaded at the projected load (one start-up time
  ahead). Scaling up happens when `up` exceeds the current target;
- `settle_now`: the size that puts today's load in the middle of the band (headroom, so the
  next bit of noise does not trigger another change). The pool scales down to the largest
  `settle_now` seen over the cool-down window, and only when that is below the target;
- `settle` = max(up, settle_now): the size to go to when scaling up. The projection decides
  *when* to add and the minimum to add; the size itself comes from the load seen, because a
  step in load looks like a ramp to any trend estimator for a while, and sizing a step by its
  projected slope over-provisions and then has to scale down again.

Up uses a high threshold and settling a middle one: that gap is the hysteresis, and it is
why a steady load with noise never oscillates, and why a scale-down does not trigger a
scale-up (the remaining workers end up in the middle of the band, not at its top).

The policies are deterministic given their inputs; the smoothing state they keep per pool is
advanced only by `evaluate` calls.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from genset.planning.forecast import ArrivalForecaster, TrendEstimator
from genset.planning.observations import ROLE_PREFILL, LatencyWindow
from genset.planning.perf_model import PerfModel

# the capacities kept for the seasonal floor before a period is found (it is used only once
# one is; then the period found, 60-900 s, is the memory)
_DEFAULT_PERIOD_S = 300.0
# A boost that has faded to within this of 1 is 1. The decay is geometric: without the snap it
# reached 1.0 exactly only ~1,700 decisions (28 min at 1 s) after a boost of 0.07, and the trim,
# which starts from exactly 1, stayed off all that time (the Azure conv tail, session 15)
_BOOST_SNAP = 1e-3


def ceil_workers(x: float) -> int:
    """Workers for a fractional need (a hair over an integer is that integer: 2.0000001 -> 2)."""
    if not math.isfinite(x) or x <= 0:
        return 0
    return max(0, math.ceil(x - 1e-6))


@dataclass(slots=True)
class PoolView:
    """One pool as the core sees it at decision time (sums over ready workers whose load is
    known)."""

    role: str
    target: int
    ready: int
    starting: int
    reporting: int  # ready workers with a fresh load report
    kv_used_blocks: float = 0.0
    kv_blocks_per_worker: float = 0.0  # mean capacity (blocks)
    kv_tokens_per_worker: float = 0.0  # mean capacity (tokens)
    queue_tokens: float = 0.0  # waiting prefill tokens, summed
    running: float = 0.0  # sequences running, summed
    max_running: int = 256
    ceiling: int = 0  # the most workers the pool may have (0: unknown)


@dataclass(slots=True)
class PoolNeed:
    up: int
    settle: int
    settle_now: int
    why: str
    inputs: dict[str, float] = field(default_factory=dict)
    # the load is falling and the data says so (a significant trend, not noise): the core may
    # scale down after a short cool-down instead of waiting out the whole one
    falling: bool = False
    # the workers the seasonal forecast says the pool needs again within one start-up time
    # (None: no period predicting): a pool is not taken below it (PlannerConfig.seasonal_floor)
    seasonal_floor: int | None = None
    # the seasonal forecast (a period that predicts) puts the rate one start-up ahead, when
    # a worker asked for now would join, below today's level (PlannerConfig.join_falling_hold)
    joins_falling: bool = False
    # the workers the KV safety net alone asks for (a scale-up it needs is never held)
    safety: int = 0


@dataclass
class LoadPolicyConfig:
    kv_high: float = 0.80  # mean KV use above which a pool is overloaded
    kv_target: float = 0.60  # where the pool settles after a change
    # waiting prefill tokens per worker: overloaded above (4 steps of an 8192-token budget;
    # a single long prompt alone must not look like an overload), settled at half
    queue_high_tokens: float = 32768.0
    queue_target_tokens: float = 16384.0
    smoothing_s: float = 3.0  # time constant of the load level
    trend_window_s: float = 30.0  # the slope is fitted over this much recent load

    def __post_init__(self) -> None:
        if not 0 < self.kv_target < self.kv_high <= 1:
            raise ValueError(f"need 0 < kv_target < kv_high <= 1, got kv_target={self.kv_target}"
                             f" kv_high={self.kv_high}")
        if not 0 < self.queue_target_tokens < self.queue_high_tokens:
            raise ValueError("need 0 < queue_target_tokens < queue_high_tokens, got "
                             f"{self.queue_target_tokens} and {self.queue_high_tokens}")
        if self.smoothing_s <= 0 or self.trend_window_s <= 0:
            raise ValueError("smoothing_s and trend_window_s must be > 0")


class LoadPolicy:
    """KV use and waiting prefill tokens per pool.

    Demand is measured as a pool total (KV blocks in use, prompt tokens waiting), which does
    not change when workers are added or removed (per-worker means do: the peers' trap of a
    new, empty worker making the pool look idle). A pool needs total / (per-worker capacity x
    threshold) workers.
    """

    name = "load"

    def __init__(self, config: LoadPolicyConfig | None = None) -> None:
        self.config = config or LoadPolicyConfig()
        self._kv: dict[str, TrendEstimator] = {}
        self._queue: dict[str, TrendEstimator] = {}

    def _smoothers(self, role: str) -> tuple[TrendEstimator, TrendEstimator]:
        c = self.config
        kv = self._kv.get(role)
        if kv is None:
            kv = self._kv[role] = TrendEstimator(c.smoothing_s, c.trend_window_s)
            self._queue[role] = TrendEstimator(c.smoothing_s, c.trend_window_s)
        return kv, self._queue[role]

    def evaluate(self, now_ms: float, view: PoolView, horizon_s: float) -> PoolNeed:
        c = self.config
        kv_s, q_s = self._smoothers(view.role)
        # KV demand in workers' worth of KV; unknown capacity (no card, no report): no signal
        per = view.kv_blocks_per_worker
        kv_s.update(now_ms, view.kv_used_blocks / per if per > 0 else 0.0)
        q_s.update(now_ms, view.queue_tokens)
        kv_now = kv_s.level
        kv_ahead = max(kv_s.project(horizon_s), kv_s.sustained())
        q_now = q_s.level
        q_ahead = max(q_s.project(horizon_s), q_s.sustained())
        up = max(ceil_workers(kv_ahead / c.kv_high),
                 ceil_workers(q_ahead / c.queue_high_tokens))
        settle_now = max(ceil_workers(kv_now / c.kv_target),
                         ceil_workers(q_now / c.queue_target_tokens))
        n = max(1, view.ready)
        why = (f"kv {kv_now / n:.2f} per worker (projected {kv_ahead / n:.2f}, high "
               f"{c.kv_high:.2f}), waiting prefill {q_now / n:.0f} tokens per worker "
               f"(projected {q_ahead / n:.0f}, high {c.queue_high_tokens:.0f})")
        return PoolNeed(up, max(up, settle_now), settle_now, why, {
            "kv_workers": kv_now, "kv_workers_projected": kv_ahead,
            "kv_usage_smoothed": kv_now / n, "queue_tokens_smoothed": q_now,
            "queue_tokens_projected": q_ahead})

    def evaluate_all(self, now_ms: float, views: dict[str, PoolView], horizon_s: float,
                     ) -> dict[str, PoolNeed]:
        return {role: self.evaluate(now_ms, v, horizon_s) for role, v in views.items()}


@dataclass
class SloPolicyConfig:
    ttft_ms: float = 1000.0
    itl_ms: float = 50.0
    down_margin: float = 0.10  # scale down only to a size that still meets the need + 10 %
    noise_z: float = 1.0  # down only when the rate is this many noise sigmas below what the
    # pool serves (the band is wide at low rates, narrow at high; at 3 the pool kept its
    # peak size through most of each trough of the Mooncake sinusoid: the latency budget
    # below is the margin for the tail, this one only against the rate's noise) ...
    up_noise_z: float = 1.0  # ... and up when it is this many above: a late scale-up costs
    # SLO misses for a whole start-up time, a needless one only worker-seconds until the
    # cool-down (measured on the sinusoid Mooncake trace, 30 s start-up: z = 3 left the pool
    # at its trough size until the rate was 2 req/s above what it served)
    max_utilisation: float = 0.9  # a prefill worker is never planned busier than this
    kv_fill: float = 0.9  # decode batches are planned to fill at most this share of KV
    kv_safety: float = 0.9  # whatever the model says: KV use above this per worker adds one
    # Observed / predicted latency corrects the model up only: the step times are fitted
    # from the engine's own steps, so a client seeing less than predicted is slack in the
    # queueing approximation (batched prompts), not a faster engine; following it down sized
    # the Mooncake sinusoid's peaks for half their load (correction 0.5 at each peak)
    correction_min: float = 1.0
    correction_max: float = 4.0
    correction_alpha: float = 0.2
    min_latency_samples: int = 20  # observed TTFT/ITL needed before correcting the model
    # Attainment feedback: the model sizes for means, clients are judged per request. When
    # fewer than `attainment_target` of the recent requests met a target, every need is
    # scaled up by a boost that grows with the shortfall (`boost_gain` per decision at twice
    # the allowed misses) and fades by `boost_decay` per decision once they meet it with room
    # (a quarter of the allowed misses or fewer). Bounded by `boost_max`.
    attainment_target: float = 0.95
    boost_gain: float = 0.02
    boost_decay: float = 0.02  # ~35 decisions to halve: an old miss must not hold a peak's
    # pool through the next trough (at 0.005 the boost of one peak lasted the whole run)
    boost_max: float = 3.0
    # ... and below 1 (a trim), so the feedback aims at the target rather than at 100%:
    # the model is conservative (mean latencies within `latency_budget`, a noise sigma up,
    # upward-only corrections), so while the long-run attainment (an EWMA over
    # `attainment_memory_s`) stays above `trim_above`, every need is scaled down by
    # `trim_gain` per decision (0.1 in 50 s), to `boost_min`; recent misses past the
    # target take it back towards 1 four times as fast as the boost grows. On the Mooncake
    # sinusoid (30 s start-up, with the jump floor) 0.72 of static at peak, not 0.74; Azure conv 0.87
    # instead of 0.94, attainment still >= 90%. 1: no trim.
    boost_min: float = 0.6
    trim_above: float = 0.98
    trim_gain: float = 0.002
    attainment_memory_s: float = 300.0
    # ... and the trim grows only while the median TTFT of the recent requests is at most
    # `trim_ttft_max` times what the model (uncorrected) predicts for it: the trim is the
    # model's conservatism, and a model that clients find *slower* than it says has none to
    # give back. Its prefill time is then under-estimated, and with it the prefill share
    # that stretches every decode step (the ITL side of a worker's capacity). On the
    # Mooncake sinusoid the median TTFT is 0.2-0.6 of the prediction (long prompts the
    # mocker batches) and nothing changes; on the Azure conversation trace it is 1.1-1.4
    # (short prompts that wait for a step), and the trim had grown to 0.68 on a pool held
    # at its start size: at 8x with a 120 s start-up it made 48 req/s a need of 3 and took
    # the fifth worker 10 s before a 35% rise (83.9% attainment; 99.96% with this). The
    # upward correction does not learn there (a pool at its ceiling counts as caught
    # short), so the gate compares against the uncorrected model. None: off.
    trim_ttft_max: float | None = 1.0
    # ... at horizons (start-up) of at least `trim_ttft_min_horizon_s`: the trim is a bet
    # that the model is conservative, and with a short start-up a lost bet costs one
    # start-up (the worker given up is back within it), while with a long one the rise it
    # misses can be over before the worker is. With a 30 s start-up the Azure conversation
    # trace keeps the trim's saving (4x: 97.1% at 0.79 of static at peak; gated 100% at
    # 0.88); every other row is the same either way. 0: at every horizon.
    trim_ttft_min_horizon_s: float = 60.0
    # The share of the TTFT and ITL targets the *mean* request is planned to use: each
    # request is judged on its own, and one of a few output tokens that shares its worker
    # with long prompts sees several times the mean inter-token gap. The rest of the target
    # is the room for that tail.
    latency_budget: float = 0.9
    # The seasonal forecast's floor (PoolNeed.seasonal_floor) applies once its weight (its
    # error against persistence's, ArrivalForecaster.seasonal_weight) is at least this
    seasonal_min_weight: float = 0.5
    seasonal_settle: bool = True  # scale up to the seasonal peak within two start-ups
    seasonal_margin: float = 0.10  # the seasonal floor and peak sizing carry this margin ...
    seasonal_trim: bool = False  # ... and are not trimmed (see seasonal_need)
    # With a horizon (start-up) of at least `seasonal_costly_horizon_s` the seasonal floor
    # of aggregated workers is sized at the lowest capacity per worker of the last period,
    # not today's: the forecast is of the rate, and the mix that comes back with the
    # cycle's peak (prompt lengths, cache hits) is not today's either. On the Mooncake
    # sinusoid with a 120 s start-up, 35-45% cache hits in the last ~50 requests at 945-971
    # s made a worker look worth 2.5-3.4 req/s (1.5-1.8 at the peaks before): the pool went
    # 4 -> 3, and 3 -> 5 37 s later as 20k-token prompts came with the rise. A short
    # start-up follows the mix instead (a worker is back within 30 s). None: today's.
    seasonal_costly_horizon_s: float | None = 60.0

    # Demonstrated capacity (aggregated workers): what the fleet has shown it serves within
    # the targets, against what the model plans. Each decision the model's utilisation u =
    # arrival rate / (ready workers x planned capacity per worker) is kept for a latency
    # window; each window's highest u is remembered for `demo_memory_s` with whether the
    # window met `attainment_target` (a miss only while the pool was not caught short:
    # growing or at its ceiling, as for the boost). The pool is then planned at u* = the
    # largest u that met the target below the smallest u that missed it (capped at
    # 1 / `boost_min`; 1 while no window has shown more): the conservatism of the model
    # (means within `latency_budget`, a noise sigma up, upward-only corrections) measured,
    # where the trim only creeps. u* and the trim are two estimates of the same slack: the
    # stronger counts, they do not multiply. On the Mooncake sinusoid (30 s start-up) 92.9%
    # at 0.71 of static at peak instead of 95.9% at 0.78; 120 s 94.9% at 0.83 instead of
    # 97.5% at 0.87. 0: off.
    demo_memory_s: float = 600.0
    # ... and a decision's u is kept only while the pool is not caught short (no worker
    # starting, not held at its ceiling): such a pool is over its capacity by the planner's
    # own judgement, and a latency window that met the target on the whole (most of it
    # served by the pool that joined) does not show that the short pool served that u. On
    # the Azure conv trace at 8x (time scale 0.125, 30 s start-up) the u of 4 workers
    # waiting for a fifth (1.53: 52.6 req/s, misses in every 10 s bucket) was credited by
    # the window after the fifth joined: u* 1.53, then 1.65, and the pool went 4 -> 3 at
    # 301 s into 45 req/s (4-55% met per 10 s until a fourth rejoined): 90.0% at 0.85 of
    # static at peak, 97.1% at 0.87 with it. False: every decision's u.
    demo_skip_short: bool = True
    # A scale-up (aggregated workers) goes to the larger of the projected need and the need
    # at the rate observed now, not at its upper noise band plus `down_margin`: those two
    # are the scale-down's hysteresis (`settle_now`), and sizing a rise with them as well
    # took the Mooncake sinusoid's pool from 4 to 6 at 516 s (30 s start-up; 5.76 req/s of
    # 18.9k-token prompts) for the minute of the cool-down: 92.8% at 0.699 of static at
    # peak instead of 92.9% at 0.708. False: the rise goes to `settle_now`.
    up_to_observed: bool = True

    def __post_init__(self) -> None:
        if self.ttft_ms <= 0 or self.itl_ms <= 0:
            raise ValueError(f"TTFT and ITL targets must be > 0 ms, got {self.ttft_ms} and "
                             f"{self.itl_ms}")
        if not 0 < self.max_utilisation < 1:
            raise ValueError(f"max_utilisation must be in (0, 1), got {self.max_utilisation}")
        if not 0 < self.attainment_target < 1:
            raise ValueError(f"attainment_target must be in (0, 1), got "
                             f"{self.attainment_target}")
        if self.boost_max < 1 or self.boost_gain < 0 or not 0 <= self.boost_decay < 1:
            raise ValueError("need boost_max >= 1, boost_gain >= 0, 0 <= boost_decay < 1")
        if not 0 < self.boost_min <= 1 or self.trim_gain < 0 or self.attainment_memory_s <= 0:
            raise ValueError("need 0 < boost_min <= 1, trim_gain >= 0, attainment_memory_s > 0")
        if self.trim_ttft_max is not None and not (
                math.isfinite(self.trim_ttft_max) and self.trim_ttft_max > 0):
            raise ValueError(f"trim_ttft_max must be > 0 or None, got {self.trim_ttft_max}")
        if not (math.isfinite(self.trim_ttft_min_horizon_s)
                and self.trim_ttft_min_horizon_s >= 0):
            raise ValueError(f"trim_ttft_min_horizon_s must be >= 0, got "
                             f"{self.trim_ttft_min_horizon_s}")
        if not 0 < self.trim_above <= 1:
            raise ValueError(f"trim_above must be in (0, 1], got {self.trim_above}")
        if not 0 < self.latency_budget <= 1:
            raise ValueError(f"latency_budget must be in (0, 1], got {self.latency_budget}")
        if not 0 < self.correction_min <= self.correction_max:
            raise ValueError("need 0 < correction_min <= correction_max")
        if not 0 < self.kv_fill <= 1 or not 0 < self.kv_safety <= 1:
            raise ValueError("kv_fill and kv_safety must be in (0, 1]")
        if not 0 <= self.seasonal_min_weight <= 1:
            raise ValueError(f"seasonal_min_weight must be in [0, 1], got "
                             f"{self.seasonal_min_weight}")
        if self.seasonal_costly_horizon_s is not None and not (
                math.isfinite(self.seasonal_costly_horizon_s)
                and self.seasonal_costly_horizon_s >= 0):
            raise ValueError(f"seasonal_costly_horizon_s must be >= 0 or None, got "
                             f"{self.seasonal_costly_horizon_s}")
        if not (math.isfinite(self.demo_memory_s) and self.demo_memory_s >= 0):
            raise ValueError(f"demo_memory_s must be >= 0, got {self.demo_memory_s}")
        if self.down_margin < 0:
            raise ValueError(f"down_margin must be >= 0, got {self.down_margin}")


@dataclass(slots=True)
class PrefillSizing:
    workers: float  # fractional need
    service_ms: float  # prefill time of a mean (uncached) prompt, corrected
    utilisation: float  # the most a worker may be loaded and still meet TTFT
    feasible: bool


@dataclass(slots=True)
class DecodeSizing:
    workers: float
    batch: int  # sequences per worker that still meet ITL (and fit KV)
    step_ms: float  # the decode step time at that batch, corrected
    concurrency: float  # sequences decoding at once over the pool (Little's law)
    feasible: bool


def size_prefill(rate: float, uncached_isl: float, model: PerfModel, ttft_ms: float,
                 max_utilisation: float = 0.9, correction: float = 1.0) -> PrefillSizing:
    """Prefill workers for `rate` requests/s of `uncached_isl` new prompt tokens each.

    A worker serving prompts that take S ms each, at utilisation rho, has a mean queueing
    delay of about rho*S / (2(1 - rho)) (M/D/1); TTFT = delay + S <= target gives
    rho <= 2(T - S) / (2T - S). Batching several prompts per step only makes real workers
    faster than this, so the sizing errs on the safe side. When one prompt alone takes longer
    than the target, no pool size meets it: the pool is sized at half load (reported as not
    feasible)."""
    s = model.prefill_ms(max(1.0, uncached_isl)) * correction
    feasible = s < ttft_ms
    rho = 2 * (ttft_ms - s) / (2 * ttft_ms - s) if feasible else 0.5
    rho = min(max_utilisation, max(0.05, rho))
    workers = rate * s / 1000.0 / rho if rate > 0 else 0.0
    return PrefillSizing(workers, s, rho, feasible)


def size_decode(rate: float, isl: float, osl: float, model: PerfModel, itl_ms: float,
                kv_tokens_per_worker: float, max_running: int, kv_fill: float = 0.9,
                correction: float = 1.0) -> DecodeSizing:
    """Decode workers for `rate` requests/s generating `osl` tokens after `isl` prompt tokens.

    The largest batch b whose step time (with the context it holds) meets the ITL target and
    whose KV fits, then Little's law: sequences decoding at once = rate x osl x step time,
    spread over workers of b each."""
    ctx = max(1.0, isl + osl / 2.0)  # mean context of a decoding sequence
    cap = max(1.0, kv_tokens_per_worker)
    best, best_ms = 0, 0.0
    for b in range(1, max(1, max_running) + 1):
        if b * ctx > cap * kv_fill and b > 1:
            break
        ms = model.decode_ms(b, min(1.0, b * ctx / cap)) * correction
        if ms > itl_ms:
            break
        best, best_ms = b, ms
    feasible = best > 0
    if not feasible:  # even one sequence is slower than the target: size for batch 1
        best, best_ms = 1, model.decode_ms(1, min(1.0, ctx / cap)) * correction
    concurrency = rate * osl * best_ms / 1000.0 if rate > 0 else 0.0
    return DecodeSizing(concurrency / best, best, best_ms, concurrency, feasible)


@dataclass(slots=True)
class WorkerCapacity:
    rate: float  # requests/s one aggregated worker serves within the planned latencies
    prefill_ms: float  # one mean (uncached) prompt, corrected
    utilisation: float  # its prefill busy share at that rate
    batch: float  # sequences decoding on it at that rate (Little's law)
    step_ms: float  # its decode step at that batch, corrected
    ttft_ms: float  # predicted mean TTFT at that rate
    itl_ms: float  # predicted mean ITL at that rate
    feasible: bool


def _worker_latency(rate: float, s_ms: float, isl: float, osl: float, model: PerfModel,
                    cap_tokens: float, max_running: int, kv_fill: float, max_util: float,
                    itl_correction: float) -> tuple[float, float, float, float, float] | None:
    """(rho, TTFT, ITL, batch, step) of one aggregated worker taking `rate` requests/s; None
    when it cannot keep up (prefill saturated, or the decode batch outgrows KV or the
    engine's running limit)."""
    rho = rate * s_ms / 1000.0
    if rho >= max_util:
        return None
    ttft = s_ms + rho * s_ms / (2 * (1 - rho))  # M/D/1 wait + the prompt's own prefill
    ctx = max(1.0, isl + osl / 2.0)  # mean context of a decoding sequence
    # A sequence gets a token per step only in the time prompts leave (1 - rho), and the
    # batch is what Little's law keeps decoding at that pace: b = rate x osl x ITL(b). ITL
    # grows with b, so iterating from b = 0 climbs to the smallest fixed point (or past a
    # limit when there is none: the decode side is saturated)
    b, itl, step = 0.0, 0.0, 0.0
    for _ in range(40):
        step = model.decode_ms(max(b, 1e-3), min(1.0, b * ctx / cap_tokens)) * itl_correction
        itl = step / (1 - rho)
        nb = rate * osl * itl / 1000.0
        if nb > max_running or nb * ctx > kv_fill * cap_tokens:
            return None
        if abs(nb - b) <= 1e-3 * max(1.0, nb):
            b = nb
            break
        b = nb
    else:
        return None
    return rho, ttft, itl, b, step


def worker_capacity(uncached_isl: float, isl: float, osl: float, model: PerfModel,
                    ttft_ms: float, itl_ms: float, kv_tokens_per_worker: float,
                    max_running: int, kv_fill: float = 0.9, max_utilisation: float = 0.9,
                    ttft_correction: float = 1.0, itl_correction: float = 1.0,
                    ) -> WorkerCapacity:
    """The largest arrival rate one aggregated worker (it computes prompts and decodes) serves
    with a mean TTFT <= `ttft_ms` and a mean ITL <= `itl_ms` (`_worker_latency`; both grow
    with the rate, so bisection finds it). A pool of n such workers behind a balancing router
    serves n times that: the need is rate / capacity, and a forecast needs one solve, not one
    per rate. When even a trickle misses a target (one prompt's prefill over TTFT, one
    sequence's step over ITL) the worker is planned at half its prefill saturation and
    reported not feasible."""
    s = model.prefill_ms(max(1.0, uncached_isl)) * ttft_correction
    cap = max(1.0, kv_tokens_per_worker)
    args = (s, isl, osl, model, cap, max(1, max_running), kv_fill, max_utilisation,
            itl_correction)
    hi = max_utilisation * 1000.0 / s  # prefill saturation
    lo = 0.0
    tiny = _worker_latency(hi * 1e-6, *args)
    feasible = tiny is not None and tiny[1] <= ttft_ms and tiny[2] <= itl_ms
    if not feasible:
        lo = 0.5 * hi
    else:
        for _ in range(24):  # relative precision 2^-24 of prefill saturation
            mid = 0.5 * (lo + hi)
            r = _worker_latency(mid, *args)
            if r is not None and r[1] <= ttft_ms and r[2] <= itl_ms:
                lo = mid
            else:
                hi = mid
    at = _worker_latency(lo, *args) or (lo * s / 1000.0, s, 0.0, 0.0, 0.0)
    return WorkerCapacity(lo, s, at[0], at[3], at[4], at[1], at[2], feasible)


class SloPolicy:
    """The smallest pools that meet the TTFT and ITL targets at the forecast load.

    Aggregated workers (role decode or both, no prefill pool managed) do both jobs: the pool
    needs the prefill share plus the decode share. With a prefill pool the two are sized
    apart, which sets the prefill:decode ratio. The model's predictions are corrected by the
    ratio of observed to predicted TTFT/ITL (bounded), so a model that is off (overheads it
    does not see, a different engine) is pulled towards what clients get. A KV safety net
    from the load signal adds workers whatever the model says when KV is nearly full.
    """

    name = "slo"

    def __init__(self, config: SloPolicyConfig, forecaster: ArrivalForecaster,
                 model: PerfModel, ttft: LatencyWindow, itl: LatencyWindow) -> None:
        self.config = config
        self.forecaster = forecaster
        self.model = model
        self.ttft = ttft
        self.itl = itl
        self.ttft_correction = 1.0
        self.itl_correction = 1.0
        self.boost = 1.0  # attainment feedback (SloPolicyConfig)
        self.attainment: float | None = None  # the worse of TTFT and ITL, recent requests
        self.long_attainment: float | None = None  # its EWMA over attainment_memory_s
        self._att_ms: float | None = None
        self.predicted_ttft_ms: float | None = None
        self.predicted_itl_ms: float | None = None
        self._kv: dict[str, TrendEstimator] = {}  # KV demand per pool, for the safety net
        # demonstrated capacity: (ms, u) per decision over a latency window, and (ms, the
        # window's highest u, met the target) per decision over demo_memory_s (bounded: a
        # decision a second keeps 600 of each)
        self._u: deque[tuple[float, float]] = deque(maxlen=4096)
        self._demo: deque[tuple[float, float, bool]] = deque(maxlen=4096)
        self.demo_u = 1.0  # u*: the fleet serves this many times the model's capacity
        self._growing_ms: float | None = None  # when a pool last had workers starting
        # (ms, capacity per worker) per decision over the last period, for the seasonal
        # floor at long horizons (SloPolicyConfig.seasonal_costly_horizon_s); bounded: a
        # decision a second keeps 900 at the longest period
        self._caps: deque[tuple[float, float]] = deque(maxlen=4096)
        self._model_slow = False  # clients' median TTFT above the model's (trim_ttft_max)

    @staticmethod
    def _correct(current: float, observed: float | None, predicted: float | None,
                 c: SloPolicyConfig) -> float:
        if observed is None or predicted is None or predicted <= 0:
            return current
        ratio = min(c.correction_max, max(c.correction_min, observed / predicted))
        return current + c.correction_alpha * (ratio - current)

    def _update_corrections(self, now_ms: float, views: dict[str, PoolView],
                            prefill_role: str, decode_role: str,
                            horizon_s: float = math.inf) -> None:
        c, f, m = self.config, self.forecaster, self.model
        uncached = f.isl * (1 - f.hit_ratio)
        # what the model (uncorrected) says clients get at today's pool sizes and load
        pv = views.get(prefill_role)
        n_p = max(1, pv.ready if pv else 1)
        s = m.prefill_ms(max(1.0, uncached))
        rho = f.level * s / 1000.0 / n_p
        self.predicted_ttft_ms = s + rho * s / (2 * (1 - rho)) if rho < 0.95 else None
        dv = views.get(decode_role)
        if dv is not None and dv.reporting > 0 and dv.running > 0:
            b = dv.running / dv.reporting
            u = min(1.0, dv.kv_used_blocks / max(1.0, dv.kv_blocks_per_worker * dv.reporting))
            self.predicted_itl_ms = m.decode_ms(b, u)
            if prefill_role == decode_role:
                # aggregated: the prompts a worker computes stretch its decode steps, a
                # sequence gets a token per step only in the time prefill leaves (observed
                # ITL is that, not the bare step: without this the correction blamed the
                # step model and sized decode for a batch of 2-3 at peak load)
                self.predicted_itl_ms /= max(0.1, 1.0 - min(0.9, rho))
        else:
            self.predicted_itl_ms = None
        if any(v.starting or (v.ceiling and v.target >= v.ceiling and v.ready >= v.ceiling)
               for v in views.values()):
            # growing, or at its ceiling: a pool that cannot have what it needs is caught
            # short too (capped at 3 workers on the Mooncake sinusoid, the boost went to its
            # cap at each peak and kept the pool at 3 through every trough)
            self._growing_ms = now_ms
        self._model_slow = (horizon_s >= c.trim_ttft_min_horizon_s
                            and self._ttft_above_model(now_ms))
        self._update_boost(now_ms)
        if self._recent_growth(now_ms):
            # latencies from a pool caught short (growing, or within a latency window of its
            # last growth) measure the start-up time, not the model: on the bursty Azure
            # trace they pulled the TTFT correction to its cap at each burst, the capacity
            # of a worker to a seventh, and the pool to its ceiling
            return
        if self.ttft.count(now_ms) >= c.min_latency_samples:
            # the median request, as for ITL below: a burst's queue is the tail's, and the
            # feedback on the tail is the attainment boost
            self.ttft_correction = self._correct(self.ttft_correction,
                                                 self.ttft.quantile(now_ms, 0.5),
                                                 self.predicted_ttft_ms, c)
        if self.itl.count(now_ms) >= c.min_latency_samples:
            # the median request, not the mean: ITL samples are one mean per request, and a
            # request of a few tokens that waited behind one long prompt chunk has a mean ten
            # times its neighbours' (on the Mooncake trace the mean pulled the correction to
            # its cap of 4 while the typical request ran at the predicted step)
            self.itl_correction = self._correct(self.itl_correction,
                                                self.itl.quantile(now_ms, 0.5),
                                                self.predicted_itl_ms, c)

    def _ttft_above_model(self, now_ms: float) -> bool:
        """Whether the recent requests' median TTFT is above `trim_ttft_max` times the
        uncorrected model's prediction (`SloPolicyConfig.trim_ttft_max`); False without
        enough samples or a prediction."""
        c = self.config
        pred = self.predicted_ttft_ms
        if (c.trim_ttft_max is None or pred is None or pred <= 0
                or self.ttft.count(now_ms) < c.min_latency_samples):
            return False
        obs = self.ttft.quantile(now_ms, 0.5)
        return obs is not None and obs > c.trim_ttft_max * pred

    def caught_short(self, now_ms: float) -> None:
        """The pool is short of its need on purpose (the core holds a scale-up on the
        attainment's slack, `PlannerConfig.slack_hold_above`): latencies from now until a
        latency window after are the hold's, not the model's, as while workers start."""
        self._growing_ms = now_ms

    def _recent_growth(self, now_ms: float) -> bool:
        window_ms = max(self.ttft.window_ms, self.itl.window_ms)
        return self._growing_ms is not None and now_ms - self._growing_ms < window_ms

    def _update_boost(self, now_ms: float) -> None:
        c = self.config
        shares = []
        for window, target in ((self.ttft, c.ttft_ms), (self.itl, c.itl_ms)):
            if window.count(now_ms) >= c.min_latency_samples:
                shares.append(window.fraction_within(now_ms, target))
        if not shares:
            self.attainment = None
            return  # no traffic, no evidence: the boost stays as it is
        self.attainment = att = min(shares)
        if self.long_attainment is None or self._att_ms is None:
            self.long_attainment = att
        else:
            dt = max(0.0, now_ms - self._att_ms) / 1000.0
            a = 1.0 - math.exp(-dt / c.attainment_memory_s)
            self.long_attainment += a * (att - self.long_attainment)
        self._att_ms = now_ms
        allowed = 1.0 - c.attainment_target
        miss = (1.0 - att) / allowed  # 1: exactly at the target
        if self.boost < 1.0 or (c.boost_min < 1.0 and self.boost == 1.0):
            # the trim: misses past the target undo it whatever their cause (it is the
            # trim's saving that is at stake); long-run attainment with room extends it
            if miss > 1.0:
                self.boost = min(1.0, self.boost + 4 * c.boost_gain * min(2.0, miss - 1.0))
            elif self.long_attainment > c.trim_above and not self._model_slow:
                self.boost = max(c.boost_min, self.boost - c.trim_gain)
            if self.boost < 1.0 or miss <= 1.0:
                return
        # misses while the pool is growing, or from before the workers asked for joined,
        # are the start-up time's, not the model's: they do not grow the boost (they did, to
        # its cap, at each peak of the Mooncake sinusoid, and held the next trough at peak)
        if miss > 1.0 and not self._recent_growth(now_ms):
            self.boost = min(c.boost_max, self.boost + c.boost_gain * min(2.0, miss - 1.0))
        elif miss <= 0.25:
            self.boost = max(1.0, 1.0 + (self.boost - 1.0) * (1.0 - c.boost_decay))
            if self.boost - 1.0 < _BOOST_SNAP:
                self.boost = 1.0

    def _update_demo(self, now_ms: float, ready: int, capacity: float) -> None:
        """Demonstrated capacity (SloPolicyConfig.demo_memory_s)."""
        c = self.config
        if not c.demo_memory_s:
            return
        # caught short at this decision (`_update_corrections` marks a pool with workers
        # starting or held at its ceiling)
        short = c.demo_skip_short and self._growing_ms == now_ms
        if ready > 0 and capacity > 0 and self.forecaster.level > 0 and not short:
            self._u.append((now_ms, self.forecaster.level / (ready * capacity)))
        window_ms = max(self.ttft.window_ms, self.itl.window_ms)
        while self._u and self._u[0][0] < now_ms - window_ms:
            self._u.popleft()
        since = now_ms - c.demo_memory_s * 1000.0
        while self._demo and self._demo[0][0] < since:
            self._demo.popleft()
        if self.attainment is not None and len(self._u) >= 2 and (
                now_ms - self._u[0][0] >= 0.5 * window_ms):
            u = max(x for _, x in self._u)
            ok = self.attainment >= c.attainment_target
            # a window that met the target shows capacity whatever the pool was doing; one
            # that missed it while the pool was caught short shows the start-up (or the
            # ceiling), not the capacity (counting those, a pool that fell to 2 at a trough
            # of the Mooncake sinusoid and met the rise late "missed" at u 0.7: no u* > 1)
            if ok or not self._recent_growth(now_ms):
                self._demo.append((now_ms, u, ok))
        missed = min((u for _, u, ok in self._demo if not ok), default=math.inf)
        met = max((u for _, u, ok in self._demo if ok and u < missed), default=1.0)
        self.demo_u = min(1.0 / c.boost_min, max(1.0, met))

    def _costly_capacity(self, horizon_s: float) -> float | None:
        """The lowest capacity per worker of the last period, at horizons of at least
        `SloPolicyConfig.seasonal_costly_horizon_s`; None below (or with none kept)."""
        h = self.config.seasonal_costly_horizon_s
        if h is None or horizon_s < h or not self._caps:
            return None
        return min(x for _, x in self._caps)

    def evaluate_all(self, now_ms: float, views: dict[str, PoolView], horizon_s: float,
                     ) -> dict[str, PoolNeed]:
        c, f = self.config, self.forecaster
        disagg = ROLE_PREFILL in views and len(views) > 1
        serving = [r for r in views if r != ROLE_PREFILL] or list(views)
        decode_role = serving[0]
        prefill_role = ROLE_PREFILL if disagg else decode_role
        self._update_corrections(now_ms, views, prefill_role, decode_role, horizon_s)
        dv = views[decode_role]
        kv_tokens = dv.kv_tokens_per_worker
        uncached = f.isl * (1 - f.hit_ratio)
        rate_ahead, rate_now = f.forecast(horizon_s), f.level
        peak = f.seasonal_peak(horizon_s)

        budget = c.latency_budget
        ttft_plan, itl_plan = c.ttft_ms * budget, c.itl_ms * budget
        agg = None
        if not disagg:
            agg = worker_capacity(uncached, f.isl, f.osl, self.model, ttft_plan, itl_plan,
                                  kv_tokens, dv.max_running, c.kv_fill, c.max_utilisation,
                                  self.ttft_correction, self.itl_correction)
            self._update_demo(now_ms, dv.ready, agg.rate)
            if self.demo_u > 1.0:
                agg.rate *= self.demo_u
            if agg.rate > 0:
                self._caps.append((now_ms, agg.rate))
            since = now_ms - (f.period_s or _DEFAULT_PERIOD_S) * 1000.0
            while self._caps and self._caps[0][0] < since:
                self._caps.popleft()

        def need(rate: float) -> tuple[PrefillSizing, DecodeSizing]:
            p = size_prefill(rate, uncached, self.model, ttft_plan, c.max_utilisation,
                             self.ttft_correction)
            d = size_decode(rate, f.isl, f.osl, self.model, itl_plan, kv_tokens,
                            dv.max_running, c.kv_fill, self.itl_correction)
            return p, d

        def agg_need(rate: float) -> float:
            return rate / agg.rate if agg is not None and agg.rate > 0 and rate > 0 else 0.0

        # Poisson noise on the rate: scale up on what the rate surely is (lower bound), size
        # and scale down on what it could be (upper bound)
        sigma = c.noise_z * f.noise()
        rate_low = max(0.0, rate_ahead - c.up_noise_z * f.noise())
        p_ahead, d_ahead = need(rate_ahead)
        p_low, d_low = need(rate_low)
        p_now, d_now = need(rate_now + sigma)
        kv_now: dict[str, float] = {}
        kv_ahead: dict[str, float] = {}
        for role, v in views.items():
            sm = self._kv.get(role)
            if sm is None:
                sm = self._kv[role] = TrendEstimator(3.0, 30.0)
            per = v.kv_blocks_per_worker
            sm.update(now_ms, v.kv_used_blocks / per if per > 0 else 0.0)
            kv_now[role] = sm.level
            kv_ahead[role] = max(sm.project(horizon_s), sm.sustained())
        m = 1 + c.down_margin
        inputs = {"rate": rate_now, "rate_forecast": rate_ahead, "rate_noise": f.noise(),
                  "period_s": f.period_s or 0.0, "seasonal_weight": f.seasonal_weight,
                  "rate_seasonal_peak": -1.0 if peak is None else peak,
                  "isl": f.isl, "osl": f.osl,
                  "hit_ratio": f.hit_ratio, "prefill_ms": p_ahead.service_ms,
                  "decode_step_ms": d_ahead.step_ms, "decode_batch": float(d_ahead.batch),
                  "ttft_correction": self.ttft_correction,
                  "itl_correction": self.itl_correction, "slo_boost": self.boost,
                  "demonstrated_capacity": self.demo_u,
                  "attainment": -1.0 if self.attainment is None else self.attainment}
        if agg is not None:
            inputs.update({"worker_capacity_rps": agg.rate, "prefill_ms": agg.prefill_ms,
                           "prefill_utilisation": agg.utilisation,
                           "decode_batch": agg.batch, "decode_step_ms": agg.step_ms,
                           "ttft_planned_ms": agg.ttft_ms, "itl_planned_ms": agg.itl_ms})
        infeasible = []
        if agg is not None and not agg.feasible:
            infeasible.append(f"one worker misses TTFT {ttft_plan:.0f} ms or ITL "
                              f"{itl_plan:.0f} ms (planned: {budget:.0%} of the targets) even "
                              f"at a trickle (prefill {agg.prefill_ms:.0f} ms per prompt)")
        if agg is None and not p_ahead.feasible:
            infeasible.append(f"TTFT target {c.ttft_ms:.0f} ms is below the prefill time of a "
                              f"mean prompt ({p_ahead.service_ms:.0f} ms)")
        if agg is None and not d_ahead.feasible:
            infeasible.append(f"ITL target {c.itl_ms:.0f} ms is below one sequence's decode "
                              f"step ({d_ahead.step_ms:.1f} ms)")
        note = ("; not feasible: " + "; ".join(infeasible)) if infeasible else ""
        head = (f"forecast {rate_ahead:.2f} req/s (now {rate_now:.2f} +- {sigma:.2f}), prompt "
                f"{f.isl:.0f} tokens ({f.hit_ratio:.0%} cached), output {f.osl:.0f}")
        out: dict[str, PoolNeed] = {}
        peak2 = f.seasonal_peak(2 * horizon_s)
        # the cycle's rate when a worker asked for now would join (one start-up ahead)
        at_join = f.seasonal_at(horizon_s) if f.seasonal_weight >= c.seasonal_min_weight else None
        joins_falling = at_join is not None and at_join < f.level
        inputs["rate_seasonal_at_join"] = -1.0 if at_join is None else at_join

        def seasonal_need(rate: float) -> int:
            if disagg:
                pp, dp = need(rate)
                w = pp.workers if role == ROLE_PREFILL else dp.workers
            else:
                w = agg_need(rate)
            # not trimmed, and with the down margin: the trim aims a pool that is there at
            # the target, while a forecast has no latencies to correct it before it is due
            boost = self.boost if c.seasonal_trim else max(1.0, self.boost)
            return ceil_workers(w * boost * (1 + c.seasonal_margin))

        for role in views:
            if disagg and role == ROLE_PREFILL:
                raw, raw_now = p_low.workers, p_now.workers
                why = (f"{head}: prefill {p_ahead.service_ms:.0f} ms per prompt at most "
                       f"{p_ahead.utilisation:.0%} busy for TTFT {c.ttft_ms:.0f} ms")
            elif disagg:
                raw, raw_now = d_low.workers, d_now.workers
                why = (f"{head}: {d_ahead.concurrency:.1f} sequences decoding, {d_ahead.batch}"
                       f" per worker at {d_ahead.step_ms:.1f} ms/step for ITL {c.itl_ms:.0f} ms")
            else:
                assert agg is not None
                raw, raw_now = agg_need(rate_low), agg_need(rate_now + sigma)
                raw_seen = agg_need(rate_now)
                why = (f"{head}: a worker serves {agg.rate:.2f} req/s within {budget:.0%} of "
                       f"the targets (prefill {agg.prefill_ms:.0f} ms per prompt, "
                       f"{agg.utilisation:.0%} busy; {agg.batch:.1f} seqs decoding at "
                       f"{agg.step_ms:.1f} ms/step: TTFT {agg.ttft_ms:.0f} ms, ITL "
                       f"{agg.itl_ms:.1f} ms), {agg_need(rate_ahead):.2f} workers' worth")
            boost_eff = self.boost
            if agg is not None and self.demo_u > 1.0 and boost_eff < 1.0:
                boost_eff = min(1.0, boost_eff * self.demo_u)
            if boost_eff != 1.0:
                raw, raw_now = raw * boost_eff, raw_now * boost_eff
                seen = (f"{self.attainment:.0%} of recent requests met the targets"
                        if self.attainment is not None else "no recent requests")
                why += f"; x{boost_eff:.2f}: {seen} (aim {c.attainment_target:.0%})"
            if agg is not None and self.demo_u > 1.0:
                why += (f"; capacity x{self.demo_u:.2f}: what the pool has served within the "
                        f"targets in the last {c.demo_memory_s:.0f} s")
            safety = ceil_workers(kv_ahead[role] / c.kv_safety)
            up = max(ceil_workers(raw), safety)
            settle_now = max(ceil_workers(raw_now * m), ceil_workers(kv_now[role] / c.kv_safety))
            if safety > ceil_workers(raw):
                why += (f"; KV safety: {kv_ahead[role]:.2f} workers' worth of KV in use "
                        f"(at most {c.kv_safety:.0%} each)")
            n = max(1, views[role].ready)
            falling = f.rate.slope() < 0 and self._kv[role].slope() <= 0
            sfloor = None
            settle = max(up, settle_now)
            if agg is not None and c.up_to_observed:
                settle = max(up, ceil_workers(raw_seen * boost_eff),
                             ceil_workers(kv_now[role] / c.kv_safety))
            if peak is not None and f.seasonal_weight >= c.seasonal_min_weight:
                sfloor = seasonal_need(peak)
                costly = self._costly_capacity(horizon_s) if agg is not None else None
                if costly is not None:
                    boost = self.boost if c.seasonal_trim else max(1.0, self.boost)
                    sfloor = max(sfloor, ceil_workers(
                        peak / costly * boost * (1 + c.seasonal_margin)))
                why += (f"; period {f.period_s:.0f} s (weight {f.seasonal_weight:.2f}): up to "
                        f"{peak:.2f} req/s within {horizon_s:.0f} s, {sfloor} workers")
                if peak2 is not None and c.seasonal_settle:
                    # a pool that grows now is not changed again until the workers join
                    # (one start-up) and the next ones start (another): size it for the
                    # cycle's peak until then
                    settle = max(settle, seasonal_need(peak2))
            out[role] = PoolNeed(up, settle, settle_now, why + note,
                                 {**inputs, "need": raw, "need_now": raw_now,
                                  "kv_usage_smoothed": kv_now[role] / n}, falling, sfloor,
                                 joins_falling, safety)
        return out
