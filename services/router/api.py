"""The routing interface the frontend calls: one Protocol, three ways to get it.

```python
from services.router.api import create_router

router = create_router("embedded", bus=bus, namespace="default", discovery=discovery)
await router.start()                       # subscribes to KV events, load reports, membership
decision = await router.route(proto.RouteRequest(request_id=rid, model=m, token_ids=packed,
                                                 max_tokens=n))
if decision.worker_id is None: ...         # decision.error says why (no worker, bad request)
router.on_first_token(rid)                 # prefill finished: the router's load view moves on
router.on_done(rid)                        # finished, cancelled or failed: load is freed
await router.close()
```

Modes for `create_router(mode, ...)`:
- `"embedded"`: the prefix index, load model and policies run in this process, fed from the bus
  (KV events, load reports, decisions of other router replicas, worker membership from etcd).
  `policy=` picks the default policy ("genset" unless told); `RouteRequest.policy` overrides
  it per request.
- `"remote"`: asks the `genset router` service over NATS (`proto.subjects.route(ns)`, a queue
  group). `on_first_token` / `on_done` are no-ops there: workers publish
  `proto.RequestLifecycle` on `proto.subjects.request_lifecycle(ns)` themselves and every
  router replica listens.
- a policy name (`"round_robin"`, `"random"`, `"least_loaded"`, `"kv"`/`"genset"`,
  `"dynamo"`, `"sglang"`): shorthand for embedded with that default policy.

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


EMBEDDED_POLICY_MODES = ("round_robin", "random", "least_loaded", "kv", "genset", "dynamo", "sglang")


def create_router(
    mode: str,
    *,
    bus,
    namespace: str | None = None,
    discovery=None,
    policy: str | None = None,
    model: str | None = None,
    timeout: float = 2.0,
    **options,
) -> Router:
    """Build a router; see the module docstring. `bus` is a `genset.runtime.bus.Bus`,
    `discovery` a `genset.runtime.discovery.Discovery` (embedded modes use it to learn which
    workers serve which model; without it workers are learned from their KV events and load
    reports). `options` go to `services.router.core.RouterConfig`."""
    namespace = namespace or getattr(bus, "namespace", "default")
    if mode == "remote":
        from services.router.remote import RemoteRouter

        return RemoteRouter(bus, namespace, timeout=timeout, policy=policy)
    if mode == "embedded" or mode in EMBEDDED_POLICY_MODES:
        from services.router.embedded import EmbeddedRouter

        default_policy = policy or ("genset" if mode == "embedded" else mode)
        return EmbeddedRouter(bus, namespace, discovery=discovery, policy=default_policy,
                              model=model, **options)
    raise ValueError(
        f"unknown router mode {mode!r}: use 'embedded', 'remote' or one of {', '.join(EMBEDDED_POLICY_MODES)}"
    )
