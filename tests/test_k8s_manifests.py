"""deploy/k8s/: every manifest validates against the Kubernetes OpenAPI schemas (strict: an
unknown or misspelled field fails), with `kubernetes-validate`, which bundles the schemas of
each Kubernetes release so no cluster is needed. Plus the rules that tie the manifests to the
compose stack: the same services with the same commands, the same GENSET_* settings, images
that the Dockerfile builds, Services that select their pods, probes on declared ports."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import ValidationError

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


def genset_containers() -> dict[str, dict]:
    """Deployment name -> its genset container."""
    return {name: dep["spec"]["template"]["spec"]["containers"][0]
            for name, dep in by_kind("Deployment").items()}


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


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
    """Each genset service of docker-compose.yml is a Deployment running the same command."""
    containers = genset_containers()
    for name, svc in compose()["services"].items():
        if name in ("nats", "etcd"):
            assert name in by_kind("StatefulSet"), f"no StatefulSet for {name}"
            continue
        assert name in containers, f"docker-compose.yml runs {name}; deploy/k8s has no Deployment"
        command = [re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", part) for part in svc["command"]]
        assert containers[name]["args"] == command, name
    # the GPU variant differs from the CPU workers only in the model it loads
    gpu = containers["decode-gpu"]["args"]
    assert gpu[:-1] == containers["decode"]["args"][:-1]
    assert gpu[-1].startswith("/models/")


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


def test_genset_pods_are_scraped_on_their_metrics_port():
    port = str(compose()["x-genset"]["environment"]["GENSET_METRICS_PORT"])
    for name, dep in by_kind("Deployment").items():
        annotations = dep["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", name
        assert annotations["prometheus.io/port"] == port, name
