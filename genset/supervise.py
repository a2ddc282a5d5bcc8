"""Keeping child processes running: what `genset up` does with its stack once it is up.

A child that exits while nobody asked it to is started again after a delay that doubles from
`RestartPolicy.first_delay_s` up to `max_delay_s`; a child that keeps exiting soon after each
start (`give_up_after` restarts in a row, each running less than `stable_s`) is crash-looping:
it is reported with the tail of its log and left stopped, and the rest keeps running. A run
longer than `stable_s` forgives the past: the next exit is restarted at once (first delay).

`RestartPolicy` / `RestartTracker` are pure (times are passed in); `Supervisor` drives any
objects with the small `Supervised` interface (a `genset up` child, a NATS or etcd server it
started) from a loop that calls `step(now)`; it never sleeps and never restarts anything
outside `step`, so a caller that stops calling it (shutting down) gets no restart behind its
back.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class RestartPolicy:
    first_delay_s: float = 0.5
    max_delay_s: float = 30.0
    give_up_after: int = 5  # restarts in a row that each ran less than stable_s
    stable_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.first_delay_s <= self.max_delay_s:
            raise ValueError("need 0 < first_delay_s <= max_delay_s")
        if self.give_up_after < 0 or self.stable_s <= 0:
            raise ValueError("need give_up_after >= 0 and stable_s > 0")


class RestartTracker:
    """One child's restart history under a `RestartPolicy`."""

    def __init__(self, policy: RestartPolicy, started_at: float) -> None:
        self.policy = policy
        self.started_at = started_at
        self.quick_exits = 0  # exits in a row, each less than stable_s after its start
        self.restarts = 0  # in all

    def exited(self, now: float) -> float | None:
        """The child exited at `now`: seconds to wait before starting it again, or None when
        it is crash-looping and should be given up on."""
        p = self.policy
        self.quick_exits = self.quick_exits + 1 if now - self.started_at < p.stable_s else 1
        if self.quick_exits > p.give_up_after:
            return None
        return min(p.first_delay_s * 2 ** (self.quick_exits - 1), p.max_delay_s)

    def started(self, now: float) -> None:
        self.started_at = now
        self.restarts += 1


class Supervised(Protocol):
    name: str
    kind: str  # children of one kind are one group (e.g. every worker)

    @property
    def alive(self) -> bool: ...

    @property
    def exit_code(self) -> int | None: ...

    @property
    def log_path(self) -> Path: ...

    def log_tail(self, lines: int = 25) -> str: ...

    def restart(self) -> None:
        """Start it again (what was left of the old process is gone); raise if it cannot."""


RUNNING, WAITING, GAVE_UP = "running", "waiting", "gave_up"


@dataclass
class _Entry:
    unit: Supervised
    tracker: RestartTracker
    state: str = RUNNING
    restart_at: float = 0.0


@dataclass
class Supervisor:
    """Restarts the units it was given when they exit (see the module docstring).

    `say(text)` gets one message per event: an exit (code, what happens next, log tail), a
    restart, a give-up (loudly, with the log tail). `essential_kinds`: a kind whose every unit
    was given up on makes `step` return it, so the caller can stop what can no longer serve.
    """

    say: Callable[[str], None]
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    essential_kinds: frozenset[str] = frozenset()
    _entries: list[_Entry] = field(default_factory=list)

    def add(self, unit: Supervised, now: float) -> None:
        self._entries.append(_Entry(unit, RestartTracker(self.policy, now)))

    def remove(self, name: str) -> bool:
        """Stop supervising `name` (a worker the planner drains must not be restarted when it
        exits); False when it was not supervised."""
        before = len(self._entries)
        self._entries = [e for e in self._entries if e.unit.name != name]
        return len(self._entries) < before

    def state(self, name: str) -> str:
        return next(e.state for e in self._entries if e.unit.name == name)

    def restarts(self, name: str) -> int:
        return next(e.tracker.restarts for e in self._entries if e.unit.name == name)

    def step(self, now: float) -> list[str]:
        """Look at every unit once: note exits, start what is due. Returns the essential kinds
        with no unit left (all given up)."""
        for e in self._entries:
            if e.state == RUNNING and not e.unit.alive:
                self._exited(e, now, f"exited unexpectedly {describe_exit(e.unit.exit_code)}")
            elif e.state == WAITING and now >= e.restart_at:
                try:
                    e.unit.restart()
                except Exception as exc:  # counts as one more quick exit
                    e.tracker.started(now)
                    self._exited(e, now, f"could not be restarted ({type(exc).__name__}: {exc})")
                    continue
                e.tracker.started(now)
                e.state = RUNNING
                self.say(f"{e.unit.name}: restarted (restart {e.tracker.restarts})")
        lost = []
        for kind in sorted(self.essential_kinds):
            group = [e for e in self._entries if e.unit.kind == kind]
            if group and all(e.state == GAVE_UP for e in group):
                lost.append(kind)
        return lost

    def _exited(self, e: _Entry, now: float, what: str) -> None:
        unit = e.unit
        delay = e.tracker.exited(now)
        if delay is None:
            e.state = GAVE_UP
            p = self.policy
            self.say(f"error: {unit.name} {what}; it is crash-looping ({p.give_up_after} "
                     f"restarts in a row, each running under {p.stable_s:g}s): giving up on it, "
                     f"the rest keeps running. Its log ({unit.log_path}) ends:\n"
                     f"{unit.log_tail()}")
            return
        e.state = WAITING
        e.restart_at = now + delay
        self.say(f"warning: {unit.name} {what}; restarting it in {delay:g}s "
                 f"(log: {unit.log_path}):\n{unit.log_tail(10)}")


def describe_exit(code: int | None) -> str:
    if code is None:
        return "(exit code unknown)"
    if code < 0:
        try:
            return f"(killed by {signal.Signals(-code).name})"
        except ValueError:
            return f"(killed by signal {-code})"
    return f"with code {code}"
