"""What a reply frame costs on its way from worker to frontend, three ways: one NATS message
per frame (as today), one NATS message per engine step and requester (a list of (stream,
frame): batching), and a direct TCP connection from the publisher to the subscriber with no
server between (the frames of a step in one write: what Dynamo's response plane does).

Reply frames are 82 % of the bus's messages in the 4-worker stack (docs/benchmarks.md, issue
15 §5p), so one message per step and requester looked like the next CPU lever. This measures
it in isolation before any protocol change: a nats-server, a publisher that queues K frames
(the StreamChunk a worker sends: one token) every 10 ms and writes them in one socket write
(as a worker does at the end of a step's delivery), and a subscriber that decodes each frame
the way the bus's reply inbox does (nats-py's reader hands each message to a future-like
object, no task switch); in the direct mode the subscriber reads length-prefixed frames from
its socket (an asyncio Protocol) and decodes each the same way. Both clients run on uvloop,
as genset's services do. The modes alternate, each run fresh processes; CPU is /proc utime
+ stime of the server (NATS modes), the publisher and the subscriber over the publishing
window.

    .venv/bin/python bench/bench_frame_batching.py --frames-per-step 8 32 --seconds 20 --reps 3

Prints each run and the medians, in microseconds of CPU per frame, per process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TICK = os.sysconf("SC_CLK_TCK")
STEP_S = 0.01  # a decode step at speedup 1 (~10 ms)
MODES = ("per-frame", "batched", "direct")
_LEN = 4  # direct mode: each frame is a 4-byte little-endian length, the stream id, the chunk


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


# ---- the two client roles (run as `python bench_frame_batching.py --role ...`) ------------

class _Inbox:
    """Stands in for nats-py's future, as the bus's `_DirectInbox` does: every message is
    handed over inside the reader."""

    def __init__(self) -> None:
        import msgspec

        from proto import StreamChunk
        self.frames = 0
        self._one = msgspec.msgpack.Decoder(StreamChunk).decode
        self._batch = msgspec.msgpack.Decoder(list[tuple[str, msgspec.Raw]]).decode

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False

    def frame(self, data: bytes) -> None:
        """One encoded frame, decoded as the bus's reply inbox does."""
        self._one(data)
        self.frames += 1

    def set_result(self, msg) -> None:
        if msg.subject.endswith(".batch"):
            for _stream, raw in self._batch(msg.data):
                self.frame(raw)
        else:
            self.frame(msg.data)


class _DirectReader:
    """The direct mode's receiving end: an asyncio Protocol that splits the byte stream into
    frames (length-prefixed: the stream id, a NUL, the encoded chunk) and decodes each."""

    def __init__(self, inbox: _Inbox) -> None:
        self.inbox = inbox
        self.buf = bytearray()

    def connection_made(self, transport) -> None:
        pass

    def connection_lost(self, exc) -> None:
        pass

    def eof_received(self) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos, end = 0, len(buf)
        frame = self.inbox.frame
        while end - pos >= _LEN:
            n = int.from_bytes(buf[pos:pos + _LEN], "little")
            if end - pos - _LEN < n:
                break
            body = bytes(buf[pos + _LEN:pos + _LEN + n])
            _stream, _, chunk = body.partition(b"\0")
            frame(chunk)
            pos += _LEN + n
        del buf[:pos]


async def _direct_subscriber(port: int, seconds: float) -> None:
    inbox = _Inbox()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _DirectReader(inbox), "127.0.0.1", port)
    print("ready", flush=True)
    await asyncio.sleep(seconds)
    print(f"frames {inbox.frames}", flush=True)
    server.close()


async def _direct_publisher(port: int, per_step: int, seconds: float) -> None:
    import msgspec

    from proto import StreamChunk
    from proto.tokens import pack_tokens
    encode = msgspec.msgpack.Encoder().encode
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    streams = [f"_INBOX.bench.{i:x}".encode() + b"\0" for i in range(per_step)]
    seq = steps = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        token = pack_tokens([seq % 1000 + 3])
        out = []
        for s in streams:
            body = s + encode(StreamChunk(seq=seq, token_ids=token))
            out.append(len(body).to_bytes(_LEN, "little"))
            out.append(body)
        writer.writelines(out)  # one write per step
        seq += 1
        steps += 1
        await asyncio.sleep(STEP_S)
    await writer.drain()
    writer.close()
    print(f"steps {steps}", flush=True)


async def _subscriber(url: str, seconds: float) -> None:
    import nats
    nc = await nats.connect(url)
    inbox = _Inbox()
    await nc.subscribe("_INBOX.bench.*", future=inbox)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.sleep(seconds)
    print(f"frames {inbox.frames}", flush=True)
    await nc.close()


async def _publisher(url: str, mode: str, per_step: int, seconds: float) -> None:
    import msgspec
    import nats
    from nats.protocol.command import pub_cmd

    from proto import StreamChunk
    from proto.tokens import pack_tokens
    encode = msgspec.msgpack.Encoder().encode
    nc = await nats.connect(url)
    streams = [f"_INBOX.bench.{i:x}" for i in range(per_step)]
    seq = steps = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        token = pack_tokens([seq % 1000 + 3])
        if mode == "batched":
            frames = [(s, msgspec.Raw(encode(StreamChunk(seq=seq, token_ids=token))))
                      for s in streams]
            nc._pending.append(pub_cmd("_INBOX.bench.batch", "", encode(frames)))
        else:
            for s in streams:
                nc._pending.append(pub_cmd(s, "", encode(StreamChunk(seq=seq, token_ids=token))))
        nc._transport.writelines(nc._pending)  # one write per step, as Bus.write_pending
        nc._pending = []
        nc._pending_data_size = 0
        seq += 1
        steps += 1
        await asyncio.sleep(STEP_S)
    await nc.flush()
    print(f"steps {steps}", flush=True)
    await nc.close()


# ---- the driver -----------------------------------------------------------------------------

def _nats_server() -> str:
    found = Path(sys.executable).parent / "nats-server"
    return str(found) if found.exists() else "nats-server"


def run_once(mode: str, per_step: int, seconds: float) -> dict[str, float]:
    from bench._common import free_port
    port = free_port()
    url = f"nats://127.0.0.1:{port}" if mode != "direct" else f"tcp://127.0.0.1:{port}"
    # the direct mode has no server (a sleeper stands in, so the bookkeeping is one)
    server = subprocess.Popen(
        [_nats_server(), "-a", "127.0.0.1", "-p", str(port)] if mode != "direct"
        else ["sleep", str(seconds + 30)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    me = [sys.executable, str(Path(__file__).resolve())]
    try:
        time.sleep(0.5)
        sub = subprocess.Popen([*me, "--role", "sub", "--url", url,
                                "--seconds", str(seconds + 3)],
                               stdout=subprocess.PIPE, text=True)
        if sub.stdout.readline().strip() != "ready":
            raise RuntimeError("the subscriber did not start")
        pub = subprocess.Popen([*me, "--role", "pub", "--url", url, "--mode", mode,
                                "--frames-per-step", str(per_step), "--seconds", str(seconds)],
                               stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)  # past the publisher's start-up (imports, connect)
        pids = {"nats": server.pid, "publisher": pub.pid, "subscriber": sub.pid}
        before = {k: cpu_s(p) for k, p in pids.items()}
        time.sleep(seconds - 2.0)
        after = {k: cpu_s(p) for k, p in pids.items()}
        pub_out, _ = pub.communicate(timeout=30)
        sub_out, _ = sub.communicate(timeout=30)
    finally:
        server.terminate()
        server.wait(timeout=10)
    steps = int(pub_out.split()[-1])
    frames = int(sub_out.split()[-1])
    if frames != steps * per_step:
        raise RuntimeError(f"{mode}: {frames} frames received of {steps * per_step} sent")
    # frames in the measured window: its share of the run's steps (a step lasts a little
    # more than STEP_S: the loop's own time)
    window_frames = steps * per_step * (seconds - 2.0) / seconds
    return {k: 1e6 * (after[k] - before[k]) / window_frames for k in pids}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--role", choices=("sub", "pub"), help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--frames-per-step", type=int, nargs="+", default=[8, 32],
                   help="frames one step sends to one requester (8: c=16 on 2 workers)")
    p.add_argument("--seconds", type=float, default=20.0, help="publishing time of one run")
    p.add_argument("--reps", type=int, default=3, help="runs of each mode, alternated")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="which ways to send (default: all three)")
    args = p.parse_args()
    if args.role is not None:
        import uvloop
        direct = args.url.startswith("tcp://")
        port = int(args.url.rsplit(":", 1)[1])
        if args.role == "sub":
            main_ = (_direct_subscriber(port, args.seconds) if direct
                     else _subscriber(args.url, args.seconds))
        else:
            main_ = (_direct_publisher(port, args.frames_per_step[0], args.seconds) if direct
                     else _publisher(args.url, args.mode, args.frames_per_step[0],
                                     args.seconds))
        uvloop.run(main_)
        return
    if args.seconds < 5 or args.reps < 1 or min(args.frames_per_step) < 1:
        p.error("need --seconds >= 5, --reps >= 1, --frames-per-step >= 1")
    print(f"load average {os.getloadavg()[0]:.2f}")
    modes = [m for m in MODES if m in args.modes]
    for k in args.frames_per_step:
        runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        for rep in range(args.reps):
            for mode in (modes if rep % 2 == 0 else modes[::-1]):
                r = run_once(mode, k, args.seconds)
                runs[mode].append(r)
                print(f"K={k} {mode:9s} " + "  ".join(f"{n} {v:5.2f}" for n, v in r.items())
                      + "  us/frame", flush=True)
        for mode in modes:
            med = {n: statistics.median(r[n] for r in runs[mode]) for n in runs[mode][0]}
            total = sum(med.values())
            print(f"K={k} {mode:9s} median: " + "  ".join(f"{n} {v:.2f}" for n, v in med.items())
                  + f"  total {total:.2f} us/frame")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
