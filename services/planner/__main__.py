"""`genset planner` / `python -m services.planner`: sizes the worker pools.

    genset planner --policy load --min-workers 1 --max-workers 4
    genset planner --policy slo --ttft-ms 500 --itl-ms 40 --pools decode,prefill
    genset planner --dry-run            # print decisions only
"""

from __future__ import annotations

import argparse
import sys

from genset.runtime.config import (
    ConfigError,
    DefaultsHelpFormatter,
    add_common_args,
    add_dataclass_args,
    common_config,
    dataclass_from_args,
)
from genset.runtime.service import run_service
from services.planner.service import PlannerOptions, PlannerService

DESCRIPTION = ("Planner: sizes the decode / prefill worker pools from load and SLOs and "
               "applies the sizes (local processes, docker compose or Kubernetes).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genset planner", description=DESCRIPTION,
        formatter_class=DefaultsHelpFormatter)
    add_common_args(parser)
    add_dataclass_args(parser, PlannerOptions, group_title="genset planner options")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = common_config(args)
        options = dataclass_from_args(PlannerOptions, args)
    except ConfigError as exc:
        parser.error(str(exc))
    return run_service(lambda cfg: PlannerService(cfg, options), config)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
