"""Real processes for the tests that start `genset up` (or read what a stack left running):
free ports, the process tree under a pid from /proc, a log line waited for, everything killed.

Linux only (/proc), like the tests that use it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

# free_port is re-exported for the tests: it never hands out a port twice in this process.
from genset.runtime.infra import free_port  # noqa: F401

REPO = Path(__file__).resolve().parents[2]


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (Linux /proc)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for c in map(int, children):
                if c not in found:
                    found.add(c)
                    todo.append(c)
    return found


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def cmdline(pid: int) -> str:
    """The command line of `pid`, "" when it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention `text` (our state dir / clone path)."""
    hits = []
    for proc in Path("/proc").glob("[0-9]*"):
        line = cmdline(int(proc.name))
        if text in line and alive(int(proc.name)):
            hits.append(f"{proc.name}: {line}")
    return hits


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of `pid` from /proc/PID/status (VmRSS now, VmHWM its peak), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for {pid}")


def wait_for_line(proc: subprocess.Popen, log: Path, pattern: str, within: float) -> str:
    """The log's text once `pattern` is in it; fails with the log if `proc` (genset up) exits
    first or `within` seconds pass."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if re.search(pattern, text):
            return text
        if proc.poll() is not None:
            raise AssertionError(f"genset up exited with {proc.returncode}:\n{text}")
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} after {within:.0f}s:\n{log.read_text(errors='replace')}")


def start_up(cwd: Path, log: Path, *args: str,
             extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """`genset up ARGS` run from `cwd` with that tree's code, output to `log`, in a session of
    its own; the test's GENSET_* variables are dropped, `extra_env` is added."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENSET_")}
    env.update(extra_env or {})
    env["PYTHONPATH"] = str(cwd)  # the clone's code, not the checkout the venv points at
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "genset.cli", "up", *args], cwd=cwd,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)


def kill_all(proc: subprocess.Popen, pids: set[int]) -> None:
    """SIGKILL `proc` and `pids` (what is gone already is skipped)."""
    for pid in {proc.pid, *pids}:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
