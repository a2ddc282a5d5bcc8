"""OpenAI conformance against a running stack (real NATS, etcd, worker and frontend processes),
driven by the official `openai` client and raw HTTP: every request field either works or is
refused with a 400 that names it; echo, n > 1, user; greedy determinism on the torch engine
and the mocker; live responses match the schemas published at /openapi.json.

One stack for the module: two mocker workers serving `tiny` and one torch worker (the tiny
built-in model, CPU) serving it as `tiny-torch`.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import jsonschema
import openai
import pytest

import proto
from genset.tokenizer import load_tokenizer
from tests.stack import Stack, metric

slow = pytest.mark.slow

MOCKER = "tiny"
TORCH = "tiny-torch"
CONTEXT = 2048
USER = [{"role": "user", "content": "hello there"}]

# The wire fields that arrive with engine-side sampling support (w-sampling): tests of what
# they do run once the build has them.
_WIRE = set(proto.SamplingParams.__struct_fields__)
needs_sampling_wire = pytest.mark.skipif(
    not {"presence_penalty", "logit_bias", "logprobs"} <= _WIRE,
    reason="proto.SamplingParams has no penalties / logit_bias / logprobs in this build yet")


@pytest.fixture(scope="module")
async def stack(nats_server, etcd_server, tmp_path_factory):
    async with Stack(nats_server.url, etcd_server.endpoint,
                     log_dir=tmp_path_factory.mktemp("openai-conformance")) as st:
        await asyncio.gather(
            st.start_workers(2, engine="mocker",
                             extra_args=["--speedup", "20", "--context-length", str(CONTEXT)]),
            st.start_workers(1, engine="torch", model="tiny",
                             extra_args=["--served-model-name", TORCH]))
        st.frontend = await st.start_frontend(models=[MOCKER, TORCH])
        yield st


@pytest.fixture
def oai(stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.frontend.url + "/v1", api_key="unused",
                              max_retries=0)


@pytest.fixture
async def http(stack):
    async with httpx.AsyncClient(base_url=stack.frontend.url, timeout=60) as client:
        yield client


def _chat(**fields) -> dict:
    return {"model": MOCKER, "messages": USER, "max_tokens": 4, **fields}


def _comp(**fields) -> dict:
    return {"model": MOCKER, "prompt": "Once upon a time", "max_tokens": 4, **fields}


# (path, body, param named in the 400)
REFUSED = [
    ("chat", _chat(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
    ("chat", _chat(messages=[{"role": "tool", "content": "x", "tool_call_id": "a"}]),
     "messages[0].role"),
    ("chat", _chat(messages=[{"role": "user"}]), "messages[0].content"),
    ("chat", _chat(messages=[{"role": "assistant", "content": None,
                              "tool_calls": [{"id": "a", "type": "function"}]}]),
     "messages[0].tool_calls"),
    ("chat", _chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]),
     "messages[0].content[0]"),
    ("chat", _chat(temperature=5), "temperature"),
    ("chat", _chat(temperature=-0.5), "temperature"),
    ("chat", _chat(top_p=0), "top_p"),
    ("chat", _chat(top_p=1.5), "top_p"),
    ("chat", _chat(presence_penalty=3), "presence_penalty"),
    ("chat", _chat(frequency_penalty=-2.5), "frequency_penalty"),
    ("chat", _chat(repetition_penalty=0), "repetition_penalty"),
    ("chat", _chat(n=0), "n"),
    ("chat", _chat(n=129), "n"),
    ("chat", _chat(seed="abc"), "seed"),
    ("chat", _chat(logit_bias={"abc": 1}), "logit_bias"),
    ("chat", _chat(logit_bias={"5": 200}), "logit_bias"),
    ("chat", _chat(logit_bias={"99999999": 1}), "logit_bias"),
    ("chat", _chat(top_logprobs=21, logprobs=True), "top_logprobs"),
    ("chat", _chat(top_logprobs=2), "top_logprobs"),
    ("chat", _chat(logprobs=True), "logprobs"),  # the mocker computes no probabilities
    ("chat", _chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    ("chat", _chat(tool_choice="auto"), "tool_choice"),
    ("chat", _chat(functions=[{"name": "f"}]), "functions"),
    ("chat", _chat(function_call="auto"), "function_call"),
    ("chat", _chat(parallel_tool_calls=True), "parallel_tool_calls"),
    ("chat", _chat(response_format={"type": "json_object"}), "response_format"),
    ("chat", _chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
     "response_format"),
    ("chat", _chat(audio={"voice": "alloy", "format": "wav"}), "audio"),
    ("chat", _chat(modalities=["text", "audio"]), "modalities"),
    ("chat", _chat(prediction={"type": "content", "content": "x"}), "prediction"),
    ("chat", _chat(reasoning_effort="high"), "reasoning_effort"),
    ("chat", _chat(web_search_options={}), "web_search_options"),
    ("chat", _chat(store=True), "store"),
    ("chat", _chat(service_tier="flex"), "service_tier"),
    ("chat", _chat(stream_options={"include_usage": True}), "stream_options"),
    ("chat", _chat(user="u" * 1000), "user"),
    ("chat", _chat(stop=["a"] * 17), "stop"),
    ("chat", _chat(min_p=0.1), "min_p"),
    ("chat", _chat(guided_json={"type": "object"}), "guided_json"),
    ("chat", _chat(chat_template="{{ messages }}"), "chat_template"),
    ("chat", _chat(max_completion_tokens=0), "max_completion_tokens"),
    ("completions", _comp(suffix="the end"), "suffix"),
    ("completions", _comp(best_of=3), "best_of"),
    ("completions", _comp(logprobs=6), "logprobs"),
    ("completions", _comp(logprobs=2), "logprobs"),  # the mocker computes no probabilities
    ("completions", _comp(echo=True, logprobs=1), "echo"),
    ("completions", _comp(temperature=2.5), "temperature"),
    ("completions", _comp(presence_penalty=-3), "presence_penalty"),
    ("completions", _comp(n=200), "n"),
    ("completions", _comp(prompt=["a", "b"]), "prompt"),
]


@slow
@pytest.mark.parametrize("model", [MOCKER, TORCH])
async def test_every_refusal_is_a_400_naming_the_field(http, model):
    failures = []
    for path, body, param in REFUSED:
        if model == TORCH and param in ("logprobs", "top_logprobs") and "logprobs" in _WIRE:
            continue  # the torch engine computes them (test_logprobs_torch)
        body = {**body, "model": model}
        r = await http.post(f"/v1/{'chat/completions' if path == 'chat' else 'completions'}",
                            json=body)
        err = r.json().get("error") if r.headers.get("content-type", "").startswith(
            "application/json") else None
        if r.status_code != 400 or not err or err.get("param") != param or not err["message"]:
            failures.append((path, param, r.status_code, r.text[:300]))
        else:
            assert set(err) == {"message", "type", "param", "code"}
            assert err["type"] == "invalid_request_error"
    assert not failures, "\n".join(map(str, failures))


@slow
async def test_refusals_through_the_openai_client(oai):
    with pytest.raises(openai.BadRequestError) as info:
        await oai.chat.completions.create(model=MOCKER, messages=USER, temperature=5)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        await oai.chat.completions.create(
            model=MOCKER, messages=USER,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert info.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as info:
        await oai.chat.completions.create(model=MOCKER, messages=USER, max_tokens=3,
                                          response_format={"type": "json_object"})
    assert info.value.body["param"] == "response_format"


@slow
async def test_neutral_values_and_unknown_fields_are_accepted(http, oai):
    """What has no effect to refuse is accepted: neutral values of refused features, OpenAI's
    bookkeeping fields, and fields this version does not know (other servers' extensions)."""
    chat = await oai.chat.completions.create(
        model=MOCKER, messages=[{"role": "developer", "content": "be brief"}, *USER],
        max_tokens=3, response_format={"type": "text"}, tool_choice="none", store=False,
        service_tier="auto", modalities=["text"], metadata={"team": "a"}, presence_penalty=0,
        frequency_penalty=0, logit_bias={}, parallel_tool_calls=False, prompt_cache_key="k",
        stream_options=None, user="someone", safety_identifier="sid")
    assert chat.usage.completion_tokens == 3
    r = await http.post("/v1/chat/completions",
                        json=_chat(some_future_field={"x": 1}, top_k=5, min_tokens=1,
                                   repetition_penalty=1.0, min_p=0, use_beam_search=False))
    assert r.status_code == 200, r.text
    comp = await oai.completions.create(model=MOCKER, prompt="abc", max_tokens=2, best_of=1,
                                        suffix="")
    assert comp.usage.completion_tokens == 2


@slow
async def test_sampling_fields_are_refused_until_the_wire_carries_them(http):
    """Before engine-side support lands, a non-neutral penalty / bias is a 400 naming it
    (never ignored); once proto.SamplingParams has the field it reaches the worker."""
    for field, value in (("presence_penalty", 0.5), ("frequency_penalty", -1.0),
                         ("repetition_penalty", 1.2), ("logit_bias", {"5": 3.0})):
        r = await http.post("/v1/chat/completions", json=_chat(**{field: value}))
        if field in _WIRE:
            assert r.status_code == 200, (field, r.text)
        else:
            assert r.status_code == 400, (field, r.text)
            assert r.json()["error"]["param"] == field


@slow
async def test_echo(oai, stack):
    comp = await oai.completions.create(model=MOCKER, prompt="Once upon a time", max_tokens=6,
                                        seed=4)
    echoed = await oai.completions.create(model=MOCKER, prompt="Once upon a time", max_tokens=6,
                                          seed=4, echo=True)
    assert echoed.choices[0].text == "Once upon a time" + comp.choices[0].text
    assert echoed.usage.prompt_tokens == comp.usage.prompt_tokens
    assert echoed.usage.completion_tokens == 6
    stream = await oai.completions.create(model=MOCKER, prompt="Once upon a time", max_tokens=6,
                                          seed=4, echo=True, stream=True)
    events = [ev async for ev in stream]
    assert events[0].choices[0].text == "Once upon a time"  # the first chunk carries it
    assert "".join(ev.choices[0].text for ev in events if ev.choices) == echoed.choices[0].text
    # a token-id prompt is echoed as its text
    ids = load_tokenizer("tiny").encode("Hello world")
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.post(stack.frontend.url + "/v1/completions",
                            json={"model": MOCKER, "prompt": ids, "max_tokens": 2, "echo": True})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"].startswith("Hello world")


async def _started(stack) -> dict[int, float]:
    return {w.instance_id: metric(await w.metrics(), "genset_worker_requests_started_total")
            for w in stack.workers}


@slow
async def test_n_choices(oai, stack):
    prompt = [{"role": "user", "content": "choose " * 100}]
    before = await _started(stack)
    chat = await oai.chat.completions.create(model=MOCKER, messages=prompt, max_tokens=8, n=3,
                                             seed=21)
    after = await _started(stack)
    assert [c.index for c in chat.choices] == [0, 1, 2]
    texts = [c.message.content for c in chat.choices]
    assert len(set(texts)) == 3  # seeded: seed + i per choice, so they differ
    single = await oai.chat.completions.create(model=MOCKER, messages=prompt, max_tokens=8,
                                               seed=21)
    assert single.choices[0].message.content == texts[0]  # choice 0 is the n = 1 request
    assert chat.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counted once
    assert chat.usage.completion_tokens == 24
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + 24
    # all three on one worker (sharing the prompt's KV there)
    grew = sorted(after[w] - before[w] for w in before)
    assert grew[-1] == 3 and sum(grew) == 3, grew

    stream = await oai.chat.completions.create(model=MOCKER, messages=prompt, max_tokens=8, n=3,
                                               seed=21, stream=True,
                                               stream_options={"include_usage": True})
    parts: dict[int, list[str]] = {0: [], 1: [], 2: []}
    finishes, roles, usage = {}, set(), None
    async for ev in stream:
        for c in ev.choices:
            parts[c.index].append(c.delta.content or "")
            if c.delta.role:
                roles.add(c.index)
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
        if ev.usage is not None:
            usage = ev.usage
    assert ["".join(parts[i]) for i in range(3)] == texts
    assert finishes == {0: "length", 1: "length", 2: "length"} and roles == {0, 1, 2}
    assert usage.completion_tokens == 24 and usage.prompt_tokens == chat.usage.prompt_tokens

    for model in (MOCKER, TORCH):
        comp = await oai.completions.create(model=model, prompt="tell me", max_tokens=5, n=2,
                                            seed=3, echo=True)
        assert [c.index for c in comp.choices] == [0, 1]
        assert all(c.text.startswith("tell me") for c in comp.choices)
        assert comp.usage.completion_tokens == 10


@slow
async def test_n_choices_share_the_prefill_on_torch(oai, stack):
    """n = 2 on the real engine: the second choice's prompt comes from the first one's KV."""
    torch_worker = next(w for w in stack.workers if TORCH in w.argv)
    before = metric(await torch_worker.metrics(), "genset_worker_cached_prompt_tokens_total")
    prompt = [{"role": "user", "content": "shared prefix " * 40}]
    chat = await oai.chat.completions.create(model=TORCH, messages=prompt, max_tokens=4, n=2,
                                             temperature=0)
    after = metric(await torch_worker.metrics(), "genset_worker_cached_prompt_tokens_total")
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy
    # the second choice found (at least) the prompt's full blocks cached but the last
    assert after - before >= chat.usage.prompt_tokens - 2 * 16, (before, after)


@slow
async def test_user_reaches_the_logs(oai, stack):
    marker = f"user-{time.monotonic_ns()}"
    chat = await oai.chat.completions.create(model=MOCKER, messages=USER, max_tokens=2,
                                             user=marker)
    request_id = chat.id.removeprefix("chatcmpl-")
    deadline = time.monotonic() + 30
    while True:
        lines = [json.loads(line) for line in stack.frontend.log_path.read_text().splitlines()
                 if marker in line]
        if lines:
            break
        assert time.monotonic() < deadline, stack.frontend.log_tail()
        await asyncio.sleep(0.1)
    assert lines[0]["user"] == marker and lines[0]["request_id"] == request_id


async def _greedy_twice(oai, model: str) -> None:
    messages = [{"role": "user", "content": "Determinism, please: count to ten."}]
    texts = []
    for _ in range(2):
        chat = await oai.chat.completions.create(model=model, messages=messages, max_tokens=24,
                                                 temperature=0)
        texts.append(chat.choices[0].message.content)
    stream = await oai.chat.completions.create(model=model, messages=messages, max_tokens=24,
                                               temperature=0, stream=True)
    texts.append("".join([ev.choices[0].delta.content or "" async for ev in stream
                          if ev.choices]))
    comps = [(await oai.completions.create(model=model, prompt="1, 2, 3,", max_tokens=16,
                                           temperature=0)).choices[0].text for _ in range(2)]
    assert texts[0] and texts[0] == texts[1] == texts[2], texts
    assert comps[0] == comps[1], comps


@slow
async def test_greedy_determinism_torch(oai):
    await _greedy_twice(oai, TORCH)


@slow
async def test_greedy_determinism_mocker(oai):
    await _greedy_twice(oai, MOCKER)


@slow
@needs_sampling_wire
async def test_logit_bias_and_penalties_torch(oai, http):
    base = await oai.completions.create(model=TORCH, prompt="a b c", max_tokens=8, temperature=0)
    forced = await http.post("/v1/completions", json={
        "model": TORCH, "prompt": "a b c", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
        "logit_bias": {"72": 100}})
    assert forced.status_code == 200, forced.text
    assert forced.json()["choices"][0]["text"] != base.choices[0].text
    penal = await oai.completions.create(model=TORCH, prompt="a b c", max_tokens=8,
                                         temperature=0, frequency_penalty=2.0,
                                         presence_penalty=2.0)
    assert penal.usage.completion_tokens >= 1


@slow
@needs_sampling_wire
async def test_logprobs_torch(oai):
    chat = await oai.chat.completions.create(model=TORCH, messages=USER, max_tokens=5,
                                             temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    comp = await oai.completions.create(model=TORCH, prompt="a b c", max_tokens=4,
                                        temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    stream = await oai.chat.completions.create(model=TORCH, messages=USER, max_tokens=5,
                                               temperature=0, logprobs=True, top_logprobs=3,
                                               stream=True)
    streamed = [t async for ev in stream if ev.choices and ev.choices[0].logprobs
                for t in ev.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]


@slow
async def test_responses_match_the_published_schemas(http):
    """Live responses validate against the schemas /openapi.json publishes for them."""
    doc = (await http.get("/openapi.json")).json()

    def check(instance, name: str) -> None:
        schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
        jsonschema.validate(instance, schema, cls=jsonschema.Draft202012Validator)

    r = await http.post("/v1/chat/completions", json=_chat(n=2, seed=1))
    check(r.json(), "ChatCompletion")
    r = await http.post("/v1/completions", json=_comp(echo=True))
    check(r.json(), "Completion")
    r = await http.post("/v1/chat/completions", json=_chat(temperature=9))
    check(r.json(), "ErrorResponse")
    check((await http.get("/v1/models")).json(), "ModelList")
    check((await http.get(f"/v1/models/{MOCKER}")).json(), "Model")
    for path, body, name in (("/v1/chat/completions", _chat(stream=True, n=2), "ChatCompletionChunk"),
                             ("/v1/completions", _comp(stream=True, stream_options={
                                 "include_usage": True}), "CompletionChunk")):
        r = await http.post(path, json=body)
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        for event in events[:-1]:
            check(json.loads(event), name)


# -- unit checks of the pure parts (fast suite) ----------------------------------------------


def test_refusals_decided_before_any_worker_is_asked():
    """The refusals that need no model: decoding + check_* name the same field as the stack."""
    from services.frontend import openai_api as oa
    from services.frontend.errors import ApiError
    from services.frontend.http_app import _decode

    # refused later: by the endpoint or by Pipeline.prepare (model, vocabulary, engine)
    later = {"logprobs", "prompt", "max_completion_tokens", "messages[0].content[0]", "echo"}
    for path, body, param in REFUSED:
        if param in later or body.get("logit_bias") == {"99999999": 1}:
            continue
        decoder, check = ((oa.chat_decoder, oa.check_chat) if path == "chat"
                          else (oa.completion_decoder, oa.check_completion))
        with pytest.raises(ApiError) as info:
            check(_decode(decoder, json.dumps(body).encode()))
        assert info.value.status == 400 and info.value.param == param, (body, info.value.body())


def test_chunk_writer_names_the_choice_index():
    from services.frontend import openai_api as oa

    w = oa.ChunkWriter(chat=True, response_id="r", model="m", created=1)
    first = json.loads(w.text("a", True, 2)[6:])
    assert first["choices"][0]["index"] == 2 and first["choices"][0]["delta"]["role"] == "assistant"
    assert json.loads(w.text("b", False, 0)[6:])["choices"][0] == {
        "index": 0, "delta": {"content": "b"}, "logprobs": None, "finish_reason": None}
    assert json.loads(w.finish("stop", False, 1)[6:])["choices"][0]["index"] == 1
    c = oa.ChunkWriter(chat=False, response_id="r", model="m", created=1)
    assert json.loads(c.text("x", False, 3)[6:])["choices"][0]["text"] == "x"


def test_logprobs_shapes():
    from services.frontend import openai_api as oa

    tok = load_tokenizer("tiny")
    ids = tok.encode("Hello world")
    entries = [(t, -0.5, [(t, -0.5), (t + 1, -1.5)]) for t in ids]
    chat = oa.chat_logprobs(tok, entries)["content"]
    assert "".join(e["token"] for e in chat) == "Hello world"
    assert chat[0]["top_logprobs"][1]["logprob"] == -1.5
    assert bytes(chat[0]["bytes"]).decode() == chat[0]["token"]
    comp = oa.completion_logprobs(tok, entries, text_offset=5)
    assert comp["text_offset"][0] == 5 and len(comp["tokens"]) == len(ids)
    assert comp["text_offset"][1] == 5 + len(comp["tokens"][0])
    assert all(len(m) == 2 for m in comp["top_logprobs"])


def _app():
    from types import SimpleNamespace

    from services.frontend.http_app import FrontendHttp

    return FrontendHttp(SimpleNamespace(metrics=None), health=dict, metrics_text=bytes)


def test_openapi_document_is_valid_and_covers_every_route():
    from openapi_spec_validator import validate

    from services.frontend import openapi

    doc = openapi.build()
    validate(doc)  # raises with the path of the first violation
    json.loads(openapi.document_bytes())
    app = _app()
    served = {(path, method.lower()) for path, (method, _) in app.routes.items()}
    served |= {(doc_path, method.lower()) for _, doc_path, (method, _) in app.prefix_routes}
    documented = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert served == documented, (served - documented, documented - served)
    # the enforced ranges are the documented ones
    props = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    temperature = props["temperature"]["anyOf"][0]
    assert (temperature["minimum"], temperature["maximum"]) == (0, 2)
    assert props["messages"]["items"]["$ref"].endswith("/ChatMessage")
