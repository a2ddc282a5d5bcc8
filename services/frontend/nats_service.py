"""The frontend's generate service for NATS-native clients (`proto.client.ClientGenerateRequest`
on `proto.subjects.frontend_generate(ns)`, one queue group across frontends).

The same pipeline as HTTP: chat template, tokenization, routing, migration, stop strings.
Each reply frame carries the token ids of a worker chunk and, in `data`, a msgpack
`ClientDelta` with their text; the final frame carries finish_reason and usage. A client's
proto.Cancel stops the generation and cancels the worker's stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import structlog

import proto
from proto import subjects
from proto.client import ClientDelta, ClientGenerateRequest
from proto.tokens import pack_tokens
from services.frontend.errors import ApiError, bad_request
from services.frontend.pipeline import Job, JobRequest, Pipeline
from services.frontend.text import Delta

log = structlog.get_logger("frontend.nats")

QUEUE_GROUP = "frontend"
_encode_delta = proto.codec.encode


class NatsGenerateService:
    def __init__(self, pipeline: Pipeline, bus, namespace: str, *, max_concurrent: int = 4096) -> None:
        self.pipeline = pipeline
        self.bus = bus
        self.namespace = namespace
        self.max_concurrent = max_concurrent
        self.subscription = None

    @property
    def subject(self) -> str:
        return subjects.frontend_generate(self.namespace)

    async def start(self) -> None:
        self.subscription = await self.bus.serve_stream(
            self.subject, self.handle, queue=QUEUE_GROUP, max_concurrent=self.max_concurrent,
            request_type=ClientGenerateRequest)

    async def stop(self) -> None:
        if self.subscription is not None:
            with contextlib.suppress(Exception):
                await self.subscription.unsubscribe()
            self.subscription = None

    async def _job(self, req: ClientGenerateRequest) -> Job:
        arrival = time.perf_counter()
        given = [name for name, value in (("messages", req.messages), ("prompt", req.prompt),
                                          ("token_ids", req.token_ids)) if value is not None]
        if len(given) != 1:
            raise bad_request("set exactly one of messages, prompt, token_ids "
                              f"(got {', '.join(given) or 'none'})")
        s = req.sampling
        if s.logprobs is not None:
            # the NATS client's reply frames carry text and token ids only
            raise bad_request("sampling.logprobs: log-probabilities are returned by the HTTP "
                              "API only, not over the NATS client API", param="logprobs")
        return await self.pipeline.prepare(JobRequest(
            endpoint="nats", request_id=req.request_id or uuid.uuid4().hex,
            model=req.model or None, arrival=arrival,
            messages=None if req.messages is None else
            [{"role": m.role, "content": m.content} for m in req.messages],
            text=req.prompt, packed_token_ids=req.token_ids, max_tokens=req.max_tokens,
            temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed,
            presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
            repetition_penalty=s.repetition_penalty, logit_bias=dict(s.logit_bias),
            stop_strings=req.stop, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
            detokenize=req.detokenize, timeout=req.timeout_s))

    async def handle(self, req: ClientGenerateRequest, rs) -> None:
        task = asyncio.current_task()

        async def watch_cancel() -> None:
            await rs.cancelled.wait()
            task.cancel()

        watcher = asyncio.create_task(watch_cancel())
        metrics = self.pipeline.metrics
        status = "200"
        model = req.model or "-"
        try:
            job = await self._job(req)
            model = job.model
            metrics.inflight.labels(model).inc()
            try:
                status = await self._run(job, rs)
            finally:
                metrics.inflight.labels(model).dec()
                metrics.duration.labels(model).observe(time.perf_counter() - job.arrival)
        except ApiError as err:
            status = str(err.status)
            if not rs.cancelled.is_set():
                await rs.fail(err.to_error_info())
        except asyncio.CancelledError:
            if not rs.cancelled.is_set():
                raise
            task.uncancel()
            status = "disconnected"
            metrics.disconnects.labels(model).inc()
        finally:
            watcher.cancel()
            metrics.requests.labels(model, "nats", status).inc()

    async def _run(self, job, rs) -> str:
        gen = self.pipeline.generate(job)
        try:
            async for item in gen:
                if type(item) is Delta:
                    await rs.send(pack_tokens(item.token_ids),
                                  data=_encode_delta(ClientDelta(text=item.text)) if item.text else None)
                else:
                    await rs.send(finish_reason=item.finish_reason, final=True, usage=proto.Usage(
                        prompt_tokens=item.prompt_tokens, completion_tokens=item.completion_tokens,
                        cached_tokens=item.cached_tokens))
            return "200"
        finally:
            await gen.aclose()
