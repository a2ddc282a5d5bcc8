"""`genset router` / `python -m services.router`: the KV-aware router service."""

from __future__ import annotations

import sys

from genset.runtime.service import service_main
from services.router.service import RouterOptions, RouterService


def main(argv: list[str] | None = None) -> int:
    return service_main(argv, RouterService, prog="genset router", options_cls=RouterOptions,
                        description="KV-aware router: answers route requests over NATS")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
