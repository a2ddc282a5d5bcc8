"""Breakdown of time to first token by stage, from a frontend's `--timeline` file.

    GENSET_TIMELINE=/tmp/tl.jsonl genset up ...      # or genset frontend --timeline FILE
    <run a load: aiperf, load.py, ...>
    .venv/bin/python bench/timeline_report.py /tmp/tl.jsonl [--skip 4] [--json out.json]

Each line of the file is one request (`genset.runtime.timeline`): stamps in ms since the
request arrived, frontend and worker stages on one clock. For every stage of the path the
report gives the time spent in it (mean, p50, p90, p99 over the run's successful requests)
and its share of the mean TTFT; the stages add up to the server-side TTFT (`received` ->
`first_written`). Requests are ordered by arrival; `--skip N` drops the first N (warm-up).
Several files: one table each (e.g. before / after, or genset service vs embedded router).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# (stage name in the report, from stamp, to stamp, what it is)
SEGMENTS = (
    ("tokenize", "received", "tokenized", "template + tokenize + checks (frontend)"),
    ("route", "tokenized", "routed", "routing decision (embedded: computed; service: NATS round trip)"),
    ("send", "routed", "sent", "GenerateRequest built and queued on NATS (frontend)"),
    ("bus_to_worker", "sent", "w_received", "NATS frontend -> worker, worker decodes + validates"),
    ("admit", "w_received", "w_admitted", "engine.submit: queued in the engine core"),
    ("engine_queue", "w_admitted", "w_first_step", "waits for the step that computes its first token"),
    ("first_step", "w_first_step", "w_first_token", "that step (mocker: modelled time + loop lag)"),
    ("worker_send", "w_first_token", "w_first_sent", "worker hands the first frame to NATS"),
    ("bus_to_frontend", "w_first_sent", "first_token", "NATS worker -> frontend, frame decoded"),
    ("write", "first_token", "first_written", "detokenize + first SSE event written"),
)
TTFT = ("ttft_server", "received", "first_written")
AFTER = (("rest_of_stream", "first_written", "done"),)


def load(path: Path, skip: int = 0, gc_pauses: list | None = None) -> list[dict]:
    """The requests of a timeline file by arrival (the first `skip` dropped); the garbage
    collection pauses it also records go to `gc_pauses` when given."""
    recs = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise SystemExit(f"{path}:{n}: not a JSON line: {exc}") from None
            if "gc" in rec:
                if gc_pauses is not None:
                    gc_pauses.append(rec)
                continue
            recs.append(rec)
    recs.sort(key=lambda r: r.get("t0", 0.0))
    return recs[skip:]


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (as the peers' load generators report them)."""
    v = sorted(values)
    if not v:
        return float("nan")
    k = max(0, min(len(v) - 1, int(-(-q * len(v) // 100)) - 1))
    return v[k]


def stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "mean": sum(values) / len(values), "p50": pct(values, 50),
            "p90": pct(values, 90), "p99": pct(values, 99)}


def breakdown(recs: list[dict]) -> dict:
    ok = [r for r in recs if r.get("ok")]
    out: dict = {"requests": len(recs), "ok": len(ok), "segments": {}}
    for name, a, b in (*(x[:3] for x in SEGMENTS), TTFT, *AFTER):
        vals = [r["stages"][b] - r["stages"][a] for r in ok
                if a in r["stages"] and b in r["stages"]]
        out["segments"][name] = stats(vals)
    steps = [r["values"]["w_step_ms"] for r in ok if "w_step_ms" in r.get("values", {})]
    out["first_step_modelled_ms"] = stats(steps)
    cached = [r.get("cached_tokens", 0) / r["prompt_tokens"] for r in ok if r.get("prompt_tokens")]
    out["cached_share"] = sum(cached) / len(cached) if cached else None
    return out


def table(label: str, b: dict) -> str:
    seg = b["segments"]
    ttft_mean = seg[TTFT[0]].get("mean") or float("nan")
    lines = [f"**{label}**: {b['ok']} of {b['requests']} requests ok"
             + (f", cached share {b['cached_share']:.3f}" if b["cached_share"] is not None else ""),
             "",
             "| stage | mean ms | p50 ms | p90 ms | p99 ms | share of mean TTFT | what |",
             "|---|---|---|---|---|---|---|"]

    def row(name: str, what: str, share: bool = True) -> None:
        s = seg[name]
        if not s.get("n"):
            lines.append(f"| {name} | - | - | - | - | - | {what} (not stamped) |")
            return
        sh = f"{100 * s['mean'] / ttft_mean:.1f} %" if share else ""
        lines.append(f"| {name} | {s['mean']:.2f} | {s['p50']:.2f} | {s['p90']:.2f} | "
                     f"{s['p99']:.2f} | {sh} | {what} |")

    for name, _, _, what in SEGMENTS:
        row(name, what)
    row(TTFT[0], "**server-side TTFT** (sum of the above)", share=False)
    for name, _, _ in AFTER:
        row(name, "after the first token", share=False)
    m = b["first_step_modelled_ms"]
    if m.get("n"):
        lines.append(f"| (first step, modelled) | {m['mean']:.2f} | {m['p50']:.2f} | "
                     f"{m['p90']:.2f} | {m['p99']:.2f} | | the engine's own duration of that step |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="timeline files (JSON lines)")
    p.add_argument("--skip", type=int, default=0, help="drop the first N requests by arrival")
    p.add_argument("--label", action="append", default=[], help="a name per file (in order)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    a = p.parse_args(argv)
    results = {}
    for i, path in enumerate(a.files):
        if not path.exists():
            print(f"no such file: {path}", file=sys.stderr)
            return 2
        label = a.label[i] if i < len(a.label) else str(path)
        pauses: list[dict] = []
        b = breakdown(load(path, a.skip, pauses))
        b["gc_pauses"] = {"count": len(pauses), "total_ms": sum(p["ms"] for p in pauses),
                          "max_ms": max((p["ms"] for p in pauses), default=0.0)}
        results[label] = b
        print(table(label, b))
        g = b["gc_pauses"]
        print(f"\ngarbage collections >= 5 ms in the frontend: {g['count']} "
              f"(total {g['total_ms']:.1f} ms, longest {g['max_ms']:.1f} ms)")
        print()
    if a.json is not None:
        a.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
