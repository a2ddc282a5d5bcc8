"""`genset worker` as real processes on the session's NATS and etcd: the tiny torch model
streams over the bus, SIGTERM drains in-flight work and removes the records, and two workers
share traffic until one is SIGKILLed (its card expires with its lease, the model stays listed
while one worker is left and goes with the last)."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid

import pytest

import proto
from proto import keys
from tests.stack import Stack, metric

pytestmark = pytest.mark.slow

LEASE_TTL = 3.0


def request(tokens, max_tokens=8, model="tiny") -> proto.GenerateRequest:
    return proto.GenerateRequest(
        request_id=uuid.uuid4().hex, model=model, token_ids=proto.pack_tokens(tokens),
        sampling=proto.SamplingParams(temperature=0.0), stop=proto.StopConditions(
            max_tokens=max_tokens, ignore_eos=True))


async def cards(discovery, stack, model="tiny") -> dict[int, proto.ModelCard]:
    found = await discovery.get_prefix(keys.models_prefix(stack.namespace, model), proto.ModelCard)
    return {card.instance_id: card for card in found.values()}


async def generate(bus, subject, req, within=30.0) -> list[proto.StreamChunk]:
    stream = await bus.stream_request(subject, req, timeout=within)
    return [c async for c in stream]


async def test_tiny_torch_worker_streams_then_drains_on_sigterm(nats_server, etcd_server, bus,
                                                               discovery, tmp_path):
    async with Stack(nats_server.url, etcd_server.endpoint, log_dir=tmp_path) as stack:
        [worker] = await stack.start_workers(1, engine="torch", model="tiny",
                                             extra_args=["--kv-blocks", "256"])
        card = (await cards(discovery, stack))[worker.instance_id]
        assert card.engine == "torch" and card.tokenizer == "tiny" and card.eos_token_ids

        prompt = list(range(10, 60))
        chunks = await generate(bus, card.generate_subject, request(prompt, max_tokens=6))
        tokens = [t for c in chunks for t in proto.unpack_tokens(c.token_ids)]
        assert len(tokens) == 6 and chunks[-1].finish_reason == "length"
        assert chunks[-1].usage.prompt_tokens == 50
        again = await generate(bus, card.generate_subject, request(prompt, max_tokens=6))
        assert [t for c in again for t in proto.unpack_tokens(c.token_ids)] == tokens  # greedy
        assert again[-1].usage.cached_tokens == 48

        # SIGTERM with a request in flight: it runs to the end, then the records go.
        stream = await bus.stream_request(card.generate_subject, request(prompt, max_tokens=40),
                                          timeout=60)
        first = await stream.__anext__()
        worker.signal(signal.SIGTERM)
        rest = [c async for c in stream]
        got = [t for c in [first, *rest] for t in proto.unpack_tokens(c.token_ids)]
        assert len(got) == 40 and rest[-1].finish_reason == "length", stack.logs()
        assert await worker.wait_exit(20) == 0, worker.log_tail()
        assert not await cards(discovery, stack)
        instances = await discovery.get_prefix(keys.instances_prefix(stack.namespace))
        assert not instances


async def test_two_workers_share_traffic_and_survive_a_sigkill(nats_server, etcd_server, bus,
                                                               discovery, tmp_path):
    async with Stack(nats_server.url, etcd_server.endpoint, log_dir=tmp_path) as stack:
        workers = await stack.start_workers(
            2, engine="mocker", extra_args=["--speedup", "50", "--lease-ttl", str(LEASE_TTL)])
        by_id = {w.instance_id: w for w in workers}
        listed = await cards(discovery, stack)
        assert set(listed) == set(by_id)

        # Route round-robin over the model cards, as a frontend would.
        subjects_ = [c.generate_subject for c in listed.values()]
        results = await asyncio.gather(*(
            generate(bus, subjects_[i % 2], request([i + 1] * 20, max_tokens=4))
            for i in range(8)))
        assert all(r[-1].finish_reason == "length" for r in results)
        for w in workers:
            started = metric(await w.metrics(), "genset_worker_requests_started_total")
            assert started == 4, (w.name, started)

        victim, survivor = workers
        victim.kill()
        # Its lease expiring is the only way out (nothing revokes it): the failure mode is a
        # record listed for good, so the bound is the TTL plus a margin no load reaches.
        t0 = time.monotonic()
        while victim.instance_id in await cards(discovery, stack):
            assert time.monotonic() - t0 < LEASE_TTL + 30, "killed worker still listed"
            await asyncio.sleep(0.2)
        remaining = await cards(discovery, stack)
        assert set(remaining) == {survivor.instance_id}  # the model stays listed
        for _ in range(3):
            [card] = remaining.values()
            chunks = await generate(bus, card.generate_subject, request([7] * 10, max_tokens=2))
            assert chunks[-1].finish_reason == "length"
        assert metric(await survivor.metrics(), "genset_worker_requests_started_total") == 7

        # The last one gone (clean stop: lease revoked) takes the model with it at once.
        await survivor.stop()
        assert survivor.returncode == 0
        assert not await cards(discovery, stack)


async def test_a_mocker_load_time_keeps_the_worker_unlisted_until_it_ends(nats_server,
                                                                          etcd_server, discovery,
                                                                          tmp_path):
    """--mocker-load-s models loading weights: the worker answers /health (not ready) but is
    in no record while it loads, a SIGTERM then ends it at once (exit 0), and a short load
    registers the worker no earlier than the load time after its start."""
    async with Stack(nats_server.url, etcd_server.endpoint, log_dir=tmp_path) as stack:
        loading = stack.spawn_worker(extra_args=["--mocker-load-s", "600"])

        async def says_loading() -> bool:
            resp = await loading.get("/health")
            return (resp.json().get("ready") is False
                    and "mocker_loading" in loading.log_path.read_text(errors="replace"))

        await loading.wait_until(says_loading, "loading", 90)
        assert not await cards(discovery, stack)
        assert not await discovery.get_prefix(keys.instances_prefix(stack.namespace))
        loading.terminate()
        assert await loading.wait_exit(30) == 0, loading.log_tail()

        spawned = time.monotonic()
        quick = stack.spawn_worker(extra_args=["--mocker-load-s", "2"])
        await quick.wait_ready(90)
        assert time.monotonic() - spawned >= 2.0
        assert set(await cards(discovery, stack)) == {quick.instance_id}
