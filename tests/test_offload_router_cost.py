"""The router prices a worker's store runs with what that worker measured (issue 12 item 4):
a live mocker worker with the offload hook, a real store, real NATS and etcd. After the
worker onboarded a prompt from the store, its load reports carry its measured onboarding
cost (`proto.LoadReport.kv_bytes_per_token`, `onboard_ram_gbps`, `prefill_ms_per_token`)
and the router's view of it (`WorkerInfo.onboard`, what `PredictedTTFT` reads) holds them.
Every wait is on a condition, with the suite's generous deadline."""

from __future__ import annotations

import uuid

import proto
from genset.engines.mocker import MockerConfig
from genset.kv.hashing import block_hashes
from genset.routing.core import RouterConfig, RouterCore
from genset.routing.feeds import RouterFeeds
from genset.routing.policies import OnboardCost
from proto import subjects
from tests.helpers.offload_worker import offload_worker, prompt_of
from tests.test_offload_service import WAIT, running_store, wait_for


async def test_a_live_workers_load_reports_carry_its_measured_onboarding_cost(
        nats_server, etcd_server, bus, discovery):
    bs, ns = 16, f"t{uuid.uuid4().hex[:10]}"
    # 32 blocks; prompts of 20 blocks (320 tokens: prompt steps long enough for the hook to
    # measure the prefill rate from, MIN_MEASURED_PREFILL) push a short prompt's blocks out
    config = MockerConfig(block_size=bs, num_blocks=32, kv_bytes_per_token=1 << 20,
                          offload_h2d_gbps=64.0, offload_d2h_gbps=64.0, kv_copy_overlap=True)
    worker = offload_worker(config, bus=bus, discovery=discovery, namespace=ns, wait_s=WAIT)
    engine, hook, iid = worker.engine, worker.hook, worker.host.instance_id
    reports: list[proto.LoadReport] = []
    sub = await bus.subscribe_direct(subjects.load_report(ns, iid), lambda msg: reports.append(
        proto.decode(msg.data, proto.LoadReport)))
    core = RouterCore(RouterConfig(block_size=bs))
    feeds = RouterFeeds(core, bus=bus, namespace=ns, discovery=discovery)
    await feeds.start(initial_sync_s=0)
    try:
        async with (running_store(nats_server, etcd_server, ns, offload_ram_gb=0.5) as store,
                    worker.serving(store)):
            prompt = prompt_of(1, 5 * bs + 3)  # 5 full blocks
            hashes = block_hashes(prompt, bs)
            computed, _ = await worker.generate(bus, prompt)
            await wait_for(lambda: iid in core.workers and reports, "the worker's reports")
            # nothing onboarded yet: nothing measured of it, the router's defaults stand
            assert reports[-1].onboard_ram_gbps == 0.0 and reports[-1].kv_bytes_per_token == 0
            assert core.workers[iid].onboard is None
            for i in range(3):
                await worker.generate(bus, prompt_of(10 + i, 20 * bs))
            assert engine.cached_prefix(hashes) == 0
            assert await hook.client.flush(WAIT)
            await wait_for(lambda: all(h in store.store.cache.ram for h in hashes),
                           "the prompt's blocks in the store")
            again, usage = await worker.generate(bus, prompt)
            assert again == computed and usage.cached_tokens == 5 * bs  # onboarded
            measured = hook.report_fields()
            assert measured["onboard_ram_gbps"] > 0 and measured["kv_bytes_per_token"] > 0
            assert measured["prefill_ms_per_token"] > 0  # the 320-token prompt steps

            # the worker's next reports say so ...
            await wait_for(lambda: reports[-1].onboard_ram_gbps > 0, "a report with the rate")
            last = reports[-1]
            # (a mocker's payload is a 12-byte placeholder: 12 / 16 bytes a token on the
            # wire, fetched at that rate; their ratio is the fetch time of a block)
            assert last.kv_bytes_per_token == measured["kv_bytes_per_token"] == 12 / bs
            assert last.prefill_ms_per_token > 0
            # ... and the router's view of the worker holds what its reports said
            def said(r: proto.LoadReport) -> OnboardCost:
                return OnboardCost(kv_bytes_per_token=r.kv_bytes_per_token,
                                   ram_gbps=r.onboard_ram_gbps, disk_gbps=r.onboard_disk_gbps,
                                   prefill_ms_per_token=r.prefill_ms_per_token)

            await wait_for(lambda: core.workers[iid].onboard is not None
                           and core.workers[iid].onboard.ram_gbps > 0
                           and core.workers[iid].onboard in {said(r) for r in reports},
                           "the measured cost in the router's view")
            view = core._view(core.workers[iid], 0)
            assert view.onboard is core.workers[iid].onboard
            assert view.onboard.ram_gbps > 0 and view.onboard.disk_gbps == 0.0  # RAM only
    finally:
        await sub.unsubscribe()
        await feeds.close()
