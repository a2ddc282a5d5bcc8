"""The worker's onboarding decision (genset.worker.offload_hook), pure parts: which of the
store's tiers are worth onboarding from, and the engine's measured prefill cost per token."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from genset.engines.core import StepRecord
from genset.worker.offload_hook import (
    ONBOARD_ALL,
    ONBOARD_NONE,
    ONBOARD_RAM,
    OffloadHook,
    OffloadHookConfig,
    onboard_tiers,
    recompute_ms_per_token,
)

MB = 1_000_000


def test_a_tier_slower_than_computing_its_tokens_is_skipped():
    # 8 MB blocks of 64 tokens computed at 0.015 ms a token: 0.96 ms to compute one
    per_token = 0.015
    # RAM at 32 GB/s: 0.25 ms; its disk at 4 GB/s adds 2 ms: RAM only
    assert onboard_tiers(8 * MB, 64, per_token, 32.0, 4.0) == ONBOARD_RAM
    # a disk at 16 GB/s: 0.25 + 0.5 ms < 0.96 ms: both tiers
    assert onboard_tiers(8 * MB, 64, per_token, 32.0, 16.0) == ONBOARD_ALL
    # fetched over a 1 GB/s link: 8 ms, slower than computing: nothing
    assert onboard_tiers(8 * MB, 64, per_token, 1.0, 16.0) == ONBOARD_NONE
    # equal costs: computing wins (no gain for the transfer's risk)
    assert onboard_tiers(8 * MB, 64, 8.0 / 64, 1.0, 16.0) == ONBOARD_NONE


def test_unknown_costs_onboard_everything():
    assert onboard_tiers(0, 64, 0.015, 1e-3, 1e-3) == ONBOARD_ALL
    assert onboard_tiers(8 * MB, 64, 0.0, 1e-3, 1e-3) == ONBOARD_ALL


def test_recompute_rate_is_the_median_of_the_large_prompt_steps():
    log = [StepRecord(prefill_tokens=1000, step_ms=20.0),   # 0.020 / token
           StepRecord(prefill_tokens=0, decode_tokens=8, step_ms=9.0),  # decode: ignored
           StepRecord(prefill_tokens=10, step_ms=17.0),     # small: fixed cost, ignored
           StepRecord(prefill_tokens=4000, step_ms=40.0),   # 0.010
           StepRecord(prefill_tokens=2000, step_ms=30.0)]   # 0.015
    assert recompute_ms_per_token(log) == pytest.approx(0.015)
    assert recompute_ms_per_token([]) == 0.0
    assert recompute_ms_per_token(log[1:3]) == 0.0


def test_the_hook_decides_with_what_it_measured():
    hook = OffloadHook(config=OffloadHookConfig(fetch_gbps=32.0, disk_gbps=4.0))
    assert hook.tiers_worth(64) == ONBOARD_ALL  # nothing measured: as before
    engine = SimpleNamespace(step_log=[StepRecord(prefill_tokens=4096, step_ms=61.44)])
    hook.ctx = SimpleNamespace(engine=engine)  # 0.015 ms a token
    hook._block_bytes = 8 * MB
    assert hook.tiers_worth(64) == ONBOARD_RAM  # the disk read is too slow
    hook.client = SimpleNamespace(disk_read_gbps=50.0)  # a store says its disk is fast
    assert hook.tiers_worth(64) == ONBOARD_ALL
    hook._fetch_gbps = 0.5  # but the fetches measured were slow
    assert hook.tiers_worth(64) == ONBOARD_NONE
    with pytest.raises(ValueError, match="fetch_gbps"):
        OffloadHookConfig(fetch_gbps=0)


def test_the_hook_reports_what_it_measured_for_the_router():
    """`report_fields` (the worker's load reports): 0 until measured, then the onboarded
    blocks' bytes per token and fetch rate, the store's disk rate, the engine's prefill rate;
    the router's own check takes them (genset.routing.load.reported_onboard_cost)."""
    from genset.routing.load import reported_onboard_cost
    from proto import LoadReport
    from proto.offload import OffloadBlock

    hook = OffloadHook()
    assert hook.report_fields() == {"kv_bytes_per_token": 0.0, "onboard_ram_gbps": 0.0,
                                    "onboard_disk_gbps": 0.0, "prefill_ms_per_token": 0.0}
    log = [StepRecord(prefill_tokens=4096, step_ms=61.44)]
    hook.ctx = SimpleNamespace(engine=SimpleNamespace(step_log=log), block_size=64)
    hook.client = SimpleNamespace(disk_read_gbps=3.5)
    # a lookup that brought 4 blocks of 8 MB in 16 ms: 2 GB/s
    hook._measure_fetch([OffloadBlock(hash=i, data=bytes(8 * MB)) for i in range(4)], 0.016)
    fields = hook.report_fields()
    assert fields["kv_bytes_per_token"] == 8 * MB / 64
    assert fields["onboard_ram_gbps"] == pytest.approx(2.0)
    assert fields["onboard_disk_gbps"] == 3.5
    assert fields["prefill_ms_per_token"] == pytest.approx(0.015)
    cost = reported_onboard_cost(LoadReport(worker_id=1, ts_ms=1, **fields))
    assert cost.ram_gbps == pytest.approx(2.0) and cost.kv_bytes_per_token == 125000.0
    # the prefill rate is measured again once the engine has stepped, not before
    log.append(StepRecord(prefill_tokens=1000, step_ms=30.0))
    log.append(StepRecord(prefill_tokens=1000, step_ms=30.0))
    assert hook.report_fields()["prefill_ms_per_token"] == pytest.approx(0.03)
