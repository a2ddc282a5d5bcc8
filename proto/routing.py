"""Route requests and decisions between the frontend and the router."""

from __future__ import annotations

import msgspec

from proto.base import Message
from proto.values import Phase


class RouteRequest(Message, kw_only=True):
    request_id: str
    model: str
    token_ids: bytes  # packed int32 LE; the router hashes them itself
    max_tokens: int = 16
    policy: str | None = None  # override the router's default policy for this request
    exclude: list[int] = msgspec.field(default_factory=list)  # workers not to use (retries)


class RouteDecision(Message, kw_only=True):
    """The answer to a RouteRequest; also broadcast so router replicas share their load view."""

    request_id: str
    worker_id: int | None  # None: no worker available (see error)
    model: str = ""
    overlap_blocks: int = 0  # prompt blocks already cached on that worker
    prompt_tokens: int = 0
    policy: str = ""
    router_id: int = 0  # the replica that decided
    error: str | None = None
    # prompt blocks the router's view places in a KV offload store (None: it knows no store);
    # passed on to the worker as GenerateRequest.offload_hint
    store_blocks: int | None = None


class RequestLifecycle(Message, kw_only=True):
    """Progress of a routed request, so routers can keep predicted load true.

    phase: first_token (prefill done) | done (finished, cancelled or failed); see
    `proto.values.Phase`.
    """

    request_id: str
    worker_id: int
    phase: Phase
    ts_ms: int = 0
