"""The one scheduling core: the shared scheduler and block pool over an executor.

`SchedulingCore` is the synchronous `EngineCore` of both the torch engine and the mocker.
Everything around the executor lives here once: request admission with its KV import, the
step (schedule -> execute -> update), KV events, KV export/import by block hash, load
reports and the engine card. An `Executor` is what differs: the torch engine's wraps its
model runner (real tokens, measured step time, K/V tensors as block payloads); the mocker's
draws pseudo-random tokens and models the step time (no payloads). The plan an executor
receives is the contract of `genset.engines.batch`.

Adding a request, in this order for every engine:

1. checks, before anything changes: what the engine can do with the sampling parameters
   (logprobs only where the executor computes them, logit_bias ids inside the vocabulary),
   the executor's (the torch engine: token ids inside the vocabulary), then the scheduler's
   (empty prompt, duplicate id, too long);
2. `request.kv_import` (a remote prefill, an offload hit) is loaded into the prefix cache,
   pinned to the request: the request's prefix is therefore cached when the scheduler first
   looks at it, and eviction cannot undo the import before it is admitted. A bad payload
   raises before any hash is registered, and leaves nothing pinned and nothing queued. An
   offload hit with blocks beyond the room the queue leaves (`Scheduler.import_room`) is
   pinned up to the room and held whole in host memory for the request
   (`Scheduler.hold_kv`, within `Scheduler.max_held_bytes`; 0, the default, drops what is
   beyond): its admission writes what it does not find cached then (`kv_writes`) into the
   blocks it allocates;
3. the request is queued, and the executor sets up its per-request state.

Evicted blocks can be handed over with their KV (`set_eviction_sink`, for write-behind to
the offload store): the pool records every cached block it evicts, and the core reads their
payloads right after `schedule()` and before `execute()` (and, for an import, before
`write_kv`), which are the only places a block's memory is written again. Nothing is recorded
or read without a sink. At most `sink.room()` bytes are read per hand-over; the rest are
dropped and counted (`evictions_dropped`), so a flood of evictions cannot grow memory or
stretch a step past one bounded copy.

Copies out ahead of eviction (`copy_ahead`, for an engine whose copy-out lane runs beside
its compute: the mocker): the pool's next blocks to be evicted are read and handed to the
sink while they are still cached, in the lane's idle time, and remembered; when they are
evicted later nothing is read again, so the step that needs their memory waits for no copy.

Not thread-safe: one thread (or task) calls everything, as `EngineCore` says. The one
exception is `cached_blocks` (alias `cached_prefix`), a read-only hint that other threads
may call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Protocol

from genset.engines.batch import StepPlan
from genset.engines.scheduler import Scheduler, SchedulerConfig, Sequence
from genset.engines.types import (
    EngineCard,
    EngineOutput,
    EngineRequest,
    EvictedBlock,
    KvBlockData,
    KvImport,
    Logprobs,
)
from proto.generate import SamplingParams
from proto.kv import KvEventBatch, LoadReport


def sampling_error(card: EngineCard, sampling: SamplingParams) -> str | None:
    """What an engine described by `card` cannot do with `sampling` (a message naming the
    field), or None. The worker checks it before its hooks run; every engine's core again."""
    if sampling.logprobs is not None and not card.supports_logprobs:
        return (f"logprobs: the {card.engine} engine cannot compute log-probabilities"
                + (" (it has no model)" if card.engine == "mocker" else "")
                + "; send the request without logprobs")
    if sampling.logit_bias and card.vocab_size:
        vocab = card.vocab_size
        bad = [t for t in sampling.logit_bias_ids() if not 0 <= t < vocab]
        if bad:
            return f"logit_bias: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})"
    return None


class Executor(Protocol):
    """What turns the scheduler's plan into tokens, and holds the KV payloads (if any)."""

    name: str  # the card's engine name: torch | mocker
    vocab_size: int
    supports_logprobs: bool  # computes `sampling.logprobs` (else such requests are refused)
    # Set by `execute`: the step's log-probabilities, one entry per chunk (None where the
    # chunk sampled nothing or its request did not ask), or None when no chunk asked.
    step_logprobs: list[Logprobs | None] | None

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

    # Optional: `payload_nbytes(payload) -> int`, the memory one decoded payload takes (what
    # a block held for its request counts, `held_size`; without it, the bytes it came in).


# bytes an evicted block costs in a hand-over beyond its payload and token ids (the objects)
EVICTED_OVERHEAD = 128


def held_size(executor, block: KvBlockData, payload: Any) -> int:
    """What one onboarded block held for its request counts against
    `Scheduler.max_held_bytes`: its decoded payload (`Executor.payload_nbytes`, the
    mocker's modelled size; else the bytes it came in) and the objects around it."""
    size = getattr(executor, "payload_nbytes", None)
    if size is not None:
        return int(size(payload)) + EVICTED_OVERHEAD
    data = block.data
    return (len(data) if data is not None else 0) + EVICTED_OVERHEAD


def evicted_size(block: EvictedBlock) -> int:
    """What one evicted block counts against a hand-over's byte bound."""
    return (len(block.data) if block.data is not None else 0) + (
        len(block.token_ids) if block.token_ids is not None else 0) + EVICTED_OVERHEAD


class EvictionSink(Protocol):
    """Where `SchedulingCore` hands evicted blocks (called on the core's thread)."""

    def room(self) -> int:
        """Payload bytes it can take now (the core reads no more than this)."""

    def put(self, blocks: list[EvictedBlock], dropped: int) -> None:
        """Evicted blocks with their payloads; `dropped` more were evicted without room."""

    # Optional: `known(hash) -> bool`, blocks the sink already has elsewhere (not read);
    # `admit(hash, marks) -> bool`, whether an evicted block, or one about to be copied out
    # ahead of its eviction, is worth handing over at all (refused: not read; `marks`: the
    # pool's REUSED / GENERATED bits for it; a pure rule, asked again at the eviction of a
    # block it refused ahead). Each may be None: everything passes.


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
            supports_logprobs=executor.supports_logprobs,
            kv_layout=executor.kv_layout() if hasattr(executor, "kv_layout") else None,
        )
        self._evict_sink: EvictionSink | None = None
        self.evictions_handed = 0  # counters (monotonic)
        self.evictions_dropped = 0
        self.evictions_known = 0
        self.evictions_refused = 0  # refused by the sink's admission (`admit`)
        # hashes copied out ahead of their eviction (`copy_ahead`) and still cached here, in
        # the order copied; an entry leaves when its block is evicted (bounded: num_blocks)
        self._copied_ahead: dict[int, None] = {}
        self.copied_ahead = 0  # blocks copied out ahead of eviction (monotonic)
        # blocks of optional imports (offload hits) dropped at submission for want of room
        # beside the requests queued ahead (`Scheduler.import_room`; monotonic)
        self.import_blocks_no_room = 0

    # ---- requests ---------------------------------------------------------------------------

    def add_request(self, request: EngineRequest) -> None:
        """Check, import `request.kv_import` (pinned), then queue (module docstring)."""
        sched = self.scheduler
        self.check_sampling(request)
        self.executor.check_request(request)
        sched.check_request(request)
        kv = request.kv_import
        # An optional import with blocks beyond the room: the whole run, decoded, to hold in
        # host memory until the request's admission (`Scheduler.hold_kv`), the pinned head
        # too: a running request's growth takes pinned blocks back from the tail (pins
        # never stall it), and what it took is then restored from there. Holding only what
        # was beyond the room left it after a gap: `bench/bench_onboard_room_sim.py
        # --clients 2` held 4,495 blocks and used none.
        held_run = None  # (the run, its payloads)
        pinned_payloads = None
        if kv is not None and kv.pinned_as is not None:
            # imported earlier, run by run as a transfer arrived: take its pins over
            sched.adopt_pins(kv.pinned_as, request.request_id)
        elif kv is not None and kv.blocks:
            if kv.optional:
                room = sched.import_room()
                if room < len(kv.blocks):
                    if sched.hold_room_bytes() > 0:
                        # (checked before anything changes, as the import's own decode)
                        held_run = (kv, self.executor.decode_kv(kv.blocks))
                        pinned_payloads = held_run[1][:room]
                    else:
                        self.import_blocks_no_room += len(kv.blocks) - room
                    kv = replace(kv, blocks=kv.blocks[:room])
        if kv is not None and kv.pinned_as is None and kv.blocks:
            try:
                self.import_kv(kv, pin_for=request.request_id, payloads=pinned_payloads)
            except BaseException:
                sched.unpin(request.request_id)  # the id was checked unused: only these pins
                raise
        tail = None
        if kv is not None and kv.tail_tokens > 0 and kv.tail is not None:
            try:  # checked like an imported block (`decode_kv`), before anything is queued
                tail = self.executor.decode_kv([KvBlockData(0, kv.tail)])[0]
            except BaseException:
                sched.unpin(request.request_id)
                raise
        seq = sched.add_request(request)
        if seq.tail is not None:
            seq.tail = (seq.tail[0], tail)
        if held_run is not None:
            run, payloads = held_run
            ex = self.executor
            held = sched.hold_kv(seq.request_id, run.first_block, [b.hash for b in run.blocks],
                                 payloads, [held_size(ex, b, p) for b, p in
                                            zip(run.blocks, payloads, strict=True)])
            # neither pinned nor held
            self.import_blocks_no_room += len(run.blocks) - max(len(kv.blocks), held)
        self.executor.start_sequence(seq, request)

    def check_sampling(self, request: EngineRequest) -> None:
        """ValueError naming the field for what this engine cannot do with the request's
        sampling parameters (the worker answers it as `bad_request`)."""
        error = sampling_error(self.card, request.sampling)
        if error is not None:
            raise ValueError(error)

    def abort_request(self, request_id: str) -> None:
        self.scheduler.abort(request_id)

    def drop_foreign(self, request_id: str) -> int:
        """For a request that is ending on non-finite values (call before it is aborted):
        the cached blocks it used from its first imported one on, and their descendants,
        leave the prefix cache and their hashes are refused by later imports
        (`Scheduler.drop_foreign`); returns how many blocks were dropped."""
        seq = self.scheduler.requests.get(request_id)
        if seq is None:
            return 0
        dropped = self.scheduler.drop_foreign(seq)
        ahead = self._copied_ahead
        if ahead:
            for h in dropped:
                ahead.pop(h, None)
        return len(dropped)

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
        if self.pool.evicted:  # before execute() writes into the evicted blocks' memory
            self._hand_over_evicted()
        if sched.kv_writes:
            self._write_admitted()
        if not plan.chunks:
            self.executor.idle()
            return [], 0.0
        executor = self.executor
        sampled, step_ms = executor.execute(plan, sched)
        record = None
        if self._record_steps:  # before `update`: it changes num_output
            pool = self.pool
            decodes = sum(1 for chunk, seq in zip(plan.chunks, sched.scheduled, strict=True)
                          if len(chunk.token_ids) == 1 and seq.num_output > 0)
            record = StepRecord(plan.num_tokens - decodes, decodes,
                                pool.num_used / pool.num_blocks if pool.num_blocks else 0.0)
        outputs = sched.update(plan, sampled)
        if sched.tail_exports:
            self._read_tails(outputs)
        logprobs = executor.step_logprobs
        if logprobs is not None:  # only requests that asked: nothing to do for the others
            by_id = {c.seq_id: lp for c, lp in zip(plan.chunks, logprobs, strict=True) if lp}
            for out in outputs:
                out.logprobs = by_id.get(out.request_id)
        if step_ms is None:
            step_ms = (time.perf_counter() - t0) * 1000.0
        if record is not None:
            record.step_ms = step_ms
            self.last_step = record
        return outputs, step_ms

    def _write_admitted(self) -> None:
        """Imported KV the last `schedule()` admitted (a remote prefill's partial block,
        `KvImport.tail`; onboarded blocks held for their request, `Scheduler.hold_kv`),
        written before the step that reads them. A tail with no payload (the mocker's) has
        nothing to write; the mocker's held blocks name their modelled size, charged as a
        copy in."""
        writes, self.scheduler.kv_writes = self.scheduler.kv_writes, []
        writes = [(b, p) for b, p in writes if p is not None]
        if writes:
            self.executor.write_kv([b for b, _ in writes], [p for _, p in writes])

    def _read_tails(self, outputs: list[EngineOutput]) -> None:
        """The partial last prompt blocks of requests that just finished with `export_tail`
        (`EngineOutput.kv_tail`): freed by `update`, read now, before the next step can
        write into them."""
        exports, self.scheduler.tail_exports = self.scheduler.tail_exports, []
        payloads = self.executor.read_kv([b for _, b, _ in exports])
        by_id = {rid: (n, p) for (rid, _, n), p in zip(exports, payloads, strict=True)}
        for out in outputs:
            tail = by_id.get(out.request_id)
            if tail is not None and out.finish_reason is not None:
                out.kv_tail = tail

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

    def import_kv(self, kv: KvImport, pin_for: str | None = None,
                  payloads: list[Any] | None = None) -> int:
        """Cache the chain `kv` (payloads checked first; `payloads`: decoded already); with
        `pin_for`, held until that request is admitted. Returns how many blocks, from the
        first, are now cached (fewer than given when the pool ran out of free blocks)."""
        if payloads is None:
            payloads = self.executor.decode_kv(kv.blocks)
        hashes = [b.hash for b in kv.blocks]
        written = self.scheduler.import_kv(hashes, kv.parent_hash, pin_for=pin_for,
                                           token_ids=kv.token_ids, first_block=kv.first_block)
        if self.pool.evicted:  # before write_kv overwrites them
            self._hand_over_evicted()
        if written:
            index = {h: i for i, h in enumerate(hashes)}
            self.executor.write_kv(
                [b for _, b in written], [payloads[index[h]] for h, _ in written]
            )
        return self.cached_blocks(hashes)

    def cached_blocks(self, hashes: list[int]) -> int:
        """How many of `hashes`, from the first, are in the prefix cache here now. Also a
        hint safe to call from another thread (dict reads only): the answer may be stale by
        the time it is used, which costs at most a wasted import, never a wrong result."""
        return len(self.pool.lookup(hashes))

    # the name `AsyncEngineDriver.cached_prefix` (the offload hook's thread-safe hint) and the
    # replay look for on a core: the same question, so one implementation under both names
    cached_prefix = cached_blocks

    # ---- eviction hand-over -----------------------------------------------------------------

    def set_eviction_sink(self, sink: EvictionSink | None, *, with_tokens: bool = True) -> None:
        """Hand every cached block the pool evicts to `sink` with its payload (module
        docstring); `with_tokens`: keep each cached block's packed token ids for it (one
        packing per registered block). None stops it, and then costs nothing."""
        pool = self.pool
        self._evict_sink = sink
        self._copied_ahead.clear()  # a new consumer has none of them
        pool.evicted = [] if sink is not None else None
        pool.keep_tokens = pool.emit_token_ids or (sink is not None and with_tokens)

    def _hand_over_evicted(self) -> None:
        pool = self.pool
        evicted, pool.evicted = pool.evicted, []
        sink = self._evict_sink
        if sink is None or not evicted:
            return
        known = getattr(sink, "known", None)
        admit = getattr(sink, "admit", None)
        ahead = self._copied_ahead
        if known is not None or ahead or admit is not None:
            # blocks copied out ahead of this eviction, and those the sink says it has
            # already (e.g. onboarded from the offload store): not worth a copy; and those
            # its admission refuses (`genset.offload.admission`: generated, never reused)
            before = len(evicted)
            refused = 0
            kept = []
            for e in evicted:
                h = e[0]
                if h in ahead:
                    del ahead[h]
                elif known is not None and known(h):
                    pass
                elif admit is not None and not admit(h, e[4]):
                    refused += 1
                else:
                    kept.append(e)
            self.evictions_known += before - len(kept) - refused
            self.evictions_refused += refused
            evicted = kept
            if not evicted:
                return
        per_block = self._handover_block_bytes()
        n = min(len(evicted), sink.room() // per_block)
        dropped = len(evicted) - n
        blocks: list[EvictedBlock] = []
        if n:
            take = evicted[:n]
            payloads = self.executor.read_kv([e[3] for e in take])
            blocks = [EvictedBlock(h, parent, tokens, data)
                      for (h, parent, tokens, *_), data in zip(take, payloads, strict=True)]
        self.evictions_handed += n
        self.evictions_dropped += dropped
        sink.put(blocks, dropped)

    def _handover_block_bytes(self) -> int:
        # an executor may say how large one payload is (torch, mocker); an upper bound for
        # the tokens (4 bytes each) and the objects
        return (getattr(self.executor, "kv_block_bytes", 0) + 4 * self.pool.block_size
                + EVICTED_OVERHEAD)

    def copy_ahead(self, budget: int, depth: int) -> int:
        """Copy out up to `budget` of the pool's next blocks to be evicted (among the next
        `depth` free blocks, LRU end first) to the eviction sink ahead of their eviction:
        those not copied ahead already and not `known` to the sink, read with the executor's
        `read_kv_ahead` (the copy-out lane's idle time pays; an executor without it copies
        nothing ahead) and handed over as evictions are, within `sink.room()`. Their later
        eviction reads nothing. Returns how many were copied."""
        sink = self._evict_sink
        read = getattr(self.executor, "read_kv_ahead", None)
        if sink is None or read is None or budget <= 0 or depth <= 0:
            return 0
        budget = min(budget, sink.room() // self._handover_block_bytes())
        if budget <= 0:
            return 0
        known = getattr(sink, "known", None)
        # the admission's question for a block not evicted yet (it may be reused before it
        # is, and is asked again at its eviction)
        admit = getattr(sink, "admit", None)
        ahead = self._copied_ahead
        picked = []
        for e in self.pool.eviction_candidates(depth):
            h = e[0]
            if h in ahead or (known is not None and known(h)) or (
                    admit is not None and not admit(h, e[4])):
                continue
            picked.append(e)
            if len(picked) >= budget:
                break
        if not picked:
            return 0
        payloads = read([e[3] for e in picked])
        for e in picked:
            ahead[e[0]] = None
        while len(ahead) > self.pool.num_blocks:  # stale entries (e.g. a cleared cache)
            del ahead[next(iter(ahead))]
        self.copied_ahead += len(picked)
        sink.put([EvictedBlock(h, parent, tokens, data)
                  for (h, parent, tokens, *_), data in zip(picked, payloads, strict=True)], 0)
        return len(picked)

    def copied_ahead_of(self, block_hash: int) -> bool:
        """Whether this cached block was copied out ahead of its eviction (its eviction
        copies nothing)."""
        return block_hash in self._copied_ahead

    # ---- pins (disaggregation: blocks held for a transfer) ----------------------------------

    def pin_kv(self, key: str, hashes: list[int]) -> int:
        """Hold the leading run of `hashes` held here under `key` until `unpin_kv(key)` (the
        sender's side of a transfer: nothing may evict them while they travel); returns how
        many blocks, from the first, are held."""
        return self.scheduler.pin(key, hashes)

    def unpin_kv(self, key: str) -> None:
        """Release what `pin_kv` or `import_kv(pin_for=key)` holds under `key` (nothing if a
        request already took the pins over, or they were released)."""
        self.scheduler.unpin(key)
