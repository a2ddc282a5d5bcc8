"""The `genset` command: one entry point, one subcommand per service or tool.

Subcommands are looked up by module name and imported only when chosen, so `genset frontend`
never imports torch and `genset --help` starts fast. This module is the composition root:
it names service packages as strings and never imports them at module level.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with `main(argv: list[str]) -> int`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("genset.launch", "start a whole local stack (NATS, etcd, router, frontend, workers)"),
    "frontend": ("services.frontend.__main__", "OpenAI-compatible HTTP frontend (+ NATS generate service)"),
    "router": ("services.router.__main__", "KV-aware router service"),
    "worker": ("services.decode.__main__", "worker hosting an engine (--engine torch|mocker|trtllm)"),
    "offload": ("services.kv_offload.__main__", "KV offload store: evicted KV blocks in RAM and on disk, for any worker to onboard"),
    "planner": ("services.planner.__main__", "planner: sizes the worker pools from load and SLOs (local, compose, kubernetes)"),
    "replay": ("genset.replay.__main__", "replay a Mooncake trace through the router and mocker workers in simulated time"),
    "chat": ("genset.chat", "chat with a model over NATS (no HTTP)"),
    "schema": ("proto.schema", "print the JSON Schema of every wire message"),
}

# Subcommands whose module cannot name itself `genset <command>` (proto/ imports nothing of
# ours, and also runs as `python -m proto.schema`): their `main` takes `prog=`.
TAKES_PROG = frozenset({"schema"})


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: genset <command> [options]   (genset <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {helptext}" for name, (_, helptext) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name in ("--version", "version"):
        from importlib.metadata import version

        from proto import PROTOCOL_VERSION

        print(f"genset {version('genset')} (protocol {PROTOCOL_VERSION})")
        return 0
    if name not in COMMANDS:
        print(f"genset: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    if name in TAKES_PROG:
        return int(module.main(rest, prog=f"genset {name}") or 0)
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
