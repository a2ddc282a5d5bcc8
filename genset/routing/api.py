"""The routing interface the frontend calls (one Protocol, several ways to get it) and the one
list of router modes and policy names.

```python
from genset.routing.api import create_router

router = create_router("embedded", bus=bus, namespace="default", discovery=discovery)
await router.start()                       # subscribes to KV events, load reports, membership
decision = await router.route(proto.RouteRequest(request_id=rid, model=m, token_ids=packed,
                                                 max_tokens=n))
if decision.worker_id is None: ...         # decision.error says why (no worker, bad request)
router.on_first_token(rid)                 # prefill finished: the router's load view moves on
router.on_done(rid)                        # finished, cancelled or failed: load is freed
await router.close()
```

Router modes (`ROUTER_MODES`; `genset up --router`, `genset frontend --router`,
`create_router(mode)`):
- `"auto"`: `"service"` when a router service runs (a frontend looks for one in etcd), else
  `"embedded"`; `genset up` starts a service only for two frontends or more and otherwise
  tells its one frontend `"embedded"` (`genset.launch.router_plan`). Resolved by the caller;
  `create_router` refuses it.
- `"embedded"`: the prefix index, load model and policies run in this process, fed from the bus
  (KV events, load reports, decisions of other router replicas, worker membership from etcd).
  `policy=` picks the default policy ("genset" unless told); `RouteRequest.policy` overrides
  it per request.
- `"service"`: asks the `genset router` service over NATS (`proto.subjects.route(ns)`, a queue
  group), waiting at most `timeout` seconds. With `fallback=True` (what the frontend does) an
  embedded router with the same policy is kept warm beside it and routes while no router
  service answers (`genset.routing.remote`). Workers publish `proto.RequestLifecycle` on
  `proto.subjects.request_lifecycle(ns)` themselves and every router replica listens.
- a policy name (`POLICY_NAMES`: genset, round-robin, least-loaded, random, dynamo, sglang):
  embedded with that default policy (the baselines, for A/B).

Each mode has one spelling (the one `genset up --router` always took); `router_mode` and
`policy_name` also accept the older spellings (`remote`, `kv`, `round_robin`, ...) and turn them
into it, so every output (decisions, metric labels, replay results) names a mode one way.

`on_first_token` / `on_done` never block and never raise: they are bookkeeping. `route` never
raises for a routing failure either; it returns a decision with `worker_id=None` and `error`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import proto


@runtime_checkable
class Router(Protocol):
    async def start(self) -> None: ...

    async def route(self, req: proto.RouteRequest) -> proto.RouteDecision: ...

    def on_first_token(self, request_id: str) -> None: ...

    def on_done(self, request_id: str) -> None: ...

    async def close(self) -> None: ...


POLICY_GENSET = "genset"  # lowest predicted time to first token (genset.routing.policies)
POLICY_ROUND_ROBIN = "round-robin"
POLICY_LEAST_LOADED = "least-loaded"
POLICY_RANDOM = "random"
POLICY_DYNAMO = "dynamo"  # Dynamo's KV router cost
POLICY_SGLANG = "sglang"  # SGLang's cache-aware rule
POLICY_NAMES = (POLICY_GENSET, POLICY_ROUND_ROBIN, POLICY_RANDOM, POLICY_LEAST_LOADED,
                POLICY_DYNAMO, POLICY_SGLANG)

# How long a route request waits for the router service. Its answer takes well under a
# millisecond (decision tens of us + a NATS round trip); a dead router is known at once (NATS
# "no responders"); this bounds what a hung one costs a request before the fallback routes it.
DEFAULT_ROUTE_TIMEOUT_S = 0.5

MODE_AUTO = "auto"
MODE_EMBEDDED = "embedded"
MODE_SERVICE = "service"
ROUTER_MODES = (MODE_AUTO, MODE_EMBEDDED, MODE_SERVICE, *POLICY_NAMES)

# Spellings accepted as input for compatibility (flags, `RouteRequest.policy` from any client,
# scripts): each stands for one canonical name above.
POLICY_ALIASES = {
    "kv": POLICY_GENSET, "ttft": POLICY_GENSET, "round_robin": POLICY_ROUND_ROBIN,
    "least_loaded": POLICY_LEAST_LOADED, "kv_router": POLICY_DYNAMO, "cache_aware": POLICY_SGLANG,
}
MODE_ALIASES = {"remote": MODE_SERVICE, **POLICY_ALIASES}
# Everything a `--router` flag accepts (canonical names first).
ROUTER_MODE_INPUTS = (*ROUTER_MODES, *MODE_ALIASES)
POLICY_INPUTS = (*POLICY_NAMES, *POLICY_ALIASES)


def policy_name(name: str) -> str:
    """The canonical name of a routing policy; ValueError naming the choices if unknown."""
    key = POLICY_ALIASES.get(name, name)
    if key not in POLICY_NAMES:
        raise ValueError(f"unknown routing policy {name!r}: use one of {', '.join(POLICY_NAMES)}")
    return key


def router_mode(name: str) -> str:
    """The canonical name of a router mode; ValueError naming the choices if unknown."""
    key = MODE_ALIASES.get(name, name)
    if key not in ROUTER_MODES:
        raise ValueError(f"unknown router mode {name!r}: use one of {', '.join(ROUTER_MODES)}")
    return key


def create_router(
    mode: str,
    *,
    bus,
    namespace: str | None = None,
    discovery=None,
    policy: str | None = None,
    model: str | None = None,
    timeout: float = DEFAULT_ROUTE_TIMEOUT_S,
    fallback: bool = False,
    **options,
) -> Router:
    """Build a router; see the module docstring. `bus` is a `genset.runtime.bus.Bus`,
    `discovery` a `genset.runtime.discovery.Discovery` (embedded modes use it to learn which
    workers serve which model; without it workers are learned from their KV events and load
    reports). `options` go to `genset.routing.core.RouterConfig`, except `metrics` (a
    `genset.runtime.metrics.Metrics`): the embedded router's feed metrics, or the service
    client's fallback metrics."""
    namespace = namespace or getattr(bus, "namespace", "default")
    mode = router_mode(mode)
    if mode == MODE_AUTO:
        raise ValueError("router mode 'auto' is resolved by the caller (service or embedded)")
    if mode == MODE_SERVICE:
        from genset.routing.embedded import EmbeddedRouter
        from genset.routing.remote import RemoteRouter

        metrics = options.pop("metrics", None)
        local_first = options.pop("local_first", True)
        backup = None
        if fallback:
            # The same default policy as the service's (a request's own policy goes to both).
            backup = EmbeddedRouter(bus, namespace, discovery=discovery,
                                    policy=policy_name(policy) if policy else POLICY_GENSET,
                                    model=model, **options)
        return RemoteRouter(bus, namespace, timeout=timeout,
                            policy=policy_name(policy) if policy else None, fallback=backup,
                            discovery=discovery, metrics=metrics, local_first=local_first)
    from genset.routing.embedded import EmbeddedRouter

    default_policy = policy_name(policy) if policy else (
        POLICY_GENSET if mode == MODE_EMBEDDED else mode)
    return EmbeddedRouter(bus, namespace, discovery=discovery, policy=default_policy,
                          model=model, **options)
