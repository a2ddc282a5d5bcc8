"""One request's path through the frontend, shared by HTTP and the NATS service:

`prepare` (an API request -> a Job: model, template, tokenize, limits) -> `generate`: route ->
one attempt per worker stream -> deltas out (text from `text.TextAssembler`). A worker that
fails before or during its stream goes to the one retry decision (`_after_failure`), which
moves the request to another worker or gives up; a consumer that goes away (HTTP client
disconnect, NATS client cancel) closes the generator, which cancels the worker stream.

The router hears of each routing decision's progress from here, exactly once per decision:
`on_first_token` at the attempt's first token, `on_done` when the attempt ends (also when
the request moves on). Routers that run in this process (embedded, built-in) rely on it; a
remote router ignores it and learns the same from the workers' `RequestLifecycle`
(docs/architecture.md, "Router notifications").

The per-chunk loop is the hot path: one unpack, one Rust detokenize call, a few attribute
updates; metrics are observed per chunk, not per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog

import proto
from genset.runtime.bus_errors import (
    DeadlineExceeded,
    Disconnected,
    LostChunks,
    NoResponders,
    Overloaded,
    PeerGone,
    RemoteError,
    StreamError,
)
from genset.runtime.timeline import Timeline, TimelineSink
from genset.tokenizer import OFFLOAD_CHARS, Tokenizer, TokenizerError
from proto.tokens import pack_tokens, unpack_tokens
from services.frontend.errors import ApiError, bad_request, from_error_info, no_worker
from services.frontend.metrics import FrontendMetrics, LocalHistogram
from services.frontend.registry import ModelEntry, ModelRegistry
from services.frontend.text import Delta, TextAssembler

log = structlog.get_logger("frontend.pipeline")

# Worker failures after which the request moves to another worker.
_MIGRATABLE = (PeerGone, Disconnected, NoResponders, LostChunks)

__all__ = ["Delta", "Final", "Job", "JobRequest", "Pipeline"]


@dataclass(slots=True, kw_only=True)
class JobRequest:
    """What an API request asks for, in API-neutral terms: the input of `Pipeline.prepare`.

    The prompt is exactly one of `messages` (the chat template applies), `text`, `token_ids`
    (checked against the vocabulary) or `packed_token_ids` (NATS clients: used as is, the
    worker checks them).
    """

    endpoint: str  # chat | completions | nats
    request_id: str
    model: str | None  # None: the only model served
    arrival: float  # time.perf_counter() at arrival
    messages: list[dict] | None = None
    text: str | None = None
    token_ids: list[int] | None = None
    packed_token_ids: bytes | None = None
    max_tokens: int | None = None  # None: up to the context length
    max_tokens_param: str = "max_tokens"  # the field named when max_tokens is refused
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop_strings: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    detokenize: bool = True
    timeout: float | None = None  # None: the frontend's request timeout


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
    timeline: Timeline | None = None  # the request's stage stamps (frontend --timeline)


class Final:
    """The end of a generation: why it stopped and what it cost."""

    __slots__ = ("cached_tokens", "completion_tokens", "finish_reason", "prompt_tokens")

    def __init__(self, finish_reason: str, prompt_tokens: int, completion_tokens: int,
                 cached_tokens: int) -> None:
        self.finish_reason = finish_reason
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.cached_tokens = cached_tokens


class _Progress:
    """What a request has produced so far, across every worker it ran on."""

    __slots__ = ("cached", "first_at", "generated", "itl", "last_at", "prompt_tokens", "text",
                 "ttft")

    def __init__(self, job: Job, metrics: FrontendMetrics) -> None:
        self.generated: list[int] = []
        self.cached = 0
        self.prompt_tokens = len(job.prompt_ids)
        self.first_at = 0.0  # perf_counter() of the request's first token (0: none yet)
        self.last_at = 0.0  # ... and of its latest one
        self.ttft = metrics.ttft.labels(job.model)
        self.itl = LocalHistogram(metrics.itl.labels(job.model))
        self.text = TextAssembler(job.tokenizer, detokenize=job.detokenize,
                                  stop_strings=job.stop_strings,
                                  stop_token_ids=job.stop_token_ids)

    def final(self, finish_reason: str) -> Final:
        return Final(finish_reason, self.prompt_tokens, len(self.generated), self.cached)


class Pipeline:
    def __init__(self, *, bus, registry: ModelRegistry, router, metrics: FrontendMetrics,
                 request_timeout: float = 600.0, migration_limit: int = 3,
                 heartbeat_timeout: float = 5.0, coalesce: bool = True,
                 timeline: TimelineSink | None = None) -> None:
        self.bus = bus
        self.registry = registry
        self.router = router
        self.metrics = metrics
        self.request_timeout = request_timeout
        self.migration_limit = migration_limit
        self.heartbeat_timeout = heartbeat_timeout
        self.coalesce = coalesce
        self.timeline = timeline  # None (default): requests are not timed, at no cost
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

    async def prepare(self, req: JobRequest) -> Job:
        """Turn an API request into a Job: model, tokenizer, prompt tokens, limits, sampling.
        Every rejection is an ApiError that names the offending field."""
        entry = self.model_entry(self.only_model() if req.model is None else req.model)
        if req.messages is not None and not req.messages:
            raise bad_request("messages must be a non-empty list", param="messages")
        prompt_ids = req.token_ids
        if req.packed_token_ids is not None:
            try:
                prompt_ids = unpack_tokens(req.packed_token_ids)
            except ValueError as exc:
                raise bad_request(str(exc), param="token_ids") from None
        # Packed token ids streamed back as ids need no tokenizer (a cheaper request).
        tok = None
        if req.packed_token_ids is None or req.detokenize or req.stop_strings:
            tok = await self._tokenizer(entry)
        if req.messages is not None:
            prompt_ids = await self._tokenize(tok.encode_chat, req.messages, "messages",
                                              sum(len(m["content"]) for m in req.messages))
        elif req.text is not None:
            prompt_ids = await self._tokenize(tok.encode, req.text, "prompt", len(req.text))
        elif req.token_ids is not None:
            if any(t < 0 or t >= tok.vocab_size for t in prompt_ids):
                raise bad_request(f"prompt token ids must be in [0, {tok.vocab_size})",
                                  param="prompt")
        job = self._job(req, entry, prompt_ids or [], tok)
        if self.timeline is not None:
            job.timeline = self.timeline.new(req.request_id, req.arrival)
            job.timeline.stamp("tokenized")
        return job

    async def _tokenizer(self, entry: ModelEntry) -> Tokenizer:
        tok = entry.tokenizer_now()
        if tok is not None:
            return tok
        try:
            return await asyncio.wait_for(entry.tokenizer(), 60.0)
        except (TokenizerError, RuntimeError, OSError, TimeoutError) as exc:
            raise ApiError(500, f"tokenizer of model {entry.name!r} is unavailable: {exc}",
                           type="server_error", code="tokenizer_unavailable") from None

    async def _tokenize(self, encode, prompt, param: str, chars: int) -> list[int]:
        """`encode(prompt)`; long prompts off the event loop (`chars`: the prompt's length)."""
        try:
            if chars < OFFLOAD_CHARS:
                return encode(prompt)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._tokenize_pool, encode, prompt)
        except TokenizerError as exc:  # e.g. a chat template that refuses the messages
            raise bad_request(str(exc), param=param) from None

    def _job(self, req: JobRequest, entry: ModelEntry, prompt_ids: list[int],
             tokenizer: Tokenizer | None) -> Job:
        """Check limits and build the Job; every rejection names the offending field."""
        n_prompt = len(prompt_ids)
        if n_prompt == 0:
            raise bad_request("the prompt is empty", param="prompt")
        context = entry.context_length
        max_tokens, max_tokens_param = req.max_tokens, req.max_tokens_param
        if context and n_prompt >= context:
            raise bad_request(
                f"This model's maximum context length is {context} tokens. However, your prompt "
                f"has {n_prompt} tokens. Please reduce the length of the prompt.",
                param="messages" if req.endpoint == "chat" else "prompt",
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
        if req.min_tokens < 0:
            raise bad_request("min_tokens must be >= 0", param="min_tokens")
        top_k = req.top_k
        try:
            sampling = proto.SamplingParams(
                temperature=1.0 if req.temperature is None else float(req.temperature),
                top_p=1.0 if req.top_p is None else float(req.top_p),
                top_k=0 if top_k is None or top_k < 0 else int(top_k),
                seed=req.seed)
        except ValueError as exc:
            text = str(exc)
            param = text.split(" ", 1)[0]
            raise bad_request(text.split(" - at")[0], param=param) from None
        vocab = tokenizer.vocab_size if tokenizer is not None else None
        for tid in req.stop_token_ids:
            if tid < 0 or (vocab is not None and tid >= vocab):
                raise bad_request(f"stop token id {tid} is outside the vocabulary", param="stop")
        return Job(
            request_id=req.request_id, model=entry.name, endpoint=req.endpoint,
            prompt_ids=prompt_ids, max_tokens=max_tokens, sampling=sampling, tokenizer=tokenizer,
            stop_strings=req.stop_strings, stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos, min_tokens=req.min_tokens, detokenize=req.detokenize,
            deadline=time.monotonic() + (req.timeout or self.request_timeout),
            arrival=req.arrival)

    # -- generation -----------------------------------------------------------------------

    async def generate(self, job: Job) -> AsyncIterator[Delta | Final]:
        """Deltas, then one Final. Raises ApiError (before or during the stream).

        Each pass of the loop routes the rest of the request and runs one attempt (one worker
        stream); a worker failure goes to `_after_failure`, which gives up or lets the loop
        route again, excluding the workers that failed."""
        progress = _Progress(job, self.metrics)
        excluded: list[int] = []
        failures = 0
        tl = job.timeline
        ok = False
        try:
            while True:
                remaining_s = job.deadline - time.monotonic()
                if remaining_s <= 0:
                    raise _deadline_exceeded()
                max_tokens = job.max_tokens - len(progress.generated)
                if max_tokens <= 0:  # the worker died after its last token, before its final frame
                    if (tail := progress.text.flush()) is not None:
                        yield tail
                    yield progress.final("length")
                    return
                prompt = job.prompt_ids + progress.generated if progress.generated else job.prompt_ids
                packed = pack_tokens(prompt)
                decision = await self.router.route(proto.RouteRequest(
                    request_id=job.request_id, model=job.model, token_ids=packed,
                    max_tokens=max_tokens, exclude=excluded))
                worker = decision.worker_id
                if tl is not None:
                    tl.stamp("routed")
                card = self.registry.card(job.model, worker) if worker is not None else None
                if card is None:
                    if worker is None:
                        raise no_worker(job.model, decision.error or "")
                    # The router knows a worker the registry no longer does: that decision is
                    # over (the router hears so), and another worker is asked.
                    self.router.on_done(job.request_id)
                    excluded.append(worker)
                    failures += 1
                    if failures > self.migration_limit + 2:
                        raise no_worker(job.model, decision.error or "")
                    continue
                request = proto.GenerateRequest(
                    request_id=job.request_id, model=job.model, token_ids=packed,
                    sampling=job.sampling,
                    stop=proto.StopConditions(
                        max_tokens=max_tokens, stop_token_ids=job.stop_token_ids,
                        ignore_eos=job.ignore_eos,
                        min_tokens=max(0, job.min_tokens - len(progress.generated))),
                    deadline_ms=int((time.time() + remaining_s) * 1000),
                    timeline=tl is not None)
                try:
                    # aclosing: a consumer that leaves closes the attempt at once, which
                    # cancels the worker's stream.
                    async with contextlib.aclosing(self._attempt(
                            job, progress, card.generate_subject, request, remaining_s)) as items:
                        async for item in items:
                            if tl is not None and type(item) is Final:
                                ok = True  # a consumer may close the generator at the Final
                            yield item
                            if tl is not None:  # the consumer wrote it and asks for more
                                tl.stamp("first_written")
                    return
                except StreamError as exc:
                    failures += 1
                    excluded.append(worker)
                    self._after_failure(exc, job, progress, worker, failures)
        finally:
            progress.itl.flush()
            if tl is not None:
                tl.stamp("done")
                self.timeline.write(tl, ok, prompt_tokens=progress.prompt_tokens,
                                    cached_tokens=progress.cached,
                                    output_tokens=len(progress.generated))

    async def _attempt(self, job: Job, progress: _Progress, subject: str,
                       request: proto.GenerateRequest,
                       remaining_s: float) -> AsyncIterator[Delta | Final]:
        """One worker stream: its deltas, then a Final if the worker finished the request.
        A failure of the worker or the stream is raised (a StreamError) for the retry
        decision; the router hears of this attempt's first token and end from here."""
        router = self.router
        stream = None
        try:
            stream = await self.bus.stream_request(subject, request, timeout=remaining_s,
                                                   heartbeat_timeout=self.heartbeat_timeout)
            tl = job.timeline
            if tl is not None:
                tl.stamp("sent")
            # Frames that queued up while we were busy are taken together: one detokenize
            # call and one event out instead of one per frame, so a loaded frontend spends
            # less per token exactly when it matters.
            take_ready = stream.take_ready if self.coalesce else None
            text = progress.text
            itl = progress.itl
            perf = time.perf_counter
            started = False  # this attempt has had its first token
            async for chunk in stream:
                data = chunk.token_ids
                if take_ready is not None and data and not chunk.final:
                    more = take_ready()
                    if more:
                        data = b"".join([data, *(c.token_ids for c in more)])
                if data:
                    ids = unpack_tokens(data)
                    now = perf()
                    if started:
                        n = len(ids)
                        itl.observe((now - progress.last_at) / n, n)
                    else:
                        started = True
                        if tl is not None:
                            tl.stamp("first_token")
                        router.on_first_token(job.request_id)
                        if progress.first_at:  # after a migration the wait is an inter-token gap
                            n = len(ids)
                            itl.observe((now - progress.last_at) / n, n)
                        else:
                            progress.first_at = now
                            progress.ttft.observe(now - job.arrival)
                    progress.last_at = now
                    progress.generated += ids
                    delta = text.feed(ids)
                    if text.stopped:
                        await _cancel(stream, "stop string")
                        yield delta
                        yield progress.final("stop")
                        return
                    if delta is not None:
                        yield delta
                if chunk.final:
                    if chunk.error is not None:
                        raise from_error_info(chunk.error)
                    if chunk.usage is not None:
                        progress.cached = min(chunk.usage.cached_tokens, progress.prompt_tokens)
                        if tl is not None:
                            tl.merge_worker(chunk.usage.timeline)
                    if (tail := text.flush()) is not None:
                        yield tail
                    yield progress.final(chunk.finish_reason or "stop")
                    return
            # The stream ended without a final frame: the bus guarantees one, so this is a
            # lost peer in all but name.
            raise PeerGone(proto.ErrorInfo(code="peer_gone",
                                           message="stream ended without a final frame"))
        finally:
            router.on_done(job.request_id)
            if stream is not None and not stream.finished:
                # The consumer left (client disconnect / cancel) or we failed mid-stream.
                await _cancel(stream, "client went away")

    def _after_failure(self, exc: StreamError, job: Job, progress: _Progress, worker: int,
                       failures: int) -> None:
        """The retry decision: return to move the request to another worker; raise ApiError
        to give up. `failures`: attempts that failed so far, this one included."""
        if isinstance(exc, DeadlineExceeded):
            raise _deadline_exceeded() from None
        if isinstance(exc, Overloaded):  # refused at once: retried, not counted as a migration
            if failures > self.migration_limit:
                raise ApiError(503, f"all workers are overloaded: {exc}",
                               type="overloaded_error", code="overloaded") from None
            return
        # A lost worker (or stream), or one that answered with a retryable error
        # (shutting_down from a worker whose drain ran out, ...): another worker can take the
        # request over. Anything else is the request's own fault or fatal.
        if not (isinstance(exc, _MIGRATABLE) or (isinstance(exc, RemoteError)
                                                 and exc.error.retryable)):
            raise _stream_error(exc) from None
        if failures > self.migration_limit:
            raise _stream_error(exc, f"worker failed {failures} times, giving up: ") from None
        phase = "after_first_token" if progress.generated else "before_first_token"
        self.metrics.migrations.labels(job.model, phase).inc()
        log.warning("request_migrating", request_id=job.request_id, worker=f"{worker:x}",
                    error=str(exc), phase=phase, tokens_so_far=len(progress.generated))


def _deadline_exceeded() -> ApiError:
    return ApiError(504, "request deadline exceeded", type="timeout_error",
                    code="deadline_exceeded")


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
