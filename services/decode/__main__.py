"""`genset worker` / `python -m services.decode`: a worker hosting one engine.

    genset worker --engine torch --model tiny
    genset worker --engine mocker --model tiny --speedup 10 --kv-blocks 4096

The engine host (`genset.worker_host`) does the serving; this module turns flags into an
engine and runs the host inside the shared service lifecycle (NATS, etcd lease, /metrics,
/health, SIGTERM drain).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from genset.engines.factory import (
    EngineConfigError,
    build_engine,
    check_engine_available,
    model_facts,
    served_model_name,
)
from genset.runtime.config import ConfigError, add_common_args, common_config
from genset.runtime.service import Service, run_service
from genset.worker_host import HostConfig, WorkerHost


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genset worker",
                                description="A worker hosting an engine (decode or prefill role).")
    add_common_args(p)
    g = p.add_argument_group("worker")
    g.add_argument("--engine", choices=("torch", "mocker", "trtllm"), default="torch",
                   help="torch: runs the model; mocker: timing model, no tensors; trtllm: TensorRT-LLM")
    g.add_argument("--model", default="tiny", help="'tiny' (built in) or a local Hugging Face directory")
    g.add_argument("--served-model-name", default=None,
                   help="model name clients use (default: 'tiny' or the directory name)")
    g.add_argument("--role", choices=("decode", "prefill"), default="decode")
    g.add_argument("--block-size", type=int, default=16, help="KV block size in tokens")
    g.add_argument("--kv-blocks", type=int, default=0,
                   help="KV capacity in blocks (0: the engine sizes it: torch from memory)")
    g.add_argument("--max-batch-tokens", type=int, default=0,
                   help="token budget of one engine step (0: engine default)")
    g.add_argument("--max-running", type=int, default=256, help="sequences batched at once")
    g.add_argument("--context-length", type=int, default=0,
                   help="mocker: context length (0: from the model's config)")
    g.add_argument("--speedup", type=float, default=1.0, help="mocker: run this many times faster")
    g.add_argument("--coalesce-ms", type=float, default=0.5,
                   help="mocker: when modelled steps are shorter than this, send the tokens of "
                        "the steps within this many ms in one frame per request (0: a frame "
                        "per step)")
    g.add_argument("--device", default="auto", help="torch: cpu, cuda, cuda:N or auto")
    g.add_argument("--dtype", default="", help="torch: float32, bfloat16, float16 (default: auto)")
    g.add_argument("--seed", type=int, default=0, help="torch: seed of dummy weights")
    g.add_argument("--max-streams", type=int, default=1024,
                   help="generate streams accepted at once; more are refused as overloaded")
    return p


class WorkerService(Service):
    component = "decode"

    def __init__(self, config, args: argparse.Namespace) -> None:
        self.component = args.role  # before Service.__init__: it names the logger
        super().__init__(config)
        self.args = args
        self.host: WorkerHost | None = None

    async def start(self) -> None:
        a = self.args
        facts = model_facts(a.model)
        # Loading weights blocks for seconds: keep the loop (heartbeats, /health) responsive.
        engine = await asyncio.to_thread(
            build_engine, a.engine, a.model, worker_id=self.instance_id,
            block_size=a.block_size, kv_blocks=a.kv_blocks, max_batch_tokens=a.max_batch_tokens,
            max_running=a.max_running, context_length=a.context_length, speedup=a.speedup,
            device=a.device, dtype=a.dtype, seed=a.seed, coalesce_ms=a.coalesce_ms)
        host_config = HostConfig(
            namespace=self.namespace, model=a.served_model_name or served_model_name(a.model),
            role=a.role, tokenizer=facts.tokenizer, max_streams=a.max_streams,
            http_url=self.http_url)
        self.host = WorkerHost(engine, bus=self.bus, discovery=self.discovery,
                               instance_id=self.instance_id, config=host_config,
                               metrics=self.metrics)
        await self.host.start()
        self.subjects = self.host.instance_record().subjects
        self.labels = {"model": host_config.model, "engine": a.engine}

    async def drain(self) -> None:
        if self.host is not None:
            # leave a little of the service's drain budget for aborting stragglers cleanly
            await self.host.drain(max(0.0, self.config.drain_timeout - 2.0))

    async def stop(self) -> None:
        if self.host is not None:
            await self.host.close()

    def health(self) -> dict:
        body = super().health()
        if self.host is not None:
            base_ready = body["ready"]
            body.update(self.host.health())
            body["ready"] = base_ready and self.host.ready
        return body


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = common_config(args)
        model_facts(args.model)  # a missing model is a flag error, reported before connecting
        check_engine_available(args.engine)
    except (ConfigError, EngineConfigError) as exc:
        parser.error(str(exc))
    for flag in ("block_size", "max_running", "max_streams"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    for flag in ("kv_blocks", "max_batch_tokens", "context_length", "coalesce_ms"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be >= 0")
    return run_service(lambda cfg: WorkerService(cfg, args), config)


if __name__ == "__main__":
    sys.exit(main())
