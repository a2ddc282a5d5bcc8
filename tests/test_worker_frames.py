"""Token frames sent from the engine's delivery (genset/worker/frames.py): after the first
token a request's plain frames go out without its task, in order with the task's own frames;
when they cannot (no nowait publish, a cancelled stream) the task's path sends them."""

from __future__ import annotations

import asyncio

import pytest

import proto
from genset.runtime.bus import Bus
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


async def test_a_first_token_leaves_ahead_of_the_steps_other_frames(bus, discovery,
                                                                   nats_server):
    """A step that gives request B its first token and request A (streaming from the
    delivery) its next one: B's task sends B's frame, and A's frame of that step waits for
    it, so the frontend handles B's first token before A's frame (and both leave in one
    write). Seen by a subscriber to everything, in the order nats-server got them from the
    worker: B's first frame, A's frame of that step, A's of the next, B's second (which the
    next step sends directly, after A's). Without the wait, A's frame of B's first step
    went ahead of B's first frame, and one A frame stood between B's first two.

    The engine holds itself after its third step (its pacing sleep waits on `running`)
    until B's request is in its queue, so B's first token comes in a step with A's next one
    whatever the machine's load: left to race, A (steps of ~0.2 ms) could finish before B's
    request reached the worker, and a loaded box did that about once in 30 runs.
    Heartbeats (a stream silent for 0.5 s while the engine is held) are left out of the
    order; the frames' seqs are checked with them."""
    running = asyncio.Event()
    running.set()
    steps = 0

    async def paced(seconds: float) -> None:
        nonlocal steps
        await asyncio.sleep(seconds)
        steps += 1
        if steps == 3:  # A's first two frames are out, its third is this step's
            running.clear()
        await running.wait()

    h = Host(bus, discovery, speedup=50.0, engine_opts={"sleep": paced})
    await h.host.start()
    watcher = await Bus.connect(nats_server.url, name="frame-order")
    raw: list[tuple[str, bytes]] = []  # everything on the bus, in order

    async def record(msg) -> None:
        raw.append((msg.subject, msg.data))

    def frames_of(*streams) -> list[tuple[str, proto.StreamChunk]]:
        ids = {s.stream_id for s in streams}
        return [(subject, proto.decode(data, proto.StreamChunk))
                for subject, data in raw if subject in ids]

    await watcher.subscribe(">", record)
    try:
        a = await bus.stream_request(h.subject, h.request(list(range(1, 20)), max_tokens=60),
                                     timeout=30)
        a_chunks = []
        async for chunk in a:  # A streams from the delivery once its first token is out
            a_chunks.append(chunk)
            if len(a_chunks) == 2:
                break
        b = await bus.stream_request(h.subject, h.request(list(range(30, 45)), max_tokens=4),
                                     timeout=30)
        await until(lambda: len(h.engine._streams) == 2, within=20,
                    what="B's request in the engine's queue")
        running.set()
        b_chunks = [chunk async for chunk in b]
        a_chunks += [chunk async for chunk in a]
        await until(lambda: sum(c.final for _, c in frames_of(a, b)) == 2, within=10,
                    what="A's and B's last frames at the watcher")
    finally:
        running.set()
        await watcher.close()
        await h.host.close()
    seen = frames_of(a, b)
    for stream, chunks, n in ((a, a_chunks, 60), (b, b_chunks, 4)):
        frames = [c for s, c in seen if s == stream.stream_id]
        assert [c.seq for c in frames] == list(range(len(frames)))  # heartbeats included
        assert [c.seq for c in chunks] == [c.seq for c in frames if not c.heartbeat]
        assert chunks[-1].final and chunks[-1].finish_reason == "length"
        assert sum(len(c.token_ids) // 4 for c in chunks) == n
    order = [("A" if s == a.stream_id else "B", c.seq) for s, c in seen if not c.heartbeat]
    b_seqs = [seq for who, seq in order if who == "B"]
    between = order[order.index(("B", b_seqs[0])) + 1:order.index(("B", b_seqs[1]))]
    assert [who for who, _ in between] == ["A", "A"]
