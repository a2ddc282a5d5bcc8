"""The bus's reader-side fast paths (issue 15): `_FastParser` (plain MSGs for direct
subscriptions parsed without nats-py's per-message regex and coroutines) and
`Bus.serve_direct` (requests answered inside the reader, reply and events in one write).

The parser is checked against nats-py's own on the same byte streams cut at every chunk size
(pure logic, no server); the rest against a real nats-server."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.protocol.parser import Parser

import proto
from genset.runtime import bus as bus_module
from genset.runtime.bus import Bus
from genset.runtime.bus_errors import RemoteError
from proto import subjects
from tests.helpers.waiting import until

pytestmark = pytest.mark.skipif(bus_module._FastParser is None,
                                reason="this nats-py has no parser module to speed up")


def _stream() -> bytes:
    """What a frontend reads: reply frames, KV batches with and without a reply subject,
    a PING, a message with headers, a message for an ordinary (queued) subscription, one
    for no subscription, an empty payload and a payload containing CRLF and 'MSG '."""
    parts = []
    for i in range(120):
        if i % 9 == 4:
            parts.append(b"MSG genset.t.kv.events.5cd1 6 216\r\n" + bytes([i]) * 216 + b"\r\n")
        elif i % 9 == 5:
            parts.append(b"MSG genset.t.kv.events.5cd1 6 _INBOX.r.%d 3\r\nabc\r\n" % i)
        elif i % 31 == 7:
            parts.append(b"PING\r\n")
        elif i % 37 == 8:
            parts.append(b"HMSG _INBOX.x.1 5 18 21\r\nNATS/1.0\r\nA: b\r\n\r\nhdr\r\n")
        elif i % 23 == 9:
            parts.append(b"MSG genset.t.plain 7 4\r\nplai\r\n")
        elif i % 29 == 10:
            parts.append(b"MSG genset.t.gone 99 2\r\nno\r\n")
        elif i % 41 == 11:
            parts.append(b"MSG _INBOX.x.e 5 0\r\n\r\n")
        elif i % 43 == 12:
            parts.append(b"MSG _INBOX.x.c 5 10\r\nMSG \r\n\r\nab\r\n")
        else:
            parts.append(b"MSG _INBOX.x.%x 5 90\r\n" % i + bytes([i]) * 90 + b"\r\n")
    return b"".join(parts)


class _Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple] = []
        self.pings = 0

    def client(self) -> Client:
        nc = Client()
        seen = self.seen

        def direct(msg) -> None:
            seen.append(("direct", msg.subject, msg.reply, msg.data, msg.headers, msg._sid))

        nc._subs[5] = Subscription(nc, 5, "_INBOX.x.*", future=bus_module._DirectSub(direct))
        nc._subs[6] = Subscription(nc, 6, "genset.t.kv.events.>",
                                   future=bus_module._DirectSub(direct))
        nc._subs[7] = Subscription(nc, 7, "genset.t.plain", queue="q")  # a queue, no future

        async def process_ping() -> None:
            self.pings += 1

        nc._process_ping = process_ping
        return nc


async def _parse_all(fast: bool, data: bytes, chunk: int) -> tuple[list, int, dict, Client]:
    rec = _Recorder()
    nc = rec.client()
    if fast:
        assert bus_module._FastParser.install(nc)
    for i in range(0, len(data), chunk):
        await nc._ps.parse(data[i:i + chunk])
    queued = []
    while not nc._subs[7]._pending_queue.empty():
        msg = nc._subs[7]._pending_queue.get_nowait()
        queued.append((msg.subject, msg.data))
    return rec.seen + [("queued", *q) for q in queued], rec.pings, dict(nc.stats), nc


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 13, 64, 100, 1500, 1 << 20])
async def test_fast_parser_delivers_what_nats_py_delivers(chunk):
    data = _stream()
    slow = await _parse_all(False, data, chunk)
    fast = await _parse_all(True, data, chunk)
    assert type(fast[3]._ps).__name__ == "_FastParser"
    assert fast[0] == slow[0]  # same messages, same order, same fields
    assert fast[1] == slow[1] > 0  # PINGs answered
    assert fast[2]["in_msgs"] == slow[2]["in_msgs"] and fast[2]["in_bytes"] == slow[2]["in_bytes"]
    assert not fast[3]._ps.buf and not slow[3]._ps.buf


async def test_fast_parser_keeps_a_large_payload_that_arrives_in_pieces():
    payload = bytes(range(256)) * 4096  # 1 MiB
    data = b"MSG _INBOX.x.big 5 %d\r\n" % len(payload) + payload + b"\r\n"
    seen, _, _, nc = await _parse_all(True, data, 65536)
    assert [(s[1], len(s[3])) for s in seen] == [("_INBOX.x.big", len(payload))]
    assert seen[0][3] == payload and not nc._ps.buf


async def test_fast_parser_takes_over_a_partial_message():
    """Installed mid-stream (the class is swapped), it finishes what nats-py started."""
    data = _stream()
    rec = _Recorder()
    nc = rec.client()
    await nc._ps.parse(data[:1000])  # nats-py's parser, stops inside a message
    assert bus_module._FastParser.install(nc)
    await nc._ps.parse(data[1000:])
    slow = await _parse_all(False, data, 1 << 20)
    assert rec.seen == [s for s in slow[0] if s[0] == "direct"]


async def test_a_connection_reads_with_the_fast_parser(nats_server):
    ns = "bd" + uuid.uuid4().hex[:10]
    a = await Bus.connect(nats_server.url, name="a", namespace=ns)
    b = await Bus.connect(nats_server.url, name="b", namespace=ns, fast_parser=False)
    try:
        assert type(a.nc._ps).__name__ == "_FastParser"
        assert type(b.nc._ps) is Parser
        got: list[tuple[str, bytes]] = []
        await a.subscribe_direct(subjects.subject(ns, "t", "x") + ".>",
                                 lambda m: got.append((m.subject, m.data)))
        sent = [(subjects.subject(ns, "t", "x", i), bytes([i % 256]) * (i * 97 % 3000))
                for i in range(1, 400)]
        for subject, data in sent:
            await b.publish(subject, data)
        await b.flush()
        await until(lambda: len(got) >= len(sent), what="every message read")
        assert got == sent
    finally:
        await a.close()
        await b.close()


@pytest.fixture
async def pair(nats_server):
    ns = "bd" + uuid.uuid4().hex[:10]
    req = await Bus.connect(nats_server.url, name="req", namespace=ns)
    resp = await Bus.connect(nats_server.url, name="resp", namespace=ns)
    yield req, resp
    await req.close()
    await resp.close()


async def test_serve_direct_answers_in_the_reader_with_events_in_the_same_write(pair):
    req, resp = pair
    subject = subjects.subject(req.namespace, "t", "put")
    events = subjects.subject(req.namespace, "t", "events")
    seen: list[bytes] = []
    await req.subscribe_direct(events, lambda m: seen.append(m.data))

    def handler(data: bytes):
        # what the offload store does: queue its events, then return the reply
        assert resp.publish_nowait(events, b"event:" + data)
        return proto.KvResyncRequest(worker_id=len(data), reason="x")

    await resp.serve_direct(subject, handler, queue="q")
    for i in range(20):
        reply = await req.request(subject, b"x" * i, timeout=10,
                                  reply_type=proto.KvResyncRequest)
        assert reply.worker_id == i
    await until(lambda: len(seen) == 20, what="the events")
    assert seen == [b"event:" + b"x" * i for i in range(20)]


async def test_serve_direct_answers_a_handler_error_and_goes_on(pair):
    req, resp = pair
    subject = subjects.subject(req.namespace, "t", "put")

    def handler(data: bytes):
        if data == b"bad":
            raise proto.ProtocolError("field 'blocks' is not a list")
        if data == b"boom":
            raise RuntimeError("broken")
        return None if data == b"none" else data.upper()

    await resp.serve_direct(subject, handler)
    with pytest.raises(RemoteError) as bad:
        await req.request(subject, b"bad", timeout=10)
    assert bad.value.error.code == "bad_request" and "blocks" in bad.value.error.message
    with pytest.raises(RemoteError) as boom:
        await req.request(subject, b"boom", timeout=10)
    assert boom.value.error.code == "internal"
    assert await req.request(subject, b"fine", timeout=10) == b"FINE"
    # no reply for None: the requester's deadline passes, the service goes on
    with pytest.raises(Exception):  # noqa: B017 - RequestTimeout, whatever its base
        await req.request(subject, b"none", timeout=0.5)
    assert await req.request(subject, b"again", timeout=10) == b"AGAIN"


async def test_serve_direct_in_a_queue_group_answers_once(nats_server):
    ns = "bd" + uuid.uuid4().hex[:10]
    buses = [await Bus.connect(nats_server.url, name=f"b{i}", namespace=ns) for i in range(3)]
    try:
        subject = subjects.subject(ns, "t", "put")
        calls: list[int] = []
        for i, b in enumerate(buses[1:], 1):
            await b.serve_direct(subject, lambda data, i=i: calls.append(i) or data,
                                 queue="g")
        for n in range(30):
            assert await buses[0].request(subject, b"%d" % n, timeout=10) == b"%d" % n
        await asyncio.sleep(0)
        assert len(calls) == 30
    finally:
        for b in buses:
            await b.close()


async def test_paced_reads_hold_messages_until_the_pause_ends_or_a_hurry(pair):
    """With a pause far longer than the test, what arrives after the first read stays in the
    socket until `hurry_reads`; then it is all read, in order."""
    req, resp = pair
    subject = subjects.subject(req.namespace, "t", "feed")
    got: list[bytes] = []
    await req.subscribe_direct(subject, lambda m: got.append(m.data))
    assert req.pace_reads(3600.0)
    await resp.publish(subject, b"first")  # read: nothing read before it
    await resp.flush()
    await until(lambda: got == [b"first"], what="the first message")
    for i in range(50):
        await resp.publish(subject, b"%d" % i)
    await resp.flush()
    await until(lambda: req._pacer.pauses >= 1, what="a paused read")
    assert got == [b"first"]  # held in the socket: the reader is paused for an hour
    req.hurry_reads(3600.0)
    await until(lambda: len(got) == 51, what="the held messages")
    assert got == [b"first"] + [b"%d" % i for i in range(50)]


async def test_fast_parser_stops_where_an_error_reset_the_parser():
    """An -ERR that closes the connection resets the parser (nats-py's reset()): what came
    after it in the same read is not delivered, as with nats-py's own parser."""
    data = (b"MSG _INBOX.x.1 5 2\r\nok\r\n-ERR 'Authorization Violation'\r\n"
            b"MSG _INBOX.x.2 5 4\r\nlate\r\n")
    for fast in (False, True):
        rec = _Recorder()
        nc = rec.client()

        async def process_err(_text: str, nc=nc) -> None:
            nc._ps.reset()

        nc._process_err = process_err
        if fast:
            assert bus_module._FastParser.install(nc)
        await nc._ps.parse(data)
        assert [s[3] for s in rec.seen] == [b"ok"], fast


async def test_the_fast_parser_can_be_turned_off_for_a_whole_stack(nats_server, monkeypatch):
    monkeypatch.setenv("GENSET_NATS_FAST_PARSER", "0")
    b = await Bus.connect(nats_server.url, name="off", namespace="bd" + uuid.uuid4().hex[:10])
    try:
        assert type(b.nc._ps) is Parser
    finally:
        await b.close()
