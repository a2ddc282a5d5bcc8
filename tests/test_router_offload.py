"""The router's view of the KV offload store (no I/O): the store's tiers in the index, its
blocks credited at their onboarding cost in the genset policy, membership and gaps."""

from __future__ import annotations

import pytest

import proto
from genset.kv.hashing import block_hashes
from genset.routing.core import RouterConfig, RouterCore
from genset.routing.load import reported_onboard_cost
from genset.routing.policies import OnboardCost, PredictedTTFT, RouteContext, WorkerView
from proto.kv import TIER_DISK, TIER_HOST
from tests.test_router_core import BS, Clock, stored, tokens

STORE = 0x5709E


def store_batch(event_id: int, toks: list[int], tier: str = TIER_HOST, start: int = 0,
                store: int = STORE) -> proto.KvEventBatch:
    hs = block_hashes(proto.pack_tokens(toks), BS)[start:]
    return proto.KvEventBatch(worker_id=store, event_id=event_id, tier=tier, events=[
        proto.Stored(parent_hash=None, blocks=[proto.StoredBlock(hash=h) for h in hs])])


def two_workers(**policy_options) -> RouterCore:
    core = RouterCore(RouterConfig(policy="genset", block_size=BS, seed=1,
                                   policy_options=policy_options), clock=Clock())
    for w in (1, 2):
        core.add_worker(w, model="m", block_size=BS, kv_blocks=8192, max_batch_tokens=2048)
    return core


def load(core: RouterCore, worker: int, n: int, prompt_tokens: int) -> None:
    """`n` uncached requests queued on `worker`, as the router predicts them."""
    for i in range(n):
        core.load.on_routed(f"busy-{worker}-{i}", worker, prompt_tokens, 0, 16)


def choose(core: RouterCore, rid: str, toks: list[int]) -> int:
    d = core.route(proto.RouteRequest(request_id=rid, model="m", max_tokens=16,
                                      token_ids=proto.pack_tokens(toks)))
    assert d.error is None, d.error
    core.on_done(rid)
    return d.worker_id


def test_a_worker_next_to_a_warm_store_beats_a_loaded_worker_holding_the_prefix():
    prompt = tokens(1, 4096)
    # worker 1 holds the whole prefix on its device, but has a queue
    core = two_workers()
    core.on_kv_batch(stored(1, 0, prompt))
    load(core, 1, 1, 3072)
    assert choose(core, "cold", prompt) == 1  # no store: recomputing on 2 is slower

    core = two_workers()
    core.on_kv_batch(stored(1, 0, prompt))
    load(core, 1, 1, 3072)
    core.add_store(STORE)
    core.on_store_batch(store_batch(0, prompt))  # the store holds it in RAM
    assert choose(core, "warm", prompt) == 2  # onboarding beats waiting behind the queue
    # the store is never a candidate itself
    assert STORE not in core.workers and core.eligible("m") == list(core.workers.values())


def test_store_blocks_count_after_each_workers_own_prefix_and_cost_their_transfer():
    prompt = tokens(2, 40 * BS)
    core = two_workers()
    core.on_kv_batch(stored(1, 0, prompt[:10 * BS]))  # worker 1: the first 10 blocks
    core.add_store(STORE)
    core.on_store_batch(store_batch(0, prompt[:30 * BS], TIER_HOST))
    core.on_store_batch(store_batch(0, prompt[:35 * BS], TIER_DISK, start=30))
    hashes = block_hashes(proto.pack_tokens(prompt), BS)
    overlaps = core.index.overlaps(hashes)
    runs = core._store_runs(hashes, overlaps)
    assert runs[10] == [20, 5] and runs[0] == [30, 5]  # worker 1 onboards from block 10

    pol = PredictedTTFT(kv_bytes_per_token=1000, host_gbps=1.0, disk_gbps=0.5)
    # (disk at 0.5 GB/s: 48 us per 16 KB block, computing 16 tokens ~243 us: worth it)
    ms, onboarded = pol.onboard(20, 5, BS, 40 * BS - 1)
    assert onboarded == 25 * BS
    per_block = 1000 * BS / 1e6  # ms at 1 GB/s
    assert abs(ms - (20 * per_block + 5 * per_block * (2 + 1))) < 1e-9
    # never more than the prompt's uncached tokens minus the last one
    assert pol.onboard(20, 5, BS, 7 * BS + 3) == (7 * per_block, 7 * BS)


def test_a_slow_tier_counts_against_onboarding():
    pol = PredictedTTFT(kv_bytes_per_token=131072, host_gbps=0.001, disk_gbps=0.001)
    ctx = RouteContext(prompt_tokens=1024, prompt_blocks=64, block_size=BS)
    plain = pol.score(ctx, WorkerView(worker_id=1))
    with_store = pol.score(ctx, WorkerView(worker_id=1, host_blocks=63))
    assert with_store > plain  # 8 GiB at 1 MB/s: computing would have been faster
    # disk blocks slower than computing are expected to be computed: no credit, no cost
    assert pol.score(ctx, WorkerView(worker_id=1, disk_blocks=63)) == plain
    fast = PredictedTTFT(kv_bytes_per_token=131072, host_gbps=32.0)
    assert fast.score(ctx, WorkerView(worker_id=1, host_blocks=63)) < plain


def test_store_membership_and_gaps():
    core = two_workers()
    prompt = tokens(3, 8 * BS)
    assert core.on_store_batch(store_batch(0, prompt)).applied_blocks == 8
    assert STORE in core.stores  # learned from its events
    res = core.on_store_batch(store_batch(3, prompt))  # ids 1, 2 lost
    assert res.gap == (1, 3) and (STORE, TIER_HOST) in core.resync_wanted
    snapshot = proto.KvEventBatch(worker_id=STORE, event_id=4, tier=TIER_HOST,
                                  events=[proto.Cleared(), *store_batch(0, prompt).events])
    core.on_store_batch(snapshot)
    assert (STORE, TIER_HOST) not in core.resync_wanted
    # a worker's tier or a worker's id is not a store's
    assert core.on_store_batch(proto.KvEventBatch(worker_id=STORE, event_id=5)).stale
    assert core.on_store_batch(store_batch(0, prompt, store=1)).stale
    core.remove_store(STORE)
    hashes = block_hashes(proto.pack_tokens(prompt), BS)
    assert core.index.run_by_tier(hashes, 0, (TIER_HOST, TIER_DISK)) == [0, 0]
    # a late batch from the removed store does not bring it back
    assert core.on_store_batch(store_batch(6, prompt)).stale and not core.stores


def test_copies_beside_the_compute_cost_only_what_outlasts_the_prefill():
    ctx = RouteContext(prompt_tokens=1024, prompt_blocks=64, block_size=BS)
    view = WorkerView(worker_id=1, host_blocks=32, prefill_tokens=4096)  # busy: long prefill
    serial = PredictedTTFT(kv_bytes_per_token=131072, host_gbps=32.0)
    overlap = PredictedTTFT(kv_bytes_per_token=131072, host_gbps=32.0, copy_overlap=True,
                            kv_layers=32)
    ms, _ = serial.onboard(32, 0, BS, 1023)
    assert serial.score(ctx, view) - overlap.score(ctx, view) == \
        pytest.approx(ms - ms / 32)  # hidden behind the queue's prefill but its first layer
    # a copy longer than the prefill is paid beyond it
    # (onboarded whole: split_runs would have the worker compute most of this run instead,
    # tests/test_offload_onboard.py)
    slow = PredictedTTFT(kv_bytes_per_token=131072, host_gbps=0.01, copy_overlap=True,
                         split_runs=False)
    idle = WorkerView(worker_id=1, host_blocks=32)
    ms, _ = slow.onboard(32, 0, BS, 1023)
    assert slow.score(ctx, idle) == pytest.approx(ms + ms / 32)


def test_with_a_store_the_affinity_credit_is_priced_at_onboarding():
    """With a store in reach, a duplicate's victims are onboarded again rather than computed:
    the device prefix earns `affinity` x its onboarding time, and onboarded blocks none."""
    kw = {"kv_bytes_per_token": 131072, "host_gbps": 32.0, "copy_overlap": True}
    pol, none = PredictedTTFT(**kw), PredictedTTFT(**kw, affinity=0.0)
    ctx = RouteContext(prompt_tokens=64 * BS, prompt_blocks=64, block_size=BS)
    view = WorkerView(worker_id=1, overlap_blocks=8, host_blocks=40, store=True)
    ms = 131072 * 8 * BS / 1e6 / 32.0 / 32  # 8 blocks' copy, first layer (overlapped)
    assert none.score(ctx, view) - pol.score(ctx, view) == pytest.approx(0.5 * ms)
    # without a store: the device prefix's prefill saving (and never the onboarded blocks')
    p = pol.profile
    plain = WorkerView(worker_id=1, overlap_blocks=8)
    assert none.score(ctx, plain) - pol.score(ctx, plain) == pytest.approx(
        0.5 * (p.prefill_ms(64 * BS) - p.prefill_ms(56 * BS)))
    held = WorkerView(worker_id=1, overlap_blocks=8, host_blocks=40)  # store not flagged
    uncached = 64 * BS - 48 * BS
    assert none.score(ctx, held) - pol.score(ctx, held) == pytest.approx(
        0.5 * (p.prefill_ms(uncached + 8 * BS) - p.prefill_ms(uncached)))


def test_the_decision_says_how_many_prompt_blocks_the_store_holds():
    prompt = tokens(7, 6 * BS)
    other = tokens(8, 6 * BS)

    def decide(core: RouterCore, toks: list[int]) -> proto.RouteDecision:
        return core.route(proto.RouteRequest(request_id="r", model="m", max_tokens=16,
                                             token_ids=proto.pack_tokens(toks)))

    core = two_workers()
    assert decide(core, prompt).store_blocks is None  # no store known: no hint
    core.add_store(STORE)
    # a store whose snapshot has not come yet: what it holds is unknown, so no hint
    assert decide(core, prompt).store_blocks is None
    core.on_store_batch(proto.KvEventBatch(worker_id=STORE, event_id=7, tier=TIER_HOST,
                                           events=[proto.Cleared()]))  # its (empty) snapshot
    assert decide(core, prompt).store_blocks == 0  # a store, holding none of it: skip
    # blocks 2..5 only (the worker evicted the tail): counted anywhere, not as a run from 0
    core.on_store_batch(store_batch(8, prompt, start=2))
    assert decide(core, prompt).store_blocks == 4
    assert decide(core, other).store_blocks == 0
    core.on_store_batch(store_batch(1, other, tier=TIER_DISK))  # the disk tier's first batch
    assert decide(core, other).store_blocks == 6
    # a gap: the view may miss blocks until the snapshot, so no hint meanwhile
    core.on_store_batch(store_batch(12, tokens(9, 2 * BS)))
    assert decide(core, other).store_blocks is None
    core.on_store_batch(proto.KvEventBatch(worker_id=STORE, event_id=13, tier=TIER_HOST,
                                           events=[proto.Cleared()]))
    assert decide(core, other).store_blocks == 6


def test_a_fresh_store_is_known_whole_from_its_first_batch():
    core = two_workers()
    prompt = tokens(3, 4 * BS)
    core.on_store_batch(store_batch(1, prompt))  # joins by its first event batch
    d = core.route(proto.RouteRequest(request_id="r", model="m", max_tokens=16,
                                      token_ids=proto.pack_tokens(prompt)))
    assert d.store_blocks == 4


# ---- the workers' measured onboarding cost (proto.LoadReport, issue 12 item 4) ----------

def report(worker: int, **cost) -> proto.LoadReport:
    return proto.LoadReport(worker_id=worker, ts_ms=1, kv_total_blocks=8192, **cost)


def test_a_worker_is_priced_with_the_onboarding_cost_it_reported():
    """Worker 1 holds the prompt but has a queue; worker 2 has the store next to it. At the
    policy's default link (32 GB/s) worker 2 wins (above); reporting a slow fetch it loses
    to the queue, reporting a fast one it wins, whatever the default."""
    prompt = tokens(1, 4096)

    def decide(**cost) -> tuple[int, RouterCore]:
        core = two_workers()
        core.on_kv_batch(stored(1, 0, prompt))
        load(core, 1, 1, 3072)
        core.add_store(STORE)
        core.on_store_batch(store_batch(0, prompt))
        assert core.on_load_report(report(2, **cost)) is None
        return choose(core, "r", prompt), core

    assert decide()[0] == 2  # nothing measured: the default link, worker 2 wins (above)
    # 512 MiB at 0.5 GB/s: ~1.1 s of onboarding, against ~0.1 s behind worker 1's queue
    slow, core = decide(kv_bytes_per_token=131072.0, onboard_ram_gbps=0.5)
    assert slow == 1
    assert core.workers[2].onboard.ram_gbps == 0.5 and core.workers[1].onboard is None
    # ... and with its prefill rate too it computes instead (as the worker decides), which
    # still loses to the prefix on worker 1
    assert decide(kv_bytes_per_token=131072.0, onboard_ram_gbps=0.5,
                  prefill_ms_per_token=0.015)[0] == 1
    # a fast link wins, even where the policy's default is slow
    core = two_workers(host_gbps=0.5)
    core.on_kv_batch(stored(1, 0, prompt))
    load(core, 1, 1, 3072)
    core.add_store(STORE)
    core.on_store_batch(store_batch(0, prompt))
    assert choose(core, "default-slow", prompt) == 1
    for w in (1, 2):  # (worker 1's device prefix is credited at its own link: affinity)
        core.on_load_report(report(w, kv_bytes_per_token=131072.0, onboard_ram_gbps=50.0))
    assert choose(core, "measured-fast", prompt) == 2
    # a report with nothing measured (an older worker, or nothing onboarded yet): defaults
    for w in (1, 2):
        core.on_load_report(report(w))
    assert core.workers[2].onboard is None
    assert choose(core, "unknown-again", prompt) == 1


def test_reported_costs_replace_each_default_they_measured():
    pol = PredictedTTFT(kv_bytes_per_token=131072, host_gbps=32.0, disk_gbps=4.0)
    per_block = 131072 * BS / 1e6  # ms at 1 GB/s
    # nothing reported: the defaults, as before
    ms, n = pol.onboard(10, 0, BS, 100 * BS, None)
    assert (ms, n) == pol.onboard(10, 0, BS, 100 * BS) and ms == pytest.approx(
        10 * per_block / 32.0)
    # a measured fetch rate, bytes per token from the defaults
    ms, n = pol.onboard(10, 0, BS, 100 * BS, OnboardCost(ram_gbps=2.0))
    assert n == 10 * BS and ms == pytest.approx(10 * per_block / 2.0)
    # measured bytes (a mocker's 12-byte placeholders) and rate: their ratio is the time
    ms, _ = pol.onboard(10, 0, BS, 100 * BS, OnboardCost(kv_bytes_per_token=12 / BS,
                                                          ram_gbps=1e-4))
    assert ms == pytest.approx(10 * 12 / 1e-4 / 1e9 * 1e3)
    # the store's disk read rate: a disk block pays it and the fetch; against the worker's
    # own prefill rate (the profile's would be ~0.24 ms a block)
    cost = OnboardCost(kv_bytes_per_token=1000.0, ram_gbps=1.0, disk_gbps=0.5,
                       prefill_ms_per_token=0.01)
    b = 1000 * BS / 1e6
    ms, n = pol.onboard(2, 3, BS, 100 * BS, cost)
    assert n == 5 * BS and ms == pytest.approx(2 * b + 3 * b * 3)  # 48 us a disk block
    slower = OnboardCost(kv_bytes_per_token=1000.0, ram_gbps=1.0, disk_gbps=0.05,
                         prefill_ms_per_token=0.01)  # a disk block: 0.34 ms > 0.16 computed
    assert pol.onboard(2, 3, BS, 100 * BS, slower) == (pytest.approx(2 * b), 2 * BS)
    # a RAM tier slower than the worker's prefill rate: the worker onboards nothing
    # (onboard_tiers: none), so neither does its price
    crawl = OnboardCost(kv_bytes_per_token=1000.0, ram_gbps=0.05, prefill_ms_per_token=0.01)
    assert pol.onboard(2, 3, BS, 100 * BS, crawl) == (0.0, 0)
    ctx = RouteContext(prompt_tokens=1024, prompt_blocks=64, block_size=BS)
    plain = pol.score(ctx, WorkerView(worker_id=1))
    assert pol.score(ctx, WorkerView(worker_id=1, host_blocks=63, onboard=crawl)) == plain
    fast = OnboardCost(kv_bytes_per_token=1000.0, ram_gbps=5.0, prefill_ms_per_token=0.01)
    assert pol.score(ctx, WorkerView(worker_id=1, host_blocks=63, onboard=fast)) < plain
    # the affinity credit of a device prefix, with a store: at the worker's own fetch rate
    view = WorkerView(worker_id=1, overlap_blocks=8, host_blocks=40, store=True)
    none = PredictedTTFT(kv_bytes_per_token=131072, host_gbps=32.0, affinity=0.0)
    measured = WorkerView(worker_id=1, overlap_blocks=8, host_blocks=40, store=True,
                          onboard=OnboardCost(ram_gbps=2.0))
    assert none.score(ctx, measured) - pol.score(ctx, measured) == pytest.approx(
        0.5 * 131072 * 8 * BS / 1e6 / 2.0)
    assert none.score(ctx, view) - pol.score(ctx, view) == pytest.approx(
        0.5 * 131072 * 8 * BS / 1e6 / 32.0)


@pytest.mark.parametrize("field,value", [
    ("onboard_ram_gbps", float("nan")), ("onboard_disk_gbps", float("inf")),
    ("kv_bytes_per_token", -1.0), ("prefill_ms_per_token", -0.5),
    ("onboard_ram_gbps", 1e9), ("kv_bytes_per_token", 1e12),
    ("prefill_ms_per_token", 1e7)])
def test_an_unbelievable_onboarding_cost_is_refused_and_the_defaults_stand(field, value):
    core = two_workers()
    assert core.on_load_report(report(2, onboard_ram_gbps=3.0)) is None
    assert core.workers[2].onboard == OnboardCost(ram_gbps=3.0)
    refused = core.on_load_report(report(2, **{field: value}, running=4))
    assert refused is not None and field in refused
    assert core.workers[2].onboard is None  # not the bad value, nor the last good one
    assert core.load.workers[2].report.running == 4  # the load part is still used
    # on the wire: the same value decodes (msgspec floats), and is refused the same way
    wire = proto.decode(proto.encode(report(2, **{field: value})), proto.LoadReport)
    with pytest.raises(ValueError, match=field):
        reported_onboard_cost(wire)
    assert reported_onboard_cost(report(2)) is None


def test_the_router_services_flags_set_the_defaults_of_unmeasured_workers():
    from genset.runtime.config import CommonConfig
    from services.router.service import RouterOptions, RouterService

    opts = dict(onboard_kv_bytes_per_token=65536.0, onboard_ram_gbps=2.0, onboard_disk_gbps=0.5)
    for policy in ("genset", "dynamo"):  # a request may name genset when it is not the default
        svc = RouterService(CommonConfig(), RouterOptions(policy=policy, **opts))
        pol = svc.core.policy("genset")
        assert (pol.kv_bytes_per_token, pol.host_gbps, pol.disk_gbps) == (65536.0, 2.0, 0.5)
    assert svc.core.default_policy.name == "dynamo"
