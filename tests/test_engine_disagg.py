"""What engines give disaggregation (genset.engines): a request resumed after tokens made
elsewhere continues exactly as on one engine; imports pinned under a key that a request takes
over; pins of exported blocks; the cached-prefix query; the card's KV layout; engine calls
made before `start()` return."""

from __future__ import annotations

import asyncio

import pytest

from genset.engines.mocker import (
    MockerConfig,
    MockerCore,
    PolynomialTiming,
    create_mocker_engine,
)
from genset.engines.types import EngineRequest, KvBlockData, KvImport
from genset.kv.hashing import block_hashes
from proto.generate import SamplingParams, StopConditions

CFG = MockerConfig(block_size=4, num_blocks=64, vocab_size=1000)
PROMPT = list(range(1, 31))  # 7 full blocks of 4 and 2 tokens
HASHES = block_hashes(PROMPT, 4)


def run(core, req: EngineRequest) -> tuple[list[int], object]:
    core.add_request(req)
    tokens, last = [], None
    while core.has_work():
        outs, _ = core.step()
        for out in outs:
            tokens += out.token_ids
            last = out
    return tokens, last


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=0.0),
                                      SamplingParams(temperature=0.9, seed=5)])
def test_resumed_request_continues_as_on_one_engine(sampling):
    whole, _ = run(MockerCore(CFG), EngineRequest("a", PROMPT, sampling,
                                                  StopConditions(max_tokens=6)))
    first, _ = run(MockerCore(CFG), EngineRequest("p", PROMPT, sampling,
                                                  StopConditions(max_tokens=1)))
    rest, last = run(MockerCore(CFG), EngineRequest(
        "d", PROMPT, sampling, StopConditions(max_tokens=6), resume_token_ids=first))
    assert first + rest == whole
    assert last.completion_tokens == 6 and last.prompt_tokens == len(PROMPT)


def test_pinned_import_is_taken_over_by_the_request_and_released():
    core = MockerCore(CFG)
    assert core.import_kv(KvImport([KvBlockData(h) for h in HASHES]), pin_for="xfer") == 7
    assert core.pool.num_used == 7 and core.cached_blocks(HASHES) == 7
    _, last = run(core, EngineRequest("r", PROMPT, SamplingParams(temperature=0.0),
                                      StopConditions(max_tokens=3),
                                      kv_import=KvImport([], pinned_as="xfer"),
                                      resume_token_ids=[5]))
    assert last.cached_tokens == 28  # the imported blocks were hits
    assert core.pool.num_used == 0 and core.scheduler.num_pinned_blocks == 0
    core.unpin_kv("xfer")  # already taken over: nothing happens
    assert core.pool.num_used == 0
    core.pool.check_invariants()


def test_export_pins_hold_blocks_until_unpinned():
    core = MockerCore(CFG)
    run(core, EngineRequest("r", PROMPT, SamplingParams(temperature=0.0),
                            StopConditions(max_tokens=1)))
    assert core.pool.num_used == 0 and core.cached_blocks(HASHES) == 7
    assert core.pin_kv("tx", HASHES[2:]) == 5
    core.pool.evict_cached()  # what allocation pressure would do
    assert core.cached_blocks(HASHES[2:]) == 5 and core.cached_blocks(HASHES) == 0
    core.unpin_kv("tx")
    assert core.pool.num_used == 0
    core.unpin_kv("tx")  # twice is harmless
    core.pool.check_invariants()


def test_kv_layout_on_the_card():
    assert MockerCore(CFG).card.kv_layout.engine == "mocker"
    assert MockerCore(CFG).card.kv_layout.bytes_per_block == 0


async def test_engine_calls_before_start_return():
    engine = create_mocker_engine(CFG)
    assert await engine.import_kv(KvImport([KvBlockData(h) for h in HASHES]), pin_for="k") == 7
    assert await engine.cached_blocks(HASHES) == 7
    await engine.unpin_kv("k")
    assert engine.core.pool.num_used == 0
    await engine.start()
    assert await engine.pin_kv("k2", HASHES) == 7
    assert engine.load().kv_used_blocks == 7  # the load follows a command without a step
    await engine.unpin_kv("k2")
    assert engine.load().kv_used_blocks == 0
    await engine.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        await engine.cached_blocks(HASHES)


async def test_the_mocker_imports_while_a_step_is_paced():
    """A KV import does not wait for the step under way to end (MockerDriver): with a step
    modelled to last minutes, the import is done while that step's output has not come."""
    slow = MockerConfig(block_size=4, num_blocks=64, vocab_size=1000,
                        timing=PolynomialTiming(speedup_ratio=1e-4))  # ~170 s a prefill step
    engine = create_mocker_engine(slow)
    await engine.start()
    try:
        busy = await engine.submit(EngineRequest("busy", list(range(500, 540)),
                                                 SamplingParams(temperature=0.0),
                                                 StopConditions(max_tokens=2)))
        # submit returns once the request is queued, and the loop computes the step it
        # starts in before anything else runs: that step is being paced now
        assert engine.core.scheduler.running
        async with asyncio.timeout(30):
            got = await engine.import_kv(KvImport([KvBlockData(h) for h in HASHES]),
                                         pin_for="xfer")
        assert got == 7 and engine.load().kv_used_blocks > 7
        assert busy.last is None and not busy.finished  # the step is still paced
        assert engine.cached_prefix(HASHES) == 7
    finally:
        await engine.stop()
    assert busy.finished


def test_torch_kv_layout_matches_its_payloads():
    torch = pytest.importorskip("torch")  # noqa: F841
    from genset.engines.torch.engine import TorchEngine

    engine = TorchEngine("tiny", num_blocks=16, block_size=4)
    layout = engine.card.kv_layout
    core = engine.core
    run(core, EngineRequest("r", PROMPT, SamplingParams(temperature=0.0),
                            StopConditions(max_tokens=1)))
    blocks = core.export_kv(HASHES[:2])
    assert [len(b.data) for b in blocks] == [layout.bytes_per_block] * 2
    assert layout.format == "genset-kv/1" and len(layout.block_shape) == 5


def _tail_resume(make_core, sampling, *, blocks: int):
    """A prompt prefilled on one core (`export_tail`) and resumed on another with its full
    blocks imported (the first `blocks` of them) and its partial last block as `KvImport.tail`:
    the tokens, and the prompt tokens the resumed request's first step computed."""
    p = make_core()
    first, last = run(p, EngineRequest("p", PROMPT, sampling, StopConditions(max_tokens=1),
                                       export_tail=True))
    assert last.kv_tail is not None and last.kv_tail[0] == len(PROMPT) % 4
    exported = p.export_kv(HASHES[:blocks])
    d = make_core()
    assert d.import_kv(KvImport(exported), pin_for="x") == blocks
    tail, payload = last.kv_tail
    d.add_request(EngineRequest(
        "d", PROMPT, sampling, StopConditions(max_tokens=6),
        kv_import=KvImport([], pinned_as="x", tail_tokens=tail,
                           tail=payload if d.executor.name == "torch" else None),
        resume_token_ids=first))
    rest, step_prefill = [], None
    while d.has_work():
        outs, _ = d.step()
        if step_prefill is None:
            step_prefill = d.last_step.prefill_tokens
        rest += [t for o in outs for t in o.token_ids]
    assert d.pool.num_used == 0 and d.scheduler.num_pinned_blocks == 0
    d.pool.check_invariants()
    return first + rest, step_prefill


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=0.0),
                                      SamplingParams(temperature=0.9, seed=5)])
def test_a_shipped_tail_makes_the_resume_step_a_decode_step(sampling):
    whole, _ = run(MockerCore(CFG), EngineRequest("a", PROMPT, sampling,
                                                  StopConditions(max_tokens=6)))
    tokens, computed = _tail_resume(lambda: MockerCore(CFG), sampling, blocks=7)
    assert tokens == whole and computed == 0  # the first token alone: a decode
    # a full block missing (evicted in transit): the tail is not used, the rest computed here
    tokens, computed = _tail_resume(lambda: MockerCore(CFG), sampling, blocks=6)
    assert tokens == whole and computed == 4 + 2 + 1


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=0.0),
                                      SamplingParams(temperature=0.9, seed=5)])
def test_torch_shipped_tail_gives_the_aggregated_tokens(sampling):
    pytest.importorskip("torch")
    from genset.engines.torch.engine import TorchEngine

    def make():
        return TorchEngine("tiny", num_blocks=32, block_size=4).core

    whole, _ = run(make(), EngineRequest("a", PROMPT, sampling, StopConditions(max_tokens=6)))
    tokens, computed = _tail_resume(make, sampling, blocks=7)
    assert tokens == whole and computed == 0
    tokens, computed = _tail_resume(make, sampling, blocks=6)
    assert tokens == whole and computed == 4 + 2 + 1


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_torch_refuses_non_finite_kv_and_resumed_tokens_outside_the_vocabulary(value):
    """Well-formed KV payloads holding NaN or inf (a peer's transfer, an offload store), as
    blocks or as a shipped tail, and resumed tokens outside the vocabulary, are refused when
    they come in: taken, they failed the next step (sampling from NaN probabilities, an
    embedding lookup out of range), and the engine and every request on it with it. Nothing
    is cached or left pinned, and the engine serves on."""
    torch = pytest.importorskip("torch")
    from genset.engines.torch import kvformat
    from genset.engines.torch.engine import TorchEngine

    core = TorchEngine("tiny", num_blocks=32, block_size=4).core
    sampling = SamplingParams(temperature=0.9, seed=5)
    want, _ = run(core, EngineRequest("a", PROMPT, sampling, StopConditions(max_tokens=4)))
    good = core.export_kv(HASHES)
    d = TorchEngine("tiny", num_blocks=32, block_size=4).core
    bad = torch.from_numpy(kvformat.decode(good[3].data).numpy().copy())
    bad.view(-1)[bad.numel() // 2] = value  # one value in one block of the chain
    blocks = [*good[:3], KvBlockData(HASHES[3], kvformat.encode(bad)), *good[4:]]
    with pytest.raises(ValueError, match="block 3: holds NaN or infinite"):
        d.import_kv(KvImport(blocks), pin_for="x")
    assert d.cached_blocks(HASHES) == 0 and d.scheduler.num_pinned_blocks == 0
    # a bad shipped tail: the request is refused (the worker then computes the prompt)
    assert d.import_kv(KvImport(good), pin_for="x") == 7
    with pytest.raises(ValueError, match="NaN or infinite"):
        d.add_request(EngineRequest(
            "d", PROMPT, sampling, StopConditions(max_tokens=4), resume_token_ids=want[:1],
            kv_import=KvImport([], pinned_as="x", tail_tokens=2,
                               tail=kvformat.encode(torch.full((1, *d.runner.block_shape),
                                                               value)))))
    assert d.scheduler.num_pinned_blocks == 0 and not d.has_work()
    vocab = d.executor.vocab_size
    for resumed in ([vocab], [-1]):
        with pytest.raises(ValueError, match=f"resumed token id {resumed[0]} outside"):
            d.add_request(EngineRequest("e", PROMPT, sampling, StopConditions(max_tokens=4),
                                        resume_token_ids=resumed))
    assert not d.has_work()
    got, _ = run(d, EngineRequest("f", PROMPT, sampling, StopConditions(max_tokens=4)))
    assert got == want
