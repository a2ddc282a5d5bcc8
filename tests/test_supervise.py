"""The restart policy and the supervisor behind `genset up` (pure: clock passed in, fake
children), and the launcher's stop order."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from genset.supervise import (
    GAVE_UP,
    RUNNING,
    WAITING,
    RestartPolicy,
    RestartTracker,
    Supervisor,
    describe_exit,
)


def test_backoff_doubles_to_the_cap_and_a_crash_loop_is_given_up():
    policy = RestartPolicy(first_delay_s=0.5, max_delay_s=3.0, give_up_after=5, stable_s=60)
    t = RestartTracker(policy, started_at=0.0)
    now, delays = 0.0, []
    for _ in range(5):
        now += 1.0  # each run lasts 1 s: quick
        delays.append(t.exited(now))
        now += delays[-1]
        t.started(now)
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert t.exited(now + 1.0) is None  # the 6th quick exit: 5 restarts did not help
    assert t.restarts == 5


def test_a_long_run_forgives_earlier_crashes():
    policy = RestartPolicy(first_delay_s=0.5, max_delay_s=30, give_up_after=2, stable_s=60)
    t = RestartTracker(policy, started_at=0.0)
    assert t.exited(1.0) == 0.5
    t.started(1.5)
    assert t.exited(2.0) == 1.0
    t.started(3.0)
    assert t.exited(3.0 + 60.0) == 0.5  # ran a full minute: back to the first delay
    t.started(64.0)
    assert t.exited(64.5) == 1.0
    t.started(66.0)
    assert t.exited(66.5) is None


def test_no_restart_at_all_when_give_up_after_is_zero_and_bad_policies_are_refused():
    assert RestartTracker(RestartPolicy(give_up_after=0), 0.0).exited(1.0) is None
    with pytest.raises(ValueError):
        RestartPolicy(first_delay_s=0)
    with pytest.raises(ValueError):
        RestartPolicy(first_delay_s=5, max_delay_s=1)


class FakeChild:
    def __init__(self, name: str, kind: str | None = None, *, fail_restart: bool = False) -> None:
        self.name = name
        self.kind = kind or name.rstrip("0123456789-")
        self.alive = True
        self.exit_code: int | None = None
        self.log_path = Path(f"/logs/{name}.log")
        self.starts = 0
        self.fail_restart = fail_restart

    def log_tail(self, lines: int = 25) -> str:
        return f"last words of {self.name}"

    def crash(self, code: int = -9) -> None:
        self.alive, self.exit_code = False, code

    def restart(self) -> None:
        if self.fail_restart:
            raise OSError("port in use")
        self.starts += 1
        self.alive, self.exit_code = True, None


def make(*children, **policy):
    said: list[str] = []
    sup = Supervisor(said.append, RestartPolicy(**policy),
                     essential_kinds=frozenset({"frontend", "worker"}))
    for c in children:
        sup.add(c, 0.0)
    return sup, said


def test_supervisor_restarts_after_the_backoff_and_says_so():
    router, worker = FakeChild("router"), FakeChild("worker-1")
    sup, said = make(router, worker)
    assert sup.step(1.0) == [] and not said
    router.crash(-9)
    sup.step(2.0)
    assert sup.state("router") == WAITING and router.starts == 0
    assert "warning: router exited unexpectedly (killed by SIGKILL); restarting it in 0.5s" in said[0]
    assert "last words of router" in said[0]
    sup.step(2.4)
    assert router.starts == 0  # not before its delay
    sup.step(2.5)
    assert router.starts == 1 and sup.state("router") == RUNNING and sup.restarts("router") == 1
    assert said[-1] == "router: restarted (restart 1)"
    assert worker.starts == 0 and sup.state("worker-1") == RUNNING


def test_a_crash_looping_child_is_given_up_loudly_and_the_rest_keeps_running():
    router, worker = FakeChild("router"), FakeChild("worker-1")
    sup, said = make(router, worker, first_delay_s=0.5, max_delay_s=1.0, give_up_after=3)
    now = 0.0
    for _ in range(3):
        router.crash(1)
        now += 0.1
        assert sup.step(now) == []
        now += 1.0
        sup.step(now)
    assert router.starts == 3
    router.crash(1)
    assert sup.step(now + 0.1) == []  # a router is not essential: nothing to stop
    assert sup.state("router") == GAVE_UP
    assert "error: router exited unexpectedly with code 1; it is crash-looping" in said[-1]
    assert "giving up on it" in said[-1] and "last words of router" in said[-1]
    sup.step(now + 100)
    assert router.starts == 3  # given up means given up
    assert sup.state("worker-1") == RUNNING


def test_losing_every_unit_of_an_essential_kind_is_reported_to_the_caller():
    w1, w2 = FakeChild("worker-1"), FakeChild("worker-2")
    sup, _ = make(w1, w2, give_up_after=0)
    w1.crash()
    assert sup.step(1.0) == []  # one worker left: still serving
    w2.crash()
    assert sup.step(2.0) == ["worker"]


def test_a_restart_that_fails_counts_as_a_quick_exit():
    etcd = FakeChild("etcd", fail_restart=True)
    sup, said = make(etcd, first_delay_s=0.5, max_delay_s=1.0, give_up_after=2)
    etcd.crash(-15)
    sup.step(1.0)
    sup.step(1.5)  # restart fails: waits again, longer
    assert sup.state("etcd") == WAITING and "could not be restarted (OSError: port in use)" in said[-1]
    sup.step(2.5)
    assert sup.state("etcd") == GAVE_UP


def test_exit_descriptions():
    assert describe_exit(-9) == "(killed by SIGKILL)"
    assert describe_exit(3) == "with code 3"
    assert describe_exit(None) == "(exit code unknown)"


def test_the_launcher_stops_kinds_in_reverse_start_order(tmp_path):
    from genset.launch import Child, Launcher, build_parser

    args: argparse.Namespace = build_parser().parse_args(["--state-dir", str(tmp_path)])
    launcher = Launcher(args)
    for name in ("router", "worker-1", "worker-2", "frontend"):
        launcher.children.append(Child(name, ["true"], tmp_path / f"{name}.log"))
    groups = [[c.name for c in g] for g in launcher.stop_groups()]
    assert groups == [["frontend"], ["worker-1", "worker-2"], ["router"]]
    launcher.stop()  # nothing was started: nothing to signal, and no restart afterwards
    assert launcher.stopping
