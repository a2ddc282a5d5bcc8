"""Issue 14, in-process: a prompt too long for the context is refused by its size before any
tokenizer work; long prompts are tokenized off the event loop, admitted by characters in
flight; integers that cannot travel and JSON nested too deeply get a 4xx naming the problem;
a router refuses an absurd max_tokens; workers marked suspect stay out of routing until they
prove alive (`SuspectWorkers`)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx
import msgspec
import pytest

import proto
from genset.routing.core import RouterConfig, RouterCore
from genset.routing.load import SuspectWorkers
from genset.tokenizer import RELEASE_GIL_CHARS, SegmentCache, Tokenizer, encode_ids
from services.frontend import openai_api as oa
from services.frontend import pipeline as pl
from services.frontend.errors import ApiError
from services.frontend.http_app import _decode
from services.frontend.metrics import FrontendMetrics
from services.frontend.pipeline import JobRequest, Pipeline, _TokenizeGate
from services.frontend.registry import ModelRegistry
from tests.test_frontend_helpers import make_tokenizer_dir

WORDS = "the quick brown fox jumps over a lazy dog and Grüße 你好 世界 ".split(" ")


def prose(chars: int) -> str:
    out = " ".join(WORDS[i % len(WORDS)] for i in range(chars // 4 + 1))
    return out[:chars]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer_dir(tmp_path_factory.mktemp("tok") / "tok")


async def make_pipeline(tok_dir, context: int) -> Pipeline:
    registry = ModelRegistry(None, "ns")
    registry._put("k1", proto.ModelCard(model="m", instance_id=1, engine="mocker",
                                        context_length=context, tokenizer=str(tok_dir),
                                        generate_subject="x"))
    pipe = Pipeline(bus=None, registry=registry, router=None, metrics=FrontendMetrics())
    await registry.get("m").tokenizer()
    return pipe


def request(**kw) -> JobRequest:
    kw.setdefault("endpoint", "completions")
    return JobRequest(request_id=uuid.uuid4().hex, model="m", arrival=time.perf_counter(), **kw)


async def refused(pipe: Pipeline, **kw) -> ApiError:
    with pytest.raises(ApiError) as info:
        await pipe.prepare(request(**kw))
    return info.value


# -- size before tokenizing -------------------------------------------------------------------

async def test_an_oversize_prompt_is_refused_before_any_tokenizer_work(tok_dir, monkeypatch):
    pipe = await make_pipeline(tok_dir, context=256)
    try:
        calls = []
        monkeypatch.setattr(pl, "_encode_within", lambda *a: calls.append(a) or [1])
        limit = pl.PROMPT_CHARS_PER_TOKEN * 256
        err = await refused(pipe, text="x" * (limit + 1))
        assert err.status == 400 and err.param == "prompt"
        assert err.code == "context_length_exceeded" and f"at most {limit} characters" in err.message
        err = await refused(pipe, endpoint="chat",
                            messages=[{"role": "user", "content": "y" * (limit + 1)}])
        assert err.status == 400 and err.param == "messages"
        # ids: counted before they are unpacked or checked against the vocabulary
        err = await refused(pipe, packed_token_ids=b"\x01\x00\x00\x00" * 256)
        assert err.code == "context_length_exceeded"
        err = await refused(pipe, token_ids=[1] * 300)
        assert err.code == "context_length_exceeded" and "300 tokens" in err.message
        assert calls == []  # neither the template nor the tokenizer ran
        await pipe.prepare(request(text="x" * 100))  # within the limit: tokenized
        assert len(calls) == 1
    finally:
        pipe.close()


async def test_a_long_prompt_is_refused_from_the_tokens_of_its_head(tok_dir):
    context = 2048  # a 6-16 characters per token prompt: its head is tokenized, not all of it
    pipe = await make_pipeline(tok_dir, context=context)
    try:
        text = prose(pl.PROBE_CHARS_PER_TOKEN * context + 5000)
        err = await refused(pipe, text=text)
        assert err.status == 400 and err.code == "context_length_exceeded"
        assert "more than" in err.message and err.param == "prompt"
        # under the probe's threshold: tokenized whole, refused by its exact count
        err = await refused(pipe, text=prose(pl.PROBE_CHARS_PER_TOKEN * context - 10))
        assert err.code == "context_length_exceeded" and "more than" not in err.message
        job = await pipe.prepare(request(text=prose(1000), max_tokens=4))
        assert 0 < len(job.prompt_ids) < context
    finally:
        pipe.close()


async def test_long_prompts_are_tokenized_in_a_thread(tok_dir, monkeypatch):
    """Long prompts go to a tokenize thread (where both encoders release the GIL: the loop
    stall it saves is measured in bench/bench_faults.py); short ones stay on the loop."""
    import threading

    import genset.tokenizer as tokmod

    pipe = await make_pipeline(tok_dir, context=131072)
    threads: list[str] = []
    real = tokmod.Tokenizer.encode

    def watched(self, text, **kwargs):
        threads.append(threading.current_thread().name)
        return real(self, text, **kwargs)

    monkeypatch.setattr(tokmod.Tokenizer, "encode", watched)
    try:
        job = await pipe.prepare(request(text=prose(200_000), max_tokens=1))
        assert len(job.prompt_ids) > 50_000
        await pipe.prepare(request(text=prose(200), max_tokens=1))
        assert threads[0].startswith("tokenize") and threads[1] == "MainThread"
        assert pipe._tokenize_gate.running == 0
    finally:
        pipe.close()


async def test_the_heap_is_trimmed_once_long_tokenizations_stop(tok_dir, monkeypatch):
    """glibc keeps the pages the tokenizer freed; once no long prompt is being tokenized
    the frontend gives them back (malloc_trim, in a tokenize thread)."""
    import threading

    trimmed = asyncio.Event()
    calls: list[str] = []
    loop = asyncio.get_running_loop()

    def trim(pad: int) -> int:
        calls.append(threading.current_thread().name)
        loop.call_soon_threadsafe(trimmed.set)
        return 1

    monkeypatch.setattr(pl, "_malloc_trim", trim)
    monkeypatch.setattr(pl, "TRIM_AFTER_S", 0.0)
    pipe = await make_pipeline(tok_dir, context=131072)
    try:
        await pipe.prepare(request(text=prose(200), max_tokens=1))
        assert pipe._trim_handle is None  # a short prompt: tokenized on the loop, no trim
        await pipe.prepare(request(text=prose(200_000), max_tokens=1))
        await asyncio.wait_for(trimmed.wait(), 30)
        assert pipe.trims == 1 and calls[0].startswith("tokenize")
    finally:
        pipe.close()


async def test_tokenize_gate_bounds_characters_in_flight_and_waiting():
    gate = _TokenizeGate(max_chars=100, max_waiting=150)
    await gate.acquire(80, 10)
    second = asyncio.ensure_future(gate.acquire(60, 10))  # 80 + 60 > 100: waits
    third = asyncio.ensure_future(gate.acquire(10, 10))  # fits, but comes after: waits (FIFO)
    await asyncio.sleep(0)
    assert not second.done() and not third.done() and gate.waiting == 70
    with pytest.raises(ApiError) as info:  # 70 + 90 > 150 waiting
        await gate.acquire(90, 10)
    assert info.value.status == 503 and info.value.code == "overloaded"
    gate.release(80)
    await asyncio.gather(second, third)
    assert gate.running == 70 and gate.waiting == 0
    # a waiter whose deadline passes leaves the queue and gets a 504
    with pytest.raises(ApiError) as info:
        await gate.acquire(50, 0.01)
    assert info.value.status == 504 and gate.waiting == 0
    # a waiter cancelled (client gone) leaves no trace either
    waiter = asyncio.ensure_future(gate.acquire(50, 10))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gate.waiting == 0
    gate.release(70)
    # one prompt larger than the whole budget is admitted alone
    await gate.acquire(1000, 10)
    assert gate.running == 1000
    gate.release(1000)


def test_long_texts_encode_the_same_with_the_gil_released(tok_dir):
    tok = Tokenizer.from_directory(tok_dir)
    text = prose(RELEASE_GIL_CHARS * 3) + "<|im_start|>user\nhi<|im_end|>"
    for special in (True, False):
        assert encode_ids(tok.rust, text, special) == tok.rust.encode(
            text, add_special_tokens=special).ids
    chat = [{"role": "user", "content": prose(RELEASE_GIL_CHARS * 2)}]
    assert tok.encode_chat(chat) == tok.rust.encode(tok.render_chat(chat),
                                                    add_special_tokens=False).ids


def test_segment_cache_checks_skip_long_texts(tok_dir):
    tok = Tokenizer.from_directory(tok_dir)
    assert tok.segments is not None
    before = tok.segments.checks_left
    tok.segments.encode(prose(SegmentCache.CHECK_MAX_CHARS + 10))
    assert tok.segments.checks_left == before  # no second encode of a long text to check it
    text = prose(SegmentCache.MIN_CHARS * 2)
    tok.segments.encode(text)
    assert tok.segments.checks_left == before  # first seen: encoded whole, nothing to check
    tok.segments.encode(text)
    assert tok.segments.checks_left == before - 1  # seen again: by pieces, checked


async def test_a_body_too_large_for_any_context_is_refused_from_its_content_length(tok_dir):
    from services.frontend.http_app import FrontendHttp

    pipe = await make_pipeline(tok_dir, context=256)
    try:
        http = FrontendHttp(pipe, health=dict, metrics_text=bytes)
        limit = pipe.max_body_bytes()
        assert limit == 256 * pl.BODY_BYTES_PER_TOKEN + pl.BODY_OVERHEAD_BYTES
        assert http.body_limit(limit) is None
        message, code = http.body_limit(limit + 1)
        assert f"{limit + 1} bytes" in message and f"{limit} bytes" in message
        assert "256 tokens" in message and code == "context_length_exceeded"
        # the largest context among the models served, followed as workers come and go
        card = pipe.registry.get("m").cards[1]
        pipe.registry._put("k2", proto.ModelCard(model="big", instance_id=2, engine="mocker",
                                                 context_length=4096, generate_subject="y"))
        assert pipe.max_body_bytes() == 4096 * pl.BODY_BYTES_PER_TOKEN + pl.BODY_OVERHEAD_BYTES
        pipe.registry._delete("k2")
        assert pipe.max_body_bytes() == limit
        pipe.registry._put("k1", msgspec.structs.replace(card, context_length=0))
        assert pipe.max_body_bytes() == 0  # a context unknown: no limit from it
        assert http.body_limit(10**9) is None
    finally:
        pipe.close()


# -- integers and nesting -----------------------------------------------------------------------

async def test_integers_that_cannot_travel_name_their_field(tok_dir):
    pipe = await make_pipeline(tok_dir, context=4096)
    try:
        cases = [
            (dict(seed=2**64), "seed"), (dict(seed=-(2**63) - 1), "seed"),
            (dict(seed=10**30), "seed"), (dict(top_k=2**40), "top_k"),
            (dict(top_k=-(10**30)), "top_k"), (dict(min_tokens=10**30), "min_tokens"),
            (dict(min_tokens=20, max_tokens=10), "min_tokens"),
            (dict(max_tokens=10**30), "max_tokens"),
            (dict(stop_token_ids=[2**40]), "stop"),
        ]
        for fields, param in cases:
            err = await refused(pipe, text="hello", **fields)
            assert err.status == 400 and err.param == param, (fields, err.message)
        # without a context (0: unknown) max_tokens is still bounded
        pipe.registry.get("m").cards[1].context_length = 0
        err = await refused(pipe, text="hello", max_tokens=2**40)
        assert err.status == 400 and err.param == "max_tokens"
        # packed ids without a tokenizer: stop ids must still fit an int32
        err = await refused(pipe, packed_token_ids=proto.pack_tokens([1, 2]), detokenize=False,
                            stop_token_ids=[2**40])
        assert err.param == "stop"
        ok = await pipe.prepare(request(text="hello", seed=2**64 - 1, top_k=-1, min_tokens=2,
                                        max_tokens=8))
        proto.encode(proto.GenerateRequest(request_id="r", model="m", token_ids=b"",
                                           sampling=ok.sampling))  # it can be sent
    finally:
        pipe.close()


async def test_sampling_refused_by_the_wire_names_the_field_not_its_key(tok_dir):
    """A value proto.SamplingParams refuses is a 400 whose param is the request's field: the
    param was the message's first word, "logit_bias[5]" for a bias out of range."""
    pipe = await make_pipeline(tok_dir, context=4096)
    pipe.registry.get("m").cards[1].supports_logprobs = True
    try:
        cases = [
            (dict(logit_bias={"5": 200.0}), "logit_bias", "logit_bias[5] must be in"),
            (dict(temperature=-1.0), "temperature", "temperature must be"),
            (dict(presence_penalty=3.0), "presence_penalty", "presence_penalty must be in"),
            (dict(repetition_penalty=0.0), "repetition_penalty", "repetition_penalty must"),
            # the wire's logprobs is chat's top_logprobs: the field the client sent is named
            (dict(logprobs=50, logprobs_param="top_logprobs"), "top_logprobs",
             "logprobs must be in"),
        ]
        for fields, param, message in cases:
            err = await refused(pipe, text="hello", max_tokens=2, **fields)
            assert err.status == 400 and err.param == param, (fields, err.body())
            assert err.message.startswith(message) and " - at" not in err.message, err.message
    finally:
        pipe.close()


def test_field_of_a_proto_message():
    from services.frontend.errors import field_of

    for text, want in (
            ("logit_bias[5] must be in [-100, 100], got 200.0 - at `$.logit_bias`", "logit_bias"),
            ("logit_bias: key 'x' is not a token id - at `$.logit_bias`", "logit_bias"),
            ("logit_bias[5] must be in [-100, 100], got 200.0", "logit_bias"),  # no path
            ("logit_bias: key 'x' is not a token id", "logit_bias"),
            ("top_p must be in (0, 1], got 0 - at `$.top_p`", "top_p"),
            ("stops[2] must be text - at `$.stop_conditions.stops[2]`", "stop_conditions"),
            ("", None), ("[5] is not a name", None)):
        assert field_of(text) == want, text


# -- NaN and Infinity ---------------------------------------------------------------------------

# (body fields, param): Python's json.dumps writes float('nan') / float('inf') as NaN /
# Infinity, which are not JSON; msgspec refuses such a body at a byte offset, naming no field
NON_FINITE = [
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"top_p": float("-inf")}, "top_p"),
    ({"presence_penalty": float("nan")}, "presence_penalty"),
    ({"frequency_penalty": float("inf")}, "frequency_penalty"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
    ({"logit_bias": {"5": float("nan")}}, "logit_bias"),
    ({"top_k": float("inf")}, "top_k"),
    ({"max_tokens": 4, "seed": float("nan")}, "seed"),
]


def test_non_finite_numbers_name_their_field_when_decoded():
    for fields, param in NON_FINITE:
        for decoder, body in ((oa.chat_decoder, {"model": "m", "messages": [], **fields}),
                              (oa.completion_decoder, {"model": "m", "prompt": "x", **fields})):
            with pytest.raises(ApiError) as info:
                _decode(decoder, json.dumps(body).encode())
            err = info.value
            assert err.status == 400 and err.param == param, (fields, err.body())
            assert "must be a finite number" in err.message and "`$." in err.message
    # "NaN" inside a string is text, and a body malformed otherwise keeps the generic message
    with pytest.raises(ApiError) as info:
        _decode(oa.completion_decoder, b'{"model": "NaN", "prompt": "Infinity",}')
    assert info.value.param is None and "not valid JSON" in info.value.message
    assert _decode(oa.completion_decoder, b'{"model": "NaN", "prompt": "Infinity"}').prompt == \
        "Infinity"


async def test_non_finite_numbers_are_a_400_through_the_http_server(tok_dir):
    """Through the frontend's own HTTP server and app: a 400 naming the field, in OpenAI's
    shape, and the connection and the server go on serving."""
    from services.frontend.http_app import FrontendHttp, error_body
    from services.frontend.httpserver import HttpServer

    pipe = await make_pipeline(tok_dir, context=256)
    http = FrontendHttp(pipe, health=dict, metrics_text=bytes)
    server = HttpServer(http.handle, error_body=error_body, body_limit=http.body_limit)
    port = await server.start("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            for path, body in (
                    ("/v1/chat/completions",
                     b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], '
                     b'"temperature": NaN}'),
                    ("/v1/completions", b'{"model": "m", "prompt": "hi", "temperature": Infinity}'),
                    ("/v1/completions", b'{"model": "m", "prompt": "hi", "top_p": -Infinity}'),
                    ("/v1/chat/completions",
                     b'{"model": "m", "messages": [], "logit_bias": {"7": NaN}}')):
                r = await client.post(path, content=body,
                                      headers={"content-type": "application/json"})
                assert r.status_code == 400, r.text
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"}
                assert err["type"] == "invalid_request_error"
                want = "logit_bias" if b"logit_bias" in body else (
                    "temperature" if b"temperature" in body else "top_p")
                assert err["param"] == want and "finite" in err["message"], err
            r = await client.get("/v1/models")  # the same connection, still served
            assert r.status_code == 200 and r.json()["data"][0]["id"] == "m"
    finally:
        await server.close()
        pipe.close()


def test_deeply_nested_json_is_a_400():
    deep = b"[" * 5000 + b"]" * 5000
    for body in (b'{"model":"m","prompt":"x","extra":' + deep + b"}",
                 b'{"model":"m","messages":' + deep + b"}"):
        with pytest.raises(ApiError) as info:
            _decode(oa.completion_decoder, body)
        assert info.value.status == 400 and "deep" in info.value.message


def test_deeply_nested_bus_messages_are_protocol_errors():
    inner: list = []
    for _ in range(5000):
        inner = [inner]
    enc = msgspec.msgpack.Encoder()
    import sys
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)
    try:
        data = enc.encode({"request_id": "r", "prompt": "x", "junk": inner})
    finally:
        sys.setrecursionlimit(limit)
    with pytest.raises(proto.ProtocolError, match="nested too deeply"):
        proto.decode(data, proto.client.ClientGenerateRequest)


def test_router_refuses_max_tokens_out_of_range():
    core = RouterCore(RouterConfig(policy="round-robin"))
    core.on_load_report(proto.LoadReport(worker_id=7, ts_ms=0))
    packed = proto.pack_tokens([1, 2, 3])
    for bad in (-(10**18), 0, 2**31):
        d = core.route(proto.RouteRequest(request_id="r", model="", token_ids=packed,
                                          max_tokens=bad))
        assert d.worker_id is None and "max_tokens" in d.error
    d = core.route(proto.RouteRequest(request_id="r", model="", token_ids=packed, max_tokens=4))
    assert d.worker_id == 7
    assert core.route(proto.RouteRequest(request_id="s", model="", token_ids=packed,
                                         max_tokens=4, exclude=[7])).worker_id is None


# -- suspects -------------------------------------------------------------------------------------

def test_suspect_workers_mark_prove_forget_expire():
    now = [0.0]
    s = SuspectWorkers(expiry_s=20, proof_delay_ms=500, clock=lambda: now[0])
    assert s.mark(1) and not s.mark(1) and s.current() == [1]
    now[0] = 100.0
    assert not s.alive(1)  # a report already on its way when the worker died
    now[0] = 600.0
    assert s.alive(1) and s.current() == []  # a fresh one: alive again
    s.mark(2)
    s.forget(2)  # its etcd record went or came back
    assert 2 not in s
    s.mark(3)
    now[0] += 20_000.0
    assert s.current() == []  # expired
    for w in range(SuspectWorkers.MAX_MARKED + 10):
        s.mark(w)
    assert len(s) == SuspectWorkers.MAX_MARKED


async def test_feeds_clear_a_suspect_that_proves_alive_or_whose_record_changes():
    from types import SimpleNamespace

    from genset.routing.feeds import RouterFeeds
    from proto import keys, subjects

    now = [0.0]
    feeds = RouterFeeds(RouterCore(RouterConfig()), bus=None, namespace="ns")
    feeds.suspects = SuspectWorkers(clock=lambda: now[0])

    def report(worker: int):
        return SimpleNamespace(subject=subjects.load_report("ns", worker),
                               data=proto.encode(proto.LoadReport(worker_id=worker, ts_ms=0)))

    feeds.suspects.mark(5)
    feeds._on_load(report(5))  # on its way before the mark counted: not proof
    assert 5 in feeds.suspects
    now[0] = 1000.0
    feeds._on_load(report(5))
    assert 5 not in feeds.suspects
    card = proto.ModelCard(model="m", instance_id=6, engine="mocker")
    feeds.suspects.mark(6)
    feeds._on_card("delete", keys.model("ns", "m", 6), card)
    assert 6 not in feeds.suspects
    feeds.suspects.mark(6)
    feeds._on_card("put", keys.model("ns", "m", 6), card)
    assert 6 not in feeds.suspects


async def test_route_avoids_suspects_unless_only_suspects_are_left(tok_dir):
    pipe = await make_pipeline(tok_dir, context=4096)
    asked: list[list[int]] = []

    class Router:
        workers = (1, 2)

        async def route(self, req):
            asked.append(list(req.exclude))
            free = [w for w in self.workers if w not in req.exclude]
            return proto.RouteDecision(request_id=req.request_id, model=req.model,
                                       worker_id=free[0] if free else None,
                                       error=None if free else "no worker")

    pipe.router = Router()
    try:
        job = await pipe.prepare(request(text="hello", max_tokens=2))
        packed = proto.pack_tokens(job.prompt_ids)
        assert (await pipe._route(job, packed, 2, [])).worker_id == 1
        pipe.suspects.mark(1)
        assert (await pipe._route(job, packed, 2, [])).worker_id == 2  # 1 avoided
        assert asked[-1] == [1]
        pipe.suspects.mark(2)
        # only suspects left: one of them beats no worker; the request's own failures stay out
        assert (await pipe._route(job, packed, 2, [1])).worker_id == 2
        assert asked[-2:] == [[1, 2], [1]]
        assert pipe.metrics.registry.get_sample_value(
            "genset_frontend_suspect_routes_total", {"model": "m"}) == 1
    finally:
        pipe.close()
