"""Token frames sent from an engine step's delivery, without waking the request's task.

A worker streams one frame per request per engine step. Through the request's own task that
costs, per frame, a wake-up of the task (event, future, task step), the async-for and the
await of the publish; at speedup 1 (a step every ~10 ms, 8 requests per worker at
concurrency 16) that is most of the worker's CPU per token. Once a request's first token is
out, the host hands its `RequestStream` a `direct` sender: the engine driver gives it each
plain output (tokens, not the last, nothing queued before it) while it delivers the step, and
the sender queues the frame on the NATS connection at once (`ReplyStream.send_nowait`), in
order with everything else the stream sends. What it cannot send that way (a cancelled
stream, a connection that is reconnecting or whose buffer is full, logprobs) stays on the
request's queue and its task sends it as before, so failures and back-pressure keep their
one path. The last output (finish reason, usage) always goes through the task.
"""

from __future__ import annotations

from collections.abc import Callable

from genset.engines.types import EngineOutput
from proto.tokens import pack_tokens


def direct_sender(rs, tokens_counter) -> Callable[[EngineOutput], bool]:
    """`direct(output) -> bool` for `RequestStream.direct`: True when the frame went out.
    Never raises (it runs inside the engine's delivery of a whole step)."""
    send = rs.send_nowait
    inc = tokens_counter.inc

    def direct(out: EngineOutput) -> bool:
        if out.logprobs is not None:
            return False
        try:
            if not send(pack_tokens(out.token_ids)):
                return False
            inc(len(out.token_ids))
        except Exception:  # e.g. an encoding failure: the task's path reports it
            return False
        return True

    return direct
