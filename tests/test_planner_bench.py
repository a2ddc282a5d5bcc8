"""The planner benchmark's seed summary (pure: rows in, min / median / max out)."""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ scripts import their siblings by name
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_planner_replay as bpr


def _row(base: str, seed: int, att: float, share: float) -> dict:
    return {"config": f"{base}, seed {seed}", "base_config": base, "seed": seed,
            "sla_attainment": att, "ws_share_of_peak": share}


def test_spread_groups_rows_by_config_and_orders_each_figure():
    rows = [{"config": "static at peak (6)", "sla_attainment": 0.99, "ws_share_of_peak": 1.0},
            _row("slo, start-up 120s", 0, 0.942, 0.744),
            _row("slo, start-up 120s", 1, 0.966, 0.825),
            _row("slo, start-up 120s", 2, 0.964, 0.821),
            _row("slo, start-up 30s", 0, 0.928, 0.699),
            _row("slo, start-up 30s", 1, 0.927, 0.710)]
    out = {s["config"]: s for s in bpr.spread(rows)}
    assert set(out) == {"slo, start-up 120s", "slo, start-up 30s"}  # static rows: no seed
    s = out["slo, start-up 120s"]
    assert s["seeds"] == [0, 1, 2]
    assert s["attainment"] == [0.942, 0.964, 0.966]
    assert s["ws_share_of_peak"] == [0.744, 0.821, 0.825]
    # two seeds: the median is their mean
    assert out["slo, start-up 30s"]["attainment"][1] == (0.928 + 0.927) / 2


def test_spread_needs_two_seeds():
    assert bpr.spread([_row("slo, start-up 30s", 0, 0.9, 0.7)]) == []
    assert bpr.spread([]) == []


def test_seeds_flag_rejects_junk():
    import pytest

    with pytest.raises(SystemExit, match="--seeds"):
        bpr.main(["--seeds", "a,b", "--workloads", "mooncake"])
