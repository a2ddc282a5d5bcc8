"""The torch engine: the shared scheduler and block pool driving a ModelRunner.

`TorchEngineCore` is the shared `SchedulingCore` (genset.engines.core) over a `RunnerExecutor`
(scheduler -> runner -> scheduler, one step at a time); `TorchEngine` wraps it in the shared
`AsyncEngineDriver`, so forward passes run in a dedicated engine thread and never block the
asyncio loop.

Usage::

    engine = TorchEngine("tiny", worker_id=3)          # or a local HF directory
    await engine.start()
    stream = await engine.submit(EngineRequest("r1", prompt_ids, SamplingParams(temperature=0)))
    async for out in stream: ...

KV blocks travel as `KvBlockData(hash, data)` where `data` is one block's payload in the
self-describing format of `genset.engines.torch.kvformat` (bytes).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from genset.engines.batch import StepPlan
from genset.engines.core import SchedulingCore
from genset.engines.driver import AsyncEngineDriver
from genset.engines.scheduler import Scheduler, SchedulerConfig, Sequence
from genset.engines.torch import kvformat
from genset.engines.torch.config import load_config
from genset.engines.torch.runner import ModelRunner, resolve_dtype, size_num_blocks
from genset.engines.torch.tiny import resolve_model
from genset.engines.types import (
    FINISH_ERROR,
    EngineOutput,
    EngineRequest,
    KvBlockData,
    KvBlockRefused,
    Logprobs,
)
from proto.transfer import KvLayout

log = logging.getLogger(__name__)


class RunnerExecutor:
    """The torch engine's executor (`genset.engines.core.Executor`): a `ModelRunner` samples
    the tokens (the core measures the step's wall time); a block's payload is its K/V in the
    `kvformat` encoding."""

    name = "torch"
    supports_logprobs = True

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.vocab_size = runner.vocab_size
        self.step_logprobs: list[Logprobs | None] | None = None
        self.failed: list[tuple[str, str]] = []  # of the last execute: (request id, why)
        # one block's payload: its K/V plus the kvformat header (~75 bytes); the core reads
        # evicted blocks for write-behind within a byte budget counted in these
        self.kv_block_bytes = runner.kv_bytes_per_block + 128

    def check_request(self, request: EngineRequest) -> None:
        # A bad token id would only fail inside the forward pass, taking every request of the
        # step down with it; refuse it here instead. Resumed tokens (made elsewhere: a remote
        # prefill's first token) are the resumed step's input just the same.
        vocab = self.vocab_size
        for t in request.token_ids:
            if not 0 <= t < vocab:
                raise ValueError(f"token id {t} outside the model's vocabulary (0..{vocab - 1})")
        for t in request.resume_token_ids:
            if not 0 <= t < vocab:
                raise ValueError(f"resumed token id {t} outside the model's vocabulary "
                                 f"(0..{vocab - 1})")

    def start_sequence(self, seq: Sequence, request: EngineRequest) -> None:
        pass  # sampling state lives in the runner, keyed by the plan's chunks

    def execute(self, plan: StepPlan, sched: Scheduler) -> tuple[list[int | None], None]:
        sampled = self.runner.execute(plan)
        self.step_logprobs = self.runner.step_logprobs
        # Requests whose logits gave no token (NaN / infinite): their chunk's entry is None,
        # so `update` moves them on as if they had sampled nothing; `TorchEngineCore.step`
        # then ends them with an error. Listed by request id, not Sequence: update may finish
        # nothing of theirs, and the id is what abort and the outputs speak.
        self.failed = [(sched.scheduled[k].request_id, why) for k, why in self.runner.step_errors]
        return sampled, None

    def idle(self) -> None:
        # Work is queued but nothing fits (e.g. blocks pinned by imports): don't spin.
        time.sleep(0.001)

    def kv_layout(self) -> KvLayout:
        """A block's payload: one `kvformat` block (its JSON header, then K and V of every
        layer), the same size for every block of this engine."""
        shape = [1, *self.runner.block_shape]
        dtype = kvformat._NAMES[self.runner.dtype]
        numel = 1
        for n in shape:
            numel *= n
        raw = numel * torch.empty((), dtype=self.runner.dtype).element_size()
        size = len(kvformat.encode_raw(dtype, shape, b"")) + raw
        return KvLayout(engine=self.name, format=kvformat.FORMAT, dtype=dtype,
                        block_shape=list(self.runner.block_shape), bytes_per_block=size)

    def read_kv(self, block_ids: list[int]) -> list[bytes]:
        # One gather + copy to CPU for all the blocks, then one payload each. Measured on the
        # tiny model (32 KiB blocks, CPU, quiet 2-core machine): ~90 us for one block, ~22-27
        # us per block in batches of 8-128 (the evicted blocks of one step are read at once).
        return kvformat.split(self.runner.read_blocks(block_ids))

    def decode_kv(self, blocks: list[KvBlockData]) -> list[torch.Tensor]:
        tensors = []
        want = (1, *self.runner.block_shape)
        for i, blk in enumerate(blocks):
            if not isinstance(blk.data, bytes | bytearray | memoryview):
                raise ValueError(
                    f"KV import block {i}: payload must be bytes, got {type(blk.data)}"
                )
            t = kvformat.decode(blk.data)
            if tuple(t.shape) != want:
                raise ValueError(
                    f"KV import block {i}: shape {tuple(t.shape)} does not match this engine's "
                    f"{want} (different model or block size?)"
                )
            if t.numel():
                why = _out_of_range(t, self.runner.kv_bound)
                if why is not None:
                    raise KvBlockRefused(f"KV import block {i}: {why}", i)
            tensors.append(t)
        return tensors

    def payload_nbytes(self, payload: torch.Tensor) -> int:
        return payload.numel() * payload.element_size()

    def write_kv(self, block_ids: list[int], payloads: list[torch.Tensor]) -> None:
        self.runner.write_blocks_tensor(block_ids, torch.cat(payloads))


def _out_of_range(t: torch.Tensor, bound: float) -> str | None:
    """Why `t` (one imported block) is refused, or None: a NaN or infinite value, or a
    finite one beyond `bound`, the largest K/V magnitude this model can compute
    (`runner.kv_value_bound`). A peer's KV (a transfer, an offload store) full of NaN
    imported fine and failed the next sampled step ("probability tensor contains either
    inf, nan or element < 0"), which took the engine and every request on it down; refused
    here, the import falls back as for any bad payload (the prompt is computed).

    Finite but huge values (a K of 1e30) overflow attention into NaN, or turn the output
    into garbage tokens with no NaN at all; the bound refuses them. It is the model's own
    (no value within it is one the model could not produce), so honest KV never fails it;
    a poisoned block within it still can end a request on NaN, and then the cache drops it
    (`TorchEngineCore.step`): the bound narrows what gets in, the drop bounds the damage.

    One `aminmax` pass (NaN propagates to both ends, an infinity is one of them), no
    temporary: `torch.isfinite(t).all()` allocates a bool tensor and has no fast bfloat16
    path on CPU. Measured (CPU, one thread, load ~1.0-1.3, medians of 20-200 calls):
    the tiny model's 32 KiB float32 blocks, 64 at once: this check ~0.15 ms against
    ~0.7-1.2 ms to decode them (isfinite().all(): ~1.0 ms); the whole `import_kv` of the 64
    blocks, with and without it alternated 15 times, twice: 2.39 / 2.19 ms against 2.22 /
    2.07 ms (+5-8 %; the per-call overhead, ~2.5 us a block, dominates at this size; the
    first version, compared as tensors, cost +40 %). A Llama-8B-shaped 2 MiB bfloat16 block,
    16 at once (34 MB): ~2.0 ms against ~17-30 ms to decode and ~43 ms to write them into
    the cache (isfinite().all(): ~43 ms), ~3 % of the import. The payloads are decoded on
    the CPU (from bytes), so the check never syncs a GPU. The bound is compared with the
    same two numbers: `decode_kv` of 64 tiny-model blocks with it against the finiteness
    check alone, alternated 400 times, 3 rounds: 1.14 / 1.15 / 1.26 ms against 1.13 / 1.14
    / 1.23 ms (+1-2 %; 2026-12-07 15:13 UTC, one thread, load ~6 on the 2-core box)."""
    lo, hi = torch.aminmax(t)
    low, high = lo.item(), hi.item()
    if not (math.isfinite(low) and math.isfinite(high)):
        return "holds NaN or infinite values"
    peak = max(-low, high)
    if peak > bound:
        return (f"holds a value of magnitude {peak:.3g}, beyond the {bound:.3g} this model "
                "can compute (huge values overflow attention)")
    return None


class TorchEngineCore(SchedulingCore):
    """The shared `SchedulingCore` over a `ModelRunner`; all calls from one thread."""

    executor: RunnerExecutor

    def __init__(
        self,
        runner: ModelRunner,
        *,
        max_batch_tokens: int = 2048,
        max_running: int = 256,
        enable_prefix_caching: bool = True,
        emit_token_ids: bool = False,
        worker_id: int = 0,
    ) -> None:
        self.runner = runner
        super().__init__(
            RunnerExecutor(runner),
            SchedulerConfig(
                block_size=runner.block_size,
                num_blocks=runner.num_blocks,
                max_batch_tokens=max_batch_tokens,
                max_running=max_running,
                context_length=runner.context_length,
                eos_token_ids=tuple(runner.eos_token_ids),
                enable_prefix_caching=enable_prefix_caching,
                emit_token_ids=emit_token_ids,
            ),
            worker_id=worker_id,
        )

    def step(self) -> tuple[list[EngineOutput], float]:
        """The shared step, then the requests whose logits gave no token this step (NaN or
        infinite: `ModelRunner.step_errors`) are ended, each with an error output of its
        own (finish_reason "error"; the worker turns it into that request's error frame),
        their blocks freed. The batch's other requests got their tokens; nothing raises,
        so the engine thread goes on. Before, `torch.multinomial` raised on the NaN row
        and the failed step ended every request of the engine and the engine itself.

        The blocks such a request used from its first imported one on leave the prefix
        cache first (`SchedulingCore.drop_foreign`): imported KV can be finite and still
        overflow attention (a K of 1e30), and cached under the prompt's hashes it ended
        every later request with that prefix until evicted; now the next one computes those
        blocks here. Whatever an import check misses, one bad peer costs the requests that
        ran over its blocks before the first of them failed, not everyone after."""
        outputs, step_ms = super().step()
        failed, self.executor.failed = self.executor.failed, []
        requests = self.scheduler.requests
        for rid, why in failed:
            seq = requests.get(rid)
            if seq is None:  # cannot happen (a None token finishes nothing); be safe
                continue
            dropped = self.drop_foreign(rid)
            if dropped:
                why += (f"; {dropped} cached KV blocks from an import (or computed over one) "
                        "were dropped: the next request with this prefix computes them")
            log.warning("request %s ended: %s", rid, why)
            self.scheduler.abort(rid)
            outputs.append(EngineOutput(rid, [], FINISH_ERROR, seq.prompt_len,
                                        seq.cached_tokens, seq.num_output, error=why))
        return outputs, step_ms


class TorchEngine(AsyncEngineDriver):
    """The asyncio-facing torch engine.

    `model`: "tiny" or a local Hugging Face directory. KV capacity: `num_blocks`, or sized
    from `kv_memory_bytes` (default: 256 MiB on CPU; on CUDA 85% of the memory left after the
    weights). Other knobs go to the scheduler (`max_batch_tokens`, `max_running`,
    `enable_prefix_caching`) and the runner (`device`, `dtype`, `seed`, `weights`).
    """

    def __init__(
        self,
        model: str | Path = "tiny",
        *,
        worker_id: int = 0,
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_memory_bytes: int | None = None,
        max_batch_tokens: int = 2048,
        max_running: int = 256,
        enable_prefix_caching: bool = True,
        emit_token_ids: bool = False,
        device: str = "cpu",
        dtype: str | None = None,
        seed: int = 0,
        weights: str = "auto",
        stream_maxsize: int = 64,
        max_requests: int = 4096,
    ) -> None:
        model_dir = resolve_model(model)
        if num_blocks is None:
            cfg = load_config(model_dir)
            dev = torch.device(device)
            num_blocks = size_num_blocks(
                cfg, block_size, resolve_dtype(dtype, cfg, dev), dev, kv_memory_bytes
            )
        runner = ModelRunner(
            model_dir,
            num_blocks=num_blocks,
            block_size=block_size,
            device=device,
            dtype=dtype,
            seed=seed,
            weights=weights,
        )
        core = TorchEngineCore(
            runner,
            max_batch_tokens=max_batch_tokens,
            max_running=max_running,
            enable_prefix_caching=enable_prefix_caching,
            emit_token_ids=emit_token_ids,
            worker_id=worker_id,
        )
        super().__init__(
            core,
            worker_id=worker_id,
            stream_maxsize=stream_maxsize,
            max_requests=max_requests,
        )

    @property
    def runner(self) -> ModelRunner:
        return self.core.runner

    @property
    def scheduler(self) -> Scheduler:
        return self.core.scheduler
