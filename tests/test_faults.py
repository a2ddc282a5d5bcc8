"""Fault injection with real processes (issue 14): a flood of huge prompts is refused (413 from
the Content-Length, before the body is read; 400 before tokenizing) while normal requests go on and the frontend's memory stays bounded; NATS
restarted under streaming load fails no client request; a SIGKILLed worker fails no client
request and, after the first request that failed on it, gets no other.

Failures and routing are counted, never timed (the stall and latency figures are in
bench/bench_faults.py): every wait is on a condition with a generous deadline.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.helpers.clients import ClientThreads
from tests.helpers.processes import rss_mb
from tests.helpers.waiting import until
from tests.stack import Stack, log_events, metric

pytestmark = pytest.mark.slow

MODEL = "tiny"
WAIT_S = 120.0


class StreamingClients(ClientThreads):
    """`threads` clients streaming chat completions back to back until stopped. A request
    counts as ok only with status 200, `max_tokens` tokens in its usage and a [DONE]."""

    def __init__(self, url: str, *, threads: int = 4, max_tokens: int = 64,
                 prompt: str = "tell me a story") -> None:
        super().__init__(url, threads, timeout_s=120, join_s=150)
        self.max_tokens = max_tokens
        self.prompt = prompt

    def one(self, client: httpx.Client, n: int) -> str | None:
        body = {"model": MODEL, "stream": True, "max_tokens": self.max_tokens,
                "messages": [{"role": "user", "content": f"{self.prompt} {n}"}],
                "stream_options": {"include_usage": True}}
        with client.stream("POST", self.url + "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                return f"{resp.status_code} {resp.read()[:300]!r}"
            usage, done = None, False
            for line in resp.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return f"error event {event['error']}"
                usage = event.get("usage") or usage
            if not done or not usage or usage["completion_tokens"] != self.max_tokens:
                return f"incomplete stream: done={done} usage={usage}"
        return None

    async def more(self, n: int, within: float = WAIT_S) -> None:
        await super().more(n, within)


# -- large prompts ------------------------------------------------------------------------------

async def test_a_flood_of_huge_prompts_is_refused_and_leaves_normal_requests_and_memory_alone(
        nats_server, etcd_server, tmp_path):
    async with Stack(nats_server.url, etcd_server.endpoint, log_dir=tmp_path) as st:
        # A 131072-token context: bodies over 48 bytes x 131072 (+64 KiB) are refused from
        # their Content-Length (413), prompts over 16 x 131072 characters by size, those over
        # 6 x 131072 from the tokens of their head (786K characters tokenized).
        await st.start_workers(2, engine="mocker", extra_args=[
            "--speedup", "20", "--context-length", "131072"])
        fe = await st.start_frontend()
        huge = "lorem ipsum dolor sit amet " * (10_000_000 // 27)  # 10 MB: from its length
        long = "lorem ipsum dolor sit amet " * (1_500_000 // 27)  # 1.5 MB: by its head

        async with httpx.AsyncClient(timeout=300) as http:
            async def flood(prompt: str, n: int) -> list[tuple[int, str]]:
                out = []
                for _ in range(n):
                    r = await http.post(fe.url + "/v1/chat/completions", json={
                        "model": MODEL, "max_tokens": 4,
                        "messages": [{"role": "user", "content": prompt}]})
                    out.append((r.status_code, r.json()["error"].get("code")
                                if r.status_code != 200 else ""))
                return out

            with StreamingClients(fe.url, threads=2, max_tokens=16) as normal:
                await normal.more(5)  # warm: tokenizer loaded, buffers allocated
                before = rss_mb(fe.pid)
                floods = [asyncio.ensure_future(flood(huge, 4)) for _ in range(4)]
                floods += [asyncio.ensure_future(flood(long, 2)) for _ in range(2)]
                answers = [a for f in await asyncio.gather(*floods) for a in f]
                peak = rss_mb(fe.pid, "VmHWM")
                await normal.more(5)  # and normal requests are served after it too
        print(f"frontend RSS before the flood {before:.0f} MB, peak {peak:.0f} MB")
        assert answers == ([(413, "context_length_exceeded")] * 16
                           + [(400, "context_length_exceeded")] * 4), answers
        assert normal.failures == [], normal.failures
        # four 10 MB prompts took a frontend from 1.26 to 2.27 GB before (issue 14)
        assert peak - before < 300, f"frontend RSS {before:.0f} MB -> peak {peak:.0f} MB"
        assert fe.alive


# -- NATS restart ---------------------------------------------------------------------------------

async def test_nats_restart_under_streaming_load_fails_no_request(own_nats, etcd_server, tmp_path):
    async with Stack(own_nats.url, etcd_server.endpoint, log_dir=tmp_path) as st:
        await st.start_workers(2, engine="mocker", extra_args=["--speedup", "5"])
        fe = await st.start_frontend()

        async def nats_connected() -> bool:
            return bool((await fe.get("/health")).json().get("nats_connected"))

        with StreamingClients(fe.url, threads=8) as clients:
            await clients.more(8)
            own_nats.stop()
            await fe.wait_until(lambda: _not(nats_connected), "seeing NATS down", 30)
            # The outage: 3 s, as in issue 14 (the goal holds up to 5 s).
            await asyncio.sleep(3.0)
            own_nats.start()
            await fe.wait_until(nats_connected, "reconnected to NATS", 60)
            await clients.more(16)
        assert clients.failures == [], [*clients.failures, st.logs()]
        # requests were in flight across the outage and waited for the reconnect
        assert log_events(fe.log_path, "request_retrying_after_nats"), fe.log_tail(80)
        assert not log_events(fe.log_path, "worker_suspected")  # no worker was blamed


async def _not(check) -> bool:
    return not await check()


# -- worker SIGKILL ---------------------------------------------------------------------------

async def test_worker_sigkill_fails_no_request_and_is_avoided_after_its_first_failure(
        nats_server, etcd_server, tmp_path):
    async with Stack(nats_server.url, etcd_server.endpoint, log_dir=tmp_path) as st:
        workers = await st.start_workers(3, engine="mocker", extra_args=["--speedup", "5"])
        fe = await st.start_frontend()
        threads = 6
        with StreamingClients(fe.url, threads=threads) as clients:
            await clients.more(6)
            victim = None

            async def busy_worker() -> bool:
                nonlocal victim
                for w in workers:
                    if metric(await w.metrics(), "genset_worker_requests_running") >= 1:
                        victim = w
                        return True
                return False

            await fe.wait_until(busy_worker, "a worker with streams in flight", 30)
            victim.kill()

            async def worker_count() -> int:
                data = (await fe.get("/v1/models")).json()["data"]
                return data[0]["workers"] if data else 0

            async def record_gone() -> bool:
                return await worker_count() == 2

            # traffic goes on until the victim's etcd record expires (its lease: ~10 s), the
            # whole time the router could still pick it
            await fe.wait_until(record_gone, "the victim's record gone", 60)
            await clients.more(12)
        assert clients.failures == [], [*clients.failures, st.logs()]
        values = await fe.metrics()
        assert metric(values, "genset_frontend_migrations_total") >= 1
        assert metric(values, "genset_frontend_worker_failures_total") >= 1
        assert metric(values, "genset_frontend_suspect_routes_total") == 0
        victim_id = f"{victim.instance_id:x}"
        moved = [e for e in log_events(fe.log_path, "request_migrating")
                 if e.get("worker") == victim_id]
        # At most the streams it had in flight (one per client) and the requests routed to
        # it before the first failure was seen (one per client); without the suspect list
        # every request routed to it until its lease expired failed there first.
        assert 1 <= len(moved) <= 2 * threads, moved
        suspected = [e for e in log_events(fe.log_path, "worker_suspected")
                     if e.get("worker") == victim_id]
        assert len(suspected) == 1, suspected


# -- the bus's reconnect wait ---------------------------------------------------------------------

async def test_bus_wait_connected_follows_the_connection(own_nats):
    from genset.runtime.bus import Bus

    bus = await Bus.connect(own_nats.url, name="wait-test", namespace="waitns")
    try:
        assert await bus.wait_connected(0) and bus.disconnects == 0
        own_nats.stop()
        await until(lambda: not bus.connected, 30, "the bus to see NATS down")
        assert not await bus.wait_connected(0.05)  # still down: False once the wait is over
        waiter = asyncio.ensure_future(bus.wait_connected(60))
        own_nats.start()
        assert await waiter
        assert bus.connected and bus.disconnects == 1 and bus.since_reconnect() < 60
    finally:
        await bus.close()
    assert not await bus.wait_connected(1)  # closed: no waiting
