"""The planner service over real NATS and etcd: load reports in, targets (with reasons) out.

The workers here are records in etcd and load reports on the bus, published by the test the
way workers publish them; the planner is the real service, in this process, with the `none`
connector (the targets in etcd are its whole output) or in dry-run. Timing never decides a
result: every wait is for a condition, with a generous deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import random
import uuid

import pytest

import proto
from genset.planning.observations import MAX_LATENCY_MS
from genset.runtime.bus import Bus
from genset.runtime.config import CommonConfig
from genset.runtime.discovery import Discovery, DiscoveryError
from genset.runtime.etcd_client import EtcdUnavailable
from proto import keys, subjects
from services.planner.service import PlannerOptions, PlannerService

DEADLINE_S = 30.0


async def eventually(check, what: str, deadline_s: float = DEADLINE_S):
    """Poll `check()` (sync or async) until it returns something truthy."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > end:
            raise AssertionError(f"timed out after {deadline_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)


class FakeFleet:
    """Workers as the planner sees them: a model card + instance record each in etcd, and a
    load report every 100 ms on the bus (what real workers do while busy)."""

    def __init__(self, bus: Bus, discovery: Discovery, ns: str) -> None:
        self.bus, self.discovery, self.ns = bus, discovery, ns
        self.used: dict[int, int] = {}
        self._task: asyncio.Task | None = None

    async def add(self, used: int = 0, role: str = "decode") -> int:
        wid = random.getrandbits(48) | 1
        card = proto.ModelCard(model="tiny", instance_id=wid, role=role, kv_blocks=1000,
                               block_size=16)
        rec = proto.InstanceRecord(instance_id=wid, component=role, namespace=self.ns,
                                   host="test-host", pid=0)
        await self.discovery.register(keys.model(self.ns, "tiny", wid), card)
        await self.discovery.register(keys.instance(self.ns, role, wid), rec)
        self.used[wid] = used
        return wid

    async def remove(self, wid: int, role: str = "decode") -> None:
        self.used.pop(wid, None)
        await self.discovery.unregister(keys.model(self.ns, "tiny", wid))
        await self.discovery.unregister(keys.instance(self.ns, role, wid))

    def start(self) -> None:
        self._task = asyncio.create_task(self._report())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _report(self) -> None:
        while True:
            for wid, used in list(self.used.items()):
                with contextlib.suppress(Exception):
                    await self.bus.publish(subjects.load_report(self.ns, wid), proto.LoadReport(
                        worker_id=wid, ts_ms=0, running=used // 100, kv_used_blocks=used,
                        kv_total_blocks=1000))
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def planner(nats_url: str, etcd: str, ns: str, **options):
    cfg = CommonConfig(namespace=ns, nats=nats_url, etcd=etcd, lease_ttl=3)
    # no start prior: these tests start a planner on a pool and expect the rules of a
    # planner with history (test_planner_core tests the prior)
    opts = PlannerOptions(**{"connector": "none", "interval_s": 0.1, "down_cooldown_s": 2.0,
                             "startup_s": 1.0, "stale_s": 2.0, "prior_memory_s": 0.0,
                             **options})
    out = io.StringIO()
    svc = PlannerService(cfg, opts, out=out)
    svc.bus = await Bus.connect(nats_url, name="planner-test", namespace=ns)
    svc.discovery = await Discovery.connect(etcd, ttl=3)
    try:
        await svc.start()
        svc.state = "ready"
        yield svc, out
    finally:
        await svc.drain()
        await svc.stop()
        await svc.discovery.close()
        await svc.bus.close()


async def read_targets(discovery: Discovery, ns: str) -> proto.PlannerTargets | None:
    return await discovery.get(keys.planner_targets(ns), proto.PlannerTargets)


async def test_load_reports_become_targets_in_etcd_with_reasons(nats_server, etcd_server, bus,
                                                                discovery):
    ns = f"pl-{uuid.uuid4().hex[:8]}"
    fleet = FakeFleet(bus, discovery, ns)
    w1 = await fleet.add(used=300)
    fleet.start()
    try:
        async with planner(nats_server.url, etcd_server.endpoint, ns) as (svc, _):
            first = await eventually(lambda: read_targets(discovery, ns), "initial targets")
            assert first.pools == {"decode": 1} and first.policy == "load"
            # KV fills up: the planner wants a second worker, and says why
            fleet.used[w1] = 950
            up = await eventually(
                lambda: _targets_with(discovery, ns, lambda t: t.pools.get("decode") == 2),
                "decode target 2")
            assert "(up)" in up.reason and "kv" in up.reason, up.reason
            assert up.decision_id >= 1 and up.inputs["decode.kv_usage"] > 0.8
            # while it starts, nothing more is asked for, whatever the load does
            fleet.used[w1] = 1000
            await eventually(lambda: svc.core.status()["starting"]["decode"] == 1, "starting")
            # the started worker registers; the load goes away: back to one after the
            # cool-down, with a worker chosen to drain
            w2 = await fleet.add(used=0)
            await eventually(lambda: svc.core.status()["starting"]["decode"] == 0,
                             "the start counted as done")
            fleet.used[w1] = 0
            down = await eventually(
                lambda: _targets_with(discovery, ns, lambda t: t.pools.get("decode") == 1
                                      and t.decision_id > up.decision_id), "decode target 1")
            assert "(down)" in down.reason, down.reason
            drained = svc.core.status()["draining"]
            assert len(drained) == 1 and int(drained[0], 16) in (w1, w2)
            assert svc.core.startup.measured == 1
            metrics = svc.metrics.render().decode()
            assert 'genset_planner_target_workers{pool="decode"} 1.0' in metrics
            assert 'genset_planner_scale_events_total{action="up",pool="decode"} 1.0' in metrics
    finally:
        await fleet.stop()


async def _targets_with(discovery, ns, pred):
    try:
        t = await read_targets(discovery, ns)
    except (DiscoveryError, EtcdUnavailable):  # etcd restarting: our client reconnects
        return None
    return t if t is not None and pred(t) else None


async def test_dry_run_prints_decisions_and_writes_nothing(nats_server, etcd_server, bus,
                                                           discovery):
    ns = f"pl-{uuid.uuid4().hex[:8]}"
    fleet = FakeFleet(bus, discovery, ns)
    await fleet.add(used=950)
    fleet.start()
    try:
        async with planner(nats_server.url, etcd_server.endpoint, ns, dry_run=True) as (svc, out):
            def proposal():
                for line in out.getvalue().splitlines():
                    d = json.loads(line)
                    if d["changed"] and d["targets"] == {"decode": 2}:
                        return d
                return None

            d = await eventually(proposal, "a printed scale-up proposal")
            assert d["dry_run"] and d["start"] == {"decode": 1} and "kv" in d["reason"]
            # printed once, not every tick
            await eventually(lambda: svc.core.decision_id == 0 and len(
                out.getvalue().splitlines()) >= 1, "ticks")
            assert sum(1 for ln in out.getvalue().splitlines()
                       if json.loads(ln)["targets"] == {"decode": 2}) == 1
            assert await read_targets(discovery, ns) is None
            assert svc.core.status()["starting"] == {"decode": 0}
    finally:
        await fleet.stop()


async def test_bad_messages_are_counted_not_fatal(nats_server, etcd_server, bus, discovery):
    ns = f"pl-{uuid.uuid4().hex[:8]}"
    fleet = FakeFleet(bus, discovery, ns)
    wid = await fleet.add(used=100)
    async with planner(nats_server.url, etcd_server.endpoint, ns) as (svc, _):
        await bus.publish(subjects.load_report(ns, wid), b"\x00not msgpack")
        await bus.publish(subjects.frontend_stats(ns), proto.encode(
            {"v": 1, "frontend_id": 1, "ts_ms": 0, "window_ms": 0}))  # window must be > 0
        await bus.publish(subjects.frontend_stats(ns), proto.FrontendStats(
            frontend_id=1, ts_ms=0, window_ms=1000, arrivals=3, prompt_tokens=300))
        await bus.publish(subjects.step_stats(ns, wid), proto.WorkerStepStats(
            worker_id=wid, samples=[proto.StepSample(prefill_tokens=512, ms=20.0)]))
        await eventually(lambda: svc.core.model.observed == 1, "a step sample")
        await eventually(lambda: svc.core.forecaster.total_arrivals == 3, "the arrivals")
        metrics = await eventually(
            lambda: (m := svc.metrics.render().decode()) and
            'genset_planner_bad_messages_total{kind="frontend_stats"} 1.0' in m and m,
            "bad messages counted")
        assert 'genset_planner_bad_messages_total{kind="load_report"} 1.0' in metrics
        await eventually(lambda: svc.last_decision is not None, "decisions go on")


async def test_a_worker_cannot_speak_for_another(nats_server, etcd_server, bus, discovery):
    """NATS permissions let a worker publish only under its own id; a load report, KV
    events or step samples naming another worker on its subject are ignored (counted), and
    step samples of a worker not in etcd do not feed the performance model."""
    ns = f"pl-{uuid.uuid4().hex[:8]}"
    fleet = FakeFleet(bus, discovery, ns)
    a, b = await fleet.add(), await fleet.add()
    async with planner(nats_server.url, etcd_server.endpoint, ns) as (svc, _):
        await eventually(lambda: a in svc.core.workers and b in svc.core.workers, "both cards")
        # a, on its own subjects, speaking for b: full KV, cache blocks, step samples
        await bus.publish(subjects.load_report(ns, a), proto.LoadReport(
            worker_id=b, ts_ms=0, running=50, kv_used_blocks=1000, kv_total_blocks=1000))
        await bus.publish(subjects.kv_events(ns, a), proto.KvEventBatch(
            worker_id=b, event_id=1, events=[proto.Stored(blocks=[
                proto.StoredBlock(hash=h) for h in range(1, 9)])]))
        await bus.publish(subjects.step_stats(ns, a), proto.WorkerStepStats(
            worker_id=b, samples=[proto.StepSample(prefill_tokens=512, ms=1e6)]))
        # a worker nobody registered, on its own subject
        stranger = 0xdead
        await bus.publish(subjects.step_stats(ns, stranger), proto.WorkerStepStats(
            worker_id=stranger, samples=[proto.StepSample(prefill_tokens=512, ms=1e6)]))
        # then a's own messages, on the same subjects (so they arrive after the forged ones)
        await bus.publish(subjects.load_report(ns, a), proto.LoadReport(
            worker_id=a, ts_ms=0, running=7, kv_used_blocks=10, kv_total_blocks=1000))
        await bus.publish(subjects.kv_events(ns, a), proto.KvEventBatch(
            worker_id=a, event_id=1, events=[proto.Stored(blocks=[proto.StoredBlock(hash=99)])]))
        await bus.publish(subjects.step_stats(ns, a), proto.WorkerStepStats(
            worker_id=a, samples=[proto.StepSample(prefill_tokens=512, ms=20.0)]))
        await eventually(lambda: (w := svc.core.workers[a]).load and w.load.running == 7,
                         "a's own load report")
        await eventually(lambda: svc.core.cache.held(a) == 1, "a's own KV event")
        await eventually(lambda: svc.core.model.observed >= 1, "a's own step sample")
        assert svc.core.workers[b].load is None
        assert svc.core.cache.held(b) == 0
        assert svc.core.model.observed == 1
        metrics = svc.metrics.render().decode()
        for kind in ("load_report", "kv_events", "step_stats"):
            assert (f'genset_planner_ignored_messages_total{{kind="{kind}",'
                    f'reason="wrong_subject"}} 1.0') in metrics
        assert ('genset_planner_ignored_messages_total{kind="step_stats",'
                'reason="unknown_worker"} 1.0') in metrics


async def test_huge_latency_samples_are_dropped_and_the_dry_run_output_stays_json(
        nats_server, etcd_server, bus, discovery):
    """Samples near the float limit are finite, so they pass the message's checks: their sum
    overflowed to inf (printed as `Infinity`, not JSON) and a TTFT of 1e308 ms pushed the
    pools up. Past MAX_LATENCY_MS the window is dropped (counted); samples at the bound are
    taken, and the dry-run output stays JSON."""
    ns = f"pl-{uuid.uuid4().hex[:8]}"
    fleet = FakeFleet(bus, discovery, ns)
    await fleet.add(used=100)
    fleet.start()
    try:
        async with planner(nats_server.url, etcd_server.endpoint, ns, dry_run=True) as (svc, out):
            await bus.publish(subjects.frontend_stats(ns), proto.FrontendStats(
                frontend_id=1, ts_ms=0, window_ms=1000, arrivals=1, prompt_tokens=100,
                finished=1, output_tokens=10, ttft_ms=[1e308] * 4, itl_ms=[1e308] * 4))
            await bus.publish(subjects.frontend_stats(ns), proto.FrontendStats(
                frontend_id=1, ts_ms=0, window_ms=1000, arrivals=1, prompt_tokens=100,
                finished=1, output_tokens=10, ttft_ms=[MAX_LATENCY_MS] * 4,
                itl_ms=[MAX_LATENCY_MS] * 4))
            await eventually(lambda: svc.core.itl.count(svc.core.now_ms()) == 4, "the samples")
            assert svc.core.forecaster.total_arrivals == 1  # the first window was dropped
            assert ('genset_planner_ignored_messages_total{kind="frontend_stats",'
                    'reason="implausible"} 1.0') in svc.metrics.render().decode()
            await eventually(lambda: svc.last_decision is not None and
                             "itl_observed_ms" in svc.last_decision.inputs, "a decision")
            assert svc.last_decision.inputs["itl_observed_ms"] == pytest.approx(MAX_LATENCY_MS)

            def refuse(name):
                raise AssertionError(f"{name} in the dry-run output")
            lines = out.getvalue().splitlines()
            assert lines
            for ln in lines:
                json.loads(ln, parse_constant=refuse)
    finally:
        await fleet.stop()


async def test_implausible_claims_are_dropped_whole_and_counted(nats_server, etcd_server, bus,
                                                               discovery):
    """A frontend claiming 2**63 arrivals, a frontend claiming more prompt tokens than its
    requests can hold, a worker claiming an impossible step, a worker claiming a billion
    waiting requests, a router claiming a prompt past any context: each message is dropped
    whole (none of its fields used), counted as implausible, and the pools stay where the
    honest inputs put them. An honest window, sent after them on the same subject, is taken."""
    ns = f"pl-{uuid.uuid4().hex[:8]}"
    fleet = FakeFleet(bus, discovery, ns)
    wid = await fleet.add(used=100)
    async with planner(nats_server.url, etcd_server.endpoint, ns) as (svc, _):
        await eventually(lambda: wid in svc.core.workers, "the card")
        assert svc._max_request_tokens() == 4096  # the card's context length
        await bus.publish(subjects.frontend_stats(ns), proto.FrontendStats(
            frontend_id=0xBAD, ts_ms=0, window_ms=1000, arrivals=2**63 - 1,
            prompt_tokens=2**63 - 1))
        await bus.publish(subjects.frontend_stats(ns), proto.FrontendStats(
            frontend_id=0xBAD, ts_ms=0, window_ms=1000, arrivals=10,
            prompt_tokens=10 * 4096 + 1))
        await bus.publish(subjects.step_stats(ns, wid), proto.WorkerStepStats(
            worker_id=wid, samples=[proto.StepSample(prefill_tokens=512, ms=20.0),
                                    proto.StepSample(prefill_tokens=2**40, ms=20.0)]))
        await bus.publish(subjects.load_report(ns, wid), proto.LoadReport(
            worker_id=wid, ts_ms=0, running=1, waiting=10**9, kv_used_blocks=100,
            kv_total_blocks=1000))
        # then honest messages on the same subjects (so they arrive after the others)
        await bus.publish(subjects.frontend_stats(ns), proto.FrontendStats(
            frontend_id=0xF00D, ts_ms=0, window_ms=1000, arrivals=3, prompt_tokens=300))
        await bus.publish(subjects.step_stats(ns, wid), proto.WorkerStepStats(
            worker_id=wid, samples=[proto.StepSample(prefill_tokens=512, ms=20.0)]))
        await bus.publish(subjects.load_report(ns, wid), proto.LoadReport(
            worker_id=wid, ts_ms=0, running=7, kv_used_blocks=100, kv_total_blocks=1000))
        await eventually(lambda: svc.core.forecaster.total_arrivals == 3, "the honest window")
        await eventually(lambda: svc.core.model.observed == 1, "the honest step")
        await eventually(lambda: (w := svc.core.workers[wid]).load and w.load.running == 7,
                         "the honest load report")
        metrics = svc.metrics.render().decode()
        for kind, n in (("frontend_stats", 2), ("step_stats", 1), ("load_report", 1)):
            assert (f'genset_planner_ignored_messages_total{{kind="{kind}",'
                    f'reason="implausible"}} {n}.0') in metrics, kind
        await eventually(lambda: svc.last_decision is not None, "decisions go on")
        assert svc.last_decision.pools["decode"].target < 8  # not taken to the ceiling


async def test_an_implausible_route_decision_is_dropped(nats_server, etcd_server, bus,
                                                       discovery):
    """Router decisions are the arrival signal while no frontend publishes statistics: one
    claiming a prompt past every context is dropped (counted), an honest one is taken."""
    ns = f"pl-{uuid.uuid4().hex[:8]}"
    fleet = FakeFleet(bus, discovery, ns)
    wid = await fleet.add(used=100)
    async with planner(nats_server.url, etcd_server.endpoint, ns) as (svc, _):
        await eventually(lambda: wid in svc.core.workers, "the card")
        for prompt_tokens in (10**9, 100):
            await bus.publish(subjects.route_decisions(ns), proto.RouteDecision(
                request_id="r", worker_id=wid, prompt_tokens=prompt_tokens, router_id=0xBAD))
        await eventually(lambda: svc.core.forecaster.total_arrivals == 1, "the honest one")
        assert ('genset_planner_ignored_messages_total{kind="route_decision",'
                'reason="implausible"} 1.0') in svc.metrics.render().decode()


@pytest.mark.slow
async def test_nats_and_etcd_outages_hold_the_last_targets(own_nats, own_etcd):
    """NATS away: no load reports, the planner holds (never scales to zero, nor down). etcd
    away: target writes fail and are retried; the pools stay as they were."""
    ns = f"pl-{uuid.uuid4().hex[:8]}"
    bus = await Bus.connect(own_nats.url, name="fleet", namespace=ns)
    disc = await Discovery.connect(own_etcd.endpoint, ttl=10)
    fleet = FakeFleet(bus, disc, ns)
    await fleet.add(used=500)
    await fleet.add(used=500)
    fleet.start()
    try:
        async with planner(own_nats.url, own_etcd.endpoint, ns, down_cooldown_s=1.0,
                           stale_s=1.0) as (svc, _):
            await eventually(lambda: _targets_with(disc, ns, lambda t: t.pools == {"decode": 2}),
                             "targets for the two workers")
            own_nats.stop()
            await eventually(lambda: "unknown" in svc.last_decision.pools["decode"].reason,
                             "the planner noticing the silence")
            held = [svc.tick() for _ in range(20)]
            assert all(d.targets == {"decode": 2} and not d.changed for d in held)
            own_nats.start()
            await eventually(lambda: svc.last_decision.pools["decode"].action != "hold",
                             "reports back")
            own_etcd.stop()
            fleet.used = dict.fromkeys(fleet.used, 0)  # idle now: it may shrink, never to 0
            await eventually(lambda: svc.core.targets()["decode"] == 1, "a scale-down")
            await eventually(lambda: 'genset_planner_target_writes_total{outcome="failed"}'
                             in svc.metrics.render().decode(), "a failed write")
            assert svc.core.targets()["decode"] >= 1
            own_etcd.start()
            await eventually(lambda: _targets_with(disc, ns, lambda t: t.pools == {"decode": 1}),
                             "the write retried once etcd is back", deadline_s=60)
    finally:
        await fleet.stop()
        await disc.close()
        await bus.close()
