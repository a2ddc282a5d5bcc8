"""Dynamo 1.6.1's planner in Dynamo's own offline replay, on the workload of
`bench_planner_replay.py` (the sinusoid Mooncake trace), for the comparison in docs/planner.md.

Runs with the peer harness's venv and functions (`../shared/peers/dynamo/replay_wave2.py`:
`setup.sh` first; `--install` puts the planner's extra packages in $DYNAMO_PEER_DIR/planner-extra):

    python bench/make_modulated_trace.py mooncake ../shared/data/mooncake_synthetic_trace.jsonl \
        -o /tmp/mc_sine.jsonl --period-s 300
    $DYNAMO_PEER_DIR/venv/bin/python bench/dynamo_planner_replay.py /tmp/mc_sine.jsonl out.json \
        --install

Static fleets (STATICS, default 6,4) and Dynamo's planner with its three load-based targets
(latency, throughput, load; TARGETS), starting at and capped by MAXW (6) workers, min 1,
adjustment interval 5 s, worker start-up 30 s and 120 s; SLA TTFT 2 s, ITL 50 ms.
"""
import json
import os
import sys
import time
from pathlib import Path

HARNESS = Path(os.environ.get("DYNAMO_PEER_HARNESS",
                              Path(__file__).resolve().parents[2] / "shared" / "peers" / "dynamo"))
sys.path.insert(0, str(HARNESS))
import replay_wave2 as w  # noqa: E402

trace, out = sys.argv[1], sys.argv[2]
deps = w.planner_deps(os.path.join(os.environ.get("DYNAMO_PEER_DIR", "/tmp/dynamo-peer"),
                                   "planner-extra"), "--install" in sys.argv)


class Args:  # what run_one reads from the harness's command line
    sla_ttft_ms, sla_itl_ms = 2000.0, 50.0


plan = []
for n in [int(x) for x in os.environ.get("STATICS", "6,4").split(",") if x]:
    plan.append(dict(section="planner", label=f"static{n}", speed=1.0, topology="agg",
                     num_workers=n, capacity="small", extra_engine_args=w.engine(4688, 64)))
maxw = int(os.environ.get("MAXW", "6"))
for startup in (30.0, 120.0):
    for target in os.environ.get("TARGETS", "latency,throughput,load").split(","):
        pc = w.planner_config(target, min_workers=1, max_gpus=maxw, interval_s=5,
                              sla_ttft=2000.0, sla_itl=50.0)
        plan.append(dict(section="planner", label=f"planner-{target}/startup={startup:g}s",
                         speed=1.0, topology="agg", num_workers=maxw, capacity="small",
                         planner_config=pc, startup_time=startup,
                         extra_engine_args=w.engine(4688, 64, startup_time=startup)))
rows = []
for item in plan:
    t0 = time.time()
    try:
        m = w.run_one(trace, item, Args(), 0)["metrics"]
        rows.append({"label": item["label"], **{k: m.get(k) for k in (
            "sla_attainment", "gpu_hours", "avg_gpus", "duration_s", "ttft_p50_ms",
            "ttft_p99_ms", "scale_events", "peak_workers", "min_workers",
            "goodput_out_tok_s")}})
    except Exception as exc:  # recorded, the rest still runs
        rows.append({"label": item["label"], "error": repr(exc)[:500]})
    print(json.dumps(rows[-1]), f"({time.time() - t0:.0f} s)", flush=True)
with open(out, "w") as f:
    json.dump({"deps": deps, "trace": trace, "rows": rows}, f, indent=1)
