"""The test rig itself: real servers start, answer, restart on the same port and stop."""

from __future__ import annotations

import urllib.request

from genset.runtime.infra import port_open


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
