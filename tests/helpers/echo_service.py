"""Test helper: the smallest real genset service, run with `service_main` / `run_service`.

It answers unary requests on `genset.<ns>.echo.echo` (reply = request bytes) and logs each
one with its request id bound. drain() logs "drain begin", waits `--drain-delay` seconds
(standing in for in-flight work), then logs "drain done".

usage: python tests/helpers/echo_service.py --nats URL --etcd HOST:PORT [--drain-delay S] ...
"""

from __future__ import annotations

import asyncio
import gc
import sys
from dataclasses import dataclass, field

import proto.subjects
from genset.runtime.config import opt
from genset.runtime.logging import bind_request
from genset.runtime.service import CommonConfig, Service, service_main


@dataclass
class EchoOptions:
    drain_delay: float = field(default=0.0, metadata=opt("seconds drain() takes", min=0))


class EchoService(Service):
    component = "echo"

    def __init__(self, config: CommonConfig, options: EchoOptions):
        super().__init__(config)
        self.options = options
        self.requests = self.metrics.counter("echo_requests_total", "echo requests answered")

    async def start(self) -> None:
        subject = proto.subjects.subject(self.namespace, self.component, "echo")

        async def echo(data: bytes) -> bytes:
            with bind_request(f"req-{len(data)}"):
                self.log.info("echo", size=len(data))
            self.requests.inc()
            return data

        await self.bus.serve(subject, echo)
        self.subjects["echo"] = subject

    def health(self) -> dict:
        h = super().health()
        h["gc_frozen"] = gc.get_freeze_count()  # the start-up heap run_service froze
        return h

    async def drain(self) -> None:
        self.log.info("drain begin", delay_s=self.options.drain_delay)
        await asyncio.sleep(self.options.drain_delay)
        self.log.info("drain done")


if __name__ == "__main__":
    raise SystemExit(service_main(sys.argv[1:], EchoService, prog="echo",
                                  options_cls=EchoOptions))
