"""The engine host: puts one `Engine` on the bus. Shared by the decode, prefill and both roles.

What it does, with the parts it delegates:

- serves `proto.GenerateRequest` streams on its own subject: one chunk per engine output per
  request (a step's tokens travel together; an engine that coalesces short steps hands over
  several steps' tokens in one output, which then travel in one chunk), a final chunk with
  `finish_reason` and `proto.Usage` (with `cached_tokens`); a Cancel from the requester or a
  passed deadline aborts the request in the engine, which frees its blocks at the next step;
- validates every request (model, tokens, vocabulary, context length, deadline) and answers
  a bad one with a clear error frame and a counted metric, never a crash;
- registers its `ModelCard` in etcd (under the process lease) once it can serve, and
  unregisters it first when it drains; the `InstanceRecord` belongs to the `Service` that
  runs the host (`subjects` and `labels` say what goes in it), or, for a host run on its own
  (`HostConfig.register_instance`), is built by `genset.runtime.service.build_instance_record`;
- publishes `RequestLifecycle` (first_token / done) so routers keep their load view true;
- KV events and resync answers: `genset.worker.kv_feed.KvFeed`; load reports:
  `genset.worker.load.LoadReporter`; metrics: `genset.worker.metrics.WorkerMetrics`;
- calls its `WorkerHooks` (`genset.worker.hooks`): `before_run` before a request is added to
  the engine, `after_prefill` before its first token is sent, `on_evict` (through the feed)
  when the engine drops cached blocks.

The host does not know about processes, signals or flags: `services/decode` wraps it in a
`Service`. Tests can run it in-process against a real bus and etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass, field

import structlog

import proto
from genset.engines.core import sampling_error
from genset.engines.interface import Engine
from genset.engines.types import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    EngineOverloaded,
    EngineRequest,
    KvImport,
    Logprobs,
)
from genset.kv.hashing import block_hashes
from genset.runtime.bus_errors import Disconnected, StreamCancelled, StreamClosed
from genset.runtime.service import build_instance_record
from genset.runtime.timeline import worker_stamp
from genset.worker.clock import now_ms, wait_event
from genset.worker.frames import direct_sender
from genset.worker.hooks import (
    HookChain,
    PrefillDone,
    RemotePrefill,
    WorkerContext,
    WorkerHooks,
    overridden,
)
from genset.worker.kv_feed import KvFeed
from genset.worker.load import LoadReporter
from genset.worker.metrics import WorkerMetrics
from genset.worker.roles import ROLE_DECODE, registered_role
from genset.worker.step_stats import StepStatsPublisher
from proto import keys, subjects
from proto.generate import ErrorInfo
from proto.values import PHASE_DONE, PHASE_FIRST_TOKEN

log = structlog.get_logger("genset.worker")

# Why a request ended, as counted in genset_worker_requests_finished_total{reason=...}.
REASON_DEADLINE = "deadline"
REASON_DRAIN = "drain"

# close(): how long each step may take before it is given up on (logged, not waited for).
CLOSE_STEP_TIMEOUT_S = 5.0
# close() as a whole: within the 5 s the service gives its stop step
# (genset.runtime.service._STOP_STEP_TIMEOUT_S), which cut the close off where it ran over
# (the hooks' and the engine's close skipped). Every step gets what is left of it, less what
# the hooks' close and the engine's stop are kept.
CLOSE_TIMEOUT_S = 4.5
CLOSE_HOOKS_S = 1.5
CLOSE_ENGINE_S = 1.5
# drain(): how long the work aborted at the drain's deadline (requests, a hook's: a prefill
# worker's KV sends) gets to end, within the 2 s of its drain_timeout the worker service
# keeps back for it (services/decode: `host.drain(drain_timeout - 2)`)
DRAIN_ABORT_S = 1.5


# The host's hook deadline is a backstop for a hook that hangs; a hook's own deadlines
# (a disaggregated KV receive: --remote-prefill-timeout + --kv-transfer-timeout, 40 s by
# default) end its waits with a fallback (recompute here) that serves the request. A backstop
# shorter than them failed a slow transfer with a retryable `internal` error at 30 s instead
# (session 16). So the default is derived: the hooks' longest wait plus HOOK_TIMEOUT_MARGIN_S
# (time for the fallback to run: close the receive, release the pins), at least
# HOOK_TIMEOUT_FLOOR_S; and an explicit value below that is refused, naming both values,
# rather than silently raised: the one who set it meant something by it and should learn
# that it cannot hold, not find a different deadline in force.
HOOK_TIMEOUT_FLOOR_S = 30.0
HOOK_TIMEOUT_MARGIN_S = 5.0


def resolve_hook_timeout(configured: float | None, hooks_wait_s: float) -> float:
    """The host's hook deadline: `configured`, or when None the hooks' longest own wait
    (`WorkerHooks.longest_wait_s`) plus HOOK_TIMEOUT_MARGIN_S, at least
    HOOK_TIMEOUT_FLOOR_S. ValueError for a configured one not above the hooks' wait by the
    margin (the host would cut the hook off before its own deadline and fallback)."""
    need = hooks_wait_s + HOOK_TIMEOUT_MARGIN_S
    if configured is None:
        return max(HOOK_TIMEOUT_FLOOR_S, need)
    if not configured >= need:
        raise ValueError(
            f"hook_timeout_s {configured:g} s is shorter than the worker hooks' own longest wait "
            f"{hooks_wait_s:g} s (e.g. a KV receive: --remote-prefill-timeout + "
            f"--kv-transfer-timeout) plus {HOOK_TIMEOUT_MARGIN_S:g} s: the host would fail "
            f"requests the hooks would still serve; set it to >= {need:g} s or leave it unset")
    return configured


@dataclass
class HostConfig:
    namespace: str
    model: str  # the served model name clients ask for
    role: str = ROLE_DECODE  # decode | prefill | both (genset.worker.roles)
    tokenizer: str = ""  # what the frontend loads to tokenize for this model
    max_streams: int = 1024  # concurrent generate streams accepted; more are refused (retryable)
    load_interval_s: float = 0.25  # load report period while busy
    idle_load_interval_s: float = 2.0  # ... and while nothing changes
    http_url: str | None = None  # this process's /metrics and /health
    labels: dict[str, str] = field(default_factory=dict)
    # The service lifecycle (genset.runtime.service) registers the InstanceRecord itself;
    # a host used on its own (tests, embedded) can do it here.
    register_instance: bool = False
    # Longest a before_run / after_prefill hook (or a remote prefill's `kv()`) may take for
    # one request (the request's deadline, when sooner, bounds it too). None: derived from
    # the hooks' own deadlines (`resolve_hook_timeout`); a value shorter than they need is
    # refused (ValueError) when the host is built.
    hook_timeout_s: float | None = None
    # Evicted blocks (with their KV) the engine may have handed over before the loop passes
    # them to `on_evict`, in bytes; beyond it the engine drops them (only with an on_evict hook).
    evict_handover_bytes: int = 64 << 20


def _wire_logprobs(lp: Logprobs, req: proto.GenerateRequest) -> proto.TokenLogprobs | None:
    """An output's log-probabilities as they travel (None for an output without tokens)."""
    if not lp.logprobs:
        return None
    return proto.TokenLogprobs.pack(lp.logprobs, lp.top_ids, lp.top_logprobs,
                                    req.sampling.logprobs or 0)


class RequesterCancelled(Exception):
    """The requester cancelled while a hook (or a remote prefill's transfer) was running."""


class HookFailed(Exception):
    """A worker hook raised or overran for one request; the request fails with `code`."""

    def __init__(self, message: str, code: str = "internal") -> None:
        super().__init__(message)
        self.code = code


class WorkerHost:
    """Serves one engine on the bus; see the module docstring."""

    def __init__(self, engine: Engine, *, bus, discovery, instance_id: int, config: HostConfig,
                 metrics, hooks: WorkerHooks | None = None) -> None:
        self.engine = engine
        self.bus = bus
        self.discovery = discovery
        self.instance_id = instance_id
        self.config = config
        self.m = WorkerMetrics(metrics)
        self.hooks = hooks if hooks is not None else WorkerHooks()
        self.hook_timeout_s = resolve_hook_timeout(config.hook_timeout_s,
                                                   self.hooks.longest_wait_s())
        # Only the points a hook uses are called: a worker without hooks pays nothing.
        self._before_run = self.hooks.before_run if overridden(self.hooks, "before_run") else None
        self._after_prefill = (self.hooks.after_prefill
                               if overridden(self.hooks, "after_prefill") else None)
        ns = config.namespace
        self.role = registered_role(config.role)  # what records and subjects name
        self.generate_subject = subjects.worker_generate(ns, self.role, instance_id)
        self.lifecycle_subject = subjects.request_lifecycle(ns)
        self.instance_key = keys.instance(ns, self.role, instance_id)
        self.model_key = keys.model(ns, config.model, instance_id)
        self.ready = False  # records registered, serving
        self.draining = False
        self._active: dict[str, asyncio.Task] = {}  # engine request id -> handler task
        self._ids = itertools.count(1)
        self._subs: list = []
        self._tasks: list[asyncio.Task] = []
        self._load = LoadReporter(engine, bus=bus, namespace=ns, instance_id=instance_id,
                                  config=config, metrics=self.m,
                                  active=lambda: len(self._active),
                                  fields=(self.hooks.report_fields
                                          if overridden(self.hooks, "report_fields") else None))
        self._load_changed = self._load.changed
        self._on_evict = self.hooks.on_evict if overridden(self.hooks, "on_evict") else None
        self.kv_feed = KvFeed(engine, bus=bus, namespace=ns, instance_id=instance_id,
                              metrics=self.m, changed=self._load_changed,
                              on_evict=self._on_evict)
        self._idle = asyncio.Event()
        self._idle.set()

    # ---- records ---------------------------------------------------------------------------

    @property
    def subjects(self) -> dict[str, str]:
        """This worker's subjects, for its InstanceRecord."""
        return {"generate": self.generate_subject, "kv_events": self.kv_feed.events_subject,
                "kv_resync": self.kv_feed.resync_subject, "load_report": self._load.subject}

    @property
    def labels(self) -> dict[str, str]:
        """This worker's labels, for its InstanceRecord: its model and engine, what its hooks
        publish (`record_labels()`, read once they started: a decode worker's KV TCP endpoint,
        genset.disagg.endpoints), then `HostConfig.labels`."""
        hooked: dict[str, str] = {}
        for hook in self.hooks.hooks if isinstance(self.hooks, HookChain) else (self.hooks,):
            record_labels = getattr(hook, "record_labels", None)
            if record_labels is not None:
                hooked.update(record_labels())
        return {"model": self.config.model, "engine": self.engine.card.engine, **hooked,
                **self.config.labels}

    def model_card(self) -> proto.ModelCard:
        card = self.engine.card
        return proto.ModelCard(
            model=self.config.model, instance_id=self.instance_id, role=self.role,
            engine=card.engine, block_size=card.block_size, kv_blocks=card.kv_blocks,
            max_batch_tokens=card.max_batch_tokens, max_running=card.max_running,
            context_length=card.context_length, tokenizer=self.config.tokenizer,
            eos_token_ids=list(card.eos_token_ids), generate_subject=self.generate_subject,
            supports_logprobs=card.supports_logprobs)

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine and the hooks, subscribe, publish, then register: once the card is
        in etcd a frontend may send work at once, so everything must already be listening."""
        await self.engine.start()
        card = self.engine.card
        self.m.kv_total.set(card.kv_blocks)
        if self._on_evict is not None and self.engine.hand_over_evictions(
                self._evicted, max_bytes=self.config.evict_handover_bytes):
            self.kv_feed.on_evict = None  # the engine hands blocks over with their KV itself
        self._tasks.append(self.kv_feed.start())  # before the hooks: their imports are events
        write = getattr(self.bus, "write_pending", None)
        if write is not None and hasattr(self.engine, "after_delivery"):
            # each step's frames and KV batch leave in one socket write at its delivery
            # (AsyncEngineDriver.after_delivery): the NATS client's flusher task is not woken
            # for them (issue 15)
            self.engine.after_delivery = write
        self._tasks.append(self._load.start())
        steps = StepStatsPublisher(self.engine, bus=self.bus, namespace=self.config.namespace,
                                   instance_id=self.instance_id, role=self.role).start()
        if steps is not None:  # the planner's performance model reads these
            self._tasks.append(steps)
        await self.hooks.start(WorkerContext(
            engine=self.engine, bus=self.bus, namespace=self.config.namespace,
            instance_id=self.instance_id, role=self.config.role, model=self.config.model,
            block_size=card.block_size))
        self._subs.append(await self.bus.serve_stream(
            self.generate_subject, self._on_generate, max_concurrent=self.config.max_streams))
        self._subs.append(await self.bus.serve(self.kv_feed.resync_subject,
                                               self.kv_feed.on_resync))
        if self.config.register_instance:
            await self.discovery.register(self.instance_key, build_instance_record(
                instance_id=self.instance_id, component=self.role,
                namespace=self.config.namespace, subjects=self.subjects, labels=self.labels,
                http_url=self.config.http_url))
        await self.discovery.register(self.model_key, self.model_card())
        self.ready = True
        log.info("worker ready", model=self.config.model, engine=card.engine,
                 role=self.config.role, instance_id=f"{self.instance_id:x}",
                 subject=self.generate_subject, kv_blocks=card.kv_blocks,
                 block_size=card.block_size)

    async def drain(self, deadline_s: float) -> None:
        """Stop taking new work, finish what is in flight until the deadline, abort the rest
        (given DRAIN_ABORT_S more to end).

        The model card goes first so frontends stop choosing this worker; requests that still
        arrive (a frontend that has not seen the removal yet) are refused as retryable. The
        hooks' own work in flight (`WorkerHooks.drain`: a prefill worker's KV sends, which
        are no generate stream) drains beside the requests, under the same deadline. The
        instance record and the lease stay until the service closes the discovery.
        """
        self.draining = True
        self.ready = False
        with contextlib.suppress(Exception):
            await self.discovery.unregister(self.model_key)
        in_flight = len(self._active)
        log.info("draining", in_flight=in_flight, deadline_s=deadline_s)
        work = [self._drain_requests(deadline_s)]
        if overridden(self.hooks, "drain"):
            work.append(self._drain_hooks(deadline_s))
        await asyncio.gather(*work)

    async def _drain_requests(self, deadline_s: float) -> None:
        if not await wait_event(self._idle, deadline_s):
            log.warning("drain deadline passed; aborting requests", left=len(self._active))
            for task in list(self._active.values()):
                task.cancel(REASON_DRAIN)
            await wait_event(self._idle, DRAIN_ABORT_S)

    async def _drain_hooks(self, deadline_s: float) -> None:
        try:
            async with asyncio.timeout(deadline_s + DRAIN_ABORT_S):
                await self.hooks.drain(deadline_s)
        except Exception as exc:  # TimeoutError included: close() ends what is left
            log.warning("worker hooks did not drain", error=repr(exc))

    async def close(self) -> None:
        """Stop serving: unsubscribe, end requests in flight, stop the background tasks, the
        hooks and the engine. The whole close has a deadline (CLOSE_TIMEOUT_S, within the
        service's for its stop step), and each step what is left of it less what the steps
        after it are kept (the hooks' and the engine's close always get theirs): a step that
        overruns is logged and left behind rather than waited on forever. After a drain
        every step is quick: what was in flight has ended."""
        end = time.monotonic() + CLOSE_TIMEOUT_S

        def left(keep: float) -> float:
            # (a floor: a step that would end at once is not cut off before it starts)
            return max(0.05, end - keep - time.monotonic())  # (end is CLOSE_TIMEOUT_S away)

        before_hooks = CLOSE_HOOKS_S + CLOSE_ENGINE_S
        self._load.stopping = True
        for sub in self._subs:
            with contextlib.suppress(Exception):  # TimeoutError included
                async with asyncio.timeout(left(before_hooks)):
                    await sub.unsubscribe()
        self._subs.clear()
        for task in list(self._active.values()):
            task.cancel(REASON_DRAIN)
        if self._active and not await wait_event(self._idle, left(before_hooks)):
            log.warning("requests still running at close", left=len(self._active))
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            # asyncio.wait neither raises the tasks' exceptions nor swallows our own cancel
            _, pending = await asyncio.wait(tasks, timeout=left(before_hooks))
            for task in pending:
                log.warning("background task did not stop at close", task=task.get_name())
        self.kv_feed.close()
        try:
            async with asyncio.timeout(left(CLOSE_ENGINE_S)):
                await self.hooks.close()
        except Exception as exc:  # TimeoutError included: the engine must still stop
            log.warning("worker hooks did not close cleanly", error=repr(exc))
        try:
            async with asyncio.timeout(left(0.0)):
                await self.engine.stop()
        except TimeoutError:
            log.warning("engine did not stop at close", engine=self.engine.card.engine)

    def _evicted(self, blocks) -> None:
        try:
            self._on_evict(blocks)
        except Exception as exc:  # a hook's fault: the engine goes on
            self.m.hook_errors.labels("on_evict").inc()
            log.warning("on_evict hook failed", blocks=len(blocks), error=repr(exc))

    def health(self) -> dict:
        load = self.engine.load()
        return {"ready": self.ready, "draining": self.draining, "model": self.config.model,
                "engine": self.engine.card.engine, "role": self.config.role,
                "instance_id": self.instance_id, "running": len(self._active),
                "kv_used_blocks": load.kv_used_blocks, "kv_total_blocks": load.kv_total_blocks}

    # ---- generate --------------------------------------------------------------------------

    def _reject(self, code: str, message: str, retryable: bool = False) -> ErrorInfo:
        self.m.rejected.labels(code).inc()
        return ErrorInfo(code=code, message=message, retryable=retryable)

    def _validate(self, req: proto.GenerateRequest) -> tuple[list[int] | None, ErrorInfo | None]:
        if self.draining:
            return None, self._reject("overloaded", "worker is draining (shutting down); retry "
                                      "on another worker", retryable=True)
        if req.model != self.config.model:
            return None, self._reject(
                "not_found", f"this worker serves model {self.config.model!r}, not {req.model!r}")
        try:
            tokens = proto.unpack_tokens(req.token_ids)
        except ValueError as exc:
            self.m.bad_messages.labels("generate").inc()
            return None, self._reject("bad_request", f"token_ids: {exc}")
        if not tokens:
            return None, self._reject("bad_request", "token_ids is empty: a prompt needs at "
                                      "least one token")
        card = self.engine.card
        # min/max run in C: a per-token generator cost ~3 % of a worker's CPU at 1,000 tokens
        if card.vocab_size and (min(tokens) < 0 or max(tokens) >= card.vocab_size):
            bad = next(t for t in tokens if t < 0 or t >= card.vocab_size)
            return None, self._reject("bad_request", f"token_ids: token id {bad} is outside the "
                                      f"vocabulary (0..{card.vocab_size - 1})")
        if len(tokens) >= card.context_length:
            return None, self._reject(
                "context_length_exceeded",
                f"prompt has {len(tokens)} tokens; the context length is {card.context_length} "
                "(prompt plus at least one output token)")
        # before the hooks: a disaggregated worker would otherwise fetch a remote prefill
        # for a request its engine then refuses
        sampling_problem = sampling_error(card, req.sampling)
        if sampling_problem is not None:
            return None, self._reject("bad_request", sampling_problem)
        if req.deadline_ms is not None and req.deadline_ms <= now_ms():
            return None, self._reject("deadline_exceeded", "request deadline already passed")
        return tokens, None

    async def _on_generate(self, data: bytes, rs) -> None:
        try:
            req = proto.decode(data, proto.GenerateRequest)
        except proto.ProtocolError as exc:
            self.m.bad_messages.labels("generate").inc()
            self.m.rejected.labels("bad_request").inc()
            await rs.fail(ErrorInfo(code="bad_request", message=str(exc)))
            return
        tokens, error = self._validate(req)
        if error is not None:
            await rs.fail(error)
            return
        engine_id = f"{req.request_id}#{next(self._ids)}"  # request ids may repeat across clients
        task = asyncio.current_task()
        self._active[engine_id] = task
        self._idle.clear()
        self.m.running.set(len(self._active))
        try:
            await self._generate(req, tokens, engine_id, rs)
        finally:
            self._active.pop(engine_id, None)
            self.m.running.set(len(self._active))
            if not self._active:
                self._idle.set()
            self._load_changed.set()

    async def _call_hook(self, name: str, coro, deadline_ms: int | None):
        """Await one request's hook under hook_timeout_s and the request's deadline."""
        timeout = self.hook_timeout_s
        left = None if deadline_ms is None else max(0.0, (deadline_ms - now_ms()) / 1000)
        try:
            async with asyncio.timeout(timeout if left is None else min(timeout, left)):
                return await coro
        except RequesterCancelled:
            raise
        except Exception as exc:  # TimeoutError included; a cancel of the request goes through
            if isinstance(exc, TimeoutError) and left is not None and left <= timeout:
                raise HookFailed("request deadline passed in worker hook " + name,
                                 "deadline_exceeded") from exc
            self.m.hook_errors.labels(name).inc()
            log.warning("worker hook failed", hook=name, error=repr(exc))
            raise HookFailed(f"worker hook {name} failed: {exc!r}") from exc

    async def _unless_cancelled(self, coro, rs):
        """Await `coro` unless the requester cancels first (RequesterCancelled; `coro`'s task
        is cancelled, so a hook waiting on a remote prefill frees what it holds at once)."""
        task = asyncio.ensure_future(coro)
        waiter = asyncio.ensure_future(rs.cancelled.wait())
        try:
            await asyncio.wait((task, waiter), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait((task,), timeout=CLOSE_STEP_TIMEOUT_S)
        if task.cancelled():
            raise RequesterCancelled()
        return task.result()

    async def _remote_first_token(self, req: proto.GenerateRequest, tokens: list[int],
                                  remote: RemotePrefill, rs) -> KvImport | bool | None:
        """A remote prefill's first token goes to the requester now; then wait for its KV.
        Returns the import for the engine (None: compute the prompt here), or False when the
        first token ended the request."""
        first = remote.first_token_ids
        self.m.cached_tokens.inc(remote.cached_tokens)
        self.m.tokens.inc(len(first))
        lp = None if remote.logprobs is None else _wire_logprobs(remote.logprobs, req)
        if remote.finish_reason is not None:
            usage = proto.Usage(prompt_tokens=len(tokens), completion_tokens=len(first),
                                cached_tokens=remote.cached_tokens)
            await rs.send(proto.pack_tokens(first), finish_reason=remote.finish_reason,
                          usage=usage, final=True, logprobs=lp)
            await self._lifecycle(req.request_id, PHASE_FIRST_TOKEN)
            return False
        if lp is None:
            await rs.send(proto.pack_tokens(first))
        else:
            await rs.send(proto.pack_tokens(first), logprobs=lp)
        await self._lifecycle(req.request_id, PHASE_FIRST_TOKEN)
        return await self._call_hook("before_run", self._unless_cancelled(remote.kv(), rs),
                                     req.deadline_ms)

    async def _generate(self, req: proto.GenerateRequest, tokens: list[int], engine_id: str,
                        rs) -> None:
        # a timed request (genset.runtime.timeline): its stamps travel back in the final usage
        stamps = {"w_received": time.time()} if req.timeline else None
        kv_import: KvImport | None = None
        remote: RemotePrefill | None = None
        if self._before_run is not None:
            try:
                kv_import = await self._call_hook(
                    "before_run", self._unless_cancelled(self._before_run(req, tokens), rs),
                    req.deadline_ms)
            except HookFailed as exc:
                await rs.fail(self._reject(exc.code, str(exc), retryable=exc.code == "internal"))
                return
            except RequesterCancelled:
                self.m.cancelled.inc()
                self.m.finished.labels(FINISH_CANCELLED).inc()
                await self._lifecycle(req.request_id, PHASE_DONE)
                return
        if isinstance(kv_import, RemotePrefill):
            remote, kv_import = kv_import, None
            try:
                got = await self._remote_first_token(req, tokens, remote, rs)
            except BaseException as exc:
                await remote.release()
                if isinstance(exc, asyncio.CancelledError):
                    raise
                reason = await self._remote_failed(req, exc, rs)
                self.m.finished.labels(reason).inc()
                await self._lifecycle(req.request_id, PHASE_DONE)
                return
            if got is False:
                await remote.release()
                self.m.started.inc()
                self.m.prompt_tokens.inc(len(tokens))
                self.m.finished.labels(remote.finish_reason).inc()
                await self._lifecycle(req.request_id, PHASE_DONE)
                return
            kv_import = got
        try:
            resume = remote.first_token_ids if remote is not None else []
            try:
                stream = await self.engine.submit(EngineRequest(
                    request_id=engine_id, token_ids=tokens, sampling=req.sampling,
                    stop=req.stop, kv_import=kv_import, trace=stamps, resume_token_ids=resume))
            except ValueError as exc:
                if kv_import is None:
                    raise
                # The hook's KV was refused (a payload of another layout, a corrupt block):
                # that is the hook's fault, not the request's; compute the prompt instead
                # (after a remote first token too: the engine resumes after it).
                self.m.hook_errors.labels("before_run").inc()
                log.warning("KV import refused; computing the prompt", error=str(exc))
                if remote is None:  # the hook's own import (a transfer's has its own path)
                    try:
                        self.hooks.import_refused(req, kv_import, exc)
                    except Exception:  # a hook's bookkeeping never fails the request
                        log.exception("import_refused hook failed")
                stream = await self.engine.submit(EngineRequest(
                    request_id=engine_id, token_ids=tokens, sampling=req.sampling,
                    stop=req.stop, trace=stamps, resume_token_ids=resume))
        except EngineOverloaded as exc:
            await rs.fail(self._reject("overloaded", str(exc), retryable=True))
            return
        except ValueError as exc:
            await rs.fail(self._reject("bad_request", str(exc)))
            return
        finally:
            if remote is not None:  # the engine took the pins over (or refused the request)
                await remote.release()
        worker_stamp(stamps, "w_admitted")
        # the engine decoded what it took (pinned in its cache, or held in host memory within
        # its own budget: `Engine.hold_onboarded`); the payloads as they came are not kept
        # for the request's whole life
        kv_import = None
        self.m.started.inc()
        self.m.prompt_tokens.inc(len(tokens))
        self._load_changed.set()
        reason = FINISH_ERROR
        first = remote is None  # a remote prefill's first token is out already
        resumed = remote.resumed if remote is not None else None  # (its hook times the gap)
        # The cancel/deadline watcher aborts the engine request; the output stream then ends
        # with a "cancelled" output, so the loop below always terminates.
        watcher = asyncio.create_task(self._watch(rs, req.deadline_ms, engine_id))
        try:
            async for out in stream:
                if resumed is not None:
                    resumed()
                    resumed = None
                if first and (out.token_ids or out.finish_reason):
                    first = False
                    worker_stamp(stamps, "w_first_token")
                    self.m.cached_tokens.inc(max(0, out.cached_tokens))
                    if out.token_ids:
                        if self._after_prefill is not None and out.finish_reason not in (
                                FINISH_CANCELLED, FINISH_ERROR):
                            await self._prefill_done(req, tokens, engine_id, out)
                        await self._lifecycle(req.request_id, PHASE_FIRST_TOKEN)
                self.m.tokens.inc(len(out.token_ids))
                lp = None if out.logprobs is None else _wire_logprobs(out.logprobs, req)
                if out.finish_reason is None:
                    if lp is None:
                        await rs.send(proto.pack_tokens(out.token_ids))
                    else:
                        await rs.send(proto.pack_tokens(out.token_ids), logprobs=lp)
                    if stamps is not None:
                        worker_stamp(stamps, "w_first_sent")
                    if stream.direct is None and lp is None:
                        # the following plain frames go out from the step's delivery
                        # (genset.worker.frames): this task wakes again for the last one
                        stream.direct = direct_sender(rs, self.m.tokens)
                    continue
                reason = out.finish_reason
                if reason == FINISH_CANCELLED:
                    reason = watcher.result() if watcher.done() else FINISH_CANCELLED
                    break
                if reason == FINISH_ERROR:
                    await rs.fail(ErrorInfo(code="internal", retryable=True,
                                            message=f"engine failed: {out.error or 'unknown'}"))
                    break
                cached = remote.cached_tokens if remote is not None else out.cached_tokens
                usage = proto.Usage(prompt_tokens=out.prompt_tokens or len(tokens),
                                    completion_tokens=out.completion_tokens,
                                    cached_tokens=max(0, cached))
                if stamps is not None:
                    worker_stamp(stamps, "w_first_sent")  # a one-frame reply: its final frame
                    usage.timeline = stamps
                await rs.send(proto.pack_tokens(out.token_ids), finish_reason=reason,
                              usage=usage, final=True, logprobs=lp)
        except (StreamCancelled, Disconnected, StreamClosed):
            reason = FINISH_CANCELLED  # requester gone or cancelled between two sends
        except HookFailed as exc:
            reason = REASON_DEADLINE if exc.code == "deadline_exceeded" else FINISH_ERROR
            if reason == FINISH_ERROR:  # the deadline's error frame is sent below
                with contextlib.suppress(Exception):
                    await rs.fail(ErrorInfo(code="internal", retryable=True, message=str(exc)))
        except asyncio.CancelledError:
            reason = REASON_DRAIN
            with contextlib.suppress(Exception):
                await rs.fail(ErrorInfo(code="overloaded", retryable=True,
                                        message="worker shut down before the request finished"))
            raise
        finally:
            watcher.cancel()
            if not stream.finished:
                await self.engine.abort(engine_id)  # frees its blocks at the next step
            if reason == REASON_DEADLINE:
                with contextlib.suppress(Exception):
                    await rs.fail(ErrorInfo(code="deadline_exceeded",
                                            message="request deadline passed during generation"))
            if reason == FINISH_CANCELLED:
                self.m.cancelled.inc()
            self.m.finished.labels(reason).inc()
            await self._lifecycle(req.request_id, PHASE_DONE)

    async def _remote_failed(self, req: proto.GenerateRequest, exc: BaseException, rs) -> str:
        """The requester's answer when a remote prefill's first token or KV wait failed;
        returns the reason counted."""
        if isinstance(exc, StreamCancelled | Disconnected | StreamClosed | RequesterCancelled):
            self.m.cancelled.inc()
            return FINISH_CANCELLED
        if isinstance(exc, HookFailed):
            with contextlib.suppress(Exception):
                await rs.fail(self._reject(exc.code, str(exc),
                                           retryable=exc.code == "internal"))
            return REASON_DEADLINE if exc.code == "deadline_exceeded" else FINISH_ERROR
        log.exception("remote prefill failed", request_id=req.request_id, exc_info=exc)
        with contextlib.suppress(Exception):
            await rs.fail(ErrorInfo(code="internal", retryable=True,
                                    message=f"remote prefill failed: {exc!r}"))
        return FINISH_ERROR

    async def _prefill_done(self, req: proto.GenerateRequest, tokens: list[int],
                            engine_id: str, out) -> None:
        done = PrefillDone(
            request=req, engine_request_id=engine_id, token_ids=tokens,
            block_hashes=block_hashes(tokens, self.engine.card.block_size),
            cached_tokens=max(0, out.cached_tokens), first_token_ids=list(out.token_ids),
            finished=out.finish_reason is not None)
        await self._call_hook("after_prefill", self._after_prefill(done), req.deadline_ms)

    async def _watch(self, rs, deadline_ms: int | None, engine_id: str) -> str:
        """Abort `engine_id` when the requester cancels or the deadline passes; returns which."""
        timeout = None if deadline_ms is None else max(0.0, (deadline_ms - now_ms()) / 1000)
        reason = FINISH_CANCELLED if await wait_event(rs.cancelled, timeout) else REASON_DEADLINE
        await self.engine.abort(engine_id)
        return reason

    async def _lifecycle(self, request_id: str, phase: str) -> None:
        with contextlib.suppress(Exception):  # bookkeeping for routers: never fail a request
            await self.bus.publish(self.lifecycle_subject, proto.RequestLifecycle(
                request_id=request_id, worker_id=self.instance_id, phase=phase, ts_ms=now_ms()))
