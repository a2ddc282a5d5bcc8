"""The OpenAI-compatible HTTP API: /v1/models, /v1/chat/completions, /v1/completions,
/health, /metrics — served by `services.frontend.httpserver` (a lean HTTP/1.1 server).

A generation decides its status code only after its first token or error, so failures before
the first token are real HTTP errors rather than an error inside a 200 stream. A client that
disconnects cancels the request's task (the server sees the connection close), which closes
the generation and cancels the worker's stream.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from urllib.parse import unquote

import msgspec
import structlog
from prometheus_client import CONTENT_TYPE_LATEST

from services.frontend import openai_api as oa
from services.frontend.errors import ApiError, bad_request, from_validation
from services.frontend.httpserver import Request
from services.frontend.pipeline import PROMPT_CHARS_PER_TOKEN, Final, Job, JobRequest, Pipeline
from services.frontend.text import Delta

log = structlog.get_logger("frontend.http")

_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


def error_body(status: int, message: str) -> bytes:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return oa.json_encode({"error": {"message": message, "type": kind, "param": None,
                                     "code": None}})


def _decode(decoder: msgspec.json.Decoder, body: bytes):
    if not body:
        raise bad_request("the request body is empty; expected a JSON object")
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise from_validation(exc) from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # arrays / objects nested past the interpreter's limit (~1,000)
        raise bad_request("the request body nests arrays or objects too deeply") from None


def _generation_fields(req: oa._Common) -> dict:
    """The JobRequest fields chat and completions requests share."""
    stop_strings, stop_ids = oa.split_stop(req.stop)
    return {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
            "seed": req.seed, "stop_strings": stop_strings,
            "stop_token_ids": stop_ids + (req.stop_token_ids or []), "ignore_eos": req.ignore_eos,
            "min_tokens": req.min_tokens}


def _check_unsupported(req: oa._Common) -> None:
    if req.n != 1:
        raise bad_request(f"only n=1 is supported, got n={req.n}", param="n")
    if req.logprobs:
        raise bad_request("logprobs are not supported", param="logprobs")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true",
                          param="stream_options")


class GenerationResponse:
    """Runs one generation for one HTTP request, streamed (SSE) or collected (JSON)."""

    __slots__ = ("app", "chat", "include_usage", "job", "stream")

    def __init__(self, app: FrontendHttp, job: Job, *, chat: bool, stream: bool,
                 include_usage: bool) -> None:
        self.app = app
        self.job = job
        self.chat = chat
        self.stream = stream
        self.include_usage = include_usage

    async def run(self, conn) -> None:
        metrics = self.app.metrics
        model = self.job.model
        metrics.inflight.labels(model).inc()
        status = "200"
        try:
            status = await (self._stream(conn) if self.stream else self._collect(conn))
        except asyncio.CancelledError:
            if not conn.closed:
                status = "cancelled"
                raise
            asyncio.current_task().uncancel()  # the cancel was ours: the client left
            status = "disconnected"
            metrics.disconnects.labels(model).inc()
        finally:
            metrics.inflight.labels(model).dec()
            metrics.duration.labels(model).observe(time.perf_counter() - self.job.arrival)
            metrics.requests.labels(model, self.job.endpoint, status).inc()

    @staticmethod
    def _send_error(conn, err: ApiError) -> str:
        conn.respond(err.status, oa.json_encode(err.body()))
        return str(err.status)

    async def _collect(self, conn) -> str:
        job = self.job
        texts: list[str] = []
        final: Final | None = None
        gen = self.app.pipeline.generate(job)
        try:
            async for item in gen:
                if type(item) is Delta:
                    texts.append(item.text)
                else:
                    final = item
        except ApiError as err:
            return self._send_error(conn, err)
        finally:
            await gen.aclose()
        assert final is not None
        self.app.count_tokens(job.model, final)
        usage = oa.usage_dict(final.prompt_tokens, final.completion_tokens, final.cached_tokens)
        build = oa.chat_response if self.chat else oa.completion_response
        body = build(response_id=self.app.response_id(job, self.chat), model=job.model,
                     created=int(time.time()), text="".join(texts),
                     finish_reason=final.finish_reason, usage=usage)
        conn.respond(200, oa.json_encode(body))
        return "200"

    async def _stream(self, conn) -> str:
        job = self.job
        gen = self.app.pipeline.generate(job)
        try:
            try:
                item = await gen.__anext__()
            except ApiError as err:
                return self._send_error(conn, err)
            writer = oa.ChunkWriter(chat=self.chat, response_id=self.app.response_id(job, self.chat),
                                    model=job.model, created=int(time.time()))
            conn.start_stream(200, _SSE_HEADERS)
            is_first = True
            next_item = gen.__anext__
            write = conn.write
            try:
                while True:
                    if type(item) is Delta:
                        if item.text:
                            write(writer.text(item.text, is_first))
                            is_first = False
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
                        final: Final = item
                        self.app.count_tokens(job.model, final)
                        out = writer.finish(final.finish_reason, is_first)
                        if self.include_usage:
                            out += writer.usage(oa.usage_dict(final.prompt_tokens,
                                                              final.completion_tokens,
                                                              final.cached_tokens))
                        conn.end_stream(out + writer.DONE)
                        return "200"
                    item = await next_item()
            except ApiError as err:
                # The status line is gone already: the error travels as an SSE event.
                conn.end_stream(writer.error(err.body()) + writer.DONE)
                return str(err.status)
        finally:
            await gen.aclose()


class FrontendHttp:
    def __init__(self, pipeline: Pipeline, *, health, metrics_text, api_keys: list[str] | None = None) -> None:
        self.pipeline = pipeline
        self.metrics = pipeline.metrics
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
        }

    async def handle(self, request: Request) -> None:
        """The server's entry point: dispatch, and turn failures into OpenAI-shaped errors."""
        path = request.path
        route = self.routes.get(path)
        if route is None and path.startswith("/v1/models/"):
            route = ("GET", self.get_model)
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

    def count_tokens(self, model: str, final: Final) -> None:
        m = self.metrics
        m.prompt_tokens.labels(model).inc(final.prompt_tokens)
        m.output_tokens.labels(model).inc(final.completion_tokens)
        if final.cached_tokens:
            m.cached_tokens.labels(model).inc(final.cached_tokens)

    def _authorize(self, request: Request) -> None:
        if not self.api_keys:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].encode() if header[:7].lower() == "bearer " else b""
        if not any(hmac.compare_digest(token, key) for key in self.api_keys):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                           type="authentication_error", code="invalid_api_key")

    def _check_size(self, request: Request, param: str) -> None:
        """A body too large to hold a prompt any served model could take is refused before
        its JSON is decoded (a 10 MB body costs ~10 ms of the event loop and 10-20 MB to
        decode): the prompt's own limit, checked again by the pipeline, in bytes."""
        limit = self.pipeline.max_body_bytes()
        if limit and len(request.body) > limit:
            raise bad_request(
                f"the request body is {len(request.body)} bytes; a prompt for the models served "
                f"here fits in {limit} bytes (their largest context, at most "
                f"{PROMPT_CHARS_PER_TOKEN} characters per token). Please reduce the length of "
                "the prompt.", param=param, code="context_length_exceeded")

    @staticmethod
    def _request_id(request: Request) -> str:
        rid = request.headers.get("x-request-id", "")
        return rid if 0 < len(rid) <= 128 and rid.isascii() else uuid.uuid4().hex

    # -- endpoints ------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> None:
        arrival = time.perf_counter()
        self._authorize(request)
        self._check_size(request, "messages")
        req: oa.ChatCompletionRequest = _decode(oa.chat_decoder, request.body)
        _check_unsupported(req)
        use_completion_param = req.max_completion_tokens is not None
        job = await self.pipeline.prepare(JobRequest(
            endpoint="chat", request_id=self._request_id(request), model=req.model,
            arrival=arrival, messages=oa.chat_messages(req),
            max_tokens=req.max_completion_tokens if use_completion_param else req.max_tokens,
            max_tokens_param="max_completion_tokens" if use_completion_param else "max_tokens",
            **_generation_fields(req)))
        await self._generate(request, job, req, chat=True)

    async def completions(self, request: Request) -> None:
        arrival = time.perf_counter()
        self._authorize(request)
        self._check_size(request, "prompt")
        req: oa.CompletionRequest = _decode(oa.completion_decoder, request.body)
        _check_unsupported(req)
        if req.echo:
            raise bad_request("echo is not supported", param="echo")
        if req.suffix:
            raise bad_request("suffix is not supported", param="suffix")
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
            arrival=arrival, text=prompt if isinstance(prompt, str) else None,
            token_ids=None if isinstance(prompt, str) else list(prompt),
            max_tokens=req.max_tokens if req.max_tokens is not None else 16,
            **_generation_fields(req)))
        await self._generate(request, job, req, chat=False)

    async def _generate(self, request: Request, job: Job, req: oa._Common, *, chat: bool) -> None:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        await GenerationResponse(self, job, chat=chat, stream=req.stream,
                                 include_usage=include_usage).run(request.conn)

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

    async def metrics_endpoint(self, request: Request) -> None:
        self._authorize(request)  # /metrics follows the API key (issue 14)
        request.conn.respond(200, self._metrics_text(), CONTENT_TYPE_LATEST.encode())

