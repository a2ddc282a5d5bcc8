"""The pure parts of KV transfer: the sender's pin table (clock injected), chunk planning,
reassembly and its checks, and the wire messages."""

from __future__ import annotations

import os
import random

import msgpack
import msgspec
import pytest

import proto
from genset.kv.hashing import block_hashes
from genset.transfer import errors
from genset.transfer.assembly import (
    Assembler,
    checksum,
    effective_window,
    group_checksum,
    plan_groups,
    split_parts,
)
from genset.transfer.errors import TransferError
from genset.transfer.pins import PinTable, PinTableFull
from proto import subjects
from proto.codec import ProtocolError, decode, encode
from proto.transfer import (
    TRANSFER_MESSAGES,
    KvLayout,
    KvTransferAbort,
    KvTransferAck,
    KvTransferChunk,
    KvTransferCredit,
    KvTransferHeader,
    KvTransferMessage,
    KvTransferTarget,
    TcpEndpoint,
)

# ---- PinTable -------------------------------------------------------------------------------


def test_pins_are_released_on_ack_and_a_late_release_is_harmless():
    pins = PinTable()
    pins.pin("t1", [3, 4, 5], deadline=10.0)
    pins.pin("t2", [6], deadline=20.0)
    assert len(pins) == 2 and pins.num_blocks == 4 and "t1" in pins
    assert pins.release("t1") == (3, 4, 5)
    assert pins.release("t1") == ()  # twice: nothing more
    assert pins.expire(100.0)[0].transfer_id == "t2"
    assert pins.release("t2") == ()  # an ack after the deadline changes nothing
    assert len(pins) == 0 and pins.num_blocks == 0 and pins.next_deadline() is None


def test_a_receiver_that_never_acks_gets_its_pins_expired_at_the_deadline():
    pins = PinTable()
    now = 1000.0  # injected clock
    pins.pin("silent", [1, 2], deadline=now + 30.0)
    pins.pin("acked", [7], deadline=now + 30.0)
    pins.pin("later", [8], deadline=now + 60.0)
    pins.release("acked")
    assert pins.next_deadline() == now + 30.0
    assert pins.expire(now + 29.999) == []
    freed = pins.expire(now + 30.0)
    assert [(e.transfer_id, e.blocks) for e in freed] == [("silent", (1, 2))]
    assert pins.num_blocks == 1 and pins.next_deadline() == now + 60.0
    assert [e.transfer_id for e in pins.expire(now + 1e9)] == ["later"]
    assert pins.num_blocks == 0


def test_extending_a_pin_moves_its_deadline():
    pins = PinTable()
    pins.pin("t", [1], deadline=5.0)
    assert pins.extend("t", 50.0)
    assert not pins.extend("nope", 50.0)
    assert pins.expire(10.0) == []  # the old deadline no longer applies
    assert pins.next_deadline() == 50.0
    assert [e.transfer_id for e in pins.expire(50.0)] == ["t"]


def test_pin_table_is_bounded_and_refuses_duplicates():
    pins = PinTable(max_transfers=2, max_blocks=5)
    pins.pin("a", [1, 2, 3], 1.0)
    with pytest.raises(ValueError, match="already holds pins"):
        pins.pin("a", [9], 1.0)
    with pytest.raises(PinTableFull, match="exceed 5"):
        pins.pin("b", [4, 5, 6], 1.0)
    pins.pin("b", [4, 5], 1.0)
    with pytest.raises(PinTableFull, match="2 transfers"):
        pins.pin("c", [], 1.0)
    # churn does not grow the heap without bound
    for i in range(1000):
        pins.release("b")
        pins.pin("b", [4], float(i))
    assert len(pins._heap) <= 2 * len(pins) + 64


# ---- chunk planning and reassembly ----------------------------------------------------------


def _header(n, bpb, *, first_block=0, parent=None, tid="t0"):
    hashes = block_hashes(list(range(1, n * 4 + 1)), 4)
    return KvTransferHeader(
        transfer_id=tid, request_id="r", sender_id=1, block_size=4, first_block=first_block,
        num_blocks=n, bytes_per_block=bpb, total_bytes=n * bpb, hashes=hashes,
        parent_hash=parent, layout=KvLayout(engine="test", bytes_per_block=bpb),
    )


def _chunks(blocks, chunk_bytes, tid="t0"):
    """What a sender emits for `blocks` (planning + parts + checksums)."""
    bpb = len(blocks[0]) if blocks else 0
    total = bpb * len(blocks)
    out, seq, offset = [], 0, 0
    if total == 0:
        return [(KvTransferChunk(transfer_id=tid, seq=0, offset=0, size=0, checksum=checksum(b""),
                                 last=True), b"")]
    for g in plan_groups(len(blocks), bpb, chunk_bytes):
        payloads = blocks[g.first : g.first + g.count]
        data = b"".join(payloads)
        for start, length in split_parts(len(data), chunk_bytes):
            piece = data[start : start + length]
            assert group_checksum(payloads, start, length) == checksum(piece)
            out.append((KvTransferChunk(
                transfer_id=tid, seq=seq, offset=offset, size=length,
                first_block=g.first + start // bpb, checksum=checksum(piece),
                last=offset + length == total), piece))
            seq += 1
            offset += length
    return out


@pytest.mark.parametrize(("n", "bpb", "chunk"), [
    (10, 100, 350),  # several whole blocks per chunk
    (7, 1000, 300),  # a block bigger than a chunk: parts
    (5, 64, 64),  # one block per chunk
    (3, 0, 100),  # payload-less blocks (the mocker)
    (0, 64, 100),  # nothing to send
])
def test_reassembly_gives_back_every_block_in_order(n, bpb, chunk):
    blocks = [os.urandom(bpb) for _ in range(n)]
    header = _header(n, bpb, parent=None)
    asm = Assembler(header, window_bytes=effective_window(2 * chunk, bpb))
    out = []
    for c, data in _chunks(blocks, chunk):
        asm.admit(c)
        assert len(data) <= chunk
        for run in asm.assemble(c, data):
            assert run.parent_hash == (None if run.first_block == 0
                                       else header.hashes[run.first_block - 1])
            out.extend(zip(run.hashes, (bytes(p) for p in run.payloads), strict=True))
            asm.consumed(run.nbytes)
    assert asm.complete and asm.held_bytes == 0
    assert [h for h, _ in out] == header.hashes
    assert [p for _, p in out] == blocks


def test_groups_and_parts_cover_the_blocks_exactly():
    groups = list(plan_groups(10, 100, 350))
    assert [(g.first, g.count) for g in groups] == [(0, 3), (3, 3), (6, 3), (9, 1)]
    assert split_parts(1000, 300) == [(0, 300), (300, 300), (600, 300), (900, 100)]
    assert split_parts(200, 300) == [(0, 200)]
    assert effective_window(10, 100) == 100  # never below one block


def test_a_corrupted_chunk_fails_its_checksum():
    blocks = [os.urandom(100) for _ in range(4)]
    asm = Assembler(_header(4, 100), window_bytes=1000)
    (c0, d0), (c1, d1) = _chunks(blocks, 200)
    asm.admit(c0)
    asm.assemble(c0, d0)
    asm.admit(c1)
    torn = bytearray(d1)
    torn[17] ^= 0x40
    with pytest.raises(TransferError) as info:
        asm.assemble(c1, bytes(torn))
    assert info.value.code == errors.CHECKSUM and "chunk 1" in info.value.message


def test_truncation_gaps_and_overruns_are_refused():
    blocks = [os.urandom(100) for _ in range(4)]
    chunks = _chunks(blocks, 100)
    # the last chunk claims the end before total_bytes
    asm = Assembler(_header(4, 100), window_bytes=1000)
    early = msgspec.structs.replace(chunks[0][0], last=True)
    with pytest.raises(TransferError, match="ended after 100 of 400") as info:
        asm.admit(early)
    assert info.value.code == errors.TRUNCATED
    # a lost chunk (seq jumps)
    asm = Assembler(_header(4, 100), window_bytes=1000)
    asm.admit(chunks[0][0])
    with pytest.raises(TransferError, match="expected chunk 1, got 2"):
        asm.admit(chunks[2][0])
    # fewer bytes than announced (a short read)
    asm = Assembler(_header(4, 100), window_bytes=1000)
    asm.admit(chunks[0][0])
    with pytest.raises(TransferError, match="has 50 bytes, announced 100") as info:
        asm.assemble(chunks[0][0], chunks[0][1][:50])
    assert info.value.code == errors.TRUNCATED
    # more than the window without credits
    asm = Assembler(_header(4, 100), window_bytes=250)
    asm.admit(chunks[0][0])
    asm.admit(chunks[1][0])
    with pytest.raises(TransferError) as info:
        asm.admit(chunks[2][0])
    assert info.value.code == errors.WINDOW_OVERRUN
    assert asm.high_water == 200


def test_inconsistent_headers_are_refused():
    good = _header(2, 10)
    with pytest.raises(TransferError, match="2 hashes for 3 blocks"):
        Assembler(msgspec.structs.replace(good, num_blocks=3, total_bytes=30), 100)
    with pytest.raises(TransferError, match="total_bytes 99"):
        Assembler(msgspec.structs.replace(good, total_bytes=99), 100)


def test_held_bytes_never_exceed_the_window_under_random_interleaving():
    rng = random.Random(5)
    bpb, n, chunk, window = 100, 60, 250, 600
    blocks = [os.urandom(bpb) for _ in range(n)]
    asm = Assembler(_header(n, bpb), window_bytes=window)
    pending = []  # admitted, not yet processed
    stream = _chunks(blocks, chunk)
    sent = 0
    credited = 0
    while not asm.complete:
        # the sender sends while the window allows (what hub.send does)
        if sent < len(stream) and (stream[sent][0].offset + stream[sent][0].size - credited
                                   <= window) and rng.random() < 0.6:
            asm.admit(stream[sent][0])
            pending.append(stream[sent])
            sent += 1
        elif pending:
            c, data = pending.pop(0)
            for run in asm.assemble(c, data):
                asm.consumed(run.nbytes)
            credited = asm.consumed_bytes
        assert asm.held_bytes <= window
    assert asm.high_water <= window


# ---- messages -------------------------------------------------------------------------------

SAMPLES = [
    KvTransferHeader(transfer_id="ab12", request_id="r-1", sender_id=7,
                     reply_subject="genset.default.kvxfer.tx.7.ab12", block_size=16,
                     first_block=2, num_blocks=2, bytes_per_block=8, total_bytes=16,
                     hashes=[2**64 - 1, 5], parent_hash=9,
                     layout=KvLayout(engine="torch", format="genset-kv/1", dtype="float32",
                                     block_shape=[2, 2, 16, 2, 8], bytes_per_block=8)),
    KvTransferChunk(transfer_id="ab12", seq=0, offset=0, size=3, checksum=2**64 - 2,
                    data=b"abc"),
    KvTransferCredit(transfer_id="ab12", consumed_bytes=8, imported_blocks=1),
    KvTransferAck(transfer_id="ab12", ok=False, received_bytes=8,
                  error=proto.ErrorInfo(code="kv_checksum", message="torn")),
    KvTransferAbort(transfer_id="ab12", error=proto.ErrorInfo(code="kv_cancelled", message="x")),
]


def test_every_transfer_message_has_a_sample():
    assert {type(m) for m in SAMPLES} == set(TRANSFER_MESSAGES)


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_transfer_messages_round_trip_and_read_as_tagged_maps(message):
    assert decode(encode(message), type(message)) == message
    assert msgspec.msgpack.decode(encode(message), type=KvTransferMessage) == message
    plain = msgpack.unpackb(encode(message), raw=False)
    assert plain["v"] == proto.PROTOCOL_MAJOR and plain["kind"] == type(message).__struct_config__.tag
    assert set(plain) == set(type(message).__struct_fields__) | {"kind"}


def test_target_with_tcp_endpoint_round_trips():
    target = KvTransferTarget(transfer_id="ab12", worker_id=3, subject="s", window_bytes=1 << 20,
                              tcp=TcpEndpoint(host="127.0.0.1", port=4242, token="f" * 32),
                              layout=KvLayout(engine="mocker"), deadline_ms=1)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(target), type=KvTransferTarget) == target


def test_bad_transfer_messages_name_the_field():
    raw = msgpack.packb({"kind": "chunk", "v": 1, "transfer_id": "x", "seq": -1, "offset": 0,
                         "size": 1, "checksum": 0})
    with pytest.raises(ProtocolError, match=r"\$\.seq"):
        decode(raw, KvTransferChunk)
    raw = msgpack.packb({"kind": "chunk", "v": 2, "transfer_id": "x", "seq": 0, "offset": 0,
                         "size": 1, "checksum": 0})
    with pytest.raises(ProtocolError, match="major version 2"):
        decode(raw, KvTransferChunk)


def test_transfer_subjects():
    assert subjects.kv_transfer_rx("default", 0xAB, "12cd") == "genset.default.kvxfer.rx.ab.12cd"
    assert subjects.kv_transfer_rx_all("default", 0xAB) == "genset.default.kvxfer.rx.ab.*"
    assert subjects.kv_transfer_tx("ns", 1, "x") == "genset.ns.kvxfer.tx.1.x"
    assert subjects.kv_transfer_tx_all("ns", 1) == "genset.ns.kvxfer.tx.1.*"
    with pytest.raises(ValueError, match="transfer id"):
        subjects.kv_transfer_rx("default", 1, "a.b")


@pytest.mark.parametrize(("n", "bpb", "chunk", "first", "want"), [
    (10, 100, 400, 150, [(0, 1), (1, 4), (5, 4), (9, 1)]),  # a small first group, then full
    (3, 100, 400, 250, [(0, 2), (2, 1)]),
    (10, 100, 400, 50, [(0, 1), (1, 4), (5, 4), (9, 1)]),  # never less than one block
    (10, 100, 400, 400, [(0, 4), (4, 4), (8, 2)]),  # not smaller than a chunk: no change
    (2, 100, 400, 100, [(0, 1), (1, 1)]),
])
def test_plan_groups_can_start_with_a_smaller_group(n, bpb, chunk, first, want):
    got = [(g.first, g.count) for g in plan_groups(n, bpb, chunk, first_bytes=first)]
    assert got == want
    assert sum(c for _, c in got) == n
