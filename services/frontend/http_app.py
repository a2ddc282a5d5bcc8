"""The OpenAI-compatible HTTP API (Starlette): /v1/models, /v1/chat/completions,
/v1/completions, /health, /metrics.

Generation responses are a small ASGI callable of their own (`GenerationResponse`) rather than
Starlette's StreamingResponse: it watches for the client's disconnect from the moment the
request is accepted (also while waiting for the first token, and for non-streamed requests)
and cancels the generation, which cancels the worker's stream; and it decides the status
code only after the first token or error, so failures before the first token are real HTTP
errors rather than an error inside a 200 stream.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid

import msgspec
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.frontend import openai_api as oa
from services.frontend.errors import ApiError, bad_request, from_validation
from services.frontend.pipeline import Delta, Final, Job, Pipeline

log = structlog.get_logger("frontend.http")

_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
_JSON_HEADERS = [(b"content-type", b"application/json")]


def _decode(decoder: msgspec.json.Decoder, body: bytes):
    if not body:
        raise bad_request("the request body is empty; expected a JSON object")
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise from_validation(exc) from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None


def _check_unsupported(req: oa._Common) -> None:
    if req.n != 1:
        raise bad_request(f"only n=1 is supported, got n={req.n}", param="n")
    if req.logprobs:
        raise bad_request("logprobs are not supported", param="logprobs")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true",
                          param="stream_options")


class GenerationResponse:
    """ASGI response that runs one generation, streamed (SSE) or collected (JSON)."""

    def __init__(self, app: FrontendHttp, job: Job, *, chat: bool, stream: bool,
                 include_usage: bool) -> None:
        self.app = app
        self.job = job
        self.chat = chat
        self.stream = stream
        self.include_usage = include_usage

    async def __call__(self, scope, receive, send) -> None:
        task = asyncio.current_task()
        disconnected = False
        done = False

        async def watch_disconnect() -> None:
            nonlocal disconnected
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not done:  # a close after the last byte is no disconnect
                        disconnected = True
                        task.cancel()
                    return

        watcher = asyncio.create_task(watch_disconnect())
        metrics = self.app.metrics
        model = self.job.model
        metrics.inflight.labels(model).inc()
        status = "200"
        try:
            if self.stream:
                status = await self._stream(send)
            else:
                status = await self._collect(send)
            done = True
        except asyncio.CancelledError:
            if not disconnected:
                status = "cancelled"
                raise
            status = "disconnected"
            metrics.disconnects.labels(model).inc()
        finally:
            watcher.cancel()
            metrics.inflight.labels(model).dec()
            metrics.duration.labels(model).observe(time.perf_counter() - self.job.arrival)
            metrics.requests.labels(model, self.job.endpoint, status).inc()

    async def _send_error(self, send, err: ApiError) -> str:
        await send({"type": "http.response.start", "status": err.status, "headers": _JSON_HEADERS})
        await send({"type": "http.response.body", "body": oa.json_encode(err.body())})
        return str(err.status)

    async def _collect(self, send) -> str:
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
            return await self._send_error(send, err)
        finally:
            await gen.aclose()
        assert final is not None
        self.app.count_tokens(job.model, final)
        usage = oa.usage_dict(final.prompt_tokens, final.completion_tokens, final.cached_tokens)
        build = oa.chat_response if self.chat else oa.completion_response
        body = build(response_id=self.app.response_id(job, self.chat), model=job.model,
                     created=int(time.time()), text="".join(texts),
                     finish_reason=final.finish_reason, usage=usage)
        await send({"type": "http.response.start", "status": 200, "headers": _JSON_HEADERS})
        await send({"type": "http.response.body", "body": oa.json_encode(body)})
        return "200"

    async def _stream(self, send) -> str:
        job = self.job
        gen = self.app.pipeline.generate(job)
        try:
            try:
                first = await gen.__anext__()
            except ApiError as err:
                return await self._send_error(send, err)
            writer = oa.ChunkWriter(chat=self.chat, response_id=self.app.response_id(job, self.chat),
                                    model=job.model, created=int(time.time()))
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            item = first
            is_first = True
            try:
                while True:
                    if type(item) is Delta:
                        if item.text:
                            await send({"type": "http.response.body",
                                        "body": writer.text(item.text, is_first),
                                        "more_body": True})
                            is_first = False
                    else:
                        final: Final = item
                        self.app.count_tokens(job.model, final)
                        out = writer.finish(final.finish_reason, is_first)
                        if self.include_usage:
                            out += writer.usage(oa.usage_dict(final.prompt_tokens,
                                                              final.completion_tokens,
                                                              final.cached_tokens))
                        await send({"type": "http.response.body", "body": out + writer.DONE,
                                    "more_body": False})
                        return "200"
                    item = await gen.__anext__()
            except ApiError as err:
                # The status line is gone already: the error travels as an SSE event.
                await send({"type": "http.response.body",
                            "body": writer.error(err.body()) + writer.DONE, "more_body": False})
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
        routes = [
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
        ]
        self.app = Starlette(routes=routes, exception_handlers={
            ApiError: self._api_error, HTTPException: self._http_error,
            Exception: self._internal_error})

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

    @staticmethod
    def _request_id(request: Request) -> str:
        rid = request.headers.get("x-request-id", "")
        return rid if 0 < len(rid) <= 128 and rid.isascii() else uuid.uuid4().hex

    async def _api_error(self, request: Request, exc: ApiError) -> Response:
        endpoint = "chat" if request.url.path.endswith("chat/completions") else "completions"
        self.metrics.requests.labels("", endpoint, str(exc.status)).inc()
        return Response(oa.json_encode(exc.body()), status_code=exc.status,
                        media_type="application/json")

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        err = ApiError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}",
                       code="not_found" if exc.status_code == 404 else None)
        return Response(oa.json_encode(err.body()), status_code=exc.status_code,
                        media_type="application/json")

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        log.exception("request_failed", path=request.url.path)
        err = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
        return Response(oa.json_encode(err.body()), status_code=500, media_type="application/json")

    # -- endpoints ------------------------------------------------------------------------

    async def chat_completions(self, request: Request):
        arrival = time.perf_counter()
        self._authorize(request)
        req: oa.ChatCompletionRequest = _decode(oa.chat_decoder, await request.body())
        _check_unsupported(req)
        pipeline = self.pipeline
        entry = pipeline.model_entry(req.model)
        messages = oa.chat_messages(req)
        tok = await pipeline.tokenizer(entry)
        prompt_ids = await pipeline.tokenize_chat(tok, messages)
        stop_strings, stop_ids = oa.split_stop(req.stop)
        use_completion_param = req.max_completion_tokens is not None
        job = pipeline.make_job(
            entry=entry, endpoint="chat", request_id=self._request_id(request),
            prompt_ids=prompt_ids, tokenizer=tok,
            max_tokens=req.max_completion_tokens if use_completion_param else req.max_tokens,
            max_tokens_param="max_completion_tokens" if use_completion_param else "max_tokens",
            temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
            stop_strings=stop_strings, stop_token_ids=stop_ids + (req.stop_token_ids or []),
            ignore_eos=req.ignore_eos, min_tokens=req.min_tokens, arrival=arrival)
        return GenerationResponse(self, job, chat=True, stream=req.stream,
                                  include_usage=bool(req.stream_options and
                                                     req.stream_options.include_usage))

    async def completions(self, request: Request):
        arrival = time.perf_counter()
        self._authorize(request)
        req: oa.CompletionRequest = _decode(oa.completion_decoder, await request.body())
        _check_unsupported(req)
        if req.echo:
            raise bad_request("echo is not supported", param="echo")
        if req.suffix:
            raise bad_request("suffix is not supported", param="suffix")
        pipeline = self.pipeline
        entry = pipeline.model_entry(req.model)
        tok = await pipeline.tokenizer(entry)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise bad_request("batched prompts are not supported: send one prompt per request",
                                  param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = await pipeline.tokenize_text(tok, prompt)
        else:
            if not all(type(t) is int for t in prompt):
                raise bad_request("prompt must be a string, a list of token ids, or a list with "
                                  "one string or one list of token ids", param="prompt")
            prompt_ids = list(prompt)
            if any(t < 0 or t >= tok.vocab_size for t in prompt_ids):
                raise bad_request(f"prompt token ids must be in [0, {tok.vocab_size})", param="prompt")
        stop_strings, stop_ids = oa.split_stop(req.stop)
        job = pipeline.make_job(
            entry=entry, endpoint="completions", request_id=self._request_id(request),
            prompt_ids=prompt_ids, tokenizer=tok, max_tokens=req.max_tokens if req.max_tokens is not None else 16,
            temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
            stop_strings=stop_strings, stop_token_ids=stop_ids + (req.stop_token_ids or []),
            ignore_eos=req.ignore_eos, min_tokens=req.min_tokens, arrival=arrival)
        return GenerationResponse(self, job, chat=False, stream=req.stream,
                                  include_usage=bool(req.stream_options and
                                                     req.stream_options.include_usage))

    def _model_object(self, entry) -> dict:
        return {"id": entry.name, "object": "model", "created": entry.created,
                "owned_by": "genset", "max_model_len": entry.context_length,
                "workers": len(entry.cards)}

    async def list_models(self, request: Request) -> Response:
        self._authorize(request)
        data = [self._model_object(e) for e in sorted(self.pipeline.registry.models.values(),
                                                       key=lambda e: e.name)]
        return Response(oa.json_encode({"object": "list", "data": data}),
                        media_type="application/json")

    async def get_model(self, request: Request) -> Response:
        self._authorize(request)
        entry = self.pipeline.model_entry(request.path_params["model"])
        return Response(oa.json_encode(self._model_object(entry)), media_type="application/json")

    async def health(self, request: Request) -> Response:
        body = self._health()
        return JSONResponse(body, status_code=200 if body.get("status") == "ok" else 503)

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(self._metrics_text(), media_type=CONTENT_TYPE_LATEST)


def metrics_text(*registries) -> bytes:
    return b"".join(generate_latest(r) for r in registries)
