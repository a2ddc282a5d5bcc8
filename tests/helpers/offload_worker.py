"""A live mocker worker with the offload hook (real bus and etcd): what the offload tests
that run one against a real store share."""

from __future__ import annotations

import contextlib
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import proto
from genset.engines.mocker import MockerConfig, create_mocker_engine
from genset.runtime.metrics import Metrics
from genset.worker import HostConfig, WorkerHost
from genset.worker.offload_hook import OffloadHook, OffloadHookConfig


@dataclass
class OffloadWorker:
    engine: Any
    hook: OffloadHook
    host: WorkerHost
    wait_s: float

    @contextlib.asynccontextmanager
    async def serving(self, store) -> AsyncIterator[None]:
        """The worker started, once it sees `store` (a running store), closed on exit."""
        from tests.test_offload_service import wait_for

        await self.host.start()
        try:
            await wait_for(lambda: self.hook.client.instances == (store.instance_id,),
                           "the store seen by the worker")
            yield
        finally:
            await self.host.close()

    async def generate(self, bus, prompt: list[int]) -> tuple[list[int], proto.Usage]:
        """Greedy, 4 tokens: the output tokens and the final frame's usage."""
        req = proto.GenerateRequest(
            request_id=uuid.uuid4().hex, model="m", token_ids=proto.pack_tokens(prompt),
            stop=proto.StopConditions(max_tokens=4, ignore_eos=True),
            sampling=proto.SamplingParams(temperature=0.0))
        stream = await bus.stream_request(self.host.generate_subject, req, timeout=self.wait_s)
        chunks = [c async for c in stream]
        assert chunks[-1].final and chunks[-1].error is None, chunks[-1]
        return [t for c in chunks for t in proto.unpack_tokens(c.token_ids)], chunks[-1].usage


def offload_worker(config: MockerConfig, *, bus, discovery, namespace: str,
                   wait_s: float) -> OffloadWorker:
    """A worker (not started) whose mocker runs `config`, with the offload hook."""
    iid = int(uuid.uuid4().int & ((1 << 63) - 1)) or 1
    metrics = Metrics(process_metrics=False)
    engine = create_mocker_engine(config, worker_id=iid)
    hook = OffloadHook(discovery=discovery, metrics=metrics,
                       config=OffloadHookConfig(deadline_s=wait_s))
    host = WorkerHost(engine, bus=bus, discovery=discovery, instance_id=iid, metrics=metrics,
                      hooks=hook, config=HostConfig(namespace=namespace, model="m",
                                                    tokenizer="tiny"))
    return OffloadWorker(engine=engine, hook=hook, host=host, wait_s=wait_s)


def prompt_of(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 4096) for _ in range(n)]
