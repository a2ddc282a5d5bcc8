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

Failures are told apart by whom they blame. A worker that is gone (its stream went silent
for `heartbeat_timeout`, nobody answers on its subject, it is shutting down) is marked
suspect (`genset.routing.load.SuspectWorkers`) and no request is routed there while another
worker can take it. A NATS connection that dropped blames nobody: the request waits for the
reconnect (at most `reconnect_wait_s`) and is retried then, on any worker, without counting
against `migration_limit`.

Large prompts (issue 14): a prompt is refused by its size in characters before any template
or tokenizer work (`PROMPT_CHARS_PER_TOKEN` characters per token of the context), long ones
are tokenized in threads with the GIL released, admitted by characters in flight
(`_TokenizeGate`), and a prompt far longer than typical text for the context is counted in
pieces and refused once they exceed the context (`PROBE_CHARS_PER_TOKEN`), never tokenized
whole.

The per-chunk loop is the hot path: one unpack, one Rust detokenize call, a few attribute
updates; metrics are observed per chunk, not per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog

import proto
from genset.routing.load import SuspectWorkers
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
from genset.tokenizer import ENCODE_BYTES_PER_CHAR, OFFLOAD_CHARS, Tokenizer, TokenizerError
from proto.tokens import pack_tokens, unpack_tokens
from services.frontend.errors import ApiError, bad_request, field_of, from_error_info, no_worker
from services.frontend.metrics import FrontendMetrics, LocalHistogram
from services.frontend.registry import ModelEntry, ModelRegistry
from services.frontend.stats import FrontendStatsPublisher
from services.frontend.text import Delta, TextAssembler

log = structlog.get_logger("frontend.pipeline")

# Worker failures after which the request moves to another worker.
_MIGRATABLE = (PeerGone, Disconnected, NoResponders, LostChunks)
# ... and those that say the worker itself is gone (it is marked suspect); a retryable
# error frame with code "shutting_down" too. Not LostChunks (frames lost on the way) nor
# Disconnected (our own connection).
_WORKER_GONE = (PeerGone, NoResponders)

# A prompt longer than this many characters per token of the model's context is refused
# before any tokenizer work: no text averages anywhere near it (English prose is ~4
# characters per token, code ~3-5; only long runs of whitespace or punctuation that the
# vocabulary has single tokens for go past 16), and without the check every prompt was
# tokenized whole first: four 10 MB prompts took a frontend from 1.26 to 2.27 GB and froze
# its event loop for seconds (issue 14).
PROMPT_CHARS_PER_TOKEN = 16
# A request body over this many bytes per token of the largest context served (plus
# BODY_OVERHEAD_BYTES) is refused from its Content-Length, before it is read: four clients
# sending 10 MB prompts took a normal request's p99 from ~14 to ~400 ms while each body was
# read, joined and decoded only to be refused by PROMPT_CHARS_PER_TOKEN (issue 14). The bound
# is generous: text averages at most PROMPT_CHARS_PER_TOKEN characters a token (more is
# refused anyway), and the characters that get near 16 a token are runs of whitespace and
# punctuation with tokens of their own, at most 2 bytes each in JSON (`\n`, `\t`, `\"`): 32
# bytes a token. Characters that cost more in JSON (2-4 bytes of UTF-8, 6 as a `\u` escape,
# 12 as an escaped surrogate pair) are near one token each: CJK ~1-1.5 characters a token (<=
# 9 bytes escaped), an emoji one token or more (<= 12). A message's own JSON (~35 bytes) is
# less than the template tokens it adds; a prompt of token ids is <= 7 bytes a token. So 48
# is 1.5x the worst text; a 131072-token context allows 6.1 MiB of body.
BODY_BYTES_PER_TOKEN = 48
BODY_OVERHEAD_BYTES = 64 * 1024  # the other fields: sampling, stop strings, logit_bias, ...
# A prompt longer than this many characters per token of the context is counted before it
# is tokenized: piece by piece (PROBE_CHUNK_CHARS each), until the pieces' tokens exceed the
# context by more than PROBE_SLACK_TOKENS per piece (a cut changes at most the tokens around
# it: a word or an added token split in two, a BOS per piece), then refused. So refusing a
# long prompt costs at most the time of tokenizing a full-context prompt of typical text, and
# the memory of one piece (~9 MB) instead of ~140 bytes per character of the whole: a 1.5 MB
# prompt's 786K-character head took the frontend's peak RSS up by ~170 MB, in one piece.
PROBE_CHARS_PER_TOKEN = 6
PROBE_CHUNK_CHARS = 64 * 1024
PROBE_SLACK_TOKENS = 16
# Tokenizer memory allowed at the peak for prompts being tokenized at once, over all threads;
# as characters (~ENCODE_BYTES_PER_CHAR each): ~1.2M. One longer prompt is admitted alone.
TOKENIZE_PEAK_BYTES = 160 << 20
TOKENIZE_CHARS_IN_FLIGHT = TOKENIZE_PEAK_BYTES // ENCODE_BYTES_PER_CHAR
# Characters of prompt waiting for their turn; past it a request is refused with 503 at once.
TOKENIZE_CHARS_WAITING = 16 << 20
# Seconds after the last long tokenization ended (none running or waiting since) at which the
# C heap's free pages go back to the system (glibc's malloc_trim, in a tokenize thread). The
# tokenizer's memory is freed but glibc keeps the pages: after two 400K-character prompts a
# frontend stayed at ~220 MB RSS instead of ~80. One trim returned ~90 MB in ~20 ms of a
# tokenize thread; not during a flood (the pages would be faulted in again at once).
TRIM_AFTER_S = 1.0
# Sampling integers travel as msgpack ints in GenerateRequest: out of these ranges they
# cannot be sent at all (an OverflowError, a 500, before issue 14).
_INT32_MAX = 2**31 - 1
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1
# After our NATS connection comes back, a worker may not have reconnected yet (each client
# reconnects on its own backoff, at most 2 s apart): "no responders" within this window
# blames the bus, not the worker, and the request waits and retries.
RECONNECT_GRACE_S = 5.0
# Retries after bus failures one request may take (each waits for the reconnect or a
# backoff of up to 0.5 s): a bound besides the deadline.
MAX_BUS_RETRIES = 40

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
    arrival_cpu: float = 0.0  # time.thread_time() at arrival, taken only when timed (timeline)
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
    # Sampling fields the OpenAI API takes; neutral defaults (see `_sampling_extras`).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] = field(default_factory=dict)  # token id (decimal) -> bias
    logprobs: int | None = None  # alternatives per token; None: no logprobs
    logprobs_param: str = "logprobs"  # the field named when logprobs are refused
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
    # n > 1 choices (http_app): choice 0 reports the worker it was routed to, and the other
    # choices go to that worker, so its prefix cache computes the shared prompt once.
    on_routed: Callable[[int], None] | None = None
    pin_worker: int | None = None
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

    __slots__ = ("cached", "first_at", "generated", "itl", "last_at", "logprobs",
                 "prompt_tokens", "stats", "text", "ttft")

    def __init__(self, job: Job, metrics: FrontendMetrics,
                 stats: FrontendStatsPublisher) -> None:
        self.stats = stats  # the planner's view of the traffic (stats.py)
        stats.record_arrival(len(job.prompt_ids))
        self.generated: list[int] = []
        # aligned with `generated` when the request asked for logprobs, else None
        self.logprobs: list | None = [] if job.sampling.logprobs is not None else None
        self.cached = 0
        self.prompt_tokens = len(job.prompt_ids)
        self.first_at = 0.0  # perf_counter() of the request's first token (0: none yet)
        self.last_at = 0.0  # ... and of its latest one
        children = metrics.model(job.model)
        self.ttft = children.ttft
        self.itl = LocalHistogram(children.itl)
        self.text = TextAssembler(job.tokenizer, detokenize=job.detokenize,
                                  stop_strings=job.stop_strings,
                                  stop_token_ids=job.stop_token_ids)

    def final(self, finish_reason: str) -> Final:
        self.stats.record_finish(len(self.generated), self.cached,
                                 _itl_ms(self.first_at, self.last_at, self.generated))
        return Final(finish_reason, self.prompt_tokens, len(self.generated), self.cached)


class _TooLong:
    """The head of a prompt alone has more tokens than the context (see PROBE_CHARS_PER_TOKEN).

    Returned, not raised: an exception from the tokenize thread would carry a traceback
    whose frames hold the rendered prompt, in reference cycles that only the cyclic GC frees,
    and it counts objects, not bytes: 1.5 MB prompts refused this way were kept by the dozen
    (~60 MB after 200 requests, measured)."""

    __slots__ = ("at_least", "head_chars")

    def __init__(self, at_least: int, head_chars: int) -> None:
        self.at_least = at_least
        self.head_chars = head_chars


def _encode_within(tok: Tokenizer, prompt, chat: bool, context: int) -> list[int] | _TooLong:
    """The prompt's ids (chat: the rendered messages), or `_TooLong` for a prompt much longer
    than typical text for the context once its head has more tokens than the context (see
    PROBE_CHARS_PER_TOKEN). Runs in a tokenize thread (short prompts: on the loop)."""
    text = tok.render_chat(prompt) if chat else prompt
    if context and len(text) > PROBE_CHARS_PER_TOKEN * context:
        # Counted with the plain tokenizer: these cuts are no segments worth caching.
        counted = pieces = 0
        for start in range(0, len(text), PROBE_CHUNK_CHARS):
            counted += len(tok.encode(text[start:start + PROBE_CHUNK_CHARS],
                                      add_special_tokens=not chat))
            pieces += 1
            if counted - PROBE_SLACK_TOKENS * pieces > context:
                return _TooLong(counted - PROBE_SLACK_TOKENS * pieces,
                                min(len(text), start + PROBE_CHUNK_CHARS))
    return tok.encode_rendered(text) if chat else tok.encode(text)


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc only; elsewhere nothing to trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _load_malloc_trim()


class _TokenizeGate:
    """Admission to off-loop tokenization, counted in characters: at most `max_chars` being
    tokenized (one longer prompt alone), at most `max_waiting` waiting in arrival order;
    past that a request is refused at once (503). The tokenizer's memory grows with the
    characters it works on (~140 bytes each at the peak), so this bounds the frontend's
    memory under a flood of long prompts; short prompts never come here."""

    def __init__(self, max_chars: int, max_waiting: int) -> None:
        self.max_chars = max_chars
        self.max_waiting = max_waiting
        self.running = 0  # characters admitted whose tokenization has not finished
        self.waiting = 0
        self._queue: deque[tuple[int, asyncio.Future]] = deque()

    def _fits(self, n: int) -> bool:
        return self.running == 0 or self.running + n <= self.max_chars

    async def acquire(self, n: int, timeout: float) -> None:  # noqa: ASYNC109
        """Admit `n` characters; ApiError 503 when too much waits already, 504 when the
        request's deadline (`timeout` s away) passes first. Pair with `release(n)`."""
        if not self._queue and self._fits(n):
            self.running += n
            return
        if self.waiting + n > self.max_waiting:
            raise ApiError(503, f"the frontend is busy tokenizing long prompts ({self.waiting} "
                                "characters are waiting); retry later",
                           type="overloaded_error", code="overloaded")
        fut = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._queue.append(entry)
        self.waiting += n
        try:
            async with asyncio.timeout(timeout):
                await fut
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                self.release(n)  # admitted just as we gave up
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    self._queue.remove(entry)
                    self.waiting -= n
                self._wake()
            if isinstance(exc, TimeoutError):
                raise _deadline_exceeded() from None
            raise

    def release(self, n: int) -> None:
        self.running -= n
        self._wake()

    def _wake(self) -> None:
        queue = self._queue
        while queue:
            n, fut = queue[0]
            if fut.done():
                queue.popleft()
                continue
            if not self._fits(n):
                return
            queue.popleft()
            self.waiting -= n
            self.running += n
            fut.set_result(None)


class Pipeline:
    def __init__(self, *, bus, registry: ModelRegistry, router, metrics: FrontendMetrics,
                 request_timeout: float = 600.0, migration_limit: int = 3,
                 heartbeat_timeout: float = 1.5, coalesce: bool = True,
                 reconnect_wait_s: float = 10.0, suspects: SuspectWorkers | None = None,
                 stats: FrontendStatsPublisher | None = None,
                 timeline: TimelineSink | None = None) -> None:
        """heartbeat_timeout: silence (s) after which a worker's stream is presumed dead;
        workers heartbeat after at most 0.625 s of silence (genset.runtime.bus).
        reconnect_wait_s: how long a request waits for a lost NATS connection to come back
        before it fails. suspects: the workers kept out of routing after a failure; by
        default the one the in-process router's feeds keep (they clear a mark when the worker
        proves alive), else one of our own (marks end by expiry)."""
        self.bus = bus
        self.stats = stats or FrontendStatsPublisher()  # the planner's view (stats.py)
        self.registry = registry
        self.router = router
        self.metrics = metrics
        self.request_timeout = request_timeout
        self.migration_limit = migration_limit
        self.heartbeat_timeout = heartbeat_timeout
        self.coalesce = coalesce
        self.reconnect_wait_s = reconnect_wait_s
        self.suspects = suspects if suspects is not None else _router_suspects(router)
        self.timeline = timeline  # None (default): requests are not timed, at no cost
        self._tokenize_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
        self._tokenize_gate = _TokenizeGate(TOKENIZE_CHARS_IN_FLIGHT, TOKENIZE_CHARS_WAITING)
        self._trim_handle: asyncio.TimerHandle | None = None
        self.trims = 0  # malloc_trim calls made (TRIM_AFTER_S)

    def close(self) -> None:
        if self._trim_handle is not None:
            self._trim_handle.cancel()
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    def _tokenized(self, chars: int) -> None:
        """A long tokenization ended: its characters leave the gate; once none runs or
        waits, the heap is trimmed TRIM_AFTER_S later (unless another one starts)."""
        gate = self._tokenize_gate
        gate.release(chars)
        if _malloc_trim is None or gate.running or gate.waiting:
            return
        if self._trim_handle is not None:
            self._trim_handle.cancel()
        self._trim_handle = asyncio.get_running_loop().call_later(TRIM_AFTER_S, self._trim)

    def _trim(self) -> None:
        self._trim_handle = None
        gate = self._tokenize_gate
        if gate.running or gate.waiting:  # busy again: the next idle moment schedules it
            return
        self.trims += 1
        with contextlib.suppress(RuntimeError):  # the pool shut down meanwhile
            self._tokenize_pool.submit(_malloc_trim, 0)

    # -- preparation ----------------------------------------------------------------------

    def model_entry(self, model: str) -> ModelEntry:
        entry = self.registry.get(model)
        if entry is None:
            raise ApiError(404, f"The model `{model}` does not exist or has no worker serving it.",
                           param="model", code="model_not_found")
        return entry

    def max_body_bytes(self) -> int:
        """The largest request body that can carry a prompt for the largest context served
        (BODY_BYTES_PER_TOKEN; 0: no limit known, no model or one of unknown context)."""
        context = self.registry.max_context
        return context * BODY_BYTES_PER_TOKEN + BODY_OVERHEAD_BYTES if context else 0

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
        context = entry.context_length
        deadline = time.monotonic() + (req.timeout or self.request_timeout)
        # Sizes first: nothing below (unpacking, template, tokenizer) runs for a prompt that
        # cannot fit the context anyway.
        prompt_param = "messages" if req.messages is not None else "prompt"
        chars = 0
        if req.messages is not None:
            chars = _message_chars(req.messages)
        elif req.text is not None:
            chars = len(req.text)
        if chars and context and chars > PROMPT_CHARS_PER_TOKEN * context:
            raise bad_request(
                f"This model's maximum context length is {context} tokens, which allows at most "
                f"{PROMPT_CHARS_PER_TOKEN * context} characters of prompt "
                f"({PROMPT_CHARS_PER_TOKEN} per token); your prompt has {chars} characters. "
                "Please reduce the length of the prompt.",
                param=prompt_param, code="context_length_exceeded")
        n_ids = (len(req.packed_token_ids) // 4 if req.packed_token_ids is not None
                 else len(req.token_ids) if req.token_ids is not None else 0)
        if context and n_ids >= context:
            raise _context_exceeded(context, f"has {n_ids} tokens", prompt_param)
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
            prompt_ids = await self._tokenize(tok, req.messages, True, chars, context, deadline,
                                              "messages")
        elif req.text is not None:
            prompt_ids = await self._tokenize(tok, req.text, False, chars, context, deadline,
                                              "prompt")
        elif req.token_ids is not None:
            if any(t < 0 or t >= tok.vocab_size for t in prompt_ids):
                raise bad_request(f"prompt token ids must be in [0, {tok.vocab_size})",
                                  param="prompt")
        job = self._job(req, entry, prompt_ids or [], tok, deadline)
        if self.timeline is not None:
            job.timeline = self.timeline.new(req.request_id, req.arrival, req.arrival_cpu)
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

    async def _tokenize(self, tok: Tokenizer, prompt, chat: bool, chars: int, context: int,
                        deadline: float, param: str) -> list[int]:
        """The ids of `prompt` (chat: messages through the template). Short prompts on the
        event loop (a thread hop costs more); long ones in a tokenize thread with the GIL
        released, admitted by `_TokenizeGate`, so the loop goes on serving meanwhile."""
        refused = None
        try:
            if chars < OFFLOAD_CHARS:
                ids = _encode_within(tok, prompt, chat, context)
            else:
                gate = self._tokenize_gate
                await gate.acquire(chars, deadline - time.monotonic())
                loop = asyncio.get_running_loop()
                try:
                    work = loop.run_in_executor(self._tokenize_pool, _encode_within, tok,
                                                prompt, chat, context)
                except BaseException:
                    gate.release(chars)
                    raise
                # Released when the thread is done, not when we stop waiting: a request that
                # goes away leaves its tokenizer memory in use until then.
                work.add_done_callback(lambda _: self._tokenized(chars))
                ids = await asyncio.shield(work)
        except TokenizerError as exc:  # e.g. a chat template that refuses the messages
            refused = str(exc)
        # Raised outside the except clause, so that the error carries no chain back to the
        # tokenizer's frames (which hold the prompt).
        if refused is not None:
            raise bad_request(refused, param=param)
        if isinstance(ids, _TooLong):
            raise _context_exceeded(
                context, f"has more than {ids.at_least} tokens (in its first {ids.head_chars} "
                "characters alone)", param)
        return ids

    def _job(self, req: JobRequest, entry: ModelEntry, prompt_ids: list[int],
             tokenizer: Tokenizer | None, deadline: float) -> Job:
        """Check limits and build the Job; every rejection names the offending field."""
        n_prompt = len(prompt_ids)
        if n_prompt == 0:
            raise bad_request("the prompt is empty", param="prompt")
        context = entry.context_length
        max_tokens, max_tokens_param = req.max_tokens, req.max_tokens_param
        if context and n_prompt >= context:
            raise _context_exceeded(context, f"has {n_prompt} tokens",
                                    "messages" if req.messages is not None else "prompt")
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
        elif max_tokens > _INT32_MAX:
            raise bad_request(f"{max_tokens_param} must be at most {_INT32_MAX}, got {max_tokens}",
                              param=max_tokens_param)
        if not 0 <= req.min_tokens <= max_tokens:
            raise bad_request(f"min_tokens must be between 0 and the maximum number of tokens to "
                              f"generate ({max_tokens}), got {req.min_tokens}", param="min_tokens")
        top_k = req.top_k
        if top_k is not None and not -_INT32_MAX - 1 <= top_k <= _INT32_MAX:
            raise bad_request(f"top_k must be a 32-bit integer, got {top_k}", param="top_k")
        if req.seed is not None and not _SEED_MIN <= req.seed <= _SEED_MAX:
            raise bad_request(f"seed must fit in 64 bits ({_SEED_MIN} to {_SEED_MAX}), got "
                              f"{req.seed}", param="seed")
        vocab = tokenizer.vocab_size if tokenizer is not None else None
        try:
            sampling = proto.SamplingParams(
                temperature=1.0 if req.temperature is None else float(req.temperature),
                top_p=1.0 if req.top_p is None else float(req.top_p),
                top_k=0 if top_k is None or top_k < 0 else int(top_k),
                seed=req.seed, **_sampling_extras(req, entry, vocab))
        except ValueError as exc:
            text = str(exc)
            # the field's name, not the message's first word ("logit_bias[5]" was the param)
            param = field_of(text)
            if param == "logprobs":  # the wire's logprobs: chat's top_logprobs
                param = req.logprobs_param
            raise bad_request(text.split(" - at")[0], param=param) from None
        if vocab is None:  # no tokenizer: only the wire's bound on token ids
            vocab = _INT32_MAX + 1
        for tid in req.stop_token_ids:
            if tid < 0 or tid >= vocab:
                raise bad_request(f"stop token id {tid} is outside the vocabulary", param="stop")
        return Job(
            request_id=req.request_id, model=entry.name, endpoint=req.endpoint,
            prompt_ids=prompt_ids, max_tokens=max_tokens, sampling=sampling, tokenizer=tokenizer,
            stop_strings=req.stop_strings, stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos, min_tokens=req.min_tokens, detokenize=req.detokenize,
            deadline=deadline, arrival=req.arrival)

    # -- generation -----------------------------------------------------------------------

    async def generate(self, job: Job) -> AsyncIterator[Delta | Final]:
        """Deltas, then one Final. Raises ApiError (before or during the stream).

        Each pass of the loop routes the rest of the request and runs one attempt (one worker
        stream); a worker failure goes to `_after_failure`, which gives up or lets the loop
        route again, excluding the workers that failed; a failure of our NATS connection goes
        to `_after_bus_failure`, which waits for the reconnect."""
        progress = _Progress(job, self.metrics, self.stats)
        excluded: list[int] = []  # workers that failed this request
        failures = 0
        bus_retries = 0
        bus = self.bus
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
                if not bus.connected:  # do not send into a connection that is down
                    await self._wait_for_bus(job)
                    continue
                prompt = job.prompt_ids + progress.generated if progress.generated else job.prompt_ids
                packed = pack_tokens(prompt)
                exclude = excluded
                if job.pin_worker is not None and not excluded and (
                        entry := self.registry.get(job.model)) is not None:
                    # Every other worker excluded: the router still records the decision (its
                    # load view stays true) and can only pick the pinned one.
                    exclude = [w for w in entry.cards if w != job.pin_worker]
                decision = await self._route(job, packed, max_tokens, exclude)
                worker = decision.worker_id
                if tl is not None:
                    tl.stamp("routed")
                    tl.values.setdefault("worker", worker)  # the first attempt's (burst splits)
                card = self.registry.card(job.model, worker) if worker is not None else None
                if card is not None and job.on_routed is not None:
                    job.on_routed(worker)
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
                    timeline=tl is not None, offload_hint=decision.store_blocks)
                disconnects = bus.disconnects
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
                    if self._bus_failed(exc, disconnects):
                        bus_retries += 1
                        await self._after_bus_failure(exc, job, progress, worker, bus_retries)
                        continue
                    failures += 1
                    excluded.append(worker)
                    self._after_failure(exc, job, progress, worker, failures)
        except ApiError:
            progress.stats.record_failed()
            raise
        finally:
            progress.itl.flush()
            if tl is not None:
                tl.stamp("done")
                self.timeline.write(tl, ok, prompt_tokens=progress.prompt_tokens,
                                    cached_tokens=progress.cached,
                                    output_tokens=len(progress.generated))

    async def _route(self, job: Job, packed: bytes, max_tokens: int,
                     excluded: list[int]) -> proto.RouteDecision:
        """Ask the router for a worker, avoiding those that failed this request and the
        suspects (workers that failed any request lately); when only suspects are left, one
        of them is better than none."""
        suspects = self.suspects.current()
        avoid = excluded + [w for w in suspects if w not in excluded] if suspects else excluded
        decision = await self.router.route(proto.RouteRequest(
            request_id=job.request_id, model=job.model, token_ids=packed,
            max_tokens=max_tokens, exclude=list(avoid)))
        if decision.worker_id is None and len(avoid) > len(excluded):
            decision = await self.router.route(proto.RouteRequest(
                request_id=job.request_id, model=job.model, token_ids=packed,
                max_tokens=max_tokens, exclude=list(excluded)))
        if decision.worker_id is not None and decision.worker_id in self.suspects:
            self.metrics.suspect_routes.labels(job.model).inc()
        return decision

    def _bus_failed(self, exc: StreamError, disconnects: int) -> bool:
        """Whether the attempt failed because of our NATS connection rather than the worker:
        the connection dropped meanwhile (every stream in flight ends with Disconnected,
        frames sent while it was down are lost), or nobody answered right after it came back
        (the worker may not have reconnected yet)."""
        if not isinstance(exc, _MIGRATABLE):  # an answer (an error frame) or our deadline
            return False
        bus = self.bus
        if bus.disconnects != disconnects or not bus.connected or isinstance(exc, Disconnected):
            return True
        return isinstance(exc, NoResponders) and bus.since_reconnect() < RECONNECT_GRACE_S

    async def _wait_for_bus(self, job: Job) -> None:
        """Wait for the NATS connection (at most reconnect_wait_s, within the deadline)."""
        wait_s = min(self.reconnect_wait_s, job.deadline - time.monotonic())
        if not await self.bus.wait_connected(max(0.0, wait_s)):
            if time.monotonic() >= job.deadline:
                raise _deadline_exceeded()
            raise ApiError(503, f"the frontend's NATS connection is down (waited {wait_s:.1f} s "
                                "for it to come back)", type="server_error", code="disconnected")

    async def _after_bus_failure(self, exc: StreamError, job: Job, progress: _Progress,
                                 worker: int, retries: int) -> None:
        """An attempt lost to our NATS connection: wait until it is back (and, for a worker
        that did not answer right after the reconnect, a short backoff while it reconnects),
        then the loop routes again. No worker is blamed; the retry does not count against
        migration_limit, but MAX_BUS_RETRIES and the deadline bound it."""
        if retries > MAX_BUS_RETRIES:
            raise _stream_error(exc, f"NATS failed {retries} times, giving up: ") from None
        phase = "after_first_token" if progress.generated else "before_first_token"
        self.metrics.migrations.labels(job.model, phase).inc()
        log.warning("request_retrying_after_nats", request_id=job.request_id,
                    worker=f"{worker:x}", error=str(exc), phase=phase,
                    tokens_so_far=len(progress.generated))
        await self._wait_for_bus(job)
        if isinstance(exc, NoResponders):
            delay = min(0.5, 0.05 * 2 ** min(retries, 4))
            await asyncio.sleep(min(delay, max(0.0, job.deadline - time.monotonic())))

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
                tl.stamp_cpu("intake_cpu_ms")
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
                frames = (chunk,)
                if take_ready is not None and data and not chunk.final:
                    more = take_ready()
                    if more:
                        data = b"".join([data, *(c.token_ids for c in more)])
                        frames = (chunk, *more)
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
                            progress.stats.record_ttft((now - job.arrival) * 1000.0)
                    progress.last_at = now
                    progress.generated += ids
                    if progress.logprobs is not None:
                        progress.logprobs += _logprob_entries(frames)
                    delta = text.feed(ids)
                    if delta is not None and progress.logprobs is not None:
                        delta.logprobs = progress.logprobs[-len(delta.token_ids):]
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
                        if progress.logprobs is not None and tail.token_ids:
                            tail.logprobs = progress.logprobs[-len(tail.token_ids):]
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
        if isinstance(exc, _WORKER_GONE) or (isinstance(exc, RemoteError)
                                              and exc.error.code == "shutting_down"):
            if self.suspects.mark(worker):
                self.metrics.worker_failures.labels(job.model, exc.error.code).inc()
                log.warning("worker_suspected", worker=f"{worker:x}", error=str(exc),
                            request_id=job.request_id)
        if failures > self.migration_limit:
            raise _stream_error(exc, f"worker failed {failures} times, giving up: ") from None
        phase = "after_first_token" if progress.generated else "before_first_token"
        self.metrics.migrations.labels(job.model, phase).inc()
        log.warning("request_migrating", request_id=job.request_id, worker=f"{worker:x}",
                    error=str(exc), phase=phase, tokens_so_far=len(progress.generated))


# Sampling fields the wire carries (proto.SamplingParams); the penalties, logit_bias and
# logprobs arrive with the w-sampling branch.
_WIRE_SAMPLING = frozenset(proto.SamplingParams.__struct_fields__)


def _sampling_extras(req: JobRequest, entry: ModelEntry, vocab: int | None) -> dict:
    """SAMPLING MAPPING POINT: the API's penalties, logit_bias and logprobs -> keyword
    arguments of proto.SamplingParams. A non-neutral value whose wire field this build lacks is
    refused with a 400 naming it (never dropped silently); once proto.SamplingParams has the
    field, it is passed on unchanged (same names, same units as OpenAI's)."""
    extras: dict = {}
    for name, value, neutral in (("presence_penalty", req.presence_penalty, 0.0),
                                 ("frequency_penalty", req.frequency_penalty, 0.0),
                                 ("repetition_penalty", req.repetition_penalty, 1.0),
                                 ("logit_bias", req.logit_bias, {}),
                                 ("logprobs", req.logprobs, None)):
        if value == neutral:
            continue
        param = req.logprobs_param if name == "logprobs" else name
        if name not in _WIRE_SAMPLING:
            raise bad_request(f"{param} is not supported by this genset version",
                              param=param, code="unsupported_parameter")
        extras[name] = value
    if req.logit_bias and vocab is not None:
        for key in req.logit_bias:
            if int(key) >= vocab:
                raise bad_request(f"logit_bias: token id {key} is outside the vocabulary "
                                  f"[0, {vocab})", param="logit_bias")
    if req.logprobs is not None:
        # ModelCard.supports_logprobs (w-sampling): a request may be routed to any worker.
        engines = sorted({c.engine for c in entry.cards.values()
                          if not getattr(c, "supports_logprobs", False)})
        if engines:
            raise bad_request(f"{req.logprobs_param}: the {', '.join(engines)} engine serving "
                              f"model {entry.name!r} does not compute log-probabilities",
                              param=req.logprobs_param, code="unsupported_parameter")
    return extras


def _logprob_entries(frames) -> list:
    """(id, logprob, [(alt id, logprob), ...]) per token of these frames, in order."""
    out = []
    for frame in frames:
        ids = unpack_tokens(frame.token_ids)
        if frame.logprobs is None:  # a worker that sent none: keep the alignment
            out += [(t, None, []) for t in ids]
            continue
        lps, top_ids, top_lps = frame.logprobs.unpack()
        out += [(t, lp, list(zip(ti, tl, strict=True)))
                for t, lp, ti, tl in zip(ids, lps, top_ids, top_lps, strict=True)]
    return out


def _message_chars(messages: list[dict]) -> int:
    """Characters a chat prompt brings before its template: the messages' text fields."""
    total = 0
    for m in messages:
        for value in m.values():
            if isinstance(value, str):
                total += len(value)
    return total


def _context_exceeded(context: int, what: str, param: str) -> ApiError:
    return bad_request(f"This model's maximum context length is {context} tokens. However, your "
                       f"prompt {what}. Please reduce the length of the prompt.",
                       param=param, code="context_length_exceeded")


def _router_suspects(router) -> SuspectWorkers:
    """The suspects kept by the feeds of the router in this process (the embedded router, or
    the service client's warm fallback), which clear a mark when the worker proves alive;
    without one (router service, no fallback) our own, whose marks end by expiry."""
    for candidate in (router, getattr(router, "fallback", None)):
        feeds = getattr(candidate, "feeds", None)
        suspects = getattr(feeds, "suspects", None)
        if isinstance(suspects, SuspectWorkers):
            return suspects
    return SuspectWorkers()


def _deadline_exceeded() -> ApiError:
    return ApiError(504, "request deadline exceeded", type="timeout_error",
                    code="deadline_exceeded")


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
