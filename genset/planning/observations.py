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


# ---- plausibility of what one message claims ------------------------------------------------
# The planner's inputs come over the bus from frontends, routers and workers, and anyone who
# can publish there is not trusted by default: one message claiming 2**63 arrivals (or a
# TTFT of 1e308 ms) took every pool to its ceiling. Each bound below sits far past anything an
# honest publisher can reach; a message past one is dropped whole (a liar within them can
# still mislead, by at most that much per message). The checks return the name of the first
# field out of bounds, or None.

# Requests one frontend accepts per second. A genset frontend (CPython: HTTP parsing,
# tokenizing, routing, NATS) served 117-281 req/s on the mocker benchmark (docs/benchmarks.md);
# 50,000/s would be 20 us per request, less than its NATS publish and routing alone.
MAX_FRONTEND_REQUESTS_PER_S = 50_000
# A window's requests are bounded by that rate over the window it claims, the window taken
# as at least 100 ms (clock granularity; a short last window) and at most 10 s (a frontend
# publishes every second; a longer claimed window must not raise the bound without limit:
# the planner counts a window's arrivals as arriving now, whatever its length).
MIN_BOUND_WINDOW_MS = 100
MAX_BOUND_WINDOW_MS = 10_000
# Tokens of one request (prompt, or output), when no model card gives a context length:
# beyond every model's context today (the longest are ~10M tokens). With cards, the largest
# context length among them bounds it (a frontend refuses prompts and completions past the
# model's context before counting them).
MAX_TOKENS_PER_REQUEST = 1 << 24
# A latency sample (TTFT, ITL), ms: no reply reaches a frontend an hour after its request
# (NATS response permissions last RESPONSE_WINDOW, 1 h, past the longest request timeout).
MAX_LATENCY_MS = 3_600_000.0
# One engine step: no engine computes 16M prompt tokens or decodes a million sequences in
# one forward pass (batch token budgets are thousands to ~1M tokens, batches at most a few
# thousand sequences). Step time: `perf_model.MAX_STEP_MS` (600 s).
MAX_STEP_PREFILL_TOKENS = 1 << 24
MAX_STEP_DECODE_SEQS = 1 << 20
# Requests on one worker at once (running + waiting): an engine admits a few thousand
# (`AsyncEngineDriver.max_requests`, 4096 by default).
MAX_WORKER_REQUESTS = 1 << 20


def max_window_requests(window_ms: float) -> int:
    """The most requests (arrivals, finishes, failures) one frontend window may count."""
    w = min(max(float(window_ms), MIN_BOUND_WINDOW_MS), MAX_BOUND_WINDOW_MS)
    return int(MAX_FRONTEND_REQUESTS_PER_S * w / 1000.0)


def _bad_latency(samples) -> bool:
    return any(not (math.isfinite(v) and 0 <= v <= MAX_LATENCY_MS) for v in samples)


def implausible_traffic(*, window_ms: float, arrivals: int, prompt_tokens: int,
                        cached_tokens: int = 0, finished: int = 0, failed: int = 0,
                        output_tokens: int = 0, ttft_ms=(), itl_ms=(),
                        max_request_tokens: int = MAX_TOKENS_PER_REQUEST) -> str | None:
    """A frontend's window (`proto.FrontendStats` fields): the first implausible field."""
    counts = (("arrivals", arrivals), ("prompt_tokens", prompt_tokens),
              ("cached_tokens", cached_tokens), ("finished", finished), ("failed", failed),
              ("output_tokens", output_tokens))
    for name, v in counts:
        if not valid_count(v):
            return name
    limit = max_window_requests(window_ms)
    for name, v in (("arrivals", arrivals), ("finished", finished), ("failed", failed)):
        if v > limit:
            return name
    if prompt_tokens > arrivals * max_request_tokens:
        return "prompt_tokens"
    if cached_tokens > prompt_tokens:  # the frontend sends min(cached, prompt)
        return "cached_tokens"
    if output_tokens > finished * max_request_tokens:
        return "output_tokens"
    if _bad_latency(ttft_ms):
        return "ttft_ms"
    if _bad_latency(itl_ms):
        return "itl_ms"
    return None


def implausible_step(prefill_tokens, decode_seqs, ms: float,
                     max_ms: float) -> str | None:
    """One engine step sample (`proto.StepSample` fields): the first implausible field."""
    if not valid_count(prefill_tokens) or prefill_tokens > MAX_STEP_PREFILL_TOKENS:
        return "prefill_tokens"
    if not valid_count(decode_seqs) or decode_seqs > MAX_STEP_DECODE_SEQS:
        return "decode_seqs"
    if not (isinstance(ms, int | float) and math.isfinite(ms) and 0 <= ms <= max_ms):
        return "ms"
    return None


def implausible_route(prompt_tokens, overlap_blocks,
                      max_request_tokens: int = MAX_TOKENS_PER_REQUEST) -> str | None:
    """A router's decision (`proto.RouteDecision` fields): the first implausible field.
    (The cached blocks are bounded by the prompt's tokens, not its blocks: the planner may
    not know the worker's block size.)"""
    if not valid_count(prompt_tokens) or prompt_tokens > max_request_tokens:
        return "prompt_tokens"
    if not valid_count(overlap_blocks) or overlap_blocks > prompt_tokens:
        return "overlap_blocks"
    return None


def implausible_load(running, waiting, waiting_prefill_tokens,
                     max_request_tokens: int = MAX_TOKENS_PER_REQUEST) -> str | None:
    """A worker's load report (`proto.LoadReport` counts): the first implausible field."""
    if not valid_count(running) or running > MAX_WORKER_REQUESTS:
        return "running"
    if not valid_count(waiting) or running + waiting > MAX_WORKER_REQUESTS:
        return "waiting"
    # (at least one request's worth: the counts and the tokens are not one snapshot in
    # every engine)
    if (not valid_count(waiting_prefill_tokens)
            or waiting_prefill_tokens > max(1, running + waiting) * max_request_tokens):
        return "waiting_prefill_tokens"
    return None
