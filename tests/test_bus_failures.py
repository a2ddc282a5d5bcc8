"""The bus when things die: a responder process SIGKILLed mid-stream, NATS stopped and
restarted under in-flight streams."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import time
import uuid

import pytest

from genset.runtime.bus import Bus
from genset.runtime.bus_errors import Disconnected, PeerGone, StreamError
from proto import subjects
from tests.helpers.waiting import until

# A responder in its own OS process: streams one frame every 20 ms until killed.
RESPONDER = textwrap.dedent(
    """
    import asyncio, sys
    from genset.runtime.bus import Bus

    async def main(url, ns, subject):
        bus = await Bus.connect(url, name="doomed-responder", namespace=ns)

        async def handler(request, stream):
            i = 0
            while True:
                await stream.send(i.to_bytes(4, "little"))
                i += 1
                await asyncio.sleep(0.02)

        await bus.serve_stream(subject, handler)
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main(*sys.argv[1:4]))
    """
)


async def _wait_ready(proc: asyncio.subprocess.Process, within: float = 20.0) -> None:
    async with asyncio.timeout(within):
        while True:  # skip its log lines (structlog writes to stdout)
            line = await proc.stdout.readline()
            assert line, f"responder exited before it was ready (rc={proc.returncode})"
            if line.strip() == b"ready":
                return


async def test_responder_killed_mid_stream_is_peer_gone_by_heartbeat_timeout(nats_server):
    ns = "bk" + uuid.uuid4().hex[:10]
    subject = subjects.subject(ns, "bustest", "doomed")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RESPONDER, nats_server.url, ns, subject,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    bus = await Bus.connect(nats_server.url, name="survivor", namespace=ns)
    try:
        await _wait_ready(proc)
        stream = await bus.stream_request(subject, b"", timeout=30)  # default heartbeat_timeout 3 s
        for expected in range(10):
            assert (await stream.__anext__()).seq == expected
        os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        with pytest.raises(PeerGone) as exc:
            async for _ in stream:
                pass
        detected_after = time.monotonic() - killed_at
        # The last frame came <= 20 ms before the kill; detection is 3 s after the last frame
        # (timing goal: bench/, not here). PeerGone, not DeadlineExceeded, says the silence
        # check found it, well before the 30 s deadline that would otherwise end the stream.
        print(f"PeerGone {detected_after:.2f}s after SIGKILL")
        assert detected_after < 30, f"took {detected_after:.2f}s"
        assert exc.value.error.code == "peer_gone" and exc.value.error.retryable
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await bus.close()


async def test_nats_restart_fails_in_flight_then_recovers(own_nats):
    ns = "br" + uuid.uuid4().hex[:10]
    subject = subjects.subject(ns, "bustest", "gen")
    req = await Bus.connect(own_nats.url, name="requester", namespace=ns)
    resp = await Bus.connect(own_nats.url, name="responder", namespace=ns, orphan_timeout=1.0)
    handler_ended = 0

    async def handler(request: bytes, stream):
        nonlocal handler_ended
        try:
            if request == b"forever":
                while not stream.cancelled.is_set():
                    await stream.send(b"\x01\x00\x00\x00")
                    await asyncio.sleep(0.05)
            else:
                for _ in range(20):
                    await stream.send(b"\x02\x00\x00\x00")
                await stream.send(final=True)
        finally:
            handler_ended += 1

    try:
        await resp.serve_stream(subject, handler)
        await resp.flush()
        in_flight = [await req.stream_request(subject, b"forever", timeout=60) for _ in range(20)]
        for stream in in_flight:
            await stream.__anext__()

        async def outcome(stream):
            try:
                async for _ in stream:
                    pass
            except StreamError as exc:
                return exc
            return None

        outcomes = [asyncio.ensure_future(outcome(s)) for s in in_flight]
        own_nats.stop()
        stopped_at = time.monotonic()
        # Disconnected/PeerGone (not DeadlineExceeded at the streams' 60 s deadline) says the
        # loss was detected; how fast is a goal for bench/, so only a generous bound here.
        results = await asyncio.wait_for(asyncio.gather(*outcomes), 50)
        failed_after = time.monotonic() - stopped_at
        assert all(isinstance(r, Disconnected | PeerGone) for r in results), results
        print(f"in-flight streams failed {failed_after:.2f}s after NATS stopped: "
              f"{sorted({type(r).__name__ for r in results})}")
        assert not req.connected
        # the responder's handlers are told to stop (orphan_timeout) even while NATS is down
        await until(lambda: handler_ended == 20, 30, "responder handlers to stop")

        own_nats.start()
        restarted_at = time.monotonic()
        await until(lambda: req.connected and resp.connected, 30, "both buses to reconnect")
        print(f"reconnected {time.monotonic() - restarted_at:.2f}s after NATS restarted")
        await resp.flush()
        for _ in range(3):
            chunks = await (await req.stream_request(subject, b"short", timeout=10)).collect()
            assert len(chunks) == 21 and chunks[-1].final
        assert req.stats["disconnects"] == 1 and resp.stats["disconnects"] == 1
    finally:
        await req.close()
        await resp.close()
