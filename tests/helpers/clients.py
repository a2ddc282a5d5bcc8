"""Clients that send requests back to back from threads while a fault test breaks something,
and count what fails. Counted, never timed: a test waits for `more(n)` successes, each wait
with a deadline."""

from __future__ import annotations

import threading
import time

import httpx

from tests.helpers.waiting import until


class ClientThreads:
    """`threads` clients, each with its own httpx.Client (`timeout_s`), sending requests back
    to back from entering the `with` block until leaving it (then each thread gets `join_s` to
    finish its request). A subclass's `one(client, n)` sends request `n` (unique across the
    threads) and returns None when it succeeded, else what went wrong; an httpx error counts as
    a failure too."""

    def __init__(self, url: str, threads: int, *, timeout_s: float, join_s: float) -> None:
        self.url = url
        self.ok = 0
        self.failures: list[str] = []
        self.timeout_s = timeout_s
        self.join_s = join_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(threads)]

    def one(self, client: httpx.Client, n: int) -> str | None:
        raise NotImplementedError

    def _run(self, i: int) -> None:
        n = 0
        with httpx.Client(timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                n += 1
                try:
                    failure = self.one(client, i * 100000 + n)
                except httpx.HTTPError as exc:
                    failure = repr(exc)
                with self._lock:
                    if failure is None:
                        self.ok += 1
                    else:
                        self.failures.append(failure)

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.join_s)

    async def more(self, n: int, within: float) -> None:
        """Wait (in an async test) until `n` more requests succeeded."""
        target = self.ok + n
        await until(lambda: self.ok >= target, within, f"{n} more successful requests")

    def more_blocking(self, n: int, within: float) -> None:
        """Wait (in a sync test, blocking it) until `n` more requests succeeded."""
        target = self.ok + n
        deadline = time.monotonic() + within
        while self.ok < target:
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {within} s waiting for: {n} more "
                                     "successful requests")
            time.sleep(0.1)


async def completion_choices(url: str, prompt: str, max_tokens: int, wait_s: float):
    """Stream a greedy /v1/completions request for model "tiny" from the frontend at `url`,
    yielding each SSE event's first choice (a dict); asserts the answer is 200."""
    import json

    import httpx

    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    async with httpx.AsyncClient(timeout=wait_s) as client, \
            client.stream("POST", url + "/v1/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            yield json.loads(line[6:])["choices"][0]
