"""`genset up --planner`, the parts that need no processes: a drained worker is no longer
supervised, the planner's starts and drains run on the launcher's thread, bad flags are named."""

from __future__ import annotations

import concurrent.futures
import threading

import pytest

from genset.launch import Launcher, build_parser, main
from genset.launch_planner import ChildHandle, StackWorkers, planner_options, startup_prior
from tests.test_supervise import FakeChild, make


def test_a_removed_unit_is_never_restarted():
    w1, w2 = FakeChild("worker-1"), FakeChild("worker-2")
    sup, _ = make(w1, w2)
    assert sup.remove("worker-2") and not sup.remove("worker-2")
    w2.crash(0)  # it exits after its drain: not a crash
    for t in (1.0, 2.0, 40.0):
        sup.step(t)
    assert w2.starts == 0 and w1.starts == 0
    w1.crash(1)
    assert sup.step(41.0) == []  # the one left is still supervised


class Proc:
    def __init__(self, pid: int) -> None:
        self.pid = pid


class Child:
    def __init__(self, name: str, pid: int) -> None:
        self.name = name
        self.proc = Proc(pid)


def test_stack_workers_run_on_the_launchers_thread():
    calls: list = []
    threads: list[str] = []
    pending: list = []

    def run(fn):
        fut = concurrent.futures.Future()
        pending.append((fn, fut))
        return fut

    def add(role):
        threads.append(threading.current_thread().name)
        return Child(f"worker-{len(calls) + 2}", 1000 + len(calls))

    stack = StackWorkers(run, add, lambda child: calls.append(("retire", child.name)))
    got: list = []
    t = threading.Thread(target=lambda: got.append(stack.start_worker("decode")), name="planner")
    t.start()
    while not pending:  # the planner's thread waits for the launcher's
        threading.Event().wait(0.01)
    fn, fut = pending.pop()
    fut.set_result(fn())  # what the launcher's loop does (`run_calls`)
    t.join(10)
    handle = got[0]
    assert isinstance(handle, ChildHandle) and handle.pid == 1000 and handle.alive
    assert threads == [threading.current_thread().name]  # forked here, not on "planner"
    stack.stop_worker(handle)
    assert not handle.alive  # the connector forgets it at once
    fn, fut = pending.pop()
    fn()
    assert calls == [("retire", "worker-2")]
    handle.child.proc.pid = 1234  # a supervised restart: the handle follows the child
    assert handle.pid == 1234


@pytest.mark.parametrize(("argv", "message"), [
    (["--planner", "--workers", "5", "--max-workers", "3"], "--workers 5 (the initial count)"),
    (["--planner", "slo", "--min-workers", "3", "--max-workers", "2"],
     "--max-workers 2 is below --min-workers 3"),
    (["--planner", "--min-workers", "0"], "--min-workers must be at least 1"),
    (["--planner", "--prefill-workers", "4", "--max-workers", "3"],
     "--prefill-workers 4 (the initial count) must be at most --max-workers 3"),
])
def test_bad_planner_flags_are_refused_before_anything_starts(tmp_path, capsys, argv, message):
    assert main([*argv, "--state-dir", str(tmp_path / "s"), "--port", "0"]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # nothing started


def test_planner_flags_go_through_the_planners_own_checks():
    config, options = planner_options(["--policy", "slo", "--max-workers", "3",
                                       "--down-cooldown-s", "7", "--namespace", "x"])
    assert options.policy == "slo" and options.max_workers == 3
    assert options.down_cooldown_s == 7 and config.namespace == "x"
    with pytest.raises(SystemExit):
        planner_options(["--kv-high", "7"])
    launcher = Launcher(build_parser().parse_args(["--planner", "--workers", "2"]))
    assert launcher.planner_bounds() == (1, 4)


def test_the_planners_start_up_prior_is_the_one_measured_unless_the_user_set_one():
    """genset up hands the planner the start-up it timed for its own workers (rounded to
    0.1 s): a slow model's minute, a mocker's seconds; never over --startup-s given as a
    planner flag (either spelling) or in the environment, and nothing when nothing was timed."""
    assert startup_prior([], {}, 71.26) == 71.3
    assert startup_prior(["--down-cooldown-s=20"], {}, 2.04) == 2.0
    assert startup_prior([], {}, 0.01) == 0.1  # the planner's own lower bound
    assert startup_prior(["--startup-s=90"], {}, 71.2) is None
    assert startup_prior(["--startup-s", "90"], {}, 71.2) is None
    assert startup_prior([], {"GENSET_STARTUP_S": "90"}, 71.2) is None
    assert startup_prior([], {}, 0.0) is None


def _planner_of(argv: list[str]):
    launcher = Launcher(build_parser().parse_args(argv))
    launcher.nats_url, launcher.etcd_endpoint = "nats://127.0.0.1:1", "127.0.0.1:2"
    return planner_options(launcher.planner_argv())[1]


def test_with_prefill_workers_the_planner_sizes_both_pools():
    """`genset up --planner --prefill-workers N` hands the planner both pools, so it sets the
    prefill:decode ratio: the prefill pool between 1 and --max-workers; a --planner-arg
    given by the user wins; without prefill workers the planner keeps to the decode pool."""
    options = _planner_of(["--planner", "slo", "--workers", "2", "--prefill-workers", "1",
                           "--max-workers", "3"])
    assert options.pool_list() == ["decode", "prefill"]
    bounds = options.planner_config().pools
    assert (bounds["decode"].min, bounds["decode"].max) == (1, 3)
    assert (bounds["prefill"].min, bounds["prefill"].max) == (1, 3)
    options = _planner_of(["--planner", "--prefill-workers", "1", "--max-workers", "3",
                           "--planner-arg=--max-prefill=2"])
    assert options.planner_config().pools["prefill"].max == 2
    assert _planner_of(["--planner", "--workers", "2"]).pool_list() == ["decode"]


def test_a_planner_with_two_pools_gets_worker_credentials_for_both(tmp_path):
    """Each pool may grow to --max-workers, so the stack's worker slots cover both."""
    from genset.runtime import auth

    args = build_parser().parse_args(["--planner", "--prefill-workers", "1",
                                      "--max-workers", "10"])
    sec = auth.StackSecurity(args, tmp_path, model="tiny")
    assert len(sec.creds.worker_ids) == 20
    args = build_parser().parse_args(["--planner", "--max-workers", "10"])
    assert len(auth.StackSecurity(args, tmp_path / "b", model="tiny").creds.worker_ids) == 16
