"""What this frontend saw, for the planner: a `FrontendStats` on `frontend_stats(ns)` every
`window_s` (1 s), also when idle.

An empty window says "no traffic" (the planner may scale down) where silence says "no
information" (it holds), so windows go out whatever happened. The pipeline records with four
calls that never block and never fail:

    stats.record_arrival(prompt_tokens)          # a request accepted
    stats.record_ttft(ms)                         # its first token
    stats.record_finish(output_tokens, cached_tokens, itl_ms)   # it ended normally
    stats.record_failed()                         # it ended with an error

Latency samples are bounded per window (`MAX_LATENCY_SAMPLES`, reservoir-sampled beyond it, so
a busy window's samples are still a fair draw), counters are plain integers: memory is
bounded whatever the load.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time

import structlog

import proto
from proto import subjects
from proto.planner import MAX_LATENCY_SAMPLES

log = structlog.get_logger("frontend.stats")


class _Reservoir:
    """At most `cap` values, a uniform sample of everything added since the last reset."""

    __slots__ = ("cap", "rng", "seen", "values")

    def __init__(self, cap: int, rng: random.Random) -> None:
        self.cap = cap
        self.rng = rng
        self.values: list[float] = []
        self.seen = 0

    def add(self, v: float) -> None:
        if not (math.isfinite(v) and v >= 0):
            return
        self.seen += 1
        if len(self.values) < self.cap:
            self.values.append(v)
        else:
            j = self.rng.randrange(self.seen)
            if j < self.cap:
                self.values[j] = v

    def take(self) -> list[float]:
        out, self.values, self.seen = self.values, [], 0
        return out


class FrontendStatsPublisher:
    def __init__(self, bus=None, namespace: str = "default", frontend_id: int = 0, *,
                 window_s: float = 1.0, max_samples: int = MAX_LATENCY_SAMPLES) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.bus = bus
        self.frontend_id = frontend_id
        self.window_s = window_s
        self.subject = subjects.frontend_stats(namespace)
        rng = random.Random()
        self._ttft = _Reservoir(max_samples, rng)
        self._itl = _Reservoir(max_samples, rng)
        self._reset()
        self._window_start = time.monotonic()
        self._task: asyncio.Task | None = None
        self.published = 0

    def _reset(self) -> None:
        self.arrivals = self.prompt_tokens = self.cached_tokens = 0
        self.finished = self.output_tokens = self.failed = 0

    # ---- recording (the pipeline's hot path: a few integer adds) ----------------------------

    def record_arrival(self, prompt_tokens: int) -> None:
        self.arrivals += 1
        self.prompt_tokens += max(0, int(prompt_tokens))

    def record_ttft(self, ms: float) -> None:
        self._ttft.add(ms)

    def record_finish(self, output_tokens: int, cached_tokens: int = 0,
                      itl_ms: float | None = None) -> None:
        """A request that ended normally; `itl_ms` is its mean inter-token latency (None with
        fewer than two tokens). Cached prompt tokens are known only at the end (the worker's
        usage), so they count in the window the request finished in."""
        self.finished += 1
        self.output_tokens += max(0, int(output_tokens))
        self.cached_tokens += max(0, int(cached_tokens))
        if itl_ms is not None:
            self._itl.add(itl_ms)

    def record_failed(self) -> None:
        self.failed += 1

    # ---- windows ----------------------------------------------------------------------------

    def take(self) -> proto.FrontendStats:
        """The window since the last call (and start a new one)."""
        now = time.monotonic()
        window_ms = max(1, int((now - self._window_start) * 1000))
        self._window_start = now
        msg = proto.FrontendStats(
            frontend_id=self.frontend_id, ts_ms=int(time.time() * 1000), window_ms=window_ms,
            arrivals=self.arrivals, prompt_tokens=self.prompt_tokens,
            cached_tokens=min(self.cached_tokens, self.prompt_tokens) if self.prompt_tokens
            else 0, output_tokens=self.output_tokens, finished=self.finished, failed=self.failed,
            ttft_ms=self._ttft.take(), itl_ms=self._itl.take())
        self._reset()
        return msg

    def start(self) -> None:
        if self._task is None and self.bus is not None:
            self._window_start = time.monotonic()
            self._task = asyncio.create_task(self._run(), name="frontend-stats")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.window_s)
            msg = self.take()
            try:
                await self.bus.publish(self.subject, msg)
                self.published += 1
            except Exception as exc:  # the bus reconnects; the planner holds meanwhile
                log.debug("frontend stats not published", error=repr(exc))
