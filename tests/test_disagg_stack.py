"""Disaggregation faults on a real stack (frontend, decode and prefill workers as processes,
mocker engines, the session's NATS and etcd): a prefill worker SIGKILLed or stalled
(SIGSTOP) mid-transfer, a decode worker SIGKILLed mid-transfer, a client that disconnects
mid-transfer, no prefill worker at all. In every case no client request hangs, the requests
that could be served were (with the tokens an aggregated worker gives), and every surviving
worker's KV pool is back to idle (no block left pinned).

The KV link is modelled slow (mocker `--kv-bytes-per-token` / `--kv-transfer-bandwidth`: 512
KiB blocks at ~1.5 s each, NATS chunks of one block), so a transfer of 8 blocks lasts ~12 s
while the first token is out within milliseconds: the faults land mid-transfer. Outcomes are
counted, never timed: every wait is on a condition with a generous deadline."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import httpx
import pytest

import proto
from proto import keys
from tests.helpers.clients import completion_choices
from tests.stack import Stack, metric

pytestmark = pytest.mark.slow

BLOCK = 16
SLOW_LINK = ["--kv-transport", "nats", "--kv-bytes-per-token", "32768",
             "--kv-transfer-bandwidth", "0.00035", "--kv-transfer-idle-timeout", "4",
             "--kv-transfer-timeout", "60", "--remote-prefill-timeout", "20"]
WORKER = ["--speedup", "10", "--lease-ttl", "3", "--block-size", str(BLOCK), *SLOW_LINK]
DECODE = ["--role", "decode", "--disagg", "always", *WORKER]
PREFILL = ["--role", "prefill", *WORKER]


def prompt(i: int) -> str:
    """Distinct prompts (a prompt the decode worker has cached is prefilled there): ~140
    tokens with the tiny tokenizer, 8 full blocks and a partial one."""
    return " ".join(f"s{i}w{j}" for j in range(70))


PROMPT = prompt(0)
WAIT_S = 120.0


async def complete(url: str, prompt: str = PROMPT, max_tokens: int = 8) -> dict:
    async with httpx.AsyncClient(timeout=WAIT_S) as client:
        resp = await client.post(url + "/v1/completions", json={
            "model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert resp.status_code == 200, resp.text
    return resp.json()


class Streamed:
    """A streamed completion running in the background; `first` is set at its first text."""

    def __init__(self, url: str, prompt: str = PROMPT, max_tokens: int = 8,
                 leave_after_first: bool = False) -> None:
        self.first = asyncio.Event()
        self.text = ""
        self.finish: str | None = None
        self.task = asyncio.create_task(self._run(url, prompt, max_tokens, leave_after_first))

    async def _run(self, url, text, max_tokens, leave) -> None:
        async with contextlib.aclosing(completion_choices(url, text, max_tokens, WAIT_S)) as it:
            async for choice in it:
                self.text += choice.get("text") or ""
                self.finish = choice.get("finish_reason") or self.finish
                if self.text:
                    self.first.set()
                    if leave:
                        return  # the client goes away mid-transfer (the stream is closed)

    async def wait_first(self) -> None:
        async with asyncio.timeout(WAIT_S):
            await asyncio.wait({self.task, asyncio.ensure_future(self.first.wait())},
                               return_when=asyncio.FIRST_COMPLETED)
        if self.task.done():
            self.task.result()  # raise what went wrong
        assert self.first.is_set()

    async def done(self) -> str:
        async with asyncio.timeout(WAIT_S):
            await self.task
        return self.text


async def wait_idle(workers, what: str) -> None:
    """Every live worker's KV pool back to no block in use (pins included)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        used = {w.name: (await w.read_health())["kv_used_blocks"] for w in workers if w.alive}
        if not any(used.values()):
            return
        assert time.monotonic() < deadline, f"not idle after {what}: {used}"
        await asyncio.sleep(0.2)


async def wait_metric(worker, name: str, at_least: float, **labels) -> float:
    deadline = time.monotonic() + WAIT_S
    while True:
        value = metric(await worker.metrics(), name, **labels)
        if value >= at_least:
            return value
        assert time.monotonic() < deadline, f"{worker.name}: {name}{labels} = {value}"
        await asyncio.sleep(0.2)


async def wait_prefill_pool(decode, size: int) -> None:
    """Until `decode` has seen `size` prefill workers (joined / left lines in its log)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        log = decode.log_path.read_text(errors="replace")
        seen = log.count("prefill worker joined") - log.count("prefill worker left")
        if seen == size:
            return
        assert time.monotonic() < deadline, f"{decode.name} sees {seen} prefill workers"
        await asyncio.sleep(0.2)


async def test_prefill_worker_faults_and_client_disconnect(nats_server, etcd_server, tmp_path):
    async with Stack(nats_server.url, etcd_server.endpoint, log_dir=tmp_path) as stack:
        (decode,) = await stack.start_workers(1, extra_args=DECODE)
        (p1,) = await stack.start_workers(1, extra_args=PREFILL)
        frontend = await stack.start_frontend(models=["tiny"])
        await wait_prefill_pool(decode, 1)

        async def again(i: int) -> str:
            """Prompt i once more: cached on the decode worker now, so prefilled there."""
            return (await complete(frontend.url, prompt(i)))["choices"][0]["text"]

        # a remote prefill that completes
        first = (await complete(frontend.url, prompt(1)))["choices"][0]["text"]
        assert await wait_metric(decode, "genset_disagg_remote_prefills_total", 1) == 1
        await wait_idle([decode, p1], "a remote prefill")
        assert await again(1) == first

        # a client that disconnects mid-transfer: both sides free what they hold
        gone = Streamed(frontend.url, prompt(2), leave_after_first=True)
        await gone.wait_first()
        await gone.done()
        await wait_metric(decode, "genset_worker_requests_cancelled_total", 1)
        await wait_idle([decode, p1], "a client disconnect")

        # the prefill worker SIGKILLed mid-transfer: the decode worker recomputes the prompt
        req = Streamed(frontend.url, prompt(3))
        await req.wait_first()
        p1.kill()
        text = await req.done()
        assert req.finish == "length" and text == await again(3)
        await wait_metric(decode, "genset_disagg_fallbacks_total", 1, stage="transfer")
        await wait_idle([decode], "a prefill worker's death")

        # a prefill worker that stalls mid-transfer (SIGSTOP): the decode worker's idle
        # timeout gives up on it; once it runs again, it unpins what it held
        (p2,) = await stack.start_workers(1, extra_args=PREFILL)
        await wait_prefill_pool(decode, 1)
        req = Streamed(frontend.url, prompt(4))
        await req.wait_first()
        os.killpg(p2.pid, signal.SIGSTOP)
        try:
            text = await req.done()
            await wait_metric(decode, "genset_disagg_fallbacks_total", 2, stage="transfer")
        finally:
            os.killpg(p2.pid, signal.SIGCONT)
        assert req.finish == "length" and text == await again(4)
        await wait_idle([decode, p2], "a stalled transfer")

        # no prefill worker left: requests are served aggregated
        await p2.stop()
        await wait_prefill_pool(decode, 0)
        got = await asyncio.gather(*(complete(frontend.url, prompt(5 + i)) for i in range(3)))
        assert all(g["usage"]["completion_tokens"] == 8 for g in got)
        await wait_metric(decode, "genset_disagg_decisions_total", 3, mode="local",
                          reason="no_prefill_workers")
        await wait_idle([decode], "aggregated requests")
        assert metric(await decode.metrics(), "genset_disagg_remote_prefills_total") == 1


async def test_decode_worker_sigkill_mid_transfer(nats_server, etcd_server, tmp_path):
    async with Stack(nats_server.url, etcd_server.endpoint, log_dir=tmp_path) as stack:
        decodes = await stack.start_workers(2, extra_args=DECODE)
        (prefill,) = await stack.start_workers(1, extra_args=PREFILL)
        frontend = await stack.start_frontend(models=["tiny"])
        for d in decodes:
            await wait_prefill_pool(d, 1)
        await complete(frontend.url, prompt(1), max_tokens=6)
        await wait_idle([*decodes, prefill], "a remote prefill")

        req = Streamed(frontend.url, prompt(2), max_tokens=6)
        await req.wait_first()
        serving = [d for d in decodes if (await d.read_health())["running"]]
        assert len(serving) == 1
        serving[0].kill()
        # the frontend moves the request to the other decode worker, which completes it
        text = await req.done()
        survivor = next(d for d in decodes if d.alive)
        # (not compared with an aggregated run: a migrated request continues from its prompt
        # plus the tokens already out, and the mocker's greedy stream is seeded from the
        # prompt it is given, so its text differs after a migration, disaggregated or not)
        assert req.finish == "length" and text
        # the prefill worker's send to the dead decode worker fails; it unpins
        await wait_metric(prefill, "genset_kv_transfers_total", 1, side="tx",
                          outcome="kv_peer_gone")
        await wait_idle([survivor, prefill], "a decode worker's death")


async def prefill_records(discovery, stack: Stack, prefill) -> list[str]:
    """The prefill worker's keys still in etcd (its instance record and model card)."""
    token = keys.instance_token(prefill.instance_id)
    found = await discovery.get_prefix(keys.namespace_prefix(stack.namespace))
    return [k for k in found if k.endswith("/" + token)]


async def test_prefill_worker_sigterm_mid_transfer_finishes_its_send(nats_server, etcd_server,
                                                                     discovery, tmp_path):
    """A prefill worker SIGTERMed while it sends a prompt's KV finishes the send before it
    stops (the decode worker imports every block: no fallback), then closes cleanly within
    its deadlines (no shutdown step timed out), exits 0 and leaves nothing in etcd; the
    request completes with the tokens an aggregated worker gives. Its sends were not counted
    as work in flight: the drain returned at once, the hook's close waited for them past the
    service's 5 s for the whole host close, which was cut off ("shutdown step timed out"),
    skipping the hub's and the engine's close, and the decode worker recomputed the prompt
    once its idle timeout passed. (Earlier: the send's cleanup waited on the engine without
    a deadline, and the process never exited.)"""
    async with Stack(nats_server.url, etcd_server.endpoint, log_dir=tmp_path) as stack:
        (decode,) = await stack.start_workers(1, extra_args=DECODE)
        # a drain deadline far past the ~12 s transfer: it is not what ends the send
        (prefill,) = await stack.start_workers(1, extra_args=[*PREFILL,
                                                               "--drain-timeout", "120"])
        frontend = await stack.start_frontend(models=["tiny"])
        await wait_prefill_pool(decode, 1)
        req = Streamed(frontend.url, prompt(6))
        await req.wait_first()  # the ~12 s transfer has just begun
        prefill.terminate()
        assert await prefill.wait_exit(WAIT_S) == 0, prefill.log_tail()
        await wait_prefill_pool(decode, 0)
        text = await req.done()
        assert req.finish == "length"
        assert text == (await complete(frontend.url, prompt(6)))["choices"][0]["text"]
        values = await decode.metrics()
        assert metric(values, "genset_disagg_fallbacks_total") == 0
        assert metric(values, "genset_disagg_remote_prefills_total") == 1
        log = prefill.log_path.read_text(errors="replace")
        assert "draining KV sends" in log and "aborting" not in log, log
        assert "drained" in log and "timed out" not in log and "did not" not in log, log
        assert await prefill_records(discovery, stack, prefill) == []
        await wait_idle([decode], "a prefill worker's SIGTERM")


async def test_prefill_worker_drain_deadline_aborts_its_send(nats_server, etcd_server,
                                                             discovery, tmp_path):
    """A prefill worker whose drain deadline passes mid-send aborts the send and tells the
    receiver (which recomputes the prompt at once: kv_cancelled, not its idle timeout), then
    closes cleanly, exits 0 and leaves nothing in etcd."""
    async with Stack(nats_server.url, etcd_server.endpoint, log_dir=tmp_path) as stack:
        (decode,) = await stack.start_workers(1, extra_args=DECODE)
        # 3 s: the host's drain gets 1 s of it, far less than the ~12 s transfer
        (prefill,) = await stack.start_workers(1, extra_args=[*PREFILL, "--drain-timeout", "3"])
        frontend = await stack.start_frontend(models=["tiny"])
        await wait_prefill_pool(decode, 1)
        req = Streamed(frontend.url, prompt(7))
        await req.wait_first()
        prefill.terminate()
        assert await prefill.wait_exit(WAIT_S) == 0, prefill.log_tail()
        text = await req.done()
        assert req.finish == "length"
        assert text == (await complete(frontend.url, prompt(7)))["choices"][0]["text"]
        assert metric(await decode.metrics(), "genset_disagg_fallbacks_total", stage="transfer",
                      reason="kv_cancelled") == 1
        log = prefill.log_path.read_text(errors="replace")
        assert "aborting KV sends" in log and "drained" in log, log
        assert "timed out" not in log and "did not" not in log, log
        assert await prefill_records(discovery, stack, prefill) == []
        await wait_idle([decode], "a prefill worker's drain deadline")


async def test_kv_goes_over_tcp_to_the_endpoint_the_decode_worker_publishes(nats_server,
                                                                           etcd_server,
                                                                           discovery, tmp_path):
    """The worker service publishes a decode worker's KV TCP endpoint in its InstanceRecord
    (`kv_tcp`), and a prefill worker told to send over TCP sends there (it started after
    the decode worker was ready, so its watch's first list holds that record)."""
    tcp = ["--speedup", "10", "--lease-ttl", "3", "--block-size", str(BLOCK),
           "--kv-transport", "tcp", "--kv-bytes-per-token", "64"]
    async with Stack(nats_server.url, etcd_server.endpoint, log_dir=tmp_path) as stack:
        (decode,) = await stack.start_workers(1, extra_args=["--role", "decode", "--disagg",
                                                             "always", *tcp])
        record = await discovery.get(keys.instance(stack.namespace, "decode",
                                                   decode.instance_id), proto.InstanceRecord)
        assert record.labels["kv_tcp"].startswith("127.0.0.1:"), record.labels
        (prefill,) = await stack.start_workers(1, extra_args=["--role", "prefill", *tcp])
        frontend = await stack.start_frontend(models=["tiny"])
        await wait_prefill_pool(decode, 1)
        got = await complete(frontend.url, prompt(8))
        assert got["usage"]["completion_tokens"] == 8
        assert await wait_metric(decode, "genset_kv_transfers_total", 1, side="rx",
                                 transport="tcp", outcome="ok") == 1
        assert metric(await prefill.metrics(), "genset_kv_transfer_tcp_untrusted_total") == 0
        await wait_idle([decode, prefill], "a remote prefill over TCP")
