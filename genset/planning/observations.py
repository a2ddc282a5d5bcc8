"""What the planner consumes, as plain values (no bus, no proto needed to feed it).

Live, `services/planner` turns bus messages into these; the replay builds them from its
simulated workers and requests.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass

ROLE_DECODE = "decode"  # serves whole requests, or decodes after a remote prefill
ROLE_PREFILL = "prefill"  # computes prompts for decode workers
ROLE_BOTH = "both"  # aggregated worker (the typed-role name for what older cards call decode)
ROLES = (ROLE_DECODE, ROLE_PREFILL, ROLE_BOTH)


@dataclass(slots=True)
class WorkerLoad:
    """A worker's latest load report (`proto.LoadReport` fields), stamped with the planner's
    clock when it arrived."""

    running: int = 0
    waiting: int = 0
    waiting_prefill_tokens: int = 0
    kv_used_blocks: int = 0
    kv_total_blocks: int = 0
    received_ms: float = 0.0

    @property
    def inflight(self) -> int:
        return self.running + self.waiting

    @property
    def kv_usage(self) -> float:
        return self.kv_used_blocks / self.kv_total_blocks if self.kv_total_blocks > 0 else 0.0


def valid_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class LatencyWindow:
    """Latency samples (ms) of the last `window_s`, at most `max_samples` of them (the oldest
    go first): mean and nearest-rank quantiles; None when there are none."""

    def __init__(self, window_s: float = 60.0, max_samples: int = 4096) -> None:
        self.window_ms = window_s * 1000.0
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)

    def add(self, now_ms: float, value_ms: float) -> None:
        if isinstance(value_ms, int | float) and math.isfinite(value_ms) and value_ms >= 0:
            self._samples.append((now_ms, float(value_ms)))

    def _prune(self, now_ms: float) -> None:
        cut = now_ms - self.window_ms
        s = self._samples
        while s and s[0][0] < cut:
            s.popleft()

    def count(self, now_ms: float) -> int:
        self._prune(now_ms)
        return len(self._samples)

    def mean(self, now_ms: float) -> float | None:
        self._prune(now_ms)
        if not self._samples:
            return None
        n = len(self._samples)
        total = sum(v for _, v in self._samples)
        if math.isinf(total):
            # samples near the float limit (1e308 ms, which a FrontendStats may carry) sum to
            # inf, and inf is not JSON: divide each first (only then: it rounds differently)
            return sum(v / n for _, v in self._samples)
        return total / n

    def quantile(self, now_ms: float, q: float) -> float | None:
        self._prune(now_ms)
        if not self._samples:
            return None
        vals = sorted(v for _, v in self._samples)
        return vals[round(q * (len(vals) - 1))]

    def fraction_within(self, now_ms: float, limit_ms: float) -> float | None:
        """Share of samples <= limit (SLO attainment); None without samples."""
        self._prune(now_ms)
        if not self._samples:
            return None
        vals = sorted(v for _, v in self._samples)
        return bisect.bisect_right(vals, limit_ms) / len(vals)
