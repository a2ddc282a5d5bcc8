"""deploy/k8s: every manifest validates against the Kubernetes JSON schemas (unknown fields
refused), every container runs a `genset` command its own parser accepts, and the planner's
defaults, RBAC and the worker Deployments agree. No cluster runs here: these manifests have
not been applied to one."""

from __future__ import annotations

import copy
import importlib
from pathlib import Path

import pytest
import yaml

import genset.cli
from services.planner.connectors import parse_role_map
from services.planner.service import PlannerOptions

kv = pytest.importorskip("kubernetes_validate")

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
VERSION = "1.30.0"


def documents() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in documents() if d["kind"] == kind}


@pytest.mark.parametrize("doc", documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_validates_against_the_kubernetes_schema(doc):
    kv.validate(doc, VERSION, strict=True)


def test_the_validator_is_real():
    dep = copy.deepcopy(by_kind("Deployment")["genset-decode"])
    dep["spec"]["replicass"] = 2
    with pytest.raises(kv.ValidationError, match="replicass"):
        kv.validate(dep, VERSION, strict=True)


def test_containers_run_commands_their_parsers_accept():
    for name, dep in by_kind("Deployment").items():
        for c in dep["spec"]["template"]["spec"]["containers"]:
            if c["image"] != "genset:latest":
                continue
            command, *args = c["args"]
            assert command in genset.cli.COMMANDS, f"{name}: unknown command {command}"
            module = importlib.import_module(genset.cli.COMMANDS[command][0])
            if hasattr(module, "build_parser"):
                module.build_parser().parse_args(args)


def test_planner_scales_the_worker_deployments_it_may_patch():
    deployments = by_kind("Deployment")
    targets = parse_role_map(PlannerOptions().k8s_deployments, "k8s")
    for role, name in targets.items():
        assert name in deployments, f"the planner's default {role} Deployment is missing"
        args = deployments[name]["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[:3] == ["worker", "--role", role]
    rules = by_kind("Role")["genset-planner"]["rules"]
    scale = next(r for r in rules if r["resources"] == ["deployments/scale"])
    assert "patch" in scale["verbs"] and set(scale["resourceNames"]) == set(targets.values())
    pods = next(r for r in rules if r["resources"] == ["pods"])
    assert "patch" in pods["verbs"]
    planner = deployments["genset-planner"]["spec"]["template"]["spec"]
    assert planner["serviceAccountName"] == "genset-planner"
    assert "kubernetes" in planner["containers"][0]["args"]
