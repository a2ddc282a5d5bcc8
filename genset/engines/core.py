"""The one scheduling core: the shared scheduler and block pool over an executor.

`SchedulingCore` is the synchronous `EngineCore` of both the torch engine and the mocker.
Everything around the executor lives here once: request admission with its KV import, the
step (schedule -> execute -> update), KV events, KV export/import by block hash, load
reports and the engine card. An `Executor` is what differs: the torch engine's wraps its
model runner (real tokens, measured step time, K/V tensors as block payloads); the mocker's
draws pseudo-random tokens and models the step time (no payloads). The plan an executor
receives is the contract of `genset.engines.batch`.

Adding a request, in this order for every engine:

1. checks, before anything changes: the executor's (the torch engine: token ids inside the
   vocabulary), then the scheduler's (empty prompt, duplicate id, too long);
2. `request.kv_import` (a remote prefill, an offload hit) is loaded into the prefix cache,
   pinned to the request: the request's prefix is therefore cached when the scheduler first
   looks at it, and eviction cannot undo the import before it is admitted. A bad payload
   raises before any hash is registered, and leaves nothing pinned and nothing queued;
3. the request is queued, and the executor sets up its per-request state.

Not thread-safe: one thread (or task) calls everything, as `EngineCore` says.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from genset.engines.batch import StepPlan
from genset.engines.scheduler import Scheduler, SchedulerConfig, Sequence
from genset.engines.types import EngineCard, EngineOutput, EngineRequest, KvBlockData, KvImport
from proto.kv import KvEventBatch, LoadReport


class Executor(Protocol):
    """What turns the scheduler's plan into tokens, and holds the KV payloads (if any)."""

    name: str  # the card's engine name: torch | mocker
    vocab_size: int

    def check_request(self, request: EngineRequest) -> None:
        """Raise ValueError for a request this executor cannot run (called first)."""

    def start_sequence(self, seq: Sequence, request: EngineRequest) -> None:
        """Set up per-request state (e.g. `seq.user_data`) once the request is queued."""

    def execute(self, plan: StepPlan, sched: Scheduler) -> tuple[list[int | None], float | None]:
        """Run one planned step (`sched.scheduled` lists the plan's sequences, chunk order):
        one sampled token or None per chunk, and the step's modelled duration in ms (None:
        the core measures the step's wall time)."""

    def idle(self) -> None:
        """Called when work is queued but nothing could be scheduled (e.g. blocks pinned)."""

    def read_kv(self, block_ids: list[int]) -> list[Any]:
        """The payloads of these physical blocks, in order (read before the next step)."""

    def decode_kv(self, blocks: list[KvBlockData]) -> list[Any]:
        """Check and decode imported payloads, one per block; ValueError for a bad one.
        Called before any hash is registered: a block cached under a hash but holding
        garbage would poison every later request with that prefix."""

    def write_kv(self, block_ids: list[int], payloads: list[Any]) -> None:
        """Write decoded payloads into these newly allocated physical blocks."""


@dataclass(slots=True)
class StepRecord:
    """What one step computed and how long it took (the planner's performance model fits
    these: `genset.worker.step_stats`). The mocker's `StepStats` has the same fields."""

    prefill_tokens: int = 0  # prompt tokens computed (not decode tokens)
    decode_tokens: int = 0  # sequences that decoded one token
    kv_usage: float = 0.0  # KV blocks in use / capacity when the step ran
    step_ms: float = 0.0


class SchedulingCore:
    """The shared scheduler + block pool over an `Executor` (an `EngineCore`).

    `last_step` is a `StepRecord` of the last step that ran (None before the first)."""

    last_step = None
    _record_steps = True  # False: the subclass records `last_step` itself (the mocker)

    def __init__(self, executor: Executor, config: SchedulerConfig, *, worker_id: int = 0) -> None:
        self.executor = executor
        self.worker_id = worker_id
        self.scheduler = Scheduler(config)
        self.pool = self.scheduler.pool
        self.card = EngineCard(
            engine=executor.name,
            block_size=config.block_size,
            kv_blocks=config.num_blocks,
            max_batch_tokens=config.max_batch_tokens,
            max_running=config.max_running,
            context_length=config.context_length,
            eos_token_ids=list(config.eos_token_ids),
            vocab_size=executor.vocab_size,
        )

    # ---- requests ---------------------------------------------------------------------------

    def add_request(self, request: EngineRequest) -> None:
        """Check, import `request.kv_import` (pinned), then queue (module docstring)."""
        sched = self.scheduler
        self.executor.check_request(request)
        sched.check_request(request)
        kv = request.kv_import
        if kv is not None and kv.blocks:
            try:
                self.import_kv(kv, pin_for=request.request_id)
            except BaseException:
                sched.unpin(request.request_id)  # the id was checked unused: only these pins
                raise
        seq = sched.add_request(request)
        self.executor.start_sequence(seq, request)

    def abort_request(self, request_id: str) -> None:
        self.scheduler.abort(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    # ---- stepping ---------------------------------------------------------------------------

    def step(self) -> tuple[list[EngineOutput], float]:
        """One step: its outputs and its duration in ms; ([], 0.0) when nothing could be
        scheduled."""
        t0 = time.perf_counter()
        sched = self.scheduler
        plan = sched.schedule()
        if not plan.chunks:
            self.executor.idle()
            return [], 0.0
        sampled, step_ms = self.executor.execute(plan, sched)
        record = None
        if self._record_steps:  # before `update`: it changes num_output
            pool = self.pool
            decodes = sum(1 for chunk, seq in zip(plan.chunks, sched.scheduled, strict=True)
                          if len(chunk.token_ids) == 1 and seq.num_output > 0)
            record = StepRecord(plan.num_tokens - decodes, decodes,
                                pool.num_used / pool.num_blocks if pool.num_blocks else 0.0)
        outputs = sched.update(plan, sampled)
        if step_ms is None:
            step_ms = (time.perf_counter() - t0) * 1000.0
        if record is not None:
            record.step_ms = step_ms
            self.last_step = record
        return outputs, step_ms

    # ---- KV events and load -----------------------------------------------------------------

    def take_kv_batch(self, ts_ms: int = 0) -> KvEventBatch | None:
        return self.pool.take_batch(self.worker_id, ts_ms)

    def has_kv_pending(self) -> bool:
        """Whether take_kv_batch would return a batch (lets a driver skip the call)."""
        return bool(self.pool._pending)

    def kv_snapshot(self, ts_ms: int = 0) -> KvEventBatch:
        return self.pool.snapshot_batch(self.worker_id, ts_ms)

    def load_report(self, ts_ms: int, step_ms_ewma: float = 0.0) -> LoadReport:
        return self.scheduler.load_report(self.worker_id, ts_ms, step_ms_ewma)

    # ---- KV export / import -----------------------------------------------------------------

    def export_kv(self, hashes: list[int]) -> list[KvBlockData]:
        """The leading run of `hashes` held here, with the executor's payloads."""
        held = self.scheduler.export_kv(hashes)
        if not held:
            return []
        payloads = self.executor.read_kv([b for _, b in held])
        return [KvBlockData(h, p) for (h, _), p in zip(held, payloads, strict=True)]

    def import_kv(self, kv: KvImport, pin_for: str | None = None) -> int:
        """Cache the chain `kv` (payloads checked first); with `pin_for`, held until that
        request is admitted. Returns how many blocks, from the first, are now cached (fewer
        than given when the pool ran out of free blocks)."""
        payloads = self.executor.decode_kv(kv.blocks)
        hashes = [b.hash for b in kv.blocks]
        written = self.scheduler.import_kv(hashes, kv.parent_hash, pin_for=pin_for)
        if written:
            index = {h: i for i, h in enumerate(hashes)}
            self.executor.write_kv(
                [b for _, b in written], [payloads[index[h]] for h, _ in written]
            )
        pool = self.pool
        cached = 0
        for h in hashes:
            if pool.block_of(h) is None:
                break
            cached += 1
        return cached
