"""`genset replay` with a KV offload store shared by the workers (genset.replay.offload), on a
small synthetic Mooncake-format trace whose prefixes do not fit the workers' caches."""

from __future__ import annotations

import json

import pytest

from genset.replay import __main__ as replay_cli
from genset.replay import simulate
from genset.replay.offload import OffloadConfig
from genset.replay.simulate import ReplayConfig, run_replay
from genset.replay.trace import TraceRequest


def trace(n: int = 120) -> list[TraceRequest]:
    """Requests cycling over 12 prefixes of 4 trace blocks (2048 tokens) each, plus a private
    tail: more prefixes than 2 workers of 64 blocks of 64 tokens hold."""
    out = []
    for i in range(n):
        p = i % 12
        out.append(TraceRequest(index=i, arrival_ms=i * 200.0, input_length=4 * 512 + 100,
                                output_length=4,
                                hash_ids=[p * 10 + k for k in range(4)] + [1000 + i]))
    return out


def cfg(**offload) -> ReplayConfig:
    return ReplayConfig(workers=2, kv_blocks=64, block_size=64,
                        offload=OffloadConfig(**offload) if offload else None)


def test_the_store_serves_the_prefixes_the_workers_evicted():
    t = trace()
    base = run_replay(t, "genset", cfg())
    off = run_replay(t, "genset", cfg(ram_blocks=2000))
    assert "offload" not in base
    tiers = off["offload"]["hit_rate_by_tier"]
    assert tiers["host"] > 0 and tiers["disk"] == 0
    assert abs(sum(tiers.values()) - off["hit_rate"]) < 1e-9  # every tier counted, once
    assert off["hit_rate"] > base["hit_rate"] + 0.2
    assert off["completed"] == base["completed"] == len(t)
    assert off["offload"]["onboarded_blocks"]["host"] > 0


def test_a_disk_tier_holds_what_ram_cannot():
    t = trace(240)
    ram_only = run_replay(t, "genset", cfg(ram_blocks=16))
    with_disk = run_replay(t, "genset", cfg(ram_blocks=16, disk_blocks=2000, disk_gbps=100.0))
    assert with_disk["offload"]["hit_rate_by_tier"]["disk"] > 0
    assert with_disk["hit_rate"] > ram_only["hit_rate"]
    # a disk slower than computing: its blocks are not onboarded (the worker computes them)
    slow = run_replay(t, "genset", cfg(ram_blocks=16, disk_blocks=2000, disk_gbps=1.0))
    assert slow["offload"]["hit_rate_by_tier"]["disk"] == 0


def test_an_empty_store_changes_nothing():
    t = trace(60)
    a = run_replay(t, "genset", cfg())
    b = run_replay(t, "genset", ReplayConfig(workers=2, kv_blocks=64, block_size=64,
                                             offload=OffloadConfig()))
    a.pop("wall_s")
    b.pop("wall_s")
    assert a == b


def test_decode_runs_do_not_change_any_number_with_offload(monkeypatch):
    t = trace(80)
    c = cfg(ram_blocks=500, disk_blocks=500)
    fast = run_replay(t, "round-robin", c)
    monkeypatch.setattr(simulate, "MAX_DECODE_RUN", 0)
    slow = run_replay(t, "round-robin", c)
    fast.pop("wall_s")
    slow.pop("wall_s")
    assert fast == slow


def test_cli_offload_flags_and_json(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(
        json.dumps({"timestamp": r.arrival_ms, "input_length": r.input_length,
                    "output_length": r.output_length, "hash_ids": r.hash_ids}) + "\n"
        for r in trace(60)))
    assert replay_cli.main([str(path), "--workers", "2", "--kv-blocks", "64",
                            "--offload-ram-blocks", "1000", "--offload-disk-blocks", "100",
                            "--offload-h2d-gbps", "0", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["offload"]["hit_rate_by_tier"]) == {"device", "host", "disk"}
    assert doc["offload"]["h2d_gbps"] == 0
    with pytest.raises(SystemExit):
        replay_cli.main([str(path), "--offload-ram-blocks", "-1"])
    assert "--offload-ram-blocks: must be >= 0" in capsys.readouterr().err


def _executor(overlap: bool):
    from genset.engines.mocker import MockerConfig, MockerExecutor

    return MockerExecutor(MockerConfig(kv_copy_overlap=overlap, kv_layers=32))


def test_synchronous_copies_add_to_the_step():
    ex = _executor(False)
    ex.charge(4.0, out=True)
    ex.charge(2.0)
    assert ex._with_copies(10.0) == (16.0, 4.0, 2.0)
    assert ex.charged_ms == ex.charged_out_ms == 0.0


def test_overlapped_copies_cost_the_first_layer_or_what_outlasts_the_compute():
    ex = _executor(True)
    ex.charge(4.0, out=True)
    ex.charge(2.0)
    step, out, into = ex._with_copies(10.0)
    # both lanes run beside the compute; the step waits for layer 0 of the longer one
    assert step == pytest.approx(10.0 + 4.0 / 32)
    assert out + into == pytest.approx(step - 10.0) and out == pytest.approx(2 * into)
    ex.charge(64.0)  # a copy in longer than the step's compute: the step waits for it
    step, out, into = ex._with_copies(1.0)
    assert step == pytest.approx(64.0 + 2.0) and out == 0.0
    assert into == pytest.approx(65.0)


def test_ttft_breakdown_and_overlapped_copies_in_the_replay():
    t = trace()
    sync = run_replay(t, "genset", cfg(ram_blocks=2000, copy_overlap=False))
    over = run_replay(t, "genset", cfg(ram_blocks=2000))
    for r in (sync, over):
        b = r["offload"]["ttft_breakdown_ms"]
        assert b["ttft"] == pytest.approx(r["ttft_mean_ms"])
        parts = b["queued"] + b["prompt_compute"] + b["prompt_copy_out"] + b["prompt_copy_in"]
        assert parts <= b["ttft"] + 1e-6
    assert sync["offload"]["ttft_breakdown_ms"]["prompt_copy_in"] > 0
    assert over["offload"]["copy_overlap"] and not sync["offload"]["copy_overlap"]
    # a copy beside the compute never makes a step longer than waiting for it
    assert over["ttft_mean_ms"] <= sync["ttft_mean_ms"]


def test_a_run_whose_copy_outlasts_the_compute_is_split_in_the_replay():
    # 32-block runs at 1 MiB a token: 64 MiB blocks at 32 GB/s
    # are 2.1 ms each, 67 ms a run, against ~18 ms to compute the 100-token rest
    t = trace()
    whole = run_replay(t, "genset", cfg(ram_blocks=2000, kv_bytes_per_token=1 << 20,
                                        split_runs=False))
    split = run_replay(t, "genset", cfg(ram_blocks=2000, kv_bytes_per_token=1 << 20))
    bw, bs_ = (r["offload"]["ttft_breakdown_ms"] for r in (whole, split))
    assert bs_["prompt_copy_in"] < bw["prompt_copy_in"]
    assert split["ttft_mean_ms"] < whole["ttft_mean_ms"]
    # the tails computed are not served from the store: fewer onboarded blocks
    assert split["offload"]["onboarded_blocks"]["host"] < whole["offload"]["onboarded_blocks"]["host"]
    # but they were found there: counted as found, the hit rate is higher than served
    o = split["offload"]
    assert o["found_blocks"] > o["onboarded_blocks"]["host"]
    assert o["hit_rate_found"] > split["hit_rate"]
    w = whole["offload"]
    assert w["found_blocks"] == w["onboarded_blocks"]["host"]
    assert w["hit_rate_found"] == pytest.approx(whole["hit_rate"])
    assert split["completed"] == whole["completed"] == len(t)
    # copies the steps wait for (--offload-sync-copies): nothing is split
    a = run_replay(t, "genset", cfg(ram_blocks=2000, kv_bytes_per_token=1 << 20,
                                    copy_overlap=False))
    b = run_replay(t, "genset", cfg(ram_blocks=2000, kv_bytes_per_token=1 << 20,
                                    copy_overlap=False, split_runs=False))
    a.pop("wall_s")
    b.pop("wall_s")
    assert a == b


def test_copies_out_ahead_of_eviction_leave_the_steps_that_evict():
    # 64 MiB blocks (1 MiB a token): each eviction's copy out (2.1 ms) is on the step that
    # needs the block's memory, unless the idle lane copied it ahead (the mocker's copies
    # out ahead of eviction, on by default; --offload-no-copy-ahead)
    t = trace()
    late = run_replay(t, "genset", cfg(ram_blocks=2000, kv_bytes_per_token=1 << 20,
                                       copy_ahead=False))
    eager = run_replay(t, "genset", cfg(ram_blocks=2000, kv_bytes_per_token=1 << 20))
    assert late["offload"]["copied_ahead_blocks"] == 0 and not late["offload"]["copy_ahead"]
    assert eager["offload"]["copied_ahead_blocks"] > 0
    bl, be = (r["offload"]["ttft_breakdown_ms"] for r in (late, eager))
    assert be["prompt_copy_out"] < bl["prompt_copy_out"]
    assert eager["completed"] == late["completed"] == len(t)
    assert eager["offload"]["hit_rate_by_tier"]["host"] > 0


@pytest.mark.parametrize("hold_mb", [0.0, 256.0])
def test_onboarding_takes_only_the_room_the_queue_ahead_leaves(monkeypatch, hold_mb):
    # As the live hook (genset.worker.offload_hook): a store hit is pinned only up to the
    # blocks the engine can keep beside the requests queued ahead (`Scheduler.import_room`);
    # beyond it the head of the queue would take the pinned blocks back before the request
    # runs. What is beyond is held in host memory until the request's admission, within
    # `hold_mb` (`Scheduler.hold_kv`); with none, it is not looked up at all without room.
    # A burst of 33-block prompts into one worker of 64 blocks: most arrive with the queue
    # ahead already filling the cache.
    from genset.replay.offload import OffloadSim

    seen = []
    onboard = OffloadSim.onboard

    def spy(self, core, hashes, prompt_len):
        room = core.scheduler.import_room()
        kv, ram, disk, have = onboard(self, core, hashes, prompt_len)
        seen.append((room, 0 if kv is None else len(kv.blocks), kv is None or kv.optional))
        return kv, ram, disk, have

    monkeypatch.setattr(OffloadSim, "onboard", spy)
    t = [TraceRequest(index=i, arrival_ms=i * 20.0, input_length=4 * 512 + 100,
                      output_length=4, hash_ids=[(i % 6) * 10 + k for k in range(4)] + [1000 + i])
         for i in range(60)]
    out = run_replay(t, "genset", ReplayConfig(
        workers=1, kv_blocks=64, block_size=64,
        offload=OffloadConfig(ram_blocks=2000, hold_mb=hold_mb)))
    assert out["completed"] == len(t)
    assert all(optional for *_, optional in seen)  # and the engine may cut it further
    assert any(n > 0 for _, n, _ in seen)  # the store still serves
    held = out["offload"]["onboard_held"]
    if not hold_mb:
        assert seen and all(n <= room for room, n, _ in seen)  # never more than the room
        assert out["offload"]["skipped_no_room"] > 0  # no room: no lookup
        assert held["held"] == 0
    else:
        assert any(n > room for room, n, _ in seen)  # beyond the room: held
        assert out["offload"]["skipped_no_room"] == 0
        assert held["used"] > 0 and held["used"] <= held["held"]
