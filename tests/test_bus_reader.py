"""The bus's reader-side paths (issue 15): `Bus.serve_direct` (requests answered inside the
reader, reply and events in one write) and paced reads (`Bus.pace_reads` / `hurry_reads`),
against a real nats-server."""

from __future__ import annotations

import asyncio
import uuid

import pytest

import proto
from genset.runtime.bus import Bus
from genset.runtime.bus_errors import RemoteError
from proto import subjects
from tests.helpers.waiting import until


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
