"""OpenAI request bodies as msgspec Structs (decoding validates them) and the response shapes.

Every field OpenAI defines for `/v1/chat/completions` and `/v1/completions` is declared here,
and each one either works or is refused with a 400 that names it (`param`): ranges are
`msgspec.Meta` bounds (checked while decoding, and published in /openapi.json from the same
types), and fields genset cannot honour (tools, response formats, audio, ...) are refused by
`check_chat` / `check_completion` unless they carry their neutral value. The decision for each
field is in docs/openai.md. Unknown fields are still ignored, as before: clients and SDKs send
extensions of other servers, and refusing a field this version has never heard of would break
them on every OpenAI API addition. Known fields with the wrong type fail with msgspec's
message, which names the field (`... - at `$.max_tokens``).

Streaming chunks are assembled from pre-encoded byte prefixes: per token, only the text is
JSON-encoded.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from services.frontend.errors import ApiError, bad_request

# -- bounds (OpenAI's documented ranges unless said otherwise) -------------------------------

MAX_N = 128  # choices per request (OpenAI's bound); each one is a sequence on the worker
MAX_STOP = 16  # stop sequences (OpenAI allows 4; more cost nothing measurable here)
MAX_LOGIT_BIAS = 300  # entries (the wire's bound, proto.generate.MAX_LOGIT_BIAS on w-sampling)
MAX_TOP_LOGPROBS = 20  # chat: alternatives per token
MAX_COMPLETION_LOGPROBS = 5  # completions: OpenAI's bound for `logprobs`
MAX_USER_CHARS = 256  # `user` / `safety_identifier`: they go into log lines

Temperature = Annotated[float, Meta(ge=0.0, le=2.0, description="0 = greedy")]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
# Values past 2 already make a seen token all but impossible; the bound keeps inf out and gives
# clients a documented range (vLLM / Hugging Face semantics: 1 = off, > 1 discourages repeats).
RepetitionPenalty = Annotated[float, Meta(gt=0.0, le=10.0, description="extension; 1 = off")]
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
N = Annotated[int, Meta(ge=1, le=MAX_N)]
Stop = str | Annotated[list[str | int], Meta(max_length=MAX_STOP)] | None
LogitBias = Annotated[dict[str, Annotated[float, Meta(ge=-100.0, le=100.0)]],
                      Meta(max_length=MAX_LOGIT_BIAS,
                           description="token id (decimal string) -> bias in [-100, 100]")]
UserId = Annotated[str, Meta(max_length=MAX_USER_CHARS)]


def _refused(what: str) -> Any:
    """A field genset refuses (400 naming it) unless it has its neutral value."""
    return Annotated[Any, Meta(description=f"not supported: 400 unless {what}")]


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: _refused("absent or empty") = None
    tool_call_id: _refused("absent") = None
    function_call: _refused("absent") = None
    audio: _refused("absent") = None
    refusal: _refused("absent") = None


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False
    # OpenAI pads streamed events against length side channels; genset does not (accepted,
    # no effect either way: a client never depends on the padding).
    include_obfuscation: bool | None = None


class ResponseFormat(msgspec.Struct, kw_only=True):
    type: str
    json_schema: Any = None


class _Common(msgspec.Struct, kw_only=True):
    """Fields both endpoints share (OpenAI's definitions, plus marked extensions)."""

    model: str
    max_tokens: int | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: N = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: LogitBias | None = None
    seed: Seed | None = None
    user: UserId | None = None
    # extensions (vLLM / Dynamo / TGI spellings)
    top_k: Annotated[int, Meta(ge=-1, description="extension; 0 or -1 = off")] | None = None
    min_tokens: Annotated[int, Meta(ge=0, description="extension")] = 0
    repetition_penalty: RepetitionPenalty | None = None
    stop_token_ids: Annotated[list[int], Meta(max_length=256)] | None = None
    ignore_eos: bool = False
    # extensions of other servers that change the output: refused, never silently ignored
    min_p: _refused("0") = None
    use_beam_search: _refused("false") = None
    length_penalty: _refused("absent") = None
    prompt_logprobs: _refused("absent") = None
    include_stop_str_in_output: _refused("false") = None
    guided_json: _refused("absent") = None
    guided_regex: _refused("absent") = None
    guided_choice: _refused("absent") = None
    guided_grammar: _refused("absent") = None


class ChatCompletionRequest(_Common, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    # accepted (nothing to do, or passed to the logs)
    metadata: Annotated[dict[str, Annotated[str, Meta(max_length=512)]],
                        Meta(max_length=16)] | None = None
    store: Annotated[bool, Meta(description="false only: nothing is stored")] | None = None
    service_tier: Annotated[str, Meta(description="auto or default only")] | None = None
    modalities: Annotated[list[str], Meta(description='["text"] only')] | None = None
    safety_identifier: UserId | None = None
    prompt_cache_key: Annotated[str, Meta(
        max_length=1024, description="accepted; prefix caching is automatic")] | None = None
    parallel_tool_calls: Annotated[bool, Meta(description="false only (no tools)")] | None = None
    # refused
    tools: _refused("absent or empty") = None
    tool_choice: _refused('absent or "none"') = None
    functions: _refused("absent or empty") = None
    function_call: _refused('absent or "none"') = None
    response_format: ResponseFormat | None = None
    audio: _refused("absent") = None
    prediction: _refused("absent") = None
    reasoning_effort: _refused("absent") = None
    verbosity: _refused("absent") = None
    web_search_options: _refused("absent") = None
    chat_template: _refused("absent") = None  # extension: a client-supplied template
    chat_template_kwargs: _refused("absent") = None


class CompletionRequest(_Common, kw_only=True):
    # str, [str], [int] or [[int]]; the shape is checked by the endpoint (msgspec allows one
    # array type per union).
    prompt: str | list[str | int | list[int]]
    echo: bool = False
    logprobs: Annotated[int, Meta(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    best_of: Annotated[int, Meta(ge=1, le=MAX_N, description="must equal n")] | None = None
    suffix: _refused("absent or empty") = None


chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
completion_decoder = msgspec.json.Decoder(CompletionRequest)
json_encode = msgspec.json.Encoder().encode


def non_finite_number(body: bytes) -> ApiError | None:
    """The 400 for a body that writes a number as NaN, Infinity or -Infinity, naming its field.

    Those literals are not JSON, but Python's `json.dumps` writes them for float('nan') and
    float('inf'): msgspec refuses such a body as malformed at a byte offset, which names no
    field. Called on that error path only: Python's json (which reads the literals) finds
    where they are. None: the body is malformed for another reason.
    """
    if b"NaN" not in body and b"Infinity" not in body:
        return None
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):  # malformed for some other reason too
        return None
    todo: list[tuple[Any, str]] = [(obj, "")]
    while todo:
        value, path = todo.pop()
        if isinstance(value, float) and not math.isfinite(value):
            literal = "NaN" if value != value else "Infinity" if value > 0 else "-Infinity"
            # a map's value (key not a field name, e.g. logit_bias's token ids): name the map,
            # as msgspec's `[...]` paths are named
            param = path.split("[...]", 1)[0].removeprefix(".") or None
            what = (param or "the body") if "[...]" not in path else f"each value of {param}"
            return bad_request(f"{what} must be a finite number, got {literal} (NaN and "
                               f"Infinity are not JSON) - at `${path}`", param=param)
        if isinstance(value, dict):
            todo.extend((v, f"{path}.{k}" if k.isidentifier() else f"{path}[...]")
                        for k, v in reversed(value.items()))
        elif isinstance(value, list):
            todo.extend((v, f"{path}[{i}]") for i, v in reversed(list(enumerate(value))))
    return None


# -- what is refused -------------------------------------------------------------------------


def _not_supported(param: str, what: str) -> ApiError:
    return bad_request(f"{param} is not supported: {what}", param=param,
                       code="unsupported_parameter")


def _check_common(req: _Common) -> None:
    for name, ok in (("min_p", lambda v: v == 0),
                     ("use_beam_search", lambda v: v is False),
                     ("include_stop_str_in_output", lambda v: v is False)):
        value = getattr(req, name)
        if value is not None and not ok(value):
            raise _not_supported(name, "genset does not implement this sampling extension")
    for name in ("length_penalty", "prompt_logprobs", "guided_json", "guided_regex",
                 "guided_choice", "guided_grammar"):
        if getattr(req, name) is not None:
            raise _not_supported(name, "genset does not implement this extension")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true",
                          param="stream_options")
    if req.logit_bias:
        for key in req.logit_bias:
            if not (key.isascii() and key.isdigit() and len(key) <= 10):
                raise bad_request(f"logit_bias keys must be token ids (decimal strings), got "
                                  f"{key!r}", param="logit_bias")
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty"):
        value = getattr(req, name)
        if value is not None and not math.isfinite(value):
            raise bad_request(f"{name} must be a finite number", param=name)


def check_chat(req: ChatCompletionRequest) -> None:
    """Refuse (400 naming the field) what a chat request asks for that genset cannot do."""
    _check_common(req)
    if req.tools:
        raise _not_supported("tools", "genset generates plain text (no tool calling)")
    if req.tool_choice not in (None, "none"):
        raise _not_supported("tool_choice", "genset generates plain text (no tool calling)")
    if req.functions:
        raise _not_supported("functions", "genset generates plain text (no function calling)")
    if req.function_call not in (None, "none"):
        raise _not_supported("function_call", "genset generates plain text "
                                              "(no function calling)")
    if req.parallel_tool_calls:
        raise _not_supported("parallel_tool_calls", "genset has no tool calling")
    if req.response_format is not None and req.response_format.type != "text":
        raise _not_supported("response_format", f"only {{\"type\": \"text\"}} is supported, got "
                                                 f"type {req.response_format.type!r}")
    for name, why in (("audio", "genset generates text only"),
                      ("prediction", "predicted outputs are not implemented"),
                      ("reasoning_effort", "genset serves no reasoning models"),
                      ("verbosity", "genset serves no reasoning models"),
                      ("web_search_options", "genset has no web search"),
                      ("chat_template", "the model's own chat template is always used"),
                      ("chat_template_kwargs", "the model's own chat template is always used")):
        if getattr(req, name) is not None:
            raise _not_supported(name, why)
    if req.modalities is not None and req.modalities != ["text"]:
        raise _not_supported("modalities", 'genset generates text only (["text"])')
    if req.store:
        raise _not_supported("store", "genset stores no completions")
    if req.service_tier not in (None, "auto", "default"):
        raise _not_supported("service_tier", "only auto and default exist here")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
    for i, m in enumerate(req.messages):
        if m.role in ("tool", "function"):
            raise _not_supported(f"messages[{i}].role",
                                 f"role {m.role!r} needs tool calling, which genset does not do")
        for name in ("tool_calls", "tool_call_id", "function_call", "audio", "refusal"):
            value = getattr(m, name)
            if value is not None and value != []:
                raise _not_supported(f"messages[{i}].{name}",
                                     "genset generates plain text (no tools, no audio)")
        if m.content is None and m.role != "assistant":
            raise bad_request(f"messages[{i}].content is required for role {m.role!r}",
                              param=f"messages[{i}].content")


def check_completion(req: CompletionRequest) -> None:
    """Refuse (400 naming the field) what a completions request asks for that genset cannot
    do."""
    _check_common(req)
    if req.suffix:
        raise _not_supported("suffix", "genset does not fill in the middle")
    if req.best_of is not None and req.best_of != req.n:
        raise _not_supported("best_of", f"best_of must equal n ({req.n}): genset returns every "
                                        "choice it generates, it does not rank them")


def chat_logprobs_count(req: ChatCompletionRequest) -> int | None:
    """Alternatives per token the request asks for (None: no logprobs)."""
    return (req.top_logprobs or 0) if req.logprobs else None


def chat_messages(req: ChatCompletionRequest) -> list[dict]:
    """Messages as the chat template sees them (content parts joined into one text)."""
    out = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise bad_request(
                        f"only text content parts are supported (got type {part.type!r})",
                        param=f"messages[{i}].content[{j}]")
                texts.append(part.text)
            content = "".join(texts)
        # "developer" is OpenAI's newer name for the system role; templates know "system".
        role = "system" if m.role == "developer" else m.role
        msg = {"role": role, "content": content or ""}
        if m.name is not None:
            msg["name"] = m.name
        out.append(msg)
    return out


def split_stop(stop: str | list[str | int] | None) -> tuple[list[str], list[int]]:
    """OpenAI's `stop` (a string or a list) -> (stop strings, stop token ids)."""
    if stop is None:
        return [], []
    if isinstance(stop, str):
        return ([stop] if stop else []), []
    strings = [s for s in stop if isinstance(s, str) and s]
    ids = [s for s in stop if isinstance(s, int)]
    return strings, ids


# -- logprobs in OpenAI's shapes ---------------------------------------------------------------
# Per token: (chosen id, its logprob, [(alternative id, logprob), ...] most likely first).
# The frontend hands these in once the worker's frames carry them (see http_app: LOGPROBS
# MAPPING POINT).

TokenLogprob = tuple[int, float, list[tuple[int, float]]]


def _token_text(tokenizer, tid: int) -> str:
    return tokenizer.decode([tid], skip_special_tokens=False)


def chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> dict:
    """`choices[i].logprobs` of a chat completion: {"content": [{token, logprob, bytes,
    top_logprobs: [{token, logprob, bytes}]}]}."""
    content = []
    for tid, lp, tops in entries:
        text = _token_text(tokenizer, tid)
        alts = []
        for aid, alp in tops:
            atext = _token_text(tokenizer, aid)
            alts.append({"token": atext, "logprob": alp, "bytes": list(atext.encode())})
        content.append({"token": text, "logprob": lp, "bytes": list(text.encode()),
                        "top_logprobs": alts})
    return {"content": content}


def completion_logprobs(tokenizer, entries: list[TokenLogprob], text_offset: int = 0) -> dict:
    """`choices[i].logprobs` of a completion: {tokens, token_logprobs, top_logprobs (one
    {token: logprob} map per token), text_offset}."""
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = text_offset
    for tid, lp, alts in entries:
        text = _token_text(tokenizer, tid)
        tokens.append(text)
        token_lps.append(lp)
        tops.append({_token_text(tokenizer, aid): alp for aid, alp in alts})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


# -- responses ---------------------------------------------------------------------------------


class ChunkWriter:
    """SSE frames of one streamed response; per token only the text is JSON-encoded.

    With n > 1 choices every frame names its choice's `index`; a chat choice's first frame
    carries `role`."""

    __slots__ = ("_heads", "_heads_first", "_tail", "chat", "created", "model", "response_id")

    def __init__(self, *, chat: bool, response_id: str, model: str, created: int) -> None:
        self.chat = chat
        self.response_id = response_id
        self.model = model
        self.created = created
        self._heads: dict[int, bytes] = {}
        self._heads_first: dict[int, bytes] = {}
        self._tail = (b'},"logprobs":null,"finish_reason":null}]}\n\n' if chat
                      else b',"logprobs":null,"finish_reason":null}]}\n\n')
        self._build(0)

    def _build(self, index: int) -> None:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        base = (b'data: {"id":' + json_encode(self.response_id) + b',"object":"' + obj.encode()
                + b'","created":' + str(self.created).encode() + b',"model":'
                + json_encode(self.model) + b',"choices":[{"index":' + str(index).encode()
                + b",")
        if self.chat:
            self._heads_first[index] = base + b'"delta":{"role":"assistant","content":'
            self._heads[index] = base + b'"delta":{"content":'
        else:
            self._heads_first[index] = self._heads[index] = base + b'"text":'

    def text(self, text: str, first: bool = False, index: int = 0) -> bytes:
        if index not in self._heads:
            self._build(index)
        head = self._heads_first[index] if first else self._heads[index]
        return head + json_encode(text) + self._tail

    def text_with_logprobs(self, text: str, logprobs: dict, first: bool = False,
                           index: int = 0) -> bytes:
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": logprobs,
                      "finish_reason": None}
        else:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}
        return self._envelope([choice])

    def _envelope(self, choices: list, usage: dict | None = None) -> bytes:
        body = {"id": self.response_id,
                "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return b"data: " + json_encode(body) + b"\n\n"

    def finish(self, finish_reason: str, first: bool = False, index: int = 0) -> bytes:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else {}
            choice = {"index": index, "delta": delta, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": "", "logprobs": None,
                      "finish_reason": finish_reason}
        return self._envelope([choice])

    def usage(self, usage: dict) -> bytes:
        return self._envelope([], usage)

    @staticmethod
    def error(body: dict) -> bytes:
        return b"data: " + json_encode(body) + b"\n\n"

    DONE = b"data: [DONE]\n\n"


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def chat_choice(index: int, text: str, finish_reason: str, logprobs: dict | None = None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text},
            "logprobs": logprobs, "finish_reason": finish_reason}


def completion_choice(index: int, text: str, finish_reason: str,
                      logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_response(*, response_id: str, model: str, created: int, choices: list[dict],
                  usage: dict) -> dict:
    return {"id": response_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage}


def completion_response(*, response_id: str, model: str, created: int, choices: list[dict],
                        usage: dict) -> dict:
    return {"id": response_id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage}
