"""`genset up`: a whole local stack in one command.

Uses NATS and etcd when they answer at the given URLs, otherwise starts them (data under the
project-local state directory, `.state/` by default), then the router service (only with
`--router service` or several frontends: one frontend embeds the router, see `router_plan`),
the workers and the frontend, each as a child process running `genset <command>`
with its log in `<state>/logs/`. It prints progress while starting, waits until the frontend
lists the model, prints the URL and a ready-to-paste curl line, and on Ctrl-C or SIGTERM stops
everything in reverse order: SIGTERM, wait, SIGKILL what is left. A child that dies while
starting stops the whole stack with a message and the tail of its log.

Once up, every child (and NATS / etcd when this process started them) is supervised
(`genset.supervise`): one that exits is reported and started again after a backoff (0.5 s
doubling to 30 s); one that keeps crashing right after each start is reported loudly with its
log and given up on while the rest serves on (the frontend routes without a router; workers
take over from a lost one). Only when nothing can serve any more (the frontend, NATS or every
worker given up on) does `genset up` stop the stack and exit 1.

Every child runs in its own process group and is told by the kernel to exit if this process
dies (Linux parent-death signal), so even a SIGKILL of `genset up` leaves nothing behind.

With `--planner [load|slo]` the planner (`genset planner`'s code) runs inside this process and
sizes the worker pool between --min-workers and --max-workers (with --prefill-workers, the
prefill pool too, between 1 and --max-workers: it sets the prefill:decode ratio): this process
starts the workers it asks for and supervises them like the others, and a worker it drains gets SIGTERM (it
finishes its requests, then exits) and is no longer restarted (`genset.launch_planner`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import math
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from genset.engines.factory import served_model_name
from genset.routing.api import (
    MODE_AUTO,
    MODE_EMBEDDED,
    MODE_SERVICE,
    POLICY_NAMES,
    router_mode,
)
from genset.runtime import auth  # security: credentials, NATS config, etcd users (issue 14)
from genset.runtime.config import DefaultsHelpFormatter
from genset.runtime.infra import child_command, pick_listen_port
from genset.supervise import RestartPolicy, Supervisor, describe_exit
from proto import ROLE_DECODE, ROLE_PREFILL

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0")




class LaunchError(RuntimeError):
    """The stack could not start; the message says which part and why."""


class Interrupted(Exception):  # a signal arrived, not an error
    pass


def _router_mode(text: str) -> str:
    try:
        return router_mode(text)
    except ValueError as exc:  # argparse shows it as "argument --router: ..."
        raise argparse.ArgumentTypeError(str(exc)) from None


def router_plan(mode: str, frontends: int) -> tuple[bool, str]:
    """(start the router service?, the `--router` every frontend gets) for `genset up --router
    MODE --frontends N`.

    `auto` with one frontend runs the router embedded in it, with no router service: that one
    frontend already decides every request with its warm copy of the router ("local first"),
    so a service beside it only followed the same feeds (every KV event, load report and
    lifecycle message delivered to one more process) to answer what the frontend could not
    route yet; at c=16 it cost 1.1 of 15.45 ms CPU per request, 1.85 of 26.95 with 4 workers
    (docs/benchmarks.md §5l; §5m measures the stack without it). With two frontends or more
    the service stays: their decisions meet there and in each other's views, and a frontend
    that starts or restarts asks it while its own view is empty. `service` always starts it;
    `embedded` and the policy names never do."""
    if mode == MODE_SERVICE or (mode == MODE_AUTO and frontends > 1):
        return True, MODE_SERVICE
    if mode == MODE_AUTO:
        return False, MODE_EMBEDDED
    return False, mode


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter,
        prog="genset up",
        description="Start a local genset stack (NATS, etcd, router, frontend, workers) and "
                    "serve the OpenAI API until Ctrl-C; a process of the stack that exits is "
                    "restarted (with backoff; given up on when it keeps crashing).")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the OpenAI API (default 8000)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the API listens on (default loopback only)")
    p.add_argument("--workers", type=int, default=2, help="number of workers (default 2)")
    p.add_argument("--frontends", type=int, default=1, metavar="N",
                   help="frontend processes sharing --port (default 1). Each is one event loop: "
                        "at high request rates more of them use more cores (speedup-1000 mocker, "
                        "2 cores: 2 frontends served 1.3x the requests of one); at low rates "
                        "each extra one costs CPU for nothing (docs/benchmarks.md, issue 15)")
    p.add_argument("--prefill-workers", type=int, default=0, metavar="N",  # disaggregation
                   help="prefill workers (default 0: aggregated serving); the --workers then "
                        "decode and send a request's prefill there when it pays")
    p.add_argument("--engine", choices=("torch", "mocker"), default="torch",
                   help="worker engine: torch (runs the model) or mocker (timing model, no tensors)")
    p.add_argument("--model", default="tiny",
                   help="'tiny' (built in) or a local Hugging Face model directory")
    p.add_argument("--served-model-name", default=None, help="model name clients use")
    p.add_argument("--router", type=_router_mode, default=MODE_AUTO, metavar="MODE",
                   help="auto (default): the KV-aware router embedded in the frontend with one "
                        "frontend, a `genset router` service the frontends share with "
                        "--frontends 2 or more; service: always the router service; embedded: "
                        "always in each frontend, no service; or a routing policy run embedded "
                        f"({', '.join(POLICY_NAMES)})")
    p.add_argument("--speedup", type=float, default=None, help="mocker: run this many times faster")
    p.add_argument("--namespace", default="default")
    p.add_argument("--nats", default="nats://127.0.0.1:4222",
                   help="NATS URL; started locally when nothing answers there")
    p.add_argument("--etcd", default="127.0.0.1:2379",
                   help="etcd endpoint host:port; started locally when nothing answers there")
    p.add_argument("--state-dir", default=".state",
                   help="where started NATS/etcd keep data and every process its log (default .state)")
    p.add_argument("--start-timeout", type=float, default=180.0,
                   help="seconds to wait for the stack to become ready")
    p.add_argument("--stop-timeout", type=float, default=20.0,
                   help="seconds a process gets to exit after SIGTERM before SIGKILL")
    p.add_argument("--log-level", default="info")
    p.add_argument("--worker-arg", action="append", default=[], metavar="ARG",
                   help="extra argument passed to every worker (repeatable), e.g. --worker-arg=--kv-blocks=512")
    auth.add_launch_args(p)  # security: --insecure, --tls, --max-workers, --api-key, ...
    # ---- KV offload store (issue 12; docs/offload.md) ----
    g = p.add_argument_group("KV offload store")
    g.add_argument("--offload-ram-gb", type=_non_negative, default=0.5,
                   help="RAM tier of the KV offload store, GiB (default 0.5; 0: no store, workers "
                        "compute every evicted prefix again)")
    g.add_argument("--offload-disk-gb", type=_non_negative, default=1.0,
                   help="disk tier of the store, GiB (default 1; 0: RAM only)")
    g.add_argument("--offload-dir", default=None,
                   help="directory of the disk tier (default <state-dir>/offload)")
    # ---- end KV offload store ----
    p.add_argument("--planner", nargs="?", const="load", choices=("load", "slo"), default=None,
                   help="run the planner (policy load, the default, or slo): it adds and drains "
                        "workers between --min-workers and --max-workers; --workers is the "
                        "initial count. With --prefill-workers it sizes the prefill pool too "
                        "(1 to --max-workers; --planner-arg=--max-prefill=N to change)")
    p.add_argument("--min-workers", type=int, default=1, help="planner: fewest workers (1)")
    p.add_argument("--planner-arg", action="append", default=[], metavar="ARG",
                   help="extra `genset planner` flag (repeatable), e.g. "
                        "--planner-arg=--down-cooldown-s=20 or --planner-arg=--ttft-ms=500")
    return p


def _non_negative(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):  # inf GB of RAM is no size
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


# ---------------------------------------------------------------------------------------------
# child processes


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    http_url: str = ""
    kind: str = ""  # stopped (and judged, see Supervisor) as a group: "worker" for worker-N

    def __post_init__(self) -> None:
        self.kind = self.kind or self.name.rstrip("0123456789").rstrip("-")

    def start(self) -> Child:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(self.argv)}\n".encode())
            log.flush()
            argv, preexec = child_command(self.argv)
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True, preexec_fn=preexec,
            )
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def restart(self) -> None:
        self.signal_group(signal.SIGKILL)  # anything the old process left in its group
        self.start()

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def signal_group(self, sig: int) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)


class ServerChild:
    """A NATS or etcd server `genset up` started, as something the Supervisor can restart:
    the same port and data directory, so what it stored survives the restart."""

    def __init__(self, server, start_timeout: float = 20.0) -> None:
        self.server = server
        self.name = self.kind = server.name
        self.start_timeout = start_timeout

    @property
    def alive(self) -> bool:
        return self.server.running

    @property
    def exit_code(self) -> int | None:
        proc = self.server.proc
        return None if proc is None else proc.poll()

    @property
    def log_path(self) -> Path:
        return self.server.log_path

    def log_tail(self, lines: int = 25) -> str:
        return self.server.log_tail(lines)

    def restart(self) -> None:
        self.server.stop(timeout=5.0, kill=True)  # reap the old one (it may be a zombie)
        self.server.start(timeout=self.start_timeout)


def nats_address(url: str) -> tuple[str, int]:
    """(host, port) of a --nats URL (scheme optional, port 4222 when none is given)."""
    parsed = urlparse(url if "://" in url else f"nats://{url}")
    try:
        port = parsed.port or 4222
    except ValueError:
        raise LaunchError(f"--nats {url!r}: the port is not a number from 0 to 65535") from None
    return parsed.hostname or "127.0.0.1", port


def etcd_address(endpoints: str) -> tuple[str, int]:
    """(host, port) of the first of --etcd's endpoints (host:port, scheme optional, port
    2379 when none is given)."""
    endpoint = endpoints.split(",")[0].split("://", 1)[-1]
    host, sep, port_s = endpoint.rpartition(":")
    if not sep:  # a host alone
        host, port_s = endpoint, ""
    if port_s and not port_s.isdigit():
        raise LaunchError(f"--etcd {endpoints!r}: the port {port_s!r} is not a number")
    return host or "127.0.0.1", int(port_s or 2379)


def _named_ports(args) -> set[int]:
    """The local ports --nats and --etcd name (their defaults when no port is given); a
    malformed one is reported where it is used (`ensure_nats`, `ensure_etcd`)."""
    ports: set[int] = set()
    for address, value in ((nats_address, args.nats), (etcd_address, args.etcd)):
        with contextlib.suppress(LaunchError):
            ports.add(address(value)[1])
    return ports


def genset_command(*args: str) -> list[str]:
    """`python -m genset.cli ...` with this interpreter: works from a clone without installing."""
    return [sys.executable, "-m", "genset.cli", *args]


def http_json(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None):
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return resp.status, json.loads(resp.read() or b"null")


def port_open(host: str, port: int) -> bool:
    from genset.runtime.infra import port_open as _port_open

    return _port_open(host, port, timeout=0.5)


# ---------------------------------------------------------------------------------------------
# the stack


class Launcher:
    def __init__(self, args: argparse.Namespace, out=None) -> None:
        self.args = args
        self.out = out or sys.stdout
        self.state_dir = Path(args.state_dir).expanduser().resolve()
        self.logs = self.state_dir / "logs"
        self.children: list[Child] = []  # in start order
        self.infra: list = []  # NatsServer / EtcdServer we started
        # Every port named on the command line is reserved before any is picked: the etcd
        # peer port is drawn before etcd binds its client port, so an unreserved --etcd port
        # could be drawn for it (a CI run lost `genset up` to exactly that: "bind: address
        # already in use" on the client port).
        self.ports_given: set[int] = {args.port, *_named_ports(args)}
        self.model_name = args.served_model_name or served_model_name(args.model)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.start_timeout
        # What cannot be lost without the stack losing its purpose (see `watch`).
        self.supervisor = Supervisor(self.say, RestartPolicy(),
                                     essential_kinds=frozenset({"frontend", "nats", "worker"}))
        self.stopping = False
        # work other threads (the planner's) hand to this one: it forks and supervises
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self.planner = None  # genset.launch_planner.PlannerThread with --planner
        self.initial_startup_s = 0.0  # spawn -> ready of the slowest worker start_workers ran
        self.retired: list[Child] = []  # drained workers, until they exit

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:5.1f}s] {text}", file=self.out, flush=True)

    # -- infrastructure ----------------------------------------------------------------------

    def ensure_nats(self) -> str:
        from genset.runtime.infra import NatsServer

        url = self.args.nats
        host, port = nats_address(url)
        if port_open(host, port):
            self.say(f"nats: using the server at {url}")
            return url
        if host not in LOCAL_HOSTS:
            raise LaunchError(f"NATS at {url} is not reachable (and is not local, so not starting one)")
        server = NatsServer(port=port, data_dir=self.state_dir / "nats", host="127.0.0.1",
                            config_file=self.security.nats_config())  # security
        self.say(f"nats: starting on port {port} (data in {server.data_dir})")
        self.infra.append(server)
        server.start()
        return server.url

    def ensure_etcd(self) -> str:
        from genset.runtime.infra import EtcdServer

        host, port = etcd_address(self.args.etcd)
        endpoint = f"{host}:{port}"
        if port_open(host, port):
            self.say(f"etcd: using the server at {endpoint}")
            return self.args.etcd
        if host not in LOCAL_HOSTS:
            raise LaunchError(f"etcd at {endpoint} is not reachable (and is not local, so not starting one)")
        # etcd's peer port must not collide with a second stack's: pick a free one.
        server = EtcdServer(port=port, peer_port=pick_listen_port(self.ports_given),
                            data_dir=self.state_dir / "etcd",
                            host="127.0.0.1", tls=self.security.tls)  # security
        self.say(f"etcd: starting on port {port} (data in {server.data_dir})")
        self.infra.append(server)
        server.start()
        self.security.etcd_started(server.endpoint)  # security: etcd users, auth on
        return server.endpoint

    # -- services ----------------------------------------------------------------------------

    def spawn(self, name: str, command: str, *args: str, env: dict[str, str] | None = None) -> Child:
        metrics_port = pick_listen_port(self.ports_given)
        common = ["--nats", self.nats_url, "--etcd", self.etcd_endpoint,
                  "--namespace", self.args.namespace, "--metrics-port", str(metrics_port),
                  "--log-level", self.args.log_level, "--log-format", "json"]
        env = {**self.security.child_env(command, name), **(env or {})}  # security
        child = Child(name, genset_command(command, *common, *args), self.logs / f"{name}.log",
                      env=env, http_url=f"http://127.0.0.1:{metrics_port}")
        self.children.append(child)
        return child.start()

    def check_alive(self, children: list[Child]) -> None:
        for child in children:
            if not child.alive:
                code = child.proc.returncode if child.proc else None
                raise LaunchError(
                    f"{child.name} exited with code {code} while starting "
                    f"(log: {child.log_path}):\n{child.log_tail()}")

    def wait_until(self, what: str, children: list[Child], ready) -> None:
        """Poll `ready()` until true; fail on a dead child or the start deadline."""
        last = ""
        started = time.monotonic()
        next_note = started + 10.0
        while True:
            self.check_alive(self.children)  # anything started so far, not only these
            try:
                if ready():
                    return
            except (OSError, ValueError, urllib.error.URLError) as exc:
                last = str(exc)
            if time.monotonic() > next_note:
                next_note += 10.0
                self.say(f"  still waiting for {what} ({time.monotonic() - started:.0f}s; "
                         f"logs in {self.logs})")
            if time.monotonic() > self.deadline:
                tails = "\n".join(f"--- {c.name} ({c.log_path}):\n{c.log_tail(15)}" for c in children)
                raise LaunchError(
                    f"{what} not ready after {self.args.start_timeout:.0f}s"
                    f"{' (' + last + ')' if last else ''}\n{tails}")
            time.sleep(0.2)

    def worker_env(self) -> dict[str, str]:
        # N torch workers on a few cores: give each a fair share of threads instead of letting
        # every one of them spin up a thread per core.
        if self.args.engine != "torch" or "OMP_NUM_THREADS" in os.environ:
            return {}
        threads = max(1, (os.cpu_count() or 1) // max(1, self.args.workers
                                                     + self.args.prefill_workers))
        return {"OMP_NUM_THREADS": str(threads)}

    # ---- KV offload store (issue 12) ---------------------------------------------------------
    def start_offload_store(self) -> Child | None:
        """The store workers write evicted KV blocks to, before the workers (they find it in
        etcd); None with --offload-ram-gb 0."""
        a = self.args
        if a.offload_ram_gb <= 0:
            return None
        directory = a.offload_dir or str(self.state_dir / "offload")
        # --require-token-ids: this stack's workers (torch, mocker) put every block with its
        # token ids, imported ones too (`KvImport.token_ids`), so the store checks every hash
        # and keeps nothing on a sender's word; only TensorRT-LLM workers, which `genset up`
        # never starts, put blocks without them (docs/offload.md, Verification)
        store = self.spawn("offload", "offload", "--offload-ram-gb", str(a.offload_ram_gb),
                           "--offload-disk-gb", str(a.offload_disk_gb),
                           "--offload-dir", directory, "--require-token-ids")
        self.say(f"offload store: starting ({a.offload_ram_gb:g} GiB RAM, "
                 f"{a.offload_disk_gb:g} GiB disk in {directory})")
        self.wait_until("offload store", [store],
                        lambda: http_json(store.http_url + "/health")[0] == 200)
        self.say("  offload store ready")
        return store
    # ---- end KV offload store ------------------------------------------------------------------

    def worker_args(self, role: str = ROLE_DECODE) -> list[str]:
        a = self.args
        extra = ["--engine", a.engine, "--model", a.model, "--role", role]
        if a.offload_ram_gb <= 0:
            extra += ["--offload", "off"]
        if a.served_model_name:
            extra += ["--served-model-name", a.served_model_name]
        if a.speedup is not None:
            extra += ["--speedup", str(a.speedup)]
        return extra + a.worker_arg

    def spawn_worker(self, role: str = ROLE_DECODE) -> Child:
        # worker-N runs as credential slot N-1 (genset.runtime.auth): the lowest N no live
        # worker holds, so a stack the planner resizes again and again stays within its slots
        taken = {c.name for c in (*self.children, *self.retired)}
        n = next(k for k in itertools.count(1) if f"worker-{k}" not in taken)
        return self.spawn(f"worker-{n}", "worker", *self.worker_args(role),
                          env=self.worker_env())

    def start_workers(self) -> list[Child]:
        a = self.args
        spawned = time.monotonic()
        workers = [self.spawn_worker() for _ in range(a.workers)]
        self.say(f"workers: starting {a.workers} x {a.engine} engine, model {a.model}")
        # disaggregation: prefill workers are workers too (worker-N: worker slot N-1, so their
        # own id and permissions), numbered after the decode workers
        workers += [self.spawn_worker(ROLE_PREFILL) for _ in range(a.prefill_workers)]
        if a.prefill_workers:
            self.say(f"prefill workers: starting {a.prefill_workers} (worker-{a.workers + 1}"
                     f"..worker-{a.workers + a.prefill_workers})")
        done: set[str] = set()

        def ready() -> bool:
            for w in workers:
                if w.name in done:
                    continue
                with contextlib.suppress(OSError, ValueError):
                    status, body = http_json(w.http_url + "/health")
                    if status == 200 and isinstance(body, dict) and body.get("ready"):
                        done.add(w.name)
                        self.initial_startup_s = max(self.initial_startup_s,
                                                     time.monotonic() - spawned)
                        self.say(f"  {w.name} ready ({len(done)}/{len(workers)})")
            return len(done) == len(workers)

        self.wait_until("workers", workers, ready)
        return workers

    def start_router_service(self) -> Child:
        router = self.spawn("router", "router")
        self.say("router: starting")
        self.wait_until("router", [router],
                        lambda: http_json(router.http_url + "/health")[0] == 200)
        self.say("  router ready")
        return router

    def start_frontend(self, router_mode: str) -> Child:
        """The frontend, or `--frontends N` of them on one port (SO_REUSEPORT), started one
        after the other: each is checked on its own status port before the next one starts,
        since the shared port answers from any of them. Returns the first."""
        a = self.args
        port = a.port
        if a.frontends > 1 and port == 0:
            port = pick_listen_port(self.ports_given)  # one port for all of them
        url = f"http://{'127.0.0.1' if a.host in LOCAL_HOSTS else a.host}:{port}"
        extra = ("--reuse-port",) if a.frontends > 1 else ()
        frontends = []
        for n in range(1, a.frontends + 1):
            name = "frontend" if a.frontends == 1 else f"frontend-{n}"
            frontend = self.spawn(name, "frontend", "--port", str(port), "--host", a.host,
                                  "--router", router_mode, *extra)
            status_url, frontend.http_url = frontend.http_url, url
            self.say(f"{name}: starting on port {port}")

            def ready(status_url: str = status_url) -> bool:
                # its own status port (not the shared one): this process, not a sibling
                status, _ = http_json(status_url + "/health")
                if status != 200:
                    return False
                _, models = http_json(url + "/v1/models",
                                      headers=self.security.api_headers())  # security
                return any(m.get("id") == self.model_name for m in models.get("data", []))

            self.wait_until(f"{name} (model {self.model_name!r} listed)", [frontend], ready)
            frontends.append(frontend)
        return frontends[0]

    def start(self) -> Child:
        a = self.args
        if a.workers < 1:
            raise LaunchError("--workers must be at least 1")
        if a.prefill_workers < 0:
            raise LaunchError("--prefill-workers must be 0 or more")
        if a.frontends < 1:
            raise LaunchError("--frontends must be at least 1")
        # checked here, before anything starts: else the frontend (or every worker) refused
        # it only after NATS, etcd, the router and the workers had been started
        if not 0 <= a.port <= 65535:
            raise LaunchError(f"--port must be within 0..65535, got {a.port}")
        for name in ("start_timeout", "stop_timeout"):
            v = getattr(a, name)
            if not (math.isfinite(v) and v > 0):  # nan never expires; a deadline must
                raise LaunchError(f"--{name.replace('_', '-')} must be a number > 0, got {v}")
        if a.speedup is not None and not (math.isfinite(a.speedup) and a.speedup > 0):
            raise LaunchError(f"--speedup must be a number > 0, got {a.speedup}")
        if a.planner:
            self.check_planner_args()
        if a.port != 0 and a.host in LOCAL_HOSTS and port_open("127.0.0.1", a.port):
            raise LaunchError(f"port {a.port} is already in use: pick another with --port")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:  # security: credentials in <state>/auth, made on the first start
            self.security = auth.StackSecurity(a, self.state_dir, model=self.model_name)
        except auth.AuthError as exc:
            raise LaunchError(str(exc)) from None
        self.nats_url = self.ensure_nats()
        self.etcd_endpoint = self.ensure_etcd()
        service, router_mode = router_plan(a.router, a.frontends)
        if service:
            self.start_router_service()
        else:
            self.say(f"router: {router_mode} in the frontend (no router service: "
                     f"{'one frontend' if a.router == MODE_AUTO else '--router ' + a.router})")
        self.start_offload_store()  # KV offload store (issue 12)
        workers = self.start_workers()
        frontend = self.start_frontend(router_mode)
        if a.planner:
            self.start_planner(workers)
        return frontend

    # -- the planner (--planner) -------------------------------------------------------------

    def planner_bounds(self) -> tuple[int, int]:
        a = self.args
        hi = a.max_workers if a.max_workers is not None else max(4, a.workers)
        return a.min_workers, hi

    def check_planner_args(self) -> None:
        lo, hi = self.planner_bounds()
        if lo < 1:
            raise LaunchError(f"--min-workers must be at least 1, got {lo}")
        if hi < lo:
            raise LaunchError(f"--max-workers {hi} is below --min-workers {lo}")
        if not lo <= self.args.workers <= hi:
            raise LaunchError(f"--workers {self.args.workers} (the initial count) must be "
                              f"within --min-workers {lo} and --max-workers {hi}")
        if self.args.prefill_workers > hi:
            raise LaunchError(f"--prefill-workers {self.args.prefill_workers} (the initial "
                              f"count) must be at most --max-workers {hi}, the prefill pool's "
                              f"ceiling too")

    def planner_argv(self) -> list[str]:
        """`genset planner`'s flags for this stack (the user's --planner-arg last: they win).
        With prefill workers the planner manages both pools, so it sizes the prefill:decode
        ratio: the prefill pool within 1 and --max-workers (a prefill pool of none would
        silently turn a disaggregated stack back into an aggregated one)."""
        a = self.args
        lo, hi = self.planner_bounds()
        argv = ["--nats", self.nats_url, "--etcd", self.etcd_endpoint, "--namespace",
                a.namespace, "--log-level", a.log_level, "--policy", a.planner,
                "--min-workers", str(lo), "--max-workers", str(hi), "--connector", "local"]
        if a.prefill_workers:
            argv += ["--pools", f"{ROLE_DECODE},{ROLE_PREFILL}", "--min-prefill", "1",
                     "--max-prefill", str(hi)]
        return argv + a.planner_arg

    def start_planner(self, workers: list[Child]) -> None:
        from genset.launch_planner import (
            ChildHandle,
            PlannerThread,
            StackWorkers,
            planner_options,
            startup_prior,
        )

        a = self.args
        lo, hi = self.planner_bounds()
        try:
            config, options = planner_options(self.planner_argv())
        except SystemExit:  # argparse printed which flag was wrong
            raise LaunchError("bad --planner-arg (see the message above)") from None
        prior = startup_prior(a.planner_arg, os.environ, self.initial_startup_s)
        if prior is not None:
            options = dataclasses.replace(options, startup_s=prior)
        # security: the planner (in this process) logs in as the stack's planner user
        env = self.security.child_env("planner", "planner")
        config = dataclasses.replace(
            config, nats_user=env.get("GENSET_NATS_USER", config.nats_user),
            nats_password=env.get("GENSET_NATS_PASSWORD", config.nats_password),
            nats_ca=env.get("GENSET_NATS_CA", config.nats_ca),
            etcd_user=env.get("GENSET_ETCD_USER", config.etcd_user),
            etcd_password=env.get("GENSET_ETCD_PASSWORD", config.etcd_password),
            etcd_ca=env.get("GENSET_ETCD_CA", config.etcd_ca))
        stack = StackWorkers(self.call_soon, self.add_worker, self.retire_worker)
        self.planner = PlannerThread(config, options, stack, [ChildHandle(w) for w in workers],
                                     self.logs / "planner.log")
        pools = (f"{lo}-{hi} decode and {options.min_prefill}-{options.max_prefill} prefill "
                 f"workers" if ROLE_PREFILL in options.pool_list() else f"{lo}-{hi} workers")
        self.say(f"planner: {a.planner} policy, {pools}, start-up "
                 f"{options.startup_s:g} s {'as measured here' if prior is not None else 'as set'}"
                 f" until it times its own (log: {self.logs / 'planner.log'})")
        try:
            self.planner.start()
        except RuntimeError as exc:
            raise LaunchError(str(exc)) from None

    def call_soon(self, fn) -> concurrent.futures.Future:
        """Run `fn` on this (the launcher's) thread at its next turn; from any thread."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self.stopping:
            fut.set_exception(LaunchError("the stack is stopping"))
            return fut
        self._calls.put((fn, fut))
        self._wake.set()
        return fut

    def run_calls(self) -> None:
        while True:
            try:
                fn, fut = self._calls.get_nowait()
            except queue.Empty:
                return
            if self.stopping:
                fut.set_exception(LaunchError("the stack is stopping"))
                continue
            try:
                fut.set_result(fn())
            except Exception as exc:
                fut.set_exception(exc)

    def add_worker(self, role: str) -> Child:
        """A worker the planner asked for: started and supervised like the first ones."""
        child = self.spawn_worker(role)
        self.supervisor.add(child, time.monotonic())
        self.say(f"planner: started {child.name} ({role}, pid {child.proc.pid})")
        return child

    def retire_worker(self, child: Child) -> None:
        """A worker the planner drains: no longer restarted; SIGTERM makes it finish its
        requests and exit."""
        self.supervisor.remove(child.name)
        if child in self.children:
            self.children.remove(child)
        self.retired.append(child)
        if child.alive:
            child.signal_group(signal.SIGTERM)
        self.say(f"planner: draining {child.name} (pid {child.proc.pid if child.proc else '?'})")

    def reap_retired(self) -> None:
        for child in list(self.retired):
            if not child.alive:
                self.retired.remove(child)
                child.signal_group(signal.SIGKILL)  # anything it left in its group
                self.say(f"{child.name} drained and exited "
                         f"{describe_exit(child.exit_code)}")

    # -- running and stopping -----------------------------------------------------------

    def banner(self, frontend: Child) -> None:
        url = frontend.http_url
        body = json.dumps({"model": self.model_name,
                           "messages": [{"role": "user", "content": "Hello!"}],
                           "max_tokens": 32})
        key = ("-H \"Authorization: Bearer $GENSET_API_KEY\" "
               if self.security.api_key else "")  # security
        frontends = f"{self.args.frontends} frontends, " if self.args.frontends > 1 else ""
        prefill = (f" + {self.args.prefill_workers} prefill" if self.args.prefill_workers
                   else "")
        print(f"\ngenset is up: {url}/v1  (model {self.model_name!r}, {frontends}{self.args.workers} "
              f"{self.args.engine} worker{'s' if self.args.workers > 1 else ''}{prefill}, "
              f"logs in {self.logs})\n\n"
              f"  curl {url}/v1/chat/completions {key}-H 'Content-Type: application/json' \\\n"
              f"    -d '{body}'\n\n"
              f"  page     {url}/dashboard\n"
              f"  metrics  {url}/metrics\n"
              f"  chat     {shlex.join(self.chat_command())}\n\n"
              "Ctrl-C stops everything.", file=self.out, flush=True)

    def chat_command(self) -> list[str]:
        """The `genset chat` line for this stack: its NATS, namespace and state directory
        (where the chat client finds its credentials)."""
        return ["genset", "chat", "--nats", self.nats_url, "--namespace", self.args.namespace,
                "--state-dir", str(self.state_dir)]

    def supervise(self) -> None:
        """Hand every child and the servers we started to the supervisor (after start-up:
        a child dying while the stack starts stops it, see `wait_until`)."""
        now = time.monotonic()
        for server in self.infra:
            self.supervisor.add(ServerChild(server), now)
        for child in self.children:
            self.supervisor.add(child, now)

    def watch(self, poll_s: float = 0.2) -> None:
        """Run until a signal arrives, restarting what exits (see the module docstring);
        raises LaunchError when an essential kind of child was given up on."""
        self.supervise()
        while not self.stopping:
            self.run_calls()
            self.reap_retired()
            lost = self.supervisor.step(time.monotonic())
            if lost:
                raise LaunchError(f"the stack cannot serve any more: every {' and '.join(lost)} "
                                  f"crashed repeatedly (see above); stopping it")
            self._wake.wait(poll_s)
            self._wake.clear()

    def stop_groups(self) -> list[list[Child]]:
        """Children grouped by kind, the kind started last first: the frontend stops taking
        requests before the workers drain, and whatever is added to the stack later stops
        before what it was started on top of."""
        kinds: list[str] = []
        for child in self.children:
            if child.kind not in kinds:
                kinds.append(child.kind)
        return [[c for c in self.children if c.kind == kind] for kind in reversed(kinds)]

    def stop(self) -> None:
        """Every group of children in reverse start order (frontend first), then the
        infrastructure we started. SIGTERM, wait, SIGKILL stragglers. Nothing is restarted
        from here on."""
        self.stopping = True
        if self.planner is not None:  # first: nothing is started or drained behind our back
            self.planner.stop()
        self.run_calls()  # answers what the planner still asked: "stopping"
        self.children.extend(self.retired)  # drained workers still finishing: stop them too
        self.retired.clear()
        order = [c for c in reversed(self.children) if c.alive or c.proc is not None]
        if order:
            self.say("stopping " + ", ".join(c.name for c in order if c.alive))
        for group in self.stop_groups():
            group = [c for c in group if c.proc is not None]
            for child in group:
                if child.alive:  # one waiting for its restart has no process to ask
                    child.signal_group(signal.SIGTERM)
            deadline = time.monotonic() + self.args.stop_timeout
            for child in group:
                while child.alive and time.monotonic() < deadline:
                    time.sleep(0.05)
                if child.alive:
                    self.say(f"{child.name} did not exit in {self.args.stop_timeout:.0f}s: killing it")
                # anything the child spawned shares its group: make sure none of it survives
                child.signal_group(signal.SIGKILL)
                if child.proc is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        child.proc.wait(5)
        for server in reversed(self.infra):
            server.stop(timeout=self.args.stop_timeout)
        self.say("stopped")


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    launcher = Launcher(args)
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        frontend = launcher.start()
        launcher.banner(frontend)
        launcher.watch()
    except Interrupted:
        pass
    except LaunchError as exc:
        print(f"\ngenset up: {exc}", file=sys.stderr, flush=True)
        code = 1
    except Exception as exc:  # stop what was started whatever went wrong
        print(f"\ngenset up: unexpected error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        # A second Ctrl-C while stopping must not leave children behind: ignore it here, the
        # stop itself escalates to SIGKILL on its own deadline.
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        launcher.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
