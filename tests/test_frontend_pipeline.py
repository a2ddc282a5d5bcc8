"""The frontend pipeline in-process against real mocker worker processes (real NATS and
etcd): `prepare` names the offending field, and a router hears of each routing decision's
first token and end exactly once, also when the request moves to another worker."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

import proto
from genset.runtime.bus import Bus
from genset.runtime.discovery import Discovery
from proto import subjects
from services.frontend import routing
from services.frontend.errors import ApiError
from services.frontend.metrics import FrontendMetrics
from services.frontend.pipeline import Final, JobRequest, Pipeline
from services.frontend.registry import ModelRegistry
from services.frontend.text import Delta
from tests.stack import Stack

pytestmark = pytest.mark.slow


class Frontend:
    """A Pipeline with its registry and router, as the frontend service wires them."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    async def start(self, router_mode: str) -> Frontend:
        st = self.stack
        self.bus = await Bus.connect(st.nats_url, name=f"pipeline-{uuid.uuid4().hex[:6]}",
                                     namespace=st.namespace)
        self.discovery = await Discovery.connect(st.etcd_endpoint, ttl=5.0)
        self.registry = ModelRegistry(self.discovery, st.namespace)
        await self.registry.start()
        self.router = await routing.create(router_mode, bus=self.bus, discovery=self.discovery,
                                           namespace=st.namespace)
        await self.router.start()
        self.metrics = FrontendMetrics()
        self.pipeline = Pipeline(bus=self.bus, registry=self.registry, router=self.router,
                                 metrics=self.metrics, heartbeat_timeout=1.0)
        # Every lifecycle message the workers publish, to know when they have all arrived.
        self.lifecycle: list[proto.RequestLifecycle] = []

        async def on_lifecycle(msg) -> None:
            self.lifecycle.append(proto.decode(msg.data, proto.RequestLifecycle))

        await self.bus.subscribe(subjects.request_lifecycle(st.namespace), on_lifecycle)
        return self

    async def close(self) -> None:
        self.pipeline.close()
        await self.router.close()
        await self.registry.close()
        await self.discovery.close()
        await self.bus.close()

    def job_request(self, **kw) -> JobRequest:
        kw.setdefault("packed_token_ids", proto.pack_tokens([5, 6, 7, 8, 9, 10]))
        return JobRequest(endpoint="nats", request_id=kw.pop("request_id", uuid.uuid4().hex),
                          model=kw.pop("model", None), arrival=time.perf_counter(),
                          detokenize=kw.pop("detokenize", False), **kw)


class Notifications:
    """What a router hears about one request: ("route", worker), ("first",), ("done",) as
    the pipeline calls it, and, for a router with a load model (embedded), the same as its
    load model applies it from any source (the pipeline or the workers' lifecycle)."""

    def __init__(self, router, request_id: str) -> None:
        self.calls: list[tuple] = []
        self.applied: list[tuple] = []
        self.lifecycle_seen: list[str] = []  # phases the router's own feed received
        route, first, done = router.route, router.on_first_token, router.on_done

        async def spy_route(req):
            decision = await route(req)
            if req.request_id == request_id:
                self.calls.append(("route", decision.worker_id))
            return decision

        def spy_first(rid):
            if rid == request_id:
                self.calls.append(("first",))
            first(rid)

        def spy_done(rid):
            if rid == request_id:
                self.calls.append(("done",))
            done(rid)

        router.route, router.on_first_token, router.on_done = spy_route, spy_first, spy_done
        core = getattr(router, "core", None)
        if core is None:
            return
        load, on_lifecycle = core.load, core.on_lifecycle

        def wrap(name: str, event: str):
            real = getattr(load, name)

            def spy(rid, *args, **kw):
                if rid == request_id:
                    self.applied.append((event, args[0]) if event == "route" else (event,))
                return real(rid, *args, **kw)
            setattr(load, name, spy)

        wrap("on_routed", "route")
        wrap("on_first_token", "first")
        wrap("on_done", "done")

        def spy_lifecycle(msg):
            if msg.request_id == request_id:
                self.lifecycle_seen.append(msg.phase)
            on_lifecycle(msg)
        core.on_lifecycle = spy_lifecycle


async def eventually(check, what: str, wait_s: float = 20.0) -> None:
    deadline = time.monotonic() + wait_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
async def stack(nats_server, etcd_server, tmp_path_factory):
    async with Stack(nats_server.url, etcd_server.endpoint,
                     log_dir=tmp_path_factory.mktemp("pipeline")) as st:
        await st.start_workers(2, engine="mocker", extra_args=["--speedup", "10"])
        yield st


async def test_prepare_names_the_offending_field(stack):
    fe = await Frontend(stack).start("round-robin")
    try:
        await eventually(lambda: fe.registry.models, "the model to be listed")
        ok = await fe.pipeline.prepare(fe.job_request(max_tokens=4))
        assert ok.model == "tiny" and ok.prompt_ids == [5, 6, 7, 8, 9, 10] and ok.max_tokens == 4
        assert ok.tokenizer is None  # packed ids, no text, no stop strings: none needed
        cases = [
            (dict(packed_token_ids=b"\x01\x02\x03"), "token_ids"),
            (dict(packed_token_ids=None, messages=[]), "messages"),
            (dict(packed_token_ids=None, token_ids=[1, 10**9]), "prompt"),
            (dict(packed_token_ids=b""), "prompt"),
            (dict(max_tokens=0), "max_tokens"),
            (dict(max_tokens=0, max_tokens_param="max_completion_tokens"),
             "max_completion_tokens"),
            (dict(max_tokens=10**7), "max_tokens"),
            (dict(min_tokens=-1), "min_tokens"),
            (dict(temperature=-1.0), "temperature"),
            (dict(stop_token_ids=[-3]), "stop"),
            (dict(model="no-such-model"), "model"),
        ]
        for fields, param in cases:
            with pytest.raises(ApiError) as info:
                await fe.pipeline.prepare(fe.job_request(**fields))
            assert info.value.param == param, (fields, info.value.message)
            assert info.value.status in (400, 404) and info.value.message
    finally:
        await fe.close()


async def _generate(fe: Frontend, job) -> list:
    return [item async for item in fe.pipeline.generate(job)]


@pytest.mark.parametrize("router_mode", ["embedded", "round-robin"])
async def test_router_hears_first_token_and_done_once(stack, router_mode):
    fe = await Frontend(stack).start(router_mode)
    try:
        await eventually(lambda: len(fe.registry.models.get("tiny").cards
                                     if fe.registry.models.get("tiny") else ()) == 2,
                         "both workers listed")
        rid = f"once-{uuid.uuid4().hex[:8]}"
        heard = Notifications(fe.router, rid)
        job = await fe.pipeline.prepare(fe.job_request(request_id=rid, max_tokens=8,
                                                       ignore_eos=True))
        items = await _generate(fe, job)
        assert isinstance(items[-1], Final) and items[-1].completion_tokens == 8
        assert sum(len(d.token_ids) for d in items if isinstance(d, Delta)) == 8
        # the worker published its own first_token and done; wait until the router's feed
        # (embedded) or our subscription (built-in: it has none) has seen them too
        await eventually(lambda: [m.phase for m in fe.lifecycle if m.request_id == rid]
                         == ["first_token", "done"], "the worker's lifecycle messages")
        # every mode runs the router embedded (round-robin is the library's policy there)
        await eventually(lambda: heard.lifecycle_seen == ["first_token", "done"],
                         "the embedded router to receive the lifecycle messages")
        worker = heard.calls[0][1]
        assert heard.calls == [("route", worker), ("first",), ("done",)]
        # the load model applied the pipeline's reports only, not the workers' as well
        assert heard.applied == heard.calls
        assert fe.router.core.load.inflight_count(worker) == 0
    finally:
        await fe.close()


async def test_router_hears_each_decision_once_across_a_migration(nats_server, etcd_server,
                                                                  tmp_path):
    async with Stack(nats_server.url, etcd_server.endpoint, log_dir=tmp_path) as st:
        workers = await st.start_workers(2, engine="mocker", extra_args=["--speedup", "1"])
        fe = await Frontend(st).start("embedded")
        try:
            await eventually(lambda: len(fe.registry.models.get("tiny").cards
                                         if fe.registry.models.get("tiny") else ()) == 2,
                             "both workers listed")
            rid = f"moved-{uuid.uuid4().hex[:8]}"
            heard = Notifications(fe.router, rid)
            job = await fe.pipeline.prepare(fe.job_request(request_id=rid, max_tokens=2000,
                                                           ignore_eos=True))
            gen = fe.pipeline.generate(job)
            try:
                assert isinstance(await anext(gen), Delta)
                first_worker = heard.calls[0][1]
                victim = next(w for w in workers if w.instance_id == first_worker)
                victim.kill()  # SIGKILL mid-stream: no final frame, no lifecycle `done`
                # the request moves on: tokens again, from the other worker
                while len([c for c in heard.calls if c[0] == "first"]) < 2:
                    assert isinstance(await anext(gen), Delta)
            finally:
                await gen.aclose()  # the client leaves: the second worker is cancelled
            second_worker = heard.calls[3][1]
            assert second_worker != first_worker
            expected = [("route", first_worker), ("first",), ("done",),
                        ("route", second_worker), ("first",), ("done",)]
            assert heard.calls == expected
            # the survivor's own first_token and done reached the router too, and changed
            # nothing: each decision was reported once, by the pipeline
            await eventually(lambda: heard.lifecycle_seen[-2:] == ["first_token", "done"],
                             "the second worker's lifecycle messages")
            assert heard.applied == expected
            assert fe.router.core.load.inflight_count(second_worker) == 0
            assert fe.metrics.registry.get_sample_value(
                "genset_frontend_migrations_total",
                {"model": "tiny", "phase": "after_first_token"}) == 1
        finally:
            await fe.close()
