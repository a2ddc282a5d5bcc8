"""Discovery against a real etcd: registration, watches, lease expiry and revocation across
processes, lease loss, compaction, and bad values."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import proto
from genset.runtime.discovery import ChangesOverflow, Discovery, DiscoveryError
from tests.helpers.waiting import until

REPO = Path(__file__).resolve().parent.parent
HELPER = REPO / "tests" / "helpers" / "register_and_wait.py"


def record(instance_id: int, **labels: str) -> proto.InstanceRecord:
    return proto.InstanceRecord(instance_id=instance_id, component="test", namespace="t",
                                labels=labels)


def prefix() -> str:
    return f"genset/t{uuid.uuid4().hex[:8]}/instances/"


async def collect(changes, into: list) -> None:
    with contextlib.suppress(ChangesOverflow):
        async for kind, key, value in changes:
            into.append((kind, key, value))


async def test_register_watch_update_unregister(etcd_server):
    p = prefix()
    owner = await Discovery.connect(etcd_server.endpoint, ttl=5)
    viewer = await Discovery.connect(etcd_server.endpoint, ttl=5)
    try:
        assert owner.lease_id and owner.lease_id != viewer.lease_id
        await owner.register(p + "a", record(1))
        m = await viewer.watch(p, proto.InstanceRecord)
        assert list(m.items) == [p + "a"] and m.items[p + "a"].instance_id == 1
        seen: list = []
        task = asyncio.create_task(collect(m.changes(), seen))
        heard: list = []
        m.add_listener(lambda kind, key, value: heard.append((kind, key)))

        await owner.register(p + "b", record(2))
        await owner.register(p + "a", record(1, role="x"))
        await owner.register(p + "a", record(1, role="x"))  # same bytes: not a change
        await viewer.put(p + "bad", b"\xc1 not msgpack")  # logged and skipped
        await owner.unregister(p + "b")
        await m.wait_for(lambda items: p + "b" not in items and
                         items.get(p + "a") == record(1, role="x"), timeout=30)
        # changes arrive in order: a wrong extra change (the same-bytes put, the bad value)
        # would come before the delete of b, so waiting for three is enough
        await until(lambda: len(seen) >= 3, 30, "three changes seen")
        expected = [("put", p + "b"), ("put", p + "a"), ("delete", p + "b")]
        assert [(k, key) for k, key, _ in seen] == expected
        assert heard == expected
        assert seen[2][2] == record(2)  # a delete carries the last known value
        assert p + "bad" not in m.items
        # get_prefix decodes the same way and also skips the bad value
        assert await viewer.get_prefix(p, proto.InstanceRecord) == {p + "a": record(1, role="x")}
        raw = await viewer.get_prefix(p)
        assert raw[p + "bad"] == b"\xc1 not msgpack"
        with pytest.raises(TimeoutError):
            await m.wait_for(lambda items: len(items) == 5, timeout=0.2)
        await m.close()
        await asyncio.wait_for(task, 30)  # close() ends changes() iterators
    finally:
        await owner.close()
        await viewer.delete(p + "bad")
        await viewer.close()


async def test_close_revokes_and_initial_changes(etcd_server):
    p = prefix()
    # A 60 s lease: gone well inside 30 s can only be the revoke, never the expiry.
    owner = await Discovery.connect(etcd_server.endpoint, ttl=60)
    viewer = await Discovery.connect(etcd_server.endpoint)
    try:
        await owner.register(p + "x", record(7))
        m = await viewer.watch(p, proto.InstanceRecord)
        seen: list = []
        task = asyncio.create_task(collect(m.changes(initial=True), seen))
        start = time.monotonic()
        await owner.close(revoke=True)
        assert owner.lease_id is None
        await m.wait_for(lambda items: not items, timeout=30)
        assert time.monotonic() - start < 30  # revoked, not expired after 60 s
        await until(lambda: len(seen) >= 2, 30, "the put and the delete seen as changes")
        assert [(k, key) for k, key, _ in seen] == [("put", p + "x"), ("delete", p + "x")]
        task.cancel()
        with pytest.raises(DiscoveryError):
            await owner.register(p + "y", record(8))
    finally:
        await owner.close()
        await viewer.close()


async def test_connect_fails_clearly_when_etcd_absent():
    from genset.runtime.infra import free_port

    # Gives up after connect_timeout (named in the error) rather than retrying forever; the
    # 30 s bound only catches the hang, whatever the machine's load.
    start = time.monotonic()
    with pytest.raises(DiscoveryError, match=r"unreachable for 1\.0 s"):
        await Discovery.connect(f"127.0.0.1:{free_port()}", connect_timeout=1.0)
    assert time.monotonic() - start < 30
    with pytest.raises(DiscoveryError, match="not host:port"):
        await Discovery.connect("no-port-here")


async def test_changes_overflow_ends_slow_consumer(etcd_server):
    p = prefix()
    d = await Discovery.connect(etcd_server.endpoint)
    try:
        m = await d.watch(p)
        slow = m.changes(maxsize=3)
        fast: list = []
        task = asyncio.create_task(collect(m.changes(), fast))
        for i in range(5):
            await d.register(p + str(i), b"v")
        await m.wait_for(lambda items: len(items) == 5, timeout=30)
        got = []
        with pytest.raises(ChangesOverflow):
            async for change in slow:
                got.append(change)
        assert len(got) == 3
        await until(lambda: len(fast) >= 5, 30, "the fast consumer got all five")
        assert len(fast) == 5  # the other consumer lost nothing
        task.cancel()
    finally:
        await d.close()


async def test_lease_lost_reregisters(etcd_server):
    """If the lease vanishes (expired while we could not reach etcd), the keepalive grants a
    new one and puts every record again."""
    p = prefix()
    owner = await Discovery.connect(etcd_server.endpoint, ttl=3)  # keepalive every 1 s
    viewer = await Discovery.connect(etcd_server.endpoint)
    try:
        await owner.register(p + "a", record(1))
        await owner.register(p + "b", record(2))
        m = await viewer.watch(p, proto.InstanceRecord)
        seen: list = []
        task = asyncio.create_task(collect(m.changes(), seen))
        old = owner.lease_id
        await viewer.client.lease_revoke(old)  # as if it had expired
        await m.wait_for(lambda items: not items, timeout=30)
        await m.wait_for(lambda items: len(items) == 2, timeout=30)
        assert owner.lease_id != old
        for kv in (await viewer.client.get_prefix(p))[0]:
            assert kv.lease == owner.lease_id
        await until(lambda: len(seen) >= 4, 30, "two deletes and two puts seen")
        assert sorted(seen[:2], key=lambda c: c[1]) == [
            ("delete", p + "a", record(1)), ("delete", p + "b", record(2))]
        assert sorted(seen[2:], key=lambda c: c[1]) == [
            ("put", p + "a", record(1)), ("put", p + "b", record(2))]
        task.cancel()
    finally:
        await owner.close()
        await viewer.close()


async def test_compacted_resume_emits_only_the_difference(etcd_server):
    """A watcher that resumes after its revision was compacted re-lists and emits puts for
    new/changed keys and deletes for vanished ones - nothing for unchanged keys."""
    p = prefix()
    d = await Discovery.connect(etcd_server.endpoint)
    try:
        for name in ("same", "changed", "gone"):
            await d.put(p + name, name.encode())
        m = await d.watch(p)
        seen: list = []
        task = asyncio.create_task(collect(m.changes(), seen))
        # Take the watcher down (as a lost connection would), change things, compact.
        m._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await m._task
        await d.put(p + "changed", b"v2")
        await d.put(p + "changed", b"v3")
        await d.delete(p + "gone")
        await d.put(p + "new", b"n")
        await d.put(p + "temp", b"t")
        await d.delete(p + "temp")
        _, rev = await d.client.get_prefix(p)
        await d.client.compact(rev)
        m._start()
        await m.wait_for(lambda items: "new" in "".join(items), timeout=30)
        assert m.items == {p + "same": b"same", p + "changed": b"v3", p + "new": b"n"}
        assert m.revision >= rev
        # and it keeps watching normally afterwards; changes arrive in order, so once this
        # later put is seen every change the resume emitted is in `seen` (no guessed sleep)
        await d.put(p + "later", b"l")
        await m.wait_for(lambda items: p + "later" in items, timeout=30)
        await until(lambda: ("put", p + "later", b"l") in seen, 30, "the later put as a change")
        assert seen[-1] == ("put", p + "later", b"l")
        assert sorted(seen[:-1]) == sorted([
            ("put", p + "changed", b"v3"), ("delete", p + "gone", b"gone"),
            ("put", p + "new", b"n")])
        task.cancel()
    finally:
        await d.client.delete_prefix(p)
        await d.close()


async def _spawn_registrar(endpoint: str, key: str, ttl: float, started: list):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HELPER), endpoint, key, "1", str(ttl),
        stdout=asyncio.subprocess.PIPE, cwd=REPO, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    started.append(proc)  # reaped by the caller even if it never gets ready
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert line.strip() == b"READY", line
    return proc


async def test_killed_process_expires_within_ttl_and_sigterm_removes_at_once(etcd_server):
    # Two leases so each alternative is far from the other whatever the machine's load: the
    # SIGTERMed process holds a 60 s lease, so its record gone within 30 s was revoked, not
    # expired; the SIGKILLed one a 4 s lease, which only expiry can end (nothing revokes it).
    kill_ttl, term_ttl = 4.0, 60.0
    p = prefix()
    viewer = await Discovery.connect(etcd_server.endpoint)
    procs: list = []
    try:  # each is added to procs as it starts: reaped below
        await _spawn_registrar(etcd_server.endpoint, p + "killed", kill_ttl, procs)
        await _spawn_registrar(etcd_server.endpoint, p + "termed", term_ttl, procs)
        killed, termed = procs
        m = await viewer.watch(p, proto.InstanceRecord)
        await m.wait_for(lambda items: len(items) == 2, timeout=30)
        assert m.items[p + "killed"].pid == killed.pid

        termed.send_signal(signal.SIGTERM)
        took = await until(lambda: p + "termed" not in m.items, 30, "removed after SIGTERM")
        assert await asyncio.wait_for(termed.wait(), 30) == 0
        assert took < term_ttl / 2, f"SIGTERM: record lingered {took:.2f} s (lease not revoked?)"

        killed.send_signal(signal.SIGKILL)
        # The lease must end it: the until deadline is the "outlived its lease" failure. The
        # last keepalive was due at most kill_ttl/3 before the kill, so at least ~2/3 of the
        # lease remained: vanishing within a quarter of it would mean something revoked it.
        took = await until(lambda: p + "killed" not in m.items, kill_ttl + 30,
                           "expired after SIGKILL")
        assert took >= kill_ttl / 4, f"SIGKILL: record vanished after {took:.2f} s (revoked?)"
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await viewer.close()


async def test_auth_login_and_wrong_password(own_etcd):
    """etcd with auth on: the right user registers and watches; a wrong password is a clear
    error at connect; an expired token (simulated) is renewed transparently."""
    from genset.runtime.infra import etcd_binary

    etcdctl = str(Path(etcd_binary()).with_name("etcdctl"))
    ep = own_etcd.endpoint

    def ctl(*args: str) -> None:
        subprocess.run([etcdctl, "--endpoints", ep, *args], check=True, capture_output=True,
                       timeout=10)

    ctl("user", "add", "root:rootpw")
    ctl("auth", "enable")
    with pytest.raises(DiscoveryError, match="refused"):
        await Discovery.connect(ep, user="root", password="wrong", connect_timeout=2)
    d = await Discovery.connect(ep, user="root", password="rootpw", ttl=3)
    try:
        p = prefix()
        m = await d.watch(p, proto.InstanceRecord)
        await d.register(p + "a", record(1))
        await m.wait_for(lambda items: p + "a" in items, timeout=30)
        d.client._metadata = (("token", "expired.token"),)  # as after the token's TTL
        await d.register(p + "b", record(2))
        await m.wait_for(lambda items: p + "b" in items, timeout=30)
        await asyncio.sleep(1.5)  # a keepalive round with the renewed token
        assert d.reachable
        # a watch that reconnects with a stale token logs in again too
        d.client._metadata = (("token", "expired.token"),)
        m._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await m._task
        m._start()
        await until(lambda: m.connected, 30, "watch reconnected with a fresh token")
        assert d.client._metadata != (("token", "expired.token"),)
        await d.register(p + "c", record(3))
        await m.wait_for(lambda items: p + "c" in items, timeout=30)
    finally:
        await d.close()


async def test_several_endpoints_fail_over_to_a_live_one(etcd_server):
    from genset.runtime.infra import free_port

    dead = f"127.0.0.1:{free_port()}"
    d = await Discovery.connect(f"{dead},http://{etcd_server.endpoint}", connect_timeout=5)
    try:
        assert d.client.endpoint == etcd_server.endpoint
        p = prefix()
        m = await d.watch(p)
        await d.register(p + "a", b"1")
        await m.wait_for(lambda items: items == {p + "a": b"1"}, timeout=30)
    finally:
        await d.close()


async def test_register_after_unnoticed_lease_loss(etcd_server):
    """register() finding its lease gone (before the keepalive noticed) re-grants at once."""
    p = prefix()
    owner = await Discovery.connect(etcd_server.endpoint, ttl=30)  # keepalive every 10 s
    try:
        await owner.register(p + "a", b"1")
        old = owner.lease_id
        await owner.client.lease_revoke(old)
        await owner.register(p + "b", b"2")
        assert owner.lease_id != old
        kvs = {kv.key: kv for kv in (await owner.client.get_prefix(p))[0]}
        assert set(kvs) == {p + "a", p + "b"}
        assert {kv.lease for kv in kvs.values()} == {owner.lease_id}
    finally:
        await owner.close()


class _CallThatNeverEnds:
    """Stands in for a grpc.aio call whose end never reaches the event loop."""

    def __init__(self):
        self.cancelled = False

    def __await__(self):
        return asyncio.get_running_loop().create_future().__await__()

    async def write(self, request):
        pass

    async def read(self):
        await asyncio.get_running_loop().create_future()

    def cancel(self):
        self.cancelled = True


async def test_call_whose_grpc_deadline_never_fires_still_ends():
    """Unit test: if gRPC never reports that a call ended (its deadline is enforced in gRPC's
    C core and handed to the event loop by gRPC's poller thread), the client still gives up
    one second after the deadline, cancels the call, and reports etcd unavailable."""
    from types import SimpleNamespace

    from genset.runtime.etcd_client import EtcdClient, EtcdUnavailable

    client = EtcdClient("127.0.0.1:1", timeout=0.2)
    try:
        unary, stream = _CallThatNeverEnds(), _CallThatNeverEnds()
        client._kv = SimpleNamespace(Range=lambda request, timeout, metadata: unary)
        client._lease = SimpleNamespace(LeaseKeepAlive=lambda metadata: stream)
        # The error text says the client's own give-up timer ended each call (a hang would be
        # the 30 s wait_for's TimeoutError); a timer cannot fire early, so the lower bound holds.
        start = time.monotonic()
        with pytest.raises(EtcdUnavailable, match=r"Range: no answer within 1\.2 s"):
            await asyncio.wait_for(client.get("k"), 30)
        assert time.monotonic() - start >= 1.1 and unary.cancelled
        start = time.monotonic()
        with pytest.raises(EtcdUnavailable, match=r"LeaseKeepAlive: no answer within 1\.2 s"):
            await asyncio.wait_for(client.lease_keepalive(1), 30)
        assert time.monotonic() - start >= 1.1 and stream.cancelled
    finally:
        await client.close()


async def test_a_quiet_watch_probes_only_a_channel_etcd_went_quiet_on(etcd_server):
    """A watch with nothing to report asks etcd for progress only when nothing at all came
    back on its channel for the liveness window: another call's answer (a lease keep-alive,
    a read, another watch) shows the channel alive. Those probes were a quarter of an idle
    stack's CPU (docs/benchmarks.md 5z); a frozen etcd is still noticed
    (test_discovery_outage.py::test_hung_etcd_is_noticed_and_survived)."""
    from genset.runtime.etcd_client import EtcdClient

    client = EtcdClient(etcd_server.endpoint, timeout=5)
    reader = stream = None
    try:
        p = prefix()
        _, revision = await client.get_prefix(p)
        stream = await client.watch_prefix(p, revision + 1, liveness_s=0.3)
        await client.get(p + "nothing")  # an answer on the stream's channel, just now
        assert client.heard_ago(stream._channel) < 0.3
        assert client.heard_ago(object()) == float("inf")  # a channel the client has left

        reader = asyncio.create_task(collect_batches(stream))
        real_heard_ago = client.heard_ago
        client.heard_ago = lambda channel: 0.0  # etcd answering other calls all along
        await asyncio.sleep(1.5)  # five liveness windows
        assert stream.probes_sent == 0 and not reader.done()

        client.heard_ago = real_heard_ago  # now only the watch itself talks to etcd
        await until(lambda: stream.probes_sent >= 2, 30, "a quiet channel being probed")
        assert not reader.done(), "etcd answers its progress requests: the watch stays"
    finally:
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        if stream is not None:
            stream.close()
        await client.close()


async def collect_batches(stream) -> None:
    async for _ in stream.batches():
        pass
