"""Connectors: how the planner's decisions become running workers.

- `local`: starts and stops `genset worker` processes on this machine (a `WorkerLauncher`);
  a worker to drain gets SIGTERM (it stops taking work, finishes its requests, exits);
- `compose`: `docker compose up -d --no-deps --no-recreate --scale <svc>=N <svc>`;
- `kubernetes`: patches the `replicas` of the worker Deployments (scale subresource) through
  the Kubernetes API with the official client; the pod chosen for draining first gets the
  `controller.kubernetes.io/pod-deletion-cost` annotation so the ReplicaSet removes that
  pod rather than an arbitrary one;
- `none`: the targets in etcd are the whole output (an external operator acts on them).

A connector raises `ConnectorError` when it could not do (all of) what was asked; the
service logs it, counts it and retries with backoff. Connectors that apply deltas (`local`)
remove from the `ScaleChange` what they did, so a retry does only the rest; absolute ones
(`compose`, `kubernetes`) are idempotent and a retry applies the latest targets.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import structlog

from genset.planning.actuation import DrainRequest, ScaleChange, WorkerHandle, WorkerLauncher
from genset.runtime.infra import child_command

log = structlog.get_logger("genset.planner")

CONNECTORS = ("local", "compose", "kubernetes", "none")
POD_DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"


class ConnectorError(RuntimeError):
    """The connector could not carry out (all of) a change; the message says what failed."""


class Connector:
    name = "none"
    absolute = True  # applies `targets` (idempotent), not the deltas

    async def apply(self, change: ScaleChange) -> None:
        """Carry out `change`; raise ConnectorError if (part of) it failed."""

    async def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# local processes


class ProcessHandle:
    def __init__(self, role: str, proc: subprocess.Popen, log_path: Path) -> None:
        self.role = role
        self.proc = proc
        self.log_path = log_path
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


class ProcessLauncher:
    """Starts `genset worker --role R` children of this process, each in its own process
    group with its log under `log_dir`, and tied to this process by the parent-death signal.

    `argv_tail` carries the flags every worker gets (NATS, etcd, namespace, engine, model...);
    secrets go in `env` (GENSET_* variables), never on a command line `ps` shows."""

    def __init__(self, argv_tail: list[str], log_dir: Path, env: dict[str, str] | None = None,
                 python: str = sys.executable) -> None:
        self.argv_tail = list(argv_tail)
        self.log_dir = Path(log_dir)
        self.env = dict(env or {})
        self.python = python
        self.handles: list[ProcessHandle] = []
        self._n = 0

    def argv(self, role: str) -> list[str]:
        return [self.python, "-m", "genset.cli", "worker", "--role", role, *self.argv_tail]

    def start_worker(self, role: str) -> ProcessHandle:
        self._n += 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"planner-{role}-{os.getpid()}-{self._n}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        argv = self.argv(role)
        with open(log_path, "ab") as out:
            try:
                cmd, preexec = child_command(argv)
                proc = subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=env, start_new_session=True, preexec_fn=preexec)
            except OSError as exc:
                raise ConnectorError(f"cannot start {shlex.join(argv[:6])} ...: {exc}") from None
        handle = ProcessHandle(role, proc, log_path)
        self.handles.append(handle)
        log.info("worker process started", role=role, pid=proc.pid, log=str(log_path))
        return handle

    def stop_worker(self, handle: WorkerHandle) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(handle.pid, signal.SIGTERM)

    def reap(self) -> list[ProcessHandle]:
        """Forget (and return) the workers that exited."""
        gone = [h for h in self.handles if not h.alive]
        self.handles = [h for h in self.handles if h.alive]
        return gone

    def close(self, timeout_s: float = 30.0) -> None:
        alive = [h for h in self.handles if h.alive]
        for h in alive:
            self.stop_worker(h)
        deadline = time.monotonic() + timeout_s
        for h in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                h.proc.wait(max(0.0, deadline - time.monotonic()))
            if h.alive:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(h.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    h.proc.wait(5)
        self.handles.clear()


def is_local_genset_worker(pid: int) -> bool:
    """Whether `pid` on this machine is a `genset worker` process (so a stale pid from etcd
    can never make the planner signal an unrelated process)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    words = [c.decode(errors="replace") for c in cmd]
    return "worker" in words and any("genset" in w or "services.decode" in w for w in words)


class LocalConnector(Connector):
    name = "local"
    absolute = False

    def __init__(self, launcher: WorkerLauncher, *, hostname: str | None = None,
                 stop_timeout_s: float = 40.0) -> None:
        self.launcher = launcher
        self.hostname = hostname or socket.gethostname()
        self.stop_timeout_s = stop_timeout_s
        self.handles: list[WorkerHandle] = []

    async def apply(self, change: ScaleChange) -> None:
        errors: list[str] = []
        for role in list(change.start):
            while change.start.get(role, 0) > 0:
                try:
                    # on the loop's thread on purpose: see WorkerLauncher
                    self.handles.append(self.launcher.start_worker(role))
                except Exception as exc:
                    errors.append(f"start {role} worker: {exc}")
                    break
                change.start[role] -= 1
        for req in list(change.drain):
            try:
                self._drain(req)
                change.drain.remove(req)
            except ConnectorError as exc:
                errors.append(str(exc))
        self.handles = [h for h in self.handles if h.alive]
        if errors:
            raise ConnectorError("; ".join(errors))

    def _drain(self, req: DrainRequest) -> None:
        handle = next((h for h in self.handles if req.pid and h.pid == req.pid), None)
        if handle is not None:
            self.launcher.stop_worker(handle)
        elif req.pid and req.host == self.hostname and is_local_genset_worker(req.pid):
            # a worker this planner did not start (e.g. one `genset up` started) on this host
            with contextlib.suppress(ProcessLookupError):
                os.kill(req.pid, signal.SIGTERM)
        else:
            raise ConnectorError(
                f"cannot drain worker {req.worker_id:x}: it runs on {req.host or '?'} (pid "
                f"{req.pid or '?'}), not as a genset worker process on this host")
        log.info("worker asked to drain", worker=f"{req.worker_id:x}", role=req.role,
                 pid=req.pid)

    async def close(self) -> None:
        # Waiting for drains takes seconds: off the loop.
        await asyncio.to_thread(self.launcher.close, self.stop_timeout_s)


# ---------------------------------------------------------------------------------------------
# docker compose


def compose_argv(command: list[str], scales: dict[str, int], *, file: str = "",
                 project: str = "") -> list[str]:
    """The exact command that sets compose services to `scales` replicas: only those
    services, without touching their dependencies (--no-deps) or recreating running
    containers (--no-recreate, so scaling never restarts a serving worker)."""
    argv = list(command)
    if file:
        argv += ["-f", file]
    if project:
        argv += ["-p", project]
    argv += ["up", "-d", "--no-deps", "--no-recreate"]
    for svc in sorted(scales):
        argv += ["--scale", f"{svc}={int(scales[svc])}"]
    return argv + sorted(scales)


async def run_command(argv: list[str], timeout_s: float) -> str:
    """Run `argv`; its output, or ConnectorError (exit status, or timeout: then killed)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
    except OSError as exc:
        raise ConnectorError(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from None
    try:
        async with asyncio.timeout(timeout_s):
            out, _ = await proc.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise ConnectorError(f"{shlex.join(argv)} did not finish in {timeout_s:.0f} s") from None
    except asyncio.CancelledError:
        # the planner is stopping: the command must not outlive it (a compose `up` left
        # running goes on scaling after the planner is gone); asyncio reaps it
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(text.strip().splitlines()[-5:])
        raise ConnectorError(f"{shlex.join(argv)} exited with {proc.returncode}: {tail}")
    return text


class ComposeConnector(Connector):
    name = "compose"

    def __init__(self, services: dict[str, str], *, command: str = "docker compose",
                 file: str = "", project: str = "", timeout_s: float = 120.0) -> None:
        self.services = services  # role -> compose service
        self.command = shlex.split(command)
        if not self.command:
            raise ValueError("the compose command is empty")
        self.file = file
        self.project = project
        self.timeout_s = timeout_s
        self._warned_drain = False

    def argv(self, targets: dict[str, int]) -> list[str]:
        scales = {self.services[r]: n for r, n in targets.items() if r in self.services}
        return compose_argv(self.command, scales, file=self.file, project=self.project)

    async def apply(self, change: ScaleChange) -> None:
        if change.drain and not self._warned_drain:
            # compose removes the highest-numbered containers; it cannot be told which
            log.info("compose chooses which containers to remove on a scale-down; the "
                     "planner's drain choice is not applied")
            self._warned_drain = True
        await run_command(self.argv(change.targets), self.timeout_s)


# ---------------------------------------------------------------------------------------------
# Kubernetes


def _import_kubernetes():
    try:
        import kubernetes
    except ImportError:
        raise ConnectorError("the kubernetes connector needs the `kubernetes` package: "
                             "pip install 'genset[k8s]'") from None
    return kubernetes


class KubernetesConnector(Connector):
    """Sets `spec.replicas` of each pool's Deployment through its scale subresource.

    API access: `api_url` (e.g. `kubectl proxy` at http://127.0.0.1:8001), else the kubeconfig
    file, else the in-cluster service account (what the planner's pod uses; the RBAC it needs
    is in deploy/k8s/planner.yaml)."""

    name = "kubernetes"

    def __init__(self, namespace: str, deployments: dict[str, str], *, api_url: str = "",
                 kubeconfig: str = "", timeout_s: float = 30.0) -> None:
        self.namespace = namespace
        self.deployments = deployments  # role -> Deployment name
        self.api_url = api_url
        self.kubeconfig = kubeconfig
        self.timeout_s = timeout_s
        self._apps = None
        self._core = None

    def _clients(self):
        if self._apps is not None:
            return self._apps, self._core
        k8s = _import_kubernetes()
        cfg = k8s.client.Configuration()
        try:
            if self.api_url:
                cfg.host = self.api_url.rstrip("/")
            elif self.kubeconfig or os.path.exists(os.path.expanduser("~/.kube/config")):
                k8s.config.load_kube_config(config_file=self.kubeconfig or None,
                                            client_configuration=cfg)
            else:
                k8s.config.load_incluster_config(client_configuration=cfg)
        except Exception as exc:  # the client raises its own ConfigException types
            raise ConnectorError(f"no Kubernetes API access: {exc}") from None
        api = k8s.client.ApiClient(cfg)
        self._apps, self._core = k8s.client.AppsV1Api(api), k8s.client.CoreV1Api(api)
        return self._apps, self._core

    def _mark_for_removal(self, req: DrainRequest) -> None:
        _, core = self._clients()
        body = {"metadata": {"annotations": {POD_DELETION_COST: "-1000"}}}
        core.patch_namespaced_pod(req.host, self.namespace, body,
                                  _request_timeout=self.timeout_s)

    def _scale(self, name: str, replicas: int) -> None:
        apps, _ = self._clients()
        apps.patch_namespaced_deployment_scale(name, self.namespace,
                                               {"spec": {"replicas": int(replicas)}},
                                               _request_timeout=self.timeout_s)

    def _apply(self, change: ScaleChange) -> None:
        errors = []
        for req in change.drain:
            if not req.host:
                continue
            try:
                self._mark_for_removal(req)
            except Exception as exc:  # the pod may be gone already: scaling still goes on
                log.warning("could not mark the pod to drain", pod=req.host, error=str(exc))
        for role, n in sorted(change.targets.items()):
            name = self.deployments.get(role)
            if name is None:
                continue
            try:
                self._scale(name, n)
            except ConnectorError:
                raise
            except Exception as exc:
                errors.append(f"scale deployment {self.namespace}/{name} to {n}: "
                              f"{_short(exc)}")
        if errors:
            raise ConnectorError("; ".join(errors))

    async def apply(self, change: ScaleChange) -> None:
        await asyncio.to_thread(self._apply, change)


def _short(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    if status is not None:
        return f"HTTP {status} {reason or ''}".strip()
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def parse_role_map(text: str, what: str) -> dict[str, str]:
    """`decode=decode,prefill=prefill` -> {role: name}."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        role, sep, name = part.partition("=")
        if not sep or not role.strip() or not name.strip():
            raise ValueError(f"{what}: expected role=name pairs separated by commas, got "
                             f"{part!r}")
        out[role.strip()] = name.strip()
    return out
