"""`genset offload` / `python -m services.kv_offload`: the tiered KV offload store."""

from __future__ import annotations

import sys

from genset.runtime.service import service_main
from services.kv_offload.service import OffloadOptions, OffloadService


def main(argv: list[str] | None = None) -> int:
    return service_main(argv, OffloadService, prog="genset offload", options_cls=OffloadOptions,
                        description="KV offload store: evicted KV blocks kept in RAM and on "
                                    "disk for any worker to bring back")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
