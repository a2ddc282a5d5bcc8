"""etcd stopped for 20 s and restarted (same data dir), with real watchers and registrants.

Watchers must keep their last membership the whole time; records registered or unregistered
during the outage must reach etcd once it is back; watches must resume so that the exact
sequence of change events equals the sequence of writes: nothing missed, nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid

import pytest

import proto
from genset.runtime.discovery import Discovery

OUTAGE_S = 20.0


def rec(instance_id: int, gen: str = "1") -> proto.InstanceRecord:
    return proto.InstanceRecord(instance_id=instance_id, component="test", namespace="t",
                                labels={"gen": gen})


@pytest.mark.slow
async def test_etcd_outage_keeps_membership_and_resumes_exactly(own_etcd):
    ep = own_etcd.endpoint
    p = f"genset/t{uuid.uuid4().hex[:8]}/instances/"
    owner = await Discovery.connect(ep, ttl=10)
    viewer = await Discovery.connect(ep, ttl=10)
    seen: list = []

    async def collect(changes):
        async for kind, key, value in changes:
            seen.append((kind, key.removeprefix(p), value))

    try:
        m = await viewer.watch(p, proto.InstanceRecord)
        task = asyncio.create_task(collect(m.changes()))

        # -- before the outage ---------------------------------------------------------------
        await owner.register(p + "a", rec(1))
        await owner.register(p + "b", rec(2))
        await owner.register(p + "e", rec(5))
        await viewer.register(p + "v", rec(9))
        await owner.register(p + "a", rec(1, "2"))
        await owner.unregister(p + "b")
        await m.wait_for(lambda items: set(items) == {p + "a", p + "e", p + "v"}
                         and items[p + "a"] == rec(1, "2"), timeout=5)
        before = dict(m.items)
        revision_before = m.revision

        # -- outage --------------------------------------------------------------------------
        own_etcd.stop()
        down_at = time.monotonic()
        # Writes while etcd is away neither raise nor block: they are kept and applied later.
        await asyncio.wait_for(owner.register(p + "c", rec(3)), 4)
        await asyncio.wait_for(owner.unregister(p + "e"), 4)
        late = await viewer.watch(p, proto.InstanceRecord, require_initial=False)
        assert late.items == {}
        while time.monotonic() - down_at < OUTAGE_S:
            assert m.items == before, "membership changed while etcd was down"
            await asyncio.sleep(0.25)
        assert not m.connected and not owner.reachable and not viewer.reachable
        assert seen[-1] == ("delete", "b", rec(2))  # nothing emitted during the outage

        # -- back ----------------------------------------------------------------------------
        own_etcd.start()
        up_at = time.monotonic()
        await m.wait_for(lambda items: p + "c" in items and p + "e" not in items, timeout=15)
        recovered_s = time.monotonic() - up_at
        print(f"etcd back: records re-asserted and watch resumed {recovered_s:.2f} s after start")
        await owner.register(p + "d", rec(4))
        await owner.register(p + "a", rec(1, "3"))
        await owner.unregister(p + "d")
        expected_items = {p + "a": rec(1, "3"), p + "c": rec(3), p + "v": rec(9)}
        await m.wait_for(lambda items: items == expected_items, timeout=5)
        await late.wait_for(lambda items: items == expected_items, timeout=10)
        await asyncio.sleep(0.3)  # room for any stray duplicate to show up

        assert seen == [
            ("put", "a", rec(1)),
            ("put", "b", rec(2)),
            ("put", "e", rec(5)),
            ("put", "v", rec(9)),
            ("put", "a", rec(1, "2")),
            ("delete", "b", rec(2)),
            # the owner re-asserts its records: the pending delete first, then missing puts
            ("delete", "e", rec(5)),
            ("put", "c", rec(3)),
            ("put", "d", rec(4)),
            ("put", "a", rec(1, "3")),
            ("delete", "d", rec(4)),
        ], f"change sequence differs (recovered in {recovered_s:.1f} s)"
        assert m.revision > revision_before and m.connected
        assert owner.reachable and viewer.reachable

        # Registrations are really in etcd, under the live leases of their owners.
        check = await Discovery.connect(ep)
        try:
            kvs = {kv.key: kv for kv in (await check.client.get_prefix(p))[0]}
            assert set(kvs) == set(expected_items)
            assert kvs[p + "a"].lease == kvs[p + "c"].lease == owner.lease_id
            assert kvs[p + "v"].lease == viewer.lease_id
        finally:
            await check.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        await owner.close()
        await viewer.close()


@pytest.mark.slow
async def test_hung_etcd_is_noticed_and_survived(own_etcd):
    """etcd frozen (SIGSTOP: connections stay open, nothing answers): calls give up at their
    deadline, the silent watch is detected and dropped, the membership is kept; after
    SIGCONT everything resumes and converges."""
    ep = own_etcd.endpoint
    p = f"genset/t{uuid.uuid4().hex[:8]}/instances/"
    owner = await Discovery.connect(ep, ttl=10)
    viewer = await Discovery.connect(ep, call_timeout=1.0, watch_liveness_s=1.0)
    try:
        m = await viewer.watch(p, proto.InstanceRecord)
        await owner.register(p + "a", rec(1))
        await m.wait_for(lambda items: p + "a" in items, timeout=5)
        await asyncio.sleep(2.5)  # idle longer than the liveness window: no false alarm
        assert m.connected
        os.kill(own_etcd.proc.pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            t = time.monotonic()
            await viewer.register(p + "v", rec(9))  # kept for later, bounded by the deadline
            assert time.monotonic() - t < 2.0
            while m.connected:
                assert time.monotonic() - frozen_at < 5.0, "silent watch not noticed"
                await asyncio.sleep(0.05)
            assert m.items == {p + "a": rec(1)}
        finally:
            os.kill(own_etcd.proc.pid, signal.SIGCONT)
        await m.wait_for(lambda items: set(items) == {p + "a", p + "v"}, timeout=10)
        await owner.register(p + "b", rec(2))
        await m.wait_for(lambda items: set(items) == {p + "a", p + "b", p + "v"}, timeout=5)
    finally:
        await owner.close()
        await viewer.close()
