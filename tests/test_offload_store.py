"""The offload store's block keeping with a real disk tier (no NATS): restart, bad files,
bounds under a flood, put validation."""

from __future__ import annotations

import os
import shutil

import pytest
from structlog.testing import capture_logs

from genset.kv.replica import HashSetReplica
from proto.kv import Cleared
from proto.offload import OffloadBlock
from services.kv_offload.disk import (
    DISK_WARN_EVERY_S,
    HEADER_SIZE,
    READ_FAILED,
    DiskError,
    DiskStore,
    LogThrottle,
)
from services.kv_offload.store import ENTRY_OVERHEAD, WRITE_FAILED, BlockStore
from tests.offload_helpers import chain

DATA = 1000
RAM_BLOCK = DATA + 64 + ENTRY_OVERHEAD  # what one test block costs the RAM tier


def make_store(path, *, ram_blocks=8, disk_bytes=1 << 20, **kw) -> BlockStore:
    return BlockStore(ram_bytes=ram_blocks * RAM_BLOCK, disk=DiskStore(path),
                      disk_bytes=disk_bytes, **kw)


async def spill_to_disk(store: BlockStore, blocks) -> None:
    """Put `blocks` twice (reused), then push them out of RAM with hotter blocks."""
    store.put(blocks)
    store.put(blocks)
    pushers = chain(999, len(blocks) + 8, DATA)
    for _ in range(3):
        store.cache.record([b.hash for b in pushers])
    store.put(pushers)
    assert await store.flush(30)
    assert all(b.hash in store.cache.disk for b in blocks)


async def test_disk_blocks_survive_a_restart_and_ram_is_announced_cleared(tmp_path):
    blocks = chain(1, 6, DATA)
    store = make_store(tmp_path)
    assert await store.open() == 0
    await spill_to_disk(store, blocks)
    await store.close()

    again = make_store(tmp_path)
    assert await again.open() >= 6
    ram_batches = again.cache.ram_log.take_batches(worker_id=1)
    assert ram_batches[0].events == [Cleared()] and ram_batches[0].tier == "host"
    replica = HashSetReplica()
    for b in again.cache.disk_log.snapshot_batches(worker_id=1):
        assert b.tier == "disk"
        assert replica.apply(b)
    assert {b.hash for b in blocks} <= replica.hashes
    res = await again.lookup([b.hash for b in blocks], max_bytes=1 << 20, want_tokens=True)
    assert res.held == 6 and res.disk_blocks == 6
    assert [(b.hash, b.parent_hash, b.token_ids, b.data) for b in res.blocks] == \
        [(b.hash, b.parent_hash, b.token_ids, b.data) for b in blocks]
    await again.close()


async def test_a_ram_only_lookup_stops_at_the_first_disk_block(tmp_path):
    store = make_store(tmp_path)
    await store.open()
    blocks = chain(1, 6, DATA)
    await spill_to_disk(store, blocks[3:])  # the tail on disk, then the head put in RAM
    for _ in range(5):  # hotter than the blocks that pushed the tail out
        store.cache.record([b.hash for b in blocks[:3]])
    store.put(blocks[:3])
    assert all(b.hash in store.cache.ram for b in blocks[:3])
    hashes = [b.hash for b in blocks]
    res = await store.lookup(hashes, max_bytes=1 << 20, ram_only=True)
    assert res.held == 3 and res.disk_blocks == 0
    assert [b.hash for b in res.blocks] == hashes[:3]
    assert store.disk_read_gbps == 0.0  # nothing read from disk yet
    res = await store.lookup(hashes, max_bytes=1 << 20)
    assert res.held == 6 and res.disk_blocks == 3
    assert store.disk_read_gbps > 0  # measured: what lookup replies tell the workers
    await store.close()


async def test_truncated_and_corrupted_files_are_dropped_counted_and_never_served(tmp_path):
    blocks = chain(2, 6, DATA)
    store = make_store(tmp_path)
    await store.open()
    await spill_to_disk(store, blocks)
    sid = store.disk.store_id()
    await store.close()
    disk = DiskStore(tmp_path)
    truncated = disk.path(blocks[4].hash)
    os.truncate(truncated, truncated.stat().st_size - 10)
    corrupt = disk.path(blocks[2].hash)
    raw = bytearray(corrupt.read_bytes())
    raw[HEADER_SIZE + 100] ^= 0xFF  # one payload byte: header and size still look right
    corrupt.write_bytes(bytes(raw))
    leftover = disk.path(blocks[5].hash).with_suffix(".kvb.tmp")
    leftover.write_bytes(b"half a write")

    again = make_store(tmp_path)
    await again.open()
    assert again.disk.store_id() == sid
    bad = again.disk.bad_files
    assert bad["truncated"] == 1 and bad["partial_write"] == 1
    assert not truncated.exists() and not leftover.exists()
    assert blocks[4].hash not in again.cache.disk  # never announced, never served
    res = await again.lookup([b.hash for b in blocks], max_bytes=1 << 20)
    assert res.held == 2 and [b.hash for b in res.blocks] == [b.hash for b in blocks[:2]]
    assert bad["checksum"] == 1 and not corrupt.exists()
    assert blocks[2].hash not in again.cache.disk
    (batch,) = [b for b in again.cache.disk_log.take_batches(1) if b.events]
    assert any(blocks[2].hash in getattr(ev, "hashes", ()) for ev in batch.events)
    await again.close()


async def test_verify_on_start_finds_corruption_before_serving(tmp_path):
    blocks = chain(3, 3, DATA)
    store = make_store(tmp_path)
    await store.open()
    await spill_to_disk(store, blocks)
    await store.close()
    path = DiskStore(tmp_path).path(blocks[1].hash)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    again = make_store(tmp_path, verify_on_start=True)
    await again.open()
    assert again.disk.bad_files["checksum"] == 1
    assert blocks[1].hash not in again.cache.disk and blocks[0].hash in again.cache.disk
    await again.close()


async def test_a_second_store_on_one_directory_is_refused(tmp_path):
    store = make_store(tmp_path)
    await store.open()
    with pytest.raises(DiskError, match="in use by another store"):
        await make_store(tmp_path).open()
    await store.close()


def test_store_processes_sharing_a_root_claim_their_own_directories(tmp_path):
    a, b = DiskStore.claim(tmp_path), DiskStore.claim(tmp_path)
    assert (a.root.name, b.root.name) == ("store-0", "store-1")
    ids = a.store_id(), b.store_id()
    assert ids[0] != ids[1]
    a.close()  # a store stopped (or died: its flock goes with it)
    again = DiskStore.claim(tmp_path)
    assert again.root.name == "store-0" and again.store_id() == ids[0]
    again.close()
    b.close()


async def test_a_flood_of_puts_stays_within_the_byte_bounds(tmp_path):
    ram_bytes, spill_bytes, disk_bytes = 40 * RAM_BLOCK, 6 * RAM_BLOCK, 64 * 4096
    store = BlockStore(ram_bytes=ram_bytes, disk=DiskStore(tmp_path), disk_bytes=disk_bytes,
                       spill_queue_bytes=spill_bytes)
    await store.open()
    peak = 0
    for i in range(300):
        blocks = chain(i % 150, 8, DATA)  # every chain comes twice: reused, spilled
        store.put(blocks)
        store.cache.record([b.hash for b in blocks[:4]])
        await store.lookup([b.hash for b in blocks], max_bytes=1 << 16)
        peak = max(peak, store.accounted_bytes)
        assert store.cache.ram.used <= ram_bytes
        assert store.pending_bytes <= spill_bytes
        assert store.cache.disk.used <= disk_bytes
    assert peak <= ram_bytes + spill_bytes
    assert store.cache.ram.evictions > 0 and store.cache.counts["spilled"] > 0
    assert await store.flush(30)
    files = [p for p in (tmp_path / "blocks").rglob("*.kvb")]
    assert len(files) == len(store.cache.disk)
    assert sum(-(-p.stat().st_size // 4096) * 4096 for p in files) <= disk_bytes
    await store.close()


async def test_invalid_blocks_are_refused_with_a_reason(tmp_path):
    store = BlockStore(ram_bytes=1 << 20, max_block_bytes=4000)
    await store.open()
    good, wrong_hash, odd_tokens, huge = chain(4, 4, DATA)
    wrong_hash.hash ^= 1
    odd_tokens.token_ids = odd_tokens.token_ids[:-1]
    huge.data = bytes(5000)
    c = store.put([good, wrong_hash, odd_tokens, huge])
    assert (c.stored, c.refused) == (1, 3)
    assert "hash does not match" in c.error
    assert store.put([odd_tokens]).error.endswith("not int32s")
    assert "over this store's limit of 4000" in store.put([huge]).error
    await store.close()


async def test_blocks_without_token_ids_are_counted_unverified_or_refused_when_required():
    """A block without token ids cannot have its hash checked: kept and counted as such by
    default (workers write back imported blocks without them), refused by name with
    require_token_ids; a block with token ids is checked either way."""
    lax = BlockStore(ram_bytes=1 << 20)
    strict = BlockStore(ram_bytes=1 << 20, require_token_ids=True)
    for store in (lax, strict):
        await store.open()
    good, bare, forged = chain(6, 3, DATA)
    bare.token_ids = b""
    forged.token_ids = b""
    forged.hash = 0x5EED  # any hash at all: nothing to check it against
    c = lax.put([good, bare, forged])
    assert (c.stored, c.refused, c.unverified) == (3, 0, 2)
    assert lax.counts["unverified"] == 2
    assert lax.put([bare]).unverified == 1  # known, still unchecked
    c = strict.put([good, bare, forged])
    assert (c.stored, c.refused, c.unverified) == (1, 2, 0)
    assert "no token ids" in c.error and f"{bare.hash:016x}" in c.error
    assert strict.counts["refused"] == 2 and strict.counts["unverified"] == 0
    assert strict.contains([good.hash]) == (1, 1) and strict.contains([forged.hash]) == (0, 0)
    for store in (lax, strict):
        await store.close()


def bare_copy(block, seed: int = 0):
    """A block filed under `block`'s hash without token ids and with other data (garbage a
    sender vouched for: nothing can check it)."""
    import random

    from proto.offload import OffloadBlock

    return OffloadBlock(hash=block.hash, parent_hash=block.parent_hash, token_ids=b"",
                        data=random.Random(seed).randbytes(len(block.data)))


async def served(store: BlockStore, block) -> bytes | None:
    res = await store.lookup([block.hash], max_bytes=1 << 20, want_tokens=True)
    return res.blocks[0].data if res.blocks else None


async def test_a_verified_put_replaces_a_copy_held_without_token_ids():
    """The first writer of a hash no longer wins when it was unverified: a put whose tokens
    check replaces it (stored, not known); an unverified put never replaces a checked one;
    with hash checks off nothing is checked, so nothing replaces."""
    store = BlockStore(ram_bytes=1 << 20)
    await store.open()
    head, good = chain(7, 2, DATA)
    bare = bare_copy(good)
    c = store.put([head, bare])
    assert (c.stored, c.unverified) == (2, 1)
    assert await served(store, good) == bare.data
    c = store.put([good])
    assert (c.stored, c.known, c.unverified) == (1, 0, 0)
    assert store.counts["replaced_unverified"] == 1
    assert await served(store, good) == good.data
    c = store.put([bare])  # known: the checked copy stays
    assert (c.known, c.unverified) == (1, 1)
    assert store.put([good]).known == 1  # and is not replaced by itself
    assert store.counts["replaced_unverified"] == 1
    assert await served(store, good) == good.data
    # the tier's events: the bare copy removed, the checked one stored, the router follows
    replica = HashSetReplica()
    for b in store.cache.ram_log.take_batches(worker_id=1):
        assert replica.apply(b)
    assert {head.hash, good.hash} <= replica.hashes
    await store.close()

    unchecked = BlockStore(ram_bytes=1 << 20, verify_hashes=False)
    await unchecked.open()
    unchecked.put([head, bare])
    assert unchecked.put([good]).known == 1
    assert await served(unchecked, good) == bare.data
    await unchecked.close()


async def test_a_verified_put_replaces_an_unverified_copy_on_disk_also_after_a_restart(
        tmp_path):
    blocks = chain(8, 3, DATA)
    bare = [blocks[0], *(bare_copy(b, i) for i, b in enumerate(blocks[1:]))]
    store = make_store(tmp_path)
    await store.open()
    await spill_to_disk(store, bare)
    assert store.unverified_disk == {b.hash for b in bare[1:]}
    assert all(b.hash not in store.cache.ram for b in bare)
    # RAM has no copy: the disk's is dropped and its file deleted; the checked block is
    # offered like any new one (here RAM's hotter blocks send it to disk in its place)
    c = store.put([blocks[1]])
    assert (c.stored, c.known) == (1, 0)
    assert store.counts["replaced_unverified"] == 1
    assert blocks[1].hash not in store.unverified_disk
    assert await store.flush(30)
    assert await served(store, blocks[1]) == blocks[1].data
    f = store.disk.read(blocks[1].hash)
    assert f is None or (f.token_ids, f.data) == (blocks[1].token_ids, blocks[1].data)

    # an unchecked put of a hash whose checked copy is on disk (not in RAM) is known: it does
    # not go into RAM in front of the file
    await spill_to_disk(store, [blocks[1]])
    assert blocks[1].hash not in store.cache.ram
    for _ in range(8):  # asked for often: RAM would admit it in place of the pushers
        store.cache.record([blocks[1].hash])
    c = store.put([bare[1]])
    assert (c.known, c.stored, c.unverified) == (1, 0, 1)
    assert blocks[1].hash not in store.cache.ram
    assert await served(store, blocks[1]) == blocks[1].data
    await store.close()

    again = make_store(tmp_path)  # the unverified file is known as such from its header
    await again.open()
    assert again.unverified_disk == {blocks[2].hash}
    assert (await served(again, blocks[2])) == bare[2].data  # (promoted to RAM, bare)
    c = again.put([blocks[2]])
    assert (c.stored, c.known) == (1, 0)
    assert await again.flush(30)
    assert await served(again, blocks[2]) == blocks[2].data
    assert again.unverified_disk == set()
    f = again.disk.read(blocks[2].hash)
    assert f is None or (f.token_ids, f.data) == (blocks[2].token_ids, blocks[2].data)
    await again.close()


async def test_lookup_returns_what_fits_and_says_how_much_more_it_holds():
    store = BlockStore(ram_bytes=1 << 20)
    await store.open()
    blocks = chain(5, 10, DATA)
    store.put(blocks)
    res = await store.lookup([b.hash for b in blocks], max_bytes=3 * (DATA + 64) + 10)
    assert res.held == 10 and len(res.blocks) == 3
    assert all(b.token_ids == b"" for b in res.blocks)  # tokens only when asked for
    res = await store.lookup([b.hash for b in blocks[:2]] + [12345], max_bytes=1 << 20)
    assert res.held == 2
    assert store.contains([b.hash for b in blocks]) == (10, 10)
    await store.close()


@pytest.mark.parametrize("admission", ["frequency", "lru", "slru"])
def test_a_ram_blocks_python_objects_fit_its_accounted_overhead(admission):
    """The RAM tier's byte bound holds only if `entry_overhead` covers what a block costs
    beyond its payload and token ids: the decoded block object, the tier's entry and dict
    slots (`slru`: one more, for its segment)."""
    import gc
    import sys
    import tracemalloc

    import proto
    from proto.offload import OffloadBlock

    n = 2000
    wire = [proto.encode(b) for b in chain(7, n, 64)]
    store = BlockStore(ram_bytes=1 << 30, admission=admission, verify_hashes=False)
    store.put(chain(8, 1, 64))  # sizes the frequency sketch (a fixed cost, not per block)
    store.cache.ram_log.take_batches(1, 0)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        blocks = [proto.decode(w, OffloadBlock) for w in wire]
        for i in range(0, n, 100):
            store.put(blocks[i:i + 100])
            store.cache.ram_log.take_batches(1, 0)  # the service publishes these at once
        store.cache.touch_run([b.hash for b in blocks[: n // 2]])  # half used again
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    payload = sum(len(b.token_ids) + len(b.data) for b in blocks)
    per_block = (used - payload - sys.getsizeof(blocks)) / n  # the test's own list aside
    assert len(store.cache.ram) == n + 1
    print(f"{admission}: {per_block:.0f} bytes per block beyond payload and token ids")
    assert per_block <= store.entry_overhead


async def test_a_file_that_cannot_be_read_ends_the_run_and_leaves_the_tier(tmp_path):
    """An I/O error reading one file (EIO, EACCES, here a directory in its place) failed the
    whole lookup (the worker got nothing, not the run before that block), and every later
    lookup through that block failed the same way: the tier kept it."""
    blocks = chain(3, 6, DATA)
    store = make_store(tmp_path)
    await store.open()
    await spill_to_disk(store, blocks)
    for b in blocks:  # the disk copies are the only ones
        store.cache.ram.remove(b.hash)
    path = store.disk.path(blocks[3].hash)
    path.unlink()
    path.mkdir()
    hashes = [b.hash for b in blocks]
    res = await store.lookup(hashes, max_bytes=1 << 20)
    assert res.held == 3 and [b.hash for b in res.blocks] == hashes[:3]
    assert blocks[3].hash not in store.cache.disk
    assert store.counts["disk_read_failed"] == 1
    res = await store.lookup(hashes, max_bytes=1 << 20)
    assert res.held == 3 and [b.hash for b in res.blocks] == hashes[:3]
    await store.close()


def test_a_directory_whose_block_folders_cannot_be_made_is_a_clear_disk_error(tmp_path):
    """`blocks` made unusable (a file there, or a folder this user may not write: a volume
    left by a root container) raised a bare NotADirectoryError/PermissionError from the
    service's constructor: a traceback, not "offload dir ...: why", and the lock kept."""
    (tmp_path / "store-0").mkdir()
    (tmp_path / "store-0" / "blocks").write_text("not a folder")
    disk = DiskStore(tmp_path / "store-0")
    with pytest.raises(DiskError, match=r"offload dir .*store-0.*blocks"):
        disk.lock()
    (tmp_path / "store-0" / "blocks").unlink()
    disk.lock()  # the failed attempt let go of the lock
    disk.close()


async def test_a_failing_disk_logs_one_warning_per_interval_not_one_per_block(tmp_path):
    """Every write to a failing disk fails: each used to log its own warning (a line per
    block spilled, thousands a second under load). Now: counted one by one, logged once per
    interval with the count (an hour here, so exactly one line)."""
    store = make_store(tmp_path, ram_blocks=2, spill_min_freq=0, admission="lru",
                       warn_every_s=3600)
    await store.open()
    for sub in store.disk.blocks_dir.iterdir():  # the disk fails: no block file can be made
        shutil.rmtree(sub)
        sub.write_bytes(b"")
    blocks = chain(41, 40, DATA)
    with capture_logs() as logs:
        store.put(blocks)
        assert await store.flush(30)
    failed = store.counts["disk_write_failed"]
    assert failed >= 30  # all but the 2 blocks RAM holds were spilled, and failed
    lines = [e for e in logs if e["event"] == WRITE_FAILED]
    assert len(lines) == 1, lines
    assert lines[0]["failed"] == 1 and "Not a directory" in lines[0]["error"]
    assert len(store.cache.disk) == 0  # nothing the tier claims to hold is missing
    await store.close()


def test_a_log_throttle_says_how_many_failures_each_line_stands_for():
    now = [100.0]
    throttle = LogThrottle(DISK_WARN_EVERY_S, clock=lambda: now[0])
    assert throttle.hit() == 1  # the first failure is logged at once
    assert [throttle.hit() for _ in range(5)] == [0] * 5
    now[0] += DISK_WARN_EVERY_S - 0.001
    assert throttle.hit() == 0
    now[0] += 0.001
    assert throttle.hit() == 7  # the interval is over: this one and the 6 not logged
    now[0] += 60
    assert throttle.hit() == 1


def test_unreadable_files_log_one_warning_per_interval_not_one_per_block(tmp_path):
    """A read that fails with an I/O error logged a warning per block: on a failing disk,
    one per lookup. Now one line per interval (an hour here), with the count."""
    disk = DiskStore(tmp_path)
    disk.lock()
    disk.read_warn = LogThrottle(3600)
    blocks = chain(5, 10, DATA)
    for b in blocks:  # a directory where each file should be: EISDIR on open
        disk.path(b.hash).mkdir()
    with capture_logs() as logs:
        assert [disk.read(b.hash) for b in blocks] == [None] * len(blocks)
    lines = [e for e in logs if e["event"] == READ_FAILED]
    assert len(lines) == 1 and lines[0]["failed"] == 1, lines
    disk.close()


async def test_a_lookup_names_blocks_larger_than_a_reply_and_serves_them_in_parts():
    """Blocks each larger than a reply (`message_bytes`) come as refs after the whole blocks,
    within `max_large_bytes`, their refs counted in the reply's bytes; a whole block after a
    ref ends the answer (asked for again from there); without `max_large_bytes` (an older
    client) none is named; `get_part` hands out slices of the payload."""
    store = BlockStore(ram_bytes=1 << 30, max_block_bytes=1 << 20)
    await store.open()
    small, big1, big2, small2, big3 = chain(61, 5, 0)
    for b, n in ((small, 100), (big1, 5000), (big2, 6000), (small2, 100), (big3, 5000)):
        b.data = bytes([n % 251]) * n
    assert store.put([small, big1, big2, small2, big3]).stored == 5
    hashes = [b.hash for b in (small, big1, big2, small2, big3)]
    res = await store.lookup(hashes, 4000, True, message_bytes=4000, max_large_bytes=1 << 20)
    assert res.held == 5 and [b.hash for b in res.blocks] == [small.hash]
    assert [(r.hash, r.size, r.parent_hash, r.token_ids) for r in res.large] == [
        (b.hash, len(b.data), b.parent_hash, b.token_ids) for b in (big1, big2)]
    # the byte budget for large blocks: the first only
    res = await store.lookup(hashes, 4000, message_bytes=4000, max_large_bytes=5100)
    assert [r.hash for r in res.large] == [big1.hash] and res.large[0].token_ids == b""
    # the reply's own bytes bound the refs too
    res = await store.lookup(hashes, 100 + 64 + 63, message_bytes=4000,
                             max_large_bytes=1 << 20)
    assert [b.hash for b in res.blocks] == [small.hash] and res.large == []
    # an older client's lookup: no refs, the run stops at the first block too large
    res = await store.lookup(hashes, 4000, message_bytes=4000)
    assert (res.held, [b.hash for b in res.blocks], res.large) == (5, [small.hash], [])
    res = await store.lookup(hashes[1:], 4000, message_bytes=4000, max_large_bytes=1 << 20)
    assert res.blocks == [] and [r.hash for r in res.large] == [big1.hash, big2.hash]
    assert await store.get_part(big2.hash, 1000, 2000) == (6000, big2.data[1000:3000])
    assert await store.get_part(big2.hash, 5000, 2000) == (6000, big2.data[5000:])
    size, part = await store.get_part(12345, 0, 10)
    assert (size, bytes(part)) == (0, b"")
    await store.close()


async def test_check_head_refuses_a_block_in_parts_before_its_payload_arrives():
    store = BlockStore(ram_bytes=1 << 20, max_block_bytes=4000)
    good, bad = chain(62, 2, 0)
    assert store.check_head(good.hash, good.parent_hash, good.token_ids, 3000) is None
    assert store.check_head(good.hash, good.parent_hash, good.token_ids, 4000)[0] == "too_large"
    assert store.check_head(bad.hash ^ 1, bad.parent_hash, bad.token_ids, 10)[0] \
        == "hash_mismatch"
    assert store.check_head(good.hash, good.parent_hash, good.token_ids[:-1], 10)[0] \
        == "token_ids"


async def test_put_known_answers_a_held_block_without_its_payload():
    """A block in parts already in RAM is `known` at its first part, counted as a put's use;
    not when the put would replace the copy held (one without token ids, by a checked put),
    nor when only the disk tier or nobody holds it (the payload is needed)."""
    store = BlockStore(ram_bytes=1 << 20, max_block_bytes=1 << 20)
    held, unchecked, absent = chain(63, 3, 100)
    store.put([held])
    store.put([OffloadBlock(hash=unchecked.hash, parent_hash=unchecked.parent_hash,
                            data=unchecked.data)])
    known = store.cache.counts["known"]
    assert store.put_known(held.hash, held.token_ids)
    assert store.put_known(held.hash, b"")  # an unchecked put of a checked copy
    assert not store.put_known(unchecked.hash, unchecked.token_ids)
    assert store.put_known(unchecked.hash, b"")
    assert not store.put_known(absent.hash, absent.token_ids)
    assert store.cache.counts["known"] - known == 3


async def test_disk_files_an_earlier_run_left_have_their_values_checked_at_first_read(tmp_path):
    # An earlier run (before the put's value check, or with it off) spilled a block whose KV
    # holds a NaN. This run checks each such file when it first reads it: the bad one is
    # deleted and counted, the run served ends before it; files it wrote itself, checked at
    # their put, are not checked again.
    import struct

    import msgspec

    from genset.engines.torch import kvformat

    clean = kvformat.encode_raw("float16", [2, 4], struct.pack("<8e", *range(8)))
    poisoned = kvformat.encode_raw("float16", [2, 4],
                                   struct.pack("<7e", *range(7)) + b"\x00\x7e")  # NaN last
    blocks = [msgspec.structs.replace(b, data=poisoned if i == 2 else clean)
              for i, b in enumerate(chain(1, 4, DATA))]
    old = make_store(tmp_path, verify_kv_values=False)
    assert await old.open() == 0
    await spill_to_disk(old, blocks)
    await old.close()

    again = make_store(tmp_path)
    assert await again.open() >= 4
    assert {b.hash for b in blocks} <= again.unchecked_values
    hashes = [b.hash for b in blocks]
    res = await again.lookup(hashes, max_bytes=1 << 20)
    assert res.held == 2 and [b.data for b in res.blocks] == [clean, clean]
    assert again.disk.bad_files["kv_values"] == 1
    assert blocks[2].hash not in again.cache.disk
    assert not again.disk.path(blocks[2].hash).exists()
    # read once, checked once: the run's files were read together, so the clean one after
    # the bad one was checked too and stays on disk (not served: the run ended); files never
    # read (the old run's other blocks) are still to be checked
    assert not {b.hash for b in blocks} & again.unchecked_values
    assert blocks[3].hash in again.cache.disk
    assert again.unchecked_values
    assert (await again.lookup(hashes, max_bytes=1 << 20)).held == 2
    # blocks this run spills were checked at their put: nothing to check when read back
    fresh = [msgspec.structs.replace(b, data=clean) for b in chain(7, 3, DATA)]
    await spill_to_disk(again, fresh)
    assert not {b.hash for b in fresh} & again.unchecked_values
    await again.close()
