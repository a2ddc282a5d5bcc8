"""CPU per message of reading NATS MSGs for direct subscriptions: nats-py's parser against
genset's `_FastParser` (genset/runtime/bus.py), on what a frontend reads (90-byte reply
frames on inbox subjects, every eighth a 216-byte KV batch), cut into reads of a given size.
No server: the bytes are fed to each parser as its read loop would; the handler counts.
Alternated rounds, process CPU time; prints min and median per message.

    .venv/bin/python bench/bench_nats_parse.py [--reads 1500 16384] [--rounds 7]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.protocol.parser import Parser

from genset.runtime import bus as bus_module


def stream(n: int = 400) -> bytes:
    parts = []
    for i in range(n):
        if i % 8 == 7:
            parts.append(b"MSG genset.default.kv.events.5cd1234567 6 216\r\n" + b"y" * 216
                         + b"\r\n")
        else:
            parts.append(b"MSG _INBOX.abcdefghijklmnopqrstuv.%x 5 90\r\n" % i
                         + bytes([i % 256]) * 90 + b"\r\n")
    return b"".join(parts)


async def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reads", type=int, nargs="+", default=[1500, 16384],
                   help="bytes per socket read")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=10, help="passes over the stream per round")
    args = p.parse_args(argv)
    if bus_module._FastParser is None:
        print("this nats-py has no parser module: nothing to compare")
        return 1
    count = [0]

    def handler(_msg) -> None:
        count[0] += 1

    data = stream()
    for size in args.reads:
        reads = [data[i:i + size] for i in range(0, len(data), size)]
        per_msg: dict[str, list[float]] = {"nats-py": [], "genset": []}
        for _ in range(args.rounds):
            for kind in per_msg:
                nc = Client()
                nc._subs[5] = Subscription(nc, 5, "_INBOX.x.*",
                                           future=bus_module._DirectSub(handler))
                nc._subs[6] = Subscription(nc, 6, "genset.default.kv.events.>",
                                           future=bus_module._DirectSub(handler))
                parser = nc._ps
                if kind == "genset":
                    assert bus_module._FastParser.install(nc)
                assert isinstance(parser, Parser)
                count[0] = 0
                t0 = time.process_time()
                for _ in range(args.reps):
                    for chunk in reads:
                        await parser.parse(chunk)
                per_msg[kind].append((time.process_time() - t0) / count[0] * 1e6)
        print(f"reads of {size} B: " + ", ".join(
            f"{k} min {min(v):.2f} / median {statistics.median(v):.2f} us per message"
            for k, v in per_msg.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
