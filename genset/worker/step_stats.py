"""A worker's engine step timings for the planner: a `WorkerStepStats` on
`step_stats(ns, worker_id)` every `interval_s` while the engine steps (nothing while idle).

While the engine is idle the publisher does not wake at all: after a window with no step it
waits on the engine's `step_logged` event (set by `AsyncEngineDriver` when a step's outputs
are delivered) and starts the next window then, so the first samples after an idle spell go
out within `interval_s` of its first step, as before. An engine without that event is polled
every `interval_s`.

The engine driver keeps a bounded log of its last steps' records (`AsyncEngineDriver.step_log`:
prompt tokens computed, sequences decoded, KV use, duration); this takes what accumulated since
the last message, at most `MAX_STEP_SAMPLES` of them, evenly spread when there were more (the
planner's model needs a spread of step shapes, not every step). An engine without a step log
(TensorRT-LLM reports only an iteration latency) publishes nothing.
"""

from __future__ import annotations

import asyncio
import math

import structlog

import proto
from genset.worker.clock import now_ms
from proto import subjects
from proto.planner import MAX_STEP_SAMPLES

log = structlog.get_logger("genset.worker")


def sample(records: list, limit: int = MAX_STEP_SAMPLES) -> list[proto.StepSample]:
    """Valid records as `StepSample`s, at most `limit`, evenly spread over `records`."""
    out = []
    for r in records:
        ms = float(getattr(r, "step_ms", 0.0) or 0.0)
        prefill = int(getattr(r, "prefill_tokens", 0) or 0)
        decode = int(getattr(r, "decode_tokens", 0) or 0)
        usage = float(getattr(r, "kv_usage", 0.0) or 0.0)
        if not (math.isfinite(ms) and ms > 0 and math.isfinite(usage)) or prefill < 0 \
                or decode < 0 or (prefill == 0 and decode == 0):
            continue
        out.append(proto.StepSample(prefill_tokens=prefill, decode_seqs=decode,
                                    kv_usage=min(1.0, max(0.0, usage)), ms=ms))
    if len(out) > limit:
        stride = len(out) / limit
        out = [out[int(i * stride)] for i in range(limit)]
    return out


class StepStatsPublisher:
    def __init__(self, engine, *, bus, namespace: str, instance_id: int, role: str,
                 interval_s: float = 1.0, sleep=asyncio.sleep) -> None:
        self.engine = engine
        self._sleep = sleep  # injectable: the tests count the publisher's wake-ups
        self.bus = bus
        self.instance_id = instance_id
        self.role = role
        self.interval_s = interval_s
        self.subject = subjects.step_stats(namespace, instance_id)
        self.published = 0  # messages
        self.windows = 0  # wake-ups that looked at the step log

    @property
    def available(self) -> bool:
        return getattr(self.engine, "step_log", None) is not None

    def take(self) -> proto.WorkerStepStats | None:
        """The steps logged since the last call, as one message (None: no step)."""
        logq = getattr(self.engine, "step_log", None)
        if not logq:
            return None
        records = []
        for _ in range(len(logq)):  # popleft is atomic; the stepping side may append
            try:
                records.append(logq.popleft())
            except IndexError:
                break
        samples = sample(records)
        if not samples:
            return None
        return proto.WorkerStepStats(worker_id=self.instance_id, ts_ms=now_ms(), role=self.role,
                                     samples=samples)

    def start(self) -> asyncio.Task | None:
        """Start publishing (None: this engine keeps no step log); the caller owns the task."""
        if not self.available:
            return None
        return asyncio.create_task(self._run(), name="step-stats")

    async def _run(self) -> None:
        stepped = getattr(self.engine, "step_logged", None)
        while True:
            await self._sleep(self.interval_s)
            self.windows += 1
            msg = self.take()
            if msg is None:
                if stepped is not None:
                    # Idle: sleep until a step is delivered. Cleared before looking at the
                    # log: a step logged after the look sets it again (its delivery comes
                    # after its record), one logged before is seen by the look.
                    stepped.clear()
                    if not self.engine.step_log:
                        await stepped.wait()
                continue
            try:
                await self.bus.publish(self.subject, msg)
                self.published += 1
            except Exception as exc:  # the bus reconnects; a lost window is only a sample
                log.debug("step stats not published", error=repr(exc))
