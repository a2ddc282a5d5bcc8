"""`genset worker` / `python -m services.decode`: a worker hosting one engine.

    genset worker --engine torch --model tiny
    genset worker --engine mocker --model tiny --speedup 10 --kv-blocks 4096

The engine host (`genset.worker`) does the serving; `services.decode.service` turns the
worker's options into an engine and runs the host inside the shared service lifecycle.
"""

from __future__ import annotations

import argparse
import sys

from genset.runtime.service import service_main, service_parser

PROG = "genset worker"
DESCRIPTION = "A worker hosting an engine (decode, prefill or both)."


def build_parser() -> argparse.ArgumentParser:
    """The worker's command line (flags only: values are checked by `main`)."""
    from services.decode.service import WorkerOptions

    return service_parser(prog=PROG, description=DESCRIPTION, options_cls=WorkerOptions)


def main(argv: list[str] | None = None) -> int:
    from services.decode.service import WorkerOptions, WorkerService

    return service_main(argv, WorkerService, prog=PROG, description=DESCRIPTION,
                        options_cls=WorkerOptions)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
