"""`genset planner`: sizes the worker pools and applies the sizes through a connector.

Inputs (all already on the bus or in etcd):
- membership: the workers' model cards (`proto.keys.models_prefix`: role, KV capacity) and
  instance records (host, pid: to find the process or pod to drain);
- `LoadReport`s (KV use, waiting prompt tokens, running) from every worker;
- `FrontendStats` (arrivals, lengths, TTFT/ITL) from frontends, else the router replicas'
  `RouteDecision`s as the arrival signal;
- `WorkerStepStats` (engine step timings) for the SLO policy's performance model;
- KV events, to know which worker holds cache no other worker has (drain choice).

Each tick (`--interval`) the `PlannerCore` decides. A change is logged with its inputs,
written to etcd (`proto.keys.planner_targets`, `PlannerTargets` with the reason) and handed to
the connector; `--dry-run` prints the decisions and writes and starts nothing. A connector or
etcd that fails is reported (log, metric) and retried with backoff; the planner never stops
for it, and with its inputs gone silent (NATS away) it holds the last targets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import proto
from genset.planning import (
    POLICIES,
    ROLE_PREFILL,
    ROLES,
    Decision,
    LoadPolicyConfig,
    PlannerConfig,
    PlannerCore,
    PoolBounds,
    SloPolicyConfig,
)
from genset.planning.actuation import DrainRequest, ScaleChange
from genset.planning.observations import (
    MAX_TOKENS_PER_REQUEST,
    implausible_load,
    implausible_route,
    implausible_step,
    implausible_traffic,
)
from genset.planning.perf_model import MAX_STEP_MS
from genset.runtime.config import opt
from genset.runtime.logging import LogThrottle
from genset.runtime.service import Service
from proto import keys, subjects
from services.planner.connectors import (
    CONNECTORS,
    ComposeConnector,
    Connector,
    KubernetesConnector,
    LocalConnector,
    ProcessLauncher,
    parse_role_map,
)
from services.planner.metrics import PlannerMetrics

APPLY_QUEUE = 64  # changes waiting for the connector; the oldest absolute one goes first
# A flood of implausible messages is one warning line per this many seconds at most, each
# naming the publisher and field of the message that triggered it and counting the others.
IMPLAUSIBLE_WARN_EVERY_S = 10.0
BACKOFF_FIRST_S, BACKOFF_CAP_S = 1.0, 30.0


def split_flag(value: str, flag: str) -> list[str]:
    """A flag's command line split as a shell would; ValueError naming the flag when it
    cannot be (a quote left open)."""
    try:
        return shlex.split(value)
    except ValueError as exc:
        raise ValueError(f"{flag} {value!r}: {exc}") from None


@dataclass
class PlannerOptions:
    policy: str = field(default="load", metadata=opt(
        "load: KV use and waiting prompt tokens; slo: the smallest pools meeting --ttft-ms "
        "and --itl-ms at the forecast load", choices=POLICIES))
    pools: str = field(default="decode", metadata=opt(
        "worker roles to manage, comma separated (decode, prefill, both)"))
    min_workers: int = field(default=1, metadata=opt(
        "floor of each serving pool (decode / both)", min=1))
    max_workers: int = field(default=8, metadata=opt("ceiling of each serving pool", min=1))
    min_prefill: int = field(default=0, metadata=opt("floor of the prefill pool", min=0))
    max_prefill: int = field(default=8, metadata=opt("ceiling of the prefill pool", min=0))
    ttft_ms: float = field(default=1000.0, metadata=opt("SLO: time to first token", min=1))
    itl_ms: float = field(default=50.0, metadata=opt("SLO: inter-token latency", min=0.1))
    kv_high: float = field(default=0.8, metadata=opt(
        "load: mean KV use above which a pool grows", min=0.05, max=1.0))
    kv_target: float = field(default=0.6, metadata=opt(
        "load: mean KV use a pool is sized to after a change", min=0.01, max=0.99))
    queue_high_tokens: float = field(default=32768.0, metadata=opt(
        "load: waiting prompt tokens per worker above which a pool grows", min=1))
    down_cooldown_s: float = field(default=60.0, metadata=opt(
        "a pool shrinks only after needing fewer workers for this long", min=1))
    prior_memory_s: float = field(default=600.0, metadata=opt(
        "start prior: for this long after it starts the planner keeps at least the pool it "
        "found, times the share of this time still to watch (0: none)", min=0))
    startup_s: float = field(default=30.0, metadata=opt(
        "worker start-up time assumed until one is measured", min=0.1))
    startup_timeout_s: float = field(default=600.0, metadata=opt(
        "a worker not registered this long after it was asked for is given up and retried",
        min=1))
    stale_s: float = field(default=10.0, metadata=opt(
        "load reports older than this are unknown load: the planner holds", min=0.5))
    interval_s: float = field(default=1.0, metadata=opt("seconds between decisions", min=0.05))
    dry_run: bool = field(default=False, metadata=opt(
        "print the decisions only: write no targets, start and stop nothing"))
    connector: str = field(default="local", metadata=opt(
        "how targets are applied: local processes, docker compose, kubernetes, or none "
        "(targets in etcd only)", choices=CONNECTORS))
    worker_args: str = field(default="--engine mocker --model tiny", metadata=opt(
        "local: flags for each started `genset worker` besides role, NATS, etcd and namespace"
        " (give it as --worker-args='--engine torch ...')"))
    worker_log_dir: str = field(default=".state/logs", metadata=opt(
        "local: where started workers write their logs"))
    compose_file: str = field(default="", metadata=opt("compose: the compose file (-f)"))
    compose_project: str = field(default="", metadata=opt("compose: the project name (-p)"))
    compose_command: str = field(default="docker compose", metadata=opt(
        "compose: the compose command"))
    compose_services: str = field(default="decode=decode,prefill=prefill", metadata=opt(
        "compose: role=service pairs"))
    k8s_namespace: str = field(default="default", metadata=opt(
        "kubernetes: namespace of the worker Deployments"))
    k8s_deployments: str = field(default="decode=decode,prefill=prefill",
                                 metadata=opt("kubernetes: role=Deployment pairs"))
    k8s_api: str = field(default="", metadata=opt(
        "kubernetes: API URL (e.g. kubectl proxy's); default: kubeconfig, else in-cluster"))
    kubeconfig: str = field(default="", metadata=opt("kubernetes: kubeconfig file"))
    apply_timeout_s: float = field(default=120.0, metadata=opt(
        "deadline of one connector call", min=1))
    track_cache: bool = field(default=True, metadata=opt(
        "follow KV events to drain the worker holding the least cache no one else has"))

    def __post_init__(self) -> None:
        pools = self.pool_list()
        if not pools:
            raise ValueError("--pools names no pool")
        for role in pools:
            if role not in ROLES:
                raise ValueError(f"--pools: unknown role {role!r} (use {', '.join(ROLES)})")
        if self.max_workers < self.min_workers:
            raise ValueError(f"--max-workers {self.max_workers} is below --min-workers "
                             f"{self.min_workers}")
        if self.max_prefill < self.min_prefill:
            raise ValueError(f"--max-prefill {self.max_prefill} is below --min-prefill "
                             f"{self.min_prefill}")
        if not self.kv_target < self.kv_high:
            raise ValueError(f"--kv-target {self.kv_target} must be below --kv-high "
                             f"{self.kv_high}")
        parse_role_map(self.compose_services, "--compose-services")
        parse_role_map(self.k8s_deployments, "--k8s-deployments")
        # a quote left open is a usage error now, not once the planner has started
        if self.connector == "compose" and not split_flag(self.compose_command,
                                                          "--compose-command"):
            raise ValueError("--compose-command is empty")
        if self.connector == "local":
            self.worker_argv()

    def worker_argv(self) -> list[str]:
        """--worker-args as a shell would split it (a quoted path with spaces stays one)."""
        return split_flag(self.worker_args, "--worker-args")

    def pool_list(self) -> list[str]:
        return [p.strip() for p in self.pools.split(",") if p.strip()]

    def planner_config(self) -> PlannerConfig:
        bounds = {}
        for role in self.pool_list():
            if role == ROLE_PREFILL:
                bounds[role] = PoolBounds(self.min_prefill, self.max_prefill)
            else:
                bounds[role] = PoolBounds(self.min_workers, self.max_workers)
        return PlannerConfig(
            policy=self.policy, pools=bounds,
            load=LoadPolicyConfig(kv_high=self.kv_high, kv_target=self.kv_target,
                                  queue_high_tokens=self.queue_high_tokens,
                                  queue_target_tokens=self.queue_high_tokens / 2),
            slo=SloPolicyConfig(ttft_ms=self.ttft_ms, itl_ms=self.itl_ms),
            down_cooldown_s=self.down_cooldown_s, prior_memory_s=self.prior_memory_s,
            startup_s=self.startup_s,
            startup_timeout_s=self.startup_timeout_s, stale_s=self.stale_s,
            horizon_extra_s=2 * self.interval_s, dry_run=self.dry_run)


def monotonic_ms() -> float:
    return time.monotonic() * 1000.0


def input_subjects(ns: str, *, track_cache: bool) -> dict[str, str]:
    """What the planner reads from the bus, by kind. The planner role's NATS permissions
    (`genset.runtime.auth`) must allow each: a refused subscription is only a warning, and
    the planner would plan without it (tests/test_security.py checks them together)."""
    out = {"load": subjects.load_report_all(ns), "stats": subjects.frontend_stats(ns),
           "steps": subjects.step_stats_all(ns), "route": subjects.route_decisions(ns)}
    if track_cache:  # which cache only one worker holds: what draining it would lose
        out["kv"] = subjects.kv_events_all(ns)
    return out


class PlannerService(Service):
    component = "planner"

    def __init__(self, config, options: PlannerOptions | None = None, *,
                 connector: Connector | None = None, out=None) -> None:
        super().__init__(config)
        self.options = o = options or PlannerOptions()
        self.core = PlannerCore(o.planner_config(), clock=monotonic_ms)
        self.pm = PlannerMetrics(self.metrics)
        self.connector = connector
        self.out = out or sys.stdout
        self.cards: dict[str, proto.ModelCard] = {}
        self.records: dict[int, proto.InstanceRecord] = {}
        self._subs: list = []
        self._watches: list = []
        self._tasks: list[asyncio.Task] = []
        self._changes: asyncio.Queue[ScaleChange] = asyncio.Queue(maxsize=APPLY_QUEUE)
        self._targets_record: proto.PlannerTargets | None = None  # to write (None: written)
        self._last_printed: tuple | None = None
        self._last_hold: dict[str, str] = {}
        self._frontend_seen_ms: float | None = None
        self._written_once = False  # the first targets record (as found at start) went out
        self.last_decision: Decision | None = None
        # The largest context length of any model card seen (0: none yet), and whether some
        # card had none: what bounds one request's tokens (`_max_request_tokens`). Never
        # lowered: a window may still count requests for a model whose last card just left.
        self._max_context = 0
        self._context_unknown = False
        self._implausible_warn = LogThrottle(IMPLAUSIBLE_WARN_EVERY_S)

    # -------------------------------------------------------------- lifecycle
    def make_connector(self) -> Connector:
        o, c = self.options, self.config
        if o.dry_run or o.connector == "none":
            return Connector()
        if o.connector == "compose":
            return ComposeConnector(parse_role_map(o.compose_services, "--compose-services"),
                                    command=o.compose_command, file=o.compose_file,
                                    project=o.compose_project, timeout_s=o.apply_timeout_s)
        if o.connector == "kubernetes":
            return KubernetesConnector(o.k8s_namespace,
                                       parse_role_map(o.k8s_deployments, "--k8s-deployments"),
                                       api_url=o.k8s_api, kubeconfig=o.kubeconfig,
                                       timeout_s=o.apply_timeout_s)
        tail = ["--nats", c.nats, "--etcd", c.etcd, "--namespace", c.namespace,
                "--log-format", "json", "--log-level", c.log_level,
                "--lease-ttl", str(c.lease_ttl), *o.worker_argv()]
        env = {name: value for name, value in (
            ("GENSET_NATS_USER", c.nats_user), ("GENSET_NATS_PASSWORD", c.nats_password),
            ("GENSET_NATS_TOKEN", c.nats_token), ("GENSET_NATS_CA", c.nats_ca),
            ("GENSET_ETCD_USER", c.etcd_user), ("GENSET_ETCD_PASSWORD", c.etcd_password),
            ("GENSET_ETCD_CA", c.etcd_ca)) if value}
        return LocalConnector(ProcessLauncher(tail, Path(o.worker_log_dir), env))

    async def start(self) -> None:
        o, ns = self.options, self.namespace
        if self.connector is None:
            self.connector = self.make_connector()
        with contextlib.suppress(Exception):  # informational only
            prev = await self.discovery.get(keys.planner_targets(ns), proto.PlannerTargets)
            if prev is not None:
                self.log.info("previous planner targets", pools=prev.pools, reason=prev.reason)
        for prefix, kind, listener in (
                (keys.instances_prefix(ns), proto.InstanceRecord, self._on_record),
                (keys.models_prefix(ns), proto.ModelCard, self._on_card)):
            try:
                watch = await self.discovery.watch(prefix, kind)
            except Exception as exc:  # etcd away: start empty, fill in when it answers
                self.log.warning("etcd not answering; starting with no workers",
                                 error=repr(exc))
                watch = await self.discovery.watch(prefix, kind, require_initial=False)
            for key, value in list(watch.items.items()):
                listener("put", key, value)
            watch.add_listener(listener)
            self._watches.append(watch)
        handlers = {"load": self._on_load, "stats": self._on_stats, "steps": self._on_steps,
                    "route": self._on_route, "kv": self._on_kv}
        for name, subject in input_subjects(ns, track_cache=o.track_cache).items():
            self._subs.append(await self.bus.subscribe(subject, handlers[name]))
        self._tasks.append(asyncio.create_task(self._tick_loop(), name="planner-ticks"))
        if not o.dry_run:
            self._tasks.append(asyncio.create_task(self._apply_loop(), name="planner-apply"))
        self.labels = {"policy": o.policy, "connector": "dry-run" if o.dry_run else o.connector,
                       "pools": ",".join(o.pool_list())}
        self.log.info("planner ready", policy=o.policy, pools=self.core.config.pools,
                      connector=self.labels["connector"], workers=len(self.core.workers))

    async def drain(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        for w in self._watches:
            with contextlib.suppress(Exception):
                await w.close()
        self._watches.clear()
        if self.connector is not None:
            with contextlib.suppress(Exception):
                await self.connector.close()

    def health(self) -> dict:
        h = super().health()
        h["planner"] = self.core.status()
        if self.last_decision is not None:
            h["reason"] = self.last_decision.reason
        return h

    # -------------------------------------------------------------- membership
    def _on_card(self, kind: str, key: str, card) -> None:
        if not isinstance(card, proto.ModelCard):
            return
        if kind == "put":
            self.cards[key] = card
            if card.context_length > 0:
                self._max_context = max(self._max_context, card.context_length)
            else:
                self._context_unknown = True
            self.core.worker_up(card.instance_id, card.role, kv_blocks=card.kv_blocks,
                                block_size=card.block_size, max_running=card.max_running)
        else:
            self.cards.pop(key, None)
            # one worker may serve under several cards: it is gone when its last card is
            if not any(c.instance_id == card.instance_id for c in self.cards.values()):
                self.core.worker_down(card.instance_id)

    def _on_record(self, kind: str, key: str, rec) -> None:
        if not isinstance(rec, proto.InstanceRecord) or rec.component not in ROLES:
            return
        if kind == "put":
            self.records[rec.instance_id] = rec
        else:
            self.records.pop(rec.instance_id, None)

    # -------------------------------------------------------------- bus inputs
    def _decode(self, data: bytes, kind: type, name: str):
        try:
            return proto.decode(data, kind)
        except proto.ProtocolError as exc:
            self.log.warning("bad message ignored", kind=name, error=str(exc))
            self.pm.bad.labels(name).inc()
            return None

    def _from_own_subject(self, name: str, subject: str, worker_id: int) -> bool:
        """A per-worker message must name the worker whose subject it came on: NATS
        permissions let a worker publish only under its own id, and without this check any
        one worker could speak for every other (say a busy worker is idle, so it is the one
        drained). The routers check the same (genset.routing.feeds)."""
        if subject.rsplit(".", 1)[-1] == subjects.instance_token(worker_id):
            return True
        # debug, not warning: a flood of forged messages must not become a flood of logs
        self.log.debug("message ignored", kind=name, reason="wrong_subject",
                       worker=f"{worker_id:x}", subject=subject)
        self.pm.ignored.labels(name, "wrong_subject").inc()
        return False

    def _max_request_tokens(self) -> int:
        """Tokens one request may have (prompt, or output): the largest context length among
        the model cards seen (a frontend refuses more before counting a request), else, with
        none seen or one without a context length, `MAX_TOKENS_PER_REQUEST`, which also caps
        it (a card is what a worker says of itself: one claiming a context of 2**60 tokens
        must not lift the bound)."""
        if self._max_context and not self._context_unknown:
            return min(self._max_context, MAX_TOKENS_PER_REQUEST)
        return MAX_TOKENS_PER_REQUEST

    def _implausible(self, name: str, field_name: str | None, publisher: str) -> bool:
        """True (and the message is dropped whole, counted, logged at most every
        `IMPLAUSIBLE_WARN_EVERY_S`) when a field is past what any honest publisher sends
        (`genset.planning.observations`): a warning, as a bug or an attack, but throttled,
        so that a flood of them is not a flood of logs."""
        if field_name is None:
            return False
        self.pm.ignored.labels(name, "implausible").inc()
        since = self._implausible_warn.hit()
        if since:
            self.log.warning("implausible message dropped", kind=name, publisher=publisher,
                             field=field_name, dropped_since_last_line=since)
        return True

    async def _on_load(self, msg) -> None:
        report = self._decode(msg.data, proto.LoadReport, "load_report")
        if report is None or not self._from_own_subject("load_report", msg.subject,
                                                        report.worker_id):
            return
        if self._implausible("load_report", implausible_load(
                report.running, report.waiting, report.waiting_prefill_tokens,
                self._max_request_tokens()), f"worker {report.worker_id:x}"):
            return
        self.core.observe_load_report(report)

    async def _on_stats(self, msg) -> None:
        stats = self._decode(msg.data, proto.FrontendStats, "frontend_stats")
        if stats is None:
            return
        if self._implausible("frontend_stats", implausible_traffic(
                window_ms=stats.window_ms, arrivals=stats.arrivals,
                prompt_tokens=stats.prompt_tokens, cached_tokens=stats.cached_tokens,
                finished=stats.finished, failed=stats.failed,
                output_tokens=stats.output_tokens, ttft_ms=stats.ttft_ms, itl_ms=stats.itl_ms,
                max_request_tokens=self._max_request_tokens()),
                f"frontend {stats.frontend_id:x}"):
            return  # and not a heartbeat either: a liar's window does not say "no traffic"
        self._frontend_seen_ms = monotonic_ms()
        self.core.observe_frontend_stats(stats)

    async def _on_steps(self, msg) -> None:
        steps = self._decode(msg.data, proto.WorkerStepStats, "step_stats")
        if steps is None or not self._from_own_subject("step_stats", msg.subject,
                                                       steps.worker_id):
            return
        if steps.worker_id not in self.core.workers:  # only workers in etcd feed the model
            self.pm.ignored.labels("step_stats", "unknown_worker").inc()
            return
        for s in steps.samples:
            if self._implausible("step_stats", implausible_step(
                    s.prefill_tokens, s.decode_seqs, s.ms, MAX_STEP_MS),
                    f"worker {steps.worker_id:x}"):
                return  # all of them: one impossible sample discredits its neighbours
        for s in steps.samples:
            self.core.observe_step(s.prefill_tokens, s.decode_seqs, s.kv_usage, s.ms)

    async def _on_route(self, msg) -> None:
        # Arrivals from router decisions only while no frontend publishes its statistics
        # (counting both would count every request twice).
        seen = self._frontend_seen_ms
        if seen is not None and monotonic_ms() - seen < self.options.stale_s * 1000:
            return
        d = self._decode(msg.data, proto.RouteDecision, "route_decision")
        if d is None or d.worker_id is None:
            return
        if self._implausible("route_decision", implausible_route(
                d.prompt_tokens, d.overlap_blocks, self._max_request_tokens()),
                f"router {d.router_id:x}"):
            return
        w = self.core.workers.get(d.worker_id)
        bs = (w.block_size if w and w.block_size else 16)
        self.core.observe_arrival(d.prompt_tokens,
                                  cached_tokens=min(d.prompt_tokens, d.overlap_blocks * bs))

    async def _on_kv(self, msg) -> None:
        batch = self._decode(msg.data, proto.KvEventBatch, "kv_events")
        if batch is not None and self._from_own_subject("kv_events", msg.subject,
                                                        batch.worker_id):
            self.core.observe_kv_batch(batch)

    # -------------------------------------------------------------- deciding
    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.interval_s)
            try:
                self.tick()
                await self._write_targets()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in one tick must not end the planner
                self.log.exception("planner tick failed")

    def tick(self) -> Decision:
        d = self.core.decide()
        self.last_decision = d
        self.pm.record(d)
        if self.options.dry_run:
            self._print(d)
            return d
        if d.changed:
            self.log.info("planner decision", decision_id=d.decision_id, targets=d.targets,
                          start=d.start, drain=[f"{w:x}" for w in d.drain], reason=d.reason,
                          inputs={k: round(v, 4) for k, v in d.inputs.items()})
            self._targets_record = self._record(d)
            self._enqueue(self._change(d))
        else:
            self._log_holds(d)
        if self._targets_record is None and not self._written_once:
            self._targets_record = self._record(d)  # the targets as found at start
        return d

    def _log_holds(self, d: Decision) -> None:
        for role, p in d.pools.items():
            kind = p.action + ":" + p.reason.split(":")[0] if p.action == "hold" else p.action
            if self._last_hold.get(role) != kind:
                self._last_hold[role] = kind
                if p.action == "hold":
                    self.log.info("planner holding", pool=role, target=p.target,
                                  reason=p.reason)

    def _print(self, d: Decision) -> None:
        key = (tuple(sorted(d.targets.items())), tuple(sorted(d.start.items())),
               tuple(d.drain), tuple(p.action for p in d.pools.values()))
        if key == self._last_printed:
            return
        self._last_printed = key
        line = {"dry_run": True, "changed": d.changed, "targets": d.targets, "start": d.start,
                "drain": [f"{w:x}" for w in d.drain], "reason": d.reason,
                "inputs": {k: round(v, 4) for k, v in d.inputs.items()}}
        print(json.dumps(line), file=self.out, flush=True)

    def _record(self, d: Decision) -> proto.PlannerTargets:
        return proto.PlannerTargets(
            pools=d.targets, reason=d.reason, ts_ms=int(time.time() * 1000),
            decision_id=d.decision_id, policy=d.policy, planner_id=self.instance_id,
            ready={r: p.ready for r, p in d.pools.items()},
            inputs={k: float(v) for k, v in d.inputs.items()})

    async def _write_targets(self) -> None:
        rec = self._targets_record
        if rec is None or self.options.dry_run:
            return
        try:
            # not under the lease: targets outlive this process (a restarted planner, or an
            # operator acting on them, reads the last ones)
            await self.discovery.put(keys.planner_targets(self.namespace), rec)
        except Exception as exc:
            self.pm.etcd_writes.labels("failed").inc()
            self.log.warning("could not write planner targets; retrying", error=str(exc))
            return
        self.pm.etcd_writes.labels("ok").inc()
        if self._targets_record is rec:
            self._targets_record = None
        self._written_once = True

    def _change(self, d: Decision) -> ScaleChange:
        drains = []
        for wid in d.drain:
            w = self.core.workers.get(wid)
            rec = self.records.get(wid)
            drains.append(DrainRequest(wid, w.role if w else "", rec.host if rec else "",
                                       rec.pid if rec else 0))
        return ScaleChange(d.decision_id, d.targets, dict(d.start), drains, d.reason)

    def _enqueue(self, change: ScaleChange) -> None:
        q = self._changes
        if q.full():  # bounded: the oldest goes (for absolute connectors the newest is all
            # that matters; a local connector would lose deltas, so say it loudly)
            lost = q.get_nowait()
            self.log.error("connector is behind; a change was dropped",
                           decision_id=lost.decision_id)
        q.put_nowait(change)

    # -------------------------------------------------------------- applying
    async def _apply_loop(self) -> None:
        connector = self.connector
        assert connector is not None
        while True:
            change = await self._changes.get()
            delay = BACKOFF_FIRST_S
            while True:
                if connector.absolute:  # only the latest targets matter; keep every drain
                    while not self._changes.empty():
                        newer = self._changes.get_nowait()
                        newer.drain = change.drain + newer.drain
                        change = newer
                try:
                    async with asyncio.timeout(self.options.apply_timeout_s + 5):
                        await connector.apply(change)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # ConnectorError, a timeout, or a connector bug
                    self.pm.applies.labels(connector.name, "failed").inc()
                    self.log.warning("connector failed; retrying", connector=connector.name,
                                     decision_id=change.decision_id, error=str(exc) or repr(exc),
                                     retry_in_s=round(delay, 1))
                    await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                    delay = min(BACKOFF_CAP_S, delay * 2)
                    continue
                self.pm.applies.labels(connector.name, "ok").inc()
                self.core.note_applied(change.decision_id)
                self.log.info("change applied", connector=connector.name,
                              decision_id=change.decision_id, targets=change.targets)
                break
