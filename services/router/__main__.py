"""`genset router` / `python -m services.router`: the KV-aware router service."""

from __future__ import annotations

import sys

from genset.runtime.service import service_main


def main(argv: list[str] | None = None) -> int:
    from services.router.service import RouterOptions, RouterService

    return service_main(argv, RouterService, prog="genset router",
                        description="KV-aware router: answers route requests over NATS",
                        options_cls=RouterOptions)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
