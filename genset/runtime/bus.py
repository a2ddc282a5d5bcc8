"""The NATS bus: one connection per process, pub/sub, unary and streamed requests, JetStream.

Every token of every request travels through `stream_request` / `serve_stream`, so the hot
path is kept lean: one wildcard subscription per process receives every reply inbox
(`<inbox prefix>.<n>`) and hands each frame to its stream by a dict lookup; frames are
published without a flush each (nats-py's flusher task coalesces writes).

Protocol of streamed replies (frames, heartbeats, cancel, errors): docs/protocol-streams.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.api
import nats.js.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

try:  # the PUB command builder nats-py itself uses (for Bus._publish_nowait)
    from nats.protocol.command import pub_cmd
except ImportError:  # another nats-py layout: the awaitable publish is used throughout
    pub_cmd = None

from genset.runtime import bus_errors as errors
from genset.runtime.streams import PUBLISH_FAILURES, ReplyStream, ResponseStream, UnaryWaiter
from proto import Cancel, ErrorInfo, ProtocolError, decode, encode, subjects

# The errors it raises are imported from one place, genset.runtime.bus_errors.
__all__ = ["ERROR_HEADER", "Bus"]

log = structlog.get_logger("genset.bus")

# A unary reply that is an error carries this header (value: the error code) and an encoded
# proto.ErrorInfo as payload.
ERROR_HEADER = "Genset-Error"
_STATUS = "Status"
_NO_RESPONDERS = "503"
_encode_cancel = msgspec.msgpack.Encoder().encode
# Bytes in the socket's user-space buffer above which `write_pending` leaves the write to
# nats-py's flusher (which waits for the buffer to drain).
_WRITE_BACKLOG = 1 << 20

Handler = Callable[[Msg], Awaitable[None]]
UnaryHandler = Callable[[bytes], Awaitable[Any]]
StreamHandler = Callable[[Any, ReplyStream], Awaitable[None]]


def _payload(message: Any) -> bytes:
    if isinstance(message, bytes | bytearray | memoryview):
        return bytes(message)
    return encode(message)


def _redact(servers: str | list[str]) -> str:
    """Server URLs for logs and errors, without credentials (nats://user:pass@host)."""
    urls = [servers] if isinstance(servers, str) else servers
    return ",".join(re.sub(r"//[^@/]*@", "//***@", url) for url in urls)


def _server(nc: NatsClient) -> str | None:
    url = nc.connected_url
    return f"{url.hostname}:{url.port}" if url else None


_INPUT_ERRORS = (nats.errors.BadSubjectError, nats.errors.MaxPayloadError)


def _input_error(exc: Exception, subject: str, size: int | None = None,
                 max_payload: int | None = None) -> errors.BusError:
    """nats-py's errors for bad input do not say what was wrong; these do."""
    if isinstance(exc, nats.errors.MaxPayloadError):
        return errors.BusError(f"message for {subject!r} is {size} bytes, over the server's "
                        f"max_payload of {max_payload} bytes")
    return errors.BusError(f"invalid NATS subject or queue {subject!r} (empty, whitespace, or a "
                    "misplaced wildcard)")


def _logged_handler_error(exc: Exception, subject: str) -> ErrorInfo:
    """`_handler_error`, logged: with its traceback when it is our own failure ("internal"),
    in one line when the request was refused."""
    error = _handler_error(exc)
    if error.code == "internal":
        log.exception("request handler failed", subject=subject)
    else:
        log.info("request refused", subject=subject, error=error.message)
    return error


def _handler_error(exc: BaseException) -> ErrorInfo:
    """What a requester is told when a handler raised `exc`."""
    if isinstance(exc, ProtocolError):
        return ErrorInfo(code="bad_request", message=str(exc))
    if isinstance(exc, errors.StreamError):
        return exc.error
    return ErrorInfo(code="internal", message=f"{type(exc).__name__}: {exc}")


class _DirectInbox:
    """Delivers every reply-inbox message synchronously, inside nats-py's reading task.

    nats-py hands a message for a subscription created with `future=` straight to
    `future.set_result(msg)` where it parses it, skipping the subscription's queue and task
    (meant for a one-reply request; it is called for every message while the subscription
    lives). Standing in for that future saves one task switch per frame, which is most of
    the wrapper's cost on a single stream (docs/benchmarks.md). Must never raise: it runs in
    the connection's reader.
    """

    __slots__ = ("_bus", "_routes")

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._routes = bus._routes

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False

    def set_result(self, msg: Msg) -> None:
        # Bus._route_reply inlined: this runs once per frame of every stream.
        entry = self._routes.get(msg.subject)
        if entry is None:
            self._bus.stats["stale_frames"] += 1
            return
        try:
            entry.on_msg(msg)
        except Exception:
            log.exception("reply frame routing failed", subject=msg.subject)


class _DirectSub:
    """A subscription whose messages are handled synchronously inside nats-py's reader, as
    `_DirectInbox` does for replies: no queue and no task switch per message. For handlers
    that only update in-memory state (a router's KV events, load reports, lifecycle): each
    message used to wake the subscription's own task, which in the router service was most
    of its ~0.13 ms of CPU per message (issue 15). Never raises (it runs in the reader)."""

    __slots__ = ("_handler",)

    def __init__(self, handler: Callable[[Msg], None]) -> None:
        self._handler = handler

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False

    def set_result(self, msg: Msg) -> None:
        try:
            self._handler(msg)
        except Exception:
            log.exception("subscription handler failed", subject=msg.subject)


class _ReadPacer:
    """Reads a connection's socket at most every `interval_s` while it is not `hurried`:
    between reads the transport is paused (`pause_reading`), so the kernel holds what
    arrives and the process is not woken for it; the next read takes all of it at once.

    For a process that only follows feeds (the router service, whose frontends decide
    locally first): each message used to wake it on its own, and a wake-up cost more than
    the message's own work (docs/benchmarks.md issue 15 §5j). A request arriving while paced
    waits up to `interval_s`, so the owner calls `hurry(seconds)` whenever it is asked
    something: reads are then immediate for that long. Installed on the connection's
    transport; again after a reconnect (a new transport)."""

    def __init__(self, bus: Bus, interval_s: float) -> None:
        self.bus = bus
        self.interval_s = interval_s
        self._hurry_until = 0.0
        self._last_read = -1e18
        self._woken = asyncio.Event()
        self.pauses = 0  # reads that waited (tests, metrics)

    def install(self) -> bool:
        transport = getattr(self.bus.nc, "_transport", None)
        reader = getattr(transport, "_io_reader", None)
        writer = getattr(transport, "_io_writer", None)
        if transport is None or getattr(transport, "_genset_paced", False) \
                or not hasattr(reader, "_buffer") or not hasattr(writer, "transport"):
            return False
        read = transport.read

        async def paced_read(buffer_size: int) -> bytes:
            loop = asyncio.get_running_loop()
            wait = self._last_read + self.interval_s - loop.time()
            if wait > 0 and loop.time() >= self._hurry_until and not reader._buffer:
                await self._pause(writer.transport, wait)
            data = await read(buffer_size)
            self._last_read = loop.time()
            return data

        transport.read = paced_read
        transport._genset_paced = True
        # the reader may be inside nats-py's own read now: count that as the latest read
        self._last_read = asyncio.get_running_loop().time()
        return True

    async def _pause(self, transport: asyncio.Transport, wait: float) -> None:
        self.pauses += 1
        self._woken.clear()
        try:
            transport.pause_reading()
        except Exception:  # closing: read as usual
            return
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._woken.wait()
        finally:
            with contextlib.suppress(Exception):
                transport.resume_reading()

    def hurry(self, seconds: float) -> None:
        """Read without pacing for the next `seconds`, starting now."""
        self._hurry_until = max(self._hurry_until,
                                asyncio.get_running_loop().time() + seconds)
        self._woken.set()


def _nowait_supported(nc: NatsClient) -> bool:
    """Whether this nats-py client has the internals `Bus._publish_nowait` relies on."""
    return (pub_cmd is not None and all(hasattr(nc, a) for a in (
        "_pending", "_pending_data_size", "_max_pending_size", "_max_payload", "_flush_queue",
        "_flusher_task", "stats", "is_connected", "is_draining_pubs")))


class Bus:
    """One NATS connection and everything genset does over it. Create with `Bus.connect`."""

    def __init__(self, nc: NatsClient, namespace: str, *, heartbeat_interval: float,
                 orphan_timeout: float) -> None:
        self.nc = nc
        self._nowait = _nowait_supported(nc)
        self._kick_scheduled = False
        self.namespace = namespace
        self.js = nc.jetstream()
        self.heartbeat_interval = heartbeat_interval
        self.orphan_timeout = orphan_timeout
        self._loop = asyncio.get_running_loop()
        # requester side: reply inbox -> ResponseStream | UnaryWaiter
        self._routes: dict[str, Any] = {}
        self._inbox_prefix = nc.new_inbox()
        self._inbox_seq = itertools.count()
        self._inbox_sub: Subscription | None = None
        self._cancel_subject = subjects.stream_cancel(namespace)
        # responder side
        self._reply_streams: dict[str, ReplyStream] = {}
        self._cancel_sub: Subscription | None = None
        self._heartbeat_task: asyncio.Task | None = None
        self._has_reply_streams = asyncio.Event()
        self._orphan_handle: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self.stats = {"stale_frames": 0, "bad_cancels": 0, "overloaded": 0, "disconnects": 0}
        # Set while connected; requesters wait on it to retry after a reconnect rather than
        # into a connection that is down (wait_connected).
        self._up = asyncio.Event()
        self._up.set()
        self._pacer: _ReadPacer | None = None  # pace_reads
        self._reconnected_at = -1e18  # loop.time() of the latest reconnect

    # -- connection -------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        servers: str | list[str],
        *,
        name: str,
        namespace: str = "default",
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        tls: ssl.SSLContext | bool | None = None,
        connect_timeout: float = 5.0,
        nkeys_seed: str | None = None,
        user_credentials: str | None = None,
        reconnect_time_wait: float = 0.25,
        reconnect_max_wait: float = 2.0,
        ping_interval: float = 5.0,
        heartbeat_interval: float = 0.5,
        orphan_timeout: float = 3.0,
        pending_size: int = 8 * 1024 * 1024,
        direct_inbox: bool = True,
        inbox_prefix: str | None = None,
    ) -> Bus:
        """Connect (trying for up to `connect_timeout` s), then stay connected: on loss,
        reconnect forever with exponential backoff from reconnect_time_wait up to
        reconnect_max_wait, with jitter so a fleet does not reconnect in lockstep.

        heartbeat_interval: silence after which this process's reply streams send a heartbeat
        (at most 1.25 intervals of silence go out). 0.5 s lets requesters presume a responder
        dead after 1.5 s of silence (the frontend's --heartbeat-timeout) with more than two
        heartbeats' margin; a heartbeat goes out only on a stream with nothing else to send
        (queued or prefilling), at ~40 bytes each.
        orphan_timeout: when NATS stays down this long, this process's reply streams are
        cancelled (their requesters have given up by then).
        direct_inbox: route reply frames inside nats-py's reader (see _DirectInbox); False
        uses an ordinary callback subscription (one more task switch per frame).
        inbox_prefix: where replies to this connection go; by default `_INBOX.<user>` for a
        user (genset.runtime.auth.inbox_prefix), so that NATS permissions can let each user
        read its own replies and nobody else's.
        """
        subjects.subject(namespace, "x", "x")  # a bad namespace fails here, before connecting
        nc = NatsClient()
        holder: list[Bus] = []
        where = _redact(servers)

        async def on_disconnected() -> None:
            if holder and holder[0]._closing:
                return
            log.warning("nats disconnected", servers=where, name=name)
            if holder:
                holder[0]._on_disconnected()

        async def on_reconnected() -> None:
            log.info("nats reconnected", server=_server(nc), name=name)
            if holder:
                holder[0]._on_reconnected()

        async def on_error(exc: Exception) -> None:
            log.warning("nats error", error=repr(exc), name=name)

        async def on_closed() -> None:
            log.debug("nats connection closed", name=name)

        def pick_server(pool: list, _info: dict) -> tuple[Any, float]:
            server = min(pool, key=lambda s: s.reconnects)
            backoff = min(reconnect_max_wait, reconnect_time_wait * 2 ** min(server.reconnects, 16))
            return server, backoff * random.uniform(0.5, 1.0)

        if tls is True:
            tls = ssl.create_default_context()
        options: dict[str, Any] = {
            "servers": servers,
            "name": name,
            "user": user,
            "password": password,
            "token": token,
            "tls": tls or None,
            "connect_timeout": connect_timeout,
            "reconnect_time_wait": reconnect_time_wait,
            "max_reconnect_attempts": -1,
            "reconnect_to_server_handler": pick_server,
            "ping_interval": ping_interval,
            "max_outstanding_pings": 2,
            "pending_size": pending_size,
            "drain_timeout": 5,  # close() must not hang on a dead connection
            "disconnected_cb": on_disconnected,
            "reconnected_cb": on_reconnected,
            "error_cb": on_error,
            "closed_cb": on_closed,
        }
        if inbox_prefix is None and user and re.fullmatch(r"[A-Za-z0-9_-]+", user):
            inbox_prefix = f"_INBOX.{user}"
        if inbox_prefix:
            options["inbox_prefix"] = inbox_prefix
        if nkeys_seed:
            options["nkeys_seed"] = nkeys_seed
        if user_credentials:
            options["user_credentials"] = user_credentials
        try:
            # nats-py retries the initial connect forever with max_reconnect_attempts=-1; the
            # overall deadline is ours.
            await asyncio.wait_for(nc.connect(**options), timeout=connect_timeout)
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            await nc.close()
            raise errors.BusError(
                f"cannot connect to NATS at {where} within {connect_timeout:g} s: {exc!r}"
            ) from None
        bus = cls(nc, namespace, heartbeat_interval=heartbeat_interval,
                  orphan_timeout=orphan_timeout)
        holder.append(bus)
        if direct_inbox:
            bus._inbox_sub = await nc.subscribe(bus._inbox_prefix + ".*",
                                                future=_DirectInbox(bus))
        else:
            bus._inbox_sub = await nc.subscribe(
                bus._inbox_prefix + ".*",
                cb=bus._on_inbox,
                pending_msgs_limit=1024 * 1024,
                pending_bytes_limit=256 * 1024 * 1024,
            )
        log.info("nats connected", server=_server(nc), name=name, namespace=namespace)
        return bus

    @property
    def connected(self) -> bool:
        return self.nc.is_connected

    @property
    def disconnects(self) -> int:
        """How many times the connection was lost so far: a requester that notes it before a
        request and sees it moved after a failure knows the bus, not the peer, failed."""
        return self.stats["disconnects"]

    def since_reconnect(self) -> float:
        """Seconds since the connection last came back (very large if it never dropped)."""
        return self._loop.time() - self._reconnected_at

    async def wait_connected(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until the connection is up, at most `timeout` s. True when it is (at once if
        it never dropped); False when it is not back in time or the bus is closing."""
        if self.nc.is_connected:
            return True
        if self._closing or self.nc.is_closed:
            return False
        # nats-py marks the connection down before our disconnected callback runs: do not
        # trust an event that callback has not cleared yet (the reconnected callback, which
        # sets it, runs only once the connection is up again).
        self._up.clear()
        try:
            async with asyncio.timeout(timeout):
                await self._up.wait()
        except TimeoutError:
            return False
        return self.nc.is_connected

    def _on_disconnected(self) -> None:
        self.stats["disconnects"] += 1
        self._up.clear()
        for entry in list(self._routes.values()):
            entry.on_disconnect("NATS connection lost")
        self._routes.clear()
        if self._reply_streams and self._orphan_handle is None:
            self._orphan_handle = self._loop.call_later(self.orphan_timeout, self._orphan_all)

    def _on_reconnected(self) -> None:
        self._reconnected_at = self._loop.time()
        if self._pacer is not None:
            self._pacer.install()  # a reconnect brings a new transport
        self._up.set()
        if self._orphan_handle is not None:
            self._orphan_handle.cancel()
            self._orphan_handle = None

    def _orphan_all(self) -> None:
        self._orphan_handle = None
        if self.nc.is_connected:
            return
        if self._reply_streams:
            log.warning("nats down too long, cancelling reply streams",
                        streams=len(self._reply_streams))
        for rs in self._reply_streams.values():
            rs.cancelled.set()

    async def close(self, *, grace: float = 1.0) -> None:
        """Stop: streams still being served are cancelled and their requesters get a final
        error frame `shutting_down` (retryable, so they can move on at once instead of
        waiting for the heartbeat timeout); handlers get `grace` s to finish; in-flight
        requests of our own end with Disconnected; pending publishes are flushed; the
        connection closes. Services drain before this, so normally nothing is cut here."""
        if self._closing:
            return
        self._closing = True
        self._up.set()  # nobody waits for a reconnect any more (wait_connected says False)
        self.hurry_reads(1e9)  # a paced reader would hold the drain's answers
        for rs in list(self._reply_streams.values()):
            rs.cancelled.set()  # first, so the handler's next send is StreamCancelled
            if not rs.finished:
                try:
                    await rs.fail(ErrorInfo(code="shutting_down", retryable=True,
                                            message="the responder is shutting down"))
                except errors.Disconnected:
                    pass
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=grace)
        for entry in list(self._routes.values()):
            entry.on_disconnect("bus closed")
        self._routes.clear()
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        if self._orphan_handle is not None:
            self._orphan_handle.cancel()
        if self.nc.is_connected:
            try:
                await self.nc.drain()
            except Exception as exc:  # drain can time out; closing anyway
                log.warning("nats drain failed", error=repr(exc))
        await self.nc.close()

    async def flush(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Return once the server has processed everything this connection sent so far.

        nats-py's own `nc.flush()` writes its PING straight to the socket, so it can
        overtake commands still in its write buffer (a SUB just sent): the PONG then proves
        nothing. Yielding first lets nats-py's flusher write that buffer; the second
        round trip covers a flusher that was busy. Does nothing while disconnected
        (subscriptions are replayed on reconnect).
        """
        if not self.nc.is_connected:
            return
        await asyncio.sleep(0)
        try:
            await self.nc.flush(timeout)
            await self.nc.flush(timeout)
        except nats.errors.Error as exc:
            log.warning("nats flush failed", error=repr(exc))

    # -- plain pub/sub -----------------------------------------------------------------------

    def _publish_nowait(self, subject: str, payload: bytes) -> bool:
        """Queue a PUB on the connection now, without a coroutine: what `nc.publish` does when
        it would not wait (connected, buffer below its limit), in the same order as the
        publishes before and after it (both append to the client's pending list at call
        time; its flusher writes the list out). False when that is not the case (or the
        client lacks the internals): the caller uses the awaitable publish. Why: a worker
        sends each engine step's frames from the step's delivery, without waking one task per
        request (ReplyStream.send_nowait); this is one reply frame's share of that.
        Reply subjects come from NATS itself, so they are not validated again."""
        nc = self.nc
        if not self._nowait or not nc.is_connected or nc.is_draining_pubs:
            return False
        size = len(payload)
        limit = nc._max_pending_size
        if size > nc._max_payload or (limit > 0 and nc._pending_data_size + size > limit):
            return False
        flusher = nc._flusher_task
        queue = nc._flush_queue
        if flusher is None or flusher.done() or queue is None:
            return False
        cmd = pub_cmd(subject, "", payload)
        stats = nc.stats
        stats["out_msgs"] += 1
        stats["out_bytes"] += size
        nc._pending.append(cmd)
        nc._pending_data_size += len(cmd)
        if not self._kick_scheduled:
            # Kick the flusher (as nc.publish does) from a callback of the next loop turn,
            # not now: the tasks this delivery woke send their frames in that turn, and the
            # flusher, woken by the callback, then writes all of the step's frames in one
            # write (kicked now it ran in the middle of them: two writes per step, two
            # wake-ups of nats-server and of the frontend).
            self._kick_scheduled = True
            asyncio.get_running_loop().call_soon(self._kick_flusher)
        return True

    def _write_now(self) -> None:
        """Hand what is queued on the connection to the socket now, rather than when nats-py's
        flusher task gets its turn. A request is sent when it is ready, not after every task
        that became ready before the flusher: in a burst of new requests the frontend's
        handlers (each tokenizing its prompt) ran first, and the burst's requests reached the
        workers together at its end (aiperf c=64: 40 requests sent over 0.5 s arrived at once;
        docs/benchmarks.md, issue 15 §5e). Order is kept: this writes the pending list in order,
        and the flusher writes what is queued after it. Nothing is written while the client is
        not connected (its reconnect buffer keeps the commands) or lacks the internals."""
        nc = self.nc
        if not self._nowait or not nc._pending_data_size or not nc.is_connected:
            return
        transport = getattr(nc, "_transport", None)
        if transport is None:
            return
        pending = nc._pending
        try:
            transport.writelines(pending)
        except Exception:  # the flusher writes them and reports the failure
            return
        nc._pending = []
        nc._pending_data_size = 0

    def publish_nowait(self, subject: str, message: Any) -> bool:
        """Queue a publish of a proto Struct (or bytes) now, without a coroutine, when the
        connection can take it at once (`_publish_nowait`); False: use `publish`. `subject`
        must be one of ours (it is not validated here)."""
        return self._publish_nowait(subject, _payload(message))

    def write_pending(self) -> None:
        """Write what is queued on the connection to the socket now (`_write_now`): a worker
        calls it at the end of each engine step's delivery, so that the step's frames and KV
        batch leave in one write without waking nats-py's flusher task. Not while the
        socket's own buffer is backed up (the server reads slower than we write): then
        nats-py's flusher, which waits for that buffer to drain, writes it, so what waits is
        bounded by the client's pending limit, not the socket buffer's growth."""
        writer = getattr(getattr(self.nc, "_transport", None), "_io_writer", None)
        transport = getattr(writer, "transport", None)
        try:
            if transport is not None and transport.get_write_buffer_size() > _WRITE_BACKLOG:
                return
        except Exception:  # a transport without the call: as _write_now decides
            pass
        self._write_now()

    def _kick_flusher(self) -> None:
        self._kick_scheduled = False
        queue = self.nc._flush_queue
        if queue is not None and queue.empty() and self.nc._pending_data_size:
            queue.put_nowait(asyncio.get_running_loop().create_future())

    async def publish(self, subject: str, message: Any) -> None:
        """Publish a proto Struct (encoded) or bytes (as is)."""
        payload = _payload(message)
        try:
            await self.nc.publish(subject, payload)
        except _INPUT_ERRORS as exc:
            raise _input_error(exc, subject, len(payload), self.nc.max_payload) from None

    async def subscribe(self, subject: str, handler: Handler, *, queue: str | None = None,
                        pending_msgs_limit: int = 65536) -> Subscription:
        """Call `await handler(msg)` for each message, one at a time; an exception is logged
        and the subscription goes on."""

        async def guarded(msg: Msg) -> None:
            try:
                await handler(msg)
            except Exception:
                log.exception("subscription handler failed", subject=msg.subject)

        try:
            sub = await self.nc.subscribe(subject, queue=queue or "", cb=guarded,
                                          pending_msgs_limit=pending_msgs_limit)
        except _INPUT_ERRORS as exc:
            raise _input_error(exc, subject) from None
        await self.flush()  # when this returns, messages published anywhere reach us
        return sub

    def pace_reads(self, interval_s: float) -> bool:
        """Read the socket at most every `interval_s` seconds, except for `hurry_reads`
        (`_ReadPacer`): for a process that mostly follows feeds. False when this nats-py's
        transport cannot be paced (reads go on as before)."""
        if interval_s <= 0:
            return False
        if self._pacer is None:
            self._pacer = _ReadPacer(self, interval_s)
        self._pacer.interval_s = interval_s
        return self._pacer.install() or getattr(self.nc._transport, "_genset_paced", False)

    def hurry_reads(self, seconds: float) -> None:
        """No pacing for the next `seconds` (this process was asked something)."""
        if self._pacer is not None:
            self._pacer.hurry(seconds)

    async def subscribe_direct(self, subject: str, handler: Callable[[Msg], None]) -> Subscription:
        """Call `handler(msg)` (a plain function) for each message, in arrival order, inside
        the connection's reader (`_DirectSub`): it must be quick and must not block; an
        exception is logged and the subscription goes on."""
        try:
            sub = await self.nc.subscribe(subject, future=_DirectSub(handler))
        except _INPUT_ERRORS as exc:
            raise _input_error(exc, subject) from None
        await self.flush()  # when this returns, messages published anywhere reach us
        return sub

    # -- requester side: inbox routing ------------------------------------------------------------

    def _route_reply(self, msg: Msg) -> None:
        entry = self._routes.get(msg.subject)
        if entry is None:
            self.stats["stale_frames"] += 1  # a stream that already ended; harmless
            return
        entry.on_msg(msg)

    async def _on_inbox(self, msg: Msg) -> None:
        self._route_reply(msg)

    def _new_inbox(self) -> str:
        return f"{self._inbox_prefix}.{next(self._inbox_seq):x}"

    async def _publish_cancel(self, stream_id: str, reason: str) -> None:
        try:
            await self.nc.publish(self._cancel_subject,
                                  _encode_cancel(Cancel(stream_id=stream_id, reason=reason)))
        except PUBLISH_FAILURES as exc:
            log.debug("cancel not sent", stream_id=stream_id, error=repr(exc))

    def _spawn_cancel(self, stream_id: str, reason: str) -> None:
        self._spawn(self._publish_cancel(stream_id, reason))

    def _unroute(self, inbox: str) -> None:
        self._routes.pop(inbox, None)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _check_open(self) -> None:
        if self._closing or self.nc.is_closed:
            raise errors.Disconnected("the bus is closed")

    # -- unary request / reply ---------------------------------------------------------------

    async def request(self, subject: str, message: Any, *, timeout: float,  # noqa: ASYNC109 (agreed API)
                      reply_type: type | None = None) -> Any:
        """Send one request and wait for one reply (decoded as reply_type, else bytes).

        Raises NoResponders, RequestTimeout, RemoteError (the handler failed), Disconnected,
        or ProtocolError (the reply does not decode as reply_type)."""
        self._check_open()
        inbox = self._new_inbox()
        waiter = UnaryWaiter(self._loop)
        self._routes[inbox] = waiter
        try:
            payload = _payload(message)
            try:
                await self.nc.publish(subject, payload, reply=inbox)
                self._write_now()
            except PUBLISH_FAILURES as exc:
                raise errors.Disconnected(f"cannot send request on {subject}: {exc!r}") from None
            except _INPUT_ERRORS as exc:
                raise _input_error(exc, subject, len(payload), self.nc.max_payload) from None
            try:
                msg = await asyncio.wait_for(waiter.future, timeout)
            except TimeoutError:
                raise errors.RequestTimeout(f"no reply on {subject} within {timeout:g} s") from None
        finally:
            self._routes.pop(inbox, None)
        headers = msg.headers
        if headers is not None:
            if headers.get(_STATUS) == _NO_RESPONDERS:
                raise errors.NoResponders(f"no responders on {subject}")
            if ERROR_HEADER in headers:
                raise errors.remote_error(self._decode_error(msg.data, headers[ERROR_HEADER]))
        if reply_type is None:
            return msg.data
        return decode(msg.data, reply_type)

    @staticmethod
    def _decode_error(data: bytes, code: str) -> ErrorInfo:
        try:
            return decode(data, ErrorInfo)
        except ProtocolError as exc:
            return ErrorInfo(code=code or "internal", message=f"undecodable error reply: {exc}")

    async def serve(self, subject: str, handler: UnaryHandler, *, queue: str | None = None,
                    max_concurrent: int = 1024) -> Subscription:
        """Answer requests: `await handler(data)` returns a Struct, bytes or None (no reply).
        Each request runs in its own task; a handler exception is sent back as an error
        reply (RemoteError at the requester) and the service goes on."""
        active = 0

        async def run(msg: Msg) -> None:
            nonlocal active
            try:
                result = await handler(msg.data)
                if result is not None and msg.reply:
                    await self.nc.publish(msg.reply, _payload(result))
            except Exception as exc:
                await self._reply_error(msg.reply, _logged_handler_error(exc, subject))
            finally:
                active -= 1

        async def on_request(msg: Msg) -> None:
            nonlocal active
            if active >= max_concurrent:
                self.stats["overloaded"] += 1
                await self._reply_error(msg.reply, ErrorInfo(
                    code="overloaded", retryable=True,
                    message=f"{subject}: {max_concurrent} requests already in progress"))
                return
            active += 1
            self._spawn(run(msg))

        try:
            sub = await self.nc.subscribe(subject, queue=queue or "", cb=on_request)
        except _INPUT_ERRORS as exc:
            raise _input_error(exc, subject) from None
        await self.flush()  # when this returns, requests reach us (no NoResponders)
        return sub

    async def serve_direct(self, subject: str, handler: Callable[..., Any], *,
                           queue: str | None = None, with_subject: bool = False
                           ) -> Subscription:
        """Answer requests with a plain function run inside the connection's reader
        (`_DirectSub`): `handler(data)` returns a Struct, bytes or None (no reply), and an
        exception is answered as an error reply, as `serve` does. The reply is queued at once
        (`_publish_nowait`) and written, with whatever the handler queued the same way (the
        offload store's KV events), in one socket write. For quick handlers that never wait:
        `serve` runs each request in a task of its own and its reply goes out on nats-py's
        flusher task, three task steps and two writes per request where this takes none and
        one (the offload store's puts, issue 15). One request at a time by construction, so
        there is no `max_concurrent`. A reply the connection cannot take at once
        (reconnecting, buffer full) goes by a task through the awaitable publish.
        `with_subject`: `handler(subject, data)`, the subject the request came on (a wildcard
        subscription's token that the server vouches for: the offload store's part sender)."""

        def on_request(msg: Msg) -> None:
            reply = msg.reply
            try:
                result = handler(msg.subject, msg.data) if with_subject else handler(msg.data)
            except Exception as exc:
                error = _logged_handler_error(exc, subject)
                if reply:
                    self._spawn(self._reply_error(reply, error))
                return
            if result is not None and reply:
                payload = _payload(result)
                if not self._publish_nowait(reply, payload):
                    self._spawn(self._publish_reply(reply, payload))
                    return
            self.write_pending()

        try:
            sub = await self.nc.subscribe(subject, queue=queue or "",
                                          future=_DirectSub(on_request))
        except _INPUT_ERRORS as exc:
            raise _input_error(exc, subject) from None
        await self.flush()  # when this returns, requests reach us (no NoResponders)
        return sub

    async def _publish_reply(self, reply: str, payload: bytes) -> None:
        try:
            await self.nc.publish(reply, payload)
        except PUBLISH_FAILURES as exc:
            log.debug("reply not sent", error=repr(exc))

    async def _reply_error(self, reply: str, error: ErrorInfo) -> None:
        if not reply:
            return
        try:
            await self.nc.publish(reply, encode(error), headers={ERROR_HEADER: error.code})
        except PUBLISH_FAILURES as exc:
            log.debug("error reply not sent", error=repr(exc))

    # -- streamed requests: requester ------------------------------------------------------------

    async def stream_request(self, subject: str, request: Any, *,
                             timeout: float | None = None,  # noqa: ASYNC109 (agreed API)
                             heartbeat_timeout: float = 3.0,
                             max_buffered: int = 4096) -> ResponseStream:
        """Send `request` and return the stream of its reply frames (see ResponseStream).

        timeout: deadline for the whole stream (DeadlineExceeded, and the responder gets a
        Cancel). heartbeat_timeout: silence after which the responder is presumed dead
        (PeerGone). max_buffered: unread frames kept before the stream fails (SlowConsumer).
        """
        self._check_open()
        payload = _payload(request)
        inbox = self._new_inbox()
        stream = ResponseStream(inbox, send_cancel=self._publish_cancel,
                                spawn_cancel=self._spawn_cancel, unroute=self._unroute,
                                heartbeat_timeout=heartbeat_timeout, max_buffered=max_buffered,
                                timeout=timeout)
        self._routes[inbox] = stream
        try:
            await self.nc.publish(subject, payload, reply=inbox)
            self._write_now()
        except PUBLISH_FAILURES as exc:
            stream.end(errors.Disconnected(f"cannot send request on {subject}: {exc!r}"))
        except _INPUT_ERRORS as exc:
            stream.end()
            raise _input_error(exc, subject, len(payload), self.nc.max_payload) from None
        except BaseException:
            stream.end()
            raise
        return stream

    # -- streamed requests: responder ------------------------------------------------------------

    async def serve_stream(self, subject: str, handler: StreamHandler, *,
                           queue: str | None = None, max_concurrent: int = 1024,
                           request_type: type | None = None) -> Subscription:
        """Serve streamed requests: `await handler(request, stream)` runs in its own task per
        request; `request` is the raw bytes, or decoded as `request_type` when given (a
        request that does not decode is answered with a bad_request error frame).

        More than max_concurrent requests in progress: the extra one gets an immediate
        error frame with code "overloaded" (retryable). A handler exception becomes an error
        frame (code "internal", or "bad_request" for a ProtocolError); a handler that returns
        without a final frame gets one sent for it; StreamCancelled ends the handler quietly.
        """
        await self._ensure_cancel_sub()
        active = 0

        async def run(data: bytes, rs: ReplyStream) -> None:
            nonlocal active
            try:
                request = data if request_type is None else decode(data, request_type)
                await handler(request, rs)
                if not rs.finished and not rs.cancelled.is_set():
                    await rs.send(final=True)
            except (errors.StreamCancelled, errors.Disconnected):
                pass
            except Exception as exc:
                error = _handler_error(exc)
                if error.code == "internal":
                    log.exception("stream handler failed", subject=subject,
                                  stream_id=rs.stream_id)
                else:
                    log.info("stream request refused", subject=subject, error=error.message)
                try:
                    await rs.fail(error)
                except errors.Disconnected:
                    pass
            finally:
                active -= 1
                self._reply_streams.pop(rs.stream_id, None)
                if not self._reply_streams:
                    self._has_reply_streams.clear()

        async def on_request(msg: Msg) -> None:
            nonlocal active
            reply = msg.reply
            if not reply:
                log.warning("streamed request without a reply inbox dropped", subject=subject)
                return
            rs = ReplyStream(reply, self.nc.publish, self._publish_nowait)
            if active >= max_concurrent or self._closing:
                self.stats["overloaded"] += 1
                why = ("shutting down" if self._closing
                       else f"{max_concurrent} streams already in progress")
                try:
                    await rs.fail(ErrorInfo(code="overloaded", retryable=True,
                                            message=f"{subject}: {why}"))
                except errors.Disconnected:
                    pass
                return
            active += 1
            self._reply_streams[reply] = rs
            self._has_reply_streams.set()
            if self._heartbeat_task is None:
                self._heartbeat_task = asyncio.ensure_future(self._heartbeat_loop())
            self._spawn(run(msg.data, rs))

        try:
            sub = await self.nc.subscribe(subject, queue=queue or "", cb=on_request,
                                          pending_msgs_limit=65536)
        except _INPUT_ERRORS as exc:
            raise _input_error(exc, subject) from None
        await self.flush()  # when this returns, requests reach us (no NoResponders)
        return sub

    async def _ensure_cancel_sub(self) -> None:
        if self._cancel_sub is None:
            self._cancel_sub = await self.nc.subscribe(self._cancel_subject,
                                                       cb=self._on_cancel)

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            cancel = decode(msg.data, Cancel)
        except ProtocolError as exc:
            self.stats["bad_cancels"] += 1
            log.warning("malformed cancel ignored", error=str(exc))
            return
        rs = self._reply_streams.get(cancel.stream_id)
        if rs is not None:
            rs.cancelled.set()

    async def _heartbeat_loop(self) -> None:
        """Send a heartbeat on every reply stream that has sent nothing for
        heartbeat_interval (at most 1.25 intervals of silence). One task for the process."""
        interval = self.heartbeat_interval
        tick = interval / 4
        while True:
            await self._has_reply_streams.wait()
            await asyncio.sleep(tick)
            now = self._loop.time()
            for rs in list(self._reply_streams.values()):
                if rs.heartbeat_due(now, interval):
                    try:
                        await rs.heartbeat()
                    except errors.Disconnected:
                        pass

    # -- JetStream ----------------------------------------------------------------------------

    async def ensure_stream(self, name: str, subjects: list[str], *,
                            max_age_s: float | None = None, max_msgs: int | None = None,
                            max_bytes: int | None = None) -> None:
        """Create the JetStream stream, or update its subjects and limits if it exists."""
        config = nats.js.api.StreamConfig(
            name=name,
            subjects=subjects,
            max_age=max_age_s,
            max_msgs=max_msgs if max_msgs is not None else -1,
            max_bytes=max_bytes if max_bytes is not None else -1,
        )
        try:
            await self.js.stream_info(name)
        except nats.js.errors.NotFoundError:
            await self.js.add_stream(config)
            return
        await self.js.update_stream(config)

    async def replay(self, subject: str, *, start_seq: int | None = None,
                     start_time: datetime | None = None, stream: str | None = None,
                     until_caught_up: bool = False, batch: int = 256,
                     idle_wait: float = 1.0) -> AsyncIterator[Msg]:
        """Messages of `subject` (wildcards allowed) stored in JetStream, from stream sequence
        `start_seq` or from `start_time` (aware datetime) or, with neither, from the first
        one; then live ones as they are stored. With until_caught_up the iteration ends at
        the last message stored when it got there.

        Uses an ephemeral pull consumer without acks; if it is lost (NATS restart), a new one
        resumes after the last sequence yielded, so nothing is skipped or repeated.
        `msg.metadata.sequence.stream` is each message's stream sequence.
        """
        if start_seq is not None and start_time is not None:
            raise ValueError("give start_seq or start_time, not both")
        if stream is None:
            stream = await self.js.find_stream_name_by_subject(subject)
        last_seq: int | None = None
        sub = None
        try:
            while True:
                if sub is None:
                    sub = await self._replay_consumer(subject, stream, start_seq, start_time,
                                                      last_seq)
                    if until_caught_up:
                        info = await sub.consumer_info()
                        if info.num_pending == 0:
                            return
                try:
                    msgs = await sub.fetch(batch, timeout=idle_wait)
                except nats.errors.TimeoutError:
                    continue
                except (nats.js.errors.NotFoundError, nats.js.errors.APIError,
                        nats.errors.Error) as exc:
                    log.info("replay consumer lost, recreating", subject=subject,
                             error=repr(exc))
                    await self._unsubscribe_quietly(sub)
                    sub = None
                    await asyncio.sleep(idle_wait / 4)
                    continue
                for msg in msgs:
                    meta = msg.metadata
                    last_seq = meta.sequence.stream
                    yield msg
                    if until_caught_up and meta.num_pending == 0:
                        return
        finally:
            if sub is not None:
                await self._unsubscribe_quietly(sub)

    async def _replay_consumer(self, subject: str, stream: str, start_seq: int | None,
                               start_time: datetime | None, last_seq: int | None) -> Any:
        api = nats.js.api
        config = api.ConsumerConfig(ack_policy=api.AckPolicy.NONE, inactive_threshold=30.0,
                                    mem_storage=True)
        if last_seq is not None:
            config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = last_seq + 1
        elif start_seq is not None:
            config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = start_seq
        elif start_time is not None:
            config.deliver_policy = api.DeliverPolicy.BY_START_TIME
            config.opt_start_time = start_time.isoformat()
        else:
            config.deliver_policy = api.DeliverPolicy.ALL
        return await self.js.pull_subscribe(subject, stream=stream, config=config)

    async def durable_pull(self, subject: str, durable: str, *, stream: str | None = None,
                           ack_wait_s: float = 30.0, max_deliver: int = 5) -> Any:
        """A durable pull consumer (e.g. a work queue shared by workers: each message goes
        to one fetcher and must be acked; unacked ones come back after ack_wait_s). Returns
        nats-py's PullSubscription: `msgs = await sub.fetch(n, timeout=...)`, `msg.ack()`."""
        config = nats.js.api.ConsumerConfig(
            durable_name=durable,
            ack_policy=nats.js.api.AckPolicy.EXPLICIT,
            ack_wait=ack_wait_s,
            max_deliver=max_deliver,
        )
        return await self.js.pull_subscribe(subject, durable=durable, stream=stream,
                                            config=config)

    @staticmethod
    async def _unsubscribe_quietly(sub: Any) -> None:
        try:
            await sub.unsubscribe()
        except Exception as exc:  # the connection may be gone; nothing to clean up then
            log.debug("unsubscribe failed", error=repr(exc))
