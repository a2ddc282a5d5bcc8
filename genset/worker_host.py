"""The engine host: puts one `Engine` on the bus. Shared by the decode and prefill services.

What a worker does for the rest of the system, all here:

- serves `proto.GenerateRequest` streams on its own subject: one chunk per engine output per
  request (a step's tokens travel together; an engine that coalesces short steps hands over
  several steps' tokens in one output, which then travel in one chunk), a final chunk with `finish_reason` and
  `proto.Usage` (with `cached_tokens`); a Cancel from the requester or a passed deadline
  aborts the request in the engine, which frees its blocks at the next step;
- registers its `InstanceRecord` and `ModelCard` in etcd (under the process lease) once it
  can serve, and unregisters the card first when it drains;
- publishes the engine's `KvEventBatch`es on `kv_events(ns, id)` in event_id order, a
  `LoadReport` on `load_report(ns, id)` periodically (more often while busy), and
  `RequestLifecycle` (first_token / done) so routers keep their load view true;
- answers `KvResyncRequest` on `kv_resync(ns, id)`: a snapshot batch (Cleared + Stored for
  everything held, numbered in sequence) is published on the events subject *and* returned
  to the asker, so every router sees it in order and the asker need not wait for it;
- a bad message gets a clear error frame / reply and a counted metric, never a crash.

The host does not know about processes, signals or flags: `services/decode` wraps it in a
`Service`. Tests can run it in-process against a real bus and etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import time
from dataclasses import dataclass, field

import structlog

import proto
from genset.engines.interface import Engine
from genset.engines.types import FINISH_CANCELLED, FINISH_ERROR, EngineOverloaded, EngineRequest
from genset.runtime.bus_errors import Disconnected, StreamCancelled, StreamClosed
from proto import keys, subjects
from proto.generate import ErrorInfo

log = structlog.get_logger("genset.worker")

# Why a request ended, as counted in genset_worker_requests_finished_total{reason=...}.
REASON_DEADLINE = "deadline"
REASON_DRAIN = "drain"

# close(): how long each step may take before it is given up on (logged, not waited for).
CLOSE_STEP_TIMEOUT_S = 5.0


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:  # noqa: ASYNC109
    """Wait for `event` at most `timeout` s (None: no limit); True if it is set.

    Not `asyncio.wait_for(event.wait(), t)`: on Python 3.11 that swallows a cancel arriving
    after the event fired but before wait_for resumed (it returns the inner result instead),
    so a loop around it survives `task.cancel()`. `asyncio.timeout` runs no inner task and
    lets such a cancel through.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    return event.is_set()


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class HostConfig:
    namespace: str
    model: str  # the served model name clients ask for
    role: str = "decode"  # decode (aggregated) | prefill
    tokenizer: str = ""  # what the frontend loads to tokenize for this model
    max_streams: int = 1024  # concurrent generate streams accepted; more are refused (retryable)
    load_interval_s: float = 0.25  # load report period while busy
    idle_load_interval_s: float = 2.0  # ... and while nothing changes
    http_url: str | None = None  # this process's /metrics and /health
    labels: dict[str, str] = field(default_factory=dict)
    # The service lifecycle (genset.runtime.service) registers the InstanceRecord itself;
    # a host used on its own (tests, embedded) can do it here.
    register_instance: bool = False


class WorkerMetrics:
    """The worker's Prometheus metrics (names get the genset_ prefix)."""

    def __init__(self, metrics) -> None:
        self.started = metrics.counter("worker_requests_started", "generate requests accepted")
        self.finished = metrics.counter(
            "worker_requests_finished",
            "generate requests ended, by reason (stop, length, cancelled, deadline, error, drain)",
            ["reason"])
        self.cancelled = metrics.counter(
            "worker_requests_cancelled", "generate requests cancelled by the requester")
        self.rejected = metrics.counter(
            "worker_requests_rejected", "generate requests refused, by error code", ["code"])
        self.tokens = metrics.counter("worker_generated_tokens", "output tokens generated")
        self.prompt_tokens = metrics.counter("worker_prompt_tokens", "prompt tokens received")
        self.cached_tokens = metrics.counter(
            "worker_cached_prompt_tokens", "prompt tokens served from the prefix cache")
        self.running = metrics.gauge("worker_requests_running", "generate streams in progress")
        self.kv_usage = metrics.gauge("worker_kv_usage", "fraction of KV blocks in use (0-1)")
        self.kv_used = metrics.gauge("worker_kv_used_blocks", "KV blocks in use")
        self.kv_total = metrics.gauge("worker_kv_total_blocks", "KV capacity in blocks")
        self.waiting = metrics.gauge("worker_requests_waiting", "requests queued in the engine")
        self.kv_batches = metrics.counter("worker_kv_event_batches", "KV event batches published")
        self.kv_resyncs = metrics.counter("worker_kv_resyncs", "KV snapshots sent on request")
        self.bad_messages = metrics.counter(
            "worker_bad_messages", "malformed or invalid bus messages received", ["subject"])


class WorkerHost:
    """Serves one engine on the bus; see the module docstring."""

    def __init__(self, engine: Engine, *, bus, discovery, instance_id: int, config: HostConfig,
                 metrics) -> None:
        self.engine = engine
        self.bus = bus
        self.discovery = discovery
        self.instance_id = instance_id
        self.config = config
        self.m = WorkerMetrics(metrics)
        ns = config.namespace
        self.generate_subject = subjects.worker_generate(ns, config.role, instance_id)
        self.kv_events_subject = subjects.kv_events(ns, instance_id)
        self.kv_resync_subject = subjects.kv_resync(ns, instance_id)
        self.load_subject = subjects.load_report(ns, instance_id)
        self.lifecycle_subject = subjects.request_lifecycle(ns)
        self.instance_key = keys.instance(ns, config.role, instance_id)
        self.model_key = keys.model(ns, config.model, instance_id)
        self.ready = False  # records registered, serving
        self.draining = False
        self._active: dict[str, asyncio.Task] = {}  # engine request id -> handler task
        self._ids = itertools.count(1)
        self._subs: list = []
        self._tasks: list[asyncio.Task] = []
        self._kv_sub = None
        self._load_changed = asyncio.Event()
        self._closing = False  # close() began: background loops end at their next turn
        self._idle = asyncio.Event()
        self._idle.set()

    # ---- records ---------------------------------------------------------------------------

    def model_card(self) -> proto.ModelCard:
        card = self.engine.card
        return proto.ModelCard(
            model=self.config.model, instance_id=self.instance_id, role=self.config.role,
            engine=card.engine, block_size=card.block_size, kv_blocks=card.kv_blocks,
            max_batch_tokens=card.max_batch_tokens, max_running=card.max_running,
            context_length=card.context_length, tokenizer=self.config.tokenizer,
            eos_token_ids=list(card.eos_token_ids), generate_subject=self.generate_subject)

    def instance_record(self) -> proto.InstanceRecord:
        return proto.InstanceRecord(
            instance_id=self.instance_id, component=self.config.role,
            namespace=self.config.namespace,
            subjects={"generate": self.generate_subject, "kv_events": self.kv_events_subject,
                      "kv_resync": self.kv_resync_subject, "load_report": self.load_subject},
            host=socket.gethostname(), pid=os.getpid(), started_ms=now_ms(),
            http_url=self.config.http_url,
            labels={"model": self.config.model, "engine": self.engine.card.engine,
                    **self.config.labels})

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine, subscribe, publish, then register: once the card is in etcd a
        frontend may send work at once, so everything must already be listening."""
        await self.engine.start()
        card = self.engine.card
        self.m.kv_total.set(card.kv_blocks)
        self._kv_sub = self.engine.kv_events(maxsize=4096)
        self._tasks.append(asyncio.create_task(self._publish_kv_events(), name="kv-events"))
        self._tasks.append(asyncio.create_task(self._publish_load(), name="load-reports"))
        self._subs.append(await self.bus.serve_stream(
            self.generate_subject, self._on_generate, max_concurrent=self.config.max_streams))
        self._subs.append(await self.bus.serve(self.kv_resync_subject, self._on_resync))
        if self.config.register_instance:
            await self.discovery.register(self.instance_key, self.instance_record())
        await self.discovery.register(self.model_key, self.model_card())
        self.ready = True
        log.info("worker ready", model=self.config.model, engine=card.engine,
                 instance_id=f"{self.instance_id:x}", subject=self.generate_subject,
                 kv_blocks=card.kv_blocks, block_size=card.block_size)

    async def drain(self, deadline_s: float) -> None:
        """Stop taking new work, finish what is in flight until the deadline, abort the rest.

        The model card goes first so frontends stop choosing this worker; requests that still
        arrive (a frontend that has not seen the removal yet) are refused as retryable. The
        instance record and the lease stay until the service closes the discovery.
        """
        self.draining = True
        self.ready = False
        with contextlib.suppress(Exception):
            await self.discovery.unregister(self.model_key)
        in_flight = len(self._active)
        log.info("draining", in_flight=in_flight, deadline_s=deadline_s)
        if not await wait_event(self._idle, deadline_s):
            log.warning("drain deadline passed; aborting requests", left=len(self._active))
            for task in list(self._active.values()):
                task.cancel(REASON_DRAIN)
            await wait_event(self._idle, CLOSE_STEP_TIMEOUT_S)

    async def close(self) -> None:
        """Stop serving: unsubscribe, end requests in flight, stop the background tasks and the
        engine. Every step has a deadline (CLOSE_STEP_TIMEOUT_S): a step that overruns is
        logged and left behind rather than waited on forever."""
        self._closing = True
        for sub in self._subs:
            with contextlib.suppress(Exception):  # TimeoutError included
                async with asyncio.timeout(CLOSE_STEP_TIMEOUT_S):
                    await sub.unsubscribe()
        self._subs.clear()
        for task in list(self._active.values()):
            task.cancel(REASON_DRAIN)
        if self._active and not await wait_event(self._idle, CLOSE_STEP_TIMEOUT_S):
            log.warning("requests still running at close", left=len(self._active))
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            # asyncio.wait neither raises the tasks' exceptions nor swallows our own cancel
            _, pending = await asyncio.wait(tasks, timeout=CLOSE_STEP_TIMEOUT_S)
            for task in pending:
                log.warning("background task did not stop at close", task=task.get_name())
        if self._kv_sub is not None:
            self._kv_sub.close()
        try:
            async with asyncio.timeout(CLOSE_STEP_TIMEOUT_S * 2):
                await self.engine.stop()
        except TimeoutError:
            log.warning("engine did not stop at close", engine=self.engine.card.engine)

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

    async def _generate(self, req: proto.GenerateRequest, tokens: list[int], engine_id: str,
                        rs) -> None:
        try:
            stream = await self.engine.submit(EngineRequest(
                request_id=engine_id, token_ids=tokens, sampling=req.sampling, stop=req.stop))
        except EngineOverloaded as exc:
            await rs.fail(self._reject("overloaded", str(exc), retryable=True))
            return
        except ValueError as exc:
            await rs.fail(self._reject("bad_request", str(exc)))
            return
        self.m.started.inc()
        self.m.prompt_tokens.inc(len(tokens))
        self._load_changed.set()
        reason = FINISH_ERROR
        first = True
        # The cancel/deadline watcher aborts the engine request; the output stream then ends
        # with a "cancelled" output, so the loop below always terminates.
        watcher = asyncio.create_task(self._watch(rs, req.deadline_ms, engine_id))
        try:
            async for out in stream:
                if first and (out.token_ids or out.finish_reason):
                    first = False
                    self.m.cached_tokens.inc(max(0, out.cached_tokens))
                    if out.token_ids:
                        await self._lifecycle(req.request_id, "first_token")
                self.m.tokens.inc(len(out.token_ids))
                if out.finish_reason is None:
                    await rs.send(proto.pack_tokens(out.token_ids))
                    continue
                reason = out.finish_reason
                if reason == FINISH_CANCELLED:
                    reason = watcher.result() if watcher.done() else FINISH_CANCELLED
                    break
                if reason == FINISH_ERROR:
                    await rs.fail(ErrorInfo(code="internal", retryable=True,
                                            message=f"engine failed: {out.error or 'unknown'}"))
                    break
                usage = proto.Usage(prompt_tokens=out.prompt_tokens or len(tokens),
                                    completion_tokens=out.completion_tokens,
                                    cached_tokens=max(0, out.cached_tokens))
                await rs.send(proto.pack_tokens(out.token_ids), finish_reason=reason,
                              usage=usage, final=True)
        except (StreamCancelled, Disconnected, StreamClosed):
            reason = FINISH_CANCELLED  # requester gone or cancelled between two sends
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
            await self._lifecycle(req.request_id, "done")

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

    # ---- KV events, resync, load ---------------------------------------------------------------

    async def _publish_kv_events(self) -> None:
        """One task publishes every batch, so batches leave in event_id order."""
        async for batch in self._kv_sub:
            try:
                await self.bus.publish(self.kv_events_subject, batch)
                self.m.kv_batches.inc()
            except Exception as exc:  # NATS away: the router heals the gap by resync
                log.warning("KV event batch not published", event_id=batch.event_id,
                            error=repr(exc))
            self._load_changed.set()

    async def _on_resync(self, data: bytes):
        try:
            req = proto.decode(data, proto.KvResyncRequest)
        except proto.ProtocolError:
            self.m.bad_messages.labels("kv_resync").inc()
            raise  # the bus answers with a bad_request error naming the field
        if req.worker_id != self.instance_id:
            raise proto.ProtocolError(
                f"KvResyncRequest.worker_id {req.worker_id:x} is not this worker "
                f"({self.instance_id:x})")
        snapshot = await self.engine.kv_snapshot()
        snapshot.worker_id = self.instance_id
        # Through the same queue as step batches: it follows every batch numbered before it.
        self._kv_sub.put(snapshot)
        self.m.kv_resyncs.inc()
        log.info("KV snapshot sent", reason=req.reason, event_id=snapshot.event_id,
                 blocks=len(snapshot.events) - 1)
        return snapshot

    async def _publish_load(self) -> None:
        """A report every load_interval_s while something changes, else every idle interval."""
        last = None
        while not self._closing:
            await wait_event(self._load_changed, self.config.idle_load_interval_s)
            self._load_changed.clear()
            report = self.engine.load()
            # The engine refreshes its report after each step, so an abort that leaves it idle
            # is not reflected until the next step: never claim more than we are serving.
            active = len(self._active)
            running = min(report.running, active)
            waiting = min(report.waiting, active - running)
            report = proto.LoadReport(
                worker_id=self.instance_id, ts_ms=now_ms(), running=running, waiting=waiting,
                waiting_prefill_tokens=report.waiting_prefill_tokens if waiting else 0,
                kv_used_blocks=report.kv_used_blocks, kv_total_blocks=report.kv_total_blocks,
                step_ms_ewma=report.step_ms_ewma)
            self.m.kv_used.set(report.kv_used_blocks)
            self.m.waiting.set(report.waiting)
            if report.kv_total_blocks:
                self.m.kv_usage.set(report.kv_used_blocks / report.kv_total_blocks)
            try:
                await self.bus.publish(self.load_subject, report)
            except Exception as exc:
                log.debug("load report not published", error=repr(exc))
            if self._active or (last and last.kv_used_blocks != report.kv_used_blocks):
                self._load_changed.set()  # keep reporting while busy
            last = report
            await asyncio.sleep(self.config.load_interval_s)
