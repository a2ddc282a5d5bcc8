"""The planner's seasonal forecast and learned burst floor (genset.planning), pure: a test
clock feeds arrival counts, nothing sleeps, every random draw is seeded."""

from __future__ import annotations

import math
import random

import pytest

from genset.planning import PlannerConfig, PlannerCore, PoolBounds, SloPolicyConfig
from genset.planning.forecast import ArrivalForecaster, SeasonalForecaster
from genset.planning.observations import LatencyWindow
from genset.planning.perf_model import PerfModel
from genset.planning.policies import PoolView, SloPolicy


def poisson(rng: random.Random, lam: float) -> int:
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def feed(f: ArrivalForecaster, rate, seconds: float, seed: int = 1, t0: float = 0.0,
         check=None, isl: int = 1000) -> float:
    """Poisson arrivals at `rate(t_s)` into 2 s buckets; `check(t_ms)` after each bucket."""
    rng = random.Random(seed)
    t = t0
    for i in range(int(seconds / 2)):
        t = t0 + (i + 1) * 2000.0
        n = poisson(rng, rate((t - 1000.0) / 1000.0) * 2.0)
        f.add(t - 1000.0, n, n * isl)
        f.advance(t)
        if check is not None:
            check(t)
    return t


def wave(t_s: float) -> float:  # 2 .. 10 req/s, period 300 s
    return 6.0 + 4.0 * math.sin(2 * math.pi * t_s / 300.0)


def test_a_periodic_rate_is_detected_and_forecast_one_start_up_ahead():
    f = ArrivalForecaster()
    t = feed(f, wave, 1425)  # 4.75 periods: ends at a trough (2 req/s), the rise ahead
    assert f.period_s == pytest.approx(300.0, rel=0.05)
    assert f.seasonal_weight >= 0.5
    truth = wave(t / 1000.0 + 120)  # 9.2 req/s in 120 s
    assert f.rate.project(120) < 5.0  # the trend sees nothing coming ...
    assert f.forecast(120) == pytest.approx(truth, rel=0.25)  # ... the cycles before do
    assert f.seasonal_peak(120) >= f.forecast(120) - 1e-9
    # a fall ahead is never forecast (up only): at the peak the forecast is the trend's
    f2 = ArrivalForecaster()
    feed(f2, wave, 1275)  # ends at a peak
    assert f2.forecast(120) >= f2.rate.project(120) - 1e-9


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_noise_without_a_period_finds_no_period(seed):
    rng = random.Random(seed + 100)
    levels = [rng.uniform(2, 10) for _ in range(200)]  # a new random level every 10 s

    def check(t_ms: float) -> None:
        assert f.seasonal_weight == 0.0 or f.period_s is None
        assert f.forecast(120) == f.rate.project(120)

    f = ArrivalForecaster()
    feed(f, lambda t_s: 6.0, 1800, seed=seed, check=check)  # steady Poisson noise
    f = ArrivalForecaster()
    feed(f, lambda t_s: levels[int(t_s // 10) % 200], 1800, seed=seed, check=check)
    f = ArrivalForecaster()  # a slow ramp: a trend, not a cycle
    feed(f, lambda t_s: 1.0 + t_s / 200.0, 1800, seed=seed, check=check)


def test_seasonal_memory_is_bounded_and_a_long_silence_is_cheap():
    s = SeasonalForecaster(bucket_s=10.0, history_s=600.0)
    t = 0.0
    for i in range(20_000):
        t = (i + 1) * 2000.0
        s.add(t, wave(t / 1000.0), 2.0)
    assert len(s._buf) <= 60
    s.add(t + 1e12, 1.0, 2.0)  # a clock jump of 30 years: bounded work
    assert len(s._buf) <= 60
    f = ArrivalForecaster()
    feed(f, wave, 1500)
    f.advance(1500_000.0 + 1e12)
    assert f.forecast(120) == 0.0 and f.level == 0.0


def test_seasonal_forecast_is_safe_with_bad_input_and_without_traffic():
    s = SeasonalForecaster()
    assert s.forecast(0.0, 120) is None and s.peak(0.0, 120) is None
    for bad in ((math.nan, 1.0, 2.0), (1000.0, math.nan, 2.0), (1000.0, math.inf, 2.0),
                (1000.0, -1.0, 2.0), (1000.0, 1.0, 0.0), (1000.0, 1.0, -2.0)):
        s.add(*bad)
    assert not s._buf and s.period_s is None
    s.set_horizon(math.nan)
    assert s.skill_horizon_s == 30.0
    f = ArrivalForecaster()
    feed(f, lambda t_s: 0.0, 2000)  # reports keep coming, nobody asks: a real zero
    assert f.period_s is None and f.seasonal_weight == 0.0
    assert f.forecast(120) == 0.0 and f.seasonal_peak(120) is None
    assert math.isfinite(f.forecast(math.nan))


def test_slo_policy_keeps_a_seasonal_floor_only_when_a_period_predicts():
    def policy(rate) -> tuple[SloPolicy, float]:
        f = ArrivalForecaster()
        t = feed(f, rate, 1425, isl=16000)  # long prompts: a worker serves ~1-2 req/s
        return SloPolicy(SloPolicyConfig(ttft_ms=2000, itl_ms=50), f, PerfModel(),
                         LatencyWindow(), LatencyWindow()), t

    view = PoolView("decode", target=4, ready=4, starting=0, reporting=4,
                    kv_blocks_per_worker=4688, kv_tokens_per_worker=4688 * 64.0, ceiling=8)
    sp, t = policy(wave)
    need = sp.evaluate_all(t, {"decode": view}, 120.0)["decode"]
    # at the trough: what the rise needs within the start-up, more than today's need
    assert need.seasonal_floor is not None and need.seasonal_floor > need.settle_now
    assert "period" in need.why and need.inputs["seasonal_weight"] >= 0.5
    sp, t = policy(lambda t_s: 6.0)
    need = sp.evaluate_all(t, {"decode": view}, 120.0)["decode"]
    assert need.seasonal_floor is None


def test_slo_policy_flags_a_scale_up_whose_workers_would_join_after_the_cycle_turns():
    """`PoolNeed.joins_falling`: the seasonal forecast one start-up ahead (when a worker
    asked for now would join) is below today's level; only with a period that predicts."""
    def need_at(rate, seconds: float):
        f = ArrivalForecaster()
        t = feed(f, rate, seconds, isl=16000)
        sp = SloPolicy(SloPolicyConfig(ttft_ms=2000, itl_ms=50), f, PerfModel(),
                       LatencyWindow(), LatencyWindow())
        view = PoolView("decode", target=4, ready=4, starting=0, reporting=4,
                        kv_blocks_per_worker=4688, kv_tokens_per_worker=4688 * 64.0,
                        ceiling=8)
        return sp.evaluate_all(t, {"decode": view}, 120.0)["decode"], f

    need, f = need_at(wave, 1275)  # at a peak (10 req/s): in 120 s the rate is ~2.8
    assert need.joins_falling
    assert 0 <= need.inputs["rate_seasonal_at_join"] < f.level
    need, f = need_at(wave, 1425)  # at a trough: the rise comes within the start-up
    assert not need.joins_falling and need.inputs["rate_seasonal_at_join"] > f.level
    need, _ = need_at(lambda t_s: 6.0, 1425)  # no period: nothing known about the join
    assert not need.joins_falling and need.inputs["rate_seasonal_at_join"] == -1.0


def test_join_falling_hold_only_for_the_slo_policy_with_a_long_start_up():
    def core_for(startup: float, policy: str = "slo", **kw) -> PlannerCore:
        return PlannerCore(PlannerConfig(policy=policy, pools={"decode": PoolBounds(1, 8)},
                                         startup_s=startup, **kw), clock=lambda: 0.0)

    from genset.planning.policies import PoolNeed

    falls = PoolNeed(up=6, settle=6, settle_now=5, why="", joins_falling=True)
    rises = PoolNeed(up=6, settle=6, settle_now=5, why="", joins_falling=False)
    core = core_for(120.0)
    why = core._join_falling_hold(falls, 4, 1000.0)
    assert "holding 4" in why and "120 s" in why
    assert core.slo_policy._recent_growth(1000.0)  # misses while held are the hold's
    assert core_for(120.0)._join_falling_hold(rises, 4, 1000.0) == ""
    assert core_for(30.0)._join_falling_hold(falls, 4, 1000.0) == ""  # joins in time
    assert core_for(120.0, "load")._join_falling_hold(falls, 4, 1000.0) == ""
    assert core_for(120.0, join_falling_hold=False)._join_falling_hold(falls, 4, 1000.0) == ""


def test_learned_floor_keeps_the_median_burst_while_bursts_recur_then_lets_go():
    core = PlannerCore(PlannerConfig(policy="slo", pools={"decode": PoolBounds(1, 8)},
                                     startup_s=30.0, burst_memory_s=600.0),
                       clock=lambda: 0.0)
    pool = core.pools["decode"]
    window = 700_000.0

    def rec(t_s: float, need: int) -> None:
        pool.record(t_s * 1000.0, need, window)

    rec(0, 1)
    rec(100, 5)  # a burst from the floor (idle) to 5 ...
    rec(110, 6)  # ... peaking at 6 within a start-up
    rec(140, 1)
    assert core._learned_floor(pool, 150_000.0) == 0  # one burst is no pattern
    rec(250, 3)
    rec(270, 1)
    rec(400, 4)
    rec(420, 1)
    assert pool.jump_peaks(0.0, 430_000.0, 2.0, 10_000.0, 30_000.0, max_low=1) == [6, 3, 4]
    assert core._learned_floor(pool, 430_000.0) == 4  # the median burst
    # bursts that rise from above the floor (a level moving, not an idle gap) do not count
    assert pool.jump_peaks(0.0, 430_000.0, 2.0, 10_000.0, 30_000.0, max_low=0) == []
    # no burst for the whole memory: the floor lets go
    rec(1100, 1)
    assert core._learned_floor(pool, 1_100_000.0) == 0


def test_learned_floor_off_and_bad_config():
    core = PlannerCore(PlannerConfig(burst_memory_s=0.0), clock=lambda: 0.0)
    assert core.config.burst_memory_s == 0.0
    for kw in ({"burst_memory_s": -1.0}, {"burst_memory_s": math.nan},
               {"burst_quantile": 1.5}, {"burst_recur": 0}):
        with pytest.raises(ValueError):
            PlannerConfig(**kw)


def test_jump_hold_shrinks_once_bursts_are_learned_and_attainment_has_headroom():
    core = PlannerCore(PlannerConfig(policy="slo", pools={"decode": PoolBounds(1, 8)},
                                     startup_s=30.0, burst_memory_s=600.0,
                                     jump_hold_startups=4.0, jump_learned_startups=1.0,
                                     jump_gap_startups=None),  # the attainment gate
                       clock=lambda: 0.0)
    pool = core.pools["decode"]

    def rec(t_s: float, need: int) -> None:
        pool.record(t_s * 1000.0, need, 700_000.0)

    rec(0, 1)
    rec(100, 5)
    rec(140, 1)
    sp = core.slo_policy
    sp.long_attainment = 0.995
    # one burst is no pattern: the jump is held 4 start-ups whatever the attainment
    assert core.jump_hold_s(pool, 150_000.0) == pytest.approx(120.0)
    rec(250, 4)
    rec(270, 1)
    assert core._learned_floor(pool, 280_000.0) > 0  # bursts recur: learned
    assert core.jump_hold_s(pool, 280_000.0) == pytest.approx(30.0)
    # misses eat the headroom (long-run attainment at or below the trim's threshold) ...
    sp.long_attainment = sp.config.trim_above
    assert core.jump_hold_s(pool, 280_000.0) == pytest.approx(120.0)
    sp.long_attainment = None  # ... or no record yet: the full hold
    assert core.jump_hold_s(pool, 280_000.0) == pytest.approx(120.0)
    # the load policy keeps no attainment record: always the full hold
    load = PlannerCore(PlannerConfig(policy="load", startup_s=30.0), clock=lambda: 0.0)
    assert load.jump_hold_s(load.pools["decode"], 280_000.0) == pytest.approx(120.0)
    # off
    off = PlannerCore(PlannerConfig(policy="slo", startup_s=30.0, jump_learned_startups=None),
                      clock=lambda: 0.0)
    off.slo_policy.long_attainment = 1.0
    assert off.jump_hold_s(off.pools["decode"], 280_000.0) == pytest.approx(120.0)
    for kw in ({"jump_learned_startups": -1.0}, {"jump_learned_startups": math.inf},
               {"trend_cap_memory_s": -1.0}, {"trend_cap_memory_s": math.nan}):
        with pytest.raises(ValueError):
            PlannerConfig(**kw)


def test_jump_hold_spans_the_largest_gap_between_learned_bursts_plus_a_startup():
    def core_with(**kw) -> PlannerCore:
        return PlannerCore(PlannerConfig(policy="slo", pools={"decode": PoolBounds(1, 8)},
                                         startup_s=60.0, burst_memory_s=600.0,
                                         jump_hold_startups=4.0, **kw),
                           clock=lambda: 0.0)

    def bursts(core: PlannerCore, times_s: list[float]) -> None:
        pool = core.pools["decode"]
        pool.record(0.0, 1, 700_000.0)
        for t in times_s:  # from idle (the floor) to 5 and back
            pool.record(t * 1000.0, 5, 700_000.0)
            pool.record((t + 70) * 1000.0, 1, 700_000.0)

    core = core_with()
    pool = core.pools["decode"]
    bursts(core, [100.0])
    # one burst is no pattern: the full hold, 4 start-ups
    assert core.jump_hold_s(pool, 200_000.0) == pytest.approx(240.0)
    bursts(core, [250.0])
    # two bursts 150 s apart: held 150 s + one start-up (60 s), whatever the attainment
    for la in (None, 0.5, 0.995):
        core.slo_policy.long_attainment = la
        assert core.jump_hold_s(pool, 330_000.0) == pytest.approx(210.0)
    # a gap longer than 4 start-ups is capped there
    far = core_with()
    bursts(far, [100.0, 400.0])
    assert far.jump_hold_s(far.pools["decode"], 480_000.0) == pytest.approx(240.0)
    # never below `jump_learned_startups` start-ups
    short = core_with(jump_gap_startups=0.0, jump_learned_startups=3.0)
    bursts(short, [100.0, 250.0])
    assert short.jump_hold_s(short.pools["decode"], 330_000.0) == pytest.approx(180.0)
    # bursts that stay away for the whole memory are forgotten: the full hold again
    assert core.jump_hold_s(pool, 1_000_000.0) == pytest.approx(240.0)
    for kw in ({"jump_gap_startups": -1.0}, {"jump_gap_startups": math.nan}):
        with pytest.raises(ValueError):
            PlannerConfig(**kw)


def steady_then(f: ArrivalForecaster, levels: list[tuple[float, float]], t0: float = 0.0,
                ) -> float:
    """Exact counts (no noise) at `rate` for `seconds`, for each (rate, seconds), 2 s buckets."""
    t = t0
    for rate, seconds in levels:
        for _ in range(int(seconds / 2)):
            f.add(t, round(rate * 2), 1000, 0)
            t += 2000.0
    f.advance(t)
    return t


def ramp(f: ArrivalForecaster, lo: float, hi: float, seconds: float, t: float) -> float:
    n = int(seconds / 2)
    for i in range(n):
        f.add(t, round((lo + (hi - lo) * i / n) * 2), 1000, 0)
        t += 2000.0
    f.advance(t)
    return t


def test_trend_projection_is_capped_by_the_peak_the_history_has_shown():
    capped = ArrivalForecaster(bucket_s=2.0, seasonal=False, cap_memory_s=600.0)
    free = ArrivalForecaster(bucket_s=2.0, seasonal=False)
    for f in (capped, free):
        # a peak of 10 req/s, then a long trough at 2, then a rise that has reached 6
        t = steady_then(f, [(10.0, 100), (2.0, 500)])
        t = ramp(f, 2.0, 6.0, 40, t)
    assert free.rate.slope() > 0  # the rise is significant: the trend extrapolates it
    peak = capped.history_peak()
    assert peak is not None and 9.0 < peak <= 10.0
    assert free.forecast(120) > peak  # up to twice the level: 12 req/s for a peak of 10
    assert capped.forecast(120) == pytest.approx(min(free.forecast(120), peak))
    assert capped.forecast(120) > capped.level  # the rise is still extrapolated, to the peak
    # a history younger than the memory caps as well, once it holds levels older than the
    # trend's own window (the first cycle's crest is a level the history has shown) ...
    young = ArrivalForecaster(bucket_s=2.0, seasonal=False, cap_memory_s=600.0)
    t = steady_then(young, [(10.0, 100), (2.0, 200)])
    ramp(young, 2.0, 6.0, 40, t)
    assert young.history_peak() is not None and 9.0 < young.history_peak() <= 10.0
    assert young.forecast(120) <= young.history_peak()
    # ... but not before: every level watched is inside the window the slope is fitted on
    fresh = ArrivalForecaster(bucket_s=2.0, seasonal=False, cap_memory_s=600.0)
    ramp(fresh, 2.0, 6.0, 40, 0.0)
    assert fresh.history_peak() is None
    assert fresh.forecast(120) == pytest.approx(fresh.rate.project(120))
    # beyond the history's peak (new territory): the trend's own cap applies
    high = ArrivalForecaster(bucket_s=2.0, seasonal=False, cap_memory_s=600.0)
    t = steady_then(high, [(3.0, 600)])
    t = ramp(high, 3.0, 8.0, 40, t)
    assert high.level > high.history_peak()
    assert high.forecast(120) == pytest.approx(high.rate.project(120))
    with pytest.raises(ValueError):
        ArrivalForecaster(cap_memory_s=-1.0)


def test_seasonal_floor_at_long_start_ups_is_sized_at_the_costliest_mix_of_the_period():
    """`SloPolicyConfig.seasonal_costly_horizon_s`: with a start-up of 60 s or more the
    seasonal floor is the cycle's peak rate at the lowest capacity per worker seen over the
    last period (the mix that comes back with the peak), not at today's; shorter start-ups
    and capacities older than a period keep today's."""
    def policy(costly_h):
        f = ArrivalForecaster()
        t = feed(f, wave, 1425, isl=16000)
        sp = SloPolicy(SloPolicyConfig(ttft_ms=2000, itl_ms=50,
                                       seasonal_costly_horizon_s=costly_h), f, PerfModel(),
                       LatencyWindow(), LatencyWindow())
        return sp, t

    view = PoolView("decode", target=4, ready=4, starting=0, reporting=4,
                    kv_blocks_per_worker=4688, kv_tokens_per_worker=4688 * 64.0, ceiling=16)
    sp, t = policy(None)
    today = sp.evaluate_all(t, {"decode": view}, 120.0)["decode"]
    cap = today.inputs["worker_capacity_rps"]
    assert today.seasonal_floor is not None and cap > 0
    sp, t = policy(60.0)
    sp._caps.append((t - 100_000.0, cap / 2))  # the mix of the last peak: half the capacity
    costly = sp.evaluate_all(t, {"decode": view}, 120.0)["decode"]
    assert costly.seasonal_floor >= 2 * today.seasonal_floor - 1
    assert costly.up == today.up and costly.settle_now == today.settle_now  # the floor only
    sp, t = policy(None)
    today32 = sp.evaluate_all(t, {"decode": view}, 32.0)["decode"]
    sp, t = policy(60.0)
    sp._caps.append((t - 100_000.0, cap / 2))
    short = sp.evaluate_all(t, {"decode": view}, 32.0)["decode"]  # a 30 s start-up
    assert short.seasonal_floor is not None and short.seasonal_floor == today32.seasonal_floor
    sp, t = policy(60.0)
    sp._caps.append((t - 400_000.0, cap / 2))  # more than a period (300 s) ago: forgotten
    old = sp.evaluate_all(t, {"decode": view}, 120.0)["decode"]
    assert old.seasonal_floor == today.seasonal_floor
    with pytest.raises(ValueError, match="seasonal_costly_horizon_s"):
        SloPolicyConfig(seasonal_costly_horizon_s=-1.0)
