"""`AsyncEngineDriver`: runs a synchronous `EngineCore` from asyncio as an `Engine`.

The core steps in a dedicated thread, so the event loop never blocks on a step (a forward
pass). Calls from the loop (submit, abort, import, export, snapshot) become commands the
stepping side runs between two steps, so an abort takes effect at the next step and frees its
blocks there. A subclass may step the core elsewhere by overriding `_start_stepping`,
`_stop_stepping` and `_wake` (the mocker's `MockerDriver` steps on the loop, paced by its
modelled step times).

Every queue is bounded: a request's output queue coalesces steps when the consumer lags
(tokens are never dropped), and a KV event subscriber that lags loses its oldest batches,
which it notices as an event_id gap and heals with `kv_snapshot()`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from genset.engines.core import evicted_size
from genset.engines.events import KvEventFanout, KvEventSubscription
from genset.engines.interface import Engine, EngineCore
from genset.engines.types import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    EngineCard,
    EngineOutput,
    EngineOverloaded,
    EngineRequest,
    EvictedBlock,
    KvBlockData,
    KvImport,
)
from proto.kv import KvEventBatch, LoadReport

log = logging.getLogger(__name__)

STEP_LOG = 1024  # step records kept for samplers (a sampler that falls behind loses the oldest)


class RequestStream:
    """Async iterator over one request's `EngineOutput`s. Bounded: when more than `maxsize`
    outputs are pending, new ones are merged into the newest pending one."""

    __slots__ = ("_abort", "_event", "_finished", "_items", "direct", "last", "maxsize",
                 "request_id")

    def __init__(self, request_id: str, abort: Callable[[str], Any], maxsize: int = 64) -> None:
        self.request_id = request_id
        self.maxsize = maxsize
        self._items: deque[EngineOutput] = deque()
        self._event = asyncio.Event()
        self._finished = False  # the final output has been queued
        self._abort = abort
        self.last: EngineOutput | None = None  # the latest output put, for usage on abort
        # Set by the consumer: `direct(output) -> bool` takes a plain output (not the last,
        # nothing queued before it) at delivery, so the consumer's task is not woken for
        # it; False leaves it to the queue. The worker host sends such tokens this way.
        self.direct: Callable[[EngineOutput], bool] | None = None

    @property
    def finished(self) -> bool:
        return self._finished

    def put(self, out: EngineOutput) -> None:
        if self._finished:
            return
        self.last = out
        if len(self._items) >= self.maxsize:
            merge_output(self._items[-1], out)
        else:
            self._items.append(out)
        if out.finish_reason is not None:
            self._finished = True
        self._event.set()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> EngineOutput:
        while not self._items:
            if self._finished:
                raise StopAsyncIteration
            self._event.clear()
            await self._event.wait()
        return self._items.popleft()

    async def aclose(self) -> None:
        """Stop consuming; aborts the request if it has not finished."""
        if not self._finished:
            await self._abort(self.request_id)


def merge_output(into: EngineOutput, out: EngineOutput) -> None:
    """Fold a later output of the same request into an earlier one (tokens appended in order;
    the later one's end and counts win)."""
    into.token_ids.extend(out.token_ids)
    if out.logprobs is not None:  # a request's outputs all carry them, or none does
        if into.logprobs is None:
            into.logprobs = out.logprobs
        else:
            into.logprobs.extend(out.logprobs)
    into.finish_reason = out.finish_reason
    into.completion_tokens = out.completion_tokens
    into.error = out.error
    if out.kv_tail is not None:
        into.kv_tail = out.kv_tail


class EvictionHandover:
    """Evicted blocks on their way from the stepping thread to the loop: the core's
    `EvictionSink`, bounded by `max_bytes` of payload (the core reads no more than `room()`),
    thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._blocks: list[EvictedBlock] = []
        self._bytes = 0
        self.dropped = 0  # evicted blocks not handed over for lack of room (monotonic)
        self.handed = 0
        self.skipped = 0  # evicted while paused
        # Paused (nobody to hand blocks to, e.g. no offload store): room() is 0, so the core
        # reads no payloads at all.
        self.paused = False
        # Hashes the consumer already has (a set-like; the core only asks `in`, from the
        # stepping thread): those blocks are not read.
        self.skip = None
        # The consumer's admission (`genset.offload.admission`): `admit(hash, marks)`, called
        # from the stepping thread for evicted blocks and those copied out ahead; a refused
        # block is not read. None: every block is handed over.
        self.admit = None

    def known(self, block_hash: int) -> bool:
        skip = self.skip
        return skip is not None and block_hash in skip

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    @property
    def pending(self) -> int:
        return len(self._blocks)

    def room(self) -> int:
        return 0 if self.paused else max(0, self.max_bytes - self._bytes)

    def put(self, blocks: list[EvictedBlock], dropped: int) -> None:
        size = sum(evicted_size(b) for b in blocks)
        with self._lock:
            self._blocks.extend(blocks)
            self._bytes += size
            if self.paused and not blocks:
                self.skipped += dropped
            else:
                self.dropped += dropped
            self.handed += len(blocks)

    def take(self) -> list[EvictedBlock]:
        with self._lock:
            blocks, self._blocks = self._blocks, []
            self._bytes = 0
        return blocks


def now_ms() -> int:
    """Wall-clock ms, the timestamp of KV event batches and load reports."""
    return int(time.time() * 1000)


class AsyncEngineDriver(Engine):
    """Runs an `EngineCore` in a dedicated thread and exposes it as an `Engine`.

    `stream_maxsize` bounds each request's output queue, `max_requests` the requests in
    flight (submit raises `EngineOverloaded` beyond it); `ewma_alpha` smooths the step time
    reported in the load.
    """

    def __init__(
        self,
        core: EngineCore,
        *,
        worker_id: int = 0,
        stream_maxsize: int = 64,
        max_requests: int = 4096,
        ewma_alpha: float = 0.2,
    ) -> None:
        self.core = core
        self.worker_id = worker_id
        self.stream_maxsize = stream_maxsize
        self.max_requests = max_requests
        self._alpha = ewma_alpha
        self.step_ms_ewma = 0.0
        self.num_steps = 0
        # the last steps' records (the core's `last_step`), newest last, for whoever samples
        # them (genset.worker.step_stats); appended on the stepping side, a deque is safe
        self.step_log: deque = deque(maxlen=STEP_LOG)
        # set on the loop when a step's outputs are delivered (so after its record is in
        # `step_log`): the step-stats publisher sleeps on it while the engine is idle
        # instead of waking every second to find the log empty (docs/benchmarks.md 5z)
        self.step_logged = asyncio.Event()
        self._streams: dict[str, RequestStream] = {}
        # requests being timed (EngineRequest.trace) until their first token: stepping
        # checks this dict's truthiness once per step, nothing more when nobody is timed
        self._traced: dict[str, dict[str, float]] = {}
        self._kv_fanout = KvEventFanout()
        self._commands: deque[tuple[Callable[[], Any], concurrent.futures.Future[Any] | None]]
        self._commands = deque()
        self._wake_thread = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._failed: str | None = None
        self._load = core.load_report(now_ms(), 0.0)
        self._evictions: EvictionHandover | None = None
        self._evict_consumer: Callable[[list[EvictedBlock]], None] | None = None
        # Called at the end of each step's delivery, on the loop (the worker host sets the
        # bus's `write_pending`): the step's frames and KV batch, queued on the connection by
        # the delivery, go out in one socket write there and then, rather than from the NATS
        # client's flusher task woken for it a loop turn later. Must not raise.
        self.after_delivery: Callable[[], None] | None = None
        # plain frames of the last delivery not sent yet (`_deliver`): (stream, output)
        self._direct_held: list[tuple[RequestStream, EngineOutput]] = []

    # ---- Engine -----------------------------------------------------------------------------

    @property
    def card(self) -> EngineCard:
        return self.core.card

    async def start(self) -> None:
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._start_stepping()

    async def stop(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Stop stepping: the stepping side gets `timeout` s to end (a step in progress
        finishes first); past that it is logged and left behind. Streams still open end with
        "cancelled" either way."""
        if self._loop is None or self._stopping:
            return
        self._stopping = True
        self._wake()
        await self._stop_stepping(timeout)
        for rid in list(self._streams):
            self._finish_stream(rid, FINISH_CANCELLED)

    async def submit(self, request: EngineRequest) -> RequestStream:
        if self._failed is not None:
            raise RuntimeError(f"engine failed: {self._failed}")
        if self._loop is None:
            await self.start()
        if request.request_id in self._streams:
            raise ValueError(f"request id {request.request_id!r} is already active")
        if len(self._streams) >= self.max_requests:
            raise EngineOverloaded(
                f"{len(self._streams)} requests in flight (max {self.max_requests})"
            )
        stream = RequestStream(request.request_id, self.abort, self.stream_maxsize)
        self._streams[request.request_id] = stream
        trace = request.trace
        if trace is not None:
            self._traced[request.request_id] = trace
        try:
            await self._call(lambda: self._add(request, trace))
        except BaseException:
            self._streams.pop(request.request_id, None)
            self._traced.pop(request.request_id, None)
            raise
        return stream

    def _add(self, request: EngineRequest, trace: dict[str, float] | None) -> None:
        self.core.add_request(request)
        if trace is not None:  # queued in the core now (the caller resumes later)
            trace["w_admitted"] = time.time()

    async def abort(self, request_id: str) -> None:
        if self._finish_stream(request_id, FINISH_CANCELLED):
            self._post(lambda: self.core.abort_request(request_id))

    async def export_kv(self, hashes: list[int]) -> list[KvBlockData]:
        return await self._call(lambda: self.core.export_kv(hashes))

    async def import_kv(self, kv: KvImport, pin_for: str | None = None) -> int:
        return await self._call(lambda: self.core.import_kv(kv, pin_for=pin_for))

    async def pin_kv(self, key: str, hashes: list[int]) -> int:
        return await self._call(lambda: self.core.pin_kv(key, hashes))

    async def unpin_kv(self, key: str) -> None:
        await self._call(lambda: self.core.unpin_kv(key))

    async def cached_blocks(self, hashes: list[int]) -> int:
        return await self._call(lambda: self.core.cached_blocks(hashes))

    def load(self) -> LoadReport:
        return self._load

    def kv_events(self, maxsize: int = 1024) -> KvEventSubscription:
        return self._kv_fanout.subscribe(maxsize)

    async def kv_snapshot(self) -> KvEventBatch:
        return await self._call(lambda: self.core.kv_snapshot(now_ms()))

    def cached_prefix(self, hashes: list[int]) -> int:
        fn = getattr(self.core, "cached_prefix", None)
        return fn(hashes) if fn is not None else 0

    def import_room(self) -> int | None:
        sched = getattr(self.core, "scheduler", None)
        if sched is None or not hasattr(sched, "import_room"):
            return None
        try:  # from the loop while a stepping thread may change the queues: a hint
            return sched.import_room()
        except RuntimeError:  # (a queue changed while read)
            return None

    def hold_onboarded(self, max_bytes: int) -> bool:
        sched = getattr(self.core, "scheduler", None)
        if sched is None or not hasattr(sched, "hold_kv"):
            return False
        sched.max_held_bytes = max(0, int(max_bytes))  # (one int: read by the core's thread)
        return True

    def hold_room_bytes(self) -> int | None:
        sched = getattr(self.core, "scheduler", None)
        if sched is None or not getattr(sched, "max_held_bytes", 0):
            return None
        return sched.hold_room_bytes()

    def hand_over_evictions(self, sink: Callable[[list[EvictedBlock]], None], *,
                            max_bytes: int = 64 << 20, with_tokens: bool = True) -> bool:
        set_sink = getattr(self.core, "set_eviction_sink", None)
        if set_sink is None:
            return False
        handover = EvictionHandover(max_bytes)
        self._evictions = handover
        self._evict_consumer = sink
        # on the stepping side, between two steps, like every other change to the core
        self._post(lambda: set_sink(handover, with_tokens=with_tokens))
        return True

    @property
    def evictions(self) -> EvictionHandover | None:
        return self._evictions

    @property
    def num_active(self) -> int:
        return len(self._streams)

    # ---- commands ---------------------------------------------------------------------------

    def _post(self, fn: Callable[[], Any]) -> None:
        self._commands.append((fn, None))
        self._wake()

    async def _call(self, fn: Callable[[], Any]) -> Any:
        if self._loop is None:
            # Not stepping yet: nothing else touches the core, and nothing would run a queued
            # command (the caller would wait forever). Run it here.
            return fn()
        if self._stopping:
            raise RuntimeError("engine is stopped")
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._commands.append((fn, fut))
        self._wake()
        return await asyncio.wrap_future(fut)

    def _run_commands(self) -> None:
        commands = self._commands
        while commands:
            self._run_command(*commands.popleft())

    def _run_command(self, fn: Callable[[], Any],
                     fut: concurrent.futures.Future | asyncio.Future | None) -> None:
        # `fut`: a concurrent future (stepping in a thread) or, where the stepping side runs
        # on the loop (MockerDriver), the loop's own; either may be cancelled by its caller
        try:
            result = fn()
        except BaseException as exc:  # handed to the caller
            if fut is not None:
                if not fut.done():
                    fut.set_exception(exc)
            else:
                log.warning("engine command failed: %r", exc)
        else:
            # a command may change the load without a step (an unpin frees blocks, an
            # import takes some): refreshed before the caller resumes, so it never waits
            # for a step that may not come
            self._set_load(self.core.load_report(now_ms(), self.step_ms_ewma))
            if fut is not None and not fut.done():
                fut.set_result(result)

    def _set_load(self, load: LoadReport) -> None:
        if self._thread is not None and threading.current_thread() is self._thread:
            # through the loop, in order after the step deliveries queued before it
            assert self._loop is not None
            self._loop.call_soon_threadsafe(setattr, self, "_load", load)
        else:
            self._load = load

    # ---- stepping (override the three hooks to step elsewhere) ------------------------------

    def _start_stepping(self) -> None:
        self._thread = threading.Thread(
            target=self._thread_main, name=f"engine-{self.worker_id}", daemon=True
        )
        self._thread.start()

    async def _stop_stepping(self, deadline_s: float) -> None:
        if self._thread is None:
            return
        # join(timeout) returns by itself, so the executor thread is never left blocked
        await asyncio.to_thread(self._thread.join, deadline_s)
        if self._thread.is_alive():
            log.warning("engine thread still in a step %.0f s after stop", deadline_s)

    def _wake(self) -> None:
        self._wake_thread.set()

    def _thread_main(self) -> None:
        loop = self._loop
        assert loop is not None
        core = self.core
        while not self._stopping:
            self._wake_thread.clear()
            self._run_commands()
            if not core.has_work():
                # Until a command or stop() wakes it: only commands give the core work (every
                # one calls _wake, after the clear above). Not a 0.5 s poll: an idle worker's
                # stepping thread woke twice a second for nothing (docs/benchmarks.md 5z).
                self._wake_thread.wait()
                continue
            traced = self._traced
            started = time.time() if traced else 0.0
            try:
                outputs, step_ms = core.step()
            except Exception as exc:
                log.exception("engine step failed")
                loop.call_soon_threadsafe(self._fail, repr(exc))
                return
            if traced:
                self._stamp_first_step(outputs, started, step_ms)
            batch = core.take_kv_batch(now_ms())
            load = core.load_report(now_ms(), self._ewma(step_ms))
            loop.call_soon_threadsafe(self._deliver, outputs, batch, load)
            if not outputs and step_ms <= 0:
                # nothing could be scheduled (e.g. blocks pinned): don't spin
                self._wake_thread.wait(0.01)
        self._run_commands()

    def _stamp_first_step(self, outputs: list[EngineOutput], started: float,
                          step_ms: float) -> None:
        """Timed requests whose first token this step computed: when it started, how long."""
        traced = self._traced
        for out in outputs:
            stamps = traced.pop(out.request_id, None)
            if stamps is not None:
                stamps["w_first_step"] = started
                stamps["w_step_ms"] = step_ms

    # ---- delivery (on the loop) -------------------------------------------------------------

    def _ewma(self, step_ms: float) -> float:
        self.num_steps += 1
        rec = getattr(self.core, "last_step", None)
        if rec is not None:
            self.step_log.append(rec)
        if self.num_steps == 1:
            self.step_ms_ewma = step_ms
        else:
            self.step_ms_ewma += self._alpha * (step_ms - self.step_ms_ewma)
        return self.step_ms_ewma

    def _deliver(
        self, outputs: list[EngineOutput], batch: KvEventBatch | None, load: LoadReport
    ) -> int:
        """Hand a step's outputs, KV batch and load over, then `after_delivery`; returns how
        many consumers' tasks it woke (outputs queued on their streams, a KV batch queued
        rather than sent).

        When the delivery wakes tasks (a first token, a last frame, a KV batch for the feed
        task), the plain frames that would go out directly wait until those tasks have run,
        later in this loop turn: the woken tasks' frames are then queued first and everything
        leaves in one write. Sent at once, the plain frames went in a write of their own and
        the first tokens in a second one behind them, which the frontend read only after it
        had handled every plain frame of the step (aiperf c=64: first token 4 ms at p50 from
        the worker's send to the frontend, two wake-ups of nats-server and of the frontend
        per such step; docs/benchmarks.md, issue 15 §5t)."""
        if self._direct_held:
            self._send_held()  # a previous step's frames go first, whatever woke since
        self._load = load
        if not self.step_logged.is_set():
            self.step_logged.set()
        streams = self._streams
        held = self._direct_held
        woke = 0
        for out in outputs:
            stream = streams.get(out.request_id)
            if stream is None:
                continue  # aborted meanwhile
            if stream.direct is not None and out.finish_reason is None and not stream._items:
                held.append((stream, out))
                continue
            stream.put(out)
            woke += 1
            if out.finish_reason is not None:
                del streams[out.request_id]
        if batch is not None:
            batch.worker_id = self.worker_id
            if self._kv_fanout.publish(batch):
                woke += 1
        evictions = self._evictions
        if evictions is not None and evictions.pending:
            blocks = evictions.take()
            if blocks and self._evict_consumer is not None:
                try:
                    self._evict_consumer(blocks)
                except Exception:  # the consumer's fault (it counts its own): stepping goes on
                    log.exception("eviction consumer failed")
        if woke:
            # after the steps of the tasks just woken, which were scheduled before this
            asyncio.get_running_loop().call_soon(self._send_held)
        else:
            self._send_held()
        return woke

    def _send_held(self) -> None:
        """Send the plain frames `_deliver` held, each directly if it still can go that way
        (else through its stream's queue, as `_deliver` does), then `after_delivery`."""
        held = self._direct_held
        if held:
            self._direct_held = []
            streams = self._streams
            for stream, out in held:
                if streams.get(out.request_id) is not stream:
                    continue  # aborted meanwhile
                direct = stream.direct
                if direct is not None and not stream._items and direct(out):
                    stream.last = out
                else:
                    stream.put(out)
        self._after_delivery()

    def _after_delivery(self) -> None:
        after = self.after_delivery
        if after is not None:
            try:
                after()
            except Exception:  # e.g. the connection just went: its flusher reports it
                log.exception("after_delivery failed")

    def _finish_stream(self, request_id: str, reason: str, error: str | None = None) -> bool:
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return False
        self._traced.pop(request_id, None)
        last = stream.last
        stream.put(
            EngineOutput(
                request_id=request_id,
                token_ids=[],
                finish_reason=reason,
                prompt_tokens=last.prompt_tokens if last else 0,
                cached_tokens=last.cached_tokens if last else 0,
                completion_tokens=last.completion_tokens if last else 0,
                error=error,
            )
        )
        return True

    def _fail(self, message: str) -> None:
        self._failed = message
        for rid in list(self._streams):
            self._finish_stream(rid, FINISH_ERROR, message)
