"""Test rig: one real nats-server (JetStream on) and one real etcd per test session.

Both run on free loopback ports with their data in a temp dir. Tests that need to stop or
restart a server start their own (`NatsServer()` / `EtcdServer()` from genset.runtime.infra)
so they do not disturb the shared ones.
"""

from __future__ import annotations

import os

# The test process holds etcd (gRPC) clients while tests/stack.py starts service processes;
# gRPC's fork handlers can abort a child forked mid-call. Set before grpc is first imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import uuid

import pytest

from genset.runtime.bus import Bus
from genset.runtime.discovery import Discovery
from genset.runtime.infra import EtcdServer, NatsServer


@pytest.fixture(scope="session")
def nats_server():
    server = NatsServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def etcd_server():
    server = EtcdServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def own_nats():
    """A NATS server for one test, free to stop and restart."""
    server = NatsServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def own_etcd():
    """An etcd for one test, free to stop and restart."""
    server = EtcdServer().start()
    yield server
    server.cleanup()


@pytest.fixture
async def bus(nats_server):
    """A Bus on the session NATS, closed after the test."""
    b = await Bus.connect(nats_server.url, name=f"test-{uuid.uuid4().hex[:6]}")
    yield b
    await b.close()


@pytest.fixture
async def discovery(etcd_server):
    """A Discovery on the session etcd (lease TTL 5 s), lease revoked after the test."""
    d = await Discovery.connect(etcd_server.endpoint, ttl=5.0)
    yield d
    await d.close()
