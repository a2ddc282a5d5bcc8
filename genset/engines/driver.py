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

from genset.engines.events import KvEventFanout, KvEventSubscription
from genset.engines.interface import Engine, EngineCore
from genset.engines.types import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    EngineCard,
    EngineOutput,
    EngineOverloaded,
    EngineRequest,
    KvBlockData,
    KvImport,
)
from proto.kv import KvEventBatch, LoadReport

log = logging.getLogger(__name__)


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
        self._streams: dict[str, RequestStream] = {}
        self._kv_fanout = KvEventFanout()
        self._commands: deque[tuple[Callable[[], Any], concurrent.futures.Future[Any] | None]]
        self._commands = deque()
        self._wake_thread = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._failed: str | None = None
        self._load = core.load_report(now_ms(), 0.0)

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
            fn, fut = commands.popleft()
            try:
                result = fn()
            except BaseException as exc:  # handed to the caller
                if fut is not None:
                    fut.set_exception(exc)
                else:
                    log.warning("engine command failed: %r", exc)
            else:
                # a command may change the load without a step (an unpin frees blocks, an
                # import takes some): refreshed before the caller resumes, so it never waits
                # for a step that may not come
                self._set_load(self.core.load_report(now_ms(), self.step_ms_ewma))
                if fut is not None:
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
                self._wake_thread.wait(0.5)
                continue
            try:
                outputs, step_ms = core.step()
            except Exception as exc:
                log.exception("engine step failed")
                loop.call_soon_threadsafe(self._fail, repr(exc))
                return
            batch = core.take_kv_batch(now_ms())
            load = core.load_report(now_ms(), self._ewma(step_ms))
            loop.call_soon_threadsafe(self._deliver, outputs, batch, load)
            if not outputs and step_ms <= 0:
                # nothing could be scheduled (e.g. blocks pinned): don't spin
                self._wake_thread.wait(0.01)
        self._run_commands()

    # ---- delivery (on the loop) -------------------------------------------------------------

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
