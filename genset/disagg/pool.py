"""A decode worker's view of the prefill pool: which prefill workers serve its model, what
each holds in its prefix cache, and how loaded each is. What `genset.disagg.decide` needs
to price a remote prefill, kept live from etcd and the bus.

- membership: the model cards in etcd whose role is `prefill` and whose model is ours; a card
  that goes (drain, lease expired after a crash) removes the worker at once and sets its
  `gone` event, which ends any wait on it (`RemoteRun` races its waits against it);
- cached blocks: each prefill worker's KV events, block hashes only, as it republishes them
  on `subjects.prefill_kv_hashes` (the router's subject may carry token ids, i.e. prompts,
  which one worker must not read of another), applied to a hash set. A gap in its event ids cannot be healed by a resync here (workers may not ask each
  other for snapshots: only routers may), so the set is cleared and rebuilt from the events
  that follow: the view under-counts what the worker holds until then, which only makes a
  remote prefill look dearer than it is, never wrongly cheap;
- load: its load reports, plus the uncached tokens this decode worker sent it and has not
  seen answered (a report lags up to its interval; without this, a burst would all pick the
  same idle-looking worker).

Bounded: one hash set per prefill worker, capped at its card's KV capacity (+ slack); a
worker whose set grows past it is cleared (a bug or a forgery, as the router does).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import structlog

import proto
from genset.disagg.decision import PrefillState
from genset.kv.replica import HashSetReplica
from genset.worker.roles import ROLE_PREFILL
from proto import keys, subjects
from proto.kv import TIER_DEVICE

log = structlog.get_logger("genset.disagg")

CAPACITY_SLACK_BLOCKS = 64


@dataclass
class _Prefill:
    worker_id: int
    card: proto.ModelCard
    replica: HashSetReplica = field(default_factory=HashSetReplica)
    report: proto.LoadReport | None = None
    inflight_tokens: int = 0  # sent by us, first token not seen yet
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    subs: list = field(default_factory=list)


class PrefillPool:
    def __init__(self, *, bus, discovery, namespace: str, model: str) -> None:
        self.bus = bus
        self.discovery = discovery
        self.ns = namespace
        self.model = model
        self.workers: dict[int, _Prefill] = {}
        self._membership = None
        self._pending: set[asyncio.Task] = set()
        self._closed = False
        self.stats = {"gaps": 0, "over_capacity": 0, "bad_messages": 0}

    async def start(self) -> None:
        prefix = keys.models_prefix(self.ns)
        try:
            self._membership = await self.discovery.watch(prefix, proto.ModelCard)
        except Exception as exc:  # etcd away: start empty (every request runs aggregated)
            log.warning("etcd not answering; no prefill workers known yet", error=repr(exc))
            self._membership = await self.discovery.watch(prefix, proto.ModelCard,
                                                          require_initial=False)
        for key, card in list(self._membership.items.items()):
            self._on_card("put", key, card)
        self._membership.add_listener(self._on_card)

    async def close(self) -> None:
        self._closed = True
        if self._membership is not None:
            self._membership.remove_listener(self._on_card)
            with contextlib.suppress(Exception):
                await self._membership.close()
            self._membership = None
        for wid in list(self.workers):
            self._remove(wid)
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=5.0)

    # ---- membership ------------------------------------------------------------------------

    def _on_card(self, kind: str, key: str, card) -> None:
        if self._closed or not isinstance(card, proto.ModelCard):
            return
        if key.rsplit("/", 1)[-1] != subjects.instance_token(card.instance_id):
            return  # a card must name the worker whose key it is stored under
        if card.role != ROLE_PREFILL or card.model != self.model:
            return
        if kind == "put":
            w = self.workers.get(card.instance_id)
            if w is None:
                w = self.workers[card.instance_id] = _Prefill(card.instance_id, card)
                self._spawn(self._subscribe(w))
                log.info("prefill worker joined", worker=f"{card.instance_id:x}")
            else:
                w.card = card
        else:
            self._remove(card.instance_id)

    def _remove(self, worker_id: int) -> None:
        w = self.workers.pop(worker_id, None)
        if w is None:
            return
        w.gone.set()
        subs, w.subs = w.subs, []
        for sub in subs:
            self._spawn(_unsubscribe(sub))
        log.info("prefill worker left", worker=f"{worker_id:x}")

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _subscribe(self, w: _Prefill) -> None:
        wid = w.worker_id
        try:
            subs = [
                await self.bus.subscribe(subjects.prefill_kv_hashes(self.ns, wid),
                                         lambda msg, w=w: self._on_kv(w, msg)),
                await self.bus.subscribe(subjects.load_report(self.ns, wid),
                                         lambda msg, w=w: self._on_load(w, msg)),
            ]
        except Exception as exc:  # the bus is away: the worker is priced as idle, uncached
            log.warning("cannot follow a prefill worker", worker=f"{wid:x}", error=repr(exc))
            return
        if self.workers.get(wid) is not w:  # it left while we subscribed
            for sub in subs:
                await _unsubscribe(sub)
            return
        w.subs.extend(subs)

    # ---- inputs ----------------------------------------------------------------------------

    async def _on_kv(self, w: _Prefill, msg) -> None:
        try:
            batch = proto.decode(msg.data, proto.KvEventBatch)
        except proto.ProtocolError:
            self.stats["bad_messages"] += 1
            return
        if batch.worker_id != w.worker_id or batch.tier != TIER_DEVICE:
            return
        replica = w.replica
        if not replica.apply(batch):
            # a gap we cannot heal from here (module docstring): start over from this batch
            self.stats["gaps"] += 1
            replica.hashes.clear()
            replica.apply_events(batch.events)
            replica.last_event_id = batch.event_id
        limit = (w.card.kv_blocks or (1 << 20)) + CAPACITY_SLACK_BLOCKS
        if len(replica.hashes) > limit:
            self.stats["over_capacity"] += 1
            replica.hashes.clear()

    async def _on_load(self, w: _Prefill, msg) -> None:
        try:
            report = proto.decode(msg.data, proto.LoadReport)
        except proto.ProtocolError:
            self.stats["bad_messages"] += 1
            return
        if report.worker_id == w.worker_id:
            w.report = report

    # ---- what the decision reads -----------------------------------------------------------

    def __len__(self) -> int:
        return len(self.workers)

    def states(self, hashes: list[int]) -> list[PrefillState]:
        """Every prefill worker as the cost model sees it for a prompt of these blocks."""
        out: list[PrefillState] = []
        for w in self.workers.values():
            held = w.replica.hashes
            cached = 0
            for h in hashes:
                if h not in held:
                    break
                cached += 1
            r = w.report
            queued = (r.waiting_prefill_tokens if r is not None else 0) + w.inflight_tokens
            saturated = r is not None and (
                (r.kv_total_blocks > 0 and r.kv_used_blocks >= r.kv_total_blocks)
                or r.waiting >= max(1, w.card.max_running))
            out.append(PrefillState(worker_id=w.worker_id, cached_blocks=cached,
                                    queued_prefill_tokens=queued,
                                    running=r.running if r is not None else 0,
                                    saturated=saturated,
                                    step_ms=r.step_ms_ewma if r is not None else 0.0))
        return out

    def gone(self, worker_id: int) -> asyncio.Event:
        """Set once `worker_id` is no longer a prefill worker here (already set if unknown)."""
        w = self.workers.get(worker_id)
        if w is None:
            ev = asyncio.Event()
            ev.set()
            return ev
        return w.gone

    def sent(self, worker_id: int, tokens: int) -> None:
        w = self.workers.get(worker_id)
        if w is not None:
            w.inflight_tokens += tokens

    def answered(self, worker_id: int, tokens: int) -> None:
        w = self.workers.get(worker_id)
        if w is not None:
            w.inflight_tokens = max(0, w.inflight_tokens - tokens)


async def _unsubscribe(sub) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(5.0):
            await sub.unsubscribe()
