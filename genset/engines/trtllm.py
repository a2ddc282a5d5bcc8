"""TensorRT-LLM adapter: `tensorrt_llm.LLM` behind genset's `Engine` interface.

TensorRT-LLM schedules, batches and caches by itself; this adapter only translates:

- requests: `LLM.generate_async(token_ids, SamplingParams, streaming=True)`; each streamed
  `RequestOutput` carries the cumulative output ids, of which the new ones are forwarded.
- load: `LLM.get_stats_async()` iteration stats (``numActiveRequests``,
  ``numQueuedRequests``, ``kvCacheStats.usedNumBlocks/maxNumBlocks``, ``iterLatencyMS``;
  needs ``enable_iter_perf_stats=True``).
- KV events: `LLM.get_kv_cache_events_async()` (needs
  ``KvCacheConfig(enable_block_reuse=True, event_buffer_max_size>0)``) yields event dicts
  in TensorRT-LLM's serialized form (``KVCacheEventSerializer``)::

      {"event_id": 7, "window_size": 4096, ["attention_dp_rank": 0,]
       "data": {"type": "created", "num_blocks_per_cache_level": [n_gpu, n_host]}
             | {"type": "stored", "parent_hash": int | None,
                "blocks": [{"type": "stored_block", "block_hash": int,
                            "tokens": [{"type": "unique_token", "token_id": int,
                                        "token_extra_id": int}, ...],
                            "cache_level": int, "priority": int}, ...]}
             | {"type": "removed", "block_hashes": [int, ...]}
             | {"type": "updated", "block_hash": int,
                "cache_level": {"type": "event_diff", "new_value": .., "old_value": ..},
                "priority": {...}}}

  `TrtllmEventTranslator` turns them into genset events. TensorRT-LLM's block hashes are its
  own, so genset hashes are recomputed from the blocks' token ids (`genset.kv.hashing`) and
  a map TRT hash -> genset hash serves later removals. Rules:

  * models with several attention windows (variable sliding window) emit one event stream
    per window; only the largest window is kept, since its blocks decide what prefix is
    reusable (a configured `window_size` wins; otherwise the largest seen in `created`
    events or events so far);
  * a stored block with fewer tokens than the block size (partial reuse) is dropped, and so
    is every block after it in that event (their chain would hang off a block genset does
    not know);
  * a stored chain whose parent TRT hash was never seen is dropped (logged at debug);
  * a removal of a TRT hash never seen stored is dropped (logged at debug), not an error;
  * two TRT blocks with the same genset hash (TRT hashes extra ids genset ignores) are
    counted: `Removed` goes out when the last of them goes;
  * `created` means a fresh cache: `Cleared`; `updated` (priority or cache-level changes)
    does not change what is held and is ignored.

The package is imported lazily, only when an engine is started, so this module imports
fine without it; `create_trtllm_engine` (and starting an engine) without it raises
`TrtllmNotInstalled` (an ImportError) with a clear message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from genset.engines.driver import RequestStream
from genset.engines.events import KvEventFanout, KvEventSubscription
from genset.engines.interface import Engine
from genset.engines.types import EngineCard, EngineOutput, EngineRequest, KvBlockData, KvImport
from genset.kv.hashing import chain_hash, local_block_hash
from proto.kv import Cleared, KvEvent, KvEventBatch, LoadReport, Removed, Stored, StoredBlock
from proto.tokens import pack_tokens
from proto.values import FINISH_CANCELLED, FINISH_ERROR, FINISH_REASONS, FINISH_STOP

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "TensorRT-LLM is not installed: pip install tensorrt-llm on a machine with NVIDIA GPUs "
    "(Linux x86_64/aarch64, CUDA 12+; the registry package pulls the real wheels from "
    "NVIDIA's index, see https://nvidia.github.io/TensorRT-LLM/installation/). "
    "Use --engine torch or --engine mocker on machines without it."
)


class TrtllmNotInstalled(ImportError):
    """`tensorrt_llm` cannot be imported (an ImportError, with install instructions)."""


def import_tensorrt_llm() -> Any:
    """The `tensorrt_llm` module, or `TrtllmNotInstalled` with install instructions."""
    try:
        import tensorrt_llm
    except ImportError as exc:
        raise TrtllmNotInstalled(INSTALL_HINT) from exc
    return tensorrt_llm


class TrtllmEventTranslator:
    """TensorRT-LLM KV event dicts -> genset `KvEvent`s (see the module docstring)."""

    def __init__(
        self, block_size: int, *, window_size: int | None = None, emit_token_ids: bool = False
    ) -> None:
        self.block_size = block_size
        self.fixed_window = window_size
        self.window_size = window_size  # the window whose events are kept
        self.emit_token_ids = emit_token_ids
        self.trt_to_genset: dict[int, int] = {}
        self.refs: dict[int, int] = {}  # genset hash -> number of TRT blocks behind it
        self.dropped = 0  # events or blocks ignored (other windows, partial, unknown)

    def translate(self, events: Iterable[Mapping[str, Any]]) -> list[KvEvent]:
        out: list[KvEvent] = []
        for ev in events:
            data = ev.get("data") or {}
            kind = data.get("type")
            if not self._keep_window(ev.get("window_size"), kind == "created"):
                self.dropped += 1
                continue
            if kind == "stored":
                self._stored(data, out)
            elif kind == "removed":
                self._removed(data.get("block_hashes") or [], out)
            elif kind == "created":
                self.trt_to_genset.clear()
                self.refs.clear()
                out.append(Cleared())
            elif kind == "updated":
                pass
            else:
                log.debug("unknown TensorRT-LLM KV event type %r", kind)
                self.dropped += 1
        return out

    def _keep_window(self, window: int | None, is_created: bool) -> bool:
        if window is None:
            return True
        if self.fixed_window is not None:
            return window == self.fixed_window
        if self.window_size is None or window > self.window_size:
            if self.window_size is not None and not is_created:
                log.debug("KV events of a larger window %d appeared; switching to it", window)
            self.window_size = window
        return window == self.window_size

    def _stored(self, data: Mapping[str, Any], out: list[KvEvent]) -> None:
        trt_parent = data.get("parent_hash")
        if trt_parent is None:
            parent = None
        else:
            parent = self.trt_to_genset.get(trt_parent)
            if parent is None:
                log.debug("stored blocks after unknown TensorRT-LLM block %s dropped", trt_parent)
                self.dropped += 1
                return
        first_parent = parent
        blocks: list[StoredBlock] = []
        for block in data.get("blocks") or []:
            tokens = [
                t["token_id"] if isinstance(t, Mapping) else int(t)
                for t in block.get("tokens") or []
            ]
            if len(tokens) != self.block_size:
                # partial block: not shareable, and nothing after it can chain
                self.dropped += 1
                break
            h = chain_hash(parent, local_block_hash(tokens))
            trt_hash = block["block_hash"]
            previous = self.trt_to_genset.get(trt_hash)
            if previous is None:
                self.trt_to_genset[trt_hash] = h
                count = self.refs.get(h, 0)
                self.refs[h] = count + 1
                if count == 0:
                    blocks.append(
                        StoredBlock(
                            hash=h, token_ids=pack_tokens(tokens) if self.emit_token_ids else None
                        )
                    )
            parent = h
            if previous is not None or self.refs[h] > 1:
                # already announced: close the current run so parents stay exact
                if blocks:
                    out.append(Stored(parent_hash=first_parent, blocks=blocks))
                    blocks = []
                first_parent = h
        if blocks:
            out.append(Stored(parent_hash=first_parent, blocks=blocks))

    def _removed(self, trt_hashes: Iterable[int], out: list[KvEvent]) -> None:
        gone: list[int] = []
        for trt_hash in trt_hashes:
            h = self.trt_to_genset.pop(trt_hash, None)
            if h is None:
                log.debug("removal of TensorRT-LLM block %s never seen stored: dropped", trt_hash)
                self.dropped += 1
                continue
            count = self.refs[h] - 1
            if count:
                self.refs[h] = count
            else:
                del self.refs[h]
                gone.append(h)
        if gone:
            out.append(Removed(hashes=gone))

    def held_hashes(self) -> set[int]:
        return set(self.refs)


def load_from_stats(
    stat: Mapping[str, Any], worker_id: int, ts_ms: int, previous: LoadReport | None = None
) -> LoadReport:
    """A `LoadReport` from one TensorRT-LLM iteration-stats dict."""
    kv = stat.get("kvCacheStats") or {}
    ifb = stat.get("inflightBatchingStats") or {}
    return LoadReport(
        worker_id=worker_id,
        ts_ms=ts_ms,
        running=int(stat.get("numActiveRequests", 0)),
        waiting=int(stat.get("numQueuedRequests", 0)) + int(ifb.get("numPausedRequests", 0)),
        waiting_prefill_tokens=previous.waiting_prefill_tokens if previous else 0,
        kv_used_blocks=int(kv.get("usedNumBlocks", 0)),
        kv_total_blocks=int(kv.get("maxNumBlocks", 0)),
        step_ms_ewma=float(stat.get("iterLatencyMS", previous.step_ms_ewma if previous else 0.0)),
    )


class TrtllmEngine(Engine):
    """An `Engine` backed by `tensorrt_llm.LLM` (PyTorch backend by default).

    `llm_kwargs` go to `LLM(...)` unchanged (tensor_parallel_size, dtype, ...). KV export and
    import are not offered: TensorRT-LLM moves KV itself in its own disaggregated mode.
    """

    def __init__(
        self,
        model: str,
        *,
        worker_id: int = 0,
        block_size: int = 32,
        max_batch_tokens: int = 8192,
        max_running: int = 256,
        context_length: int = 4096,
        eos_token_ids: list[int] | None = None,
        window_size: int | None = None,
        event_buffer_max_size: int = 16384,
        free_gpu_memory_fraction: float = 0.9,
        stream_maxsize: int = 64,
        **llm_kwargs: Any,
    ) -> None:
        self.model = model
        self.worker_id = worker_id
        self._card = EngineCard(
            engine="trtllm",
            block_size=block_size,
            kv_blocks=0,  # known from the first stats
            max_batch_tokens=max_batch_tokens,
            max_running=max_running,
            context_length=context_length,
            eos_token_ids=list(eos_token_ids or []),
        )
        self._event_buffer = event_buffer_max_size
        self._gpu_fraction = free_gpu_memory_fraction
        self._llm_kwargs = llm_kwargs
        self._stream_maxsize = stream_maxsize
        self.translator = TrtllmEventTranslator(block_size, window_size=window_size)
        self._trtllm: Any = None
        self._llm: Any = None
        self._event_id = 0
        self._kv_fanout = KvEventFanout()
        self._streams: dict[str, RequestStream] = {}
        self._results: dict[str, Any] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._load = LoadReport(worker_id=worker_id, ts_ms=0)

    @property
    def card(self) -> EngineCard:
        return self._card

    async def start(self) -> None:
        if self._llm is not None:
            return
        trtllm = import_tensorrt_llm()
        from tensorrt_llm.llmapi import KvCacheConfig

        self._trtllm = trtllm
        kv_config = KvCacheConfig(
            enable_block_reuse=True,
            event_buffer_max_size=self._event_buffer,
            free_gpu_memory_fraction=self._gpu_fraction,
            tokens_per_block=self._card.block_size,
        )
        kwargs = dict(
            model=self.model,
            kv_cache_config=kv_config,
            max_num_tokens=self._card.max_batch_tokens,
            max_batch_size=self._card.max_running,
            max_seq_len=self._card.context_length,
            enable_iter_perf_stats=True,
        )
        kwargs.update(self._llm_kwargs)
        # building/loading an engine takes minutes: off the loop
        self._llm = await asyncio.to_thread(trtllm.LLM, **kwargs)
        self._tasks = [
            asyncio.create_task(self._pump_events(), name="trtllm-kv-events"),
            asyncio.create_task(self._pump_stats(), name="trtllm-stats"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for rid in list(self._streams):
            await self.abort(rid)
        if self._llm is not None:
            await asyncio.to_thread(self._llm.shutdown)
            self._llm = None

    def _sampling_params(self, request: EngineRequest) -> Any:
        s, stop = request.sampling, request.stop
        opts: dict[str, Any] = dict(
            max_tokens=stop.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            stop_token_ids=list(stop.stop_token_ids) or None,
            ignore_eos=stop.ignore_eos,
            min_tokens=stop.min_tokens or None,
            seed=s.seed,
        )
        if s.top_k:
            opts["top_k"] = s.top_k
        # TensorRT-LLM's SamplingParams define the penalties as genset does (OpenAI's
        # presence / frequency, Hugging Face's repetition); passed only when set
        if s.presence_penalty:
            opts["presence_penalty"] = s.presence_penalty
        if s.frequency_penalty:
            opts["frequency_penalty"] = s.frequency_penalty
        if s.repetition_penalty != 1.0:
            opts["repetition_penalty"] = s.repetition_penalty
        return self._trtllm.SamplingParams(**{k: v for k, v in opts.items() if v is not None})

    async def submit(self, request: EngineRequest) -> RequestStream:
        if self._llm is None:
            await self.start()
        if request.kv_import is not None:
            raise ValueError("the TensorRT-LLM engine does not take imported KV blocks")
        # not translated yet: refused by name rather than silently ignored
        if request.sampling.logprobs is not None:
            raise ValueError("logprobs: the trtllm engine adapter does not return "
                             "log-probabilities; send the request without logprobs")
        if request.sampling.logit_bias:
            raise ValueError("logit_bias: the trtllm engine adapter does not apply logit_bias")
        if not request.token_ids:
            raise ValueError("prompt has no tokens")
        if len(request.token_ids) >= self._card.context_length:
            raise ValueError(
                f"prompt has {len(request.token_ids)} tokens, "
                f"context length is {self._card.context_length}"
            )
        if request.request_id in self._streams:
            raise ValueError(f"request id {request.request_id!r} is already active")
        result = self._llm.generate_async(
            list(request.token_ids), self._sampling_params(request), streaming=True
        )
        stream = RequestStream(request.request_id, self.abort, self._stream_maxsize)
        self._streams[request.request_id] = stream
        self._results[request.request_id] = result
        self._tasks.append(asyncio.create_task(self._pump_request(request, result, stream)))
        return stream

    async def _pump_request(
        self, request: EngineRequest, result: Any, stream: RequestStream
    ) -> None:
        rid = request.request_id
        sent = 0
        cached = 0
        try:
            async for output in result:
                completion = output.outputs[0]
                ids = list(completion.token_ids)
                new = ids[sent:]
                sent = len(ids)
                if not cached:
                    cached = _cached_tokens(output, self._card.block_size)
                reason = completion.finish_reason if output.finished else None
                if not new and reason is None:
                    continue
                stream.put(
                    EngineOutput(
                        request_id=rid,
                        token_ids=new,
                        finish_reason=_finish_reason(reason) if output.finished else None,
                        prompt_tokens=len(request.token_ids),
                        cached_tokens=cached,
                        completion_tokens=sent,
                    )
                )
                if output.finished:
                    break
        except Exception as exc:  # the engine failed this request
            log.exception("TensorRT-LLM request %s failed", rid)
            stream.put(
                EngineOutput(request_id=rid, token_ids=[], finish_reason=FINISH_ERROR, error=repr(exc))
            )
        finally:
            self._streams.pop(rid, None)
            self._results.pop(rid, None)

    async def abort(self, request_id: str) -> None:
        result = self._results.pop(request_id, None)
        stream = self._streams.pop(request_id, None)
        if result is not None:
            with contextlib.suppress(Exception):
                result.abort()
        if stream is not None:
            stream.put(EngineOutput(request_id=request_id, token_ids=[], finish_reason=FINISH_CANCELLED))

    async def export_kv(self, hashes: list[int]) -> list[KvBlockData]:
        raise NotImplementedError("KV export is not available with TensorRT-LLM")

    async def import_kv(self, kv: KvImport) -> int:
        raise NotImplementedError("KV import is not available with TensorRT-LLM")

    def load(self) -> LoadReport:
        return self._load

    def kv_events(self, maxsize: int = 1024) -> KvEventSubscription:
        return self._kv_fanout.subscribe(maxsize)

    async def kv_snapshot(self) -> KvEventBatch:
        held = self.translator.held_hashes()
        # chain parents are not kept per hash here; a hash-set consumer does not need them
        events: list[KvEvent] = [Cleared(), Stored(blocks=[StoredBlock(hash=h) for h in held])]
        return self._next_batch(events)

    def _next_batch(self, events: list[KvEvent]) -> KvEventBatch:
        self._event_id += 1
        return KvEventBatch(
            worker_id=self.worker_id,
            event_id=self._event_id,
            events=events,
            ts_ms=int(time.time() * 1000),
        )

    def publish_trt_events(self, trt_events: list[Mapping[str, Any]]) -> KvEventBatch | None:
        """Translate a group of TensorRT-LLM events and hand the batch to subscribers."""
        events = self.translator.translate(trt_events)
        if not events:
            return None
        batch = self._next_batch(events)
        self._kv_fanout.publish(batch)
        return batch

    async def _pump_events(self) -> None:
        while True:
            pending: list[Mapping[str, Any]] = []
            try:
                async for ev in self._llm.get_kv_cache_events_async(timeout=0.05):
                    pending.append(ev)
                    if len(pending) >= 256:
                        self.publish_trt_events(pending)
                        pending = []
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reading TensorRT-LLM KV events failed")
                await asyncio.sleep(0.5)
            if pending:
                self.publish_trt_events(pending)
            await asyncio.sleep(0.01)

    async def _pump_stats(self) -> None:
        while True:
            try:
                async for stat in self._llm.get_stats_async(timeout=0.5):
                    self._load = load_from_stats(
                        stat, self.worker_id, int(time.time() * 1000), self._load
                    )
                    total = self._load.kv_total_blocks
                    if total:
                        self._card.kv_blocks = total
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reading TensorRT-LLM stats failed")
            await asyncio.sleep(0.1)


def _finish_reason(reason: Any) -> str:
    """TensorRT-LLM's finish reason as one of the wire's (proto.values.FINISH_REASONS): the
    wire refuses any other value, so one TensorRT-LLM adds later (e.g. a timeout) ends the
    request as an error rather than as a frame no frontend can decode."""
    if reason is None:
        return FINISH_STOP
    return reason if reason in FINISH_REASONS else FINISH_ERROR


def _cached_tokens(output: Any, block_size: int) -> int:
    """Prompt tokens served from TensorRT-LLM's cache, when its perf metrics say so."""
    completion = output.outputs[0]
    metrics = getattr(completion, "request_perf_metrics", None)
    kv = getattr(metrics, "kv_cache_metrics", None)
    reused = getattr(kv, "num_reused_blocks", None)
    if reused:
        return min(int(reused) * block_size, len(getattr(output, "prompt_token_ids", []) or []))
    return 0


def create_trtllm_engine(
    model: str,
    *,
    worker_id: int = 0,
    block_size: int = 32,
    max_batch_tokens: int | None = None,
    max_running: int = 256,
    **opts: Any,
) -> TrtllmEngine:
    """A not-yet-started `TrtllmEngine`; raises `TrtllmNotInstalled` at once when the package
    is missing, so a worker fails at start-up rather than on its first request."""
    import_tensorrt_llm()
    return TrtllmEngine(
        model,
        worker_id=worker_id,
        block_size=block_size,
        max_batch_tokens=max_batch_tokens or 8192,
        max_running=max_running,
        **opts,
    )
