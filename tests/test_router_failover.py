"""Fault injection with real processes: a router SIGKILLed under a steady stream of requests
loses none of them (the frontend routes with its warm fallback; `genset up` restarts the router
and the frontend goes back to it), `genset up` notices its etcd dying and restarts it, and a
hand-started stack with no router process at all serves instead of answering 503.

Failures are counted, never timed: every wait is on a condition with a generous deadline."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import httpx
import pytest

from tests.helpers.clients import ClientThreads
from tests.helpers.processes import (
    REPO,
    alive,
    cmdline,
    descendants,
    free_port,
    kill_all,
    processes_mentioning,
    start_up,
    wait_for_line,
)
from tests.stack import Stack, metric, parse_metrics

pytestmark = pytest.mark.slow

BODY = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 4}


class RequestStream(ClientThreads):
    """`threads` clients sending completions back to back until stopped; counts what fails."""

    def __init__(self, url: str, threads: int = 3) -> None:
        super().__init__(url, threads, timeout_s=60, join_s=90)

    def one(self, client: httpx.Client, n: int) -> str | None:
        resp = client.post(self.url + "/v1/completions", json=BODY)
        return None if resp.status_code == 200 else f"{resp.status_code} {resp.text[:300]}"


def scrape(url: str) -> dict[str, float]:
    resp = httpx.get(url + "/metrics", timeout=5)
    resp.raise_for_status()
    return parse_metrics(resp.text)


def child_pid(root: int, pattern: str) -> int:
    found = [p for p in descendants(root) if re.search(pattern, cmdline(p)) and alive(p)]
    assert len(found) == 1, (pattern, [cmdline(p) for p in descendants(root)])
    return found[0]


def router_decisions(url: str) -> float:
    return metric(scrape(url), "genset_router_decisions_total")


def test_router_sigkill_under_genset_up_fails_no_request_and_etcd_is_restarted(tmp_path):
    port, nats_port, etcd_port = free_port(), free_port(), free_port()
    state = tmp_path / "state"
    log = tmp_path / "up.log"
    proc = start_up(REPO, log, "--engine", "mocker", "--workers", "2", "--port", str(port),
                    "--nats", f"nats://127.0.0.1:{nats_port}", "--etcd", f"127.0.0.1:{etcd_port}",
                    "--speedup", "20", "--state-dir", str(state),
                    "--router", "service")  # one frontend embeds the router by default
    api = f"http://127.0.0.1:{port}"
    try:
        wait_for_line(proc, log, r"Ctrl-C stops everything", within=240)
        old_router = child_pid(proc.pid, r"genset\.cli router ")
        router_url = "http://127.0.0.1:" + re.search(r"--metrics-port (\d+)",
                                                     cmdline(old_router)).group(1)
        with RequestStream(api) as stream:
            stream.more_blocking(10, 60)
            # Decided in the frontend with its warm copy of the service's state (local first),
            # not asked of the service: a dead router cannot delay or fail a request.
            assert metric(scrape(api), "genset_frontend_router_fallback_decisions_total",
                          reason="local_first") >= 10
            assert router_decisions(router_url) == 0

            os.kill(old_router, signal.SIGKILL)
            wait_for_line(proc, log, r"warning: router exited unexpectedly \(killed by SIGKILL\)",
                          within=30)
            stream.more_blocking(10, 60)  # served meanwhile
            wait_for_line(proc, log, r"router: restarted", within=60)
            assert child_pid(proc.pid, r"genset\.cli router ") != old_router
            stream.more_blocking(10, 60)
            router_failures = list(stream.failures)

            # etcd started by genset up dies: noticed and restarted, data kept.
            etcd = child_pid(proc.pid, r"etcd .*--data-dir")
            os.kill(etcd, signal.SIGKILL)
            wait_for_line(proc, log, r"warning: etcd exited unexpectedly", within=30)
            wait_for_line(proc, log, r"etcd: restarted", within=60)
            stream.more_blocking(10, 60)
        assert router_failures == [], router_failures
        assert stream.failures == [], stream.failures
        assert stream.ok >= 30

        pids = descendants(proc.pid)
        proc.send_signal(signal.SIGINT)  # Ctrl-C: everything stops, nothing is restarted
        assert proc.wait(90) == 0, log.read_text()
        assert not [p for p in pids if alive(p)], log.read_text()
        assert not processes_mentioning(f"127.0.0.1:{nats_port}")
        assert not processes_mentioning(str(state))
        text = log.read_text()
        assert "stopped" in text and "crash-looping" not in text
    finally:
        kill_all(proc, descendants(proc.pid))


async def test_a_hand_started_stack_without_a_router_serves_through_the_fallback(
        nats_server, etcd_server, tmp_path):
    async with Stack(nats_server.url, etcd_server.endpoint, log_dir=tmp_path) as stack:
        await stack.start_workers(2, engine="mocker", extra_args=["--speedup", "50"])
        # asking the service for every request (not local first): the fallback's own path
        frontend = await stack.start_frontend(extra_args=["--router", "service",
                                                          "--no-router-local-first"])
        async with httpx.AsyncClient(timeout=60) as client:
            for _ in range(5):
                resp = await client.post(frontend.url + "/v1/completions", json=BODY)
                assert resp.status_code == 200, resp.text
        values = await frontend.metrics()
        assert metric(values, "genset_frontend_router_fallback") == 1
        assert metric(values, "genset_frontend_router_fallback_decisions_total") >= 5

        # A router appears: the frontend routes through it again.
        router = await stack.start_service("router")
        async with httpx.AsyncClient(timeout=60) as client:
            deadline = time.monotonic() + 60
            while True:
                resp = await client.post(frontend.url + "/v1/completions", json=BODY)
                assert resp.status_code == 200, resp.text
                if metric(await router.metrics(), "genset_router_decisions_total") > 0:
                    break
                assert time.monotonic() < deadline, stack.logs()
                await asyncio.sleep(0.05)
        assert metric(await frontend.metrics(), "genset_frontend_router_fallback") == 0
        assert "router service answers again" in frontend.log_tail(400)
