"""What the planner reads from the fleet: workers' `WorkerStepStats` (engine step samples) and
frontends' `FrontendStats` windows, on the session's real NATS."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from types import SimpleNamespace

import pytest

import proto
from genset.engines.core import StepRecord
from genset.engines.mocker import MockerConfig, MockerCore
from genset.engines.types import EngineRequest
from genset.planning import PlannerCore
from genset.worker.step_stats import StepStatsPublisher, sample
from proto import subjects
from proto.generate import SamplingParams, StopConditions
from services.frontend.stats import FrontendStatsPublisher
from tests.test_worker import Host


async def wait_for(predicate, within=15.0, what="condition"):
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def collect(bus, subject: str, kind) -> list:
    got: list = []

    async def on(msg):
        got.append(proto.decode(msg.data, kind))

    sub = await bus.subscribe(subject, on)
    return got, sub


async def test_worker_publishes_its_engine_steps(bus, discovery):
    h = Host(bus, discovery, speedup=50.0)
    got, sub = await collect(bus, subjects.step_stats(h.namespace, h.instance_id),
                             proto.WorkerStepStats)
    await h.host.start()
    try:
        chunks = await h.generate(h.request(list(range(5, 45)), max_tokens=12))
        assert chunks[-1].final and chunks[-1].error is None

        def seen(pred) -> bool:
            return any(pred(s) for m in got for s in m.samples)

        await wait_for(lambda: seen(lambda s: s.prefill_tokens > 0)
                       and seen(lambda s: s.decode_seqs > 0), what="prefill and decode samples")
        for m in got:
            assert m.worker_id == h.instance_id and m.role == "decode" and m.samples
            for s in m.samples:
                assert s.ms > 0 and 0.0 <= s.kv_usage <= 1.0
        # what the planner does with them: its performance model learns from each
        core = PlannerCore()
        before = core.model.observed
        for m in got:
            for s in m.samples:
                core.observe_step(s.prefill_tokens, s.decode_seqs, s.kv_usage, s.ms)
        assert core.model.observed > before
    finally:
        await sub.unsubscribe()
        await h.host.close()


def test_step_samples_are_bounded_spread_and_valid():
    recs = [StepRecord(prefill_tokens=i % 3 * 100, decode_tokens=i % 5, kv_usage=0.5,
                       step_ms=1.0 + i) for i in range(1000)]
    out = sample(recs, limit=100)
    assert len(out) == 100
    assert out[0].ms == 2.0 and out[-1].ms > 900  # spread over the whole window
    bad = [StepRecord(0, 0, 0.1, 5.0), StepRecord(10, 0, float("nan"), 5.0),
           StepRecord(10, 0, 0.1, 0.0), StepRecord(10, 1, 7.0, 3.0)]
    got = sample(bad)
    assert [(s.prefill_tokens, s.kv_usage) for s in got] == [(10, 1.0)]  # usage clamped


async def test_idle_publisher_waits_for_a_step_instead_of_polling(bus):
    """No step, no wake-up: after one empty window the publisher sleeps on the engine's
    `step_logged` event; a delivered step starts the next window, whose samples go out."""
    engine = SimpleNamespace(step_log=deque(), step_logged=asyncio.Event())
    sleeps: list[float] = []

    async def counted_sleep(s: float) -> None:  # no wall clock: every window is a turn
        sleeps.append(s)
        await asyncio.sleep(0)

    pub = StepStatsPublisher(engine, bus=bus, namespace=f"ns{uuid.uuid4().hex[:8]}",
                             instance_id=7, role="decode", sleep=counted_sleep)
    got, sub = await collect(bus, pub.subject, proto.WorkerStepStats)
    task = pub.start()
    try:
        await wait_for(lambda: pub.windows == 1, what="the first window")
        for _ in range(200):  # a polling publisher would look at the log again here
            await asyncio.sleep(0)
        assert pub.windows == 1 and len(sleeps) == 1 and pub.published == 0
        # a step: its record first, then its delivery sets the event (AsyncEngineDriver)
        engine.step_log.append(StepRecord(prefill_tokens=64, decode_tokens=0, kv_usage=0.1,
                                          step_ms=3.0))
        engine.step_logged.set()
        await wait_for(lambda: got, what="the step's samples on the bus")
        assert got[0].worker_id == 7 and got[0].samples[0].prefill_tokens == 64
        # idle again: the window with the step, one more (empty) window, then asleep
        await wait_for(lambda: pub.windows >= 3, what="the next (empty) window")
        for _ in range(200):
            await asyncio.sleep(0)
        assert pub.windows == 3 and pub.published == 1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await sub.unsubscribe()


async def test_driver_sets_step_logged_on_delivery(bus, discovery):
    """The real driver: a request's steps set `step_logged`, after they were counted."""
    h = Host(bus, discovery, speedup=50.0)
    await h.host.start()
    try:
        engine = h.engine
        engine.step_logged.clear()
        steps_before = engine.num_steps
        steps_at_wake: list[int] = []

        async def waiter() -> None:
            await engine.step_logged.wait()
            steps_at_wake.append(engine.num_steps)

        w = asyncio.create_task(waiter())
        chunks = await h.generate(h.request(list(range(5, 45)), max_tokens=4))
        assert chunks[-1].final and chunks[-1].error is None
        await asyncio.wait_for(w, 15.0)
        assert steps_at_wake[0] > steps_before
    finally:
        await h.host.close()


def test_publisher_without_a_step_log_does_nothing():
    pub = StepStatsPublisher(object(), bus=None, namespace="x", instance_id=1, role="decode")
    assert not pub.available and pub.start() is None and pub.take() is None


def test_scheduling_core_records_each_step():
    """The generic core (torch's) records what a step computed; the mocker its own stats."""
    core = MockerCore(MockerConfig(block_size=8, num_blocks=64, vocab_size=512))
    core.add_request(EngineRequest("a", list(range(3, 30)), SamplingParams(temperature=0.0),
                                   StopConditions(max_tokens=3, ignore_eos=True)))
    core.step()
    assert core.last_step.prefill_tokens == 27 and core.last_step.step_ms > 0
    core.step()
    assert core.last_step.prefill_tokens == 0 and core.last_step.decode_tokens == 1
    # the generic path, forced on for the mocker's executor
    generic = MockerCore(MockerConfig(block_size=8, num_blocks=64, vocab_size=512))
    generic._record_steps = True
    generic.add_request(EngineRequest("b", list(range(3, 30)), SamplingParams(temperature=0.0),
                                      StopConditions(max_tokens=3, ignore_eos=True)))
    _, ms = super(MockerCore, generic).step()
    rec = generic.last_step
    assert isinstance(rec, StepRecord) and rec.prefill_tokens == 27 and rec.step_ms == ms
    assert 0 < rec.kv_usage <= 1
    super(MockerCore, generic).step()
    assert generic.last_step.decode_tokens == 1 and generic.last_step.prefill_tokens == 0


def test_frontend_window_counts_and_bounds():
    st = FrontendStatsPublisher(max_samples=50)
    for i in range(300):
        st.record_arrival(100)
        st.record_ttft(float(i))
        st.record_finish(10, cached_tokens=20, itl_ms=5.0)
    st.record_finish(1)  # one token: no ITL sample
    st.record_failed()
    st.record_ttft(float("nan"))  # ignored
    w = st.take()
    assert (w.arrivals, w.prompt_tokens, w.cached_tokens) == (300, 30000, 6000)
    assert (w.finished, w.output_tokens, w.failed) == (301, 3001, 1)
    assert len(w.ttft_ms) == 50 and len(w.itl_ms) == 50 and w.window_ms >= 1
    assert max(w.ttft_ms) > 50  # a sample of the whole window, not its first 50
    empty = st.take()
    assert (empty.arrivals, empty.finished, empty.ttft_ms) == (0, 0, [])
    with pytest.raises(ValueError):
        FrontendStatsPublisher(window_s=0)


async def test_frontend_publishes_windows_even_when_idle(bus):
    ns = f"fs{uuid.uuid4().hex[:8]}"
    got, sub = await collect(bus, subjects.frontend_stats(ns), proto.FrontendStats)
    st = FrontendStatsPublisher(bus, ns, frontend_id=7, window_s=0.05)
    st.start()
    try:
        await wait_for(lambda: len(got) >= 2, what="idle windows")
        assert all(m.arrivals == 0 and m.frontend_id == 7 for m in got)
        st.record_arrival(64)
        st.record_ttft(12.5)
        st.record_finish(8, 16, 3.0)
        await wait_for(lambda: any(m.arrivals for m in got), what="a busy window")
        busy = next(m for m in got if m.arrivals)
        assert (busy.prompt_tokens, busy.finished, busy.ttft_ms, busy.itl_ms) == (
            64, 1, [12.5], [3.0])
        # the planner takes it as a traffic window
        core = PlannerCore()
        core.observe_frontend_stats(busy)
        assert core.ttft.count(core.now_ms()) == 1
    finally:
        await st.stop()
        await sub.unsubscribe()
