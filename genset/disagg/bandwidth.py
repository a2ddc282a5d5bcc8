"""The KV transfer bandwidth the cost model prices transfers with, learnt from transfers.

An EWMA of observed rates, so the estimate follows a link whose load changes, starting from
a prior until the first transfers are seen. Bounded in every sense: constant memory, a rate
clamped to [floor, ceiling] (one absurd sample, e.g. a clock jump, cannot make remote prefill
look free or impossible), and transfers too small to say anything about bandwidth (their
time is mostly the fixed setup) are not counted.
"""

from __future__ import annotations


class BandwidthEstimator:
    __slots__ = ("_rate", "alpha", "ceiling", "floor", "min_sample_bytes", "samples", "setup_s")

    def __init__(
        self,
        prior_bytes_per_s: float,
        *,
        alpha: float = 0.2,
        min_sample_bytes: int = 256 * 1024,
        setup_s: float = 0.0,
        floor: float = 1e6,
        ceiling: float = 1e12,
    ) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if not 0 < floor <= ceiling:
            raise ValueError(f"need 0 < floor <= ceiling, got {floor}, {ceiling}")
        if prior_bytes_per_s <= 0:
            raise ValueError(f"prior_bytes_per_s must be > 0, got {prior_bytes_per_s}")
        self.alpha = alpha
        self.min_sample_bytes = min_sample_bytes
        self.setup_s = setup_s
        self.floor = floor
        self.ceiling = ceiling
        self._rate = min(max(prior_bytes_per_s, floor), ceiling)
        self.samples = 0

    @property
    def bytes_per_s(self) -> float:
        return self._rate

    def observe(self, nbytes: int, seconds: float) -> bool:
        """Count one finished transfer of `nbytes` that took `seconds` (header to ack);
        False when it was too small or its time meaningless, and so ignored."""
        if nbytes < self.min_sample_bytes or seconds <= 0:
            return False
        moving = seconds - self.setup_s
        if moving <= 0:
            return False
        rate = min(max(nbytes / moving, self.floor), self.ceiling)
        if self.samples == 0:
            self._rate = rate  # the first measurement beats any prior
        else:
            self._rate += self.alpha * (rate - self._rate)
        self.samples += 1
        return True

    def predict_s(self, nbytes: int) -> float:
        """Seconds to move `nbytes` at the current estimate (setup included)."""
        return self.setup_s + nbytes / self._rate
