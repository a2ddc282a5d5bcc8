"""One request's path through the frontend, shared by HTTP and the NATS service:

prepare (validate, template, tokenize, check the context) -> route -> stream tokens from the
worker over NATS -> detokenize + stop strings -> deltas out. Failures of a worker before or
during the stream migrate the request to another worker; a consumer that goes away (HTTP
client disconnect, NATS client cancel) closes the generator, which cancels the worker stream.

The per-chunk loop is the hot path: one unpack, one Rust detokenize call, a few attribute
updates; metrics are observed per chunk, not per token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog

import proto
from genset.runtime.bus import (
    DeadlineExceeded,
    Disconnected,
    LostChunks,
    NoResponders,
    Overloaded,
    PeerGone,
    RemoteError,
    StreamError,
)
from genset.tokenizer import OFFLOAD_CHARS, Tokenizer, TokenizerError
from proto.tokens import pack_tokens, unpack_tokens
from services.frontend.errors import ApiError, bad_request, from_error_info, no_worker
from services.frontend.metrics import FrontendMetrics, LocalHistogram
from services.frontend.registry import ModelEntry, ModelRegistry
from services.frontend.stats import FrontendStatsPublisher

log = structlog.get_logger("frontend.pipeline")

# Worker failures after which the request moves to another worker.
_MIGRATABLE = (PeerGone, Disconnected, NoResponders, LostChunks)


@dataclass(slots=True)
class Job:
    """A validated, tokenized request, ready to route."""

    request_id: str
    model: str
    endpoint: str  # chat | completions | nats
    prompt_ids: list[int]
    max_tokens: int
    sampling: proto.SamplingParams
    tokenizer: Tokenizer | None
    stop_strings: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    detokenize: bool = True
    deadline: float = 0.0  # time.monotonic() after which the request fails
    arrival: float = 0.0  # time.perf_counter() at arrival


class Delta:
    """Generated text (and its token ids) since the previous delta."""

    __slots__ = ("text", "token_ids")

    def __init__(self, text: str, token_ids: list[int]) -> None:
        self.text = text
        self.token_ids = token_ids


class Final:
    """The end of a generation: why it stopped and what it cost."""

    __slots__ = ("cached_tokens", "completion_tokens", "finish_reason", "prompt_tokens")

    def __init__(self, finish_reason: str, prompt_tokens: int, completion_tokens: int,
                 cached_tokens: int) -> None:
        self.finish_reason = finish_reason
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.cached_tokens = cached_tokens


class Pipeline:
    def __init__(self, *, bus, registry: ModelRegistry, router, metrics: FrontendMetrics,
                 request_timeout: float = 600.0, migration_limit: int = 3,
                 heartbeat_timeout: float = 5.0, coalesce: bool = True,
                 stats: FrontendStatsPublisher | None = None) -> None:
        self.bus = bus
        self.stats = stats or FrontendStatsPublisher()  # the planner's view (stats.py)
        self.registry = registry
        self.router = router
        self.metrics = metrics
        self.request_timeout = request_timeout
        self.migration_limit = migration_limit
        self.heartbeat_timeout = heartbeat_timeout
        self.coalesce = coalesce
        self._tokenize_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")

    def close(self) -> None:
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    # -- preparation ----------------------------------------------------------------------

    def model_entry(self, model: str) -> ModelEntry:
        entry = self.registry.get(model)
        if entry is None:
            raise ApiError(404, f"The model `{model}` does not exist or has no worker serving it.",
                           param="model", code="model_not_found")
        return entry

    def only_model(self) -> str:
        names = list(self.registry.models)
        if len(names) != 1:
            raise bad_request(f"model is required: {len(names)} models are served ({', '.join(names)})",
                              param="model")
        return names[0]

    async def tokenizer(self, entry: ModelEntry) -> Tokenizer:
        tok = entry.tokenizer_now()
        if tok is not None:
            return tok
        try:
            return await asyncio.wait_for(entry.tokenizer(), 60.0)
        except (TokenizerError, RuntimeError, OSError, TimeoutError) as exc:
            raise ApiError(500, f"tokenizer of model {entry.name!r} is unavailable: {exc}",
                           type="server_error", code="tokenizer_unavailable") from None

    async def tokenize_chat(self, tok: Tokenizer, messages: list[dict]) -> list[int]:
        try:
            if sum(len(m["content"]) for m in messages) < OFFLOAD_CHARS:
                return tok.encode_chat(messages)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._tokenize_pool, tok.encode_chat, messages)
        except TokenizerError as exc:
            raise bad_request(str(exc), param="messages") from None

    async def tokenize_text(self, tok: Tokenizer, text: str) -> list[int]:
        if len(text) < OFFLOAD_CHARS:
            return tok.encode(text)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenize_pool, tok.encode, text)

    def make_job(self, *, entry: ModelEntry, endpoint: str, request_id: str,
                 prompt_ids: list[int], tokenizer: Tokenizer | None, max_tokens: int | None,
                 temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, seed: int | None = None,
                 stop_strings: list[str] | None = None, stop_token_ids: list[int] | None = None,
                 ignore_eos: bool = False, min_tokens: int = 0, detokenize: bool = True,
                 timeout: float | None = None, arrival: float | None = None,
                 max_tokens_param: str = "max_tokens") -> Job:
        """Check limits and build the Job; every rejection names the offending field."""
        n_prompt = len(prompt_ids)
        if n_prompt == 0:
            raise bad_request("the prompt is empty", param="prompt")
        context = entry.context_length
        if context and n_prompt >= context:
            raise bad_request(
                f"This model's maximum context length is {context} tokens. However, your prompt "
                f"has {n_prompt} tokens. Please reduce the length of the prompt.",
                param="messages" if endpoint == "chat" else "prompt",
                code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = (context - n_prompt) if context else 4096
        elif max_tokens < 1:
            raise bad_request(f"{max_tokens_param} must be at least 1, got {max_tokens}",
                              param=max_tokens_param)
        elif context and n_prompt + max_tokens > context:
            raise bad_request(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} for the "
                f"completion). Please reduce the prompt or {max_tokens_param}.",
                param=max_tokens_param, code="context_length_exceeded")
        if min_tokens < 0:
            raise bad_request("min_tokens must be >= 0", param="min_tokens")
        try:
            sampling = proto.SamplingParams(
                temperature=1.0 if temperature is None else float(temperature),
                top_p=1.0 if top_p is None else float(top_p),
                top_k=0 if top_k is None or top_k < 0 else int(top_k),
                seed=seed)
        except ValueError as exc:
            text = str(exc)
            param = text.split(" ", 1)[0]
            raise bad_request(text.split(" - at")[0], param=param) from None
        vocab = tokenizer.vocab_size if tokenizer is not None else None
        for tid in stop_token_ids or ():
            if tid < 0 or (vocab is not None and tid >= vocab):
                raise bad_request(f"stop token id {tid} is outside the vocabulary", param="stop")
        now_mono = time.monotonic()
        return Job(
            request_id=request_id, model=entry.name, endpoint=endpoint, prompt_ids=prompt_ids,
            max_tokens=max_tokens, sampling=sampling, tokenizer=tokenizer,
            stop_strings=stop_strings or [], stop_token_ids=stop_token_ids or [],
            ignore_eos=ignore_eos, min_tokens=min_tokens, detokenize=detokenize,
            deadline=now_mono + (timeout or self.request_timeout),
            arrival=time.perf_counter() if arrival is None else arrival)

    # -- generation -----------------------------------------------------------------------

    async def generate(self, job: Job) -> AsyncIterator[Delta | Final]:
        """Deltas, then one Final. Raises ApiError (before or during the stream)."""
        metrics = self.metrics
        model = job.model
        detok = (job.tokenizer.detokenizer(stop=job.stop_strings)
                 if job.detokenize and job.tokenizer is not None else None)
        stop_ids = frozenset(job.stop_token_ids)
        generated: list[int] = []
        held_ids: list[int] = []  # tokens received whose text is not out yet
        excluded: list[int] = []
        attempts = 0
        cached = 0
        first_at = 0.0
        last_at = 0.0
        perf = time.perf_counter
        ttft = metrics.ttft.labels(model)
        itl = LocalHistogram(metrics.itl.labels(model))
        stats = self.stats
        stats.record_arrival(len(job.prompt_ids))

        while True:
            remaining_s = job.deadline - time.monotonic()
            if remaining_s <= 0:
                raise ApiError(504, "request deadline exceeded", type="timeout_error",
                               code="deadline_exceeded")
            max_tokens = job.max_tokens - len(generated)
            if max_tokens <= 0:  # the worker died after its last token, before its final frame
                if detok is not None and ((tail := detok.flush()) or held_ids):
                    yield Delta(tail, held_ids)
                stats.record_finish(len(generated), cached, _itl_ms(first_at, last_at, generated))
                yield Final("length", len(job.prompt_ids), len(generated), cached)
                return
            prompt = job.prompt_ids + generated if generated else job.prompt_ids
            packed = pack_tokens(prompt)
            decision = await self.router.route(proto.RouteRequest(
                request_id=job.request_id, model=model, token_ids=packed, max_tokens=max_tokens,
                exclude=excluded))
            worker = decision.worker_id
            card = self.registry.card(model, worker) if worker is not None else None
            if card is None:
                if worker is not None:  # the router knows a worker the registry no longer does
                    self.router.on_done(job.request_id)
                    excluded.append(worker)
                    attempts += 1
                    if attempts <= self.migration_limit + 2:
                        continue
                raise no_worker(model, decision.error or "")
            request = proto.GenerateRequest(
                request_id=job.request_id, model=model, token_ids=packed, sampling=job.sampling,
                stop=proto.StopConditions(max_tokens=max_tokens, stop_token_ids=job.stop_token_ids,
                                          ignore_eos=job.ignore_eos,
                                          min_tokens=max(0, job.min_tokens - len(generated))),
                deadline_ms=int((time.time() + remaining_s) * 1000))
            stream = None
            finished = False
            try:
                stream = await self.bus.stream_request(
                    card.generate_subject, request, timeout=remaining_s,
                    heartbeat_timeout=self.heartbeat_timeout)
                # Frames that queued up while we were busy are taken together: one detokenize
                # call and one event out instead of one per frame, so a loaded frontend spends
                # less per token exactly when it matters.
                take_ready = stream.take_ready if self.coalesce else None
                async for chunk in stream:
                    data = chunk.token_ids
                    if take_ready is not None and data and not chunk.final:
                        more = take_ready()
                        if more:
                            data = b"".join([data, *(c.token_ids for c in more)])
                    if data:
                        ids = unpack_tokens(data)
                        now = perf()
                        if not first_at:
                            first_at = now
                            ttft.observe(now - job.arrival)
                            stats.record_ttft((now - job.arrival) * 1000.0)
                            self.router.on_first_token(job.request_id)
                        else:
                            n = len(ids)
                            itl.observe((now - last_at) / n, n)
                        last_at = now
                        generated += ids
                        if detok is None:
                            yield Delta("", ids)
                        else:
                            text_ids = ids[:-1] if stop_ids and ids[-1] in stop_ids else ids
                            text = detok.feed(text_ids)
                            if held_ids:  # tokens whose text was held back go out with this text
                                ids = held_ids + ids
                                held_ids = []
                            if detok.stopped:
                                finished = True
                                await _cancel(stream, "stop string")
                                yield Delta(text, ids)
                                stats.record_finish(len(generated), cached,
                                                    _itl_ms(first_at, last_at, generated))
                                yield Final("stop", len(job.prompt_ids), len(generated),
                                            cached)
                                return
                            if text:
                                yield Delta(text, ids)
                            else:
                                held_ids = ids
                    if chunk.final:
                        finished = True
                        if chunk.error is not None:
                            raise from_error_info(chunk.error)
                        if chunk.usage is not None:
                            cached = min(chunk.usage.cached_tokens, len(job.prompt_ids))
                        if detok is not None:
                            tail = detok.flush()
                            if tail or held_ids:
                                yield Delta(tail, held_ids)
                                held_ids = []
                        stats.record_finish(len(generated), cached,
                                            _itl_ms(first_at, last_at, generated))
                        yield Final(chunk.finish_reason or "stop", len(job.prompt_ids),
                                    len(generated), cached)
                        return
                # The stream ended without a final frame: the bus guarantees one, so this is a
                # lost peer in all but name.
                raise PeerGone(proto.ErrorInfo(code="peer_gone",
                                               message="stream ended without a final frame"))
            except _MIGRATABLE as exc:
                finished = True  # nothing left to cancel on that worker
                attempts += 1
                excluded.append(worker)
                phase = "after_first_token" if generated else "before_first_token"
                if attempts > self.migration_limit:
                    raise _stream_error(exc, f"worker failed {attempts} times, giving up: ") from None
                metrics.migrations.labels(model, phase).inc()
                log.warning("request_migrating", request_id=job.request_id,
                            worker=f"{worker:x}", error=str(exc), phase=phase,
                            tokens_so_far=len(generated))
            except Overloaded as exc:
                finished = True
                attempts += 1
                excluded.append(worker)
                if attempts > self.migration_limit:
                    raise ApiError(503, f"all workers are overloaded: {exc}",
                                   type="overloaded_error", code="overloaded") from None
            except DeadlineExceeded:
                raise ApiError(504, "request deadline exceeded", type="timeout_error",
                               code="deadline_exceeded") from None
            except RemoteError as exc:
                finished = True
                # shutting_down (a worker whose drain ran out) and the like: another worker can
                # take the request over; anything else is the request's own fault or fatal.
                if not exc.error.retryable:
                    raise _stream_error(exc) from None
                attempts += 1
                excluded.append(worker)
                if attempts > self.migration_limit:
                    raise _stream_error(exc, f"worker failed {attempts} times, giving up: ") from None
                metrics.migrations.labels(model, "after_first_token" if generated
                                          else "before_first_token").inc()
            except StreamError as exc:
                raise _stream_error(exc) from None
            finally:
                itl.flush()
                self.router.on_done(job.request_id)
                if stream is not None and not finished:
                    # The consumer left (client disconnect / cancel) or we failed mid-stream.
                    await _cancel(stream, "client went away")


def _itl_ms(first_at: float, last_at: float, generated: list[int]) -> float | None:
    """A request's mean inter-token latency (perf_counter seconds in, ms out)."""
    return (last_at - first_at) * 1000.0 / (len(generated) - 1) if len(generated) > 1 else None


def _stream_error(exc: StreamError, prefix: str = "") -> ApiError:
    info = getattr(exc, "error", None)
    if not isinstance(info, proto.ErrorInfo):
        info = proto.ErrorInfo(code="internal", message=str(exc))
    return from_error_info(info, prefix=prefix)


async def _cancel(stream, reason: str) -> None:
    try:
        await asyncio.wait_for(stream.cancel(reason), 2.0)
    except Exception as exc:  # cancelling is best effort: the worker's deadline still applies
        log.debug("cancel_failed", error=str(exc))
