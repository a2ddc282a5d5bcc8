"""The torch engine: the shared scheduler and block pool driving a ModelRunner.

`TorchEngineCore` is the synchronous `EngineCore` (scheduler -> runner -> scheduler, one step
at a time); `TorchEngine` wraps it in the shared `AsyncEngineDriver` with `threaded=True`, so
forward passes run in a dedicated engine thread and never block the asyncio loop.

Usage::

    engine = TorchEngine("tiny", worker_id=3)          # or a local HF directory
    await engine.start()
    stream = await engine.submit(EngineRequest("r1", prompt_ids, SamplingParams(temperature=0)))
    async for out in stream: ...

KV blocks travel as `KvBlockData(hash, data)` where `data` is one block's payload in the
self-describing format of `genset.engines.torch.kvformat` (bytes).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from genset.engines.base import (
    AsyncEngineDriver,
    EngineCard,
    EngineOutput,
    EngineRequest,
    KvBlockData,
    KvImport,
)
from genset.engines.scheduler import Scheduler, SchedulerConfig
from genset.engines.torch import kvformat
from genset.engines.torch.config import load_config
from genset.engines.torch.runner import ModelRunner, resolve_dtype, size_num_blocks
from genset.engines.torch.tiny import resolve_model
from proto.kv import KvEventBatch, LoadReport


class TorchEngineCore:
    """Scheduler + ModelRunner; all calls from one thread (see EngineCore)."""

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
        self.worker_id = worker_id
        self.scheduler = Scheduler(
            SchedulerConfig(
                block_size=runner.block_size,
                num_blocks=runner.num_blocks,
                max_batch_tokens=max_batch_tokens,
                max_running=max_running,
                context_length=runner.context_length,
                eos_token_ids=tuple(runner.eos_token_ids),
                enable_prefix_caching=enable_prefix_caching,
                emit_token_ids=emit_token_ids,
            )
        )
        self.card = EngineCard(
            engine="torch",
            block_size=runner.block_size,
            kv_blocks=runner.num_blocks,
            max_batch_tokens=max_batch_tokens,
            max_running=max_running,
            context_length=runner.context_length,
            eos_token_ids=list(runner.eos_token_ids),
            vocab_size=runner.vocab_size,
        )

    # ---- requests ---------------------------------------------------------------------------

    def add_request(self, request: EngineRequest) -> None:
        # A bad token id would only fail inside the forward pass, taking every request of the
        # step down with it; refuse it here instead.
        vocab = self.runner.vocab_size
        for t in request.token_ids:
            if not 0 <= t < vocab:
                raise ValueError(f"token id {t} outside the model's vocabulary (0..{vocab - 1})")
        self.scheduler.add_request(request)
        if request.kv_import is not None and request.kv_import.blocks:
            try:
                self.import_kv(request.kv_import, pin_for=request.request_id)
            except BaseException:
                self.scheduler.abort(request.request_id)
                raise

    def abort_request(self, request_id: str) -> None:
        self.scheduler.abort(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> tuple[list[EngineOutput], float]:
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        if not plan.chunks:
            # Work is queued but nothing fits (e.g. blocks pinned by imports): don't spin.
            time.sleep(0.001)
            return [], 0.0
        sampled = self.runner.execute(plan)
        outputs = self.scheduler.update(plan, sampled)
        return outputs, (time.perf_counter() - t0) * 1000.0

    # ---- KV events and load ----------------------------------------------------------------

    def take_kv_batch(self, ts_ms: int) -> KvEventBatch | None:
        return self.scheduler.pool.take_batch(self.worker_id, ts_ms)

    def kv_snapshot(self, ts_ms: int) -> KvEventBatch:
        return self.scheduler.pool.snapshot_batch(self.worker_id, ts_ms)

    def load_report(self, ts_ms: int, step_ms_ewma: float) -> LoadReport:
        return self.scheduler.load_report(self.worker_id, ts_ms, step_ms_ewma)

    # ---- KV export / import -----------------------------------------------------------------

    def export_kv(self, hashes: list[int]) -> list[KvBlockData]:
        held = self.scheduler.export_kv(hashes)
        if not held:
            return []
        payloads = kvformat.split(self.runner.read_blocks([b for _, b in held]))
        return [KvBlockData(h, p) for (h, _), p in zip(held, payloads, strict=True)]

    def import_kv(self, kv: KvImport, pin_for: str | None = None) -> int:
        # Decode and check every payload before the pool registers any hash: a block cached
        # under a hash but holding garbage would poison every later request with that prefix.
        tensors = []
        want = (1, *self.runner.block_shape)
        for i, blk in enumerate(kv.blocks):
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
            tensors.append(t)
        hashes = [b.hash for b in kv.blocks]
        written = self.scheduler.import_kv(hashes, kv.parent_hash, pin_for=pin_for)
        if written:
            index = {h: i for i, h in enumerate(hashes)}
            ids = [b for _, b in written]
            data = torch.cat([tensors[index[h]] for h, _ in written])
            self.runner.write_blocks_tensor(ids, data)
        cached = 0
        for h in hashes:
            if self.scheduler.pool.block_of(h) is None:
                break
            cached += 1
        return cached


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
            threaded=True,
            stream_maxsize=stream_maxsize,
            max_requests=max_requests,
        )

    @property
    def runner(self) -> ModelRunner:
        return self.core.runner

    @property
    def scheduler(self) -> Scheduler:
        return self.core.scheduler
