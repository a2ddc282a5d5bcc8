"""Token frames sent from the engine's delivery (genset/worker/frames.py): after the first
token a request's plain frames go out without its task, in order with the task's own frames;
when they cannot (no nowait publish, a cancelled stream) the task's path sends them."""

from __future__ import annotations

import asyncio

import pytest

import proto
from genset.runtime.streams import ReplyStream
from tests.helpers.waiting import until
from tests.test_worker import Host


@pytest.fixture
async def slow_host(bus, discovery):
    h = Host(bus, discovery, speedup=50.0)  # steps of real length: one frame per step
    await h.host.start()
    yield h
    await h.host.close()


def spy_nowait(monkeypatch) -> list[bool]:
    results: list[bool] = []
    real = ReplyStream.send_nowait

    def spy(self, token_ids: bytes) -> bool:
        ok = real(self, token_ids)
        results.append(ok)
        return ok

    monkeypatch.setattr(ReplyStream, "send_nowait", spy)
    return results


def check_stream(chunks: list[proto.StreamChunk], n_tokens: int) -> None:
    assert [c.seq for c in chunks] == list(range(len(chunks)))  # gap-free, in order
    assert chunks[-1].final and chunks[-1].finish_reason == "length"
    assert sum(len(c.token_ids) // 4 for c in chunks) == n_tokens
    assert chunks[-1].usage.completion_tokens == n_tokens


async def test_frames_after_the_first_go_out_from_the_delivery(slow_host, monkeypatch):
    sent = spy_nowait(monkeypatch)
    chunks = await slow_host.generate(slow_host.request(list(range(1, 20)), max_tokens=12))
    check_stream(chunks, 12)
    assert sent and all(sent)  # the middle frames took the direct path
    assert slow_host.metric("genset_worker_generated_tokens_total") == 12


async def test_without_nowait_publish_the_task_sends_every_frame(slow_host, bus, monkeypatch):
    sent = spy_nowait(monkeypatch)
    monkeypatch.setattr(bus, "_nowait", False)
    chunks = await slow_host.generate(slow_host.request(list(range(1, 20)), max_tokens=12))
    check_stream(chunks, 12)
    assert sent and not any(sent)


async def test_a_cancelled_stream_still_ends_cleanly(slow_host, bus):
    req = slow_host.request(list(range(1, 20)), max_tokens=400)
    stream = await bus.stream_request(slow_host.subject, req, timeout=30)
    got = 0
    async for chunk in stream:
        got += len(chunk.token_ids) // 4
        if got >= 5:
            break
    await stream.cancel("test")
    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    while slow_host.metric("genset_worker_requests_cancelled_total") < 1:
        assert loop.time() < end, "the worker never saw the cancel"
        await asyncio.sleep(0.02)
    assert not slow_host.host._active


async def kv_batches_of(slow_host, bus, prompt_blocks: int) -> tuple[list, list[bool]]:
    """Runs a request whose prompt fills `prompt_blocks` blocks; returns the KV batches a
    subscriber got (once every block is in them) and the direct path's results."""
    from genset.worker.kv_feed import KvFeed
    from tests.test_worker import collected

    direct: list[bool] = []
    feed = slow_host.host.kv_feed
    real = KvFeed._publish_direct

    def spy(batch) -> bool:
        ok = real(feed, batch)
        direct.append(ok)
        return ok

    feed._sub.direct = spy if feed._sub.direct is not None else None
    batches = await collected(bus, feed.events_subject, proto.KvEventBatch)
    block = slow_host.engine.card.block_size
    chunks = await slow_host.generate(
        slow_host.request(list(range(1, prompt_blocks * block + 1)), max_tokens=2 * block))
    check_stream(chunks, 2 * block)

    def stored() -> int:
        return sum(len(e.blocks) for b in batches for e in b.events
                   if isinstance(e, proto.Stored))

    # the prompt's blocks and a decoded one at least
    await until(lambda: stored() >= prompt_blocks + 1, within=60, what="the KV events")
    return batches, direct


async def test_kv_batches_go_out_from_the_delivery_in_order(slow_host, bus, monkeypatch):
    writes: list[int] = []
    real_write = bus.write_pending
    monkeypatch.setattr(bus, "write_pending", lambda: writes.append(1) or real_write())
    slow_host.engine.after_delivery = bus.write_pending  # the host set the unpatched one
    batches, direct = await kv_batches_of(slow_host, bus, prompt_blocks=3)
    assert direct and all(direct)  # taken from the step's delivery, no task woken
    ids = [b.event_id for b in batches]
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # gap-free, in order
    assert writes  # every delivery hands the connection's queue to the socket
    assert slow_host.metric("genset_worker_kv_event_batches_total") >= len(batches)


async def test_without_nowait_publish_kv_batches_go_through_the_feed_task(slow_host, bus,
                                                                          monkeypatch):
    monkeypatch.setattr(bus, "_nowait", False)
    batches, direct = await kv_batches_of(slow_host, bus, prompt_blocks=3)
    assert direct and not any(direct)
    ids = [b.event_id for b in batches]
    assert ids == list(range(ids[0], ids[0] + len(ids)))


def spy_writes(bus, monkeypatch) -> list[list[tuple[str, bytes]]]:
    """Every socket write of the bus's NATS connection, as the (subject, payload) of each PUB."""
    writes: list[list[tuple[str, bytes]]] = []
    transport = bus.nc._transport
    real = transport.writelines

    def writelines(chunks) -> None:
        data = b"".join(chunks)
        pubs = []
        while data:
            line, _, data = data.partition(b"\r\n")
            parts = line.split()
            if parts and parts[0] == b"PUB":
                size = int(parts[-1])
                pubs.append((parts[1].decode(), data[:size]))
                data = data[size + 2:]
        writes.append(pubs)
        return real(chunks)

    monkeypatch.setattr(transport, "writelines", writelines)
    return writes


async def test_a_first_token_leaves_ahead_of_the_steps_other_frames_in_one_write(
        slow_host, bus, monkeypatch):
    """A step that gives request B its first token and request A (streaming from the
    delivery) its next one: B's task sends B's frame, and A's frame waits for it, so both
    leave in one write with B's first (the frontend handles B's first token before A's)."""
    a = await bus.stream_request(slow_host.subject,
                                 slow_host.request(list(range(1, 20)), max_tokens=60),
                                 timeout=30)
    a_chunks = []
    async for chunk in a:  # A streams from the delivery once its first token is out
        a_chunks.append(chunk)
        if len(a_chunks) == 3:
            break
    writes = spy_writes(bus, monkeypatch)
    b = await bus.stream_request(slow_host.subject,
                                 slow_host.request(list(range(30, 45)), max_tokens=4),
                                 timeout=30)
    b_chunks = [chunk async for chunk in b]
    a_chunks += [chunk async for chunk in a]
    check_stream(b_chunks, 4)
    check_stream(a_chunks, 60)
    frames = [[(subject, proto.decode(payload, proto.StreamChunk)) for subject, payload in w
               if subject in (a.stream_id, b.stream_id)] for w in writes]
    with_b_first = [w for w in frames if (b.stream_id, b_chunks[0]) in w]
    assert len(with_b_first) == 1
    subjects = [subject for subject, _ in with_b_first[0]]
    # A's frame of the same step is in that write, after B's
    assert a.stream_id in subjects[subjects.index(b.stream_id):]
