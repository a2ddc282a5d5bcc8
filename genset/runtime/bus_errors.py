"""Errors raised by the bus (genset.runtime.bus) and its streamed requests.

Every stream failure carries a `proto.ErrorInfo` so callers can act on `code` and `retryable`
without parsing text, and so the same error can be forwarded to an HTTP client or another
service unchanged.
"""

from __future__ import annotations

from proto import ErrorInfo


class BusError(Exception):
    """Anything that went wrong talking over NATS."""


class RequestTimeout(BusError):
    """A unary request got no reply in time."""


class StreamCancelled(BusError):
    """Raised by `ReplyStream.send` once the requester cancelled (or the stream was dropped):
    the handler should stop; serve_stream treats it as a normal end."""


class StreamClosed(BusError):
    """A frame was sent after the stream's final frame."""


class StreamError(BusError):
    """A request or stream failed; `.error` says how (code, message, retryable).

    A subclass names its code (and whether a retry elsewhere may succeed) in its class line:
    `class PeerGone(StreamError, code="peer_gone", retryable=True)`; it is used when the error
    is raised from a plain message."""

    code = "stream_error"
    retryable = False

    def __init_subclass__(cls, *, code: str | None = None, retryable: bool | None = None,
                          **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code
        if retryable is not None:
            cls.retryable = retryable

    def __init__(self, error: ErrorInfo | str) -> None:
        if isinstance(error, str):
            error = ErrorInfo(code=self.code, message=error, retryable=self.retryable)
        self.error = error
        super().__init__(f"{error.code}: {error.message}")


class RemoteError(StreamError, code="internal"):
    """The responder answered with an error frame (its ErrorInfo is kept as is)."""


class Overloaded(RemoteError, code="overloaded", retryable=True):
    """The responder refused the request: it is at its concurrency limit. Retry elsewhere."""


class PeerGone(StreamError, code="peer_gone", retryable=True):
    """No frame (not even a heartbeat) arrived for heartbeat_timeout seconds."""


class LostChunks(StreamError, code="lost_chunks", retryable=True):
    """A frame's seq was not the next one expected: frames were lost or reordered."""


class NoResponders(StreamError, code="no_responders", retryable=True):
    """Nobody subscribes to the request subject (NATS status 503)."""


class Disconnected(StreamError, code="disconnected", retryable=True):
    """The NATS connection was lost (or the bus closed) while the request was in flight."""


class DeadlineExceeded(StreamError, code="deadline_exceeded"):
    """The request's own deadline passed; the responder was sent a Cancel."""


class SlowConsumer(StreamError, code="slow_consumer"):
    """The stream's buffer (max_buffered frames) filled up because nobody read it."""


class BadFrame(StreamError, code="bad_frame"):
    """A frame on the reply inbox was not a valid StreamChunk."""


# Error frames with these codes raise a more specific class than RemoteError.
REMOTE_ERROR_CLASSES: dict[str, type[RemoteError]] = {"overloaded": Overloaded}


def remote_error(error: ErrorInfo) -> RemoteError:
    return REMOTE_ERROR_CLASSES.get(error.code, RemoteError)(error)
