"""The per-request prefill decision (every branch), the bandwidth estimator, and the
mocker's disaggregation model. Pure: no I/O, no clock."""

from __future__ import annotations

import pytest

from genset.disagg import decision as d
from genset.disagg.bandwidth import BandwidthEstimator
from genset.disagg.sim import (
    TIMING_FULL_PROMPT,
    DisaggSimConfig,
    role_behaviour,
    transfer_blocks,
    transfer_ms,
)


def linear_prefill(ms_per_token: float = 0.1, const: float = 0.0):
    """A simple profile: const + ms_per_token per uncached token (batch ignored)."""
    return lambda tokens, running: const + ms_per_token * tokens


def model(**kw) -> d.CostModel:
    base = {
        "block_size": 16,
        "kv_bytes_per_token": 1000.0,
        "prefill_ms": linear_prefill(),
        "bandwidth_bytes_per_s": 1e9,  # 1 ms per MB
        "transfer_setup_ms": 1.0,
        "slowdown_weight": 1.0,
    }
    base.update(kw)
    return d.CostModel(**base)


BUSY_DECODE = d.DecodeState(worker_id=1, cached_blocks=0, running=32)
IDLE_PREFILL = d.PrefillState(worker_id=10)


def test_no_prefill_worker_means_local_never_an_error():
    dec = d.decide(4096, BUSY_DECODE, [], model())
    assert dec.mode == d.LOCAL and dec.reason == d.NO_PREFILL_WORKERS
    assert dec.prefill_worker_id is None and dec.cost_remote is None
    assert dec.local_ttft_ms == pytest.approx(409.6)


def test_all_prefill_workers_saturated_means_local():
    flagged = d.PrefillState(worker_id=10, saturated=True)
    backlog = d.PrefillState(worker_id=11, queued_prefill_tokens=50_000)  # 5000 ms of queue
    dec = d.decide(4096, BUSY_DECODE, [flagged, backlog], model(max_prefill_queue_ms=2000))
    assert dec.mode == d.LOCAL and dec.reason == d.PREFILL_SATURATED
    assert dec.transfer_blocks == 256 and dec.transfer_ms is not None
    # the same backlog is acceptable under a looser limit
    dec = d.decide(4096, BUSY_DECODE, [backlog], model(max_prefill_queue_ms=10_000))
    assert dec.reason in (d.REMOTE_CHEAPER, d.LOCAL_CHEAPER)


def test_nothing_to_ship_means_local():
    # the decode worker holds every full block of the prompt
    dec = d.decide(100, d.DecodeState(worker_id=1, cached_blocks=6, running=64),
                   [IDLE_PREFILL], model())
    assert dec.mode == d.LOCAL and dec.reason == d.SHORT_PROMPT_CACHED
    # a prompt shorter than a block has no block to ship at all
    dec = d.decide(10, BUSY_DECODE, [IDLE_PREFILL], model())
    assert dec.reason == d.SHORT_PROMPT_CACHED


def test_a_shipped_tail_costs_the_decode_worker_no_recompute():
    # 4,100 tokens: 256 full blocks and a partial one of 4 tokens, which the decode worker
    # computes when it does not travel (linear_prefill: 0.4 ms) while 32 streams wait
    recomputed = d.decide(4100, BUSY_DECODE, [IDLE_PREFILL], model())
    shipped = d.decide(4100, BUSY_DECODE, [IDLE_PREFILL], model(tail_shipped=True))
    assert recomputed.remote_slowdown_ms == pytest.approx(32 * 0.4)
    assert shipped.remote_slowdown_ms == 0.0
    assert shipped.remote_ready_ms == pytest.approx(recomputed.remote_ready_ms - 0.4)
    assert shipped.local_slowdown_ms == recomputed.local_slowdown_ms


def test_long_prompt_on_a_busy_decode_worker_goes_remote():
    dec = d.decide(4096, BUSY_DECODE, [IDLE_PREFILL], model())
    assert dec.mode == d.REMOTE and dec.reason == d.REMOTE_CHEAPER
    assert dec.prefill_worker_id == 10
    # 256 blocks x 16 tokens x 1000 B = 4.096 MB at 1 GB/s + 1 ms setup
    assert dec.transfer_bytes == 4_096_000
    assert dec.transfer_ms == pytest.approx(5.096)
    assert dec.remote_ttft_ms == pytest.approx(409.6)  # the first token comes from the prefill
    assert dec.remote_ready_ms == pytest.approx(409.6 + 5.096)
    assert dec.local_slowdown_ms == pytest.approx(32 * 409.6)  # 32 streams stall 409.6 ms
    assert dec.cost_remote < dec.cost_local


def test_idle_decode_worker_with_slow_link_stays_local():
    # nobody to slow down, and 4 MB at 10 MB/s is 410 ms of transfer: local is cheaper
    idle = d.DecodeState(worker_id=1, running=0)
    dec = d.decide(4096, idle, [IDLE_PREFILL], model(bandwidth_bytes_per_s=1e7))
    assert dec.mode == d.LOCAL and dec.reason == d.LOCAL_CHEAPER
    assert dec.prefill_worker_id is None  # only a remote decision names a prefill worker
    assert dec.cost_remote is not None and dec.cost_remote > dec.cost_local
    # the same request with a fast link: both take the same prefill time, the transfer tips it
    dec = d.decide(4096, idle, [IDLE_PREFILL], model(bandwidth_bytes_per_s=1e12))
    assert dec.reason == d.LOCAL_CHEAPER  # transfer setup + nothing saved locally


def test_cached_prefix_on_the_decode_worker_shrinks_local_work_and_transfer():
    warm = d.DecodeState(worker_id=1, cached_blocks=250, running=8)
    dec = d.decide(4096, warm, [IDLE_PREFILL], model())
    assert dec.transfer_blocks == 6
    assert dec.local_ttft_ms == pytest.approx(0.1 * (4096 - 250 * 16))
    # the prefill worker would compute all 4096 tokens: local wins despite the running batch
    assert dec.mode == d.LOCAL and dec.reason == d.LOCAL_CHEAPER


def test_best_prefill_worker_is_the_cheapest_one():
    queued = d.PrefillState(worker_id=10, queued_prefill_tokens=4000)
    warm = d.PrefillState(worker_id=11, cached_blocks=200)
    cold = d.PrefillState(worker_id=12)
    dec = d.decide(4096, BUSY_DECODE, [queued, cold, warm], model())
    assert dec.mode == d.REMOTE and dec.prefill_worker_id == 11
    assert dec.remote_ttft_ms == pytest.approx(0.1 * (4096 - 200 * 16))
    # ties go to the lowest worker id (deterministic across router replicas and replays)
    dec = d.decide(4096, BUSY_DECODE, [d.PrefillState(worker_id=5), d.PrefillState(worker_id=3)],
                   model())
    assert dec.prefill_worker_id == 3


def test_the_trailing_partial_block_and_import_are_charged_to_remote():
    m = model(import_ms_per_block=0.5, prefill_ms=linear_prefill(0.1, const=2.0))
    dec = d.decide(4100, BUSY_DECODE, [IDLE_PREFILL], m)
    tail_ms = 2.0 + 0.1 * 4  # 4 tokens past the last full block, recomputed on decode
    import_ms = 256 * 0.5
    assert dec.remote_slowdown_ms == pytest.approx(32 * (tail_ms + import_ms))
    assert dec.remote_ready_ms == pytest.approx(
        dec.remote_ttft_ms + dec.transfer_ms + import_ms + tail_ms)


def test_margin_and_weight_shift_the_balance():
    # a small decode batch: remote wins on the slow-down term only
    light = d.DecodeState(worker_id=1, running=1)
    assert d.decide(4096, light, [IDLE_PREFILL], model()).mode == d.REMOTE
    assert d.decide(4096, light, [IDLE_PREFILL], model(slowdown_weight=0.0)).mode == d.LOCAL
    assert d.decide(4096, light, [IDLE_PREFILL], model(remote_margin_ms=1e6)).mode == d.LOCAL


def test_every_reason_is_a_known_label_and_bad_input_is_refused():
    assert set(d.REASONS) == {"no_prefill_workers", "prefill_saturated",
                              "short_prompt_cached", "remote_cheaper", "local_cheaper",
                              "disabled", "forced", "single_token", "itl_target",
                              "remote_spare"}
    with pytest.raises(ValueError, match="prompt_tokens"):
        d.decide(0, BUSY_DECODE, [], model())
    with pytest.raises(ValueError, match="policy"):
        d.decide(10, BUSY_DECODE, [], model(), policy="sometimes")


def test_policies_never_and_always():
    long_prompt = 4096
    # a request the cost model keeps local (an idle decode worker, a slow link)...
    idle = d.DecodeState(worker_id=1)
    slow = model(bandwidth_bytes_per_s=1e6)
    assert d.decide(long_prompt, idle, [IDLE_PREFILL], slow).reason == d.LOCAL_CHEAPER
    # ...goes remote with "always", and stays local with "never" even where remote pays
    forced = d.decide(long_prompt, idle, [IDLE_PREFILL], slow, policy=d.POLICY_ALWAYS)
    assert forced.mode == d.REMOTE and forced.reason == d.FORCED
    assert forced.prefill_worker_id == IDLE_PREFILL.worker_id
    never = d.decide(long_prompt, BUSY_DECODE, [IDLE_PREFILL], model(), policy=d.POLICY_NEVER)
    assert never.mode == d.LOCAL and never.reason == d.DISABLED
    # "always" still never waits on an empty or saturated pool
    assert d.decide(long_prompt, idle, [], slow, policy="always").reason == d.NO_PREFILL_WORKERS
    busy = d.PrefillState(worker_id=10, saturated=True)
    assert d.decide(long_prompt, idle, [busy], slow,
                    policy="always").reason == d.PREFILL_SATURATED
    with pytest.raises(ValueError, match="bandwidth"):
        model(bandwidth_bytes_per_s=0)
    with pytest.raises(ValueError, match="slowdown_weight"):
        model(slowdown_weight=-1)


def test_mocker_polynomial_profile_fits_the_model():
    from genset.engines.mocker import PolynomialTiming

    timing = PolynomialTiming()
    m = model(prefill_ms=lambda t, running: timing.prefill_ms(t))
    dec = d.decide(8192, BUSY_DECODE, [IDLE_PREFILL], m)
    assert dec.mode == d.REMOTE
    assert dec.local_ttft_ms == pytest.approx(timing.prefill_ms(8192))


# ---- bandwidth ------------------------------------------------------------------------------


def test_bandwidth_starts_at_the_prior_then_follows_measurements():
    bw = BandwidthEstimator(1e9, alpha=0.5, min_sample_bytes=1000)
    assert bw.bytes_per_s == 1e9 and bw.samples == 0
    assert bw.observe(10_000_000, 0.1)  # 100 MB/s replaces the prior
    assert bw.bytes_per_s == pytest.approx(1e8)
    assert bw.observe(10_000_000, 0.05)  # 200 MB/s: halfway there
    assert bw.bytes_per_s == pytest.approx(1.5e8)
    assert bw.predict_s(1.5e8) == pytest.approx(1.0)


def test_bandwidth_ignores_meaningless_samples_and_clamps():
    bw = BandwidthEstimator(1e9, min_sample_bytes=1 << 20, floor=1e6, ceiling=1e11,
                            setup_s=0.001)
    assert not bw.observe(1000, 0.001)  # too small to say anything
    assert not bw.observe(10 << 20, 0.0)  # no time
    assert not bw.observe(10 << 20, 0.0005)  # less than the setup
    assert bw.samples == 0
    assert bw.observe(10 << 20, 0.0010001)  # near-zero moving time: clamped, not infinite
    assert bw.bytes_per_s == 1e11
    with pytest.raises(ValueError):
        BandwidthEstimator(0)


# ---- mocker model ---------------------------------------------------------------------------


def test_transfer_time_from_bytes_per_token_and_bandwidth():
    # 1000 tokens x 128 KiB at 10 GB/s
    assert transfer_ms(1000, 131072, 10.0) == pytest.approx(13.1072)
    assert transfer_ms(1000, 131072, 10.0, speedup_ratio=2.0) == pytest.approx(6.5536)
    assert transfer_ms(1000, 131072, 0.0) == 0.0  # bandwidth 0: no delay (as Dynamo's mocker)
    assert transfer_ms(0, 131072, 10.0) == 0.0


def test_timing_modes_count_the_blocks_that_travel():
    assert transfer_blocks(100, 16, decode_cached_blocks=2) == 4  # 6 full, 2 already there
    assert transfer_blocks(100, 16, decode_cached_blocks=2, mode=TIMING_FULL_PROMPT) == 6
    assert transfer_blocks(10, 16) == 0
    with pytest.raises(ValueError, match="timing mode"):
        transfer_blocks(100, 16, mode="fast")


def test_sim_config_roles_and_ready_time():
    cfg = DisaggSimConfig(role="decode", kv_bytes_per_token=1000, kv_transfer_bandwidth_gb_s=1.0)
    # 6 full blocks of 16 tokens missing on decode: 96 000 B at 1 GB/s
    assert cfg.transfer_ms(100, 16) == pytest.approx(0.096)
    assert cfg.kv_ready_at_ms(50.0, 100, 16, decode_cached_blocks=6) == 50.0
    assert cfg.block_bytes(16) == 16_000
    assert cfg.bandwidth_bytes_per_s() == 1e9
    assert DisaggSimConfig().bandwidth_bytes_per_s() is None
    prefill = role_behaviour("prefill")
    assert prefill.serves_prefill and not prefill.serves_requests
    assert prefill.max_tokens_override == 1
    decode = role_behaviour("decode")
    assert decode.serves_requests and decode.may_request_remote_prefill
    assert not decode.serves_prefill
    both = role_behaviour("both")
    assert both.serves_requests and not both.serves_prefill and both.max_tokens_override is None
    assert not both.may_request_remote_prefill  # aggregated: today's worker
    with pytest.raises(ValueError, match="--role"):
        DisaggSimConfig(role="mixed")
    with pytest.raises(ValueError, match="--kv-transfer-bandwidth"):
        DisaggSimConfig(kv_transfer_bandwidth_gb_s=-1)
    with pytest.raises(ValueError, match="--kv-bytes-per-token"):
        DisaggSimConfig(kv_bytes_per_token=-5)


# ---- metrics --------------------------------------------------------------------------------


def test_decisions_and_transfers_are_counted_with_bounded_labels():
    from genset.disagg.metrics import DisaggMetrics
    from genset.runtime.metrics import Metrics
    from genset.transfer import TransferError, TransferResult, errors

    reg = Metrics(process_metrics=False)
    m = DisaggMetrics(reg)
    m.decision(d.decide(4096, BUSY_DECODE, [], model()))
    m.decision(d.decide(4096, BUSY_DECODE, [IDLE_PREFILL], model()))
    ok = TransferResult(transfer_id="t", transport="tcp", blocks=4, bytes=4096, chunks=1,
                        seconds=0.01, high_water_bytes=4096, fallback=None)
    m.transfer("send", "tcp", ok)
    m.transfer("recv", "nats", error=TransferError(errors.CHECKSUM, "torn"))
    m.transfer("recv", "nats", error=TransferError("made_up_by_a_peer", "x"))
    text = reg.render().decode()
    assert 'genset_disagg_decisions_total{mode="local",reason="no_prefill_workers"} 1.0' in text
    assert 'genset_disagg_decisions_total{mode="remote",reason="remote_cheaper"} 1.0' in text
    assert 'genset_disagg_decisions_total{mode="local",reason="prefill_saturated"} 0.0' in text
    assert 'outcome="ok",side="send",transport="tcp"} 1.0' in text
    assert 'outcome="kv_checksum",side="recv",transport="nats"} 1.0' in text
    assert 'outcome="other",side="recv",transport="nats"} 1.0' in text
    assert "made_up_by_a_peer" not in text
    assert 'genset_kv_transfer_bytes_total{side="send",transport="tcp"} 4096.0' in text


def test_a_peer_lending_its_prefill_makes_its_own_decoders_pay():
    # a worker of role both, decoding as many sequences as the decode worker: the stall only
    # moves, and the transfer makes remote dearer
    peer = d.PrefillState(worker_id=10, decoding=32, running=32)
    dec = d.decide(4096, BUSY_DECODE, [peer], model())
    assert dec.mode == d.LOCAL and dec.reason == d.LOCAL_CHEAPER
    assert dec.remote_slowdown_ms == pytest.approx(32 * 409.6)
    # a peer with far fewer decoders takes it
    dec = d.decide(4096, BUSY_DECODE, [d.PrefillState(worker_id=10, decoding=4)], model())
    assert dec.mode == d.REMOTE and dec.remote_slowdown_ms == pytest.approx(4 * 409.6)


def test_the_resume_waits_for_the_decode_workers_backlog():
    # 2000 queued tokens on the decode worker = 200 ms: the KV (ready at 5.1 ms + 409.6 ms of
    # prefill) lands after it, a 5000-token backlog (500 ms) is longer than the remote path
    decode = d.DecodeState(worker_id=1, running=32, queued_prefill_tokens=5000)
    dec = d.decide(4096, decode, [IDLE_PREFILL], model())
    assert dec.remote_ready_ms == pytest.approx(500.0)
    assert dec.local_ttft_ms == pytest.approx(909.6)


def test_itl_target_keeps_short_answers_local_and_prices_stall_past_the_target():
    m = model(itl_target_ms=50.0, bandwidth_bytes_per_s=1e7)  # 100 ms per MB: 410 ms here
    # 3 output tokens: a 410 ms first gap alone is 205 ms per gap
    dec = d.decide(4096, BUSY_DECODE, [IDLE_PREFILL], m, max_tokens=3)
    assert dec.mode == d.LOCAL and dec.reason == d.ITL_TARGET
    # 500 output tokens absorb it
    dec = d.decide(4096, BUSY_DECODE, [IDLE_PREFILL], m, max_tokens=500)
    assert dec.mode == d.REMOTE
    # unknown max_tokens: no check
    assert d.decide(4096, BUSY_DECODE, [IDLE_PREFILL], m).mode == d.REMOTE
    # a short prefill (40 ms) within the target next to a 5 ms step stalls nobody past it
    small = d.decide(400, d.DecodeState(worker_id=1, running=32, step_ms=5.0),
                     [IDLE_PREFILL], model(itl_target_ms=50.0))
    assert small.local_slowdown_ms == 0.0 and small.mode == d.LOCAL
    # a long one: each stalled sequence pays what its gap exceeds the target by
    dec = d.decide(4096, d.DecodeState(worker_id=1, running=32, step_ms=5.0),
                   [IDLE_PREFILL], model(itl_target_ms=50.0))
    assert dec.local_slowdown_ms == pytest.approx(32 * (409.6 + 5.0 - 50.0))


def test_slo_pricing_goes_remote_only_to_save_misses():
    m = model(itl_target_ms=50.0, ttft_target_ms=2000.0)
    # nobody decoding: no miss either way -> stays where the router put it
    idle = d.DecodeState(worker_id=1, running=0, slack_ms=())
    dec = d.decide(4096, idle, [IDLE_PREFILL], m, max_tokens=500)
    assert dec.mode == d.LOCAL and dec.reason == d.LOCAL_CHEAPER and dec.cost_local == 409.6
    # 32 decoders with 5 s of ITL slack each: a 410 ms prefill pushes nobody past the target
    # but uses 8.2% of each one's slack (2.6 misses' worth); a prefill-only worker costs
    # them nothing (no tail, no import here)
    roomy = d.DecodeState(worker_id=1, running=32, slack_ms=tuple([5000.0] * 32))
    dec = d.decide(4096, roomy, [IDLE_PREFILL], m, max_tokens=500)
    assert dec.mode == d.REMOTE and dec.reason == d.REMOTE_CHEAPER
    assert dec.cost_local == pytest.approx(32 * 409.6 / 5000 * 2000.0 + 409.6)
    # 3 of them within 410 ms of their target (one already past it: lost either way)
    tight = d.DecodeState(worker_id=1, running=32,
                          slack_ms=tuple(sorted([-5.0, 100.0, 200.0, 300.0] + [5000.0] * 28)))
    dec = d.decide(4096, tight, [IDLE_PREFILL], m, max_tokens=500)
    assert dec.mode == d.REMOTE
    assert dec.cost_local == pytest.approx((3 + 28 * 409.6 / 5000) * 2000.0 + 409.6)
    # a lending peer only moves the stall between two batches: priced in sequences pushed
    # past now (no slack share); its 3 decoders all pushed past vs 3 here: stays local
    peer = d.PrefillState(worker_id=10, decoding=3, slack_ms=(50.0, 60.0, 70.0), lends=True)
    dec = d.decide(4096, tight, [peer], m, max_tokens=500)
    assert dec.mode == d.LOCAL and dec.cost_local == pytest.approx(3 * 2000.0 + 409.6)
    # ... and an idle peer does not take it off roomy decoders either (none pushed past)
    idle_peer = d.PrefillState(worker_id=10, decoding=1, slack_ms=(5000.0,), lends=True)
    assert d.decide(4096, roomy, [idle_peer], m, max_tokens=500).mode == d.LOCAL
    # ... but does where it saves sequences pushed past now
    assert d.decide(4096, tight, [idle_peer], m, max_tokens=500).mode == d.REMOTE
    # a short prompt: importing its one block and computing its 5-token tail would stall
    # the decode worker longer (2.5 ms) than prefilling all 21 tokens (2.1 ms): stays local
    short = d.decide(21, roomy, [IDLE_PREFILL], model(itl_target_ms=50.0,
                                                      ttft_target_ms=2000.0,
                                                      import_ms_per_block=2.0), max_tokens=500)
    assert short.mode == d.LOCAL
    # slack unknown: the ms pricing (the whole stall of every running sequence)
    assert d.decide(4096, d.DecodeState(worker_id=1, running=32), [IDLE_PREFILL], m,
                    max_tokens=500).cost_local > 32 * 300


def test_slo_pricing_counts_a_broken_own_itl_as_a_miss_not_a_veto():
    # a slow link (410 ms for this prompt) and 3 output tokens: the remote path loses the
    # request's own ITL target
    m = model(itl_target_ms=50.0, ttft_target_ms=2000.0, bandwidth_bytes_per_s=1e7)
    # next to 32 roomy decoders the local prefill costs 2.6 misses' worth: remote anyway
    roomy = d.DecodeState(worker_id=1, running=32, slack_ms=tuple([5000.0] * 32))
    dec = d.decide(4096, roomy, [IDLE_PREFILL], m, max_tokens=3)
    assert dec.mode == d.REMOTE and dec.cost_remote == pytest.approx(
        2000.0 + dec.remote_ready_ms)
    # next to 4 of them (0.33): local, the reason says why
    few = d.DecodeState(worker_id=1, running=4, slack_ms=tuple([5000.0] * 4))
    dec = d.decide(4096, few, [IDLE_PREFILL], m, max_tokens=3)
    assert dec.mode == d.LOCAL and dec.reason == d.LOCAL_CHEAPER
    # without slacks (ms pricing) it is still a veto
    dec = d.decide(4096, d.DecodeState(worker_id=1, running=32), [IDLE_PREFILL], m,
                   max_tokens=3)
    assert dec.mode == d.LOCAL and dec.reason == d.ITL_TARGET


def test_a_decode_backlog_does_not_keep_prefills_off_a_prefill_worker():
    # 10,000 tokens (1 s) queued on the decode worker: the resumed request would wait for
    # them (a 590 ms gap after its first token, 66 ms per gap over 10 tokens), but the local
    # path waits for the same queue before its first token: only the transfer is priced
    m = model(itl_target_ms=50.0, ttft_target_ms=2000.0)
    backlog = d.DecodeState(worker_id=1, running=32, queued_prefill_tokens=10_000,
                            slack_ms=tuple([5000.0] * 32))
    dec = d.decide(4096, backlog, [IDLE_PREFILL], m, max_tokens=10)
    assert dec.mode == d.REMOTE and dec.remote_ready_ms == pytest.approx(1000.0)
    assert dec.cost_remote == pytest.approx(1000.0)  # no miss predicted
    # a lending peer: the backlog gap still counts (and vetoes), as without slacks
    peer = d.PrefillState(worker_id=10, decoding=1, slack_ms=(5000.0,), lends=True)
    assert d.decide(4096, backlog, [peer], m, max_tokens=10).reason == d.ITL_TARGET
    no_slack = d.DecodeState(worker_id=1, running=32, queued_prefill_tokens=10_000)
    assert d.decide(4096, no_slack, [IDLE_PREFILL], m, max_tokens=10).reason == d.ITL_TARGET


def test_ms_pricing_counts_time_only_past_the_ttft_budget():
    # a live decode worker (no slacks): the prefill pool's 1.55 s queue (1.96 s to resume)
    # is within a 2 s budget, so 4 streams stalled 370 ms each past the ITL target (1.48 s
    # in all) send a 410 ms prefill there
    m = model(itl_target_ms=50.0, ttft_budget_ms=2000.0)
    busy_pool = [d.PrefillState(worker_id=10, queued_prefill_tokens=17_000),
                 d.PrefillState(worker_id=11, queued_prefill_tokens=15_500)]
    four = d.DecodeState(worker_id=1, running=4, step_ms=10.0)
    dec = d.decide(4096, four, busy_pool, m, max_tokens=500)
    assert dec.mode == d.REMOTE and dec.cost_remote == 0.0
    assert dec.prefill_worker_id == 11  # both within the budget: the earliest ready
    # without the budget every ms of the wait counts against the stall: local
    dec = d.decide(4096, four, busy_pool, model(itl_target_ms=50.0), max_tokens=500)
    assert dec.mode == d.LOCAL
    # nobody stalled past the ITL target either way (a short prefill): stays local
    short = d.decide(100, d.DecodeState(worker_id=1, running=40, step_ms=10.0), busy_pool, m,
                     max_tokens=500)
    assert short.mode == d.LOCAL and short.cost_local == 0.0
    # a pool whose queue breaks the budget: its time past it counts again
    jammed = [d.PrefillState(worker_id=10, queued_prefill_tokens=19_000)]
    dec = d.decide(4096, four, jammed, model(itl_target_ms=50.0, ttft_budget_ms=2000.0,
                                             max_prefill_queue_ms=5000.0), max_tokens=500)
    assert dec.cost_remote == pytest.approx(dec.remote_ready_ms - 2000.0)
    with pytest.raises(ValueError, match="ttft_budget_ms"):
        model(ttft_budget_ms=-1.0)
    # remote_on_tie: the same tie goes to the free prefill pool (the live default)
    tie = d.decide(100, d.DecodeState(worker_id=1, running=40, step_ms=10.0), busy_pool,
                   model(itl_target_ms=50.0, ttft_budget_ms=2000.0, remote_on_tie=True),
                   max_tokens=500)
    assert tie.mode == d.REMOTE and tie.cost_remote == 0.0 == tie.cost_local


def test_a_tie_goes_to_a_pool_with_room_to_spare_within_the_budget():
    # a short prompt next to 40 streams: its 10 ms prefill keeps every step within the
    # 50 ms ITL target here or there (the 1-token tail costs the same stall): a tie, local
    m = model(itl_target_ms=50.0, spare_budget_ms=1000.0)
    streams = d.DecodeState(worker_id=1, running=40, step_ms=10.0)
    idle_pool = [d.PrefillState(worker_id=10)]
    assert d.decide(100, streams, idle_pool, m, max_tokens=256).reason == d.LOCAL_CHEAPER
    # ... remote when the caller says the pool has room to spare
    dec = d.decide(100, streams, idle_pool, m, max_tokens=256, pool_spare=True)
    assert dec.mode == d.REMOTE and dec.reason == d.REMOTE_SPARE
    assert dec.prefill_worker_id == 10
    # not past the budget: a pool whose queue (1.2 s) would make the first token late
    queued = [d.PrefillState(worker_id=10, queued_prefill_tokens=12_000)]
    assert d.decide(100, streams, queued, m, max_tokens=256, pool_spare=True).mode == d.LOCAL
    # off (budget 0), and under --disagg always the reason stays `forced`
    off = model(itl_target_ms=50.0)
    assert d.decide(100, streams, idle_pool, off, max_tokens=256, pool_spare=True).mode == d.LOCAL
    assert d.decide(100, streams, idle_pool, m, policy=d.POLICY_ALWAYS, max_tokens=256,
                    pool_spare=True).reason == d.FORCED
    # not a tie: remote would stall the decode worker more than local (a 3 ms import per
    # block next to a 0.1 ms per token prefill, no ITL target: every ms counts)
    dear = model(spare_budget_ms=1000.0, import_ms_per_block=3.0)
    assert d.decide(100, streams, idle_pool, dear, pool_spare=True).mode == d.LOCAL
    # SLO pricing: a tie in misses goes too, more misses remote do not
    slo = model(itl_target_ms=50.0, ttft_target_ms=2000.0, spare_budget_ms=1000.0)
    roomy = d.DecodeState(worker_id=1, running=40, slack_ms=tuple([5000.0] * 40))
    idle = d.DecodeState(worker_id=1, running=0, slack_ms=())
    assert d.decide(100, idle, idle_pool, slo, max_tokens=256,
                    pool_spare=True).reason == d.REMOTE_SPARE
    assert d.decide(4096, roomy, idle_pool, slo, max_tokens=256,
                    pool_spare=True).reason == d.REMOTE_CHEAPER
    with pytest.raises(ValueError, match="spare_budget_ms"):
        model(spare_budget_ms=-1.0)


def test_spare_gate_closes_when_a_prompt_the_pool_is_for_stays_local():
    gate = d.SpareGate(2000.0)
    assert not gate.spare(0.0)  # nothing known of the pool yet
    gate.first_token(100.0, 0.0)  # a first token back within the budget: room seen
    assert gate.spare(0.0)
    m = model(itl_target_ms=50.0, max_prefill_queue_ms=2000.0)
    streams = d.DecodeState(worker_id=1, running=40, step_ms=10.0)
    # a short prompt kept local (a tie): the gate stays open
    gate.note(d.decide(100, streams, [d.PrefillState(worker_id=10)], m, max_tokens=256), 0.0)
    assert gate.spare(1.0)
    # a long prompt that stalls 40 streams past the ITL target, kept local because the
    # only prefill worker is saturated: the pool lacks room for what it is for
    jammed = [d.PrefillState(worker_id=10, queued_prefill_tokens=30_000)]
    dec = d.decide(4096, streams, jammed, m, max_tokens=256)
    assert dec.reason == d.PREFILL_SATURATED and dec.local_slowdown_ms > 0
    gate.note(dec, 100.0)
    assert not gate.spare(100.0) and not gate.spare(2099.0) and gate.spare(2100.0)
    # ... and kept local by price (the pool's queue dearer than the stall): closed too
    gate = d.SpareGate(2000.0)
    gate.first_token(100.0, 0.0)
    four = d.DecodeState(worker_id=1, running=4, step_ms=10.0)
    slow = [d.PrefillState(worker_id=10, queued_prefill_tokens=17_000)]
    dec = d.decide(4096, four, slow, m, max_tokens=256)
    assert dec.reason == d.LOCAL_CHEAPER and dec.local_slowdown_ms > 0
    gate.note(dec, 0.0)
    assert not gate.spare(1999.0)
    # a long prompt kept local with nobody to stall (a burst's first): still open
    gate = d.SpareGate(2000.0)
    gate.first_token(100.0, 0.0)
    gate.note(d.decide(4096, d.DecodeState(worker_id=1), slow, m, max_tokens=256), 0.0)
    assert gate.spare(0.0)
    # remote decisions and decisions with nothing to ship do not close it
    gate.note(d.decide(4096, streams, [d.PrefillState(worker_id=10)], m, max_tokens=256), 0.0)
    gate.note(d.decide(8, streams, jammed, m, max_tokens=256), 0.0)
    assert gate.spare(0.0)
    # a remote first token slower than the budget: the pool's queue is longer than the
    # decode worker's view of it says
    gate = d.SpareGate(2000.0, 1000.0)
    gate.first_token(1100.0, 0.0)
    assert not gate.spare(2000.0)  # closed, and no room seen yet
    gate.first_token(900.0, 0.0)
    assert gate.spare(2000.0)
    gate.first_token(1200.0, 50.0)
    assert not gate.spare(2049.0) and gate.spare(2050.0)
    with pytest.raises(ValueError, match="hold_ms"):
        d.SpareGate(-1.0)
    with pytest.raises(ValueError, match="budget_ms"):
        d.SpareGate(1.0, -1.0)
