"""The worker service: one engine hosted by a `genset.worker.WorkerHost` inside the shared
service lifecycle (NATS, etcd lease, /metrics, /health, SIGTERM drain).

`WorkerOptions` is the worker's own flags (and `GENSET_*` variables), checked before anything
connects: a bad value, a missing model or an engine whose package is not installed is a
usage error naming the flag.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field

from genset.disagg.decision import POLICIES
from genset.disagg.worker import KV_PAYLOADS, TRANSPORTS, DisaggConfig, DisaggHook
from genset.engines.factory import (
    EngineConfigError,
    build_engine,
    check_engine_available,
    model_facts,
    served_model_name,
)
from genset.offload.admission import ADMIT_MODES
from genset.runtime.config import FieldError, opt
from genset.runtime.service import Service
from genset.worker import (
    ROLE_DECODE,
    ROLE_PREFILL,
    WORKER_ROLES,
    HostConfig,
    WorkerHost,
    registered_role,
)
from genset.worker.hooks import HookChain
from genset.worker.offload_hook import OFFLOAD_MODES, OffloadHook, OffloadHookConfig

ENGINES = ("torch", "mocker", "trtllm")


@dataclass
class WorkerOptions:
    engine: str = field(default="torch", metadata=opt(
        "torch: runs the model; mocker: timing model, no tensors; trtllm: TensorRT-LLM",
        choices=ENGINES))
    model: str = field(default="tiny", metadata=opt(
        "'tiny' (built in) or a local Hugging Face directory"))
    served_model_name: str | None = field(default=None, metadata=opt(
        "model name clients use (default: 'tiny' or the directory name)"))
    role: str = field(default="decode", metadata=opt(
        "decode: serves requests, prefilling on a prefill worker when that pays (--disagg); "
        "prefill: computes prompt KV for decode workers; both: prefills and decodes every "
        "request itself",
        choices=WORKER_ROLES))
    disagg: str = field(default="auto", metadata=opt(
        "decode role: auto (remote prefill when the cost model says it pays), always (whenever "
        "a prefill worker can take it), never (aggregated)", choices=POLICIES))
    disagg_itl_target_ms: float = field(default=50.0, metadata=opt(
        "decode role, --disagg auto: the mean inter-token latency a local prefill is priced "
        "against (stall within it costs nothing; 0: every ms of stall counts)", min=0))
    disagg_ttft_target_ms: float = field(default=0.0, metadata=opt(
        "decode role, --disagg auto: the time to first token within which a faster one is "
        "not bought with other streams' stall (0: off, every ms counts)", min=0))
    disagg_spare_budget_ms: float = field(default=1000.0, metadata=opt(
        "decode role, --disagg auto: a prompt whose prefill stalls nobody past the ITL target "
        "either way goes to a prefill worker when the pool has room to spare and its first "
        "token is predicted within this (0: such prompts prefill here)", min=0))
    offload_hold_mb: float = field(default=256.0, metadata=opt(
        "host memory, MiB, for onboarded blocks that do not fit in the KV cache beside the "
        "requests queued ahead: held until their request is admitted, then written into "
        "its blocks (0: such blocks are not fetched, the prompt is computed)", min=0))
    kv_bytes_per_token: int = field(default=0, metadata=opt(
        "mocker: bytes of KV one token would take (transfers carry dummy payloads of that "
        "size; 0: hashes only)", min=0))
    kv_payload: str = field(default="dummy", metadata=opt(
        "mocker: what a KV transfer carries: dummy (payloads of --kv-bytes-per-token a token) "
        "or none (hashes only, paced to the modelled link all the same)",
        choices=KV_PAYLOADS))
    kv_transfer_bandwidth: float = field(default=0.0, metadata=opt(
        "mocker: modelled KV transfer bandwidth in GB/s (0: no modelled delay)", min=0))
    kv_transport: str = field(default="auto", metadata=opt(
        "how KV travels: auto (direct TCP when the receiver offers it, else NATS), nats, tcp",
        choices=TRANSPORTS))
    kv_transfer_host: str = field(default="auto", metadata=opt(
        "where this worker listens for direct TCP KV transfers: auto (where --host says; "
        "on a wildcard address peers are told this machine's address), an address, or off "
        "(KV over NATS only)"))
    remote_prefill_timeout: float = field(default=10.0, metadata=opt(
        "decode role: longest wait for a prefill worker's first token before prefilling "
        "locally (s); with --kv-transfer-timeout it is a KV receive's whole deadline, and the "
        "worker's deadline for its hooks is that sum + 5 s (at least 30 s)", min=0.1))
    kv_transfer_timeout: float = field(default=30.0, metadata=opt(
        "longest a KV transfer may take after the first token (s); the receiver then "
        "recomputes, the sender unpins. The worker's deadline for its hooks (a backstop that "
        "fails the request) is kept above the receive's: this + --remote-prefill-timeout "
        "+ 5 s (at least 30 s)", min=0.1))
    kv_transfer_idle_timeout: float = field(default=5.0, metadata=opt(
        "longest silence of the peer within a KV transfer, and from a prefill worker's "
        "first token to its transfer's header (s); the receiver then recomputes", min=0.1))
    block_size: int = field(default=16, metadata=opt("KV block size in tokens", min=1))
    kv_blocks: int = field(default=0, metadata=opt(
        "KV capacity in blocks (0: the engine sizes it: torch from memory)", min=0))
    max_batch_tokens: int = field(default=0, metadata=opt(
        "token budget of one engine step (0: engine default)", min=0))
    max_running: int = field(default=256, metadata=opt("sequences batched at once", min=1))
    context_length: int = field(default=0, metadata=opt(
        "mocker: context length (0: from the model's config)", min=0))
    speedup: float = field(default=1.0, metadata=opt("mocker: run this many times faster"))
    mocker_load_s: float = field(default=0.0, metadata=opt(
        "mocker: seconds a start takes before the worker registers and serves, as loading a "
        "real model's weights does (what the planner's start-up awareness plans ahead of; "
        "0: none)", min=0))
    coalesce_ms: float = field(default=0.5, metadata=opt(
        "mocker: when modelled steps are shorter than this, send the tokens of the steps "
        "within this many ms in one frame per request (0: a frame per step)", min=0))
    device: str = field(default="auto", metadata=opt("torch: cpu, cuda, cuda:N or auto"))
    dtype: str = field(default="", metadata=opt(
        "torch: float32, bfloat16, float16 (default: auto)"))
    seed: int = field(default=0, metadata=opt("torch: seed of dummy weights"))
    max_streams: int = field(default=1024, metadata=opt(
        "generate streams accepted at once; more are refused as overloaded", min=1))
    # ---- KV offload store (docs/offload.md) ----
    offload: str = field(default="auto", metadata=opt(
        "write evicted KV blocks to the offload store and onboard prompts' blocks from it: "
        "on, auto (when a store is registered in etcd; the same as on, without the warning), "
        "off", choices=OFFLOAD_MODES))
    offload_deadline_ms: float = field(default=50.0, metadata=opt(
        "longest an onboarding lookup may delay a request; past it the prompt is computed",
        min=1))
    offload_admit: str = field(default="prompt", metadata=opt(
        "which evicted blocks go to the store: prompt (prompt blocks, and generated ones "
        "only once reused while cached; genset.offload.admission), all", choices=ADMIT_MODES))
    offload_queue_mb: float = field(default=64.0, metadata=opt(
        "evicted blocks waiting to be written to the store, MiB; beyond it they are dropped",
        min=0))
    offload_hold_mb: float = field(default=256.0, metadata=opt(
        "host memory, MiB, for onboarded blocks that do not fit in the KV cache beside the "
        "requests queued ahead: held until their request is admitted, then written into "
        "its blocks (0: such blocks are not fetched, the prompt is computed)", min=0))
    kv_bytes_per_token: int = field(default=0, metadata=opt(
        "mocker: modelled KV bytes per token (offload and transfer times)", min=0))
    offload_d2h_gbps: float = field(default=0.0, metadata=opt(
        "mocker: GB/s of copying evicted blocks out (0: free)", min=0))
    offload_h2d_gbps: float = field(default=0.0, metadata=opt(
        "mocker: GB/s of copying onboarded blocks in (0: free)", min=0))

    def __post_init__(self) -> None:
        if self.engine == "mocker" and not self.speedup > 0:
            raise FieldError("speedup", f"must be > 0 with --engine mocker, got {self.speedup}")
        if self.engine != "mocker" and self.mocker_load_s:
            raise FieldError("mocker_load_s", f"only --engine mocker models a load time "
                                              f"(--engine {self.engine} loads its own)")
        # A missing model or engine package is reported now, before connecting anywhere.
        try:
            model_facts(self.model)
        except EngineConfigError as exc:
            raise FieldError("model", str(exc)) from None
        try:
            check_engine_available(self.engine)
        except EngineConfigError as exc:
            raise FieldError("engine", str(exc)) from None


def kv_transfer_endpoint(flag: str, service_host: str) -> tuple[str | None, str | None]:
    """(where the KV transfer listener binds, the address peers are told) from
    --kv-transfer-host and the service's --host: loopback by default (`genset up`), every
    interface where the service listens on them (containers: GENSET_HOST=0.0.0.0), then with
    this machine's own address advertised, since a wildcard is no address to connect to."""
    host = service_host if flag == "auto" else flag
    if host in ("", "off", "none"):
        return None, None
    if host in ("0.0.0.0", "::"):
        try:
            return host, socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1", None
    return host, None


class WorkerService(Service):
    component = "decode"

    def __init__(self, config, options: WorkerOptions) -> None:
        # before Service.__init__: the component names the logger and the instance record
        self.component = registered_role(options.role)
        super().__init__(config)
        self.options = options
        self.host: WorkerHost | None = None

    async def start(self) -> None:
        o = self.options
        facts = model_facts(o.model)
        # Loading weights blocks for seconds: keep the loop (heartbeats, /health) responsive.
        engine = await asyncio.to_thread(
            build_engine, o.engine, o.model, worker_id=self.instance_id,
            block_size=o.block_size, kv_blocks=o.kv_blocks, max_batch_tokens=o.max_batch_tokens,
            max_running=o.max_running, context_length=o.context_length, speedup=o.speedup,
            device=o.device, dtype=o.dtype, seed=o.seed, coalesce_ms=o.coalesce_ms,
            kv_bytes_per_token=o.kv_bytes_per_token, offload_d2h_gbps=o.offload_d2h_gbps,
            offload_h2d_gbps=o.offload_h2d_gbps)
        if o.engine == "mocker" and o.mocker_load_s:
            # not registered yet: nothing routes here, and a SIGTERM now cancels the wait
            self.log.info("mocker_loading", seconds=o.mocker_load_s)
            await asyncio.sleep(o.mocker_load_s)
        host_config = HostConfig(
            namespace=self.namespace, model=o.served_model_name or served_model_name(o.model),
            role=o.role, tokenizer=facts.tokenizer, max_streams=o.max_streams,
            http_url=self.http_url)
        # hook_timeout_s left unset: the host derives it from the hooks' own deadlines
        # (--remote-prefill-timeout + --kv-transfer-timeout + 5 s, at least 30 s), so a
        # remote prefill's own deadlines end its waits before the host's does
        hooks = []
        if o.offload != "off":
            # first: a prefix onboarded from the offload store is cheaper than any prefill
            hooks.append(OffloadHook(discovery=self.discovery, metrics=self.metrics,
                                     config=OffloadHookConfig(
                                         deadline_s=o.offload_deadline_ms / 1000.0,
                                         max_queue_bytes=int(o.offload_queue_mb * (1 << 20)),
                                         max_held_bytes=int(o.offload_hold_mb * (1 << 20)),
                                         mode=o.offload, admit=o.offload_admit)))
        if (disagg := self.disagg_hook()) is not None:
            hooks.append(disagg)
        self.host = WorkerHost(engine, bus=self.bus, discovery=self.discovery,
                               instance_id=self.instance_id, config=host_config,
                               metrics=self.metrics,
                               hooks=hooks[0] if len(hooks) == 1 else HookChain(*hooks) if hooks
                               else None)
        await self.host.start()
        # (its start-up heap is frozen once start() returns: genset.runtime.service)
        # the Service registers the InstanceRecord; the host says what goes in it
        self.subjects.update(self.host.subjects)
        self.labels.update(self.host.labels)

    def disagg_hook(self) -> DisaggHook | None:
        """Decode and prefill roles take part in disaggregation; `both` runs aggregated."""
        o = self.options
        if o.role not in (ROLE_DECODE, ROLE_PREFILL):
            return None
        tcp_host, advertise = kv_transfer_endpoint(o.kv_transfer_host, self.config.host)
        config = DisaggConfig(
            policy=o.disagg, kv_bytes_per_token=o.kv_bytes_per_token, kv_payload=o.kv_payload,
            kv_transfer_bandwidth_gb_s=o.kv_transfer_bandwidth, transport=o.kv_transport,
            tcp_host=tcp_host, advertise_host=advertise,
            first_token_timeout_s=o.remote_prefill_timeout,
            transfer_timeout_s=o.kv_transfer_timeout, idle_timeout_s=o.kv_transfer_idle_timeout,
            pin_timeout_s=o.remote_prefill_timeout + o.kv_transfer_timeout,
            itl_target_ms=o.disagg_itl_target_ms, ttft_target_ms=o.disagg_ttft_target_ms,
            spare_budget_ms=o.disagg_spare_budget_ms,
            speedup=o.speedup if o.engine == "mocker" else 1.0)
        return DisaggHook(config, discovery=self.discovery, metrics=self.metrics)

    async def drain(self) -> None:
        if self.host is not None:
            # leave a little of the service's drain budget for aborting stragglers cleanly
            await self.host.drain(max(0.0, self.config.drain_timeout - 2.0))

    async def stop(self) -> None:
        if self.host is not None:
            await self.host.close()

    def health(self) -> dict:
        body = super().health()
        if self.host is not None:
            base_ready = body["ready"]
            body.update(self.host.health())
            body["ready"] = base_ready and self.host.ready
        return body
