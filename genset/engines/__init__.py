"""Engines: the interface (`base`), the shared scheduler, and the torch, mocker and
TensorRT-LLM implementations.

`create_engine(kind, **opts)` imports only the chosen implementation, so the frontend and
router never pull in torch (or TensorRT-LLM) by importing this package.
"""

from __future__ import annotations

from typing import Any

ENGINE_KINDS = ("torch", "mocker", "trtllm")


def create_engine(kind: str, **opts: Any) -> Any:
    """A not-yet-started `genset.engines.base.Engine`.

    - ``"mocker"``: ``worker_id``, ``config`` (`MockerConfig`), driver options.
    - ``"torch"``: the arguments of `genset.engines.torch.engine.TorchEngine` (model first,
      as ``model=``).
    - ``"trtllm"``: the arguments of `genset.engines.trtllm.create_trtllm_engine`
      (``model=`` ...); raises `TrtllmNotInstalled` (an ImportError) without the package.
    """
    if kind == "mocker":
        from genset.engines.mocker import create_mocker_engine

        return create_mocker_engine(**opts)
    if kind == "torch":
        from genset.engines.torch.engine import TorchEngine

        model = opts.pop("model", "tiny")
        return TorchEngine(model, **opts)
    if kind == "trtllm":
        from genset.engines.trtllm import create_trtllm_engine

        return create_trtllm_engine(**opts)
    raise ValueError(f"unknown engine kind {kind!r}; expected one of {', '.join(ENGINE_KINDS)}")
