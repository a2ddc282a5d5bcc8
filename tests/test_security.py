"""Issue 14: the bus and etcd refuse what a principal may not do (real nats-server and etcd
with genset's generated users and permissions, `secure_infra` in conftest).

How "was not delivered" is shown without waiting an arbitrary time: NATS delivers the
messages of one publishing connection to one subscription in the order they were published.
So the attacker publishes its forgeries, then one message it *is* allowed to publish (the
marker); an observer subscribed to everything waits for the marker, and everything the server
let through would have arrived before it.
"""

from __future__ import annotations

import asyncio
import os
import uuid

import nats
import nats.errors
import pytest

import proto
from genset.runtime.bus_errors import BusError, NoResponders
from genset.runtime.etcd_client import EtcdClient, EtcdError
from proto import keys, subjects

pytestmark = pytest.mark.slow

NS = "sec"
WAIT_S = 20.0  # generous deadline for things that do happen


class Observer:
    """An admin connection subscribed to every genset subject, in arrival order."""

    def __init__(self, nc) -> None:
        self.nc = nc
        self.seen: list[tuple[str, bytes]] = []
        self._changed = asyncio.Event()

    @classmethod
    async def connect(cls, infra) -> Observer:
        env = infra.creds.env("admin")
        nc = await nats.connect(infra.nats.url, user=env["GENSET_NATS_USER"],
                                password=env["GENSET_NATS_PASSWORD"], allow_reconnect=False)
        self = cls(nc)

        async def on_msg(msg) -> None:
            self.seen.append((msg.subject, msg.data))
            self._changed.set()

        await nc.subscribe("genset.>", cb=on_msg)
        await nc.subscribe("_INBOX.>", cb=on_msg)
        await nc.flush()
        return self

    async def wait_for(self, subject: str, data: bytes) -> list[tuple[str, bytes]]:
        """Everything seen up to and including (subject, data)."""
        async with asyncio.timeout(WAIT_S):
            while (subject, data) not in self.seen:
                self._changed.clear()
                await self._changed.wait()
        return self.seen[:self.seen.index((subject, data)) + 1]

    async def close(self) -> None:
        await self.nc.close()


class Errors:
    """A NATS error callback that keeps what the server said."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self._changed = asyncio.Event()

    async def on_error(self, exc: Exception) -> None:
        self.messages.append(str(exc))
        self._changed.set()

    async def wait_for(self, text: str) -> None:
        async with asyncio.timeout(WAIT_S):
            while not any(text.lower() in m.lower() for m in self.messages):
                self._changed.clear()
                await self._changed.wait()


async def raw(infra, role: str, *, slot: int | None = None, errors: Errors | None = None):
    env = infra.creds.env(role, slot=slot)
    kwargs = {"error_cb": errors.on_error} if errors is not None else {}
    return await nats.connect(infra.nats.url, user=env["GENSET_NATS_USER"],
                              password=env["GENSET_NATS_PASSWORD"], allow_reconnect=False,
                              inbox_prefix=f"_INBOX.{env['GENSET_NATS_USER']}", **kwargs)


def kv_batch(worker_id: int, event_id: int = 1) -> bytes:
    return proto.encode(proto.KvEventBatch(worker_id=worker_id, event_id=event_id, events=[
        proto.Stored(blocks=[proto.StoredBlock(hash=h) for h in (11, 12, 13)])]))


# ---------------------------------------------------------------------------------------------
# NATS


async def test_anonymous_and_wrong_password_connections_are_refused(secure_infra):
    with pytest.raises(nats.errors.Error) as anonymous:
        await nats.connect(secure_infra.nats.url, allow_reconnect=False, connect_timeout=5)
    assert "authorization" in str(anonymous.value).lower()
    with pytest.raises(nats.errors.Error):
        await nats.connect(secure_infra.nats.url, user="frontend", password="guess",
                           allow_reconnect=False, connect_timeout=5)
    with pytest.raises(BusError):  # what a service sees: a clear failure, not a hang
        from genset.runtime.bus import Bus

        await Bus.connect(secure_infra.nats.url, name="anon", namespace=NS, connect_timeout=2)


async def test_a_worker_publishes_only_its_own_events_and_load(secure_infra):
    me, other = secure_infra.worker_id(0), secure_infra.worker_id(1)
    observer = await Observer.connect(secure_infra)
    errors = Errors()
    nc = await raw(secure_infra, "worker", slot=0, errors=errors)
    try:
        cancel = proto.encode(proto.Cancel(stream_id="_INBOX.frontend.x.1", reason="forged"))
        forged = [
            (subjects.kv_events(NS, other), kv_batch(other)),  # another worker's events
            (subjects.kv_events(NS, 0x1234), kv_batch(0x1234)),  # a made-up worker
            (subjects.load_report(NS, other), b"x"),
            (subjects.worker_generate(NS, "decode", other), b"generate directly"),
            (subjects.stream_cancel(NS), cancel),  # cancels: only requesters
            (subjects.kv_resync(NS, other), b"resync"),  # resyncs: only routers
            (subjects.route_decisions(NS), b"decision"),
            (subjects.route(NS), b"route"),
            (subjects.frontend_generate(NS), b"client request"),
            ("_INBOX.frontend.abc.1", b"a frame into somebody's stream"),
        ]
        for subject, data in forged:
            await nc.publish(subject, data)
        marker = kv_batch(me, event_id=7)
        await nc.publish(subjects.kv_events(NS, me), marker)
        seen = await observer.wait_for(subjects.kv_events(NS, me), marker)
        assert [s for s, _ in seen] == [subjects.kv_events(NS, me)], seen
        await errors.wait_for("Permissions Violation for Publish to \"genset.sec.kv.events.")
        # its own load report is allowed too
        await nc.publish(subjects.load_report(NS, me), b"load")
        await observer.wait_for(subjects.load_report(NS, me), b"load")
    finally:
        await nc.close()
        await observer.close()


async def test_a_worker_reads_only_its_own_requests(secure_infra):
    other = secure_infra.worker_id(1)
    errors = Errors()
    nc = await raw(secure_infra, "worker", slot=0, errors=errors)
    frontend = await secure_infra.bus("frontend")
    try:
        # the prompts another worker gets, replies to anybody, everything
        for subject in (subjects.worker_generate(NS, "decode", other), "_INBOX.>",
                        "_INBOX.frontend.>", subjects.kv_events_all(NS), ">"):
            await nc.subscribe(subject)
            await errors.wait_for(f'Permissions Violation for Subscription to "{subject}"')
        # nobody is subscribed to the other worker's generate subject: NATS says so at once
        with pytest.raises(NoResponders):
            await frontend.request(subjects.worker_generate(NS, "decode", other), b"prompt",
                                   timeout=WAIT_S)
    finally:
        await nc.close()
        await frontend.close()


async def test_roles_can_do_their_jobs(secure_infra):
    """A frontend sends a streamed generate request to a worker, which answers on the
    frontend's inbox; the router asks a worker for a resync; a client asks the frontend."""
    me = secure_infra.worker_id(2)
    worker = await secure_infra.bus("worker", slot=2)
    frontend = await secure_infra.bus("frontend")
    router = await secure_infra.bus("router")
    client = await secure_infra.bus("client")
    try:
        async def generate(request, reply) -> None:
            for _ in range(2):
                await reply.send(b"\x01\x00\x00\x00")
            await reply.send(b"\x01\x00\x00\x00", finish_reason="stop", final=True)

        async def resync(data: bytes):
            return proto.KvEventBatch(worker_id=me, event_id=1, events=[proto.Cleared()])

        await worker.serve_stream(subjects.worker_generate(NS, "decode", me), generate)
        await worker.serve(subjects.kv_resync(NS, me), resync)

        async def front(request, reply) -> None:
            await reply.send(b"", finish_reason="stop", final=True)

        await frontend.serve_stream(subjects.frontend_generate(NS), front)
        stream = await frontend.stream_request(subjects.worker_generate(NS, "decode", me), b"hi",
                                               timeout=WAIT_S)
        frames = [f async for f in stream]
        assert len(frames) == 3
        snap = await router.request(subjects.kv_resync(NS, me),
                                    proto.KvResyncRequest(worker_id=me), timeout=WAIT_S,
                                    reply_type=proto.KvEventBatch)
        assert isinstance(snap, proto.KvEventBatch | bytes)
        stream = await client.stream_request(subjects.frontend_generate(NS), b"hello",
                                             timeout=WAIT_S)
        assert len([f async for f in stream]) == 1
    finally:
        for b in (worker, frontend, router, client):
            await b.close()


async def test_the_planner_receives_every_input_it_subscribes_to(secure_infra):
    """Each subject the planner service subscribes to reaches it under the planner role's
    permissions (its KV-event subscription was once refused, silently but for a warning)."""
    from services.planner.service import input_subjects

    inputs = input_subjects(NS, track_cache=True)
    planner = await secure_infra.bus("planner")
    admin = await secure_infra.bus("admin")
    got: dict[str, str] = {}
    arrived = asyncio.Event()
    try:
        for name, subject in inputs.items():
            async def on_msg(msg, name=name) -> None:
                got[name] = msg.subject
                arrived.set()

            await planner.subscribe(subject, on_msg)
        await planner.nc.flush()
        for subject in inputs.values():
            await admin.publish(subject.replace(">", "ab"), b"x")
        async with asyncio.timeout(WAIT_S):
            while set(got) != set(inputs):
                arrived.clear()
                await arrived.wait()
    finally:
        for b in (planner, admin):
            await b.close()


# ---------------------------------------------------------------------------------------------
# etcd


async def test_etcd_refuses_anonymous_and_foreign_writes(secure_infra):
    me, other = secure_infra.worker_id(0), secure_infra.worker_id(1)
    endpoint = secure_infra.etcd.endpoint
    anonymous = EtcdClient(endpoint)
    env = secure_infra.creds.env("worker", slot=0)
    worker = EtcdClient(endpoint, user=env["GENSET_ETCD_USER"],
                        password=env["GENSET_ETCD_PASSWORD"])
    fenv = secure_infra.creds.env("frontend")
    frontend = EtcdClient(endpoint, user=fenv["GENSET_ETCD_USER"],
                          password=fenv["GENSET_ETCD_PASSWORD"])
    try:
        card = proto.encode(proto.ModelCard(model="tiny", instance_id=other))
        with pytest.raises(EtcdError, match="user name is empty"):
            await anonymous.put(keys.model(NS, "tiny", other), card)
        with pytest.raises(EtcdError, match="user name is empty"):
            await anonymous.get_prefix(keys.namespace_prefix(NS))
        # its own records: yes; another worker's, or a made-up one's: no
        await worker.put(keys.model(NS, "tiny", me), proto.encode(
            proto.ModelCard(model="tiny", instance_id=me)))
        await worker.put(keys.instance(NS, "decode", me), b"record")
        for key in (keys.model(NS, "tiny", other), keys.model(NS, "tiny", 0x1234),
                    keys.instance(NS, "decode", other), keys.instance(NS, "frontend", me),
                    keys.planner_prefix(NS) + "targets", keys.model(NS, "other-model", me)):
            with pytest.raises(EtcdError, match="permission denied"):
                await worker.put(key, b"forged")
        with pytest.raises(EtcdError, match="permission denied"):
            await worker.delete(keys.model(NS, "tiny", other))
        with pytest.raises(EtcdError, match="permission denied"):
            await frontend.put(keys.model(NS, "tiny", other), card)
        await frontend.put(keys.instance(NS, "frontend", 0xabc), b"record")
        # everyone reads the namespace (membership)
        got, _ = await frontend.get_prefix(keys.models_prefix(NS))
        assert keys.model(NS, "tiny", me) in {kv.key for kv in got}
        with pytest.raises(EtcdError, match="permission denied"):
            await frontend.get_prefix("genset/other-namespace/")
    finally:
        for c in (anonymous, worker, frontend):
            await c.close()


async def test_etcd_setup_is_idempotent_and_adds_new_slots(secure_infra, tmp_path):
    from genset.runtime import auth

    creds = secure_infra.creds
    # again: nothing breaks (retried while etcd does not answer, as genset up does)
    await auth.retrying_etcd_setup(secure_infra.etcd.endpoint, creds, 120.0)
    # a wrong root password is named, not retried for ever
    wrong = auth.Credentials(dir=tmp_path, namespaces=[NS], passwords=dict(creds.passwords),
                             worker_ids=list(creds.worker_ids), models=["tiny"],
                             etcd_root="not-it")
    with pytest.raises(auth.AuthError, match="root's password"):
        await auth.retrying_etcd_setup(secure_infra.etcd.endpoint, wrong, 120.0)


async def test_services_log_in_with_their_credentials(secure_infra):
    """What a Service does at start (Discovery with the role's user), end to end."""
    from genset.runtime.discovery import Discovery

    env = secure_infra.creds.env("worker", slot=1)
    me = secure_infra.worker_id(1)
    d = await Discovery.connect(secure_infra.etcd.endpoint, ttl=5.0,
                                user=env["GENSET_ETCD_USER"], password=env["GENSET_ETCD_PASSWORD"])
    try:
        await d.register(keys.instance(NS, "decode", me), b"me")
        with pytest.raises(EtcdError, match="permission denied"):
            await d.register(keys.instance(NS, "decode", me + 1), b"not me")
    finally:
        await d.close()  # revoking the lease needs write access to its keys: granted


# ---------------------------------------------------------------------------------------------
# whole services


async def test_a_secured_stack_serves_and_ignores_workers_not_in_etcd(secure_infra, tmp_path):
    """Real processes, each with its role's credentials (what `genset up` gives them): a
    request is served end to end through the router service; the frontend's API key guards
    /v1; a metrics token guards a worker's /metrics; KV events from a valid worker credential
    whose worker is not registered in etcd are ignored by the router."""
    import httpx

    from tests.stack import Stack, metric, parse_metrics

    api_key, metrics_token = uuid.uuid4().hex, uuid.uuid4().hex
    stack = Stack(secure_infra.nats.url, secure_infra.etcd.endpoint, namespace=NS,
                  log_dir=tmp_path)
    async with stack:
        stack.env = {**secure_infra.env("worker", slot=0), "GENSET_METRICS_TOKEN": metrics_token}
        [worker] = await stack.start_workers(1, engine="mocker")
        assert worker.instance_id == secure_infra.worker_id(0)
        stack.env = secure_infra.env("router")
        router = await stack.start_service("router")
        stack.env = {**secure_infra.env("frontend"), "GENSET_API_KEY": api_key}
        frontend = await stack.start_frontend(models=[], extra_args=["--router", "service"])
        auth = {"Authorization": f"Bearer {api_key}"}
        async with httpx.AsyncClient(timeout=60) as http:
            async def listed() -> bool:
                resp = await http.get(frontend.url + "/v1/models", headers=auth)
                return resp.status_code == 200 and bool(resp.json()["data"])

            await frontend.wait_until(listed, "listing the model", WAIT_S * 3)
            body = {"model": "tiny", "prompt": "hello", "max_tokens": 4}
            resp = await http.post(frontend.url + "/v1/completions", json=body)
            assert resp.status_code == 401
            resp = await http.post(frontend.url + "/v1/completions", json=body, headers=auth)
            assert resp.status_code == 200, stack.logs()
            assert resp.json()["usage"]["completion_tokens"] == 4

            assert (await http.get(worker.http_url + "/metrics")).status_code == 401
            resp = await http.get(worker.http_url + "/metrics",
                                  headers={"Authorization": f"Bearer {metrics_token}"})
            assert resp.status_code == 200 and "genset" in resp.text
            assert (await http.get(worker.http_url + "/health")).status_code == 200

        # Worker slot 1 has valid credentials but no worker registered in etcd.
        ghost = secure_infra.worker_id(1)
        nc = await raw(secure_infra, "worker", slot=1)
        try:
            await nc.publish(subjects.kv_events(NS, ghost), kv_batch(ghost))
            await nc.flush()

            async def ignored() -> bool:
                values = parse_metrics((await router.get("/metrics")).text)
                return metric(values, "genset_router_ignored_messages_total", kind="kv_events",
                              reason="not_live") >= 1

            await router.wait_until(ignored, "ignoring the unregistered worker", WAIT_S)
            values = parse_metrics((await router.get("/metrics")).text)
            assert metric(values, "genset_router_workers") == 1
        finally:
            await nc.close()


# ---------------------------------------------------------------------------------------------
# TLS


async def test_tls_with_a_generated_local_ca(tmp_path):
    """`--tls`: a local CA signs the servers' certificate; clients verify it with the CA;
    plaintext clients are refused; a real worker process starts with it."""
    import ssl

    from genset.runtime import auth
    from genset.runtime.bus import Bus
    from genset.runtime.etcd_client import EtcdUnavailable
    from genset.runtime.infra import EtcdServer, NatsServer
    from tests.stack import Stack

    creds = auth.load_or_create(tmp_path / "auth", namespace=NS, worker_slots=1,
                                models=["tiny"])
    tls = auth.ensure_tls(creds)
    assert auth.ensure_tls(creds) == tls  # made once
    nats_server = NatsServer(config_file=auth.write_nats_config(creds)).start()
    etcd_server = EtcdServer(tls=tls).start()
    try:
        assert etcd_server.endpoint.startswith("https://")
        await auth.retrying_etcd_setup(etcd_server.endpoint, creds, 120.0)
        env = creds.env("frontend")
        bus = await Bus.connect(nats_server.url, name="tls", namespace=NS,
                                user=env["GENSET_NATS_USER"], password=env["GENSET_NATS_PASSWORD"],
                                tls=ssl.create_default_context(cafile=env["GENSET_NATS_CA"]))
        await bus.close()
        with pytest.raises((nats.errors.Error, ssl.SSLError, OSError)):
            await nats.connect(nats_server.url, user=env["GENSET_NATS_USER"],
                               password=env["GENSET_NATS_PASSWORD"], allow_reconnect=False,
                               connect_timeout=5)  # no CA: the certificate is not trusted
        client = EtcdClient(etcd_server.endpoint, user=env["GENSET_ETCD_USER"],
                            password=env["GENSET_ETCD_PASSWORD"], ca_cert=env["GENSET_ETCD_CA"])
        plain = EtcdClient(f"127.0.0.1:{etcd_server.port}", timeout=2.0,
                           user=env["GENSET_ETCD_USER"], password=env["GENSET_ETCD_PASSWORD"])
        try:
            await client.put(keys.instance(NS, "frontend", 1), b"over tls")
            with pytest.raises(EtcdUnavailable):
                await plain.get(keys.instance(NS, "frontend", 1))
        finally:
            await client.close()
            await plain.close()
        stack = Stack(nats_server.url, etcd_server.endpoint, namespace=NS, log_dir=tmp_path)
        async with stack:
            stack.env = {**os.environ, "GENSET_NAMESPACE": NS, **creds.env("worker", slot=0)}
            [worker] = await stack.start_workers(1, engine="mocker")
            assert worker.instance_id == creds.worker_ids[0]
    finally:
        nats_server.cleanup()
        etcd_server.cleanup()


# ---------------------------------------------------------------------------------------------
# genset up


def test_genset_up_is_secure_by_default_and_keeps_its_credentials(tmp_path):
    """`genset up` makes credentials on the first start, starts NATS and etcd with them
    (anonymous clients refused), hands each child its own through the environment (never
    the command line), guards the API with GENSET_API_KEY, and on a restart reuses them."""
    import signal

    import httpx

    from genset.runtime.auth import auth_dir
    from tests.helpers.processes import (
        REPO,
        cmdline,
        descendants,
        free_port,
        kill_all,
        start_up,
        wait_for_line,
    )

    state = tmp_path / "state"
    api_key = uuid.uuid4().hex
    port, nats_port, etcd_port = free_port(), free_port(), free_port()
    args = ("--engine", "mocker", "--workers", "1", "--max-workers", "2", "--port", str(port),
            "--nats", f"nats://127.0.0.1:{nats_port}", "--etcd", f"127.0.0.1:{etcd_port}",
            "--state-dir", str(state), "--speedup", "20")
    creds_file = auth_dir(state) / "credentials.json"
    first = None
    for attempt in range(2):
        log = tmp_path / f"up-{attempt}.log"
        proc = start_up(REPO, log, *args, extra_env={"GENSET_API_KEY": api_key})
        pids: set[int] = set()
        try:
            text = wait_for_line(proc, log, r"Ctrl-C stops everything", within=180)
            assert "Authorization: Bearer $GENSET_API_KEY" in text
            assert oct(creds_file.stat().st_mode & 0o777) == "0o600"
            secrets = creds_file.read_text()
            first = first or secrets
            assert secrets == first  # the restart reused every password and id
            pids = descendants(proc.pid)
            for pid in pids:
                line = cmdline(pid)
                assert api_key not in line and not any(
                    pw in line for pw in _passwords(creds_file)), line
            body = {"model": "tiny", "prompt": "hi", "max_tokens": 3}
            url = f"http://127.0.0.1:{port}/v1/completions"
            assert httpx.post(url, json=body, timeout=60).status_code == 401
            resp = httpx.post(url, json=body, timeout=60,
                              headers={"Authorization": f"Bearer {api_key}"})
            assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3
            assert asyncio.run(_anonymous_refused(f"nats://127.0.0.1:{nats_port}"))
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 0, log.read_text()
        finally:
            kill_all(proc, pids)


def _passwords(path) -> list[str]:
    import json

    data = json.loads(path.read_text())
    return [*data["passwords"].values(), data["etcd_root"]]


async def _anonymous_refused(url: str) -> bool:
    try:
        nc = await nats.connect(url, allow_reconnect=False, connect_timeout=5)
    except nats.errors.Error:
        return True
    await nc.close()
    return False
