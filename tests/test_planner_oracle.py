"""bench/planner_oracle.py: the clairvoyant schedule's stand-in core (pure) and one real replay
that follows a schedule (genset replay's simulation, no mocks)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import planner_oracle as po

from genset.replay.trace import TraceRequest


def _core(sizes, *, window_s=30.0, startup_s=5.0, now=None):
    now = now if now is not None else [0.0]
    core = po.ScheduleCore(None, clock=lambda: now[0], sizes=sizes, window_s=window_s,
                           startup_s=startup_s)
    return core, now


def test_the_schedule_asks_for_a_worker_one_start_up_before_its_window():
    core, now = _core([1, 3, 1])
    core.worker_up(0, "decode")
    now[0] = 20_000.0  # 20 s: the window starting at 30 s is still more than 5 s away
    assert not core.decide().changed
    now[0] = 25_000.0  # a worker asked for now is ready at 30 s
    d = core.decide()
    assert d.start == {"decode": 2} and d.drain == []
    now[0] = 26_000.0  # asked for, starting: not asked again
    assert not core.decide().changed
    core.worker_up(1, "decode")
    core.worker_up(2, "decode")
    assert core.starting == 0 and core.ready == {0, 1, 2}


def test_the_schedule_drains_the_least_busy_workers_when_its_window_needs_fewer():
    core, now = _core([3, 1], startup_s=0.0)
    for w in (0, 1, 2):
        core.worker_up(w, "decode")
    core.observe_load(0, running=4, waiting=1)
    core.observe_load(1, running=0, waiting=0)
    core.observe_load(2, running=2, waiting=0)
    now[0] = 29_000.0
    assert not core.decide().changed  # the 3-worker window is not over
    now[0] = 30_000.0
    d = core.decide()
    assert d.drain == [1, 2] and d.start == {}
    assert d.pools["decode"].target == 1
    core.worker_down(1)
    assert core.draining == {2}


def test_the_last_window_holds_to_the_end():
    core, _ = _core([2, 4], window_s=10.0)
    assert core.size_at(0.0) == 2 and core.size_at(15_000.0) == 4
    assert core.size_at(1e9) == 4 and core.size_at(-5.0) == 2


def _trace(n: int, span_s: float) -> list[TraceRequest]:
    return [TraceRequest(index=i, arrival_ms=i * span_s * 1000.0 / n, input_length=600,
                         output_length=20, hash_ids=[i * 2, i * 2 + 1]) for i in range(n)]


def test_a_replay_follows_the_schedule_and_counts_its_worker_seconds():
    args = SimpleNamespace(window_s=30.0, startup_s=5.0, interval_s=1.0, kv_blocks=4688,
                           router="genset", seed=0)
    r = po.run_schedule(_trace(90, 89.0), [1, 3, 1], args)
    assert r["requests"] == r["completed"] == 90
    lives = r["worker_lives"]
    assert len(lives) == 3  # one from the start, two asked for by the schedule
    asked = sorted(w["asked_s"] for w in lives)
    assert asked == [0.0, 25.0, 25.0]  # 5 s ahead of the window at 30 s
    ready = sorted(w["ready_s"] for w in lives)
    assert ready == [0.0, 30.0, 30.0]
    drained = [w for w in lives if w["drain_s"] is not None]
    assert len(drained) == 2 and all(w["drain_s"] == 60.0 for w in drained)
    # worker-seconds: each worker from its ask until it left (the one kept: the run's end);
    # 1 worker for 25 s, 3 from then to 60 s (plus what the drained held), 1 to the end
    end = r["duration_s"]
    per_life = [(w["left_s"] if w["left_s"] is not None else end) - w["asked_s"] for w in lives]
    assert abs(r["worker_seconds"] - sum(per_life)) < 0.01
    assert end + 70.0 <= r["worker_seconds"] < end + 72.0


def test_steps_go_cheapest_first_and_a_deeper_step_only_after_its_shallower_one():
    # peak 3; window 0 is cheap to take to 2 and dear to 1, window 1 dear at 2, window 2
    # free at both sizes (a quiet tail)
    loss = {(0, 2): 0.001, (0, 1): 0.050, (1, 2): 0.020, (1, 1): 0.030, (2, 2): 0.0,
            (2, 1): 0.0}
    saved = {(k, m): 30.0 * (3 - m) for k in range(3) for m in (1, 2)}  # a worker-window each
    steps = po.plan_steps(loss, saved, 3, 3)
    assert steps[:3] == [(2, 2), (2, 1), (0, 2)]
    # window 1 to 2 costs 0.020; window 1 to 1 then costs 0.010 more (its own increment),
    # cheaper than window 0 to 1's 0.049 more, but only once window 1 is at 2
    assert steps[3:] == [(1, 2), (1, 1), (0, 1)]
    assert len(steps) == len(loss)


def test_a_step_that_saves_no_worker_seconds_is_left_out_with_those_below_it():
    # window 1's dip is shorter than a start-up: the schedule keeps its workers, saves nothing
    loss = {(0, 2): 0.01, (0, 1): 0.03, (1, 2): 0.0, (1, 1): 0.0}
    saved = {(0, 2): 30.0, (0, 1): 60.0, (1, 2): 0.0, (1, 1): 30.0}
    assert po.plan_steps(loss, saved, 3, 2) == [(0, 2), (0, 1)]


def test_schedule_from_refuses_what_is_not_an_earlier_run(tmp_path):
    import json

    import pytest

    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    with pytest.raises(SystemExit, match="not an earlier run's --json"):
        po.read_schedule(str(bad), 30.0)
    zero = tmp_path / "zero.json"
    zero.write_text(json.dumps({"schedule": [2, 0, 3], "window_s": 30}))
    with pytest.raises(SystemExit, match=">= 1 worker"):
        po.read_schedule(str(zero), 30.0)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schedule": [2, 3], "window_s": 10}))
    with pytest.raises(SystemExit, match="windows are 10 s"):
        po.read_schedule(str(other), 30.0)
    assert po.read_schedule(str(other), 10.0) == [2, 3]


def test_a_worker_needed_again_within_a_start_up_is_kept():
    # a dip to 1 at 30-60 s between 3s: with a 60 s start-up a drained worker could not be
    # back for 60 s, so none is drained; with no start-up the dip is followed
    sizes = [3, 1, 3, 3]
    slow, now = _core(sizes, startup_s=60.0)
    for w in (0, 1, 2):
        slow.worker_up(w, "decode")
    now[0] = 30_000.0
    assert not slow.decide().changed
    assert slow.most_within(30_000.0, 60_000.0) == 3
    fast, now = _core(sizes, startup_s=0.0)
    for w in (0, 1, 2):
        fast.worker_up(w, "decode")
    now[0] = 30_000.0
    assert len(fast.decide().drain) == 2


def test_refine_needs_a_schedule_to_refine():
    import pytest

    with pytest.raises(SystemExit, match="--schedule-from"):
        po.main(["--refine"])
