"""The mocker: timing model, KV events, the async engine, and many workers in one process."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

from genset.engines.driver import AsyncEngineDriver
from genset.engines.mocker import (
    MockerConfig,
    MockerCore,
    MockerDriver,
    PolynomialTiming,
    create_mocker_engine,
)
from genset.engines.types import EngineRequest, KvBlockData, KvImport
from genset.kv.hashing import block_hashes
from genset.kv.replica import HashSetReplica
from proto.generate import SamplingParams, StopConditions
from tests.helpers.engine_control import StepBudget, VirtualClock


def prefill_ms(t: int) -> float:
    return 4.209989e-7 * t * t + 0.01518344 * t + 16.50142


def decode_ms(u: float) -> float:
    return max(1.0, -25.74 * u * u + 54.01 * u + 5.74)


def req(rid: str, tokens: list[int], max_tokens: int = 4, **kw) -> EngineRequest:
    return EngineRequest(rid, tokens, stop=StopConditions(max_tokens=max_tokens), **kw)


@pytest.mark.parametrize("speedup", [1.0, 4.0])
def test_step_times_follow_the_polynomial(speedup):
    cfg = MockerConfig(
        block_size=16,
        num_blocks=100,
        max_batch_tokens=256,
        timing=PolynomialTiming(speedup_ratio=speedup),
    )
    core = MockerCore(cfg)
    core.add_request(req("a", list(range(100)), max_tokens=3))
    core.add_request(req("b", list(range(1000, 1400)), max_tokens=2))
    expected = [
        # step 1: a's whole prompt (100) + 156 of b's; a emits -> decode term; 7 + 10 blocks
        prefill_ms(256) + decode_ms(17 / 100),
        # step 2: a decodes (101 tokens: 7 blocks), b prefills 244 more (400: 25 blocks) and
        # emits its first token
        prefill_ms(244) + decode_ms(32 / 100),
        # step 3: two decodes; a at 102 tokens (7 blocks), b at 401 (26 blocks)
        decode_ms(33 / 100),
    ]
    got = []
    now = 0.0
    while core.has_work():
        _outputs, ms = core.step(now)
        now += ms
        got.append(ms)
    assert got == pytest.approx([e / speedup for e in expected])
    assert core.clock_ms == pytest.approx(sum(expected) / speedup)


def test_prefill_only_step_has_no_decode_term_and_cache_hits_are_free():
    core = MockerCore(MockerConfig(block_size=16, num_blocks=64, max_batch_tokens=64))
    prompt = list(range(100))
    core.add_request(req("a", prompt, max_tokens=1))
    _, ms = core.step()
    assert ms == pytest.approx(prefill_ms(64))  # first chunk, nothing emitted
    _, ms = core.step()
    assert ms == pytest.approx(prefill_ms(36) + decode_ms(7 / 64))
    assert not core.has_work()
    # the same prompt again: 96 tokens (6 blocks) cached, 4 computed
    core.add_request(req("b", prompt, max_tokens=1))
    outputs, ms = core.step()
    assert outputs[0].cached_tokens == 96
    assert core.last_step.prefill_tokens == 4
    assert ms == pytest.approx(prefill_ms(4) + decode_ms(7 / 64))


def test_tokens_deterministic_in_vocab_and_never_eos():
    def tokens(seed):
        core = MockerCore(MockerConfig(vocab_size=5, eos_token_ids=(2,)))
        core.add_request(req("x", [1, 2, 3], max_tokens=200, sampling=SamplingParams(seed=seed)))
        out = []
        while core.has_work():
            for o in core.step()[0]:
                out += o.token_ids
        return out

    a, b, c = tokens(1), tokens(1), tokens(2)
    assert a == b and a != c and len(a) == 200
    assert set(a) <= {0, 1, 3, 4}


def test_eos_when_asked():
    core = MockerCore(MockerConfig(eos_probability=0.5, eos_token_ids=(7,)))
    core.add_request(req("x", [1], max_tokens=1000))
    core.add_request(EngineRequest("y", [1], stop=StopConditions(max_tokens=50, ignore_eos=True)))
    finals = {}
    while core.has_work():
        for o in core.step()[0]:
            if o.finish_reason:
                finals[o.request_id] = (o.finish_reason, o.completion_tokens)
    assert finals["x"][0] == "stop" and finals["x"][1] < 1000
    assert finals["y"] == ("length", 50)


def test_kv_events_rebuild_the_pool_state():
    rng = random.Random(11)
    core = MockerCore(
        MockerConfig(block_size=8, num_blocks=96, max_batch_tokens=128, max_running=12),
        worker_id=5,
    )
    replica = HashSetReplica()
    prefixes = [[rng.randint(0, 999) for _ in range(rng.randint(8, 60))] for _ in range(4)]
    arrivals = 0
    now = 0.0
    for _ in range(400):
        if arrivals < 60 and rng.random() < 0.5:
            p = rng.choice(prefixes) + [rng.randint(0, 999) for _ in range(rng.randint(1, 40))]
            core.add_request(req(f"r{arrivals}", p, max_tokens=rng.randint(1, 20)))
            arrivals += 1
        _, ms = core.step(now)
        now += ms
        batch = core.take_kv_batch(int(now))
        if batch is not None:
            assert batch.worker_id == 5
            assert replica.apply(batch)
        assert replica.hashes == core.pool.cached_hashes()
    assert core.scheduler.num_preemptions > 0 or core.pool.num_cached > 0
    assert replica.last_event_id == core.pool.event_id > 0


def test_load_report_and_card():
    core = MockerCore(MockerConfig(num_blocks=50, block_size=4), worker_id=9)
    core.add_request(req("a", list(range(40))))
    core.add_request(req("b", list(range(10))))
    rep = core.load_report(123)
    assert (rep.worker_id, rep.waiting, rep.running, rep.waiting_prefill_tokens) == (9, 2, 0, 50)
    core.step()
    rep = core.load_report(124, 3.5)
    # b's first two blocks are a's, computed in the same step: 10 + 1 blocks, not 10 + 3
    assert rep.running == 2 and rep.kv_used_blocks == 11 and rep.kv_total_blocks == 50
    assert rep.step_ms_ewma == 3.5
    assert core.card.engine == "mocker" and core.card.kv_blocks == 50


def test_kv_import_then_request_is_cached():
    src = MockerCore(MockerConfig(block_size=4))
    prompt = list(range(33))
    src.add_request(req("a", prompt, max_tokens=1))
    while src.has_work():
        src.step()
    exported = src.export_kv(block_hashes(prompt, 4))
    assert len(exported) == 8
    dst = MockerCore(MockerConfig(block_size=4))
    dst.add_request(req("b", prompt, max_tokens=1, kv_import=KvImport(blocks=exported)))
    outputs, _ = dst.step()
    assert outputs[0].cached_tokens == 32
    assert dst.import_kv(KvImport(blocks=[KvBlockData(hash=1)])) == 1


async def _collect(stream):
    tokens, last = [], None
    async for out in stream:
        tokens += out.token_ids
        last = out
    return tokens, last


# The mocker core under both drivers: the shared one (a stepping thread) and the mocker's own
# (on the loop, paced by the modelled step times).
@pytest.mark.parametrize("driver", [AsyncEngineDriver, MockerDriver], ids=["thread", "loop"])
async def test_async_engine_streams_tokens(driver):
    core = MockerCore(
        MockerConfig(block_size=4, num_blocks=256, timing=PolynomialTiming(speedup_ratio=200.0)),
        worker_id=2,
    )
    budget = StepBudget(core)
    engine = driver(budget, worker_id=2)
    await engine.start()
    events = engine.kv_events()
    try:
        prompt = list(range(30))
        streams = [await engine.submit(req(f"r{i}", prompt, max_tokens=5 + i)) for i in range(3)]
        results = await asyncio.wait_for(asyncio.gather(*(_collect(s) for s in streams)), 30)
        for i, (tokens, last) in enumerate(results):
            assert len(tokens) == 5 + i
            assert last.finish_reason == "length" and last.completion_tokens == 5 + i
            assert last.prompt_tokens == 30
        # repeated prompt: served from the prefix cache
        tokens, last = await asyncio.wait_for(
            _collect(await engine.submit(req("again", prompt))), 30
        )
        assert last.cached_tokens == 28

        with pytest.raises(ValueError, match="no tokens"):
            await engine.submit(req("empty", []))

        # abort: the stream ends "cancelled" at once and the engine frees the blocks. The
        # engine is idle here and may take one more step only (the prefill that emits the
        # first token), so the request cannot finish before the abort arrives.
        budget.limit(1)
        long = await engine.submit(req("long", list(range(100, 140)), max_tokens=10_000))
        first = await asyncio.wait_for(long.__anext__(), 30)
        assert first.token_ids and first.finish_reason is None
        await long.aclose()
        tokens, last = await _collect(long)
        assert last.finish_reason == "cancelled" and last.completion_tokens == 1
        # commands run in order: once the snapshot is back, the abort has run
        snap = await engine.kv_snapshot()
        assert not core.has_work() and core.pool.num_used == 0

        replica = HashSetReplica()
        while (batch := events.get_nowait()) is not None:
            assert replica.apply(batch)
        assert replica.hashes == core.pool.cached_hashes()
        assert snap.event_id == replica.last_event_id + 1
    finally:
        events.close()
        await engine.stop()


async def test_create_mocker_engine_stop_cancels_streams():
    engine = create_mocker_engine(MockerConfig(timing=PolynomialTiming(speedup_ratio=10.0)))
    stream = await engine.submit(req("a", [1, 2, 3], max_tokens=100_000))
    await engine.stop()
    _tokens, last = await asyncio.wait_for(_collect(stream), 5)
    assert last.finish_reason == "cancelled"


def test_64_mockers_in_one_process():
    # how fast they step is measured by bench/bench_mocker.py, not asserted here
    rng = random.Random(5)
    cores = [MockerCore(MockerConfig(num_blocks=2048), worker_id=i) for i in range(64)]
    shared = [rng.randint(0, 31999) for _ in range(512)]
    for i in range(640):
        prompt = shared[: rng.randint(0, 512)] + [
            rng.randint(0, 31999) for _ in range(rng.randint(16, 600))
        ]
        cores[i % 64].add_request(req(f"r{i}", prompt, max_tokens=rng.randint(8, 64)))
    steps = 0
    while any(c.has_work() for c in cores):
        for c in cores:
            if c.has_work():
                c.step()
                c.take_kv_batch()
                steps += 1
    assert steps > 64 * 8
    assert all(c.pool.num_used == 0 for c in cores)


async def test_real_time_engine_takes_the_modelled_time():
    """The paced loop sleeps exactly the modelled step times (on a virtual clock: how closely
    real sleeps follow them on a loaded machine is bench material, not a test)."""
    cfg = MockerConfig(block_size=16, num_blocks=64, timing=PolynomialTiming(speedup_ratio=5.0))
    # the same request on a simulated-time core gives the modelled duration
    sim = MockerCore(cfg)
    sim.add_request(req("a", list(range(200)), max_tokens=15))
    modelled_ms = 0.0
    while sim.has_work():
        modelled_ms += sim.step()[1]
    clock = VirtualClock()
    engine = create_mocker_engine(cfg, clock=clock.clock, sleep=clock.sleep)
    await engine.start()
    try:
        stream = await engine.submit(req("a", list(range(200)), max_tokens=15))
        tokens, _ = await asyncio.wait_for(_collect(stream), 30)
    finally:
        await engine.stop()
    assert len(tokens) == 15
    assert clock.now * 1000 == pytest.approx(modelled_ms, rel=1e-9)


# ---- sampling parameters (issue 16) ------------------------------------------------------


def _tokens(core: MockerCore, rid: str, prompt: list[int], n: int = 30, **stop_kw) -> tuple:
    """Run one request to its end on `core`: (tokens, finish_reason)."""
    sampling = stop_kw.pop("sampling", SamplingParams(temperature=0.0))
    core.add_request(EngineRequest(rid, prompt, sampling,
                                   StopConditions(max_tokens=n, **stop_kw)))
    out, reason = [], None
    while core.has_work():
        for o in core.step()[0]:
            if o.request_id == rid:
                out += o.token_ids
                reason = o.finish_reason or reason
    return out, reason


def test_greedy_is_a_function_of_the_prompt_not_the_request_id():
    prompt = list(range(5, 90))
    a, _ = _tokens(MockerCore(), "req-a", prompt)
    # another core (another worker), another id, another request in the same steps
    other = MockerCore(worker_id=7)
    other.add_request(req("noise", [9, 9, 9], max_tokens=50))
    b, _ = _tokens(other, "req-b", prompt)
    # temperature 0 ignores the seed, as a model's greedy decoding does; top_k=1 is greedy
    c, _ = _tokens(MockerCore(), "req-c", prompt, sampling=SamplingParams(temperature=0, seed=5))
    d, _ = _tokens(MockerCore(), "req-d", prompt,
                   sampling=SamplingParams(temperature=0.8, top_k=1))
    assert a == b == c == d and len(a) == 30
    # a different prompt (one token changed, or one token longer) gives another output
    assert _tokens(MockerCore(), "req-a", [*prompt[:-1], 4])[0] != a
    assert _tokens(MockerCore(), "req-a", [*prompt, 4])[0] != a


def test_seeded_output_is_a_function_of_seed_and_prompt():
    prompt = [3, 1, 4, 1, 5]

    def run(rid, seed, p=prompt):
        return _tokens(MockerCore(), rid, p, sampling=SamplingParams(temperature=0.9, seed=seed))[0]

    assert run("x", 1) == run("y", 1)
    assert run("x", 1) != run("x", 2)
    assert run("x", 1) != run("x", 1, [2, 7, 1, 8])
    # no seed, temperature > 0: random per request id
    unseeded = [_tokens(MockerCore(), rid, prompt, sampling=SamplingParams(temperature=0.9))[0]
                for rid in ("p", "q")]
    assert unseeded[0] != unseeded[1]


def test_min_tokens_never_draws_eos_or_stop_ids_before_reached():
    # every draw would be EOS: with min_tokens=5, five other tokens come first
    core = MockerCore(MockerConfig(eos_probability=1.0, eos_token_ids=(7,)))
    toks, reason = _tokens(core, "e", [1, 2, 3], n=50, min_tokens=5)
    assert reason == "stop" and len(toks) == 6 and 7 not in toks[:5] and toks[5] == 7
    # vocab {0..4}, EOS 2, stop ids 0, 1, 3: only 4 may come before min_tokens
    core = MockerCore(MockerConfig(vocab_size=5, eos_token_ids=(2,)))
    toks, reason = _tokens(core, "s", [1], n=200, stop_token_ids=[0, 1, 3], min_tokens=6)
    assert toks[:6] == [4] * 6 and reason == "stop" and toks[-1] in (0, 1, 3)
    # stop ids that cover the whole vocabulary cannot hang the mocker
    core = MockerCore(MockerConfig(vocab_size=5, eos_token_ids=(2,)))
    toks, reason = _tokens(core, "all", [1], n=4, stop_token_ids=[0, 1, 3, 4], min_tokens=3)
    assert 3 <= len(toks) <= 4 and reason in ("stop", "length")


def test_mocker_refuses_logprobs_by_name_and_ignores_penalties():
    core = MockerCore()
    assert core.card.supports_logprobs is False
    with pytest.raises(ValueError, match=r"logprobs: the mocker engine cannot compute"):
        core.add_request(req("lp", [1, 2, 3], sampling=SamplingParams(logprobs=0)))
    with pytest.raises(ValueError, match=r"logit_bias: token id 32000 is outside"):
        core.add_request(req("lb", [1, 2, 3], sampling=SamplingParams(logit_bias={"32000": 1})))
    assert not core.has_work()
    # penalties and an in-vocabulary bias are accepted (no logits to apply them to)
    plain, _ = _tokens(MockerCore(), "p", [1, 2, 3])
    pen, _ = _tokens(MockerCore(), "p", [1, 2, 3], sampling=SamplingParams(
        temperature=0, presence_penalty=1.0, repetition_penalty=1.3, logit_bias={"5": 2.0}))
    assert pen == plain


async def test_idle_stepping_thread_waits_for_a_command_not_a_timeout():
    """The threaded driver's idle stepping thread sleeps until a command (or stop) wakes it:
    every wait it makes while there is no work has no timeout. The waits are recorded, not
    timed."""
    core = MockerCore(
        MockerConfig(block_size=4, num_blocks=256, timing=PolynomialTiming(speedup_ratio=200.0)),
        worker_id=3,
    )
    engine = AsyncEngineDriver(core, worker_id=3)

    class RecordingEvent(threading.Event):
        def __init__(self) -> None:
            super().__init__()
            self.timeouts: list[float | None] = []

        def wait(self, timeout: float | None = None) -> bool:
            self.timeouts.append(timeout)
            return super().wait(timeout)

    wake = engine._wake_thread = RecordingEvent()
    await engine.start()
    try:
        deadline = time.monotonic() + 30
        while not wake.timeouts:  # the thread found no work and waits
            assert time.monotonic() < deadline, "the stepping thread never went idle"
            await asyncio.sleep(0.01)
        tokens, last = await asyncio.wait_for(
            _collect(await engine.submit(req("a", list(range(30)), max_tokens=4))), 30)
        assert len(tokens) == 4 and last.finish_reason == "length"
        n = len(wake.timeouts)
        assert (await engine.kv_snapshot()) is not None  # a command wakes it again
        while len(wake.timeouts) <= n:
            assert time.monotonic() < deadline, "the stepping thread did not go idle again"
            await asyncio.sleep(0.01)
        # idle waits have no timeout (0.01: the "nothing could be scheduled" back-off only)
        assert wake.timeouts and all(t is None or t == 0.01 for t in wake.timeouts)
    finally:
        await engine.stop()
