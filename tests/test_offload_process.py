"""`genset offload` as a real process: killed and restarted on its directory, it keeps its id,
serves every disk-tier block again and announces its RAM tier's loss."""

from __future__ import annotations

import pytest

import proto
from genset.kv.replica import HashSetReplica
from genset.offload.client import OffloadClient
from proto import subjects
from tests.offload_helpers import chain
from tests.stack import Stack

pytestmark = pytest.mark.slow

WAIT = 60.0


async def health(proc) -> dict:
    return (await proc.get("/health")).json()


async def test_a_killed_store_restarts_with_its_disk_tier_and_announces_ram_cleared(
        nats_server, etcd_server, bus, tmp_path):
    ram_gb = 8 * 1500 / 2**30  # room for 8 of the test's blocks
    args = ["--offload-dir", str(tmp_path / "store"), "--offload-ram-gb", f"{ram_gb:.12f}",
            "--offload-disk-gb", "0.001"]
    async with Stack(nats_server.url, etcd_server.endpoint, log_dir=tmp_path) as stack:
        first = await stack.start_service("offload", extra_args=args)
        sid = int((await health(first))["store_id"], 16)
        client = OffloadClient(bus, stack.namespace)
        await client.start(instances=[sid])
        reused = chain(21, 6, 1000)
        client.put_behind(reused)
        client.put_behind(reused)  # evicted by two workers: worth keeping
        assert await client.flush(WAIT)
        pushers = chain(22, 8, 1000)
        for _ in range(3):
            await client.lookup([b.hash for b in pushers], deadline_s=WAIT)
        client.put_behind(pushers)  # hotter: pushes the reused blocks from RAM to disk
        assert await client.flush(WAIT)

        async def written() -> bool:
            h = await health(first)
            return h["tiers"]["disk"]["blocks"] >= 6 and h["pending_write_bytes"] == 0

        await first.wait_until(written, "reused blocks written to disk", WAIT)
        first.kill()

        batches: list[proto.KvEventBatch] = []

        async def on_event(msg) -> None:
            batches.append(proto.decode(msg.data, proto.KvEventBatch))

        sub = await bus.subscribe(subjects.offload_events(stack.namespace, sid), on_event)
        second = await stack.start_service("offload", extra_args=args)
        assert int((await health(second))["store_id"], 16) == sid  # same id, same hash range

        async def announced() -> bool:
            return any(b.tier == "host" for b in batches) and \
                {b.hash for b in reused} <= _applied(batches, "disk")

        await second.wait_until(announced, "start-up events seen", WAIT)
        host_start = next(b for b in batches if b.tier == "host")
        assert host_start.events[0] == proto.Cleared()  # the RAM tier's loss, announced
        assert not any(isinstance(ev, proto.Stored) for b in batches if b.tier == "host"
                       for ev in b.events)

        run = await client.lookup([b.hash for b in reused], deadline_s=WAIT, want_tokens=True)
        assert [(b.hash, b.token_ids, b.data) for b in run] == \
            [(b.hash, b.token_ids, b.data) for b in reused]
        await sub.unsubscribe()
        await client.close()
        assert await second.stop() == 0  # SIGTERM: drained cleanly


def _applied(batches, tier: str) -> set[int]:
    """The tier's blocks according to its events so far."""
    replica = HashSetReplica()
    for b in batches:
        if b.tier == tier:
            replica.apply(b)
    return replica.hashes

