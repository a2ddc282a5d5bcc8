"""A worker's KV transfer endpoint: receive sessions (decode side), send sessions (prefill
side), over NATS chunks or a direct TCP stream. Protocol: proto/transfer.py.

One `KvTransferHub` per worker process: one NATS subscription for the transfers it receives
(`proto.subjects.kv_transfer_rx_all`), one for the credits and acks of those it sends
(`kv_transfer_tx_all`), and optionally a TCP listener; messages are handed to their session
by transfer id. Every wait has a deadline: a transfer's own (overall) and an idle timeout
(no progress from the peer for that long means it is gone), so a dead peer costs at most the
idle timeout, never a hang. Memory is bounded on both ends by the receiver's window: the
sender never has more than `window_bytes` sent and not credited, and the receiver refuses a
chunk that would make it hold more.

Receiving (decode side)::

    rx = await hub.open_receive(request_id, on_blocks=import_run, expected_hashes=hashes,
                                layout=my_layout, deadline_s=30.0)
    target = rx.target                      # put it in the remote-prefill request
    result = await rx.wait()                # TransferError on any failure; rx.cancel() to stop

Sending (prefill side)::

    result = await hub.send(target, request_id=..., hashes=..., parent_hash=None,
                            block_size=16, layout=layout, source=read_blocks)
    # returns once the receiver acked every block (TransferError otherwise): unpin then

`on_blocks(run)` is awaited for each `BlockRun` in order; while it runs the next chunks keep
arriving (up to the window), which is the pipelining. `source(first, count)` returns `count`
block payloads (bytes-like, bytes_per_block each) from block `first` of the transfer; it is
called window by window, so the sender never holds the whole KV. Payload views handed to
`on_blocks` are valid during the call only (TCP chunk buffers are reused): copy to keep.
`source` may be asked for the same blocks twice (a transfer retried on a new connection when
its pooled one was found dead; tcp.py): it reads computed blocks (held by their request,
then pinned), so it gives the same bytes. `source` may wait for blocks that are still being
computed (genset.disagg pipelines the send with the prefill: it starts once the first
blocks exist, and each later group waits for the step that computes it), but the receiver's
idle timeout runs from the header on, so call `send` once computing has begun, not while
the prompt queues. Before the header only the deadline bounds the wait, until the receiver
learns by other means that the sender is done computing (`rx.expect_header()`: the idle
timeout then runs from that moment). The TCP listener binds loopback unless `tcp_host` says
otherwise (workers on other hosts: bind an interface, `advertise_host` the address peers use).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
import xxhash
from nats.aio.msg import Msg

from genset.runtime.bus import Bus
from genset.runtime.bus_errors import BusError
from genset.transfer import errors
from genset.transfer.assembly import (
    Assembler,
    BlockRun,
    Payload,
    check_header,
    chunk_size_for,
    effective_window,
    group_checksum,
    plan_groups,
    split_parts,
)
from genset.transfer.errors import TransferError
from genset.transfer.tcp import (
    BufferPool,
    ConnPool,
    SockReader,
    TcpListener,
    close_quietly,
    connect,
    decode_message,
    frame,
    linger_close,
    send_all,
)
from proto import encode, subjects
from proto.transfer import (
    KvLayout,
    KvTransferAbort,
    KvTransferAck,
    KvTransferChunk,
    KvTransferCredit,
    KvTransferHeader,
    KvTransferTarget,
    TcpEndpoint,
)

log = structlog.get_logger("genset.transfer")

OnBlocks = Callable[[BlockRun], Awaitable[Any]]
BlockSource = Callable[[int, int], Awaitable[Sequence[Payload]]]

NATS = "nats"
TCP = "tcp"
MiB = 1024 * 1024
# The first chunk of a transfer is at most this big (assembly.plan_groups): its checksum is
# computed before any byte leaves; for an 8 MiB chunk that was ~0.3 ms at the start of
# every transfer, for 1 MiB ~0.04 ms.
FIRST_CHUNK_BYTES = 1 * MiB
# NATS sends a status message (header Status: 503) to a request's reply subject when nobody
# subscribes to the request's subject.
_STATUS = "Status"
_NO_RESPONDERS = "503"
# A peer's transfer id goes into the subjects this worker publishes to. The receiver makes 16
# hex digits; a peer's is held to one subject token of at most 64 characters: a subject past
# the server's control line (4 KiB by default) makes it close the publisher's connection, and
# nats-py does not reopen a connection the server closed with an error (the worker would be
# off the bus for good).
_TRANSFER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(slots=True)
class TransferResult:
    """How a finished transfer went (either side). `seconds`: from the header to the ack
    (sender) or to the last import (receiver); `high_water_bytes`: the most bytes this side
    held for it at once (sender: sent and not credited; receiver: received and not
    imported). `fallback`: why a TCP transfer went over NATS instead, if it did."""

    transfer_id: str
    transport: str
    blocks: int
    bytes: int
    chunks: int
    seconds: float
    high_water_bytes: int
    fallback: str | None = None

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


class _Failed:
    """Queue sentinel: the session failed with `error`."""

    __slots__ = ("error",)

    def __init__(self, error: TransferError) -> None:
        self.error = error


class _NatsLink:
    __slots__ = ("bus", "subject")

    def __init__(self, bus: Bus, subject: str) -> None:
        self.bus = bus
        self.subject = subject

    async def send(self, message: Any) -> None:
        if not self.subject:
            return
        try:
            await self.bus.publish(self.subject, message)
        except (BusError, OSError) as exc:
            raise TransferError(errors.PEER_GONE, f"cannot publish to the peer: {exc}") from None


class _TcpLink:
    __slots__ = ("sock", "timeout")

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout

    async def send(self, message: Any) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await send_all(self.sock, frame(message))
        except (OSError, TimeoutError) as exc:
            raise TransferError(errors.PEER_GONE, f"cannot write to the peer: {exc!r}") from None


class KvReceiver:
    """One incoming transfer (decode side). Made by `KvTransferHub.open_receive`."""

    def __init__(
        self,
        hub: KvTransferHub,
        *,
        request_id: str,
        on_blocks: OnBlocks,
        expected_hashes: Sequence[int] | None,
        first_block: int,
        layout: KvLayout | None,
        window_bytes: int,
        deadline_s: float,
        idle_timeout_s: float,
    ) -> None:
        self.hub = hub
        self.transfer_id = secrets.token_hex(8)
        self.request_id = request_id
        self.on_blocks = on_blocks
        self.expected = list(expected_hashes) if expected_hashes is not None else None
        self.first_block = first_block
        self.layout = layout
        self.window_bytes = window_bytes
        self.idle_timeout = idle_timeout_s
        self._loop = asyncio.get_running_loop()
        self.deadline = self._loop.time() + deadline_s
        self.token = secrets.token_hex(16) if hub.listener is not None else ""
        self.transport: str | None = None
        self.assembler: Assembler | None = None
        self.imported_blocks = 0
        self.chunks = 0
        self._link: _NatsLink | _TcpLink | None = None
        # (chunk, its bytes, the pooled buffer holding them or None, their XXH3-64 if
        # already computed)
        self._queue: deque[tuple[KvTransferChunk, Payload, bytearray | None, int | None]
                           | _Failed]
        self._queue = deque()
        self._wake = asyncio.Event()
        self._error: TransferError | None = None
        self._tell_sender = True  # whether a failure is sent to the sender as a nack
        self._started_at: float | None = None
        # when the header is due at the latest (`expect_header`; None: the deadline only)
        self._header_due: float | None = None
        self._sock: socket.socket | None = None
        self._reader_task: asyncio.Task | None = None
        self._task: asyncio.Task | None = None
        self._result: asyncio.Future[TransferResult] = self._loop.create_future()
        self._result.add_done_callback(_retrieve)
        tcp = None
        if hub.listener is not None:
            tcp = TcpEndpoint(host=hub.listener.advertise_host, port=hub.listener.port,
                              token=self.token)
        self.target = KvTransferTarget(
            transfer_id=self.transfer_id,
            worker_id=hub.worker_id,
            subject=subjects.kv_transfer_rx(hub.bus.namespace, hub.worker_id, self.transfer_id),
            window_bytes=window_bytes,
            first_block=first_block,
            tcp=tcp,
            layout=layout,
            deadline_ms=int(time.time() * 1000 + deadline_s * 1000),
        )

    # -- the owner's side -----------------------------------------------------------------

    @property
    def held_bytes(self) -> int:
        """Bytes received and not yet imported (0 once the transfer has ended)."""
        return self.assembler.held_bytes if self.assembler is not None else 0

    @property
    def done(self) -> bool:
        return self._result.done()

    async def wait(self) -> TransferResult:
        """Until every block is imported; raises TransferError otherwise. Never outlives the
        transfer's deadline (plus the time to tell the sender)."""
        return await asyncio.shield(self._result)

    def expect_header(self) -> None:
        """The sender is ready to send (genset.disagg: its first token came, so its prefill
        is over): from now on, silence before the header counts as silence after it, and
        no header within the idle timeout fails the transfer (kv_peer_gone). Before, a
        sender that answered and then never sent its header held the receiver until the
        whole deadline (the first token's and the transfer's together: ~40 s). No effect
        once the header has come."""
        if self.assembler is not None or self._header_due is not None or self.done:
            return
        self._header_due = self._loop.time() + self.idle_timeout
        self._wake.set()  # the wait for the header takes the nearer bound

    async def cancel(self, reason: str = "cancelled by the receiver") -> None:
        """Stop (client cancel, shutdown): the sender is told, buffers are dropped."""
        self._fail(TransferError(errors.CANCELLED, reason))
        task = self._task
        if task is not None and not task.done():
            # the consumer sees the failure after the import in progress (bounded by the
            # deadline); past close_timeout it is cancelled, which frees everything too
            _, pending = await asyncio.wait([task], timeout=self.hub.close_timeout)
            if pending:
                task.cancel()
                await asyncio.wait([task], timeout=self.hub.close_timeout)

    # -- fed by the hub -------------------------------------------------------------------

    def _start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"kv-rx-{self.transfer_id}")

    def _on_header(self, header: KvTransferHeader, link: _NatsLink | _TcpLink,
                   transport: str) -> KvTransferCredit | KvTransferAck:
        """Accept or refuse a header; returns the reply for the sender."""
        try:
            if self._result.done() or self._error is not None:
                raise TransferError(errors.CANCELLED, "the receiver already gave up",
                                    retryable=True)
            if self.assembler is not None:
                raise TransferError(errors.BAD_MESSAGE, "a second header for this transfer")
            self._check_header(header)
            if transport == NATS:
                # credits and the ack go there: only the sender's own control subject (any
                # other would make this worker publish where the header says, _TRANSFER_ID)
                want = subjects.kv_transfer_tx(self.hub.ns, header.sender_id, self.transfer_id)
                if header.reply_subject != want:
                    raise TransferError(
                        errors.BAD_MESSAGE, f"reply subject {_clip(header.reply_subject)} is "
                        f"not sender {header.sender_id:x}'s control subject for this transfer")
        except TransferError as exc:
            if self.assembler is None:  # a stray second header leaves the live one alone
                self._fail(exc, tell_sender=False)
            return KvTransferAck(transfer_id=header.transfer_id, ok=False, error=exc.info())
        self.assembler = Assembler(header, self.window_bytes)
        self._link = link
        self.transport = transport
        self._started_at = self._loop.time()
        self._wake.set()
        return KvTransferCredit(transfer_id=self.transfer_id)

    def _check_header(self, h: KvTransferHeader) -> None:
        check_header(h)
        if h.transfer_id != self.transfer_id:
            raise TransferError(errors.BAD_MESSAGE, f"header for transfer {h.transfer_id}")
        if h.request_id != self.request_id:
            raise TransferError(
                errors.HASH_MISMATCH,
                f"header for request {h.request_id!r}, this transfer is for {self.request_id!r}",
            )
        if self.layout is not None and h.layout != self.layout:
            raise TransferError(
                errors.LAYOUT_MISMATCH,
                f"KV layout {_describe(h.layout)} cannot be imported here ({_describe(self.layout)})",
            )
        if self.expected is not None:
            end = h.first_block + h.num_blocks
            want = self.expected[h.first_block : end]
            parent = self.expected[h.first_block - 1] if h.first_block > 0 else None
            if want != h.hashes or (h.num_blocks and h.parent_hash != parent):
                raise TransferError(
                    errors.HASH_MISMATCH,
                    f"blocks {h.first_block}..{end - 1} of request {self.request_id!r} do not "
                    "chain to this request's prompt (different tokens or block size?)",
                )

    def _on_chunk(self, chunk: KvTransferChunk, data: Payload | None) -> bool:
        """Admit a chunk (data None: its bytes follow on TCP and are read by the caller once
        admitted). False when it is refused (the session failed)."""
        if self._error is not None or self._result.done():
            return False
        if self.assembler is None:
            self._fail(TransferError(errors.BAD_MESSAGE, "chunk before the header"))
            return False
        try:
            self.assembler.admit(chunk)
        except TransferError as exc:
            self._fail(exc)
            return False
        if data is not None:
            self._push(chunk, data)
        return True

    def _push(self, chunk: KvTransferChunk, data: Payload, pooled: bytearray | None = None,
              digest: int | None = None) -> None:
        self._queue.append((chunk, data, pooled, digest))
        self._wake.set()

    def _fail(self, error: TransferError, *, tell_sender: bool = True) -> None:
        if self._error is not None or self._result.done():
            return
        self._error = error
        self._tell_sender = tell_sender
        self._queue.clear()
        self._queue.append(_Failed(error))
        self._wake.set()
        if self._task is None:  # never started: settle here
            self._finish_failed(error)

    async def _tcp_session(self, header: KvTransferHeader, sock: socket.socket,
                           reader: SockReader) -> bool:
        """Runs in the listener's task for the connection (no task of its own: one task
        start and hand-over less per transfer). True when the transfer ended well and the
        connection may carry the next one (tcp.Attach)."""
        self._reader_task = asyncio.current_task()
        link = _TcpLink(sock, self.idle_timeout)
        reply = self._on_header(header, link, TCP)
        if isinstance(reply, KvTransferAck):  # refused: say why, then close
            try:
                with contextlib.suppress(TransferError):
                    await link.send(reply)
            finally:  # (also when the listener is closing: this task owns the socket now)
                self.hub._close_socket(sock, linger=True)  # chunks may already be coming
            return False
        # accepted: no credit is sent for it over TCP (the sender streams the first window
        # without waiting for one; it cost a write here and a read and a wake-up there per
        # transfer, ~10% of a 1 MB transfer's CPU)
        self._sock = sock
        try:
            while True:
                msg = await reader.read_message()
                if isinstance(msg, KvTransferChunk):
                    if not self._on_chunk(msg, None):
                        return
                    buf = self.hub.buffers.get(msg.size)
                    view = memoryview(buf)[: msg.size]
                    hasher = xxhash.xxh3_64()
                    await reader.read_into(view, hasher)
                    self._push(msg, view, buf, hasher.intdigest())
                    if msg.last:
                        return await self._ended_well()
                    # let the consumer import it and send its credit now: when the socket
                    # keeps having data this loop never waits, and credits held back until it
                    # does stall the sender (measured: 64 MB through a 32 MB window in one
                    # process took ~30% longer without this yield)
                    await asyncio.sleep(0)
                elif isinstance(msg, KvTransferAbort):
                    self._fail(TransferError.from_info(msg.error, "the sender aborted: "),
                               tell_sender=False)
                    return False
                else:
                    raise TransferError(errors.BAD_MESSAGE,
                                        f"unexpected {type(msg).__name__} from the sender")
        except EOFError:
            got = self.assembler.received if self.assembler else 0
            self._fail(TransferError(
                errors.TRUNCATED,
                f"transfer {self.transfer_id}: the sender's connection closed after {got} of "
                f"{header.total_bytes} bytes"), tell_sender=False)
        except TransferError as exc:
            self._fail(exc)
        except OSError as exc:
            self._fail(TransferError(errors.PEER_GONE, f"connection to the sender failed: {exc!r}"),
                       tell_sender=False)
        return False

    async def _ended_well(self) -> bool:
        """After the last chunk: until the consumer has imported it and acked (its deadline
        bounds that). True when it did: the connection goes back to the listener for the
        next transfer. On a failure `_cleanup` cancels this task and closes the socket."""
        left = self.deadline - self._loop.time() + self.hub.close_timeout
        await asyncio.wait([self._result], timeout=max(left, 0.0))
        # released by `_cleanup(release=True)` once the ack is written
        return self._sock is None and self._result.done() and self._result.exception() is None

    # -- the consumer ---------------------------------------------------------------------

    async def _wait(self, what: str, quiet_until: float | None) -> None:
        """Until `_wake` is set; TransferError at the deadline, or (kv_peer_gone) at
        `quiet_until`, the end of the silence allowed (None: the deadline only)."""
        if self._wake.is_set():
            return
        now = self._loop.time()
        left = self.deadline - now
        if left <= 0:
            raise TransferError(errors.DEADLINE, f"transfer {self.transfer_id}: deadline "
                                f"passed waiting for {what}")
        wait = left if quiet_until is None else min(left, quiet_until - now)
        try:
            if wait <= 0:
                raise TimeoutError
            async with asyncio.timeout(wait):
                await self._wake.wait()
        except TimeoutError:
            if self._loop.time() >= self.deadline - 1e-3:
                raise TransferError(errors.DEADLINE, f"transfer {self.transfer_id}: deadline "
                                    f"passed waiting for {what}") from None
            raise TransferError(errors.PEER_GONE, f"transfer {self.transfer_id}: no {what} "
                                f"from the sender for {self.idle_timeout:g} s") from None

    async def _run(self) -> None:
        try:
            while self.assembler is None:
                self._wake.clear()
                if self._queue:
                    item = self._queue.popleft()
                    assert isinstance(item, _Failed)
                    raise item.error
                # the sender may still be prefilling (the deadline only), until it says it
                # is done (`expect_header`: then the idle timeout too)
                await self._wait("header", self._header_due)
            asm = self.assembler
            credited = 0
            while not asm.complete:
                if not self._queue:
                    self._wake.clear()
                    await self._wait("chunk", self._loop.time() + self.idle_timeout)
                    continue
                item = self._queue.popleft()
                if isinstance(item, _Failed):
                    raise item.error
                chunk, data, pooled, digest = item
                self.chunks += 1
                run = None
                for run in asm.assemble(chunk, data, digest):
                    await self._import(run)
                    asm.consumed(run.nbytes)
                    self.imported_blocks += len(run.hashes)
                del item, data, run
                if pooled is not None:
                    # the importer is done with the views into it (the on_blocks contract)
                    self.hub.buffers.put(pooled)
                # Credit every quarter window, and whenever nothing more is queued (the
                # sender may be waiting on it: so it never waits for a credit we hold back).
                # One credit per chunk cost a message and a wake-up on each side per chunk.
                if (not asm.complete and self._link is not None and (
                        not self._queue or asm.consumed_bytes - credited >= asm.window // 4)):
                    credited = asm.consumed_bytes
                    await self._link.send(KvTransferCredit(
                        transfer_id=self.transfer_id, consumed_bytes=credited,
                        imported_blocks=self.imported_blocks))
            result = TransferResult(
                transfer_id=self.transfer_id,
                transport=self.transport or "",
                blocks=self.imported_blocks,
                bytes=asm.received,
                chunks=self.chunks,
                seconds=self._loop.time() - (self._started_at or self._loop.time()),
                high_water_bytes=asm.high_water,
            )
            if self._link is not None:
                with contextlib.suppress(TransferError):  # imported either way; the
                    await self._link.send(KvTransferAck(  # sender's pins expire
                        transfer_id=self.transfer_id, ok=True,
                        imported_blocks=self.imported_blocks, received_bytes=asm.received))
            self._cleanup(release=True)
            if not self._result.done():
                self._result.set_result(result)
        except TransferError as exc:
            if self._error is None:
                self._error = exc
                self._tell_sender = True
            await self._end_failed(self._error)
        except asyncio.CancelledError:
            await self._end_failed(TransferError(errors.CANCELLED, "the receiver stopped"))
            raise
        except Exception as exc:  # a bug here must still free everything
            log.exception("kv receive failed", transfer_id=self.transfer_id)
            await self._end_failed(TransferError(errors.IMPORT_FAILED, repr(exc)))

    async def _import(self, run: BlockRun) -> None:
        left = self.deadline - self._loop.time()
        try:
            async with asyncio.timeout(max(left, 0.0)):
                await self.on_blocks(run)
        except TimeoutError:
            raise TransferError(errors.DEADLINE, f"transfer {self.transfer_id}: deadline "
                                "passed while importing") from None
        except TransferError:
            raise
        except Exception as exc:
            raise TransferError(errors.IMPORT_FAILED,
                                f"importing blocks {run.first_block}..: {exc!r}") from None

    async def _end_failed(self, error: TransferError) -> None:
        link = self._link
        if link is not None and self._tell_sender:
            with contextlib.suppress(TransferError, OSError):
                async with asyncio.timeout(1.0):
                    await link.send(KvTransferAck(
                        transfer_id=self.transfer_id, ok=False,
                        imported_blocks=self.imported_blocks,
                        received_bytes=self.assembler.received if self.assembler else 0,
                        error=error.info()))
        self._finish_failed(error)

    def _finish_failed(self, error: TransferError) -> None:
        self._queue.clear()
        if self.assembler is not None:
            self.assembler.release_all()
        self._cleanup(linger=True)
        if not self._result.done():
            self._result.set_exception(error)

    def _cleanup(self, *, linger: bool = False, release: bool = False) -> None:
        """Forget the transfer and let go of its socket: closed (after a last message with
        `linger`), or with `release` (it ended well) left to the session task waiting in
        `_ended_well`, which hands it back to the listener for reuse."""
        self.hub._forget_receive(self)
        sock, self._sock = self._sock, None
        if sock is None:
            return
        task, self._reader_task = self._reader_task, None
        if release and task is not None and not task.done():
            return
        if task is not None and not task.done():
            # the socket is closed once the reader has let go of it (closing a socket a
            # pending read still polls is what the loops handle worst)
            task.cancel()
            task.add_done_callback(lambda _t: self.hub._close_socket(sock, linger))
        else:
            self.hub._close_socket(sock, linger)


class _SendSession:
    """The sender's side of one transfer: credits and the ack arrive here."""

    def __init__(self, transfer_id: str, window: int) -> None:
        self.transfer_id = transfer_id
        self.window = window
        self.credited = 0
        self.sent = 0
        self.high_water = 0
        self.ack: KvTransferAck | None = None
        self.error: TransferError | None = None
        self.wake = asyncio.Event()
        self.heard = False  # any message from the receiver yet
        self.clean_end = False  # TCP: the ack ended the stream, nothing after it

    def on_control(self, msg: Any) -> None:
        self.heard = True
        if isinstance(msg, KvTransferCredit):
            self.credited = max(self.credited, msg.consumed_bytes)
        elif isinstance(msg, KvTransferAck):
            self.ack = msg
        else:
            self.error = TransferError(errors.BAD_MESSAGE,
                                       f"unexpected {type(msg).__name__} from the receiver")
        self.wake.set()

    def fail(self, error: TransferError) -> None:
        if self.error is None:
            self.error = error
        self.wake.set()


class KvTransferHub:
    """A worker's KV transfer endpoint (see the module docstring).

    tcp_host: where the TCP listener binds (None: no direct TCP; receivers offer NATS only).
    window_bytes: each receive's window (the bytes a transfer may hold in this process).
    max_receives / max_sends: transfers at once; beyond, open_receive / send raise
    TransferError(kv_busy) and the request runs aggregated. nats_headroom: bytes of a NATS
    chunk kept for the message around the data. tcp_min_bytes: smaller transfers go over
    NATS even when TCP is offered (a connection costs a round trip and a socket).
    """

    def __init__(
        self,
        bus: Bus,
        worker_id: int,
        *,
        tcp_host: str | None = "127.0.0.1",
        tcp_port: int = 0,
        advertise_host: str | None = None,
        window_bytes: int = 32 * MiB,
        max_receives: int = 64,
        max_sends: int = 64,
        nats_headroom: int = 4096,
        nats_max_chunk: int | None = None,
        tcp_chunk_bytes: int = 8 * MiB,
        tcp_min_bytes: int = 1 * MiB,
        connect_timeout: float = 1.0,
        close_timeout: float = 5.0,
        tcp_pool_per_peer: int = 4,
        tcp_pool_total: int = 32,
        tcp_pool_idle_s: float = 30.0,
    ) -> None:
        if window_bytes < 1:
            raise ValueError(f"window_bytes must be >= 1, got {window_bytes}")
        self.bus = bus
        self.worker_id = worker_id
        self.window_bytes = window_bytes
        self.max_receives = max_receives
        self.max_sends = max_sends
        self.nats_headroom = nats_headroom
        self.nats_max_chunk = nats_max_chunk
        self.tcp_chunk_bytes = tcp_chunk_bytes
        self.tcp_min_bytes = tcp_min_bytes
        self.connect_timeout = connect_timeout
        self.close_timeout = close_timeout
        # idle cost: up to one window of chunk buffers kept for the next TCP receive
        self.buffers = BufferPool(window_bytes)
        self.listener = (TcpListener(tcp_host, tcp_port, advertise_host=advertise_host,
                                     reuse_idle_timeout=2 * tcp_pool_idle_s)
                         if tcp_host is not None else None)
        # idle connections to receivers, reused by the next send to the same one; receivers
        # keep theirs twice as long, so it is the sender's side that closes an idle one
        self.conn_pool = ConnPool(max_per_peer=tcp_pool_per_peer, max_total=tcp_pool_total,
                                  idle_timeout=tcp_pool_idle_s)
        self._sweeper: asyncio.Task | None = None
        self._receives: dict[str, KvReceiver] = {}
        self._sends: dict[str, _SendSession] = {}
        self._subs: list[Any] = []
        self._lingering: set[asyncio.Task] = set()  # sockets closing after a last message
        self._started = False
        self.stats = {"stale_messages": 0, "tcp_fallbacks": 0, "bad_messages": 0}

    @property
    def ns(self) -> str:
        return self.bus.namespace

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        nc = self.bus.nc
        # The handler only decodes, checks and queues (each session bounds what it holds by
        # its window), so nats-py's own queue stays short; this caps it when the loop is
        # stalled: beyond it nats-py drops messages, and the transfers hit end as lost chunks.
        limit = 4 * self.window_bytes + 64 * MiB
        self._subs.append(await nc.subscribe(
            subjects.kv_transfer_rx_all(self.ns, self.worker_id), cb=self._on_rx,
            pending_msgs_limit=1 << 20, pending_bytes_limit=limit))
        self._subs.append(await nc.subscribe(
            subjects.kv_transfer_tx_all(self.ns, self.worker_id), cb=self._on_tx,
            pending_msgs_limit=1 << 20))
        await self.bus.flush()
        if self.listener is not None:
            await self.listener.start()
        self._sweeper = asyncio.create_task(self._sweep(), name="kv-transfer-pool-sweeper")

    async def _sweep(self) -> None:
        """Close pooled connections that expired or that their receiver closed (a worker
        that left), also while no send comes to look at them."""
        pool = self.conn_pool
        while True:
            await asyncio.sleep(max(0.5, pool.idle_timeout / 4))
            pool.prune()

    async def close(self) -> None:
        """Fail every transfer in progress (the peers are told) and stop listening."""
        for rx in list(self._receives.values()):
            await rx.cancel("the receiver is shutting down")
        for tx in list(self._sends.values()):
            tx.fail(TransferError(errors.CANCELLED, "the sender is shutting down"))
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.wait([self._sweeper], timeout=self.close_timeout)
            self._sweeper = None
        self.conn_pool.close()
        if self.listener is not None:
            await self.listener.close()
        if self._lingering:
            await asyncio.wait(set(self._lingering), timeout=self.close_timeout)
        self._started = False

    # -- receiving ------------------------------------------------------------------------

    async def open_receive(
        self,
        request_id: str,
        *,
        on_blocks: OnBlocks,
        expected_hashes: Sequence[int] | None = None,
        first_block: int = 0,
        layout: KvLayout | None = None,
        window_bytes: int | None = None,
        deadline_s: float = 60.0,
        idle_timeout_s: float = 5.0,
    ) -> KvReceiver:
        """Get ready to receive a request's KV; `rx.target` goes to the sender.

        expected_hashes: the request's full block chain; the header's blocks must be exactly
        its blocks from `header.first_block` on (else kv_hash_mismatch). layout: what this
        engine imports (None: anything). deadline_s: the whole transfer, header included
        (the sender may still be prefilling); idle_timeout_s: the longest silence once the
        header has arrived, or once `rx.expect_header()` said it is due.
        """
        if not self._started:
            await self.start()
        if len(self._receives) >= self.max_receives:
            raise TransferError(errors.BUSY, f"{len(self._receives)} KV receives in progress")
        rx = KvReceiver(
            self, request_id=request_id, on_blocks=on_blocks, expected_hashes=expected_hashes,
            first_block=first_block, layout=layout,
            window_bytes=window_bytes or self.window_bytes, deadline_s=deadline_s,
            idle_timeout_s=idle_timeout_s,
        )
        self._receives[rx.transfer_id] = rx
        if self.listener is not None:
            self.listener.register(rx.token, rx._tcp_session)
        rx._start()
        return rx

    def _close_socket(self, sock: socket.socket, linger: bool) -> None:
        if not linger:
            close_quietly(sock)
            return
        task = asyncio.ensure_future(linger_close(sock))
        self._lingering.add(task)
        task.add_done_callback(self._lingering.discard)

    def _forget_receive(self, rx: KvReceiver) -> None:
        self._receives.pop(rx.transfer_id, None)
        if self.listener is not None and rx.token:
            self.listener.unregister(rx.token)

    async def _on_rx(self, msg: Msg) -> None:
        tid = msg.subject.rsplit(".", 1)[-1]
        rx = self._receives.get(tid)
        try:
            message = decode_message(msg.data)
        except TransferError as exc:
            self.stats["bad_messages"] += 1
            if rx is not None:
                rx._fail(exc)
            return
        if rx is None:
            self.stats["stale_messages"] += 1
            if isinstance(message, KvTransferHeader) and msg.reply:
                await self._reply(msg.reply, KvTransferAck(
                    transfer_id=tid, ok=False, error=TransferError(
                        errors.CANCELLED, f"no transfer {tid} here (ended or never opened)",
                    ).info()))
            return
        if isinstance(message, KvTransferChunk):
            rx._on_chunk(message, message.data)
        elif isinstance(message, KvTransferHeader):
            link = _NatsLink(self.bus, message.reply_subject)
            reply = rx._on_header(message, link, NATS)
            if msg.reply:
                await self._reply(msg.reply, reply)
        elif isinstance(message, KvTransferAbort):
            rx._fail(TransferError.from_info(message.error, "the sender aborted: "),
                     tell_sender=False)
        else:
            self.stats["bad_messages"] += 1

    async def _reply(self, subject: str, message: Any) -> None:
        with contextlib.suppress(BusError, OSError):
            await self.bus.publish(subject, message)

    # -- sending --------------------------------------------------------------------------

    async def _on_tx(self, msg: Msg) -> None:
        tid = msg.subject.rsplit(".", 1)[-1]
        tx = self._sends.get(tid)
        if tx is None:
            self.stats["stale_messages"] += 1
            return
        if msg.headers is not None and msg.headers.get(_STATUS) == _NO_RESPONDERS:
            tx.fail(TransferError(errors.PEER_GONE, f"no receiver for transfer {tid} (its "
                                  "worker is gone or the transfer was closed)"))
            return
        try:
            tx.on_control(decode_message(msg.data))
        except TransferError as exc:
            self.stats["bad_messages"] += 1
            tx.fail(exc)

    def nats_chunk_bytes(self) -> int:
        """Data bytes per NATS chunk: the server's max_payload (from its INFO) less headroom
        for the message around the data."""
        room = self.bus.nc.max_payload - self.nats_headroom
        if self.nats_max_chunk is not None:
            room = min(room, self.nats_max_chunk)
        if room < 1:
            raise TransferError(errors.BAD_MESSAGE,
                                f"server max_payload {self.bus.nc.max_payload} leaves no room "
                                f"for KV chunks (headroom {self.nats_headroom})")
        return room

    def check_target(self, target: KvTransferTarget) -> None:
        """TransferError(kv_bad_message) unless `target` names one receive of one worker:
        a transfer id that is a short subject token, and that worker's receive subject for
        it. What a peer puts there is where this worker publishes the KV (_TRANSFER_ID)."""
        tid = target.transfer_id
        if not _TRANSFER_ID.fullmatch(tid):
            raise TransferError(errors.BAD_MESSAGE, f"transfer id {_clip(tid)} is not a subject "
                                "token of 1 to 64 letters, digits, _ or -")
        want = subjects.kv_transfer_rx(self.ns, target.worker_id, tid)
        if target.subject != want:
            raise TransferError(errors.BAD_MESSAGE, f"target subject {_clip(target.subject)} is "
                                f"not worker {target.worker_id:x}'s receive subject for "
                                f"transfer {tid}")

    async def send(
        self,
        target: KvTransferTarget,
        *,
        request_id: str,
        hashes: Sequence[int],
        block_size: int,
        layout: KvLayout,
        source: BlockSource,
        parent_hash: int | None = None,
        first_block: int | None = None,
        deadline_s: float = 60.0,
        idle_timeout_s: float = 5.0,
        transport: str = "auto",
    ) -> TransferResult:
        """Send `hashes`' blocks (payloads from `source`) to `target`; returns once the
        receiver acked them all. transport: auto (TCP when offered, the KV is at least
        tcp_min_bytes and the connection succeeds within connect_timeout and is not closed
        by the receiver before it answers; else NATS) | nats
        | tcp (fail rather than fall back). Raises TransferError (the receiver's own when it
        refused or failed); on cancel the receiver is told."""
        if transport not in ("auto", NATS, TCP):
            raise ValueError(f"transport must be auto, nats or tcp, got {transport!r}")
        self.check_target(target)
        if len(self._sends) >= self.max_sends:
            raise TransferError(errors.BUSY, f"{len(self._sends)} KV sends in progress")
        if not self._started:
            await self.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_s
        if target.deadline_ms is not None:
            deadline = min(deadline, loop.time() + (target.deadline_ms / 1000 - time.time()))
        bpb = layout.bytes_per_block
        n = len(hashes)
        total = n * bpb
        window = effective_window(target.window_bytes, bpb)
        tid = target.transfer_id
        if tid in self._sends:
            raise TransferError(errors.BAD_MESSAGE, f"transfer {tid} is already being sent")

        use = NATS
        fallback: str | None = None
        key: tuple[str, int] | None = None
        sock: socket.socket | None = None
        reused = False
        if transport != NATS and target.tcp is not None and (
            transport == TCP or total >= self.tcp_min_bytes
        ):
            key = (target.tcp.host, target.tcp.port)
            sock = self.conn_pool.get(key)
            reused = sock is not None
            if sock is None:
                sock, fallback = await self._connect(target, transport, deadline)
            use = TCP if sock is not None else NATS
        elif transport == TCP:
            raise TransferError(errors.PEER_GONE, "the receiver offers no TCP endpoint")

        kw = dict(request_id=request_id, hashes=hashes, block_size=block_size, layout=layout,
                  source=source, parent_hash=parent_hash, first_block=first_block,
                  window=window, deadline=deadline, idle_timeout_s=idle_timeout_s)
        # (transport auto) a new connection the receiver dropped before saying a word goes
        # over NATS instead, below
        lost_to_nats = transport == "auto"
        try:
            return await self._send_once(
                target, use, sock, key, **kw, fallback=fallback, reusable=reused,
                fallback_lost=lost_to_nats)
        except _StaleConnection:
            pass
        if reused:
            # The pooled connection was dead (the receiver closed it while it sat idle, and
            # the close had not reached us yet): nothing of this transfer got through, so it
            # runs again, once, on a new connection (the token is still unused).
            sock, fallback = await self._connect(target, transport, deadline)
            try:
                return await self._send_once(
                    target, TCP if sock is not None else NATS, sock, key, **kw,
                    fallback=fallback, reusable=False, fallback_lost=lost_to_nats)
            except _StaleConnection:
                pass
        # A new connection closed before the receiver said anything: its listener refused
        # it (at its limit of connections that have not shown a token yet, which anyone who
        # reaches the port can fill with idle ones), so nothing got through and the receive
        # still waits for a header. Failing here made every large transfer to that worker
        # fail (its prompts all recomputed) for as long as the port was held.
        self.stats["tcp_fallbacks"] += 1
        return await self._send_once(
            target, NATS, None, None, **kw, reusable=False,
            fallback="the receiver closed the tcp connection before answering")

    async def _connect(self, target: KvTransferTarget, transport: str,
                       deadline: float) -> tuple[socket.socket | None, str | None]:
        """A new connection to the receiver's endpoint: (socket, None), or (None, why) to go
        over NATS instead (transport auto); TransferError when it must be TCP."""
        assert target.tcp is not None
        loop = asyncio.get_running_loop()
        try:
            timeout = max(0.0, min(self.connect_timeout, deadline - loop.time()))
            return await connect(target.tcp.host, target.tcp.port, timeout), None
        except (OSError, TimeoutError) as exc:
            if transport == TCP:
                raise TransferError(
                    errors.PEER_GONE,
                    f"cannot reach {target.tcp.host}:{target.tcp.port}: {exc!r}") from None
            self.stats["tcp_fallbacks"] += 1
            return None, f"tcp connect to {target.tcp.host}:{target.tcp.port} failed: {exc!r}"

    async def _send_once(
        self, target: KvTransferTarget, use: str, sock: socket.socket | None,
        key: tuple[str, int] | None, *, request_id: str, hashes: Sequence[int], block_size: int,
        layout: KvLayout, source: BlockSource, parent_hash: int | None, first_block: int | None,
        window: int, deadline: float, idle_timeout_s: float, fallback: str | None,
        reusable: bool, fallback_lost: bool = False,
    ) -> TransferResult:
        """One try of `send` over `sock` (TCP) or NATS. `reusable`: `sock` came from the pool;
        if it turns out dead before the receiver said anything, _StaleConnection. So too with
        `fallback_lost` for a new connection (the caller goes over NATS then)."""
        loop = asyncio.get_running_loop()
        tid = target.transfer_id
        if tid in self._sends:
            close_quietly(sock)
            raise TransferError(errors.BAD_MESSAGE, f"transfer {tid} is already being sent")
        bpb = layout.bytes_per_block
        n = len(hashes)
        total = n * bpb
        max_chunk = self.tcp_chunk_bytes if use == TCP else self.nats_chunk_bytes()
        chunk_bytes = chunk_size_for(max_chunk, window)
        header = KvTransferHeader(
            transfer_id=tid,
            request_id=request_id,
            sender_id=self.worker_id,
            reply_subject=(subjects.kv_transfer_tx(self.ns, self.worker_id, tid)
                           if use == NATS else ""),
            block_size=block_size,
            first_block=target.first_block if first_block is None else first_block,
            num_blocks=n,
            bytes_per_block=bpb,
            total_bytes=total,
            hashes=list(hashes),
            parent_hash=parent_hash,
            layout=layout,
            token=target.tcp.token if use == TCP and target.tcp is not None else "",
        )
        session = _SendSession(tid, window)
        self._sends[tid] = session
        reader_task: asyncio.Task | None = None
        tcp_sink: _TcpSink | None = None
        started = loop.time()
        chunks = 0
        ended_well = stale = False
        try:
            # Chunks follow the header at once, within the window, without waiting for the
            # receiver's answer (one round trip less before the first byte moves): a refusal
            # arrives as a nack while they travel, and what was sent is dropped.
            if use == TCP:
                assert sock is not None
                # the header goes out with the first chunk, in one write (one syscall and
                # one segment less per transfer; the receiver reads both in one go)
                tcp_sink = _TcpSink(sock, idle_timeout_s, prefix=frame(header))
                reader_task = asyncio.create_task(self._tcp_control(sock, session))
            else:
                # a request whose reply subject is our control subject: the answer, or the
                # server's no-responders status when nobody receives there, comes to _on_tx
                try:
                    await self.bus.nc.publish(target.subject, encode(header),
                                              reply=header.reply_subject)
                except Exception as exc:
                    raise TransferError(errors.PEER_GONE,
                                        f"sending the header failed: {exc!r}") from None
            sink = tcp_sink if tcp_sink is not None else _NatsSink(self.bus, target)
            chunks = await self._stream(session, header, source, sink, chunk_bytes, deadline,
                                        idle_timeout_s)
            await self._await(session, deadline, idle_timeout_s, "the final ack",
                              lambda: session.ack is not None)
            assert session.ack is not None
            _raise_nack(session.ack, "failed the transfer")
            ended_well = True
            return TransferResult(
                transfer_id=tid, transport=use, blocks=n, bytes=total, chunks=chunks,
                seconds=loop.time() - started, high_water_bytes=session.high_water,
                fallback=fallback,
            )
        except TransferError as exc:
            if reusable and session.ack is None and not session.heard and _conn_lost(exc):
                stale = True
                self.conn_pool.stats["stale"] += 1
                raise _StaleConnection from None
            if session.ack is None and reader_task is not None and exc.code == errors.PEER_GONE:
                # a write failed: the receiver may have refused and closed; its reason is
                # better than "connection reset" (the reader ends at its ack or at EOF)
                await asyncio.wait([reader_task], timeout=1.0)
            if (fallback_lost and use == TCP and session.ack is None and not session.heard
                    and _conn_lost(exc)):
                stale = True  # a new connection closed before a word: `send` tries NATS
                raise _StaleConnection from None
            if session.ack is not None and not session.ack.ok and not _from_receiver(exc):
                _raise_nack(session.ack, "stopped the transfer")
            if not _from_receiver(exc):
                await self._abort(use, sock, target, tid, exc, tcp_sink)
            raise
        except asyncio.CancelledError:
            await self._abort(use, sock, target, tid,
                              TransferError(errors.CANCELLED, "the sender was cancelled"),
                              tcp_sink)
            raise
        finally:
            self._sends.pop(tid, None)
            if reader_task is not None and not reader_task.done():  # (done at a good ack)
                reader_task.cancel()
                await asyncio.wait([reader_task], timeout=self.close_timeout)
            if sock is not None:
                if ended_well and session.clean_end and key is not None:
                    # acked, nothing else in the stream: the next transfer to this receiver
                    # reuses it (no connect, no accept)
                    self.conn_pool.put(key, sock)
                elif stale:
                    close_quietly(sock)
                else:  # after a failure the receiver may still be sending
                    self._close_socket(sock, linger=session.ack is None or not session.ack.ok)

    async def _stream(self, session: _SendSession, header: KvTransferHeader, source: BlockSource,
                      sink: _NatsSink | _TcpSink, chunk_bytes: int, deadline: float,
                      idle: float) -> int:
        bpb = header.bytes_per_block
        n = header.num_blocks
        total = header.total_bytes
        window = session.window
        tid = header.transfer_id
        loop = asyncio.get_running_loop()
        seq = 0
        offset = 0
        if total == 0:
            await sink.send(KvTransferChunk(transfer_id=tid, seq=0, offset=0, size=0,
                                            checksum=group_checksum([b""], 0, 0), last=True), ())
            return 1
        for group in plan_groups(n, bpb, chunk_bytes, FIRST_CHUNK_BYTES):
            size = group.count * bpb
            await self._await(session, deadline, idle, "credit from the receiver",
                              lambda size=size: session.sent - session.credited + size <= window)
            try:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    payloads = list(await source(group.first, group.count))
            except TimeoutError:
                raise TransferError(errors.DEADLINE, "deadline passed reading blocks") from None
            except TransferError:
                raise
            except Exception as exc:
                raise TransferError(errors.SOURCE_FAILED,
                                    f"reading blocks {group.first}..: {exc!r}") from None
            if len(payloads) != group.count or any(len(p) != bpb for p in payloads):
                raise TransferError(
                    errors.SOURCE_FAILED,
                    f"block source gave {len(payloads)} payloads of sizes "
                    f"{sorted({len(p) for p in payloads})} for {group.count} blocks of {bpb} bytes")
            for start, length in split_parts(size, chunk_bytes):
                if session.error is not None:
                    raise session.error
                if session.ack is not None:
                    _raise_nack(session.ack, "stopped the transfer")
                last = offset + length == total
                chunk = KvTransferChunk(
                    transfer_id=tid, seq=seq, offset=offset, size=length,
                    first_block=group.first + start // bpb,
                    checksum=group_checksum(payloads, start, length), last=last,
                )
                await sink.send(chunk, _slices(payloads, start, length))
                seq += 1
                offset += length
                session.sent = offset
                session.high_water = max(session.high_water, offset - session.credited)
            del payloads
        return seq

    async def _await(self, session: _SendSession, deadline: float, idle: float, what: str,
                     ready: Callable[[], bool]) -> None:
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        credited = session.credited
        while True:
            if session.error is not None:
                raise session.error
            if ready():
                return
            if session.ack is not None:
                _raise_nack(session.ack, "stopped the transfer")
            now = loop.time()
            if session.credited != credited:
                credited, quiet_since = session.credited, now
            if now >= deadline:
                raise TransferError(errors.DEADLINE, f"transfer {session.transfer_id}: deadline "
                                    f"passed waiting for {what}")
            if now - quiet_since >= idle:
                raise TransferError(errors.PEER_GONE, f"transfer {session.transfer_id}: no "
                                    f"{what} for {idle:g} s (the receiver is gone or stuck)")
            session.wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(deadline, quiet_since + idle) - now):
                    await session.wake.wait()

    async def _tcp_control(self, sock: socket.socket, session: _SendSession) -> None:
        reader = SockReader(sock)
        try:
            while True:
                session.on_control(await reader.read_message())
                if session.ack is not None:
                    session.clean_end = reader.buffered == 0
                    return
        except EOFError:
            session.fail(_lost("the receiver closed the connection"))
        except TransferError as exc:
            session.fail(exc)
        except OSError as exc:
            session.fail(_lost(f"connection to the receiver: {exc!r}"))

    async def _abort(self, use: str, sock: socket.socket | None, target: KvTransferTarget,
                     tid: str, error: TransferError, tcp_sink: _TcpSink | None = None) -> None:
        """Tell the receiver we gave up (best effort, bounded)."""
        msg = KvTransferAbort(transfer_id=tid, error=error.info())
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                if use == TCP and sock is not None:
                    # a header not sent yet (no chunk went out) goes first: the receiver
                    # learns why at once instead of waiting for a header until its deadline
                    prefix = tcp_sink.take_prefix() if tcp_sink is not None else b""
                    await send_all(sock, prefix, frame(msg))
                else:
                    await self.bus.publish(target.subject, msg)


class _NatsSink:
    __slots__ = ("bus", "subject")

    def __init__(self, bus: Bus, target: KvTransferTarget) -> None:
        self.bus = bus
        self.subject = target.subject

    async def send(self, chunk: KvTransferChunk, parts: Sequence[Payload]) -> None:
        if parts:
            chunk.data = parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) \
                else b"".join(parts)
        try:
            await self.bus.nc.publish(self.subject, encode(chunk))
        except Exception as exc:
            raise TransferError(errors.PEER_GONE, f"publishing chunk {chunk.seq}: {exc!r}") \
                from None


class _TcpSink:
    __slots__ = ("idle", "prefix", "sock")

    def __init__(self, sock: socket.socket, idle: float, prefix: bytes = b"") -> None:
        self.sock = sock
        self.idle = idle
        self.prefix = prefix  # sent before the first chunk, in the same write

    def take_prefix(self) -> bytes:
        prefix, self.prefix = self.prefix, b""
        return prefix

    async def send(self, chunk: KvTransferChunk, parts: Sequence[Payload]) -> None:
        try:
            async with asyncio.timeout(self.idle):
                await send_all(self.sock, self.take_prefix(), frame(chunk), *parts)
        except OSError as exc:
            raise _lost(f"writing chunk {chunk.seq} to the receiver: {exc!r}") from None
        except TimeoutError as exc:
            raise TransferError(errors.PEER_GONE,
                                f"writing chunk {chunk.seq} to the receiver: {exc!r}") from None


def _slices(payloads: Sequence[Payload], start: int, length: int) -> list[Payload]:
    """The payload pieces covering bytes [start, start+length) laid end to end."""
    out: list[Payload] = []
    pos = 0
    end = start + length
    for p in payloads:
        n = len(p)
        lo, hi = max(start, pos), min(end, pos + n)
        if lo < hi:
            out.append(p if (lo, hi) == (pos, pos + n) else memoryview(p)[lo - pos : hi - pos])
        pos += n
        if pos >= end:
            break
    return out


class _StaleConnection(Exception):
    """A pooled connection turned out dead before the receiver said anything."""


def _lost(message: str) -> TransferError:
    """PEER_GONE for a connection that failed (closed, reset), as opposed to a silent peer."""
    exc = TransferError(errors.PEER_GONE, message)
    exc.conn_lost = True  # type: ignore[attr-defined]
    return exc


def _conn_lost(exc: TransferError) -> bool:
    return getattr(exc, "conn_lost", False)


def _raise_nack(ack: KvTransferAck, what: str) -> None:
    if ack.ok:
        return
    info = ack.error
    if info is None:
        raise TransferError(errors.REFUSED, f"the receiver {what} without a reason")
    exc = TransferError.from_info(info, f"the receiver {what}: ")
    exc.from_receiver = True  # type: ignore[attr-defined]
    raise exc


def _from_receiver(exc: TransferError) -> bool:
    return getattr(exc, "from_receiver", False)


def _clip(text: str, limit: int = 80) -> str:
    """A peer's string for an error message, at most about `limit` characters."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} chars)"


def _describe(layout: KvLayout) -> str:
    shape = "x".join(map(str, layout.block_shape)) or "-"
    return (f"{layout.engine}/{layout.format or '-'}/{layout.dtype or '-'}/{shape}/"
            f"{layout.bytes_per_block}B")


def _retrieve(fut: asyncio.Future) -> None:
    # the owner may never call wait() (it cancelled); don't log "exception never retrieved"
    if not fut.cancelled():
        fut.exception()

