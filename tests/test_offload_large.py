"""Offload blocks larger than one NATS message (a Llama-3-8B block of 16 tokens is 2 MiB; NATS'
default max_payload 1 MiB), over the test session's real NATS server (default max_payload)
and the real store service: put in parts, onboarded back in parts, checked like any put, and
the store's part buffers bounded against hostile senders."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest

import proto
from genset.offload.parts import (
    BUFFER_OVERHEAD,
    PART_EXPIRED,
    PART_MISMATCH,
    PART_OVERLAP,
    PART_RANGE,
    PART_SENDER,
    PART_START,
    PARTS_FULL,
    split,
)
from proto import subjects
from proto.offload import (
    OffloadBlock,
    OffloadGetPart,
    OffloadLookup,
    OffloadLookupReply,
    OffloadPart,
    OffloadPut,
    OffloadPutPart,
    OffloadPutReply,
)
from services.kv_offload.service import PART_TTL_S
from tests.offload_helpers import chain, kv_payload
from tests.test_offload_service import WAIT, running_store, same, started_client

MiB = 1 << 20


@pytest.fixture
def ns() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sized(seed: int, sizes: list[int]) -> list[OffloadBlock]:
    """A chain of blocks (real hashes, token ids) with payloads of these sizes."""
    rng = np.random.default_rng(seed)
    blocks = chain(seed, len(sizes), 0)
    for b, n in zip(blocks, sizes, strict=True):
        b.data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    return blocks


def refused(store, reason: str) -> float:
    text = store.metrics.render().decode()
    key = f'genset_offload_refused_blocks_total{{reason="{reason}"}} '
    for line in text.splitlines():
        if line.startswith(key):
            return float(line.split()[-1])
    return 0.0


async def test_blocks_larger_than_a_message_go_in_parts_and_come_back_whole(
        nats_server, etcd_server, bus, discovery, ns):
    """A 2 MiB block (Llama-3-8B's), an odd 1.5 MiB + 3 one and small ones in one run, through
    a server with the default 1 MiB max_payload: put in parts, onboarded byte for byte, the
    small blocks on their one-message path; a byte budget keeps the leading blocks."""
    assert bus.nc.max_payload == MiB
    blocks = sized(41, [2 * MiB, 3 * MiB // 2 + 3, 1000, 2 * MiB, 4000])
    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.05) as store:
        client = await started_client(bus, discovery, ns, 1)
        assert client.put_behind(blocks) == 5
        assert await client.flush(WAIT)
        st = client.stats
        assert (st["put_large"], st["put_stored"], st["put_refused"]) == (3, 5, 0)
        assert st["put_parts"] == 3 + 2 + 3 and st["put_parts_incomplete"] == 0
        assert store.store.contains([b.hash for b in blocks]) == (5, 5)
        assert store.parts.counts["completed"] == 3 and store.parts.bytes == 0
        run = await client.lookup([b.hash for b in blocks], deadline_s=WAIT, want_tokens=True)
        assert same(run, blocks)
        assert st["lookup_large"] == 3 and st["lookup_large_failed"] == 0
        run = await client.lookup([b.hash for b in blocks], deadline_s=WAIT)
        assert same(run, blocks, tokens=False)
        # a budget that holds the first block only
        run = await client.lookup([b.hash for b in blocks], deadline_s=WAIT,
                                  max_bytes=2 * MiB + 1000)
        assert same(run, blocks[:1], tokens=False)
        # a second put of them is known at its first part: nothing more sent or stored
        parts, known = st["put_parts"], store.store.cache.counts["known"]
        client.put_behind(blocks[:2])
        assert await client.flush(WAIT)
        assert st["put_known"] == 2 and store.parts.bytes == 0
        assert st["put_parts"] - parts == 2
        assert store.store.cache.counts["known"] - known == 2
        await client.close()


async def test_several_stores_and_a_lookup_that_asks_for_large_blocks_only_by_ref(
        nats_server, etcd_server, bus, discovery, ns):
    """Large blocks spread over two stores are stitched back in order; a lookup that does not
    say it can fetch parts (an older client: `max_large_bytes` 0) gets no refs, as before."""
    blocks = sized(42, [2 * MiB] * 6)
    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.05) as a, \
            running_store(nats_server, etcd_server, ns, offload_ram_gb=0.05) as b:
        client = await started_client(bus, discovery, ns, 2)
        client.put_behind(blocks)
        assert await client.flush(WAIT)
        assert len(a.store.cache.ram) + len(b.store.cache.ram) == 6
        run = await client.lookup([x.hash for x in blocks], deadline_s=WAIT, want_tokens=True)
        assert same(run, blocks)
        first = blocks[0]
        owner = a if first.hash in a.store.cache.ram else b
        old = await bus.request(subjects.offload_lookup(ns, owner.instance_id),
                                OffloadLookup(hashes=[first.hash], max_bytes=MiB),
                                timeout=WAIT, reply_type=OffloadLookupReply)
        assert (old.held, old.blocks, old.large) == (1, [], [])
        # a part of a block not held: size 0
        part = await bus.request(subjects.offload_get_part(ns, owner.instance_id),
                                 OffloadGetPart(hash=12345, offset=0, max_bytes=1000),
                                 timeout=WAIT, reply_type=OffloadPart)
        assert (part.size, part.data) == (0, b"")
        await client.close()


async def test_large_blocks_come_back_from_the_disk_tier(nats_server, etcd_server, bus,
                                                         discovery, ns, tmp_path):
    """A RAM tier of two 2 MiB blocks, the rest on disk: a lookup reads them back (and its
    promotions push others out to disk again before their parts are asked for, so parts are
    served from RAM, the write queue and disk files)."""
    blocks = sized(43, [2 * MiB] * 6)
    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=4.5 * MiB / 2**30,
                             offload_dir=str(tmp_path), offload_disk_gb=0.1,
                             spill_min_freq=0) as store:
        client = await started_client(bus, discovery, ns, 1)
        client.put_behind(blocks)
        assert await client.flush(WAIT)
        assert await store.store.flush(WAIT)
        held, in_ram = store.store.contains([b.hash for b in blocks])
        assert held == 6 and in_ram < 6
        served = store.store.counts["parts_served"]
        run = await client.lookup([b.hash for b in blocks], deadline_s=WAIT, want_tokens=True)
        assert same(run, blocks)
        assert store.store.counts["lookup_hits_disk"] > 0
        assert store.store.counts["parts_served"] - served == 6 * 3
        assert store.store.counts["parts_read_disk"] > 0
        await client.close()


@pytest.mark.parametrize("message_bytes", [None, 64 * 1024])
async def test_non_finite_kv_in_a_block_in_parts_is_refused(nats_server, etcd_server, bus,
                                                             discovery, ns, message_bytes):
    """The store's value check applies to a block gathered from parts: a NaN in its last
    part (a torch worker's float16 payload, 1.5 MiB) is refused as `non_finite`; the clean
    twin is kept and served. In 64 KiB parts (25 of them, a window in flight) the refusal
    comes with the completing part and is counted once, as in 1 MiB ones."""
    rng = np.random.default_rng(7)
    n = 3 * MiB // 4  # float16 values: 1.5 MiB
    shape = (1, 2, 2, 16, 8, n // (2 * 2 * 16 * 8))
    clean, bad = chain(44, 2, 0)
    values = rng.standard_normal(n).astype(np.float16)
    clean.data = kv_payload(values, "float16", shape)
    values[n - 5] = np.nan
    bad.data = kv_payload(values, "float16", shape)
    assert len(bad.data) > MiB
    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.05) as store:
        client = await started_client(bus, discovery, ns, 1, max_message_bytes=message_bytes)
        client.put_behind([clean, bad])
        assert await client.flush(WAIT)
        st = client.stats
        assert (st["put_stored"], st["put_refused"]) == (1, 1)
        assert st["put_parts_incomplete"] == st["put_failed"] == 0
        assert refused(store, "non_finite") == 1
        assert store.store.contains([bad.hash]) == (0, 0)
        run = await client.lookup([clean.hash, bad.hash], deadline_s=WAIT, want_tokens=True)
        assert same(run, [clean])
        await client.close()


async def test_a_store_limit_below_the_block_refuses_it_at_its_first_part(
        nats_server, etcd_server, bus, discovery, ns):
    """`too_large` stays a refusal for blocks over the store's own limit (here 1.5 MiB):
    refused at the first part, nothing allocated, the client sends no more parts."""
    blocks = sized(45, [2 * MiB, 3 * MiB // 2 - 1000])
    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.05,
                             max_block_mb=1.5) as store:
        client = await started_client(bus, discovery, ns, 1)
        client.put_behind(blocks)
        assert await client.flush(WAIT)
        st = client.stats
        assert (st["put_stored"], st["put_refused"]) == (1, 1)
        assert st["put_parts"] == 1 + 2  # the refused block's first part only
        assert refused(store, "too_large") == 1
        assert store.parts.counts["parts"] == 2 and store.parts.bytes == 0
        await client.close()


async def test_a_store_with_default_flags_gives_one_sender_a_quarter_of_its_part_buffers(
        nats_server, etcd_server, bus, ns):
    """Unset, --part-buffer-mb is four of the largest blocks (--max-block-mb, 32 MiB by
    default): one sender's share is a quarter of the buffers and holds one largest block (a
    64 MiB default had made the one-block floor decide: half). Four senders each with a
    block in progress fill the buffers; a fifth is refused (`parts_full`)."""
    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.05) as store:
        parts, sid = store.parts, store.instance_id
        largest = int(store.labels["max_block_bytes"])
        assert largest == 32 * MiB
        assert parts.max_sender_bytes == largest + BUFFER_OVERHEAD
        assert parts.max_bytes == 4 * parts.max_sender_bytes
        for sender in range(0xD1, 0xD6):
            reply = await bus.request(subjects.offload_put_part(ns, sid, sender), OffloadPutPart(
                sender_id=sender, hash=sender, size=largest, data=b"f" * 1000),
                timeout=WAIT, reply_type=OffloadPutReply)
            assert reply.refused == (sender == 0xD5), reply
            assert parts.sender_bytes(sender) <= parts.max_bytes // 4
        assert parts.bytes == parts.max_bytes and parts.counts[PARTS_FULL] == 1


@pytest.mark.parametrize(("options", "least"), [
    ({"part_buffer_mb": 64}, "128"),  # the former default budget with the default blocks
    ({"part_buffer_mb": 15.5, "max_block_mb": 4}, "16"),
    ({"part_buffer_mb": 0}, "128"),
])
async def test_a_store_refuses_to_start_with_a_part_budget_below_four_largest_blocks(
        nats_server, etcd_server, ns, options, least):
    """A budget whose quarter cannot hold one largest block is refused at start, naming both
    flags, rather than giving one sender a larger share than the documented quarter."""
    from genset.runtime.config import ConfigError

    with pytest.raises(ConfigError, match=(
            rf"--part-buffer-mb {options['part_buffer_mb']:g} with --max-block-mb "
            rf"{options.get('max_block_mb', 32):g}: .*raise --part-buffer-mb to at least "
            rf"{least},")):
        async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.05,
                                 **options):
            pass


async def test_hostile_parts_are_refused_and_counted_and_an_honest_put_goes_through(
        nats_server, etcd_server, bus, discovery, ns):
    """Size lies, overlaps, parts past the end and blocks never finished beyond the byte
    bound, sent while an honest worker puts and onboards its large blocks: each is refused
    (or dropped) with its reason and counted, the part buffers never pass their bound, the
    honest blocks come back whole, and the unfinished ones expire (a test clock)."""
    clock = Clock()
    honest = sized(46, [2 * MiB, 3 * MiB // 2 + 3])
    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.05,
                             max_block_mb=4, part_buffer_mb=16, clock=clock) as store:
        parts = store.parts
        sid = store.instance_id
        # the per-sender share: a quarter of the buffers, one largest block
        assert parts.max_bytes == 16 * MiB + 4 * BUFFER_OVERHEAD
        assert parts.max_sender_bytes == 4 * MiB + BUFFER_OVERHEAD
        client = await started_client(bus, discovery, ns, 1)
        peak = 0

        async def part(sender: int, h: int, size: int, offset: int, n: int,
                       parent: int | None = None) -> OffloadPutReply:
            nonlocal peak
            reply = await bus.request(subjects.offload_put_part(ns, sid, sender), OffloadPutPart(
                sender_id=sender, hash=h, parent_hash=parent, size=size, offset=offset,
                data=bytes([h % 251]) * n), timeout=WAIT, reply_type=OffloadPutReply)
            peak = max(peak, parts.bytes)
            return reply

        async def hostile() -> dict[str, int]:
            seen: dict[str, int] = {}

            def note(reply: OffloadPutReply, reason: str) -> None:
                assert reply.refused == 1 and reply.stored == 0, (reason, reply)
                seen[reason] = seen.get(reason, 0) + 1

            # a size over the store's limit: refused before anything is allocated
            note(await part(0xBAD, 1, 64 * MiB, 0, 1000), "too_large")
            # an overlap, a size lie, a part past the end
            assert (await part(0xBAD, 2, 2 * MiB, 0, 600_000)).refused == 0
            note(await part(0xBAD, 2, 2 * MiB, 500_000, 600_000), PART_OVERLAP)
            assert (await part(0xBAD, 3, 2 * MiB, 0, 600_000)).refused == 0
            note(await part(0xBAD, 3, 3 * MiB, 600_000, 600_000), PART_MISMATCH)
            assert (await part(0xBAD, 4, 2 * MiB, 0, 600_000)).refused == 0
            note(await part(0xBAD, 4, 2 * MiB, 2 * MiB - 10, 600_000), PART_RANGE)
            # blocks never finished, from one sender: its share fills, then refusals
            for h in range(100, 110):
                reply = await part(0xBAD, h, 2 * MiB, 0, 1000)
                if reply.refused:
                    note(reply, PARTS_FULL)
            # and from many senders: the whole bound fills, then refusals
            for sender in range(0xC00, 0xC10):
                reply = await part(sender, 200 + sender, 2 * MiB, 0, 1000)
                if reply.refused:
                    note(reply, PARTS_FULL)
            return seen

        # the honest put first gets its blocks under way, then the flood runs beside it
        assert client.put_behind(honest) == 2
        seen, flushed = await asyncio.gather(hostile(), client.flush(WAIT))
        assert flushed
        assert client.stats["put_stored"] == 2 and client.stats["put_refused"] == 0
        run = await client.lookup([b.hash for b in honest], deadline_s=WAIT, want_tokens=True)
        assert same(run, honest)
        # every refusal was counted where it happened
        assert seen["too_large"] == 1 and refused(store, "too_large") == 1
        for reason in (PART_OVERLAP, PART_MISMATCH, PART_RANGE):
            assert seen[reason] == 1 == parts.counts[reason], reason
        assert seen[PARTS_FULL] == parts.counts[PARTS_FULL] >= 10
        assert peak <= parts.max_bytes and parts.bytes <= parts.max_bytes
        assert parts.sender_bytes(0xBAD) <= parts.max_sender_bytes
        unfinished = len(parts)
        assert unfinished >= 4
        text = store.metrics.render().decode()
        assert f'genset_offload_part_events{{kind="{PARTS_FULL}"}} {parts.counts[PARTS_FULL]}.0' \
            in text
        # the unfinished blocks expire PART_TTL_S after their first part
        clock.now += PART_TTL_S
        assert parts.expire() == unfinished and parts.bytes == 0 and len(parts) == 0
        assert parts.counts[PART_EXPIRED] == unfinished
        # and the store goes on taking large puts
        more = sized(47, [2 * MiB])
        client.put_behind(more)
        assert await client.flush(WAIT) and client.stats["put_stored"] == 3
        await client.close()


# what fits a message with its 16 token ids: 1 MiB less the headroom less 2 x 64 bytes of
# msgpack per block (genset.offload.client)
FITS = MiB - 4096 - 128


@pytest.mark.parametrize(("size", "in_parts"), [(FITS, 0), (FITS + 1, 1)])
async def test_blocks_at_the_edge_of_a_message_travel_either_way(
        nats_server, etcd_server, bus, discovery, ns, size, in_parts):
    """A block that just fits a message goes whole, one byte more goes in parts; both come
    back whole."""
    blocks = sized(48, [size])
    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.05):
        client = await started_client(bus, discovery, ns, 1)
        client.put_behind(blocks)
        assert await client.flush(WAIT) and client.stats["put_stored"] == 1
        assert client.stats["put_large"] == in_parts
        run = await client.lookup([b.hash for b in blocks], deadline_s=WAIT, want_tokens=True)
        assert same(run, blocks)
        assert client.stats["lookup_large"] == in_parts
        await client.close()


async def test_a_client_whose_messages_are_smaller_than_the_servers_fetches_every_block(
        nats_server, etcd_server, bus, discovery, ns):
    """A client limited to 256 KiB messages against the server's 1 MiB: blocks between the
    two limits are named by ref and fetched in parts like those over both (the store took
    its own reply limit as the mark: sent inline they could not fit the client's cap, the
    run ended at the first of them, and a lookup brought back only what came before it)."""
    limit = 256 * 1024
    sizes = [100 * 1024, 600 * 1024, 2 * MiB, 50 * 1024, 700 * 1024, 200 * 1024]
    blocks = sized(57, sizes)
    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.05):
        client = await started_client(bus, discovery, ns, 1, max_message_bytes=limit)
        client.put_behind(blocks)
        assert await client.flush(WAIT) and client.stats["put_stored"] == len(blocks)
        assert client.stats["put_large"] == 3  # every block over 256 KiB went in parts
        for want_tokens in (True, False):
            before = client.stats["lookup_large"]
            run = await client.lookup([b.hash for b in blocks], deadline_s=WAIT,
                                      want_tokens=want_tokens)
            assert same(run, blocks, tokens=want_tokens), [len(b.data) for b in run]
            assert client.stats["lookup_large"] - before == 3
        assert client.stats["lookup_large_failed"] == 0
        await client.close()


async def test_large_blocks_pass_the_stack_permissions(secure_infra):
    """A worker logged in as its slot (genset up's NATS users and permissions) puts and
    onboards a 2 MiB block through a store logged in as `offload`: the part subjects are
    allowed both ways."""
    from genset.offload.client import OffloadClient
    from genset.runtime.config import CommonConfig
    from services.kv_offload.service import OffloadOptions, OffloadService

    ns = secure_infra.namespace
    svc = OffloadService(CommonConfig(namespace=ns, nats=secure_infra.nats.url,
                                      etcd=secure_infra.etcd.endpoint),
                         OffloadOptions(offload_ram_gb=0.05, serve_token_ids=True))
    svc.bus = await secure_infra.bus("offload")
    worker = await secure_infra.bus("worker", slot=0)
    client = None
    try:
        await svc.start()
        client = OffloadClient(worker, ns, sender_id=secure_infra.worker_id(0))
        await client.start(instances=[svc.instance_id])
        blocks = sized(49, [2 * MiB, 3 * MiB // 2 + 3])
        client.put_behind(blocks)
        assert await client.flush(WAIT)
        assert client.stats["put_stored"] == 2 and client.stats["put_failed"] == 0
        run = await client.lookup([b.hash for b in blocks], deadline_s=WAIT, want_tokens=True)
        assert same(run, blocks)
    finally:
        if client is not None:
            await client.close()
        await svc.drain()
        await svc.stop()
        await svc.bus.close()
        await worker.close()


async def test_a_lookup_keeps_only_large_blocks_whose_parts_add_up(bus, ns):
    """A broken or forged store answering part requests: a part of another block, of
    another size, at another offset, longer than asked, or overlapping one already received
    ends the run at that block (counted), before any wrong byte is handed to the engine; a
    short answer is asked again for its rest; a block the store no longer holds (size 0) ends
    the run too."""
    from genset.offload.client import OffloadClient
    from proto.offload import OffloadBlockRef

    fake = 0xFA4F
    good, bad = sized(50, [3000, 3000])
    modes = iter(["short", "other_block", "other_size", "other_offset", "too_long", "gone"])
    mode = "ok"

    async def lookup(data: bytes) -> OffloadLookupReply:
        proto.decode(data, OffloadLookup)
        return OffloadLookupReply(store_id=fake, held=2, large=[
            OffloadBlockRef(hash=b.hash, parent_hash=b.parent_hash, size=len(b.data))
            for b in (good, bad)])

    async def get_part(data: bytes) -> OffloadPart:
        req = proto.decode(data, OffloadGetPart)
        blk = good if req.hash == good.hash else bad
        part = OffloadPart(store_id=fake, hash=req.hash, size=len(blk.data), offset=req.offset,
                           data=blk.data[req.offset:req.offset + req.max_bytes])
        if blk is good:
            return part
        if mode == "short" and len(part.data) > 10:
            part.data = part.data[:10]
        elif mode == "other_block":
            part.hash ^= 1
        elif mode == "other_size":
            part.size += 1
        elif mode == "other_offset":
            part.offset += 1
        elif mode == "too_long":
            part.data += b"x"
        elif mode == "gone":
            part.size, part.data = 0, b""
        return part

    subs = [await bus.serve(subjects.offload_lookup(ns, fake), lookup),
            await bus.serve(subjects.offload_get_part(ns, fake), get_part)]
    client = OffloadClient(bus, ns, max_message_bytes=1000 + 256)  # parts of 1000 bytes
    await client.start(instances=[fake])
    hashes = [good.hash, bad.hash]
    assert same(await client.lookup(hashes, deadline_s=WAIT), [good, bad], tokens=False)
    mode = next(modes)  # short answers: asked again for the rest
    assert same(await client.lookup(hashes, deadline_s=WAIT), [good, bad], tokens=False)
    assert client.stats["lookup_large_failed"] == 0
    for failed, m in enumerate(modes, 1):
        mode = m
        run = await client.lookup(hashes, deadline_s=WAIT)
        assert same(run, [good], tokens=False), m
        assert client.stats["lookup_large_failed"] == failed
    await client.close()
    for sub in subs:
        await sub.unsubscribe()


async def test_a_part_whose_body_names_another_sender_is_refused_and_counted(
        nats_server, etcd_server, bus, ns):
    """The store gathers parts under the sender their subject names (what NATS authenticates
    in a secured stack): a part whose body says another sender is refused (`part_sender`),
    counted, drops the block that subject's sender had in progress and starts nothing under
    either id; so does a subject whose last token is not an instance id."""
    me, other = 0xA1, 0xB2
    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.05) as store:
        parts, sid = store.parts, store.instance_id
        mine = subjects.offload_put_part(ns, sid, me)

        async def part(subject: str, sender: int, offset: int = 0) -> OffloadPutReply:
            return await bus.request(subject, OffloadPutPart(
                sender_id=sender, hash=77, size=2 * MiB, offset=offset, data=b"k" * 1000),
                timeout=WAIT, reply_type=OffloadPutReply)

        assert (await part(mine, me)).refused == 0 and parts.sender_bytes(me) > 0
        reply = await part(mine, other, offset=1000)
        assert reply.refused == 1 and "part says sender b2" in reply.error, reply
        assert parts.counts[PART_SENDER] == 1 and len(parts) == 0 and parts.bytes == 0
        assert parts.sender_bytes(other) == parts.sender_bytes(me) == 0
        # a last token that is not an instance id as the bus writes them
        base = subjects.offload_put_part_all(ns, sid)[:-1]
        for tok in ("A1", "0a1", "zz"):
            reply = await part(base + tok, me)
            assert reply.refused == 1 and repr(tok) in reply.error, reply
        assert parts.counts[PART_SENDER] == 4 and len(parts) == 0
        assert parts.counts["parts"] == 1  # the one part taken
        text = store.metrics.render().decode()
        assert f'genset_offload_part_events{{kind="{PART_SENDER}"}} 4.0' in text
        # the sender's own parts are taken as before
        assert (await part(mine, me)).refused == 0 and (me, 77) in parts


async def test_a_later_part_of_a_block_not_in_progress_is_refused(nats_server, etcd_server,
                                                                  bus, ns):
    """A part other than a block's first, with no block in progress (its block expired or
    was dropped), is refused (`part_start`): its sender stops instead of filling a buffer
    that could never complete; nothing is held. The same block from offset 0 is taken."""
    me = 0xA7
    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.05) as store:
        parts, subject = store.parts, subjects.offload_put_part(ns, store.instance_id, me)

        async def part(offset: int) -> OffloadPutReply:
            return await bus.request(subject, OffloadPutPart(
                sender_id=me, hash=78, size=2 * MiB, offset=offset, data=b"p" * 1000),
                timeout=WAIT, reply_type=OffloadPutReply)

        reply = await part(1000)
        assert reply.refused == 1 and "offset 1000" in reply.error, reply
        assert parts.counts[PART_START] == 1 and len(parts) == 0 and parts.bytes == 0
        assert (await part(0)).refused == 0 and (me, 78) in parts
        assert (await part(1000)).refused == 0 and parts.counts[PART_START] == 1


async def test_a_worker_cannot_send_parts_under_another_workers_id(secure_infra):
    """In the secured stack a worker may publish parts only under its own sender id: one
    under another worker's subject (its body forged to match) is refused by the server (a
    permissions violation) and never reaches the store, while its own, sent after it on the
    same connection (NATS keeps one connection's order, so the forged one would have come
    first), is taken."""
    from genset.runtime.config import CommonConfig
    from services.kv_offload.service import OffloadOptions, OffloadService
    from tests.test_security import Errors, raw

    ns = secure_infra.namespace
    me, other = secure_infra.worker_id(0), secure_infra.worker_id(1)
    svc = OffloadService(CommonConfig(namespace=ns, nats=secure_infra.nats.url,
                                      etcd=secure_infra.etcd.endpoint),
                         OffloadOptions(offload_ram_gb=0.05))
    svc.bus = await secure_infra.bus("offload")
    errors = Errors()
    nc = await raw(secure_infra, "worker", slot=0, errors=errors)
    try:
        await svc.start()
        parts, sid = svc.parts, svc.instance_id

        def part(sender: int, h: int) -> bytes:
            return proto.encode(OffloadPutPart(sender_id=sender, hash=h, size=2 * MiB,
                                               data=b"k" * 1000))

        forged = subjects.offload_put_part(ns, sid, other)
        await nc.publish(forged, part(other, 1))
        msg = await nc.request(subjects.offload_put_part(ns, sid, me), part(me, 2),
                               timeout=WAIT)
        assert proto.decode(msg.data, OffloadPutReply).refused == 0
        await errors.wait_for(f'Permissions Violation for Publish to "{forged}"')
        assert (other, 1) not in parts and parts.sender_bytes(other) == 0
        assert (me, 2) in parts and len(parts) == 1 and parts.counts["parts"] == 1
    finally:
        await nc.close()
        await svc.drain()
        await svc.stop()
        await svc.bus.close()


class PartsInFlight:
    """A real Bus, passed through, that counts the part puts in flight on it (the most at
    once): what shows a block's parts go with a window, without timing anything."""

    def __init__(self, bus) -> None:
        self._bus = bus
        self.now = 0
        self.most = 0
        self.puts_now = 0  # every put message in flight, whole blocks' and parts'
        self.puts_most = 0

    def __getattr__(self, name: str):
        return getattr(self._bus, name)

    async def request(self, subject: str, message, **kwargs):
        counted = isinstance(message, OffloadPutPart)
        a_put = counted or isinstance(message, OffloadPut)
        if counted:
            self.now += 1
            self.most = max(self.most, self.now)
        if a_put:
            self.puts_now += 1
            self.puts_most = max(self.puts_most, self.puts_now)
        try:
            return await self._bus.request(subject, message, **kwargs)
        finally:
            if counted:
                self.now -= 1
            if a_put:
                self.puts_now -= 1


async def test_a_blocks_parts_go_with_a_window_in_flight_and_come_back_whole(
        nats_server, etcd_server, bus, discovery, ns):
    """In 64 KiB parts (a 2 MiB block is 33 of them, an odd 1.5 MiB + 3 one 25), one block at
    a time: the first part alone, then PART_PUTS in flight at once (the block's own put slot
    and the client's idle ones); every part answered, both blocks stored and onboarded byte
    for byte."""
    from genset.offload.client import PART_HEADROOM, PART_PUTS

    blocks = sized(51, [2 * MiB, 3 * MiB // 2 + 3])
    limit = 64 * 1024
    expected = sum(len(split(len(b.data), limit - len(b.token_ids) - PART_HEADROOM))
                   for b in blocks)
    assert expected > 2 * (PART_PUTS + 1)
    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.05) as store:
        counted = PartsInFlight(bus)
        client = await started_client(counted, discovery, ns, 1, max_inflight=PART_PUTS,
                                      max_message_bytes=limit, put_timeout_s=WAIT)
        for b in blocks:  # one at a time: every other put slot idle
            assert client.put_behind([b]) == 1
            assert await client.flush(WAIT)
        st = client.stats
        assert (st["put_large"], st["put_stored"], st["put_parts"]) == (2, 2, expected)
        assert st["put_parts_incomplete"] == st["put_failed"] == st["put_refused"] == 0
        assert PART_PUTS > 1 and counted.most == PART_PUTS
        assert store.parts.counts["parts"] == expected
        assert store.parts.counts["completed"] == 2 and store.parts.bytes == 0
        run = await client.lookup([b.hash for b in blocks], deadline_s=WAIT, want_tokens=True)
        assert same(run, blocks)
        await client.close()


async def test_parts_in_flight_never_take_put_slots_other_sends_hold(
        nats_server, etcd_server, bus, discovery, ns):
    """Large and small blocks put together, 2 put slots: the client never has more than 2
    put messages in flight (a block's extra parts take only idle slots), because what the
    store has not read yet waits in nats-server for its one connection, shared by every
    worker; everything is stored all the same."""
    from genset.offload.client import PART_PUTS

    limit = 64 * 1024
    large = sized(55, [MiB + 300 * 1024, MiB + 200 * 1024 + 5, MiB + 250 * 1024])
    small = sized(56, [8 * 1024] * 12)
    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.05):
        counted = PartsInFlight(bus)
        client = await started_client(counted, discovery, ns, 1, max_inflight=2,
                                      max_message_bytes=limit, put_timeout_s=WAIT)
        mixed = [large[0], *small[:6], large[1], *small[6:], large[2]]
        assert client.put_behind(mixed) == len(mixed)
        assert await client.flush(WAIT)
        st = client.stats
        assert st["put_large"] == 3 and st["put_stored"] == len(mixed), st
        assert PART_PUTS > 2 and counted.puts_most <= 2, counted.puts_most
        run = await client.lookup([b.hash for b in large], deadline_s=WAIT, want_tokens=True)
        assert same(run, large), (len(run), client.stats)
        await client.close()


async def test_a_block_refused_at_its_first_part_sends_no_more_parts(
        nats_server, etcd_server, bus, discovery, ns):
    """Another sender's blocks in progress fill the store's part buffers: a 2 MiB block is
    refused (`parts_full`) at its first part, and the client sends none of its other parts
    (the first goes alone: sent with it they would each have been refused and counted
    again) and counts one refused put; once those expire the same block goes through."""
    clock = Clock()
    async with running_store(nats_server, etcd_server, ns, offload_ram_gb=0.05,
                             max_block_mb=2.5, part_buffer_mb=10, clock=clock) as store:
        parts, sid = store.parts, store.instance_id
        for sender in range(0xC1, 0xC6):  # each its own share; the fifth finds it all full
            reply = await bus.request(subjects.offload_put_part(ns, sid, sender), OffloadPutPart(
                sender_id=sender, hash=sender, size=2 * MiB, data=b"f" * 1000),
                timeout=WAIT, reply_type=OffloadPutReply)
            assert reply.refused == (sender == 0xC5), reply
        assert parts.counts[PARTS_FULL] == 1
        client = await started_client(bus, discovery, ns, 1, put_timeout_s=WAIT)
        [blk] = sized(53, [2 * MiB])
        client.put_behind([blk])
        assert await client.flush(WAIT)
        st = client.stats
        assert (st["put_large"], st["put_parts"], st["put_refused"], st["put_stored"]) == \
            (1, 1, 1, 0)
        assert parts.counts[PARTS_FULL] == 2 and parts.sender_bytes(7) == 0
        clock.now += PART_TTL_S
        parts.expire()  # (or the store's sweeper did)
        assert len(parts) == 0 and parts.counts[PART_EXPIRED] == 4
        client.put_behind([blk])
        assert await client.flush(WAIT)
        assert (st["put_stored"], st["put_refused"], st["put_parts"]) == (1, 1, 1 + 3)
        await client.close()


@pytest.mark.parametrize("mode", ["refused", "error"])
async def test_a_refusal_or_failure_mid_block_stops_its_other_parts(bus, ns, mode):
    """A store (a fake, answering in order in the connection's reader) refuses the 6th of a
    block's 40 parts and answers the parts in flight after it `known`: the client sends no
    part after the refusal beyond those already in flight (at most PART_PUTS), takes the
    first outcome as the block's (one refusal, no `known`) and counts it as before. A part
    answered with an error stops it the same way, counted as a failed put (the fake answers
    every part from there with an error: the bus sends error replies from a task, so a
    plain answer to a later part could overtake one, and the client stops only once it
    learns of the failure)."""
    from genset.offload.client import PART_HEADROOM, PART_PUTS, OffloadClient

    fake, k = 0xFA4E, 5
    [blk] = sized(52, [40_000])
    got: list[int] = []

    def put_part(subject: str, data: bytes) -> OffloadPutReply:
        req = proto.decode(data, OffloadPutPart)
        assert subjects.sender_token(subject) == req.sender_id == 7
        got.append(req.offset)
        if len(got) - 1 < k:
            return OffloadPutReply(store_id=fake)
        if mode == "error":
            raise ValueError("a broken part")
        if len(got) - 1 == k:
            return OffloadPutReply(store_id=fake, refused=1, error="refused mid-block")
        return OffloadPutReply(store_id=fake, known=1)

    sub = await bus.serve_direct(subjects.offload_put_part_all(ns, fake), put_part,
                                 with_subject=True)
    # parts of 1000 bytes: 40 of them
    client = OffloadClient(bus, ns, sender_id=7, put_timeout_s=WAIT,
                           max_message_bytes=1000 + len(blk.token_ids) + PART_HEADROOM)
    await client.start(instances=[fake])
    client.put_behind([blk])
    assert await client.flush(WAIT)
    st = client.stats
    assert k + 1 <= len(got) <= k + PART_PUTS < 40, got
    assert got == sorted(got) and len(set(got)) == len(got)
    if mode == "refused":
        assert (st["put_refused"], st["put_known"], st["put_failed"]) == (1, 0, 0)
        assert st["put_parts"] == len(got)
    else:
        assert (st["put_refused"], st["put_known"], st["put_failed"]) == (0, 0, 1)
        assert st["put_parts"] == k
    assert st["put_parts_incomplete"] == 0 and st["put_large"] == 1
    await client.close()
    await sub.unsubscribe()
