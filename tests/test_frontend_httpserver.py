"""The frontend's HTTP/1.1 server on its own: keep-alive, streaming, disconnects, bad input."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from services.frontend.http_app import error_body
from services.frontend.httpserver import HttpConnection, HttpServer, Request


class App:
    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.seen: list[tuple[str, str, bytes]] = []

    async def handle(self, request: Request) -> None:
        self.seen.append((request.method, request.path, request.body))
        conn = request.conn
        if request.path == "/stream":
            conn.start_stream(200, [(b"content-type", b"text/event-stream")])
            for i in range(3):
                conn.write(b"data: %d\n\n" % i)
                await asyncio.sleep(0)
            conn.end_stream(b"data: [DONE]\n\n")
        elif request.path == "/forever":
            conn.start_stream(200, [(b"content-type", b"text/event-stream")])
            conn.write(b"data: first\n\n")
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        else:
            conn.respond(200, json.dumps({"path": request.path, "len": len(request.body)}).encode())


@pytest.fixture
async def server():
    app = App()
    srv = HttpServer(app.handle, error_body=error_body, max_body=1024)
    port = await srv.start("127.0.0.1", 0)
    yield app, srv, f"http://127.0.0.1:{port}", port
    await srv.close()


async def test_keep_alive_and_streaming(server):
    app, _, url, _ = server
    async with httpx.AsyncClient(base_url=url) as client:
        for i in range(3):  # one connection, several requests
            r = await client.post("/echo", content=b"x" * i)
            assert r.json() == {"path": "/echo", "len": i}
        r = await client.get("/stream")
        assert r.text == "data: 0\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
        assert r.headers["transfer-encoding"] == "chunked"
    assert len(app.seen) == 4


async def test_client_disconnect_cancels_handler(server):
    app, srv, url, _ = server
    async with httpx.AsyncClient(base_url=url) as client, client.stream("GET", "/forever") as r:
        async for line in r.aiter_lines():
            if line == "data: first":
                break
    await asyncio.wait_for(app.cancelled.wait(), 5)
    await asyncio.wait_for(srv.wait_idle(), 5)


async def _raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    out = await asyncio.wait_for(reader.read(), 5)  # the server closes after these
    writer.close()
    return out


def _error(out: bytes) -> tuple[int, str]:
    """(status, error message) of a raw answer that must close the connection."""
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower(), head
    return int(head.split(b" ", 2)[1]), json.loads(body)["error"]["message"]


CL = b"POST /x HTTP/1.1\r\nHost: t\r\n"
GET = b"GET /x HTTP/1.1\r\nHost: t\r\n"
MALFORMED = {
    # name: (raw request, status, words the error message must contain)
    "chunked body": (CL + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 411,
                     "Content-Length"),
    "body too large": (CL + b"Content-Length: 5000\r\n\r\n" + b"x" * 5000, 413, "1024 bytes"),
    "head too large": (GET + b"X: " + b"a" * 70000 + b"\r\n\r\n", 431, "head"),
    "garbage": (b"garbage\r\n\r\n", 400, "method"),
    "conflicting Content-Length": (CL + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
                                   400, "Duplicate Content-Length"),
    "repeated Content-Length": (CL + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400,
                                "Duplicate Content-Length"),
    "Content-Length +83": (CL + b"Content-Length: +3\r\n\r\nabc", 400, "Content-Length"),
    "Content-Length 8_3": (CL + b"Content-Length: 0_3\r\n\r\nabc", 400, "Content-Length"),
    "Content-Length 3,3": (CL + b"Content-Length: 3,3\r\n\r\nabc", 400, "Content-Length"),
    "Content-Length empty": (CL + b"Content-Length:\r\n\r\n", 400, "Content-Length"),
    "space before colon": (CL + b"Content-Length : 3\r\n\r\nabc", 400, "header field"),
    "header without colon": (GET + b"Foo\r\n\r\n", 400, "header"),
    "folded header": (GET + b"Foo: a\r\n b\r\n\r\n", 400, "whitespace"),
    "NUL in header value": (GET + b"Foo: a\x00b\r\n\r\n", 400, "header value"),
    "control byte in header value": (GET + b"Foo: a\x01b\r\n\r\n", 400, "header value"),
    "NUL in target": (b"GET /a\x00b HTTP/1.1\r\nHost: t\r\n\r\n", 400, "url"),
    "HTTP/1.1 without Host": (b"GET /x HTTP/1.1\r\n\r\n", 400, "Host"),
    "two Host headers": (GET + b"Host: u\r\n\r\n", 400, "Host"),
    "LF-only request": (b"GET /x HTTP/1.1\nHost: t\n\n", 400, "CRLF"),
    "LF-only header line": (GET + b"Foo: a\n\r\n", 400, "CR"),
    "HTTP/2.0 request line": (b"GET /x HTTP/2.0\r\nHost: t\r\n\r\n", 505, "version"),
    "HTTP/0.9 request line": (b"GET /x\r\n\r\n", 505, "version"),
    "Transfer-Encoding and Content-Length": (
        CL + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc", 400,
        "Transfer-Encoding"),
    "unknown Transfer-Encoding": (CL + b"Transfer-Encoding: gzip\r\n\r\n", 400,
                                  "Transfer-Encoding"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_malformed_requests_get_a_4xx_naming_the_problem(server, case):
    app, _, _, port = server
    raw, status, words = MALFORMED[case]
    got_status, message = _error(await _raw(port, raw))
    assert (got_status, words.lower() in message.lower()) == (status, True), message
    assert not app.seen  # the handler never saw it


async def test_error_after_pipelined_request_waits_its_turn(server):
    # A good request, then a bad one in the same write: the good one is answered in full
    # first (the error must not land inside its streamed body), then the error, then close.
    app, _, _, port = server
    out = await _raw(port, GET.replace(b"/x", b"/stream") + b"\r\n" + b"GET /y HTTP/1.1\r\n\r\n")
    first, _, rest = out.partition(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200") and rest.startswith(b"HTTP/1.1 400")
    assert "Host" in _error(rest)[1]
    assert [path for _, path, _ in app.seen] == ["/stream"]


async def test_head_too_large_in_many_reads(server):
    # A head that never ends, sent in small writes: refused once it passes 64 KiB (the
    # parser holds partial headers itself, so the server counts the reads).
    _, _, _, port = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(GET + b"X: ")
    for _ in range(40):
        writer.write(b"a" * 4096)
        await writer.drain()
    out = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert _error(out)[0] == 431


async def test_head_gets_headers_without_body(server):
    _, _, _, port = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    # HEAD then GET on one connection: if HEAD leaked a body, the second answer would not
    # start right after the first head.
    writer.write(b"HEAD /x HTTP/1.1\r\nHost: t\r\n\r\n"
                 b"HEAD /stream HTTP/1.1\r\nHost: t\r\n\r\n"
                 b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    out = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    first, second, third = out.split(b"\r\n\r\n", 2)
    assert first.startswith(b"HTTP/1.1 200") and b"content-length: 24" in first
    assert second.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in second
    assert third.startswith(b"HTTP/1.1 200") and third.endswith(b'{"path": "/x", "len": 0}')


async def test_lenient_but_harmless_forms_are_served(server):
    # Whitespace around a header value, header names in any case, list headers repeated,
    # leading empty lines before the request line (RFC 9112 says to ignore them).
    app, _, _, port = server
    out = await _raw(port, b"\r\nPOST /x HTTP/1.1\r\nhOsT:   t  \r\nX-A: 1\r\nX-A: 2\r\n"
                           b"content-length: 2 \r\nConnection: close\r\n\r\nab")
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b'"len": 2}')
    assert app.seen == [("POST", "/x", b"ab")]


async def test_upgrade_request_is_answered_in_http11_then_closed(server):
    # curl --http2 on cleartext asks for h2c; we answer in HTTP/1.1 and close.
    _, _, _, port = server
    out = await _raw(port, GET + b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                                 b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200") and b"connection: close" in out


async def test_expect_continue_pipelining_and_http10(server):
    app, _, _, port = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n"
                 b"Expect: 100-continue\r\n\r\n")
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 100")
    # the body, then a second request pipelined behind it
    writer.write(b"abcGET /b HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    rest = await asyncio.wait_for(reader.read(), 5)
    assert rest.count(b"HTTP/1.1 200") == 2 and b'"len": 3' in rest and b'"/b"' in rest
    writer.close()
    out = await _raw(port, b"GET /stream HTTP/1.0\r\n\r\n")  # no Host needed in 1.0
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"data: [DONE]\n\n")
    assert b"chunked" not in out
    assert [path for _, path, _ in app.seen] == ["/a", "/b", "/stream"]


async def test_pipelined_requests_in_one_write_are_answered_in_order(server):
    # Ten requests (streams and bodies mixed) in one write, a 100-continue among them that
    # must not be answered while earlier responses are still streaming.
    app, _, _, port = server
    reqs = []
    for i in range(10):
        if i % 3 == 0:
            reqs.append(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")
        elif i == 5:
            reqs.append(b"POST /e%d HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (i, i, b"y" * i))
        else:
            reqs.append(b"POST /p%d HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
                        % (i, i, b"z" * i))
    reqs.append(b"GET /last HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    out = await _raw(port, b"".join(reqs))
    assert b"100 Continue" not in out
    assert out.count(b"HTTP/1.1 200") == 11
    assert out.count(b"data: [DONE]\n\n\r\n0\r\n\r\n") == 4
    assert [path for _, path, _ in app.seen] == [
        "/stream", "/p1", "/p2", "/stream", "/p4", "/e5", "/stream", "/p7", "/p8", "/stream",
        "/last"]
    assert [len(body) for _, _, body in app.seen] == [0, 1, 2, 0, 4, 5, 0, 7, 8, 0, 0]


async def test_keep_alive_requests_one_after_another(server):
    # The same connection, request after request, each one written only after the last
    # answer: the parser carries on across messages.
    app, _, _, port = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for i in range(5):
        writer.write(b"POST /k HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % i)
        writer.write(b"q" * i)  # body in a separate write
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        body = await asyncio.wait_for(reader.readexactly(length), 5)
        assert json.loads(body) == {"path": "/k", "len": i}
    writer.close()
    assert len(app.seen) == 5


async def test_expect_continue_behind_a_stream_waits_for_it(server):
    # The 100 for a pipelined request comes after the earlier response, never inside it.
    _, _, _, port = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n"
                 b"POST /c HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    got = await asyncio.wait_for(reader.readuntil(b"HTTP/1.1 100 Continue\r\n\r\n"), 5)
    assert got.startswith(b"HTTP/1.1 200") and b"data: [DONE]\n\n\r\n0\r\n\r\nHTTP/1.1 100" in got
    writer.write(b"ok")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()


async def test_large_body_then_pipelined_head_is_not_mistaken_for_a_large_head():
    # A read that ends a 300 KB body and starts the next head: only the head's bytes count
    # towards the 64 KiB head limit.
    app = App()
    srv = HttpServer(app.handle, error_body=error_body, max_body=1 << 20)
    port = await srv.start("127.0.0.1", 0)
    try:
        out = await _raw(port, b"POST /big HTTP/1.1\r\nHost: t\r\nContent-Length: 300000\r\n\r\n"
                               + b"b" * 300000
                               + b"GET /next HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    finally:
        await srv.close()
    assert out.count(b"HTTP/1.1 200") == 2 and b'"len": 300000' in out
    assert [path for _, path, _ in app.seen] == ["/big", "/next"]


class FakeTransport:
    """Just enough transport to feed an HttpConnection chosen read boundaries."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = asyncio.Event()

    def write(self, data: bytes) -> None:
        self.out += data

    def close(self) -> None:
        self.closed.set()

    def can_write_eof(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def test_head_limit_counts_only_the_head_part_of_a_read():
    app = App()
    srv = HttpServer(app.handle, error_body=error_body, max_body=1 << 20)
    conn = HttpConnection(srv)
    transport = FakeTransport()
    conn.connection_made(transport)
    body = b"b" * 300000
    conn.data_received(b"POST /big HTTP/1.1\r\nHost: t\r\nContent-Length: 300000\r\n\r\n"
                       + body[:1000])
    # the body's last 299 KB and the start of a head that is not finished yet
    conn.data_received(body[1000:] + b"GET /next HTTP/1.1\r\nHost: t\r\nX-Long: " + b"v" * 1000)
    assert b"431" not in transport.out
    conn.data_received(b"v" * 1000 + b"\r\nConnection: close\r\n\r\n")
    await asyncio.wait_for(transport.closed.wait(), 5)
    assert transport.out.count(b"HTTP/1.1 200") == 2
    assert [path for _, path, _ in app.seen] == ["/big", "/next"]
    conn.connection_lost(None)
    # while a head that does pass the limit, split the same way, is refused
    conn = HttpConnection(srv)
    transport = FakeTransport()
    conn.connection_made(transport)
    conn.data_received(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\nGET /b HTTP/1.1\r\nX: " + b"v" * 40000)
    conn.data_received(b"v" * 30000)
    await asyncio.wait_for(transport.closed.wait(), 5)
    assert b"HTTP/1.1 431" in transport.out
    conn.connection_lost(None)



async def test_upgrade_request_with_a_body_gets_its_body(server):
    # llhttp stops at the head of an Upgrade request; its Content-Length body is still read.
    app, _, _, port = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(CL + b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                      b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nContent-Length: 5\r\n\r\nab")
    await writer.drain()
    writer.write(b"cde")  # the rest of the body, in a later read (or the same one)
    out = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b'"len": 5}')
    assert app.seen == [("POST", "/x", b"abcde")]


# -- a body over the application's limit, refused from its Content-Length ---------------------

LIMIT = 100_000


def _limit(length: int) -> tuple[str, str] | None:
    if length <= LIMIT:
        return None
    return f"the request body is {length} bytes; the limit is {LIMIT} bytes", "too_long"


@pytest.fixture
async def limited():
    app = App()
    srv = HttpServer(app.handle, error_body=error_body, max_body=32 << 20, body_limit=_limit)
    port = await srv.start("127.0.0.1", 0)
    yield app, srv, port
    await srv.close()


async def test_an_oversize_content_length_is_answered_413_before_the_body_is_sent(limited):
    app, _, port = limited
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(CL + b"Content-Length: 10000000\r\n\r\n")  # the head only, never the body
    await writer.drain()
    # The answer and the server's FIN come while the client still owes all 10 MB.
    out = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower(), head
    error = json.loads(body)["error"]
    assert "10000000 bytes" in error["message"] and f"{LIMIT} bytes" in error["message"]
    assert error["code"] == "too_long" and error["type"] == "invalid_request_error"
    assert not app.seen  # the handler never saw it


async def test_a_client_that_sends_the_oversize_body_anyway_gets_the_413(limited):
    # httpx's async client writes the whole body before it reads: the server drains the
    # body (without keeping it) so that the answer is not lost in a reset.
    app, _, port = limited
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for size in (LIMIT + 1, 3 << 20, 10_000_000):
            r = await client.post("/v1/chat/completions", content=b"x" * size)
            assert r.status_code == 413, (size, r.text)
            assert f"{size} bytes" in r.json()["error"]["message"]
        r = await client.post("/ok", content=b"x" * LIMIT)  # at the limit: served
        assert r.json() == {"path": "/ok", "len": LIMIT}
    assert [path for _, path, _ in app.seen] == ["/ok"]


async def test_a_drained_connection_is_let_go_when_the_client_stops(limited):
    # Bytes of the body that came with the head are not drained again: the client's EOF
    # (or the deadline) ends the connection.
    class Connections(set):
        def __init__(self) -> None:
            super().__init__()
            self.none_left = asyncio.Event()

        def discard(self, conn) -> None:
            super().discard(conn)
            if not self:
                self.none_left.set()

    _, srv, port = limited
    srv.connections = Connections()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(CL + b"Content-Length: 2000000\r\n\r\n" + b"x" * 500_000)
    await writer.drain()
    assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 413")
    writer.close()
    await asyncio.wait_for(srv.connections.none_left.wait(), 30)
