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
