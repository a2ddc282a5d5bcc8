"""What the status page (/dashboard) shows, gathered in the frontend: `/dashboard/state`.

- workers: the model cards in the registry (role, engine, KV capacity), the latest load
  report of each (KV blocks used, running, waiting, step time), and the router decisions
  heard for it (requests routed, predicted prefix-cache hit rate = cached tokens the router
  expected / prompt tokens);
- traffic: finished requests/s, mean TTFT and ITL, output tokens/s, one point per second
  over the last `SERIES_SECONDS`, from this frontend's own Prometheus metrics (cumulative
  counters and histogram sums sampled once a second; the ring buffer holds the deltas);
- the last router decisions (every router replica broadcasts them, the embedded one too);
- planner targets (`proto.keys.planner_targets`) and kv_offload store instances, when there
  are any.

`DashboardState` and `TrafficSeries` are pure (time passed in); `Dashboard` feeds them from
the bus and etcd. Everything is bounded: load reports and per-worker counters only for
workers with a model card (pruned when the card goes), decisions and series in fixed-size
deques.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

import msgspec
import structlog

import proto
from proto import keys, subjects

log = structlog.get_logger("frontend.dashboard")

SERIES_SECONDS = 300  # five minutes of one-second points
RECENT_DECISIONS = 12
_TOTALS = ("requests", "ttft_sum", "ttft_count", "itl_sum", "itl_count", "output_tokens",
           "prompt_tokens", "cached_tokens")


def metric_totals(metrics) -> dict[str, float]:
    """Cumulative values of the frontend's metrics (all models summed), see `_TOTALS`."""
    def total(metric, suffix: str) -> float:
        return sum(s.value for m in metric.collect() for s in m.samples if s.name.endswith(suffix))

    return {"requests": total(metrics.requests, "_total"),
            "ttft_sum": total(metrics.ttft, "_sum"), "ttft_count": total(metrics.ttft, "_count"),
            "itl_sum": total(metrics.itl, "_sum"), "itl_count": total(metrics.itl, "_count"),
            "output_tokens": total(metrics.output_tokens, "_total"),
            "prompt_tokens": total(metrics.prompt_tokens, "_total"),
            "cached_tokens": total(metrics.cached_tokens, "_total")}


class TrafficSeries:
    """Per-second deltas of cumulative totals, the last `size` seconds."""

    def __init__(self, size: int = SERIES_SECONDS) -> None:
        self.points: deque[tuple[float, dict[str, float]]] = deque(maxlen=size)
        self._last: dict[str, float] | None = None
        self._last_t = 0.0

    def observe(self, now_s: float, totals: dict[str, float]) -> None:
        last, self._last = self._last, dict(totals)
        last_t, self._last_t = self._last_t, now_s
        if last is None or now_s <= last_t:
            return
        # a counter that went down (a metrics reset) counts as starting from zero
        self.points.append((now_s, {k: max(0.0, totals[k] - last.get(k, 0.0))
                                    if totals[k] >= last.get(k, 0.0) else totals[k]
                                    for k in _TOTALS}))

    def series(self) -> dict[str, list[float | None]]:
        t, rps, ttft, itl, tps = [], [], [], [], []
        prev = None
        for now_s, d in self.points:
            span = (now_s - prev) if prev is not None else 1.0
            prev = now_s
            span = span if span > 0 else 1.0
            t.append(round(now_s, 3))
            rps.append(d["requests"] / span)
            tps.append(d["output_tokens"] / span)
            ttft.append(1000 * d["ttft_sum"] / d["ttft_count"] if d["ttft_count"] else None)
            itl.append(1000 * d["itl_sum"] / d["itl_count"] if d["itl_count"] else None)
        return {"t": t, "requests_per_s": rps, "ttft_ms": ttft, "itl_ms": itl,
                "output_tokens_per_s": tps}


class _WorkerStats:
    __slots__ = ("expected_cached", "prompt_tokens", "report", "report_at", "routed")

    def __init__(self) -> None:
        self.report: proto.LoadReport | None = None
        self.report_at = 0.0
        self.routed = 0
        self.expected_cached = 0
        self.prompt_tokens = 0


class DashboardState:
    """The pure part: cards in, reports and decisions fed, snapshot out."""

    def __init__(self, registry, namespace: str) -> None:
        self.registry = registry
        self.namespace = namespace
        self.series = TrafficSeries()
        self.decisions: deque[dict] = deque(maxlen=RECENT_DECISIONS)
        self.workers: dict[int, _WorkerStats] = {}
        self.planner: proto.PlannerTargets | None = None
        self.offload: dict[str, proto.InstanceRecord] = {}
        self.totals: dict[str, float] = {}

    def _cards(self) -> dict[int, proto.ModelCard]:
        return {wid: card for entry in list(self.registry.models.values())
                for wid, card in entry.cards.items()}

    def _stats(self, worker_id: int) -> _WorkerStats | None:
        """Stats of a worker with a model card (others are not kept: bounded, not spoofable
        by publishing for made-up ids)."""
        stats = self.workers.get(worker_id)
        if stats is None:
            if self.registry_card(worker_id) is None:
                return None
            stats = self.workers[worker_id] = _WorkerStats()
        return stats

    def registry_card(self, worker_id: int) -> proto.ModelCard | None:
        for entry in list(self.registry.models.values()):
            card = entry.cards.get(worker_id)
            if card is not None:
                return card
        return None

    def on_load_report(self, report: proto.LoadReport, now_s: float) -> None:
        stats = self._stats(report.worker_id)
        if stats is not None:
            stats.report = report
            stats.report_at = now_s

    def on_decision(self, d: proto.RouteDecision, now_s: float) -> None:
        if d.worker_id is None:
            return
        card = self.registry_card(d.worker_id)
        stats = self._stats(d.worker_id)
        if stats is None or card is None:
            return
        expected = min(d.overlap_blocks * card.block_size, max(0, d.prompt_tokens - 1))
        stats.routed += 1
        stats.expected_cached += expected
        stats.prompt_tokens += d.prompt_tokens
        self.decisions.appendleft({
            "ts_ms": int(now_s * 1000), "request_id": d.request_id[:64],
            "worker": f"{d.worker_id:x}", "model": d.model[:128], "policy": d.policy[:32],
            "prompt_tokens": d.prompt_tokens, "cached_tokens": expected,
            "router": f"{d.router_id:x}"})

    def sample(self, now_s: float, totals: dict[str, float]) -> None:
        self.totals = totals
        self.series.observe(now_s, totals)

    def snapshot(self, now_s: float) -> dict:
        cards = self._cards()
        for gone in [w for w in self.workers if w not in cards]:
            del self.workers[gone]
        workers, pools = [], {}
        for wid, card in sorted(cards.items(), key=lambda kv: (kv[1].model, kv[1].role, kv[0])):
            stats = self.workers.get(wid)
            report = stats.report if stats is not None else None
            pools[card.role] = pools.get(card.role, 0) + 1
            total_blocks = (report.kv_total_blocks if report and report.kv_total_blocks
                            else card.kv_blocks)
            workers.append({
                "id": f"{wid:x}", "model": card.model, "role": card.role, "engine": card.engine,
                "kv_blocks": total_blocks,
                "kv_used_blocks": report.kv_used_blocks if report else None,
                "kv_use": (report.kv_used_blocks / total_blocks
                           if report and total_blocks else None),
                "running": report.running if report else None,
                "waiting": report.waiting if report else None,
                "step_ms": round(report.step_ms_ewma, 3) if report else None,
                "report_age_s": round(max(0.0, now_s - stats.report_at), 1) if report else None,
                "routed": stats.routed if stats else 0,
                "hit_rate": (stats.expected_cached / stats.prompt_tokens
                             if stats and stats.prompt_tokens else None)})
        planner = None
        if self.planner is not None:
            p = self.planner
            planner = {"pools": p.pools, "ready": p.ready, "reason": p.reason, "policy": p.policy,
                       "ts_ms": p.ts_ms, "decision_id": p.decision_id}
        offload = [{"id": f"{r.instance_id:x}", "host": r.host, "labels": r.labels,
                    "started_ms": r.started_ms}
                   for r in sorted(self.offload.values(), key=lambda r: r.instance_id)]
        t = self.totals
        return {
            "ts_ms": int(now_s * 1000), "namespace": self.namespace,
            "models": sorted(self.registry.models), "workers": workers, "pools": pools,
            "series": self.series.series(), "decisions": list(self.decisions),
            "planner": planner, "offload": offload,
            "totals": {"requests": t.get("requests"),
                       "hit_rate": (t["cached_tokens"] / t["prompt_tokens"]
                                    if t.get("prompt_tokens") else None)}}


class Dashboard:
    """Feeds a DashboardState from the bus (load reports, route decisions), etcd (planner
    targets, offload stores) and this frontend's metrics (sampled every second)."""

    def __init__(self, *, bus, discovery, namespace: str, registry, metrics,
                 clock=time.time) -> None:
        self.bus = bus
        self.discovery = discovery
        self.namespace = namespace
        self.metrics = metrics
        self.clock = clock
        self.state = DashboardState(registry, namespace)
        self._subs: list = []
        self._watches: list = []
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        ns = self.namespace
        # In the connection's reader (Bus.subscribe_direct), as the router feeds: a task
        # switch per message was most of what one cost, and each request's route decision
        # comes back here (a local-first frontend publishes it): in a c=64 opening burst, 64
        # wake-ups of a subscription task between the burst's handlers.
        sub = self.bus.subscribe_direct
        self._subs.append(await sub(subjects.load_report_all(ns), self._on_load))
        self._subs.append(await sub(subjects.route_decisions(ns), self._on_decision))
        # etcd away at start must not stop the frontend: the views fill in when it answers
        targets = await self.discovery.watch(keys.planner_targets(ns), proto.PlannerTargets,
                                             require_initial=False)
        stores = await self.discovery.watch(keys.offload_instances_prefix(ns),
                                            proto.InstanceRecord, require_initial=False)
        self._watches = [targets, stores]
        targets.add_listener(self._on_targets)
        stores.add_listener(self._on_store)
        for key, value in list(targets.items.items()):
            self._on_targets("put", key, value)
        for key, value in list(stores.items.items()):
            self._on_store("put", key, value)
        self._task = asyncio.create_task(self._sample_loop(), name="dashboard-sampler")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        for watch in self._watches:
            with contextlib.suppress(Exception):
                await watch.close()
        self._subs.clear()
        self._watches.clear()

    def snapshot(self) -> dict:
        return self.state.snapshot(self.clock())

    async def _sample_loop(self) -> None:
        while True:
            try:
                self.state.sample(self.clock(), metric_totals(self.metrics))
            except Exception:  # a page must never take the frontend down
                log.exception("dashboard_sample_failed")
            await asyncio.sleep(1.0)

    def _on_load(self, msg) -> None:
        try:
            report = proto.decode(msg.data, proto.LoadReport)
        except (proto.ProtocolError, msgspec.MsgspecError, ValueError):
            return  # the routers count and log bad messages; the page just skips them
        # a per-worker subject must name the worker the report is about
        if msg.subject.rsplit(".", 1)[-1] != subjects.instance_token(report.worker_id):
            return
        self.state.on_load_report(report, self.clock())

    def _on_decision(self, msg) -> None:
        try:
            decision = proto.decode(msg.data, proto.RouteDecision)
        except (proto.ProtocolError, msgspec.MsgspecError, ValueError):
            return
        self.state.on_decision(decision, self.clock())

    def _on_targets(self, kind: str, key: str, value) -> None:
        if key != keys.planner_targets(self.namespace):
            return
        self.state.planner = value if kind == "put" and isinstance(
            value, proto.PlannerTargets) else None

    def _on_store(self, kind: str, key: str, value) -> None:
        if kind == "put" and isinstance(value, proto.InstanceRecord):
            if len(self.state.offload) < 1024 or key in self.state.offload:
                self.state.offload[key] = value
        else:
            self.state.offload.pop(key, None)
