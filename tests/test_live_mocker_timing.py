"""Live mocker workers charge steps as Dynamo's mocker does (issue 15): a step that only
finishes prompts costs the prefill alone, so a lone prompt's first token comes after exactly
prefill_ms (virtual clock: the pacing, not the machine, is checked). And a timed request gets
its first step stamped by the paced driver."""

from __future__ import annotations

import asyncio

import pytest

from genset.engines.factory import build_engine
from genset.engines.mocker import MockerConfig, PolynomialTiming, create_mocker_engine
from genset.engines.types import EngineRequest
from proto.generate import StopConditions
from tests.helpers.engine_control import VirtualClock


def test_workers_build_mockers_with_dynamo_step_charges():
    engine = build_engine("mocker", "tiny", worker_id=1, speedup=2.0)
    timing = engine.core.timing
    assert timing.dynamo_exact and timing.speedup_ratio == 2.0


async def test_a_lone_prompt_gets_its_first_token_after_its_prefill_alone():
    timing = PolynomialTiming(dynamo_exact=True)
    cfg = MockerConfig(block_size=16, num_blocks=8192, vocab_size=8192, timing=timing)
    clock = VirtualClock()
    engine = create_mocker_engine(cfg, clock=clock.clock, sleep=clock.sleep)
    await engine.start()
    stamps: dict[str, float] = {}
    try:
        stream = await engine.submit(EngineRequest(
            "a", list(range(1, 1001)), stop=StopConditions(max_tokens=3, ignore_eos=True),
            trace=stamps))
        first = await asyncio.wait_for(stream.__anext__(), 30)
        async for _ in stream:
            pass
    finally:
        await engine.stop()
    assert first.token_ids
    # the step of its first token: 4.209989e-7 * 1000**2 + 0.01518344 * 1000 + 16.50142
    # = 32.1 ms, no decode term (37.8 ms before)
    assert stamps["w_step_ms"] == pytest.approx(timing.prefill_ms(1000), rel=1e-9)
    assert "w_first_step" in stamps and "w_admitted" in stamps
    assert not engine._traced
