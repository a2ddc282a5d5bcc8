"""aiperf's opening burst at concurrency 64 through the mocker's model, in simulated time.

aiperf issues 64 requests 1 ms apart; the frontend takes them in one after another, `intake`
ms apart (at least aiperf's 1 ms), and they go to 2 workers alternately (or with an uneven
split); each worker is the mocker's scheduling core with the live timing (Dynamo's polynomial,
`dynamo_exact`), stepping as soon as it has work, as the live driver does. Prints the largest
TTFTs as aiperf measures them (first token - aiperf's send), i.e. the run's p99 region: how
the frontend's intake rate and the split move the burst's tail with the engine model alone
(docs/benchmarks.md §5k).

    .venv/bin/python bench/burst_model.py                      # intake 1..5 ms, even split
    .venv/bin/python bench/burst_model.py --intake 1 --split 33
"""

from __future__ import annotations

import argparse
import random
import sys

from genset.engines.mocker import MockerConfig, MockerCore, PolynomialTiming
from genset.engines.types import EngineRequest, StopConditions


def worker_first_tokens(arrivals: list[float], prompt: int, osl: int) -> list[float]:
    """When each request (arriving at `arrivals`, ms) gets its first token on one worker."""
    core = MockerCore(MockerConfig(num_blocks=8192, timing=PolynomialTiming(dynamo_exact=True)))
    rng = random.Random(1)
    first: dict[int, float] = {}
    now, i = 0.0, 0
    while len(first) < len(arrivals):
        while i < len(arrivals) and arrivals[i] <= now + 1e-9:
            core.add_request(EngineRequest(
                str(i), [rng.randrange(3, 30000) for _ in range(prompt)],
                stop=StopConditions(max_tokens=osl, ignore_eos=True)))
            i += 1
        if not core.has_work():
            now = arrivals[i]
            continue
        outs, ms = core.step(now)
        now += ms
        for o in outs:
            first.setdefault(int(o.request_id), now)
    return [first[k] for k in range(len(arrivals))]


def burst(intake_ms: float, split: int = 32, n: int = 64, prompt: int = 1010,
          osl: int = 64) -> list[float]:
    """aiperf TTFTs of the burst, largest first. `split`: requests on worker 0 (the others
    alternate as evenly as the rest allows)."""
    sent = [float(k) for k in range(n)]
    taken, prev = [], -1e9
    for t in sent:
        prev = max(t, prev + intake_ms)
        taken.append(prev)
    extra = split - n // 2
    # alternate, the surplus requests of worker 0 at the end of the burst
    owner = [k % 2 for k in range(n)]
    for k in range(n - 1, -1, -1):
        if extra <= 0:
            break
        if owner[k] == 1:
            owner[k] = 0
            extra -= 1
    ttft = []
    for w in (0, 1):
        idx = [k for k in range(n) if owner[k] == w]
        firsts = worker_first_tokens([taken[k] for k in idx], prompt, osl)
        ttft += [f - sent[k] for k, f in zip(idx, firsts, strict=True)]
    return sorted(ttft, reverse=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--intake", type=float, nargs="+", default=[1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0],
                   help="ms between the frontend taking in one request and the next")
    p.add_argument("--split", type=int, default=32, help="requests on worker 0 (of 64)")
    args = p.parse_args(argv)
    for d in args.intake:
        t = burst(d, args.split)
        print(f"intake {d:g} ms, split {args.split}/{64 - args.split}: aiperf TTFT max "
              f"{t[0]:.1f}, 2nd {t[1]:.1f}, 3rd {t[2]:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
