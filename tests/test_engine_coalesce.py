"""MockerDriver's step coalescing (coalesce_ms): same tokens, fewer outputs when steps are
short; one output per step when steps are long. The driver runs on a virtual clock, so what
is checked is the pacing logic, not how fast this machine steps."""

from __future__ import annotations

import asyncio
import logging

import pytest

from genset.engines.mocker import (
    MockerConfig,
    MockerCore,
    MockerDriver,
    PolynomialTiming,
    create_mocker_engine,
)
from genset.engines.types import EngineRequest
from proto.generate import SamplingParams, StopConditions
from tests.helpers.engine_control import StepBudget, VirtualClock


async def run(speedup: float, coalesce_ms: float, max_tokens: int) -> list[list[int]]:
    config = MockerConfig(num_blocks=256, block_size=4,
                          timing=PolynomialTiming(speedup_ratio=speedup))
    clock = VirtualClock()
    engine = create_mocker_engine(config, coalesce_ms=coalesce_ms, clock=clock.clock,
                                  sleep=clock.sleep)
    await engine.start()
    try:
        stream = await engine.submit(EngineRequest(
            "r1", list(range(1, 30)), SamplingParams(seed=3),
            StopConditions(max_tokens=max_tokens)))
        async with asyncio.timeout(30):
            outs = [out async for out in stream]
    finally:
        await engine.stop()
    assert outs[-1].finish_reason == "length"
    assert outs[-1].completion_tokens == max_tokens
    return [out.token_ids for out in outs]


async def test_short_steps_are_merged_without_changing_tokens():
    plain = await run(1e6, 0.0, 200)
    merged = await run(1e6, 20.0, 200)
    assert [t for out in merged for t in out] == [t for out in plain for t in out]
    assert len(plain) == 200  # one output per step without coalescing
    assert len(merged) == 1  # the 200 steps take ~1 us of modelled time, inside one window


async def test_long_steps_are_delivered_one_by_one():
    outs = await run(1.0, 0.5, 4)  # decode steps of ~6 ms
    assert [len(t) for t in outs] == [1, 1, 1, 1]


def test_negative_window_is_refused():
    with pytest.raises(ValueError, match="coalesce_ms"):
        create_mocker_engine(MockerConfig(num_blocks=16), coalesce_ms=-1)


def held_engine() -> tuple[MockerDriver, StepBudget]:
    """A mocker whose steps (~6 us modelled) are held ~870 at a time (5 ms window), allowed
    5000 steps: a request needs ~65,000 to reach the context limit, so it cannot finish
    before the test ends it."""
    config = MockerConfig(num_blocks=16384, block_size=4,
                          timing=PolynomialTiming(speedup_ratio=1000.0))
    clock = VirtualClock()
    budget = StepBudget(MockerCore(config), steps_left=5000)
    engine = MockerDriver(budget, coalesce_ms=5.0, clock=clock.clock, sleep=clock.sleep)
    return engine, budget


async def test_abort_and_kv_events_while_outputs_are_held():
    engine, budget = held_engine()
    events = engine.kv_events()
    await engine.start()
    try:
        stream = await engine.submit(EngineRequest(
            "long", list(range(1, 30)), SamplingParams(seed=1), StopConditions(max_tokens=100000)))
        async with asyncio.timeout(30):
            first = await stream.__anext__()
        assert len(first.token_ids) > 1 and first.finish_reason is None  # several steps merged
        # a command while outputs are held: they (and their KV events) are delivered first
        snapshot = await engine.kv_snapshot()
        await engine.abort("long")
        rest = [out async for out in stream]
        assert rest[-1].finish_reason == "cancelled"
        await engine.export_kv([])  # commands run in order: the abort has run
        assert budget.pool.num_used == 0 and not budget.has_work()
        ids = []
        while (batch := events.get_nowait()) is not None:
            ids.append(batch.event_id)
        ids.append(snapshot.event_id)
        ids.sort()
        assert ids == list(range(ids[0], ids[0] + len(ids)))  # no gap, snapshot in sequence
    finally:
        events.close()
        await engine.stop()


async def test_stop_while_outputs_are_held_ends_the_stream(caplog):
    engine, _ = held_engine()
    await engine.start()
    stream = await engine.submit(EngineRequest(
        "long", list(range(1, 30)), SamplingParams(seed=1), StopConditions(max_tokens=100000)))
    async with asyncio.timeout(30):
        first = await stream.__anext__()
    assert first.token_ids and first.finish_reason is None
    with caplog.at_level(logging.WARNING, logger="genset.engines.mocker"):
        async with asyncio.timeout(30):  # stop() and the stream's end both have a deadline
            await engine.stop(timeout=20.0)
            rest = [out async for out in stream]
    assert "did not end" not in caplog.text  # the stepping task ended, stop did not give up
    assert rest[-1].finish_reason == "cancelled"
    assert engine.num_active == 0
