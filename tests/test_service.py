"""A minimal Service run with run_service in a real subprocess against real NATS and etcd:
/health and /metrics answer, the InstanceRecord is in etcd, SIGTERM drains within the
deadline, exits 0 and takes the record out of etcd at once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

import proto
from genset.runtime.bus import Bus
from genset.runtime.discovery import Discovery
from genset.runtime.infra import free_port
from proto import keys

REPO = Path(__file__).resolve().parent.parent
ECHO = REPO / "tests" / "helpers" / "echo_service.py"


def spawn(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, str(ECHO), *args], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=REPO, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(REPO), "GENSET_LOG_FORMAT": "json",
                 **(env or {})})


async def wait_exit(proc: subprocess.Popen, limit_s: float) -> int | None:
    deadline = time.monotonic() + limit_s
    while True:
        code = proc.poll()
        if code is not None or time.monotonic() > deadline:
            return code
        await asyncio.sleep(0.02)


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


@pytest.mark.slow
async def test_service_lifecycle(nats_server, etcd_server, tmp_path):
    ns = f"t{uuid.uuid4().hex[:8]}"
    port = free_port()
    log_path = tmp_path / "echo.log"
    # drain() takes drain_delay (5 s): the window in which the record must already be gone
    # and /health must still answer "draining", wide enough for a loaded machine; the drain
    # deadline (30 s) far above it, so a drain that completes is never cut off.
    drain_delay, drain_timeout = 5.0, 30.0
    proc = spawn(["--nats", nats_server.url, "--etcd", etcd_server.endpoint,
                  "--metrics-port", str(port), "--drain-delay", str(drain_delay),
                  "--drain-timeout", str(drain_timeout)], log_path,
                 env={"GENSET_NAMESPACE": ns})
    viewer = await Discovery.connect(etcd_server.endpoint)
    bus = await Bus.connect(nats_server.url, name="test-client", namespace=ns)
    try:
        m = await viewer.watch(keys.instances_prefix(ns, "echo"), proto.InstanceRecord)
        try:
            await m.wait_for(lambda items: len(items) == 1, timeout=30)
        except TimeoutError:
            raise AssertionError(f"no instance record; log:\n{log_path.read_text()}") from None
        (record,) = m.items.values()
        assert record.pid == proc.pid and record.component == "echo" and record.namespace == ns
        assert record.http_url == f"http://127.0.0.1:{port}"

        async with httpx.AsyncClient(base_url=record.http_url, timeout=5) as http:
            health = await http.get("/health")
            assert health.status_code == 200
            body = health.json()
            assert body["ready"] is True and body["instance_id"] == record.instance_id
            assert body["nats_connected"] and body["etcd_reachable"]
            assert body["gc_frozen"] > 1000  # its start-up heap is out of full collections

            reply = await bus.request(record.subjects["echo"], b"hello", timeout=5)
            assert reply == b"hello"
            metrics = (await http.get("/metrics")).text
            assert "genset_echo_requests_total 1.0" in metrics
            assert "genset_service_ready 1.0" in metrics
            assert "genset_etcd_reachable 1.0" in metrics

            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await m.wait_for(lambda items: not items, timeout=30)
            vanished = time.monotonic() - sent
            # unregistered before the drain, not revoked at exit (only after drain_delay) nor
            # expired (10 s lease); the /health below, still "draining", confirms the order
            assert vanished < drain_delay, f"record lingered {vanished:.2f} s after SIGTERM"
            draining = await http.get("/health")  # still serving while it drains
            assert draining.status_code == 503 and draining.json()["status"] == "draining"

        code = await wait_exit(proc, drain_timeout + 30)
        took = time.monotonic() - sent
        assert code == 0, f"exit code {code}; log:\n{log_path.read_text()}"
        # waited for the drain (a sleep cannot end early), and the drain ended on its own:
        # "drained", not "drain cut off" by the deadline (which would also exit 1)
        assert took >= drain_delay, f"exited after {took:.2f} s"
        lines = [json.loads(line) for line in log_path.read_text().splitlines()
                 if line.startswith("{")]
        events = [line["event"] for line in lines]
        assert events.index("drain begin") < events.index("drain done") < events.index("exit")
        assert "drained" in events and "drain cut off" not in events
        for line in lines:  # every line says who wrote it
            assert line["service"] == "echo" and line["instance"] == f"{record.instance_id:x}"
        echo_line = next(line for line in lines if line["event"] == "echo")
        assert echo_line["request_id"] == "req-5"
        # the lease was revoked: nothing of this process is left under the namespace
        assert await viewer.get_prefix(keys.namespace_prefix(ns)) == {}
    finally:
        kill(proc)
        await bus.close()
        await viewer.close()


@pytest.mark.slow
async def test_drain_deadline_and_bad_config(nats_server, etcd_server, tmp_path):
    ns = f"t{uuid.uuid4().hex[:8]}"
    port = free_port()
    slow = spawn(["--nats", nats_server.url, "--etcd", etcd_server.endpoint, "--namespace", ns,
                  "--metrics-port", str(port), "--drain-delay", "60", "--drain-timeout", "1"],
                 tmp_path / "slow.log")
    bad = spawn(["--nats", nats_server.url], tmp_path / "bad.log",
                env={"GENSET_METRICS_PORT": "ninety"})
    try:
        async with httpx.AsyncClient(timeout=2) as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if (await http.get(f"http://127.0.0.1:{port}/health")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert slow.poll() is None and time.monotonic() < deadline, (
                    (tmp_path / "slow.log").read_text())
                await asyncio.sleep(0.1)
        sent = time.monotonic()
        slow.send_signal(signal.SIGTERM)
        code = await wait_exit(slow, 50)
        took = time.monotonic() - sent
        assert code == 1, f"a drain cut off by its deadline exits 1, got {code}"
        # cut off by the 1 s deadline (a timer cannot fire early), well before the 60 s drain
        assert 1.0 <= took < 50, f"drain deadline 1 s, exited after {took:.2f} s"
        assert "drain cut off" in (tmp_path / "slow.log").read_text()

        assert await wait_exit(bad, 30) == 2
        assert "GENSET_METRICS_PORT='ninety' is not an integer" in (tmp_path / "bad.log").read_text()
    finally:
        kill(slow)
        kill(bad)
