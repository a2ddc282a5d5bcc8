"""The OpenAI-compatible HTTP API: /v1/models, /v1/chat/completions, /v1/completions,
/health, /metrics — served by `services.frontend.httpserver` (a lean HTTP/1.1 server).

A generation decides its status code only after its first token or error, so failures before
the first token are real HTTP errors rather than an error inside a 200 stream. A client that
disconnects cancels the request's task (the server sees the connection close), which closes
the generation and cancels the worker's stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import unquote

import msgspec
import structlog
from prometheus_client import CONTENT_TYPE_LATEST

from genset.runtime.logging import bind_request
from services.frontend import openai_api as oa
from services.frontend import openapi
from services.frontend.errors import ApiError, bad_request, from_validation
from services.frontend.httpserver import Request
from services.frontend.pipeline import (
    BODY_BYTES_PER_TOKEN,
    BODY_OVERHEAD_BYTES,
    Final,
    Job,
    JobRequest,
    Pipeline,
)
from services.frontend.text import Delta

log = structlog.get_logger("frontend.http")

_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


def error_body(status: int, message: str, code: str | None = None) -> bytes:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return oa.json_encode({"error": {"message": message, "type": kind, "param": None,
                                     "code": code}})


def _decode(decoder: msgspec.json.Decoder, body: bytes):
    if not body:
        raise bad_request("the request body is empty; expected a JSON object")
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        err = from_validation(exc)
        if err.param and err.param.endswith("[...]"):  # a map's value: name the map
            err.param = err.param[:-5]
        raise err from None
    except msgspec.DecodeError as exc:
        err = oa.non_finite_number(body)  # NaN / Infinity, as Python's json.dumps writes them
        if err is not None:
            raise err from None
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # arrays / objects nested past the interpreter's limit (~1,000)
        raise bad_request("the request body nests arrays or objects too deeply") from None


def _generation_fields(req: oa._Common) -> dict:
    """The JobRequest fields chat and completions requests share."""
    stop_strings, stop_ids = oa.split_stop(req.stop)
    return {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
            "seed": req.seed, "stop_strings": stop_strings,
            "stop_token_ids": stop_ids + (req.stop_token_ids or []), "ignore_eos": req.ignore_eos,
            "min_tokens": req.min_tokens,
            "presence_penalty": req.presence_penalty or 0.0,
            "frequency_penalty": req.frequency_penalty or 0.0,
            "repetition_penalty": 1.0 if req.repetition_penalty is None else req.repetition_penalty,
            "logit_bias": req.logit_bias or {}}


def _choice_jobs(job: Job, n: int) -> list[Job]:
    """The n choices of a request as n jobs: their own request ids (routers and workers track
    requests by id), seed + i when seeded (choice 0 is exactly the n = 1 request)."""
    jobs = [job]
    for i in range(1, n):
        sampling = job.sampling
        if sampling.seed is not None:
            sampling = msgspec.structs.replace(sampling, seed=sampling.seed + i)
        jobs.append(dataclasses.replace(job, request_id=f"{job.request_id}-{i}",
                                        sampling=sampling, on_routed=None))
    return jobs


class _Choice:
    """What one choice has produced (the collected, non-streamed response)."""

    __slots__ = ("final", "logprobs", "texts")

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.logprobs: list | None = None
        self.final: Final | None = None


class GenerationResponse:
    """Runs one generation for one HTTP request, streamed (SSE) or collected (JSON).

    n > 1 choices run as n generations: choice 0 is routed first, then the others go to the
    same worker right after (`Job.pin_worker`), so the worker's prefix cache (and its in-step
    prefix sharing) computes the prompt once. Their items are merged in arrival order; each
    streamed event names its choice's index."""

    __slots__ = ("app", "chat", "echo", "include_usage", "jobs", "log_fields", "stream")

    def __init__(self, app: FrontendHttp, jobs: list[Job], *, chat: bool, stream: bool,
                 include_usage: bool, echo: str = "", log_fields: dict | None = None) -> None:
        self.app = app
        self.jobs = jobs
        self.chat = chat
        self.stream = stream
        self.include_usage = include_usage
        self.echo = echo  # completions with echo: the prompt text, ahead of each choice's text
        self.log_fields = log_fields  # user / metadata: one log line per such request

    @property
    def job(self) -> Job:
        return self.jobs[0]

    async def run(self, conn) -> None:
        metrics = self.app.metrics.model(self.job.model)
        metrics.inflight.inc()
        status = "200"
        try:
            status = await (self._stream(conn) if self.stream else self._collect(conn))
        except asyncio.CancelledError:
            if not conn.closed:
                status = "cancelled"
                raise
            asyncio.current_task().uncancel()  # the cancel was ours: the client left
            status = "disconnected"
            metrics.disconnects.inc()
        finally:
            metrics.inflight.dec()
            metrics.duration.observe(time.perf_counter() - self.job.arrival)
            metrics.requests(self.job.endpoint, status).inc()
            if self.log_fields:
                log.info("request_end", status=status, n=len(self.jobs), **self.log_fields)

    @staticmethod
    def _send_error(conn, err: ApiError) -> str:
        conn.respond(err.status, oa.json_encode(err.body()))
        return str(err.status)

    def _items(self):
        """(choice index, Delta | Final) in arrival order; raises ApiError."""
        if len(self.jobs) == 1:
            return _indexed(self.app.pipeline.generate(self.job))
        return _merge_choices(self.app.pipeline, self.jobs)

    def _usage(self, finals: list[Final]) -> dict:
        # The prompt is counted once: the choices share it (and its KV).
        first = finals[0]
        completion = sum(f.completion_tokens for f in finals)
        self.app.count_tokens(self.job.model, first.prompt_tokens, completion,
                              first.cached_tokens)
        return oa.usage_dict(first.prompt_tokens, completion, first.cached_tokens)

    def _format_logprobs(self, entries: list, text_offset: int = 0) -> dict:
        tok = self.job.tokenizer
        return (oa.chat_logprobs(tok, entries) if self.chat
                else oa.completion_logprobs(tok, entries, text_offset))

    async def _collect(self, conn) -> str:
        job = self.job
        choices = [_Choice() for _ in self.jobs]
        gen = self._items()
        try:
            async for index, item in gen:
                choice = choices[index]
                if type(item) is Delta:
                    choice.texts.append(item.text)
                    # LOGPROBS MAPPING POINT: a Delta carries `logprobs` (one
                    # oa.TokenLogprob per token id) once the pipeline hands the worker
                    # frames' TokenLogprobs on; until then no request asks (refused in prepare).
                    lps = getattr(item, "logprobs", None)
                    if lps is not None:
                        choice.logprobs = (choice.logprobs or []) + lps
                else:
                    choice.final = item
        except ApiError as err:
            return self._send_error(conn, err)
        finally:
            await gen.aclose()
        usage = self._usage([c.final for c in choices])
        out = []
        for i, c in enumerate(choices):
            lp = (None if c.logprobs is None
                  else self._format_logprobs(c.logprobs, len(self.echo)))
            text = self.echo + "".join(c.texts)
            build = oa.chat_choice if self.chat else oa.completion_choice
            out.append(build(i, text, c.final.finish_reason, lp))
        response = oa.chat_response if self.chat else oa.completion_response
        body = response(response_id=self.app.response_id(job, self.chat), model=job.model,
                        created=int(time.time()), choices=out, usage=usage)
        conn.respond(200, oa.json_encode(body))
        return "200"

    async def _stream(self, conn) -> str:
        job = self.job
        n = len(self.jobs)
        gen = self._items()
        try:
            try:
                index, item = await gen.__anext__()
            except ApiError as err:
                return self._send_error(conn, err)
            writer = oa.ChunkWriter(chat=self.chat, response_id=self.app.response_id(job, self.chat),
                                    model=job.model, created=int(time.time()))
            conn.start_stream(200, _SSE_HEADERS)
            if self.echo:  # the prompt goes first, as each choice's first event
                conn.write(b"".join(writer.text(self.echo, index=i) for i in range(n)))
            first = [True] * n  # a choice's first chat event carries the role
            finals: list[Final | None] = [None] * n
            left = n
            next_item = gen.__anext__
            write = conn.write
            try:
                while True:
                    if type(item) is Delta:
                        if item.text:
                            lps = getattr(item, "logprobs", None)  # LOGPROBS MAPPING POINT
                            if lps is None:
                                write(writer.text(item.text, first[index], index))
                            else:
                                write(writer.text_with_logprobs(
                                    item.text, self._format_logprobs(lps), first[index], index))
                            first[index] = False
                            if conn.write_paused:  # a slow reader: wait, but not past the deadline
                                try:
                                    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow
                                    # the cancel of a client that disconnects right then
                                    async with asyncio.timeout(
                                            max(0.1, job.deadline - time.monotonic())):
                                        await conn.drain()
                                except TimeoutError:
                                    conn.abort()
                                    return "504"
                    else:
                        finals[index] = item
                        out = writer.finish(item.finish_reason, first[index], index)
                        left -= 1
                        if left:
                            write(out)
                        else:
                            if self.include_usage:
                                out += writer.usage(self._usage(finals))
                            else:
                                self._usage(finals)
                            conn.end_stream(out + writer.DONE)
                            return "200"
                    index, item = await next_item()
            except ApiError as err:
                # The status line is gone already: the error travels as an SSE event.
                conn.end_stream(writer.error(err.body()) + writer.DONE)
                return str(err.status)
        finally:
            await gen.aclose()


async def _indexed(gen) -> AsyncIterator[tuple[int, Delta | Final]]:
    async with contextlib.aclosing(gen):
        async for item in gen:
            yield 0, item


async def _merge_choices(pipeline: Pipeline, jobs: list[Job]
                         ) -> AsyncIterator[tuple[int, Delta | Final]]:
    """The items of n choices in arrival order. Choice 0 is routed first; the others start
    once its worker is known and are pinned to it. The first failure of any choice ends the
    request (the others are cancelled with it, like a client disconnect)."""
    queue: asyncio.Queue = asyncio.Queue(maxsize=16 * len(jobs))  # producers wait: bounded
    routed: asyncio.Future = asyncio.get_running_loop().create_future()

    def on_routed(worker: int) -> None:
        if not routed.done():
            routed.set_result(worker)

    jobs[0].on_routed = on_routed

    async def run(index: int, job: Job) -> None:
        try:
            async with contextlib.aclosing(pipeline.generate(job)) as items:
                async for item in items:
                    await queue.put((index, item))
        except ApiError as err:
            await queue.put((index, err))
        except Exception as exc:
            log.exception("choice_failed", request_id=job.request_id)
            await queue.put((index, ApiError(500, f"internal error: {type(exc).__name__}: {exc}",
                                             type="server_error")))

    tasks = [asyncio.create_task(run(0, jobs[0]))]
    try:
        await asyncio.wait((routed, tasks[0]), return_when=asyncio.FIRST_COMPLETED)
        if routed.done():
            for i in range(1, len(jobs)):
                jobs[i].pin_worker = routed.result()
                tasks.append(asyncio.create_task(run(i, jobs[i])))
        left = len(jobs)
        while left:
            index, item = await queue.get()
            if isinstance(item, ApiError):
                raise item
            if type(item) is Final:
                left -= 1
            yield index, item
    finally:
        if not routed.done():
            routed.cancel()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


class FrontendHttp:
    def __init__(self, pipeline: Pipeline, *, health, metrics_text, api_keys: list[str] | None = None,
                 dashboard=None) -> None:
        self.pipeline = pipeline
        self.metrics = pipeline.metrics
        self.dashboard = dashboard  # services.frontend.dashboard.Dashboard (None: no state)
        self._health = health
        self._metrics_text = metrics_text
        self.api_keys = [k.encode() for k in (api_keys or []) if k]
        # path -> (method, handler); a handler answers on request.conn itself.
        self.routes = {
            "/v1/chat/completions": ("POST", self.chat_completions),
            "/v1/completions": ("POST", self.completions),
            "/v1/models": ("GET", self.list_models),
            "/health": ("GET", self.health),
            "/metrics": ("GET", self.metrics_endpoint),
            "/openapi.json": ("GET", self.openapi),
            "/": ("GET", self.root),
            "/dashboard": ("GET", self.dashboard_page),
            "/dashboard/state": ("GET", self.dashboard_state),
        }
        # (path prefix, the path as /openapi.json writes it, (method, handler))
        self.prefix_routes = [("/v1/models/", "/v1/models/{model}", ("GET", self.get_model)),
                              ("/dashboard/", "/dashboard/{file}", ("GET", self.dashboard_file))]
        self._static = _load_static()
        self._openapi: bytes | None = None

    async def handle(self, request: Request) -> None:
        """The server's entry point: dispatch, and turn failures into OpenAI-shaped errors."""
        path = request.path
        route = self.routes.get(path)
        if route is None:
            route = next((r for prefix, _, r in self.prefix_routes if path.startswith(prefix)),
                         None)
        try:
            if route is None:
                raise ApiError(404, f"Not Found: {request.method} {path}", code="not_found")
            method, handler = route
            if request.method != method and not (method == "GET" and request.method == "HEAD"):
                raise ApiError(405, f"Method Not Allowed: {request.method} {path} (use {method})",
                               code="method_not_allowed")
            await handler(request)
        except ApiError as err:
            if path.startswith("/v1/") and "completions" in path:
                endpoint = "chat" if path.endswith("chat/completions") else "completions"
                self.metrics.requests.labels("", endpoint, str(err.status)).inc()
            request.conn.respond(err.status, oa.json_encode(err.body()))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("request_failed", path=path)
            err = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
            request.conn.respond(500, oa.json_encode(err.body()))

    # -- helpers --------------------------------------------------------------------------

    @staticmethod
    def response_id(job: Job, chat: bool) -> str:
        return ("chatcmpl-" if chat else "cmpl-") + job.request_id

    def count_tokens(self, model: str, prompt: int, completion: int, cached: int) -> None:
        m = self.metrics.model(model)
        m.prompt_tokens.inc(prompt)
        m.output_tokens.inc(completion)
        if cached:
            m.cached_tokens.inc(cached)

    def _authorize(self, request: Request) -> None:
        if not self.api_keys:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].encode() if header[:7].lower() == "bearer " else b""
        if not any(hmac.compare_digest(token, key) for key in self.api_keys):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                           type="authentication_error", code="invalid_api_key")

    def body_limit(self, length: int) -> tuple[str, str] | None:
        """The HTTP server's check of a request's Content-Length, before its body is read: a
        body too large to hold a prompt any served model could take gets a 413 (message,
        code), the body unread (pipeline.BODY_BYTES_PER_TOKEN says why and what it cost)."""
        limit = self.pipeline.max_body_bytes()
        if not limit or length <= limit:
            return None
        return (f"the request body is {length} bytes; a request to the models served here fits "
                f"in {limit} bytes ({BODY_BYTES_PER_TOKEN} bytes per token of their largest "
                f"context, {self.pipeline.registry.max_context} tokens, plus "
                f"{BODY_OVERHEAD_BYTES} for the other fields). Please reduce the length of the "
                "prompt.", "context_length_exceeded")

    @staticmethod
    def _request_id(request: Request) -> str:
        rid = request.headers.get("x-request-id", "")
        return rid if 0 < len(rid) <= 128 and rid.isascii() else uuid.uuid4().hex

    # -- endpoints ------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> None:
        arrival = time.perf_counter()
        arrival_cpu = time.thread_time() if self.pipeline.timeline is not None else 0.0
        self._authorize(request)
        req: oa.ChatCompletionRequest = _decode(oa.chat_decoder, request.body)
        oa.check_chat(req)
        use_completion_param = req.max_completion_tokens is not None
        logprobs = oa.chat_logprobs_count(req)
        job = await self.pipeline.prepare(JobRequest(
            endpoint="chat", request_id=self._request_id(request), model=req.model,
            arrival=arrival, arrival_cpu=arrival_cpu, messages=oa.chat_messages(req),
            max_tokens=req.max_completion_tokens if use_completion_param else req.max_tokens,
            max_tokens_param="max_completion_tokens" if use_completion_param else "max_tokens",
            logprobs=logprobs,
            **_generation_fields(req)))
        await self._generate(request, job, req, chat=True)

    async def completions(self, request: Request) -> None:
        arrival = time.perf_counter()
        arrival_cpu = time.thread_time() if self.pipeline.timeline is not None else 0.0
        self._authorize(request)
        req: oa.CompletionRequest = _decode(oa.completion_decoder, request.body)
        oa.check_completion(req)
        if req.echo and req.logprobs is not None:
            raise bad_request("echo with logprobs is not supported: genset does not compute the "
                              "prompt's log-probabilities", param="echo",
                              code="unsupported_parameter")
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise bad_request("batched prompts are not supported: send one prompt per request",
                                  param="prompt")
            prompt = prompt[0]
        if not isinstance(prompt, str) and not all(type(t) is int for t in prompt):
            raise bad_request("prompt must be a string, a list of token ids, or a list with "
                              "one string or one list of token ids", param="prompt")
        job = await self.pipeline.prepare(JobRequest(
            endpoint="completions", request_id=self._request_id(request), model=req.model,
            arrival=arrival, arrival_cpu=arrival_cpu, text=prompt if isinstance(prompt, str) else None,
            token_ids=None if isinstance(prompt, str) else list(prompt),
            max_tokens=req.max_tokens if req.max_tokens is not None else 16,
            logprobs=req.logprobs, **_generation_fields(req)))
        echo = ""
        if req.echo:
            echo = prompt if isinstance(prompt, str) else job.tokenizer.decode(job.prompt_ids)
        await self._generate(request, job, req, chat=False, echo=echo)

    async def _generate(self, request: Request, job: Job, req: oa._Common, *, chat: bool,
                        echo: str = "") -> None:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        # `user` (and chat's safety_identifier / metadata) ride on every log line of the
        # request, and one line marks its end: that is where operators look for them.
        log_fields = {k: v for k, v in (("user", req.user),
                                        ("safety_identifier", getattr(req, "safety_identifier",
                                                                      None)),
                                        ("metadata", getattr(req, "metadata", None)))
                      if v is not None}
        with bind_request(job.request_id, **log_fields):
            await GenerationResponse(self, _choice_jobs(job, req.n), chat=chat, stream=req.stream,
                                     include_usage=include_usage, echo=echo,
                                     log_fields=log_fields).run(request.conn)

    def _model_object(self, entry) -> dict:
        return {"id": entry.name, "object": "model", "created": entry.created,
                "owned_by": "genset", "max_model_len": entry.context_length,
                "workers": len(entry.cards)}

    async def list_models(self, request: Request) -> None:
        self._authorize(request)
        data = [self._model_object(e) for e in sorted(self.pipeline.registry.models.values(),
                                                       key=lambda e: e.name)]
        request.conn.respond(200, oa.json_encode({"object": "list", "data": data}))

    async def get_model(self, request: Request) -> None:
        self._authorize(request)
        name = request.path[len("/v1/models/"):]
        entry = self.pipeline.model_entry(unquote(name))
        request.conn.respond(200, oa.json_encode(self._model_object(entry)))

    async def health(self, request: Request) -> None:
        body = self._health()
        request.conn.respond(200 if body.get("status") == "ok" else 503,
                             json.dumps(body, default=str).encode())

    async def openapi(self, request: Request) -> None:
        # A description, no data: served without the API key, so client generators and
        # schema-driven fuzzers can read it before they have one.
        if self._openapi is None:
            self._openapi = openapi.document_bytes()
        request.conn.respond(200, self._openapi)

    # -- the status page ------------------------------------------------------------------

    async def root(self, request: Request) -> None:
        request.conn.respond(307, b"", b"text/plain", headers=[(b"location", b"/dashboard")])

    async def dashboard_page(self, request: Request) -> None:
        # The page and its files hold no data (they are the same for everyone): served without
        # the key. The data comes from /dashboard/state, which follows the key.
        await self._send_static(request, "index.html")

    async def dashboard_file(self, request: Request) -> None:
        await self._send_static(request, request.path[len("/dashboard/"):])

    async def _send_static(self, request: Request, name: str) -> None:
        found = self._static.get(name)
        if found is None:
            raise ApiError(404, f"Not Found: {request.method} {request.path}", code="not_found")
        body, content_type = found
        request.conn.respond(200, body, content_type, headers=[(b"cache-control", b"no-cache")])

    async def dashboard_state(self, request: Request) -> None:
        self._authorize(request)
        if self.dashboard is None:
            raise ApiError(503, "the dashboard's state is not gathered by this frontend",
                           type="server_error", code="unavailable")
        request.conn.respond(200, oa.json_encode(self.dashboard.snapshot()),
                             headers=[(b"cache-control", b"no-store")])

    async def metrics_endpoint(self, request: Request) -> None:
        self._authorize(request)  # /metrics follows the API key (issue 14)
        request.conn.respond(200, self._metrics_text(), CONTENT_TYPE_LATEST.encode())


_STATIC_DIR = Path(__file__).resolve().parent / "static"
_STATIC_TYPES = {"index.html": b"text/html; charset=utf-8",
                 "app.js": b"text/javascript; charset=utf-8",
                 "app.css": b"text/css; charset=utf-8"}


def _load_static() -> dict[str, tuple[bytes, bytes]]:
    """The status page's files, read once (a few KiB); only these names are ever served."""
    files = {}
    for name, content_type in _STATIC_TYPES.items():
        try:
            files[name] = ((_STATIC_DIR / name).read_bytes(), content_type)
        except OSError as exc:  # an install without package data: the API still serves
            log.warning("dashboard_file_missing", file=name, error=str(exc))
    return files
