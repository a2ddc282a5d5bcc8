"""Both ends of a streamed reply (see docs/protocol-streams.md).

ResponseStream is the requester's end: frames arrive on a per-stream reply inbox, routed to
it by the bus's single wildcard inbox subscription, and are checked (seq, heartbeats, final,
error) as they arrive so that loss and silence are noticed even while nobody iterates.

ReplyStream is the responder's end: it numbers frames, and the bus sends a heartbeat on its
behalf when it has been silent for ~1 s.

The streams know nothing of the Bus: what they need from it (publish, send a Cancel, drop the
inbox route) is handed to them as callables when they are made, and the bus drives them only
through their public methods (`on_msg`, `on_disconnect`, `end`, `heartbeat_due`, ...).

Hot path notes: one frame = one msgspec decode + a deque append (+ waking the reader when it
waits). Silence and deadline use one timer each per stream, re-armed at most once per
heartbeat_timeout (never per frame), so a frame costs one clock read.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import nats.errors

from genset.runtime.bus_errors import (
    BadFrame,
    DeadlineExceeded,
    Disconnected,
    LostChunks,
    NoResponders,
    PeerGone,
    SlowConsumer,
    StreamCancelled,
    StreamClosed,
    StreamError,
    remote_error,
)
from proto import ErrorInfo, StreamChunk, TokenLogprobs, Usage
from proto.codec import describe

_decode_chunk = msgspec.msgpack.Decoder(StreamChunk).decode
_encode = msgspec.msgpack.Encoder().encode
# NATS puts the status code of a server-generated message in this pseudo-header.
_STATUS = "Status"
_NO_RESPONDERS = "503"
# (stream_id, reason) -> publish a proto.Cancel for that stream
SendCancel = Callable[[str, str], Awaitable[None]]
# (subject, payload) -> publish one message (nats-py's Client.publish)
Publish = Callable[[str, bytes], Awaitable[None]]

# What publish raises when the connection cannot take the frame (closed, draining, or the
# reconnect buffer is full).
PUBLISH_FAILURES = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionDrainingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.ConnectionReconnectingError,
)


class ResponseStream:
    """Async iterator over the DATA frames of one streamed reply, in seq order.

    Heartbeats are consumed here; the final frame is yielded and ends the iteration; an
    error frame or a failure of the stream raises a StreamError subclass (after the frames
    that arrived before it). Use `async with` so an abandoned stream is cancelled.
    """

    __slots__ = (
        "_buf",
        "_deadline_handle",
        "_done",
        "_error",
        "_exhausted",
        "_hb_handle",
        "_hb_timeout",
        "_last_rx",
        "_loop",
        "_max_buffered",
        "_next_seq",
        "_now",
        "_send_cancel",
        "_spawn_cancel",
        "_unroute",
        "_waiter",
        "stream_id",
    )

    def __init__(
        self,
        stream_id: str,
        *,
        send_cancel: SendCancel,
        spawn_cancel: Callable[[str, str], None],
        unroute: Callable[[str], Any],
        heartbeat_timeout: float,
        max_buffered: int,
        timeout: float | None,
    ) -> None:
        """send_cancel / spawn_cancel(stream_id, reason): tell the responder to stop, awaited
        or in the background (from a frame or timer callback, which cannot await);
        unroute(stream_id): stop delivering frames of this stream (called once it ended)."""
        if heartbeat_timeout <= 0:
            raise ValueError(f"heartbeat_timeout must be > 0, got {heartbeat_timeout}")
        if max_buffered < 1:
            raise ValueError(f"max_buffered must be >= 1, got {max_buffered}")
        self.stream_id = stream_id
        self._send_cancel = send_cancel
        self._spawn_cancel = spawn_cancel
        self._unroute = unroute
        self._loop = loop = asyncio.get_running_loop()
        self._now = loop.time
        self._buf: deque[StreamChunk] = deque()
        self._max_buffered = max_buffered
        self._next_seq = 0
        self._error: StreamError | None = None
        self._done = False  # no more frames will be accepted (final, error or cancel)
        self._exhausted = False  # the reader saw the end
        self._waiter: asyncio.Future | None = None
        self._hb_timeout = heartbeat_timeout
        now = loop.time()
        self._last_rx = now
        self._hb_handle: asyncio.TimerHandle | None = loop.call_at(
            now + heartbeat_timeout, self._check_silence
        )
        self._deadline_handle: asyncio.TimerHandle | None = None
        if timeout is not None:
            self._deadline_handle = loop.call_at(now + timeout, self._on_deadline, timeout)

    # -- reading ------------------------------------------------------------------------

    def __aiter__(self) -> ResponseStream:
        return self

    def __anext__(self) -> asyncio.Future:
        # A plain method handing out a future rather than a coroutine: while the reader is
        # waiting, the frame that arrives is set as the future's result directly (no buffer
        # round trip, no coroutine frame to resume), which is most of what a frame costs the
        # reading side at many concurrent streams (docs/benchmarks.md).
        fut = self._loop.create_future()
        if not self._resolve(fut):
            self._waiter = fut
        return fut

    def _resolve(self, fut: asyncio.Future) -> bool:
        """Settle `fut` from what is buffered or how the stream ended; False: nothing yet."""
        if self._buf:
            fut.set_result(self._buf.popleft())
        elif self._error is not None:
            err, self._error = self._error, None
            self._exhausted = True
            fut.set_exception(err)
        elif self._done or self._exhausted:
            self._exhausted = True
            fut.set_exception(StopAsyncIteration())
        else:
            return False
        return True

    def take_ready(self) -> list[StreamChunk]:
        """The data frames that already arrived and were not read yet, without waiting and
        without the final frame (which the next iteration yields). Lets a busy reader take
        several frames at once (e.g. one detokenize call for all of them)."""
        buf = self._buf
        out: list[StreamChunk] = []
        while buf and not buf[0].final:
            out.append(buf.popleft())
        return out

    async def collect(self) -> list[StreamChunk]:
        """Every data frame until the final one (raises like iteration does)."""
        return [chunk async for chunk in self]

    @property
    def finished(self) -> bool:
        """True once no more frames will come (final frame, error, or cancel)."""
        return self._done

    async def cancel(self, reason: str = "cancelled") -> None:
        """Stop the stream: the responder gets a proto.Cancel; iteration ends."""
        if self._done:
            return
        self._finish()
        self._exhausted = True
        self._buf.clear()
        await self._send_cancel(self.stream_id, reason)

    async def __aenter__(self) -> ResponseStream:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        if not self._done:
            await self.cancel("requester left")

    # -- frames and failures, called by the bus ----------------------------------------------

    def end(self, error: StreamError | None = None) -> None:
        """End the stream here (no Cancel is sent): the reader gets `error` after the frames
        already buffered, or the end of the iteration."""
        if error is not None:
            self._fail(error)
        elif not self._done:
            self._finish()

    def on_msg(self, msg: Any) -> None:
        """One message on this stream's reply inbox (runs inside the connection's reader)."""
        if self._done:
            return
        if msg.headers is not None and msg.headers.get(_STATUS) == _NO_RESPONDERS:
            self._fail(NoResponders(f"no responders for the request (stream {self.stream_id})"))
            return
        try:
            chunk = _decode_chunk(msg.data)
        except msgspec.ValidationError as exc:
            text = describe(exc, msg.data, StreamChunk)
            self._fail(BadFrame(f"{text} (stream {self.stream_id})"), cancel=True)
            return
        except msgspec.DecodeError as exc:
            self._fail(BadFrame(f"invalid StreamChunk on {self.stream_id}: {exc}"), cancel=True)
            return
        seq = chunk.seq
        if seq != self._next_seq:
            self._fail(
                LostChunks(f"expected frame seq {self._next_seq}, got {seq} on {self.stream_id}"),
                cancel=True,
            )
            return
        self._next_seq = seq + 1
        self._last_rx = self._now()
        if chunk.final:
            if chunk.error is not None:
                self._fail(remote_error(chunk.error))
                return
            self._buf.append(chunk)
            self._finish()
            return
        if chunk.heartbeat:
            return
        buf = self._buf
        if len(buf) >= self._max_buffered:
            buf.clear()
            self._fail(
                SlowConsumer(
                    f"{self._max_buffered} frames buffered and unread on {self.stream_id}; "
                    "the reader is too slow"
                ),
                cancel=True,
            )
            return
        waiter = self._take_waiter()
        if waiter is not None:
            waiter.set_result(chunk)  # the buffer is empty whenever a reader waits
        else:
            buf.append(chunk)

    def _take_waiter(self) -> asyncio.Future | None:
        """The reader's pending future, if it is still waiting (not cancelled meanwhile)."""
        waiter, self._waiter = self._waiter, None
        return waiter if waiter is not None and not waiter.done() else None

    def _check_silence(self) -> None:
        self._hb_handle = None
        if self._done:
            return
        due = self._last_rx + self._hb_timeout
        if self._loop.time() >= due:
            self._fail(
                PeerGone(f"no frame for {self._hb_timeout:g} s on {self.stream_id}"), cancel=True
            )
        else:
            self._hb_handle = self._loop.call_at(due, self._check_silence)

    def _on_deadline(self, timeout: float) -> None:
        self._deadline_handle = None
        if not self._done:
            self._fail(
                DeadlineExceeded(f"stream {self.stream_id} did not finish within {timeout:g} s"),
                cancel=True,
            )

    def _fail(self, error: StreamError, *, cancel: bool = False) -> None:
        """End the stream with `error` (raised after the frames already buffered)."""
        if self._done:
            return
        self._error = error
        self._finish()
        if cancel:
            self._spawn_cancel(self.stream_id, error.error.code)

    def _finish(self) -> None:
        self._done = True
        self._unroute(self.stream_id)
        if self._hb_handle is not None:
            self._hb_handle.cancel()
            self._hb_handle = None
        if self._deadline_handle is not None:
            self._deadline_handle.cancel()
            self._deadline_handle = None
        waiter = self._take_waiter()
        if waiter is not None:
            self._resolve(waiter)

    def on_disconnect(self, reason: str) -> None:
        # Frames published while we are disconnected are dropped by NATS, so the stream
        # cannot complete; tell the responder to stop once we are back (the cancel is
        # buffered by nats-py until the reconnect).
        self._fail(Disconnected(f"{reason} while streaming {self.stream_id}"), cancel=True)


class UnaryWaiter:
    """The requester's end of a unary request; routed like a stream (one inbox, one msg)."""

    __slots__ = ("future",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.future: asyncio.Future = loop.create_future()

    def on_msg(self, msg: Any) -> None:
        if not self.future.done():
            self.future.set_result(msg)

    def on_disconnect(self, reason: str) -> None:
        if not self.future.done():
            self.future.set_exception(Disconnected(f"{reason} while waiting for a reply"))


class ReplyStream:
    """The responder's end of one streamed request, handed to serve_stream handlers.

    `send` publishes one frame per call (put every token of an engine step in one call).
    Once the requester cancels, `cancelled` is set and `send` raises StreamCancelled.
    """

    __slots__ = ("_final_sent", "_hb_mark", "_hb_seq", "_publish_msg", "_publish_nowait", "_seq",
                 "cancelled", "stream_id")

    def __init__(self, stream_id: str, publish: Publish,
                 publish_nowait: Callable[[str, bytes], bool] | None = None) -> None:
        """publish(subject, payload): nats-py's Client.publish of the responder's connection;
        publish_nowait(subject, payload) -> bool: the same queued at once when it can be
        (`Bus._publish_nowait`), for `send_nowait`."""
        self.stream_id = stream_id
        self.cancelled = asyncio.Event()
        self._publish_msg = publish
        self._publish_nowait = publish_nowait
        self._seq = 0
        self._final_sent = False
        # The bus's heartbeat task asks heartbeat_due() every tick instead of a clock read per
        # frame: it notes when it last saw _seq move (_hb_seq, _hb_mark); a heartbeat is due
        # once _seq has not moved for the heartbeat interval.
        self._hb_seq = -1
        self._hb_mark = 0.0

    @property
    def finished(self) -> bool:
        return self._final_sent

    async def send(
        self,
        token_ids: bytes = b"",
        *,
        finish_reason: str | None = None,
        usage: Usage | None = None,
        data: bytes | None = None,
        final: bool = False,
        logprobs: TokenLogprobs | None = None,
    ) -> None:
        if self.cancelled.is_set():
            raise StreamCancelled(f"stream {self.stream_id} was cancelled")
        if self._final_sent:
            raise StreamClosed(f"stream {self.stream_id} already sent its final frame")
        seq = self._seq
        if (final or finish_reason is not None or usage is not None or data is not None
                or logprobs is not None):
            frame = StreamChunk(seq=seq, token_ids=token_ids, finish_reason=finish_reason,
                                usage=usage, data=data, final=final, logprobs=logprobs)
            self._final_sent = final
        else:  # the per-token hot path
            frame = StreamChunk(seq=seq, token_ids=token_ids)
        # seq is taken and the frame queued with no await in between, so frames from the
        # handler and from the heartbeat task can never be reordered.
        self._seq = seq + 1
        try:
            await self._publish_msg(self.stream_id, _encode(frame))
        except PUBLISH_FAILURES as exc:
            self._unavailable(exc)

    def send_nowait(self, token_ids: bytes) -> bool:
        """A plain token frame queued on the connection now, in order with every other frame
        of this stream (no await, so the caller need not be a task of its own: a worker sends
        an engine step's frames from the step's delivery). False when it cannot be sent this
        way (cancelled, finished, connection not ready, no nowait publish): use `send`, which
        raises what applies."""
        publish = self._publish_nowait
        if publish is None or self._final_sent or self.cancelled.is_set():
            return False
        seq = self._seq
        if not publish(self.stream_id, _encode(StreamChunk(seq=seq, token_ids=token_ids))):
            return False
        self._seq = seq + 1
        return True

    async def fail(self, error: ErrorInfo) -> None:
        """Send the final error frame (the requester raises RemoteError / Overloaded)."""
        if self._final_sent:
            return
        frame = StreamChunk(seq=self._seq, finish_reason="error", error=error, final=True)
        await self._publish(frame, True)

    def heartbeat_due(self, now: float, interval: float) -> bool:
        """True when nothing was sent for `interval` s (as seen by calls `interval / 4`
        apart: at most 1.25 intervals of silence)."""
        if self._seq != self._hb_seq:
            self._hb_seq = self._seq
            self._hb_mark = now
            return False
        return now - self._hb_mark >= interval

    async def heartbeat(self) -> None:
        if self._final_sent or self.cancelled.is_set():
            return
        await self._publish(StreamChunk(seq=self._seq, heartbeat=True), False)

    async def _publish(self, frame: StreamChunk, final: bool) -> None:
        self._seq += 1
        if final:
            self._final_sent = True
        try:
            await self._publish_msg(self.stream_id, _encode(frame))
        except PUBLISH_FAILURES as exc:
            self._unavailable(exc)

    def _unavailable(self, exc: Exception) -> None:
        self.cancelled.set()
        raise Disconnected(
            f"cannot send on {self.stream_id}: NATS connection unavailable ({exc!r})"
        ) from None
