"""The mocker: the real scheduler and block pool, no tensors; step times from a timing model.

It publishes the same KV events and load reports as the torch engine for the same requests,
so routers, planners and whole fleets can be exercised without models: in real time
(`create_mocker_engine`: a `MockerDriver`, an `Engine` paced by the modelled step times) or in simulated time
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

Output tokens are deterministic pseudo-random ids in [0, vocab_size), never an EOS id unless
`eos_probability` > 0, from a stream seeded per request: a greedy request (temperature 0, or
top_k 1) from a hash of its prompt, so that its output is a function of the prompt and the
position alone, as a model's greedy output is (the same on every worker, whatever the request
id; the prompt's length and last 64 tokens are hashed, `_prompt_state`); a seeded one from a
hash of (seed, prompt); any other from a hash of its request id.
Until `min_tokens` are out, the request's stop ids and EOS (unless ignored) are never drawn.
Penalties and `logit_bias` have no effect (there are no logits); `logprobs` are refused
(`genset.engines.core.sampling_error`).

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

import asyncio
import concurrent.futures
import contextlib
import logging
import struct
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import xxhash

from genset.engines.batch import StepPlan
from genset.engines.core import SchedulingCore
from genset.engines.driver import AsyncEngineDriver, merge_output, now_ms
from genset.engines.scheduler import Scheduler, SchedulerConfig, Sequence
from genset.engines.types import EngineOutput, EngineRequest, KvBlockData, KvImport
from proto.transfer import KvLayout

log = logging.getLogger(__name__)

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
    # KV transfers (offload, disaggregation): the modelled size of a block's KV, and the
    # bandwidths (GB/s, decimal; 0 = free) of copying blocks out (eviction write-behind,
    # export) and in (import, onboarding), charged to the next step: a block's copy out must
    # end before its memory is reused, a copy in before the step that reads it.
    kv_bytes_per_token: int = 0
    offload_d2h_gbps: float = 0.0
    offload_h2d_gbps: float = 0.0
    # True: the copies run on their own stream beside the step's compute, layer by layer
    # (layer i of a reused block is copied out before the step writes layer i into it, layer
    # i of an imported block copied in before the step's attention reads it), the way vLLM's
    # offloading connector and Dynamo's mocker run them (async D2H/H2D lanes, fenced only on
    # what depends on them): the step takes max(compute, copy out, copy in) plus the first
    # layer's copy, the out and in lanes running at once (PCIe is full duplex). False: the
    # step waits for the copies, then computes (compute + out + in), as an engine that copies
    # on its compute stream does (genset's torch engine today).
    kv_copy_overlap: bool = True
    kv_layers: int = 32  # layers of the modelled KV (Llama-3-8B: 131,072 bytes a token)
    # Copies out ahead of eviction (with an eviction sink, `kv_copy_overlap` and a D2H
    # bandwidth): after each step, the copy-out lane's idle time in it (the step's length
    # less its own copies out) copies the pool's next cached blocks to be evicted, at most
    # this many free blocks from its LRU end, to the sink (`SchedulingCore.copy_ahead`), so
    # the step that later evicts them waits for no copy: an import of a long run evicts as
    # many blocks as it brings in, and their copies out fenced its first step. 0: off
    # (blocks are copied out when evicted).
    offload_copy_ahead_blocks: int = 1024

    @property
    def speedup_ratio(self) -> float:
        return self.timing.speedup_ratio

    @property
    def kv_block_bytes(self) -> int:
        return self.kv_bytes_per_token * self.block_size


# The mocker has no tensors: a block's payload is this placeholder naming the KV's modelled
# size (12 bytes), so stores and transfers can account bytes without moving them.
MOCK_KV_MAGIC = b"GSMK"


def mock_payload(nbytes: int) -> bytes:
    return MOCK_KV_MAGIC + struct.pack("<Q", nbytes)


def mock_payload_bytes(data: bytes | bytearray | memoryview | None, default: int) -> int:
    """The modelled size a mocker payload names (`default` for None or empty); ValueError for
    anything else (e.g. a torch payload: KV of a real model cannot go into a mocker)."""
    if data is None or len(data) == 0:
        return default
    if len(data) != 12 or bytes(data[:4]) != MOCK_KV_MAGIC:
        raise ValueError(f"not a mocker KV payload ({len(data)} bytes; a mocker imports only "
                         "what a mocker exported)")
    return struct.unpack("<Q", bytes(data[4:]))[0]


@dataclass(slots=True)
class StepStats:
    """What the last step did (for metrics, planners' performance models and tests)."""

    prefill_tokens: int = 0
    decode_tokens: int = 0
    num_chunks: int = 0
    kv_usage: float = 0.0
    step_ms: float = 0.0  # the whole step, KV copies included
    start_ms: float = 0.0
    copy_out_ms: float = 0.0  # of step_ms: KV copied out (eviction write-behind, export)
    copy_in_ms: float = 0.0  # of step_ms: KV copied in (imports, onboarding; disk reads)
    out_lane_ms: float = 0.0  # the copies out this step waited for, whole (not only the excess)
    # ids of the requests with a prompt chunk in the step (only with `record_prefill_ids`)
    prefill_ids: list[str] | None = None


class MockerExecutor:
    """The mocker's executor (`genset.engines.core.Executor`): deterministic pseudo-random
    tokens and a modelled step time; a block's payload is a placeholder (`mock_payload`)."""

    name = "mocker"
    supports_logprobs = False
    step_logprobs = None  # never any

    def __init__(self, config: MockerConfig) -> None:
        self.config = config
        self.vocab_size = config.vocab_size
        self.timing = config.timing
        self.kv_block_bytes = len(mock_payload(0))
        self.charged_ms = 0.0  # KV copy time the next step pays (see MockerConfig) ...
        self.charged_out_ms = 0.0  # ... of which copies out
        self.record_prefill_ids = False  # StepStats.prefill_ids (the replay's TTFT breakdown)
        self._eos = sorted(set(config.eos_token_ids))
        self._eos_set = frozenset(config.eos_token_ids)
        # P(eos) as a threshold on the top 32 bits of the LCG state
        self._eos_threshold = int(config.eos_probability * (1 << 32))
        self.stats: StepStats | None = None  # what the last `execute` did

    def check_request(self, request: EngineRequest) -> None:
        pass

    def start_sequence(self, seq: Sequence, request: EngineRequest) -> None:
        s = request.sampling
        # the request's LCG state (module docstring)
        if s.temperature <= 0 or s.top_k == 1:
            state = _prompt_state(request.token_ids, 0)
        elif s.seed is not None:
            state = _prompt_state(request.token_ids, s.seed & _MASK64)
        else:
            state = xxhash.xxh3_64_intdigest(request.request_id.encode())
        seq.user_data = state
        if request.resume_token_ids:
            # tokens drawn elsewhere (a remote prefill) from the same stream: skip past them
            self.next_tokens(seq, len(request.resume_token_ids))

    def kv_layout(self) -> KvLayout:
        """Mocker blocks carry no payload (a transfer moves hashes; its time is modelled)."""
        return KvLayout(engine=self.name)

    def execute(self, plan: StepPlan, sched: Scheduler) -> tuple[list[int | None], float]:
        pool = sched.pool
        usage = pool.num_used / pool.num_blocks
        sampled, prefill_tokens, decode_tokens, emitted = self._sample(plan, sched.scheduled)
        if self.timing.dynamo_exact:
            ctx = sum(len(seq.token_ids) for chunk, seq in zip(plan.chunks, sched.scheduled, strict=True)
                      if len(chunk.token_ids) == 1 and seq.num_output > 0)
            usage = ctx / (pool.num_blocks * pool.block_size)
            step_ms = self.timing.step_ms(prefill_tokens, decode_tokens > 0, usage)
        else:
            step_ms = self.timing.step_ms(prefill_tokens, emitted > 0, usage)
        copy_out = copy_in = 0.0
        out_lane = self.charged_out_ms
        if self.charged_ms:
            step_ms, copy_out, copy_in = self._with_copies(step_ms)
        self.stats = StepStats(
            prefill_tokens=prefill_tokens,
            decode_tokens=decode_tokens,
            num_chunks=len(plan.chunks),
            kv_usage=usage,
            step_ms=step_ms,
            copy_out_ms=copy_out,
            copy_in_ms=copy_in,
            out_lane_ms=out_lane,
        )
        if self.record_prefill_ids:
            self.stats.prefill_ids = [
                seq.request_id for chunk, seq in zip(plan.chunks, sched.scheduled, strict=True)
                if not (len(chunk.token_ids) == 1 and seq.num_output > 0)]
        return sampled, step_ms

    def idle(self) -> None:
        pass  # simulated time: an idle step costs nothing

    def _with_copies(self, compute_ms: float) -> tuple[float, float, float]:
        """The step's time with the charged copies (MockerConfig.kv_copy_overlap), and how
        much of it each direction added (an overlapped step's excess over its compute, split
        in proportion to the two lanes' copy times)."""
        out = self.charged_out_ms
        into = self.charged_ms - out
        self.charged_ms = self.charged_out_ms = 0.0
        cfg = self.config
        if not cfg.kv_copy_overlap:
            return compute_ms + out + into, out, into
        lane = max(out, into)
        step = max(compute_ms, lane) + lane / max(1, cfg.kv_layers)
        added = step - compute_ms
        return step, added * out / (out + into), added * into / (out + into)

    def charge(self, ms: float, *, out: bool = False) -> None:
        """Add `ms` to the next step (a transfer the step has to wait for); `out`: a copy
        out of the engine (else in)."""
        self.charged_ms += ms
        if out:
            self.charged_out_ms += ms

    def _copy_ms(self, nbytes: int, gbps: float) -> float:
        # GB/s decimal, as Dynamo's mocker flags: bytes / (gbps * 1e9) s = bytes / (gbps * 1e6) ms
        return nbytes / (gbps * 1e6) if gbps > 0 and nbytes > 0 else 0.0

    def read_kv(self, block_ids: list[int]) -> list[Any]:
        size = self.config.kv_block_bytes
        self.charge(self._copy_ms(size * len(block_ids), self.config.offload_d2h_gbps), out=True)
        return [mock_payload(size)] * len(block_ids)

    def read_kv_ahead(self, block_ids: list[int]) -> list[Any]:
        """`read_kv` for a copy out ahead of eviction: it runs in the copy-out lane's idle
        time (MockerCore.step sizes it to fit), so no step is charged."""
        return [mock_payload(self.config.kv_block_bytes)] * len(block_ids)

    def decode_kv(self, blocks: list[KvBlockData]) -> list[Any]:
        size = self.config.kv_block_bytes
        out = []
        for i, blk in enumerate(blocks):
            try:
                out.append(mock_payload_bytes(blk.data, size))
            except ValueError as exc:
                raise ValueError(f"KV import block {i}: {exc}") from None
        return out

    def write_kv(self, block_ids: list[int], payloads: list[Any]) -> None:
        self.charge(self._copy_ms(sum(payloads), self.config.offload_h2d_gbps))

    def payload_nbytes(self, payload: int) -> int:
        """A decoded mocker payload is its modelled size: what holding it would take."""
        return payload

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
            if seq.min_tokens > seq.num_output:
                # until min_tokens are out, what would stop the request is never drawn (the
                # torch engine masks those logits)
                token = self._allowed(token, high, seq.sampling.banned_until_min)
            sampled.append(token)
            emitted += 1
        return sampled, prefill, decode, emitted

    def _allowed(self, token: int, high: int, banned: tuple[int, ...]) -> int:
        """`token` if not banned, else the next id from `high` that is neither banned nor EOS
        (any id when the banned ids and EOS cover the whole vocabulary)."""
        if token not in banned:
            return token
        vocab = self.config.vocab_size
        token = high % vocab
        for _ in range(vocab):
            if token not in self._eos_set and token not in banned:
                break
            token = (token + 1) % vocab
        return token

    def next_tokens(self, seq: Sequence, k: int) -> list[int]:
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


# The prompt's part in a greedy or seeded request's stream: its length and its last tokens,
# as a model's next token depends mostly on the recent context. Hashing the whole prompt cost
# 8% of `genset replay`'s CPU time (13k-token prompts, ~7 ns a token at best); this is O(1).
_PROMPT_TAIL = 64


def _prompt_state(token_ids: list[int], seed: int) -> int:
    """A 64-bit stream state from the prompt (its length and last tokens) and a seed."""
    data = array("q", token_ids[-_PROMPT_TAIL:])
    data.append(len(token_ids))
    return xxhash.xxh3_64_intdigest(data, seed=seed)


class MockerCore(SchedulingCore):
    """The mocker's synchronous core: the shared `SchedulingCore` over a `MockerExecutor`,
    plus simulated time.

    `step(now_ms=None)` runs one step and returns (outputs, step_ms); `now_ms` is the
    simulated start time (defaults to the end of the previous step) and only stamps
    `clock_ms` and `last_step`. An idle core (nothing to schedule) returns ([], 0.0).
    """

    executor: MockerExecutor
    _record_steps = False  # `step` records the executor's own StepStats

    def __init__(self, config: MockerConfig | None = None, *, worker_id: int = 0) -> None:
        self.config = cfg = config or MockerConfig()
        if cfg.vocab_size <= len(cfg.eos_token_ids):
            raise ValueError("vocab_size must exceed the number of EOS ids")
        super().__init__(
            MockerExecutor(cfg),
            SchedulerConfig(
                block_size=cfg.block_size,
                num_blocks=cfg.num_blocks,
                max_batch_tokens=cfg.max_batch_tokens,
                max_running=cfg.max_running,
                context_length=cfg.context_length,
                eos_token_ids=cfg.eos_token_ids,
                enable_prefix_caching=cfg.enable_prefix_caching,
                emit_token_ids=cfg.emit_token_ids,
            ),
            worker_id=worker_id,
        )
        self.timing = cfg.timing
        self.clock_ms = 0.0
        self.last_step = StepStats()
        if cfg.offload_copy_ahead_blocks < 0:
            raise ValueError("offload_copy_ahead_blocks must be >= 0, got "
                             f"{cfg.offload_copy_ahead_blocks}")
        # one block's copy out, ms (0: copies out ahead are off, MockerConfig)
        self._ahead_ms = 0.0
        if (cfg.offload_copy_ahead_blocks > 0 and cfg.kv_copy_overlap
                and cfg.offload_d2h_gbps > 0 and cfg.kv_block_bytes > 0):
            self._ahead_ms = cfg.kv_block_bytes / (cfg.offload_d2h_gbps * 1e6)
        self._run_durs: list[float] = []  # the last `decode_run`'s step durations
        self._run_started = 0  # of them, steps whose copies ahead were made

    def step(self, now_ms: float | None = None) -> tuple[list[EngineOutput], float]:
        start = self.clock_ms if now_ms is None else now_ms
        executor = self.executor
        executor.stats = None
        outputs, step_ms = super().step()
        stats = executor.stats  # None: nothing was scheduled
        if stats is None:
            stats = StepStats()
        elif self._ahead_ms and self._evict_sink is not None:
            # the copy-out lane is idle for the step's length less its own copies out
            self._copy_ahead_in(stats.step_ms - stats.out_lane_ms)
        stats.start_ms = start
        self.last_step = stats
        self.clock_ms = start + step_ms
        return outputs, step_ms

    def _copy_ahead_in(self, idle_ms: float) -> int:
        """Copies out ahead of eviction in `idle_ms` of the copy-out lane (MockerConfig)."""
        if idle_ms <= 0:
            return 0
        return self.copy_ahead(int(idle_ms / self._ahead_ms),
                               self.config.offload_copy_ahead_blocks)

    # ---- runs of plain decode steps (simulated-time drivers) --------------------------------

    def decode_run(self, max_steps: int) -> list[float]:
        """Durations (ms) of the next steps, at most `max_steps`, that are plain decodes
        (`Scheduler.decode_horizon`: no admission, allocation, KV event or stop); [] when
        the next step is not one. Changes nothing: the driver commits the first k of them
        with `commit_decode_run(k, end_ms)` (fewer when a request arrives meanwhile), which
        leaves exactly the state that k calls of `step` would have left."""
        sched = self.scheduler
        if self.executor.charged_ms:
            return []  # a KV copy to pay for: the next step is a normal one
        n = sched.decode_horizon(max_steps)
        if n == 0:
            return []
        timing = self.timing
        self._run_started = 0
        if not timing.dynamo_exact:
            out = [timing.step_ms(0, True, self.pool.num_used / self.pool.num_blocks)] * n
            self._run_durs = out
            return out
        # as in `step`: u = decoding context tokens (before this step's token) / capacity
        cap = self.pool.num_blocks * self.pool.block_size
        ctx = sum(len(seq.token_ids) for seq in sched.running)
        grow = len(sched.running)
        out = []
        for _ in range(n):
            out.append(timing.step_ms(0, True, ctx / cap))
            ctx += grow
        self._run_durs = out
        return out

    def decode_run_started(self, steps: int) -> None:
        """The first `steps` steps of the last `decode_run` have started (a driver acting in
        the middle of the run, e.g. importing KV for a request that arrived): make their
        copies out ahead of eviction now, as `step` makes a step's when the step is taken,
        before anything that happens during it. `commit_decode_run` makes the rest."""
        steps = min(steps, len(self._run_durs))
        if steps > self._run_started:
            if self._ahead_ms and self._evict_sink is not None:
                # a decode step copies nothing out of its own: its whole length is idle lane
                per = self._ahead_ms
                budget = sum(int(d / per) for d in self._run_durs[self._run_started:steps])
                self.copy_ahead(budget, self.config.offload_copy_ahead_blocks)
            self._run_started = steps

    def commit_decode_run(self, steps: int, end_ms: float) -> list[str]:
        """Apply the first `steps` steps of the last `decode_run`; returns the ids of the
        requests that emitted `steps` tokens each (none finished)."""
        self.decode_run_started(steps)
        self._run_durs = []
        self._run_started = 0
        sched = self.scheduler
        running = sched.running
        next_tokens = self.executor.next_tokens
        sched.advance_decodes(steps, [next_tokens(seq, steps) for seq in running])
        self.clock_ms = end_ms
        return [seq.request_id for seq in running]


class MockerDriver(AsyncEngineDriver):
    """A real-time mocker `Engine`: the core steps on the event loop, and each step's outputs
    are delivered once its modelled duration has passed (virtual work, real time).

    Modelled steps are laid end to end on a virtual timeline, so sleep granularity and
    scheduling delays do not accumulate into a slower engine than the model says (a lag of up
    to 50 ms is caught up). `coalesce_ms` (0: off): outputs of consecutive steps ending
    within this many ms of the last delivery are merged per request and delivered together
    (one output with several steps' tokens), so a mocker at a high speedup does not cost one
    bus frame per token; a step longer than what is left of that window delivers what is held
    first, so steps of real length (>= 1 ms at speedup 1) are delivered one by one, as
    without it.

    `clock` (seconds, default the loop's clock) and `sleep` (default `asyncio.sleep`) are the
    time source the pacing uses; tests pass a virtual clock to check the pacing exactly.

    KV imports (`import_kv`) run while a step is paced, not only between steps: the step's
    work is done when its pacing starts, so an import then changes nothing it computed (its
    blocks and KV events simply come after the step's), as a real engine copies imported KV
    in beside its compute. Waiting for the step's end instead cost every remote prefill a
    step at its resume: the transfer's last import waited for the step under way (29 ms at
    p50 of a ~100 ms gap, live mixed load; docs/benchmarks.md, issue 11), and the request's
    submit then for the next one. Only with the real clock; a virtual one keeps every
    command between steps.
    """

    def __init__(
        self,
        core: MockerCore,
        *,
        coalesce_ms: float = 0.0,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[Any]] | None = None,
        **driver_opts: Any,
    ) -> None:
        if coalesce_ms < 0:
            raise ValueError(f"coalesce_ms must be >= 0, got {coalesce_ms}")
        super().__init__(core, **driver_opts)
        self.core: MockerCore = core
        self.coalesce_s = coalesce_ms / 1000.0
        self._clock = clock
        self._sleep = sleep or asyncio.sleep
        self._wake_loop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._pacing = False  # the stepping task sleeps out a step's pacing (import_kv)

    async def import_kv(self, kv: KvImport, pin_for: str | None = None) -> int:
        if self._pacing and not self._commands:
            # On the loop, while the stepping task sleeps out a step's pacing (class doc);
            # with commands queued it waits behind them, in order.
            return self._run_now(lambda: self.core.import_kv(kv, pin_for=pin_for))
        return await super().import_kv(kv, pin_for)

    async def _call(self, fn: Callable[[], Any]) -> Any:
        # The stepping task runs on this loop: the caller waits on a loop future, which the
        # command's result resumes with a plain callback. The base class's concurrent future
        # (for a stepping thread) went through asyncio.wrap_future, whose result comes back
        # by call_soon_threadsafe: a write to the loop's wake-up fd and one more loop turn
        # for every submit, lookup and pin (issue 15).
        loop = self._loop
        if loop is None:
            return fn()  # not stepping yet: nothing else touches the core (base class)
        if self._stopping:
            raise RuntimeError("engine is stopped")
        fut = loop.create_future()
        self._commands.append((fn, fut))
        self._wake()
        return await fut

    def _run_now(self, fn: Callable[[], Any]) -> Any:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._run_command(fn, fut)
        return fut.result()

    # ---- stepping on the loop (AsyncEngineDriver's hooks) -----------------------------------

    def _start_stepping(self) -> None:
        self._wake_loop = asyncio.Event()
        self._task = asyncio.create_task(self._loop_main(), name=f"engine-{self.worker_id}")

    async def _stop_stepping(self, deadline_s: float) -> None:
        if self._task is None:
            return
        self._task.cancel()
        # asyncio.wait does not swallow a cancel of stop() itself, and has a deadline
        _, pending = await asyncio.wait([self._task], timeout=deadline_s)
        if pending:
            log.warning("engine task did not end %.0f s after stop", deadline_s)

    def _wake(self) -> None:
        if self._wake_loop is not None:
            self._wake_loop.set()

    async def _loop_main(self) -> None:
        core = self.core
        wake = self._wake_loop
        loop = self._loop
        assert wake is not None and loop is not None
        clock = self._clock or loop.time
        sleep = self._sleep
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
        step_end = clock()  # the virtual timeline (class docstring)
        while not self._stopping:
            wake.clear()
            if self._commands:
                if held or core.has_kv_pending():
                    self._deliver_held(held, last_ewma)  # commands see everything delivered
                    delivered_at = clock()
                self._run_commands()
            if not core.has_work():
                if held or core.has_kv_pending():
                    self._deliver_held(held, last_ewma)
                    delivered_at = clock()
                await wake.wait()
                step_end = clock()
                continue
            traced = self._traced
            started = time.time() if traced else 0.0
            try:
                outputs, step_ms = core.step()
            except Exception as exc:
                log.exception("engine step failed")
                self._deliver_held(held, last_ewma)
                self._fail(repr(exc))
                return
            if traced:
                self._stamp_first_step(outputs, started, step_ms)
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
            # Imports may run meanwhile (import_kv) with the real clock; a virtual one (tests)
            # keeps every command between steps. Not a wait on the command queue: that woke
            # this task for every command of a step (submits, lookups), which cost the
            # workers ~2 ms of CPU per request at concurrency 16 on a quiet machine.
            self._pacing = sleep is asyncio.sleep
            try:
                await sleep(max(0.0, step_end - clock()))
            finally:
                self._pacing = False
            for out in outputs:
                prev = held.get(out.request_id)
                if prev is None:
                    held[out.request_id] = out
                else:
                    merge_output(prev, out)
            if clock() - delivered_at >= window:
                # The step's frames and KV batch leave in one socket write at the delivery
                # (`after_delivery`), not from nats-py's flusher task woken for them.
                self._deliver_held(held, last_ewma)
                delivered_at = clock()
                # Let what this delivery woke run before the next step is computed, which
                # holds the loop (a batch of prompts: ms): the requests' tasks (first and
                # last frames, lifecycle), then the delivery's held frames and the write
                # (AsyncEngineDriver._deliver), then the NATS flusher for anything later.
                # Without this they waited for that computation in the connection's buffer
                # (--timeline at concurrency 64: worker -> frontend p99 205 ms). The two
                # turns also let requests that arrived during the step reach the engine's
                # queue before the next step is planned: skipping them when the delivery
                # woke no task (20274d4-1497d8b) came with aiperf's c=16 TTFT p50 at ~146
                # ms against main's ~110 (medians of 9 runs, docs/benchmarks.md issue 15 §5h).
                await asyncio.sleep(0)
                await asyncio.sleep(0)

    def _deliver_held(self, held: dict[str, EngineOutput], ewma: float) -> int:
        core = self.core
        batch = core.take_kv_batch(now_ms())
        load = core.load_report(now_ms(), ewma)
        outputs = list(held.values())
        held.clear()
        return self._deliver(outputs, batch, load)


def create_mocker_engine(
    config: MockerConfig | None = None, *, worker_id: int = 0, **driver_opts: Any
) -> MockerDriver:
    """A real-time mocker `Engine` (`MockerDriver`): steps on the event loop, delivering each
    step's outputs once its modelled time has passed."""
    core = MockerCore(config, worker_id=worker_id)
    return MockerDriver(core, worker_id=worker_id, **driver_opts)
