"""Credentials, permissions and TLS material for one genset deployment: secure by default.

Who may do what is written down once, here (`nats_permissions`, `etcd_permissions`), and
turned into a nats-server configuration file (users with per-user publish/subscribe
permissions, no anonymous user) and into etcd users and roles (through etcd's auth API).
docs/architecture.md ("Security") has the same table in prose.

Principals:
- one user per *worker slot*, `worker-<id>`: the slot's instance id is fixed when the slot is
  made and given to the worker (`GENSET_INSTANCE_ID`), because NATS and etcd permissions
  name whole subject tokens and key prefixes, and a worker's subjects and keys end in its id.
  `genset up` makes as many slots as it may run workers (`--max-workers`); a compose worker
  claims a free slot when it starts (`python -m genset.runtime.auth exec`).
- role users shared by every process of the role: `frontend`, `router`, `planner`, `client`
  (NATS-native clients of the frontend) and `admin` (everything, for operators).

Everything lives in `<state>/auth/` (directory 0700, files 0600): `credentials.json`
(made once, reused on every start), `nats.conf` (rewritten from it on every start), and with
TLS `ca.crt`, `ca.key`, `server.crt`, `server.key`. Services get their user and password
through the environment (`GENSET_NATS_USER`, `GENSET_NATS_PASSWORD`, `GENSET_ETCD_USER`,
`GENSET_ETCD_PASSWORD`, ...), never on the command line, which any local user can read.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from proto import keys, subjects

CREDENTIALS_FILE = "credentials.json"
NATS_CONF_FILE = "nats.conf"
FORMAT_VERSION = 1

ROLE_FRONTEND = "frontend"
ROLE_ROUTER = "router"
ROLE_WORKER = "worker"
ROLE_PLANNER = "planner"
ROLE_CLIENT = "client"
ROLE_ADMIN = "admin"
ROLE_OFFLOAD = "offload"  # the kv_offload store (`genset offload`)
ROLE_USERS = (ROLE_FRONTEND, ROLE_ROUTER, ROLE_PLANNER, ROLE_OFFLOAD, ROLE_CLIENT, ROLE_ADMIN)
ROLES = (*ROLE_USERS, ROLE_WORKER)

# A worker answers a generate request with a stream of frames to the requester's inbox, and a
# resync request with one reply. NATS lets it publish there only while the request's
# response permission lasts: unlimited frames, for RESPONSE_WINDOW after the request reached
# it. It must outlast the longest request (the frontend's --request-timeout, 600 s by
# default); the server forgets a response permission only after this window, so it is not
# made longer than needed (each one costs the server ~100 bytes while it lives).
RESPONSE_WINDOW = "1h"

WORKER_SLOTS_DEFAULT = 16
_USER = re.compile(r"^[a-z][a-z0-9-]{0,62}$")


class AuthError(RuntimeError):
    """Credentials or TLS material could not be made, read or applied; says which and why."""


class EtcdNotAnswering(AuthError):
    """etcd did not answer while its users were set up (it may still be starting)."""


# ---------------------------------------------------------------------------------------------
# who may do what


def worker_user(instance_id: int) -> str:
    return f"worker-{subjects.instance_token(instance_id)}"


def inbox_prefix(user: str) -> str:
    """Where `user`'s reply inboxes live (genset.runtime.bus uses it for a known user), so
    that a user may subscribe to its own replies and to nobody else's."""
    return f"_INBOX.{user}"


@dataclass(frozen=True)
class NatsPermissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    responses: bool  # may answer requests it received (reply subjects), for RESPONSE_WINDOW


def nats_permissions(role: str, namespace: str, user: str,
                     instance_id: int | None = None) -> NatsPermissions:
    """The NATS subjects one user may publish and subscribe to (whole table: docs)."""
    ns = namespace
    inbox = inbox_prefix(user) + ".>"
    any_id = "*"
    events_all = subjects.kv_events_all(ns)
    loads_all = subjects.load_report_all(ns)
    lifecycle = subjects.request_lifecycle(ns)
    decisions = subjects.route_decisions(ns)
    cancel = subjects.stream_cancel(ns)
    # subjects.kv_resync() takes an int; the wildcard is spelled on the same base
    resync_any = subjects.subject(ns, "kv", "resync") + "." + any_id
    worker_generate_any = f"{subjects.ROOT}.{ns}.*.generate.{any_id}"
    # the kv_offload store: requests to any store instance, and every store's events
    offload_requests = tuple(subjects.subject(ns, subjects.OFFLOAD_COMPONENT, endpoint) + ".*"
                             for endpoint in ("put", "lookup", "getpart"))
    offload_put_part = subjects.subject(ns, subjects.OFFLOAD_COMPONENT, "putpart")
    offload_events_all = subjects.offload_events_all(ns)
    offload_resync_any = subjects.subject(ns, subjects.OFFLOAD_COMPONENT, "resync") + ".*"
    planner_inputs = (subjects.frontend_stats(ns), subjects.step_stats_all(ns))
    if role == ROLE_WORKER:
        if instance_id is None:
            raise ValueError("a worker's permissions need its instance id")
        tok = subjects.instance_token(instance_id)
        # Disaggregation (genset.disagg.worker): a decode worker asks any prefill worker for
        # a prefill, and follows the prefill workers' load and cached hashes (hashes only,
        # never token ids: no worker reads another's prompts); KV transfers go to the peer's
        # subjects (receiver: header and chunks; sender: credits and acks), each worker
        # listens only under its own id.
        xfer_any = (subjects.subject(ns, "kvxfer", "rx") + ".*.*",
                    subjects.subject(ns, "kvxfer", "tx") + ".*.*")
        remote_prefill_any = subjects.subject(ns, "prefill", "remote") + "." + any_id
        # parts of large blocks to any store, under its own sender id only: the store keeps
        # per-sender buffers and takes the sender from the subject (subjects.offload_put_part)
        own_parts = f"{offload_put_part}.{any_id}.{tok}"
        return NatsPermissions(
            publish=(subjects.kv_events(ns, instance_id), subjects.load_report(ns, instance_id),
                     lifecycle, subjects.step_stats(ns, instance_id), *offload_requests,
                     own_parts,
                     remote_prefill_any, *xfer_any,
                     subjects.prefill_kv_hashes(ns, instance_id)),
            # generate requests of any role it registers as (decode, prefill), its own id only
            subscribe=(f"{subjects.ROOT}.{ns}.*.generate.{tok}", subjects.kv_resync(ns, instance_id),
                       cancel, inbox, subjects.remote_prefill(ns, instance_id),
                       subjects.kv_transfer_rx_all(ns, instance_id),
                       subjects.kv_transfer_tx_all(ns, instance_id),
                       subjects.prefill_kv_hashes_all(ns), loads_all),
            responses=True)
    if role == ROLE_FRONTEND:
        # The frontend runs the embedded router too: it reads KV events and load, and may ask
        # workers for resyncs. It is the only sender of generate requests to workers and of
        # cancels (a NATS-native client cancels its own stream on the frontend).
        return NatsPermissions(
            publish=(worker_generate_any, cancel, subjects.route(ns), decisions, resync_any,
                     offload_resync_any, subjects.frontend_stats(ns)),
            subscribe=(subjects.frontend_generate(ns), cancel, events_all, loads_all, lifecycle,
                       decisions, offload_events_all, inbox),
            responses=True)
    if role == ROLE_ROUTER:
        return NatsPermissions(
            publish=(resync_any, offload_resync_any, decisions),
            subscribe=(subjects.route(ns), events_all, loads_all, lifecycle, decisions,
                       offload_events_all, inbox),
            responses=True)
    if role == ROLE_PLANNER:
        # KV events: which cache only one worker holds, what a drain would lose (--track-cache)
        return NatsPermissions(publish=(), subscribe=(loads_all, lifecycle, decisions,
                                                      events_all, *planner_inputs, inbox),
                               responses=False)
    if role == ROLE_OFFLOAD:
        # serves put/lookup/getpart/resync on its instances' subjects and every
        # sender's parts (putpart.<instance>.<sender>), publishes its events
        return NatsPermissions(
            publish=(offload_events_all,),
            subscribe=(f"{subjects.ROOT}.{ns}.{subjects.OFFLOAD_COMPONENT}.*.*",
                       f"{offload_put_part}.*.*", inbox),
            responses=True)
    if role == ROLE_CLIENT:
        return NatsPermissions(publish=(subjects.frontend_generate(ns), cancel),
                               subscribe=(inbox,), responses=False)
    if role == ROLE_ADMIN:
        return NatsPermissions(publish=(">",), subscribe=(">",), responses=False)
    raise ValueError(f"unknown role {role!r} (one of {', '.join(ROLES)})")


@dataclass(frozen=True)
class EtcdPermission:
    key: str
    prefix: bool  # the whole range under `key`, else exactly `key`
    write: bool  # read-write, else read only


def etcd_permissions(role: str, namespace: str, *, instance_id: int | None = None,
                     models: tuple[str, ...] = ()) -> list[EtcdPermission]:
    """The etcd keys one role may read and write. Everyone reads the namespace (membership,
    model cards, planner targets); each writes only its own records."""
    out = [EtcdPermission(keys.namespace_prefix(namespace), prefix=True, write=False)]
    if role == ROLE_WORKER:
        if instance_id is None:
            raise ValueError("a worker's permissions need its instance id")
        # A worker registers as decode or prefill (genset.worker.roles.registered_role), and a
        # model card per model it serves; etcd ranges cannot skip the model's part of the key.
        for component in ("decode", "prefill"):
            out.append(EtcdPermission(keys.instance(namespace, component, instance_id),
                                      prefix=False, write=True))
        for model in models:
            out.append(EtcdPermission(keys.model(namespace, model, instance_id),
                                      prefix=False, write=True))
    elif role in (ROLE_FRONTEND, ROLE_ROUTER, ROLE_PLANNER, ROLE_OFFLOAD):
        # Role processes have random instance ids: the role's part of the instances prefix.
        component = keys.OFFLOAD_COMPONENT if role == ROLE_OFFLOAD else role
        out.append(EtcdPermission(keys.instances_prefix(namespace, component), prefix=True,
                                  write=True))
        if role == ROLE_PLANNER:
            out.append(EtcdPermission(keys.planner_prefix(namespace), prefix=True, write=True))
    elif role not in (ROLE_CLIENT, ROLE_ADMIN):
        raise ValueError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
    return out


# ---------------------------------------------------------------------------------------------
# credentials on disk


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass
class Credentials:
    """The secrets of one deployment, kept in `<dir>/credentials.json`."""

    dir: Path
    namespaces: list[str]
    passwords: dict[str, str]  # user -> password (role users and worker slots)
    worker_ids: list[int]  # one per worker slot, in slot order
    models: list[str]  # model names workers may register cards for
    etcd_root: str
    tls: TlsFiles | None = None
    _extra: dict = field(default_factory=dict, repr=False)

    @property
    def path(self) -> Path:
        return self.dir / CREDENTIALS_FILE

    @property
    def nats_conf(self) -> Path:
        return self.dir / NATS_CONF_FILE

    def password(self, user: str) -> str:
        try:
            return self.passwords[user]
        except KeyError:
            raise AuthError(f"no user {user!r} in {self.path}") from None

    def worker_slot(self, slot: int) -> int:
        if not 0 <= slot < len(self.worker_ids):
            raise AuthError(f"worker slot {slot} does not exist: {self.path} has "
                            f"{len(self.worker_ids)} (genset up --max-workers makes more)")
        return self.worker_ids[slot]

    def env(self, role: str, *, slot: int | None = None, nats: bool = True,
            etcd: bool = True) -> dict[str, str]:
        """The environment a process of `role` needs (worker: of worker slot `slot`)."""
        if role == ROLE_WORKER:
            if slot is None:
                raise AuthError("a worker needs a slot")
            instance_id = self.worker_slot(slot)
            user = worker_user(instance_id)
            out = {"GENSET_INSTANCE_ID": subjects.instance_token(instance_id)}
        elif role in ROLE_USERS:
            user, out = role, {}
        else:
            raise AuthError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
        password = self.password(user)
        if nats:
            out.update(GENSET_NATS_USER=user, GENSET_NATS_PASSWORD=password)
            if self.tls is not None:
                out["GENSET_NATS_CA"] = str(self.tls.ca_cert)
        if etcd and role not in (ROLE_CLIENT, ROLE_ADMIN):
            out.update(GENSET_ETCD_USER=user, GENSET_ETCD_PASSWORD=password)
            if self.tls is not None:
                out["GENSET_ETCD_CA"] = str(self.tls.ca_cert)
        if etcd and role == ROLE_ADMIN:
            out.update(GENSET_ETCD_USER="root", GENSET_ETCD_PASSWORD=self.etcd_root)
            if self.tls is not None:
                out["GENSET_ETCD_CA"] = str(self.tls.ca_cert)
        return out

    # -- persistence ----------------------------------------------------------------------

    def save(self) -> None:
        data = {
            **self._extra,
            "version": FORMAT_VERSION,
            "namespaces": self.namespaces,
            "passwords": self.passwords,
            "worker_ids": [subjects.instance_token(i) for i in self.worker_ids],
            "models": self.models,
            "etcd_root": self.etcd_root,
        }
        _write_private(self.path, json.dumps(data, indent=2, sort_keys=True) + "\n")

    @classmethod
    def _load(cls, directory: Path) -> Credentials:
        path = directory / CREDENTIALS_FILE
        _check_private(path)
        try:
            data = json.loads(path.read_text())
            if data.get("version") != FORMAT_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {FORMAT_VERSION}")
            creds = cls(
                dir=directory,
                namespaces=[str(n) for n in data["namespaces"]],
                passwords={str(k): str(v) for k, v in data["passwords"].items()},
                worker_ids=[int(t, 16) for t in data["worker_ids"]],
                models=[str(m) for m in data["models"]],
                etcd_root=str(data["etcd_root"]),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise AuthError(f"{path} is not a genset credentials file ({exc}); move it away "
                            "to make new credentials") from None
        for name in ("namespaces", "passwords", "worker_ids", "models", "etcd_root", "version"):
            data.pop(name, None)
        creds._extra = data
        return creds


def _new_secret() -> str:
    return secrets.token_urlsafe(24)  # 192 bits; URL-safe, so no quoting in any file


def _new_instance_id(taken: set[int]) -> int:
    while True:
        value = secrets.randbits(63)
        if value and value not in taken:
            return value


def _write_private(path: Path, text: str) -> None:
    """Write atomically, readable by the owner only (the mode is set before any byte)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _check_private(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise AuthError(f"cannot read {path}: {exc}") from None
    if mode & 0o077:
        raise AuthError(f"{path} is readable by other users (mode {mode & 0o777:o}); "
                        f"run `chmod 600 {path}` (and consider the secrets in it leaked)")


def auth_dir(state_dir: str | Path) -> Path:
    return Path(state_dir).expanduser().resolve() / "auth"


def read_credentials(directory: str | Path) -> Credentials | None:
    """The credentials `genset up` made under `directory`, or None when it made none (a stack
    started with --insecure, or elsewhere). Reads only; for clients such as `genset chat`."""
    directory = Path(directory)
    if not (directory / CREDENTIALS_FILE).is_file():
        return None
    return Credentials._load(directory)


def load_or_create(directory: str | Path, *, namespace: str, worker_slots: int = 0,
                   models: list[str] | tuple[str, ...] = ()) -> Credentials:
    """The deployment's credentials: read from `directory` (made there on first use), with at
    least `worker_slots` worker slots and permission for `namespace` and `models`. Only what
    is missing is added, so restarts keep every password and instance id."""
    directory = Path(directory)
    subjects.subject(namespace, "x", "x")  # a bad namespace fails here
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(OSError):
        os.chmod(directory, 0o700)
    with _locked(directory):
        if (directory / CREDENTIALS_FILE).exists():
            creds = Credentials._load(directory)
            changed = False
        else:
            creds = Credentials(dir=directory, namespaces=[], passwords={}, worker_ids=[],
                                models=[], etcd_root=_new_secret())
            changed = True
        if namespace not in creds.namespaces:
            creds.namespaces.append(namespace)
            changed = True
        for user in ROLE_USERS:
            if user not in creds.passwords:
                creds.passwords[user] = _new_secret()
                changed = True
        while len(creds.worker_ids) < worker_slots:
            instance_id = _new_instance_id(set(creds.worker_ids))
            creds.worker_ids.append(instance_id)
            creds.passwords[worker_user(instance_id)] = _new_secret()
            changed = True
        for model in models:
            if model not in creds.models:
                creds.models.append(model)
                changed = True
        if changed:
            creds.save()
    tls = _existing_tls(directory)
    if tls is not None:
        creds.tls = tls
    return creds


@contextlib.contextmanager
def _locked(directory: Path):
    """Serialise credential changes between processes sharing the directory."""
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# ---------------------------------------------------------------------------------------------
# nats-server configuration


def _user_entry(user: str, password: str, perms: NatsPermissions) -> dict:
    p: dict = {"publish": {"allow": list(perms.publish)},
               "subscribe": {"allow": list(perms.subscribe)}}
    if not perms.publish:
        # An empty allow list would mean "no restriction"; deny everything instead.
        p["publish"] = {"deny": [">"]}
    if perms.responses:
        p["allow_responses"] = {"max": -1, "expires": RESPONSE_WINDOW}
    return {"user": user, "password": password, "permissions": p}


def nats_users(creds: Credentials) -> list[dict]:
    """One entry per user; a user's permissions in every namespace of `creds` are merged."""
    users = []
    for user in ROLE_USERS:
        users.append(_merged_entry(creds, user, user))
    for instance_id in creds.worker_ids:
        users.append(_merged_entry(creds, ROLE_WORKER, worker_user(instance_id), instance_id))
    return users


def _merged_entry(creds: Credentials, role: str, user: str, instance_id: int | None = None
                  ) -> dict:
    pub: list[str] = []
    sub: list[str] = []
    responses = False
    for namespace in creds.namespaces:
        perms = nats_permissions(role, namespace, user, instance_id)
        pub += [s for s in perms.publish if s not in pub]
        sub += [s for s in perms.subscribe if s not in sub]
        responses = responses or perms.responses
    return _user_entry(user, creds.password(user),
                       NatsPermissions(tuple(pub), tuple(sub), responses))


def nats_config(creds: Credentials, *, tls: TlsFiles | None = None) -> str:
    """nats-server configuration: these users only (no anonymous access), and TLS when given.
    nats-server reads JSON as its configuration syntax, so the values are JSON-quoted."""
    conf: dict = {"authorization": {"users": nats_users(creds)}}
    if tls is not None:
        conf["tls"] = {"cert_file": str(tls.server_cert), "key_file": str(tls.server_key),
                       "timeout": 5}
    return ("# Made by genset from credentials.json on every start; edits are overwritten.\n"
            + json.dumps(conf, indent=2) + "\n")


def write_nats_config(creds: Credentials) -> Path:
    _write_private(creds.nats_conf, nats_config(creds, tls=creds.tls))
    return creds.nats_conf


# ---------------------------------------------------------------------------------------------
# etcd users and roles


def _etcd_role(user: str) -> str:
    return f"genset-{user}"


async def setup_etcd_auth(endpoint: str, creds: Credentials, *, within_s: float = 30.0) -> None:
    """Create etcd's users and roles for `creds` and turn authentication on (idempotent).

    On a fresh etcd (auth off): root, then every role and user, then auth on. On an etcd that
    has auth on: log in as root (with the password from the credentials file, which is what
    turned it on) and add only what is missing (new worker slots, models, namespaces)."""
    from aetcd import rpc

    from genset.runtime.etcd_client import EtcdClient, EtcdError, EtcdUnavailable

    ca = str(creds.tls.ca_cert) if creds.tls is not None else None
    deadline = asyncio.get_running_loop().time() + within_s
    client = EtcdClient(endpoint, timeout=min(within_s, 5.0), ca_cert=ca)
    try:
        try:
            await client.auth_call("AuthStatus", rpc.AuthStatusRequest())
            enabled = False
        except EtcdError as exc:
            if isinstance(exc, EtcdUnavailable) or "user name is empty" not in str(exc):
                raise
            enabled = True  # AuthStatus itself needs a user once auth is on
        if enabled:
            await client.close()
            client = EtcdClient(endpoint, timeout=min(within_s, 5.0), user="root",
                                password=creds.etcd_root, ca_cert=ca)
            try:
                await client.auth_call("AuthStatus", rpc.AuthStatusRequest())
            except EtcdUnavailable:
                raise
            except EtcdError as exc:
                raise AuthError(
                    f"etcd at {endpoint} has authentication on, and root's password is not "
                    f"the one in {creds.path} ({exc}). Restore that file, or start etcd with "
                    "fresh data.") from None
        users = set((await client.auth_call("UserList", rpc.AuthUserListRequest())).users)
        roles = set((await client.auth_call("RoleList", rpc.AuthRoleListRequest())).roles)

        async def ensure_user(name: str, password: str, role: str) -> None:
            if name in users and enabled:
                return  # made (and granted) by the run that turned auth on
            if name not in users:
                await client.auth_call("UserAdd", rpc.AuthUserAddRequest(
                    name=name, password=password))
                users.add(name)
            else:
                # Made by an earlier attempt that did not finish: make the password ours.
                await client.auth_call("UserChangePassword", rpc.AuthUserChangePasswordRequest(
                    name=name, password=password))
            await client.auth_call("UserGrantRole", rpc.AuthUserGrantRoleRequest(
                user=name, role=role))

        async def ensure_role(name: str, wanted: list[EtcdPermission]) -> None:
            have: set[tuple[bytes, bytes, int]] = set()
            if name in roles:
                got = await client.auth_call("RoleGet", rpc.AuthRoleGetRequest(role=name))
                have = {(p.key, p.range_end, p.permType) for p in got.perm}
            else:
                await client.auth_call("RoleAdd", rpc.AuthRoleAddRequest(name=name))
                roles.add(name)
            for perm in wanted:
                key = perm.key.encode()
                end = _prefix_end(key) if perm.prefix else b""
                kind = rpc.Permission.READWRITE if perm.write else rpc.Permission.READ
                if (key, end, kind) in have:
                    continue
                await client.auth_call("RoleGrantPermission", rpc.AuthRoleGrantPermissionRequest(
                    name=name, perm=rpc.Permission(permType=kind, key=key, range_end=end)))

        await ensure_user("root", creds.etcd_root, "root")
        models = tuple(creds.models)
        principals = [(u, u, None) for u in ROLE_USERS if u not in (ROLE_CLIENT, ROLE_ADMIN)]
        principals += [(ROLE_WORKER, worker_user(i), i) for i in creds.worker_ids]
        for role, user, instance_id in principals:
            if asyncio.get_running_loop().time() > deadline:
                raise AuthError(f"etcd at {endpoint}: setting up users took over {within_s} s")
            wanted = [perm for namespace in creds.namespaces
                      for perm in etcd_permissions(role, namespace, instance_id=instance_id,
                                                   models=models)]
            await ensure_role(_etcd_role(user), wanted)
            await ensure_user(user, creds.password(user), _etcd_role(user))
        if not enabled:
            await client.auth_call("AuthEnable", rpc.AuthEnableRequest())
    except EtcdUnavailable as exc:
        raise EtcdNotAnswering(f"etcd at {endpoint} is not answering: {exc}") from None
    except EtcdError as exc:
        raise AuthError(f"etcd at {endpoint}: setting up authentication failed: {exc}") from None
    finally:
        await client.close()


def _prefix_end(key: bytes) -> bytes:
    from aetcd.utils import prefix_range_end

    return prefix_range_end(key)


# ---------------------------------------------------------------------------------------------
# TLS: a local CA and one server certificate (openssl command line)


def _existing_tls(directory: Path) -> TlsFiles | None:
    files = TlsFiles(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    if all(p.exists() for p in (files.ca_cert, files.server_cert, files.server_key)):
        return files
    return None


def ensure_tls(creds: Credentials, hosts: list[str] | tuple[str, ...] = ()) -> TlsFiles:
    """A local CA and a server certificate for NATS and etcd, made once in the credentials
    directory (kept on restart). The certificate names localhost, 127.0.0.1, ::1 and `hosts`
    (e.g. compose service names). For production, use your own certificates (docs)."""
    directory = creds.dir
    existing = _existing_tls(directory)
    if existing is not None:
        creds.tls = existing
        return existing
    openssl = shutil.which("openssl")
    if openssl is None:
        raise AuthError("--tls needs the `openssl` command to make a local CA (apt-get install "
                        "openssl), or bring your own certificates (docs/architecture.md)")
    names = ["DNS:localhost", "IP:127.0.0.1", "IP:::1"]
    for host in hosts:
        if not re.fullmatch(r"[A-Za-z0-9.:-]+", host):
            raise AuthError(f"TLS host name {host!r} is not a DNS name or IP address")
        kind = "IP" if re.fullmatch(r"[0-9.]+|[0-9a-fA-F:]+:[0-9a-fA-F:]*", host) else "DNS"
        names.append(f"{kind}:{host}")
    with _locked(directory), tempfile.TemporaryDirectory(dir=directory) as tmp:
        work = Path(tmp)
        ext = work / "server.ext"
        ext.write_text(f"subjectAltName={','.join(dict.fromkeys(names))}\n"
                       "basicConstraints=critical,CA:FALSE\n"
                       "keyUsage=critical,digitalSignature,keyEncipherment\n"
                       "extendedKeyUsage=serverAuth,clientAuth\n")
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        steps = [
            [openssl, "req", "-x509", *ec, "-keyout", str(work / "ca.key"), "-out",
             str(work / "ca.crt"), "-days", "3650", "-subj", "/CN=genset local CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            [openssl, "req", *ec, "-keyout", str(work / "server.key"), "-out",
             str(work / "server.csr"), "-subj", "/CN=genset"],
            [openssl, "x509", "-req", "-in", str(work / "server.csr"), "-CA",
             str(work / "ca.crt"), "-CAkey", str(work / "ca.key"), "-CAcreateserial",
             "-out", str(work / "server.crt"), "-days", "825", "-extfile", str(ext)],
        ]
        old = os.umask(0o077)
        try:
            for argv in steps:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
                if done.returncode != 0:
                    raise AuthError(f"openssl failed making the local CA: {done.stderr.strip()}")
        finally:
            os.umask(old)
        for name in ("ca.key", "server.key", "ca.crt", "server.crt"):  # certificates last
            os.chmod(work / name, 0o600)
            os.replace(work / name, directory / name)
    creds.tls = _existing_tls(directory)
    assert creds.tls is not None
    return creds.tls


# ---------------------------------------------------------------------------------------------
# worker slots claimed by processes that share the credentials directory (compose replicas)


def claim_worker_slot(creds: Credentials, slots_dir: str | Path | None = None
                      ) -> tuple[int, int]:
    """(slot, fd): the first worker slot no live process holds. The claim is an flock on
    `<slots_dir>/<n>.lock` (default `<dir>/slots`), held by the returned fd: it ends when the
    process does, however it ends, so a crashed worker's slot is free again for its
    replacement. Processes that share the directory (compose replicas on one host's volume)
    never hold the same slot."""
    slots = Path(slots_dir) if slots_dir is not None else creds.dir / "slots"
    slots.mkdir(exist_ok=True, mode=0o700)
    for slot in range(len(creds.worker_ids)):
        fd = os.open(slots / f"{slot}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return slot, fd
    raise AuthError(f"all {len(creds.worker_ids)} worker slots in {creds.path} are in use; "
                    "make more with `python -m genset.runtime.auth init --worker-slots N`")


# ---------------------------------------------------------------------------------------------
# `genset up`


def add_launch_args(parser) -> None:
    """`genset up`'s security flags."""
    g = parser.add_argument_group("security (NATS and etcd that genset up starts itself)")
    g.add_argument("--insecure", action="store_true",
                   help="start NATS and etcd without users and permissions (not for shared "
                        "machines: anyone who reaches them can read prompts and steer routing)")
    g.add_argument("--tls", action="store_true",
                   help="TLS for NATS and etcd with a local CA made in <state>/auth "
                        "(clients verify it); for production certificates see docs")
    g.add_argument("--max-workers", type=int, default=None, metavar="N",
                   help="the most workers this stack runs: the planner's ceiling (default "
                        "max(4, --workers)) and the worker credentials made, each with a fixed "
                        f"instance id (at least {WORKER_SLOTS_DEFAULT})")
    g.add_argument("--api-key", default=os.environ.get("GENSET_API_KEY"),
                   help="require `Authorization: Bearer <key>` on the API and /metrics "
                        "(prefer the GENSET_API_KEY variable: a flag shows in `ps`)")
    g.add_argument("--metrics-token", default=os.environ.get("GENSET_METRICS_TOKEN"),
                   help="token for every process's /metrics (default: the API key)")


class StackSecurity:
    """What `genset up` does for security, kept out of the launcher's way: credentials under
    `<state>/auth`, the NATS configuration and etcd TLS for servers it starts, etcd's users
    once etcd runs, and each child's environment. Servers genset up did not start are the
    user's: their credentials come from the user's own GENSET_* environment."""

    def __init__(self, args, state_dir: Path, *, model: str) -> None:
        self.enabled = not args.insecure
        self.api_key = args.api_key or None
        self.metrics_token = args.metrics_token or self.api_key
        self.nats_owned = False
        self.etcd_owned = False
        self.creds: Credentials | None = None
        if args.max_workers is not None and args.max_workers < 1:
            raise AuthError("--max-workers must be at least 1")
        if args.tls and not self.enabled:
            raise AuthError("--tls and --insecure do not go together")
        if self.enabled:
            prefill = getattr(args, "prefill_workers", 0)
            # a planner sizes each pool up to --max-workers: with prefill workers, two pools
            most = (args.max_workers or 0) * (2 if prefill and getattr(args, "planner", None)
                                              else 1)
            self.creds = load_or_create(auth_dir(state_dir), namespace=args.namespace,
                                        worker_slots=max(args.workers + prefill, most,
                                                         WORKER_SLOTS_DEFAULT),
                                        models=[model])
            if args.tls:
                ensure_tls(self.creds)
            else:
                self.creds.tls = None  # certificates of an earlier --tls run stay unused

    @property
    def tls(self) -> TlsFiles | None:
        return self.creds.tls if self.creds is not None else None

    def nats_config(self) -> Path | None:
        """The configuration for a NATS genset up starts (None: open, as with --insecure)."""
        if self.creds is None:
            return None
        self.nats_owned = True
        return write_nats_config(self.creds)

    def etcd_started(self, endpoint: str) -> None:
        """etcd genset up started is running: give it our users and turn auth on."""
        if self.creds is None:
            return
        self.etcd_owned = True
        asyncio.run(retrying_etcd_setup(endpoint, self.creds, 60.0))

    def child_env(self, command: str, name: str) -> dict[str, str]:
        """The environment of child `name` running `genset <command>`; worker-N gets worker
        slot N-1 (a restarted worker-N keeps its slot, so its id and permissions)."""
        env: dict[str, str] = {}
        if self.metrics_token:
            env["GENSET_METRICS_TOKEN"] = self.metrics_token
        if command == "frontend" and self.api_key:
            env["GENSET_API_KEY"] = self.api_key
        if self.creds is None or not (self.nats_owned or self.etcd_owned):
            return env
        if command == "worker":
            slot = int(name.rsplit("-", 1)[-1]) - 1
            role_env = self.creds.env(ROLE_WORKER, slot=slot, nats=self.nats_owned,
                                      etcd=self.etcd_owned)
        elif command in ROLE_USERS:
            role_env = self.creds.env(command, nats=self.nats_owned, etcd=self.etcd_owned)
        else:
            raise AuthError(f"no credentials for `genset {command}`")
        return {**env, **role_env}

    def api_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def main(argv: list[str] | None = None) -> int:
    """`python -m genset.runtime.auth init|etcd|exec|env`: what compose (or any deployment
    that is not `genset up`) needs. See deploy/compose-auth/README.md."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m genset.runtime.auth")
    sub = p.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="make (or extend) credentials and write nats.conf")
    init.add_argument("--dir", required=True, help="credentials directory (a private volume)")
    init.add_argument("--namespace", default=os.environ.get("GENSET_NAMESPACE", "default"))
    init.add_argument("--worker-slots", type=int, default=WORKER_SLOTS_DEFAULT)
    init.add_argument("--model", action="append", default=[],
                      help="model name workers serve (repeatable)")
    init.add_argument("--tls", action="store_true", help="make a local CA and server certificate")
    init.add_argument("--tls-host", action="append", default=[],
                      help="extra name for the server certificate (repeatable)")
    init.add_argument("--nats-conf", default=None,
                      help="write nats.conf here too (default: only in --dir)")
    et = sub.add_parser("etcd", help="turn on etcd auth with the users of --dir")
    et.add_argument("--dir", required=True)
    et.add_argument("--etcd", default=os.environ.get("GENSET_ETCD", "127.0.0.1:2379"))
    et.add_argument("--timeout", type=float, default=60.0)
    ex = sub.add_parser("exec", help="run a command with a role's credentials in its env")
    ex.add_argument("--dir", required=True)
    ex.add_argument("--role", required=True, choices=ROLES)
    ex.add_argument("--slots-dir", default=None,
                    help="where workers claim their slots (a writable directory shared by "
                         "the workers; default <dir>/slots)")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command and arguments")
    en = sub.add_parser("env", help="print a role's variables (for a per-service secret)")
    en.add_argument("--dir", required=True)
    en.add_argument("--role", required=True, choices=ROLES)
    en.add_argument("--slot", type=int, default=None, help="worker slot (workers only)")
    args = p.parse_args(argv)
    try:
        if args.command == "init":
            if args.worker_slots < 0:
                p.error("--worker-slots must be >= 0")
            creds = load_or_create(args.dir, namespace=args.namespace,
                                   worker_slots=args.worker_slots, models=args.model)
            if args.tls:
                ensure_tls(creds, args.tls_host)
            path = write_nats_config(creds)
            if args.nats_conf:
                _write_private(Path(args.nats_conf), path.read_text())
            print(f"credentials in {creds.path}; NATS configuration in {path}")
            return 0
        creds = Credentials._load(Path(args.dir))
        creds.tls = _existing_tls(Path(args.dir))
        if args.command == "etcd":
            endpoint = args.etcd
            if creds.tls is not None and "://" not in endpoint:
                endpoint = f"https://{endpoint}"
            asyncio.run(retrying_etcd_setup(endpoint, creds, args.timeout))
            print(f"etcd at {endpoint}: authentication on")
            return 0
        if args.command == "env":
            for name, value in sorted(creds.env(args.role, slot=args.slot).items()):
                print(f"{name}={value}")
            return 0
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            p.error("exec needs a command after --")
        slot = None
        if args.role == ROLE_WORKER:
            slot, fd = claim_worker_slot(creds, args.slots_dir)
            os.set_inheritable(fd, True)  # the claim lives as long as the command
        env = {**os.environ, **creds.env(args.role, slot=slot)}
        os.execvpe(cmd[0], cmd, env)
    except AuthError as exc:
        print(f"genset auth: {exc}", file=sys.stderr)
        return 1
    return 0


async def retrying_etcd_setup(endpoint: str, creds: Credentials, within_s: float) -> None:
    """etcd may still be starting (compose starts services together): retry until it answers."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        try:
            await setup_etcd_auth(endpoint, creds, within_s=max(5.0, deadline - loop.time()))
            return
        except EtcdNotAnswering:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.5)


if __name__ == "__main__":
    raise SystemExit(main())
