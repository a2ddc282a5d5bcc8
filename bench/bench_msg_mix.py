"""Messages on the bus per request, by kind, during one aiperf run against `genset up`
(mocker workers, the bench's settings, started `--insecure` so that a `>` subscriber may
read everything): what docs/benchmarks.md Issue 15 §5h / §5j counted with a scratch
harness. Each kind's count and mean size, divided by the requests aiperf completed.

    env DYNAMO_PEER_DIR=/tmp/dynamo-peer .venv/bin/python bench/bench_msg_mix.py \\
        --workers 4 --prefix-prompts 32 --kv-blocks 1024 --concurrency 16 [--genset-arg ...]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import GensetUp
from bench_aiperf import run_aiperf


class _Stack(GensetUp):
    """GensetUp that remembers the command it started (its NATS port)."""

    last_command: list[str] = []

    def command(self, port: int) -> list[str]:
        self.last_command = super().command(port)
        return self.last_command


def kind_of(subject: str) -> str:
    parts = subject.split(".")
    if subject.startswith("_INBOX"):
        return "reply frames (inbox)"
    if len(parts) >= 4 and parts[0] == "genset":
        return ".".join(parts[2:4])  # component.endpoint
    return parts[0]


class Counter(threading.Thread):
    """A `>` subscriber on its own loop and thread."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.counts: collections.Counter = collections.Counter()
        self.bytes: collections.Counter = collections.Counter()
        self.ready = threading.Event()
        self._done = None
        self._loop = None

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        import nats

        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        nc = await nats.connect(self.url)

        async def on(msg) -> None:
            k = kind_of(msg.subject)
            self.counts[k] += 1
            self.bytes[k] += len(msg.data)

        await nc.subscribe(">", cb=on, pending_msgs_limit=1 << 20, pending_bytes_limit=1 << 30)
        await nc.flush()
        self.ready.set()
        await self._done.wait()
        await nc.flush()
        await nc.close()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._done.set)
        self.join(10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--kv-blocks", type=int, default=1024)
    p.add_argument("--prefix-prompts", type=int, default=32)
    p.add_argument("--prefix-length", type=int, default=950)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--isl", type=int, default=0)
    p.add_argument("--genset-arg", action="append", default=[])
    p.add_argument("--source", default="", help="another checkout to run")
    args = p.parse_args()
    args.records = False
    args.run_timeout = 600
    with tempfile.TemporaryDirectory(prefix="msgmix-") as d:
        run_dir = Path(d)
        stack = _Stack(workers=args.workers, speedup=1.0, log_dir=run_dir,
                         kv_blocks=args.kv_blocks, source=Path(args.source) if args.source else None,
                         extra_args=["--insecure", *args.genset_arg])
        stack.start()
        cmd = stack.last_command
        nats_url = cmd[cmd.index("--nats") + 1]
        stack.pids = {}  # aiperf's CPU sampling is not needed here
        counter = Counter(nats_url)
        try:
            counter.start()
            counter.ready.wait(30)
            summary = run_aiperf(stack, args, args.concurrency, run_dir)
        finally:
            try:
                counter.stop()
            finally:
                stack.stop()
    n = summary.get("completed_request_count") or 1
    total = sum(counter.counts.values())
    print(f"{n} requests (+ warm-up), {total} messages, {total / n:.2f} per request")
    for k, c in counter.counts.most_common():
        print(f"  {k:40s} {c / n:7.2f} /req  {counter.bytes[k] / c:7.0f} B")


if __name__ == "__main__":
    main()
