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
                 default_osl: float = 128.0) -> None:
        if bucket_s <= 0:
            raise ValueError(f"bucket_s must be > 0, got {bucket_s}")
        self.bucket_ms = bucket_s * 1000.0
        self.rate = TrendEstimator(tau_s, window_s)  # requests per second
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
        else:
            for i in range(empty):
                self.rate.update(end + (i + 1) * self.bucket_ms, 0.0)
            if empty:
                self.last_rate = 0.0
        self._bucket_start += elapsed * self.bucket_ms

    def _close(self, end_ms: float) -> None:
        rate = self._count / (self.bucket_ms / 1000.0)
        self.rate.update(end_ms, rate)
        self.last_rate = rate
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

    def forecast(self, horizon_s: float) -> float:
        """The arrival rate `horizon_s` from now (requests per second, >= 0)."""
        return self.rate.project(horizon_s)

    def noise(self) -> float:
        """Standard deviation of the rate level from arrival noise alone (Poisson arrivals
        counted over the EWMA's effective window of 2 x tau): at 4 req/s and tau 6 s it is
        0.58 req/s, at 100 req/s 2.9. Sizing decisions keep a few of these apart so the pool
        does not follow the noise."""
        return math.sqrt(self.level / (2.0 * self.rate.tau_s))
