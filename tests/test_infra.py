"""The test rig itself: real servers start, answer, restart on the same port and stop."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from genset.runtime.infra import EtcdServer, InfraError, NatsServer, free_port, port_open


def test_nats_server_restart_keeps_port(own_nats):
    port = own_nats.port
    assert port_open("127.0.0.1", port)
    own_nats.stop()
    assert not port_open("127.0.0.1", port)
    own_nats.start()
    assert own_nats.port == port and port_open("127.0.0.1", port)


def test_etcd_answers_health(etcd_server):
    with urllib.request.urlopen(f"{etcd_server.url}/health", timeout=2) as resp:
        assert b'"health":"true"' in resp.read().replace(b" ", b"")


def test_stop_leaves_no_process(own_etcd):
    proc = own_etcd.proc
    own_etcd.stop()
    assert proc.poll() is not None


@pytest.mark.parametrize("setpriv", [True, False], ids=["setpriv", "prctl-fallback"])
def test_a_child_started_with_child_command_dies_with_its_parent(tmp_path, setpriv):
    """`child_command` (setpriv, or the prctl fallback) hands children a parent-death signal:
    a SIGKILLed `genset up` or test run leaves no process behind."""
    import os
    import signal
    import subprocess
    import sys

    from tests.helpers.waiting import until_blocking

    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "import genset.runtime.infra as infra\n"
        f"infra._SETPRIV = infra._SETPRIV if {setpriv} else None\n"
        "argv, preexec = infra.child_command(['sleep', '300'])\n"
        "child = subprocess.Popen(argv, preexec_fn=preexec, start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(300)\n")], start_new_session=True)
    try:
        until_blocking(lambda: pid_file.exists() and pid_file.read_text(), within=60,
                       what="the child's pid")
        child_pid = int(pid_file.read_text())

        def exec_done() -> bool:
            # Popen returns once the child exec'd setpriv (or, for the fallback, once the
            # preexec hook ran); setpriv sets the signal only when it runs. Killing the parent
            # before that (a busy host) would leave no parent-death signal to test: wait until
            # the child is `sleep`, which comes after the signal is set on both paths.
            try:
                with open(f"/proc/{child_pid}/comm") as f:
                    return f.read().strip() == "sleep"
            except FileNotFoundError:
                return False

        until_blocking(exec_done, within=60, what="the child to exec sleep")
        parent.kill()
        parent.wait(30)

        def gone() -> bool:
            try:
                with open(f"/proc/{child_pid}/stat") as f:
                    return f.read().split(")")[-1].split()[0] == "Z"  # reaped soon by init
            except FileNotFoundError:
                return True

        until_blocking(gone, within=60, what="the child to die with its parent")
    finally:
        if parent.poll() is None:
            parent.kill()
        with __import__("contextlib").suppress(Exception):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = (item.partition(b"=") for item in f.read().split(b"\0") if item)
        return {k.decode(): v.decode() for k, _, v in pairs}


def test_go_servers_run_on_one_thread_unless_told(own_nats, own_etcd, monkeypatch):
    """nats-server and etcd get GOMAXPROCS=1 (fewer spinning Go threads on a small host)
    unless the caller's environment sets GOMAXPROCS, which wins."""
    assert _environ(own_nats.proc.pid).get("GOMAXPROCS") == "1"
    assert _environ(own_etcd.proc.pid).get("GOMAXPROCS") == "1"
    monkeypatch.setenv("GOMAXPROCS", "3")
    own_nats.stop()
    own_nats.start()
    assert _environ(own_nats.proc.pid).get("GOMAXPROCS") == "3"


def _hold(port: int) -> socket.socket:
    """A listener on `port`: another process's server that took it first."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", port))
    holder.listen(1)
    return holder


@pytest.mark.parametrize("server_class", [NatsServer, EtcdServer], ids=["nats", "etcd"])
def test_a_port_taken_before_the_server_binds_it_is_drawn_again(server_class):
    server = server_class()
    taken = server.port
    holder = _hold(taken)
    try:
        server.start()
        assert server.port != taken and port_open("127.0.0.1", server.port)
    finally:
        holder.close()
        server.cleanup()


def test_a_port_the_caller_named_is_never_swapped_for_another():
    port = free_port()
    holder = _hold(port)
    server = EtcdServer(port=port)
    try:
        with pytest.raises(InfraError, match="address already in use"):
            server.start()
        assert server.port == port
    finally:
        holder.close()
        server.cleanup()
