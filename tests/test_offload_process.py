"""`genset offload` as a real process: killed and restarted on its directory, it keeps its id,
serves every disk-tier block again and announces its RAM tier's loss."""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest

import proto
from genset.kv.replica import HashSetReplica
from genset.offload.client import OffloadClient
from proto import subjects
from proto.offload import OffloadLookup
from services.kv_offload.store import READERS_STUCK, WRITER_STUCK
from tests.offload_helpers import chain
from tests.stack import Stack, log_events, metric

pytestmark = pytest.mark.slow

WAIT = 60.0


async def test_a_killed_store_restarts_with_its_disk_tier_and_announces_ram_cleared(
        nats_server, etcd_server, bus, tmp_path):
    ram_gb = 8 * 1500 / 2**30  # room for 8 of the test's blocks
    # plain LRU: the pushers below push the reused blocks from RAM onto disk (`slru`, the
    # default, would keep the reused ones in RAM and spill the pushers instead)
    # --serve-token-ids: the lookup below checks the token ids came through the restart
    args = ["--serve-token-ids", "--offload-dir", str(tmp_path / "store"), "--offload-ram-gb",
            f"{ram_gb:.12f}", "--offload-disk-gb", "0.001", "--admission", "lru"]
    async with Stack(nats_server.url, etcd_server.endpoint, log_dir=tmp_path) as stack:
        first = await stack.start_service("offload", extra_args=args)
        sid = int((await first.read_health())["store_id"], 16)
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
            h = await first.read_health()
            return h["tiers"]["disk"]["blocks"] >= 6 and h["pending_write_bytes"] == 0

        await first.wait_until(written, "reused blocks written to disk", WAIT)
        first.kill()

        batches: list[proto.KvEventBatch] = []

        async def on_event(msg) -> None:
            batches.append(proto.decode(msg.data, proto.KvEventBatch))

        sub = await bus.subscribe(subjects.offload_events(stack.namespace, sid), on_event)
        second = await stack.start_service("offload", extra_args=args)
        assert int((await second.read_health())["store_id"], 16) == sid  # same id, same hash range

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



async def test_sigterm_exits_within_its_deadline_when_a_disk_write_hangs(
        nats_server, etcd_server, bus, discovery, tmp_path):
    """A disk write that never returns (here: the block's `.tmp` file is a FIFO nobody reads,
    so opening it blocks in the kernel, as on a stalled NFS mount) cannot hold SIGTERM: the
    store gives up on its writer, says what was lost, revokes its etcd lease and exits. (It
    hung forever: `ThreadPoolExecutor.shutdown(wait=True)` on the event loop, and the join of
    the executor's threads at interpreter exit.)"""
    ram_gb = 2 * 1500 / 2**30  # room for 2 of the test's blocks: the rest spill to disk
    root = tmp_path / "store"
    args = ["--offload-dir", str(root), "--offload-ram-gb", f"{ram_gb:.12f}",
            "--offload-disk-gb", "0.01", "--admission", "lru", "--spill-min-freq", "0",
            "--drain-timeout", "2", "--lease-ttl", "300", "--log-level", "debug"]
    async with Stack(nats_server.url, etcd_server.endpoint, log_dir=tmp_path) as stack:
        store = await stack.start_service("offload", extra_args=args)
        sid = int((await store.read_health())["store_id"], 16)
        blocks = chain(31, 8, 1000)
        for b in blocks:  # after start-up, whose scan deletes leftover .tmp files
            name = f"{b.hash:016x}"
            os.mkfifo(root / "store-0" / "blocks" / name[:2] / f"{name}.kvb.tmp")
        client = OffloadClient(bus, stack.namespace)
        await client.start(instances=[sid])
        client.put_behind(blocks)
        assert await client.flush(WAIT)
        await client.close()

        async def spilling() -> bool:
            return (await store.read_health())["pending_write_bytes"] > 0

        await store.wait_until(spilling, "blocks queued for disk", WAIT)
        store.terminate()
        # the deadline is ~2 s of drain + 2 s for the writer + the etcd and NATS closes;
        # before the fix it never exited
        code = await store.wait_exit(WAIT)
        assert code is not None, f"still running after SIGTERM; log tail:\n{store.log_tail()}"
        stuck = log_events(store.log_path, WRITER_STUCK)
        assert len(stuck) == 1 and stuck[0]["blocks_lost"] >= 1, store.log_tail()
        assert log_events(store.log_path, "exit"), store.log_tail()
        assert not log_events(store.log_path, "shutdown step timed out"), store.log_tail()
        # the lease (300 s TTL) is gone now: revoked on the way out, not expired
        lease = log_events(store.log_path, "etcd lease granted")[0]["lease"]
        assert await discovery.client.lease_keepalive(lease) <= 0


async def test_sigterm_exits_within_its_deadline_when_a_disk_read_hangs(
        nats_server, etcd_server, bus, discovery, tmp_path):
    """The same for a lookup's read stuck on the disk (the reads ran in the loop's default
    executor, joined at exit without a timeout): here every block file is a FIFO whose
    writer, this test, never writes nor closes it."""
    ram_gb = 2 * 1500 / 2**30
    root = tmp_path / "store"
    args = ["--offload-dir", str(root), "--offload-ram-gb", f"{ram_gb:.12f}",
            "--offload-disk-gb", "0.01", "--admission", "lru", "--spill-min-freq", "0",
            "--drain-timeout", "2", "--lease-ttl", "300", "--log-level", "debug"]
    held: list[int] = []
    async with Stack(nats_server.url, etcd_server.endpoint, log_dir=tmp_path) as stack:
        store = await stack.start_service("offload", extra_args=args)
        sid = int((await store.read_health())["store_id"], 16)
        blocks = chain(32, 8, 1000)
        client = OffloadClient(bus, stack.namespace)
        await client.start(instances=[sid])
        client.put_behind(blocks)
        assert await client.flush(WAIT)
        await client.close()

        async def written() -> bool:
            h = await store.read_health()
            return h["tiers"]["disk"]["blocks"] >= 6 and h["pending_write_bytes"] == 0

        await store.wait_until(written, "blocks written to disk", WAIT)
        fifos = []
        for path in (root / "store-0" / "blocks").glob("*/*.kvb"):
            path.unlink()
            os.mkfifo(path)
            fifos.append(path)
        lookup = asyncio.create_task(bus.request(
            subjects.offload_lookup(stack.namespace, sid),
            OffloadLookup(hashes=[b.hash for b in blocks], max_bytes=1 << 20), timeout=WAIT))

        async def reading() -> bool:
            # a FIFO opens for writing (without blocking) once a reader waits on it; held
            # open and never written, that reader's read() never returns
            for path in fifos:
                try:
                    held.append(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                    return True
                except OSError:
                    pass
            return False

        try:
            await store.wait_until(reading, "a disk read stuck", WAIT)
            store.terminate()
            code = await store.wait_exit(WAIT)
            assert code is not None, f"still running after SIGTERM; log tail:\n{store.log_tail()}"
            assert log_events(store.log_path, READERS_STUCK), store.log_tail()
            assert log_events(store.log_path, "exit"), store.log_tail()
            assert not log_events(store.log_path, "shutdown step timed out"), store.log_tail()
            lease = log_events(store.log_path, "etcd lease granted")[0]["lease"]
            assert await discovery.client.lease_keepalive(lease) <= 0
        finally:
            lookup.cancel()
            with contextlib.suppress(BaseException):
                await lookup
            for fd in held:
                os.close(fd)


async def test_workers_keep_serving_when_the_store_is_killed_under_load(
        nats_server, etcd_server, bus, discovery, tmp_path):
    """Two mocker workers write evictions behind to a store and onboard from it; the store is
    SIGKILLed while requests keep coming: every request succeeds (lookups to the dead store
    end at their deadline and the workers compute), and onboarding had happened before."""
    import asyncio
    import uuid

    from proto import keys

    async with Stack(nats_server.url, etcd_server.endpoint, log_dir=tmp_path) as stack:
        store = await stack.start_service("offload", extra_args=["--offload-ram-gb", "0.01",
                                                                 "--offload-disk-gb", "0"])
        workers = await stack.start_workers(
            2, engine="mocker",
            extra_args=["--speedup", "20", "--block-size", "16", "--kv-blocks", "48",
                        "--offload", "on", "--offload-deadline-ms", "200"])
        found = await discovery.get_prefix(keys.models_prefix(stack.namespace, "tiny"),
                                           proto.ModelCard)
        subjects_ = sorted(c.generate_subject for c in found.values())
        prefixes = [[(p * 37 + j) % 900 + 3 for j in range(12 * 16)] for p in range(7)]  # 7 x 12 blocks: more than a worker holds
        failures: list[str] = []
        sent = 0

        async def one(i: int) -> None:
            nonlocal sent
            prompt = prefixes[i % len(prefixes)] + [i % 50 + 3] * 5
            req = proto.GenerateRequest(
                request_id=uuid.uuid4().hex, model="tiny", token_ids=proto.pack_tokens(prompt),
                sampling=proto.SamplingParams(temperature=0.0),
                stop=proto.StopConditions(max_tokens=3, ignore_eos=True))
            sent += 1
            try:
                stream = await bus.stream_request(subjects_[i % 2], req, timeout=WAIT)
                chunks = [c async for c in stream]
                if chunks[-1].finish_reason != "length":
                    failures.append(repr(chunks[-1]))
            except Exception as exc:  # any failure a client would see
                failures.append(repr(exc))

        async def load(start: int, n: int) -> None:
            for k in range(start, start + n, 4):
                await asyncio.gather(*(one(i) for i in range(k, k + 4)))

        async def total(name: str, **labels: str) -> float:
            """`name` summed over both workers."""
            return sum([metric(await w.metrics(), name, **labels) for w in workers])

        async def onboarded() -> float:
            return await total("genset_worker_offload_onboarded_blocks_total")

        i = 0
        # load until blocks were written behind and onboarded again (a condition, not a time)
        while await onboarded() == 0:
            await load(i, 8)
            i += 8
            assert i < 2000, stack.logs()
        assert not failures, failures

        async def computed() -> float:
            # a lookup that found nothing (the dead store's instance still listed), one that
            # failed, or none at all because the hook judged the store slower than computing
            # (its fetch rate is measured, so which one depends on the machine's speed) or
            # the router's view of the store had none of the prompt's blocks
            return sum([await total("genset_worker_offload_lookups", outcome=o)
                        for o in ("misses", "errors", "skipped_slow", "skipped_hint")])

        before = await computed()
        store.kill()
        await load(i, 24)  # right after the kill: the store is still listed in etcd
        i += 24
        assert not failures, failures
        assert await computed() > before  # nothing came from the dead store: computed
        for w in workers:
            m = await w.metrics()
            assert metric(m, "genset_worker_requests_finished_total", reason="length") > 0
            assert metric(m, "genset_worker_hook_errors_total") == 0
        assert sent == i


# -- migration (issue 12 item 7) ----------------------------------------------------------------

ONBOARDED = "genset_worker_offload_onboarded_blocks_total"
WRITTEN = "genset_worker_offload_written_blocks"


def _words(tag: str, pairs: int) -> str:
    # ~3.3 tokens a pair with the tiny tokenizer: 60 pairs ~ 400 tokens = 25 blocks of 16
    return " ".join(f"{tag}{i} apple{i % 7}" for i in range(pairs))


async def _complete(url: str, prompt: str, max_tokens: int) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=WAIT) as client:
        resp = await client.post(url + "/v1/completions", json={
            "model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert resp.status_code == 200, resp.text


async def _stream(url: str, prompt: str, max_tokens: int, started) -> tuple[str | None, int]:
    """(finish reason, text chunks) of a streamed completion; `started` set at its first."""
    from tests.helpers.clients import completion_choices

    finish, chunks = None, 0
    async for choice in completion_choices(url, prompt, max_tokens, WAIT):
        chunks += 1
        started.set()
        finish = choice.get("finish_reason") or finish
    return finish, chunks


async def test_a_request_moved_off_a_dead_worker_onboards_its_prefix_from_the_store(
        nats_server, etcd_server, tmp_path):
    """The prefix goes to the store when the workers evict it; a long request with it is
    killed with its worker; the frontend moves it to the survivor, which onboards the prefix
    from the store (its onboarded-blocks counter rises) instead of computing it."""
    import asyncio

    # 48 blocks of 16 tokens a worker: the prefix (~25 blocks) and a filler (~38) don't fit
    # together, so every filler a worker runs evicts what it held before
    worker_args = ["--kv-blocks", "48", "--block-size", "16", "--speedup", "1"]
    async with Stack(nats_server.url, etcd_server.endpoint, log_dir=tmp_path) as stack:
        await stack.start_service("offload", extra_args=["--offload-ram-gb", "0.05"])
        workers = await stack.start_workers(2, extra_args=worker_args)
        fe = await stack.start_frontend()
        prefix = _words("pre", 60)
        await _complete(fe.url, prefix, 1)

        async def written(w) -> float:
            return metric(await w.metrics(), WRITTEN)

        # fillers until every worker has written more than the prefix's blocks to the store
        # (a worker's least recently used blocks go first: the prefix, wherever it was)
        for n in range(40):
            counts = [await written(w) for w in workers]
            if min(counts) >= 30:
                break
            await _complete(fe.url, _words(f"fill{n}x", 90), 1)
        else:
            raise AssertionError("workers never evicted the prefix: " + stack.logs())

        started = asyncio.Event()
        task = asyncio.create_task(_stream(fe.url, prefix, 300, started))
        async with asyncio.timeout(WAIT):
            await started.wait()
        victim = None
        for w in workers:
            if metric(await w.metrics(), "genset_worker_requests_running") >= 1:
                victim = w
        assert victim is not None, stack.logs()
        survivor = next(w for w in workers if w is not victim)
        before = metric(await survivor.metrics(), ONBOARDED)
        victim.kill()
        async with asyncio.timeout(WAIT):
            finish, chunks = await task
        assert finish == "length" and chunks > 1, stack.logs()
        values = await fe.metrics()
        assert metric(values, "genset_frontend_migrations_total") >= 1, stack.logs()
        assert metric(await survivor.metrics(), ONBOARDED) > before, stack.logs()
