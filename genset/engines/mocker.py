"""The mocker: the real scheduler and block pool, no tensors; step times from a timing model.

It publishes the same KV events and load reports as the torch engine for the same requests,
so routers, planners and whole fleets can be exercised without models: in real time
(`create_mocker_engine`: an `Engine` that sleeps each modelled step) or in simulated time
(`MockerCore`, driven directly by offline trace replay).

Timing model (default: Dynamo's published mocker polynomial, in ms)::

    prefill_ms(T) = 4.209989e-7 * T**2 + 0.01518344 * T + 16.50142
    decode_ms(u)  = max(1, -25.74 * u**2 + 54.01 * u + 5.74)
    step_ms       = [prefill_ms(T) if T > 0] + [decode_ms(u) if the step emits tokens]
                    all divided by speedup_ratio

T is the number of tokens the step computes that are not decode tokens (prompt chunks,
including recompute after preemption; prefix-cache hits are not computed, so not counted);
a decode token is the single token of a sequence that has already produced output. u is the
fraction of KV blocks in use (held by sequences) once the step's blocks are allocated. The
sum follows Dynamo's vLLM-style mocker, which advances time by the batch's prefill time and
then by the decode time of the pass in which the ready sequences emit their token (a
sequence that finishes its prompt in a step emits its first token in that same step).
`PolynomialTiming(dynamo_exact=True)` instead reproduces what Dynamo's offline replay was
measured to charge: the decode term only in steps where some sequence decodes, with u = the
decoding sequences' context tokens / token capacity (the router's replay calibrates with it).

Output tokens are deterministic pseudo-random ids in [0, vocab_size), seeded per request
(its `sampling.seed`, else a hash of its id), never an EOS id unless `eos_probability` > 0.

Simulated time (offline replay)::

    core = MockerCore(MockerConfig(num_blocks=16384), worker_id=3)
    core.add_request(EngineRequest("r1", prompt_ids, stop=StopConditions(max_tokens=50)))
    now = 0.0
    while core.has_work():
        outputs, step_ms = core.step(now)   # a step starting at `now`
        now += step_ms                      # outputs (EngineOutput) exist at `now`
        batch = core.take_kv_batch(int(now))  # KvEventBatch | None
"""

from __future__ import annotations

from dataclasses import dataclass, field

import xxhash

from genset.engines.base import (
    AsyncEngineDriver,
    EngineCard,
    EngineOutput,
    EngineRequest,
    KvBlockData,
    KvImport,
)
from genset.engines.batch import StepPlan
from genset.engines.scheduler import Scheduler, SchedulerConfig, Sequence
from proto.kv import KvEventBatch, LoadReport

_MASK64 = (1 << 64) - 1
# Knuth's MMIX LCG constants: a cheap, deterministic per-request stream
_LCG_MUL = 6364136223846793005
_LCG_INC = 1442695040888963407


@dataclass(slots=True)
class PolynomialTiming:
    """Dynamo's mocker polynomial (see module docstring); coefficients overridable."""

    prefill_quadratic: float = 4.209989e-7
    prefill_linear: float = 0.01518344
    prefill_const: float = 16.50142
    decode_quadratic: float = -25.74
    decode_linear: float = 54.01
    decode_const: float = 5.74
    decode_min: float = 1.0
    speedup_ratio: float = 1.0
    # Dynamo's own offline replay (measured on single requests, ai-dynamo 1.6.1) charges the
    # decode time only in steps where some sequence decodes (a step that only finishes prompts
    # costs prefill_ms alone), with u = context tokens of the decoding sequences / token
    # capacity. True reproduces that exactly (the router's replay calibrates with it).
    dynamo_exact: bool = False

    def prefill_ms(self, uncached_tokens: int) -> float:
        t = uncached_tokens
        ms = self.prefill_quadratic * t * t + self.prefill_linear * t + self.prefill_const
        return ms / self.speedup_ratio

    def decode_ms(self, kv_usage: float) -> float:
        u = kv_usage
        ms = max(
            self.decode_min,
            self.decode_quadratic * u * u + self.decode_linear * u + self.decode_const,
        )
        return ms / self.speedup_ratio

    def step_ms(self, prefill_tokens: int, emits_tokens: bool, kv_usage: float) -> float:
        ms = self.prefill_ms(prefill_tokens) if prefill_tokens > 0 else 0.0
        if emits_tokens:
            ms += self.decode_ms(kv_usage)
        return ms


@dataclass(slots=True)
class MockerConfig:
    block_size: int = 16
    num_blocks: int = 16384
    max_batch_tokens: int = 8192
    max_running: int = 256
    context_length: int = 131072
    vocab_size: int = 32000
    eos_token_ids: tuple[int, ...] = (2,)
    eos_probability: float = 0.0  # chance per output token of emitting EOS
    enable_prefix_caching: bool = True
    emit_token_ids: bool = False
    timing: PolynomialTiming = field(default_factory=PolynomialTiming)

    @property
    def speedup_ratio(self) -> float:
        return self.timing.speedup_ratio


@dataclass(slots=True)
class StepStats:
    """What the last step did (for metrics, planners' performance models and tests)."""

    prefill_tokens: int = 0
    decode_tokens: int = 0
    num_chunks: int = 0
    kv_usage: float = 0.0
    step_ms: float = 0.0
    start_ms: float = 0.0


class MockerCore:
    """A synchronous mocker engine core (`genset.engines.base.EngineCore`).

    `step(now_ms=None)` runs one step and returns (outputs, step_ms); `now_ms` is the
    simulated start time (defaults to the end of the previous step) and only stamps
    `clock_ms` and `last_step`. An idle core (nothing to schedule) returns ([], 0.0).
    """

    def __init__(self, config: MockerConfig | None = None, *, worker_id: int = 0) -> None:
        self.config = cfg = config or MockerConfig()
        if cfg.vocab_size <= len(cfg.eos_token_ids):
            raise ValueError("vocab_size must exceed the number of EOS ids")
        self.worker_id = worker_id
        self.scheduler = Scheduler(
            SchedulerConfig(
                block_size=cfg.block_size,
                num_blocks=cfg.num_blocks,
                max_batch_tokens=cfg.max_batch_tokens,
                max_running=cfg.max_running,
                context_length=cfg.context_length,
                eos_token_ids=cfg.eos_token_ids,
                enable_prefix_caching=cfg.enable_prefix_caching,
                emit_token_ids=cfg.emit_token_ids,
            )
        )
        self.pool = self.scheduler.pool
        self.timing = cfg.timing
        self.card = EngineCard(
            engine="mocker",
            block_size=cfg.block_size,
            kv_blocks=cfg.num_blocks,
            max_batch_tokens=cfg.max_batch_tokens,
            max_running=cfg.max_running,
            context_length=cfg.context_length,
            eos_token_ids=list(cfg.eos_token_ids),
            vocab_size=cfg.vocab_size,
        )
        self.clock_ms = 0.0
        self.last_step = StepStats()
        self._eos = sorted(set(cfg.eos_token_ids))
        self._eos_set = frozenset(cfg.eos_token_ids)
        # P(eos) as a threshold on the top 32 bits of the LCG state
        self._eos_threshold = int(cfg.eos_probability * (1 << 32))

    # ---- requests ---------------------------------------------------------------------------

    def add_request(self, request: EngineRequest) -> None:
        if request.kv_import is not None:
            self.import_kv(request.kv_import, pin_for=request.request_id)
        try:
            seq = self.scheduler.add_request(request)
        except ValueError:
            self.scheduler.unpin(request.request_id)
            raise
        seed = request.sampling.seed
        if seed is None:
            seed = xxhash.xxh3_64_intdigest(request.request_id.encode())
        seq.user_data = seed & _MASK64  # the request's LCG state

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

    def step(self, now_ms: float | None = None) -> tuple[list[EngineOutput], float]:
        start = self.clock_ms if now_ms is None else now_ms
        sched = self.scheduler
        plan = sched.schedule()
        if not plan.chunks:
            self.clock_ms = start
            self.last_step = StepStats(start_ms=start)
            return [], 0.0
        usage = self.pool.num_used / self.pool.num_blocks
        sampled, prefill_tokens, decode_tokens, emitted = self._sample(plan, sched.scheduled)
        if self.timing.dynamo_exact:
            ctx = sum(len(seq.token_ids) for chunk, seq in zip(plan.chunks, sched.scheduled, strict=True)
                      if len(chunk.token_ids) == 1 and seq.num_output > 0)
            usage = ctx / (self.pool.num_blocks * self.pool.block_size)
            step_ms = self.timing.step_ms(prefill_tokens, decode_tokens > 0, usage)
        else:
            step_ms = self.timing.step_ms(prefill_tokens, emitted > 0, usage)
        outputs = sched.update(plan, sampled)
        self.clock_ms = start + step_ms
        self.last_step = StepStats(
            prefill_tokens=prefill_tokens,
            decode_tokens=decode_tokens,
            num_chunks=len(plan.chunks),
            kv_usage=usage,
            step_ms=step_ms,
            start_ms=start,
        )
        return outputs, step_ms

    def _sample(
        self, plan: StepPlan, seqs: list[Sequence]
    ) -> tuple[list[int | None], int, int, int]:
        """Tokens for the plan's chunks, and the step's prefill, decode and emitted counts."""
        vocab = self.config.vocab_size
        eos_set = self._eos_set
        eos_threshold = self._eos_threshold
        sampled: list[int | None] = []
        prefill = decode = emitted = 0
        for chunk, seq in zip(plan.chunks, seqs, strict=True):
            n = len(chunk.token_ids)
            if n == 1 and seq.num_output > 0:
                decode += 1
            else:
                prefill += n
            if not chunk.sample:
                sampled.append(None)
                continue
            state = (seq.user_data * _LCG_MUL + _LCG_INC) & _MASK64
            seq.user_data = state
            high = state >> 32
            if eos_threshold and (high & 0xFFFFFFFF) < eos_threshold and self._eos:
                token = self._eos[high % len(self._eos)]
            else:
                token = high % vocab
                while token in eos_set:
                    token = (token + 1) % vocab
            sampled.append(token)
            emitted += 1
        return sampled, prefill, decode, emitted

    # ---- runs of plain decode steps (simulated-time drivers) --------------------------------

    def decode_run(self, max_steps: int) -> list[float]:
        """Durations (ms) of the next steps, at most `max_steps`, that are plain decodes
        (`Scheduler.decode_horizon`: no admission, allocation, KV event or stop); [] when
        the next step is not one. Changes nothing: the driver commits the first k of them
        with `commit_decode_run(k, end_ms)` (fewer when a request arrives meanwhile), which
        leaves exactly the state that k calls of `step` would have left."""
        sched = self.scheduler
        n = sched.decode_horizon(max_steps)
        if n == 0:
            return []
        timing = self.timing
        if not timing.dynamo_exact:
            return [timing.step_ms(0, True, self.pool.num_used / self.pool.num_blocks)] * n
        # as in `step`: u = decoding context tokens (before this step's token) / capacity
        cap = self.pool.num_blocks * self.pool.block_size
        ctx = sum(len(seq.token_ids) for seq in sched.running)
        grow = len(sched.running)
        out: list[float] = []
        for _ in range(n):
            out.append(timing.step_ms(0, True, ctx / cap))
            ctx += grow
        return out

    def commit_decode_run(self, steps: int, end_ms: float) -> list[str]:
        """Apply the first `steps` steps of the last `decode_run`; returns the ids of the
        requests that emitted `steps` tokens each (none finished)."""
        sched = self.scheduler
        running = sched.running
        sched.advance_decodes(steps, [self._next_tokens(seq, steps) for seq in running])
        self.clock_ms = end_ms
        return [seq.request_id for seq in running]

    def _next_tokens(self, seq: Sequence, k: int) -> list[int]:
        """`seq`'s next k tokens: the same stream `_sample` draws from, one per step."""
        vocab = self.config.vocab_size
        eos = self._eos
        eos_set = self._eos_set
        eos_threshold = self._eos_threshold
        state = seq.user_data
        out: list[int] = []
        for _ in range(k):
            state = (state * _LCG_MUL + _LCG_INC) & _MASK64
            high = state >> 32
            if eos_threshold and (high & 0xFFFFFFFF) < eos_threshold and eos:
                token = eos[high % len(eos)]
            else:
                token = high % vocab
                while token in eos_set:
                    token = (token + 1) % vocab
            out.append(token)
        seq.user_data = state
        return out

    # ---- KV ---------------------------------------------------------------------------------

    def take_kv_batch(self, ts_ms: int = 0) -> KvEventBatch | None:
        return self.pool.take_batch(self.worker_id, ts_ms)

    def has_kv_pending(self) -> bool:
        """Whether take_kv_batch would return a batch (lets the driver skip the call)."""
        return bool(self.pool._pending)

    def kv_snapshot(self, ts_ms: int = 0) -> KvEventBatch:
        return self.pool.snapshot_batch(self.worker_id, ts_ms)

    def export_kv(self, hashes: list[int]) -> list[KvBlockData]:
        return [KvBlockData(hash=h) for h, _ in self.scheduler.export_kv(hashes)]

    def import_kv(self, kv: KvImport, pin_for: str | None = None) -> int:
        hashes = [b.hash for b in kv.blocks]
        self.scheduler.import_kv(hashes, kv.parent_hash, pin_for=pin_for)
        return sum(1 for h in hashes if self.pool.block_of(h) is not None)

    def load_report(self, ts_ms: int, step_ms_ewma: float = 0.0) -> LoadReport:
        return self.scheduler.load_report(self.worker_id, ts_ms, step_ms_ewma)


def create_mocker_engine(
    config: MockerConfig | None = None, *, worker_id: int = 0, **driver_opts: object
) -> AsyncEngineDriver:
    """A real-time mocker `Engine`: steps on the event loop, sleeping each modelled step."""
    core = MockerCore(config, worker_id=worker_id)
    return AsyncEngineDriver(core, worker_id=worker_id, threaded=False, **driver_opts)  # type: ignore[arg-type]
