"""Where the shared traces are (`../shared/data` beside the checkout), for the tests that read
them: `GENSET_DATA` if set (as the benches take it), else beside the checkout, else beside the
checkout's parent (a git worktree under /work/wt/X next to /work/main), so a run from a
worktree reads the traces instead of skipping."""

from __future__ import annotations

import os
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]


def shared_data() -> Path:
    env = os.environ.get("GENSET_DATA")
    if env:
        return Path(env)
    beside = _ROOT.parent / "shared" / "data"
    if beside.exists():
        return beside
    above = _ROOT.parents[1] / "shared" / "data"
    return above if above.exists() else beside
