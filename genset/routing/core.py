"""The router's brain, with no I/O: workers, prefix index, load model, policies.

`RouterCore` is driven the same way by the embedded router, the router service and the
offline replay: feed it KV event batches, load reports, lifecycle messages and membership
changes; ask it `route()`. Keeping it synchronous and clock-injected is what lets the replay
run it in simulated time and lets tests check every rule deterministically.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

import proto
from genset.kv.hashing import block_hashes
from genset.routing.api import POLICY_GENSET
from genset.routing.index import IngestResult, PrefixIndex
from genset.routing.load import LoadModel, reported_onboard_cost
from genset.routing.policies import OnboardCost, Policy, RouteContext, WorkerView, make_policy
from proto import ROLE_DECODE, ROLE_PREFILL
from proto.kv import TIER_DEVICE, TIER_DISK, TIER_HOST

# The offload store's tiers, fastest first (a block in both counts as in RAM).
STORE_TIERS = (TIER_HOST, TIER_DISK)

log = logging.getLogger("genset.router")

# The most output tokens a route request may ask for (int32, as a worker's StopConditions).
MAX_TOKENS = 2**31 - 1


@dataclass
class RouterConfig:
    policy: str = POLICY_GENSET
    block_size: int = 16  # used for workers without a model card
    default_max_tokens: int = 256  # for decisions broadcast by replicas (no max_tokens there)
    policy_options: dict = field(default_factory=dict)  # for the default policy only
    event_silence_s: float = 10.0  # a worker we route to with no KV event this long: alarm
    alarm_min_routed: int = 3  # ... and at least this many requests routed since its last event
    seed: int | None = None
    router_id: int = 0
    # The caller reports first token / done of the requests this router routed (a router
    # embedded in a frontend); workers' RequestLifecycle then only counts for the others.
    caller_reports: bool = False


@dataclass
class WorkerInfo:
    worker_id: int
    model: str = ""
    block_size: int = 16
    kv_blocks: int = 0
    max_batch_tokens: int = 8192
    role: str = ROLE_DECODE
    has_card: bool = False  # learned from etcd (else only from its events / reports)
    routed_since_event: int = 0
    ever_published: bool = False
    joined_ms: float = 0.0
    # what onboarding from the offload store costs it, as its latest load report measured
    # (None: nothing measured, or a report the router could not believe)
    onboard: OnboardCost | None = None


@dataclass
class RoutedPrompt:
    worker_id: int | None
    overlap_blocks: int
    prompt_tokens: int
    policy: str
    error: str | None = None
    store_blocks: int | None = None  # the prompt's blocks in an offload store (None: no store)


class RouterCore:
    def __init__(self, config: RouterConfig | None = None, *, clock=None) -> None:
        self.config = config or RouterConfig()
        self._clock = clock or (lambda: time.monotonic() * 1000.0)
        self.index = PrefixIndex()
        self.load = LoadModel(block_size=self.config.block_size, clock=self._clock)
        self.workers: dict[int, WorkerInfo] = {}
        self.rng = random.Random(self.config.seed)
        self._policies: dict[str, Policy] = {}
        self.default_policy = self.policy(self.config.policy, **self.config.policy_options)
        self.decisions = 0
        self.predicted_hit_tokens = 0
        self.prompt_tokens_total = 0
        self.alarms: dict[int | str, str] = {}
        self.resync_wanted: set[tuple[int, str]] = set()
        # workers whose lease went, and when: their late messages must not bring them back
        self._gone: dict[int, float] = {}
        # KV offload store instances: holders in the index (tiers host/disk) that are shared
        # by every worker and never routed to
        self.stores: set[int] = set()
        # store id -> its tiers whose view here is whole: built from a snapshot or from the
        # store's first batch, with no gap since. Until every store has one (and no gap
        # waits for a snapshot), decisions give no store hint (RoutedPrompt.store_blocks).
        self._whole_store_tiers: dict[int, set[str]] = {}

    def now_ms(self) -> float:
        return self._clock()

    def policy(self, name: str, **options) -> Policy:
        p = self._policies.get(name)
        if p is None:
            p = self._policies[name] = make_policy(name, **options)
        return p

    # -------------------------------------------------------------- membership
    def add_worker(self, worker_id: int, *, model: str = "", block_size: int | None = None,
                   kv_blocks: int = 0, max_batch_tokens: int = 8192, role: str = ROLE_DECODE,
                   has_card: bool = True) -> WorkerInfo:
        w = self.workers.get(worker_id)
        if w is None:
            self._gone.pop(worker_id, None)
            w = self.workers[worker_id] = WorkerInfo(worker_id, joined_ms=self.now_ms())
            self.index.slot(worker_id)
        w.model = model or w.model
        w.block_size = block_size or w.block_size or self.config.block_size
        w.kv_blocks = kv_blocks or w.kv_blocks
        w.max_batch_tokens = max_batch_tokens
        w.role = role
        w.has_card = w.has_card or has_card
        return w

    def add_card(self, card: proto.ModelCard) -> WorkerInfo:
        return self.add_worker(card.instance_id, model=card.model, block_size=card.block_size,
                               kv_blocks=card.kv_blocks, max_batch_tokens=card.max_batch_tokens,
                               role=card.role)

    def remove_worker(self, worker_id: int) -> None:
        """The worker's lease went: forget its blocks and its load at once."""
        self.workers.pop(worker_id, None)
        self._gone[worker_id] = self.now_ms()
        dropped = self.index.remove_worker(worker_id)
        self.load.remove_worker(worker_id)
        self.alarms.pop(worker_id, None)
        self.resync_wanted = {k for k in self.resync_wanted if k[0] != worker_id}
        log.info("worker %x removed from the router (%d cached blocks forgotten)", worker_id, dropped)

    GONE_MEMORY_MS = 60_000.0

    def _ensure_worker(self, worker_id: int) -> WorkerInfo | None:
        """The worker a message is from; None for one removed in the last minute (a late
        message from a dead worker must not make it routable again)."""
        w = self.workers.get(worker_id)
        if w is None:
            gone = self._gone.get(worker_id)
            if gone is not None and self.now_ms() - gone < self.GONE_MEMORY_MS:
                return None
            w = self.add_worker(worker_id, has_card=False)
        return w

    # -------------------------------------------------------------- inputs
    def on_kv_batch(self, batch: proto.KvEventBatch) -> IngestResult:
        w = self._ensure_worker(batch.worker_id)
        if w is None:
            return IngestResult(stale=True)
        now = self.now_ms()
        result = self.index.apply_batch(batch, now)
        if result.stale:
            return result
        w.ever_published = True
        w.routed_since_event = 0
        self.alarms.pop(batch.worker_id, None)
        key = (batch.worker_id, batch.tier)
        if result.gap is not None:
            st = self.index.events[key]
            st.awaiting_resync = True
            self.resync_wanted.add(key)
            log.warning("KV event gap from worker %x (%s): expected %d, got %d; asking for a resync",
                        batch.worker_id, batch.tier, result.gap[0], result.gap[1])
        elif batch.events and isinstance(batch.events[0], proto.Cleared):
            self.resync_wanted.discard(key)
        return result

    def on_load_report(self, report: proto.LoadReport) -> str | None:
        """Apply a worker's load report. Returns why its onboarding cost was refused (a
        value no worker could have measured: NaN, negative, absurd; the worker's store runs
        are then priced with the configured defaults), else None."""
        w = self._ensure_worker(report.worker_id)
        if w is None:
            return None
        if report.kv_total_blocks and not w.kv_blocks:
            w.kv_blocks = report.kv_total_blocks
        refused = None
        try:
            w.onboard = reported_onboard_cost(report)
        except ValueError as exc:
            w.onboard = None
            refused = str(exc)
        self.load.on_report(report)
        return refused

    def on_lifecycle(self, msg: proto.RequestLifecycle) -> None:
        self.load.on_lifecycle(msg)

    def on_first_token(self, request_id: str) -> None:
        self.load.on_first_token(request_id)

    def on_done(self, request_id: str) -> None:
        self.load.on_done(request_id)

    def on_peer_decision(self, d: proto.RouteDecision) -> None:
        """Another router replica routed a request: keep the same load view."""
        if d.worker_id is None or d.router_id == self.config.router_id:
            return
        w = self._ensure_worker(d.worker_id)
        if w is None:
            return
        self.load.on_routed(d.request_id, d.worker_id, d.prompt_tokens,
                            d.overlap_blocks * w.block_size, self.config.default_max_tokens)
        w.routed_since_event += 1

    # -------------------------------------------------------------- offload stores
    def add_store(self, store_id: int) -> None:
        """A KV offload store instance (its etcd record): its blocks count for every worker."""
        if store_id not in self.stores:
            self._gone.pop(store_id, None)
            self.stores.add(store_id)
            self.index.slot(store_id)

    def remove_store(self, store_id: int) -> None:
        """The store's record went: nobody can onboard its blocks any more."""
        if store_id in self.stores:
            self.stores.discard(store_id)
            self._whole_store_tiers.pop(store_id, None)
            self._gone[store_id] = self.now_ms()
            dropped = self.index.remove_worker(store_id)
            self.resync_wanted = {k for k in self.resync_wanted if k[0] != store_id}
            log.info("offload store %x removed from the router (%d blocks forgotten)",
                     store_id, dropped)

    def on_store_batch(self, batch: proto.KvEventBatch) -> IngestResult:
        """A store's KvEventBatch (tier host or disk). Gaps are reported in `resync_wanted`
        as for workers (heal with a KvResyncRequest to the store)."""
        sid = batch.worker_id
        if batch.tier not in STORE_TIERS or sid in self.workers:
            return IngestResult(stale=True)  # not a store's tier, or an id a worker has
        if sid not in self.stores:
            gone = self._gone.get(sid)
            if gone is not None and self.now_ms() - gone < self.GONE_MEMORY_MS:
                return IngestResult(stale=True)
            self.add_store(sid)
        result = self.index.apply_batch(batch, self.now_ms())
        key = (sid, batch.tier)
        whole = self._whole_store_tiers.setdefault(sid, set())
        if result.gap is not None:
            whole.discard(batch.tier)
            self.index.events[key].awaiting_resync = True
            self.resync_wanted.add(key)
            log.warning("KV event gap from offload store %x (%s): expected %d, got %d",
                        sid, batch.tier, result.gap[0], result.gap[1])
        elif batch.events and isinstance(batch.events[0], proto.Cleared):
            self.resync_wanted.discard(key)
            whole.add(batch.tier)
        elif batch.event_id <= 1 and not result.stale:
            whole.add(batch.tier)  # the store's first batch: nothing came before it
        return result

    def _stores_whole(self) -> bool:
        """Whether the index knows everything every store holds (as of the events so far)."""
        for sid in self.stores:
            tiers = self._whole_store_tiers.get(sid)
            if not tiers or any((sid, t) in self.resync_wanted for t in STORE_TIERS):
                return False
        return True

    def _store_runs(self, hashes: list[int], overlaps: dict[int, int]) -> dict[int, list[int]]:
        """Per distinct cached-prefix length: [RAM, disk] blocks of the store's run after it."""
        runs: dict[int, list[int]] = {}
        for depth in {0, *overlaps.values()}:
            runs[depth] = self.index.run_by_tier(hashes, depth, STORE_TIERS)
        return runs

    # -------------------------------------------------------------- routing
    def eligible(self, model: str | None, exclude=()) -> list[WorkerInfo]:
        ws = [w for w in self.workers.values() if w.worker_id not in exclude and w.role != ROLE_PREFILL]
        if model:
            with_model = [w for w in ws if w.model == model]
            # Workers learned only from their events have no model: usable when no card matches.
            ws = with_model or [w for w in ws if not w.model]
        return ws

    def route(self, req: proto.RouteRequest) -> proto.RouteDecision:
        try:
            data = req.token_ids
            if len(data) % 4:
                raise ValueError(f"token_ids must be packed int32 (a multiple of 4 bytes), got {len(data)} bytes")
            if not 1 <= req.max_tokens <= MAX_TOKENS:  # from the bus: as if hostile (issue 14)
                raise ValueError(f"max_tokens must be in [1, {MAX_TOKENS}], got {req.max_tokens}")
            r = self.route_tokens(req.request_id, data, len(data) // 4, req.max_tokens,
                                  model=req.model, policy=req.policy, exclude=set(req.exclude))
        except ValueError as exc:
            r = RoutedPrompt(None, 0, 0, req.policy or self.config.policy, str(exc))
        return proto.RouteDecision(
            request_id=req.request_id, worker_id=r.worker_id, model=req.model,
            overlap_blocks=r.overlap_blocks, prompt_tokens=r.prompt_tokens, policy=r.policy,
            router_id=self.config.router_id, error=r.error, store_blocks=r.store_blocks)

    def route_tokens(self, request_id: str, token_bytes: bytes, prompt_tokens: int,
                     max_tokens: int, *, model: str | None = None, policy: str | None = None,
                     exclude=(), hashes_by_block_size: dict[int, list[int]] | None = None) -> RoutedPrompt:
        ws = self.eligible(model, exclude)
        pol = self.default_policy if not policy else self.policy(policy)
        if not ws:
            return RoutedPrompt(None, 0, prompt_tokens, pol.name,
                                f"no worker available for model {model!r}" if model else "no worker available")
        hashes_by_block_size = hashes_by_block_size or {}
        views: list[WorkerView] = []
        by_bs: dict[int, dict[int, int]] = {}
        store_runs: dict[int, dict[int, list[int]]] = {}
        for w in ws:
            overlaps = by_bs.get(w.block_size)
            if overlaps is None:
                hashes = hashes_by_block_size.get(w.block_size)
                if hashes is None:
                    hashes = block_hashes(token_bytes, w.block_size)
                    hashes_by_block_size[w.block_size] = hashes
                overlaps = by_bs[w.block_size] = self.index.overlaps(hashes)
                if self.stores:
                    store_runs[w.block_size] = self._store_runs(hashes, overlaps)
            overlap = overlaps.get(w.worker_id, 0)
            view = self._view(w, overlap)
            if self.stores:
                view.host_blocks, view.disk_blocks = store_runs[w.block_size][overlap]
                view.store = True
            views.append(view)
        bs = ws[0].block_size
        ctx = RouteContext(prompt_tokens=prompt_tokens, prompt_blocks=prompt_tokens // bs,
                           block_size=bs, max_tokens=max_tokens)
        chosen = pol.choose(ctx, views, self.rng)
        w = self.workers[chosen.worker_id]
        # blocks onboarded from the offload store are not computed either
        cached_blocks = chosen.overlap_blocks + chosen.host_blocks + chosen.disk_blocks
        cached_tokens = min(cached_blocks * w.block_size, max(0, prompt_tokens - 1))
        self.load.on_routed(request_id, w.worker_id, prompt_tokens, cached_tokens, max_tokens,
                            caller_reports=self.config.caller_reports)
        w.routed_since_event += 1
        self.decisions += 1
        self.predicted_hit_tokens += cached_tokens
        self.prompt_tokens_total += prompt_tokens
        store_blocks = None
        if self.stores and self._stores_whole():
            # anywhere in the prompt, not only right after the overlap the router believes:
            # the worker's own prefix may be shorter than that (just evicted, to the store)
            store_blocks = self.index.count_in_tiers(hashes_by_block_size[w.block_size],
                                                     STORE_TIERS)
        return RoutedPrompt(w.worker_id, chosen.overlap_blocks, prompt_tokens, pol.name,
                            store_blocks=store_blocks)

    def _view(self, w: WorkerInfo, overlap: int) -> WorkerView:
        load = self.load
        lw = load.workers.get(w.worker_id)
        now = self.now_ms()
        return WorkerView(
            worker_id=w.worker_id,
            overlap_blocks=overlap,
            prefill_tokens=load.prefill_tokens(w.worker_id, now) if lw else 0,
            decode_tokens=lw.decode_tokens if lw else 0,
            decode_blocks=lw.blocks if lw else 0,
            inflight=lw.inflight if lw else 0,
            kv_blocks=w.kv_blocks,
            cached_blocks=self.index.blocks_held(w.worker_id, TIER_DEVICE),
            max_batch_tokens=w.max_batch_tokens,
            onboard=w.onboard,
        )

    # -------------------------------------------------------------- health
    def check_alarms(self) -> dict[int | str, str]:
        """Flag workers we keep routing to whose KV events stopped, and models none of whose
        workers ever published: the known failure of peers is routing on load alone, silently."""
        now = self.now_ms()
        silence_ms = self.config.event_silence_s * 1000.0
        alarms: dict[int | str, str] = {}
        for w in self.workers.values():
            if w.role == ROLE_PREFILL:
                continue
            last = max((st.last_event_ms for (wid, _t), st in self.index.events.items()
                        if wid == w.worker_id), default=w.joined_ms)
            if w.routed_since_event >= self.config.alarm_min_routed and now - last > silence_ms:
                alarms[w.worker_id] = (
                    f"worker {w.worker_id:x} got {w.routed_since_event} requests but published no KV "
                    f"event for {(now - last) / 1000:.1f}s: routing to it on load alone")
        models: dict[str, list[WorkerInfo]] = {}
        for w in self.workers.values():
            if w.model and w.role != ROLE_PREFILL:
                models.setdefault(w.model, []).append(w)
        for model, ws in models.items():
            routed = sum(w.routed_since_event for w in ws)
            if routed >= self.config.alarm_min_routed and not any(w.ever_published for w in ws) \
                    and all(now - w.joined_ms > silence_ms for w in ws):
                alarms[f"model:{model}"] = (
                    f"no worker of model {model!r} has published a KV event: KV-aware routing is blind")
        for key, text in alarms.items():
            if key not in self.alarms:
                log.error("router alarm: %s", text)
        self.alarms = alarms
        return alarms
