"""Per-request timelines (genset/runtime/timeline.py): the pure parts, the report, then one
request through an in-process frontend pipeline and worker host (real NATS and etcd, a real
mocker engine): every stage is stamped, in path order, and nothing is timed when it is off."""

from __future__ import annotations

import json
import time
import uuid

import proto
from bench.timeline_report import SEGMENTS, breakdown, load
from genset.runtime.timeline import STAGES, WORKER_STAGES, Timeline, TimelineSink
from services.frontend import routing
from services.frontend.metrics import FrontendMetrics
from services.frontend.pipeline import Final, JobRequest, Pipeline
from services.frontend.registry import ModelRegistry
from tests.test_worker import MODEL, Host, wait_for


def test_first_stamp_wins_and_worker_stamps_are_checked():
    tl = Timeline("r1", time.perf_counter())
    tl.stamp("routed")
    first = tl.stages["routed"]
    tl.stamp("routed")  # a second attempt (migration) keeps the first
    assert tl.stages["routed"] == first and tl.stages["received"] == 0.0
    t0 = time.time()
    tl.merge_worker({"w_received": t0, "w_step_ms": 12.5, "bogus": t0, "w_admitted": "x"})
    assert "bogus" not in tl.stages and "w_admitted" not in tl.stages  # bus input: checked
    assert "w_received" in tl.stages and tl.values == {"w_step_ms": 12.5}
    tl.merge_worker(None)
    rec = tl.record(True, prompt_tokens=3)
    assert rec["id"] == "r1" and rec["ok"] and rec["prompt_tokens"] == 3
    assert set(rec["stages"]) == {"received", "routed", "w_received"}


def test_intake_cpu_is_the_thread_time_since_arrival_and_only_when_taken():
    untaken = Timeline("r0", time.perf_counter())
    untaken.stamp_cpu("intake_cpu_ms")
    assert "intake_cpu_ms" not in untaken.values  # no thread_time at arrival: no value
    before = time.thread_time()
    tl = Timeline("r1", time.perf_counter(), before)
    sum(range(10_000))  # some CPU of this thread
    tl.stamp_cpu("intake_cpu_ms")
    spent = tl.values["intake_cpu_ms"]
    assert 0.0 <= spent <= (time.thread_time() - before) * 1000.0 + 1e-3
    tl.stamp_cpu("intake_cpu_ms")  # the first stamp wins (a migration's second send)
    assert tl.values["intake_cpu_ms"] == spent


def test_sink_writes_one_line_per_request_up_to_its_limit(tmp_path):
    path = tmp_path / "tl.jsonl"
    sink = TimelineSink(str(path), max_records=2)
    for i in range(3):
        sink.write(sink.new(f"r{i}", time.perf_counter()), ok=True)
    sink.close()
    sink.write(sink.new("late", time.perf_counter()), ok=True)  # after close: nothing
    # (a garbage collection that took >= 5 ms of wall time, e.g. preempted on a busy host, adds
    # a {"gc": ...} line of its own: not a request)
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in recs if "gc" not in r] == ["r0", "r1"]


def test_report_adds_the_stages_up_to_the_server_ttft(tmp_path):
    path = tmp_path / "tl.jsonl"
    with path.open("w") as f:
        for i in range(10):
            stages = {name: float(k + i) for k, name in enumerate(STAGES)}
            stages["received"] = 0.0
            f.write(json.dumps({"id": f"r{i}", "ok": True, "t0": float(i), "stages": stages,
                                "prompt_tokens": 100, "cached_tokens": 50}) + "\n")
        f.write(json.dumps({"id": "bad", "ok": False, "t0": 99.0, "stages": {}}) + "\n")
    recs = load(path, skip=2)
    assert [r["id"] for r in recs][:2] == ["r2", "r3"] and len(recs) == 9
    b = breakdown(recs)
    assert b["ok"] == 8 and b["cached_share"] == 0.5
    seg = b["segments"]
    total = sum(seg[name]["mean"] for name, *_ in SEGMENTS)
    assert abs(total - seg["ttft_server"]["mean"]) < 1e-9


async def test_a_timed_request_has_every_stage_in_path_order(bus, discovery, tmp_path):
    h = Host(bus, discovery)
    await h.host.start()
    registry = ModelRegistry(discovery, h.namespace)
    await registry.start()
    router = await routing.create("embedded", bus=bus, discovery=discovery,
                                  namespace=h.namespace)
    await router.start()
    path = tmp_path / "timeline.jsonl"
    sink = TimelineSink(str(path))
    pipeline = Pipeline(bus=bus, registry=registry, router=router, metrics=FrontendMetrics(),
                        timeline=sink)
    try:
        await wait_for(lambda: registry.get(MODEL) is not None, 10, "the model card")

        async def run(pipe: Pipeline) -> tuple[list, object]:
            job = await pipe.prepare(JobRequest(
                endpoint="nats", request_id=uuid.uuid4().hex, model=MODEL,
                arrival=time.perf_counter(), arrival_cpu=time.thread_time(),
                packed_token_ids=proto.pack_tokens(list(range(1, 30))),
                max_tokens=6, detokenize=False))
            items = [item async for item in pipe.generate(job)]
            return items, job

        items, job = await run(pipeline)
        assert isinstance(items[-1], Final) and items[-1].completion_tokens == 6
        sink.close()
        recs = [json.loads(line) for line in path.read_text().splitlines()]
        [rec] = [r for r in recs if "gc" not in r]  # a slow collection adds a line of its own
        assert rec["id"] == job.request_id and rec["ok"] is True
        stages = rec["stages"]
        assert list(stages) != [] and set(stages) == set(STAGES), stages
        ordered = [stages[name] for name in STAGES]
        assert ordered == sorted(ordered), stages  # causal order, one clock
        assert rec["values"]["w_step_ms"] > 0
        assert isinstance(rec["values"]["worker"], int)  # the worker it was routed to
        assert rec["values"]["intake_cpu_ms"] >= 0  # the frontend's CPU up to `sent`
        assert not h.engine._traced  # nothing left behind in the engine

        # Off (the default): no timeline, the worker times nothing.
        plain = Pipeline(bus=bus, registry=registry, router=router, metrics=FrontendMetrics())
        seen: list[proto.GenerateRequest] = []
        real = bus.stream_request

        async def spy(subject, request, **kw):
            seen.append(request)
            return await real(subject, request, **kw)

        bus.stream_request = spy
        try:
            items, job = await run(plain)
        finally:
            bus.stream_request = real
        assert job.timeline is None and seen and not seen[0].timeline
        plain.close()
        # ... and a worker asked directly answers usage without stamps unless asked
        chunks = await h.generate(h.request([1, 2, 3], max_tokens=2))
        assert chunks[-1].usage is not None and chunks[-1].usage.timeline is None
        chunks = await h.generate(h.request([1, 2, 3], max_tokens=2, timeline=True))
        assert set(chunks[-1].usage.timeline) == {*WORKER_STAGES, "w_step_ms"}
    finally:
        pipeline.close()
        sink.close()
        await router.close()
        await registry.close()
        await h.host.close()
