"""`python -m services.prefill`: a prefill worker, i.e. `genset worker --role prefill`.

    python -m services.prefill --engine torch --model tiny

It computes prompts' KV for decode workers (genset.disagg.worker) and never takes ordinary
requests from routers. Every worker flag applies; `--role` is fixed to `prefill`. The worker
service itself is `genset worker` (services/decode): this package goes through the `genset`
command rather than importing another service.
"""

from __future__ import annotations

import sys

from genset.cli import main as genset_main

PROG = "python -m services.prefill"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--role" or a.startswith("--role=") for a in argv):
        print(f"{PROG}: the role is always prefill here (use `genset worker --role ...`)",
              file=sys.stderr)
        return 2
    return genset_main(["worker", "--role", "prefill", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
