"""The KV offload store in the replay (`genset replay --offload-ram-blocks N
--offload-disk-blocks M`): one store shared by every worker, in blocks, with the live store's
tier policy (`genset.offload.tiers.TieredCache.in_blocks`).

What the simulation does with it, as live workers and the live store do:

- a worker's evicted blocks go to the store the moment they are evicted (the engine hands
  them over before reusing their memory: the mocker charges the copy out,
  `kv_bytes_per_token` x block size at `d2h_gbps`, to the step that evicted them, beside its
  compute unless `copy_overlap` is off), except those it onboarded from the store lately
  (as the live hook) and those the engine copied out ahead of their eviction in its
  copy-out lane's idle time (`copy_ahead`: the mocker's own behaviour, as live);
- before a request is queued on its worker (the worker's `before_run`), the longest run of its
  prompt's blocks after the worker's own cached prefix that the store holds is onboarded:
  demand is recorded, disk hits are promoted to RAM, and the blocks are imported (pinned)
  into the worker, whose next step pays the copy in (`h2d_gbps`) plus, for disk blocks, the
  disk read (`disk_gbps`), again beside its compute unless `copy_overlap` is off;
- the store's tier events go to the routers (`RouterCore.on_store_batch`), which count its
  blocks at their onboarding cost.

Not modelled: the store's own network/CPU time, write-behind drops under pressure (the store
takes every eviction), a lookup deadline (onboarding always completes).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from genset.offload.admission import ADMIT_MODES, admission
from genset.offload.onboard import split_for_core
from genset.offload.tiers import DEFAULT_ADMISSION, TIER_RAM, TieredCache

STORE_ID = 0x0FF10AD  # the store's id in the routers' index (never a worker's index)
MAX_RECORDED = 1024  # as the live store: demand counted for at most this many hashes


@dataclass
class OffloadConfig:
    ram_blocks: int = 0  # the store's RAM tier, blocks (shared by all workers)
    disk_blocks: int = 0  # the store's disk tier, blocks
    kv_bytes_per_token: int = 131072  # Dynamo's replay harness: a Llama-3-8B-shaped bf16 model
    d2h_gbps: float = 32.0  # copy of an evicted block out of the engine (0: free)
    h2d_gbps: float = 32.0  # copy of an onboarded block into the engine (0: free)
    disk_gbps: float = 4.0  # read of a disk-tier block (0: free)
    # copies beside the step's compute (the mocker's `kv_copy_overlap`); False: the step
    # waits for them (`--offload-sync-copies`, the torch engine's way today)
    copy_overlap: bool = True
    spill_min_freq: int = 2
    admission: str = DEFAULT_ADMISSION  # the store's `--admission` (genset.offload.tiers)
    # Onboard a disk-tier block only when reading and copying it in is faster than computing
    # its tokens again (the mocker's marginal prefill cost per token); otherwise the run
    # stops at the first disk block and the rest is computed.
    disk_only_if_faster: bool = True
    # With overlapped copies, onboard only the leading part of a long run whose copy would
    # outlast the prompt's compute, computing its tail beside the copy instead
    # (`genset.offload.onboard.onboard_split`, as the live hook with a mocker engine).
    split_runs: bool = True
    # Copies out ahead of eviction (the mocker's `offload_copy_ahead_blocks`, on unless
    # `--offload-no-copy-ahead`): in every step, the copy-out lane's time the step's own
    # copies out leave idle copies the worker's next cached blocks to be evicted (at most
    # `copy_ahead_blocks` free blocks from the pool's LRU end) to the store, so evicting
    # them later costs no copy on the step that needs their memory (an import of a long
    # run evicts as many blocks as it brings in). The engine does it
    # (`MockerCore.step`, `SchedulingCore.copy_ahead`); the replay only sets it.
    copy_ahead: bool = True
    copy_ahead_blocks: int = 1024
    # Which evicted blocks a worker ships (the worker's `--offload-admit`,
    # genset.offload.admission): "all" (the replay's default, as before) or "prompt"
    worker_admit: str = "all"
    # Host memory per worker for onboarded blocks beyond the room the queue ahead leaves,
    # held until their request is admitted (the worker's `--offload-hold-mb`,
    # `Scheduler.hold_kv`); at the modelled block size (`kv_bytes_per_token`). 0: not fetched
    hold_mb: float = 256.0

    def __post_init__(self) -> None:
        if self.ram_blocks < 0 or self.disk_blocks < 0 or self.kv_bytes_per_token < 0:
            raise ValueError("offload: block counts and kv_bytes_per_token must be >= 0")
        if min(self.d2h_gbps, self.h2d_gbps, self.disk_gbps) < 0:
            raise ValueError("offload: bandwidths must be >= 0 (0: free)")
        if self.copy_ahead_blocks < 0:
            raise ValueError("offload: copy_ahead_blocks must be >= 0")
        if not self.hold_mb >= 0:
            raise ValueError(f"offload: hold_mb must be >= 0, got {self.hold_mb}")
        if self.worker_admit not in ADMIT_MODES:
            raise ValueError(f"offload: worker_admit must be one of {ADMIT_MODES}")

    @property
    def enabled(self) -> bool:
        return self.ram_blocks > 0 or self.disk_blocks > 0

    def engine_options(self) -> dict:
        """The mocker's `MockerConfig` fields for this store's transfers."""
        return {"kv_bytes_per_token": self.kv_bytes_per_token,
                "offload_d2h_gbps": self.d2h_gbps, "offload_h2d_gbps": self.h2d_gbps,
                "kv_copy_overlap": self.copy_overlap,
                "offload_copy_ahead_blocks": self.copy_ahead_blocks if self.copy_ahead else 0}

    def policy_options(self) -> dict:
        """What the genset routing policy needs to cost onboarding like this store."""
        inf = 1e12  # a free transfer: a bandwidth nothing takes time at
        return {"kv_bytes_per_token": float(self.kv_bytes_per_token),
                "host_gbps": self.h2d_gbps or inf, "disk_gbps": self.disk_gbps or inf,
                "copy_overlap": self.copy_overlap, "split_runs": self.split_runs}


class _Sink:
    """A worker core's eviction sink: every evicted block is offered to the store, but those
    the worker onboarded from it lately (as the live hook: `EvictionHandover.skip`) and, with
    `worker_admit="prompt"`, those its admission refuses (as the live hook's)."""

    __slots__ = ("admit", "max_onboarded", "onboarded", "sim")

    def __init__(self, sim: OffloadSim, max_onboarded: int) -> None:
        self.sim = sim
        self.onboarded: OrderedDict[int, None] = OrderedDict()
        self.max_onboarded = max_onboarded
        self.admit = admission(sim.config.worker_admit)

    def room(self) -> int:
        return 1 << 62

    def known(self, block_hash: int) -> bool:
        return block_hash in self.onboarded

    def remember(self, hashes: list[int]) -> None:
        seen = self.onboarded
        for h in hashes:
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.max_onboarded:
            seen.popitem(last=False)

    def put(self, blocks, dropped: int) -> None:
        offer = self.sim.cache.offer
        for b in blocks:
            offer(b.hash, b.parent_hash)
        self.sim.offered += len(blocks)


class OffloadSim:
    def __init__(self, config: OffloadConfig, block_size: int) -> None:
        self.config = config
        self.block_size = block_size
        self.cache = TieredCache.in_blocks(config.ram_blocks, config.disk_blocks,
                                           spill_min_freq=config.spill_min_freq,
                                           admission=config.admission)
        self.offered = 0
        # blocks of the store's runs found by lookups, before the split (>= onboarded)
        self.found_blocks = 0
        self.onboarded = {TIER_RAM: 0, "disk": 0}  # blocks
        self._sinks: dict[int, _Sink] = {}  # id(core) -> its sink
        self._cores: list = []  # attached, for their counts of blocks copied ahead
        self.lookups = 0
        self.skipped_no_room = 0  # lookups not made: no room beside the queue (as the hook's)

    def attach(self, core) -> None:
        """Write-behind of `core`'s evictions (no token ids: the replay needs none)."""
        sink = self._sinks[id(core)] = _Sink(self, max(1024, 4 * core.card.kv_blocks))
        self._cores.append(core)
        core.scheduler.max_held_bytes = int(self.config.hold_mb * (1 << 20))
        core.set_eviction_sink(sink, with_tokens=False)

    def onboard(self, core, hashes: list[int], prompt_len: int):
        """The `KvImport` of the store's run after `core`'s cached prefix (None: nothing), its
        RAM and disk block counts, and that prefix's length in blocks; the disk reads are
        charged to `core`'s next step."""
        from genset.engines.types import KvBlockData, KvImport

        bs = self.block_size
        full = min(len(hashes), (prompt_len - 1) // bs)  # the last token is always computed
        have = core.cached_prefix(hashes[:full])
        max_blocks = max(1, core.card.kv_blocks // 2)  # as the worker's hook
        # and, as the hook, no more than the engine can keep beside the requests queued
        # ahead (`Scheduler.import_room`: the head of the queue would take the rest back
        # before this request runs), or hold in host memory until its admission (the core
        # cuts the import to both). No room and none to hold: no lookup at all (the hook's
        # `skipped_no_room`).
        if have >= min(full, max_blocks):
            return None, 0, 0, have
        room = core.scheduler.import_room()
        if room < max_blocks - have and core.scheduler.hold_room_bytes() <= 0:
            if room <= 0:
                self.skipped_no_room += 1
                return None, 0, 0, have
            max_blocks = have + room
        want = hashes[have:min(full, max_blocks)]
        if not want:
            return None, 0, 0, have
        self.lookups += 1
        cache = self.cache
        cache.record(want[:MAX_RECORDED])
        tiers = cache.locate(want)
        if not tiers:
            return None, 0, 0, have
        if self.config.disk_only_if_faster and not self._disk_pays(core):
            tiers = tiers[:tiers.index("disk")] if "disk" in tiers else tiers
            if not tiers:
                return None, 0, 0, have
        disk = 0
        parent = hashes[have - 1] if have else None
        prev = parent
        for h, tier in zip(want, tiers, strict=False):
            if tier != TIER_RAM:
                disk += 1
                cache.promote(h, prev)
            prev = h
        n = len(tiers)
        self.found_blocks += n
        cache.touch_run(want[:n])  # as the live store: the run's head most recent
        # the worker knows the store holds the whole run (its lookup reply): none of it is put
        # back when evicted, whatever part it onboards
        self._sinks[id(core)].remember(want[:n])
        if self.config.split_runs:
            n = self._split(core, tiers[:n], prompt_len - (have + n) * bs)
            if n == 0:
                return None, 0, 0, have
            disk = sum(t != TIER_RAM for t in tiers[:n])
        self.onboarded[TIER_RAM] += n - disk
        self.onboarded["disk"] += disk
        if disk and self.config.disk_gbps > 0:
            nbytes = disk * self.config.kv_bytes_per_token * bs
            core.executor.charge(nbytes / (self.config.disk_gbps * 1e6))
        kv = KvImport(blocks=[KvBlockData(h) for h in want[:n]], parent_hash=parent, optional=True)
        return kv, n - disk, disk, have

    def _split(self, core, tiers: list[str], rest: int) -> int:
        """How many of the run's leading blocks the engine imports (`onboard_split`, as the
        live hook does with a mocker engine): the rest of the run is computed with the
        prompt's uncached `rest` tokens, when that is faster than waiting for its copy."""
        c = self.config
        if not c.copy_overlap or c.h2d_gbps <= 0:
            return len(tiers)
        bs = self.block_size
        n = len(tiers)
        nbytes = c.kv_bytes_per_token * bs
        ms = n * nbytes / (c.h2d_gbps * 1e6)  # the copies in, and disk blocks' reads first
        if c.disk_gbps > 0:
            ms += sum(t != TIER_RAM for t in tiers) * nbytes / (c.disk_gbps * 1e6)
        return split_for_core(core, n, ms / n, rest, bs, known=self._sinks[id(core)].known)

    def _disk_pays(self, core) -> bool:
        """Whether a disk block onboards faster than its tokens are computed again."""
        c = self.config
        nbytes = c.kv_bytes_per_token * self.block_size
        ms = sum(nbytes / (g * 1e6) for g in (c.disk_gbps, c.h2d_gbps) if g > 0)
        timing = core.timing
        recompute = timing.prefill_linear * self.block_size / timing.speedup_ratio
        return ms < recompute

    def take_batches(self, ts_ms: int = 0) -> list:
        """The store's tier events since the last call, for the routers."""
        out = []
        for log in (self.cache.ram_log, self.cache.disk_log):
            if log is not None and log.pending:
                out.extend(log.take_batches(STORE_ID, ts_ms))
        return out

    def summary(self) -> dict:
        c = self.cache
        return {
            "ram_blocks": self.config.ram_blocks, "disk_blocks": self.config.disk_blocks,
            "kv_bytes_per_token": self.config.kv_bytes_per_token,
            "d2h_gbps": self.config.d2h_gbps, "h2d_gbps": self.config.h2d_gbps,
            "disk_gbps": self.config.disk_gbps, "copy_overlap": self.config.copy_overlap,
            "admission": self.config.admission,
            "offered_blocks": self.offered, "lookups": self.lookups,
            "skipped_no_room": self.skipped_no_room,
            # onboarded blocks with no room in the cache beside the queue ahead: held in
            # host memory until their request's admission (`Scheduler.hold_kv`), written
            # there ("used"), or dropped at submission ("no_room")
            "hold_mb": self.config.hold_mb,
            "onboard_held": {
                "held": sum(c.scheduler.num_held_blocks for c in self._cores),
                "used": sum(c.scheduler.num_held_used for c in self._cores),
                "no_room": sum(getattr(c, "import_blocks_no_room", 0) for c in self._cores)},
            "copy_ahead": self.config.copy_ahead,
            "copied_ahead_blocks": sum(getattr(c, "copied_ahead", 0) for c in self._cores),
            "onboarded_blocks": dict(self.onboarded), "found_blocks": self.found_blocks,
            "held_blocks": {"host": len(c.ram), "disk": len(c.disk)},
            "policy": dict(c.counts),
        }
