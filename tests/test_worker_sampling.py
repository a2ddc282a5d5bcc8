"""Sampling parameters through a worker on the bus (issue 16): logprobs frames from the torch
engine, the mocker's clear refusal, greedy determinism across workers, and n choices sent as
n requests to one worker sharing one prefill (what the frontend does for `n > 1`)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

import proto
from genset.engines.mocker import MockerConfig, PolynomialTiming, create_mocker_engine
from genset.runtime.bus_errors import RemoteError
from genset.runtime.metrics import Metrics
from genset.worker import HostConfig, WorkerHost
from proto import keys

MODEL = "sampling-test"


class Worker:
    def __init__(self, bus, discovery, engine, namespace: str) -> None:
        self.instance_id = int(uuid.uuid4().int & ((1 << 63) - 1)) or 1
        self.engine = engine
        self.host = WorkerHost(engine, bus=bus, discovery=discovery,
                               instance_id=self.instance_id, metrics=Metrics(process_metrics=False),
                               config=HostConfig(namespace=namespace, model=MODEL,
                                                 tokenizer="tiny"))
        self.bus = bus
        self.discovery = discovery
        self.namespace = namespace

    async def card(self) -> proto.ModelCard:
        return await self.discovery.get(keys.model(self.namespace, MODEL, self.instance_id),
                                        proto.ModelCard)

    async def stream(self, req: proto.GenerateRequest):
        return await self.bus.stream_request(self.host.generate_subject, req, timeout=60)

    async def generate(self, req: proto.GenerateRequest) -> list[proto.StreamChunk]:
        return [c async for c in await self.stream(req)]


def _mocker(worker_id: int = 0):
    return create_mocker_engine(MockerConfig(
        block_size=4, num_blocks=256, vocab_size=1000, context_length=512, eos_token_ids=(0,),
        timing=PolynomialTiming(speedup_ratio=100.0)), worker_id=worker_id)


def _request(tokens, max_tokens=6, rid=None, **sampling) -> proto.GenerateRequest:
    return proto.GenerateRequest(
        request_id=rid or uuid.uuid4().hex, model=MODEL, token_ids=proto.pack_tokens(tokens),
        sampling=proto.SamplingParams(**sampling),
        stop=proto.StopConditions(max_tokens=max_tokens, ignore_eos=True))


def _tokens(chunks: list[proto.StreamChunk]) -> list[int]:
    return [t for c in chunks for t in proto.unpack_tokens(c.token_ids)]


@pytest.fixture
def namespace():
    return f"s{uuid.uuid4().hex[:8]}"


async def test_mocker_worker_refuses_logprobs_with_bad_request(bus, discovery, namespace):
    w = Worker(bus, discovery, _mocker(), namespace)
    await w.host.start()
    try:
        assert (await w.card()).supports_logprobs is False
        with pytest.raises(RemoteError) as err:
            await w.generate(_request([1, 2, 3], logprobs=2))
        assert err.value.error.code == "bad_request"
        assert "logprobs" in err.value.error.message and "mocker" in err.value.error.message
        assert not err.value.error.retryable
        # the worker keeps serving
        assert len(_tokens(await w.generate(_request([1, 2, 3])))) == 6
    finally:
        await w.host.close()


async def test_greedy_is_the_same_on_two_mocker_workers(bus, discovery, namespace):
    a = Worker(bus, discovery, _mocker(1), namespace)
    b = Worker(bus, discovery, _mocker(2), namespace)
    await a.host.start()
    await b.host.start()
    try:
        prompt = list(range(10, 50))
        one = _tokens(await a.generate(_request(prompt, 12, temperature=0.0)))
        two = _tokens(await b.generate(_request(prompt, 12, temperature=0.0)))
        assert one == two and len(one) == 12
    finally:
        await a.host.close()
        await b.host.close()


async def test_n_choices_on_one_worker_prefill_once(bus, discovery, namespace):
    """The frontend's way to serve n > 1: send choice 0, wait for its first frame (its
    prompt's full blocks are then cached), then send choices 1..n-1 to the same worker,
    with `SamplingParams.for_choice(i)`."""
    w = Worker(bus, discovery, _mocker(), namespace)
    await w.host.start()
    try:
        prompt = list(range(100, 143))  # 43 tokens: 10 full blocks of 4
        sampling = proto.SamplingParams(temperature=0.9, seed=17)

        def choice(i):
            return proto.GenerateRequest(
                request_id=f"req-1/{i}", model=MODEL, token_ids=proto.pack_tokens(prompt),
                sampling=sampling.for_choice(i), stop=proto.StopConditions(max_tokens=8))

        first = await w.stream(choice(0))
        head = [await first.__anext__()]  # choice 0's first token: its prefill is done
        *later, tail = await asyncio.gather(*(w.generate(choice(i)) for i in range(1, 4)),
                                            _collect(first))
        chunks = [head + tail, *later]
        assert chunks[0][-1].usage.cached_tokens == 0
        for c in chunks[1:]:
            assert c[-1].usage.cached_tokens == 40  # every full block of the prompt
            assert c[-1].usage.prompt_tokens == 43
        outputs = [tuple(_tokens(c)) for c in chunks]
        assert len(set(outputs)) == 4 and all(len(o) == 8 for o in outputs)
    finally:
        await w.host.close()


async def _collect(stream) -> list[proto.StreamChunk]:
    return [c async for c in stream]


async def test_torch_worker_streams_logprobs_aligned_with_tokens(bus, discovery, namespace):
    pytest.importorskip("torch")
    from genset.engines.torch.engine import TorchEngine

    w = Worker(bus, discovery, TorchEngine("tiny", num_blocks=64), namespace)
    await w.host.start()
    try:
        assert (await w.card()).supports_logprobs is True
        prompt = list(range(3, 30))
        chunks = await w.generate(_request(prompt, 7, temperature=0.0, logprobs=3))
        data = [c for c in chunks if c.token_ids]
        assert all(c.logprobs is not None for c in data)
        lps, tops, top_lps = [], [], []
        for c in data:
            n = len(proto.unpack_tokens(c.token_ids))
            a, b, d = c.logprobs.unpack()
            assert len(a) == len(b) == len(d) == n and c.logprobs.top_k == 3
            lps += a
            tops += b
            top_lps += d
        toks = _tokens(chunks)
        assert len(toks) == 7 == len(lps)
        assert [t[0] for t in tops] == toks  # greedy: the chosen token is the most likely
        assert lps == [t[0] for t in top_lps] and all(x <= 0 for x in lps)
        # without logprobs the frames carry none
        plain = await w.generate(_request(prompt, 7, temperature=0.0))
        assert _tokens(plain) == toks and all(c.logprobs is None for c in plain)
        # a logit_bias id outside the vocabulary is the requester's error
        with pytest.raises(RemoteError) as err:
            await w.generate(_request(prompt, 2, logit_bias={"5000": 1.0}))
        assert err.value.error.code == "bad_request" and "logit_bias" in err.value.error.message
    finally:
        await w.host.close()
