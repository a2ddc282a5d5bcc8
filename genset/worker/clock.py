"""Waiting with a deadline, and the wall clock in ms, as the worker's parts use them."""

from __future__ import annotations

import asyncio
import contextlib
import time


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:  # noqa: ASYNC109
    """Wait for `event` at most `timeout` s (None: no limit); True if it is set.

    Not `asyncio.wait_for(event.wait(), t)`: on Python 3.11 that swallows a cancel arriving
    after the event fired but before wait_for resumed (it returns the inner result instead),
    so a loop around it survives `task.cancel()`. `asyncio.timeout` runs no inner task and
    lets such a cancel through.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    return event.is_set()


def now_ms() -> int:
    return int(time.time() * 1000)
