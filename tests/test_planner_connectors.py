"""The planner's connectors, each against the real thing it drives where that can run here.

- local: real `genset worker --engine mocker` processes started and drained (slow);
- compose: the exact `docker compose` command line, and real subprocess runs of a stand-in
  command (no Docker engine runs here);
- kubernetes: the official client making real HTTP round trips to a small HTTP server that
  answers the two calls the connector makes (PATCH deployments/<name>/scale and PATCH
  pods/<name>). No Kubernetes cluster runs here: what a real API server does beyond those
  answers (admission, RBAC, the ReplicaSet honouring pod-deletion-cost) is not tested.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from genset.planning.actuation import DrainRequest, ScaleChange, WorkerLauncher
from genset.runtime.infra import free_port
from services.planner.__main__ import build_parser, main
from services.planner.connectors import (
    POD_DELETION_COST,
    ComposeConnector,
    ConnectorError,
    KubernetesConnector,
    LocalConnector,
    ProcessLauncher,
    compose_argv,
    is_local_genset_worker,
    parse_role_map,
)
from services.planner.service import PlannerOptions
from tests.stack import Stack

# ---------------------------------------------------------------------------------------------
# options


def test_planner_flags_are_checked_with_clear_errors(capsys):
    for argv, words in ((["--policy", "magic"], "--policy='magic' is not one of"),
                        (["--pools", "decode,gpu"], "unknown role 'gpu'"),
                        (["--max-workers", "0"], "--max-workers")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert words in capsys.readouterr().err
    build_parser().parse_args(["--worker-args=--engine torch", "--dry-run"])
    for bad, words in ((dict(pools="decode,gpu"), "unknown role 'gpu'"),
                       (dict(min_workers=4, max_workers=2), "below --min-workers"),
                       (dict(kv_high=0.5, kv_target=0.7), "--kv-target"),
                       (dict(k8s_deployments="decode"), "role=name pairs"),
                       (dict(connector="compose", compose_command=" "),
                        "--compose-command is empty"),
                       (dict(connector="compose", compose_command="docker 'compose"),
                        "--compose-command \"docker 'compose\": No closing quotation"),
                       (dict(worker_args="--model '/models/my model"),
                        "--worker-args .*: No closing quotation")):
        with pytest.raises(ValueError, match=words):
            PlannerOptions(**bad)
    assert PlannerOptions(worker_args="--engine torch --model '/models/my model'") \
        .worker_argv() == ["--engine", "torch", "--model", "/models/my model"]
    opts = PlannerOptions(pools="decode,prefill", min_prefill=0, max_prefill=3)
    cfg = opts.planner_config()
    assert cfg.pools["prefill"].max == 3 and cfg.pools["decode"].min == 1


def test_role_maps():
    assert parse_role_map("decode=a, prefill=b", "x") == {"decode": "a", "prefill": "b"}
    assert parse_role_map("", "x") == {}


# ---------------------------------------------------------------------------------------------
# compose


def test_compose_command_line_is_exact():
    argv = compose_argv(["docker", "compose"], {"decode": 3, "prefill": 1},
                        file="/srv/docker-compose.yml", project="genset")
    assert argv == ["docker", "compose", "-f", "/srv/docker-compose.yml", "-p", "genset",
                    "up", "-d", "--no-deps", "--no-recreate",
                    "--scale", "decode=3", "--scale", "prefill=1", "decode", "prefill"]
    c = ComposeConnector({"decode": "worker"}, command="docker-compose")
    assert c.argv({"decode": 2, "prefill": 5}) == [
        "docker-compose", "up", "-d", "--no-deps", "--no-recreate", "--scale", "worker=2",
        "worker"]


def stand_in(tmp_path: Path, body: str) -> str:
    """A stand-in for `docker compose`: a Python script run as a real subprocess."""
    script = tmp_path / "compose.py"
    script.write_text("import json, sys, time\n" + body)
    return f"{sys.executable} {script}"


async def test_compose_connector_runs_the_command_and_reports_failures(tmp_path):
    record = tmp_path / "argv.json"
    ok = ComposeConnector({"decode": "decode"},
                          command=stand_in(tmp_path, f"open({str(record)!r}, 'w')"
                                                     ".write(json.dumps(sys.argv[1:]))\n"))
    await ok.apply(ScaleChange(1, {"decode": 4}))
    assert json.loads(record.read_text()) == ["up", "-d", "--no-deps", "--no-recreate",
                                              "--scale", "decode=4", "decode"]
    failing = ComposeConnector({"decode": "decode"}, command=stand_in(
        tmp_path, "print('no such service: decode'); sys.exit(1)\n"))
    with pytest.raises(ConnectorError, match="exited with 1: no such service"):
        await failing.apply(ScaleChange(2, {"decode": 1}))
    hung = ComposeConnector({"decode": "decode"}, timeout_s=0.5,
                            command=stand_in(tmp_path, "time.sleep(60)\n"))
    with pytest.raises(ConnectorError, match="did not finish"):
        await hung.apply(ScaleChange(3, {"decode": 1}))
    missing = ComposeConnector({"decode": "decode"}, command="/nonexistent/docker compose")
    with pytest.raises(ConnectorError, match="cannot run"):
        await missing.apply(ScaleChange(4, {"decode": 1}))


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie waiting to be reaped is not)."""
    try:
        status = open(f"/proc/{pid}/status").read()
    except OSError:
        return False
    return "\nState:\tZ" not in status


async def test_a_compose_command_does_not_outlive_a_stopping_planner(tmp_path):
    """The planner stopping cancels a running apply: the command is killed, not left to
    go on scaling after the planner is gone."""
    pid_file = tmp_path / "pid"
    hung = ComposeConnector({"decode": "decode"}, timeout_s=600, command=stand_in(
        tmp_path, f"import os\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
                  "time.sleep(600)\n"))
    task = asyncio.create_task(hung.apply(ScaleChange(1, {"decode": 2})))
    loop = asyncio.get_running_loop()
    end = loop.time() + 60
    while not (pid_file.exists() and pid_file.read_text()):
        assert loop.time() < end, "the stand-in never started"
        await asyncio.sleep(0.05)
    pid = int(pid_file.read_text())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    end = loop.time() + 30
    while _running(pid):
        if loop.time() > end:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError("the compose command outlived the cancelled apply")
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# Kubernetes


class FakeKubeApi:
    """Answers PATCH of deployments/<name>/scale and pods/<name> like the API server does
    (status, JSON body shapes); unknown deployments get 404. Records every request."""

    def __init__(self, deployments: set[str]) -> None:
        self.deployments = deployments
        self.replicas: dict[str, int] = {}
        self.requests: list[tuple[str, str, str | None, dict]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_PATCH(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.requests.append(("PATCH", self.path, self.headers.get("Content-Type"), body))
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:3] == ["apis", "apps", "v1"] and parts[-1] == "scale":
                    ns, name = parts[4], parts[6]
                    if name not in api.deployments:
                        return self.reply(404, {"kind": "Status", "apiVersion": "v1",
                                                "status": "Failure", "reason": "NotFound",
                                                "code": 404})
                    api.replicas[name] = body["spec"]["replicas"]
                    return self.reply(200, {"kind": "Scale", "apiVersion": "autoscaling/v1",
                                            "metadata": {"name": name, "namespace": ns},
                                            "spec": {"replicas": api.replicas[name]},
                                            "status": {"replicas": 1}})
                if parts[:2] == ["api", "v1"] and parts[4] == "pods":
                    return self.reply(200, {"kind": "Pod", "apiVersion": "v1",
                                            "metadata": {"name": parts[5], "namespace": parts[3],
                                                         **body["metadata"]},
                                            "spec": {"containers": [{"name": "worker"}]}})
                return self.reply(404, {"kind": "Status", "code": 404})

            def reply(self, code: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


async def test_kubernetes_connector_patches_deployment_replicas_through_the_api():
    pytest.importorskip("kubernetes")
    with FakeKubeApi({"genset-decode", "genset-prefill"}) as api:
        k = KubernetesConnector("serving", {"decode": "genset-decode",
                                            "prefill": "genset-prefill"}, api_url=api.url)
        await k.apply(ScaleChange(1, {"decode": 3, "prefill": 1}))
        assert api.replicas == {"genset-decode": 3, "genset-prefill": 1}
        _, path, ctype, body = api.requests[0]
        assert path == "/apis/apps/v1/namespaces/serving/deployments/genset-decode/scale"
        assert ctype == "application/strategic-merge-patch+json"
        assert body == {"spec": {"replicas": 3}}
        # a scale-down marks the chosen pod first, so the ReplicaSet removes that one
        api.requests.clear()
        await k.apply(ScaleChange(2, {"decode": 2}, drain=[
            DrainRequest(0xABC, "decode", host="genset-decode-7d9f-x2x", pid=1)]))
        assert [r[1] for r in api.requests] == [
            "/api/v1/namespaces/serving/pods/genset-decode-7d9f-x2x",
            "/apis/apps/v1/namespaces/serving/deployments/genset-decode/scale"]
        assert api.requests[0][3] == {"metadata": {"annotations": {POD_DELETION_COST: "-1000"}}}
        assert api.replicas["genset-decode"] == 2


async def test_kubernetes_connector_reports_api_errors():
    pytest.importorskip("kubernetes")
    with FakeKubeApi(set()) as api:
        k = KubernetesConnector("serving", {"decode": "missing"}, api_url=api.url)
        with pytest.raises(ConnectorError, match="serving/missing to 2: HTTP 404"):
            await k.apply(ScaleChange(1, {"decode": 2}))
    # nothing listening at all
    dead = KubernetesConnector("serving", {"decode": "x"},
                               api_url=f"http://127.0.0.1:{_closed_port()}", timeout_s=2)
    with pytest.raises(ConnectorError, match="scale deployment serving/x"):
        await dead.apply(ScaleChange(1, {"decode": 2}))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# local processes


def health(url: str) -> dict:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return {}


async def wait_for(pred, what: str, deadline_s: float = 90.0):
    end = time.monotonic() + deadline_s
    while not (value := await asyncio.to_thread(pred)):
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)
    return value


@pytest.mark.slow
async def test_local_connector_starts_and_drains_real_worker_processes(nats_server,
                                                                       etcd_server, tmp_path):
    ns = f"plc-{os.getpid()}"
    port = free_port()
    launcher = ProcessLauncher(
        ["--nats", nats_server.url, "--etcd", etcd_server.endpoint, "--namespace", ns,
         "--metrics-port", str(port), "--engine", "mocker", "--model", "tiny",
         "--speedup", "50"], tmp_path)
    assert isinstance(launcher, WorkerLauncher)
    local = LocalConnector(launcher)
    change = ScaleChange(1, {"decode": 1}, start={"decode": 1})
    await local.apply(change)
    assert change.done() and len(local.handles) == 1
    handle = local.handles[0]
    url = f"http://127.0.0.1:{port}"
    body = await wait_for(lambda: (h := health(url)).get("ready") and h, "the worker ready")
    assert body["component"] == "decode" and is_local_genset_worker(handle.pid)
    # drain it as the planner would: by the pid in its instance record
    await local.apply(ScaleChange(2, {"decode": 0}, drain=[
        DrainRequest(body["instance_id"], "decode", socket.gethostname(), handle.pid)]))
    code = await asyncio.to_thread(handle.proc.wait, 60)
    assert code == 0, handle.log_path.read_text()[-2000:]
    await local.close()
    assert not launcher.handles


@pytest.mark.slow
async def test_local_connector_drains_a_worker_it_did_not_start(nats_server, etcd_server,
                                                                tmp_path):
    async with Stack(nats_server.url, etcd_server.endpoint, log_dir=tmp_path) as stack:
        (worker,) = await stack.start_workers(1, engine="mocker")
        local = LocalConnector(ProcessLauncher([], tmp_path))
        req = DrainRequest(worker.instance_id, "decode", socket.gethostname(), worker.pid)
        await local.apply(ScaleChange(1, {"decode": 0}, drain=[req]))
        code = await asyncio.to_thread(worker.proc.wait, 60)
        assert code == 0
        # a pid that is not a genset worker on this host is never signalled
        with pytest.raises(ConnectorError, match="not as a genset worker process"):
            await local.apply(ScaleChange(2, {"decode": 0}, drain=[
                DrainRequest(1, "decode", socket.gethostname(), os.getpid())]))
        with pytest.raises(ConnectorError, match="runs on elsewhere"):
            await local.apply(ScaleChange(3, {"decode": 0}, drain=[
                DrainRequest(1, "decode", "elsewhere", worker.pid)]))


async def test_local_connector_failed_start_is_retried_for_what_is_left(tmp_path):
    class Flaky:
        def __init__(self):
            self.calls = 0

        def start_worker(self, role):
            self.calls += 1
            if self.calls == 2:
                raise OSError("fork failed")
            return type("H", (), {"pid": 10**7 + self.calls, "alive": True})()

        def stop_worker(self, handle):
            pass

        def close(self, timeout_s):
            pass

    local = LocalConnector(Flaky())
    change = ScaleChange(1, {"decode": 3}, start={"decode": 3})
    with pytest.raises(ConnectorError, match="fork failed"):
        await local.apply(change)
    assert change.start == {"decode": 2}  # one started; the retry starts the other two
    await local.apply(change)
    assert change.done()
