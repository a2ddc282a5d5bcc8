"""NATS-native client: generate and chat through a genset frontend, no HTTP involved.

```python
from genset.client import Client

async with Client("nats://127.0.0.1:4222", namespace="default") as client:
    async for chunk in client.chat([{"role": "user", "content": "Hello!"}], max_tokens=32):
        print(chunk.text, end="", flush=True)
        if chunk.usage:                      # the last chunk
            print("\n", chunk.finish_reason, chunk.usage)
    text = await client.complete("Once upon a time", max_tokens=16)   # collected
```

Requests go to `proto.subjects.frontend_generate(ns)` as `proto.client.ClientGenerateRequest`
(frontends answer in a queue group); the reply is a stream of `proto.StreamChunk`s whose
`data` holds the text (`proto.client.ClientDelta`). Leaving the `async for` early cancels the
generation on the frontend and on the worker.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import msgspec

import proto
from genset.runtime.bus import Bus
from genset.runtime.bus_errors import NoResponders, PeerGone, StreamError
from proto import subjects
from proto.client import ChatMessage, ClientDelta, ClientGenerateRequest
from proto.tokens import pack_tokens, unpack_tokens

_decode_delta = msgspec.msgpack.Decoder(ClientDelta).decode


class ClientError(Exception):
    """A request the frontend (or a worker behind it) refused or failed; `code` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(slots=True)
class Chunk:
    """Text and token ids generated since the previous chunk; the last chunk has
    `finish_reason` (a `proto.FinishReason`: stop | length | cancelled; a failed stream
    raises instead) and `usage`."""

    text: str
    token_ids: list[int]
    finish_reason: proto.FinishReason | None = None
    usage: proto.Usage | None = None


class Client:
    def __init__(self, nats_url: str | list[str] = "nats://127.0.0.1:4222", *,
                 namespace: str = "default", model: str = "", timeout: float = 600.0,
                 heartbeat_timeout: float = 10.0, user: str | None = None,
                 password: str | None = None, token: str | None = None, bus: Bus | None = None) -> None:
        self.nats_url = nats_url
        self.namespace = namespace
        self.model = model
        self.timeout = timeout
        self.heartbeat_timeout = heartbeat_timeout
        self._auth = {"user": user, "password": password, "token": token}
        self.bus = bus
        self._own_bus = bus is None

    async def __aenter__(self) -> Client:
        if self.bus is None:
            self.bus = await Bus.connect(self.nats_url, name=f"genset-client-{uuid.uuid4().hex[:8]}",
                                         namespace=self.namespace, **self._auth)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self.bus is not None and self._own_bus:
            await self.bus.close()
            self.bus = None

    # -- requests --------------------------------------------------------------------------

    def chat(self, messages: Iterable[dict | ChatMessage], **options) -> AsyncIterator[Chunk]:
        """Stream a chat reply; `messages` as in OpenAI's API ({"role", "content"})."""
        msgs = [m if isinstance(m, ChatMessage) else ChatMessage(role=m["role"], content=m["content"])
                for m in messages]
        return self._stream(self._request(options, messages=msgs))

    def generate(self, prompt: str | None = None, *, token_ids: list[int] | None = None,
                 **options) -> AsyncIterator[Chunk]:
        """Stream a completion of `prompt` (text) or of `token_ids` (used as is)."""
        if (prompt is None) == (token_ids is None):
            raise ValueError("give exactly one of prompt or token_ids")
        packed = pack_tokens(token_ids) if token_ids is not None else None
        return self._stream(self._request(options, prompt=prompt, token_ids=packed))

    async def complete(self, prompt: str, **options) -> str:
        return "".join([c.text async for c in self.generate(prompt, **options)])

    def _request(self, options: dict, **content) -> ClientGenerateRequest:
        known = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                 "stop_token_ids", "ignore_eos", "detokenize", "timeout", "request_id"}
        unknown = set(options) - known
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
        stop = options.get("stop") or []
        sampling = proto.SamplingParams(
            temperature=options.get("temperature", 1.0), top_p=options.get("top_p", 1.0),
            top_k=options.get("top_k", 0), seed=options.get("seed"))
        return ClientGenerateRequest(
            request_id=options.get("request_id") or uuid.uuid4().hex,
            model=options.get("model", self.model), sampling=sampling,
            max_tokens=options.get("max_tokens"),
            stop=[stop] if isinstance(stop, str) else list(stop),
            stop_token_ids=list(options.get("stop_token_ids") or []),
            ignore_eos=bool(options.get("ignore_eos", False)),
            detokenize=bool(options.get("detokenize", True)),
            timeout_s=options.get("timeout", self.timeout), **content)

    async def _stream(self, request: ClientGenerateRequest) -> AsyncIterator[Chunk]:
        if self.bus is None:
            raise RuntimeError("Client is not connected: use `async with Client(...)`")
        subject = subjects.frontend_generate(self.namespace)
        for attempt in range(2):
            received = False
            try:
                stream = await self.bus.stream_request(
                    subject, request, timeout=(request.timeout_s or self.timeout) + 5.0,
                    heartbeat_timeout=self.heartbeat_timeout)
                async with stream:
                    async for frame in stream:
                        received = True
                        text = _decode_delta(frame.data).text if frame.data else ""
                        ids = unpack_tokens(frame.token_ids) if frame.token_ids else []
                        if frame.final:
                            yield Chunk(text, ids, frame.finish_reason or proto.FINISH_STOP, frame.usage)
                            return
                        yield Chunk(text, ids)
                return
            except (NoResponders, PeerGone) as exc:
                # No frontend answered (or it died before answering): one retry reaches another.
                if received or attempt == 1:
                    code = exc.error.code
                    message = (f"no frontend is serving {subject}" if code == "no_responders"
                               else exc.error.message)
                    raise ClientError(code, message) from None
            except StreamError as exc:
                raise ClientError(exc.error.code, exc.error.message) from None
