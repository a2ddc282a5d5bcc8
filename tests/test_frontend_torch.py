"""The frontend in front of the real torch engine (tiny built-in model, CPU): chat template,
tokenization and incremental detokenization against a real model's token stream."""

from __future__ import annotations

import openai
import pytest

from tests.stack import Stack

pytestmark = pytest.mark.slow


async def test_streamed_text_equals_collected_text_with_real_model(nats_server, etcd_server, tmp_path):
    async with Stack(nats_server.url, etcd_server.endpoint, log_dir=tmp_path) as st:
        await st.start_workers(1, engine="torch", model="tiny")
        fe = await st.start_frontend()
        oai = openai.AsyncOpenAI(base_url=fe.url + "/v1", api_key="x", max_retries=0)
        messages = [{"role": "user", "content": "Schreib etwas über Grüße und 東京 🙂"}]
        full = await oai.chat.completions.create(model="tiny", messages=messages, max_tokens=48,
                                                 temperature=0)
        text = full.choices[0].message.content
        assert full.usage.completion_tokens == 48 or full.choices[0].finish_reason == "stop"
        stream = await oai.chat.completions.create(model="tiny", messages=messages, max_tokens=48,
                                                   temperature=0, stream=True)
        pieces = [ev.choices[0].delta.content or "" async for ev in stream if ev.choices]
        assert "".join(pieces) == text  # greedy: same tokens, same text, chunked or not

        # a stop string cut from the middle of that text ends the reply right before it
        words = [w for w in text.split(" ") if len(w) >= 3]
        if words:
            stop = words[len(words) // 2]
            cut = await oai.chat.completions.create(model="tiny", messages=messages,
                                                    max_tokens=48, temperature=0, stop=[stop])
            assert cut.choices[0].finish_reason == "stop"
            assert cut.choices[0].message.content == text[:text.find(stop)]
