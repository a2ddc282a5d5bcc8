"""Start real genset service processes for end-to-end tests, and stop them without leftovers.

```python
from tests.stack import Stack

async def test_something(nats_server, etcd_server, tmp_path):
    async with Stack(nats_server.url, etcd_server.endpoint, log_dir=tmp_path) as stack:
        workers = await stack.start_workers(2, engine="mocker")   # ready: records in etcd
        frontend = await stack.start_frontend()                   # ready: /health + model listed
        ... httpx / openai against frontend.url ...
        workers[0].kill()                                          # SIGKILL, for failure tests
```

Every stack gets its own namespace (unless told), so tests sharing the session's NATS and etcd
never see each other's workers. Each child runs in its own process group; `stop()` sends
SIGTERM to every group, waits, then SIGKILLs stragglers, so nothing outlives the test. A
child that dies while starting raises `StackError` with the tail of its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from genset.runtime.infra import child_command, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent


class StackError(RuntimeError):
    pass


class ServiceProcess:
    """One `genset <command>` child process with its log file and its HTTP address."""

    def __init__(self, name: str, argv: list[str], log_path: Path, http_url: str,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.http_url = http_url  # /health and /metrics (the frontend's API too)
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.health: dict = {}  # last /health body seen while waiting for readiness

    def start(self) -> ServiceProcess:
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("GENSET_LOG_FORMAT", "json")
        with open(self.log_path, "ab") as log:
            # if the test process dies (a killed CI run), the children go with it
            argv, preexec = child_command([sys.executable, "-m", "genset.cli", *self.argv])
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=REPO_ROOT, env=env, start_new_session=True, preexec_fn=preexec,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def signal(self, sig: int) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, as far as the rest of the stack can tell."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def terminate(self) -> None:
        self.signal(signal.SIGTERM)

    async def wait_exit(self, wait_s: float) -> int | None:
        """Wait for the process to exit; returns its code, or None if it is still running."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not self.alive:
                break
            await asyncio.sleep(0.05)
        return self.returncode

    async def stop(self, wait_s: float = 15.0) -> int | None:
        """SIGTERM, wait up to `wait_s`, then SIGKILL the group. Returns the exit code."""
        if self.proc is None:
            return None
        self.terminate()
        code = await self.wait_exit(wait_s)
        if code is None:
            self.signal(signal.SIGKILL)
            code = await self.wait_exit(10)
        # Children the service spawned itself share its group: make sure none survive.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        return code

    async def get(self, path: str, wait_s: float = 2.0) -> httpx.Response:
        async with httpx.AsyncClient(timeout=wait_s) as client:
            return await client.get(self.http_url + path)

    async def read_health(self) -> dict:
        """The /health body now (also kept as `health`)."""
        self.health = (await self.get("/health")).json()
        return self.health

    async def metrics(self) -> dict[str, float]:
        """The Prometheus text at /metrics as {"name{labels}": value}."""
        resp = await self.get("/metrics")
        resp.raise_for_status()
        return parse_metrics(resp.text)

    async def wait_until(self, check, what: str, wait_s: float) -> None:
        """Poll `await check()` until it is truthy; fail fast (with the log) if the child dies."""
        deadline = time.monotonic() + wait_s
        last_error = ""
        while True:
            if not self.alive:
                raise StackError(
                    f"{self.name} exited with code {self.returncode} before {what}; log tail:\n"
                    f"{self.log_tail()}"
                )
            try:
                if await check():
                    return
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise StackError(
                    f"{self.name} not {what} after {wait_s:.0f}s ({last_error or 'check false'});"
                    f" log tail:\n{self.log_tail()}"
                )
            await asyncio.sleep(0.1)


class WorkerProcess(ServiceProcess):
    """A `genset worker`; ready once its /health says its records are in etcd."""

    @property
    def instance_id(self) -> int:
        return int(self.health["instance_id"])

    @property
    def model(self) -> str:
        return str(self.health["model"])

    async def wait_ready(self, wait_s: float) -> None:
        async def check() -> bool:
            resp = await self.get("/health")
            if resp.status_code != 200:
                return False
            self.health = resp.json()
            return bool(self.health.get("ready"))

        await self.wait_until(check, "ready", wait_s)


class FrontendProcess(ServiceProcess):
    """A `genset frontend`; `url` is its OpenAI API base (without /v1)."""

    @property
    def url(self) -> str:
        return self.http_url

    async def wait_ready(self, wait_s: float, models: list[str] | None = None) -> None:
        async def check() -> bool:
            resp = await self.get("/health")
            if resp.status_code != 200:
                return False
            self.health = resp.json()
            if not models:
                return True
            listed = {m["id"] for m in (await self.get("/v1/models")).json().get("data", [])}
            return set(models) <= listed

        await self.wait_until(check, "ready" + (f" with models {models}" if models else ""), wait_s)


class Stack:
    """A set of genset service processes sharing one NATS, one etcd and one namespace."""

    def __init__(self, nats_url: str, etcd_endpoint: str, *, namespace: str | None = None,
                 log_dir: str | Path | None = None, env: dict[str, str] | None = None) -> None:
        self.nats_url = nats_url
        self.etcd_endpoint = etcd_endpoint
        self.namespace = namespace or f"t{uuid.uuid4().hex[:10]}"
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="genset-stack-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.processes: list[ServiceProcess] = []
        self._counts: dict[str, int] = {}

    def port(self) -> int:
        """A free listening port for a child, never handed out twice by this test process
        (genset.runtime.infra.free_port)."""
        return free_port()

    def common_args(self, metrics_port: int) -> list[str]:
        return ["--nats", self.nats_url, "--etcd", self.etcd_endpoint,
                "--namespace", self.namespace, "--host", "127.0.0.1",
                "--metrics-port", str(metrics_port)]

    def _log_path(self, name: str) -> tuple[str, Path]:
        n = self._counts[name] = self._counts.get(name, 0) + 1
        label = f"{name}-{n}"
        return label, self.log_dir / f"{label}.log"

    def spawn_worker(self, *, engine: str = "mocker", model: str = "tiny",
                     extra_args: list[str] | tuple[str, ...] = ()) -> WorkerProcess:
        """Start one worker without waiting (see `start_workers`)."""
        port = self.port()
        label, log_path = self._log_path("worker")
        argv = ["worker", "--engine", engine, "--model", model, *self.common_args(port),
                *extra_args]
        proc = WorkerProcess(label, argv, log_path, f"http://127.0.0.1:{port}", self.env)
        self.processes.append(proc)
        return proc.start()

    async def start_workers(self, n: int = 1, *, engine: str = "mocker", model: str = "tiny",
                            extra_args: list[str] | tuple[str, ...] = (),
                            wait_s: float = 90.0) -> list[WorkerProcess]:
        """Start `n` workers and wait until every one has registered its records in etcd."""
        workers = [self.spawn_worker(engine=engine, model=model, extra_args=extra_args)
                   for _ in range(n)]
        await asyncio.gather(*(w.wait_ready(wait_s) for w in workers))
        return workers

    async def start_frontend(self, *, models: list[str] | None = None,
                             extra_args: list[str] | tuple[str, ...] = (),
                             wait_s: float = 60.0) -> FrontendProcess:
        """Start a frontend; ready when /health answers 200 and `models` (default: the models of
        the workers started so far) are listed at /v1/models."""
        port = self.port()
        label, log_path = self._log_path("frontend")
        argv = ["frontend", "--port", str(port), *self.common_args(self.port()), *extra_args]
        proc = FrontendProcess(label, argv, log_path, f"http://127.0.0.1:{port}", self.env)
        self.processes.append(proc)
        proc.start()
        if models is None:
            models = sorted({w.model for w in self.workers if w.alive and w.health})
        await proc.wait_ready(wait_s, models)
        return proc

    async def start_service(self, command: str, *, extra_args: list[str] | tuple[str, ...] = (),
                            wait_s: float = 60.0) -> ServiceProcess:
        """Any other `genset <command>` service (e.g. router); ready when /health answers 200."""
        port = self.port()
        label, log_path = self._log_path(command)
        argv = [command, *self.common_args(port), *extra_args]
        proc = ServiceProcess(label, argv, log_path, f"http://127.0.0.1:{port}", self.env)
        self.processes.append(proc)
        proc.start()

        async def check() -> bool:
            return (await proc.get("/health")).status_code == 200

        await proc.wait_until(check, "healthy", wait_s)
        return proc

    @property
    def workers(self) -> list[WorkerProcess]:
        return [p for p in self.processes if isinstance(p, WorkerProcess)]

    async def stop(self, wait_s: float = 15.0) -> None:
        """SIGTERM everything at once, wait up to `wait_s`, SIGKILL what is left."""
        await asyncio.gather(*(p.stop(wait_s) for p in self.processes))

    def logs(self) -> str:
        """Every child's log tail, for assertion messages."""
        return "\n".join(f"--- {p.name} (pid {p.proc.pid if p.proc else '-'}) ---\n{p.log_tail()}"
                         for p in self.processes)

    async def __aenter__(self) -> Stack:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> {"name{labels}": value} (comments skipped)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            values[key] = float(value)
    return values


def metric(values: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0.0 when there is none)."""
    total = 0.0
    for key, value in values.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def log_events(path: Path, event: str) -> list[dict]:
    """The records of a JSON-lines log (GENSET_LOG_FORMAT=json) whose "event" is `event`."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == event:
            out.append(record)
    return out
