"""Direct TCP between two workers for large KV: framing, a buffered socket reader, and the
receiving worker's listener.

Frames: u32 little-endian length, then a msgpack `proto.transfer.KvTransferMessage`; a chunk
frame (data empty) is followed by exactly `size` raw bytes, read straight into the buffer the
block payloads are cut from (one copy, kernel to buffer, as a raw socket read). The sockets
are driven with the loop's sock_* calls (no StreamReader: it copies every byte into its own
buffer first, then again into the bytes it returns).

The listener accepts a connection, reads its first frame (a header carrying a one-time token)
within `hello_timeout`, and hands the socket to the receive session registered under that
token; anything else is answered with a refusal and closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
from collections.abc import Callable
from typing import Any

import msgspec
import structlog

from genset.transfer import errors
from genset.transfer.errors import TransferError
from proto.generate import ErrorInfo
from proto.transfer import KvTransferAck, KvTransferHeader, KvTransferMessage

log = structlog.get_logger("genset.transfer")

_LEN = struct.Struct("<I")
# A header lists every block hash (9 bytes each in msgpack): 16 MiB is ~1.8M blocks, far past
# any context; anything bigger is refused before it is read.
MAX_FRAME = 16 * 1024 * 1024
# The first frame of a connection is read before its token is checked: smaller, so that
# unauthenticated connections (at most max_pending_connections) cost little memory.
MAX_HELLO_FRAME = 4 * 1024 * 1024
# Reads for frames; a read may take the start of the raw bytes that follow a chunk frame,
# which are then copied once more (at most this much per chunk).
_RECV_SIZE = 64 * 1024
# sendmsg takes at most IOV_MAX (1024 on Linux) buffers per call
_IOV_MAX = 512

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(KvTransferMessage)


def frame(message: Any) -> bytes:
    body = _encoder.encode(message)
    return _LEN.pack(len(body)) + body


def decode_message(data: bytes | memoryview) -> Any:
    try:
        return _decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise TransferError(errors.BAD_MESSAGE, f"invalid KV transfer message: {exc}") from None


def tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class SockReader:
    """Reads frames and raw bytes from a non-blocking socket on the running loop."""

    __slots__ = ("_buf", "_loop", "_pos", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray()
        self._pos = 0

    async def _fill(self, need: int) -> None:
        """Until at least `need` unread bytes are buffered."""
        while len(self._buf) - self._pos < need:
            if self._pos:
                del self._buf[: self._pos]
                self._pos = 0
            data = await self._loop.sock_recv(self.sock, max(_RECV_SIZE, need))
            if not data:
                raise EOFError("connection closed by the peer")
            self._buf += data

    async def read_exact(self, n: int) -> bytes:
        await self._fill(n)
        out = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        return out

    async def read_into(self, view: memoryview) -> None:
        """Fill `view` completely (buffered bytes first, then straight from the socket)."""
        have = min(len(self._buf) - self._pos, len(view))
        if have:
            view[:have] = self._buf[self._pos : self._pos + have]
            self._pos += have
        pos = have
        recv_into = self._loop.sock_recv_into
        while pos < len(view):
            n = await recv_into(self.sock, view[pos:])
            if n == 0:
                raise EOFError(f"connection closed by the peer after {pos} of {len(view)} bytes")
            pos += n

    async def read_message(self, max_frame: int = MAX_FRAME) -> Any:
        (n,) = _LEN.unpack(await self.read_exact(4))
        if n > max_frame:
            raise TransferError(errors.BAD_MESSAGE, f"frame of {n} bytes, over {max_frame}")
        return decode_message(await self.read_exact(n))


async def send_all(sock: socket.socket, *parts: bytes | bytearray | memoryview) -> None:
    """Write every part, in order, with scatter-gather sendmsg: a chunk's frame and its block
    payloads go out in one syscall per socket-buffer's worth, without joining them."""
    bufs = [memoryview(p).cast("B") for p in parts if len(p)]
    loop: asyncio.AbstractEventLoop | None = None
    while bufs:
        try:
            n = sock.sendmsg(bufs[:_IOV_MAX])
        except (BlockingIOError, InterruptedError):
            if loop is None:
                loop = asyncio.get_running_loop()
            await _writable(loop, sock)
            continue
        while n:
            head = bufs[0]
            if n >= len(head):
                n -= len(head)
                bufs.pop(0)
            else:
                bufs[0] = head[n:]
                n = 0


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut = loop.create_future()
    fd = sock.fileno()
    if fd < 0:
        raise OSError("socket closed")
    loop.add_writer(fd, _wake_once, fut)
    try:
        await fut
    finally:
        loop.remove_writer(fd)


def _wake_once(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class BufferPool:
    """Chunk buffers for TCP receives, reused across chunks and transfers: a fresh multi-MB
    bytearray costs a memset and a page fault per page on first touch, which cut loopback
    throughput by ~20% in bench runs (4 MiB chunks, /tmp experiment beside
    bench/bench_kv_transfer.py). Bounded: at most `max_bytes` are kept."""

    __slots__ = ("_free", "held", "max_bytes")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._free: list[bytearray] = []
        self.held = 0

    def get(self, n: int) -> bytearray:
        """A buffer of at least n bytes (at most 2n, so a small chunk doesn't pin a big
        buffer)."""
        free = self._free
        for i in range(len(free) - 1, -1, -1):
            b = free[i]
            if n <= len(b) <= 2 * n:
                free.pop(i)
                self.held -= len(b)
                return b
        return bytearray(n)

    def put(self, buf: bytearray) -> None:
        if self.held + len(buf) <= self.max_bytes:
            self._free.append(buf)
            self.held += len(buf)


async def linger_close(sock: socket.socket, timeout: float = 1.0,  # noqa: ASYNC109
                       max_bytes: int = 256 * 1024 * 1024) -> None:
    """Close after a last message (a nack, an abort) so that the peer gets it: closing a
    socket with unread bytes in it (chunks still arriving) makes the kernel send a reset,
    which may overtake that message on a real network. So: send FIN, read and drop what still
    arrives until the peer closes too, `timeout` or `max_bytes`, then close."""
    loop = asyncio.get_running_loop()
    try:
        sock.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(timeout):
            drained = 0
            while drained < max_bytes:
                data = await loop.sock_recv(sock, 256 * 1024)
                if not data:
                    break
                drained += len(data)
    except (OSError, TimeoutError):
        pass
    finally:
        close_quietly(sock)


def close_quietly(sock: socket.socket | None) -> None:
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.close()


async def connect(host: str, port: int, timeout: float) -> socket.socket:  # noqa: ASYNC109
    """A connected non-blocking socket, or OSError/TimeoutError within `timeout`."""
    loop = asyncio.get_running_loop()
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        # a name: resolved in the loop's executor (a thread hop; an address skips it)
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout
        )
    else:
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        infos = [(family, socket.SOCK_STREAM, 0, "", (host, port))]
    last: BaseException | None = None
    for family, kind, proto, _name, addr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            tune(sock)
            await asyncio.wait_for(loop.sock_connect(sock, addr), timeout)
            return sock
        except (OSError, TimeoutError) as exc:
            close_quietly(sock)
            last = exc
        except BaseException:
            close_quietly(sock)
            raise
    raise last if last is not None else OSError(f"no address for {host}:{port}")


# A session that takes over an accepted connection: (header, socket, reader).
Attach = Callable[[KvTransferHeader, socket.socket, SockReader], None]


class TcpListener:
    """A receiving worker's TCP endpoint: sessions register a one-time token; a connection
    presenting it is handed to that session. Bound to loopback unless told otherwise (the
    project's rule: nothing listens beyond loopback unless asked)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        advertise_host: str | None = None,
        hello_timeout: float = 5.0,
        max_pending_connections: int = 16,
    ) -> None:
        self.host = host
        self.port = port
        self.advertise_host = advertise_host or host
        self.hello_timeout = hello_timeout
        self.max_pending = max_pending_connections
        self._tokens: dict[str, Attach] = {}
        self._sock: socket.socket | None = None
        self._task: asyncio.Task | None = None
        self._handshakes: set[asyncio.Task] = set()
        self.stats = {"accepted": 0, "refused": 0}

    async def start(self) -> None:
        if self._sock is not None:
            return
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(128)
        sock.setblocking(False)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self._accept_loop(), name="kv-transfer-listener")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=5.0)
            self._task = None
        for t in list(self._handshakes):
            t.cancel()
        close_quietly(self._sock)
        self._sock = None
        self._tokens.clear()

    def register(self, token: str, attach: Attach) -> None:
        self._tokens[token] = attach

    def unregister(self, token: str) -> None:
        self._tokens.pop(token, None)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                conn, _addr = await loop.sock_accept(self._sock)
            except OSError as exc:
                log.warning("kv transfer accept failed", error=repr(exc))
                await asyncio.sleep(0.1)  # e.g. out of file descriptors: don't spin
                continue
            tune(conn)
            if len(self._handshakes) >= self.max_pending:
                self.stats["refused"] += 1
                close_quietly(conn)
                continue
            task = asyncio.create_task(self._handshake(conn))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: socket.socket) -> None:
        reader = SockReader(conn)
        msg: Any = None
        try:
            async with asyncio.timeout(self.hello_timeout):
                msg = await reader.read_message(MAX_HELLO_FRAME)
            if not isinstance(msg, KvTransferHeader):
                raise TransferError(errors.BAD_MESSAGE, "first frame is not a transfer header")
            attach = self._tokens.pop(msg.token, None)
            if attach is None:
                raise TransferError(
                    errors.REFUSED,
                    f"transfer {msg.transfer_id}: unknown or already used token",
                    retryable=False,
                )
        except (TransferError, EOFError, OSError, TimeoutError) as exc:
            self.stats["refused"] += 1
            if isinstance(exc, TransferError):
                tid = msg.transfer_id if isinstance(msg, KvTransferHeader) else ""
                with contextlib.suppress(OSError, TimeoutError):
                    async with asyncio.timeout(1.0):
                        await send_all(conn, frame(KvTransferAck(
                            transfer_id=tid, ok=False,
                            error=ErrorInfo(code=exc.code, message=exc.message))))
            log.info("kv transfer connection refused", error=repr(exc))
            close_quietly(conn)
            return
        except BaseException:
            close_quietly(conn)
            raise
        self.stats["accepted"] += 1
        attach(msg, conn, reader)
