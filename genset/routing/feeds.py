"""Wires a `RouterCore` to the bus and etcd: what both the router service and the router
embedded in a frontend need.

- worker membership: the model cards in etcd (`proto.keys.models_prefix`); a card that goes
  (lease expired, worker drained) removes the worker's blocks and load at once;
- KV events of every worker (`proto.subjects.kv_events_all`), with per-worker event-id gap
  detection; a gap is healed by a `KvResyncRequest` to that worker, whose snapshot
  (Cleared + Stored) replaces what we had;
- load reports, request lifecycle (workers publish first_token / done), and the decisions of
  other router replicas (`route_decisions`), so every replica keeps the same load view;
- on start, a resync request to every known worker, so a restarted router has the full index
  within one round trip instead of waiting for new events;
- a periodic health check that raises the alarm (log + metric) when a worker we keep
  routing to publishes no KV events, or a model's workers publish none at all;
- `suspects`: workers the caller saw fail (`genset.routing.load.SuspectWorkers`), cleared
  here when one proves alive (a load report) or its model card goes or comes back.

Whatever arrives from the bus is treated as hostile (issue 14): with etcd membership, KV
events, load reports and peer decisions about a worker id that has no model card in etcd are
ignored (`router_ignored_messages{kind,reason}`), so made-up ids cost nothing; a batch or
report must name the worker whose subject it came on (NATS permissions let a worker publish
only on its own subjects, not choose what it writes in them); a card must name the worker
whose key it is stored under; and a worker's index is bounded by its card's KV capacity (a
worker claiming more blocks than it has is reset and asked for a snapshot). A load report's
onboarding cost that no worker could have measured (NaN, negative, absurd) is refused and
counted (`reason="bad_onboard_cost"`); its load is still applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

import proto
from genset.routing.core import RouterCore
from genset.routing.load import SuspectWorkers
from genset.runtime.metrics import FAST_BUCKETS
from proto import keys, subjects
from proto.kv import TIER_DEVICE, TIER_DISK, TIER_HOST

log = structlog.get_logger("genset.router")

TIERS = (TIER_DEVICE, TIER_HOST, TIER_DISK)
# Blocks kept per worker and tier when the card gives no capacity (or for offload tiers,
# which a card does not size): ~100 bytes each in the index, so ~100 MB at most per worker.
UNSIZED_TIER_BLOCKS = 1 << 20
# Over the card's capacity a worker may briefly hold: none, in fact (its pool has kv_blocks
# blocks and events come in order), so this is only a margin for engines that count a block
# or two outside the pool.
CAPACITY_SLACK_BLOCKS = 64


class RouterMetrics:
    def __init__(self, metrics) -> None:
        m = metrics
        self.decisions = m.counter("router_decisions", "Routing decisions", ["policy"])
        self.decision_seconds = m.histogram("router_decision_seconds", "Time to route one request",
                                            buckets=FAST_BUCKETS)
        self.errors = m.counter("router_errors", "Route requests answered with an error", ["reason"])
        self.kv_batches = m.counter("router_kv_batches", "KV event batches applied")
        self.kv_blocks = m.counter("router_kv_block_events", "Block events applied (stored/removed)")
        self.gaps = m.counter("router_kv_event_gaps", "KV event-id gaps detected")
        self.resyncs = m.counter("router_kv_resyncs", "KV resync requests sent", ["outcome"])
        self.alarm = m.gauge("router_alarm", "1 while a worker/model publishes no KV events", ["subject"])
        self.workers = m.gauge("router_workers", "Workers known to the router")
        self.hit_ratio = m.gauge("router_predicted_hit_ratio",
                                 "Prompt tokens found cached on the chosen worker / prompt tokens")
        self.bad_messages = m.counter("router_bad_messages", "Messages that failed to decode", ["kind"])
        self.ignored = m.counter("router_ignored_messages",
                                 "Messages (or their fields) ignored: unknown worker, wrong "
                                 "sender, over capacity, unbelievable onboarding cost",
                                 ["kind", "reason"])


class RouterFeeds:
    def __init__(self, core: RouterCore, *, bus, namespace: str, discovery=None, metrics=None,
                 resync_timeout: float = 2.0, alarm_interval_s: float = 2.0) -> None:
        self.core = core
        self.bus = bus
        self.ns = namespace
        self.discovery = discovery
        self.m = RouterMetrics(metrics) if metrics is not None else None
        self.resync_timeout = resync_timeout
        self.alarm_interval_s = alarm_interval_s
        self._subs: list = []
        self._tasks: list[asyncio.Task] = []
        self._membership = None
        self._resync_inflight: set[int] = set()
        self._resync_queue: asyncio.Queue[int] = asyncio.Queue(maxsize=4096)
        self._alarmed: set[str] = set()
        self._idle = asyncio.Event()  # set whenever no resync is outstanding
        # Live workers from etcd: model-card key -> (instance id, KV capacity in blocks).
        # Only with discovery; without it (tests, replay) every worker id is taken.
        self._cards: dict[str, tuple[int, int]] = {}
        self._live: dict[int, int] = {}  # instance id -> capacity (max over its cards)
        self._stores = None  # KV offload store membership (etcd)
        self._store_resyncs: dict[int, asyncio.Task] = {}  # store id -> resync in flight
        self._closing = False
        # Set (and replaced) whenever a worker joins from etcd: `wait_worker_joined`.
        self._worker_joined = asyncio.Event()
        # Marked by the caller (the frontend pipeline) when a request fails on a worker;
        # it passes them to routers as RouteRequest.exclude.
        self.suspects = SuspectWorkers()

    # -------------------------------------------------------------- lifecycle
    async def start(self, *, initial_sync_s: float = 3.0) -> None:
        """Subscribe, list the workers, and wait (up to `initial_sync_s`) for their KV
        snapshots, so the first decisions already see every cached prefix."""
        bus = self.bus
        # Handled in the connection's reader (Bus.subscribe_direct): every handler here only
        # updates the index and load model, and a task switch per message was most of what a
        # message cost the router service and the frontend's warm copy (issue 15).
        sub = bus.subscribe_direct
        self._subs.append(await sub(subjects.kv_events_all(self.ns), self._on_kv))
        self._subs.append(await sub(subjects.load_report_all(self.ns), self._on_load))
        self._subs.append(await sub(subjects.request_lifecycle(self.ns), self._on_lifecycle))
        self._subs.append(await sub(subjects.route_decisions(self.ns), self._on_decision))
        await self._start_stores()  # KV offload store: its tiers in the index (issue 12)
        self._tasks.append(asyncio.create_task(self._resync_loop(), name="router-resync"))
        self._tasks.append(asyncio.create_task(self._alarm_loop(), name="router-alarms"))
        if self.discovery is not None:
            prefix = keys.models_prefix(self.ns)
            try:
                self._membership = await self.discovery.watch(prefix, proto.ModelCard)
            except Exception as exc:  # etcd away: start anyway, fill in when it answers
                log.warning("etcd not answering, starting with no workers", error=repr(exc))
                self._membership = await self.discovery.watch(prefix, proto.ModelCard,
                                                              require_initial=False)
            for key, card in list(self._membership.items.items()):
                self._on_card("put", key, card)
            self._membership.add_listener(self._on_card)
        if self._resync_inflight:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(initial_sync_s):  # lets a cancel through, unlike wait_for on 3.11
                    await self._idle.wait()

    async def close(self) -> None:
        self._closing = True
        for t in list(self._store_resyncs.values()):
            t.cancel()
        if self._stores is not None:
            with contextlib.suppress(Exception):
                await self._stores.close()
            self._stores = None
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        if self._membership is not None:
            with contextlib.suppress(Exception):
                await self._membership.close()
            self._membership = None

    # -------------------------------------------------------------- membership
    def _on_card(self, kind: str, key: str, card) -> None:
        if not isinstance(card, proto.ModelCard):
            return
        if key.rsplit("/", 1)[-1] != subjects.instance_token(card.instance_id):
            # etcd lets a worker write only its own keys, not choose what it writes in them
            self._ignore("model_card", "wrong_key", card.instance_id,
                         f"card for {card.instance_id:x} stored under {key}")
            return
        # A record that goes (the worker left) or comes (it registered, again) ends a mark.
        self.suspects.forget(card.instance_id)
        if kind == "put":
            new = card.instance_id not in self.core.workers
            self._cards[key] = (card.instance_id, card.kv_blocks)
            self._recount(card.instance_id)
            self.core.add_card(card)
            if new:
                # What it already holds (a router that starts after its workers, or restarts).
                self.request_resync(card.instance_id)
                joined, self._worker_joined = self._worker_joined, asyncio.Event()
                joined.set()
        else:
            self._cards.pop(key, None)
            if self._recount(card.instance_id):
                return  # still serves another model
            self.core.remove_worker(card.instance_id)
        if self.m:
            self.m.workers.set(len(self.core.workers))

    async def wait_worker_joined(self, wait_s: float) -> bool:
        """Wait at most `wait_s` seconds for a worker to join (its model card seen in etcd);
        False when none did. Only with discovery (False at once without)."""
        if self.discovery is None or wait_s <= 0:
            return False
        joined = self._worker_joined
        try:
            async with asyncio.timeout(wait_s):
                await joined.wait()
        except TimeoutError:
            return False
        return True

    def _recount(self, worker_id: int) -> bool:
        """Update the live entry of `worker_id` from its cards; False once it has none."""
        sizes = [blocks for wid, blocks in self._cards.values() if wid == worker_id]
        if not sizes:
            self._live.pop(worker_id, None)
            return False
        self._live[worker_id] = max(sizes)
        return True

    def is_live(self, worker_id: int) -> bool:
        """A worker with a model card in etcd (always true without discovery)."""
        return self.discovery is None or worker_id in self._live

    def block_limit(self, worker_id: int, tier: str) -> int:
        """The most blocks of `tier` the index keeps for `worker_id`."""
        capacity = self._live.get(worker_id, 0) if tier == TIER_DEVICE else 0
        return capacity + CAPACITY_SLACK_BLOCKS if capacity > 0 else UNSIZED_TIER_BLOCKS

    def request_resync(self, worker_id: int) -> None:
        if worker_id in self._resync_inflight:
            return
        with contextlib.suppress(asyncio.QueueFull):
            self._resync_queue.put_nowait(worker_id)
            self._resync_inflight.add(worker_id)

    async def _resync_loop(self) -> None:
        # Stops on `_closing` too: on Python 3.11 a cancel that meets a resync request
        # finishing at the same moment can be lost inside the bus's wait (the request's
        # answer or error comes out instead), and the loop went back to waiting on its queue
        # while close() waited for it (seen in tests: a worker with no resync responder).
        while not self._closing:
            worker_id = await self._resync_queue.get()
            try:
                snap = await self.bus.request(
                    subjects.kv_resync(self.ns, worker_id),
                    proto.KvResyncRequest(worker_id=worker_id, reason="router"),
                    timeout=self.resync_timeout, reply_type=proto.KvEventBatch)
                if isinstance(snap, bytes):
                    snap = proto.decode(snap, proto.KvEventBatch)
                if snap.worker_id != worker_id:
                    raise proto.ProtocolError(
                        f"resync answer names worker {snap.worker_id:x}, asked {worker_id:x}")
                self._apply(snap)
                if self.m:
                    self.m.resyncs.labels("ok").inc()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # no responder / timeout: the next gap or card retries
                if self._closing:
                    return
                log.warning("KV resync failed", worker=f"{worker_id:x}", error=repr(exc))
                if self.m:
                    self.m.resyncs.labels("failed").inc()
            finally:
                self._resync_inflight.discard(worker_id)
                if not self._resync_inflight:
                    self._idle.set()

    # -------------------------------------------------------------- KV offload store
    async def _start_stores(self) -> None:
        """The store's events (tiers host/disk) go into the index as a shared holder; its etcd
        record says when it is gone (its blocks are dropped); a gap is healed by asking the
        store for a snapshot, which it publishes on its events subject."""
        self._subs.append(await self.bus.subscribe_direct(subjects.offload_events_all(self.ns),
                                                          self._on_store_kv))
        if self.discovery is None:
            return
        with contextlib.suppress(Exception):  # etcd away: stores join when their events come
            self._stores = await self.discovery.watch(
                keys.offload_instances_prefix(self.ns), proto.InstanceRecord,
                require_initial=False)
            for key, rec in list(self._stores.items.items()):
                self._on_store_record("put", key, rec)
            self._stores.add_listener(self._on_store_record)

    def _on_store_record(self, kind: str, key: str, rec) -> None:
        if not isinstance(rec, proto.InstanceRecord) \
                or rec.component != subjects.OFFLOAD_COMPONENT:
            return
        if kind == "put":
            if rec.instance_id not in self.core.stores:
                self.core.add_store(rec.instance_id)
                self._resync_store(rec.instance_id)  # what it already holds
        else:
            self.core.remove_store(rec.instance_id)

    def _on_store_kv(self, msg) -> None:
        try:
            batch = proto.decode(msg.data, proto.KvEventBatch)
        except proto.ProtocolError as exc:
            self._bad("offload_events", exc)
            return
        sid = batch.worker_id
        if not self._from_own_subject("offload_events", msg.subject, sid):
            return
        if self._stores is not None and sid not in self.core.stores:
            # With the store records watched, a store is one etcd says is live (as a worker
            # is): ids made up on the bus would each claim prefixes in the index. A real
            # store whose events beat its record here is resynced when the record comes.
            self._ignore("offload_events", "not_live", sid)
            return
        result = self.core.on_store_batch(batch)
        if result.gap is not None:
            if self.m:
                self.m.gaps.inc()
            self._resync_store(batch.worker_id)

    def _resync_store(self, store_id: int) -> None:
        if store_id in self._store_resyncs:
            return  # one at a time per store
        task = asyncio.create_task(self._store_resync(store_id), name="router-store-resync")
        self._store_resyncs[store_id] = task
        task.add_done_callback(lambda _t: self._store_resyncs.pop(store_id, None))

    async def _store_resync(self, store_id: int) -> None:
        """Ask a store for its snapshot; it arrives on its events subject (bounded wait)."""
        try:
            await self.bus.request(
                subjects.offload_resync(self.ns, store_id),
                proto.KvResyncRequest(worker_id=store_id, reason="router"),
                timeout=self.resync_timeout)
            if self.m:
                self.m.resyncs.labels("ok").inc()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # store gone or slow: the next gap or record retries
            log.warning("offload store resync failed", store=f"{store_id:x}", error=repr(exc))
            if self.m:
                self.m.resyncs.labels("failed").inc()

    # -------------------------------------------------------------- inputs
    def _apply(self, batch: proto.KvEventBatch) -> None:
        core = self.core
        if batch.tier not in TIERS:
            self._ignore("kv_events", "bad_tier", batch.worker_id, f"tier {batch.tier[:32]!r}")
            return
        if not self.is_live(batch.worker_id):
            self._ignore("kv_events", "not_live", batch.worker_id)
            return
        result = core.on_kv_batch(batch)
        if self.m and not result.stale:
            self.m.kv_batches.inc()
            self.m.kv_blocks.inc(result.applied_blocks)
        if result.stale and batch.event_id <= 1:
            # Event ids start at 1: the worker restarted under the same id (a worker slot
            # keeps its id) and its first batches look old. Its snapshot puts things right.
            self.request_resync(batch.worker_id)
        if result.gap is not None:
            if self.m:
                self.m.gaps.inc()
            self.request_resync(batch.worker_id)
        limit = self.block_limit(batch.worker_id, batch.tier)
        held = core.index.blocks_held(batch.worker_id, batch.tier)
        if held > limit:
            # More blocks than the worker can hold: a bug or a forgery. Forget its blocks
            # (bounded memory, no routing on claims) and ask it for the truth.
            core.index.apply_events(batch.worker_id, [proto.Cleared()], batch.tier)
            self._ignore("kv_events", "over_capacity", batch.worker_id,
                         f"{held} blocks held, capacity {limit}")
            self.request_resync(batch.worker_id)

    def _on_kv(self, msg) -> None:
        try:
            batch = proto.decode(msg.data, proto.KvEventBatch)
        except proto.ProtocolError as exc:
            self._bad("kv_events", exc)
            return
        if not self._from_own_subject("kv_events", msg.subject, batch.worker_id):
            return
        self._apply(batch)

    def _on_load(self, msg) -> None:
        try:
            report = proto.decode(msg.data, proto.LoadReport)
        except proto.ProtocolError as exc:
            self._bad("load_report", exc)
            return
        if not self._from_own_subject("load_report", msg.subject, report.worker_id):
            return
        if not self.is_live(report.worker_id):
            self._ignore("load_report", "not_live", report.worker_id)
            return
        if self.suspects.alive(report.worker_id):
            log.info("worker alive again", worker=f"{report.worker_id:x}")
        refused = self.core.on_load_report(report)
        if refused is not None:
            # the load part is used; the onboarding cost is not (the defaults price it)
            self._ignore("load_report", "bad_onboard_cost", report.worker_id, refused)

    def _from_own_subject(self, kind: str, subject: str, worker_id: int) -> bool:
        """A per-worker message must name the worker whose subject it came on."""
        if subject.rsplit(".", 1)[-1] == subjects.instance_token(worker_id):
            return True
        self._ignore(kind, "wrong_subject", worker_id, f"came on {subject}")
        return False

    def _ignore(self, kind: str, reason: str, worker_id: int, detail: str = "") -> None:
        # debug, not warning: a flood of forged messages must not become a flood of logs;
        # the counter shows it.
        log.debug("message ignored", kind=kind, reason=reason, worker=f"{worker_id:x}",
                  detail=detail)
        if self.m:
            self.m.ignored.labels(kind, reason).inc()

    def _on_lifecycle(self, msg) -> None:
        try:
            ev = proto.decode(msg.data, proto.RequestLifecycle)
        except proto.ProtocolError as exc:
            self._bad("lifecycle", exc)
            return
        self.core.on_lifecycle(ev)

    def _on_decision(self, msg) -> None:
        try:
            d = proto.decode(msg.data, proto.RouteDecision)
        except proto.ProtocolError as exc:
            self._bad("route_decision", exc)
            return
        if d.worker_id is not None and not self.is_live(d.worker_id):
            self._ignore("route_decision", "not_live", d.worker_id)
            return
        self.core.on_peer_decision(d)

    def _bad(self, kind: str, exc: Exception) -> None:
        log.warning("bad message ignored", kind=kind, error=str(exc))
        if self.m:
            self.m.bad_messages.labels(kind).inc()

    # -------------------------------------------------------------- health
    async def _alarm_loop(self) -> None:
        while True:
            await asyncio.sleep(self.alarm_interval_s)
            self.check_alarms()

    def check_alarms(self) -> dict:
        alarms = self.core.check_alarms()
        self.core.load.expire()
        current = {str(k) if not isinstance(k, int) else f"{k:x}" for k in alarms}
        if self.m:
            for name in current - self._alarmed:
                self.m.alarm.labels(name).set(1)
            for name in self._alarmed - current:
                self.m.alarm.labels(name).set(0)
            if self.core.prompt_tokens_total:
                self.m.hit_ratio.set(self.core.predicted_hit_tokens / self.core.prompt_tokens_total)
        self._alarmed = current
        return alarms

    def record_decision(self, decision: proto.RouteDecision, started: float) -> None:
        if not self.m:
            return
        if decision.worker_id is None:
            self.m.errors.labels("no_worker" if "no worker" in (decision.error or "") else "bad_request").inc()
        else:
            self.m.decisions.labels(decision.policy).inc()
        self.m.decision_seconds.observe(time.perf_counter() - started)
