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


class SecureInfra:
    """NATS and etcd with genset's generated users and permissions (genset.runtime.auth):
    what `genset up` starts by default. `env(role, slot=)` is a process's environment."""

    namespace = "sec"

    def __init__(self, creds, nats, etcd) -> None:
        self.creds = creds
        self.nats = nats
        self.etcd = etcd

    def env(self, role: str, *, slot: int | None = None) -> dict[str, str]:
        return {**os.environ, "GENSET_NAMESPACE": self.namespace,
                **self.creds.env(role, slot=slot)}

    def worker_id(self, slot: int) -> int:
        return self.creds.worker_slot(slot)

    async def bus(self, role: str, *, slot: int | None = None, **kwargs) -> Bus:
        """A Bus logged in as `role` (a worker: as worker slot `slot`)."""
        env = self.creds.env(role, slot=slot)
        return await Bus.connect(self.nats.url, name=f"test-{role}-{uuid.uuid4().hex[:6]}",
                                 namespace=self.namespace, user=env["GENSET_NATS_USER"],
                                 password=env["GENSET_NATS_PASSWORD"], **kwargs)


@pytest.fixture(scope="session")
async def secure_infra(tmp_path_factory):
    """One NATS + etcd pair with authentication on, 3 worker slots, namespace "sec"."""
    from genset.runtime import auth

    creds = auth.load_or_create(tmp_path_factory.mktemp("auth"), namespace=SecureInfra.namespace,
                                worker_slots=3, models=["tiny"])
    nats = NatsServer(config_file=auth.write_nats_config(creds)).start()
    etcd = EtcdServer().start()
    try:
        await auth.retrying_etcd_setup(etcd.endpoint, creds, 120.0)  # as genset up does
        yield SecureInfra(creds, nats, etcd)
    finally:
        nats.cleanup()
        etcd.cleanup()
