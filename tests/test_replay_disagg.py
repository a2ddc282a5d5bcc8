"""`genset replay --prefill-workers P --decode-workers D --disagg ...` (genset.replay.disagg_sim):
aggregated through it is exactly the standard replay; remote prefills happen and complete;
with no prefill workers every request runs aggregated; bad settings are refused clearly."""

from __future__ import annotations

import json

import pytest

from genset.replay import __main__ as replay_cli
from genset.replay.disagg_sim import DisaggReplayConfig, run_disagg_replay
from genset.replay.simulate import ReplayConfig, run_replay
from genset.replay.trace import load_trace
from tests.test_replay import TRACE, needs_trace


@needs_trace
def test_aggregated_through_the_disagg_replay_is_the_standard_replay():
    trace = load_trace(TRACE, limit=300)
    standard = run_replay(trace, "genset", ReplayConfig(workers=8))
    agg = run_disagg_replay(trace, "genset", DisaggReplayConfig(prefill_workers=0,
                                                                decode_workers=8))
    for key in ("completed", "hit_rate", "ttft_mean_ms", "ttft_p90_ms", "itl_mean_ms"):
        assert agg[key] == standard[key], key
    assert agg["remote_prefills"] == 0
    assert set(agg["decisions"]) <= {"local/no_prefill_workers", "local/single_token"}


@needs_trace
@pytest.mark.parametrize("policy", ["always", "auto", "never"])
def test_disaggregated_replay_completes_every_request(policy):
    trace = load_trace(TRACE, limit=300)
    r = run_disagg_replay(trace, "genset", DisaggReplayConfig(
        prefill_workers=2, decode_workers=2, disagg=policy, kv_transfer_bandwidth_gb_s=5.0))
    assert r["completed"] == r["requests"] == 300
    assert 0.0 <= r["sla_attainment"] <= 1.0
    if policy == "never":
        assert r["remote_prefills"] == 0 and sum(r["prefills_per_prefill_worker"]) == 0
    elif policy == "always":
        # every request with blocks to ship and a prefill worker free went remote
        assert r["remote_prefills"] == sum(r["prefills_per_prefill_worker"]) > 200
        assert r["transfer_gb"] > 0 and r["transfer_ms_mean"] > 0
    assert r["itl_mean_ms"] > 0


@needs_trace
def test_cli_json_has_goodput_next_to_hit_rate(capsys):
    assert replay_cli.main([TRACE, "--limit", "100", "--prefill-workers", "1",
                            "--decode-workers", "3", "--disagg", "always", "--sla-ttft-ms",
                            "500", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {"sla_attainment", "hit_rate", "ttft_mean_ms", "remote_share"} <= set(doc)
    assert doc["sla_ttft_ms"] == 500 and doc["mode"] == "always"


def test_bad_disagg_settings_are_refused(capsys, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 600, "output_length": 3, '
                    '"hash_ids": [1, 2]}\n')
    # refused by argparse, naming the flag, as --workers is (nan passed the config's check
    # once, then an IndexError mid-replay)
    for argv, message in (
            (["--decode-workers", "0", "--prefill-workers", "1"],
             "argument --decode-workers: must be > 0, got 0"),
            (["--prefill-workers", "-1"], "argument --prefill-workers: must be >= 0, got -1"),
            (["--prefill-workers", "1.5"], "argument --prefill-workers: expected an integer, got '1.5'"),
            (["--decode-workers", "2000"], "argument --decode-workers: must be at most 1,024"),
            (["--prefill-workers", "1", "--kv-transfer-bandwidth", "-1"],
             "argument --kv-transfer-bandwidth: must be >= 0, got -1"),
            (["--prefill-workers", "1", "--kv-transfer-bandwidth", "nan"],
             "argument --kv-transfer-bandwidth: must be a finite number, got nan"),
            (["--prefill-workers", "1", "--disagg-spare-budget-ms", "-5"],
             "argument --disagg-spare-budget-ms: must be >= 0, got -5")):
        with pytest.raises(SystemExit) as exc:
            replay_cli.main([str(path), *argv])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err, argv
    # the config still checks them for other callers
    with pytest.raises(ValueError, match="--decode-workers must be >= 1"):
        DisaggReplayConfig(decode_workers=0)
    with pytest.raises(ValueError, match="--kv-transfer-bandwidth must be >= 0 GB/s, got nan"):
        DisaggReplayConfig(kv_transfer_bandwidth_gb_s=float("nan"))
    # at their bounds they are taken
    assert replay_cli.main([str(path), "--prefill-workers", "0", "--decode-workers", "1",
                            "--kv-transfer-bandwidth", "0", "--disagg-spare-budget-ms", "0",
                            "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["completed"] == 1
    # --planner and --plot were silently ignored by a disaggregated replay
    for extra in (["--planner", "load"], ["--plot", str(tmp_path / "p.png")]):
        assert replay_cli.main([str(path), "--prefill-workers", "1", *extra]) == 2
        assert f"{extra[0]} is not available with a disaggregated replay" in \
            capsys.readouterr().err


def _non_default(action) -> list[str]:
    """The command-line words that give `action` a value other than its default."""
    flag = action.option_strings[0]
    if action.nargs == 0:  # store_true
        return [flag]
    if action.choices:
        return [flag, next(c for c in action.choices if c != action.default)]
    return [flag, str(action.default + 1)]


def test_flags_the_disaggregated_replay_does_not_model_are_refused(capsys, tmp_path):
    """--router-replicas and every --offload-* flag were silently ignored by a disaggregated
    replay (it models one router and no offload store): each is refused, named, before the
    trace is read; at their defaults they are no request and the replay runs."""
    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 600, "output_length": 3, '
                    '"hash_ids": [1, 2]}\n')
    parser = replay_cli.build_parser()
    flags = [a for a in parser._actions if a.option_strings and (
        a.option_strings[0].startswith("--offload-") or a.option_strings[0] == "--router-replicas")]
    assert len(flags) >= 11  # the offload group and --router-replicas
    for disagg in (["--prefill-workers", "1"], ["--decode-workers", "2"], ["--peer-prefill"],
                   ["--disagg", "never"]):
        for action in flags:
            words = _non_default(action)
            assert replay_cli.main([str(path), *disagg, *words]) == 2, words
            err = capsys.readouterr().err
            assert f"{words[0]} is not available with a disaggregated replay (--prefill-workers" \
                in err, err
    # several at once: each named
    assert replay_cli.main([str(path), "--prefill-workers", "1", "--router-replicas", "2",
                            "--offload-ram-blocks", "64"]) == 2
    err = capsys.readouterr().err
    assert "--router-replicas is not available" in err and "it models one router" in err
    assert "--offload-ram-blocks is not available" in err and "no KV offload store" in err
    # read before the trace: a missing trace is not what is reported
    assert replay_cli.main([str(tmp_path / "none.jsonl"), "--prefill-workers", "1",
                            "--router-replicas", "2"]) == 2
    assert "--router-replicas is not available" in capsys.readouterr().err
    # defaults given explicitly ask for nothing the replay lacks
    assert replay_cli.main([str(path), "--prefill-workers", "1", "--router-replicas", "1",
                            "--offload-admit", "all", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["completed"] == 1
    # the standard replay still takes them
    assert replay_cli.main([str(path), "--workers", "2", "--router-replicas", "2",
                            "--offload-ram-blocks", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["completed"] == 1


@needs_trace
def test_peer_prefill_lends_prefills_between_decode_workers():
    trace = load_trace(TRACE, limit=300)
    r = run_disagg_replay(trace, "genset", DisaggReplayConfig(
        prefill_workers=0, decode_workers=4, disagg="always", peer_prefill=True))
    assert r["completed"] == r["requests"] == 300
    assert r["mode"] == "always" and r["peer_prefill"] is True
    # every remote prefill ran on another decode worker
    assert r["remote_prefills"] == sum(r["prefills_lent_per_decode_worker"]) > 100
    assert r["prefills_per_prefill_worker"] == []
    auto = run_disagg_replay(trace, "genset", DisaggReplayConfig(
        prefill_workers=0, decode_workers=4, disagg="auto", peer_prefill=True))
    assert auto["completed"] == 300
    assert set(auto["decisions"]) <= {f"local/{x}" for x in (
        "local_cheaper", "short_prompt_cached", "single_token", "itl_target",
        "prefill_saturated")} | {"remote/remote_cheaper"}


@needs_trace
def test_cli_peer_prefill(capsys):
    assert replay_cli.main([TRACE, "--limit", "100", "--decode-workers", "3", "--peer-prefill",
                            "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["peer_prefill"] is True and doc["mode"] == "auto" and doc["completed"] == 100


@needs_trace
def test_spare_budget_sends_ties_to_the_prefill_pool_through_the_cli(capsys):
    # the live decode worker's rule (CostModel.spare_budget_ms, a SpareGate per decode
    # worker): off by default, on with the flag; ties then go remote once a remote first
    # token has come back within the budget
    base = [TRACE, "--limit", "300", "--prefill-workers", "2", "--decode-workers", "2",
            "--disagg", "auto", "--json"]
    assert replay_cli.main(base) == 0
    off = json.loads(capsys.readouterr().out)
    assert not any(k.endswith("/remote_spare") for k in off["decisions"])
    assert replay_cli.main([*base, "--disagg-spare-budget-ms", "1000"]) == 0
    on = json.loads(capsys.readouterr().out)
    assert on["decisions"].get("remote/remote_spare", 0) > 0
    assert on["completed"] == on["requests"] == 300
    with pytest.raises(ValueError, match="spare-budget"):
        DisaggReplayConfig(spare_budget_ms=-1.0)
