"""The one place engines are built: from a worker's flags (every worker role), `genset up`
and the tests. Torch, mocker or TensorRT-LLM.

Only the chosen engine's dependencies are imported (inside `build_engine`): a mocker worker,
the frontend and the router never import torch or TensorRT-LLM through this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from genset.engines.interface import Engine
from genset.engines.torch.tiny import TINY_NAME, resolve_model


class EngineConfigError(ValueError):
    """A flag combination or model that cannot give an engine; the text says which."""


@dataclass
class ModelFacts:
    """What a worker needs to know about a model without loading it."""

    directory: Path
    vocab_size: int
    eos_token_ids: list[int]
    context_length: int
    tokenizer: str  # what goes into the model card for the frontend to load


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def model_facts(model: str) -> ModelFacts:
    try:
        directory = resolve_model(model)
    except FileNotFoundError as exc:
        raise EngineConfigError(str(exc)) from None
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise EngineConfigError(f"model {model!r}: cannot read config.json: {exc}") from None
    config = config.get("text_config", config)
    eos = _ids(config.get("eos_token_id"))
    generation = directory / "generation_config.json"
    if generation.is_file():
        try:
            eos = _ids(json.loads(generation.read_text()).get("eos_token_id")) or eos
        except ValueError as exc:
            raise EngineConfigError(f"model {model!r}: bad generation_config.json: {exc}") from None
    return ModelFacts(
        directory=directory,
        vocab_size=int(config.get("vocab_size") or 0),
        eos_token_ids=eos,
        context_length=int(config.get("max_position_embeddings") or 4096),
        tokenizer=TINY_NAME if model == TINY_NAME else str(directory.resolve()),
    )


def served_model_name(model: str) -> str:
    """`tiny`, or the model directory's name (what clients put in `model`)."""
    return model if model == TINY_NAME else Path(model).expanduser().resolve().name


def check_engine_available(kind: str) -> None:
    """Fail fast, before connecting anywhere, when the engine's package is missing."""
    import importlib.util

    if kind == "torch" and importlib.util.find_spec("torch") is None:
        raise EngineConfigError("--engine torch needs PyTorch, which is not installed "
                                "(pip install torch, or use --engine mocker)")
    if kind == "trtllm":
        try:
            from genset.engines.trtllm import import_tensorrt_llm

            import_tensorrt_llm()
        except ImportError as exc:
            raise EngineConfigError(f"--engine trtllm: {exc}") from None


def build_engine(kind: str, model: str, *, worker_id: int, block_size: int = 16,
                 kv_blocks: int = 0, max_batch_tokens: int = 0, max_running: int = 256,
                 context_length: int = 0, speedup: float = 1.0, device: str = "auto",
                 dtype: str = "", seed: int = 0, coalesce_ms: float = 0.5,
                 kv_bytes_per_token: int = 0, offload_d2h_gbps: float = 0.0,
                 offload_h2d_gbps: float = 0.0) -> Engine:
    """A not-yet-started engine. 0 / "" mean "the engine's own default". Blocking (the torch
    engine loads weights here): call from a thread in a service."""
    facts = model_facts(model)
    if kind == "mocker":
        from genset.engines.mocker import MockerConfig, PolynomialTiming, create_mocker_engine

        if speedup <= 0:
            raise EngineConfigError(f"--speedup must be > 0, got {speedup}")
        defaults = MockerConfig()
        config = MockerConfig(
            block_size=block_size,
            num_blocks=kv_blocks or defaults.num_blocks,
            max_batch_tokens=max_batch_tokens or defaults.max_batch_tokens,
            max_running=max_running,
            context_length=context_length or facts.context_length,
            vocab_size=facts.vocab_size or defaults.vocab_size,
            eos_token_ids=tuple(facts.eos_token_ids),
            # Charged as Dynamo's mocker charges a pass, live as in its replay (a step that
            # only finishes prompts costs the prefill alone; decode u from the decoding
            # sequences' context): a 1,000-token prompt alone gets its first token after
            # 32.1 ms, as Dynamo's live mocker gives it (../shared/peers/dynamo/README.md),
            # not 32.1 + 5.7 ms
            timing=PolynomialTiming(speedup_ratio=speedup, dynamo_exact=True),
            kv_bytes_per_token=kv_bytes_per_token,
            offload_d2h_gbps=offload_d2h_gbps,
            offload_h2d_gbps=offload_h2d_gbps,
        )
        if coalesce_ms < 0:
            raise EngineConfigError(f"--coalesce-ms must be >= 0, got {coalesce_ms}")
        return create_mocker_engine(config, worker_id=worker_id, coalesce_ms=coalesce_ms)
    if kind == "torch":
        try:
            import torch

            from genset.engines.torch.engine import TorchEngine
        except ImportError as exc:
            raise EngineConfigError(f"--engine torch needs PyTorch: {exc} "
                                    "(pip install torch, or use --engine mocker)") from None
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        opts: dict = {"block_size": block_size, "max_running": max_running, "device": device,
                      "seed": seed, "worker_id": worker_id}
        if kv_blocks:
            opts["num_blocks"] = kv_blocks
        if max_batch_tokens:
            opts["max_batch_tokens"] = max_batch_tokens
        if dtype:
            opts["dtype"] = dtype
        return TorchEngine(facts.directory, **opts)
    if kind == "trtllm":
        try:
            from genset.engines import trtllm
        except ImportError as exc:
            raise EngineConfigError(f"--engine trtllm is not available in this build: {exc}") from None
        factory = getattr(trtllm, "create_trtllm_engine", None)
        if factory is None:
            raise EngineConfigError("--engine trtllm: genset.engines.trtllm has no engine factory")
        try:
            return factory(str(facts.directory), worker_id=worker_id, block_size=block_size,
                           max_batch_tokens=max_batch_tokens or None, max_running=max_running)
        except ImportError as exc:
            raise EngineConfigError(f"--engine trtllm needs TensorRT-LLM (tensorrt_llm), which "
                                    f"is not installed: {exc}") from None
    raise EngineConfigError(f"unknown engine {kind!r} (torch, mocker or trtllm)")
