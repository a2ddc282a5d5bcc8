"""Waiting on a condition with a deadline (no test may sleep and then assert)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def until(predicate: Callable[[], object], within: float = 5.0, what: str = "condition",
                *, poll_s: float = 0.02) -> float:
    """Poll `predicate()` until it is true; returns the seconds it took. Past `within` seconds
    the test fails naming `what` (phrase it as what was awaited: "both buses reconnected")."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > within:
            raise AssertionError(f"timed out after {within} s waiting for: {what}")
        await asyncio.sleep(poll_s)
    return time.monotonic() - start


def until_blocking(predicate: Callable[[], object], within: float = 5.0,
                   what: str = "condition", *, poll_s: float = 0.05) -> float:
    """`until` for tests without an event loop (processes driven from plain threads)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > within:
            raise AssertionError(f"timed out after {within} s waiting for: {what}")
        time.sleep(poll_s)
    return time.monotonic() - start
