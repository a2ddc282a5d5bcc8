"""The pure logic of offload blocks in parts (`genset.offload.parts`): gathering, the checks
on every part, the byte bounds and the expiry (with a test clock)."""

from __future__ import annotations

import random

import pytest

from genset.offload.parts import (
    BUFFER_OVERHEAD,
    COMPLETE,
    DROPPED,
    MAX_RANGES,
    PART_EXPIRED,
    PART_MISMATCH,
    PART_OVERLAP,
    PART_RANGE,
    PART_SENDER,
    PART_START,
    PARTS_FULL,
    PENDING,
    SENDER_SHARES,
    Assemblies,
    PartBuffer,
    buffer_bounds,
    check_sender,
    split,
)
from proto import subjects


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_split_covers_the_payload_in_order():
    assert split(10, 4) == [(0, 4), (4, 4), (8, 2)]
    assert split(8, 4) == [(0, 4), (4, 4)]
    assert split(3, 4) == [(0, 3)]
    assert split(0, 4) == []
    with pytest.raises(ValueError):
        split(10, 0)


def test_part_buffer_gathers_parts_in_any_order():
    rng = random.Random(1)
    data = rng.randbytes(1000)
    parts = split(len(data), 97)
    rng.shuffle(parts)
    buf = PartBuffer(len(data))
    for off, n in parts:
        assert not buf.complete
        assert buf.add(off, data[off:off + n]) is None
    assert buf.complete and bytes(buf.buf) == data
    assert buf.ranges == [[0, 1000]]


def test_part_buffer_refuses_overlaps_and_out_of_range_parts():
    buf = PartBuffer(100)
    assert buf.add(10, b"x" * 10) is None  # [10, 20)
    assert buf.add(30, b"y" * 10) is None  # [30, 40)
    for off, n in ((15, 10), (5, 6), (19, 2), (25, 6), (0, 100), (35, 1), (10, 10)):
        why = buf.add(off, b"z" * n)
        assert why is not None and why[0] == PART_OVERLAP, (off, n)
    for off, n in ((95, 6), (100, 1), (50, 0)):
        why = buf.add(off, b"z" * n)
        assert why is not None and why[0] == PART_RANGE, (off, n)
    # refused parts copied nothing
    assert buf.received == 20 and bytes(buf.buf[:10]) == bytes(10)
    # touching pieces merge
    assert buf.add(20, b"w" * 10) is None
    assert buf.ranges == [[10, 40]]
    assert buf.add(0, b"v" * 10) is None and buf.add(40, b"u" * 60) is None
    assert buf.complete and buf.ranges == [[0, 100]]


def test_part_buffer_refuses_a_block_scattered_over_too_many_pieces():
    buf = PartBuffer(4 * MAX_RANGES + 8)
    for i in range(MAX_RANGES):
        assert buf.add(4 * i, b"a") is None
    why = buf.add(4 * MAX_RANGES + 4, b"a")
    assert why is not None and why[0] == PART_RANGE
    assert buf.add(1, b"a") is None  # touching a piece: no new one


def _asm(max_bytes=10_000, sender=None, ttl=10.0):
    clock = Clock()
    return Assemblies(max_bytes=max_bytes, max_sender_bytes=sender, ttl_s=ttl, clock=clock), clock


def test_assemblies_complete_a_block_and_forget_it():
    a, _ = _asm()
    data = bytes(range(256)) * 4
    r = a.add(1, 0xAB, size=len(data), offset=0, data=data[:600], parent_hash=7,
              token_ids=b"\1\0\0\0")
    assert r.status == PENDING and len(a) == 1
    assert a.bytes == len(data) + 4 + BUFFER_OVERHEAD == a.sender_bytes(1)
    r = a.add(1, 0xAB, size=len(data), offset=600, data=data[600:], parent_hash=7,
              token_ids=b"\1\0\0\0")
    assert r.status == COMPLETE and bytes(r.buffer.buf) == data
    assert r.buffer.parent_hash == 7 and r.buffer.token_ids == b"\1\0\0\0"
    assert len(a) == 0 and a.bytes == 0 and a.sender_bytes(1) == 0
    assert a.counts["parts"] == 2 and a.counts["completed"] == 1


def test_two_senders_of_one_block_gather_it_apart():
    a, _ = _asm()
    data = b"q" * 1000
    assert a.add(1, 5, size=1000, offset=0, data=data[:500]).status == PENDING
    assert a.add(2, 5, size=1000, offset=0, data=data[:500]).status == PENDING  # no overlap
    assert a.add(1, 5, size=1000, offset=500, data=data[500:]).status == COMPLETE
    assert a.add(2, 5, size=1000, offset=500, data=data[500:]).status == COMPLETE


def test_a_bad_part_drops_its_block_with_a_reason():
    a, _ = _asm()
    assert a.add(1, 5, size=1000, offset=0, data=b"a" * 500).status == PENDING
    r = a.add(1, 5, size=1000, offset=400, data=b"b" * 200)
    assert (r.status, r.reason) == (DROPPED, PART_OVERLAP) and len(a) == 0 and a.bytes == 0
    # a size lie after the first part
    assert a.add(1, 6, size=1000, offset=0, data=b"a" * 500).status == PENDING
    r = a.add(1, 6, size=2000, offset=500, data=b"b" * 500)
    assert (r.status, r.reason) == (DROPPED, PART_MISMATCH) and len(a) == 0
    # another parent or other token ids
    assert a.add(1, 7, size=1000, offset=0, data=b"a" * 500, parent_hash=1).status == PENDING
    assert a.add(1, 7, size=1000, offset=500, data=b"a" * 500, parent_hash=2).reason \
        == PART_MISMATCH
    # past the end, at the first part (nothing allocated) and later
    r = a.add(1, 8, size=1000, offset=900, data=b"a" * 200)
    assert (r.status, r.reason) == (DROPPED, PART_RANGE) and len(a) == 0
    assert a.add(1, 8, size=1000, offset=0, data=b"a" * 500).status == PENDING
    assert a.add(1, 8, size=1000, offset=500, data=b"a" * 501).reason == PART_RANGE
    assert a.add(1, 9, size=1000, offset=0, data=b"").reason == PART_RANGE
    assert a.add(1, 9, size=0, offset=0, data=b"a").reason == PART_RANGE
    assert len(a) == 0 and a.bytes == 0
    assert a.counts[PART_OVERLAP] == 1 and a.counts[PART_MISMATCH] == 2
    assert a.counts[PART_RANGE] == 4


def test_bytes_in_progress_are_bounded_overall_and_per_sender():
    block = 1000 + BUFFER_OVERHEAD
    a, _ = _asm(max_bytes=4 * block, sender=2 * block)
    for h in (1, 2):
        assert a.add(9, h, size=1000, offset=0, data=b"a").status == PENDING
    r = a.add(9, 3, size=1000, offset=0, data=b"a")  # the sender's share is full
    assert (r.status, r.reason) == (DROPPED, PARTS_FULL)
    for h in (4, 5):
        assert a.add(8, h, size=1000, offset=0, data=b"a").status == PENDING
    r = a.add(7, 6, size=1000, offset=0, data=b"a")  # all of it is full
    assert (r.status, r.reason) == (DROPPED, PARTS_FULL)
    assert a.bytes == 4 * block and a.counts[PARTS_FULL] == 2
    # the ones in progress are not pushed out: they finish
    assert a.add(9, 1, size=1000, offset=1, data=b"b" * 999).status == COMPLETE
    assert a.add(7, 6, size=1000, offset=0, data=b"a").status == PENDING  # room again


def test_blocks_expire_ttl_after_their_first_part_however_they_trickle():
    a, clock = _asm(ttl=10.0)
    assert a.add(1, 1, size=100, offset=0, data=b"a").status == PENDING
    clock.now += 6
    assert a.add(2, 2, size=100, offset=0, data=b"a").status == PENDING
    for i in range(1, 4):  # block 1 trickles a byte at a time: it still expires
        clock.now += 1
        assert a.add(1, 1, size=100, offset=i, data=b"a").status == PENDING
    clock.now += 1.5  # 10.5 s after block 1's first part, 4.5 after block 2's
    assert a.expire() == 1 and len(a) == 1 and (2, 2) in a and (1, 1) not in a
    assert a.counts[PART_EXPIRED] == 1
    # a later part of an expired block is refused: nothing is held for a block that could
    # never complete, and its sender hears so at once
    bytes_before = a.bytes
    late = a.add(1, 1, size=100, offset=50, data=b"a")
    assert late.status == DROPPED and late.reason == PART_START
    assert (1, 1) not in a and a.bytes == bytes_before and a.counts[PART_START] == 1
    # the block sent again from its start is a new block
    assert a.add(1, 1, size=100, offset=0, data=b"a").status == PENDING
    clock.now += 10
    assert a.expire() == 2 and len(a) == 0 and a.bytes == 0
    assert a.counts[PART_EXPIRED] == 3


def test_adding_a_part_expires_old_blocks_first():
    block = 100 + BUFFER_OVERHEAD
    a, clock = _asm(max_bytes=block, ttl=5.0)
    assert a.add(1, 1, size=100, offset=0, data=b"a").status == PENDING
    assert a.add(2, 2, size=100, offset=0, data=b"a").reason == PARTS_FULL
    clock.now += 5
    assert a.add(2, 2, size=100, offset=0, data=b"a").status == PENDING
    assert a.counts[PART_EXPIRED] == 1


def test_the_sender_is_the_subjects_last_token_and_the_body_must_agree():
    """The store goes by the subject's sender (what NATS authenticates); a body naming another
    sender, or a last token that is not an instance id as `instance_token` writes it, is
    refused with `part_sender`."""
    subject = subjects.offload_put_part("ns", 0xAB, 0x1F)
    assert subject == "genset.ns.kv_offload.putpart.ab.1f"
    assert subjects.offload_put_part_all("ns", 0xAB) == "genset.ns.kv_offload.putpart.ab.*"
    assert subjects.sender_token(subject) == 0x1F
    assert subjects.sender_token(subjects.offload_put_part("ns", 1, 0)) == 0
    assert subjects.sender_token(subjects.offload_put_part("ns", 1, 2**64 - 1)) == 2**64 - 1
    for bad in ("1F", "01f", "-1f", "x", "", "1" * 17, "1f.", "+1f"):
        assert subjects.sender_token(f"genset.ns.kv_offload.putpart.ab.{bad}") is None, bad
    assert check_sender(0x1F, 0x1F) is None
    reason, text = check_sender(0x1F, 0x2E)
    assert reason == PART_SENDER and "2e" in text and "1f" in text
    reason, text = check_sender(None, 0x1F, "01f")
    assert reason == PART_SENDER and "'01f'" in text


def test_a_refused_part_drops_its_senders_block_and_is_counted():
    a, _ = _asm()
    assert a.add(1, 5, size=1000, offset=0, data=b"a" * 500).status == PENDING
    assert a.add(2, 5, size=1000, offset=0, data=b"a" * 500).status == PENDING
    r = a.refuse(1, 5, PART_SENDER, "says another sender")
    assert (r.status, r.reason, r.text) == (DROPPED, PART_SENDER, "says another sender")
    assert (1, 5) not in a and (2, 5) in a and a.sender_bytes(1) == 0
    assert a.refuse(None, 5, PART_SENDER, "not an id").status == DROPPED
    assert a.refuse(3, 9, PART_SENDER, "nothing in progress").status == DROPPED
    assert a.counts[PART_SENDER] == 3 and len(a) == 1


MiB = 1 << 20


def test_the_default_part_budget_keeps_one_sender_to_a_quarter_holding_one_largest_block():
    """The store's defaults (32 MiB blocks, no budget set): the budget is four largest blocks,
    one sender's share a quarter of it, and that quarter holds one largest block with its
    token ids and accounting overhead. (With a 64 MiB budget the former one-block floor
    made the share half.)"""
    assert SENDER_SHARES == 4
    for block in (32 * MiB, 4 * MiB, 2, 3 * MiB // 2 + 7):
        total, share = buffer_bounds(block)
        assert total == SENDER_SHARES * share
        assert share == block + BUFFER_OVERHEAD
        # the largest block a sender may declare fits its share, and only one of them
        a, _ = _asm(max_bytes=total, sender=share)
        tok = 4 * (block // 8)  # token ids: int32s, half the block or so
        assert a.add(1, 1, size=block - tok, offset=0, data=b"x",
                     token_ids=b"\0" * tok).status == PENDING
        assert a.add(1, 2, size=1, offset=0, data=b"x").reason == PARTS_FULL
        # four senders fill the whole, a fifth is refused
        for sender in (2, 3, 4):
            assert a.add(sender, 1, size=block, offset=0, data=b"x").status == PENDING
        assert a.bytes == total
        assert a.add(5, 1, size=1, offset=0, data=b"x").reason == PARTS_FULL


def test_a_part_budget_is_four_blocks_or_more_and_one_sender_holds_a_quarter_of_it():
    total, share = buffer_bounds(4 * MiB, 16 * MiB)
    assert (total, share) == (16 * MiB + 4 * BUFFER_OVERHEAD, 4 * MiB + BUFFER_OVERHEAD)
    total, share = buffer_bounds(2 * MiB, 64 * MiB)
    assert (total, share) == (64 * MiB + 4 * BUFFER_OVERHEAD, 16 * MiB + BUFFER_OVERHEAD)
    assert share * SENDER_SHARES == total


@pytest.mark.parametrize(("block", "budget"), [(32 * MiB, 64 * MiB), (4 * MiB, 16 * MiB - 1),
                                               (4 * MiB, 0), (1, 3)])
def test_a_part_budget_whose_quarter_cannot_hold_one_largest_block_is_refused(block, budget):
    """Not given a larger share: the share is what bounds one hostile sender."""
    with pytest.raises(ValueError, match=f"largest block of {block}: it needs at least "
                                         f"{4 * block}"):
        buffer_bounds(block, budget)
