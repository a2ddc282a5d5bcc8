"""`genset offload`: the KV offload store as a service.

One instance serves the blocks that rendezvous hashing places on it (`genset.offload.
placement`, over the instances listed in etcd), on its own subjects, each in a queue group
named after the instance (two processes that briefly share an id, an old one draining and
its restart, never both answer):

- `offload_put(ns, id)`: `OffloadPut` -> `OffloadPutReply` (write-behind of evicted blocks);
- `offload_put_part(ns, id, sender)`: `OffloadPutPart` -> `OffloadPutReply` (a part of a
  block larger than a message; one subscription for every sender, `putpart.<id>.*`, the
  sender taken from the subject's last token; gathered in bounded, expiring buffers per
  sender, `genset.offload.parts`, then put like any other block);
- `offload_get_part(ns, id)`: `OffloadGetPart` -> `OffloadPart` (a part of a held block that
  a lookup reply named in `large`);
- `offload_lookup(ns, id)`: `OffloadLookup` -> `OffloadLookupReply` (the leading run held,
  with data, at most `max_bytes` and never more than a NATS message);
- `offload_resync(ns, id)`: `KvResyncRequest` -> `OffloadResyncReply`; the snapshot itself
  goes out on the events subject, in order (a disk tier's snapshot can exceed a message); one
  not yet started answers every resync until it goes out;
- publishes `KvEventBatch`es on `offload_events(ns, id)`, one event_id sequence per tier
  (`host` = RAM, `disk`); on start a `cleared` for RAM (what it held before is gone) and a
  snapshot of the disk tier (what survived); on a clean stop a `cleared` for RAM.

With a disk directory the instance id is the directory's (`<dir>/store_id`), so a restarted
store owns the same hash range and its events replace its previous self's in routers.

Bad messages get a clear error reply (`bad_request`, naming the field) and are counted;
nothing a peer sends can crash the store or grow it past its byte bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from dataclasses import dataclass, field

import proto
from genset.offload.parts import DROPPED as PART_DROPPED
from genset.offload.parts import PENDING as PART_PENDING
from genset.offload.parts import SENDER_SHARES, Assemblies, buffer_bounds, check_sender
from genset.offload.tiers import ADMISSION_POLICIES, DEFAULT_ADMISSION
from genset.runtime.config import ConfigError, FieldError, opt
from genset.runtime.service import Service
from proto import subjects
from proto.kv import TIER_DISK, KvEventBatch
from proto.offload import (
    OffloadBlock,
    OffloadGetPart,
    OffloadLookup,
    OffloadLookupReply,
    OffloadPart,
    OffloadPut,
    OffloadPutPart,
    OffloadPutReply,
    OffloadResyncReply,
    TierSnapshot,
)
from services.kv_offload.disk import (
    BAD_REASONS,
    DISK_WARN_EVERY_S,
    DiskError,
    DiskStore,
    LogThrottle,
)
from services.kv_offload.store import REFUSE_REASONS, BlockStore

GB = 1 << 30
MB = 1 << 20
REPLY_HEADROOM = 4096  # bytes of a reply besides block payloads (ids, counts, msgpack keys)
MIN_MAX_PAYLOAD = 64 * 1024  # the smallest NATS max_payload the store starts with
PART_REPLY_HEADROOM = 256  # bytes of an `OffloadPart` besides its data
MAX_OUTBOX = 4096  # unpublished event batches before they are replaced by fresh snapshots
# Encoded bytes of one entry of an event batch at most, with room to spare: a block that starts
# a chain of its own is a whole Stored event (68 bytes with a 64-bit parent hash).
EVENT_ENTRY_BYTES = 80
MAX_EVENT_BLOCKS = 8192  # entries per event batch where the server's max_payload allows
PART_TTL_S = 10.0  # a block in parts must be complete this long after its first part


@dataclass
class OffloadOptions:
    offload_ram_gb: float = field(default=1.0, metadata=opt(
        "RAM tier size in GiB (block payloads + per-block overhead)", min=0))
    offload_disk_gb: float = field(default=4.0, metadata=opt(
        "disk tier size in GiB (0: no disk tier)", min=0))
    offload_dir: str | None = field(default=None, metadata=opt(
        "directory of the disk tier (unset: no disk tier); each store process takes the "
        "first free store-<k> subdirectory, so replicas can share it"))
    spill_queue_mb: float = field(default=64.0, metadata=opt(
        "blocks waiting to be written to disk, MiB; beyond it spills are dropped", min=0,
        env="GENSET_OFFLOAD_SPILL_QUEUE_MB"))
    max_block_mb: float = field(default=32.0, metadata=opt(
        "largest block accepted, MiB (payload + token ids); a block larger than a NATS "
        "message travels in parts (0: only blocks that fit one message)", min=0,
        env="GENSET_OFFLOAD_MAX_BLOCK_MB"))
    part_buffer_mb: float | None = field(default=None, metadata=opt(
        "bytes of blocks being gathered from parts at once, MiB (unset: four largest blocks, "
        "128 MiB with the default --max-block-mb); one sender may hold a quarter of it, "
        "which must hold one largest block (less is refused at start); a block not "
        f"complete within {PART_TTL_S:g} s is dropped", min=0,
        env="GENSET_OFFLOAD_PART_BUFFER_MB"))
    spill_min_freq: int = field(default=2, metadata=opt(
        "a block evicted from RAM goes to disk only if put or asked for this often", min=0,
        env="GENSET_OFFLOAD_SPILL_MIN_FREQ"))
    admission: str = field(default=DEFAULT_ADMISSION, metadata=opt(
        "which newcomer may displace which blocks: slru (the default: any newcomer, blocks "
        "never used again since they came in go before reused ones; served the most of the "
        "Mooncake replay), lru (any newcomer, least recently used first) or frequency "
        "(TinyLFU: only one at least as frequent; a scan of one-offs cannot flush reused "
        "blocks)", choices=ADMISSION_POLICIES, env="GENSET_OFFLOAD_ADMISSION"))
    verify_on_start: bool = field(default=False, metadata=opt(
        "check every disk file's checksum at start-up (reads the whole tier; reads are "
        "always checked)",
        env="GENSET_OFFLOAD_VERIFY_ON_START"))
    verify_hashes: bool = field(default=True, metadata=opt(
        "refuse blocks whose hash does not match their parent hash and token ids",
        env="GENSET_OFFLOAD_VERIFY_HASHES"))
    serve_token_ids: bool = field(default=False, metadata=opt(
        "answer lookups that ask for the blocks' token ids (`want_tokens`: tools and "
        "tests); off by default: a lookup gets payloads only, so a worker holding another "
        "request's block hashes (its own prompts', or those prefill workers publish) cannot "
        "read that request's prompt tokens from the store (no worker asks for them)",
        env="GENSET_OFFLOAD_SERVE_TOKEN_IDS"))
    require_token_ids: bool = field(default=False, metadata=opt(
        "refuse blocks put without token ids (their hash cannot be checked); off by "
        "default: engines that report evictions by events (TensorRT-LLM) put blocks "
        "without them (torch and mocker workers put every block with them; `genset up` "
        "turns this on; docs/architecture.md, unverified blocks)",
        env="GENSET_OFFLOAD_REQUIRE_TOKEN_IDS"))
    verify_kv_values: bool = field(default=True, metadata=opt(
        "refuse blocks whose KV payload (a torch worker's, which says its dtype) holds a NaN "
        "or an infinity, or does not match its own header: every torch worker refuses such "
        "a block on import (~5-8 us a 32 KiB block, ~75-80 us a 2 MiB one; "
        "docs/architecture.md, Security)",
        env="GENSET_OFFLOAD_VERIFY_KV_VALUES"))
    max_concurrent: int = field(default=64, metadata=opt(
        "lookup, getpart and resync requests in progress per subject before new "
        "ones get an overloaded error (puts and parts are answered in order, never "
        "overloaded)", min=1,
        env="GENSET_OFFLOAD_MAX_CONCURRENT"))

    def __post_init__(self) -> None:
        # `min=0` lets NaN through (NaN < 0 is false), and inf passes too: the store would
        # fail at start-up, already connected, on int(NaN * GB) without naming the flag
        for name in ("offload_ram_gb", "offload_disk_gb", "spill_queue_mb", "max_block_mb",
                     "part_buffer_mb"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise FieldError(name, f"must be a finite number, got {value}")


class OffloadService(Service):
    component = subjects.OFFLOAD_COMPONENT

    def __init__(self, config, options: OffloadOptions | None = None) -> None:
        super().__init__(config)
        self.options = o = options or OffloadOptions()
        self._disk_error: str | None = None
        disk: DiskStore | None = None
        if o.offload_dir and o.offload_disk_gb > 0:
            # claimed (locked) here: the directory's store id is this instance's id, which
            # logging and every subject below are named with
            try:
                disk = DiskStore.claim(o.offload_dir)
                self.instance_id = disk.store_id()
            except DiskError as exc:
                disk = None
                self._disk_error = str(exc)  # start() fails with it, after logging is set up
        self.disk = disk
        self.store: BlockStore | None = None
        self._subs: list = []
        self._outbox: deque[KvEventBatch] = deque()
        self._publisher: asyncio.Task | None = None
        self._publish_lock = asyncio.Lock()  # one publisher at a time keeps batches in order
        # Per tier: the latest snapshot queued for a resync, and the event id of the last batch
        # taken off the outbox (published or not). A snapshot whose first batch is still in
        # the outbox answers every resync that comes before it goes out (`_queue_snapshots`).
        self._snapshots: dict[str, TierSnapshot] = {}
        self._taken: dict[str, int] = {}
        self._events_subject = subjects.offload_events(self.namespace, self.instance_id)
        self._reply_limit = 1 * MB
        self.parts: Assemblies | None = None
        self.clock = time.monotonic  # the parts' expiry (a test's own)
        self._sweeper: asyncio.Task | None = None
        m = self.metrics
        self.m_put = m.counter("offload_put_blocks", "blocks offered by workers, by outcome",
                               ["outcome"])
        self.m_lookups = m.counter("offload_lookups", "lookup requests answered")
        self.m_served = m.counter("offload_lookup_blocks", "blocks returned by lookups",
                                  ["tier"])
        self.m_bad = m.counter("offload_bad_messages", "requests refused as malformed",
                               ["endpoint"])
        self.m_unverified = m.counter(
            "offload_unverified_blocks",
            "blocks put without token ids, kept without a hash check (any outcome)")
        self._unverified_warn = LogThrottle(DISK_WARN_EVERY_S)
        self.m_token_ids_withheld = m.counter(
            "offload_token_ids_withheld_lookups",
            "lookups that asked for token ids and got payloads only (--serve-token-ids off)")
        self.m_refused = m.counter(
            "offload_refused_blocks", "blocks refused at put, by reason (token_ids, too_large, "
            "hash_mismatch, no_token_ids, non_finite, bad_payload)", ["reason"])
        # one line per reason per interval at most, naming the sender and a block
        self._refused_warn = {reason: LogThrottle(DISK_WARN_EVERY_S)
                              for reason in REFUSE_REASONS}
        self.m_batches = m.counter("offload_event_batches", "KV event batches published",
                                   ["outcome"])
        self.m_resyncs = m.counter("offload_resyncs", "snapshots sent on request")

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        o = self.options
        if self._disk_error:
            raise DiskError(self._disk_error)
        max_payload = int(getattr(self.bus.nc, "max_payload", 0) or MB)
        if max_payload < MIN_MAX_PAYLOAD:
            # Replies of up to the limit below would be refused by the server: every lookup
            # answered with more than a few blocks, every event batch, lost. Said at start.
            raise ConfigError(
                f"the NATS server's max_payload is {max_payload} bytes; the offload store "
                f"needs at least {MIN_MAX_PAYLOAD} (its replies and event batches)")
        self._reply_limit = max_payload - REPLY_HEADROOM
        max_block = self._reply_limit - REPLY_HEADROOM
        if o.max_block_mb > 0:
            # may exceed a message: such blocks travel in parts
            max_block = int(o.max_block_mb * MB)
        # One sender holds at most a quarter of the part buffers, and a quarter holds one
        # largest block (`genset.offload.parts.buffer_bounds`). The sender is the subject's
        # token, which a secured stack authenticates, so the share is what one hostile (or
        # broken) worker can hold: filling the buffers takes four of them. Unset, the budget
        # is four largest blocks: 128 MiB (+ 2 KiB) with the default 32 MiB blocks, where a
        # 64 MiB budget's one-block floor had made one sender's share half. That bound is
        # allocated only as blocks come (an honest worker holds at most its client's
        # `max_inflight` (4) blocks in progress, plus any abandoned after a failure for
        # PART_TTL_S: 8 MiB of Llama-3-8B's 2 MiB blocks); the
        # default 32 MiB limit is kept for larger blocks (a 70B model's 64-token block is
        # 20 MiB). A budget set below four largest blocks is refused rather than given a
        # larger share: an operator who set it to save memory would otherwise get a share
        # bound that no longer bounds.
        try:
            part_bytes, sender_bytes = buffer_bounds(
                max_block, None if o.part_buffer_mb is None else int(o.part_buffer_mb * MB))
        except ValueError as exc:
            raise ConfigError(
                f"--part-buffer-mb {o.part_buffer_mb:g} with --max-block-mb "
                f"{o.max_block_mb:g}: {exc}; raise --part-buffer-mb to at least "
                f"{SENDER_SHARES * max_block / MB:g}, lower --max-block-mb, or leave "
                "--part-buffer-mb unset (four largest blocks)") from None
        self.parts = Assemblies(max_bytes=part_bytes, max_sender_bytes=sender_bytes,
                                ttl_s=PART_TTL_S, clock=self.clock)
        # Event batches must fit a message too: at 8192 entries one could be ~560 KB, and on a
        # server with a smaller max_payload every such batch (and every snapshot) was lost.
        max_event_blocks = max(64, min(MAX_EVENT_BLOCKS, self._reply_limit // EVENT_ENTRY_BYTES))
        self.store = store = BlockStore(
            ram_bytes=int(o.offload_ram_gb * GB), disk=self.disk,
            disk_bytes=int(o.offload_disk_gb * GB) if self.disk else 0,
            spill_queue_bytes=int(o.spill_queue_mb * MB), max_block_bytes=max_block,
            spill_min_freq=o.spill_min_freq, verify_hashes=o.verify_hashes,
            require_token_ids=o.require_token_ids, verify_on_start=o.verify_on_start,
            verify_kv_values=o.verify_kv_values, admission=o.admission, max_event_blocks=max_event_blocks)
        found = await store.open()
        self._metrics_gauges()
        ns, sid = self.namespace, self.instance_id
        queue = f"{self.component}-{sid:x}"
        # Puts are answered inside the connection's reader, their events and reply in one
        # write (Bus.serve_direct): a put is the store's most frequent request (every
        # eviction batch of every worker) and never waits for anything.
        put_subject = subjects.offload_put(ns, sid)
        self._subs.append(await self.bus.serve_direct(put_subject, self._put, queue=queue))
        self.subjects["put"] = put_subject
        part_subject = subjects.offload_put_part_all(ns, sid)
        self._subs.append(await self.bus.serve_direct(part_subject, self._put_part, queue=queue,
                                                      with_subject=True))
        self.subjects["put_part"] = part_subject
        handlers = {
            "lookup": (subjects.offload_lookup(ns, sid), self._on_lookup),
            "get_part": (subjects.offload_get_part(ns, sid), self._on_get_part),
            "resync": (subjects.offload_resync(ns, sid), self._on_resync),
        }
        for name, (subject, handler) in handlers.items():
            self._subs.append(await self.bus.serve(subject, handler, queue=queue,
                                                   max_concurrent=o.max_concurrent))
            self.subjects[name] = subject
        self.subjects["events"] = self._events_subject
        # What this start means for consumers: RAM is empty (its Cleared is pending in the
        # RAM log since open()), the disk tier holds what survived.
        self._collect()
        self._outbox.extend(store.cache.disk_log.snapshot_batches(sid, _now_ms()))
        self._publisher = asyncio.create_task(self._publish_loop(), name="offload-events")
        self._sweeper = asyncio.create_task(self._sweep_parts(), name="offload-parts-expiry")
        self.labels = {"ram_bytes": str(store.cache.ram.capacity),
                       "disk_bytes": str(store.cache.disk.capacity),
                       "max_block_bytes": str(max_block)}
        self.log.info("offload store ready", store_id=f"{sid:x}",
                      ram_gb=o.offload_ram_gb,
                      disk=(f"{self.disk.root} ({o.offload_disk_gb} GiB, {found} blocks kept)"
                            if self.disk else "off"),
                      bad_files={k: v for k, v in self.disk.bad_files.items() if v}
                      if self.disk else {})

    async def drain(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        if self.store is None:
            return
        flushed = await self.store.flush(max(1.0, self.config.drain_timeout * 0.7))
        if not flushed:
            self.log.warning("disk writes still queued at shutdown; those blocks are lost",
                             pending_bytes=self.store.pending_bytes)
        self.store.cache.clear_ram()  # announced: routers must not count on it
        self.store.changed.set()
        await self._publish_now()
        with contextlib.suppress(Exception):
            await self.bus.flush(2.0)

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sweeper
            self._sweeper = None
        if self._publisher is not None:
            self._publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._publisher
            self._publisher = None
        if self.store is not None:
            await self.store.close()

    def health(self) -> dict:
        h = super().health()
        st = self.store
        if st is not None:
            c = st.cache
            h["store_id"] = f"{self.instance_id:x}"
            h["tiers"] = {
                "host": {"blocks": len(c.ram), "bytes": c.ram.used, "capacity": c.ram.capacity},
                "disk": {"blocks": len(c.disk), "bytes": c.disk.used,
                         "capacity": c.disk.capacity},
            }
            h["pending_write_bytes"] = st.pending_bytes
            h["accounted_bytes"] = st.accounted_bytes
            h["counts"] = {**c.counts, **st.counts}
            if self.parts is not None:
                h["parts"] = {"blocks": len(self.parts), "bytes": self.parts.bytes,
                              "capacity": self.parts.max_bytes, **self.parts.counts}
            if self.disk is not None:
                h["bad_files"] = dict(self.disk.bad_files)
        return h

    def _metrics_gauges(self) -> None:
        st = self.store
        assert st is not None
        c = st.cache
        m = self.metrics
        blocks = m.gauge("offload_blocks", "blocks held, per tier", ["tier"])
        used = m.gauge("offload_bytes", "bytes held, per tier", ["tier"])
        cap = m.gauge("offload_capacity_bytes", "tier size", ["tier"])
        for tier, lru in (("host", c.ram), ("disk", c.disk)):
            blocks.labels(tier).set_function(lambda lru=lru: len(lru))
            used.labels(tier).set_function(lambda lru=lru: lru.used)
            cap.labels(tier).set_function(lambda lru=lru: lru.capacity)
        m.gauge("offload_pending_write_bytes", "evicted blocks waiting for their disk write"
                ).set_function(lambda: st.pending_bytes)
        m.gauge("offload_accounted_bytes", "block bytes in memory (RAM tier + write queue)"
                ).set_function(lambda: st.accounted_bytes)
        policy = m.gauge("offload_policy_events", "tier policy decisions so far", ["kind"])
        for kind in c.counts:
            policy.labels(kind).set_function(lambda kind=kind: c.counts[kind])
        io = m.gauge("offload_store_events", "store I/O events so far", ["kind"])
        for kind in st.counts:
            io.labels(kind).set_function(lambda kind=kind: st.counts[kind])
        parts = self.parts
        if parts is not None:
            m.gauge("offload_part_buffer_bytes", "bytes of blocks being gathered from parts"
                    ).set_function(lambda: parts.bytes)
            pg = m.gauge("offload_part_events", "parts of blocks larger than a message so far: "
                         "accepted (parts), blocks completed, and dropped by reason", ["kind"])
            for kind in parts.counts:
                pg.labels(kind).set_function(lambda kind=kind: parts.counts[kind])
        if self.disk is not None:
            disk = self.disk
            bad = m.gauge("offload_disk_bad_files", "disk files dropped as bad, by reason",
                          ["reason"])
            for reason in BAD_REASONS:
                bad.labels(reason).set_function(lambda r=reason: disk.bad_files[r])

    # ---- handlers -------------------------------------------------------------------------------
    def _decode(self, data: bytes, message_type: type, endpoint: str):
        try:
            return proto.decode(data, message_type)
        except proto.ProtocolError:
            self.m_bad.labels(endpoint).inc()
            raise  # the bus answers bad_request with the text naming the field

    def _put(self, data: bytes) -> OffloadPutReply:
        """A put, run in the connection's reader: the blocks go into the tiers and the tier
        events they caused are published at once, before the reply (`_publish_direct`)."""
        req = self._decode(data, OffloadPut, "put")
        return self._put_blocks(req.blocks, req.sender_id)

    def _put_part(self, subject: str, data: bytes) -> OffloadPutReply:
        """A part of a block larger than a message, run in the connection's reader like a
        put: gathered (`genset.offload.parts.Assemblies`) under the sender its subject names
        (a body that names another sender is refused: `part_sender`); the part that completes
        the block puts it (every check of a put, the payload's values included). Counts all
        0: more parts expected; `refused` 1: the block is refused (its size, hash or token
        ids, at its first part, before anything is allocated) or dropped (a bad part: the
        sender stops sending the rest); `known` 1 at the first part: RAM holds the block
        already (`BlockStore.put_known`), the rest is not sent."""
        req = self._decode(data, OffloadPutPart, "put_part")
        store, parts = self.store, self.parts
        assert store is not None and parts is not None
        sender = subjects.sender_token(subject)
        why = check_sender(sender, req.sender_id, subject.rpartition(".")[2])
        if why is not None:
            res = parts.refuse(sender, req.hash, *why)
            return self._refuse_part(req, res.reason, f"block {req.hash:016x}: {res.text}",
                                     sender=sender)
        assert sender is not None
        key = (sender, req.hash)
        parts.expire()  # an expired block's later parts are refused (`part_start`)
        if key not in parts and req.offset == 0:  # a block's first part (any other: `add`
            # refuses it as `part_start`, before any of the store's checks or counts)
            why = store.check_head(req.hash, req.parent_hash, req.token_ids, req.size)
            if why is not None:
                return self._refuse_part(req, *why, sender=sender, block_refusal=True)
            if store.put_known(req.hash, req.token_ids):  # held: the rest need not come
                self.m_put.labels("known").inc()
                if not req.token_ids:
                    self.m_unverified.inc()
                return OffloadPutReply(store_id=self.instance_id, known=1)
        res = parts.add(sender, req.hash, size=req.size, offset=req.offset,
                        data=req.data, parent_hash=req.parent_hash, token_ids=req.token_ids)
        if res.status == PART_PENDING:
            return OffloadPutReply(store_id=self.instance_id)
        if res.status == PART_DROPPED:
            return self._refuse_part(req, res.reason, f"block {req.hash:016x}: {res.text}",
                                     sender=sender)
        buf = res.buffer
        assert buf is not None
        block = OffloadBlock(hash=req.hash, parent_hash=buf.parent_hash,
                             token_ids=buf.token_ids, data=buf.buf)  # type: ignore[arg-type]
        return self._put_blocks([block], sender)

    def _refuse_part(self, req: OffloadPutPart, reason: str, text: str, *,
                     sender: int | None, block_refusal: bool = False) -> OffloadPutReply:
        """A part refused: a block refusal (REFUSE_REASONS) is counted as a put's is; a bad
        part (`genset.offload.parts.PART_REASONS`) is counted by `Assemblies`."""
        self.m_put.labels("refused").inc()
        if block_refusal:
            self.m_refused.labels(reason).inc()
        throttle = self._refused_warn.get(reason)
        if throttle is None:
            throttle = self._refused_warn[reason] = LogThrottle(DISK_WARN_EVERY_S)
        since = throttle.hit()
        if since:
            # the sender the subject names (None: not an id), and what the part said
            self.log.warning("block parts refused", reason=reason,
                             sender=f"{sender:x}" if sender is not None else None,
                             claimed_sender=f"{req.sender_id:x}", block=f"{req.hash:016x}",
                             error=text, puts_since_last_line=since)
        return OffloadPutReply(store_id=self.instance_id, refused=1, error=text)

    def _put_blocks(self, blocks: list[OffloadBlock], sender_id: int) -> OffloadPutReply:
        store = self.store
        assert store is not None
        c = store.put(blocks, notify=False)
        self._publish_direct()
        for outcome in ("stored", "known", "rejected", "refused"):
            n = getattr(c, outcome)
            if n:
                self.m_put.labels(outcome).inc(n)
        for reason, n in c.reasons.items():
            self.m_refused.labels(reason).inc(n)
            since = self._refused_warn[reason].hit()
            if since:  # the first refusal of a reason, then one line every few seconds at most
                block, why = c.first_refused[reason]
                self.log.warning("blocks refused at put", reason=reason,
                                 sender=f"{sender_id:x}", blocks=n, block=f"{block:016x}",
                                 error=why, puts_since_last_line=since)
        if c.unverified:
            self.m_unverified.inc(c.unverified)
            since = self._unverified_warn.hit()
            if since:  # the first put, then one line every few seconds at most
                self.log.warning("blocks put without token ids: kept without a hash check",
                                 sender=f"{sender_id:x}", blocks=c.unverified,
                                 puts_since_last_line=since)
        return OffloadPutReply(store_id=self.instance_id, stored=c.stored, known=c.known,
                               rejected=c.rejected, refused=c.refused, error=c.error)

    async def _on_lookup(self, data: bytes) -> OffloadLookupReply:
        req = self._decode(data, OffloadLookup, "lookup")
        assert self.store is not None
        if req.want_tokens and not self.options.serve_token_ids:
            self.m_token_ids_withheld.inc()
        # A block that cannot fit this reply is named by ref (fetched in parts), also where
        # the asker's cap is below this store's reply limit (its own message limit is
        # smaller): with this store's limit as the mark, such a block was neither sent nor
        # named, the run ended at it and the asker could never fetch it. genset's client
        # asks for min(its limit, its byte budget) and allows refs up to that budget, so
        # where the two limits agree nothing changes: a block over a budget below the limit
        # ends the run either way.
        max_bytes = min(req.max_bytes, self._reply_limit)
        res = await self.store.lookup(req.hashes, max_bytes,
                                      req.want_tokens and self.options.serve_token_ids,
                                      req.ram_only,
                                      message_bytes=max_bytes,
                                      max_large_bytes=req.max_large_bytes)
        self.m_lookups.inc()
        if res.blocks:
            self.m_served.labels("host").inc(len(res.blocks) - res.disk_blocks)
            self.m_served.labels(TIER_DISK).inc(res.disk_blocks)
        return OffloadLookupReply(store_id=self.instance_id, held=res.held, blocks=res.blocks,
                                  disk_blocks=res.disk_blocks,
                                  disk_read_gbps=self.store.disk_read_gbps, large=res.large)

    async def _on_get_part(self, data: bytes) -> OffloadPart:
        req = self._decode(data, OffloadGetPart, "get_part")
        assert self.store is not None
        size, part = await self.store.get_part(
            req.hash, req.offset, min(req.max_bytes, self._reply_limit - PART_REPLY_HEADROOM))
        return OffloadPart(store_id=self.instance_id, hash=req.hash, size=size,
                           offset=req.offset, data=part)  # type: ignore[arg-type]

    async def _sweep_parts(self) -> None:
        """Expire blocks whose parts stopped coming, also while no part arrives."""
        while True:
            await asyncio.sleep(PART_TTL_S / 2)
            if self.parts is not None:
                self.parts.expire()

    async def _on_resync(self, data: bytes) -> OffloadResyncReply:
        req = self._decode(data, proto.KvResyncRequest, "resync")
        if req.worker_id != self.instance_id:
            self.m_bad.labels("resync").inc()
            raise proto.ProtocolError(f"KvResyncRequest.worker_id {req.worker_id:x} is not "
                                      f"this store ({self.instance_id:x})")
        self.m_resyncs.inc()
        return OffloadResyncReply(store_id=self.instance_id,
                                  tiers=self._queue_snapshots(reuse=True))

    # ---- events -------------------------------------------------------------------------------
    def _collect(self) -> None:
        """Move pending tier events into the outbox, in order."""
        st = self.store
        assert st is not None
        now = _now_ms()
        for log in (st.cache.ram_log, st.cache.disk_log):
            if log is not None and log.pending:
                self._outbox.extend(log.take_batches(self.instance_id, now))
        if len(self._outbox) > MAX_OUTBOX:  # NATS away for long: state, not history
            self.log.warning("KV event backlog too long; sending snapshots instead",
                             batches=len(self._outbox))
            self._outbox.clear()
            self._queue_snapshots()

    def _queue_snapshots(self, reuse: bool = False) -> list[TierSnapshot]:
        """A fresh snapshot of every tier into the outbox, behind the batches already there
        (pending events are folded into it); where each one sits in its tier's ids.

        `reuse` (a resync): a tier whose last snapshot has not started going out (its first
        batch is still in the outbox) is not snapshotted again; that one is named. It gives
        the asker the same thing (a Cleared it has not missed, then everything since, in
        order), and a flood of resyncs, which anyone on the bus can send, costs one
        snapshot's memory and CPU per tier, not one per request (each was the whole tier)."""
        st = self.store
        assert st is not None
        now = _now_ms()
        out = []
        for log in (st.cache.ram_log, st.cache.disk_log):
            if log is None:
                continue
            last = self._snapshots.get(log.tier)
            if reuse and last is not None and \
                    self._taken.get(log.tier, 0) < last.first_event_id:
                out.append(last)
                continue
            batches = log.snapshot_batches(self.instance_id, now)
            self._outbox.extend(batches)
            snap = TierSnapshot(tier=log.tier, first_event_id=batches[0].event_id,
                                last_event_id=batches[-1].event_id,
                                blocks=len(st.cache.ram if log is st.cache.ram_log
                                           else st.cache.disk))
            self._snapshots[log.tier] = snap
            out.append(snap)
        st.changed.set()
        return out

    def _publish_direct(self) -> None:
        """Queue the pending tier events on the connection now, without a task
        (`Bus.publish_nowait`), when nothing is ahead of them (no batch waiting in the
        outbox, no publisher between its batches) so event ids stay in order; whatever
        cannot go that way is left to the publisher task (`changed`). Why: the publisher
        task's turn and its own write per put cost more than the put itself."""
        st = self.store
        assert st is not None
        publish = getattr(self.bus, "publish_nowait", None)
        if publish is None or self._outbox or self._publish_lock.locked():
            st.changed.set()
            return
        self._collect()
        outbox = self._outbox
        while outbox:
            if not publish(self._events_subject, outbox[0]):
                st.changed.set()  # reconnecting or buffer full: the publisher goes on
                return
            batch = outbox.popleft()
            self._taken[batch.tier] = batch.event_id
            self.m_batches.labels("ok").inc()

    async def _publish_loop(self) -> None:
        st = self.store
        assert st is not None
        while True:
            await st.changed.wait()
            await self._publish_now()

    async def _publish_now(self) -> None:
        st = self.store
        assert st is not None
        async with self._publish_lock:
            st.changed.clear()
            self._collect()
            while self._outbox:
                batch = self._outbox.popleft()
                self._taken[batch.tier] = batch.event_id
                try:
                    await self.bus.publish(self._events_subject, batch)
                    self.m_batches.labels("ok").inc()
                except Exception as exc:  # consumers see the gap and ask for a resync
                    self.m_batches.labels("failed").inc()
                    self.log.debug("KV event batch not published", tier=batch.tier,
                                   event_id=batch.event_id, error=repr(exc))


def _now_ms() -> int:
    return int(time.time() * 1000)
