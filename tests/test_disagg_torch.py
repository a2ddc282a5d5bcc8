"""Disaggregated serving with the torch engine (real K/V bytes exported, sent, imported), on
the session's real NATS and etcd, hosts in-process: a decode worker whose prefills run on a
prefill worker gives exactly the aggregated worker's tokens, greedy and seeded, for prompts
of many blocks, with a prefix cached on either side, with several requests in flight."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest

torch = pytest.importorskip("torch")

import proto  # noqa: E402
from genset.disagg.worker import DisaggConfig, DisaggHook  # noqa: E402
from genset.engines.torch.engine import TorchEngine  # noqa: E402
from genset.engines.types import EngineRequest  # noqa: E402
from genset.runtime.metrics import Metrics  # noqa: E402
from genset.worker import HostConfig, WorkerHost  # noqa: E402
from tests.stack import metric, parse_metrics  # noqa: E402
from tests.test_disagg_worker import FakePrefill  # noqa: E402
from tests.test_worker import wait_for  # noqa: E402

BS = 8
MODEL = "tiny"


class TorchWorker:
    def __init__(self, bus, discovery, namespace: str, role: str = "both",
                 **disagg) -> None:
        self.instance_id = int(uuid.uuid4().int & ((1 << 63) - 1)) or 1
        self.metrics = Metrics(process_metrics=False)
        self.engine = TorchEngine("tiny", worker_id=self.instance_id, num_blocks=256,
                                  block_size=BS, max_batch_tokens=64)
        self.hook = None
        if role != "both":
            self.hook = DisaggHook(DisaggConfig(**disagg), discovery=discovery,
                                   metrics=self.metrics)
        self.bus = bus
        self.host = WorkerHost(self.engine, bus=bus, discovery=discovery,
                               instance_id=self.instance_id, metrics=self.metrics,
                               hooks=self.hook,
                               # a decode worker's record names its KV TCP endpoint, which
                               # the prefill worker sends to (genset.disagg.endpoints)
                               config=HostConfig(namespace=namespace, model=MODEL, role=role,
                                                 tokenizer="tiny",
                                                 register_instance=role == "decode"))

    async def generate(self, req: proto.GenerateRequest) -> tuple[list[int], proto.Usage]:
        stream = await self.bus.stream_request(self.host.generate_subject, req, timeout=120)
        chunks = [c async for c in stream]
        return [t for c in chunks for t in proto.unpack_tokens(c.token_ids)], chunks[-1].usage

    def metric(self, name: str, **labels) -> float:
        return metric(parse_metrics(self.metrics.render().decode()), name, **labels)

    @property
    def used_blocks(self) -> int:
        return self.engine.core.pool.num_used


def request(tokens: list[int], max_tokens: int = 10, **sampling) -> proto.GenerateRequest:
    return proto.GenerateRequest(
        request_id=uuid.uuid4().hex, model=MODEL, token_ids=proto.pack_tokens(tokens),
        sampling=proto.SamplingParams(**({"temperature": 0.0} | sampling)),
        stop=proto.StopConditions(max_tokens=max_tokens, ignore_eos=True))


@pytest.fixture
async def workers(bus, discovery):
    ns = f"t{uuid.uuid4().hex[:8]}"
    agg = TorchWorker(bus, discovery, ns)
    prefill = TorchWorker(bus, discovery, ns, "prefill")
    decode = TorchWorker(bus, discovery, ns, "decode", policy="always")
    for w in (agg, prefill, decode):
        await w.host.start()
    await wait_for(lambda: len(decode.hook.pool) == 1, 20.0, "decode sees the prefill worker")
    yield agg, prefill, decode
    for w in (decode, prefill, agg):
        await w.host.close()


def rand_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 4000) for _ in range(n)]


async def test_disaggregated_equals_aggregated_token_for_token(workers):
    agg, prefill, decode = workers
    rng = random.Random(11)
    remote = 0

    async def check(tokens, **sampling):
        nonlocal remote
        want, _ = await agg.generate(request(tokens, **sampling))
        got, usage = await decode.generate(request(tokens, **sampling))
        remote += 1
        assert got == want
        return usage

    # a prompt of many blocks (and a partial one), several times the step's token budget
    await check(rand_tokens(rng, 21 * BS + 5))
    # a prefix cached on the prefill worker only (it ran it; the decode worker never did)
    shared = rand_tokens(rng, 10 * BS)
    out = await prefill.engine.submit(EngineRequest(
        "prime", [*shared, 7], proto.SamplingParams(temperature=0.0),
        proto.StopConditions(max_tokens=1)))
    _ = [o async for o in out]
    usage = await check(shared + rand_tokens(rng, 6 * BS + 3))
    assert usage.cached_tokens == 10 * BS  # what the prefill worker had cached
    # a prefix cached on the decode worker (its last request's blocks): only the rest travels
    before = decode.metric("genset_kv_transfer_bytes_total", side="rx")
    head = rand_tokens(rng, 12 * BS)
    await check(head + rand_tokens(rng, 2 * BS + 1))
    first_bytes = decode.metric("genset_kv_transfer_bytes_total", side="rx") - before
    before = decode.metric("genset_kv_transfer_bytes_total", side="rx")
    await check(head + rand_tokens(rng, 3 * BS + 2))
    second_bytes = decode.metric("genset_kv_transfer_bytes_total", side="rx") - before
    per_block = decode.engine.card.kv_layout.bytes_per_block
    assert first_bytes == 14 * per_block and second_bytes == 3 * per_block
    # seeded sampling, with penalties (their state covers the first token, made elsewhere)
    await check(rand_tokens(rng, 9 * BS + 1), temperature=0.9, seed=1234)
    await check(rand_tokens(rng, 7 * BS), temperature=0.7, top_k=40, seed=99,
                repetition_penalty=1.2, frequency_penalty=0.5)
    assert decode.metric("genset_disagg_remote_prefills_total") == remote
    assert decode.metric("genset_disagg_fallbacks_total") == 0
    # every prompt but the one ending on a block boundary shipped its partial last block
    assert decode.metric("genset_disagg_kv_tails_total") == remote - 1


async def test_several_requests_in_flight(workers):
    agg, prefill, decode = workers
    rng = random.Random(5)
    prompts = [rand_tokens(rng, rng.randrange(4 * BS, 16 * BS)) for _ in range(5)]
    seeded = {"temperature": 0.8, "seed": 42}
    want = [await agg.generate(request(p, 12, **(seeded if i % 2 else {})))
            for i, p in enumerate(prompts)]
    got = await asyncio.gather(*(decode.generate(request(p, 12, **(seeded if i % 2 else {})))
                                 for i, p in enumerate(prompts)))
    assert [g[0] for g in got] == [w[0] for w in want]
    assert decode.metric("genset_disagg_remote_prefills_total") == len(prompts)
    await wait_for(lambda: prefill.used_blocks == 0 and decode.used_blocks == 0, 20.0,
                   "both pools idle")


async def test_blocks_sent_while_the_prefill_still_computes(workers):
    """The send ships a prompt's blocks as the prefill's chunks compute them (pipelined), in
    transfer chunks of two blocks here: a prompt of six steps (64 tokens a step) still gives
    the aggregated tokens, and both pools end idle."""
    agg, prefill, decode = workers
    bpb = prefill.engine.card.kv_layout.bytes_per_block
    prefill.hook.hub.tcp_chunk_bytes = 2 * bpb
    prefill.hook.hub.nats_chunk_bytes = lambda: 2 * bpb
    rng = random.Random(3)
    for n in (40 * BS + 3, 24 * BS):
        tokens = rand_tokens(rng, n)
        want, _ = await agg.generate(request(tokens))
        got, _ = await decode.generate(request(tokens))
        assert got == want
    assert decode.metric("genset_disagg_remote_prefills_total") == 2
    assert decode.metric("genset_disagg_fallbacks_total") == 0
    await wait_for(lambda: prefill.used_blocks == 0 and decode.used_blocks == 0, 20.0,
                   "both pools idle")


async def test_a_first_token_outside_the_vocabulary_leaves_the_engine_serving(bus, discovery):
    """A prefill worker that answers a token id outside the vocabulary: the decode worker
    takes it as a bad reply and prefills locally. Taken as the first token, it was the input
    of the resumed request's step, which failed, and the engine with it: this request and
    every other one on the worker ended in an error."""
    ns = f"t{uuid.uuid4().hex[:8]}"
    agg = TorchWorker(bus, discovery, ns)
    decode = TorchWorker(bus, discovery, ns, "decode", policy="always",
                         first_token_timeout_s=20.0, transfer_timeout_s=2.0)
    vocab = decode.engine.card.vocab_size
    assert vocab > 0

    def answer(msg):
        return proto.RemotePrefillReply(
            request_id=msg.request.request_id, transfer_id=msg.target.transfer_id,
            first_token_ids=proto.pack_tokens([vocab + 7]))

    fake = await FakePrefill(bus, discovery, ns, answer, model=MODEL, block_size=BS).start()
    for w in (agg, decode):
        await w.host.start()
    try:
        await wait_for(lambda: len(decode.hook.pool) == 1, 20.0, "decode sees the fake")
        tokens = rand_tokens(random.Random(21), 5 * BS + 3)
        want, _ = await agg.generate(request(tokens))
        got, _ = await decode.generate(request(tokens))
        assert got == want
        assert decode.metric("genset_disagg_fallbacks_total", stage="first_token",
                             reason="bad_reply") == 1
        await fake.close()
        await wait_for(lambda: len(decode.hook.pool) == 0, 20.0, "the fake left the pool")
        again, _ = await decode.generate(request(tokens))  # the engine still serves
        assert again == want
    finally:
        for w in (decode, agg):
            await w.host.close()
        await fake.close()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
async def test_non_finite_kv_from_a_prefill_worker_is_refused_and_recomputed(workers, value):
    """A prefill worker whose exported KV is well-formed but full of NaN (or inf): the decode
    worker's engine refuses the import, and the request falls back (the prompt recomputed
    here) with the aggregated tokens. Taken as it came, the next sampled step failed with
    "probability tensor contains either inf, nan or element < 0", and the engine with it:
    this request and every other one on the worker ended in an error."""
    from genset.engines.torch import kvformat

    agg, prefill, decode = workers
    runner = prefill.engine.runner
    executor = prefill.engine.core.executor

    def poisoned(block_ids):  # the prompt's blocks and its partial last block (the tail)
        t = torch.full((len(block_ids), *runner.block_shape), value, dtype=runner.dtype)
        return kvformat.split(kvformat.encode(t))

    executor.read_kv = poisoned
    rng = random.Random(17)
    seeded = {"temperature": 0.9, "seed": 7}
    for i, tokens in enumerate((rand_tokens(rng, 6 * BS + 3), rand_tokens(rng, 4 * BS))):
        want, _ = await agg.generate(request(tokens, **seeded))
        got, _ = await decode.generate(request(tokens, **seeded))
        assert got == want
        assert decode.metric("genset_disagg_fallbacks_total", stage="transfer",
                             reason="kv_import_failed") == i + 1
    # nothing non-finite was cached under the prompt's hashes: the engine serves on, exactly
    del executor.read_kv
    tokens = rand_tokens(rng, 5 * BS + 1)
    want, _ = await agg.generate(request(tokens, **seeded))
    got, _ = await decode.generate(request(tokens, **seeded))
    assert got == want
    await wait_for(lambda: prefill.used_blocks == 0 and decode.used_blocks == 0, 20.0,
                   "both pools idle")
