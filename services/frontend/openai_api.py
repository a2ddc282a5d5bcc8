"""OpenAI request bodies as msgspec Structs (decoding validates them) and the response shapes.

Unknown fields are ignored (clients send many we do not use); known fields with the wrong
type fail with msgspec's message, which names the field (`... - at `$.max_tokens``).
Streaming chunks are assembled from pre-encoded byte prefixes: per token, only the text is
JSON-encoded.
"""

from __future__ import annotations

import msgspec

from services.frontend.errors import bad_request


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class _Common(msgspec.Struct, kw_only=True):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str | int] | None = None
    stop_token_ids: list[int] | None = None  # extension (vLLM/Dynamo)
    ignore_eos: bool = False  # extension (vLLM/Dynamo)
    min_tokens: int = 0  # extension
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None
    user: str | None = None


class ChatCompletionRequest(_Common, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None


class CompletionRequest(_Common, kw_only=True):
    # str, [str], [int] or [[int]]; the shape is checked by the endpoint (msgspec allows one
    # array type per union).
    prompt: str | list[str | int | list[int]]
    echo: bool = False
    suffix: str | None = None


chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
completion_decoder = msgspec.json.Decoder(CompletionRequest)
json_encode = msgspec.json.Encoder().encode


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
        msg = {"role": m.role, "content": content or ""}
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


class ChunkWriter:
    """SSE frames of one streamed response; per token only the text is JSON-encoded."""

    __slots__ = ("_head", "_head_first", "_tail", "chat", "created", "model", "response_id")

    def __init__(self, *, chat: bool, response_id: str, model: str, created: int) -> None:
        self.chat = chat
        self.response_id = response_id
        self.model = model
        self.created = created
        obj = "chat.completion.chunk" if chat else "text_completion"
        base = (b'data: {"id":' + json_encode(response_id) + b',"object":"' + obj.encode()
                + b'","created":' + str(created).encode() + b',"model":' + json_encode(model)
                + b',"choices":[{"index":0,')
        if chat:
            self._head_first = base + b'"delta":{"role":"assistant","content":'
            self._head = base + b'"delta":{"content":'
            self._tail = b'},"logprobs":null,"finish_reason":null}]}\n\n'
        else:
            self._head_first = self._head = base + b'"text":'
            self._tail = b',"logprobs":null,"finish_reason":null}]}\n\n'

    def text(self, text: str, first: bool = False) -> bytes:
        return (self._head_first if first else self._head) + json_encode(text) + self._tail

    def _envelope(self, choices: list, usage: dict | None = None) -> bytes:
        body = {"id": self.response_id,
                "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return b"data: " + json_encode(body) + b"\n\n"

    def finish(self, finish_reason: str, first: bool = False) -> bytes:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else {}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason}
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


def chat_response(*, response_id: str, model: str, created: int, text: str,
                  finish_reason: str, usage: dict) -> dict:
    return {"id": response_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage}


def completion_response(*, response_id: str, model: str, created: int, text: str,
                        finish_reason: str, usage: dict) -> dict:
    return {"id": response_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage}
