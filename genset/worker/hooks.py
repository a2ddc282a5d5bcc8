"""Where disaggregation and KV offload plug into a worker, without touching its serving code.

The host calls a `WorkerHooks` object at these points of its life and of every request:

- `start(ctx)`: once, after the engine started and before the worker takes requests. `ctx`
  gives the engine (`export_kv`, `import_kv`), the bus and the worker's identity.
- `before_run(request, token_ids) -> KvImport | None`: before a validated request is added to
  the engine. Return the KV blocks to load first (a chain of full blocks in prefix order)
  and the engine imports them and pins them for this request, so its prefill starts after
  them. For: a decode worker importing the KV a prefill worker sent (disaggregation), and
  any worker onboarding blocks from the offload store. Return None to prefill locally.
- `after_prefill(done)`: when the request's prefill is over (its first output token exists),
  awaited *before* that token is sent to the requester, so the requester sees the token
  only once the hook returned. `done.block_hashes` names the prompt's full blocks, all held
  by the engine at that moment; `ctx.engine.export_kv(done.block_hashes)` reads them. For:
  a prefill worker shipping the prompt's KV to the decode worker that continues. A request
  that ended with this output (`done.finished`, e.g. a prefill-only request with
  max_tokens=1) has already released its blocks to the prefix cache, where they stay until
  evicted: export them before awaiting anything slow.
- `on_evict(blocks)`: the engine dropped these cached blocks from its prefix cache. Plain
  function, called on the event loop: it must not block; queue the work (bounded) and return.
  For: write-behind to the offload store. An engine that hands evictions over
  (`Engine.hand_over_evictions`: the torch engine and the mocker) gives each block with its
  parent hash, token ids and KV payload (`data`), read before the engine reused the block's
  memory; at most `HostConfig.evict_handover_bytes` of them wait for the loop (more are
  dropped, counted, never waited for). Other engines' blocks come from their `Stored` /
  `Removed` events (after the `Removed` was published), without data, with token ids when
  the engine emits them.
- `import_refused(request, kv, error)`: the engine refused the `KvImport` `before_run` gave
  (a payload it cannot read, values out of its model's range) and the prompt is computed
  instead; `error` is a `KvBlockRefused` when one block's values were refused, naming it
  (`block_index`). Plain function, must not block. For: the offload hook not asking the
  store for that block again.
- `drain(deadline_s)`: once, when the worker drains (its model card is out of etcd), beside
  the wait for its requests: the hook's own work in flight (a prefill worker's KV sends) ends
  within the deadline, or is aborted (whoever waits on it told) just after it.
- `close()`: once, when the worker stops (requests have ended, the engine still runs).
- `report_fields() -> dict`: fields the hook adds to each of the worker's `LoadReport`s
  (what it measured, e.g. the offload hook's onboarding cost). Plain function, called on the
  event loop once per report (every ~100-500 ms): cheap, no I/O. An error is logged and the
  report goes without them.

`before_run` may also answer a `RemotePrefill` (disaggregation): another worker prefilled the
prompt and its first output token is already here. The host sends that token to the
requester at once (time to first token does not wait for the KV), then awaits
`RemotePrefill.kv()` (the transfer: a `KvImport` whose blocks the hook imported as they
arrived, pinned under `pinned_as`, or None to compute the prompt locally) and submits the
request with the first token as `resume_token_ids`, so the engine continues exactly after
it. A requester that cancels while the hook or the transfer is still running ends the wait at
once (the hook's task is cancelled). `release()` is always awaited once the host no longer
needs what the hook reserved.

The default `WorkerHooks` does nothing at each point and the host does not even call what a
subclass leaves alone, so a worker without hooks serves exactly as before. A request's hook
that raises or overruns `HostConfig.hook_timeout_s` (by default the hooks' own
`longest_wait_s()` plus a margin, at least 30 s) fails that request with a retryable
`internal` error (counted in `genset_worker_hook_errors_total{hook}`); one still running at
the request's deadline ends it with `deadline_exceeded`. To fall back instead (prefill
locally when an import fails), catch the error in the hook and return None. `on_evict` errors
are logged and counted, nothing else.
`HookChain` runs several hooks (e.g. offload + disaggregation) as one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from genset.engines.interface import Engine
from genset.engines.types import EvictedBlock, KvImport, Logprobs

if TYPE_CHECKING:
    import proto

__all__ = ["EvictedBlock", "HookChain", "KvImport", "PrefillDone", "RemotePrefill",
           "WorkerContext", "WorkerHooks", "overridden"]


@dataclass(slots=True, frozen=True)
class WorkerContext:
    """What a hook may use: handed to `WorkerHooks.start`."""

    engine: Engine
    bus: Any  # genset.runtime.bus.Bus
    namespace: str
    instance_id: int
    role: str  # decode | prefill | both (genset.worker.roles)
    model: str  # the served model name
    block_size: int


@dataclass(slots=True)
class PrefillDone:
    """A request whose prefill just ended (see `WorkerHooks.after_prefill`)."""

    request: proto.GenerateRequest
    engine_request_id: str  # the id the engine knows the request by (unique per worker)
    token_ids: list[int]  # the prompt
    block_hashes: list[int]  # chained hashes of the prompt's full blocks, in prefix order
    cached_tokens: int  # prompt tokens that came from the prefix cache (imports included)
    first_token_ids: list[int]  # the tokens of the first output
    finished: bool  # the request ended with this output (its blocks are no longer held)


@dataclass(slots=True)
class RemotePrefill:
    """`before_run`'s answer when another worker prefilled the prompt (module docstring).

    `first_token_ids`: the first output (one token), with its `logprobs` when asked.
    `finish_reason`: set when that token ends the request (a stop token, max_tokens 1): the
    host sends it as the final frame and never runs the engine. `cached_tokens`: what the
    usage reports (prompt tokens the prefill found cached). `kv()`: waits for the KV; returns
    the import for the engine or None (compute the prompt here); it handles its own failures
    (returns None) and has its own deadline. `release()`: frees whatever the hook still holds
    for this request (pins a request did not take over, a transfer in progress); idempotent.
    `resumed()`: optional, called once with the engine's first output of the request (the
    token after the remote one), so the hook can time the gap between the two.
    """

    first_token_ids: list[int]
    cached_tokens: int
    kv: Callable[[], Awaitable[KvImport | None]]
    release: Callable[[], Awaitable[None]]
    logprobs: Logprobs | None = None
    finish_reason: str | None = None
    # called (plain function, must not block) when the engine's first output after the remote
    # first token exists: the end of the resume gap, which the hook measures
    resumed: Callable[[], None] | None = None


class WorkerHooks:
    """No-op defaults; subclass and override what you need (see the module docstring)."""

    async def start(self, ctx: WorkerContext) -> None:
        """Once, before the worker takes requests."""

    async def before_run(self, request: proto.GenerateRequest,
                         token_ids: list[int]) -> KvImport | RemotePrefill | None:
        """KV to import before `request` (prompt `token_ids`) runs, a remote prefill's first
        token and KV, or None."""
        return None

    async def after_prefill(self, done: PrefillDone) -> None:
        """The request's prefill is over; its first token is sent when this returns."""

    def on_evict(self, blocks: list[EvictedBlock]) -> None:
        """Cached blocks the engine dropped; must not block."""

    def import_refused(self, request: proto.GenerateRequest, kv: KvImport,
                       error: Exception) -> None:
        """The engine refused `kv`, which `before_run` gave for `request` (the prompt is
        computed instead); `error` may be a `KvBlockRefused` naming the block. Must not
        block."""

    async def drain(self, deadline_s: float) -> None:
        """The worker drains (no new requests come): finish the hook's own work in flight
        (a prefill worker's KV sends) within `deadline_s`, then abort what is left, telling
        whoever waits on it, within `genset.worker.host.DRAIN_ABORT_S` more. `close` follows."""

    async def close(self) -> None:
        """Once, when the worker stops."""

    def report_fields(self) -> dict:
        """`proto.LoadReport` fields this hook measures, for the worker's next report."""
        return {}

    def longest_wait_s(self) -> float:
        """The longest one call of this hook for a request (`before_run`, a `RemotePrefill`'s
        `kv()`, `after_prefill`) may wait by the hook's own deadlines before it gives up by
        itself (falls back, recomputes). The host keeps its hook deadline
        (`HostConfig.hook_timeout_s`) above it, so the hook's own deadline and fallback act
        first (genset.worker.host.resolve_hook_timeout). 0: the hook sets no deadline of its
        own that the host needs to wait out."""
        return 0.0


def overridden(hooks: WorkerHooks, name: str) -> bool:
    """Whether `hooks` does something at `name` (the host skips the call otherwise)."""
    if isinstance(hooks, HookChain):
        return any(overridden(h, name) for h in hooks.hooks)
    return getattr(type(hooks), name) is not getattr(WorkerHooks, name)


class HookChain(WorkerHooks):
    """Several hooks as one, called in the order given: `before_run` returns the first import
    one of them offers; every other point calls each hook that overrides it."""

    def __init__(self, *hooks: WorkerHooks) -> None:
        self.hooks = list(hooks)

    def _with(self, name: str) -> list[WorkerHooks]:
        return [h for h in self.hooks if overridden(h, name)]

    async def start(self, ctx: WorkerContext) -> None:
        for h in self._with("start"):
            await h.start(ctx)

    async def before_run(self, request, token_ids):
        for h in self._with("before_run"):
            kv = await h.before_run(request, token_ids)
            if kv is not None:
                return kv
        return None

    async def after_prefill(self, done: PrefillDone) -> None:
        for h in self._with("after_prefill"):
            await h.after_prefill(done)

    def on_evict(self, blocks: list[EvictedBlock]) -> None:
        for h in self._with("on_evict"):
            h.on_evict(blocks)

    def import_refused(self, request, kv, error) -> None:
        for h in self._with("import_refused"):
            h.import_refused(request, kv, error)

    async def drain(self, deadline_s: float) -> None:
        hooks = self._with("drain")
        if hooks:
            await asyncio.gather(*(h.drain(deadline_s) for h in hooks))

    async def close(self) -> None:
        for h in self._with("close"):
            await h.close()

    def report_fields(self) -> dict:
        fields: dict = {}
        for h in self._with("report_fields"):
            fields.update(h.report_fields())
        return fields

    def longest_wait_s(self) -> float:
        # `before_run` runs the hooks one after another under one deadline: their sum
        return sum(h.longest_wait_s() for h in self.hooks)
