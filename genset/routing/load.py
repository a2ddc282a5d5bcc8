"""Predicted load per worker, kept by the router itself.

The router cannot wait for workers to tell it their load (reports are 100-500 ms old and a
burst of decisions lands inside that window), so it predicts: a routed request adds its
uncached prompt tokens to the worker's prefill queue and its blocks to the worker's decode
load; its first token moves it from prefill to decode; completion frees it. Workers' own
`LoadReport`s correct the prediction, and neither side is trusted alone:

- a fresh report raises the prediction when the worker is busier than we think (another
  frontend routes to it too, or our lifecycle messages were lost);
- a report that shows the worker idle clears requests we routed well before it (their
  `done` never reached us), so a lost lifecycle message cannot pin a worker as busy forever;
- a request older than `max_request_age_s` is dropped as a last resort.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import proto
from genset.routing.policies import OnboardCost
from proto import PHASE_DONE, PHASE_FIRST_TOKEN

# A worker's reported onboarding cost (LoadReport), field -> (OnboardCost field, the largest
# value believed). Above it the report is a bug or a forgery: 64 MiB of KV per token is ~100x
# the largest dense models' (Llama 3 405B, bf16: 516 KB), 100 TB/s ~30x an H200's HBM, a
# minute per prompt token far beyond any engine here. No lower bound but > 0 (0 = unknown):
# a mocker's blocks are 12-byte placeholders, fetched at a few hundred kB/s.
ONBOARD_FIELDS = {
    "kv_bytes_per_token": ("kv_bytes_per_token", float(64 << 20)),
    "onboard_ram_gbps": ("ram_gbps", 1e5),
    "onboard_disk_gbps": ("disk_gbps", 1e5),
    "prefill_ms_per_token": ("prefill_ms_per_token", 60_000.0),
}


def reported_onboard_cost(report: proto.LoadReport) -> OnboardCost | None:
    """The onboarding cost a worker's load report gives (None when it measured nothing).
    ValueError naming the field for a value the router cannot believe: not a finite
    number, negative, or above its bound (`ONBOARD_FIELDS`)."""
    values = {}
    for name, (key, bound) in ONBOARD_FIELDS.items():
        x = getattr(report, name)
        if not isinstance(x, (int, float)) or not math.isfinite(x) or not 0 <= x <= bound:
            raise ValueError(f"LoadReport.{name} must be a number in [0, {bound:g}], "
                             f"got {x!r}"[:160])
        if x:
            values[key] = float(x)
    return OnboardCost(**values) if values else None


@dataclass(slots=True)
class Inflight:
    worker_id: int
    prompt_tokens: int
    uncached_tokens: int
    blocks: int  # prompt blocks + expected output blocks
    routed_ms: float
    in_prefill: bool = True
    caller_reports: bool = False  # first token / done come from the caller, not lifecycle


@dataclass(slots=True)
class WorkerLoad:
    prefill_tokens: int = 0  # uncached prompt tokens of requests still in prefill
    decode_tokens: int = 0  # context tokens of requests past their first token
    blocks: int = 0  # KV blocks of every in-flight request
    inflight: int = 0
    routed_total: int = 0
    report: proto.LoadReport | None = None
    report_rx_ms: float = 0.0  # local time the report arrived
    requests: set[str] = field(default_factory=set)
    backlog: float = 0.0  # estimated prefill tokens still to compute, as of backlog_ms
    backlog_ms: float = 0.0


class LoadModel:
    def __init__(self, *, block_size: int = 16, report_fresh_ms: float = 1500.0,
                 max_request_age_s: float = 600.0, prefill_tokens_per_ms: float = 0.0,
                 clock=None) -> None:
        self.block_size = block_size
        # Optional: how fast a worker works through its prefill backlog (the mocker polynomial
        # at a full 8192-token step does 8192 / 169 ms = 48.4 tokens/ms), so that the head of
        # a long queue counts as partly done. Off (0) by default: on the Mooncake replay it
        # made decisions slightly worse (TTFT +1%), the full count being a better busy signal.
        self.prefill_tokens_per_ms = prefill_tokens_per_ms
        self.report_fresh_ms = report_fresh_ms
        self.max_request_age_ms = max_request_age_s * 1000.0
        self._clock = clock or (lambda: time.monotonic() * 1000.0)
        self.workers: dict[int, WorkerLoad] = {}
        self.inflight: dict[str, Inflight] = {}

    def now_ms(self) -> float:
        return self._clock()

    def worker(self, worker_id: int) -> WorkerLoad:
        w = self.workers.get(worker_id)
        if w is None:
            w = self.workers[worker_id] = WorkerLoad()
        return w

    def remove_worker(self, worker_id: int) -> None:
        w = self.workers.pop(worker_id, None)
        if w:
            for rid in w.requests:
                self.inflight.pop(rid, None)

    # ------------------------------------------------------------ lifecycle
    def on_routed(self, request_id: str, worker_id: int, prompt_tokens: int,
                  cached_tokens: int, max_tokens: int, now_ms: float | None = None,
                  caller_reports: bool = False) -> None:
        held = self.inflight.get(request_id)
        if held is not None:
            if held.worker_id == worker_id:  # a replica's broadcast of a decision we made
                return
            # The same request routed again elsewhere: a retry after its worker failed. Its
            # first worker's share goes (that worker may be dead and its record still held
            # until its lease ends) and the retry counts on the worker that now runs it.
            self.on_done(request_id)
        now = self.now_ms() if now_ms is None else now_ms
        uncached = max(0, prompt_tokens - cached_tokens)
        bs = self.block_size
        blocks = (prompt_tokens + max(1, max_tokens) + bs - 1) // bs
        req = Inflight(worker_id, prompt_tokens, uncached, blocks, now,
                       caller_reports=caller_reports)
        self.inflight[request_id] = req
        w = self.worker(worker_id)
        w.backlog = self._backlog(w, now) + uncached
        w.backlog_ms = now
        w.prefill_tokens += uncached
        w.blocks += blocks
        w.inflight += 1
        w.routed_total += 1
        w.requests.add(request_id)

    def on_first_token(self, request_id: str) -> None:
        req = self.inflight.get(request_id)
        if req is None or not req.in_prefill:
            return
        req.in_prefill = False
        w = self.worker(req.worker_id)
        w.prefill_tokens -= req.uncached_tokens
        w.decode_tokens += req.prompt_tokens

    def on_done(self, request_id: str) -> None:
        req = self.inflight.pop(request_id, None)
        if req is None:
            return
        w = self.workers.get(req.worker_id)
        if w is None:
            return
        if req.in_prefill:
            w.prefill_tokens -= req.uncached_tokens
        else:
            w.decode_tokens -= req.prompt_tokens
        w.blocks -= req.blocks
        w.inflight -= 1
        w.requests.discard(request_id)

    def on_lifecycle(self, msg: proto.RequestLifecycle) -> None:
        req = self.inflight.get(msg.request_id)
        if req is None or req.caller_reports:  # the caller tells us of this one (only once)
            return
        if msg.phase == PHASE_FIRST_TOKEN:
            self.on_first_token(msg.request_id)
        elif msg.phase == PHASE_DONE:
            self.on_done(msg.request_id)

    # ------------------------------------------------------------ reports
    def on_report(self, report: proto.LoadReport, now_ms: float | None = None) -> None:
        now = self.now_ms() if now_ms is None else now_ms
        w = self.worker(report.worker_id)
        w.report = report
        w.report_rx_ms = now
        if report.running == 0 and report.waiting == 0 and w.requests:
            # The worker is idle: whatever we routed there more than a report period ago has
            # finished even if its `done` never reached us.
            cutoff = now - self.report_fresh_ms
            for rid in [r for r in w.requests if self.inflight[r].routed_ms < cutoff]:
                self.on_done(rid)

    def expire(self, now_ms: float | None = None) -> int:
        now = self.now_ms() if now_ms is None else now_ms
        old = [rid for rid, r in self.inflight.items() if now - r.routed_ms > self.max_request_age_ms]
        for rid in old:
            self.on_done(rid)
        return len(old)

    def _backlog(self, w: WorkerLoad, now: float) -> float:
        drained = max(0.0, w.backlog - (now - w.backlog_ms) * self.prefill_tokens_per_ms)
        return min(drained, w.prefill_tokens)

    # ------------------------------------------------------------ views
    def prefill_tokens(self, worker_id: int, now_ms: float | None = None) -> int:
        """Prompt tokens this worker still has to compute before a new request's turn."""
        w = self.workers.get(worker_id)
        if w is None:
            return 0
        now = self.now_ms() if now_ms is None else now_ms
        predicted = int(self._backlog(w, now)) if self.prefill_tokens_per_ms > 0 else w.prefill_tokens
        rep = w.report
        if rep is not None:
            if now - w.report_rx_ms <= self.report_fresh_ms:
                # What the worker still had queued, plus what we sent since that report.
                since = sum(self.inflight[r].uncached_tokens for r in w.requests
                            if self.inflight[r].in_prefill and self.inflight[r].routed_ms > w.report_rx_ms)
                return max(predicted, rep.waiting_prefill_tokens + since)
        return predicted

    def decode_blocks(self, worker_id: int, now_ms: float | None = None) -> int:
        w = self.workers.get(worker_id)
        if w is None:
            return 0
        rep = w.report
        if rep is not None:
            now = self.now_ms() if now_ms is None else now_ms
            if now - w.report_rx_ms <= self.report_fresh_ms:
                return max(w.blocks, rep.kv_used_blocks if w.inflight else 0)
        return w.blocks

    def inflight_count(self, worker_id: int) -> int:
        w = self.workers.get(worker_id)
        return w.inflight if w else 0


class SuspectWorkers:
    """Workers a caller saw fail, kept out of its routing until they prove alive.

    The frontend marks a worker when a request fails on it in a way that says the worker is
    gone (its stream went silent, nobody answers on its subject, it is shutting down) and
    passes the marked workers as `RouteRequest.exclude`, so every router honours it: after the
    first failure no other request is sent there while another worker can take it (a SIGKILLed
    worker keeps its etcd record until its lease expires, ~10 s, and new requests went on
    being routed to it meanwhile). A mark ends when the worker proves alive (a load report
    that arrives `proof_delay_ms` or more after the mark: one already on its way when the
    worker died does not count), when its etcd record goes or comes back (`forget`), or after
    `expiry_s`. Pure: times are passed in (ms) or read from the injected clock.
    """

    MAX_MARKED = 4096  # ids come from failures on workers in etcd; a bound all the same

    def __init__(self, *, expiry_s: float = 20.0, proof_delay_ms: float = 500.0,
                 clock=None) -> None:
        self.expiry_ms = expiry_s * 1000.0
        self.proof_delay_ms = proof_delay_ms
        self._clock = clock or (lambda: time.monotonic() * 1000.0)
        self._marked: dict[int, float] = {}  # worker id -> when it was marked (ms)

    def now_ms(self) -> float:
        return self._clock()

    def mark(self, worker_id: int, now_ms: float | None = None) -> bool:
        """True when `worker_id` was not marked already."""
        now = self.now_ms() if now_ms is None else now_ms
        new = worker_id not in self._marked
        if new and len(self._marked) >= self.MAX_MARKED:
            self._marked.pop(next(iter(self._marked)))  # the oldest mark goes
        self._marked[worker_id] = now
        return new

    def alive(self, worker_id: int, now_ms: float | None = None) -> bool:
        """Evidence that `worker_id` is alive (it published something). True when this ends
        its mark."""
        since = self._marked.get(worker_id)
        if since is None:
            return False
        now = self.now_ms() if now_ms is None else now_ms
        if now - since < self.proof_delay_ms:
            return False
        del self._marked[worker_id]
        return True

    def forget(self, worker_id: int) -> None:
        self._marked.pop(worker_id, None)

    def current(self, now_ms: float | None = None) -> list[int]:
        """The marked workers (expired marks are dropped here)."""
        if not self._marked:
            return []
        now = self.now_ms() if now_ms is None else now_ms
        expired = [w for w, since in self._marked.items() if now - since >= self.expiry_ms]
        for w in expired:
            del self._marked[w]
        return list(self._marked)

    def __contains__(self, worker_id: int) -> bool:
        return worker_id in self._marked

    def __len__(self) -> int:
        return len(self._marked)
