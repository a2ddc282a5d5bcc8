"""Disaggregated serving on a live worker: `DisaggHook`, a `genset.worker.hooks.WorkerHooks`.

One hook, two roles (`--role`):

**decode** (where the router sends requests): `before_run` decides, per request, with
`genset.disagg.decide` (its own engine's cached prefix and load against each prefill
worker's cached prefix and queue, from `PrefillPool`). Local: return None, the request runs
aggregated. Remote:

1. open a receive on this worker's `KvTransferHub` for the prompt's full blocks past those
   cached here; each block run is imported as it arrives (pipelined), pinned under the
   transfer's key;
2. ask the chosen prefill worker (`RemotePrefillRequest`, a NATS request) and wait for its
   answer, which comes as soon as its first token exists (`RemotePrefillReply`);
3. hand the host a `RemotePrefill`: the host streams that first token to the client at once
   (time to first token does not include the transfer), then awaits `kv()` (the transfer's
   end) and submits the request with the first token as `resume_token_ids` and
   `KvImport(pinned_as=key)`: the engine takes the imported blocks over and computes only
   the prompt's last partial block and the first token, then decodes on exactly as if it had
   prefilled (greedy and seeded output identical: tests/test_disagg_torch.py).

Every failure falls back, never errors: no answer, an error answer, the prefill worker
leaving the pool, a deadline -> the request runs aggregated (before any token went out);
a transfer that fails after the first token -> the prompt is recomputed here (the engine
continues after the first token all the same). Each fallback is counted with its stage and
reason (`genset_disagg_fallbacks_total`).

**prefill**: serves `RemotePrefillRequest`s on its own subject. Runs the prompt to its first
token (max_tokens 1, the request's sampling), pins the prompt's blocks (`Engine.pin_kv`)
under a deadline in a `PinTable` and answers with the token. The send (`KvTransferHub.send`)
runs beside the prefill from its start: each block goes once a step has computed it (the
engine's KV events, `_Progress`), so when the first token exists only the last chunk's
blocks are left to move (pipelined; measured: docs/benchmarks.md, issue 11, session 8). The
send's task owns the pins from the start: they go when the receiver acks or nacks, when the
send fails or is cancelled (the prefill failed), or at the deadline, whichever comes first
(a sweep unpins what a deadline freed). A client that cancels, a decode
worker that dies, a prefill worker that dies: whatever side survives frees what it holds
(tests/test_disagg_stack.py). The send goes over TCP only to the endpoint the named decode
worker publishes in its InstanceRecord (`record_labels`, `kv_tcp`; genset.disagg.endpoints);
a target naming any other goes over NATS (`_checked_tcp`).

The mocker: its blocks carry no payload. With `kv_bytes_per_token` > 0 a transfer carries
dummy payloads of the size a real model's KV would have (block_size x kv_bytes_per_token
bytes a block), and with `kv_transfer_bandwidth_gb_s` > 0 the sender paces them to that
bandwidth (genset.disagg.sim.transfer_ms), so transfer time is what the model says.

Prefill timing profile: the cost model prices prefills with the mocker polynomial divided by
`speedup` (the router's default profile). For the torch engine on CPU this is not a fitted
profile; `--disagg always|never` overrides the decision where it matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import structlog

import proto
from genset.disagg.bandwidth import BandwidthEstimator
from genset.disagg.decision import (
    DISABLED,
    NO_PREFILL_WORKERS,
    POLICIES,
    POLICY_AUTO,
    POLICY_NEVER,
    SINGLE_TOKEN,
    CostModel,
    Decision,
    DecodeState,
    SpareGate,
    decide,
)
from genset.disagg.endpoints import DecodeEndpoints, endpoint_labels
from genset.disagg.metrics import DisaggMetrics
from genset.disagg.pool import PrefillPool
from genset.disagg.sim import GB
from genset.engines.core import sampling_error
from genset.engines.mocker import PolynomialTiming
from genset.engines.types import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    EngineOverloaded,
    EngineRequest,
    KvBlockData,
    KvImport,
    Logprobs,
)
from genset.kv.hashing import block_hashes
from genset.runtime.bus_errors import (
    BusError,
    NoResponders,
    Overloaded,
    RemoteError,
    RequestTimeout,
)
from genset.transfer import errors as xerr
from genset.transfer.errors import TransferError
from genset.transfer.hub import KvReceiver, KvTransferHub
from genset.transfer.pins import PinTable, PinTableFull
from genset.worker.hooks import RemotePrefill, WorkerContext, WorkerHooks
from genset.worker.roles import ROLE_DECODE, ROLE_PREFILL
from proto import subjects
from proto.generate import ErrorInfo
from proto.transfer import KvLayout, KvTransferTarget, RemotePrefillReply, RemotePrefillRequest

log = structlog.get_logger("genset.disagg")

# drain(): a send still in progress at the drain's deadline is cancelled (its receiver told:
# kv_cancelled, it recomputes at once; its pins freed) and given this long to end, within
# genset.worker.host.DRAIN_ABORT_S
DRAIN_ABORT_SENDS_S = 1.0
# close(): how long the sends still in progress get before the hub's close fails them (their
# receivers told), and then to end: none is left after a drain (`drain` finishes or aborts
# them); within the host's budget for the hooks' close (genset.worker.host.CLOSE_HOOKS_S),
# which the service's for its stop step bounds. Was 10 s, past both: a prefill worker
# SIGTERMed mid-send had its whole close cut off (the hub's and the engine's close skipped).
CLOSE_SENDS_S = 0.5
# a failed remote prefill's send, cancelled: how long its end (the receiver told, the pins
# freed) is waited for
CANCEL_SEND_S = 10.0
# The longest wait for the engine to unpin a transfer's blocks. Unpins run in cleanup paths,
# also while the process ends: once the service's loop cancels every task, the engine's
# stepping task is gone and its commands are never answered; unbounded, a send cancelled
# then waited there forever, and a prefill worker SIGTERMed mid-transfer never exited.
UNPIN_TIMEOUT_S = 5.0
STAGE_FIRST_TOKEN = "first_token"
STAGE_TRANSFER = "transfer"
TRANSPORTS = ("auto", "nats", "tcp")
# genset_disagg_resume_seconds{prompt="long"}: transfers of at least this many blocks (1,024
# tokens at block size 16), so a bench sees long prompts' resume gaps apart from short ones'
LONG_TRANSFER_BLOCKS = 64
# The prompt's last partial block travels in the first-token reply (`RemotePrefillReply.tail`)
# when its payload is at most this (a NATS reply: under the server's 1 MiB default max payload
# with room for the rest); a larger one (a real model's block, e.g. 2 MiB) is computed again
# on the decode worker, as before the tail was shipped.
TAIL_MAX_BYTES = 512 * 1024
KV_PAYLOADS = ("dummy", "none")


@dataclass
class DisaggConfig:
    """A worker's disaggregation settings (the worker's flags; see services/decode)."""

    policy: str = POLICY_AUTO  # auto | always | never (decode role)
    kv_bytes_per_token: int = 0  # mocker: payload bytes a token's KV would take (0: none)
    # mocker: what a transfer carries. "dummy": payloads of kv_bytes_per_token x block_size
    # bytes a block (exercises the transport's byte path); "none": hashes only, paced all
    # the same to the modelled link (what Dynamo's mocker does: it moves no bytes). The
    # bytes are CPU this machine spends and a GPU deployment does not (NIC/NVLink DMA):
    # 7 MB a 6,700-token prompt at 1,024 B/token cost the live mixed load's workers ~3 s of
    # CPU a run on 2 cores, ~9 ms a long prompt on both ends together (docs/benchmarks.md).
    kv_payload: str = "dummy"
    kv_transfer_bandwidth_gb_s: float = 0.0  # mocker: modelled link (0: no delay)
    transport: str = "auto"  # auto | nats | tcp
    tcp_host: str | None = "127.0.0.1"  # where the TCP listener binds (None: NATS only)
    advertise_host: str | None = None  # the address peers connect to (default: tcp_host)
    first_token_timeout_s: float = 10.0  # longest wait for a prefill worker's answer
    transfer_timeout_s: float = 30.0  # longest a transfer may take after that answer
    # longest silence of a peer within a transfer, and from its first token to its header
    idle_timeout_s: float = 5.0
    pin_timeout_s: float = 60.0  # exported blocks held at most this long without an answer
    max_prefills: int = 64  # remote prefills a prefill worker serves at once
    speedup: float = 1.0  # divides the prefill timing profile (the mocker's --speedup)
    slowdown_weight: float = 1.0  # genset.disagg.CostModel
    # The mean inter-token latency this decode worker holds its sequences to when it prices a
    # local prefill (`CostModel.itl_target_ms`; 0: every ms of stall of every sequence
    # counts). A prefill that keeps a step within it stalls nobody past the target. Without
    # it, a 118-token prompt on a worker decoding 40 streams priced 40 x 18 ms of stall,
    # about what its remote path cost the same streams (the decode worker still computes the
    # prompt's last partial block: the step's 16.5 ms constant), so half of the live mixed
    # load's short prompts went remote on a coin flip: a transfer, an import and a resume
    # gap each, for no stall saved (docs/benchmarks.md, issue 11, live mixed load).
    itl_target_ms: float = 50.0
    # The time to first token a decode worker's requests are held to (0: off, every ms of a
    # path's time counts): the ms pricing then counts a path's time only past 3/4 of it
    # (`CostModel.ttft_budget_ms`, the pool's queue grows with every prompt sent there) and
    # prices going past it as one target more (`over_budget_ms`). Off by default: with it
    # (2,000 ms) 1P+3D `auto` fell from 0.950 to 0.795 goodput (its one prefill worker's
    # queue ran at the target: long TTFT p50 2.0 s), for a 2P+2D ITL gain not shown apart
    # from the load's noise (docs/benchmarks.md, issue 11, session 6).
    ttft_target_ms: float = 0.0
    # CostModel.remote_on_tie: off. On, 2P+2D `auto` made `always`'s choices (decode-stream
    # ITL p99 -37 to -53 % against aggregated), but a 1P+3D pool's queue then took the short
    # prompts too and settled at the TTFT target: goodput 0.25-0.31 (0.95 off)
    remote_on_tie: bool = False
    # CostModel.spare_budget_ms with a `SpareGate`: a tie (a short prompt whose prefill
    # keeps the decode worker's steps within the ITL target either way) goes to the prefill
    # pool when the pool has room to spare and its first token is predicted within this;
    # 0: off (ties stay local). Half the 2 s TTFT SLO of the mixed load: the pool's queue
    # as the decode worker sees it lags what the other decode workers sent (measured
    # overshoot ~0.5 s at a 1.5 s budget, docs/benchmarks.md, issue 11, session 6). On by
    # default on a weak margin: 2P+2D decode-stream ITL p99 against aggregated, per round,
    # median -38 % with it and -29 % without over 12 alternated rounds, better than without
    # in 8 of 12 (level in the 6 rounds of the final rule alone); goodput unchanged
    # (session 7). In the mocker a tie's resume still computes its last partial block on
    # the decode worker (a prefill step's 16.5 ms constant), so the step cost it saves there
    # is small; what the gain comes from is not measured apart.
    spare_budget_ms: float = 1000.0
    max_prefill_queue_ms: float = 2000.0
    remote_margin_ms: float = 0.0
    bandwidth_prior_gb_s: float = 1.0  # transfer bandwidth assumed until one is measured

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"--disagg must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.kv_payload not in KV_PAYLOADS:
            raise ValueError(f"--kv-payload must be one of {', '.join(KV_PAYLOADS)}, "
                             f"got {self.kv_payload!r}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"--kv-transport must be one of {', '.join(TRANSPORTS)}, "
                             f"got {self.transport!r}")
        if self.kv_bytes_per_token < 0:
            raise ValueError(f"--kv-bytes-per-token must be >= 0, got {self.kv_bytes_per_token}")
        if not self.kv_transfer_bandwidth_gb_s >= 0:
            raise ValueError("--kv-transfer-bandwidth must be >= 0 GB/s (0: no modelled delay), "
                             f"got {self.kv_transfer_bandwidth_gb_s}")
        if not self.itl_target_ms >= 0:
            raise ValueError(f"--disagg-itl-target-ms must be >= 0, got {self.itl_target_ms}")
        if not self.ttft_target_ms >= 0:
            raise ValueError(f"--disagg-ttft-target-ms must be >= 0, got {self.ttft_target_ms}")
        if not self.spare_budget_ms >= 0:
            raise ValueError(f"--disagg-spare-budget-ms must be >= 0, got "
                             f"{self.spare_budget_ms}")
        for name in ("first_token_timeout_s", "transfer_timeout_s", "idle_timeout_s",
                     "pin_timeout_s", "speedup", "bandwidth_prior_gb_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_prefills < 1:
            raise ValueError(f"max_prefills must be >= 1, got {self.max_prefills}")


class _Gone(Exception):
    """The prefill worker left the pool while we waited on it."""


async def _unless_gone(coro, gone: asyncio.Event):
    """Await `coro` unless `gone` is set first (then _Gone; `coro` is cancelled)."""
    task = asyncio.ensure_future(coro)
    waiter = asyncio.ensure_future(gone.wait())
    try:
        await asyncio.wait((task, waiter), return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait((task,), timeout=5.0)
    if task.cancelled():
        raise _Gone()
    return task.result()


def first_token_finish(request: proto.GenerateRequest, token: int, prompt_len: int,
                       eos_ids: frozenset[int], max_seq_len: int) -> str | None:
    """Whether the first output token ends the request, by the engine's own rules
    (genset.engines.scheduler: stop ids and EOS once min_tokens are out, then the length)."""
    stop = request.stop
    if 1 >= stop.min_tokens and (
            token in stop.stop_token_ids or (token in eos_ids and not stop.ignore_eos)):
        return "stop"
    if 1 >= stop.max_tokens or prompt_len + 1 >= max_seq_len:
        return "length"
    return None


class DisaggHook(WorkerHooks):
    """See the module docstring. `discovery`: the worker's (a decode worker watches the
    prefill pool's model cards); `metrics`: a `genset.runtime.metrics.Metrics`."""

    def __init__(self, config: DisaggConfig, *, discovery, metrics) -> None:
        self.config = config
        self.discovery = discovery
        self.m = DisaggMetrics(metrics)
        self.ctx: WorkerContext | None = None
        self.hub: KvTransferHub | None = None
        self.pool: PrefillPool | None = None
        # prefill side: the decode workers' published KV TCP endpoints (genset.disagg.endpoints)
        self.endpoints: DecodeEndpoints | None = None
        self.layout: KvLayout | None = None
        self.bandwidth = BandwidthEstimator(
            (config.kv_transfer_bandwidth_gb_s or config.bandwidth_prior_gb_s) * GB)
        self.timing = PolynomialTiming(speedup_ratio=config.speedup)
        self.pins = PinTable(max_transfers=config.max_prefills)
        self._ids = itertools.count(1)
        self._sub = None
        self._tasks: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None
        self._republisher: asyncio.Task | None = None
        self._pins_changed = asyncio.Event()
        self._closing = False
        # prefill side: the hash of the next block a send waits for the prefill to compute
        # -> those sends (`_Progress`; at most max_prefills entries in all)
        self._watching: dict[int, list[_Progress]] = {}
        # remote prefills of this decode worker between the decision and their hand-over to
        # the engine (`_RemoteRun.release`, which the host calls after its submit): requests
        # that decode here within a transfer's time, so a local prefill stalls them too
        self.resuming = 0
        self.spare = SpareGate(config.max_prefill_queue_ms, config.spare_budget_ms)

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        role = ctx.role
        if role not in (ROLE_DECODE, ROLE_PREFILL):
            return  # `both`: aggregated, nothing to do
        card = ctx.engine.card
        if card.kv_layout is None:
            log.warning("this engine cannot export or import KV: disaggregation is off",
                        engine=card.engine)
            return
        self.layout = self._transfer_layout(card.kv_layout, card.block_size)
        self.hub = KvTransferHub(ctx.bus, ctx.instance_id, tcp_host=self.config.tcp_host,
                                 advertise_host=self.config.advertise_host)
        await self.hub.start()
        if role == ROLE_DECODE:
            self.pool = PrefillPool(bus=ctx.bus, discovery=self.discovery,
                                    namespace=ctx.namespace, model=ctx.model)
            await self.pool.start()
        else:
            self.endpoints = DecodeEndpoints(discovery=self.discovery, namespace=ctx.namespace)
            await self.endpoints.start()
            self._sweeper = asyncio.create_task(self._sweep_pins(), name="disagg-pins")
            self._republisher = asyncio.create_task(self._republish_hashes(),
                                                    name="disagg-kv-hashes")
            self._sub = await ctx.bus.serve(subjects.remote_prefill(ctx.namespace,
                                                                    ctx.instance_id),
                                            self._serve_prefill,
                                            max_concurrent=self.config.max_prefills)

    def longest_wait_s(self) -> float:
        """A decode worker's receive: the first token, then the KV, under one deadline
        (`_remote`), counted from before the first token is asked for; `kv()` may wait all
        of it less the first token's time. The host's hook deadline stays above it
        (genset.worker.host.resolve_hook_timeout)."""
        return self.config.first_token_timeout_s + self.config.transfer_timeout_s

    def record_labels(self) -> dict[str, str]:
        """Labels for this worker's InstanceRecord (the host adds them): a decode worker's KV
        TCP endpoint, which prefill workers hold its targets to (genset.disagg.endpoints)."""
        if self.ctx is None or self.ctx.role != ROLE_DECODE or self.hub is None:
            return {}
        return endpoint_labels(self.hub.listener)

    async def drain(self, deadline_s: float) -> None:
        """The worker drains (its model card is out of etcd, so decode workers stop choosing
        it): new remote prefills are refused (retryable: the decode worker prefills
        locally); the ones in progress run on, and their sends (`_tasks`: each starts with
        its prefill and follows it) finish within `deadline_s`. Past it, what is left is
        cancelled: each send tells its receiver (kv_cancelled: it recomputes the prompt at
        once rather than at its idle timeout) and frees its pins."""
        self._closing = True
        if not self._tasks:
            return
        log.info("draining KV sends", sends=len(self._tasks), deadline_s=deadline_s)
        _, pending = await asyncio.wait(set(self._tasks), timeout=deadline_s)
        if pending:
            log.warning("drain deadline passed; aborting KV sends", left=len(pending))
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=DRAIN_ABORT_SENDS_S)

    async def close(self) -> None:
        self._closing = True
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        if self.pool is not None:
            await self.pool.close()
        if self.endpoints is not None:
            await self.endpoints.close()
        if self._tasks:
            # after a drain, none; otherwise (a close without one) the sends in progress get
            # a moment, then fail below and their receivers recompute
            await asyncio.wait(set(self._tasks), timeout=CLOSE_SENDS_S)
        if self.hub is not None:
            await self.hub.close()  # fails every transfer in progress; the peers are told
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=CLOSE_SENDS_S)
        for task in (self._sweeper, self._republisher):
            if task is not None:
                task.cancel()
        for entry in list(self.pins.expire(float("inf"))):
            await self._unpin(entry.transfer_id)

    def _transfer_layout(self, layout: KvLayout, block_size: int) -> KvLayout:
        if layout.engine == "mocker" and self.config.kv_bytes_per_token > 0:
            if self.config.kv_payload == "none":
                # hashes only, the modelled time kept (`_send`); a format of its own, so a
                # peer that sends dummy payloads is refused as a layout mismatch
                return KvLayout(engine="mocker", format="modelled", bytes_per_block=0)
            # dummy payloads of a real model's size (module docstring)
            return KvLayout(engine="mocker", format="dummy",
                            bytes_per_block=self.config.kv_bytes_per_token * block_size)
        return layout

    @property
    def mocker(self) -> bool:
        return self.layout is not None and self.layout.engine == "mocker"

    # ---- decode side -----------------------------------------------------------------------

    def cost_model(self) -> CostModel:
        assert self.ctx is not None and self.layout is not None
        bs = self.ctx.block_size
        per_token = (self.layout.bytes_per_block / bs if self.layout.bytes_per_block
                     else float(self.config.kv_bytes_per_token))
        timing = self.timing
        return CostModel(block_size=bs, kv_bytes_per_token=per_token,
                         prefill_ms=lambda tokens, running: timing.prefill_ms(tokens),
                         bandwidth_bytes_per_s=self.bandwidth.bytes_per_s,
                         slowdown_weight=self.config.slowdown_weight,
                         max_prefill_queue_ms=self.config.max_prefill_queue_ms,
                         remote_margin_ms=self.config.remote_margin_ms,
                         itl_target_ms=self.config.itl_target_ms,
                         # a quarter of the target kept back: the pool's queue is what is
                         # queued now, and every prompt sent there adds to it (1P+3D with the
                         # whole target as budget: queues settled at it, goodput 0.26)
                         ttft_budget_ms=0.75 * self.config.ttft_target_ms,
                         over_budget_ms=self.config.ttft_target_ms,
                         remote_on_tie=self.config.remote_on_tie,
                         spare_budget_ms=self.config.spare_budget_ms)

    async def before_run(self, request: proto.GenerateRequest,
                         token_ids: list[int]) -> RemotePrefill | None:
        pool = self.pool
        if pool is None or self.ctx is None:
            return None
        engine = self.ctx.engine
        if request.stop.max_tokens <= 1:
            self.m.decision(Decision(mode="local", reason=SINGLE_TOKEN))
            return None
        if not len(pool) or self.config.policy == POLICY_NEVER:
            # known without hashing the prompt or asking the engine: a decode worker without
            # prefill workers costs what an aggregated one does, plus this
            self.m.decision(Decision(mode="local", reason=NO_PREFILL_WORKERS if len(pool)
                                     == 0 and self.config.policy != POLICY_NEVER
                                     else DISABLED))
            return None
        hashes = block_hashes(token_ids, self.ctx.block_size)
        # the engine's hint (no wait for the step under way, which `cached_blocks` makes,
        # ~half a step added to every request's first token here): a block evicted by the
        # time it counts only shortens what is reused (`first_block`), never a wrong result
        cached = engine.cached_prefix(hashes) if hashes else 0
        load = engine.load()
        now_ms = time.monotonic() * 1e3
        decision = decide(
            len(token_ids),
            DecodeState(worker_id=self.ctx.instance_id, cached_blocks=cached,
                        running=self.stalled(load),
                        queued_prefill_tokens=load.waiting_prefill_tokens,
                        step_ms=load.step_ms_ewma),
            pool.states(hashes), self.cost_model(), policy=self.config.policy,
            max_tokens=request.stop.max_tokens, pool_spare=self.spare.spare(now_ms))
        self.spare.note(decision, now_ms)
        self.m.decision(decision)
        if not decision.remote or decision.prefill_worker_id is None:
            return None
        return await self._remote(request, token_ids, hashes, cached, decision)

    def stalled(self, load: proto.LoadReport) -> int:
        """The sequences a prefill on this decode worker stalls: those running now, those
        queued to start, and the remote prefills that resume here within a transfer's time
        (`resuming`). Counting the running ones alone priced a long prompt at a burst's
        start (few running yet, the prefill pool's queue long) as cheaper here, and every
        stream that started or resumed on this worker in the next second paid ~140 ms a
        step for each such prompt: most of the live mixed load's ITL misses in `auto`
        (docs/benchmarks.md, issue 11, "Live mixed load", 2026-12-06 10:00 measurement)."""
        return load.running + load.waiting + self.resuming

    async def _remote(self, request: proto.GenerateRequest, token_ids: list[int],
                      hashes: list[int], cached: int,
                      decision: Decision) -> RemotePrefill | None:
        ctx, hub, pool, cfg = self.ctx, self.hub, self.pool, self.config
        assert ctx is not None and hub is not None and pool is not None
        engine = ctx.engine
        pid = decision.prefill_worker_id
        assert pid is not None
        left = cfg.first_token_timeout_s + cfg.transfer_timeout_s
        if request.deadline_ms is not None:
            left = min(left, max(0.0, request.deadline_ms / 1000 - time.time()))
        run = _RemoteRun(self, pid, token_ids)
        self.resuming += 1
        try:
            run.rx = await hub.open_receive(
                request.request_id, on_blocks=run.import_blocks, expected_hashes=hashes,
                first_block=cached, layout=self.layout, deadline_s=left,
                idle_timeout_s=cfg.idle_timeout_s)
        except TransferError as exc:  # too many receives in progress here
            self.m.fallback(STAGE_FIRST_TOKEN, exc.code)
            await run.release()
            return None
        except BaseException:
            await run.release()
            raise
        run.key = f"disagg-rx-{run.rx.transfer_id}"
        message = RemotePrefillRequest(request=request, target=run.rx.target, first_block=cached)
        uncached = len(token_ids) - cached * ctx.block_size
        pool.sent(pid, uncached)
        reason = None
        asked = time.monotonic()
        try:
            reply = await _unless_gone(ctx.bus.request(
                subjects.remote_prefill(ctx.namespace, pid), message,
                timeout=min(cfg.first_token_timeout_s, left) or 0.001,
                reply_type=RemotePrefillReply), pool.gone(pid))
            first = proto.unpack_tokens(reply.first_token_ids)
            if len(first) != 1 or reply.request_id != request.request_id:
                raise ValueError(f"{len(first)} first tokens for request {reply.request_id!r}")
            # the engine takes it as input without checking it (`resume_token_ids`): an id
            # outside the vocabulary failed the torch engine's step, every request in it and
            # the engine with them
            vocab = engine.card.vocab_size
            if vocab and not 0 <= first[0] < vocab:
                raise ValueError(f"first token {first[0]} outside the vocabulary (0..{vocab - 1})")
            # it becomes the request's usage.cached_tokens (the client's bill)
            if reply.cached_tokens > len(token_ids):
                raise ValueError(f"{reply.cached_tokens} cached tokens for a prompt of "
                                 f"{len(token_ids)}")
        except _Gone:
            reason = "prefill_gone"
        except NoResponders:
            reason = "no_responders"
        except RequestTimeout:
            reason = "timeout"
        except Overloaded:
            reason = "overloaded"
        except RemoteError as exc:
            reason = exc.error.code if exc.error.code in xerr.CODES else "remote_error"
        except BusError:
            reason = "disconnected"
        except (proto.ProtocolError, ValueError) as exc:
            reason = "bad_reply"
            log.warning("bad remote prefill reply", request_id=request.request_id,
                        prefill_worker=f"{pid:x}", error=str(exc))
        except BaseException:
            await run.release()
            raise
        finally:
            pool.answered(pid, uncached)
        now = time.monotonic()
        self.spare.first_token((now - asked) * 1e3, now * 1e3)
        if reason is not None:
            log.info("remote prefill failed; prefilling locally", request_id=request.request_id,
                     prefill_worker=f"{pid:x}", reason=reason)
            self.m.fallback(STAGE_FIRST_TOKEN, reason)
            await run.release()
            return None
        card = engine.card
        # the prompt's last partial block, when the reply carries it for exactly this
        # prompt (an engine whose blocks carry a payload needs its bytes)
        tail = len(token_ids) % ctx.block_size
        if (tail and reply.tail_tokens == tail and (reply.tail is not None or self.mocker)
                and (reply.tail is None or len(reply.tail) == self.layout.bytes_per_block)):
            run.tail = (tail, reply.tail)
        # The first token exists, so the prefill is over and the header is due (it leaves
        # with the first computed blocks, or once the blocks are pinned): silence from here
        # is bounded by the idle timeout, not the transfer's deadline. A peer that answered
        # and then sent nothing (dead, hung, hostile) held the request ~40 s before the
        # recompute; now `idle_timeout_s` (kv_peer_gone, the recompute below in `kv()`).
        assert run.rx is not None
        run.rx.expect_header()
        max_len = min(card.context_length, card.kv_blocks * card.block_size)
        lp = None
        if reply.logprobs is not None:
            values, top_ids, top_lps = reply.logprobs.unpack()
            lp = Logprobs(values, top_ids, top_lps)
        return RemotePrefill(
            first_token_ids=first, cached_tokens=reply.cached_tokens, kv=run.kv,
            release=run.release, logprobs=lp, resumed=run.resumed,
            finish_reason=first_token_finish(request, first[0], len(token_ids),
                                             frozenset(card.eos_token_ids), max_len))

    # ---- prefill side ----------------------------------------------------------------------

    async def _serve_prefill(self, data: bytes) -> RemotePrefillReply:
        try:
            reply = await self._prefill(proto.decode(data, RemotePrefillRequest))
        except RemoteError as exc:
            self.m.served.labels(exc.error.code if exc.error.code in _SERVED_CODES
                                 else "other").inc()
            raise
        except proto.ProtocolError:
            self.m.served.labels("bad_request").inc()
            raise
        self.m.served.labels("ok").inc()
        return reply

    async def _prefill(self, msg: RemotePrefillRequest) -> RemotePrefillReply:
        ctx, cfg = self.ctx, self.config
        assert ctx is not None and self.hub is not None and self.layout is not None
        engine = ctx.engine
        card = engine.card
        req = msg.request
        target = msg.target
        if self._closing:
            raise _refuse("overloaded", "prefill worker is shutting down", retryable=True)
        if req.model != ctx.model:
            raise _refuse("not_found", f"this prefill worker serves {ctx.model!r}, "
                          f"not {req.model!r}")
        try:
            tokens = proto.unpack_tokens(req.token_ids)
        except ValueError as exc:
            raise _refuse("bad_request", f"token_ids: {exc}") from None
        if not tokens or len(tokens) >= card.context_length:
            raise _refuse("bad_request", f"prompt of {len(tokens)} tokens (context length "
                          f"{card.context_length})")
        problem = sampling_error(card, req.sampling)
        if problem is not None:
            raise _refuse("bad_request", problem)
        if target.layout != self.layout:
            raise _refuse(xerr.LAYOUT_MISMATCH, "the decode worker's KV layout is not this "
                          "worker's (different engine, model or --kv-bytes-per-token)")
        try:  # refused before the prefill runs (the send would refuse it anyway)
            self.hub.check_target(target)
        except TransferError as exc:
            raise _refuse("bad_request", f"target: {exc.message}") from None
        hashes = block_hashes(tokens, ctx.block_size)
        if msg.first_block != target.first_block or msg.first_block > len(hashes):
            raise _refuse("bad_request", f"first_block {msg.first_block} does not fit a "
                          f"prompt of {len(hashes)} full blocks")
        if len(self.pins) >= cfg.max_prefills:
            raise _refuse("overloaded", f"{len(self.pins)} transfers already hold pins",
                          retryable=True)
        deadlines = [d for d in (req.deadline_ms, target.deadline_ms) if d is not None]
        left = cfg.pin_timeout_s
        if deadlines:
            left = min(left, min(deadlines) / 1000 - time.time())
        if left <= 0:
            raise _refuse("deadline_exceeded", "the remote prefill's deadline already passed")
        deadline = time.monotonic() + left

        eid = f"rp:{req.request_id}#{next(self._ids)}"
        stop = msgspec.structs.replace(req.stop, max_tokens=1)
        send = hashes[msg.first_block:]
        key = f"disagg-tx-{target.transfer_id}"
        try:
            self.pins.pin(key, (), deadline=deadline)
        except (PinTableFull, ValueError) as exc:
            raise _refuse("overloaded", str(exc), retryable=True) from None
        self.m.pinned.set(len(self.pins))
        self._pins_changed.set()
        # The send starts now and ships the prompt's blocks as the prefill computes them
        # (`_Progress`, fed by this engine's KV events), so at the first token only the last
        # chunk's blocks are still to move (the "pipelined"). It owns the pins from
        # here on: its end (ack, nack, failure, deadline, cancel) releases them.
        progress = self._watch(send, engine.cached_prefix(send) if send else 0)
        parent = hashes[msg.first_block - 1] if msg.first_block else None
        task = asyncio.create_task(self._send(target, req.request_id, send, parent, key,
                                              deadline, progress),
                                   name=f"disagg-tx-{target.transfer_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            out = await self._run_prefill(engine, eid, tokens, req, stop, left)
            progress.computed()
            # Pin what travels before anything can evict it (the request ended with its
            # first token and left its blocks to the prefix cache): a block evicted
            # meanwhile just shortens the run, and the decode worker computes the rest.
            pinned = await engine.pin_kv(key, send) if send else 0
            if key not in self.pins:  # the send ended meanwhile (and unpinned): hold nothing
                await self._unpin(key)
            progress.pin(pinned)
        except BaseException:
            task.cancel()  # its end unpins and tells the receiver
            await asyncio.wait([task], timeout=CANCEL_SEND_S)
            # (a task cancelled before it ever ran skips its `finally`: the same, here)
            self._unwatch(progress)
            if key in self.pins:
                self.pins.release(key)
                await self._unpin(key)
            raise
        return RemotePrefillReply(
            request_id=req.request_id, transfer_id=target.transfer_id,
            first_token_ids=proto.pack_tokens(out.token_ids[:1]),
            logprobs=(proto.TokenLogprobs.pack(out.logprobs.logprobs[:1],
                                               out.logprobs.top_ids[:1],
                                               out.logprobs.top_logprobs[:1],
                                               req.sampling.logprobs or 0)
                      if out.logprobs is not None and out.logprobs.logprobs else None),
            prompt_tokens=len(tokens), cached_tokens=max(0, out.cached_tokens), blocks=pinned,
            **self._tail_fields(out))

    def _tail_fields(self, out) -> dict:
        """The reply's `tail_tokens` / `tail`: the prompt's last partial block, read by the
        engine as the prefill finished (`EngineOutput.kv_tail`). The mocker's carries no
        bytes (its blocks have no payload; with dummy payloads, what one partial block would
        add to the modelled link is ~0.1 ms at the bench's settings, not modelled); a payload
        over `TAIL_MAX_BYTES` is left out: the decode worker computes those tokens again."""
        if out.kv_tail is None:
            return {}
        n, payload = out.kv_tail
        if self.mocker:
            return {"tail_tokens": n}
        if isinstance(payload, bytes | bytearray | memoryview) and len(payload) <= TAIL_MAX_BYTES:
            return {"tail_tokens": n, "tail": bytes(payload)}
        return {}

    async def _run_prefill(self, engine, eid: str, tokens: list[int],
                           req: proto.GenerateRequest, stop, left: float):
        """The prompt to its first token on this engine (the output that carries it)."""
        try:
            stream = await engine.submit(EngineRequest(
                request_id=eid, token_ids=tokens, sampling=req.sampling, stop=stop,
                export_tail=True))
        except EngineOverloaded as exc:
            raise _refuse("overloaded", str(exc), retryable=True) from None
        except ValueError as exc:
            raise _refuse("bad_request", str(exc)) from None
        out = None
        try:
            async with asyncio.timeout(left):
                async for out in stream:
                    if out.token_ids or out.finish_reason is not None:
                        break
        except TimeoutError:
            raise _refuse("deadline_exceeded", "deadline passed during the prefill") from None
        finally:
            if not stream.finished:
                await engine.abort(eid)
        if out is None or not out.token_ids or out.finish_reason in (FINISH_CANCELLED,
                                                                      FINISH_ERROR):
            raise _refuse("internal", f"the prefill produced no token: "
                          f"{(out.error if out else None) or 'engine stopped'}", retryable=True)
        return out

    def _watch(self, hashes: list[int], cached: int) -> _Progress:
        progress = _Progress(hashes, cached)
        self._wait_next(progress)
        return progress

    def _wait_next(self, progress: _Progress) -> None:
        if progress.ready < len(progress.hashes) and progress.ended is None:
            progress.key = progress.hashes[progress.ready]
            self._watching.setdefault(progress.key, []).append(progress)

    def _unwatch(self, progress: _Progress) -> None:
        key, progress.key = progress.key, None
        watchers = self._watching.get(key) if key is not None else None
        if watchers is not None:
            with contextlib.suppress(ValueError):
                watchers.remove(progress)
            if not watchers:
                del self._watching[key]

    def _note_stored(self, batch: proto.KvEventBatch) -> None:
        """Blocks this engine stored (its KV event batch, delivered once the step that
        computed them is over): the sends waiting on them may go on. A request's blocks are
        stored in prefix order, so a send waits for one hash, its next block's: one lookup
        per `Stored` event (indexing every block of every prompt cost the prefill workers
        ~23 % more CPU in the live mixed load: ~1.8 ms a long prompt and ~1 ms a batch at
        load 10)."""
        watching = self._watching
        now = 0.0
        for ev in batch.events:
            if not isinstance(ev, proto.Stored) or not ev.blocks:
                continue
            waiting = watching.pop(ev.blocks[0].hash, None)
            if waiting is None:
                continue
            now = now or time.monotonic()
            for progress in waiting:
                progress.key = None
                progress.extend(ev.blocks, now)
                self._wait_next(progress)

    async def _send(self, target, request_id: str, hashes: list[int], parent: int | None,
                    key: str, deadline: float, progress: _Progress) -> None:
        ctx, hub, cfg, layout = self.ctx, self.hub, self.config, self.layout
        assert ctx is not None and hub is not None and layout is not None
        engine = ctx.engine
        bpb = layout.bytes_per_block
        zeros = bytes(bpb)
        per_block_s = 0.0
        modelled = cfg.kv_bytes_per_token * ctx.block_size  # what a block's KV would take
        if self.mocker and cfg.kv_transfer_bandwidth_gb_s > 0 and modelled:
            per_block_s = modelled / (cfg.kv_transfer_bandwidth_gb_s * GB)

        async def source(first: int, count: int):
            end = first + count
            # computed? (the hub bounds this wait by the transfer's deadline)
            await progress.until(lambda: progress.ready >= end)
            if progress.ended is None:
                self.m.pipelined.inc(count)
            if progress.pinned is not None and end > progress.pinned:
                raise TransferError(xerr.SOURCE_FAILED, f"{end - progress.pinned} blocks were "
                                    "evicted before they could be pinned")
            if self.mocker:
                if per_block_s:
                    await asyncio.sleep(per_block_s * count)  # the modelled link
                return [zeros] * count
            blocks = await engine.export_kv(hashes[first:end])
            if len(blocks) != count:
                raise TransferError(xerr.SOURCE_FAILED, f"{count - len(blocks)} blocks are "
                                    "no longer held (evicted, or their pins expired)")
            return [b.data for b in blocks]

        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                if not bpb or not hashes:
                    # hashes only (--kv-payload none), or nothing to send: one header once
                    # the prefill is over and its blocks pinned. The modelled link carried
                    # each run of blocks from when the prefill had computed it (one at a
                    # time, in order), so what is left of it passes here before the header
                    # leaves (the receiver imports the run when it lands; from the first
                    # token on it waits for the header under the idle timeout).
                    await progress.until(lambda: progress.pinned is not None)
                    assert progress.pinned is not None
                    hashes = hashes[:progress.pinned]
                    if progress.ended is not None:
                        self.m.pipelined.inc(min(progress.ended, len(hashes)))
                    if per_block_s and hashes:
                        await asyncio.sleep(max(0.0, progress.link_end(per_block_s, len(hashes))
                                                - time.monotonic()))
                else:
                    # payloads: the header leaves with the first blocks computed here (the
                    # receiver's idle timeout runs from it, so not while the prompt queues)
                    first = progress.ready
                    await progress.until(lambda: progress.ready > first
                                         or progress.pinned is not None)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransferError(xerr.DEADLINE, "the transfer's deadline passed before "
                                    "it started")
            target, transport = self._checked_tcp(target)
            result = await hub.send(target, request_id=request_id, hashes=hashes,
                                    parent_hash=parent, block_size=ctx.block_size,
                                    layout=layout, source=source,
                                    deadline_s=min(cfg.transfer_timeout_s, left),
                                    idle_timeout_s=cfg.idle_timeout_s, transport=transport)
            self.m.transfer("tx", result.transport, result)
        except TimeoutError:
            self.m.transfer("tx", "none", error=TransferError(xerr.DEADLINE, "deadline"))
            log.info("KV send failed: its deadline passed waiting for the prefill",
                     request_id=request_id)
        except TransferError as exc:
            self.m.transfer("tx", "none", error=exc)
            log.info("KV send failed", request_id=request_id, error=str(exc))
        except Exception as exc:  # a bug must not keep the pins
            self.m.transfer("tx", "none", error=exc)
            log.exception("KV send failed", request_id=request_id)
        except asyncio.CancelledError:  # its prefill failed, or a drain's deadline passed
            self.m.transfer("tx", "none", error=TransferError(xerr.CANCELLED, "cancelled"))
            log.info("KV send cancelled", request_id=request_id)
            raise
        finally:
            self._unwatch(progress)
            if key in self.pins:
                self.pins.release(key)
                await self._unpin(key)

    def _checked_tcp(self, target: KvTransferTarget) -> tuple[KvTransferTarget, str]:
        """(the target, the transport) a send uses: a TCP endpoint that is not the one the
        named decode worker publishes (genset.disagg.endpoints: someone else's address, or a
        record not seen yet) is dropped and the KV goes over NATS, to that worker's own
        receive subject, whatever --kv-transport says; never a refusal."""
        if target.tcp is None or self.config.transport == "nats" or (
                self.endpoints is not None and self.endpoints.trusted(target)):
            return target, self.config.transport
        self.m.tcp_untrusted.inc()
        log.debug("KV TCP endpoint is not the decode worker's published one; sending over NATS",
                  transfer_id=target.transfer_id, worker=f"{target.worker_id:x}",
                  endpoint=f"{target.tcp.host}:{target.tcp.port}",
                  published=self.endpoints.published(target.worker_id)
                  if self.endpoints is not None else None)
        return msgspec.structs.replace(target, tcp=None), "nats"

    async def _unpin(self, key: str) -> None:
        assert self.ctx is not None
        try:
            async with asyncio.timeout(UNPIN_TIMEOUT_S):
                await self.ctx.engine.unpin_kv(key)
        except Exception as exc:  # the engine is stopping: its blocks go with it
            log.debug("unpin failed", key=key, error=repr(exc))
        self.m.pinned.set(len(self.pins))

    async def _republish_hashes(self) -> None:
        """This prefill worker's KV event batches, token ids stripped, for decode workers
        (genset.disagg.pool). Costs one more publish per batch, on prefill workers only."""
        assert self.ctx is not None
        ctx = self.ctx
        subject = subjects.prefill_kv_hashes(ctx.namespace, ctx.instance_id)
        events = ctx.engine.kv_events()
        try:
            async for batch in events:
                if self._watching:
                    self._note_stored(batch)
                if any(isinstance(ev, proto.Stored) and any(b.token_ids for b in ev.blocks)
                       for ev in batch.events):
                    # a copy: the batch object is the one the KV feed publishes too
                    batch = msgspec.structs.replace(batch, events=[
                        proto.Stored(parent_hash=ev.parent_hash,
                                     blocks=[proto.StoredBlock(hash=b.hash) for b in ev.blocks])
                        if isinstance(ev, proto.Stored) else ev for ev in batch.events])
                with contextlib.suppress(Exception):  # the next batch or a gap heals it
                    await ctx.bus.publish(subject, batch)
        finally:
            events.close()

    async def _sweep_pins(self) -> None:
        """Unpin whatever a deadline freed (a send that somehow outlived its own deadlines)."""
        while True:
            nxt = self.pins.next_deadline()
            wait = 1.0 if nxt is None else max(0.0, nxt - time.monotonic())
            self._pins_changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(wait, 1.0)):
                    await self._pins_changed.wait()
            for entry in self.pins.expire(time.monotonic()):
                self.m.pins_expired.inc()
                log.warning("exported KV blocks unpinned by their deadline",
                            key=entry.transfer_id)
                await self._unpin(entry.transfer_id)


_SERVED_CODES = frozenset({"bad_request", "not_found", "overloaded", "deadline_exceeded",
                           "internal", xerr.LAYOUT_MISMATCH})


def _refuse(code: str, message: str, *, retryable: bool = False) -> RemoteError:
    return RemoteError(ErrorInfo(code=code, message=message, retryable=retryable))


class _Progress:
    """How far the prefill of one remote prefill's blocks (`hashes`, the run it sends) has
    come, prefill side. `ready`: the leading blocks known computed (cached before, or stored
    by the engine in prefix order: its KV events come once the step that computed them is
    over; a run stored out of that order, or blocks found cached mid-prompt, only wait for
    the prefill's end); `marks`:
    (time.monotonic(), ready) at each advance, for the modelled link; `pinned`: how many
    blocks this worker holds for the transfer, once the prefill is over (None before).
    Events lost from a full subscription only delay the advance to the prefill's end
    (`computed`)."""

    def __init__(self, hashes: list[int], cached: int) -> None:
        self.hashes = hashes
        self.ready = min(max(0, cached), len(hashes))
        self.marks: list[tuple[float, int]] = [(time.monotonic(), self.ready)]
        self.pinned: int | None = None
        self.ended: int | None = None  # `ready` when the prefill ended (computed)
        self.key: int | None = None  # the block hash it waits for (DisaggHook._watching)
        self._changed = asyncio.Event()

    def extend(self, blocks: list[proto.StoredBlock], now: float) -> None:
        """Stored blocks that start at the next one this waits for: the run they continue."""
        hashes, r, n = self.hashes, self.ready, len(self.hashes)
        for b in blocks:
            if r >= n or hashes[r] != b.hash:
                break
            r += 1
        if r > self.ready:
            self.ready = r
            self.marks.append((now, r))
            self._changed.set()

    def computed(self) -> None:
        """The prefill is over (its first token exists): every block is computed."""
        self.ended = self.ready
        if self.ready < len(self.hashes):
            self.ready = len(self.hashes)
            self.marks.append((time.monotonic(), self.ready))
        self._changed.set()

    def pin(self, pinned: int) -> None:
        self.pinned = pinned
        self._changed.set()

    async def until(self, ready: Callable[[], bool]) -> None:
        """Until `ready()` (one waiter: the send; the caller bounds the wait)."""
        while not ready():
            self._changed.clear()
            await self._changed.wait()

    def link_end(self, per_block_s: float, count: int) -> float:
        """When a link carrying `per_block_s` a block, one block at a time and each from
        when it was computed, has carried the first `count` blocks (time.monotonic())."""
        end, sent = 0.0, 0
        for at, ready in self.marks:
            ready = min(ready, count)
            if ready > sent:
                end = max(end, at) + (ready - sent) * per_block_s
                sent = ready
        return end


class _RemoteRun:
    """One request's remote prefill on the decode side: its receive, and the blocks imported
    (pinned under `key`) as they arrive."""

    def __init__(self, hook: DisaggHook, prefill_id: int,
                 token_ids: list[int] | None = None) -> None:
        self.hook = hook
        self.prefill_id = prefill_id
        # the prompt: each imported run carries its blocks' tokens (`KvImport.token_ids`; the
        # receiver checked the transfer's hashes against this prompt's chain), so the engine
        # keeps them and their eviction puts them to the offload store verified
        self.token_ids = token_ids
        self.rx: KvReceiver | None = None
        self.key = ""
        self.imported = 0
        self.released = False
        # (tokens, payload) of the prompt's last partial block, from the first-token reply:
        # handed to the engine with the import, so the resumed request's first step is a
        # decode step (`KvImport.tail`)
        self.tail: tuple[int, bytes | None] | None = None
        # the resume gap's stamps (time.monotonic): the first token sent (kv() called right
        # after), the KV complete, the request submitted; `resumed` observes them
        self._sent_at = 0.0
        self._kv_at = 0.0
        self._submitted_at = 0.0

    async def import_blocks(self, run) -> None:
        hook = self.hook
        assert hook.ctx is not None
        if hook.mocker:
            blocks = [KvBlockData(h) for h in run.hashes]
        else:  # views valid during this call only: the engine copies while decoding them
            blocks = [KvBlockData(h, p) for h, p in zip(run.hashes, run.payloads, strict=True)]
        # the run's first block in the prompt's chain: the header's first block (where the
        # receiver checked the hashes against the prompt's) + the run's within the transfer
        asm = self.rx.assembler if self.rx is not None else None
        tokens = self.token_ids if asm is not None else None
        first = asm.header.first_block + run.first_block if asm is not None else 0
        kv = KvImport(blocks, run.parent_hash, token_ids=tokens, first_block=first)
        n = await hook.ctx.engine.import_kv(kv, pin_for=self.key)
        self.imported += n
        if n < len(blocks):
            raise TransferError(xerr.IMPORT_FAILED, f"imported {n} of {len(blocks)} blocks "
                                "(KV cache full, or a block whose KV ended a request here "
                                "before: `Scheduler.distrusted`)")

    async def kv(self) -> KvImport | None:
        """Wait for the transfer; the import for the engine, or None (recompute here)."""
        hook, rx = self.hook, self.rx
        assert rx is not None and hook.pool is not None
        self._sent_at = time.monotonic()
        gone = hook.pool.gone(self.prefill_id)
        try:
            while True:
                try:
                    result = await _unless_gone(rx.wait(), gone)
                    break
                except _Gone:
                    if rx.assembler is None:  # it left before sending anything: give up
                        raise
                    # it left mid-transfer (a drain still sends): the idle timeout decides
                    gone = asyncio.Event()
        except _Gone:
            hook.m.fallback(STAGE_TRANSFER, "prefill_gone")
            await self.release()
            return None
        except TransferError as exc:
            hook.m.transfer("rx", rx.transport or "none", error=exc)
            hook.m.fallback(STAGE_TRANSFER, exc.code)
            log.info("KV transfer failed; recomputing the prompt here",
                     request_id=rx.request_id, error=str(exc))
            await self.release()
            return None
        except BaseException:
            await self.release()
            raise
        hook.m.transfer("rx", result.transport, result)
        if hook.bandwidth.observe(result.bytes, result.seconds):
            hook.m.bandwidth.set(hook.bandwidth.bytes_per_s)
        if not self.imported:
            await self.release()
            return None
        hook.m.remote_done.inc()
        self._kv_at = time.monotonic()
        tail = self.tail or (0, None)
        if tail[0]:
            hook.m.tails.inc()
        return KvImport(blocks=[], pinned_as=self.key, tail_tokens=tail[0], tail=tail[1])

    def resumed(self) -> None:
        """The engine's first output after the remote first token (the host calls it)."""
        if not self._submitted_at:
            return  # the prompt was recomputed here, or the stamps are missing: no resume
        now = time.monotonic()
        sent, kv, sub = self._sent_at, self._kv_at, self._submitted_at
        obs = self.hook.m.resume
        size = "long" if self.imported >= LONG_TRANSFER_BLOCKS else "short"
        obs.labels("kv", size).observe(kv - sent)
        obs.labels("submit", size).observe(sub - kv)
        obs.labels("step", size).observe(now - sub)
        obs.labels("total", size).observe(now - sent)
        log.debug("remote prefill resumed", request_id=self.rx.request_id if self.rx else "",
                  kv_ms=round((kv - sent) * 1e3, 1), submit_ms=round((sub - kv) * 1e3, 1),
                  step_ms=round((now - sub) * 1e3, 1), total_ms=round((now - sent) * 1e3, 1))

    async def release(self) -> None:
        """Stop the transfer if it still runs, and drop the pins no request took over."""
        if self.released:
            return
        self.released = True
        if self._kv_at:  # after the KV came: the host calls this once it submitted
            self._submitted_at = time.monotonic()
        self.hook.resuming -= 1
        rx = self.rx
        if rx is not None and not rx.done:
            await rx.cancel("the decode worker gave up on the transfer")
        if self.key and self.hook.ctx is not None:
            with contextlib.suppress(Exception):  # TimeoutError included (UNPIN_TIMEOUT_S)
                async with asyncio.timeout(UNPIN_TIMEOUT_S):
                    await self.hook.ctx.engine.unpin_kv(self.key)
