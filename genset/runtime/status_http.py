"""A very small HTTP/1.1 server for `/metrics` and `/health` (and any extra GET routes).

Plain asyncio streams: nothing to import at start-up beyond the standard library, one short
request per connection, bounded request size and read time, so a scraper or a stuck client
can neither slow the service nor hold memory.

A route may require a bearer token (`route(..., tokens=[...])`): `/metrics` does when the
service has a metrics token or an API key (genset.runtime.service); `/health` stays open for
liveness probes and says nothing secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

log = structlog.get_logger("genset.http")

# A route returns (status, content type, body); it may be sync or async.
Route = Callable[[], tuple[int, str, bytes] | Awaitable[tuple[int, str, bytes]]]

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}
_MAX_HEADER_BYTES = 16 * 1024
_READ_TIMEOUT_S = 5.0


def json_response(body: Any, status: int = 200) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(body, default=str).encode()


class StatusServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host, self.port = host, port
        self.routes: dict[str, Route] = {}
        self._tokens: dict[str, list[bytes]] = {}  # path -> accepted bearer tokens
        self._server: asyncio.Server | None = None

    def route(self, path: str, handler: Route, *, tokens: list[str] | None = None) -> None:
        """Serve `path` with `handler`; with `tokens` (non-empty ones count), only to a
        request with `Authorization: Bearer <one of them>`."""
        self.routes[path] = handler
        accepted = [t.encode() for t in tokens or () if t]
        if accepted:
            self._tokens[path] = accepted
        else:
            self._tokens.pop(path, None)

    def _authorized(self, path: str, head: bytes) -> bool:
        accepted = self._tokens.get(path)
        if not accepted:
            return True
        given = b""
        for line in head.split(b"\r\n")[1:]:
            name, sep, value = line.partition(b":")
            if sep and name.strip().lower() == b"authorization":
                value = value.strip()
                if value[:7].lower() == b"bearer ":
                    given = value[7:].strip()
                break
        # compare with every token, so the time taken does not say which one nearly matched
        return any([hmac.compare_digest(given, token) for token in accepted])

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    async def start(self) -> StatusServer:
        self._server = await asyncio.start_server(self._handle, self.host, self.port,
                                                  limit=_MAX_HEADER_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(_READ_TIMEOUT_S):
                    head = await reader.readuntil(b"\r\n\r\n")
            except TimeoutError:
                await self._send(writer, 408, "text/plain", b"request timeout\n")
                return
            except asyncio.LimitOverrunError:
                await self._send(writer, 431, "text/plain", b"request header too large\n")
                return
            except asyncio.IncompleteReadError:
                return  # client went away
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                await self._send(writer, 400, "text/plain", b"malformed request line\n")
                return
            method, target = parts[0], parts[1]
            path = target.split("?", 1)[0]
            handler = self.routes.get(path)
            if handler is None:
                await self._send(writer, 404, "text/plain",
                                 f"no such path {path}; try {', '.join(self.routes)}\n".encode())
                return
            if method not in ("GET", "HEAD"):
                await self._send(writer, 405, "text/plain", b"only GET and HEAD\n")
                return
            if not self._authorized(path, head):
                await self._send(writer, 401, "text/plain",
                                 b"missing or wrong token (Authorization: Bearer <token>)\n",
                                 extra=b"WWW-Authenticate: Bearer\r\n")
                return
            try:
                result = handler()
                if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                    result = await result
                status, ctype, body = result
            except Exception as exc:
                log.exception("status route failed", path=path)
                status, ctype, body = json_response({"error": repr(exc)}, 500)
            await self._send(writer, status, ctype, body, head_only=method == "HEAD")
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, status: int, ctype: str, body: bytes, *,
                    head_only: bool = False, extra: bytes = b"") -> None:
        header = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\n"
                  f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n").encode()
        header += extra + b"Connection: close\r\n\r\n"
        writer.write(header if head_only else header + body)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_READ_TIMEOUT_S):
                await writer.drain()
