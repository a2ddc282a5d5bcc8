"""The one scheduling core (genset.engines.core) under both executors: a request's KV import
happens after its checks and before it is queued, the same way for the mocker and torch."""

from __future__ import annotations

import random

import pytest

from genset.engines.mocker import MockerConfig, MockerCore
from genset.engines.types import EngineRequest, KvBlockData, KvImport
from genset.kv.hashing import block_hashes
from proto.generate import SamplingParams, StopConditions
from proto.kv import Stored

BS = 8


def make_core(kind: str, num_blocks: int = 64):
    if kind == "mocker":
        return MockerCore(MockerConfig(block_size=BS, num_blocks=num_blocks, vocab_size=4096))
    pytest.importorskip("torch")
    from genset.engines.torch.engine import TorchEngineCore
    from genset.engines.torch.runner import ModelRunner

    return TorchEngineCore(ModelRunner("tiny", num_blocks=num_blocks, block_size=BS))


def req(rid: str, prompt: list[int], kv: KvImport | None = None, max_tokens: int = 2):
    return EngineRequest(rid, prompt, SamplingParams(temperature=0.0),
                         StopConditions(max_tokens=max_tokens, ignore_eos=True), kv_import=kv)


def prompt_of(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 4096) for _ in range(n)]


def exported(kind: str, prompt: list[int]) -> list[KvBlockData]:
    """The prompt's full blocks with this engine's payloads, computed on another core."""
    src = make_core(kind)
    src.add_request(req("src", prompt, max_tokens=1))
    while src.has_work():
        src.step()
    blocks = src.export_kv(block_hashes(prompt, BS))
    assert [b.hash for b in blocks] == block_hashes(prompt, BS)
    return blocks


def stored_hashes(core) -> list[int]:
    batch = core.take_kv_batch(0)
    if batch is None:
        return []
    return [b.hash for ev in batch.events if isinstance(ev, Stored) for b in ev.blocks]


KINDS = ["mocker", "torch"]


@pytest.mark.parametrize("kind", KINDS)
def test_import_comes_before_the_request_is_queued(kind):
    prompt = prompt_of(1, 4 * BS + 5)  # 4 full blocks + 5 tokens
    blocks = exported(kind, prompt)
    core = make_core(kind)
    core.add_request(req("r", prompt, KvImport(blocks)))
    # Before any step: the prefix is cached (and published), held for the request, and the
    # request waits behind it.
    hashes = [b.hash for b in blocks]
    ids = [core.pool.block_of(h) for h in hashes]
    assert None not in ids and all(core.pool.ref_cnt[b] > 0 for b in ids)  # pinned
    assert stored_hashes(core) == hashes
    assert core.num_waiting == 1
    # so the first time the scheduler looks at the request, its prefix is a cache hit
    outputs, _ = core.step()
    assert outputs[0].cached_tokens == 4 * BS
    assert core.scheduler.num_computed_tokens == 5
    while core.has_work():
        core.step()
    assert core.pool.num_used == 0  # the pins went with the admission


@pytest.mark.parametrize("kind", KINDS)
def test_a_refused_request_imports_nothing(kind):
    prompt = prompt_of(2, 3 * BS + 1)
    blocks = exported(kind, prompt)
    core = make_core(kind)
    other = prompt_of(3, 3 * BS + 1)
    other_blocks = exported(kind, other)
    core.add_request(req("x", other, KvImport(other_blocks)))  # waiting, its blocks pinned
    assert stored_hashes(core) == [b.hash for b in other_blocks]
    used = core.pool.num_used
    # a duplicate id, an empty prompt, a prompt past the context: refused before the import
    # (and a refusal leaves the pins of the request already queued under that id alone)
    with pytest.raises(ValueError, match="already active"):
        core.add_request(req("x", prompt, KvImport(blocks)))
    with pytest.raises(ValueError, match="no tokens"):
        core.add_request(req("e", [], KvImport(blocks)))
    with pytest.raises(ValueError, match="tokens"):
        core.add_request(req("long", prompt_of(4, 64 * BS), KvImport(blocks)))
    assert all(core.pool.block_of(b.hash) is None for b in blocks)
    assert not core.has_kv_pending() and core.pool.num_used == used
    assert core.num_waiting == 1


def test_a_bad_payload_queues_nothing_and_pins_nothing():
    pytest.importorskip("torch")
    prompt = prompt_of(5, 2 * BS + 3)
    blocks = exported("torch", prompt)
    core = make_core("torch")
    bad = [blocks[0], KvBlockData(blocks[1].hash, b"not a kv block")]
    with pytest.raises(ValueError, match="KV payload"):
        core.add_request(req("r", prompt, KvImport(bad)))
    assert not core.has_work() and core.pool.num_used == 0
    assert core.pool.block_of(blocks[0].hash) is None and not core.has_kv_pending()
    # the id is free again and the engine serves it
    core.add_request(req("r", prompt, KvImport(blocks)))
    outputs, _ = core.step()
    assert outputs[0].cached_tokens == 2 * BS


def test_merged_outputs_keep_one_logprob_entry_per_token():
    """A lagging reader gets outputs merged (RequestStream, MockerDriver coalescing): the
    logprobs are merged alongside, in order."""
    from genset.engines.driver import merge_output
    from genset.engines.types import EngineOutput, Logprobs

    a = EngineOutput("r", [5], logprobs=Logprobs([-0.1], [[5, 6]], [[-0.1, -2.0]]))
    merge_output(a, EngineOutput("r", [7, 8], logprobs=Logprobs(
        [-0.2, -0.3], [[7, 1], [8, 2]], [[-0.2, -3.0], [-0.3, -4.0]])))
    merge_output(a, EngineOutput("r", [], finish_reason="cancelled"))  # the end: no tokens
    assert a.token_ids == [5, 7, 8] and a.finish_reason == "cancelled"
    assert a.logprobs == Logprobs([-0.1, -0.2, -0.3], [[5, 6], [7, 1], [8, 2]],
                                  [[-0.1, -2.0], [-0.2, -3.0], [-0.3, -4.0]])
    empty = EngineOutput("r", [])
    merge_output(empty, EngineOutput("r", [9], logprobs=Logprobs([-1.0], [[]], [[]])))
    assert empty.logprobs == Logprobs([-1.0], [[]], [[]])


def test_kv_subscription_direct_takes_a_batch_only_when_nothing_is_queued():
    from genset.engines.events import KvEventFanout
    from proto.kv import KvEventBatch

    fanout = KvEventFanout()
    sub = fanout.subscribe(8)
    taken: list[int] = []
    accept = [True]

    def direct(batch) -> bool:
        if accept[0]:
            taken.append(batch.event_id)
        return accept[0]

    sub.direct = direct
    assert fanout.publish(KvEventBatch(worker_id=1, event_id=1, events=[])) is False
    accept[0] = False
    assert fanout.publish(KvEventBatch(worker_id=1, event_id=2, events=[])) is True
    accept[0] = True
    # 2 is queued: 3 must follow it, not overtake it through `direct`
    assert fanout.publish(KvEventBatch(worker_id=1, event_id=3, events=[])) is True
    assert taken == [1]
    assert [sub.get_nowait().event_id, sub.get_nowait().event_id] == [2, 3]
