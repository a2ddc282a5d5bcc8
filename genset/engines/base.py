"""The engine interface every worker hosts, and the driver that runs a synchronous engine core
from asyncio.

Two layers:

- `EngineCore` (a protocol, synchronous, single-threaded): owns a `Scheduler` and an executor
  and advances one step at a time. `genset.engines.mocker.MockerCore` and the torch engine's
  core implement it. Offline simulations (`genset replay`) drive a core directly.
- `Engine` (an ABC, asyncio): what a worker uses. `AsyncEngineDriver` turns any core into an
  `Engine`: the torch core steps in a dedicated thread (`threaded=True`) so the event loop
  never blocks on a forward pass; the mocker core steps on the loop and then sleeps the
  modelled step time (`threaded=False`). Calls from the loop (submit, abort, import, export)
  become commands the core runs between two steps, so an abort takes effect at the next step
  and frees its blocks there.

Using an engine::

    engine = AsyncEngineDriver(core, worker_id=7)
    await engine.start()
    stream = await engine.submit(EngineRequest("r1", token_ids, SamplingParams(), StopConditions()))
    async for out in stream:          # one EngineOutput per step that produced tokens
        send(out.token_ids)
        if out.finish_reason: ...     # the last one; usage in prompt/cached/completion_tokens
    async for batch in engine.kv_events():  # proto.kv.KvEventBatch, event_id +1 per batch
        publish(batch)

Every queue is bounded: a request's output queue coalesces steps when the consumer lags
(tokens are never dropped), and a KV event subscriber that lags loses its oldest batches,
which it notices as an event_id gap and heals with `kv_snapshot()`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from proto.generate import SamplingParams, StopConditions
from proto.kv import KvEventBatch, LoadReport

log = logging.getLogger(__name__)

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"
FINISH_ERROR = "error"


@dataclass(slots=True)
class KvBlockData:
    """One KV block travelling between engines: its chained hash and an engine-specific
    payload (the torch engine: its K/V tensors for the block; the mocker: None)."""

    hash: int
    data: Any = None


@dataclass(slots=True)
class KvImport:
    """KV blocks to load before a request starts (a remote prefill, an offload hit): a chain
    of full blocks in prefix order; `parent_hash` is the block before the first (None when
    they start the sequence)."""

    blocks: list[KvBlockData]
    parent_hash: int | None = None


@dataclass(slots=True)
class EngineRequest:
    request_id: str
    token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: StopConditions = field(default_factory=StopConditions)
    kv_import: KvImport | None = None


@dataclass(slots=True)
class EngineOutput:
    """What one step produced for one request.

    `token_ids`: new tokens since the previous output (one per step; several when the
    consumer lagged and outputs were coalesced). `finish_reason` is set on the last output:
    stop | length | cancelled | error. `cached_tokens` (prompt tokens served from the
    prefix cache) is known from the first output on.
    """

    request_id: str
    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass(slots=True)
class EngineCard:
    """What an engine can do; the worker copies it into `proto.discovery.ModelCard`."""

    engine: str  # torch | mocker | trtllm
    block_size: int
    kv_blocks: int
    max_batch_tokens: int
    max_running: int
    context_length: int
    eos_token_ids: list[int] = field(default_factory=list)
    vocab_size: int = 0


class EngineCore(Protocol):
    """A synchronous engine. All methods are called from one thread, never concurrently."""

    card: EngineCard

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request (importing `request.kv_import` first); ValueError if invalid."""

    def abort_request(self, request_id: str) -> None: ...

    def has_work(self) -> bool: ...

    def step(self) -> tuple[list[EngineOutput], float]:
        """Run one step: its outputs and its duration in ms (measured, or modelled)."""

    def take_kv_batch(self, ts_ms: int) -> KvEventBatch | None: ...

    def kv_snapshot(self, ts_ms: int) -> KvEventBatch: ...

    def export_kv(self, hashes: list[int]) -> list[KvBlockData]: ...

    def import_kv(self, kv: KvImport, pin_for: str | None = None) -> int:
        """Load blocks into the prefix cache; returns how many of them are now cached."""

    def load_report(self, ts_ms: int, step_ms_ewma: float) -> LoadReport: ...


class RequestStream:
    """Async iterator over one request's `EngineOutput`s. Bounded: when more than `maxsize`
    outputs are pending, new ones are merged into the newest pending one."""

    __slots__ = ("_abort", "_event", "_finished", "_items", "last", "maxsize", "request_id")

    def __init__(self, request_id: str, abort: Callable[[str], Any], maxsize: int = 64) -> None:
        self.request_id = request_id
        self.maxsize = maxsize
        self._items: deque[EngineOutput] = deque()
        self._event = asyncio.Event()
        self._finished = False  # the final output has been queued
        self._abort = abort
        self.last: EngineOutput | None = None  # the latest output put, for usage on abort

    @property
    def finished(self) -> bool:
        return self._finished

    def put(self, out: EngineOutput) -> None:
        if self._finished:
            return
        self.last = out
        if len(self._items) >= self.maxsize:
            last = self._items[-1]
            last.token_ids.extend(out.token_ids)
            last.finish_reason = out.finish_reason
            last.completion_tokens = out.completion_tokens
            last.error = out.error
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


class Engine(ABC):
    """The asyncio-facing engine interface (DESIGN section 4)."""

    @property
    @abstractmethod
    def card(self) -> EngineCard: ...

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Start stepping (idempotent)."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Stop stepping; unfinished requests end with finish_reason "cancelled"."""

    @abstractmethod
    async def submit(self, request: EngineRequest) -> RequestStream:
        """Queue a request; raises ValueError for an invalid one (empty, too long, duplicate
        id). Iterate the returned stream for outputs."""

    @abstractmethod
    async def abort(self, request_id: str) -> None:
        """End a request: its stream gets a final "cancelled" output now; the engine frees its
        blocks at the next step. Unknown ids are ignored."""

    @abstractmethod
    async def export_kv(self, hashes: list[int]) -> list[KvBlockData]:
        """The leading run of `hashes` this engine holds, with payloads."""

    @abstractmethod
    async def import_kv(self, kv: KvImport) -> int:
        """Load blocks into the prefix cache (unpinned); returns how many are cached."""

    @abstractmethod
    def load(self) -> LoadReport:
        """The latest load report (cheap; refreshed after every step)."""

    @abstractmethod
    def kv_events(self, maxsize: int = 1024) -> AsyncIterator[KvEventBatch]:
        """A new subscription to this engine's KV event batches, from the call on (bounded;
        `close()` it when done)."""

    @abstractmethod
    async def kv_snapshot(self) -> KvEventBatch:
        """A resync batch (Cleared + Stored for everything held), numbered in sequence."""


def _now_ms() -> int:
    return int(time.time() * 1000)


class AsyncEngineDriver(Engine):
    """Runs an `EngineCore` and exposes it as an `Engine`.

    `threaded=True`: the core steps in a dedicated thread (torch: a step is CPU/GPU work that
    must not block the loop); `threaded=False`: the core steps on the loop and the driver
    sleeps the step duration the core reports (mocker: virtual work, real time).
    `stream_maxsize` bounds each request's output queue, `max_requests` the requests in
    flight (submit raises `EngineOverloaded` beyond it). `coalesce_ms` (steps on the loop
    only; 0: off): outputs of consecutive steps ending within this many ms of the last
    delivery are merged per request and delivered together (one output with several steps'
    tokens), so a mocker at a high speedup does not cost one bus frame per token; a step
    longer than what is left of that window delivers what is held first, so steps of real
    length (>= 1 ms at speedup 1) are delivered one by one, as without it.
    """

    def __init__(
        self,
        core: EngineCore,
        *,
        worker_id: int = 0,
        threaded: bool = True,
        stream_maxsize: int = 64,
        max_requests: int = 4096,
        ewma_alpha: float = 0.2,
        coalesce_ms: float = 0.0,
    ) -> None:
        self.core = core
        self.worker_id = worker_id
        self.threaded = threaded
        self.stream_maxsize = stream_maxsize
        self.max_requests = max_requests
        self._alpha = ewma_alpha
        if coalesce_ms < 0:
            raise ValueError(f"coalesce_ms must be >= 0, got {coalesce_ms}")
        self.coalesce_s = coalesce_ms / 1000.0
        self.step_ms_ewma = 0.0
        self.num_steps = 0
        self._streams: dict[str, RequestStream] = {}
        self._kv_fanout = KvEventFanout()
        self._commands: deque[tuple[Callable[[], Any], concurrent.futures.Future[Any] | None]]
        self._commands = deque()
        self._wake_thread = threading.Event()
        self._wake_loop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._failed: str | None = None
        self._load = core.load_report(_now_ms(), 0.0)

    # ---- Engine -----------------------------------------------------------------------------

    @property
    def card(self) -> EngineCard:
        return self.core.card

    async def start(self) -> None:
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._wake_loop = asyncio.Event()
        if self.threaded:
            self._thread = threading.Thread(
                target=self._thread_main, name=f"engine-{self.worker_id}", daemon=True
            )
            self._thread.start()
        else:
            self._task = asyncio.create_task(self._loop_main(), name=f"engine-{self.worker_id}")

    async def stop(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Stop stepping: the stepping thread/task gets `timeout` s to end (a step in progress
        finishes first); past that it is logged and left behind (a daemon thread). Streams
        still open end with "cancelled" either way."""
        if self._loop is None or self._stopping:
            return
        self._stopping = True
        self._wake()
        if self._thread is not None:
            # join(timeout) returns by itself, so the executor thread is never left blocked
            await asyncio.to_thread(self._thread.join, timeout)
            if self._thread.is_alive():
                log.warning("engine thread still in a step %.0f s after stop", timeout)
        if self._task is not None:
            self._task.cancel()
            # asyncio.wait does not swallow a cancel of stop() itself, and has a deadline
            _, pending = await asyncio.wait([self._task], timeout=timeout)
            if pending:
                log.warning("engine task did not end %.0f s after stop", timeout)
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
        try:
            await self._call(lambda: self.core.add_request(request))
        except BaseException:
            self._streams.pop(request.request_id, None)
            raise
        return stream

    async def abort(self, request_id: str) -> None:
        if self._finish_stream(request_id, FINISH_CANCELLED):
            self._post(lambda: self.core.abort_request(request_id))

    async def export_kv(self, hashes: list[int]) -> list[KvBlockData]:
        return await self._call(lambda: self.core.export_kv(hashes))

    async def import_kv(self, kv: KvImport) -> int:
        return await self._call(lambda: self.core.import_kv(kv))

    def load(self) -> LoadReport:
        return self._load

    def kv_events(self, maxsize: int = 1024) -> KvEventSubscription:
        return self._kv_fanout.subscribe(maxsize)

    async def kv_snapshot(self) -> KvEventBatch:
        return await self._call(lambda: self.core.kv_snapshot(_now_ms()))

    @property
    def num_active(self) -> int:
        return len(self._streams)

    # ---- commands ---------------------------------------------------------------------------

    def _post(self, fn: Callable[[], Any]) -> None:
        self._commands.append((fn, None))
        self._wake()

    async def _call(self, fn: Callable[[], Any]) -> Any:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._commands.append((fn, fut))
        self._wake()
        return await asyncio.wrap_future(fut)

    def _wake(self) -> None:
        self._wake_thread.set()
        if self._wake_loop is not None:
            self._wake_loop.set()

    def _run_commands(self) -> None:
        commands = self._commands
        while commands:
            fn, fut = commands.popleft()
            try:
                result = fn()
            except BaseException as exc:  # handed to the caller
                if fut is not None:
                    fut.set_exception(exc)
                else:
                    log.warning("engine command failed: %r", exc)
            else:
                if fut is not None:
                    fut.set_result(result)

    # ---- stepping ---------------------------------------------------------------------------

    def _thread_main(self) -> None:
        loop = self._loop
        assert loop is not None
        core = self.core
        while not self._stopping:
            self._wake_thread.clear()
            self._run_commands()
            if not core.has_work():
                self._wake_thread.wait(0.5)
                continue
            try:
                outputs, step_ms = core.step()
            except Exception as exc:
                log.exception("engine step failed")
                loop.call_soon_threadsafe(self._fail, repr(exc))
                return
            batch = core.take_kv_batch(_now_ms())
            load = core.load_report(_now_ms(), self._ewma(step_ms))
            loop.call_soon_threadsafe(self._deliver, outputs, batch, load)
            if not outputs and step_ms <= 0:
                # nothing could be scheduled (e.g. blocks pinned): don't spin
                self._wake_thread.wait(0.01)
        self._run_commands()

    async def _loop_main(self) -> None:
        core = self.core
        wake = self._wake_loop
        loop = self._loop
        assert wake is not None and loop is not None
        clock = loop.time
        window = self.coalesce_s
        # Outputs of steps that ended but are not delivered yet, merged per request. When the
        # modelled steps are much shorter than the cost of delivering them (a high speedup),
        # delivering every step means one frame per request per step on the bus; holding
        # them until `window` has passed since the last delivery sends the same tokens in
        # fewer frames. A step that lasts longer than what is left of the window delivers
        # the held outputs before it starts sleeping, so slow steps never wait on this.
        held: dict[str, EngineOutput] = {}
        last_ewma = 0.0
        delivered_at = clock()
        # modelled steps are laid end to end on a virtual timeline, so sleep granularity and
        # scheduling delays do not accumulate into a slower engine than the model says
        step_end = clock()
        while not self._stopping:
            wake.clear()
            if self._commands:
                if held or self.core_has_kv_pending():
                    self._deliver_held(held, last_ewma)  # commands see everything delivered
                    delivered_at = clock()
                self._run_commands()
            if not core.has_work():
                if held or self.core_has_kv_pending():
                    self._deliver_held(held, last_ewma)
                    delivered_at = clock()
                await wake.wait()
                step_end = clock()
                continue
            try:
                outputs, step_ms = core.step()
            except Exception as exc:
                log.exception("engine step failed")
                self._deliver_held(held, last_ewma)
                self._fail(repr(exc))
                return
            if not outputs and step_ms <= 0:
                if held:
                    self._deliver_held(held, last_ewma)
                    delivered_at = clock()
                # nothing could be scheduled (e.g. blocks pinned): wait for a change.
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow stop()'s cancel
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.01):
                        await wake.wait()
                step_end = clock()
                continue
            last_ewma = self._ewma(step_ms)
            # outputs exist only once the (modelled) step is over
            now = clock()
            step_end = max(step_end, now - 0.05) + step_ms / 1000.0
            if held and step_end > delivered_at + window:
                self._deliver_held(held, last_ewma)  # don't make them wait for this step
                delivered_at = now
            await asyncio.sleep(max(0.0, step_end - clock()))
            for out in outputs:
                prev = held.get(out.request_id)
                if prev is None:
                    held[out.request_id] = out
                else:
                    _merge_output(prev, out)
            if clock() - delivered_at >= window:
                self._deliver_held(held, last_ewma)
                delivered_at = clock()

    def core_has_kv_pending(self) -> bool:
        """Whether the core may hold KV events not yet taken (cores without the hook: yes)."""
        pending = getattr(self.core, "has_kv_pending", None)
        return True if pending is None else pending()

    def _deliver_held(self, held: dict[str, EngineOutput], ewma: float) -> None:
        core = self.core
        batch = core.take_kv_batch(_now_ms())
        load = core.load_report(_now_ms(), ewma)
        outputs = list(held.values())
        held.clear()
        self._deliver(outputs, batch, load)

    def _ewma(self, step_ms: float) -> float:
        self.num_steps += 1
        if self.num_steps == 1:
            self.step_ms_ewma = step_ms
        else:
            self.step_ms_ewma += self._alpha * (step_ms - self.step_ms_ewma)
        return self.step_ms_ewma

    def _deliver(
        self, outputs: list[EngineOutput], batch: KvEventBatch | None, load: LoadReport
    ) -> None:
        self._load = load
        streams = self._streams
        for out in outputs:
            stream = streams.get(out.request_id)
            if stream is None:
                continue  # aborted meanwhile
            stream.put(out)
            if out.finish_reason is not None:
                del streams[out.request_id]
        if batch is not None:
            batch.worker_id = self.worker_id
            self._kv_fanout.publish(batch)

    def _finish_stream(self, request_id: str, reason: str, error: str | None = None) -> bool:
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return False
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


def _merge_output(into: EngineOutput, out: EngineOutput) -> None:
    """Fold a later output of the same request into an earlier one (tokens appended in order;
    the later one's end and counts win)."""
    into.token_ids.extend(out.token_ids)
    into.finish_reason = out.finish_reason
    into.completion_tokens = out.completion_tokens
    into.error = out.error


class KvEventSubscription:
    """One subscriber's bounded queue of KV event batches (async iterator). When full, the
    oldest batch is dropped: the subscriber sees an event_id gap and asks for a snapshot."""

    def __init__(self, maxsize: int, on_close: Callable[[KvEventSubscription], None]) -> None:
        self._queue: asyncio.Queue[KvEventBatch] = asyncio.Queue(maxsize)
        self._on_close = on_close
        self._closed = False
        self.dropped = 0

    def put(self, batch: KvEventBatch) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(batch)

    def __aiter__(self) -> KvEventSubscription:
        return self

    async def __anext__(self) -> KvEventBatch:
        if self._closed:
            raise StopAsyncIteration
        return await self._queue.get()

    def get_nowait(self) -> KvEventBatch | None:
        return None if self._queue.empty() else self._queue.get_nowait()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._on_close(self)


class KvEventFanout:
    """An engine's KV event subscribers: every batch published goes to each of them."""

    __slots__ = ("_subs",)

    def __init__(self) -> None:
        self._subs: list[KvEventSubscription] = []

    def subscribe(self, maxsize: int) -> KvEventSubscription:
        sub = KvEventSubscription(maxsize, self._subs.remove)
        self._subs.append(sub)
        return sub

    def publish(self, batch: KvEventBatch) -> None:
        for sub in self._subs:
            sub.put(batch)


class EngineOverloaded(RuntimeError):
    """Too many requests in flight on this engine."""
