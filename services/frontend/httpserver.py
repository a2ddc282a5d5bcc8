"""A small HTTP/1.1 server on asyncio protocols, built for token streaming.

Why not uvicorn + h11: with a pure-Python HTTP stack every streamed token costs an h11 event,
a state-machine step and two ASGI middleware hops (~20-30 us of CPU); over 64 tokens that was
the frontend's largest cost. Here a streamed SSE event is one `transport.write` of a chunked
frame. The server also knows when a client goes away (`connection_lost`) without a reader
task per request: the request's task is cancelled, which cancels its generation.

Requests are parsed by llhttp (Node's parser, through `httptools`, as uvicorn does) rather
than by hand: request smuggling lives in the corners of HTTP/1.1 parsing (duplicate or
`+83`/`8_3` Content-Length, `Content-Length :`, folded headers, bare LF, NUL and control
bytes), and llhttp's strict mode refuses all of those. On top of it this server checks what
llhttp leaves to the application: HTTP/1.1 without exactly one `Host` (400), versions other
than 1.0/1.1 (505), head size (431), body size (413), request bodies in chunked encoding (411).
A body over the size limit (`max_body`, or the application's `body_limit` from the
Content-Length) is refused from the head, before any of it is read.
Every refusal is answered with an error body naming the problem, then the connection closes
(after a malformed head the framing of whatever follows is unknown). Bare-LF line endings are
refused with a 400 rather than served leniently: a server that accepts them while a proxy in
front does not is the classic smuggling split.

Scope: what OpenAI clients, curl, load generators and Prometheus use — keep-alive and
pipelining (requests on one connection are answered one after the other), Content-Length
request bodies, `Expect: 100-continue`, chunked responses, HEAD (headers, no body), HTTP/1.0
with close. A client that half-closes its side is treated as gone (its request is cancelled):
that is how a disconnect is noticed while a stream waits for tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable

import httptools
import structlog

log = structlog.get_logger("frontend.httpserver")

REASONS = {100: "Continue", 200: "OK", 307: "Temporary Redirect", 400: "Bad Request",
           401: "Unauthorized",
           404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
           411: "Length Required", 413: "Payload Too Large", 429: "Too Many Requests",
           431: "Request Header Fields Too Large", 499: "Client Closed Request",
           500: "Internal Server Error", 503: "Service Unavailable", 504: "Gateway Timeout",
           505: "HTTP Version Not Supported"}
_MAX_HEAD = 64 * 1024
# Header names seen, bytes -> lower-case str: the same dozen names arrive on every request.
_HEADER_NAMES: dict[bytes, str] = {}
_MAX_HEADER_NAMES = 512
# Pipelined requests parsed ahead of the one being answered; past this reading pauses.
_MAX_QUEUED = 32
# After an error answer the server half-closes and keeps reading (and dropping) what the client
# still sends, for this long or this many bytes: closing with unread data makes the kernel send
# a reset, and the client may lose the answer that named its mistake (a 413 before its body).
_LINGER_S = 2.0
_LINGER_BYTES = 1024 * 1024
# A body refused from the head (413) and larger than that is drained instead, up to its
# Content-Length within this deadline: a client that writes its whole body before reading
# (httpx's async client, so the OpenAI SDK's) gets only a reset, not the 413, if the server
# closes before the body is in. Drained into one scratch buffer, never parsed or kept, a 10 MB
# body costs the loop ~3 ms of CPU (~16 ms to read it as a request, more to decode it).
_DRAIN_S = 10.0


class Request:
    __slots__ = ("body", "conn", "headers", "keep_alive", "method", "path", "query", "version")

    def __init__(self, conn: HttpConnection, method: str, path: str, query: str, version: str,
                 headers: dict[str, str], body: bytes, keep_alive: bool = True) -> None:
        self.conn = conn
        self.method = method
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive


Handler = Callable[[Request], Awaitable[None]]


class _Refusal(Exception):
    """Raised from a parser callback to stop parsing: answer `status` and close. `unread`:
    bytes of body the client announced and will still send (a refusal from the head)."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 unread: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.unread = unread


class HttpConnection(asyncio.Protocol):
    """One client connection. The handler answers through `respond` or `start_stream` /
    `write` / `end_stream`; exactly one response per request."""

    __slots__ = ("_body", "_chunk_head_bytes", "_drain_waiter", "_expect_continue",
                 "_feed_other", "_head_only", "_headers", "_idle_handle", "_in_head",
                 "_keep_alive", "_lingering", "_new_message", "_parser", "_paused", "_queue",
                 "_queued_bytes", "_raw_headers", "_read_paused", "_reading_done", "_server",
                 "_stream_chunked", "_task", "_upgrade_need", "_upgrade_req", "_url", "closed",
                 "transport")

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        # the message being parsed
        self._url: list[bytes] = []
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._in_head = False
        self._chunk_head_bytes = 0  # bytes of reads that ended inside the head
        self._new_message = False  # a message began during this read
        self._feed_other = 0  # bytes of this read that belonged to earlier messages
        self._expect_continue = False
        # parsed requests (or the refusal that ends the connection) waiting their turn
        self._queue: deque[Request | _Refusal] = deque()
        self._queued_bytes = 0
        self._reading_done = False  # nothing more is parsed on this connection
        self._read_paused = False
        self._lingering = -1  # bytes still to drop after an error answer; -1: not lingering
        self._upgrade_req: Request | None = None  # an Upgrade request still reading its body
        self._upgrade_need = 0
        # the request being answered
        self._task: asyncio.Task | None = None
        self._keep_alive = True
        self._stream_chunked = True
        self._head_only = False
        self._paused = False
        self._drain_waiter: asyncio.Future | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self.closed = False

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._server.connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._queue.clear()
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
        if self._upgrade_req is not None:
            self._take_upgrade_body(data)
            self._next_request()
            return
        if self._reading_done:
            # After a refusal or a last request the rest is not ours to parse: drop it.
            if self._lingering >= 0:
                self._lingering -= len(data)
                if self._lingering < 0:
                    self.transport.close()
            return
        self._new_message = False
        self._feed_other = 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade_requested(data[exc.args[0]:])
        except httptools.HttpParserCallbackError as exc:
            refusal = exc.__context__
            if not isinstance(refusal, _Refusal):  # a bug of ours, not the client's
                refusal = _Refusal(500, "internal error while parsing the request")
                log.error("http parser callback failed", error=repr(exc.__context__))
            self._refuse(refusal)
        except httptools.HttpParserError as exc:
            if not self._reading_done:
                self._refuse(_Refusal(400, f"malformed HTTP request: {exc}"))
        else:
            if self._in_head:
                # A head still incomplete: httptools holds a partial header line itself, which
                # the callbacks' count does not see; so the head's size is also counted from
                # the reads (less what of them went to earlier messages, as far as known).
                if self._new_message:
                    self._chunk_head_bytes = max(0, len(data) - self._feed_other)
                else:
                    self._chunk_head_bytes += len(data)
                if self._chunk_head_bytes > _MAX_HEAD:
                    self._refuse(_Refusal(431, f"request head over {_MAX_HEAD} bytes"))
        self._next_request()
        self._send_continue()
        if not self._read_paused and not self._reading_done and self._backlog_full():
            # A pipelining client far ahead of us: stop reading until we catch up.
            self._read_paused = True
            self.transport.pause_reading()

    def _backlog_full(self) -> bool:
        return (len(self._queue) >= _MAX_QUEUED
                or self._queued_bytes > self._server.max_body + _MAX_HEAD)

    # -- llhttp callbacks (called from feed_data) -------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._new_message = True
        self._url = []
        self._raw_headers = []
        self._body = []
        self._chunk_head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        # Only collected here: this runs per header and was the largest cost of a request in
        # a profile; the head's size is checked per read (data_received) and once complete.
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        size = sum(map(len, self._url))
        headers: dict[str, str] = {}
        names = _HEADER_NAMES
        for name, value in self._raw_headers:
            size += len(name) + len(value) + 4
            key = names.get(name)
            if key is None:
                key = name.decode("latin-1").lower()
                if len(names) < _MAX_HEADER_NAMES:
                    names[name] = key
            text = value.rstrip(b" \t").decode("latin-1")  # llhttp strips the leading OWS
            if key in headers:
                if key == "host":
                    raise _Refusal(400, "more than one Host header")
                headers[key] += ", " + text  # a repeated list header means its values joined
            else:
                headers[key] = text
        self._headers = headers
        self._feed_other += size
        if size > _MAX_HEAD:
            raise _Refusal(431, f"request head over {_MAX_HEAD} bytes")
        parser = self._parser
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise _Refusal(505, f"unsupported HTTP version {version}; use HTTP/1.1 or 1.0")
        if version == "1.1" and "host" not in headers:
            raise _Refusal(400, "HTTP/1.1 request without a Host header")
        coding = headers.get("transfer-encoding")
        if coding is not None:
            if coding.rpartition(",")[2].strip().lower() == "chunked":
                raise _Refusal(411, "chunked request bodies are not supported; "
                                    "send Content-Length")
            raise _Refusal(400, f"unsupported Transfer-Encoding {coding!r}; send Content-Length")
        length = int(headers.get("content-length") or 0)  # llhttp checked it is digits only
        server = self._server
        if length > server.max_body:
            raise _Refusal(413, f"the request body is {length} bytes, over this server's limit "
                                f"of {server.max_body} bytes", unread=length)
        if length and server.body_limit is not None:
            refused = server.body_limit(length)
            if refused is not None:
                raise _Refusal(413, refused[0], code=refused[1], unread=length)
        self._expect_continue = (length > 0 and version == "1.1"
                                 and headers.get("expect", "").lower() == "100-continue")

    def on_body(self, body: bytes) -> None:
        self._feed_other += len(body)
        self._body.append(body)  # at most Content-Length, which is at most max_body

    def on_message_complete(self) -> None:
        self._expect_continue = False
        parser = self._parser
        target = b"".join(self._url).decode("latin-1")
        path, _, query = target.partition("?")
        keep_alive = parser.should_keep_alive()
        body = b"".join(self._body)  # one piece (the usual case): no copy
        self._body = []
        request = Request(self, parser.get_method().decode("ascii"), path, query,
                          "HTTP/" + parser.get_http_version(), self._headers, body, keep_alive)
        self._queue.append(request)
        self._queued_bytes += len(body)
        if not keep_alive:
            self._reading_done = True  # its answer closes the connection; ignore the rest

    def _upgrade_requested(self, rest: bytes) -> None:
        # `Upgrade: h2c` from curl --http2 and the like: answer in HTTP/1.1, as RFC 9110
        # allows, and close after. llhttp stops parsing at the end of the head (it takes what
        # follows for the new protocol), so a body announced by Content-Length is read here.
        self._reading_done = True
        queue = self._queue
        if not queue or not isinstance(queue[-1], Request):
            self._refuse(_Refusal(400, "protocol upgrade is not supported"))
            return
        request = queue[-1]
        request.keep_alive = False
        need = int(request.headers.get("content-length") or 0) - len(request.body)
        if need > 0 and request.method != "CONNECT":
            queue.pop()
            self._queued_bytes -= len(request.body)
            self._upgrade_req = request
            self._upgrade_need = need
            self._body = [request.body]
            self._take_upgrade_body(rest)

    def _take_upgrade_body(self, data: bytes) -> None:
        piece = data[:self._upgrade_need]
        self._body.append(piece)
        self._upgrade_need -= len(piece)
        if self._upgrade_need == 0:  # complete: it takes its turn; anything after is dropped
            request, self._upgrade_req = self._upgrade_req, None
            request.body = b"".join(self._body)
            self._body = []
            self._queue.append(request)
            self._queued_bytes += len(request.body)

    def _refuse(self, refusal: _Refusal) -> None:
        """Queue the error answer behind any requests already parsed; parse nothing more."""
        self._reading_done = True
        self._queue.append(refusal)

    # -- serving requests in order ------------------------------------------------------------

    def _arm_idle(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        self._idle_handle = asyncio.get_running_loop().call_later(
            self._server.keepalive_timeout, self._idle_timeout)

    def _idle_timeout(self) -> None:
        self._idle_handle = None
        if self._task is None and not self.closed:
            self.transport.close()

    def _fail_early(self, refusal: _Refusal) -> None:
        body = self._server.error_body(refusal.status, refusal.message, refusal.code)
        self._keep_alive = False
        self._head_only = False
        self._stream_chunked = True
        self._write_head(refusal.status, [(b"content-type", b"application/json")], len(body))
        self.transport.write(body)
        self._reading_done = True
        transport = self.transport
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()  # the answer, then FIN; keep draining (see _LINGER_S, _DRAIN_S)
        loop = asyncio.get_running_loop()
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        if refusal.unread > _LINGER_BYTES and refusal.unread <= self._server.max_body:
            drain = _BodyDrain(self, refusal.unread)
            transport.set_protocol(drain)
            if self._read_paused:
                self._read_paused = False
                transport.resume_reading()
            self._idle_handle = loop.call_later(_DRAIN_S, transport.close)
            return
        self._lingering = _LINGER_BYTES
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        self._idle_handle = loop.call_later(_LINGER_S, transport.close)

    def _next_request(self) -> None:
        if self._task is not None or not self._queue or self.closed:
            return
        item = self._queue.popleft()
        if isinstance(item, _Refusal):
            self._fail_early(item)
            return
        self._queued_bytes -= len(item.body)
        if not self._queue:
            self._queued_bytes = 0
        self._keep_alive = item.keep_alive
        self._stream_chunked = item.version == "HTTP/1.1"
        self._head_only = item.method == "HEAD"
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        self._task = asyncio.ensure_future(self._run(item))

    def _send_continue(self) -> None:
        # Only when nothing is being answered: a 100 in the middle of an earlier request's
        # streamed response would corrupt it.
        if self._expect_continue and self._task is None and not self._queue and not self.closed:
            self._expect_continue = False
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

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
        self._arm_idle()
        self._next_request()
        self._send_continue()
        if self._read_paused and not self._reading_done and not self._backlog_full():
            self._read_paused = False
            self.transport.resume_reading()

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
        if not self._head_only:  # HEAD: the headers GET would send, no body
            self.transport.write(body)

    def start_stream(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if not self.closed:
            self._write_head(status, headers, None)

    def write(self, data: bytes) -> None:
        """One piece of a streamed body (a chunk frame on HTTP/1.1)."""
        if self.closed or not data or self._head_only:
            return
        if self._stream_chunked:
            self.transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.transport.write(data)

    def end_stream(self, data: bytes = b"") -> None:
        if self.closed:
            return
        if self._head_only:
            if not self._stream_chunked:
                self._keep_alive = False
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


class _BodyDrain(asyncio.BufferedProtocol):
    """What a connection becomes after refusing a request from its head (413): the body the
    client announced is read into one scratch buffer, shared by every connection, and
    dropped, then the connection closes (see _DRAIN_S). Bytes of it that came with the head
    were dropped already: then the client's EOF or the deadline ends it."""

    __slots__ = ("conn", "left")
    _scratch = memoryview(bytearray(256 * 1024))  # never looked at

    def __init__(self, conn: HttpConnection, left: int) -> None:
        self.conn = conn
        self.left = left

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        self.left -= nbytes
        if self.left <= 0:
            self.conn.transport.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc) -> None:
        self.conn.connection_lost(exc)


class HttpServer:
    def __init__(self, handler: Handler, *, error_body: Callable[[int, str, str | None], bytes],
                 max_body: int = 32 * 1024 * 1024, keepalive_timeout: float = 30.0,
                 body_limit: Callable[[int], tuple[str, str | None] | None] | None = None
                 ) -> None:
        self.handler = handler
        self.error_body = error_body
        self.max_body = max_body
        self.body_limit = body_limit
        self.keepalive_timeout = keepalive_timeout
        self.connections: set[HttpConnection] = set()
        self.closing = False
        self._server: asyncio.AbstractServer | None = None
        self._idle: asyncio.Event | None = None

    async def start(self, host: str, port: int, *, backlog: int = 2048,
                    reuse_port: bool = False) -> int:
        """Listen; `reuse_port`: other processes may listen on the same port too (the kernel
        spreads new connections over them: `genset up --frontends N`)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: HttpConnection(self), host, port,
                                                backlog=backlog, reuse_address=True,
                                                reuse_port=reuse_port)
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
