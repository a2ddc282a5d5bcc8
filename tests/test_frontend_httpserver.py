"""The frontend's HTTP/1.1 server on its own: keep-alive, streaming, disconnects, bad input."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from services.frontend.http_app import error_body
from services.frontend.httpserver import HttpServer, Request


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


async def test_bad_requests_get_clear_errors(server):
    _, _, _, port = server
    out = await _raw(port, b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 411") and b"Content-Length" in out
    out = await _raw(port, b"POST /x HTTP/1.1\r\nContent-Length: 5000\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 413")
    out = await _raw(port, b"GET /x HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431")
    out = await _raw(port, b"garbage\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400")
    body = json.loads(out.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["message"]


async def test_expect_continue_pipelining_and_http10(server):
    _, _, _, port = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /a HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 100")
    # the body, then a second request pipelined behind it
    writer.write(b"abcGET /b HTTP/1.1\r\nConnection: close\r\n\r\n")
    rest = await asyncio.wait_for(reader.read(), 5)
    assert rest.count(b"HTTP/1.1 200") == 2 and b'"len": 3' in rest and b'"/b"' in rest
    writer.close()
    out = await _raw(port, b"GET /stream HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"data: [DONE]\n\n")
    assert b"chunked" not in out
