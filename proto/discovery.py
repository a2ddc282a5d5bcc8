"""Records kept in etcd: who is alive and what they serve."""

from __future__ import annotations

import msgspec

from proto.base import Message
from proto.values import ROLE_DECODE, Role


class InstanceRecord(Message, kw_only=True):
    """Stored at proto.keys.instance(ns, component, instance_id) under the process lease."""

    instance_id: int
    component: str  # frontend | router | decode | prefill | planner | kv_offload
    namespace: str
    subjects: dict[str, str] = msgspec.field(default_factory=dict)  # endpoint -> NATS subject
    host: str = ""
    pid: int = 0
    started_ms: int = 0
    http_url: str | None = None  # /metrics and /health of the process
    labels: dict[str, str] = msgspec.field(default_factory=dict)


class ModelCard(Message, kw_only=True):
    """Stored at proto.keys.model(ns, model, instance_id) by each worker serving `model`."""

    model: str
    instance_id: int
    role: Role = ROLE_DECODE  # decode | prefill | both (proto.values.Role)
    engine: str = "torch"  # torch | mocker | trtllm
    block_size: int = 16
    kv_blocks: int = 0  # KV capacity in blocks
    max_batch_tokens: int = 8192
    max_running: int = 256
    context_length: int = 4096
    tokenizer: str = ""  # path of a Hugging Face tokenizer directory, or a built-in name
    eos_token_ids: list[int] = msgspec.field(default_factory=list)
    generate_subject: str = ""
    # Whether the engine computes log-probabilities (`SamplingParams.logprobs`); a worker
    # without them refuses such a request with `bad_request` (the mocker has no model).
    supports_logprobs: bool = False
