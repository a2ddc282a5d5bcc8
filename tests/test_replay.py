"""`genset replay`: calibration against Dynamo's own replay, replicas, CLI, bad traces."""

from __future__ import annotations

import json
import os
import re

import pytest

from genset.replay import __main__ as replay_cli
from genset.replay import simulate
from genset.replay.simulate import ReplayConfig, run_replay
from genset.replay.trace import TraceError, load_trace
from tests.helpers.shared_data import shared_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACE = str(shared_data() / "mooncake_synthetic_trace.jsonl")
REFERENCE = os.path.join(ROOT, "bench", "replay_dynamo_reference.json")

# CI always has ../shared beside the clone: there a missing trace is a failure, not a skip.
if os.environ.get("CI") and not os.path.exists(TRACE):
    raise RuntimeError(f"the shared Mooncake trace is missing: {TRACE}")
needs_trace = pytest.mark.skipif(not os.path.exists(TRACE), reason="shared Mooncake trace not present")


def dynamo(key: str) -> dict:
    with open(REFERENCE) as f:
        return json.load(f)["results"][key]


@needs_trace
@pytest.mark.parametrize(("blocks", "cap"), [(4688, "0.3M"), (46875, "3M")])
def test_round_robin_matches_dynamo_replay(blocks, cap):
    """Same trace slice, same settings: genset's simulator must agree with Dynamo's."""
    trace = load_trace(TRACE, limit=300)
    got = run_replay(trace, "round-robin", ReplayConfig(kv_blocks=blocks))
    ref = dynamo(f"limit300/{cap}/1x/round_robin")
    assert abs(got["hit_rate"] - ref["hit_rate"]) <= 0.01, (got, ref)
    assert abs(got["ttft_mean_ms"] - ref["ttft_mean_ms"]) <= 0.10 * ref["ttft_mean_ms"], (got, ref)
    assert abs(got["itl_mean_ms"] - ref["itl_mean_ms"]) <= 0.10 * ref["itl_mean_ms"], (got, ref)


@needs_trace
def test_two_router_replicas_agree_with_one_router():
    trace = load_trace(TRACE, limit=600)
    cfg = dict(kv_blocks=46875, arrival_speedup=3.0)
    one = run_replay(trace, "genset", ReplayConfig(**cfg))
    two = run_replay(trace, "genset", ReplayConfig(router_replicas=2, **cfg))
    assert one["hit_rate"] > 0.05
    assert abs(one["hit_rate"] - two["hit_rate"]) <= 0.02, (one["hit_rate"], two["hit_rate"])


@needs_trace
def test_genset_beats_round_robin_on_a_slice():
    trace = load_trace(TRACE, limit=600)
    cfg = ReplayConfig(kv_blocks=46875, arrival_speedup=3.0)
    g = run_replay(trace, "genset", cfg)
    rr = run_replay(trace, "round-robin", cfg)
    assert g["hit_rate"] > rr["hit_rate"] and g["ttft_mean_ms"] < rr["ttft_mean_ms"]


@needs_trace
def test_decode_runs_do_not_change_any_number(monkeypatch):
    """The replay takes plain decode steps in bulk; step by step must give the same JSON."""
    trace = load_trace(TRACE, limit=250)
    cfg = ReplayConfig(kv_blocks=4688, arrival_speedup=3.0)
    fast = run_replay(trace, "genset", cfg)
    monkeypatch.setattr(simulate, "MAX_DECODE_RUN", 0)
    slow = run_replay(trace, "genset", cfg)
    fast.pop("wall_s")
    slow.pop("wall_s")
    assert fast == slow
    assert fast["completed"] == 250


def write(tmp_path, lines: list[str]) -> str:
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


GOOD = '{"timestamp": 0, "input_length": 700, "output_length": 3, "hash_ids": [1, 2]}'


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "not valid JSON"),
    ('{"timestamp": 0, "output_length": 3, "hash_ids": [1]}', "missing field 'input_length'"),
    ('{"timestamp": 0, "input_length": 2000, "output_length": 3, "hash_ids": [1]}', "needs at least 4 hash_ids"),
    ('{"timestamp": 0, "input_length": 10, "output_length": 0, "hash_ids": [1]}', "'output_length' must be >= 1"),
    ('{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [-1]}', "non-negative integers"),
    ("[1, 2]", "expected a JSON object"),
    ('{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [1180591620717411303424]}',
     "non-negative integers below 2\\^63"),
    ('{"timestamp": Infinity, "input_length": 10, "output_length": 2, "hash_ids": [1]}',
     "'timestamp' must be a finite number"),
    ('{"timestamp": 0, "input_length": 1e400, "output_length": 2, "hash_ids": [1]}',
     "'input_length' must be a finite number"),
    ('{"timestamp": 0, "input_length": 10, "output_length": NaN, "hash_ids": [1]}',
     "'output_length' must be a finite number"),
    (b'{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [1]}'
     + b"\xff", "not UTF-8 text"),
    ('{"timestamp": 10, "input_length": 10, "output_length": 2, "hash_ids": [1]}',
     "timestamp 10 is before the previous request's 20"),
])
def test_bad_trace_lines_name_the_line(tmp_path, line, message, capsys):
    good = GOOD.replace('"timestamp": 0', '"timestamp": 20')
    path = str(tmp_path / "t.jsonl")
    with open(path, "wb") as f:
        f.write(good.encode() + b"\n\n" + (line if isinstance(line, bytes) else line.encode())
                + b"\n")
    with pytest.raises(TraceError, match=message) as exc:
        load_trace(path)
    assert f"{path}:3:" in str(exc.value)
    assert replay_cli.main([path, "--workers", "2"]) == 2
    assert f"{path}:3:" in capsys.readouterr().err


def test_cli_json_and_several_policies(tmp_path, capsys):
    lines = [f'{{"timestamp": {i * 50}, "input_length": {600 + 10 * i}, "output_length": 4, '
             f'"hash_ids": [{i % 3}, {100 + i}]}}' for i in range(30)]
    path = write(tmp_path, lines)
    plot = tmp_path / "p.png"
    assert replay_cli.main([path, "--workers", "2", "--block-size", "16", "--kv-blocks", "512",
                            "--policy", "genset,round_robin", "--json", "--plot", str(plot)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"genset", "round-robin"}  # the old spelling is accepted, named one way
    for r in doc.values():
        for key in ("hit_rate", "ttft_mean_ms", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms",
                    "itl_mean_ms", "load_cov"):
            assert isinstance(r[key], float), key
        assert r["completed"] == 30
    assert doc["genset"]["hit_rate"] >= doc["round-robin"]["hit_rate"]
    assert plot.stat().st_size > 1000
    assert replay_cli.main([path, "--policy", "nope"]) == 2
    assert "--policy: unknown routing policy 'nope'" in capsys.readouterr().err


def test_cli_refuses_no_policy_and_a_plot_it_cannot_write(tmp_path, capsys):
    path = write(tmp_path, [GOOD])
    assert replay_cli.main([path, "--policy", ",,", "--json"]) == 2
    assert "--policy ',,' names no policy" in capsys.readouterr().err
    missing = tmp_path / "nowhere" / "plot.png"
    assert replay_cli.main([path, "--plot", str(missing)]) == 2
    assert f"--plot {missing}: no such directory" in capsys.readouterr().err
    (tmp_path / "plot.png").mkdir()  # a directory where the file should go
    assert replay_cli.main([path, "--plot", str(tmp_path / "plot.png")]) == 2
    assert "cannot write" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--workers", "100000"], "--workers: must be at most 1,024"),
    (["--kv-blocks", "10000000000"], "--kv-blocks: must be at most 4,194,304"),
    (["--offload-ram-blocks", "1000000000000"], "--offload-ram-blocks: must be at most"),
    (["--offload-disk-blocks", "1000000000000"], "--offload-disk-blocks: must be at most"),
    (["--router-replicas", "1000"], "--router-replicas: must be at most 64"),
    (["--planner", "slo", "--max-workers", "5000"], "--max-workers: must be at most 1,024"),
    (["--arrival-speedup", "inf"], "--arrival-speedup: must be a finite number"),
    # ratios and rates: finite ranges (1e-300 printed figures 300 digits long, 1e300 zeros)
    (["--speedup-ratio", "1e-300"], "--speedup-ratio: must be at least 0.001, got 1e-300"),
    (["--speedup-ratio", "0"], "--speedup-ratio: must be > 0"),
    (["--speedup-ratio", "-2"], "--speedup-ratio: must be > 0"),
    (["--speedup-ratio", "nan"], "--speedup-ratio: must be a finite number"),
    (["--speedup-ratio", "inf"], "--speedup-ratio: must be a finite number"),
    (["--speedup-ratio", "1e300"], "--speedup-ratio: must be at most 1,000,000"),
    (["--arrival-speedup", "1e-300"], "--arrival-speedup: must be at least 0.001"),
    (["--arrival-speedup", "2e6"], "--arrival-speedup: must be at most 1,000,000"),
    (["--offload-d2h-gbps", "1e-300"], "--offload-d2h-gbps: must be 0 or at least 1e-06"),
    (["--offload-disk-gbps", "1e9"], "--offload-disk-gbps: must be at most 1,000,000"),
    (["--prefill-workers", "1", "--kv-transfer-bandwidth", "1e-300"],
     "--kv-transfer-bandwidth: must be 0 or at least 1e-06, got 1e-300"),
    (["--prefill-workers", "1", "--kv-transfer-bandwidth", "inf"],
     "--kv-transfer-bandwidth: must be a finite number"),
    (["--prefill-workers", "1", "--kv-transfer-bandwidth", "2e6"],
     "--kv-transfer-bandwidth: must be at most 1,000,000"),
    (["--prefill-workers", "1", "--disagg-spare-budget-ms", "inf"],
     "--disagg-spare-budget-ms: must be a finite number"),
    (["--startup-s", "inf", "--planner", "slo"], "--startup-s: must be a finite number"),
    (["--prefill-workers", "2000", "--decode-workers", "2"],
     "--prefill-workers: must be at most 1,024"),
    (["--decode-workers", "5000"], "--decode-workers: must be at most 1,024"),
    # each within bounds, the sum past them: the config's check
    (["--prefill-workers", "1000", "--decode-workers", "100"],
     "--prefill-workers \\+ --decode-workers must be at most 1024"),
])
def test_cli_refuses_sizes_no_replay_can_hold(tmp_path, flags, message, capsys):
    """Each was a MemoryError (or 0.76 GB of routers) after the trace had been read."""
    path = write(tmp_path, [GOOD])
    try:
        rc = replay_cli.main([path, *flags])
    except SystemExit as exc:  # argparse exits 2 on a bad flag value
        rc = exc.code
    assert rc == 2
    assert re.search(message, capsys.readouterr().err)
