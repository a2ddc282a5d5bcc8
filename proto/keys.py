"""etcd keys: `genset/<namespace>/...`. Build keys only with these functions."""

from __future__ import annotations

from proto.subjects import instance_token

ROOT = "genset"


def _check(part: str, what: str) -> str:
    if not part or "/" in part:
        raise ValueError(f"{what} {part!r} must be non-empty and contain no '/'")
    return part


def namespace_prefix(namespace: str) -> str:
    return f"{ROOT}/{_check(namespace, 'namespace')}/"


def instances_prefix(namespace: str, component: str | None = None) -> str:
    base = namespace_prefix(namespace) + "instances/"
    return base if component is None else base + _check(component, "component") + "/"


def instance(namespace: str, component: str, instance_id: int) -> str:
    return instances_prefix(namespace, component) + instance_token(instance_id)


def models_prefix(namespace: str, model: str | None = None) -> str:
    base = namespace_prefix(namespace) + "models/"
    # Model names may contain '/' (org/name); etcd keys keep them escaped.
    return base if model is None else base + model.replace("/", "%2F") + "/"


def model(namespace: str, model_name: str, instance_id: int) -> str:
    return models_prefix(namespace, model_name) + instance_token(instance_id)


def model_name_from_key(key: str, namespace: str) -> str:
    rest = key[len(models_prefix(namespace)):]
    return rest.split("/", 1)[0].replace("%2F", "/")


def planner_prefix(namespace: str) -> str:
    return namespace_prefix(namespace) + "planner/"


# ---- KV offload store (issue 12) ---------------------------------------------------------------
OFFLOAD_COMPONENT = "kv_offload"  # the same word as proto.subjects.OFFLOAD_COMPONENT


def offload_instances_prefix(namespace: str) -> str:
    """Where the live store instances are listed (InstanceRecord under each one's lease)."""
    return instances_prefix(namespace, OFFLOAD_COMPONENT)


def offload_instance(namespace: str, store_id: int) -> str:
    return instance(namespace, OFFLOAD_COMPONENT, store_id)


# ---- planner (additive; see proto/planner.py) ----


def planner_targets(namespace: str) -> str:
    """Where the planner writes the pool sizes it wants (`proto.PlannerTargets`)."""
    return planner_prefix(namespace) + "targets"
