"""The frontend end to end: real NATS, etcd, mocker workers and frontend processes, driven by
the official `openai` client, raw HTTP and the NATS-native client."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx
import openai
import pytest

import proto
from genset.client import Client, ClientError
from tests.stack import Stack, metric

pytestmark = pytest.mark.slow

MODEL = "tiny"
CONTEXT = 4096


@pytest.fixture(scope="module")
async def stack(nats_server, etcd_server, tmp_path_factory):
    async with Stack(nats_server.url, etcd_server.endpoint,
                     log_dir=tmp_path_factory.mktemp("frontend-e2e")) as st:
        await st.start_workers(2, engine="mocker",
                               extra_args=["--speedup", "10", "--context-length", str(CONTEXT)])
        st.frontend = await st.start_frontend()
        yield st


@pytest.fixture
def oai(stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.frontend.url + "/v1", api_key="unused", max_retries=0)


async def test_models_listed(oai):
    models = await oai.models.list()
    assert [m.id for m in models.data] == [MODEL]


async def test_chat_and_completions_with_openai_client(oai):
    messages = [{"role": "user", "content": "Tell me about München and 東京."}]
    chat = await oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, seed=7)
    u = chat.usage
    assert chat.choices[0].finish_reason == "length"
    assert u.completion_tokens == 12 and u.prompt_tokens > 5
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens is not None
    assert chat.choices[0].message.content

    # the same seed gives the same text, streamed or not
    again = await oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, seed=7)
    assert again.choices[0].message.content == chat.choices[0].message.content
    stream = await oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                               seed=7, stream=True,
                                               stream_options={"include_usage": True})
    parts, usage, finish = [], None, None
    async for ev in stream:
        if ev.choices:
            parts.append(ev.choices[0].delta.content or "")
            finish = ev.choices[0].finish_reason or finish
        if ev.usage is not None:
            usage = ev.usage
    assert "".join(parts) == chat.choices[0].message.content
    assert finish == "length"
    assert usage.completion_tokens == 12 and usage.prompt_tokens == u.prompt_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    other = await oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, seed=8)
    assert other.choices[0].message.content != chat.choices[0].message.content

    comp = await oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=9,
                                        seed=3)
    assert comp.usage.completion_tokens == 9
    assert comp.usage.total_tokens == comp.usage.prompt_tokens + 9
    stream = await oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=9,
                                          seed=3, stream=True,
                                          stream_options={"include_usage": True})
    text, usage = "", None
    async for ev in stream:
        if ev.choices:
            text += ev.choices[0].text
        if ev.usage is not None:
            usage = ev.usage
    assert text == comp.choices[0].text
    assert usage.completion_tokens == 9


async def test_bad_requests_get_openai_errors_and_service_keeps_serving(stack, oai):
    url = stack.frontend.url
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        async def post(body, path="/v1/chat/completions"):
            if isinstance(body, bytes):
                return await http.post(path, content=body,
                                       headers={"content-type": "application/json"})
            return await http.post(path, json=body)

        ok_msgs = [{"role": "user", "content": "hi"}]
        cases = [
            (b"{not json", 400, None, None),
            ({"model": MODEL, "messages": ok_msgs, "max_tokens": "ten"}, 400, "max_tokens", None),
            ({"model": MODEL, "messages": "hello"}, 400, "messages", None),
            ({"model": MODEL, "messages": [{"content": "no role"}]}, 400, "messages[0]", None),
            ({"model": "no-such-model", "messages": ok_msgs}, 404, "model", "model_not_found"),
            ({"model": MODEL, "messages": ok_msgs, "max_tokens": -1}, 400, "max_tokens", None),
            ({"model": MODEL, "messages": []}, 400, "messages", None),
            ({"model": MODEL, "messages": ok_msgs, "n": 0}, 400, "n", None),
            ({"model": MODEL, "messages": [{"role": "user", "content": "word " * (CONTEXT + 10)}]},
             400, "messages", "context_length_exceeded"),
            ({"model": MODEL, "messages": ok_msgs, "max_tokens": CONTEXT}, 400, "max_tokens",
             "context_length_exceeded"),
            ({"model": MODEL, "messages": ok_msgs, "temperature": -1}, 400, "temperature", None),
        ]
        for body, status, param, code in cases:
            r = await post(body)
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], err
            if param is not None:
                assert err["param"] == param, (body, err)
            if code is not None:
                assert err["code"] == code, (body, err)
        r = await post({"model": MODEL, "prompt": [[1, 2], [3]]}, "/v1/completions")
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        r = await http.get("/v1/nothing-here")
        assert r.status_code == 404 and "error" in r.json()

    with pytest.raises(openai.NotFoundError):
        await oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    # still serving
    chat = await oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                             max_tokens=3)
    assert chat.usage.completion_tokens == 3


async def _worker_sum(stack, name: str) -> float:
    total = 0.0
    for w in stack.workers:
        total += metric(await w.metrics(), name)
    return total


async def test_client_disconnect_cancels_worker_stream(stack):
    cancelled_before = await _worker_sum(stack, "genset_worker_requests_cancelled_total")
    url = stack.frontend.url + "/v1/chat/completions"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "long story"}],
            "stream": True, "max_tokens": CONTEXT - 100, "ignore_eos": True}

    async def full_stream() -> int:
        async with httpx.AsyncClient(timeout=60) as http:
            r = await http.post(url, json={**body, "max_tokens": 400,
                                           "stream_options": {"include_usage": True}})
            assert r.status_code == 200
            usage = [line for line in r.text.splitlines() if '"usage"' in line]
            return int(usage[-1].split('"completion_tokens":')[1].split(",")[0])

    bystander = asyncio.create_task(full_stream())
    async with httpx.AsyncClient(timeout=60) as http, http.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        seen = 0
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                seen += 1
            if seen >= 5:
                break
    # leaving the `async with` closed the connection mid-stream
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        cancelled = await _worker_sum(stack, "genset_worker_requests_cancelled_total")
        running = await _worker_sum(stack, "genset_worker_requests_running")
        if cancelled >= cancelled_before + 1 and running <= (0 if bystander.done() else 1):
            break
        await asyncio.sleep(0.1)
    assert cancelled >= cancelled_before + 1, stack.logs()
    assert await bystander == 400  # the other stream was not disturbed
    fm = await stack.frontend.metrics()
    assert metric(fm, "genset_frontend_client_disconnects_total") >= 1


async def test_stop_strings_and_max_completion_tokens(oai):
    # The mocker's text is pseudo-random; take a piece of it as the stop string.
    messages = [{"role": "user", "content": "stop test"}]
    base = await oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, seed=11)
    text = base.choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip()
    cut = await oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, seed=11,
                                            stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[:text.find(stop)]
    assert cut.usage.completion_tokens < 40
    stream = await oai.chat.completions.create(model=MODEL, messages=messages, seed=11, stop=stop,
                                               max_completion_tokens=40, stream=True)
    streamed = "".join([ev.choices[0].delta.content or "" async for ev in stream if ev.choices])
    assert streamed == cut.choices[0].message.content


async def test_nats_client_chat_and_generate(stack):
    async with Client(stack.nats_url, namespace=stack.namespace) as client:
        chunks = [c async for c in client.chat([{"role": "user", "content": "hello"}],
                                               max_tokens=10, seed=5)]
        last = chunks[-1]
        assert last.finish_reason == "length" and last.usage.completion_tokens == 10
        assert sum(len(c.token_ids) for c in chunks) == 10
        text = "".join(c.text for c in chunks)
        assert text
        # the same request over HTTP gives the same text
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.post(stack.frontend.url + "/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "hello"}],
                "max_tokens": 10, "seed": 5})
        assert r.json()["choices"][0]["message"]["content"] == text

        gen = [c async for c in client.generate(token_ids=[5, 6, 7, 8], max_tokens=6,
                                                detokenize=False)]
        assert gen[-1].usage.prompt_tokens == 4 and gen[-1].usage.completion_tokens == 6
        assert await client.complete("Hello", max_tokens=4, model=MODEL)

        # leaving early cancels on the worker
        before = await _worker_sum(stack, "genset_worker_requests_cancelled_total")
        async for _chunk in client.generate("a long one", max_tokens=3000):
            break
        deadline = time.monotonic() + 10
        while await _worker_sum(stack, "genset_worker_requests_cancelled_total") < before + 1:
            assert time.monotonic() < deadline, stack.logs()
            await asyncio.sleep(0.1)

        with pytest.raises(ClientError) as info:
            async for _chunk in client.generate("x", model="no-such-model"):
                pass
        assert info.value.code == "model_not_found"
        with pytest.raises(ClientError) as info:
            async for _chunk in client.generate("x", max_tokens=CONTEXT * 2):
                pass
        assert info.value.code == "context_length_exceeded"


async def test_worker_killed_mid_stream_migrates(nats_server, etcd_server, tmp_path):
    async with Stack(nats_server.url, etcd_server.endpoint, log_dir=tmp_path) as st:
        workers = await st.start_workers(2, engine="mocker",
                                         extra_args=["--speedup", "1", "--lease-ttl", "3"])
        fe = await st.start_frontend(extra_args=["--heartbeat-timeout", "1"])
        oai = openai.AsyncOpenAI(base_url=fe.url + "/v1", api_key="x", max_retries=0)
        stream = await oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "survive"}], max_tokens=150,
            stream=True, stream_options={"include_usage": True})
        n, usage, killed = 0, None, None
        async for ev in stream:
            if ev.choices and ev.choices[0].delta.content:
                n += 1
            if ev.usage is not None:
                usage = ev.usage
            if n == 10 and killed is None:
                for w in workers:
                    if metric(await w.metrics(), "genset_worker_requests_running") >= 1:
                        killed = w
                        w.kill()
                        break
        assert killed is not None
        assert usage is not None and usage.completion_tokens == 150, st.logs()
        fm = await fe.metrics()
        assert metric(fm, "genset_frontend_migrations_total", phase="after_first_token") == 1
        # a new request goes to the survivor
        chat = await oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3)
        assert chat.usage.completion_tokens == 3
        # the last worker gone (SIGTERM: lease revoked) removes the model
        survivor = next(w for w in workers if w is not killed)
        await survivor.stop()
        deadline = time.monotonic() + 10
        while (await oai.models.list()).data:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        with pytest.raises(openai.NotFoundError):
            await oai.chat.completions.create(model=MODEL,
                                              messages=[{"role": "user", "content": "x"}])


async def test_genset_chat_one_shot(stack):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "genset.cli", "chat", "--nats", stack.nats_url,
        "--namespace", stack.namespace, "--prompt", "Hello there", "--max-tokens", "6",
        "--seed", "1", "--usage", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert "[length; prompt" in out.decode() and "completion 6" in out.decode()


async def test_sigterm_drains_inflight_streams(stack):
    fe = await stack.start_frontend()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "drain"}], "stream": True,
            "max_tokens": 600, "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient(timeout=60) as http, \
            http.stream("POST", fe.url + "/v1/chat/completions", json=body) as r:
        lines = []
        async for line in r.aiter_lines():
            lines.append(line)
            if len(lines) == 4:
                fe.terminate()  # SIGTERM while the stream is running
        assert lines[-2] == "data: [DONE]" or lines[-1] == "data: [DONE]"
        usage = [json.loads(x[6:]) for x in lines if '"usage"' in x]
        assert usage[-1]["usage"]["completion_tokens"] == 600
    assert await fe.wait_exit(15) == 0, fe.log_tail()
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(timeout=5) as http:
            await http.get(fe.url + "/health")


async def test_api_key_required_when_configured(stack):
    fe = await stack.start_frontend(models=[], extra_args=["--api-key", "k1,k2"])
    async with httpx.AsyncClient(base_url=fe.url, timeout=30) as http:
        r = await http.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = await http.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = await http.get("/v1/models", headers={"Authorization": "Bearer k2"})
        assert r.status_code == 200 and r.json()["data"][0]["id"] == MODEL
        assert (await http.get("/health")).status_code == 200  # probes need no key
        # /metrics follows the API key (issue 14): it names models, workers and traffic
        r = await http.get("/metrics")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert (await http.get("/metrics", headers={"Authorization": "Bearer no"})).status_code \
            == 401
        r = await http.get("/metrics", headers={"Authorization": "Bearer k1"})
        assert r.status_code == 200 and "genset_frontend_requests_total" in r.text
    oai = openai.AsyncOpenAI(base_url=fe.url + "/v1", api_key="k1", max_retries=0)
    chat = await oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                             max_tokens=2)
    assert chat.usage.completion_tokens == 2
    await fe.stop()


async def test_dead_worker_record_before_first_token_is_skipped(stack):
    """A model card whose worker is gone (nobody listens on its subject) costs a retry, not an
    error: NoResponders before the first token moves the request to another worker."""
    from genset.runtime.discovery import Discovery
    from proto import keys, subjects

    fe = await stack.start_frontend(extra_args=["--router", "round-robin"])
    disc = await Discovery.connect(stack.etcd_endpoint, ttl=5)
    ghost = 0x5EEDBEEF
    try:
        await disc.register(keys.model(stack.namespace, MODEL, ghost), proto.ModelCard(
            model=MODEL, instance_id=ghost, engine="mocker", context_length=CONTEXT,
            tokenizer="tiny", generate_subject=subjects.worker_generate(stack.namespace, "decode",
                                                                        ghost)))
        oai = openai.AsyncOpenAI(base_url=fe.url + "/v1", api_key="x", max_retries=0)
        deadline = time.monotonic() + 10
        while (await oai.models.list()).data[0].model_extra.get("workers") != 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        for _ in range(6):  # round-robin over 3 records: the ghost would be picked twice
            chat = await oai.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2)
            assert chat.usage.completion_tokens == 2
        fm = await fe.metrics()
        # ... but after its first failure it is a suspect, and no other request goes there
        assert metric(fm, "genset_frontend_migrations_total", phase="before_first_token") == 1
        assert metric(fm, "genset_frontend_worker_failures_total", reason="no_responders") == 1
        assert metric(fm, "genset_frontend_suspect_routes_total") == 0
    finally:
        await disc.close()
        await fe.stop()
