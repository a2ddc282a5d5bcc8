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
    """A request or stream failed; `.error` says how (code, message, retryable)."""

    code = "stream_error"
    retryable = False

    def __init__(self, error: ErrorInfo | str) -> None:
        if isinstance(error, str):
            error = ErrorInfo(code=self.code, message=error, retryable=self.retryable)
        self.error = error
        super().__init__(f"{error.code}: {error.message}")


class RemoteError(StreamError):
    """The responder answered with an error frame (its ErrorInfo is kept as is)."""

    code = "internal"


class Overloaded(RemoteError):
    """The responder refused the request: it is at its concurrency limit. Retry elsewhere."""

    code = "overloaded"
    retryable = True


class PeerGone(StreamError):
    """No frame (not even a heartbeat) arrived for heartbeat_timeout seconds."""

    code = "peer_gone"
    retryable = True


class LostChunks(StreamError):
    """A frame's seq was not the next one expected: frames were lost or reordered."""

    code = "lost_chunks"
    retryable = True


class NoResponders(StreamError):
    """Nobody subscribes to the request subject (NATS status 503)."""

    code = "no_responders"
    retryable = True


class Disconnected(StreamError):
    """The NATS connection was lost (or the bus closed) while the request was in flight."""

    code = "disconnected"
    retryable = True


class DeadlineExceeded(StreamError):
    """The request's own deadline passed; the responder was sent a Cancel."""

    code = "deadline_exceeded"


class SlowConsumer(StreamError):
    """The stream's buffer (max_buffered frames) filled up because nobody read it."""

    code = "slow_consumer"


class BadFrame(StreamError):
    """A frame on the reply inbox was not a valid StreamChunk."""

    code = "bad_frame"


# Error frames with these codes raise a more specific class than RemoteError.
REMOTE_ERROR_CLASSES: dict[str, type[RemoteError]] = {"overloaded": Overloaded}


def remote_error(error: ErrorInfo) -> RemoteError:
    return REMOTE_ERROR_CLASSES.get(error.code, RemoteError)(error)
