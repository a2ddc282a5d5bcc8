"""`genset up` end to end: from a fresh clone it starts NATS, etcd, workers and the frontend,
serves a chat completion, and on Ctrl-C leaves no process behind; a child that dies while
starting stops everything with a message naming it and the tail of its log."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from genset.launch import pick_listen_port
from genset.runtime.infra import port_open

REPO = Path(__file__).resolve().parent.parent
_TAKEN: set[int] = set()


def free_port() -> int:
    return pick_listen_port(_TAKEN)


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
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention `text` (our state dir / clone path)."""
    hits = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and alive(int(proc.name)):
            hits.append(f"{proc.name}: {cmdline}")
    return hits


def wait_for_line(proc: subprocess.Popen, log: Path, pattern: str, within: float) -> str:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if re.search(pattern, text):
            return text
        if proc.poll() is not None:
            raise AssertionError(f"genset up exited with {proc.returncode}:\n{text}")
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} after {within:.0f}s:\n{log.read_text(errors='replace')}")


def start_up(cwd: Path, log: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENSET_")}
    env["PYTHONPATH"] = str(cwd)  # the clone's code, not the checkout the venv points at
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "genset.cli", "up", *args], cwd=cwd,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)


def kill_all(proc: subprocess.Popen, pids: set[int]) -> None:
    for pid in {proc.pid, *pids}:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_genset_up_from_a_fresh_clone_serves_and_stops_clean(tmp_path):
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs the git repository to clone")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True, timeout=120)
    port, nats_port, etcd_port = free_port(), free_port(), free_port()
    log = tmp_path / "up.log"
    proc = start_up(clone, log, "--engine", "mocker", "--workers", "2", "--port", str(port),
                    "--nats", f"nats://127.0.0.1:{nats_port}", "--etcd", f"127.0.0.1:{etcd_port}",
                    "--speedup", "20")
    pids: set[int] = set()
    try:
        text = wait_for_line(proc, log, r"Ctrl-C stops everything", within=180)
        assert f"http://127.0.0.1:{port}/v1" in text and "curl " in text
        assert "nats: starting" in text and "etcd: starting" in text  # nothing was there
        assert "offload store ready" in text  # on by default, disk tier in the state dir
        assert (clone / ".state" / "offload").is_dir()
        pids = descendants(proc.pid)
        assert len(pids) >= 6, pids  # nats, etcd, offload store, 2 workers, frontend
        # the printed curl line, as a user would paste it
        curl = re.search(r"-d '(\{.*\})'", text).group(1)
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", content=curl,
                          headers={"Content-Type": "application/json"}, timeout=60)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["choices"][0]["message"]["content"]
        assert body["usage"]["completion_tokens"] == 32
        assert (clone / ".state" / "logs" / "frontend.log").exists()

        # A worker crash is reported and the stack serves on with the other one.
        [victim] = [p for p in pids if "--role decode" in cmdline(p)][:1]
        os.kill(victim, signal.SIGKILL)
        wait_for_line(proc, log, r"warning: worker-\d exited unexpectedly", within=10)
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", content=curl,
                          headers={"Content-Type": "application/json"}, timeout=60)
        assert resp.status_code == 200, resp.text

        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(60) == 0, log.read_text()
        left = [p for p in pids if alive(p)]
        assert not left, [processes_mentioning(str(clone)), log.read_text()]
        assert not processes_mentioning(str(clone))
        assert not port_open("127.0.0.1", port) and not port_open("127.0.0.1", nats_port)
        assert not port_open("127.0.0.1", etcd_port)
        assert "stopped" in log.read_text()
    finally:
        kill_all(proc, pids)


@pytest.mark.slow
def test_a_child_dying_at_start_stops_everything_with_its_log(tmp_path):
    log = tmp_path / "up.log"
    state = tmp_path / "state"
    proc = start_up(REPO, log, "--engine", "mocker", "--workers", "1", "--port", str(free_port()),
                    "--model", str(tmp_path / "no-such-model"), "--state-dir", str(state),
                    "--nats", f"nats://127.0.0.1:{free_port()}", "--etcd", f"127.0.0.1:{free_port()}")
    try:
        assert proc.wait(60) == 1
    finally:
        kill_all(proc, descendants(proc.pid))
    text = log.read_text()
    assert "worker-1 exited with code 2 while starting" in text, text
    assert "no-such-model" in text  # the worker's own error, from its log tail
    assert not processes_mentioning(str(state)), text  # NATS and etcd it started are gone


def test_bad_flags_are_refused_before_anything_starts(tmp_path, capsys):
    from genset.launch import main

    assert main(["--workers", "0", "--state-dir", str(tmp_path / "s")]) == 1
    assert "--workers must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--engine", "nope"])
    with pytest.raises(SystemExit):
        main(["--offload-ram-gb", "-1"])
    assert "--offload-ram-gb: must be >= 0" in capsys.readouterr().err


@pytest.mark.slow
def test_genset_up_uses_running_nats_and_etcd_and_leaves_them_running(nats_server, etcd_server,
                                                                       tmp_path):
    port = free_port()
    log = tmp_path / "up.log"
    proc = start_up(REPO, log, "--engine", "mocker", "--workers", "1", "--port", str(port),
                    "--nats", nats_server.url, "--etcd", etcd_server.endpoint,
                    "--namespace", "launchtest", "--state-dir", str(tmp_path / "state"))
    pids: set[int] = set()
    try:
        text = wait_for_line(proc, log, r"Ctrl-C stops everything", within=120)
        assert f"nats: using the server at {nats_server.url}" in text
        assert f"etcd: using the server at {etcd_server.endpoint}" in text
        pids = descendants(proc.pid)
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                          json={"model": "tiny", "prompt": "hi", "max_tokens": 3})
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
        assert not [p for p in pids if alive(p)]
        assert nats_server.running and etcd_server.running  # not ours to stop
    finally:
        kill_all(proc, pids)


@pytest.mark.slow
def test_genset_up_with_prefill_workers_serves_disaggregated(tmp_path):
    """`--prefill-workers`: the prefill worker runs as the next worker slot (its own NATS and
    etcd user, genset up's permissions), decode workers find it and send it their prefills."""
    port = free_port()
    log = tmp_path / "up.log"
    state = tmp_path / "state"
    proc = start_up(REPO, log, "--engine", "mocker", "--workers", "1", "--prefill-workers", "1",
                    "--worker-arg=--disagg=always", "--worker-arg=--speedup=20",
                    "--port", str(port), "--state-dir", str(state),
                    "--nats", f"nats://127.0.0.1:{free_port()}",
                    "--etcd", f"127.0.0.1:{free_port()}")
    pids: set[int] = set()
    try:
        text = wait_for_line(proc, log, r"Ctrl-C stops everything", within=180)
        assert "prefill workers: starting 1 (worker-2..worker-2)" in text
        pids = descendants(proc.pid)
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                          json={"model": "tiny", "prompt": "tell me a long story " * 20,
                                "max_tokens": 5})
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 5
        decode_log = (state / "logs" / "worker-1.log").read_text()
        prefill_log = (state / "logs" / "worker-2.log").read_text()
        assert '"role": "prefill"' in prefill_log and "worker ready" in prefill_log
        assert "prefill worker joined" in decode_log
        assert "prefilling locally" not in decode_log and "KV send failed" not in prefill_log
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        kill_all(proc, pids | descendants(proc.pid))
