"""`genset replay --planner`: the planner's core sizing a simulated fleet (workers routable only
after their start-up, drained workers finishing what they hold), and the SLO fields every
replay reports."""

from __future__ import annotations

import json
import random

import pytest

from genset.replay import __main__ as replay_cli
from genset.replay.metrics import request_ok
from genset.replay.planner_sim import PlannerSimConfig
from genset.replay.simulate import ReplayConfig, run_replay
from genset.replay.trace import TraceRequest
from genset.routing.core import RouterCore


def ramp_trace(high_rate: float = 40.0, seed: int = 1) -> list[TraceRequest]:
    """Poisson arrivals: 1 req/s for 40 s, `high_rate` for 60 s, 1 req/s for 150 s; 3000-token
    prompts (no shared prefixes), 60 output tokens."""
    rng = random.Random(seed)
    out: list[TraceRequest] = []
    t, hid = 0.0, 0
    for rate, dur in ((1.0, 40.0), (high_rate, 60.0), (1.0, 150.0)):
        end = t + dur
        while True:
            t += rng.expovariate(rate)
            if t >= end:
                t = end
                break
            out.append(TraceRequest(len(out), t * 1000.0, 3000, 60, list(range(hid, hid + 6))))
            hid += 6
    return out


def write_trace(tmp_path, trace: list[TraceRequest]) -> str:
    p = tmp_path / "ramp.jsonl"
    p.write_text("".join(json.dumps({"timestamp": r.arrival_ms, "input_length": r.input_length,
                                     "output_length": r.output_length, "hash_ids": r.hash_ids})
                         + "\n" for r in trace))
    return str(p)


@pytest.mark.parametrize("policy", ["load", "slo"])
def test_planner_scales_up_then_down_and_every_request_completes(policy, monkeypatch):
    trace = ramp_trace()
    routed: list[tuple[float, int]] = []  # (simulated ms, worker) of every routing decision
    real_route = RouterCore.route_tokens

    def spy(self, *a, **k):
        r = real_route(self, *a, **k)
        routed.append((self.now_ms(), r.worker_id))
        return r

    monkeypatch.setattr(RouterCore, "route_tokens", spy)
    planner = PlannerSimConfig(policy=policy, min_workers=1, max_workers=6, startup_s=5.0,
                               down_cooldown_s=20.0)
    res = run_replay(trace, "genset", ReplayConfig(workers=1, planner=planner))

    assert res["completed"] == len(trace)  # drained workers finished what they held
    actions = [e["action"] for e in res["scale_events"]]
    assert "up" in actions and "down" in actions, res["scale_events"]
    assert actions.index("up") < len(actions) - 1 - actions[::-1].index("down")
    assert all(1 <= e["to"] <= 6 for e in res["scale_events"])
    lives = {w["worker"]: w for w in res["worker_lives"]}
    started = [w for w in lives.values() if w["asked_s"] > 0]
    assert started and res["workers_started"] == len(started)
    for w in started:  # routable exactly one start-up time after being asked for
        assert w["ready_s"] == pytest.approx(w["asked_s"] + 5.0, abs=1e-6)
    drained = [w for w in lives.values() if w["drain_s"] is not None]
    assert drained and res["workers_drained"] == len(drained)
    for w in drained:  # left once idle, never before its drain
        assert w["left_s"] is not None and w["left_s"] >= w["drain_s"]
    for t_ms, wid in routed:  # nothing routed to a starting, draining or gone worker
        w = lives[wid]
        assert w["ready_s"] is not None and w["ready_s"] * 1000 <= t_ms + 1e-6, (t_ms, w)
        assert w["drain_s"] is None or t_ms < w["drain_s"] * 1000 + 1e-6, (t_ms, w)
    # worker-seconds: integrated over each worker's life, within the fleet's bounds
    assert 1.0 <= res["avg_workers"] <= 6.0
    assert res["worker_seconds"] == pytest.approx(res["avg_workers"] * res["duration_s"])
    assert res["peak_workers"] <= 6 and res["min_workers"] >= 1
    tl = res["timeline"]
    assert max(row["ready"] for row in tl) > 1.5 and tl[-1]["ready"] <= tl[len(tl) // 2]["ready"]


def test_planner_replay_is_deterministic():
    trace = ramp_trace(30.0, seed=2)
    cfg = ReplayConfig(workers=2, planner=PlannerSimConfig(policy="slo", max_workers=5,
                                                           startup_s=10.0))
    a, b = run_replay(trace, "genset", cfg), run_replay(trace, "genset", cfg)
    a.pop("wall_s")
    b.pop("wall_s")
    assert a == b


def test_static_replay_reports_slo_and_worker_seconds():
    trace = ramp_trace(8.0, seed=3)
    res = run_replay(trace, "round-robin", ReplayConfig(workers=3, sla_ttft_ms=500.0,
                                                        sla_itl_ms=30.0))
    assert res["scale_events"] == [] and res["avg_workers"] == pytest.approx(3.0)
    assert res["worker_seconds"] == pytest.approx(3 * res["duration_s"])
    assert 0.0 <= res["sla_attainment"] <= min(res["ttft_sla_attainment"],
                                                res["itl_sla_attainment"])
    assert res["sla_ttft_ms"] == 500.0 and res["sla_itl_ms"] == 30.0
    loose = run_replay(trace, "round-robin", ReplayConfig(workers=3, sla_ttft_ms=1e9,
                                                          sla_itl_ms=1e9))
    assert loose["sla_attainment"] == 1.0 and loose["goodput_requests"] == len(trace)
    assert loose["goodput_out_tok_s"] == pytest.approx(
        sum(r.output_length for r in trace) / loose["duration_s"])


def test_request_ok_follows_dynamos_definition():
    assert request_ok(0, 2000, 2000, 1, 2000, 50) == (True, True)  # one token: ITL passes
    assert request_ok(0, 2001, 2001, 1, 2000, 50) == (False, True)
    assert request_ok(0, 100, 100 + 50 * 9, 10, 2000, 50) == (True, True)
    assert request_ok(0, 100, 100 + 51 * 9, 10, 2000, 50) == (True, False)
    assert request_ok(0, None, None, 10, 2000, 50) == (False, False)


def test_cli_planner_json_and_plot(tmp_path, capsys):
    path = write_trace(tmp_path, ramp_trace(30.0, seed=4))
    plot = tmp_path / "timeline.png"
    assert replay_cli.main([path, "--planner", "load", "--workers", "1", "--max-workers", "4",
                            "--startup-s", "3", "--down-cooldown-s", "15", "--json",
                            "--plot", str(plot)]) == 0
    doc = json.loads(capsys.readouterr().out)
    for key in ("sla_attainment", "avg_workers", "worker_seconds", "goodput_out_tok_s"):
        assert isinstance(doc[key], float), key
    assert doc["scale_events"] and {"t_s", "pool", "from", "to", "reason"} <= set(
        doc["scale_events"][0])
    assert doc["planner"]["policy"] == "load" and doc["planner"]["max_workers"] == 4
    assert plot.stat().st_size > 1000


@pytest.mark.parametrize(("argv", "message"), [
    (["--planner", "load", "--min-workers", "5", "--max-workers", "2"],
     "--max-workers 2 is below --min-workers 5"),
    (["--planner", "nope"], "invalid choice: 'nope'"),
    (["--startup-s", "-1"], "must be >= 0"),
    (["--sla-ttft-ms", "0"], "must be > 0"),
])
def test_cli_bad_planner_flags_are_named(tmp_path, capsys, argv, message):
    path = write_trace(tmp_path, ramp_trace(2.0, seed=5)[:20])
    try:
        code = replay_cli.main([path, *argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err


def _non_default(action) -> list[str]:
    """The command-line words that give `action` a value other than its default."""
    default = action.default if action.default is not None else 1.0
    return [action.option_strings[0], str(default + 1)]


def test_planner_flags_without_planner_are_refused_by_name(tmp_path, capsys):
    """The planner's settings were silently ignored without --planner (the fleet stayed at
    --workers): each given is named, before the trace is read; at their defaults they ask
    for nothing and the replay runs."""
    path = write_trace(tmp_path, ramp_trace(2.0, seed=5)[:5])
    parser = replay_cli.build_parser()
    actions = [a for a in parser._actions if a.option_strings
               and a.option_strings[0] in replay_cli.PLANNER_FLAGS]
    assert len(actions) == len(replay_cli.PLANNER_FLAGS) == 7
    for action in actions:
        words = _non_default(action)
        assert replay_cli.main([path, *words]) == 2, words
        err = capsys.readouterr().err
        assert f"{words[0]} needs --planner (load or slo)" in err, err
        # with --planner it is taken
        assert replay_cli.main([path, "--planner", "load", "--max-workers", "9", *words,
                                "--json"]) == 0, words
        assert json.loads(capsys.readouterr().out)["completed"] == 5
    # several at once: each named; before the trace is read
    assert replay_cli.main([str(tmp_path / "none.jsonl"), "--startup-s", "5",
                            "--planner-itl-ms", "20", "--max-workers", "4"]) == 2
    err = capsys.readouterr().err
    for flag in ("--startup-s", "--planner-itl-ms", "--max-workers"):
        assert f"{flag} needs --planner" in err, err
    assert "no such file" not in err.lower()
    # at their defaults, given explicitly: no request, the static replay runs
    assert replay_cli.main([path, "--startup-s", "30", "--min-workers", "1",
                            "--max-workers", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["completed"] == 5


def test_a_long_or_stretched_trace_is_bounded_or_refused_by_name(tmp_path, capsys):
    """Two requests a year apart: the timeline's buckets widen (it asked for 3 million rows,
    a MemoryError; 1e300 ms asked for more than an index holds) and a planner that would
    decide every second of it (or a tiny --planner-interval-s) is refused, not left to run
    for ever."""
    from genset.replay.planner_sim import MAX_TIMELINE_BUCKETS

    year_ms = 365 * 86400 * 1000.0
    path = write_trace(tmp_path, [TraceRequest(0, 0.0, 600, 4, [1, 2]),
                                  TraceRequest(1, year_ms, 600, 4, [1, 2])])
    assert replay_cli.main([path, "--workers", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["completed"] == 2
    assert 1 < len(doc["timeline"]) <= MAX_TIMELINE_BUCKETS
    assert sum(row["arrivals_per_s"] for row in doc["timeline"]) > 0
    (tmp_path / "short").mkdir()
    short_trace = ramp_trace(2.0, seed=5)[:20]
    short = write_trace(tmp_path / "short", short_trace)
    # a tiny arrival speed-up (the CLI refuses one below 1e-3 now: its figures were 300
    # digits long), through the simulation itself
    r = run_replay(short_trace, "genset", ReplayConfig(workers=2, arrival_speedup=1e-300))
    assert len(r["timeline"]) <= MAX_TIMELINE_BUCKETS
    with pytest.raises(ValueError, match="planner decisions at --planner-interval-s"):
        run_replay(short_trace, "genset", ReplayConfig(
            workers=2, arrival_speedup=1e-300, planner=PlannerSimConfig(policy="load")))
    for trace, argv in ((path, []), (short, ["--planner-interval-s", "1e-9"])):
        assert replay_cli.main([trace, "--planner", "load", *argv]) == 2
        err = capsys.readouterr().err
        assert "planner decisions at --planner-interval-s" in err, err


def test_planner_config_checks():
    with pytest.raises(ValueError, match="unknown planner policy"):
        PlannerSimConfig(policy="x")
    with pytest.raises(ValueError, match="interval-s"):
        PlannerSimConfig(interval_s=0)
