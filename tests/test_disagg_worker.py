"""Disaggregation in-process on mocker engines, the session's real NATS and etcd: a decode
worker that sends its prefills to a prefill worker (genset.disagg.worker.DisaggHook) serves
the same tokens as an aggregated one, streams the first token before the KV arrives, falls
back (aggregated, or recompute) on every failure, and leaves no block pinned on either side.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid

import msgspec
import pytest

import proto
from genset.disagg.worker import DisaggConfig, DisaggHook, first_token_finish
from genset.kv.hashing import block_hashes
from genset.runtime.bus_errors import RemoteError
from genset.runtime.metrics import Metrics
from proto import keys, subjects
from tests.stack import metric, parse_metrics
from tests.test_worker import MODEL, Host, wait_for


class Worker:
    """A Host (tests.test_worker) with a DisaggHook in the given role."""

    def __init__(self, bus, discovery, role: str, namespace: str, *,
                 register_instance: bool = False, **config) -> None:
        self.metrics = Metrics(process_metrics=False)
        self.hook = DisaggHook(DisaggConfig(**config), discovery=discovery, metrics=self.metrics)
        # register_instance: its InstanceRecord in etcd, as a worker service registers it (a
        # decode worker's names its KV TCP endpoint, which prefill workers hold targets to)
        self.h = Host(bus, discovery, hooks=self.hook, namespace=namespace, role=role,
                      num_blocks=512, register_instance=register_instance)

    async def start(self) -> Worker:
        await self.h.host.start()
        return self

    async def close(self) -> None:
        await self.h.host.close()

    def metric(self, name: str, **labels) -> float:
        return metric(parse_metrics(self.metrics.render().decode()), name, **labels)

    @property
    def used_blocks(self) -> int:
        return self.h.engine.core.pool.num_used


def tokens_of(chunks) -> list[int]:
    return [t for c in chunks for t in proto.unpack_tokens(c.token_ids)]


def prompt(i: int, n: int = 90) -> list[int]:
    return [(i * 7919 + j * 31) % 997 + 1 for j in range(n)]


@pytest.fixture
async def pair(bus, discovery):
    """A prefill worker and a decode worker (always remote) in one namespace."""
    ns = f"d{uuid.uuid4().hex[:8]}"
    prefill = await Worker(bus, discovery, "prefill", ns).start()
    decode = await Worker(bus, discovery, "decode", ns, policy="always").start()
    await wait_for(lambda: len(decode.hook.pool) == 1, 10.0, "decode sees the prefill worker")
    yield prefill, decode
    await decode.close()
    await prefill.close()


async def test_remote_prefill_gives_the_aggregated_tokens_and_frees_every_pin(bus, discovery,
                                                                              pair):
    prefill, decode = pair
    agg = Host(bus, discovery, num_blocks=512)
    await agg.host.start()
    try:
        for i in range(3):
            req = decode.h.request(prompt(i), max_tokens=12, request_id=f"r{i}")
            got = await decode.h.generate(req)
            want = await agg.generate(agg.request(prompt(i), max_tokens=12))
            assert tokens_of(got) == tokens_of(want)
            final = got[-1]
            assert final.finish_reason == "length" and final.usage.completion_tokens == 12
        # several at once
        reqs = [decode.h.request(prompt(10 + i), max_tokens=8) for i in range(5)]
        outs = await asyncio.gather(*(decode.h.generate(r) for r in reqs))
        for i, out in enumerate(outs):
            want = await agg.generate(agg.request(prompt(10 + i), max_tokens=8))
            assert tokens_of(out) == tokens_of(want)
    finally:
        await agg.host.close()
    assert decode.metric("genset_disagg_remote_prefills_total") == 8
    # the decode worker follows the prefill worker's cache (hashes only) for its decisions
    hashes = block_hashes(prompt(0), 4)

    def seen() -> int:
        return decode.hook.pool.states(hashes)[0].cached_blocks

    await wait_for(lambda: seen() == len(hashes), 10.0, "prefill cache seen")
    assert decode.metric("genset_disagg_decisions_total", mode="remote", reason="forced") == 8
    assert prefill.metric("genset_disagg_prefills_served_total", outcome="ok") == 8
    # nothing stays pinned: both pools back to idle (every request has ended)
    await wait_for(lambda: prefill.used_blocks == 0 and decode.used_blocks == 0, 10.0,
                   "both pools idle")
    assert prefill.hook.pins.num_blocks == 0 and len(prefill.hook.pins) == 0
    assert decode.hook.resuming == 0


async def test_no_prefill_worker_means_aggregated(bus, discovery):
    ns = f"d{uuid.uuid4().hex[:8]}"
    decode = await Worker(bus, discovery, "decode", ns, policy="always").start()
    try:
        out = await decode.h.generate(decode.h.request(prompt(1), max_tokens=5))
        assert len(tokens_of(out)) == 5
        assert decode.metric("genset_disagg_decisions_total", mode="local",
                             reason="no_prefill_workers") == 1
    finally:
        await decode.close()


async def test_a_refusing_prefill_worker_means_aggregated(bus, discovery):
    ns = f"d{uuid.uuid4().hex[:8]}"
    # different dummy payload sizes: the prefill worker refuses the layout
    prefill = await Worker(bus, discovery, "prefill", ns, kv_bytes_per_token=8).start()
    decode = await Worker(bus, discovery, "decode", ns, policy="always").start()
    try:
        await wait_for(lambda: len(decode.hook.pool) == 1, 10.0, "prefill worker seen")
        out = await decode.h.generate(decode.h.request(prompt(2), max_tokens=5))
        assert len(tokens_of(out)) == 5
        assert decode.metric("genset_disagg_fallbacks_total", stage="first_token",
                             reason="kv_layout_mismatch") == 1
        assert decode.hook.resuming == 0  # the refused one is not counted as resuming here
        await wait_for(lambda: prefill.used_blocks == 0 and decode.used_blocks == 0, 10.0,
                       "both pools idle")
    finally:
        await decode.close()
        await prefill.close()


async def test_auto_sends_a_tie_to_an_idle_prefill_pool_unless_the_budget_is_off(bus,
                                                                                 discovery):
    # a short prompt on an idle decode worker stalls nobody either way (a tie): with the
    # spare budget (the default) it goes to the idle prefill worker, without it stays here
    ns = f"d{uuid.uuid4().hex[:8]}"
    prefill = await Worker(bus, discovery, "prefill", ns).start()
    spare = await Worker(bus, discovery, "decode", ns).start()
    keep = await Worker(bus, discovery, "decode", ns, spare_budget_ms=0.0).start()
    try:
        await wait_for(lambda: len(spare.hook.pool) == 1 and len(keep.hook.pool) == 1, 10.0,
                       "prefill worker seen")
        # the gate opens once a remote first token has come back within the budget (here
        # nothing would go remote for its price on an idle worker): as that one would
        now_ms = time.monotonic() * 1e3
        for w in (spare, keep):
            w.hook.spare.first_token(10.0, now_ms)
        for w, i in ((spare, 30), (keep, 31)):
            out = await w.h.generate(w.h.request(prompt(i), max_tokens=6))
            assert len(tokens_of(out)) == 6
        assert spare.metric("genset_disagg_decisions_total", mode="remote",
                            reason="remote_spare") == 1
        assert spare.metric("genset_disagg_remote_prefills_total") == 1
        assert keep.metric("genset_disagg_decisions_total", mode="local",
                           reason="local_cheaper") == 1
        await wait_for(lambda: prefill.used_blocks == 0 and spare.used_blocks == 0
                       and keep.used_blocks == 0, 10.0, "every pool idle")
    finally:
        await keep.close()
        await spare.close()
        await prefill.close()
    with pytest.raises(ValueError, match="spare-budget"):
        DisaggConfig(spare_budget_ms=-1.0)


async def test_dummy_payloads_travel_and_first_token_comes_before_the_kv(bus, discovery):
    """With a modelled slow link, the first token is out while the KV still travels."""
    ns = f"d{uuid.uuid4().hex[:8]}"
    slow = {"kv_bytes_per_token": 64, "kv_transfer_bandwidth_gb_s": 0.000_2}  # 5 ms a block
    prefill = await Worker(bus, discovery, "prefill", ns, **slow).start()
    decode = await Worker(bus, discovery, "decode", ns, policy="always", **slow).start()
    try:
        await wait_for(lambda: len(decode.hook.pool) == 1, 10.0, "prefill worker seen")
        req = decode.h.request(prompt(3, 200), max_tokens=4)  # 50 blocks of 4
        stream = await bus.stream_request(decode.h.subject, req, timeout=30)
        first = await anext(stream)
        assert len(proto.unpack_tokens(first.token_ids)) == 1
        # the first token is here; the transfer is still on its way (it lasts ~250 ms, paced)
        assert decode.metric("genset_disagg_remote_prefills_total") == 0
        # ... and the request counts among those a local prefill here would stall
        assert decode.hook.resuming == 1
        assert decode.hook.stalled(proto.LoadReport(worker_id=1, ts_ms=0, running=3,
                                                    waiting=2)) == 6
        rest = [c async for c in stream]
        assert len(tokens_of([first, *rest])) == 4
        assert decode.metric("genset_disagg_remote_prefills_total") == 1
        assert decode.metric("genset_kv_transfer_bytes_total", side="rx") == 50 * 4 * 64
        await wait_for(lambda: prefill.used_blocks == 0 and decode.used_blocks == 0, 10.0,
                       "both pools idle")
        await wait_for(lambda: decode.hook.resuming == 0, 10.0, "no remote prefill counted")
    finally:
        await decode.close()
        await prefill.close()


async def test_hashes_only_transfers_keep_the_modelled_link_time(bus, discovery):
    """--kv-payload none: no bytes travel, the transfer still lasts what the modelled link
    says (a lower bound: the pacing sleeps never end early), and the output is the same; a
    peer that sends dummy payloads is refused as a layout mismatch (aggregated instead)."""
    ns = f"d{uuid.uuid4().hex[:8]}"
    # 64 B/token x 4 tokens a block at 50 kB/s: 5.12 ms a block
    slow = {"kv_bytes_per_token": 64, "kv_transfer_bandwidth_gb_s": 0.000_05}
    prefill = await Worker(bus, discovery, "prefill", ns, kv_payload="none", **slow).start()
    decode = await Worker(bus, discovery, "decode", ns, policy="always", kv_payload="none",
                          **slow).start()
    other = await Worker(bus, discovery, "decode", ns, policy="always", **slow).start()
    agg = Host(bus, discovery, num_blocks=512)
    await agg.host.start()
    try:
        await wait_for(lambda: len(decode.hook.pool) == 1 and len(other.hook.pool) == 1, 10.0,
                       "prefill worker seen")
        loop = asyncio.get_running_loop()
        req = decode.h.request(prompt(4, 200), max_tokens=4)  # 50 blocks of 4
        stream = await bus.stream_request(decode.h.subject, req, timeout=30)
        first = await anext(stream)
        t_first = loop.time()
        rest = [c async for c in stream]
        assert loop.time() - t_first >= 40 * 0.00512  # the modelled link: ~50 blocks
        want = await agg.generate(agg.request(prompt(4, 200), max_tokens=4))
        assert tokens_of([first, *rest]) == tokens_of(want)
        assert decode.metric("genset_disagg_remote_prefills_total") == 1
        assert decode.metric("genset_kv_transfer_bytes_total", side="rx") == 0
        # the cost model still prices the modelled bytes
        assert decode.hook.cost_model().kv_bytes_per_token == 64
        out = await other.h.generate(other.h.request(prompt(5), max_tokens=5))
        assert len(tokens_of(out)) == 5
        assert other.metric("genset_disagg_fallbacks_total", stage="first_token",
                            reason="kv_layout_mismatch") == 1
        await wait_for(lambda: prefill.used_blocks == 0 and decode.used_blocks == 0
                       and other.used_blocks == 0, 10.0, "every pool idle")
    finally:
        await agg.host.close()
        await other.close()
        await decode.close()
        await prefill.close()


async def test_client_cancel_during_the_transfer_frees_both_sides(bus, discovery):
    ns = f"d{uuid.uuid4().hex[:8]}"
    slow = {"kv_bytes_per_token": 64, "kv_transfer_bandwidth_gb_s": 0.000_05}  # 20 ms a block
    prefill = await Worker(bus, discovery, "prefill", ns, **slow).start()
    decode = await Worker(bus, discovery, "decode", ns, policy="always", **slow).start()
    try:
        await wait_for(lambda: len(decode.hook.pool) == 1, 10.0, "prefill worker seen")
        req = decode.h.request(prompt(4, 200), max_tokens=4)
        stream = await bus.stream_request(decode.h.subject, req, timeout=30)
        await anext(stream)  # the first token: the transfer has started
        await stream.cancel()
        await wait_for(lambda: decode.h.host._active == {}, 10.0, "the request ended")
        await wait_for(lambda: prefill.used_blocks == 0 and decode.used_blocks == 0, 10.0,
                       "both pools idle")
        assert decode.h.metric("genset_worker_requests_cancelled_total") == 1
        assert decode.metric("genset_disagg_remote_prefills_total") == 0
        await wait_for(lambda: decode.hook.resuming == 0, 10.0, "no remote prefill counted")
    finally:
        await decode.close()
        await prefill.close()


async def test_a_remote_prefill_naming_another_subject_is_refused_before_it_runs(bus, pair):
    """A remote-prefill request's target says where the prefill worker publishes the KV: one
    naming a subject past the server's control line would cost the prefill worker its NATS
    connection for good, and any other subject than the named decode worker's receive subject
    would send the KV there. Refused as a bad request, before the prefill runs; the worker
    goes on serving."""
    prefill, decode = pair
    ns = decode.h.namespace
    req = decode.h.request(prompt(40), max_tokens=4)
    good = proto.KvTransferTarget(
        transfer_id="feed01", worker_id=decode.h.instance_id,
        subject=subjects.kv_transfer_rx(ns, decode.h.instance_id, "feed01"),
        window_bytes=1 << 20, layout=prefill.hook.layout)
    for fields in ({"subject": "x" * 5000}, {"transfer_id": "a" * 5000},
                   {"subject": subjects.subject(ns, "frontend", "generate")}):
        target = msgspec.structs.replace(good, **fields)
        with pytest.raises(RemoteError) as info:
            await bus.request(subjects.remote_prefill(ns, prefill.h.instance_id),
                              proto.RemotePrefillRequest(request=req, target=target),
                              timeout=10.0, reply_type=proto.RemotePrefillReply)
        assert info.value.error.code == "bad_request" and "target" in info.value.error.message
    assert prefill.metric("genset_disagg_prefills_served_total", outcome="bad_request") == 3
    assert bus.connected and prefill.used_blocks == 0 and len(prefill.hook.pins) == 0
    out = await decode.h.generate(decode.h.request(prompt(41), max_tokens=4))
    assert len(tokens_of(out)) == 4
    assert decode.metric("genset_disagg_remote_prefills_total") == 1


async def test_kv_goes_over_tcp_to_the_endpoint_its_decode_worker_publishes(bus, discovery):
    """A decode worker publishes its KV TCP endpoint in its InstanceRecord; a prefill worker
    (here told to send over TCP only) connects there once it has seen that record."""
    ns = f"d{uuid.uuid4().hex[:8]}"
    prefill = await Worker(bus, discovery, "prefill", ns, transport="tcp",
                           kv_bytes_per_token=16).start()
    decode = await Worker(bus, discovery, "decode", ns, policy="always", kv_bytes_per_token=16,
                          register_instance=True).start()
    try:
        did = decode.h.instance_id
        published = f"127.0.0.1:{decode.hook.hub.listener.port}"
        record = await discovery.get(keys.instance(ns, "decode", did), proto.InstanceRecord)
        assert record.labels["kv_tcp"] == published and record.labels["model"] == MODEL
        await wait_for(lambda: len(decode.hook.pool) == 1
                       and prefill.hook.endpoints.published(did) == published, 10.0,
                       "the prefill worker sees the decode worker's record")
        out = await decode.h.generate(decode.h.request(prompt(50), max_tokens=4))
        assert len(tokens_of(out)) == 4
        assert decode.metric("genset_disagg_remote_prefills_total") == 1
        assert decode.metric("genset_kv_transfers_total", side="rx", transport="tcp",
                             outcome="ok") == 1
        assert prefill.metric("genset_kv_transfer_tcp_untrusted_total") == 0
        await wait_for(lambda: len(prefill.hook.pins) == 0, 10.0, "pins released")
    finally:
        await decode.close()
        await prefill.close()


async def test_a_tcp_endpoint_not_the_decode_workers_own_is_never_connected_to(bus, discovery):
    """A remote-prefill request names the TCP endpoint the prefill worker connects to and
    writes the KV to: taken as it came, anyone who could publish one made a prefill worker
    open connections anywhere (SSRF). An endpoint that is not the one the named decode
    worker publishes in its InstanceRecord is never connected to, even with --kv-transport
    tcp: the KV goes over NATS to that worker's own receive subject, and the transfer
    completes. So too while the worker's record has not been seen (watch lag): a decode
    worker without one still gets its KV, over NATS."""
    ns = f"d{uuid.uuid4().hex[:8]}"
    prefill = await Worker(bus, discovery, "prefill", ns, transport="tcp",
                           kv_bytes_per_token=16).start()
    decode = await Worker(bus, discovery, "decode", ns, policy="always", kv_bytes_per_token=16,
                          register_instance=True).start()
    unlisted = await Worker(bus, discovery, "decode", ns, policy="always",
                            kv_bytes_per_token=16).start()
    trap = socket.socket()
    try:
        trap.bind(("127.0.0.1", 0))
        trap.listen(8)
        trap.setblocking(False)
        did = decode.h.instance_id
        hub = decode.hook.hub
        await wait_for(lambda: prefill.hook.endpoints.published(did) is not None, 10.0,
                       "the prefill worker sees the decode worker's record")
        tokens = prompt(51)
        hashes = block_hashes(tokens, 4)
        got: list[int] = []

        async def on_blocks(run) -> None:
            got.extend(run.hashes)

        for i, spoof in enumerate((
                {"port": trap.getsockname()[1]},  # somewhere else
                {"host": "localhost"})):  # the worker's port under another name
            req = decode.h.request(tokens, max_tokens=4, request_id=f"spoof-{i}")
            got.clear()
            rx = await hub.open_receive(req.request_id, on_blocks=on_blocks,
                                        expected_hashes=hashes, layout=decode.hook.layout,
                                        deadline_s=30.0)
            assert rx.target.tcp is not None and prefill.hook.endpoints.trusted(rx.target)
            target = msgspec.structs.replace(
                rx.target, tcp=msgspec.structs.replace(rx.target.tcp, **spoof))
            assert not prefill.hook.endpoints.trusted(target)
            reply = await bus.request(subjects.remote_prefill(ns, prefill.h.instance_id),
                                      proto.RemotePrefillRequest(request=req, target=target),
                                      timeout=10.0, reply_type=proto.RemotePrefillReply)
            assert reply.blocks == len(hashes)
            result = await rx.wait()
            assert result.transport == "nats" and got == hashes
        await wait_for(lambda: prefill.metric("genset_kv_transfers_total", side="tx",
                                              transport="nats", outcome="ok") == 2, 10.0,
                       "both sends ended well, over NATS")
        # the sends are over: a connection they made would be waiting here
        with pytest.raises(BlockingIOError):
            trap.accept()
        assert hub.listener.stats["accepted"] == 0
        assert prefill.metric("genset_kv_transfer_tcp_untrusted_total") == 2
        # a decode worker whose record is not there (yet): its own endpoint, over NATS
        await wait_for(lambda: len(unlisted.hook.pool) == 1, 10.0, "prefill worker seen")
        assert prefill.hook.endpoints.published(unlisted.h.instance_id) is None
        out = await unlisted.h.generate(unlisted.h.request(prompt(52), max_tokens=4))
        assert len(tokens_of(out)) == 4
        assert unlisted.metric("genset_kv_transfers_total", side="rx", transport="nats",
                               outcome="ok") == 1
        assert unlisted.metric("genset_disagg_remote_prefills_total") == 1
        assert prefill.metric("genset_kv_transfer_tcp_untrusted_total") == 3
        await wait_for(lambda: len(prefill.hook.pins) == 0, 10.0, "pins released")
    finally:
        trap.close()
        await unlisted.close()
        await decode.close()
        await prefill.close()


class FakePrefill:
    """A prefill worker as decode workers see it (its model card in etcd, its remote-prefill
    subject on the bus) that answers every remote prefill with `answer(request)` and sends no
    KV: a broken or hostile peer, speaking the real protocol."""

    def __init__(self, bus, discovery, namespace: str, answer, *, model: str = MODEL,
                 block_size: int = 4) -> None:
        self.bus, self.discovery, self.ns, self.answer = bus, discovery, namespace, answer
        self.model, self.block_size = model, block_size
        self.instance_id = int(uuid.uuid4().int & ((1 << 63) - 1)) or 1
        self.key = keys.model(namespace, model, self.instance_id)
        self.sub = None

    async def start(self) -> FakePrefill:
        async def serve(data: bytes):
            return self.answer(proto.decode(data, proto.RemotePrefillRequest))

        self.sub = await self.bus.serve(subjects.remote_prefill(self.ns, self.instance_id), serve)
        await self.discovery.put(self.key, proto.ModelCard(
            model=self.model, instance_id=self.instance_id, role="prefill", engine="mocker",
            block_size=self.block_size, kv_blocks=512))
        return self

    async def close(self) -> None:
        if self.sub is not None:
            await self.discovery.delete(self.key)
            await self.sub.unsubscribe()
            self.sub = None


@pytest.mark.parametrize("bad", [{"first_token_ids": proto.pack_tokens([1_000_000])},
                                 {"cached_tokens": 1 << 40}])
async def test_a_reply_with_a_bad_first_token_or_cache_count_means_aggregated(bus, discovery,
                                                                            bad):
    """The first token a prefill worker answers becomes the engine's input as it is (the
    torch engine's step failed on an id outside its vocabulary, taking every request in it
    and the engine down), and its cached tokens the request's usage: a reply with a token
    outside the vocabulary, or more cached tokens than the prompt has, is a bad reply, and
    the request runs aggregated."""
    ns = f"d{uuid.uuid4().hex[:8]}"
    right: dict = {}  # the aggregated first token: nothing but `bad` is wrong in the reply

    def answer(msg):
        return proto.RemotePrefillReply(**({
            "request_id": msg.request.request_id, "transfer_id": msg.target.transfer_id,
            "first_token_ids": right["first"]} | bad))

    fake = await FakePrefill(bus, discovery, ns, answer).start()
    decode = await Worker(bus, discovery, "decode", ns, policy="always",
                          first_token_timeout_s=5.0, transfer_timeout_s=2.0).start()
    agg = Host(bus, discovery, num_blocks=512)
    await agg.host.start()
    try:
        await wait_for(lambda: len(decode.hook.pool) == 1, 10.0, "decode sees the fake")
        want = await agg.generate(agg.request(prompt(50), max_tokens=6))
        right["first"] = proto.pack_tokens(tokens_of(want)[:1])
        got = await decode.h.generate(decode.h.request(prompt(50), max_tokens=6), within=30.0)
        assert tokens_of(got) == tokens_of(want)
        assert got[-1].usage.cached_tokens == want[-1].usage.cached_tokens
        assert decode.metric("genset_disagg_fallbacks_total", stage="first_token",
                             reason="bad_reply") == 1
        assert decode.hook.resuming == 0
        await wait_for(lambda: decode.used_blocks == 0, 10.0, "the decode pool idle")
    finally:
        await agg.host.close()
        await decode.close()
        await fake.close()


@pytest.mark.parametrize("then", ["silent", "leaves"])
async def test_a_prefill_peer_that_answers_and_sends_no_kv_means_a_recompute(bus, discovery,
                                                                            then):
    """A prefill worker that answers the first token and then never sends the KV header
    (dead, hung, hostile): the decode worker recomputes the prompt after the first token,
    same tokens. "silent": once the first token is in, silence before the header is bounded
    by the idle timeout (kv_peer_gone), not the receive's deadline (130 s here: the host's
    30 s hook timeout failed the request first); "leaves": its model card goes from etcd (a
    revoked or expired lease) while the header is awaited, which ends the wait at once
    (prefill_gone; the idle timeout is longer than the request's deadline)."""
    ns = f"d{uuid.uuid4().hex[:8]}"
    right: dict = {}

    def answer(msg):
        return proto.RemotePrefillReply(
            request_id=msg.request.request_id, transfer_id=msg.target.transfer_id,
            first_token_ids=right["first"], prompt_tokens=len(right["prompt"]))

    fake = await FakePrefill(bus, discovery, ns, answer).start()
    decode = await Worker(bus, discovery, "decode", ns, policy="always",
                          idle_timeout_s=0.3 if then == "silent" else 600.0,
                          transfer_timeout_s=120.0).start()
    agg = Host(bus, discovery, num_blocks=512)
    await agg.host.start()
    try:
        await wait_for(lambda: len(decode.hook.pool) == 1, 10.0, "decode sees the fake")
        right["prompt"] = tokens = prompt(53)
        want = await agg.generate(agg.request(tokens, max_tokens=6))
        right["first"] = proto.pack_tokens(tokens_of(want)[:1])
        async with asyncio.timeout(60.0):
            stream = await bus.stream_request(decode.h.subject, decode.h.request(
                tokens, max_tokens=6), timeout=60.0)
            first = await anext(stream)
            assert tokens_of([first]) == tokens_of(want)[:1]  # the fake's token, streamed
            if then == "leaves":
                await discovery.delete(fake.key)
            rest = [c async for c in stream]
        assert tokens_of([first, *rest]) == tokens_of(want)
        assert rest[-1].finish_reason == "length"
        reason = "kv_peer_gone" if then == "silent" else "prefill_gone"
        assert decode.metric("genset_disagg_fallbacks_total", stage="transfer",
                             reason=reason) == 1
        assert decode.metric("genset_disagg_fallbacks_total") == 1
        assert decode.metric("genset_disagg_remote_prefills_total") == 0
        if then == "silent":  # given up before any header came (no transport chosen)
            assert decode.metric("genset_kv_transfers_total", side="rx", transport="none",
                                 outcome="kv_peer_gone") == 1
        assert decode.hook.resuming == 0 and not decode.hook.hub._receives
        await wait_for(lambda: decode.used_blocks == 0, 10.0, "the decode pool idle")
    finally:
        await agg.host.close()
        await decode.close()
        await fake.close()


async def test_the_receive_deadline_ends_a_silent_transfer_before_the_host_hook_deadline(
        bus, discovery, monkeypatch):
    """The host's hook deadline, left at its default, is derived from the DisaggHook's own
    receive deadline (+ 5 s margin), so a transfer that outlasts the receive's deadline is
    ended by the receiver (a recompute, the right tokens), not failed by the host (before
    session 17 the default was a fixed 30 s, under the 40 s receive deadline). The 30 s floor
    is lowered here so the ordering shows with small deadlines: receive 0.5 + 1.5 s, host
    7 s; the peer answers the first token and then sends nothing (idle timeout 600 s)."""
    from genset.worker import host as host_mod

    monkeypatch.setattr(host_mod, "HOOK_TIMEOUT_FLOOR_S", 0.0)
    ns = f"d{uuid.uuid4().hex[:8]}"
    right: dict = {}

    def answer(msg):
        return proto.RemotePrefillReply(
            request_id=msg.request.request_id, transfer_id=msg.target.transfer_id,
            first_token_ids=right["first"], prompt_tokens=len(right["prompt"]))

    fake = await FakePrefill(bus, discovery, ns, answer).start()
    decode = await Worker(bus, discovery, "decode", ns, policy="always", idle_timeout_s=600.0,
                          first_token_timeout_s=0.5, transfer_timeout_s=1.5).start()
    assert decode.h.host.hook_timeout_s == 0.5 + 1.5 + host_mod.HOOK_TIMEOUT_MARGIN_S
    agg = Host(bus, discovery, num_blocks=512)
    await agg.host.start()
    try:
        await wait_for(lambda: len(decode.hook.pool) == 1, 10.0, "decode sees the fake")
        right["prompt"] = tokens = prompt(54)
        want = await agg.generate(agg.request(tokens, max_tokens=6))
        right["first"] = proto.pack_tokens(tokens_of(want)[:1])
        async with asyncio.timeout(60.0):
            chunks = await decode.h.generate(decode.h.request(tokens, max_tokens=6), within=60.0)
        assert tokens_of(chunks) == tokens_of(want)
        assert chunks[-1].finish_reason == "length"
        assert decode.metric("genset_disagg_fallbacks_total", stage="transfer") == 1
        assert decode.metric("genset_worker_hook_errors_total") == 0
        assert decode.hook.resuming == 0 and not decode.hook.hub._receives
    finally:
        await agg.host.close()
        await decode.close()
        await fake.close()


async def test_the_host_hook_deadline_is_derived_from_the_hooks_and_a_shorter_one_refused(
        bus, discovery):
    """Default: the hooks' longest own wait (a DisaggHook's first-token + transfer deadlines,
    an OffloadHook's lookup deadline, summed in a chain) + 5 s, at least 30 s; an explicit
    value below that is refused, naming both values (the pure core: tests/test_worker_hooks.py)."""
    from genset.worker import HookChain
    from genset.worker.offload_hook import OffloadHook, OffloadHookConfig

    ns = f"d{uuid.uuid4().hex[:8]}"
    # the decode service's defaults (--remote-prefill-timeout 10, --kv-transfer-timeout 30)
    assert Worker(bus, discovery, "decode", ns).h.host.hook_timeout_s == 45.0
    assert Worker(bus, discovery, "decode", ns,
                  transfer_timeout_s=120.0).h.host.hook_timeout_s == 135.0
    chain = HookChain(OffloadHook(config=OffloadHookConfig(deadline_s=0.5)),
                      DisaggHook(DisaggConfig(), discovery=discovery,
                                 metrics=Metrics(process_metrics=False)))
    assert Host(bus, discovery, hooks=chain).host.hook_timeout_s == 45.5
    assert Host(bus, discovery).host.hook_timeout_s == 30.0  # no hooks: the floor
    with pytest.raises(ValueError, match=r"hook_timeout_s 30 s .* longest wait 40 s"):
        Host(bus, discovery, hooks=DisaggHook(DisaggConfig(), discovery=discovery,
                                              metrics=Metrics(process_metrics=False)),
             hook_timeout_s=30.0)
    assert Worker(bus, discovery, "decode", ns,
                  transfer_timeout_s=1.0).h.host.hook_timeout_s == 30.0


def test_first_token_finish_follows_the_engine_rules():
    req = proto.GenerateRequest(request_id="r", model="m", token_ids=b"",
                                stop=proto.StopConditions(max_tokens=5, stop_token_ids=[9]))
    eos = frozenset({2})
    assert first_token_finish(req, 9, 10, eos, 100) == "stop"
    assert first_token_finish(req, 2, 10, eos, 100) == "stop"
    assert first_token_finish(req, 3, 10, eos, 100) is None
    assert first_token_finish(req, 3, 99, eos, 100) == "length"
    req.stop = proto.StopConditions(max_tokens=5, min_tokens=2, stop_token_ids=[9])
    assert first_token_finish(req, 9, 10, eos, 100) is None
    req.stop = proto.StopConditions(max_tokens=1)
    assert first_token_finish(req, 3, 10, eos, 100) == "length"


async def test_disaggregation_works_within_the_stack_permissions(secure_infra):
    """Two workers logged in as their worker slots (genset up's NATS users and permissions,
    etcd auth): the remote prefill, the hashes feed and the transfer all pass."""
    from genset.engines.mocker import MockerConfig, PolynomialTiming, create_mocker_engine
    from genset.runtime.discovery import Discovery
    from genset.worker import HostConfig, WorkerHost

    closers = []
    hosts = {}
    try:
        for slot, role in ((0, "prefill"), (1, "decode")):
            wid = secure_infra.worker_id(slot)
            env = secure_infra.creds.env("worker", slot=slot)
            bus = await secure_infra.bus("worker", slot=slot)
            closers.append(bus.close)
            disc = await Discovery.connect(secure_infra.etcd.endpoint, ttl=5.0,
                                           user=env["GENSET_ETCD_USER"],
                                           password=env["GENSET_ETCD_PASSWORD"])
            closers.append(disc.close)
            engine = create_mocker_engine(MockerConfig(
                block_size=4, num_blocks=256, vocab_size=1000, eos_token_ids=(0,),
                timing=PolynomialTiming(speedup_ratio=100)), worker_id=wid)
            metrics = Metrics(process_metrics=False)
            hook = DisaggHook(DisaggConfig(policy="always", kv_bytes_per_token=16),
                              discovery=disc, metrics=metrics)
            host = WorkerHost(engine, bus=bus, discovery=disc, instance_id=wid, metrics=metrics,
                              hooks=hook, config=HostConfig(namespace=secure_infra.namespace,
                                                            model="tiny", role=role))
            await host.start()
            closers.append(host.close)
            hosts[role] = (host, hook, metrics)
        host, hook, metrics = hosts["decode"]
        await wait_for(lambda: len(hook.pool) == 1, 10.0, "decode sees the prefill worker")
        frontend = await secure_infra.bus("frontend")
        closers.append(frontend.close)
        req = proto.GenerateRequest(request_id="sec-1", model="tiny",
                                    token_ids=proto.pack_tokens(prompt(5)),
                                    sampling=proto.SamplingParams(temperature=0.0),
                                    stop=proto.StopConditions(max_tokens=6))
        stream = await frontend.stream_request(host.generate_subject, req, timeout=30)
        assert len(tokens_of([c async for c in stream])) == 6
        values = parse_metrics(metrics.render().decode())
        assert metric(values, "genset_disagg_remote_prefills_total") == 1
        assert metric(values, "genset_disagg_fallbacks_total") == 0
        assert metric(values, "genset_kv_transfer_bytes_total", side="rx") == 22 * 4 * 16
        await wait_for(lambda: all(len(hook_.pins) == 0 for _, hook_, _ in hosts.values()),
                       10.0, "pins released")
    finally:
        for close in reversed(closers):
            await close()


async def test_progress_tracks_the_leading_computed_run_and_the_modelled_link():
    """Pure logic of the prefill side's progress tracking (`DisaggHook._note_stored`,
    `_Progress`): a send waits for its next block's hash; stored runs that continue it
    advance it, others (another prompt's, or past a gap) do not; the modelled link carries
    each run from when it was computed, one block at a time; the prefill's end makes every
    block computed, and nothing stays watched."""
    hook = DisaggHook(DisaggConfig(), discovery=None, metrics=Metrics(process_metrics=False))

    def stored(*runs):
        return proto.KvEventBatch(worker_id=1, event_id=1, events=[
            proto.Stored(parent_hash=None, blocks=[proto.StoredBlock(hash=h) for h in run])
            for run in runs])

    p = hook._watch([11, 12, 13, 14, 15, 16], cached=1)
    other = hook._watch([21, 22], cached=0)
    t0 = p.marks[0][0]
    hook._note_stored(stored([13, 14], [99]))  # past a gap, and not this prompt's
    assert p.ready == 1 and other.ready == 0
    hook._note_stored(stored([12, 13], [21, 22]))
    assert p.ready == 3 and other.ready == 2 and p.ended is None
    at = p.marks[-1][0]
    done = asyncio.ensure_future(p.until(lambda: p.pinned is not None))
    await asyncio.sleep(0)
    assert not done.done()
    p.computed()
    p.pin(5)
    await asyncio.wait_for(done, 10.0)
    assert p.ready == 6 and p.ended == 3 and p.pinned == 5
    end_at = p.marks[-1][0]
    # 0.5 s a block: block 0 from t0 (cached), blocks 1-2 from `at`, 3-4 (of the 5 pinned)
    # from the prefill's end
    assert p.link_end(0.5, 5) == pytest.approx(max(max(t0 + 0.5, at) + 1.0, end_at) + 1.0)
    assert p.link_end(0.5, 1) == pytest.approx(t0 + 0.5)
    hook._unwatch(p)
    hook._unwatch(other)
    assert hook._watching == {}


async def test_a_cancel_while_the_pipelined_send_waits_for_the_prefill_frees_both_sides(
        bus, discovery):
    """The send starts with the prefill and ships blocks as steps compute them: a client that
    cancels once blocks are on their way (the prefill most likely still going) ends the
    transfer; the prefill then finishes, and nothing stays pinned on either side."""
    ns = f"d{uuid.uuid4().hex[:8]}"
    link = {"kv_bytes_per_token": 64, "kv_transfer_bandwidth_gb_s": 1.0}
    prefill = Worker(bus, discovery, "prefill", ns, **link)
    # 16 tokens a step at speedup 0.05 (~340 ms a step): a 200-token prompt takes 13 steps,
    # seconds in which the send takes the first blocks on (a condition waited for below)
    prefill.h.engine.core.scheduler.config.max_batch_tokens = 16
    prefill.h.engine.core.timing.speedup_ratio = 0.05
    await prefill.start()
    # transfer chunks of 2 blocks (256 B each), so the send reads as the steps compute
    prefill.hook.hub.tcp_chunk_bytes = 512
    prefill.hook.hub.nats_chunk_bytes = lambda: 512
    decode = await Worker(bus, discovery, "decode", ns, policy="always", **link).start()
    try:
        await wait_for(lambda: len(decode.hook.pool) == 1, 10.0, "prefill worker seen")
        req = decode.h.request(prompt(6, 200), max_tokens=4)
        stream = await bus.stream_request(decode.h.subject, req, timeout=60)
        first = asyncio.ensure_future(anext(stream))
        await wait_for(lambda: prefill.metric("genset_kv_blocks_pipelined_total") > 0, 60.0,
                       "blocks sent before the prefill is over")
        await stream.cancel()
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await wait_for(lambda: decode.h.host._active == {}, 10.0, "the request ended")
        await wait_for(lambda: prefill.metric("genset_disagg_prefills_served_total",
                                              outcome="ok") == 1, 30.0, "the prefill ended")
        await wait_for(lambda: prefill.used_blocks == 0 and decode.used_blocks == 0
                       and len(prefill.hook.pins) == 0 and not prefill.hook._watching, 10.0,
                       "both pools idle, nothing pinned or watched")
        assert decode.metric("genset_disagg_remote_prefills_total") == 0
    finally:
        await decode.close()
        await prefill.close()


async def _drain_mid_send(bus, discovery, agg, gb_s: float, deadline_s: float) -> None:
    ns = f"d{uuid.uuid4().hex[:8]}"
    slow = {"kv_bytes_per_token": 64, "kv_transfer_bandwidth_gb_s": gb_s}
    prefill = await Worker(bus, discovery, "prefill", ns, **slow).start()
    decode = await Worker(bus, discovery, "decode", ns, policy="always", **slow).start()
    hub = prefill.hook.hub
    hub.tcp_chunk_bytes = 256  # one block a chunk: the blocks trickle in
    hub.nats_chunk_bytes = lambda: 256
    try:
        await wait_for(lambda: len(decode.hook.pool) == 1, 10.0, "prefill worker seen")
        tokens = prompt(60 + int(deadline_s), 200)
        stream = await bus.stream_request(decode.h.subject, decode.h.request(
            tokens, max_tokens=4), timeout=60)
        first = await anext(stream)
        # the transfer has begun: the decode worker holds imported blocks
        await wait_for(lambda: decode.h.engine.core.scheduler.num_pinned_blocks > 0, 20.0,
                       "the first blocks imported")
        await prefill.h.host.drain(deadline_s)
        assert not prefill.hook._tasks  # nothing left to the close
        outcome = "ok" if deadline_s else "kv_cancelled"
        assert prefill.metric("genset_kv_transfers_total", side="tx", outcome=outcome) == 1
        rest = [c async for c in stream]
        want = await agg.generate(agg.request(tokens, max_tokens=4))
        assert tokens_of([first, *rest]) == tokens_of(want)
        if deadline_s:
            assert decode.metric("genset_disagg_remote_prefills_total") == 1
            assert decode.metric("genset_disagg_fallbacks_total") == 0
        else:
            assert decode.metric("genset_disagg_fallbacks_total", stage="transfer",
                                 reason="kv_cancelled") == 1
        await wait_for(lambda: prefill.used_blocks == 0 and decode.used_blocks == 0, 10.0,
                       "both pools idle")
    finally:
        await decode.close()
        await prefill.close()


async def test_a_draining_prefill_worker_finishes_its_sends_or_aborts_them(bus, discovery):
    """A prefill worker's KV sends are no generate streams, yet its drain covers them: the
    host's drain returns once the send in progress has ended (acked: the decode worker
    imported every block), and a send the drain's deadline overtakes is cancelled and its
    receiver told (kv_cancelled: it recomputes at once, not at its idle timeout). The drain
    returned at once, and the send was cut off by the close after it."""
    agg = Host(bus, discovery, num_blocks=512)
    await agg.host.start()
    try:
        # ~26 ms a block (64 B/token x 4 tokens at 10 kB/s), 50 blocks: ~1.3 s
        await _drain_mid_send(bus, discovery, agg, 0.000_01, 60.0)
        # ~0.5 s a block: ~26 s, which the drain at deadline 0 cuts short
        await _drain_mid_send(bus, discovery, agg, 0.000_000_5, 0.0)
    finally:
        await agg.host.close()
