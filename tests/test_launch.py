"""`genset up` end to end: from a fresh clone it starts NATS, etcd, workers and the frontend,
serves a chat completion, and on Ctrl-C leaves no process behind; a child that dies while
starting stops everything with a message naming it and the tail of its log."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess

import httpx
import pytest

from genset.runtime.infra import port_open
from tests.helpers.processes import (
    REPO,
    alive,
    cmdline,
    descendants,
    free_port,
    kill_all,
    processes_mentioning,
    start_up,
    wait_for_line,
)


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


def test_router_plan_embeds_the_router_with_one_frontend():
    """`genset up --router MODE --frontends N`: whether a router service starts and what the
    frontends are told."""
    from genset.launch import build_parser, router_plan

    assert build_parser().parse_args([]).router == "auto"
    assert router_plan("auto", 1) == (False, "embedded")  # the default stack: no service
    assert router_plan("auto", 2) == (True, "service")
    assert router_plan("auto", 3) == (True, "service")
    assert router_plan("service", 1) == (True, "service")
    assert router_plan("embedded", 2) == (False, "embedded")
    assert router_plan("round-robin", 1) == (False, "round-robin")


def test_bad_flags_are_refused_before_anything_starts(tmp_path, capsys):
    from genset.launch import main

    assert main(["--workers", "0", "--state-dir", str(tmp_path / "s")]) == 1
    assert "--workers must be at least 1" in capsys.readouterr().err
    assert main(["--frontends", "0", "--state-dir", str(tmp_path / "s")]) == 1
    assert "--frontends must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--engine", "nope"])
    with pytest.raises(SystemExit):
        main(["--offload-ram-gb", "-1"])
    assert "--offload-ram-gb: must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--offload-disk-gb", "inf"])
    assert "--offload-disk-gb: must be a finite number" in capsys.readouterr().err
    # these used to start NATS, etcd and the workers before a child refused them
    for argv, message in ((["--port", "70000"], "--port must be within 0..65535"),
                          (["--port", "-1"], "--port must be within 0..65535"),
                          (["--start-timeout", "nan"], "--start-timeout must be a number > 0"),
                          (["--stop-timeout", "0"], "--stop-timeout must be a number > 0"),
                          (["--speedup", "-2"], "--speedup must be a number > 0")):
        assert main([*argv, "--state-dir", str(tmp_path / "s")]) == 1
        assert message in capsys.readouterr().err
        assert not (tmp_path / "s").exists()  # nothing started


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
        # the default stack, one frontend: the router embedded in it, no router service
        assert "router: embedded in the frontend" in text and "router: starting" not in text
        assert not [p for p in pids if "genset.cli router " in cmdline(p)], pids
        [frontend] = [p for p in pids if "genset.cli frontend " in cmdline(p)]
        assert "--router embedded" in cmdline(frontend)
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


@pytest.mark.slow
def test_genset_up_with_two_frontends_serves_from_both_on_one_port(tmp_path):
    """`--frontends 2`: two frontend processes share --port (SO_REUSEPORT); new connections
    are spread over both (each counts requests on its own status port); SIGTERM stops all."""
    from tests.stack import metric, parse_metrics

    port = free_port()
    log = tmp_path / "up.log"
    proc = start_up(REPO, log, "--engine", "mocker", "--workers", "1", "--frontends", "2",
                    "--insecure", "--port", str(port), "--state-dir", str(tmp_path / "state"),
                    "--nats", f"nats://127.0.0.1:{free_port()}",
                    "--etcd", f"127.0.0.1:{free_port()}")
    pids: set[int] = set()
    try:
        text = wait_for_line(proc, log, r"Ctrl-C stops everything", within=180)
        assert "frontend-1: starting" in text and "frontend-2: starting" in text
        assert "2 frontends" in text
        pids = descendants(proc.pid)
        # several frontends share the router service (their decisions meet there)
        assert "router ready" in text
        assert len([p for p in pids if "genset.cli router " in cmdline(p)]) == 1, pids
        status_ports = [int(re.search(r"--metrics-port (\d+)", cmdline(p)).group(1))
                        for p in pids if " frontend " in cmdline(p)]
        assert len(status_ports) == 2, [cmdline(p) for p in pids]
        for i in range(24):  # a new connection each: the kernel picks a listener per connection
            resp = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                              json={"model": "tiny", "prompt": f"hi {i}", "max_tokens": 2})
            assert resp.status_code == 200, resp.text
        served = [metric(parse_metrics(httpx.get(f"http://127.0.0.1:{p}/metrics",
                                                 timeout=30).text),
                         "genset_frontend_requests_total")
                  for p in status_ports]
        # both served (all 24 on one of two listeners: a chance of 2 in 2^24)
        assert sum(served) == 24 and min(served) > 0, served
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
        assert not [p for p in pids if alive(p)]
    finally:
        kill_all(proc, pids | descendants(proc.pid))
