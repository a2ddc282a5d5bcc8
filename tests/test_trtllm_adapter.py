"""TensorRT-LLM adapter: recorded-format event fixtures, stats, and the engine glue (with a
stand-in `tensorrt_llm` module, since the real one cannot be installed here)."""

from __future__ import annotations

import asyncio
import json
import sys
import types
from pathlib import Path

import pytest

from genset.engines.trtllm import (
    TrtllmEngine,
    TrtllmEventTranslator,
    TrtllmNotInstalled,
    load_from_stats,
)
from genset.engines.types import EngineRequest
from genset.kv.hashing import block_hashes
from genset.kv.replica import HashSetReplica
from proto.generate import StopConditions
from proto.kv import Cleared, Removed, Stored, StoredBlock

FIXTURES = Path(__file__).parent / "fixtures" / "trtllm"


def load(name: str) -> list[dict]:
    return json.loads((FIXTURES / name).read_text())


def test_single_window_fixture():
    tr = TrtllmEventTranslator(block_size=4)
    events = tr.translate(load("single_window.json"))
    g = block_hashes([1, 450, 4996, 310, 278, 3303, 338, 13, 7, 8, 9, 10], 4)
    assert events == [
        Cleared(),
        Stored(parent_hash=None, blocks=[StoredBlock(hash=g[0]), StoredBlock(hash=g[1])]),
        Stored(parent_hash=g[1], blocks=[StoredBlock(hash=g[2])]),
        # event 3: same tokens as block 0 under another TRT hash -> no second Stored
        # event 4: `updated` -> nothing
        Removed(hashes=[g[2]]),  # event 5; its unknown hash 123456789 is dropped
        # event 6: one of two TRT blocks behind g[0] removed -> still held
        Removed(hashes=[g[0]]),  # event 7
    ]
    assert tr.held_hashes() == {g[1]}


def test_multi_window_partial_and_unknown_parent_fixture():
    tr = TrtllmEventTranslator(block_size=4)
    events = tr.translate(load("multi_window_partial.json"))
    g0 = block_hashes([11, 12, 13, 14], 4)[0]
    assert events == [
        Cleared(),  # created, window 128 (the largest seen so far)
        Cleared(),  # created, window 4096: from now on only 4096 counts
        # window-128 store dropped; in the 4096 store the partial 2nd block ends the chain
        Stored(parent_hash=None, blocks=[StoredBlock(hash=g0)]),
        # the store under unknown parent 555555 and all removals of unseen blocks dropped
        Cleared(),  # a fresh `created`
    ]
    assert tr.held_hashes() == set()
    assert tr.dropped >= 5


def test_configured_window_keeps_only_that_window():
    tr = TrtllmEventTranslator(block_size=4, window_size=128)
    events = tr.translate(load("multi_window_partial.json")[:6])
    g = block_hashes([11, 12, 13, 14], 4)[0]
    assert events == [
        Cleared(),
        Stored(parent_hash=None, blocks=[StoredBlock(hash=g)]),
        Removed(hashes=[g]),
    ]


def test_token_ids_in_events_when_asked():
    tr = TrtllmEventTranslator(block_size=4, emit_token_ids=True)
    events = tr.translate(load("single_window.json")[:2])
    stored = events[1]
    assert isinstance(stored, Stored)
    assert stored.blocks[0].token_ids == b"".join(
        t.to_bytes(4, "little") for t in (1, 450, 4996, 310)
    )


def test_load_from_stats():
    stat = {
        "iter": 154,
        "iterLatencyMS": 7.0,
        "numActiveRequests": 3,
        "numQueuedRequests": 2,
        "inflightBatchingStats": {"numPausedRequests": 1},
        "kvCacheStats": {"maxNumBlocks": 101256, "freeNumBlocks": 101253, "usedNumBlocks": 3},
    }
    rep = load_from_stats(stat, worker_id=4, ts_ms=10)
    assert (rep.running, rep.waiting, rep.kv_used_blocks, rep.kv_total_blocks) == (3, 3, 3, 101256)
    assert rep.step_ms_ewma == 7.0 and rep.worker_id == 4


async def test_missing_package_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # import fails
    engine = TrtllmEngine("some/model")
    with pytest.raises(
        TrtllmNotInstalled, match="TensorRT-LLM is not installed: pip install tensorrt-llm"
    ):
        await engine.start()


# ---- the glue, against a stand-in tensorrt_llm --------------------------------------------


class _Completion:
    def __init__(self, ids, reason):
        self.token_ids = ids
        self.finish_reason = reason


class _Output:
    def __init__(self, prompt, ids, finished, reason):
        self.prompt_token_ids = prompt
        self.outputs = [_Completion(ids, reason)]
        self.finished = finished


class _Result:
    def __init__(self, prompt, params):
        self.prompt, self.params, self.aborted = prompt, params, False

    async def _gen(self):
        ids = []
        n = self.params.kw["max_tokens"]
        for i in range(n):
            await asyncio.sleep(0)
            if self.aborted:
                yield _Output(self.prompt, ids, True, "cancelled")
                return
            ids = [*ids, 100 + i]
            yield _Output(self.prompt, ids, i == n - 1, "length" if i == n - 1 else None)

    def __aiter__(self):
        return self._gen()

    def abort(self):
        self.aborted = True


class _SamplingParams:
    def __init__(self, **kw):
        self.kw = kw


class _KvCacheConfig:
    def __init__(self, **kw):
        self.kw = kw


class _LLM:
    instances: list[_LLM] = []

    def __init__(self, **kw):
        self.kw = kw
        self.events = load("single_window.json")
        self.stats = [
            {"numActiveRequests": 1, "kvCacheStats": {"usedNumBlocks": 5, "maxNumBlocks": 64}}
        ]
        _LLM.instances.append(self)

    def generate_async(self, prompt, params, streaming):
        assert streaming
        return _Result(prompt, params)

    async def get_kv_cache_events_async(self, timeout):  # noqa: ASYNC109 - TRT-LLM signature
        events, self.events = self.events, []
        for ev in events:
            yield ev

    async def get_stats_async(self, timeout):  # noqa: ASYNC109 - TRT-LLM signature
        stats, self.stats = self.stats, []
        for st in stats:
            yield st

    def shutdown(self):
        pass


@pytest.fixture
def fake_trtllm(monkeypatch):
    mod = types.ModuleType("tensorrt_llm")
    mod.LLM = _LLM
    mod.SamplingParams = _SamplingParams
    api = types.ModuleType("tensorrt_llm.llmapi")
    api.KvCacheConfig = _KvCacheConfig
    mod.llmapi = api
    monkeypatch.setitem(sys.modules, "tensorrt_llm", mod)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.llmapi", api)
    return mod


async def test_engine_glue_with_stand_in(fake_trtllm):
    engine = TrtllmEngine("m", block_size=4, worker_id=3, context_length=100)
    sub = engine.kv_events()
    await engine.start()
    try:
        llm = _LLM.instances[-1]
        kv_cfg = llm.kw["kv_cache_config"].kw
        assert kv_cfg["enable_block_reuse"] and kv_cfg["event_buffer_max_size"] > 0
        assert kv_cfg["tokens_per_block"] == 4 and llm.kw["enable_iter_perf_stats"]

        stream = await engine.submit(
            EngineRequest("a", [1, 2, 3], stop=StopConditions(max_tokens=4))
        )
        tokens, last = [], None
        async for out in stream:
            tokens += out.token_ids
            last = out
        assert tokens == [100, 101, 102, 103] and last.finish_reason == "length"
        assert last.completion_tokens == 4 and last.prompt_tokens == 3

        with pytest.raises(ValueError, match="context length"):
            await engine.submit(EngineRequest("b", list(range(100))))

        long = await engine.submit(EngineRequest("c", [1], stop=StopConditions(max_tokens=10_000)))
        await long.__anext__()
        await long.aclose()
        outs = [o async for o in long]
        assert outs[-1].finish_reason == "cancelled"

        replica = HashSetReplica()
        batch = await asyncio.wait_for(sub.__anext__(), 5)
        assert batch.worker_id == 3 and replica.apply(batch)
        assert replica.hashes == engine.translator.held_hashes()
        for _ in range(3000):  # the stats pump's first poll; a generous 30 s deadline
            if engine.load().kv_total_blocks:
                break
            await asyncio.sleep(0.01)
        assert engine.load().kv_used_blocks == 5 and engine.card.kv_blocks == 64
        snap = await engine.kv_snapshot()
        assert snap.event_id == batch.event_id + 1
    finally:
        sub.close()
        await engine.stop()


def test_factory_fails_fast_without_package(monkeypatch):
    from genset.engines.factory import EngineConfigError, build_engine, check_engine_available
    from genset.engines.trtllm import create_trtllm_engine

    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    with pytest.raises(TrtllmNotInstalled, match="TensorRT-LLM is not installed"):
        create_trtllm_engine("m", max_batch_tokens=None)
    with pytest.raises(EngineConfigError, match="TensorRT-LLM is not installed"):
        check_engine_available("trtllm")
    with pytest.raises(EngineConfigError, match="needs TensorRT-LLM"):
        build_engine("trtllm", "tiny", worker_id=0)


def test_engines_package_does_not_import_torch():
    import subprocess

    code = (
        "import sys; from genset.engines.factory import build_engine; "
        "eng = build_engine('mocker', 'tiny', worker_id=1); "
        "import genset.engines.trtllm, genset.engines.scheduler; "
        "assert 'torch' not in sys.modules, 'torch imported'; print(eng.card.engine)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "mocker"


def test_finish_reasons_are_the_wires():
    """The wire refuses a finish reason outside proto.values.FINISH_REASONS, so whatever
    TensorRT-LLM says is mapped into that set (an unknown one ends the request as an error)."""
    from genset.engines.trtllm import _finish_reason
    from proto.values import FINISH_REASONS

    assert _finish_reason(None) == "stop"
    for reason in FINISH_REASONS:
        assert _finish_reason(reason) == reason
    assert _finish_reason("timeout") == "error"
