"""Short-horizon forecasts the planner sizes pools for: how much load there will be when a
worker asked for now is ready (one start-up time ahead).

`TrendEstimator` splits a noisy signal into a level (an EWMA) and a slope, and extrapolates
only a slope the data supports: the Theil-Sen slope (median of the slopes between every pair
of recent points), used only when the points agree on a direction (Kendall's tau of value
against time is `min_z` standard deviations from what noise gives). A trend estimator that extrapolates every wiggle (plain Holt)
turns noise times a 30 s horizon into phantom load, and the pool oscillates with the noise.
A least-squares line has the opposite fault: a step at the end of its window looks like a
steep ramp and is extrapolated into twice the load. The median of pairwise slopes stays at 0
until a change has lasted a good part of the window (a step is then already in the level), and
follows a real ramp from a handful of points.

Everything is robust to no data: with nothing observed the level decays to 0 and a forecast
is 0, never NaN; non-finite or negative inputs are ignored; every loop over elapsed time and
every window is bounded.
"""

from __future__ import annotations

import math
from collections import deque

# Beyond this many empty buckets a level has decayed to nothing: stop iterating, reset.
_MAX_CATCHUP_BUCKETS = 512


def finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


class TrendEstimator:
    """Level (EWMA, time constant `tau_s`) and significant slope (Theil-Sen over the last
    `window_s`, at most `max_points` points: O(points^2) per fit, 496 pairs at most) of an
    irregularly sampled signal.

    `project(h)` is the level `h` seconds ahead. Only a rising slope is extrapolated (the
    planner never scales down ahead of a predicted fall: it waits to see it), and never to
    more than (1 + `max_growth`) times the level. For pure noise over n points tau has a
    standard deviation of sqrt(2(2n+5) / (9n(n-1))): 0.13 at 30 points, 0.29 at 8; a slope is
    used when tau is `min_z` of those away from 0.

    `sustained()` is the smallest of the last three raw points: a jump that has lasted three
    samples, before the EWMA level has caught up with it (a single spike does not count).
    """

    def __init__(self, tau_s: float = 3.0, window_s: float = 30.0, *, max_points: int = 32,
                 min_z: float = 3.0, max_growth: float = 1.0) -> None:
        if tau_s <= 0 or window_s <= 0 or max_points < 3:
            raise ValueError("tau_s and window_s must be > 0 and max_points >= 3")
        self.tau_s = tau_s
        self.window_ms = window_s * 1000.0
        self.min_z = min_z
        self._slope: float | None = None  # cached fit, None when points changed
        self.max_growth = max_growth
        self.level = 0.0
        self.last_ms: float | None = None
        self._gap_ms = self.window_ms / max_points  # points closer than this are merged
        self._points: deque[tuple[float, float]] = deque(maxlen=max_points)

    def update(self, now_ms: float, x: float) -> None:
        if not finite(x) or x < 0 or not finite(now_ms):
            return
        x = float(x)
        if self.last_ms is None:
            self.level, self.last_ms = x, now_ms
            self._points.append((now_ms, x))
            return
        dt = (now_ms - self.last_ms) / 1000.0
        if dt <= 0:
            return  # same instant (or the clock went back): keep the earlier sample
        self.level += (1.0 - math.exp(-dt / self.tau_s)) * (x - self.level)
        self.last_ms = now_ms
        self._slope = None
        pts = self._points
        if pts and now_ms - pts[-1][0] < self._gap_ms:
            pts[-1] = (pts[-1][0], x)  # too close to the last point: keep the newest value
        else:
            pts.append((now_ms, x))
        while pts and pts[0][0] < now_ms - self.window_ms:
            pts.popleft()

    def slope(self) -> float:
        """Units per second; 0 unless the points agree on a direction."""
        if self._slope is None:
            self._slope = self._fit()
        return self._slope

    def _fit(self) -> float:
        pts = self._points
        n = len(pts)
        if n < 5:
            return 0.0
        slopes = []
        agree = 0
        for i in range(n):
            ti, xi = pts[i]
            for j in range(i + 1, n):
                tj, xj = pts[j]
                s = (xj - xi) * 1000.0 / (tj - ti)
                slopes.append(s)
                agree += (s > 0) - (s < 0)
        tau = agree / len(slopes)  # Kendall's tau of value against time
        sd = math.sqrt(2 * (2 * n + 5) / (9 * n * (n - 1)))  # its spread for pure noise
        if abs(tau) < self.min_z * sd:
            return 0.0
        slopes.sort()
        return slopes[len(slopes) // 2]

    def sustained(self) -> float:
        pts = self._points
        if len(pts) < 3:
            return 0.0
        return min(pts[-1][1], pts[-2][1], pts[-3][1])

    def project(self, horizon_s: float) -> float:
        rise = max(0.0, self.slope()) * max(0.0, horizon_s)
        return max(0.0, self.level + min(rise, self.max_growth * self.level))

    def reset(self) -> None:
        self.level = 0.0
        self._points.clear()
        self._slope = None


class ArrivalForecaster:
    """Request arrival rate and mean prompt / output lengths, from arrivals counted into
    fixed buckets of `bucket_s`. Each closed bucket (an empty one is rate 0) updates a
    `TrendEstimator` on the rate and EWMAs of the lengths.

    With no traffic the rate goes to 0; the lengths keep their last values (they describe the
    requests that will come, and no requests says nothing new about them).
    """

    def __init__(self, bucket_s: float = 2.0, *, tau_s: float = 6.0, window_s: float = 60.0,
                 length_requests: float = 50.0, default_isl: float = 1024.0,
                 default_osl: float = 128.0, seasonal: bool = True,
                 cap_memory_s: float = 0.0, reach_s: float = 0.0) -> None:
        if bucket_s <= 0:
            raise ValueError(f"bucket_s must be > 0, got {bucket_s}")
        if not (finite(cap_memory_s) and cap_memory_s >= 0):
            raise ValueError(f"cap_memory_s must be >= 0, got {cap_memory_s}")
        if not (finite(reach_s) and reach_s >= 0):
            raise ValueError(f"reach_s must be >= 0, got {reach_s}")
        # the trend is extrapolated at most this far (0: the whole horizon asked for): a
        # line fitted over `window_s` says little about twice that far ahead
        self.reach_s = float(reach_s)
        # the smoothed level at each closed bucket over `cap_memory_s` (bounded: one per
        # bucket), for the projection's cap (`history_peak`)
        self.cap_memory_ms = cap_memory_s * 1000.0
        self._levels: deque[tuple[float, float]] = deque(
            maxlen=max(1, int(cap_memory_s / bucket_s) + 1))
        self._window_s = window_s
        self.bucket_ms = bucket_s * 1000.0
        self.rate = TrendEstimator(tau_s, window_s)  # requests per second
        # the recurring part of the rate (None: trend only)
        self.seasonal: SeasonalForecaster | None = SeasonalForecaster() if seasonal else None
        if length_requests <= 0:
            raise ValueError(f"length_requests must be > 0, got {length_requests}")
        # The mean lengths are weighted per request, with a memory of about this many
        # requests: a bucket of one long prompt must not move them as much as a bucket of
        # twelve (weighted per bucket, the Mooncake trace's mean prompt swung between 9k and
        # 23k tokens within a minute, and the pool size with it)
        self.length_requests = length_requests
        self.isl = default_isl  # mean prompt tokens
        self.osl = default_osl  # mean output tokens
        self.hit_ratio = 0.0  # prompt tokens served from cache / prompt tokens
        self.seen_lengths = False
        self._seen_osl = False
        self.last_rate = 0.0  # rate of the last closed bucket (the observed rate)
        self.total_arrivals = 0
        self._bucket_start: float | None = None
        self._count = 0
        self._prompt = 0
        self._cached = 0
        self._out_n = 0
        self._out = 0

    # ---- input ------------------------------------------------------------------------------
    def add(self, now_ms: float, count: int = 1, prompt_tokens: float = 0,
            cached_tokens: float = 0) -> None:
        if not (finite(count) and finite(prompt_tokens) and finite(cached_tokens)):
            return
        if count < 0 or prompt_tokens < 0 or cached_tokens < 0:
            return
        self.advance(now_ms)
        self._count += int(count)
        self._prompt += int(prompt_tokens)
        self._cached += int(min(cached_tokens, prompt_tokens))
        self.total_arrivals += int(count)

    def add_output(self, now_ms: float, finished: int, output_tokens: float) -> None:
        """Output lengths are known when requests finish (or, in a replay, at arrival)."""
        if not (finite(finished) and finite(output_tokens)) or finished <= 0 or output_tokens < 0:
            return
        self.advance(now_ms)
        self._out_n += int(finished)
        self._out += int(output_tokens)

    def advance(self, now_ms: float) -> None:
        """Close every bucket that ended by `now_ms`."""
        if not finite(now_ms):
            return
        if self._bucket_start is None:
            self._bucket_start = now_ms
            return
        elapsed = int((now_ms - self._bucket_start) // self.bucket_ms)
        if elapsed <= 0:
            return
        end = self._bucket_start + self.bucket_ms
        self._close(end)
        empty = elapsed - 1
        if empty > _MAX_CATCHUP_BUCKETS:
            self.rate.reset()  # a long silence: whatever the level was, it is gone
            self.rate.update(now_ms, 0.0)
            self.last_rate = 0.0
            if self.seasonal is not None:
                self.seasonal.add(now_ms, 0.0, self.bucket_ms / 1000.0)
        else:
            for i in range(empty):
                self.rate.update(end + (i + 1) * self.bucket_ms, 0.0)
                self._remember_level(end + (i + 1) * self.bucket_ms)
                if self.seasonal is not None:
                    self.seasonal.add(end + (i + 1) * self.bucket_ms, 0.0,
                                      self.bucket_ms / 1000.0)
            if empty:
                self.last_rate = 0.0
        self._bucket_start += elapsed * self.bucket_ms

    def _close(self, end_ms: float) -> None:
        rate = self._count / (self.bucket_ms / 1000.0)
        self.rate.update(end_ms, rate)
        self._remember_level(end_ms)
        self.last_rate = rate
        if self.seasonal is not None:
            self.seasonal.add(end_ms, rate, self.bucket_ms / 1000.0)
        if self._count and self._prompt:
            isl = self._prompt / self._count
            hit = self._cached / self._prompt
            if not self.seen_lengths:
                self.isl, self.hit_ratio = isl, hit
            else:
                a = 1.0 - math.exp(-self._count / self.length_requests)
                self.isl += a * (isl - self.isl)
                self.hit_ratio += a * (hit - self.hit_ratio)
            self.seen_lengths = True
        if self._out_n:
            osl = self._out / self._out_n
            a = 1.0 - math.exp(-self._out_n / self.length_requests)
            self.osl = osl if not self._seen_osl else self.osl + a * (osl - self.osl)
            self._seen_osl = True
        self._count = self._prompt = self._cached = self._out_n = self._out = 0

    # ---- output -----------------------------------------------------------------------------
    @property
    def level(self) -> float:
        """The smoothed arrival rate now (requests per second)."""
        return max(0.0, self.rate.level)

    def _remember_level(self, end_ms: float) -> None:
        if self.cap_memory_ms:
            self._levels.append((end_ms, self.rate.level))

    def history_peak(self) -> float | None:
        """The highest smoothed rate of the memory before the trend's own window (the
        points the slope is fitted on); None while nothing older than that window has been
        watched. Not held back until the whole memory is: then the first cycle's crest,
        a level the history had shown, was projected to the trend's 2x cap of it and a
        120 s start-up added workers the crest never needed (Mooncake sinusoid, router
        seed 5: 0.736 of static at peak instead of 0.697; docs/planner.md)."""
        lv = self._levels
        if not self.cap_memory_ms or not lv:
            return None
        cut = lv[-1][0] - self._window_s * 1000.0
        old = [x for t, x in lv if t <= cut]
        return max(old) if old else None

    def projection(self, horizon_s: float) -> float:
        """The trend's projection, capped by what the history has shown: a rise that stays
        below the highest level of the memory (a cycle's peak, the bursts before) is
        extrapolated no higher than that level; beyond it (new territory) the trend's own
        cap (2x the level) applies. A horizon beyond `reach_s` is projected as far as
        `reach_s` only: the trend's line is not extended further than it was fitted."""
        if self.reach_s and horizon_s > self.reach_s:
            horizon_s = self.reach_s
        trend = self.rate.project(horizon_s)
        peak = self.history_peak()
        if peak is None or self.level > peak:
            return trend
        return min(trend, peak)

    def forecast(self, horizon_s: float) -> float:
        """The arrival rate `horizon_s` from now (requests per second, >= 0): the trend's
        projection, raised towards the seasonal forecast by the weight that one earned. Only
        raised: a predicted fall is waited for, as the trend's are (`seasonal_peak` is what
        scaling down consults)."""
        trend = self.projection(horizon_s)
        p = self._seasonal(horizon_s, peak=False)
        return trend if p is None else max(trend, trend + self.seasonal_weight * (p - trend))

    def seasonal_at(self, horizon_s: float) -> float | None:
        """The seasonal forecast `horizon_s` ahead, unweighted; None without a period."""
        return self._seasonal(horizon_s, peak=False)

    def seasonal_peak(self, horizon_s: float) -> float | None:
        """The highest rate the seasonal forecast expects between now and `horizon_s` ahead,
        weighted as in `forecast` against today's level; None without a period."""
        p = self._seasonal(horizon_s, peak=True)
        if p is None:
            return None
        return max(self.level, self.level + self.seasonal_weight * (p - self.level))

    @property
    def seasonal_weight(self) -> float:
        return self.seasonal.weight if self.seasonal is not None else 0.0

    @property
    def period_s(self) -> float | None:
        return self.seasonal.period_s if self.seasonal is not None else None

    def _seasonal(self, horizon_s: float, peak: bool) -> float | None:
        s = self.seasonal
        if s is None or self._bucket_start is None or not finite(horizon_s):
            return None
        s.set_horizon(horizon_s)
        if s.weight <= 0:
            return None
        now = self._bucket_start
        return s.peak(now, horizon_s) if peak else s.forecast(now, horizon_s)

    def noise(self) -> float:
        """Standard deviation of the rate level from arrival noise alone (Poisson arrivals
        counted over the EWMA's effective window of 2 x tau): at 4 req/s and tau 6 s it is
        0.58 req/s, at 100 req/s 2.9. Sizing decisions keep a few of these apart so the pool
        does not follow the noise."""
        return math.sqrt(self.level / (2.0 * self.rate.tau_s))


class SeasonalForecaster:
    """A recurring shape in the arrival rate (a daily cycle, a slow wave): its period, found
    by autocorrelation over a bounded history, and the rate one start-up time ahead read from
    the same phase of the cycles before.

    A trend only sees a rise once it has started; a worker that takes longer to start than
    the rise takes to arrive is then late (on a 300 s sinusoid a 120 s start-up is 40% of the
    period). The cycle before says when the rise comes.

    The rate is kept in buckets of `bucket_s` (the arrival forecaster's smaller buckets summed
    into them), at most `history_s` of them: memory and the O(n x lags) detection per closed
    bucket are bounded (180 buckets, 90 lags: 16k products every 10 s). A period is accepted
    only when it is a local maximum of the autocorrelation, at least `min_corr` and 3 noise
    standard deviations (1/sqrt(overlap)) above 0, with a trough at least `min_dip` deep
    before it (a smooth trend has a high autocorrelation at every short lag and no trough),
    after at least `min_cycles` periods of history. Of the candidates within 90% of the best
    the shortest wins (a period's multiples correlate as well).

    The forecast is the same phase of the earlier cycles (their mean, up to `cycles`),
    shifted by how far the last bucket is from its own phase then (the level moves between
    cycles). Its weight is earned: over the last `skill_s` of history, at the horizon last
    asked for, how much smaller its error was than that of the rate `horizon` earlier
    (persistence): 1 when its error is at most `full_skill` (half) of persistence's, 0 when
    no smaller. Noise without a period has no period; a period that stopped predicting
    loses its weight within the skill window.
    """

    def __init__(self, bucket_s: float = 10.0, history_s: float = 1800.0, *,
                 min_period_s: float = 60.0, max_period_s: float = 900.0,
                 min_corr: float = 0.5, min_dip: float = 0.5, min_cycles: float = 2.0,
                 cycles: int = 3, skill_s: float = 600.0, full_skill: float = 0.5) -> None:
        if bucket_s <= 0 or history_s < 4 * bucket_s:
            raise ValueError("need bucket_s > 0 and history_s >= 4 buckets")
        if not 0 < min_period_s <= max_period_s:
            raise ValueError("need 0 < min_period_s <= max_period_s")
        if min_cycles < 1 or cycles < 1 or not 0 < full_skill < 1:
            raise ValueError("need min_cycles >= 1, cycles >= 1, 0 < full_skill < 1")
        self.bucket_ms = bucket_s * 1000.0
        self.min_lag = max(2, math.ceil(min_period_s / bucket_s))
        self.max_lag = max(self.min_lag, int(max_period_s / bucket_s))
        self.min_corr, self.min_dip, self.min_cycles = min_corr, min_dip, min_cycles
        self.cycles = cycles
        self.skill_buckets = max(3, int(skill_s / bucket_s))
        self.full_skill = full_skill
        self._buf: deque[float] = deque(maxlen=int(history_s / bucket_s))
        self._end_ms: float | None = None  # end of the last closed bucket
        self._start_ms: float | None = None  # start of the open bucket
        self._area = 0.0  # rate x seconds in the open bucket
        self.period_s: float | None = None  # detected period (None: none)
        self.corr = 0.0  # autocorrelation at that period
        self.weight = 0.0  # the forecast's earned weight, [0, 1]
        self.skill_horizon_s = 30.0  # horizon the skill is measured at (last asked)
        self._skill_at: float | None = None

    # ---- input ------------------------------------------------------------------------------
    def add(self, end_ms: float, rate: float, span_s: float) -> None:
        """The mean `rate` over the `span_s` seconds that ended at `end_ms`."""
        if not (finite(end_ms) and finite(rate) and finite(span_s)) or rate < 0 or span_s <= 0:
            return
        if self._start_ms is None:
            self._start_ms = end_ms - span_s * 1000.0
        if end_ms <= self._start_ms:
            return  # the clock went back: ignore
        # close every bucket that ended before this span's middle (the span lies in one
        # bucket when the smaller buckets divide this one, as the arrival forecaster's do)
        mid = end_ms - span_s * 500.0
        closed = 0
        while mid >= self._start_ms + self.bucket_ms:
            self._buf.append(self._area / (self.bucket_ms / 1000.0))
            self._area = 0.0
            self._start_ms += self.bucket_ms
            closed += 1
            if closed > (self._buf.maxlen or 1):  # a long silence: skip to now
                gap = int((mid - self._start_ms) // self.bucket_ms)
                self._start_ms += gap * self.bucket_ms
                self._buf.clear()
                break
        self._area += rate * span_s
        if closed:
            self._end_ms = self._start_ms
            self._detect()

    def set_horizon(self, horizon_s: float) -> None:
        if finite(horizon_s) and horizon_s >= 0 and horizon_s != self.skill_horizon_s:
            self.skill_horizon_s = horizon_s
            self._skill()

    # ---- detection --------------------------------------------------------------------------
    def _detect(self) -> None:
        x = list(self._buf)
        n = len(x)
        self.period_s, self.corr = None, 0.0
        top = min(self.max_lag, int(n / self.min_cycles))
        if top < self.min_lag:
            self.weight = 0.0
            return
        mean = math.fsum(x) / n
        d = [v - mean for v in x]
        var = math.fsum(v * v for v in d) / n
        if var <= 1e-12:
            self.weight = 0.0
            return
        r = [1.0]
        for k in range(1, min(top + 1, n - 1) + 1):
            r.append(math.fsum(d[i] * d[i + k] for i in range(n - k)) / ((n - k) * var))
        cands = []
        lowest = r[1]
        for k in range(1, top + 1):
            lowest = min(lowest, r[k])
            if k < self.min_lag:
                continue
            after = r[k + 1] if k + 1 < len(r) else -math.inf
            if r[k] < r[k - 1] or r[k] < after:
                continue
            if r[k] < max(self.min_corr, 3.0 / math.sqrt(n - k)) or r[k] - lowest < self.min_dip:
                continue
            cands.append(k)
        if cands:
            best = max(r[k] for k in cands)
            k = min(k for k in cands if r[k] >= 0.9 * best)
            # parabolic refinement of the peak (a period between buckets)
            frac = 0.0
            if k + 1 < len(r):
                den = r[k - 1] - 2 * r[k] + r[k + 1]
                if den < 0:
                    frac = max(-0.5, min(0.5, 0.5 * (r[k - 1] - r[k + 1]) / den))
            self.period_s = (k + frac) * self.bucket_ms / 1000.0
            self.corr = r[k]
        self._skill()

    # ---- reading ----------------------------------------------------------------------------
    def _value(self, t_ms: float) -> float | None:
        """The rate at `t_ms` by linear interpolation between bucket middles, smoothed over
        three buckets (1-2-1); None outside the history."""
        if self._end_ms is None or not self._buf:
            return None
        n = len(self._buf)
        first_mid = self._end_ms - (n - 0.5) * self.bucket_ms
        pos = (t_ms - first_mid) / self.bucket_ms
        if pos < -0.5 or pos > n - 0.5:
            return None

        def at(i: int) -> float:
            i = max(0, min(n - 1, i))
            lo, hi = max(0, i - 1), min(n - 1, i + 1)
            return 0.25 * self._buf[lo] + 0.5 * self._buf[i] + 0.25 * self._buf[hi]

        pos = max(0.0, min(n - 1.0, pos))
        i = int(pos)
        w = pos - i
        return at(i) if w == 0 else (1 - w) * at(i) + w * at(i + 1)

    def _seasonal(self, t_ms: float, known_ms: float) -> float | None:
        """Mean of the earlier cycles' rate at the phase of `t_ms`, using what was known at
        `known_ms` (only cycles at or before it)."""
        if self.period_s is None:
            return None
        p_ms = self.period_s * 1000.0
        vals = []
        t = t_ms - p_ms
        while t > known_ms:
            t -= p_ms  # a horizon longer than the period: the cycle before that
        while len(vals) < self.cycles:
            v = self._value(t)
            if v is None:
                break
            vals.append(v)
            t -= p_ms
        return math.fsum(vals) / len(vals) if vals else None

    def _predict(self, t_ms: float, known_ms: float) -> float | None:
        s_t = self._seasonal(t_ms, known_ms)
        now = self._value(known_ms)
        s_now = self._seasonal(known_ms, known_ms)
        if s_t is None or now is None or s_now is None:
            return None
        return max(0.0, s_t + (now - s_now))

    def _skill(self) -> None:
        """Weight from the forecast's error against persistence's over the recent history."""
        self.weight = 0.0
        if self.period_s is None or self._end_ms is None:
            return
        n = len(self._buf)
        h_ms = self.skill_horizon_s * 1000.0
        err_p = err_n = 0.0
        count = 0
        for j in range(max(0, n - self.skill_buckets), n):
            t = self._end_ms - (n - j - 0.5) * self.bucket_ms
            actual = self._buf[j]
            past = self._value(t - h_ms)
            pred = self._predict(t, t - h_ms)
            if past is None or pred is None:
                continue
            err_p += (pred - actual) ** 2
            err_n += (past - actual) ** 2
            count += 1
        if count < 6 or err_n <= 0:
            return
        ratio = err_p / err_n
        self.weight = max(0.0, min(1.0, (1.0 - ratio) / (1.0 - self.full_skill)))

    def forecast(self, now_ms: float, horizon_s: float) -> float | None:
        """The rate `horizon_s` after `now_ms` from the cycles before, or None (no period)."""
        if self.period_s is None or self._end_ms is None or not finite(now_ms):
            return None
        known = min(now_ms, self._end_ms - self.bucket_ms / 2)
        return self._predict(now_ms + max(0.0, horizon_s) * 1000.0, known)

    def peak(self, now_ms: float, horizon_s: float) -> float | None:
        """The highest rate forecast between now and `horizon_s` ahead (one point a bucket)."""
        if self.period_s is None:
            return None
        steps = max(1, math.ceil(max(0.0, horizon_s) * 1000.0 / self.bucket_ms))
        vals = [self.forecast(now_ms, horizon_s * i / steps) for i in range(steps + 1)]
        vals = [v for v in vals if v is not None]
        return max(vals) if vals else None
