"""`make test` (and so `.ci/run`) must fail when pytest collects no test (its exit code 5)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ci_entry_is_exactly_make_test():
    script = (ROOT / ".ci" / "run").read_text()
    commands = [line for line in script.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1].strip() == "exec make test"
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_test_fails_when_no_test_is_collected():
    if not (ROOT / ".venv" / ".installed-test").exists():  # the Makefile's test stamp
        pytest.skip("needs the .venv that make sets up")
    result = subprocess.run(
        ["make", "-s", "test", "PYTEST_ARGS=-k no_test_has_this_name_xyz"],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode != 0, result.stdout + result.stderr
    assert "collected no tests" in result.stderr
