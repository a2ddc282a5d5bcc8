"""The store behind the service's handlers: block bytes in RAM, files on disk, the tier
policy of `genset.offload.tiers` deciding what goes where. No NATS here (tests drive it
directly); the service publishes its event logs and answers requests with it.

Memory is bounded in bytes, all of it accounted:
- the RAM tier: every block's payload + token ids + ENTRY_OVERHEAD (the Python objects
  around them: the decoded block, the tier's entry and dict slots, 383 bytes measured with
  tracemalloc on Python 3.11; `slru` admission's segments add a dict slot per block:
  SLRU_ENTRY_OVERHEAD, 495 measured; `tests/test_offload_store.py` measures both) <=
  `ram_bytes`;
- blocks on their way to disk (evicted from RAM, file not written yet) <= `spill_queue_bytes`:
  when that queue is full a spill is dropped, never waited for;
- a lookup holds at most its `max_bytes` of replies (the service bounds concurrent requests).

Disk I/O runs off the event loop: one writer thread takes writes and deletes in order (so a
delete queued after a write of the same block wins), reads run on up to READ_THREADS other threads.
The writer and the readers are daemon threads of the store's own (`_DaemonThreads`), and
`close()` waits for them with a deadline: a disk call stuck on a stalled disk (NFS, a dying
disk) cannot hold SIGTERM past it (see `close`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from genset.kv.hashing import chain_hash, local_block_hash
from genset.offload.payload import BAD_PAYLOAD, NON_FINITE, payload_problem
from genset.offload.tiers import (
    ADMIT_FREQUENCY,
    ADMIT_SLRU,
    REJECTED,
    STORED,
    STORED_DISK,
    TIER_DISK,
    TIER_RAM,
    Entry,
    PutOutcome,
    TieredCache,
)
from proto.offload import OffloadBlock, OffloadBlockRef
from services.kv_offload.disk import (
    BAD_VALUES,
    DISK_WARN_EVERY_S,
    DiskStore,
    LogThrottle,
    disk_usage,
)

log = structlog.get_logger("genset.kv_offload")

ENTRY_OVERHEAD = 448  # bytes per RAM block beyond its payload (objects, dict slot; 383 used)
SLRU_ENTRY_OVERHEAD = 576  # the same with `slru` admission (+ a segment's dict slot; 495 used)
WIRE_OVERHEAD = 64  # msgpack bytes per block in a reply beyond its payload (keys, ints)
REF_TOKENS = 4096  # a disk block's token ids at most, as a lookup reply's ref counts them
# A lookup counts demand for at most this many of its hashes (a 16k-token prompt in 16-token
# blocks); a request listing 65 536 hashes would otherwise cost ~0.2 s of sketch updates.
MAX_RECORDED = 1024
# Why a put block is refused (`PutCounts.reasons`, genset_offload_refused_blocks_total{reason})
REFUSE_REASONS = ("token_ids", "too_large", "hash_mismatch", "no_token_ids", NON_FINITE,
                  BAD_PAYLOAD)
WRITE_BATCH_BYTES = 8 << 20  # writer thread: ops per hand-off, up to this many payload bytes
# close(): how long the writer thread may take to finish the batch it is in (the drain has
# already waited for the queue); past it the store gives up on it. Below the service's 5 s
# shutdown-step timeout, so the steps after it (the etcd lease revoke) still run.
WRITER_STOP_TIMEOUT_S = 2.0
WRITER_STUCK = "disk writer stuck at shutdown; the blocks it had not written are lost"
READERS_STUCK = "disk reads stuck at shutdown; exiting without them"
READ_THREADS = min(32, (os.cpu_count() or 1) + 4)  # as many as the default executor had
# A failing disk fails every write: one warning line per DISK_WARN_EVERY_S at most, with the
# count of failures since the last line (all of them are counted: `disk_write_failed`,
# `disk_delete_failed` in the store's events metric).
WRITE_FAILED = "disk tier writes failing"
DELETE_FAILED = "disk tier deletes failing"


class _DaemonThreads:
    """Up to `max_threads` daemon threads (started as work needs them) running the jobs
    handed to `submit`, in order with one thread; `submit` returns an asyncio future.

    Not a `ThreadPoolExecutor` (nor the loop's default executor, `asyncio.to_thread`): Python
    joins those threads at interpreter exit (`concurrent.futures.thread._python_exit`, and
    `asyncio.run` joins the default executor's), without a timeout, so one disk call stuck in
    the kernel held the process after SIGTERM forever, whatever the service's deadlines (and
    the writer's `shutdown(wait=True)` blocked the event loop itself, so not even they could
    run). Daemon threads are not joined: the process exits normally (atexit handlers, logs
    flushed, exit code kept) and a stuck call dies with it, leaving at most a `.tmp` file the
    next start-up deletes (`DiskStore.scan`). `os._exit` after a deadline would do the same
    but skip all of that, and cut the service's own shutdown steps short."""

    def __init__(self, name: str, max_threads: int = 1) -> None:
        self.name = name
        self.max_threads = max(1, max_threads)
        self._jobs: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for a job and not yet claimed by a submit
        self._live = 0
        self._stopped: asyncio.Future[None] | None = None

    def submit(self, fn: Callable[[], Any]) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            if self._stopped is not None:
                raise RuntimeError(f"{self.name} threads are stopped")
            if self._idle:
                self._idle -= 1
            elif len(self._threads) < self.max_threads:
                t = threading.Thread(target=self._run, daemon=True,
                                     name=f"{self.name}-{len(self._threads)}")
                self._threads.append(t)
                self._live += 1
                t.start()
        self._jobs.put((loop, fut, fn))
        return fut

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                break
            loop, fut, fn = job
            try:
                result, error = fn(), None
            except BaseException as exc:  # handed to the waiter, never lost in the thread
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, fut, result, error)
            with self._lock:
                self._idle += 1
        with self._lock:
            self._live -= 1
            last = self._live == 0
        if last and self._stopped is not None:
            with contextlib.suppress(RuntimeError):
                self._stopped.get_loop().call_soon_threadsafe(_settle, self._stopped, None,
                                                              None)

    async def stop(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Let the threads finish the jobs they are in (and any queued) and end; False if
        some have not ended within `timeout` (they are left to die with the process)."""
        with self._lock:
            if self._stopped is None:
                self._stopped = asyncio.get_running_loop().create_future()
                for _ in self._threads:
                    self._jobs.put(None)
            if self._live == 0:
                return True
        try:
            await asyncio.wait_for(asyncio.shield(self._stopped), timeout)
        except TimeoutError:
            with self._lock:
                return self._live == 0
        return True


async def _true() -> bool:
    return True


def _settle(fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if fut.done():  # cancelled: the waiter went away
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


@dataclass(slots=True)
class PutCounts:
    stored: int = 0
    known: int = 0
    rejected: int = 0
    refused: int = 0
    # offered (stored, known or rejected) without token ids: no hash check was possible
    unverified: int = 0
    error: str | None = None
    # refusals by reason (REFUSE_REASONS), and the first refused block of each: (hash, why)
    reasons: dict[str, int] = field(default_factory=dict)
    first_refused: dict[str, tuple[int, str]] = field(default_factory=dict)


@dataclass(slots=True)
class LookupResult:
    held: int
    blocks: list[OffloadBlock]
    disk_blocks: int = 0
    large: list[OffloadBlockRef] = field(default_factory=list)


class BlockStore:
    def __init__(self, *, ram_bytes: int, disk: DiskStore | None = None, disk_bytes: int = 0,
                 spill_queue_bytes: int = 64 << 20, max_block_bytes: int = 1 << 20,
                 spill_min_freq: int = 2, verify_hashes: bool = True,
                 require_token_ids: bool = False, verify_on_start: bool = False,
                 verify_kv_values: bool = True, max_event_blocks: int = 8192,
                 admission: str = ADMIT_FREQUENCY,
                 warn_every_s: float = DISK_WARN_EVERY_S) -> None:
        if ram_bytes < 0 or disk_bytes < 0 or spill_queue_bytes < 0 or max_block_bytes <= 0:
            raise ValueError("store sizes must be >= 0 (max_block_bytes > 0)")
        self.disk = disk if disk_bytes > 0 else None
        self.max_block_bytes = max_block_bytes
        self.spill_queue_bytes = spill_queue_bytes
        self.verify_hashes = verify_hashes
        self.require_token_ids = require_token_ids
        self.verify_kv_values = verify_kv_values
        self.verify_on_start = verify_on_start
        self.entry_overhead = SLRU_ENTRY_OVERHEAD if admission == ADMIT_SLRU else ENTRY_OVERHEAD
        self.cache = TieredCache(
            ram_bytes, disk_bytes if self.disk else 0, spill_min_freq=spill_min_freq,
            disk_size=lambda e: disk_usage(len(e.value.token_ids), len(e.value.data)),
            spill_gate=self._reserve_spill, max_event_blocks=max_event_blocks,
            admission=admission)
        # Blocks evicted from RAM whose file is being written: hash -> (block, reserved bytes).
        self.pending: dict[int, tuple[OffloadBlock, int]] = {}
        self.pending_bytes = 0
        # Hashes whose disk copy (file, or pending write) was put without token ids: a
        # verified put of one replaces it (`_replace_unverified`). RAM entries need no such
        # set (their block is at hand). Bounded by the disk tier's entries.
        self.unverified_disk: set[int] = set()
        # Hashes of disk files an earlier run left (`open`), whose KV values this process has
        # not checked: the put check (`_check`) came after some of them were written, or that
        # run had it off. Each is checked at its first read, off the loop (`_read_disk`);
        # blocks written by this process were checked at their put. Bounded by the disk
        # tier's entries; empty with `verify_kv_values` off.
        self.unchecked_values: set[int] = set()
        self._ops: deque[tuple[str, int, OffloadBlock | None]] = deque()
        self._ops_ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._writer_task: asyncio.Task | None = None
        self._thread: _DaemonThreads | None = None  # the writer
        self._readers: _DaemonThreads | None = None
        self.changed = asyncio.Event()  # set whenever a tier's event log got something
        self.disk_read_gbps = 0.0  # measured (`_measure_disk_read`); 0: no read yet
        self._part_reads: dict[int, asyncio.Future] = {}  # get_part's disk reads in progress
        self.counts: dict[str, int] = dict.fromkeys(
            ("put_blocks", "refused", "unverified", "lookups", "lookup_hits_ram",
             "lookup_hits_disk", "disk_written", "disk_write_failed", "disk_delete_failed",
             "disk_read_failed", "spills_dropped", "replaced_unverified", "parts_served",
             "parts_read_disk"), 0)
        self._write_warn = LogThrottle(warn_every_s)
        self._delete_warn = LogThrottle(warn_every_s)

    # ---- lifecycle ----------------------------------------------------------------------------
    async def open(self) -> int:
        """Lock the disk directory and rebuild the disk tier from its files; announce the RAM
        tier as cleared. Returns the number of disk blocks found."""
        self.cache.ram_log.cleared()  # whatever RAM held before this start is gone
        found = 0
        if self.disk is not None:
            disk = self.disk
            self._readers = readers = _DaemonThreads("offload-disk-reader", READ_THREADS)
            self._thread = _DaemonThreads("offload-disk-writer")
            await readers.submit(disk.lock)
            files = await readers.submit(lambda: list(disk.scan(self.verify_on_start)))
            extra: list[Entry] = []
            for f in files:
                extra += self.cache.load_disk_entry(f.hash, f.parent_hash, f.size)
                if not f.token_bytes:
                    self.unverified_disk.add(f.hash)
                if self.verify_kv_values:
                    self.unchecked_values.add(f.hash)
            for e in extra:  # the tier was started smaller than last time: oldest files go
                self.unverified_disk.discard(e.hash)
                self.unchecked_values.discard(e.hash)
                await readers.submit(lambda h=e.hash: disk.delete(h))
            found = len(self.cache.disk)
            self._writer_task = asyncio.create_task(self._writer(), name="offload-disk-writer")
        self.changed.set()
        return found

    async def flush(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until every queued disk write and delete is done; False if `timeout` passed."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def close(self, timeout: float = WRITER_STOP_TIMEOUT_S) -> bool:  # noqa: ASYNC109
        """Stop the disk threads: the writer's batch in progress and the reads in progress
        may finish within `timeout`; queued writes not handed to the writer yet are dropped
        (the service's drain waited for them first). False if some are stuck (a stalled
        disk): what was lost is logged, the directory stays locked until the process exits,
        and the caller goes on with its shutdown; the threads die with the process
        (`_DaemonThreads`)."""
        if self._writer_task is not None:
            self._writer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._writer_task
            self._writer_task = None
        writer, readers = self._thread, self._readers
        writer_ok, readers_ok = await asyncio.gather(
            writer.stop(timeout) if writer is not None else _true(),
            readers.stop(timeout) if readers is not None else _true())
        if not writer_ok:
            log.warning(WRITER_STUCK, timeout_s=timeout, blocks_lost=len(self.pending),
                        bytes_lost=self.pending_bytes)
        if not readers_ok:
            log.warning(READERS_STUCK, timeout_s=timeout)
        if not (writer_ok and readers_ok):
            return False
        self._thread = self._readers = None
        if self.disk is not None:
            self.disk.close()
        return True

    @property
    def accounted_bytes(self) -> int:
        """Bytes of block data this store holds in memory (RAM tier + pending disk writes)."""
        return self.cache.ram.used + self.pending_bytes

    # ---- put --------------------------------------------------------------------------------
    def check_head(self, block_hash: int, parent_hash: int | None, token_ids: bytes,
                   data_bytes: int) -> tuple[str, str] | None:
        """The checks that need no payload, as `_check` makes them: a block in parts gets
        them at its first part, before its buffer is allocated."""
        if len(token_ids) % 4:
            return "token_ids", (f"block {block_hash:016x}: token_ids is {len(token_ids)} "
                                 "bytes, not int32s")
        size = len(token_ids) + data_bytes
        if size > self.max_block_bytes:
            return "too_large", (f"block {block_hash:016x}: {size} bytes, over this store's "
                                 f"limit of {self.max_block_bytes}")
        if self.verify_hashes and token_ids:
            # 1 us per block; a block filed under a hash its tokens do not have would be
            # served for the wrong prefix to every worker
            if chain_hash(parent_hash, local_block_hash(token_ids)) != block_hash:
                return "hash_mismatch", (f"block {block_hash:016x}: hash does not match its "
                                         "parent and token ids")
        elif self.require_token_ids and not token_ids:
            return "no_token_ids", (f"block {block_hash:016x}: no token ids, and this store "
                                    "keeps only blocks whose hash it can check")
        return None

    def _check(self, b: OffloadBlock) -> tuple[str, str] | None:
        """Why `b` is refused, as (reason, text; REFUSE_REASONS), or None. The cheap checks
        first; the payload's values last."""
        why = self.check_head(b.hash, b.parent_hash, b.token_ids, len(b.data))
        if why is not None:
            return why
        if self.verify_kv_values and b.data:
            # a NaN or an infinity: every torch worker refuses the block on import, so kept it
            # would be served (and moved) on every lookup for nothing. Cost per block
            # (bench/bench_offload_payload_check.py): docs/architecture.md, Security.
            try:
                problem = payload_problem(b.data)
            except Exception as exc:  # whatever a peer sent, the put of the others goes on
                problem = (BAD_PAYLOAD, f"KV payload unreadable: {exc!r}")
            if problem is not None:
                return problem[0], f"block {b.hash:016x}: {problem[1]}"
        return None

    def put(self, blocks: Sequence[OffloadBlock], *, notify: bool = True) -> PutCounts:
        """Offer `blocks` to the tiers. `notify=False`: do not set `changed` (the caller
        publishes the tier events itself, at once; the service's put)."""
        out = PutCounts()
        cache = self.cache
        for b in blocks:
            why = self._check(b)
            if why is not None:
                reason, text = why
                out.refused += 1
                out.error = out.error or text
                out.reasons[reason] = out.reasons.get(reason, 0) + 1
                out.first_refused.setdefault(reason, (b.hash, text))
                continue
            if not b.token_ids:
                # kept on the sender's word (docs/architecture.md, Security: the offload
                # store checks every hash it can)
                out.unverified += 1
                if b.hash in cache.disk and b.hash not in self.unverified_disk:
                    # a checked copy is on disk: this one is not put in front of it in RAM
                    # (lookups serve RAM first); a use of the block, as a known put is
                    cache.record((b.hash,))
                    cache.touch(b.hash)
                    out.known += 1
                    continue
            elif self.verify_hashes:
                self._replace_unverified(b.hash)
            size = len(b.token_ids) + len(b.data) + self.entry_overhead
            res = cache.offer(b.hash, b.parent_hash, size, b)
            if res.status in (STORED, STORED_DISK):
                out.stored += 1
            elif res.status == REJECTED:
                out.rejected += 1
            else:
                out.known += 1
            self._apply(res)
        self.counts["put_blocks"] += len(blocks)
        self.counts["refused"] += out.refused
        self.counts["unverified"] += out.unverified
        if notify:
            self.changed.set()
        return out

    def put_known(self, block_hash: int, token_ids: bytes) -> bool:
        """A put of `block_hash` answered without its payload, as `put` would answer it
        (`known`: one more use, nothing stored) when RAM holds it and the put could not
        replace it (a checked put replaces a copy held without token ids). For a block in
        parts, at its first part: the rest is never sent (True). False: send it."""
        cache = self.cache
        entry = cache.ram.get(block_hash)
        if entry is None or (token_ids and self.verify_hashes and not entry.value.token_ids):
            return False
        cache.sketch.increment(block_hash)  # as `offer` counts a put
        cache.ram.touch(block_hash)
        cache.counts["known"] += 1
        self.counts["put_blocks"] += 1
        if not token_ids:
            self.counts["unverified"] += 1
        return True

    def _replace_unverified(self, block_hash: int) -> None:
        """A block whose hash was just checked against its tokens: a copy of it held without
        token ids (kept on some sender's word, maybe garbage) leaves the tiers, so the checked
        one is offered in its place rather than counted `known` (else the first writer of a
        hash, checked or not, would keep it for as long as it stays in use). A dict probe
        and a set probe per verified block."""
        cache = self.cache
        entry = cache.ram.get(block_hash)
        replaced = False
        if entry is not None and not entry.value.token_ids:
            cache.ram.remove(block_hash)
            replaced = True
        if block_hash in self.unverified_disk:
            self.unverified_disk.discard(block_hash)
            self.unchecked_values.discard(block_hash)
            if cache.drop_from_disk(block_hash) is not None:
                # after its write if that is still queued (the writer keeps the order)
                self._ops.append(("delete", block_hash, None))
                self._idle.clear()
                self._ops_ready.set()
                replaced = True
        if replaced:
            self.counts["replaced_unverified"] += 1

    def _reserve_spill(self, entry: Entry) -> bool:
        if self.pending_bytes + entry.size > self.spill_queue_bytes:
            self.counts["spills_dropped"] += 1
            return False
        self.pending_bytes += entry.size
        return True

    def _apply(self, res: PutOutcome) -> None:
        """Queue the disk work a policy outcome asks for."""
        unverified, unchecked = self.unverified_disk, self.unchecked_values
        for gone in res.disk_evicted:
            unverified.discard(gone.hash)
            unchecked.discard(gone.hash)
        for victim in res.spilled:
            unchecked.discard(victim.hash)  # from RAM: its put was checked
            if victim.value.token_ids:
                unverified.discard(victim.hash)
            else:
                unverified.add(victim.hash)
            old = self.pending.get(victim.hash)
            if old is not None:  # written, evicted and spilled again before the first write
                self.pending_bytes -= old[1]  # ran: one reservation per hash
            self.pending[victim.hash] = (victim.value, victim.size)
            self._ops.append(("write", victim.hash, victim.value))
        for gone in res.disk_evicted:
            self._ops.append(("delete", gone.hash, None))
        if res.spilled or res.disk_evicted:
            self._idle.clear()
            self._ops_ready.set()

    # ---- lookup -----------------------------------------------------------------------------
    def contains(self, hashes: Sequence[int]) -> tuple[int, int]:
        """(the leading run of `hashes` held, how many of those in RAM), touching nothing (no
        record, no promotion). No request serves it since the wire's `contains` went (session
        20): kept as the tests' read of what the store holds, which `lookup` would change."""
        tiers = self.cache.locate(hashes)
        return len(tiers), sum(t == TIER_RAM for t in tiers)

    async def lookup(self, hashes: Sequence[int], max_bytes: int,
                     want_tokens: bool = False, ram_only: bool = False, *,
                     message_bytes: int | None = None,
                     max_large_bytes: int = 0) -> LookupResult:
        """The leading run of `hashes` held (`ram_only`: held in RAM), with the first blocks
        of it that fit in `max_bytes`; disk blocks are read (and checked) off the loop and
        promoted to RAM. With `max_large_bytes`, the blocks right after those that are each
        larger than `message_bytes` (a reply) come as `LookupResult.large` (up to that many
        payload bytes in all; fetched in parts, `get_part`); a block that fits a message
        after one of them ends the result (the asker asks again from there)."""
        self.counts["lookups"] += 1
        cache = self.cache
        cache.record(hashes[:MAX_RECORDED])
        tiers = cache.locate(hashes)
        if ram_only and TIER_DISK in tiers:
            tiers = tiers[:tiers.index(TIER_DISK)]
        held = len(tiers)
        ram, disk = cache.ram.entries, cache.disk.entries
        budget = max_bytes
        picked: list[OffloadBlock | None] = []
        reads: list[int] = []  # positions in `picked` to read from disk
        large_budget = max_large_bytes
        one_message = message_bytes if message_bytes is not None else float("inf")
        n_large = 0  # the last n_large of `picked` (each larger than a message) go by ref
        for h, tier in zip(hashes, tiers, strict=False):
            if tier == TIER_RAM:
                blk = ram[h].value
                cost = len(blk.data) + (len(blk.token_ids) if want_tokens else 0)
            else:
                pend = self.pending.get(h)
                blk = pend[0] if pend is not None else None
                cost = (len(blk.data) + (len(blk.token_ids) if want_tokens else 0)
                        if blk is not None else disk[h].size)  # a file: its size bounds it
            cost += WIRE_OVERHEAD
            if cost > one_message:
                # (a disk file's size is a page-rounded bound: one that would just fit is
                # named too; the asker fetches it in one part). Its ref takes room in the
                # reply too: a hash, a size and the token ids (a file's: at most REF_TOKENS)
                ref = WIRE_OVERHEAD + (0 if not want_tokens else
                                       len(blk.token_ids) if blk is not None else REF_TOKENS)
                if cost > large_budget or ref > budget:
                    break
                large_budget -= cost
                budget -= ref
                n_large += 1
            elif n_large or cost > budget:
                break
            else:
                budget -= cost
            if blk is None:
                reads.append(len(picked))
            picked.append(blk)
        disk_blocks = len(reads)
        n_small = len(picked) - n_large  # picked[:n_small] go whole
        if reads:
            assert self.disk is not None
            t0 = time.perf_counter()
            assert self._readers is not None
            got = await self._readers.submit(lambda: [self._read_disk(hashes[i]) for i in reads])
            self._measure_disk_read(got, time.perf_counter() - t0)
            for i, f in zip(reads, got, strict=True):
                h = hashes[i]
                if f is None:
                    # gone (evicted meanwhile) or bad (deleted and counted by DiskStore): the
                    # run ends here, and the tier no longer has it
                    self.unverified_disk.discard(h)
                    self.unchecked_values.discard(h)
                    if cache.drop_from_disk(h) is not None:
                        self.counts["disk_read_failed"] += 1
                    del picked[i:]
                    held = i
                    disk_blocks = sum(1 for j in reads if j < i)
                    n_small = min(n_small, i)
                    break
                blk = OffloadBlock(hash=h, parent_hash=f.parent_hash, token_ids=f.token_ids,
                                   data=f.data)
                picked[i] = blk
                self._apply(cache.promote(h, f.parent_hash,
                                          len(f.token_ids) + len(f.data) + self.entry_overhead, blk))
            self.changed.set()
        cache.touch_run(hashes[:len(picked)])  # after the promotions: head most recent
        large: list[OffloadBlockRef] = []
        disk_small = disk_blocks
        if n_small < len(picked):
            large = [OffloadBlockRef(hash=b.hash, parent_hash=b.parent_hash,
                                     token_ids=b.token_ids if want_tokens else b"",
                                     size=len(b.data))
                     for b in picked[n_small:] if b is not None]
            picked = picked[:n_small]
            disk_small = min(disk_blocks, sum(1 for j in reads if j < n_small))
        blocks = [b if want_tokens or not b.token_ids else
                  OffloadBlock(hash=b.hash, parent_hash=b.parent_hash, data=b.data)
                  for b in picked if b is not None]
        self.counts["lookup_hits_ram"] += len(blocks) + len(large) - disk_blocks
        self.counts["lookup_hits_disk"] += disk_blocks
        return LookupResult(held=held, blocks=blocks, disk_blocks=disk_small, large=large)

    def _read_disk(self, block_hash: int):
        """`DiskStore.read`, run in a reader thread, and for a file an earlier run left the
        put's check of its KV values (`unchecked_values`; ~8 us a 32 KiB block, ~75 us a 2
        MiB one, beside the file's read): a refused one is deleted and counted
        (`bad_files["kv_values"]`) and read as gone, so the run ends before it and the tier
        drops it, as for any bad file."""
        disk = self.disk
        assert disk is not None
        f = disk.read(block_hash)
        if f is not None and block_hash in self.unchecked_values:
            self.unchecked_values.discard(block_hash)
            if payload_problem(f.data) is not None:
                disk.drop_bad(block_hash, BAD_VALUES)
                return None
        return f

    async def get_part(self, block_hash: int, offset: int, max_bytes: int
                       ) -> tuple[int, bytes | memoryview]:
        """(size of block `block_hash`'s payload, bytes [offset, offset + max_bytes) of it);
        (0, b"") when it is not held. From RAM or the write queue; else read (and checked)
        from disk, off the loop (a lookup promotes the disk blocks it names, so this is
        rare: one RAM did not admit)."""
        entry = self.cache.ram.get(block_hash)
        blk = entry.value if entry is not None else None
        if blk is None:
            pend = self.pending.get(block_hash)
            blk = pend[0] if pend is not None else None
        if blk is None and self.disk is not None and block_hash in self.cache.disk:
            assert self._readers is not None
            # the parts of one block are asked for at once: one read serves those that come
            # while it runs
            reading = self._part_reads.get(block_hash)
            if reading is None:
                reading = self._readers.submit(lambda: self._read_disk(block_hash))
                self._part_reads[block_hash] = reading
                reading.add_done_callback(lambda _f: self._part_reads.pop(block_hash, None))
                self.counts["parts_read_disk"] += 1
            f = await asyncio.shield(reading)
            if f is None:
                self.unverified_disk.discard(block_hash)
                self.unchecked_values.discard(block_hash)
                if self.cache.drop_from_disk(block_hash) is not None:
                    self.counts["disk_read_failed"] += 1
                    self.changed.set()
                return 0, b""
            data: bytes | bytearray | memoryview = f.data
        elif blk is None:
            return 0, b""
        else:
            data = blk.data
        self.counts["parts_served"] += 1
        return len(data), memoryview(data)[offset:offset + max_bytes]

    def _measure_disk_read(self, files: list, seconds: float) -> None:
        """EWMA of the disk tier's read rate (bytes read and checked / s, GB/s decimal), what
        lookup replies tell workers (`OffloadLookupReply.disk_read_gbps`): they skip this
        tier when reading a block is slower than computing it."""
        nbytes = sum(len(f.data) + len(f.token_ids) for f in files if f is not None)
        if nbytes <= 0 or seconds <= 0:
            return
        gbps = nbytes / seconds / 1e9
        prev = self.disk_read_gbps
        self.disk_read_gbps = gbps if not prev else prev + 0.2 * (gbps - prev)

    # ---- disk writer --------------------------------------------------------------------------
    async def _writer(self) -> None:
        disk = self.disk
        assert disk is not None
        while True:
            if not self._ops:
                self._idle.set()
                self._ops_ready.clear()
                await self._ops_ready.wait()
                continue
            batch = []
            size = 0
            while self._ops and size < WRITE_BATCH_BYTES:
                op = self._ops.popleft()
                batch.append(op)
                if op[2] is not None:
                    size += len(op[2].data) + len(op[2].token_ids)

            def run(batch=batch) -> list[bool]:
                # True: written / deleted. A failing disk fails every op: the warnings are
                # throttled (one line per DISK_WARN_EVERY_S with the count), each failure is
                # counted on the loop side
                results = []
                for kind, h, blk in batch:
                    if kind == "write":
                        try:
                            ok = disk.write(h, blk.parent_hash, blk.token_ids, blk.data)
                            error = None if ok else "disk full or over quota"
                        except OSError as exc:
                            ok, error = False, str(exc)
                        if error is not None and (n := self._write_warn.hit()):
                            log.warning(WRITE_FAILED, failed=n, block=f"{h:016x}", error=error,
                                        every_s=self._write_warn.every_s)
                        results.append(ok)
                    else:
                        try:
                            disk.delete(h)
                            ok = True
                        except OSError as exc:
                            ok = False
                            if n := self._delete_warn.hit():
                                log.warning(DELETE_FAILED, failed=n, block=f"{h:016x}",
                                            error=str(exc), every_s=self._delete_warn.every_s)
                        results.append(ok)
                return results

            assert self._thread is not None
            try:
                results = await self._thread.submit(run)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in `run`: nothing more can be written
                log.exception("disk writer stopped")
                return
            for (kind, h, _blk), ok in zip(batch, results, strict=True):
                if kind != "write":
                    if not ok:
                        self.counts["disk_delete_failed"] += 1
                    continue
                pend = self.pending.pop(h, None)
                if pend is not None:
                    self.pending_bytes -= pend[1]
                if ok:
                    self.counts["disk_written"] += 1
                else:
                    self.counts["disk_write_failed"] += 1
                    if self.cache.drop_from_disk(h) is not None:
                        self.unverified_disk.discard(h)
                        self.unchecked_values.discard(h)
                        self.changed.set()
