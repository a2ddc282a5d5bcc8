"""AsyncEngineDriver's step coalescing (coalesce_ms): same tokens, fewer outputs when steps are
short; one output per step when steps are long."""

from __future__ import annotations

from genset.engines.base import EngineRequest
from genset.engines.mocker import MockerConfig, PolynomialTiming, create_mocker_engine
from proto.generate import SamplingParams, StopConditions


async def run(speedup: float, coalesce_ms: float, max_tokens: int) -> list[list[int]]:
    config = MockerConfig(num_blocks=256, block_size=4,
                          timing=PolynomialTiming(speedup_ratio=speedup))
    engine = create_mocker_engine(config, coalesce_ms=coalesce_ms)
    await engine.start()
    try:
        stream = await engine.submit(EngineRequest(
            "r1", list(range(1, 30)), SamplingParams(seed=3),
            StopConditions(max_tokens=max_tokens)))
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
    assert len(merged) < 100


async def test_long_steps_are_delivered_one_by_one():
    outs = await run(1.0, 0.5, 4)  # decode steps of ~6 ms
    assert [len(t) for t in outs] == [1, 1, 1, 1]


def test_negative_window_is_refused():
    import pytest

    with pytest.raises(ValueError, match="coalesce_ms"):
        create_mocker_engine(MockerConfig(num_blocks=16), coalesce_ms=-1)


async def test_abort_and_kv_events_while_outputs_are_held():
    import asyncio

    config = MockerConfig(num_blocks=16384, block_size=4,
                          timing=PolynomialTiming(speedup_ratio=1e6))
    engine = create_mocker_engine(config, coalesce_ms=5.0)
    events = engine.kv_events()
    await engine.start()
    try:
        stream = await engine.submit(EngineRequest(
            "long", list(range(1, 30)), SamplingParams(seed=1), StopConditions(max_tokens=100000)))
        first = await stream.__anext__()
        assert first.token_ids and first.finish_reason is None
        snapshot = await engine.kv_snapshot()  # a command while outputs may be held
        await engine.abort("long")
        rest = [out async for out in stream]
        assert rest[-1].finish_reason == "cancelled"
        for _ in range(100):  # the abort frees the blocks at the next step
            if engine.core.pool.num_used == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.core.pool.num_used == 0
        ids = []
        while (batch := events.get_nowait()) is not None:
            ids.append(batch.event_id)
        ids.append(snapshot.event_id)
        ids.sort()
        assert ids == list(range(ids[0], ids[0] + len(ids)))  # no gap, snapshot in sequence
    finally:
        events.close()
        await engine.stop()


async def test_stop_while_outputs_are_held_ends_the_stream_promptly():
    import asyncio
    import time

    config = MockerConfig(num_blocks=16384, block_size=4,
                          timing=PolynomialTiming(speedup_ratio=1e6))
    engine = create_mocker_engine(config, coalesce_ms=5.0)
    await engine.start()
    stream = await engine.submit(EngineRequest(
        "long", list(range(1, 30)), SamplingParams(seed=1), StopConditions(max_tokens=100000)))
    first = await stream.__anext__()
    assert first.token_ids and first.finish_reason is None
    t0 = time.monotonic()
    async with asyncio.timeout(5.0):  # stop() and the stream's end both have a deadline
        await engine.stop(timeout=2.0)
        rest = [out async for out in stream]
    assert time.monotonic() - t0 < 2.0
    assert rest[-1].finish_reason == "cancelled"
    assert engine.num_active == 0
