"""The OpenAPI 3.1 description of the frontend's HTTP API, served at /openapi.json.

Request schemas come from the msgspec Structs that decode the requests
(`services.frontend.openai_api`), so the documented ranges are the enforced ones. Response
shapes are built as dicts on the hot path; the Structs below describe them for the document
only, and tests/test_openai_conformance.py validates live responses against them, so the two
cannot drift apart unnoticed. Schema-driven fuzzers and client generators start here.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from services.frontend import openai_api as oa

FinishReason = Literal["stop", "length", "cancelled", "error"]


class PromptTokensDetails(msgspec.Struct, kw_only=True):
    cached_tokens: int


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct, kw_only=True):
    content: list[TokenLogprob] | None


class AssistantMessage(msgspec.Struct, kw_only=True):
    role: Literal["assistant"]
    content: str


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(msgspec.Struct, kw_only=True):
    role: Literal["assistant"] | msgspec.UnsetType = msgspec.UNSET
    content: str | msgspec.UnsetType = msgspec.UNSET


class ChatChunkChoice(msgspec.Struct, kw_only=True):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    """One SSE event of a streamed chat completion (`data: {...}`; the stream ends with
    `data: [DONE]`). The last event before [DONE] carries `usage` (and no choices) when
    `stream_options.include_usage` is set."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | msgspec.UnsetType = msgspec.UNSET


class CompletionLogprobs(msgspec.Struct, kw_only=True):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct, kw_only=True):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason


class Completion(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunkChoice(msgspec.Struct, kw_only=True):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class CompletionChunk(msgspec.Struct, kw_only=True):
    """One SSE event of a streamed completion (as for chat: `data: [DONE]` ends it)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | msgspec.UnsetType = msgspec.UNSET


class Model(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int  # the smallest context length among the model's workers
    workers: int  # workers serving it now


class ModelList(msgspec.Struct, kw_only=True):
    object: Literal["list"]
    data: list[Model]


class ErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None  # the request field at fault, e.g. "temperature", "messages[0].role"
    code: str | None


class ErrorResponse(msgspec.Struct, kw_only=True):
    error: ErrorDetail


class DashboardWorker(msgspec.Struct, kw_only=True):
    id: str
    model: str
    role: str
    engine: str
    kv_blocks: int
    kv_used_blocks: int | None
    kv_use: float | None
    running: int | None
    waiting: int | None
    step_ms: float | None
    report_age_s: float | None
    routed: int
    hit_rate: float | None


class DashboardState(msgspec.Struct, kw_only=True):
    """What the dashboard page shows (polled about once a second)."""

    ts_ms: int
    namespace: str
    models: list[str]
    workers: list[DashboardWorker]
    pools: dict[str, int]
    series: dict[str, list[float | None]]
    decisions: list[dict[str, Any]]
    planner: dict[str, Any] | None
    offload: list[dict[str, Any]]
    totals: dict[str, float | None]


_SCHEMA_TYPES = (oa.ChatCompletionRequest, oa.CompletionRequest, ChatCompletion,
                 ChatCompletionChunk, Completion, CompletionChunk, Model, ModelList,
                 ErrorResponse, DashboardState)
_REF = "#/components/schemas/{name}"


def _ref(name: str) -> dict:
    return {"$ref": _REF.format(name=name)}


def _json(name: str, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _errors(*statuses: int) -> dict:
    words = {400: "invalid request: `error.param` names the field", 401: "missing or wrong API key",
             404: "unknown model or path", 405: "wrong method", 413: "body too large",
             499: "the client went away", 503: "no worker could serve it (overloaded, none up)",
             504: "the request's deadline passed"}
    return {str(s): _json("ErrorResponse", words[s]) for s in statuses}


def build() -> dict:
    """The OpenAPI document (a dict, JSON-ready)."""
    _, components = msgspec.json.schema_components(_SCHEMA_TYPES, ref_template=_REF)
    secured = [{"bearer": []}, {}]  # a key is needed only when the frontend has --api-key

    def generation(request: str, response: str, chunk: str, summary: str) -> dict:
        return {"post": {
            "summary": summary,
            "security": secured,
            "requestBody": {"required": True,
                            "content": {"application/json": {"schema": _ref(request)}}},
            "responses": {
                "200": {"description": f"a {response} (JSON), or with `stream: true` server-sent "
                                       f"events, each `data: <{chunk}>`, ended by `data: [DONE]`",
                        "content": {"application/json": {"schema": _ref(response)},
                                    "text/event-stream": {"schema": {"type": "string"},
                                                          "x-event-schema": _ref(chunk)}}},
                **_errors(400, 401, 404, 413, 503, 504)}}}

    text = {"content": {"text/plain": {"schema": {"type": "string"}}}}
    html = {"content": {"text/html": {"schema": {"type": "string"}}}}
    paths = {
        "/v1/chat/completions": generation("ChatCompletionRequest", "ChatCompletion",
                                           "ChatCompletionChunk", "Chat completion"),
        "/v1/completions": generation("CompletionRequest", "Completion", "CompletionChunk",
                                      "Text completion"),
        "/v1/models": {"get": {"summary": "Models served now (a model is listed while at "
                                          "least one worker serves it)",
                               "security": secured,
                               "responses": {"200": _json("ModelList", "the models"),
                                             **_errors(401)}}},
        "/v1/models/{model}": {"get": {
            "summary": "One model",
            "security": secured,
            "parameters": [{"name": "model", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "responses": {"200": _json("Model", "the model"), **_errors(401, 404)}}},
        "/health": {"get": {"summary": "Liveness and readiness (no key needed)",
                            "responses": {
                                "200": {"description": "serving",
                                        "content": {"application/json": {
                                            "schema": {"type": "object"}}}},
                                "503": {"description": "not ready (NATS or etcd unreachable)",
                                        "content": {"application/json": {
                                            "schema": {"type": "object"}}}}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "security": secured,
                             "responses": {"200": {"description": "Prometheus text format",
                                                   **text}, **_errors(401)}}},
        "/openapi.json": {"get": {"summary": "This document (no key needed)",
                                  "responses": {"200": {
                                      "description": "OpenAPI 3.1",
                                      "content": {"application/json": {
                                          "schema": {"type": "object"}}}}}}},
        "/": {"get": {"summary": "Redirects to /dashboard",
                      "responses": {"307": {"description": "to /dashboard"}}}},
        "/dashboard": {"get": {"summary": "The live status page (static HTML; it polls "
                                          "/dashboard/state)",
                               "responses": {"200": {"description": "the page", **html}}}},
        "/dashboard/{file}": {"get": {
            "summary": "The page's script and style sheet",
            "parameters": [{"name": "file", "in": "path", "required": True,
                            "schema": {"type": "string", "enum": ["app.js", "app.css"]}}],
            "responses": {"200": {"description": "the file",
                                  "content": {"text/javascript": {"schema": {"type": "string"}},
                                              "text/css": {"schema": {"type": "string"}}}},
                          **_errors(404)}}},
        "/dashboard/state": {"get": {"summary": "What the status page shows: workers, traffic "
                                                "series, router decisions, planner targets, "
                                                "offload stores",
                                     "security": secured,
                                     "responses": {"200": _json("DashboardState", "the state"),
                                                   **_errors(401)}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "genset", "version": "1",
                 "description": "OpenAI-compatible serving over a fleet of workers. Every "
                                "request field either works or is refused with a 400 naming "
                                "it (docs/openai.md)."},
        "paths": paths,
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def document_bytes() -> bytes:
    return oa.json_encode(build())
