"""The aiperf bench's server-side TTFT: Dynamo's histogram between two scrapes, genset's from a
--timeline file (pure logic; the bench itself needs the Dynamo peer and aiperf)."""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ scripts import their siblings by name (`from _common import ...`)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_aiperf

H = "dynamo_frontend_time_to_first_token_seconds"


def _scrape(count, total, buckets):
    out = {f"{H}_count": count, f"{H}_sum": total}
    for le, n in buckets.items():
        out[f'{H}_bucket{{model="m",le="{le}"}}'] = n
    return out


def test_histogram_delta_counts_only_the_observations_between_the_scrapes():
    before = _scrape(4, 0.4, {"0.1": 4, "0.5": 4, "+Inf": 4})  # the warm-up, before the run
    after = _scrape(14, 3.4, {"0.1": 6, "0.5": 13, "+Inf": 14})
    d = bench_aiperf.histogram_delta(before, after, H)
    assert d["count"] == 10
    assert d["mean_ms"] == 300.0
    # rank 5 of 10: 2 in (0, 0.1], 7 more in (0.1, 0.5] -> 0.1 + 0.4 * 3 / 7
    assert d["p50_ms"] == round(1000 * (0.1 + 0.4 * 3 / 7), 1)
    assert d["p90_ms"] == 500.0
    assert d["p99_ms"] is None  # in the +Inf bucket: no finite estimate


def test_histogram_delta_sums_label_sets_and_is_none_without_observations():
    a = {f'{H}_count{{model="a"}}': 1, f'{H}_count{{model="b"}}': 1,
         f'{H}_sum{{model="a"}}': 0.1, f'{H}_sum{{model="b"}}': 0.3}
    assert bench_aiperf.histogram_delta({}, a, H)["mean_ms"] == 200.0
    assert bench_aiperf.histogram_delta(a, a, H) is None
    assert bench_aiperf.histogram_delta({}, {}, H) is None


def test_timeline_ttft_takes_the_first_write_of_the_requests_that_finished():
    recs = [{"ok": True, "stages": {"received": 0.0, "first_written": float(ms)}}
            for ms in (100, 200, 300, 400)]
    recs.append({"ok": False, "stages": {"received": 0.0}})  # failed before its first token
    d = bench_aiperf.timeline_ttft(recs)
    assert d["count"] == 4 and d["mean_ms"] == 250.0
    assert d["p50_ms"] == 200.0 and d["p99_ms"] == 400.0  # nearest rank, as timeline_report
    assert bench_aiperf.timeline_ttft([{"ok": False, "stages": {}}]) is None


def _rec(client_cpu_s):
    cpu = {"profiling_window": {"client_cpu_s": client_cpu_s}} if client_cpu_s is not None else {}
    return {"summary": {"completed_request_count": 200, "cpu": cpu},
            "server_cpu": {"frontend": 0.8, "worker1": 0.5, "worker2": 0.5, "nats": 0.2},
            "launcher_cpu_s": 0.0, "load1": 0.5}


def test_a_row_gives_the_servers_cpu_per_request_and_over_the_clients():
    row = bench_aiperf.row_of(_rec(2.5))
    assert round(row["cpu_ms"], 6) == 10.0  # 2.0 s of server CPU over 200 requests
    assert round(row["cpu_workers"], 6) == 5.0 and round(row["cpu_nats+etcd"], 6) == 1.0
    assert round(row["client_cpu_ms"], 6) == 12.5
    assert row["cpu_per_client"] == 0.8
    # without aiperf's CPU figure there is no ratio, and the table still prints
    bare = bench_aiperf.row_of(_rec(None))
    assert bare["client_cpu_ms"] is None and bare["cpu_per_client"] is None
    text = bench_aiperf.table({("genset", 2, 1.0, 16): [_rec(None), _rec(2.5)]})
    header, rule, line = text.splitlines()
    assert "server / client CPU" in header
    assert header.count("|") == rule.count("|") == line.count("|")
    assert "| 0.8 |" in line  # the median of the runs that have it
