"""deploy/grafana and deploy/prometheus: every metric the dashboard queries is one the services
export, with the labels it groups by, and the scrape configs point at the ports and services
that exist.

The exported names come from the code itself: every metric definition in genset/ and services/
is read with `ast` (the `genset.runtime.metrics.Metrics` helper's counter/gauge/histogram, which
prefix `genset_`, and prometheus_client's classes used directly), then expanded the way
prometheus_client exposes them (a counter `x` as `x_total`, a histogram as `x_bucket`, `x_sum`,
`x_count`). tests/test_docker_stack.py checks the same names against live /metrics pages."""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from genset.runtime.metrics import PREFIX

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "genset.json"
HELPER_KINDS = {"counter": "counter", "gauge": "gauge", "histogram": "histogram"}
CLASS_KINDS = {"Counter": "counter", "Gauge": "gauge", "Histogram": "histogram",
               "Summary": "summary"}
# prometheus_client's ProcessCollector (every service's registry has one, see Metrics)
PROCESS_METRICS = {"process_cpu_seconds": "counter", "process_resident_memory_bytes": "gauge",
                   "process_virtual_memory_bytes": "gauge", "process_open_fds": "gauge",
                   "process_max_fds": "gauge", "process_start_time_seconds": "gauge"}
# labels Prometheus itself attaches to every scraped series (deploy/prometheus/*.yml)
TARGET_LABELS = {"job", "instance", "service", "pod", "namespace"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                "or", "unless", "offset"}


@dataclass
class Metric:
    kind: str
    labels: set[str] = field(default_factory=set)
    where: str = ""


def _strings(node: ast.AST | None) -> set[str] | None:
    if isinstance(node, ast.List | ast.Tuple):
        items = [e.value for e in node.elts if isinstance(e, ast.Constant)]
        return {s for s in items if isinstance(s, str)}
    return None


def defined_metrics() -> dict[str, Metric]:
    """Every metric defined in genset/ and services/, by base name (as registered)."""
    found: dict[str, Metric] = {}
    for path in sorted([*REPO.joinpath("genset").rglob("*.py"),
                        *REPO.joinpath("services").rglob("*.py")]):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            first = node.args[0]
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                continue
            func = node.func
            attr = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if isinstance(func, ast.Attribute) and attr in HELPER_KINDS:
                name = first.value if first.value.startswith(PREFIX) else PREFIX + first.value
                kind, label_arg = HELPER_KINDS[attr], "labels"
            elif attr in CLASS_KINDS:
                name, kind, label_arg = first.value, CLASS_KINDS[attr], "labelnames"
            else:
                continue
            labels = _strings(node.args[2]) if len(node.args) > 2 else None
            for kw in node.keywords:
                if kw.arg == label_arg:
                    labels = _strings(kw.value)
            found[name] = Metric(kind, labels or set(), f"{path.relative_to(REPO)}:{node.lineno}")
    for name, kind in PROCESS_METRICS.items():
        found[name] = Metric(kind, set(), "prometheus_client ProcessCollector")
    return found


def exposed_names(metrics: dict[str, Metric]) -> dict[str, str]:
    """Series name as scraped -> base name."""
    out = {}
    for name, metric in metrics.items():
        base = name.removesuffix("_total") if metric.kind == "counter" else name
        suffixes = {"counter": ["_total", "_created"], "gauge": [""],
                    "histogram": ["_bucket", "_sum", "_count", "_created"],
                    "summary": ["", "_sum", "_count", "_created"]}[metric.kind]
        for suffix in suffixes:
            out[base + suffix] = name
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            exprs.append((panel["title"], target["expr"]))
    return exprs


def promql_metric_names(expr: str) -> set[str]:
    """Identifiers that are metric names: not functions (followed by `(`), not label names
    (inside {...} or by/without (...)), not keywords, not durations or strings."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)          # strings
    expr = re.sub(r"\[[^\]]*\]", "", expr)                    # range selectors [5m]
    expr = re.sub(r"\{[^}]*\}", "", expr)                     # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word = match.group()
        rest = expr[match.end():].lstrip()
        if rest.startswith("(") or word in PROMQL_WORDS or word.startswith("$"):
            continue
        if expr[max(0, match.start() - 2):match.start()].endswith("$"):
            continue  # a Grafana variable such as $__rate_interval
        names.add(word)
    return names


def promql_label_names(expr: str) -> set[str]:
    labels = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels |= {part.strip() for part in group.split(",") if part.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    return labels


METRICS = defined_metrics()
EXPOSED = exposed_names(METRICS)


def test_the_scan_finds_the_services_metrics():
    # guards the scanner: one metric of each service family, each kind
    assert METRICS["genset_frontend_time_to_first_token_seconds"].kind == "histogram"
    assert METRICS["genset_frontend_requests"].labels == {"model", "endpoint", "status"}
    assert METRICS["genset_worker_requests_started"].kind == "counter"
    assert METRICS["genset_service_ready"].kind == "gauge"
    assert "genset_router_decisions" in METRICS


def test_dashboard_queries_only_exported_metrics():
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    for title, expr in exprs:
        names = promql_metric_names(expr)
        assert names, f"panel {title!r}: no metric in {expr!r}"
        unknown = names - EXPOSED.keys()
        assert not unknown, (f"panel {title!r} queries {sorted(unknown)}, which no service "
                             f"exports (expr: {expr})")


def test_dashboard_groups_by_labels_the_metrics_have():
    for title, expr in dashboard_exprs():
        bases = {EXPOSED[name] for name in promql_metric_names(expr)}
        allowed = set(TARGET_LABELS)
        for base in bases:
            allowed |= METRICS[base].labels
            if METRICS[base].kind == "histogram":
                allowed.add("le")
        unknown = promql_label_names(expr) - allowed
        assert not unknown, f"panel {title!r} uses labels {sorted(unknown)} its metrics lack"


def panels_by_row() -> dict[str, list[dict]]:
    """Row title -> the panels laid out under it (rows are not collapsed: flat, in order)."""
    rows: dict[str, list[dict]] = {}
    current: list[dict] = rows.setdefault("", [])
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        if panel["type"] == "row":
            current = rows.setdefault(panel["title"], [])
        else:
            current.append(panel)
    return rows


# Rows that show one service: each of their panels queries that service's own metrics (where
# they are defined), and together they show what the row is for.
SERVICE_ROWS = {
    "KV offload store": (
        ("services/kv_offload/", "genset/offload/", "genset/worker/offload_hook.py"),
        {"genset_offload_bytes", "genset_offload_capacity_bytes", "genset_offload_blocks",
         "genset_worker_offload_lookups", "genset_worker_offload_onboarded_blocks",
         "genset_offload_lookup_blocks"}),
    "Planner": (
        ("services/planner/", "genset/planning/"),
        {"genset_planner_target_workers", "genset_planner_ready_workers",
         "genset_planner_ttft_ms", "genset_planner_itl_ms", "genset_planner_arrival_rate"}),
}


@pytest.mark.parametrize("row", sorted(SERVICE_ROWS))
def test_service_rows_query_that_services_metrics(row):
    places, wanted = SERVICE_ROWS[row]
    panels = panels_by_row().get(row)
    assert panels, f"the dashboard has no {row!r} row"
    shown: set[str] = set()
    for panel in panels:
        bases = {EXPOSED[n] for t in panel["targets"] for n in promql_metric_names(t["expr"])
                 if n in EXPOSED}
        own = {b for b in bases if METRICS[b].where.startswith(places)}
        assert own, f"panel {panel['title']!r} in row {row!r} shows none of its metrics"
        shown |= own
    assert wanted <= shown, f"row {row!r} lacks {sorted(wanted - shown)}"


def test_dashboard_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


@pytest.mark.parametrize("expr, names", [
    ('histogram_quantile(0.9, sum by (le) (rate(a_bucket{model="x"}[5m])))', {"a_bucket"}),
    ("sum by (status) (rate(b_total[$__rate_interval])) / c", {"b_total", "c"}),
    ('process_resident_memory_bytes{service!=""}', {"process_resident_memory_bytes"}),
])
def test_promql_names_parser(expr, names):
    assert promql_metric_names(expr) == names


def test_compose_scrape_config_matches_the_stack():
    config = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    stack = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    port = int(stack["x-genset"]["environment"]["GENSET_METRICS_PORT"])
    scraped = set()
    for job in config["scrape_configs"]:
        for sd in job["dns_sd_configs"]:
            assert sd["port"] == port, job["job_name"]
            scraped |= set(sd["names"])
    genset_services = set(stack["services"]) - {"nats", "etcd"}
    assert scraped == genset_services


def test_k8s_scrape_config_keeps_genset_pods():
    config = yaml.safe_load((REPO / "deploy/prometheus/prometheus-k8s.yml").read_text())
    (job,) = config["scrape_configs"]
    relabels = {tuple(r.get("source_labels", [])): r for r in job["relabel_configs"]}
    keep = relabels[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)]
    assert keep["action"] == "keep" and keep["regex"] == "true"
    service = relabels[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)]
    assert service["target_label"] == "service"
