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

Connections are reused between a pair of workers: after a transfer ended well (the receiver
acked every block, nothing else is in the stream) the sender keeps the socket in a bounded
`ConnPool` and the receiver's connection task waits for the next header on it. Every transfer
still opens with a header carrying its own one-time token, checked as on a new connection; a
reused connection only saves the connect, the accept and the per-connection tasks (at 1 MB
that fixed cost was most of the gap to a raw socket copy, docs/benchmarks.md). Idle pooled
sockets are closed after `idle_timeout` (the sender's) or `reuse_idle_timeout` (the
receiver's, longer, so that it is almost always the sender that closes first), and a pooled
socket the peer closed (a worker that left) is noticed before it is used again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
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
# Reads go to the socket directly and through the loop only when it has nothing (the loop's
# sock_recv* always wait for a poll first: one loop iteration and two epoll_ctl per read,
# though on a busy connection the bytes are usually there already). After this many bytes
# read directly, one read goes through the loop anyway, so that a long chunk does not keep
# the loop's other tasks waiting.
_DIRECT_MAX = 4 * 1024 * 1024

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
            want = max(_RECV_SIZE, need)
            try:
                data = self.sock.recv(want)
            except (BlockingIOError, InterruptedError):
                data = await self._loop.sock_recv(self.sock, want)
            if not data:
                raise EOFError("connection closed by the peer")
            self._buf += data

    async def read_exact(self, n: int) -> bytes:
        await self._fill(n)
        out = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        return out

    async def read_into(self, view: memoryview, hasher: Any = None) -> None:
        """Fill `view` completely (buffered bytes first, then straight from the socket).
        `hasher` (an xxhash object) is fed each piece as it lands: the checksum is then
        computed while the rest is still arriving, not after the last byte (at 8 MiB
        chunks that was ~0.3 ms added to every transfer's end)."""
        have = min(len(self._buf) - self._pos, len(view))
        if have:
            view[:have] = self._buf[self._pos : self._pos + have]
            self._pos += have
            if hasher is not None:
                hasher.update(view[:have])
        pos = have
        recv_into = self._loop.sock_recv_into
        sock = self.sock
        direct = 0
        while pos < len(view):
            n = -1
            if direct < _DIRECT_MAX:
                try:
                    n = sock.recv_into(view[pos:])
                    direct += n
                except (BlockingIOError, InterruptedError):
                    pass
            if n < 0:
                n = await recv_into(sock, view[pos:])
                direct = 0
            if n == 0:
                raise EOFError(f"connection closed by the peer after {pos} of {len(view)} bytes")
            if hasher is not None:
                hasher.update(view[pos : pos + n])
            pos += n

    async def read_message(self, max_frame: int = MAX_FRAME) -> Any:
        (n,) = _LEN.unpack(await self.read_exact(4))
        if n > max_frame:
            raise TransferError(errors.BAD_MESSAGE, f"frame of {n} bytes, over {max_frame}")
        return decode_message(await self.read_exact(n))

    @property
    def buffered(self) -> int:
        """Bytes read from the socket and not consumed yet."""
        return len(self._buf) - self._pos


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


def peer_closed(sock: socket.socket) -> bool:
    """Whether an idle connection can no longer be used: the peer closed or reset it, or sent
    bytes nobody asked for (nothing may arrive on an idle transfer connection)."""
    try:
        sock.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return False  # open, nothing pending: usable
    except OSError:
        return True
    return True  # b"" (EOF) or unexpected bytes


class ConnPool:
    """The sender's idle connections to receivers, keyed by (host, port), for reuse by the
    next transfer to the same worker. Bounded: at most `max_per_peer` per receiver and
    `max_total` in all (the oldest go first); a socket idle for `idle_timeout` s or found
    closed by its peer is closed instead of reused. `clock` is injectable for tests."""

    def __init__(self, *, max_per_peer: int = 4, max_total: int = 32, idle_timeout: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_per_peer = max_per_peer
        self.max_total = max_total
        self.idle_timeout = idle_timeout
        self.clock = clock
        # (host, port) -> [(socket, idle since)], oldest first; the dict in LRU order
        self._idle: OrderedDict[tuple[str, int], list[tuple[socket.socket, float]]] = (
            OrderedDict())
        self.size = 0
        self.stats = {"reused": 0, "pooled": 0, "stale": 0, "expired": 0, "evicted": 0}

    def _closed_if_dead(self, sock: socket.socket, since: float, now: float) -> bool:
        """Close and count `sock` if it idled past the timeout or its peer closed it."""
        if now - since >= self.idle_timeout:
            self.stats["expired"] += 1
        elif peer_closed(sock):
            self.stats["stale"] += 1
        else:
            return False
        close_quietly(sock)
        return True

    def get(self, key: tuple[str, int]) -> socket.socket | None:
        """A live idle connection to `key` (taken out of the pool), or None."""
        conns = self._idle.get(key)
        now = self.clock()
        while conns:
            sock, since = conns.pop()  # the most recently used: the likeliest to be alive
            self.size -= 1
            if not self._closed_if_dead(sock, since, now):
                if not conns:
                    del self._idle[key]
                self.stats["reused"] += 1
                return sock
        self._idle.pop(key, None)
        return None

    def put(self, key: tuple[str, int], sock: socket.socket) -> None:
        if self.max_per_peer < 1 or self.max_total < 1:
            close_quietly(sock)
            return
        conns = self._idle.setdefault(key, [])
        self._idle.move_to_end(key)
        conns.append((sock, self.clock()))
        self.size += 1
        self.stats["pooled"] += 1
        if len(conns) > self.max_per_peer:
            old, _ = conns.pop(0)
            self.size -= 1
            self.stats["evicted"] += 1
            close_quietly(old)
        while self.size > self.max_total:  # the least recently used peer's oldest
            first = next(iter(self._idle))
            victims = self._idle[first]
            old, _ = victims.pop(0)
            self.size -= 1
            self.stats["evicted"] += 1
            close_quietly(old)
            if not victims:
                del self._idle[first]

    def prune(self) -> None:
        """Close what expired or what the peer closed (a worker that left)."""
        now = self.clock()
        for key in list(self._idle):
            keep = []
            for sock, since in self._idle[key]:
                if not self._closed_if_dead(sock, since, now):
                    keep.append((sock, since))
            self.size -= len(self._idle[key]) - len(keep)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    def close(self) -> None:
        for conns in self._idle.values():
            for sock, _ in conns:
                close_quietly(sock)
        self._idle.clear()
        self.size = 0


# A session that takes over an accepted connection: (header, socket, reader) -> whether the
# connection may carry another transfer (True: it is handed back to the listener, which
# waits for the next header on it; False: the session has closed it or will).
Attach = Callable[[KvTransferHeader, socket.socket, SockReader], Awaitable[bool]]


class TcpListener:
    """A receiving worker's TCP endpoint: sessions register a one-time token; a connection
    presenting it is handed to that session, and back once the session ended well, to wait
    for the next header (connection reuse, module docstring). Bound to loopback unless told
    otherwise (the project's rule: nothing listens beyond loopback unless asked).

    Bounds: at most `max_pending_connections` connections that have not presented a valid
    token yet (each must within `hello_timeout`), at most `max_idle_connections` idle reused
    ones (each closed after `reuse_idle_timeout`; only a connection that carried a transfer
    with a valid token becomes one); connections in a transfer are bounded by the registered
    tokens (the hub's max_receives). Each waiting connection buffers at most one header
    frame (MAX_HELLO_FRAME): (16 + 32) x 4 MiB at worst."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        advertise_host: str | None = None,
        hello_timeout: float = 5.0,
        max_pending_connections: int = 16,
        reuse_idle_timeout: float = 60.0,
        max_idle_connections: int = 32,
    ) -> None:
        self.host = host
        self.port = port
        self.advertise_host = advertise_host or host
        self.hello_timeout = hello_timeout
        self.max_pending = max_pending_connections
        self.reuse_idle_timeout = reuse_idle_timeout
        self.max_idle = max_idle_connections
        self._tokens: dict[str, Attach] = {}
        self._sock: socket.socket | None = None
        self._task: asyncio.Task | None = None
        self._conns: set[asyncio.Task] = set()
        self._pending = 0  # connections that have not presented a valid token yet
        self._idle = 0  # reused connections waiting for their next header
        self._closing = False
        self.stats = {"accepted": 0, "refused": 0, "reused": 0, "idle_closed": 0}

    @property
    def connections(self) -> int:
        return len(self._conns)

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
        self._closing = False
        self._task = asyncio.create_task(self._accept_loop(), name="kv-transfer-listener")

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=5.0)
            self._task = None
        conns = list(self._conns)
        for t in conns:
            t.cancel()
        if conns:
            await asyncio.wait(conns, timeout=5.0)
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
            if self._pending >= self.max_pending:
                self.stats["refused"] += 1
                close_quietly(conn)
                continue
            self._pending += 1
            task = asyncio.create_task(self._serve(conn))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    async def _serve(self, conn: socket.socket) -> None:
        """One connection: a header with a valid token, its session, and again while the
        sessions end well and the connection stays within the idle bounds."""
        reader = SockReader(conn)
        state = "pending"  # pending (no valid token yet) | idle (reused, waiting) | session
        own = True  # whether this task closes `conn` when it ends
        try:
            while True:
                msg: Any = None
                try:
                    timeout = self.hello_timeout if state == "pending" else self.reuse_idle_timeout
                    async with asyncio.timeout(timeout):
                        msg = await reader.read_message(MAX_HELLO_FRAME)
                    if not isinstance(msg, KvTransferHeader):
                        raise TransferError(errors.BAD_MESSAGE,
                                            "first frame is not a transfer header")
                    attach = self._tokens.pop(msg.token, None)
                    if attach is None:
                        raise TransferError(
                            errors.REFUSED,
                            f"transfer {msg.transfer_id}: unknown or already used token",
                            retryable=False,
                        )
                except (EOFError, OSError, TimeoutError) as exc:
                    if state == "idle" and reader.buffered == 0:
                        # a reused connection the sender closed, or idle too long: no
                        # transfer was on it, nothing to answer
                        self.stats["idle_closed"] += 1
                    else:
                        self.stats["refused"] += 1
                        log.info("kv transfer connection refused", error=repr(exc))
                    return
                except TransferError as exc:
                    self.stats["refused"] += 1
                    tid = msg.transfer_id if isinstance(msg, KvTransferHeader) else ""
                    with contextlib.suppress(OSError, TimeoutError):
                        async with asyncio.timeout(1.0):
                            await send_all(conn, frame(KvTransferAck(
                                transfer_id=tid, ok=False,
                                error=ErrorInfo(code=exc.code, message=exc.message))))
                    log.info("kv transfer connection refused", error=repr(exc))
                    return
                self.stats["reused" if state == "idle" else "accepted"] += 1
                state = self._enter(state, "session")
                own = False  # the session closes it unless it hands it back
                again = await attach(msg, conn, reader)
                if not again:
                    return
                own = True
                if self._closing or self._idle >= self.max_idle:
                    return
                state = self._enter(state, "idle")
        finally:
            self._enter(state, "done")
            if own:
                close_quietly(conn)

    def _enter(self, old: str, new: str) -> str:
        """Move a connection between the counted states."""
        if old == "pending":
            self._pending -= 1
        elif old == "idle":
            self._idle -= 1
        if new == "idle":
            self._idle += 1
        return new
