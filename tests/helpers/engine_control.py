"""Test helpers that put an engine's stepping under the test's control, so that no engine test
depends on how fast this machine runs a step.

- `StepBudget(core)`: an `EngineCore` that takes at most `steps_left` steps (None: no limit);
  once they are spent it reports no work, so a request cannot finish until the test allows
  more (`allow`).
- `VirtualClock`: a clock and sleep for `MockerDriver(clock=..., sleep=...)`; a sleep
  advances the clock by exactly its argument and yields once, so the paced loop sees modelled
  step times and nothing else.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any


class StepBudget:
    """Wraps a core; every other attribute is the wrapped core's."""

    def __init__(self, core: Any, steps_left: int | None = None) -> None:
        self._core = core
        self._lock = threading.Lock()  # the engine thread steps, the test allows
        self.steps_left = steps_left
        self.steps = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)

    def has_work(self) -> bool:
        with self._lock:
            if self.steps_left is not None and self.steps_left <= 0:
                return False
        return self._core.has_work()

    def step(self, *args: Any) -> Any:
        with self._lock:
            if self.steps_left is not None:
                self.steps_left -= 1
            self.steps += 1
        return self._core.step(*args)

    def limit(self, steps_left: int | None) -> None:
        """From now on at most `steps_left` more steps (call while the engine is idle or from
        an engine command)."""
        with self._lock:
            self.steps_left = steps_left

    async def allow(self, engine: Any, steps: int | None) -> None:
        """Allow `steps` more steps (None: no limit) and wake the engine: a command (an empty
        KV export) makes the stepping side look at `has_work` again."""
        with self._lock:
            self.steps_left = None if steps is None else max(0, self.steps_left or 0) + steps
        await engine.export_kv([])


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0  # seconds

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)
