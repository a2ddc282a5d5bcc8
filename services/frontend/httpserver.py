"""A small HTTP/1.1 server on asyncio protocols, built for token streaming.

Why not uvicorn + h11: with a pure-Python HTTP stack every streamed token costs an h11 event,
a state-machine step and two ASGI middleware hops (~20-30 us of CPU); over 64 tokens that was
the frontend's largest cost. Here a streamed SSE event is one `transport.write` of a chunked
frame. The server also knows when a client goes away (`connection_lost`) without a reader
task per request: the request's task is cancelled, which cancels its generation.

Scope: what OpenAI clients, curl, load generators and Prometheus use — keep-alive,
Content-Length request bodies, `Expect: 100-continue`, chunked responses, HTTP/1.0 with
close. Chunked request bodies get 411; heads over 64 KiB get 431; bodies over `max_body`
get 413. Requests on one connection are served one after the other.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger("frontend.httpserver")

REASONS = {100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized",
           404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
           411: "Length Required", 413: "Payload Too Large", 429: "Too Many Requests",
           431: "Request Header Fields Too Large", 499: "Client Closed Request",
           500: "Internal Server Error", 503: "Service Unavailable", 504: "Gateway Timeout"}
_MAX_HEAD = 64 * 1024


class Request:
    __slots__ = ("body", "conn", "headers", "method", "path", "query", "version")

    def __init__(self, conn: HttpConnection, method: str, path: str, query: str, version: str,
                 headers: dict[str, str], body: bytes) -> None:
        self.conn = conn
        self.method = method
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers
        self.body = body


Handler = Callable[[Request], Awaitable[None]]


class HttpConnection(asyncio.Protocol):
    """One client connection. The handler answers through `respond` or `start_stream` /
    `write` / `end_stream`; exactly one response per request."""

    __slots__ = ("_buf", "_continued", "_drain_waiter", "_idle_handle", "_keep_alive", "_paused",
                 "_server", "_stream_chunked", "_task", "closed", "transport")

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._task: asyncio.Task | None = None
        self._paused = False
        self._drain_waiter: asyncio.Future | None = None
        self._keep_alive = True
        self._stream_chunked = True
        self._idle_handle: asyncio.TimerHandle | None = None
        self._continued = False
        self.closed = False

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._server.connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._server.connections.discard(self)
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client went away: stop its work
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._task is None:
            self._next_request()
        elif len(self._buf) > self._server.max_body + _MAX_HEAD:
            # A pipelining client far ahead of us: stop reading until this request is done.
            self.transport.pause_reading()

    # -- request parsing ------------------------------------------------------------------

    def _arm_idle(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        self._idle_handle = asyncio.get_running_loop().call_later(
            self._server.keepalive_timeout, self._idle_timeout)

    def _idle_timeout(self) -> None:
        self._idle_handle = None
        if self._task is None and not self.closed:
            self.transport.close()

    def _fail_early(self, status: int, message: str) -> None:
        body = self._server.error_body(status, message)
        self._keep_alive = False
        self._write_head(status, [(b"content-type", b"application/json")], len(body))
        self.transport.write(body)
        self.transport.close()

    def _next_request(self) -> None:
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _MAX_HEAD:
                self._fail_early(431, "request head too large")
            return
        if end > _MAX_HEAD:
            self._fail_early(431, "request head too large")
            return
        try:
            head = bytes(buf[:end]).decode("latin-1")
            lines = head.split("\r\n")
            method, target, version = lines[0].split(" ", 2)
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        except ValueError:
            self._fail_early(400, "malformed HTTP request head")
            return
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            self._fail_early(400, f"unsupported HTTP version {version!r}")
            return
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._fail_early(411, "chunked request bodies are not supported; send Content-Length")
            return
        try:
            length = int(headers.get("content-length", "0"))
            if length < 0:
                raise ValueError
        except ValueError:
            self._fail_early(400, "invalid Content-Length")
            return
        if length > self._server.max_body:
            self._fail_early(413, f"request body over {self._server.max_body} bytes")
            return
        start = end + 4
        if len(buf) - start < length:
            if headers.get("expect", "").lower() == "100-continue" and not self._continued:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                self._continued = True
            return  # wait for the rest of the body
        self._continued = False
        body = bytes(buf[start:start + length])
        del buf[:start + length]
        conn_hdr = headers.get("connection", "").lower()
        self._keep_alive = ("close" not in conn_hdr) if version == "HTTP/1.1" else ("keep-alive" in conn_hdr)
        self._stream_chunked = version == "HTTP/1.1"
        path, _, query = target.partition("?")
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        request = Request(self, method, path, query, version, headers, body)
        self._task = asyncio.ensure_future(self._run(request))

    async def _run(self, request: Request) -> None:
        try:
            await self._server.handler(request)
        except asyncio.CancelledError:
            if not self.closed:
                raise
        except Exception:
            log.exception("http handler failed", path=request.path)
            if not self.closed:
                self.transport.close()
        finally:
            self._task = None
            self._server.request_done()
        if self.closed:
            return
        if not self._keep_alive or self._server.closing:
            self.transport.close()
            return
        self.transport.resume_reading()
        self._arm_idle()
        if self._buf:
            self._next_request()

    # -- responses ------------------------------------------------------------------------

    def _write_head(self, status: int, headers: list[tuple[bytes, bytes]], length: int | None) -> None:
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, "Unknown").encode())]
        for name, value in headers:
            parts.append(name + b": " + value + b"\r\n")
        if length is not None:
            parts.append(b"content-length: %d\r\n" % length)
        elif self._stream_chunked:
            parts.append(b"transfer-encoding: chunked\r\n")
        else:
            self._keep_alive = False
        if not self._keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        self.transport.write(b"".join(parts))

    def respond(self, status: int, body: bytes, content_type: bytes = b"application/json",
                headers: list[tuple[bytes, bytes]] | None = None) -> None:
        if self.closed:
            return
        hdrs = [(b"content-type", content_type)]
        if headers:
            hdrs += headers
        self._write_head(status, hdrs, len(body))
        self.transport.write(body)

    def start_stream(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if not self.closed:
            self._write_head(status, headers, None)

    def write(self, data: bytes) -> None:
        """One piece of a streamed body (a chunk frame on HTTP/1.1)."""
        if self.closed or not data:
            return
        if self._stream_chunked:
            self.transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.transport.write(data)

    def end_stream(self, data: bytes = b"") -> None:
        if self.closed:
            return
        if self._stream_chunked:
            if data:
                self.transport.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data))
            else:
                self.transport.write(b"0\r\n\r\n")
        else:
            if data:
                self.transport.write(data)
            self._keep_alive = False

    def abort(self) -> None:
        """Drop the connection now (a client that stopped reading)."""
        if not self.closed and self.transport is not None:
            self.transport.abort()

    @property
    def write_paused(self) -> bool:
        return self._paused

    async def drain(self) -> None:
        """Wait while the client reads slower than we write (bounded by the request deadline)."""
        while self._paused and not self.closed:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None


class HttpServer:
    def __init__(self, handler: Handler, *, error_body: Callable[[int, str], bytes],
                 max_body: int = 32 * 1024 * 1024, keepalive_timeout: float = 30.0) -> None:
        self.handler = handler
        self.error_body = error_body
        self.max_body = max_body
        self.keepalive_timeout = keepalive_timeout
        self.connections: set[HttpConnection] = set()
        self.closing = False
        self._server: asyncio.AbstractServer | None = None
        self._idle: asyncio.Event | None = None

    async def start(self, host: str, port: int, *, backlog: int = 2048) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: HttpConnection(self), host, port,
                                                backlog=backlog, reuse_address=True)
        return self._server.sockets[0].getsockname()[1]

    def busy(self) -> int:
        return sum(1 for c in self.connections if c._task is not None)

    def request_done(self) -> None:
        if self._idle is not None and not self.busy():
            self._idle.set()

    async def wait_idle(self) -> None:
        """Until no request is in progress (the drain after stop_accepting)."""
        self._idle = asyncio.Event()
        if self.busy():
            await self._idle.wait()

    async def stop_accepting(self) -> None:
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):  # idle keep-alive connections: close now
            if conn._task is None and conn.transport is not None:
                conn.transport.close()

    async def close(self) -> None:
        await self.stop_accepting()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
