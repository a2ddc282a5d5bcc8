"""A worker's load reports: a `LoadReport` on `load_report(ns, id)` every `load_interval_s`
while something changes (requests running, KV use moving), else every
`idle_load_interval_s`, so routers keep their load view true."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import structlog

import proto
from genset.engines.interface import Engine
from genset.worker.clock import now_ms, wait_event
from genset.worker.metrics import WorkerMetrics
from proto import subjects

log = structlog.get_logger("genset.worker")


class LoadReporter:
    """`config` is read on every turn (it has `load_interval_s` and `idle_load_interval_s`),
    so a change to it applies at the next report. `active()` counts the requests the host is
    serving; `changed` is set by whoever sees the load move. `fields()` (the hooks'
    `report_fields`) adds what they measured to each report."""

    def __init__(self, engine: Engine, *, bus, namespace: str, instance_id: int, config,
                 metrics: WorkerMetrics, active: Callable[[], int],
                 fields: Callable[[], dict] | None = None) -> None:
        self.engine = engine
        self.bus = bus
        self.instance_id = instance_id
        self.config = config
        self.m = metrics
        self.active = active
        self.fields = fields
        self._fields_failed = False
        self.subject = subjects.load_report(namespace, instance_id)
        self.changed = asyncio.Event()
        self.stopping = False  # the loop ends at its next turn

    def start(self) -> asyncio.Task:
        """Start reporting; the caller owns the returned task."""
        return asyncio.create_task(self._run(), name="load-reports")

    def report(self) -> proto.LoadReport:
        """The engine's latest report, as this worker publishes it."""
        report = self.engine.load()
        # The engine refreshes its report after each step, so an abort that leaves it idle
        # is not reflected until the next step: never claim more than we are serving.
        active = self.active()
        running = min(report.running, active)
        waiting = min(report.waiting, active - running)
        load = dict(
            worker_id=self.instance_id, ts_ms=now_ms(), running=running, waiting=waiting,
            waiting_prefill_tokens=report.waiting_prefill_tokens if waiting else 0,
            kv_used_blocks=report.kv_used_blocks, kv_total_blocks=report.kv_total_blocks,
            step_ms_ewma=report.step_ms_ewma)
        if self.fields is not None:
            try:
                return proto.LoadReport(**load, **self.fields())
            except Exception as exc:  # a hook's figures are optional; the load is not
                if not self._fields_failed:  # once: reports go out every ~250 ms
                    log.warning("load reports without the hooks' fields", error=repr(exc))
                self._fields_failed = True
        return proto.LoadReport(**load)

    async def _run(self) -> None:
        last = None
        loop = asyncio.get_running_loop()
        sent_at = -math.inf
        while not self.stopping:
            await wait_event(self.changed, self.config.idle_load_interval_s)
            # At most one report every `load_interval_s`: what changed since the last one
            # waits out the rest of that. Not a sleep after every report: idle, that was a
            # second wake-up for each report (docs/benchmarks.md 5z).
            gap = sent_at + self.config.load_interval_s - loop.time()
            if gap > 0:
                await asyncio.sleep(gap)
            self.changed.clear()
            report = self.report()
            self.m.kv_used.set(report.kv_used_blocks)
            self.m.waiting.set(report.waiting)
            if report.kv_total_blocks:
                self.m.kv_usage.set(report.kv_used_blocks / report.kv_total_blocks)
            try:
                await self.bus.publish(self.subject, report)
            except Exception as exc:
                log.debug("load report not published", error=repr(exc))
            sent_at = loop.time()
            if self.active() or (last and last.kv_used_blocks != report.kv_used_blocks):
                self.changed.set()  # keep reporting while busy
            last = report
