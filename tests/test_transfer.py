"""KV transfer end to end over real NATS and real loopback sockets: round trips, chunking
under max_payload, torn and truncated transfers, dead or silent peers on either side,
cancels, bounded memory, pipelining, refusals, fallback.

No test depends on timing: waits are on conditions with generous deadlines; the idle
timeouts that detect a silent peer are short so the tests end quickly, and what is asserted
is which error ends the transfer, never how long it took.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid

import pytest

from genset.kv.hashing import block_hashes
from genset.runtime.bus import Bus
from genset.runtime.infra import NatsServer
from genset.transfer import KvTransferHub, PinTable, TransferError, errors
from genset.transfer.assembly import checksum
from genset.transfer.tcp import ConnPool, SockReader, connect, frame, send_all
from proto import subjects
from proto.transfer import (
    KvLayout,
    KvTransferAck,
    KvTransferChunk,
    KvTransferCredit,
    KvTransferHeader,
    KvTransferTarget,
    TcpEndpoint,
)

RX_ID, TX_ID, HAND_ID = 0xA1, 0xB2, 0xC3
BPB = 40_000
LAYOUT = KvLayout(engine="test", format="raw", bytes_per_block=BPB)
WAIT = 30.0  # generous deadline for conditions


async def _connect(url):
    return await Bus.connect(url, name=f"xfer-{uuid.uuid4().hex[:6]}")


@pytest.fixture
async def hubs(nats_server):
    rx_bus, tx_bus = await _connect(nats_server.url), await _connect(nats_server.url)
    rx, tx = KvTransferHub(rx_bus, RX_ID), KvTransferHub(tx_bus, TX_ID)
    await rx.start()
    await tx.start()
    yield rx, tx
    await rx.close()
    await tx.close()
    await rx_bus.close()
    await tx_bus.close()


def _blocks(n, bpb=BPB):
    return [os.urandom(bpb) for _ in range(n)]


def _hashes(n, block_size=16, seed=0):
    return block_hashes([seed * 7919 + i for i in range(n * block_size)], block_size)


class Collector:
    """An importer that keeps what it got (copies: payload views die with the call)."""

    def __init__(self, rx_ref=None):
        self.hashes: list[int] = []
        self.payloads: list[bytes] = []
        self.parents: list[int | None] = []
        self.held_seen: list[int] = []
        self.rx = rx_ref

    async def __call__(self, run):
        if self.rx is not None:
            self.held_seen.append(self.rx.held_bytes)
        self.parents.append(run.parent_hash)
        self.hashes.extend(run.hashes)
        self.payloads.extend(bytes(p) for p in run.payloads)
        await asyncio.sleep(0)


def _source(blocks):
    async def read(first, count):
        return blocks[first : first + count]

    return read


async def _until(cond, what, wait_s=WAIT):
    loop = asyncio.get_running_loop()
    end = loop.time() + wait_s
    while not cond():
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def _open(rx_hub, request_id, on_blocks=None, **kw):
    col = on_blocks or Collector()
    kw.setdefault("layout", LAYOUT)
    rx = await rx_hub.open_receive(request_id, on_blocks=col, **kw)
    if isinstance(col, Collector):
        col.rx = rx
    return rx, col


# ---- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["nats", "tcp"])
async def test_round_trip_is_byte_exact_in_hash_order(hubs, transport):
    rx_hub, tx_hub = hubs
    n_all, first = 60, 10  # the receiver holds blocks 0..9 already
    hashes = _hashes(n_all)
    blocks = _blocks(n_all - first)
    rx, col = await _open(rx_hub, "req-1", expected_hashes=hashes, first_block=first)
    assert rx.target.first_block == first and (rx.target.tcp is not None)
    result = await tx_hub.send(rx.target, request_id="req-1", hashes=hashes[first:],
                               parent_hash=hashes[first - 1], block_size=16, layout=LAYOUT,
                               source=_source(blocks), transport=transport)
    got = await rx.wait()
    assert col.hashes == hashes[first:]
    assert col.payloads == blocks
    assert col.parents[0] == hashes[first - 1]
    assert result.transport == got.transport == transport
    assert result.blocks == got.blocks == n_all - first
    assert result.bytes == got.bytes == (n_all - first) * BPB
    assert rx.held_bytes == 0 and rx.done
    assert not rx_hub._receives and not tx_hub._sends  # nothing left behind
    if transport == "nats":
        assert result.chunks > 1  # 2 MB do not fit one NATS message


async def test_auto_picks_tcp_for_large_kv_and_nats_for_small(hubs):
    rx_hub, tx_hub = hubs
    for n, want in ((4, "nats"), (40, "tcp")):  # 160 KB / 1.6 MB; tcp_min_bytes is 1 MiB
        hashes = _hashes(n, seed=n)
        rx, col = await _open(rx_hub, f"auto-{n}", expected_hashes=hashes)
        result = await tx_hub.send(rx.target, request_id=f"auto-{n}", hashes=hashes,
                                   block_size=16, layout=LAYOUT, source=_source(_blocks(n)))
        await rx.wait()
        assert result.transport == want and col.hashes == hashes


async def test_payloadless_blocks_travel_as_hashes_only(hubs):
    rx_hub, tx_hub = hubs
    layout = KvLayout(engine="mocker")
    hashes = _hashes(5, seed=3)
    rx, col = await _open(rx_hub, "mock", expected_hashes=hashes, layout=layout)

    async def no_source(first, count):
        raise AssertionError("nothing to read for payload-less blocks")

    result = await tx_hub.send(rx.target, request_id="mock", hashes=hashes, block_size=16,
                               layout=layout, source=no_source)
    await rx.wait()
    assert col.hashes == hashes and col.payloads == [b""] * 5
    assert result.transport == "nats" and result.bytes == 0


async def test_chunks_stay_under_a_small_server_max_payload(tmp_path):
    conf = tmp_path / "nats.conf"
    conf.write_text("max_payload: 65536\n")
    server = NatsServer(extra_args=["-c", str(conf)]).start()
    buses = []
    try:
        buses = [await _connect(server.url) for _ in range(3)]
        rx_hub, tx_hub = KvTransferHub(buses[0], RX_ID), KvTransferHub(buses[1], TX_ID)
        assert buses[1].nc.max_payload == 65536  # read from the server's INFO
        sizes: list[int] = []

        async def spy(msg):
            sizes.append(len(msg.data))

        await buses[2].nc.subscribe(subjects.kv_transfer_rx_all("default", RX_ID), cb=spy)
        await buses[2].flush()
        bpb = 100_000  # one block is bigger than a message may be: it travels in parts
        layout = KvLayout(engine="test", bytes_per_block=bpb)
        hashes, blocks = _hashes(5, seed=9), _blocks(5, bpb)
        rx, col = await _open(rx_hub, "small", expected_hashes=hashes, layout=layout)
        result = await tx_hub.send(rx.target, request_id="small", hashes=hashes, block_size=16,
                                   layout=layout, source=_source(blocks), transport="nats")
        await rx.wait()
        assert col.payloads == blocks and col.hashes == hashes
        await _until(lambda: len(sizes) >= result.chunks + 1, "spy saw every message")
        assert max(sizes) <= 65536
        assert result.chunks >= 5 * 2  # every block split
        await rx_hub.close()
        await tx_hub.close()
    finally:
        for b in buses:
            await b.close()
        server.cleanup()


# ---- torn, truncated, refused ---------------------------------------------------------------


def _header(rx, hashes, **kw):
    fields = {
        "transfer_id": rx.transfer_id, "request_id": rx.request_id, "sender_id": TX_ID,
        "block_size": 16, "num_blocks": len(hashes), "bytes_per_block": BPB,
        "total_bytes": len(hashes) * BPB, "hashes": hashes, "layout": LAYOUT,
    }
    fields.update(kw)
    return KvTransferHeader(**fields)


class HandSender:
    """Plays the sender over NATS by hand, to send what a correct sender never would. Its
    credits and acks come to its own control subjects, as a hub's do (a receiver sends them
    nowhere else)."""

    def __init__(self, bus: Bus, worker_id: int = HAND_ID):
        self.bus = bus
        self.worker_id = worker_id
        self.replies: list = []

    async def start(self):
        from genset.transfer.tcp import decode_message

        async def on(msg):
            self.replies.append(decode_message(msg.data))

        await self.bus.nc.subscribe(subjects.kv_transfer_tx_all(self.bus.namespace,
                                                                self.worker_id), cb=on)
        await self.bus.flush()
        return self

    async def header(self, rx, hashes, **kw):
        from genset.transfer.tcp import decode_message

        kw.setdefault("reply_subject", subjects.kv_transfer_tx(self.bus.namespace,
                                                               self.worker_id, rx.transfer_id))
        kw.setdefault("sender_id", self.worker_id)
        reply = await self.bus.request(rx.target.subject, _header(rx, hashes, **kw),
                                       timeout=WAIT)
        return decode_message(reply)

    async def chunk(self, rx, seq, offset, data, *, last=False, check=None):
        await self.bus.publish(rx.target.subject, KvTransferChunk(
            transfer_id=rx.transfer_id, seq=seq, offset=offset, size=len(data),
            checksum=checksum(data) if check is None else check, last=last, data=data))


async def test_corrupted_chunk_is_detected_over_nats(hubs):
    rx_hub, tx_hub = hubs
    hand = await HandSender(tx_hub.bus).start()
    hashes, blocks = _hashes(3, seed=4), _blocks(3)
    rx, col = await _open(rx_hub, "torn", expected_hashes=hashes)
    assert isinstance(await hand.header(rx, hashes), KvTransferCredit)
    await hand.chunk(rx, 0, 0, blocks[0])
    torn = bytearray(blocks[1])
    torn[100] ^= 1
    await hand.chunk(rx, 1, BPB, bytes(torn), check=checksum(blocks[1]))
    with pytest.raises(TransferError) as info:
        await rx.wait()
    assert info.value.code == errors.CHECKSUM
    assert col.hashes == hashes[:1]  # the good block before it was imported
    assert rx.held_bytes == 0
    await _until(lambda: any(isinstance(r, KvTransferAck) for r in hand.replies), "nack")
    ack = next(r for r in hand.replies if isinstance(r, KvTransferAck))
    assert not ack.ok and ack.error.code == errors.CHECKSUM


async def test_truncated_transfer_is_detected_over_nats(hubs):
    rx_hub, tx_hub = hubs
    hand = await HandSender(tx_hub.bus).start()
    hashes, blocks = _hashes(3, seed=5), _blocks(3)
    rx, _ = await _open(rx_hub, "short", expected_hashes=hashes)
    await hand.header(rx, hashes)
    await hand.chunk(rx, 0, 0, blocks[0] + blocks[1], last=True)  # ends 1 block early
    with pytest.raises(TransferError, match=f"ended after {2 * BPB} of {3 * BPB}") as info:
        await rx.wait()
    assert info.value.code == errors.TRUNCATED and rx.held_bytes == 0


async def _tcp_open(rx, hashes, **kw):
    """Connect and send the header (an accepted one gets no answer over TCP)."""
    sock = await connect(rx.target.tcp.host, rx.target.tcp.port, WAIT)
    reader = SockReader(sock)
    await send_all(sock, frame(_header(rx, hashes, token=rx.target.tcp.token, **kw)))
    return sock, reader


async def test_corrupted_chunk_is_detected_over_tcp(hubs):
    rx_hub, _ = hubs
    hashes, blocks = _hashes(2, seed=6), _blocks(2)
    rx, _ = await _open(rx_hub, "torn-tcp", expected_hashes=hashes)
    sock, reader = await _tcp_open(rx, hashes)
    try:
        data = b"".join(blocks)
        bad = bytearray(data)
        bad[-1] ^= 0xFF
        await send_all(sock, frame(KvTransferChunk(
            transfer_id=rx.transfer_id, seq=0, offset=0, size=len(data), checksum=checksum(data),
            last=True)), bytes(bad))
        ack = await asyncio.wait_for(reader.read_message(), WAIT)
        assert isinstance(ack, KvTransferAck) and not ack.ok
        assert ack.error.code == errors.CHECKSUM
        with pytest.raises(TransferError, match="checksum"):
            await rx.wait()
        assert rx.held_bytes == 0
    finally:
        sock.close()


async def test_truncated_tcp_stream_is_detected(hubs):
    rx_hub, _ = hubs
    hashes, blocks = _hashes(2, seed=7), _blocks(2)
    rx, col = await _open(rx_hub, "cut", expected_hashes=hashes)
    sock, _reader = await _tcp_open(rx, hashes)
    data = b"".join(blocks)
    # announce both blocks, send one and a half, then the sender dies
    await send_all(sock, frame(KvTransferChunk(
        transfer_id=rx.transfer_id, seq=0, offset=0, size=len(data), checksum=checksum(data),
        last=True)), data[: BPB + BPB // 2])
    sock.close()
    with pytest.raises(TransferError, match="connection closed after") as info:
        await rx.wait()
    assert info.value.code == errors.TRUNCATED
    assert col.hashes == [] and rx.held_bytes == 0


async def test_a_target_naming_another_subject_is_refused_and_the_bus_stays_up(hubs):
    """Where a target says the KV goes is where the sender publishes: a subject past the
    server's control line (4 KiB) makes the server close the sender's connection, for good
    (nats-py does not reopen it), and any other subject makes the sender publish KV there.
    Only the named worker's receive subject for the named transfer is taken."""
    rx_hub, tx_hub = hubs
    ns = tx_hub.ns
    hashes, blocks = _hashes(2, seed=30), _blocks(2)
    rx, col = await _open(rx_hub, "subj", expected_hashes=hashes)
    good = {f: getattr(rx.target, f) for f in rx.target.__struct_fields__}
    long_id = "a" * 5000
    for fields in (
        {"subject": "x" * 5000},
        {"transfer_id": long_id, "subject": subjects.kv_transfer_rx(ns, RX_ID, long_id)},
        {"subject": subjects.subject(ns, "frontend", "generate")},
        {"transfer_id": "a.b", "subject": rx.target.subject + ".b"},
        {"worker_id": TX_ID},  # the subject is not that worker's
    ):
        with pytest.raises(TransferError) as info:
            await tx_hub.send(KvTransferTarget(**(good | fields)), request_id="subj",
                              hashes=hashes, block_size=16, layout=LAYOUT,
                              source=_source(blocks), transport="nats")
        assert info.value.code == errors.BAD_MESSAGE, info.value
        assert len(info.value.message) < 300  # the peer's string is clipped
    assert tx_hub.bus.connected and not tx_hub._sends
    await tx_hub.send(rx.target, request_id="subj", hashes=hashes, block_size=16,
                      layout=LAYOUT, source=_source(blocks), transport="nats")
    await rx.wait()
    assert col.payloads == blocks


async def test_a_header_naming_another_reply_subject_is_refused_and_the_bus_stays_up(hubs):
    """Credits and the ack go to the header's reply subject: only the sender's own control
    subject for the transfer is taken (a subject past the control line would cost the
    receiving worker its connection, and any other makes it publish there)."""
    rx_hub, tx_hub = hubs
    ns = rx_hub.ns
    hand = await HandSender(tx_hub.bus).start()
    hashes, blocks = _hashes(2, seed=31), _blocks(2)
    for fields in ({"reply_subject": "x" * 5000},
                   {"reply_subject": subjects.subject(ns, "frontend", "generate")},
                   {"sender_id": TX_ID}):  # the reply subject is not that sender's
        rx, col = await _open(rx_hub, "reply", expected_hashes=hashes)
        answer = await hand.header(rx, hashes, **fields)
        assert isinstance(answer, KvTransferAck) and not answer.ok
        assert answer.error.code == errors.BAD_MESSAGE and len(answer.error.message) < 300
        with pytest.raises(TransferError) as info:
            await rx.wait()
        assert info.value.code == errors.BAD_MESSAGE and not col.hashes
    assert rx_hub.bus.connected and not rx_hub._receives
    rx, col = await _open(rx_hub, "reply", expected_hashes=hashes)
    await tx_hub.send(rx.target, request_id="reply", hashes=hashes, block_size=16,
                      layout=LAYOUT, source=_source(blocks), transport="nats")
    await rx.wait()
    assert col.payloads == blocks


async def test_a_wrong_token_is_refused_and_the_transfer_stays_open(hubs):
    rx_hub, tx_hub = hubs
    hashes, blocks = _hashes(2, seed=8), _blocks(2)
    rx, col = await _open(rx_hub, "tok", expected_hashes=hashes)
    sock = await connect(rx.target.tcp.host, rx.target.tcp.port, WAIT)
    try:
        await send_all(sock, frame(_header(rx, hashes, token="0" * 32)))
        ack = await asyncio.wait_for(SockReader(sock).read_message(), WAIT)
        assert not ack.ok and ack.error.code == errors.REFUSED
    finally:
        sock.close()
    await tx_hub.send(rx.target, request_id="tok", hashes=hashes, block_size=16, layout=LAYOUT,
                      source=_source(blocks), transport="tcp")
    await rx.wait()
    assert col.payloads == blocks
    # the token was one-time: replaying it is refused
    sock = await connect(rx.target.tcp.host, rx.target.tcp.port, WAIT)
    try:
        await send_all(sock, frame(_header(rx, hashes, token=rx.target.tcp.token)))
        ack = await asyncio.wait_for(SockReader(sock).read_message(), WAIT)
        assert not ack.ok and "token" in ack.error.message
    finally:
        sock.close()


@pytest.mark.parametrize("transport", ["nats", "tcp"])
async def test_layout_and_hash_mismatches_are_refused_and_nothing_is_imported(hubs, transport):
    rx_hub, tx_hub = hubs
    hashes, blocks = _hashes(3, seed=10), _blocks(3)
    source = _source(blocks)
    rx, col = await _open(rx_hub, "lay", expected_hashes=hashes)
    other = KvLayout(engine="test", format="raw", dtype="bfloat16", bytes_per_block=BPB)
    with pytest.raises(TransferError) as info:
        await tx_hub.send(rx.target, request_id="lay", hashes=hashes, block_size=16,
                          layout=other, source=source, transport=transport)
    assert info.value.code == errors.LAYOUT_MISMATCH and not info.value.retryable
    with pytest.raises(TransferError, match="layout"):
        await rx.wait()
    assert col.hashes == []

    rx, col = await _open(rx_hub, "hash", expected_hashes=hashes)
    with pytest.raises(TransferError) as info:
        await tx_hub.send(rx.target, request_id="hash", hashes=_hashes(3, seed=11),
                          block_size=16, layout=LAYOUT, source=source, transport=transport)
    assert info.value.code == errors.HASH_MISMATCH
    assert col.hashes == [] and not rx_hub._receives and not tx_hub._sends


async def test_a_sender_without_a_receiver_fails_fast(hubs):
    rx_hub, tx_hub = hubs
    hashes, blocks = _hashes(2, seed=12), _blocks(2)
    # a transfer that ended: the receiving worker answers that it has no such transfer
    rx, _ = await _open(rx_hub, "gone", expected_hashes=hashes)
    await rx.cancel("client went away")
    with pytest.raises(TransferError) as info:
        await tx_hub.send(rx.target, request_id="gone", hashes=hashes, block_size=16,
                          layout=LAYOUT, source=_source(blocks), transport="nats")
    assert info.value.code == errors.CANCELLED
    # a receiving worker that is gone: nobody listens on the subject
    target = KvTransferTarget(transfer_id="dead00", worker_id=0xDEAD,
                              subject=subjects.kv_transfer_rx("default", 0xDEAD, "dead00"),
                              window_bytes=1 << 20)
    with pytest.raises(TransferError) as info:
        await tx_hub.send(target, request_id="x", hashes=hashes, block_size=16, layout=LAYOUT,
                          source=_source(blocks))
    assert info.value.code == errors.PEER_GONE and "no receiver for" in info.value.message


async def test_tcp_falls_back_to_nats_when_the_endpoint_is_unreachable(hubs):
    rx_hub, tx_hub = hubs
    hashes, blocks = _hashes(30, seed=13), _blocks(30)
    rx, col = await _open(rx_hub, "fb", expected_hashes=hashes)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    target = KvTransferTarget(**{
        **{f: getattr(rx.target, f) for f in rx.target.__struct_fields__},
        "tcp": TcpEndpoint(host="127.0.0.1", port=port, token=rx.token)})
    result = await tx_hub.send(target, request_id="fb", hashes=hashes, block_size=16,
                               layout=LAYOUT, source=_source(blocks))
    await rx.wait()
    assert result.transport == "nats" and "tcp connect" in result.fallback
    assert col.payloads == blocks
    rx, _ = await _open(rx_hub, "fb2", expected_hashes=hashes)
    target = KvTransferTarget(**{
        **{f: getattr(rx.target, f) for f in rx.target.__struct_fields__},
        "tcp": TcpEndpoint(host="127.0.0.1", port=port, token=rx.token)})
    with pytest.raises(TransferError) as info:
        await tx_hub.send(target, request_id="fb2", hashes=hashes, block_size=16,
                          layout=LAYOUT, source=_source(blocks), transport="tcp")
    assert info.value.code == errors.PEER_GONE
    await rx.cancel()


async def test_a_listener_held_full_by_idle_connections_leaves_nats(hubs):
    """Anyone who reaches a receiver's TCP port can hold all its slots for connections that
    have not shown a token yet (idle ones, renewed every hello timeout); the listener then
    closes each new one at once. Nothing of the transfer got through, so the sender goes
    over NATS (it failed, and the receiver recomputed every large prompt meanwhile); with
    transport tcp it fails, as asked."""
    rx_hub, tx_hub = hubs
    listener = rx_hub.listener
    held = [socket.create_connection(("127.0.0.1", listener.port))
            for _ in range(listener.max_pending + 2)]
    try:
        await _until(lambda: listener._pending >= listener.max_pending, "the slots taken")
        hashes, blocks = _hashes(40, seed=32), _blocks(40)  # 1.6 MB: TCP under auto
        rx, col = await _open(rx_hub, "held", expected_hashes=hashes)
        result = await tx_hub.send(rx.target, request_id="held", hashes=hashes, block_size=16,
                                   layout=LAYOUT, source=_source(blocks))
        await rx.wait()
        assert result.transport == "nats" and "closed the tcp connection" in result.fallback
        assert col.payloads == blocks
        rx, _ = await _open(rx_hub, "held2", expected_hashes=hashes)
        with pytest.raises(TransferError) as info:
            await tx_hub.send(rx.target, request_id="held2", hashes=hashes, block_size=16,
                              layout=LAYOUT, source=_source(blocks), transport="tcp")
        assert info.value.code == errors.PEER_GONE
        await rx.cancel()
    finally:
        for s in held:
            s.close()


# ---- dead and silent peers, cancels ---------------------------------------------------------


class Gate:
    """A block source that serves the first group, then waits for `release`."""

    def __init__(self, blocks):
        self.blocks = blocks
        self.calls = 0
        self.release = asyncio.Event()

    async def __call__(self, first, count):
        self.calls += 1
        if self.calls > 1:
            await self.release.wait()
        return self.blocks[first : first + count]


@pytest.mark.parametrize("transport", ["nats", "tcp"])
async def test_a_cancelled_sender_fails_the_receiver_and_frees_its_buffers(hubs, transport):
    rx_hub, tx_hub = hubs
    hashes, blocks = _hashes(40, seed=14), _blocks(40)
    rx, col = await _open(rx_hub, "sc", expected_hashes=hashes, window_bytes=256 * 1024)
    gate = Gate(blocks)
    send = asyncio.create_task(tx_hub.send(
        rx.target, request_id="sc", hashes=hashes, block_size=16, layout=LAYOUT, source=gate,
        transport=transport))
    await _until(lambda: col.hashes, "first blocks imported")
    send.cancel()
    with pytest.raises(asyncio.CancelledError):
        await send
    with pytest.raises(TransferError) as info:
        await rx.wait()
    assert info.value.code == errors.CANCELLED and "sender aborted" in info.value.message
    assert rx.held_bytes == 0 and not rx_hub._receives and not tx_hub._sends


async def test_a_sender_that_goes_silent_is_detected_before_the_deadline(hubs):
    rx_hub, tx_hub = hubs
    hand = await HandSender(tx_hub.bus).start()
    hashes, blocks = _hashes(3, seed=15), _blocks(3)
    rx, col = await _open(rx_hub, "silent", expected_hashes=hashes, idle_timeout_s=0.3,
                          deadline_s=120.0)
    await hand.header(rx, hashes)
    await hand.chunk(rx, 0, 0, blocks[0])  # then the sender's process dies: nothing more
    with pytest.raises(TransferError) as info:
        await rx.wait()
    assert info.value.code == errors.PEER_GONE  # the idle timeout, not the 120 s deadline
    assert "no chunk from the sender" in info.value.message
    assert col.hashes == hashes[:1] and rx.held_bytes == 0


async def test_a_sender_silent_before_its_header_is_detected_once_the_header_is_due(hubs):
    """Before the header only the deadline bounds the wait (the sender may still be
    prefilling); once the receiver is told the header is due (`expect_header`: the first
    token came), silence is the idle timeout's, as after the header. A header that then
    comes is taken as ever."""
    rx_hub, tx_hub = hubs
    hashes, blocks = _hashes(3, seed=18), _blocks(3)
    rx, col = await _open(rx_hub, "mute", expected_hashes=hashes, idle_timeout_s=0.3,
                          deadline_s=120.0)
    # far past the idle timeout, not yet due: still waiting (a condition on another
    # receive's failure, not a sleep, stands for "a while")
    other, _ = await _open(rx_hub, "mark", idle_timeout_s=0.3, deadline_s=120.0)
    other.expect_header()
    with pytest.raises(TransferError) as info:
        await other.wait()
    assert info.value.code == errors.PEER_GONE and "no header" in info.value.message
    assert not rx.done
    rx.expect_header()
    with pytest.raises(TransferError) as info:
        await rx.wait()
    assert info.value.code == errors.PEER_GONE  # the idle timeout, not the 120 s deadline
    assert "no header from the sender" in info.value.message
    assert col.hashes == [] and not rx_hub._receives
    # a header that comes before the idle timeout is received as usual
    ok, col = await _open(rx_hub, "late", expected_hashes=hashes, idle_timeout_s=30.0,
                          deadline_s=120.0)
    ok.expect_header()
    await tx_hub.send(ok.target, request_id="late", hashes=hashes, block_size=16,
                      layout=LAYOUT, source=_source(blocks), transport="nats")
    assert (await ok.wait()).blocks == 3 and col.payloads == blocks


async def test_a_receiver_that_never_acks_fails_the_sender_and_its_pins_expire(hubs):
    _, tx_hub = hubs
    bus = tx_hub.bus
    subject = subjects.kv_transfer_rx(bus.namespace, 1, "bh01")  # nobody's hub: a stand-in

    async def accept_then_ignore(msg):  # accepts the header, then never answers again
        if msg.reply:
            await bus.publish(msg.reply, KvTransferCredit(transfer_id="bh01"))

    await bus.nc.subscribe(subject, cb=accept_then_ignore)
    await bus.flush()
    hashes, blocks = _hashes(100, seed=16), _blocks(100)  # 4 MB, over the 1 MiB window
    target = KvTransferTarget(transfer_id="bh01", worker_id=1, subject=subject,
                              window_bytes=1 << 20)
    pins = PinTable()
    now = 500.0  # the worker's clock, injected
    pins.pin("bh01", list(range(100)), deadline=now + 30.0)
    with pytest.raises(TransferError) as info:
        await tx_hub.send(target, request_id="x", hashes=hashes, block_size=16, layout=LAYOUT,
                          source=_source(blocks), idle_timeout_s=0.3, deadline_s=120.0)
    assert info.value.code == errors.PEER_GONE and "credit" in info.value.message
    assert not tx_hub._sends
    # had the worker lost the failure too, the deadline frees the blocks
    assert pins.expire(now + 29.0) == []
    assert [e.blocks for e in pins.expire(now + 30.0)] == [tuple(range(100))]


async def test_a_dying_receiving_worker_tells_the_sender(hubs):
    rx_hub, tx_hub = hubs
    hashes, blocks = _hashes(40, seed=17), _blocks(40)
    rx, col = await _open(rx_hub, "rd", expected_hashes=hashes, window_bytes=256 * 1024)
    gate = Gate(blocks)
    send = asyncio.create_task(tx_hub.send(
        rx.target, request_id="rd", hashes=hashes, block_size=16, layout=LAYOUT, source=gate,
        transport="tcp"))
    await _until(lambda: col.hashes, "first blocks imported")
    await rx_hub.close()  # the decode worker shuts down mid-transfer
    gate.release.set()
    with pytest.raises(TransferError) as info:
        await send
    assert info.value.code in (errors.CANCELLED, errors.PEER_GONE)
    assert rx.held_bytes == 0 and not tx_hub._sends


@pytest.mark.parametrize("transport", ["nats", "tcp"])
async def test_a_client_cancel_on_the_receiver_stops_the_sender(hubs, transport):
    rx_hub, tx_hub = hubs
    hashes, blocks = _hashes(40, seed=18), _blocks(40)
    holder = {}

    async def cancel_on_first(run):
        holder.setdefault("task", asyncio.create_task(holder["rx"].cancel("client went away")))

    rx, _ = await _open(rx_hub, "cc", on_blocks=cancel_on_first, expected_hashes=hashes,
                        window_bytes=256 * 1024)
    holder["rx"] = rx
    with pytest.raises(TransferError) as info:
        await tx_hub.send(rx.target, request_id="cc", hashes=hashes, block_size=16,
                          layout=LAYOUT, source=_source(blocks), transport=transport)
    assert info.value.code == errors.CANCELLED and "client went away" in info.value.message
    with pytest.raises(TransferError, match="client went away"):
        await rx.wait()
    assert rx.held_bytes == 0 and not tx_hub._sends


async def test_a_receive_with_no_header_ends_at_its_deadline(hubs):
    rx_hub, _ = hubs
    rx, _ = await _open(rx_hub, "late", deadline_s=0.2)
    with pytest.raises(TransferError) as info:
        await rx.wait()
    assert info.value.code == errors.DEADLINE and not rx_hub._receives


# ---- memory and pipelining ------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["nats", "tcp"])
async def test_memory_stays_within_the_window_on_both_ends(hubs, transport):
    rx_hub, tx_hub = hubs
    window = 256 * 1024
    n = 64
    hashes, blocks = _hashes(n, seed=19), _blocks(n, 32 * 1024)  # 2 MiB through 256 KiB
    layout = KvLayout(engine="test", bytes_per_block=32 * 1024)

    class Slow(Collector):
        async def __call__(self, run):
            await super().__call__(run)
            for _ in range(20):  # let the sender run ahead as far as it can
                await asyncio.sleep(0)

    col = Slow()
    rx = await rx_hub.open_receive("mem", on_blocks=col, expected_hashes=hashes, layout=layout,
                                   window_bytes=window)
    col.rx = rx
    result = await tx_hub.send(rx.target, request_id="mem", hashes=hashes, block_size=16,
                               layout=layout, source=_source(blocks), transport=transport)
    got = await rx.wait()
    assert col.payloads == blocks
    assert max(col.held_seen) <= window
    assert 0 < got.high_water_bytes <= window
    assert 0 < result.high_water_bytes <= window
    assert result.chunks >= 2 * 1024 * 1024 // (window // 2)  # chunks are at most half


@pytest.mark.parametrize("transport", ["nats", "tcp"])
async def test_the_next_chunk_arrives_while_one_is_imported(hubs, transport):
    rx_hub, tx_hub = hubs
    bpb = 32 * 1024
    hashes, blocks = _hashes(32, seed=20), _blocks(32, bpb)
    layout = KvLayout(engine="test", bytes_per_block=bpb)
    seen = {}

    async def importer(run):
        if "first" not in seen:
            end = (run.first_block + len(run.hashes)) * bpb
            # held here until more than this run has arrived: pipelining, or a timeout
            await _until(lambda: seen["rx"].assembler.received > end, "next chunk in flight")
            seen["first"] = end

    rx = await rx_hub.open_receive("pipe", on_blocks=importer, expected_hashes=hashes,
                                   layout=layout, window_bytes=256 * 1024)
    seen["rx"] = rx
    await tx_hub.send(rx.target, request_id="pipe", hashes=hashes, block_size=16,
                      layout=layout, source=_source(blocks), transport=transport)
    await rx.wait()
    assert seen["first"] < 32 * bpb


async def test_receives_beyond_the_limit_are_refused_as_busy(nats_server):
    bus = await _connect(nats_server.url)
    hub = KvTransferHub(bus, 0xC3, max_receives=1, tcp_host=None)
    try:
        rx, _ = await _open(hub, "one")
        assert rx.target.tcp is None  # no listener: NATS only
        with pytest.raises(TransferError) as info:
            await _open(hub, "two")
        assert info.value.code == errors.BUSY and info.value.retryable
        await rx.cancel()
        rx, _ = await _open(hub, "three")  # room again
        await rx.cancel()
    finally:
        await hub.close()
        await bus.close()


# ---- TCP connection reuse -------------------------------------------------------------------


async def _tcp_round(rx_hub, tx_hub, rid, n=8, seed=0):
    hashes, blocks = _hashes(n, seed=seed), _blocks(n)
    rx, col = await _open(rx_hub, rid, expected_hashes=hashes)
    result = await tx_hub.send(rx.target, request_id=rid, hashes=hashes, block_size=16,
                               layout=LAYOUT, source=_source(blocks), transport="tcp")
    await rx.wait()
    assert result.transport == "tcp" and col.payloads == blocks and col.hashes == hashes
    return rx


async def test_transfers_between_two_workers_reuse_one_connection(hubs):
    rx_hub, tx_hub = hubs
    rx = None
    for i in range(3):
        rx = await _tcp_round(rx_hub, tx_hub, f"reuse-{i}", seed=40 + i)
    assert rx_hub.listener.stats["accepted"] == 1  # one connect and accept ...
    assert rx_hub.listener.stats["reused"] == 2  # ... then the same connection twice more
    assert tx_hub.conn_pool.stats["reused"] == 2 and tx_hub.conn_pool.size == 1
    assert rx_hub.listener.connections == 1
    assert not rx_hub._receives and not tx_hub._sends
    # a transfer on a reused connection is authenticated like one on a new connection: a
    # spent token is refused, and the connection is closed
    sock = tx_hub.conn_pool.get((rx.target.tcp.host, rx.target.tcp.port))
    assert sock is not None
    try:
        await send_all(sock, frame(_header(rx, _hashes(8, seed=42), token=rx.target.tcp.token)))
        ack = await asyncio.wait_for(SockReader(sock).read_message(), WAIT)
        assert not ack.ok and ack.error.code == errors.REFUSED and "token" in ack.error.message
    finally:
        sock.close()
    await _until(lambda: rx_hub.listener.connections == 0, "the refused connection closed")


async def test_a_pooled_connection_the_receiver_closed_is_replaced(hubs):
    rx_hub, tx_hub = hubs
    rx_hub.listener.max_idle = 0  # the receiver keeps no idle connection: it closes them
    await _tcp_round(rx_hub, tx_hub, "closed-1", seed=50)
    await _until(lambda: rx_hub.listener.connections == 0, "the receiver closed its end")
    await _tcp_round(rx_hub, tx_hub, "closed-2", seed=51)  # reconnects, succeeds
    assert tx_hub.conn_pool.stats["stale"] >= 1
    assert tx_hub.conn_pool.stats["reused"] == 0
    assert rx_hub.listener.stats["accepted"] == 2 and rx_hub.listener.stats["refused"] == 0


async def test_the_receiver_closes_connections_idle_past_its_timeout(hubs):
    rx_hub, tx_hub = hubs
    rx_hub.listener.reuse_idle_timeout = 0.2  # short, so the test ends soon
    await _tcp_round(rx_hub, tx_hub, "idle-1", seed=56)
    await _until(lambda: rx_hub.listener.stats["idle_closed"] == 1, "the idle one closed")
    await _until(lambda: rx_hub.listener.connections == 0, "its task ended")
    await _tcp_round(rx_hub, tx_hub, "idle-2", seed=57)  # the sender notices, reconnects
    assert tx_hub.conn_pool.stats["stale"] == 1
    assert rx_hub.listener.stats["accepted"] == 2


async def test_pooled_connections_to_a_worker_that_left_are_closed(hubs):
    rx_hub, tx_hub = hubs
    await _tcp_round(rx_hub, tx_hub, "gone", seed=55)
    assert tx_hub.conn_pool.size == 1
    await rx_hub.close()  # the receiving worker shuts down (a killed one closes alike)

    def pruned():
        tx_hub.conn_pool.prune()  # what the hub's sweeper does every few seconds
        return tx_hub.conn_pool.size == 0

    await _until(pruned, "the dead receiver's connection closed")
    assert tx_hub.conn_pool.stats["stale"] == 1


async def test_a_dead_pooled_connection_not_yet_noticed_is_retried_once(hubs):
    """The race the check before reuse cannot see: the receiver's close is still on its way
    when the pooled socket is taken. The transfer fails on it before the receiver said
    anything, and runs again on a new connection with the same (unused) token."""
    import threading

    rx_hub, tx_hub = hubs
    hashes, blocks = _hashes(8, seed=60), _blocks(8)
    rx, col = await _open(rx_hub, "race", expected_hashes=hashes)
    # pooled under the receiver's address: a connection whose far end is open and quiet when
    # the pool checks it, and closes as soon as the transfer's header arrives, unanswered
    lsock = socket.create_server(("127.0.0.1", 0))
    dead = await connect("127.0.0.1", lsock.getsockname()[1], WAIT)
    far, _ = lsock.accept()
    lsock.close()

    def close_on_header() -> None:
        far.settimeout(WAIT)
        try:
            far.recv(1)
        finally:
            far.close()

    closer = threading.Thread(target=close_on_header, daemon=True)
    closer.start()
    tx_hub.conn_pool.put((rx.target.tcp.host, rx.target.tcp.port), dead)
    result = await tx_hub.send(rx.target, request_id="race", hashes=hashes, block_size=16,
                               layout=LAYOUT, source=_source(blocks), transport="tcp")
    await rx.wait()
    await asyncio.to_thread(closer.join, WAIT)
    assert result.transport == "tcp" and col.payloads == blocks
    assert tx_hub.conn_pool.stats["reused"] == 1 and tx_hub.conn_pool.stats["stale"] == 1
    assert dead.fileno() == -1 and tx_hub.conn_pool.size == 1  # the new one is pooled


async def test_a_failed_transfer_does_not_pool_its_connection(hubs):
    rx_hub, tx_hub = hubs
    hashes = _hashes(4, seed=70)
    rx, _ = await _open(rx_hub, "mismatch", expected_hashes=hashes)
    with pytest.raises(TransferError):
        await tx_hub.send(rx.target, request_id="mismatch", hashes=_hashes(4, seed=71),
                          block_size=16, layout=LAYOUT, source=_source(_blocks(4)),
                          transport="tcp")
    assert tx_hub.conn_pool.size == 0
    await _until(lambda: rx_hub.listener.connections == 0, "the receiver closed it")
    await _tcp_round(rx_hub, tx_hub, "after-failure", seed=72)  # a new connection works


def test_the_connection_pool_is_bounded_and_expires_idle_connections():
    now = [0.0]
    pool = ConnPool(max_per_peer=2, max_total=3, idle_timeout=10.0, clock=lambda: now[0])
    pairs = [socket.socketpair() for _ in range(6)]
    for a, _b in pairs:
        a.setblocking(False)
    a_key, b_key = ("10.0.0.1", 1), ("10.0.0.2", 1)
    for a, _b in pairs[:3]:
        pool.put(a_key, a)
    assert pool.size == 2 and pairs[0][0].fileno() == -1  # per peer: the oldest goes
    pool.put(b_key, pairs[3][0])
    pool.put(b_key, pairs[4][0])
    assert pool.size == 3 and pairs[1][0].fileno() == -1  # in all: the LRU peer's oldest
    assert pool.stats["evicted"] == 2
    # the peer closed one: it is not handed out
    pairs[4][1].close()
    assert pool.get(b_key) is pairs[3][0]  # the closed newest was skipped and closed
    assert pairs[4][0].fileno() == -1 and pool.stats["stale"] == 1
    assert pool.get(b_key) is None
    # idle too long: closed by prune (or by get)
    now[0] = 10.0
    pool.prune()
    assert pool.size == 0 and pairs[2][0].fileno() == -1 and pool.stats["expired"] == 1
    # a peer that sent bytes nobody asked for is not reused either
    pool.put(a_key, pairs[5][0])
    pairs[5][1].send(b"x")
    assert pool.get(a_key) is None and pool.size == 0
    for a, b in pairs:
        a.close()
        b.close()
