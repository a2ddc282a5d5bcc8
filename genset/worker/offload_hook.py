"""The KV offload store plugged into a worker (`WorkerHooks`): write-behind of evicted blocks,
onboarding of a prompt's next blocks before it runs.

- `on_evict(blocks)`: the engine handed evicted blocks over with their KV
  (`Engine.hand_over_evictions`, read before their memory was reused); they go to
  `OffloadClient.put_behind`, which queues them (bounded in bytes) and returns: an engine step
  never waits for the store, and what does not fit is dropped and counted.
- `before_run(request, tokens)`: unless the request's `offload_hint` is 0 (the router's view
  of the store has none of its blocks), the prompt's full blocks (all but the last token, which is
  always computed) are hashed; the engine says how many leading ones it holds
  (`Engine.cached_prefix`); one batched lookup asks the store for the longest run of the next
  ones, under `deadline_s`; the run comes back as a `KvImport` that the engine loads and pins
  for the request, which then computes only the rest (with an engine that copies beside its
  compute, only the run's head when the whole run's copy would outlast the prompt's compute:
  `genset.offload.onboard`). No more is asked for than the engine can keep for the request
  beside the ones queued ahead (`Engine.import_room`), and the import is `optional` (the
  engine cuts it to that room again at submission): blocks beyond it would be taken back by
  the head of the queue and evicted before the request ran. When the run goes beyond it, the
  engine holds the whole run in host memory too, within `max_held_bytes` for the whole
  engine (`Engine.hold_onboarded`), and writes what it does not find cached at the request's
  admission; with no room and none to hold: no lookup, `skipped_no_room`.
  Store absent, slow, broken, or a run of nothing: None, and the worker computes the prompt.
  Never an error, never a wait past the deadline (the host also computes the prompt when the
  engine refuses the import's payload). A block the engine refused for its values
  (`KvBlockRefused`, via `import_refused`) is remembered (the last REFUSED_MAX), and later
  lookups stop before it (`skipped_refused` when nothing is left to ask for).
- With no store registered the hand-over is paused (`EvictionHandover.paused`): the engine
  reads no payloads for nobody. Blocks this worker onboarded from the store (the last
  `4 x kv_blocks` of them) are skipped when evicted again (`EvictionHandover.skip`): the
  store has them, and the copy out is the one cost write-behind puts on an engine step.
- An engine that copies out ahead of eviction (the mocker with a D2H bandwidth and
  `offload_copy_ahead_blocks`: `SchedulingCore.copy_ahead`) hands its next blocks to be
  evicted over while they are still cached, in its copy-out lane's idle time; they come to
  `on_evict` like evicted ones, and their eviction later hands nothing over. The split
  (`split_for_core`) counts them as free to evict.

- `report_fields()`: what it measured goes into the worker's load reports
  (`proto.LoadReport.kv_bytes_per_token`, `onboard_ram_gbps`, `onboard_disk_gbps`,
  `prefill_ms_per_token`; 0 until measured), so the router prices this worker's store runs
  with them (`genset.routing.policies.PredictedTTFT`) rather than with its defaults.

A request moved off a dead worker (migration) onboards its prefix here like any other.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import structlog

from genset.engines.core import EVICTED_OVERHEAD  # (what a held block costs: held_size)
from genset.engines.types import EvictedBlock, KvBlockData, KvImport
from genset.kv.hashing import block_hashes
from genset.offload.admission import ADMIT_MODES, admission
from genset.offload.client import OffloadClient
from genset.offload.onboard import overlapped_copy_ms, split_for_core
from genset.runtime.metrics import LATENCY_BUCKETS
from genset.worker.hooks import WorkerContext, WorkerHooks
from proto.offload import OffloadBlock

log = structlog.get_logger("genset.worker.offload")

OFFLOAD_MODES = ("on", "auto", "off")


@dataclass
class OffloadHookConfig:
    deadline_s: float = 0.05  # longest a lookup may delay a request before it computes instead
    max_queue_bytes: int = 64 << 20  # write-behind queue (the client drops beyond it)
    max_onboard_bytes: int = 256 << 20  # payload bytes one request may onboard
    # host memory for onboarded blocks beyond the room the engine's queue leaves, held
    # until their request is admitted (`Engine.hold_onboarded`); 0: such blocks are not
    # looked up (no room: `skipped_no_room`)
    max_held_bytes: int = 256 << 20
    mode: str = "auto"  # on: warn when no store is registered; auto: quietly follow etcd
    # which evicted blocks are shipped (genset.offload.admission): "prompt", "all"
    admit: str = "prompt"
    # What a tier's run costs against computing it again (`onboard_tiers`). Until measured:
    # the fetch from the store's RAM (its reply over the bus), the store's disk read (until a
    # store publishes what it measured), and the engine's prefill per token (0: unknown,
    # until the engine's step log has prompt steps to measure it from; unknown = onboard).
    fetch_gbps: float = 0.5
    disk_gbps: float = 4.0
    recompute_ms_per_token: float = 0.0

    def __post_init__(self) -> None:
        if (self.deadline_s <= 0 or self.max_queue_bytes < 0 or self.max_onboard_bytes <= 0
                or self.max_held_bytes < 0):
            raise ValueError("offload: need deadline_s > 0, max_queue_bytes >= 0, "
                             "max_onboard_bytes > 0, max_held_bytes >= 0")
        if self.mode not in OFFLOAD_MODES:
            raise ValueError(f"offload mode must be one of {OFFLOAD_MODES}, got {self.mode!r}")
        if self.admit not in ADMIT_MODES:
            raise ValueError(f"offload admission must be one of {ADMIT_MODES}, "
                             f"got {self.admit!r}")
        if self.fetch_gbps <= 0 or self.disk_gbps <= 0 or self.recompute_ms_per_token < 0:
            raise ValueError("offload: need fetch_gbps > 0, disk_gbps > 0, "
                             "recompute_ms_per_token >= 0")


ONBOARD_ALL = "all"  # onboard the store's whole run
ONBOARD_RAM = "ram"  # only its leading run in RAM (a disk block is slower than computing it)
ONBOARD_NONE = "none"  # nothing (even a RAM block is slower than computing it)


def onboard_tiers(block_bytes: float, block_tokens: int, recompute_ms_per_token: float,
                  fetch_gbps: float, disk_gbps: float) -> str:
    """Which of the store's tiers are worth onboarding from (pure): a block comes from RAM
    in `block_bytes` / `fetch_gbps` and from disk in that plus the disk read; it is computed
    again in `block_tokens` x `recompute_ms_per_token`. A tier whose blocks take longer than
    that is skipped (a disk tier behind a fast RAM tier: ONBOARD_RAM). Unknown costs (0
    bytes or a recompute estimate of 0): ONBOARD_ALL, as before anything is measured."""
    if block_bytes <= 0 or recompute_ms_per_token <= 0:
        return ONBOARD_ALL
    recompute_ms = block_tokens * recompute_ms_per_token
    fetch_ms = block_bytes / (fetch_gbps * 1e6)  # bytes / (GB/s decimal) -> ms
    if fetch_ms >= recompute_ms:
        return ONBOARD_NONE
    if fetch_ms + block_bytes / (disk_gbps * 1e6) >= recompute_ms:
        return ONBOARD_RAM
    return ONBOARD_ALL


PROBE_EVERY = 16  # of the requests that skip the store as too slow, one looks up anyway
# store blocks the engine refused, remembered so lookups stop before them (`import_refused`):
# a refused block comes only from a faulty or hostile worker, so few are expected; 8 bytes
# of hash and a dict slot each (~100 bytes): ~400 KB at most
REFUSED_MAX = 4096

# A prompt step computes at least this many tokens to count in the recompute estimate (below
# it the step's fixed cost and the decodes riding along dominate the time per token)
MIN_MEASURED_PREFILL = 256


def recompute_ms_per_token(step_log) -> float:
    """The engine's prefill cost per token from its recent steps (`Engine.step_log`: records
    with prefill_tokens and step_ms): the median of step_ms / prefill_tokens over the steps
    that computed at least MIN_MEASURED_PREFILL prompt tokens; 0 when there are none. An
    upper bound (a step's fixed cost and its decodes are in it): a tier is skipped only when
    it is slower than that."""
    rates = sorted(r.step_ms / r.prefill_tokens for r in list(step_log)
                   if getattr(r, "prefill_tokens", 0) >= MIN_MEASURED_PREFILL)
    return rates[len(rates) // 2] if rates else 0.0


class OffloadHook(WorkerHooks):
    """See the module docstring. `instances`: a fixed set of store ids (tests); otherwise the
    stores listed in etcd through `discovery`."""

    def __init__(self, *, discovery=None, metrics=None, config: OffloadHookConfig | None = None,
                 instances: Iterable[int] | None = None) -> None:
        self.discovery = discovery
        self.config = config or OffloadHookConfig()
        self.instances = list(instances) if instances is not None else None
        self.ctx: WorkerContext | None = None
        self.client: OffloadClient | None = None
        self.counts = dict.fromkeys(("lookups", "hits", "misses", "skipped", "skipped_slow",
                                     "skipped_hint", "skipped_no_room", "skipped_refused",
                                     "errors", "onboarded_blocks", "written_blocks",
                                     "split_blocks", "split_all", "refused_blocks"), 0)
        # hashes of store blocks this worker's engine refused for their values (finite but
        # beyond what its model computes: the store cannot check that bound, and keeps them);
        # a lookup stops before one, so each costs one refused import, not one per request.
        # Local, no trust needed; bounded (the oldest forgotten first)
        self._refused: OrderedDict[int, None] = OrderedDict()
        self._block_bytes = 0.0  # measured: an onboarded block's payload, bytes (EWMA)
        self._fetch_gbps = 0.0  # measured: bytes / s of the lookups that brought blocks
        self._m = _Metrics(metrics, self) if metrics is not None else None
        # hashes onboarded lately (in the store: their eviction needs no copy), bounded
        self._onboarded: OrderedDict[int, None] = OrderedDict()
        self._onboarded_max = 4096
        # (the engine's last step record, its step count, its prefill ms per token then)
        self._recompute: tuple = (None, -1, 0.0)

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        client = OffloadClient(ctx.bus, ctx.namespace, discovery=self.discovery,
                               sender_id=ctx.instance_id,
                               max_queue_bytes=self.config.max_queue_bytes)
        client.on_instances = self._instances_changed
        self.client = client
        self._onboarded_max = max(1024, 4 * ctx.engine.card.kv_blocks)
        hold = getattr(ctx.engine, "hold_onboarded", None)
        if hold is not None and self.config.max_held_bytes:
            hold(self.config.max_held_bytes)
        handover = getattr(ctx.engine, "evictions", None)
        if handover is not None:
            handover.skip = self._onboarded
            # which evicted blocks are worth a copy at all (genset.offload.admission)
            handover.admit = admission(self.config.admit)
        await client.start(self.instances)
        self._instances_changed(client.instances)
        if self.config.mode == "on" and not client.instances:
            log.warning("--offload on, but no offload store is registered yet; computing "
                        "every prompt until one is")

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    def _instances_changed(self, instances: tuple[int, ...]) -> None:
        # No store: the engine need not read evicted blocks' payloads at all.
        handover = getattr(self.ctx.engine, "evictions", None) if self.ctx else None
        if handover is not None:
            handover.paused = not instances

    # ---- write-behind -------------------------------------------------------------------
    def on_evict(self, blocks: list[EvictedBlock]) -> None:
        client = self.client
        if client is None:
            return
        self.counts["written_blocks"] += client.put_behind(
            OffloadBlock(hash=b.hash, parent_hash=b.parent_hash, token_ids=b.token_ids or b"",
                         data=b.data or b"")
            for b in blocks)

    # ---- onboarding ---------------------------------------------------------------------
    def tiers_worth(self, block_tokens: int) -> str:
        """`onboard_tiers` with what is measured so far: the bytes and fetch rate of the runs
        onboarded lately, the stores' published disk read rate, the engine's prefill rate
        (each falling back to the configured value)."""
        cfg = self.config
        disk = cfg.disk_gbps
        measured = getattr(self.client, "disk_read_gbps", None)
        if measured:
            disk = measured
        return onboard_tiers(self._block_bytes, block_tokens, self._recompute_rate(),
                             self._fetch_gbps or cfg.fetch_gbps, disk)

    def _recompute_rate(self) -> float:
        """The engine's prefill ms per token from its step log, else the configured value.
        Measured again only once the log has a new step (the median sorts up to 1,024
        records; requests and load reports ask far more often than steps come while idle)."""
        recompute = self.config.recompute_ms_per_token
        engine = self.ctx.engine if self.ctx is not None else None
        log_ = getattr(engine, "step_log", None)
        if log_:
            last, steps = log_[-1], getattr(engine, "num_steps", len(log_))
            at, at_steps, rate = self._recompute
            if at is not last or at_steps != steps:
                rate = recompute_ms_per_token(log_)
                self._recompute = (last, steps, rate)
            recompute = rate or recompute
        return recompute

    def longest_wait_s(self) -> float:
        """A lookup's deadline (the import after it is the engine's, not bounded here)."""
        return self.config.deadline_s

    def report_fields(self) -> dict:
        """What this worker's onboarding costs, as measured so far, for its load reports
        (`proto.LoadReport`; 0: not measured). Bytes and fetch rate come from the same
        lookups (their ratio is a block's fetch time, whatever the payload); the disk rate is
        the store's (its lookup replies); the prefill rate the one `onboard_tiers` weighs
        them against (configured until the engine's steps measure it)."""
        bs = self.ctx.block_size if self.ctx is not None else 0
        return {"kv_bytes_per_token": self._block_bytes / bs if bs else 0.0,
                "onboard_ram_gbps": self._fetch_gbps,
                "onboard_disk_gbps": float(getattr(self.client, "disk_read_gbps", 0.0) or 0.0),
                "prefill_ms_per_token": self._recompute_rate()}

    def _measure_fetch(self, run: list[OffloadBlock], elapsed_s: float) -> None:
        """EWMAs of an onboarded block's bytes and of the fetch rate (bytes / lookup time)."""
        nbytes = sum(len(b.data) for b in run)
        per_block = nbytes / len(run)
        a = 0.2
        self._block_bytes = per_block if not self._block_bytes else (
            self._block_bytes + a * (per_block - self._block_bytes))
        if elapsed_s > 0 and nbytes > 0:
            gbps = nbytes / elapsed_s / 1e9
            self._fetch_gbps = gbps if not self._fetch_gbps else (
                self._fetch_gbps + a * (gbps - self._fetch_gbps))

    async def before_run(self, request, token_ids: list[int]) -> KvImport | None:
        client, ctx = self.client, self.ctx
        if client is None or ctx is None or not client.instances:
            return None
        if getattr(request, "offload_hint", None) == 0:
            # the router's view of the store holds none of the prompt's blocks: the lookup
            # could only miss (proto.GenerateRequest.offload_hint)
            self.counts["skipped_hint"] += 1
            return None
        try:
            bs = ctx.block_size
            full = (len(token_ids) - 1) // bs  # the last token is always computed
            if full <= 0:
                return None
            hashes = block_hashes(token_ids[:full * bs], bs)
            have = ctx.engine.cached_prefix(hashes)
            want = hashes[have:]
            if self._refused:  # a chain is usable only up to a block the engine refused
                for i, h in enumerate(want):
                    if h in self._refused:
                        want = want[:i]
                        if not want:
                            self.counts["skipped_refused"] += 1
                            return None
                        break
            # at most half the engine's blocks for one request (they are pinned until it runs)
            max_blocks = max(1, ctx.engine.card.kv_blocks // 2)
            if not want or have >= max_blocks:
                self.counts["skipped"] += 1
                return None
            # and no more than the engine can keep for it beside the requests queued ahead
            # (the head of the queue would reclaim the rest before this request runs, and
            # they would be evicted unused), pinned in its cache or held in host memory
            # until the request is admitted (`Engine.hold_onboarded`); the engine cuts the
            # import to that again at submission (KvImport.optional)
            max_bytes = self.config.max_onboard_bytes
            room = ctx.engine.import_room()
            if room is not None and room < max_blocks - have:
                hold = ctx.engine.hold_room_bytes() or 0
                if hold > 0:
                    if self._block_bytes:  # what fits pinned, and held beside it
                        max_bytes = min(max_bytes, int(
                            hold + max(0, room) * (self._block_bytes + EVICTED_OVERHEAD)))
                elif room <= 0:
                    self.counts["skipped_no_room"] += 1
                    return None
                else:
                    max_blocks = have + room
            tiers = self.tiers_worth(bs)
            if tiers == ONBOARD_NONE:
                # every PROBE_EVERY-th such request looks up its RAM run anyway, so the fetch
                # rate is measured again (a store that got faster is noticed)
                self.counts["skipped_slow"] += 1
                if self.counts["skipped_slow"] % PROBE_EVERY:
                    return None
                tiers = ONBOARD_RAM
            self.counts["lookups"] += 1
            t0 = time.perf_counter()
            run = await client.lookup(want, self.config.deadline_s,
                                      max_blocks=max_blocks - have,
                                      max_bytes=max_bytes,
                                      ram_only=tiers == ONBOARD_RAM)
            elapsed = time.perf_counter() - t0
            if self._m is not None:
                self._m.latency.observe(elapsed)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never the request's failure: compute instead
            self.counts["errors"] += 1
            log.warning("offload onboarding failed; computing the prompt", error=repr(exc))
            return None
        if not run:
            self.counts["misses"] += 1
            return None
        self.counts["hits"] += 1
        self._measure_fetch(run, elapsed)
        seen = self._onboarded
        for b in run:
            seen[b.hash] = None
            seen.move_to_end(b.hash)
        while len(seen) > self._onboarded_max:
            seen.popitem(last=False)
        # all of the run is remembered as the store's (above), but an engine that copies
        # beside its compute imports only the head whose copy the prompt's compute hides,
        # and computes the tail (genset.offload.onboard)
        keep = self._split(len(run), len(token_ids) - (have + len(run)) * bs)
        if keep <= 0:
            self.counts["split_all"] += 1
            return None
        if keep < len(run):
            self.counts["split_blocks"] += len(run) - keep
            run = run[:keep]
        self.counts["onboarded_blocks"] += len(run)
        if self._m is not None:
            self._m.onboarded.inc(len(run))
        # the prompt goes with the run (its blocks `have`..): the engine keeps each block's
        # tokens, and its eviction later puts the block back with them (verified by the store)
        return KvImport(blocks=[KvBlockData(b.hash, b.data) for b in run],
                        parent_hash=hashes[have - 1] if have else None,
                        token_ids=token_ids, first_block=have, optional=True)

    def import_refused(self, request, kv: KvImport, error: Exception) -> None:
        """The engine refused an onboarded run (host: the prompt is computed). A block it
        names for its values (`KvBlockRefused`) is not asked for again: the store would
        serve it to every request through it. Other refusals (a layout this engine does not
        read, a bad payload) say nothing about one block, and are not remembered."""
        if not kv.optional:  # not an offload hit of this hook's
            return
        index = getattr(error, "block_index", None)
        if not isinstance(index, int) or not 0 <= index < len(kv.blocks):
            return
        refused = self._refused
        refused[kv.blocks[index].hash] = None
        refused.move_to_end(kv.blocks[index].hash)
        while len(refused) > REFUSED_MAX:
            refused.popitem(last=False)
        self.counts["refused_blocks"] += 1

    def _split(self, run_blocks: int, rest_tokens: int) -> int:
        """How many of a run of `run_blocks` to import (`onboard_split` on the engine's own
        copy and prefill model; all of it on an engine whose step waits for its copies)."""
        core = getattr(self.ctx.engine, "core", None)
        try:
            copy_ms = overlapped_copy_ms(core)
            if copy_ms <= 0 or not hasattr(core, "timing"):
                return run_blocks
            return split_for_core(core, run_blocks, copy_ms, rest_tokens, self.ctx.block_size,
                                  known=self._onboarded.__contains__)
        except Exception as exc:  # a model it cannot read: never the request's failure
            log.warning("offload: cannot weigh the run's copy; onboarding it whole",
                        error=repr(exc))
            return run_blocks


class _Metrics:
    def __init__(self, metrics, hook: OffloadHook) -> None:
        self.onboarded = metrics.counter(
            "worker_offload_onboarded_blocks", "KV blocks onboarded from the offload store")
        self.latency = metrics.histogram(
            "worker_offload_onboard_seconds", "time of one onboarding lookup (hit or miss)",
            buckets=LATENCY_BUCKETS)
        lookups = metrics.gauge("worker_offload_lookups",
                                "onboarding lookups so far, by outcome", ["outcome"])
        for outcome in ("hits", "misses", "skipped", "skipped_slow", "skipped_hint",
                        "skipped_no_room", "skipped_refused", "errors"):
            lookups.labels(outcome).set_function(lambda o=outcome: hook.counts[o])
        dropped = metrics.gauge(
            "worker_offload_dropped_writes",
            "evicted blocks not written to the store, by where they were dropped", ["where"])

        def stat(name: str) -> float:
            return hook.client.stats[name] if hook.client is not None else 0

        def handover() -> float:
            h = getattr(hook.ctx.engine, "evictions", None) if hook.ctx else None
            return h.dropped if h is not None else 0

        dropped.labels("handover").set_function(handover)

        def pool_count(name: str) -> float:
            core = getattr(hook.ctx.engine, "core", None) if hook.ctx else None
            sched = getattr(core, "scheduler", None)
            if name == "import_blocks_no_room":
                return getattr(core, name, 0)
            if name in ("num_held_blocks", "num_held_used", "held_bytes"):
                return getattr(sched, name, 0)
            return getattr(getattr(sched, "pool", None), name, 0)

        metrics.gauge(
            "worker_offload_onboarded_unused_blocks",
            "onboarded blocks evicted before any request used them (onboarding wasted)"
        ).set_function(lambda: pool_count("num_imports_evicted_unused"))
        metrics.gauge(
            "worker_offload_onboard_no_room_blocks",
            "onboarded blocks the engine dropped at submission: no room beside the queue "
            "ahead, nor in the host memory it holds them in"
        ).set_function(lambda: pool_count("import_blocks_no_room"))
        held = metrics.gauge(
            "worker_offload_onboard_held_blocks",
            "onboarded blocks held in host memory until their request's admission: held "
            "(taken), used (written at admission)", ["outcome"])
        held.labels("held").set_function(lambda: pool_count("num_held_blocks"))
        held.labels("used").set_function(lambda: pool_count("num_held_used"))
        metrics.gauge(
            "worker_offload_onboard_held_bytes",
            "host memory held now by onboarded blocks waiting for their request"
        ).set_function(lambda: pool_count("held_bytes"))
        for where, name in (("queue_full", "put_dropped_full"),
                            ("no_store", "put_dropped_no_store"),
                            ("too_large", "put_dropped_too_large"),
                            ("send_failed", "put_failed")):
            dropped.labels(where).set_function(lambda n=name: stat(n))
        parts = metrics.gauge(
            "worker_offload_large_blocks",
            "blocks larger than a NATS message, moved in parts: put_large / lookup_large "
            "(blocks), put_parts / lookup_parts (messages), put_parts_incomplete / "
            "lookup_large_failed (given up)", ["kind"])
        for name in ("put_large", "put_parts", "put_parts_incomplete", "lookup_large",
                     "lookup_parts", "lookup_large_failed"):
            parts.labels(name).set_function(lambda n=name: stat(n))
        written = metrics.gauge("worker_offload_written_blocks",
                                "evicted blocks the store accepted or already held")
        written.set_function(lambda: stat("put_stored") + stat("put_known"))
        metrics.gauge("worker_offload_queue_bytes", "write-behind queue, bytes").set_function(
            lambda: hook.client.queued_bytes if hook.client is not None else 0)
