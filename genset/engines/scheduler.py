"""The continuous-batching scheduler shared by the torch engine and the mocker.

One step of an engine is::

    plan = sched.schedule()            # StepPlan: which tokens of which sequence to compute
    sampled = executor.execute(plan)   # list[int | None], one per chunk (None: not sampled)
    outputs = sched.update(plan, sampled)   # list[EngineOutput], finished ones freed
    batch = sched.pool.take_batch(worker_id)  # KV events of the step, if any

The torch engine's executor is its model runner; the mocker's is a pseudo-random token
source plus a timing model. Everything else — queues, token budget, chunked prefill, prefix
cache, block allocation, preemption, stop conditions — lives here, so both engines publish
the same KV events for the same requests.

Policy, per step:

1. Running sequences first, in admission order: each gets all its not-yet-computed tokens
   (one for a decode; the rest of the prompt for a prefill) up to what is left of the token
   budget (`max_batch_tokens`), so a long prompt is prefilled in chunks across steps while
   decodes keep flowing. If its blocks cannot be allocated, the most recently admitted
   running sequence is preempted (recompute: its blocks are freed, it goes back to the front
   of the waiting queue, and when it resumes its generated tokens are part of its prompt),
   until the allocation fits or the sequence preempted itself.
2. If nobody was preempted this step, waiting sequences are admitted in FIFO order while the
   budget, `max_running` and free blocks allow. On admission the sequence's full-block hashes
   are looked up in the prefix cache; hit blocks are shared (refcount) and not recomputed.
   At least the last prompt token is always computed, since its logits give the first
   output token.
3. After the executor ran, every block that became full is registered in the prefix cache
   (a `Stored` event); sampled tokens are appended and stop conditions checked (stop token
   ids, EOS unless `ignore_eos`, both only after `min_tokens`; `max_tokens`; the context
   length). Finished sequences free their blocks (they stay cached until evicted). Executors
   never emit a stop id or EOS before `min_tokens` (`SamplingSpec.banned_until_min`: the
   torch engine masks their logits, the mocker does not draw them), so the output holds no
   stop token that did not stop it.

KV export/import by block hash (disaggregation, offload): `export_kv(hashes)` names the
physical blocks holding a run of hashes, for the executor to read; `import_kv(hashes, ...)`
allocates blocks for hashes not yet cached and registers them, returning (hash, block_id)
pairs for the executor to write before the next step; with `pin_for=request_id` the blocks
are held until that request is admitted (so eviction cannot undo the import meanwhile).
Pins never stall anyone ahead: a running request that must grow, or the head of the queue,
takes the blocks it needs from the newest pins, tail first, but only when that makes room
(`_reclaim_pins`); an optional import (an offload hit) is cut to the room the requests
ahead leave (`import_room`), so what is pinned is used (`BlockPool.num_imports_evicted_unused`
counts what was not). What does not fit there may wait in host memory instead (`hold_kv`,
within `max_held_bytes`): the request's admission then takes those blocks as it takes its
cache hits, and the core writes them before the step (`kv_writes`), as vLLM's connector
loads a request waiting for remote KV when it is scheduled.

Not thread-safe: the engine's core (`genset.engines.core.SchedulingCore`) owns it, stepped by
one thread or task; others talk to it through `genset.engines.driver.AsyncEngineDriver`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

from genset.engines.batch import SamplingSpec, ScheduledChunk, StepPlan
from genset.engines.types import EngineOutput, EngineRequest
from genset.kv.block_pool import FOREIGN, GENERATED, UNUSED_IMPORT, BlockPool
from genset.kv.hashing import extend_block_hashes
from proto.kv import LoadReport

WAITING = 0
RUNNING = 1
FINISHED = 2

# hashes `Scheduler.drop_foreign` remembers as distrusted (the oldest are forgotten first): a
# few hundred KB, and a store or peer that keeps serving the same bad blocks fails a request
# once, not every time
DISTRUSTED_MAX = 4096


@dataclass(slots=True)
class SchedulerConfig:
    block_size: int = 16
    num_blocks: int = 1024  # KV capacity in blocks
    max_batch_tokens: int = 8192  # token budget of one step (all chunks together)
    max_running: int = 256  # sequences in the running set at once
    context_length: int = 4096  # prompt + output tokens of one sequence
    eos_token_ids: tuple[int, ...] = ()
    enable_prefix_caching: bool = True
    emit_token_ids: bool = False  # token ids inside Stored events


def sampling_spec(request: EngineRequest, eos: frozenset[int] = frozenset()) -> SamplingSpec:
    """The executor's view of a request's sampling parameters and min_tokens (`eos`: the
    engine's EOS ids, masked with the stop ids until min_tokens are out unless ignored)."""
    s, stop = request.sampling, request.stop
    spec = SamplingSpec(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed,
                        logprobs=s.logprobs)
    if stop.min_tokens > 0:
        banned = set(stop.stop_token_ids)
        if not stop.ignore_eos:
            banned |= eos
        if banned:
            spec.min_tokens = stop.min_tokens
            spec.banned_until_min = tuple(sorted(banned))
            spec.processed = True
    if s.processes_logits:
        spec.presence_penalty = s.presence_penalty
        spec.frequency_penalty = s.frequency_penalty
        spec.repetition_penalty = s.repetition_penalty
        spec.logit_bias = s.logit_bias_ids() or None
        spec.processed = True
    return spec


@dataclass(slots=True)
class HeldKv:
    """Onboarded blocks waiting in host memory for their request's admission
    (`Scheduler.hold_kv`): `hashes[i]` is the prompt's block `first_block + i`, `payloads[i]`
    its KV as the executor decoded it; `nbytes` what they count against `max_held_bytes`."""

    first_block: int
    hashes: list[int]
    payloads: list[Any]
    nbytes: int


class Sequence:
    """A request's state inside the scheduler."""

    __slots__ = (
        "block_hashes",
        "block_table",
        "cached_memo",
        "cached_tokens",
        "export_tail",
        "foreign_from",
        "held",
        "ignore_eos",
        "max_tokens",
        "min_tokens",
        "num_computed",
        "num_output",
        "num_preemptions",
        "num_registered",
        "prompt_len",
        "request_id",
        "sampling",
        "status",
        "stop_ids",
        "tail",
        "token_ids",
        "user_data",
    )

    def __init__(self, request: EngineRequest, eos: frozenset[int] = frozenset()) -> None:
        self.request_id = request.request_id
        self.token_ids: list[int] = list(request.token_ids)
        self.prompt_len = len(self.token_ids)
        resumed = request.resume_token_ids  # produced elsewhere: already output (types.py)
        if resumed:
            self.token_ids.extend(resumed)
        stop = request.stop
        self.sampling = sampling_spec(request, eos)
        self.max_tokens = stop.max_tokens
        self.min_tokens = stop.min_tokens
        self.ignore_eos = stop.ignore_eos
        self.stop_ids = frozenset(stop.stop_token_ids)
        self.num_computed = 0  # tokens whose KV is in block_table's blocks
        self.num_output = len(resumed)
        self.num_registered = 0  # leading blocks of block_table that are in the prefix cache
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # hashes of full blocks of token_ids (lazily grown)
        self.cached_tokens = -1  # prompt tokens served from the cache; -1 until admitted
        # (pool.num_uncached, cached prefix tokens) of the last lookup while waiting
        self.cached_memo: tuple[int, int] | None = None
        self.num_preemptions = 0
        self.status = WAITING
        self.user_data: Any = None  # owner's per-request state (e.g. the mocker's rng)
        # KV of the prompt's last partial block, computed elsewhere (a remote prefill):
        # (its token count, the executor's decoded payload or None), used once at admission
        # (`_admit`); and whether to hand this request's own partial block out when it
        # finishes (`Scheduler.tail_exports`: a prefill worker's remote prefill)
        kv = request.kv_import
        self.tail: tuple[int, Any] | None = None
        if kv is not None and kv.tail_tokens > 0 and resumed:
            self.tail = (kv.tail_tokens, None)
        self.export_tail = request.export_tail
        # index in block_table of its first block whose KV came from outside this engine (an
        # imported block it hit, or the block an imported tail was written into), None when
        # all of it is computed here; set at admission (`_admit`), read by `drop_foreign`
        self.foreign_from: int | None = None
        # an onboarded run (its pinned head too) in host memory until its admission takes
        # what it does not find cached (`Scheduler.hold_kv`); None: none
        self.held: HeldKv | None = None


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.block_size = config.block_size
        self.pool = BlockPool(
            config.num_blocks,
            config.block_size,
            enable_caching=config.enable_prefix_caching,
            emit_token_ids=config.emit_token_ids,
        )
        # a sequence that cannot fit in the whole pool must stop, not wait forever
        self.max_seq_len = min(config.context_length, config.num_blocks * config.block_size)
        self.eos = frozenset(config.eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[str, Sequence] = {}
        self._pins: dict[str, list[int]] = {}
        self._scheduled: list[Sequence] = []  # sequences of the last plan, chunk order
        # (block id, payload) of imported KV the last `schedule()` admitted (a remote
        # prefill's partial block, `Sequence.tail`; held blocks, `Sequence.held`): the core
        # writes them before the step runs
        self.kv_writes: list[tuple[int, Any]] = []
        # Host memory for onboarded blocks waiting for their request (`hold_kv`); 0: none
        # are held (the owner sets it: the worker's offload hook). `held_bytes` is in use.
        self.max_held_bytes = 0
        self.held_bytes = 0
        # (request id, block id, tokens) of finished requests' partial last prompt blocks
        # (`EngineRequest.export_tail`), freed by the last `update()`: the core reads them
        # before the next step can write into them
        self.tail_exports: list[tuple[str, int, int]] = []
        # hashes dropped because a request over them ended on non-finite values
        # (`drop_foreign`), newest last, at most DISTRUSTED_MAX: `import_kv` writes none of
        # them (what is cached here under one is still used)
        self.distrusted: dict[int, None] = {}
        self._imported = False  # whether any block was imported yet (`_admit` looks then)
        # counters (monotonic), for metrics and tests
        self.num_foreign_dropped = 0  # blocks `drop_foreign` took out of the prefix cache
        self.num_computed_tokens = 0  # tokens the executor was asked to compute
        self.num_preemptions = 0
        self.num_held_blocks = 0  # blocks `hold_kv` took
        self.num_held_used = 0  # of them, written at their request's admission

    # ---- requests ---------------------------------------------------------------------------

    def add_request(self, request: EngineRequest) -> Sequence:
        """Queue a request; ValueError (nothing changed) when `check_request` refuses it."""
        self.check_request(request)
        seq = Sequence(request, self.eos)
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)
        return seq

    def check_request(self, request: EngineRequest) -> None:
        """Raise ValueError for an empty prompt, a duplicate id, or a prompt that leaves no
        room for one output token within the context length / KV capacity."""
        if not request.token_ids:
            raise ValueError("prompt has no tokens")
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already active")
        n = len(request.token_ids) + len(request.resume_token_ids)
        if n >= self.config.context_length:
            raise ValueError(
                f"prompt has {n} tokens, context length is {self.config.context_length}"
            )
        if n >= self.max_seq_len:
            raise ValueError(
                f"prompt has {n} tokens, more than the KV cache holds "
                f"({self.config.num_blocks} blocks of {self.block_size})"
            )

    def abort(self, request_id: str) -> bool:
        """Drop a request now, freeing its blocks. False when it is not active."""
        self.unpin(request_id)
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        self._drop_held(seq)
        if seq.status == RUNNING:
            self.running.remove(seq)
        elif seq.status == WAITING:
            self.waiting.remove(seq)
        self._release(seq)
        return True

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def scheduled(self) -> list[Sequence]:
        """The sequences of the last `schedule()`'s chunks, in chunk order (until `update`)."""
        return self._scheduled

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- one step ---------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """Plan the next step (an empty plan when there is nothing to do)."""
        budget = self.config.max_batch_tokens
        chunks: list[ScheduledChunk] = []
        scheduled: list[Sequence] = []
        running = self.running
        preempted = False

        bs = self.block_size
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            start = seq.num_computed
            total = len(seq.token_ids)
            end = min(total, start + budget)
            # the common case (a decode inside its last block) allocates nothing
            if end > len(seq.block_table) * bs and not self._grow(seq, end):
                while True:
                    victim = running[-1]
                    self._preempt(victim)
                    preempted = True
                    if victim is seq or self._grow(seq, end):
                        break
                if victim is seq:
                    continue
            chunks.append(
                ScheduledChunk(
                    seq.request_id,
                    seq.token_ids[start:end],
                    start,
                    seq.block_table,
                    end == total,
                    seq.sampling,
                    seq.num_output,
                    seq.token_ids,
                    seq.prompt_len,
                )
            )
            scheduled.append(seq)
            budget -= end - start
            i += 1

        if not preempted:
            max_running = self.config.max_running
            while self.waiting and budget > 0 and len(running) < max_running:
                n = self._admit(self.waiting[0], budget)
                if n == 0:
                    break
                seq = self.waiting.popleft()
                seq.status = RUNNING
                running.append(seq)
                chunks.append(self._chunk(seq, n))
                scheduled.append(seq)
                budget -= n
                # Offer the prompt blocks this chunk completes to the prefix cache now, not
                # after the step: a request admitted next in this same step that shares the
                # prefix (a burst with one system prompt) then reuses them instead of
                # computing them again. Safe because every layer writes the step's K/V into
                # the paged cache before any attention reads it, so the second request's
                # chunk sees the first one's blocks within the same forward pass.
                if self.pool.enable_caching and (seq.num_computed + n) // bs > seq.num_registered:
                    self._register_full_blocks(seq, seq.num_computed + n)

        self._scheduled = scheduled
        self.num_computed_tokens += self.config.max_batch_tokens - budget
        return StepPlan(chunks=chunks)

    def update(self, plan: StepPlan, sampled: list[int | None]) -> list[EngineOutput]:
        """Apply the executor's results for `plan` (the last `schedule()`): one entry per
        chunk, a token id where the chunk sampled, else None."""
        if len(sampled) != len(plan.chunks):
            raise ValueError(f"{len(sampled)} sampled entries for {len(plan.chunks)} chunks")
        outputs: list[EngineOutput] = []
        finished = False
        bs = self.block_size
        eos = self.eos
        max_len = self.max_seq_len
        caching = self.pool.enable_caching
        for seq, chunk, token in zip(self._scheduled, plan.chunks, sampled, strict=True):
            if seq.status != RUNNING:
                continue
            seq.num_computed += len(chunk.token_ids)
            if caching and seq.num_computed // bs > seq.num_registered:
                self._register_full_blocks(seq)
            if token is None or not chunk.sample:
                continue
            tokens = seq.token_ids
            tokens.append(token)
            n_out = seq.num_output = seq.num_output + 1
            # stop ids and EOS count only once min_tokens are out; length limits always
            reason = None
            if n_out >= seq.min_tokens and (
                token in seq.stop_ids or (token in eos and not seq.ignore_eos)
            ):
                reason = "stop"
            elif n_out >= seq.max_tokens or len(tokens) >= max_len:
                reason = "length"
            outputs.append(
                EngineOutput(
                    seq.request_id, [token], reason, seq.prompt_len, seq.cached_tokens, n_out
                )
            )
            if reason is not None:
                seq.status = FINISHED
                del self.requests[seq.request_id]
                if seq.export_tail:
                    full, tail = divmod(seq.prompt_len, bs)
                    if tail and len(seq.block_table) > full:
                        self.tail_exports.append((seq.request_id, seq.block_table[full], tail))
                self._release(seq)
                finished = True
        if finished:
            self.running = [s for s in self.running if s.status == RUNNING]
        self._scheduled = []
        return outputs

    # ---- runs of plain decode steps (simulated time) ------------------------------------------

    def decode_horizon(self, limit: int) -> int:
        """How many of the next steps (at most `limit`) are plain decodes: nothing waits,
        every running sequence computes exactly its one last token inside blocks it already
        holds, no block fills (so no allocation, eviction or KV event), and no sequence can
        stop (no stop ids; EOS ignored or not configured). Such steps change nothing but the sequences' tokens and counters,
        so a simulated-time driver may run them in bulk (`advance_decodes`) and get exactly the
        state that `schedule`/`update` step by step would have left. 0: step normally."""
        running = self.running
        if self.waiting or not running or len(running) > self.config.max_batch_tokens:
            return 0
        bs = self.block_size
        caching = self.pool.enable_caching
        max_len = self.max_seq_len
        eos_stops = bool(self.eos)
        h = limit
        for seq in running:
            n = len(seq.token_ids)
            if seq.num_computed != n - 1 or seq.num_output == 0 or seq.stop_ids:
                return 0
            if eos_stops and not seq.ignore_eos:
                return 0
            # step s (0-based) computes position n-1+s and appends token n+s
            k = len(seq.block_table) * bs - n + 1  # steps before a block must be allocated
            if caching:
                # a step whose computed token completes a block registers it (Stored event)
                k = min(k, (seq.num_registered + 1) * bs - n)
            # stops for length after the step whose output reaches max_tokens / max_len
            k = min(k, seq.max_tokens - seq.num_output - 1, max_len - n - 1)
            if k < h:
                if k <= 0:
                    return 0
                h = k
        return h

    def advance_decodes(self, steps: int, tokens: list[list[int]]) -> None:
        """Apply `steps` plain decode steps (at most `decode_horizon()`): `tokens[i]` holds
        the `steps` tokens sampled for `running[i]`, in order."""
        for seq, new in zip(self.running, tokens, strict=True):
            seq.token_ids.extend(new)
            seq.num_computed += steps
            seq.num_output += steps
        self.num_computed_tokens += steps * len(self.running)

    # ---- KV export / import -----------------------------------------------------------------

    def export_kv(self, hashes: list[int]) -> list[tuple[int, int]]:
        """(hash, block_id) for the leading run of `hashes` this engine holds. Read the blocks
        before the next step: afterwards they may be evicted and reused."""
        out: list[tuple[int, int]] = []
        for h in hashes:
            b = self.pool.block_of(h)
            if b is None:
                break
            out.append((h, b))
        return out

    def import_kv(
        self, hashes: list[int], parent_hash: int | None = None, pin_for: str | None = None,
        token_ids: Seq[int] | None = None, first_block: int = 0,
    ) -> list[tuple[int, int]]:
        """Make the chain `hashes` (continuing `parent_hash`) cached here.

        Returns (hash, block_id) for each block newly allocated, whose KV the executor must
        write before the next step (marked `FOREIGN`); hashes already cached are reused.
        Stops early when the pool is full, or at a hash not cached here that is `distrusted`
        (`drop_foreign`: its imported KV ended a request before; the caller computes the
        rest). With `pin_for`, every block of the chain is held until that request is
        admitted, aborted or `unpin`ned.

        `token_ids` (`KvImport.token_ids`): the sequence's tokens, `hashes[i]` being its block
        `first_block + i`; each new block keeps its slice (when the pool keeps tokens: an
        eviction sink wants them), as a block computed here would. A slice that is not a
        whole block (tokens shorter than the chain) is not kept.
        """
        pool = self.pool
        written: list[tuple[int, int]] = []
        bs = self.block_size
        tokens = token_ids if pool.keep_tokens else None
        at = first_block * bs  # position of the current block's first token in `token_ids`
        held: list[int] = []
        if pin_for is not None and parent_hash is not None:
            # The chain's cached ancestors (the request's own device prefix) are held with
            # the import: they are often the pool's least recently used blocks (that prefix
            # was last used long ago), so allocating the import's blocks evicted them and
            # left the import orphaned, the whole prompt computed (Mooncake replay, store 4x:
            # 43 of 1,035 onboarding requests, 2026-12-06).
            held = pool.chain_to(parent_hash)
            pool.touch(held)
        parent = parent_hash
        for h in hashes:
            b = pool.block_of(h)
            if b is not None:
                pool.touch((b,))
            else:
                if h in self.distrusted:
                    break
                new = pool.allocate(1)
                if new is None:
                    break
                b = new[0]
                own = tokens[at : at + bs] if tokens is not None else None
                if own is not None and len(own) != bs:
                    own = None
                if pool.cache_block(b, h, parent, own):
                    pool.marks[b] |= FOREIGN | UNUSED_IMPORT
                    self._imported = True
                written.append((h, b))
            held.append(b)
            parent = h
            at += bs
        if pin_for is not None:
            self._pins.setdefault(pin_for, []).extend(held)
        else:
            pool.free(held)
        return written

    def drop_foreign(self, seq: Sequence) -> list[int]:
        """Take out of the prefix cache the blocks of `seq` from its first foreign one on
        (`Sequence.foreign_from`) and every cached block chained below them
        (`BlockPool.uncache`), and distrust their hashes for later imports; returns the
        hashes dropped. For a request that ended on non-finite logits: imported KV can be
        finite yet bad (huge values that overflow only inside attention), and cached under
        the prompt's hashes it would end every later request with that prefix until evicted.
        Dropped, the next such request computes those blocks here.

        Why from the first foreign block on, not all the request's blocks: the blocks before
        it were computed here from their tokens alone, as trustworthy as the engine itself;
        dropping them would let one bad import (or a request whose temperature overflows its
        logits) flush a shared prefix (a system prompt) for everyone. Every block after it,
        whoever computed it, attended to it (or to a block that did). Nothing dropped goes to
        the eviction sink (the offload store)."""
        first = seq.foreign_from
        if first is None or not self.pool.enable_caching:
            return []
        dropped = self.pool.uncache(seq.block_table[first:])
        if dropped:
            self.num_foreign_dropped += len(dropped)
            distrusted = self.distrusted
            for h in dropped:
                distrusted.pop(h, None)
                distrusted[h] = None
            while len(distrusted) > DISTRUSTED_MAX:
                del distrusted[next(iter(distrusted))]
        return dropped

    def unpin(self, request_id: str) -> None:
        held = self._pins.pop(request_id, None)
        if held:
            self.pool.free(held)

    def pin(self, key: str, hashes: list[int]) -> int:
        """Hold the leading run of `hashes` cached here under `key` (e.g. blocks exported to
        another worker, until it confirms) until `unpin(key)`; returns how many are held.
        A key already held gains these blocks too."""
        held = self.pool.lookup(hashes)
        if held:
            self.pool.touch(held)
            if self._imported:  # an export is a use of an imported block
                marks = self.pool.marks
                for b in held:
                    marks[b] &= ~UNUSED_IMPORT
            self._pins.setdefault(key, []).extend(held)
        return len(held)

    def adopt_pins(self, key: str, request_id: str) -> None:
        """Move the pins held under `key` to `request_id` (released when it is admitted)."""
        held = self._pins.pop(key, None)
        if held:
            self._pins.setdefault(request_id, []).extend(held)

    def hold_room_bytes(self) -> int:
        """Bytes `hold_kv` can take now (0 when holding is off or the budget is in use)."""
        return max(0, self.max_held_bytes - self.held_bytes)

    def hold_kv(self, request_id: str, first_block: int, hashes: list[int],
                payloads: list[Any], nbytes: list[int]) -> int:
        """Hold, for waiting request `request_id`, the leading blocks of an onboarded run
        that fit in what `max_held_bytes` leaves (`nbytes[i]`: what block i counts); returns
        how many are held (0: none, nothing changed). `hashes[i]` is the prompt's block
        `first_block + i`. Admission writes them into the blocks it allocates for the
        request, where they continue what it finds cached then (`_admit`); held KV that
        does not continue it (the pinned head was evicted meanwhile) is dropped, and the
        prompt computed from there, as without it.

        Why: an optional import is cut to the room the requests ahead leave in the pool
        (`import_room`), and in a cache that holds one or two prompts there is none while
        another prompt waits; then the request computed its whole prompt while the store
        held it (`bench/bench_onboard_small_cache.py`: 146 of 200 requests, docs/offload.md,
        "Onboarding into a small cache")."""
        seq = self.requests.get(request_id)
        if seq is None or seq.status != WAITING or seq.held is not None or not hashes:
            return 0
        room = self.max_held_bytes - self.held_bytes
        n = total = 0
        for size in nbytes[:len(hashes)]:
            if total + size > room:
                break
            total += size
            n += 1
        if n == 0:
            return 0
        seq.held = HeldKv(first_block, list(hashes[:n]), list(payloads[:n]), total)
        self.held_bytes += total
        self.num_held_blocks += n
        return n

    def _drop_held(self, seq: Sequence) -> None:
        held = seq.held
        if held is not None:
            seq.held = None
            self.held_bytes -= held.nbytes

    def _usable_held(self, seq: Sequence, hit: int, limit: int) -> int:
        """How many of `seq`'s held blocks admission can take after its `hit` cached blocks,
        at most `limit`: those that continue the hit (the held run starts at or before the
        hit's end and goes beyond it) and name the prompt's own hashes, up to the first one
        cached elsewhere already (a stray child of an evicted parent) or distrusted."""
        held = seq.held
        k = hit - held.first_block
        if k < 0 or k >= len(held.hashes) or limit <= 0:
            return 0
        own = seq.block_hashes
        lookup = self.pool.block_of
        distrusted = self.distrusted
        n = 0
        for i in range(k, min(len(held.hashes), k + limit)):
            h = held.hashes[i]
            if (hit + n >= len(own) or own[hit + n] != h or lookup(h) is not None
                    or h in distrusted):
                break
            n += 1
        return n

    def import_room(self) -> int:
        """How many blocks an optional import (`KvImport.optional`: an offload hit) pinned for
        a request queued now may take: the free blocks, less the running requests' prompt
        blocks not allocated yet, less the largest number of blocks any waiting request
        still needs for its prompt beyond what is pinned for it. Whatever the request ahead
        needs at its admission and cannot find free, it takes back from the pins behind it
        (`_reclaim_pins`): an import beyond this room is mostly fetched, copied and written
        for nothing. A hint; the estimate is measured, not exact
        (`bench/bench_onboard_room_sim.py --clients 4`: one mocker core of 128 blocks, 4
        closed-loop clients, 1,480-token prompts over 12 prefixes, an ideal store, 200
        requests; live: `tests/test_offload_small_cache.py`). Onboarded blocks evicted
        unused / prompt tokens served from the cache / requests with none:

        - before (pins released whole, whatever the need): 9,803 of 10,538 / 30,224 / 175
        - pins yield only what makes room, no room limit: 7,825 / 62,496 / 97
        - and this room (the largest need ahead): 362 of 1,913 imported / 49,696 / 48
        - counting only the head of the queue's need: 750 / 53,952 / 101
        - counting every waiting request's need: 0 (nothing fit, ever) / 24,448 / 176
        - reserving the running and waiting requests' decode growth too (to max_tokens):
          215 / 46,096 / 118, and no room at all under a large max_tokens: not kept.

        What is still evicted unused is mostly the tail of a pin yielded to a running
        request's decode (`_grow`)."""
        bs = self.block_size
        pins = self._pins
        room = self.pool.num_free
        ahead = 0
        for seq in self.waiting:
            held = pins.get(seq.request_id) if pins else None
            need = -(-len(seq.token_ids) // bs) - (len(held) if held else 0)
            if need > ahead:
                ahead = need
        for seq in self.running:
            left = -(-len(seq.token_ids) // bs) - len(seq.block_table)
            if left > 0:
                room -= left
        return max(0, room - ahead)

    @property
    def num_pinned_blocks(self) -> int:
        """Block references held by pins (imports waiting for their request, exports)."""
        return sum(len(v) for v in self._pins.values())

    # ---- load -------------------------------------------------------------------------------

    def waiting_prefill_tokens(self) -> int:
        """Prompt tokens this engine will still compute. A waiting request whose KV was
        imported (a remote prefill's transfer, an offload hit: blocks pinned for it until it
        is admitted) counts only what admission will not find cached, exactly as `_admit`
        will count it, and none of a run held for it in host memory (`hold_kv`: it holds
        the pinned head too, so the two overlap); other waiting requests count their whole
        prompt (their cache hits may be evicted before they are admitted, and looking every
        waiting prompt up on each load report would cost a dict probe per block)."""
        total = 0
        pins = self._pins
        bs = self.block_size
        for seq in self.waiting:
            pinned = bool(pins) and seq.request_id in pins
            done = self._cached_prefix(seq) if pinned else seq.num_computed
            held = seq.held
            if held is not None:  # (when admission can use them: `_usable_held`; the run
                # starts at the prefix cached when it was fetched, and holds its pinned head)
                done = max(done, (held.first_block + len(held.hashes)) * bs)
            left = len(seq.token_ids) - done
            if pinned and seq.tail is not None:  # (when admission can use it: `_admit`)
                left -= seq.tail[0]
            total += max(1, left)
        for seq in self.running:
            left = len(seq.token_ids) - seq.num_computed
            if left > 1:
                total += left
        return total

    def _cached_prefix(self, seq: Sequence) -> int:
        """Prompt tokens of waiting `seq` that admission would take from the prefix cache
        (the same lookup as `_admit`: full blocks, never the last token). Remembered until
        the pool forgets any hash: the walk costs a dict probe per block (20 waiting 8k-token
        imports, block 16: ~0.6 ms, on every step's load report; remembered: ~3 us). A
        chain that grows after the lookup (another request caching its missing blocks) is
        seen at the next forgetting: until then the earlier, shorter hit counts."""
        pool = self.pool
        if not pool.enable_caching:
            return 0
        memo = seq.cached_memo
        if memo is not None and memo[0] == pool.num_uncached:
            return memo[1]
        bs = self.block_size
        extend_block_hashes(seq.block_hashes, seq.token_ids, bs)
        cached = len(pool.lookup(seq.block_hashes[: (len(seq.token_ids) - 1) // bs])) * bs
        seq.cached_memo = (pool.num_uncached, cached)
        return cached

    def load_report(self, worker_id: int, ts_ms: int, step_ms_ewma: float = 0.0) -> LoadReport:
        return LoadReport(
            worker_id=worker_id,
            ts_ms=ts_ms,
            running=len(self.running),
            waiting=len(self.waiting),
            waiting_prefill_tokens=self.waiting_prefill_tokens(),
            kv_used_blocks=self.pool.num_used,
            kv_total_blocks=self.pool.num_blocks,
            step_ms_ewma=step_ms_ewma,
        )

    # ---- internals --------------------------------------------------------------------------

    def _chunk(self, seq: Sequence, n: int) -> ScheduledChunk:
        start = seq.num_computed
        end = start + n
        return ScheduledChunk(
            seq_id=seq.request_id,
            token_ids=seq.token_ids[start:end],
            start_pos=start,
            block_table=seq.block_table,
            sample=end == len(seq.token_ids),
            sampling=seq.sampling,
            output_index=seq.num_output,
            seq_tokens=seq.token_ids,
            prompt_len=seq.prompt_len,
        )

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make `seq.block_table` cover `num_tokens` positions; False if blocks ran out."""
        need = -(-num_tokens // self.block_size) - len(seq.block_table)
        if need <= 0:
            return True
        new = self.pool.allocate(need)
        if new is None and self._reclaim_pins(need, seq.request_id):
            new = self.pool.allocate(need)  # (the caller preempts when this is None)
        if new is None:
            return False
        seq.block_table.extend(new)
        return True

    def _reclaim_pins(self, need: int, keep: str, hit: Seq[int] = ()) -> bool:
        """Release other keys' pins (imports waiting for their request, exports) until `need`
        blocks are free besides the free ones among `hit` (the prefix hits admission takes
        back); True when they are (already, or after the release). Pins of queued requests
        must never stall the requests ahead of them, nor a running request's growth (a
        queue of onboarded prompts could otherwise hold the whole pool while the head
        waits for blocks); they yield the fewest blocks that make room, newest key first,
        each key's chain from its tail (its head stays pinned and is still a prefix hit for
        its request), and the blocks released stay cached.

        Nothing is released when releasing every other pin would still not make room: the
        head of the queue that cannot fit beside the running requests then waits for them
        to finish, and the imports queued behind it keep their blocks. Before (released
        every pin, newest first, whether or not that made room, at every step the head
        waited), a small cache lost nearly every onboarded block before its request ran:
        2 mocker workers of 128 blocks, 8 clients, 1,480-token prompts over 12 prefixes,
        thousands of blocks onboarded and 0 cached tokens on almost every request."""
        pool = self.pool
        ref = pool.ref_cnt
        taken = sum(1 for b in hit if ref[b] == 0) if hit else 0
        short = need + taken - pool.num_free
        if short <= 0:
            return True
        pins = self._pins
        # each pinned reference frees at most one block: a cheap bound first (the head of the
        # queue asks at every step while it waits)
        if sum(len(v) for k, v in pins.items() if k != keep) < short:
            return False
        # exactly: the blocks only other keys' pins hold, less those among `hit`
        counts: dict[int, int] = {}
        for key, held in pins.items():
            if key != keep:
                for b in held:
                    counts[b] = counts.get(b, 0) + 1
        hits = set(hit) if hit else ()
        if sum(1 for b, c in counts.items() if c == ref[b] and b not in hits) < short:
            return False
        free = pool.free
        for key in reversed(list(pins)):
            if key == keep:
                continue
            held = pins[key]
            while held and short > 0:
                b = held.pop()
                free((b,))
                if ref[b] == 0 and b not in hits:
                    short -= 1
            if not held:
                del pins[key]
            if short <= 0:
                break
        return True

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Take prefix-cache hits and blocks for `seq`'s first chunk; returns the chunk's
        token count, or 0 (nothing changed) when its blocks do not fit now."""
        bs = self.block_size
        pool = self.pool
        total = len(seq.token_ids)
        hit: list[int] = []
        if pool.enable_caching:
            extend_block_hashes(seq.block_hashes, seq.token_ids, bs)
            # the last token is always computed: its logits give the next token
            hit = pool.lookup(seq.block_hashes[: (total - 1) // bs])
        # Held blocks (`hold_kv`) that continue the hit are taken as cached, their KV
        # written before the step (never the last token's block: its logits are computed)
        held_n = 0
        if seq.held is not None:
            held_n = self._usable_held(seq, len(hit), (total - 1) // bs - len(hit))
        held_end = len(hit) + held_n
        cached = held_end * bs
        # A tail (the prompt's last partial block, computed by a remote prefill) is used only
        # where it continues exactly what is cached here: every full block of the prompt
        # (one evicted meanwhile means the prompt's rest is computed here, tail and all)
        tail = seq.tail
        tail_n = 0
        if tail is not None:
            if cached == seq.prompt_len - tail[0] and cached + tail[0] < total:
                tail_n = tail[0]
        n = min(total - cached - tail_n, budget)
        need = -(-(cached + tail_n + n) // bs) - len(hit)
        # (released pins leave their blocks cached: `hit` still holds)
        if not self._reclaim_pins(need, seq.request_id, hit):
            return 0
        pool.touch(hit)
        # the first block whose KV came from outside (`drop_foreign`): a scan of the hits'
        # marks (~40 ns a block: 512 hit blocks ~20 us at load ~6, next to the hashing and
        # the lookup above), on an engine that ever imported a block
        foreign = len(hit) if tail_n or held_n else None
        if self._imported:
            marks = pool.marks
            foreign = next((i for i, b in enumerate(hit) if marks[b] & FOREIGN), foreign)
            for b in hit:  # used: its import was worth it (`BlockPool.num_imports_evicted_unused`)
                marks[b] &= ~UNUSED_IMPORT
        seq.foreign_from = foreign
        seq.block_table = hit + (pool.allocate(need) or [])
        seq.num_computed = cached + tail_n
        seq.num_registered = len(hit)
        if held_n:
            held = seq.held
            k = len(hit) - held.first_block
            writes = self.kv_writes
            table = seq.block_table
            for i in range(held_n):
                writes.append((table[len(hit) + i], held.payloads[k + i]))
            self.num_held_used += held_n
            self._imported = True
            if pool.enable_caching:  # cached under the prompt's hashes, marked FOREIGN
                self._register_full_blocks(seq, cached)
        self._drop_held(seq)  # used once, whatever was usable
        if tail is not None:
            seq.tail = None  # used once: a preempted request computes its prompt again
            if tail_n:
                self.kv_writes.append((seq.block_table[held_end], tail[1]))
        if seq.cached_tokens < 0:
            seq.cached_tokens = min(cached, seq.prompt_len)
        self.unpin(seq.request_id)
        return n

    def _preempt(self, seq: Sequence) -> None:
        # victims are always taken from the tail of running
        self.running.pop()
        self._release(seq)
        seq.status = WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        if seq.block_table:
            self.pool.free(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0
        seq.num_registered = 0
        seq.foreign_from = None

    def _register_full_blocks(self, seq: Sequence, upto: int | None = None) -> None:
        """Cache the full blocks of `seq` below token position `upto` (default: what is
        computed) that are not registered yet."""
        bs = self.block_size
        full = (seq.num_computed if upto is None else upto) // bs
        hashes = seq.block_hashes
        if len(hashes) < full:
            extend_block_hashes(hashes, seq.token_ids, bs)
        pool = self.pool
        first = seq.num_registered
        # blocks from this one on hold generated tokens (marked for the offload admission)
        gen_from = seq.prompt_len // bs
        marks = pool.marks
        if not pool.keep_tokens:
            table = seq.block_table
            pool.cache_chain(table[first:full], hashes[first:full], hashes[first - 1] if first else None)
            if pool.evicted is not None:  # an eviction sink reads the marks
                block_hash = pool.block_hash
                for idx in range(max(first, gen_from), full):
                    b = table[idx]
                    if block_hash[b] == hashes[idx]:
                        marks[b] |= GENERATED
            if seq.foreign_from is not None:
                self._mark_foreign(seq, first, full)
            seq.num_registered = full
            return
        tokens = seq.token_ids
        for idx in range(first, full):
            b = seq.block_table[idx]
            if pool.cache_block(
                b,
                hashes[idx],
                hashes[idx - 1] if idx else None,
                tokens[idx * bs : (idx + 1) * bs],
            ) and idx >= gen_from:
                marks[b] |= GENERATED
        if seq.foreign_from is not None:
            self._mark_foreign(seq, first, full)
        seq.num_registered = full

    def _mark_foreign(self, seq: Sequence, first: int, full: int) -> None:
        """Blocks [first, full) of `seq` just registered, computed over foreign KV (at or
        after `seq.foreign_from`), are marked `FOREIGN` too: a later request that hits them
        drops them if it fails (`drop_foreign`), as it would the import they descend from."""
        pool = self.pool
        block_hash, marks = pool.block_hash, pool.marks
        table, hashes = seq.block_table, seq.block_hashes
        for idx in range(max(first, seq.foreign_from or 0), full):
            b = table[idx]
            if block_hash[b] == hashes[idx]:  # (not a private copy of a block held elsewhere)
                marks[b] |= FOREIGN
