"""`genset up --planner` with real processes (mocker workers): a load ramp up and back down.
The planner adds workers under load and drains them after it; no client request fails, and a
drained worker finishes what it holds (nothing is migrated, its drain is not cut off, it exits
cleanly). No timing assertions: the load runs until the planner has acted (generous
deadlines), then failures are counted."""

from __future__ import annotations

import asyncio
import re
import signal
import time

import httpx
import pytest

import proto
from proto import subjects
from tests.helpers.processes import REPO, alive, descendants, free_port, kill_all, start_up

pytestmark = pytest.mark.slow


class Load:
    """`concurrency` clients, each sending completions back to back; every answer counted."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ok = 0
        self.failed: list[str] = []
        self.concurrency = 0
        self._tasks: list[asyncio.Task] = []

    async def _client(self, i: int, client: httpx.AsyncClient) -> None:
        n = 0
        while i < self.concurrency:
            n += 1
            try:
                r = await client.post(f"{self.url}/v1/completions", json={
                    "model": "tiny", "prompt": f"request {i}-{n}: " + "tell me a story " * 12,
                    "max_tokens": 300, "ignore_eos": True})
                if r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 300:
                    self.ok += 1
                else:
                    self.failed.append(f"{r.status_code} {r.text[:200]}")
            except httpx.HTTPError as exc:
                self.failed.append(repr(exc))

    def set(self, concurrency: int, client: httpx.AsyncClient) -> None:
        old, self.concurrency = self.concurrency, concurrency
        for i in range(old, concurrency):  # clients above the new level stop after their request
            self._tasks.append(asyncio.create_task(self._client(i, client)))

    async def stop(self) -> None:
        self.concurrency = 0
        await asyncio.gather(*self._tasks)


async def wait_for_text(log, proc, pattern: str, within: float, load: Load) -> re.Match:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        m = re.search(pattern, log.read_text(errors="replace"))
        if m:
            return m
        assert proc.poll() is None, f"genset up exited:\n{log.read_text()}"
        await asyncio.sleep(0.25)
    raise AssertionError(f"no {pattern!r} after {within:.0f}s (ok={load.ok}, "
                         f"failed={load.failed[:3]}):\n{log.read_text(errors='replace')}")


async def test_load_ramp_scales_up_and_down_without_failed_requests(nats_server, etcd_server,
                                                                    bus, tmp_path):
    port, ns = free_port(), f"plive{int(time.time() * 1000) % 10**8}"
    log, state = tmp_path / "up.log", tmp_path / "state"
    stats: list[proto.FrontendStats] = []
    steps: list[proto.WorkerStepStats] = []

    async def on_stats(msg):
        stats.append(proto.decode(msg.data, proto.FrontendStats))

    async def on_steps(msg):
        steps.append(proto.decode(msg.data, proto.WorkerStepStats))

    subs = [await bus.subscribe(subjects.frontend_stats(ns), on_stats),
            await bus.subscribe(subjects.step_stats_all(ns), on_steps)]
    # Small KV (96 blocks of 16 tokens) so a handful of 300-token requests fill a worker; a
    # short cool-down so the scale-down comes soon after the load drops.
    proc = start_up(REPO, log, "--engine", "mocker", "--speedup", "4", "--workers", "1",
                    "--planner", "load", "--min-workers", "1", "--max-workers", "3",
                    "--worker-arg=--kv-blocks=96", "--planner-arg=--down-cooldown-s=8",
                    "--planner-arg=--interval-s=0.5", "--router", "embedded",
                    "--port", str(port), "--nats", nats_server.url,
                    "--etcd", etcd_server.endpoint, "--namespace", ns,
                    "--state-dir", str(state))
    pids: set[int] = set()
    load = Load(f"http://127.0.0.1:{port}")
    try:
        await wait_for_text(log, proc, r"Ctrl-C stops everything", 120, load)
        # the planner starts with the start-up genset up timed for worker-1, not its default
        assert re.search(r"planner: load policy, 1-3 workers, start-up [0-9.]+ s as measured "
                         r"here", log.read_text()), log.read_text()
        async with httpx.AsyncClient(timeout=120) as client:
            load.set(10, client)  # up: more than one worker's KV
            await wait_for_text(log, proc, r"planner: started worker-2", 180, load)
            before = load.ok  # the bigger pool serves a while
            deadline = time.monotonic() + 120
            while load.ok < before + 10:
                assert time.monotonic() < deadline, (load.ok, load.failed[:3])
                await asyncio.sleep(0.25)
            load.set(2, client)  # down: a trickle keeps requests in flight while draining
            m = await wait_for_text(log, proc, r"planner: draining (worker-\d+)", 240, load)
            drained = m.group(1)
            await wait_for_text(log, proc, rf"{drained} drained and exited with code 0", 120,
                                load)
            await load.stop()
            metrics = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
        pids = descendants(proc.pid)
        text = log.read_text()
        assert load.failed == [], load.failed[:5]
        assert load.ok > 10
        # the drained worker finished what it held: its drain was not cut off and no request
        # moved to another worker (the frontend counts migrations)
        wlog = (state / "logs" / f"{drained}.log").read_text(errors="replace")
        assert '"draining"' in wlog and "drain deadline passed" not in wlog, wlog[-2000:]
        in_flight = [int(x) for x in re.findall(r'"in_flight": (\d+)', wlog)]
        print(f"{drained} drained with {in_flight} request(s) in flight")
        migrations = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                         if line.startswith("genset_frontend_migrations_total"))
        assert migrations == 0, metrics
        # what the planner read: frontend windows and worker step samples
        assert any(s.arrivals > 0 and s.ttft_ms for s in stats)
        assert any(m.samples for m in steps)
        assert "exited unexpectedly" not in text and "crash-looping" not in text, text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, log.read_text()
        assert not [p for p in pids if alive(p)]
    finally:
        await load.stop()
        for sub in subs:
            await sub.unsubscribe()
        kill_all(proc, pids | descendants(proc.pid) if proc.poll() is None else pids)
