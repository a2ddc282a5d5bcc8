"""`genset frontend` / `python -m services.frontend`: the OpenAI-compatible frontend."""

from __future__ import annotations

import sys

from genset.runtime.service import service_main


def main(argv: list[str] | None = None) -> int:
    from services.frontend.service import FrontendOptions, FrontendService

    return service_main(argv, FrontendService, prog="genset frontend",
                        description="OpenAI-compatible HTTP frontend and NATS generate service",
                        options_cls=FrontendOptions)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
