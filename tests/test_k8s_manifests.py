"""deploy/k8s/: every manifest validates against the Kubernetes OpenAPI schemas (strict: an
unknown or misspelled field fails), with `kubernetes-validate`, which bundles the schemas of
each Kubernetes release so no cluster is needed. Plus the rules that tie the manifests to the
compose stack: the same services with the same commands (each accepted by its own parser), the
same GENSET_* settings, images that the Dockerfile builds, Services that select their pods,
probes on declared ports; and to the planner: it may scale exactly the worker Deployments its
defaults name. No cluster runs here: these manifests have not been applied to one."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import ValidationError

from services.planner.connectors import parse_role_map
from services.planner.service import PlannerOptions
from tests.test_compose import assert_genset_command_accepted

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
MANIFESTS = sorted(K8S.rglob("*.yaml"))
# The oldest release still supported upstream when these were written, and the newest the
# validator knows: a field added or removed in between shows up.
VERSIONS = ["1.30.0", kubernetes_validate.utils.latest_version()]
GENSET_IMAGES = {"genset:slim", "genset:torch"}


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def all_resources() -> list[dict]:
    return [doc for path in MANIFESTS for doc in documents(path)]


def by_kind(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in all_resources() if doc["kind"] == kind}


def genset_workloads() -> dict[str, dict]:
    """The Deployments and StatefulSets that run a genset image, by name."""
    return {name: res for kind in ("Deployment", "StatefulSet")
            for name, res in by_kind(kind).items()
            if res["spec"]["template"]["spec"]["containers"][0]["image"] in GENSET_IMAGES}


def genset_containers() -> dict[str, dict]:
    """Workload name -> its genset container."""
    return {name: res["spec"]["template"]["spec"]["containers"][0]
            for name, res in genset_workloads().items()}


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def k8s_name(compose_name: str) -> str:
    # Kubernetes names are DNS labels: no underscore (kv_offload -> kv-offload)
    return compose_name.replace("_", "-")


def compose_command(svc: dict) -> list[str]:
    """A compose service's command with each ${VAR:-default} at its default."""
    return [re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", part) for part in svc["command"]]


# Where a pod's command rightly differs from the compose service's: flag -> (compose, k8s).
# A compose container has no Docker socket, so the planner there only decides (writes its
# targets to etcd); in the cluster it applies them through the Kubernetes API.
PLATFORM_FLAGS = {"planner": {"--connector": ("none", "kubernetes")}}


def test_there_are_manifests():
    assert {"nats", "etcd", "router", "frontend", "decode"} <= {
        doc["metadata"]["name"] for doc in all_resources()}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_validates(path, version):
    for doc in documents(path):
        name = f"{path.relative_to(REPO)}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path)
            pytest.fail(f"{name} (Kubernetes {version}) at {where or '/'}: {exc.message}")


def test_validator_rejects_a_misspelled_field():
    # The check must be real: strict validation refuses an unknown field, naming it.
    deployment = by_kind("Deployment")["router"]
    bad = yaml.safe_load(yaml.safe_dump(deployment))
    container = bad["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbes"] = container.pop("readinessProbe")
    with pytest.raises(ValidationError, match="readinessProbes"):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)


def test_same_services_and_commands_as_compose():
    """Each genset service of docker-compose.yml is a workload running the same command, and
    each genset workload is one of them (or the GPU variant of the decode workers)."""
    containers = genset_containers()
    services = compose()["services"]
    for name, svc in services.items():
        if name in ("nats", "etcd"):
            assert name in by_kind("StatefulSet"), f"no StatefulSet for {name}"
            continue
        assert k8s_name(name) in containers, f"docker-compose.yml runs {name}; deploy/k8s does not"
        command = compose_command(svc)
        args = list(containers[k8s_name(name)]["args"])
        for flag, (in_compose, in_k8s) in PLATFORM_FLAGS.get(name, {}).items():
            assert command[command.index(flag) + 1] == in_compose, name
            assert args[args.index(flag) + 1] == in_k8s, name
            args[args.index(flag) + 1] = in_compose
        assert args == command, name
    compose_names = {k8s_name(name) for name in services}
    assert set(containers) - compose_names == {"decode-gpu"}
    # the GPU variant differs from the CPU workers only in the model it loads
    gpu = containers["decode-gpu"]["args"]
    assert gpu[:-1] == containers["decode"]["args"][:-1]
    assert gpu[-1].startswith("/models/")


def test_replicas_match_compose():
    """Prefill workers start at 0 in both (disaggregated serving is opt-in); the services
    that must not run twice run once."""
    workloads = genset_workloads()
    services = compose()["services"]
    assert services["prefill"]["deploy"]["replicas"] == 0
    assert workloads["prefill"]["spec"]["replicas"] == 0
    assert workloads["decode"]["spec"]["replicas"] >= 1
    assert workloads["planner"]["spec"]["replicas"] == 1
    assert workloads["planner"]["spec"]["strategy"]["type"] == "Recreate"


def test_containers_run_commands_their_parsers_accept(monkeypatch):
    for name, container in genset_containers().items():
        # a checkpoint under /models is on the cluster's volume, not here: check the rest
        args = ["tiny" if a.startswith("/models/") else a for a in container["args"]]
        assert_genset_command_accepted(args, monkeypatch, name)


def test_offload_store_keeps_its_disk_tier_on_its_own_volume():
    """A StatefulSet whose claim template is mounted where --offload-dir points, writable by
    the unprivileged user: a restarted store finds the blocks it had."""
    store = by_kind("StatefulSet")["kv-offload"]
    pod = store["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    directory = args[args.index("--offload-dir") + 1]
    claims = {t["metadata"]["name"] for t in store["spec"]["volumeClaimTemplates"]}
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == directory]
    assert mount["name"] in claims and not mount.get("readOnly")
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"]
    assert store["spec"]["serviceName"] in by_kind("Service")


def test_planner_scales_the_worker_deployments_it_may_patch():
    """The planner's default role -> Deployment map names Deployments that exist and run that
    role; its Role lets it patch exactly their scale, and pods (the deletion-cost annotation
    on the one it drains)."""
    deployments = by_kind("Deployment")
    targets = parse_role_map(PlannerOptions().k8s_deployments, "k8s")
    assert set(targets) == {"decode", "prefill"}
    for role, name in targets.items():
        assert name in deployments, f"the planner's default {role} Deployment is missing"
        args = deployments[name]["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[:3] == ["worker", "--role", role]
    rules = by_kind("Role")["planner"]["rules"]
    (scale,) = [r for r in rules if r["resources"] == ["deployments/scale"]]
    assert scale["apiGroups"] == ["apps"]
    assert "patch" in scale["verbs"] and set(scale["resourceNames"]) == set(targets.values())
    (pods,) = [r for r in rules if r["resources"] == ["pods"]]
    assert pods["apiGroups"] == [""] and "patch" in pods["verbs"]
    # nothing else: no wildcard, no other resource
    assert len(rules) == 2 and not any("*" in r["verbs"] for r in rules)
    binding = by_kind("RoleBinding")["planner"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "planner"}
    planner = deployments["planner"]["spec"]["template"]["spec"]
    assert planner["serviceAccountName"] == "planner"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "planner"}]
    assert "planner" in by_kind("ServiceAccount")
    # the worker Deployments are looked for in the planner's own namespace
    env = {e["name"]: e for e in planner["containers"][0].get("env", [])}
    assert env["GENSET_K8S_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.namespace")


def test_settings_match_compose():
    config = by_kind("ConfigMap")["genset-config"]["data"]
    env = compose()["x-genset"]["environment"]
    assert config == {k: str(v) for k, v in env.items()}
    for name, container in genset_containers().items():
        assert {"configMapRef": {"name": "genset-config"}} in container["envFrom"], name


def test_images_are_dockerfile_targets():
    targets = set(re.findall(r"^FROM \S+ AS (\S+)", (REPO / "Dockerfile").read_text(), re.M))
    for name, container in genset_containers().items():
        image = container["image"]
        assert image in GENSET_IMAGES, f"{name}: image {image}"
        assert image.split(":")[1] in targets, f"{name}: {image} is no Dockerfile target"
    # frontend and router never import torch: they run the slim image
    assert genset_containers()["frontend"]["image"] == "genset:slim"
    assert genset_containers()["router"]["image"] == "genset:slim"


def test_services_select_their_pods_and_probes_use_declared_ports():
    pods = {name: res["spec"]["template"]["metadata"]["labels"]
            for kind in ("Deployment", "StatefulSet") for name, res in by_kind(kind).items()}
    for name, service in by_kind("Service").items():
        selector = service["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in pods.values()), (
            f"Service {name} selects no pod")
    for kind in ("Deployment", "StatefulSet"):
        for name, res in by_kind(kind).items():
            assert res["spec"]["selector"]["matchLabels"].items() <= (
                res["spec"]["template"]["metadata"]["labels"].items()), name
            for container in res["spec"]["template"]["spec"]["containers"]:
                ports = {p.get("name") for p in container.get("ports", [])}
                for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                    spec = container.get(probe)
                    if not spec:
                        continue
                    handler = spec.get("httpGet") or spec.get("tcpSocket")
                    assert handler["port"] in ports, f"{name} {probe} on undeclared port"


def test_genset_pods_run_unprivileged_and_report_health():
    """Every genset pod: a non-root user, a readiness probe on /health, and time to drain."""
    for name, res in genset_workloads().items():
        pod = res["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == 10001, name  # the Dockerfile's user
        assert pod.get("terminationGracePeriodSeconds", 30) >= 40, name  # 30 s drain + exit
        container = pod["containers"][0]
        assert container["readinessProbe"]["httpGet"]["path"] == "/health", name
        assert container.get("livenessProbe") and container.get("startupProbe"), name


def test_genset_pods_are_scraped_on_their_metrics_port():
    port = str(compose()["x-genset"]["environment"]["GENSET_METRICS_PORT"])
    for name, res in genset_workloads().items():
        annotations = res["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/scrape") == "true", name
        assert annotations["prometheus.io/port"] == port, name
